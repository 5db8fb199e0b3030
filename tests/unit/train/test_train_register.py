"""Train the OV Mask R-CNN on validated pseudo-labels, resume, evaluate, register and promote in MLflow (sqlite)."""

import json

import numpy as np
import pytest
import torch

from ovtasks.core.config import load_settings
from ovtasks.data.clean import complete_shards, iter_shard
from ovtasks.data.groundtruth import GroundTruth
from ovtasks.core.storage import open_store
from ovtasks.evaluate.models import evaluate_model
from ovtasks.models.loading import load_model
from ovtasks.train.ov_maskrcnn import train_ov_maskrcnn, TrainConfig
from ovtasks.validate.expectations import validate


CFG = TrainConfig(steps=6, batch_size=2, min_size=128, max_size=160, checkpoint_every=3)


def test_training_requires_the_gate(clean_small, tmp_path):
    (tmp_path / "pseudo" / "maskfree").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="run `ovtasks validate` first"):
        train_ov_maskrcnn(clean_small, str(tmp_path), str(tmp_path / "m"), load_settings(env={}), CFG)


def test_train_resume_evaluate_register_promote(clean_small, labelled, synth_small, tmp_path):
    s = load_settings(env={"OVTASKS_DATA_DIR": str(tmp_path / "data")})
    full = train_ov_maskrcnn(clean_small, labelled, str(tmp_path / "full"), s, CFG)
    assert len(full.history) == 6 and all(np.isfinite(h["loss"]) for h in full.history)
    assert (tmp_path / "full" / "loss_curve.png").exists() and not list((tmp_path / "full").glob("checkpoint*"))

    # a run killed after its step-3 checkpoint resumes there and ends with the same weights
    class Killed(Exception):
        pass

    def kill(rec):
        if rec["step"] >= 4:
            raise Killed

    with pytest.raises(Killed):
        train_ov_maskrcnn(clean_small, labelled, str(tmp_path / "resumed"), s, CFG, progress=lambda r: kill(r) if r["step"] else None)
    assert (tmp_path / "resumed" / "checkpoint-train.pt").exists()
    resumed = train_ov_maskrcnn(clean_small, labelled, str(tmp_path / "resumed"), s, CFG)
    assert [h["step"] for h in resumed.history] == list(range(6))
    a, _ = load_model(full.model_dir)
    b, meta = load_model(resumed.model_dir)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-6), k
    assert meta["data_manifest"]["sha256"] == full.data_manifest["sha256"]

    ev = evaluate_model(a, synth_small[0], clean_small, s, limit=16)
    assert [(r["setting"], r["split"]) for r in ev["rows"]][:3] == [("generalized", "all"), ("generalized", "base"), ("generalized", "novel")]
    assert ev["novel_mask_AP50"] is not None and "| constrained | novel |" in ev["table"]

    from ovtasks.registry.lifecycle import load_registered, log_and_register, promote

    gx = json.loads((open_store(labelled).get_bytes("pseudo/maskfree/validation_report.json")))
    from ovtasks.evaluate.coco import split_ids
    from ovtasks.registry.gate import ap50, match_table
    from tests.unit.registry.test_gate import degraded

    # planted evaluations on the real evaluation set: the gate pairs their predictions image by image
    def planted(keep, seed):
        preds = degraded(ev["gt"], keep, seed)
        return dict(ev, predictions=preds, novel_mask_AP50=ap50(match_table(ev["gt"], preds, split_ids(ev["gt"])["novel"])))

    good, bad = planted(1.0, 1), planted(0.4, 2)
    # the floor: a 0.0 model is never champion, even with no champion to compare with
    v0 = log_and_register(s, full.model_dir, {"steps": 6}, full.history, gx, dict(ev, novel_mask_AP50=0.0), (), full.data_manifest)
    floor = promote(s, who="tester")
    assert not floor.promoted and "below the floor" in floor.reason and floor.champion_after is None and floor.gate["verdict"] == "below_floor"
    v1 = log_and_register(s, full.model_dir, {"steps": 6}, full.history, gx, good,
                          [str(tmp_path / "full" / "loss_curve.png")], full.data_manifest)
    assert v1.version == "2" and v1.tags["gx_status"] == "passed" and v1.tags["eval_set_sha256"]
    first = promote(s, who="tester")
    assert first.promoted and first.champion_after == "2" and first.champion_before is None and first.gate["verdict"] == "first"
    # a worse challenger is refused with its interval and the champion stays
    v2 = log_and_register(s, full.model_dir, {"steps": 6}, full.history, gx, bad, (), full.data_manifest)
    refused = promote(s, tolerance=1.0, who="tester")
    assert not refused.promoted and "worse than the champion" in refused.reason and refused.champion_after == "2"
    assert refused.gate["comparison"]["high"] < -1.0 and refused.gate["comparison"]["images"] == 16
    # the same predictions again: not worse beyond the margin, so it moves, tagged with who / why / previous
    v3 = log_and_register(s, full.model_dir, {"steps": 6}, full.history, gx, good, (), full.data_manifest)
    ok = promote(s, tolerance=1.0, who="tester", why="weekly retrain")
    assert ok.promoted and ok.champion_before == "2" and ok.champion_after == v3.version and ok.gate["verdict"] == "not_worse"
    assert ok.gate["comparison"]["difference"] == 0.0 and v0.version == "1" and v2.version == "3"
    from mlflow import MlflowClient

    from ovtasks.registry.lifecycle import tracking_uri

    c = MlflowClient(tracking_uri(s), registry_uri=tracking_uri(s))
    mv = c.get_model_version_by_alias(s.registry.model_name, "champion")
    assert mv.tags["promoted_by"] == "tester" and mv.tags["previous_champion"] == "2" and mv.tags["promotion_reason"] == "weekly retrain"
    assert json.loads(mv.tags["promotion_gate"])["verdict"] == "not_worse"
    refused_tags = c.get_model_version(s.registry.model_name, "3").tags
    assert "worse than the champion" in refused_tags["promotion_refused"] and json.loads(refused_tags["promotion_gate"])["verdict"] == "worse"
    # a failed GX status is refused
    bad_gx = dict(gx, failed=1, passed=0)
    log_and_register(s, full.model_dir, {"steps": 6}, full.history, bad_gx, dict(good, novel_mask_AP50=99.0), (), full.data_manifest)
    r = promote(s)
    assert not r.promoted and "GX status" in r.reason and r.champion_after == v3.version
    model, meta, version = load_registered(s, "champion")
    assert version == v3.version and meta["architecture"] == "ov-maskrcnn"


def test_base_gt_finetune_holds_out_eval_images_and_novel_gt(clean_small, labelled, synth_small, tmp_path):
    from ovtasks.data.holdout import eval_image_ids
    from ovtasks.train.data import gt_training_data

    s = load_settings(env={})
    held = eval_image_ids(synth_small[0], clean_small, s, limit=6)
    assert len(held) == 6
    samples, cats, emb, manifest = gt_training_data(synth_small[0], clean_small, s, "base", held)
    gt = GroundTruth.load(synth_small[0], s)
    base = {c["id"] for c in gt.coco["categories"] if c["split"] == "base"}
    assert {c["id"] for c in cats} == base and emb.shape == (len(cats), 384)
    assert all(a["category_id"] in base for _, anns in samples for a in anns)
    assert manifest["held_out"]["images"] == 6 and manifest["images"] == len(samples)
    held_images = {x.image_id: x.image for sh in complete_shards(open_store(clean_small)) for x in iter_shard(open_store(clean_small), sh)
                   if x.image_id in set(held)}
    assert not any(any(np.array_equal(im, h) for h in held_images.values()) for im, _ in samples)

    with pytest.raises(ValueError, match="needs gt_uri"):
        train_ov_maskrcnn(clean_small, labelled, str(tmp_path / "x"), s, TrainConfig(steps=2, finetune_steps=2))
    cfg = TrainConfig(steps=3, batch_size=2, min_size=128, max_size=160, finetune_steps=2, checkpoint_every=2)
    m = train_ov_maskrcnn(clean_small, labelled, str(tmp_path / "ft"), s, cfg, gt_uri=synth_small[0], exclude_ids=held)
    assert [(h["step"], h["phase"]) for h in m.history] == [(0, "train"), (1, "train"), (2, "train"), (3, "finetune"), (4, "finetune")]
    assert m.data_manifest["finetune"]["split"] == "base" and m.metrics["finetune_steps"] == 2
    assert sorted(p.name for p in (tmp_path / "ft").iterdir()) == ["history.json", "loss_curve.png", "model.safetensors",
                                                                   "ovtasks_model.json", "text_embeddings.npy"]


def test_cli_train_and_promote(clean_small, labelled, synth_small, tmp_path, monkeypatch, capsys):
    from ovtasks.cli.main import main

    monkeypatch.setenv("OVTASKS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("OVTASKS_REGISTRY__MIN_NOVEL_AP50", "0")  # the CLI's mechanics, with 2-step models
    assert main(["promote"]) == 2 and "no model registry" in capsys.readouterr().err  # and none is created by asking
    assert not (tmp_path / "data" / "mlflow").exists()
    assert main(["train", "--src", clean_small, "--pseudo", labelled, "--out", str(tmp_path / "x"), "--finetune-steps", "2"]) == 2
    rc = main(["train", "--src", clean_small, "--pseudo", labelled, "--out", str(tmp_path / "m"), "--steps", "2",
               "--batch-size", "2", "--gt", synth_small[0], "--eval-images", "4", "--register"])
    out = capsys.readouterr().out
    assert rc == 0 and "ovtasks-ov-maskrcnn v1 (alias challenger)" in out and "| generalized | novel |" in out
    with pytest.raises(SystemExit) as bad:  # the actor is who runs the command, never an argument
        main(["promote", "--who", "cli"])
    assert bad.value.code == 2
    capsys.readouterr()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ops")  # the registry login the CLI acts as
    assert main(["promote"]) == 0 and "yes" in capsys.readouterr().out
    _champion_answers_images(tmp_path, clean_small, capsys)
    # rollback: any existing version becomes the champion without the gate, audited on the version
    rc = main(["train", "--src", clean_small, "--pseudo", labelled, "--out", str(tmp_path / "m2"), "--steps", "2",
               "--batch-size", "2", "--gt", synth_small[0], "--eval-images", "4", "--register"])
    assert rc == 0 and "v2 (alias challenger)" in capsys.readouterr().out
    assert main(["promote", "--version", "2", "--reason", "canary"]) == 0
    assert main(["promote", "--version", "1", "--reason", "v2 misbehaves"]) == 0
    assert "champion set to v1 by ops (was v2): v2 misbehaves" in capsys.readouterr().out
    assert main(["promote", "--version", "1"]) == 4 and "already the champion" in capsys.readouterr().out
    assert main(["promote", "--version", "9"]) == 2 and "has no version 9" in capsys.readouterr().err
    from mlflow import MlflowClient

    from ovtasks.core.config import load_settings
    from ovtasks.registry.lifecycle import tracking_uri

    s = load_settings(env={"OVTASKS_DATA_DIR": str(tmp_path / "data")})
    c = MlflowClient(tracking_uri(s), registry_uri=tracking_uri(s))
    v1 = c.get_model_version_by_alias(s.registry.model_name, "champion")
    assert str(v1.version) == "1" and v1.tags["previous_champion"] == "2" and v1.tags["promoted_by"] == "ops"
    assert [r["replaced"] for r in json.loads(v1.tags["rollbacks"])] == ["2"]

    # Semantic-SAM: SA-1B-format data, training, box-prompted evaluation, its own registered model and champion
    assert main(["synth-sa1b", "--out", str(tmp_path / "sa"), "--images", "6"]) == 0
    rc = main(["train", "--model", "semantic-sam", "--src", clean_small, "--pseudo", labelled, "--sa1b", str(tmp_path / "sa"),
               "--out", str(tmp_path / "ss"), "--steps", "2", "--batch-size", "5", "--lr", "1e-3", "--gt", synth_small[0],
               "--eval-images", "4", "--register"])
    out = capsys.readouterr().out
    assert rc == 0 and "ovtasks-semantic-sam v1 (alias challenger)" in out and "sa1b_images" in out
    assert main(["promote", "--model", "semantic-sam"]) == 0
    import io

    import pandas as pd
    from PIL import Image

    from ovtasks.registry.lifecycle import _client
    from ovtasks.registry.serving import encode_image

    mlflow, _ = _client(load_settings(env={"OVTASKS_DATA_DIR": str(tmp_path / "data")}))
    sam = mlflow.pyfunc.load_model("models:/ovtasks-semantic-sam@champion")  # a pyfunc too: box prompts in, named masks out
    assert {c.name for c in sam.metadata.get_input_schema().inputs} == {"image", "names", "boxes"}
    src = open_store(clean_small, load_settings(env={}).s3)
    sample = next(iter_shard(src, complete_shards(src)[0]))
    buf = io.BytesIO()
    Image.fromarray(sample.image).save(buf, format="PNG")
    got = sam.predict(pd.DataFrame({"image": [encode_image(buf.getvalue())], "names": ["ball,box"],
                                    "boxes": [json.dumps([[10, 10, 60, 60], [40, 40, 100, 100]])]}))
    answered = json.loads(got["instances"][0])
    assert all(i["name"] in {"ball", "box"} and i["prompt"] in (0, 1) for i in answered)
    assert main(["predict", str(tmp_path), "--model", "models:/ovtasks-semantic-sam@champion", "--out", str(tmp_path / "p2")]) == 2
    from ovtasks.registry.lifecycle import load_registered

    s = load_settings(env={"OVTASKS_DATA_DIR": str(tmp_path / "data"), "OVTASKS_REGISTRY__MIN_NOVEL_AP50": "0"})
    model, meta, version = load_registered(s, "champion", architecture="semantic-sam")
    assert meta["architecture"] == "semantic-sam" and version == "1" and model.embed_dim == 384
    assert load_registered(s, "champion")[1]["architecture"] == "ov-maskrcnn"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on the machine's PostgreSQL (fresh database), file artifacts."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    from tests.support.pg import fresh_database

    with fresh_database("mlflow", "MLflow server test") as db:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        art = tmp_path_factory.mktemp("mlflow-artifacts")
        log = open(art / "server.log", "w")
        proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server",
                                 "--backend-store-uri", f"postgresql+psycopg2://postgres@127.0.0.1:5432/{db}",
                                 "--default-artifact-root", art.as_uri(), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
            except OSError:
                return False

        try:
            deadline = time.monotonic() + 90
            while not healthy() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            if not healthy():
                pytest.fail(f"mlflow server did not come up: {(art / 'server.log').read_text()[-2000:]}")
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()


def test_registry_on_a_real_mlflow_server_with_postgresql(synth_small, clean_small, labelled, tmp_path, mlflow_server):
    from ovtasks.registry.lifecycle import load_registered, log_and_register, promote

    s = load_settings(env={"OVTASKS_REGISTRY__TRACKING_URI": mlflow_server, "OVTASKS_DATA_DIR": str(tmp_path)})
    trained = train_ov_maskrcnn(clean_small, labelled, str(tmp_path / "m"), s, TrainConfig(steps=2, batch_size=2, min_size=128, max_size=160))
    gx = json.loads(open_store(labelled).get_bytes("pseudo/maskfree/validation_report.json"))
    from tests.unit.registry.test_gate import degraded

    doc = GroundTruth.load(synth_small[0], s).subset(sorted(GroundTruth.load(synth_small[0], s).images)[:20])
    ev = {"rows": [], "table": "", "novel_mask_AP50": 12.0, "gt": doc, "predictions": degraded(doc, 0.9, 1)}
    v1 = log_and_register(s, trained.model_dir, {"steps": 2}, trained.history, gx, ev, (), trained.data_manifest)
    assert promote(s, who="server-test").promoted
    log_and_register(s, trained.model_dir, {"steps": 2}, trained.history, gx, dict(ev, novel_mask_AP50=5.0, predictions=[]), (),
                     trained.data_manifest)
    refused = promote(s, tolerance=1.0)  # the gate read both runs' evaluations back from the server's artifact store
    assert not refused.promoted and refused.champion_after == v1.version and refused.gate["verdict"] == "worse"
    model, meta, version = load_registered(s, "champion")
    assert version == v1.version and meta["data_manifest"]["sha256"] == trained.data_manifest["sha256"]


def test_evaluation_must_be_the_held_out_split():
    """The retrain DAG's register step scores a model only on the images its training held out."""
    from ovtasks.orchestration.tasks import check_held_out
    from ovtasks.data.holdout import held_out_record

    gt = {"images": [{"id": 3}, {"id": 1}, {"id": 2}]}
    check_held_out({"held_out": held_out_record([1, 2, 3])}, gt)  # same ids, any order
    with pytest.raises(ValueError, match="not the 2 images"):
        check_held_out({"held_out": held_out_record([1, 2])}, gt)
    with pytest.raises(ValueError, match="without a held-out evaluation split"):
        check_held_out({"held_out": held_out_record([])}, gt)
    with pytest.raises(ValueError, match="without a held-out evaluation split"):
        check_held_out({}, gt)


def test_retrain_checkpoints_and_model_live_in_the_store(clean_small, labelled, tmp_path, monkeypatch, s3_settings):
    """The retrain DAG's train step on a store URI: a try that dies after its training phase leaves the phase's
    result in the store; the retry (in a fresh local directory, as on another worker) resumes from it without
    a training step, publishes the model with its marker and removes the checkpoints; a third try finds the
    model complete; the register step loads it by URI."""
    import ovtasks.train.ov_maskrcnn as train_mod
    from ovtasks.models.hub import COMPLETE_MARKER, resolve_model
    from ovtasks.orchestration.tasks import model_run_uri, train_run

    monkeypatch.setenv("OVTASKS_MODEL_CACHE", str(tmp_path / "cache"))
    s = s3_settings.model_copy(update={"pipeline": s3_settings.pipeline.model_copy(update={"models_uri": "s3://models/retrain"})})
    run_uri = model_run_uri(s, "ov-maskrcnn", "run-1")
    assert run_uri == "s3://models/retrain/ov-maskrcnn/run-1"
    store = open_store(run_uri, s.s3)
    real_curve = train_mod.loss_curve

    def dies(*a, **k):
        raise RuntimeError("worker lost")

    monkeypatch.setattr(train_mod, "loss_curve", dies)
    with pytest.raises(RuntimeError, match="worker lost"):
        train_run("ov-maskrcnn", clean_small, labelled, run_uri, s, "maskfree", 3, sync_every_s=0.05)
    assert {"done-train.safetensors", "history-train.json"} <= set(store.list()) and not store.exists(COMPLETE_MARKER)

    monkeypatch.setattr(train_mod, "loss_curve", real_curve)
    monkeypatch.setattr(train_mod, "optimizer_step", lambda *a, **k: pytest.fail("the retry trained again"))
    out = train_run("ov-maskrcnn", clean_small, labelled, run_uri, s, "maskfree", 3, sync_every_s=0.05)
    keys = set(store.list())
    assert out["model_dir"] == run_uri and COMPLETE_MARKER in keys and "model.safetensors" in keys
    assert not [k for k in keys if k.startswith(("done-", "checkpoint-", "history-"))], keys
    monkeypatch.setattr(train_mod, "fit_ov_maskrcnn", lambda *a, **k: pytest.fail("a complete model was trained again"))
    again = train_run("ov-maskrcnn", clean_small, labelled, run_uri, s, "maskfree", 3)
    assert again["model_dir"] == store.uri and again["images"] == out["images"] and again["data_sha256"] == out["data_sha256"]
    _model, meta = load_model(resolve_model(run_uri, s.s3))
    assert meta["architecture"] == "ov-maskrcnn"


def _champion_answers_images(tmp_path, clean_small, capsys):
    """The registered champion is a pyfunc (MLmodel with signature and input example): `ovtasks predict` writes
    COCO JSON and overlays for a folder (a corrupt file skipped), and `mlflow models serve` answers an image."""
    from pathlib import Path

    import yaml
    from PIL import Image

    from ovtasks.cli.main import main
    from ovtasks.core.config import load_settings
    from ovtasks.registry.lifecycle import _client, tracking_uri

    src = open_store(clean_small, load_settings(env={}).s3)
    folder = tmp_path / "new-images"
    folder.mkdir()
    for k, sample in zip(range(3), iter_shard(src, complete_shards(src)[0])):
        Image.fromarray(sample.image).save(folder / f"img{k}.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    assert main(["predict", str(folder), "--out", str(tmp_path / "pred"), "--names", "ball,box"]) == 0
    assert "3 image(s)" in capsys.readouterr().out
    doc = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert len(doc["images"]) == 3 and list(doc["skipped"]) == [str(folder / "broken.jpg")]
    assert {c["name"] for c in doc["categories"]} <= {"ball", "box"} and len(list((tmp_path / "pred" / "overlays").glob("*.png"))) == 3

    s = load_settings(env={"OVTASKS_DATA_DIR": str(tmp_path / "data")})
    mlflow, client = _client(s)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{s.registry.model_name}@champion"))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert "python_function" in mlmodel["flavors"] and mlmodel["signature"]["inputs"] and (local / "serving_input_example.json").exists()
    mv = client.get_model_version_by_alias(s.registry.model_name, "champion")
    assert "held-out images" in mv.description and client.get_registered_model(s.registry.model_name).description

    from tests.support.serve_client import ask_served_model

    instances = ask_served_model(f"models:/{s.registry.model_name}@champion", tracking_uri(s), folder / "img0.jpg", "ball,box,star",
                                 tmp_path / "serve.log")
    assert isinstance(instances, list) and all({"name", "score", "bbox", "segmentation"} <= set(i) for i in instances)
    assert all(i["name"] in {"ball", "box", "star"} for i in instances)
