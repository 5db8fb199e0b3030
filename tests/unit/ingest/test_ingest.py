"""Ingest on the synthetic set, from both store backends."""

import hashlib
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ovtasks.ingest.pipeline import ingest
from ovtasks.core.shards import iter_tar_samples
from ovtasks.core.storage import open_store
from ovtasks.data.synth import SynthSpec, generate


def _quarantine(store) -> dict[str, dict]:
    out = {}
    for key in store.list("quarantine"):
        if key.endswith(".jsonl"):
            for line in store.get_bytes(key).decode().splitlines():
                e = json.loads(line)
                out[e["key"]] = e
    return out


def _all_bytes(store) -> dict[str, str]:
    # history/ is the append-only run log (one new entry per run, by design), not an output
    return {k: hashlib.sha256(store.get_bytes(k)).hexdigest() for k in store.list() if not k.startswith("history/")}


def _check_against_gt(src_store, out_store, report):
    gt = json.loads(src_store.get_bytes("gt/instances.json"))
    q = _quarantine(out_store)
    assert report["seen"] == len(gt["images"])
    assert report["seen"] == report["kept"] + sum(report["quarantined"].values())
    english_rejected = 0
    for im in gt["images"]:
        expected, got = im["expected_filter"], q.get(im["key"], {}).get("reason")
        if expected == got:
            continue
        if expected is None and got == "non_english":
            english_rejected += 1  # short alt-text the detector is confident is another language
        elif expected == "near_duplicate" and got is None:
            assert q.get(im["duplicate_of"]) is not None  # its original was itself rejected
        else:
            pytest.fail(f"{im['key']}: expected {expected}, got {got} ({im['caption']!r})")
    assert english_rejected <= 0.02 * len(gt["images"])
    # every quarantine record has its sample's bytes and reason in the quarantine tar
    for key in out_store.list("quarantine"):
        if key.endswith(".tar"):
            with out_store.open_read(key) as fh:
                for raw in iter_tar_samples(fh, {}, 1 << 40):
                    reason = json.loads(raw.members["reason.json"])
                    assert reason["reason"] == q[reason["key"]]["reason"]


def test_ingest_local_matches_ground_truth(synth_small, settings, tmp_path):
    uri, _ = synth_small
    result = ingest(uri, str(tmp_path / "out"), settings, workers=1)
    rep = result.report
    assert rep["failed_shards"] == 0
    out = open_store(str(tmp_path / "out"))
    _check_against_gt(open_store(uri), out, rep)
    names = out.list("shards")
    assert names == ["shards/00000.manifest.json", "shards/00000.tar", "shards/00001.manifest.json", "shards/00001.tar"]
    manifest = json.loads(out.get_bytes("shards/00000.manifest.json"))
    assert manifest["status"] == "complete" and manifest["config_hash"] == settings.fingerprint("ingest")
    for key, info in manifest["files"].items():
        data = out.get_bytes(key)
        assert hashlib.sha256(data).hexdigest() == info["sha256"] and len(data) == info["bytes"]
    src_tar = open_store(uri).get_bytes("00000.tar")
    assert manifest["source"]["sha256"] == hashlib.sha256(src_tar).hexdigest()
    with out.open_read("shards/00000.tar") as fh:
        kept = list(iter_tar_samples(fh, {}, 1 << 40))
    assert len(kept) == manifest["counts"]["kept"]
    meta = json.loads(kept[0].members["json"])
    assert meta["lang"] == "en" and len(meta["phash"]) == 16 and meta["caption"] == kept[0].members["txt"].decode()


def test_ingest_is_idempotent_and_worker_count_independent(synth_small, settings, tmp_path):
    uri, _ = synth_small
    out = str(tmp_path / "out")
    ingest(uri, out, settings, workers=1)
    first = _all_bytes(open_store(out))
    ingest(uri, out, settings, workers=2)
    assert _all_bytes(open_store(out)) == first  # no duplicates, no drift, same bytes
    assert not [p for p in Path(out).rglob("*") if ".ovtmp-" in p.name]


def test_the_check_view_side_reaches_the_decoder(synth_small, settings, tmp_path, monkeypatch):
    """``ingest.check_view_side`` is the reduced-scale view the checks decode (none with scaled_decode off);
    the images published are the same keys and bytes either way (the pHash in their metadata may differ)."""
    import ovtasks.ingest.pipeline as pipeline

    seen = []
    real = pipeline.decode_image
    monkeypatch.setattr(pipeline, "decode_image", lambda data, cfg, check_side=None: seen.append(check_side) or real(data, cfg, check_side))
    uri, _ = synth_small
    published = {}
    for side, scaled in ((64, True), (128, True), (64, False)):
        seen.clear()
        ingest_cfg = settings.ingest.model_copy(update={"check_view_side": side, "scaled_decode": scaled})
        out = tmp_path / f"out{side}{scaled}"
        ingest(uri, str(out), settings.model_copy(update={"ingest": ingest_cfg}), workers=1)
        assert set(seen) == ({side} if scaled else {None})
        images = {}
        for tar in sorted(out.glob("shards/*.tar")):
            with open(tar, "rb") as fh:
                images.update({x.key: hashlib.sha256(x.members["jpg"]).hexdigest() for x in iter_tar_samples(fh, {}, 1 << 40)})
        published[(side, scaled)] = images
    assert published[(64, True)] == published[(128, True)] == published[(64, False)]


def test_ingest_s3_to_s3_equals_local(synth_small, settings, s3_settings, tmp_path):
    uri, _ = synth_small
    bucket = f"ingest-{uuid.uuid4().hex[:8]}"
    src_s3 = open_store(f"s3://{bucket}/laion", s3_settings.s3)
    local_src = open_store(uri)
    for key in local_src.list():
        src_s3.put_bytes(key, local_src.get_bytes(key))
    result = ingest(f"s3://{bucket}/laion", f"s3://{bucket}/clean", s3_settings, workers=2)
    assert result.report_uri == f"s3://{bucket}/clean/ingest_report.json"
    s3_out = open_store(f"s3://{bucket}/clean", s3_settings.s3)
    _check_against_gt(src_s3, s3_out, result.report)
    ingest(uri, str(tmp_path / "local"), settings, workers=1)
    local = _all_bytes(open_store(str(tmp_path / "local")))
    remote = _all_bytes(s3_out)
    assert set(local) == set(remote)
    for key in local:
        if key.endswith(".tar") or key.endswith(".jsonl"):
            assert local[key] == remote[key], key  # byte-identical data across backends


def test_ingest_without_parquet_uses_tar_json(synth_small, settings, tmp_path):
    uri, _ = synth_small
    src = tmp_path / "src"
    src.mkdir()
    (src / "00000.tar").write_bytes((Path(uri) / "00000.tar").read_bytes())
    with_pq = ingest(uri, str(tmp_path / "a"), settings, workers=1).report["shards"][0]
    without = ingest(str(src), str(tmp_path / "b"), settings, workers=1).report["shards"][0]
    assert with_pq["kept"] == without["kept"] and with_pq["quarantined"] == without["quarantined"]


def test_no_shards_is_a_clear_error(settings, tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.tar shards"):
        ingest(str(tmp_path), str(tmp_path / "o"), settings)


_RSS_SCRIPT = """
import resource, sys
from ovtasks.core.config import load_settings
from ovtasks.ingest.pipeline import ingest
ingest(sys.argv[1], sys.argv[2], load_settings(env={}), workers=1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_memory_flat_in_shard_size(settings, tmp_path):
    """Peak RSS of a whole ingest process for a 60- vs a 600-image shard (streaming)."""
    peaks = {}
    for n in (60, 600):
        src = tmp_path / f"s{n}"
        generate(SynthSpec(seed=1, shards=1, images_per_shard=n, image_size=160), str(src), settings)
        out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(src), str(tmp_path / f"o{n}")],
                             capture_output=True, text=True, check=True)
        peaks[n] = int(out.stdout.strip().splitlines()[-1]) / 1024
    assert peaks[600] - peaks[60] < 25, peaks  # MiB; 10x the data, no growth beyond noise
