"""The promotion gate under hostile input (red-team round three): non-finite or missing metrics, unbounded
tolerances, over-long reasons and a rollback racing a promotion. Each registers real pyfunc versions of a tiny
trained OV Mask R-CNN in an embedded MLflow registry."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from ovtasks.core.config import load_settings

CFG_STEPS = 2


@pytest.fixture(scope="module")
def world(clean_small, labelled, synth_small, tmp_path_factory):
    """A trained tiny model, its evaluation, the GX report and a fresh registry directory per test (``fresh``)."""
    from ovtasks.core.storage import open_store
    from ovtasks.evaluate.models import evaluate_model
    from ovtasks.models.loading import load_model
    from ovtasks.train.ov_maskrcnn import TrainConfig, train_ov_maskrcnn

    tmp = tmp_path_factory.mktemp("hostile-gate")
    s = load_settings(env={"OVTASKS_DATA_DIR": str(tmp / "data")})
    run = train_ov_maskrcnn(clean_small, labelled, str(tmp / "m"), s,
                            TrainConfig(steps=CFG_STEPS, batch_size=2, min_size=128, max_size=160, checkpoint_every=10))
    model, _ = load_model(run.model_dir)
    ev = evaluate_model(model, synth_small[0], clean_small, s, limit=8)
    gx = json.loads(open_store(labelled).get_bytes("pseudo/maskfree/validation_report.json"))
    return run, ev, gx


def _fresh(tmp_path, **env):
    return load_settings(env={"OVTASKS_DATA_DIR": str(tmp_path / "data"), **env})


def _register(s, world, ap50):
    from ovtasks.registry.lifecycle import log_and_register

    run, ev, gx = world
    return log_and_register(s, run.model_dir, {"steps": CFG_STEPS}, run.history, gx, dict(ev, novel_mask_AP50=ap50), (),
                            run.data_manifest)


def _client(s):
    from mlflow import MlflowClient

    from ovtasks.registry.lifecycle import tracking_uri

    return MlflowClient(tracking_uri(s), registry_uri=tracking_uri(s))


def _champion(s) -> str:
    """The champion's version (a string: the sqlite store answers an int, a server a string)."""
    return str(_client(s).get_model_version_by_alias(s.registry.model_name, "champion").version)


@pytest.mark.parametrize("metric", ["nan", "forty", None])
def test_a_challenger_without_a_finite_metric_never_replaces_the_champion(world, tmp_path, metric):
    from ovtasks.registry.lifecycle import promote

    s = _fresh(tmp_path, OVTASKS_REGISTRY__MIN_NOVEL_AP50="0")
    _register(s, world, world[1]["novel_mask_AP50"])
    assert promote(s, who="tester").promoted
    ch = _register(s, world, world[1]["novel_mask_AP50"])
    c = _client(s)
    if metric is None:
        c.delete_model_version_tag(s.registry.model_name, ch.version, "novel_mask_AP50")
    else:
        c.set_model_version_tag(s.registry.model_name, ch.version, "novel_mask_AP50", metric)
    r = promote(s, who="tester")
    assert not r.promoted and "no finite novel mask AP50" in r.reason and r.champion_after == "1"
    assert _champion(s) == "1"


def test_a_nan_evaluation_is_refused_even_as_the_first_champion(world, tmp_path):
    from ovtasks.registry.lifecycle import promote

    s = _fresh(tmp_path, OVTASKS_REGISTRY__MIN_NOVEL_AP50="0")
    _register(s, world, float("nan"))
    r = promote(s, who="tester")
    assert not r.promoted and r.champion_after is None


@pytest.mark.parametrize("tolerance", [float("inf"), float("nan"), -1.0, 10.5, "5"])
def test_unbounded_or_non_numeric_tolerances_are_refused_before_anything_is_written(world, tmp_path, tolerance):
    from ovtasks.registry.lifecycle import promote

    s = _fresh(tmp_path)
    v = _register(s, world, world[1]["novel_mask_AP50"])
    with pytest.raises(ValueError, match="tolerance"):
        promote(s, tolerance=tolerance, who="tester")
    tags = _client(s).get_model_version(s.registry.model_name, v.version).tags
    assert "promotion_gate" not in tags and "promotion_refused" not in tags


def test_settings_refuse_an_infinite_default_tolerance():
    from ovtasks.core.config import ConfigError

    for bad in ("inf", ".inf", "nan", "11", "-1"):
        with pytest.raises(ConfigError, match="promotion_tolerance"):
            load_settings(env={"OVTASKS_REGISTRY__PROMOTION_TOLERANCE": bad})


def test_an_over_long_reason_is_refused_before_the_alias_moves(world, tmp_path):
    from ovtasks.registry.lifecycle import promote, rollback

    s = _fresh(tmp_path, OVTASKS_REGISTRY__MIN_NOVEL_AP50="0")
    _register(s, world, world[1]["novel_mask_AP50"])
    assert promote(s, who="tester").promoted
    _register(s, world, world[1]["novel_mask_AP50"])
    for call in (lambda: promote(s, who="tester", why="x" * 10_000), lambda: rollback(s, 2, who="tester", why="x" * 10_000)):
        with pytest.raises(ValueError, match="reason"):
            call()
        assert _champion(s) == "1"
    tags = _client(s).get_model_version(s.registry.model_name, "2").tags
    assert "promoted_by" not in tags and "previous_champion" not in tags


def test_the_audit_is_written_before_the_alias_moves(world, tmp_path, monkeypatch):
    """A failure while writing the audit leaves the champion where it was (the alias moves last)."""
    from mlflow import MlflowClient

    from ovtasks.registry.lifecycle import rollback

    s = _fresh(tmp_path, OVTASKS_REGISTRY__MIN_NOVEL_AP50="0")
    _register(s, world, world[1]["novel_mask_AP50"])
    _register(s, world, world[1]["novel_mask_AP50"])
    assert rollback(s, 1, who="tester").promoted

    def broken(self, name, version, key, value):
        raise RuntimeError("tag store down")

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", broken)
    with pytest.raises(RuntimeError, match="tag store down"):
        rollback(s, 2, who="tester", why="drill")
    monkeypatch.undo()
    assert _champion(s) == "1"


@pytest.mark.parametrize("lock", ["file", "postgres"])
def test_a_rollback_racing_a_promotion_ends_in_a_serial_order(world, tmp_path, lock):
    """Champion v1; a gate promotes challenger v3 while a rollback points the champion at v2. Whatever order the
    lock gives them, the result is the one that order gives serially: every version's previous_champion is the
    champion it really replaced."""
    from ovtasks.registry import lifecycle

    env = {"OVTASKS_REGISTRY__MIN_NOVEL_AP50": "0"}
    if lock == "postgres":
        from tests.support.pg import fresh_database

        ctx = fresh_database("lock", "promotion lock")
        db = ctx.__enter__()
        env["OVTASKS_REGISTRY__LOCK_DB"] = f"postgresql://postgres@127.0.0.1:5432/{db}"
    try:
        s = _fresh(tmp_path, **env)
        ap = world[1]["novel_mask_AP50"]
        _register(s, world, ap)
        assert lifecycle.promote(s, who="tester").promoted  # v1 champion
        _register(s, world, ap)  # v2 (challenger, then replaced)
        _register(s, world, ap)  # v3: the challenger
        # slow the gate's comparison down so that the rollback arrives while it runs
        real = lifecycle._paired_evaluation
        entered = threading.Event()

        def slow(mlflow, version):
            entered.set()
            threading.Event().wait(1.5)
            return real(mlflow, version)

        lifecycle._paired_evaluation = slow
        results = {}
        try:
            t = threading.Thread(target=lambda: results.setdefault("promote", lifecycle.promote(s, tolerance=1.0, who="gate")))
            t.start()
            assert entered.wait(60)
            results["rollback"] = lifecycle.rollback(s, 2, who="ops", why="race")
            t.join(120)
        finally:
            lifecycle._paired_evaluation = real
        c = _client(s)
        name = s.registry.model_name
        # the rollback waited for the gate: the gate moved v1 -> v3, then the rollback v3 -> v2
        assert results["promote"].promoted and results["promote"].champion_before == "1"
        assert results["rollback"].champion_before == "3" and _champion(s) == "2"
        assert c.get_model_version(name, "3").tags["previous_champion"] == "1"
        assert c.get_model_version(name, "2").tags["previous_champion"] == "3"
    finally:
        if lock == "postgres":
            ctx.__exit__(None, None, None)


# -- item 1: nothing from the artifact store runs unless it is what was registered


def _version_files(s) -> Path:
    """The embedded artifact store's copy of the (only) registered model: the folder holding its MLmodel."""
    found = sorted((Path(s.data_dir) / "mlflow").rglob("MLmodel"))
    assert len(found) == 1, found
    return found[0].parent


def test_a_registered_version_holds_no_pickle_and_its_sha256_list_is_in_the_registry(world, tmp_path):
    import yaml

    from ovtasks.registry.integrity import MANIFEST_TAG, digest_tree

    s = _fresh(tmp_path)
    v = _register(s, world, world[1]["novel_mask_AP50"])
    files = _version_files(s)
    assert not [p for p in files.rglob("*") if p.suffix in (".pkl", ".pickle", ".pt", ".pth", ".joblib")]
    flavor = yaml.safe_load((files / "MLmodel").read_text())["flavors"]["python_function"]
    assert str(flavor.get("model_code_path", "")).endswith("pyfunc_model.py") and "python_model" not in flavor
    recorded = json.loads(_client(s).get_model_version(s.registry.model_name, v.version).tags[MANIFEST_TAG])
    # MLflow adds registered_model_meta (name, version) to every models:/ download; the rest is the store's copy
    assert {k: v for k, v in recorded.items() if k != "registered_model_meta"} == digest_tree(files)
    assert any(k.endswith("model.safetensors") for k in recorded) and "pyfunc_model.py" in recorded


@pytest.mark.parametrize("target", ["code", "MLmodel", "weights", "extra"])
def test_a_tampered_version_is_refused_before_anything_of_it_runs(world, tmp_path, target):
    """Someone with write access to the artifact store swaps the code (a payload that would create a marker), the
    MLmodel, the weights, or adds a file: `ovtasks predict`, `ovtasks serve` and the loader refuse the version."""
    from ovtasks.cli.main import main
    from ovtasks.registry.integrity import IntegrityError
    from ovtasks.registry.lifecycle import load_registered, promote

    s = _fresh(tmp_path, OVTASKS_REGISTRY__MIN_NOVEL_AP50="0")
    _register(s, world, world[1]["novel_mask_AP50"])
    assert promote(s, who="tester").promoted
    files = _version_files(s)
    marker = tmp_path / "pwned"
    payload = f"import os\nos.makedirs({str(marker)!r}, exist_ok=True)\n"
    if target == "code":
        code = next(files.rglob("*.py"))
        code.write_text(payload + code.read_text())
    elif target == "MLmodel":
        (files / "MLmodel").write_text((files / "MLmodel").read_text() + "\n# edited\n")
    elif target == "weights":
        w = next(files.rglob("model.safetensors"))
        w.write_bytes(w.read_bytes()[:-8] + b"\0" * 8)
    else:
        (files / "code").mkdir(exist_ok=True)
        (files / "code" / "sitecustomize.py").write_text(payload)
    with pytest.raises(IntegrityError, match="does not match what was registered"):
        load_registered(s)
    env = {"OVTASKS_DATA_DIR": str(tmp_path / "data")}
    import os

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        assert main(["predict", str(tmp_path), "--out", str(tmp_path / "pred")]) != 0
        assert main(["serve", "--port", "1", "--dir", str(tmp_path / "served")]) != 0
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert not marker.exists(), "the tampered code ran"


def test_a_version_without_a_sha256_record_is_refused(world, tmp_path):
    from ovtasks.registry.integrity import MANIFEST_TAG, IntegrityError
    from ovtasks.registry.lifecycle import load_registered, promote

    s = _fresh(tmp_path, OVTASKS_REGISTRY__MIN_NOVEL_AP50="0")
    v = _register(s, world, world[1]["novel_mask_AP50"])
    assert promote(s, who="tester").promoted
    _client(s).delete_model_version_tag(s.registry.model_name, v.version, MANIFEST_TAG)
    with pytest.raises(IntegrityError, match="no artifact_sha256 record"):
        load_registered(s)


# -- items 13-16: predict and the served model take images as ingest and training do


def _png(arr, mode=None, **save) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(buf, format="PNG", **save)
    return buf.getvalue()


def test_serving_decodes_images_as_training_saw_them():
    import io

    import numpy as np
    from PIL import Image

    from ovtasks.registry.serving import to_model_rgb

    grey16 = _png(np.full((64, 64), 32768, np.uint16))  # 16-bit mid-grey: training saw 127, not white
    assert abs(int(to_model_rgb(grey16).mean()) - 127) <= 1
    clear = np.zeros((64, 64, 4), np.uint8)  # fully transparent: composited on white, as ingest does
    assert to_model_rgb(_png(clear, "RGBA")).min() == 255
    im = Image.fromarray(np.zeros((64, 96, 3), np.uint8))  # 96 wide, 64 high, EXIF "rotate 90": 64 wide
    exif = im.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    assert to_model_rgb(buf.getvalue()).shape == (96, 64, 3)


def test_predict_skips_bombs_slivers_and_broken_files_and_names_every_overlay(world, tmp_path):
    """A 7000x7000 PNG of a few KB, a 1x4000 sliver and a broken file are skipped with their reasons while the
    good images are written; x/a.png, y/a.png and x/a.jpg get three overlays."""
    import numpy as np

    from ovtasks.registry.predict import predict_images

    s = _fresh(tmp_path)
    x, y = tmp_path / "in" / "x", tmp_path / "in" / "y"
    x.mkdir(parents=True)
    y.mkdir()
    rng = np.random.default_rng(0)
    good = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
    (x / "a.png").write_bytes(_png(good))
    (y / "a.png").write_bytes(_png(good[::-1].copy()))
    from PIL import Image

    Image.fromarray(good).save(x / "a.jpg")
    bomb = tmp_path / "in" / "bomb.png"
    bomb.write_bytes(_png(np.zeros((7000, 7000), np.uint8), optimize=True))
    assert bomb.stat().st_size < 200_000
    (tmp_path / "in" / "sliver.png").write_bytes(_png(np.zeros((1, 4000, 3), np.uint8)))
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    paths = [x / "a.png", y / "a.png", x / "a.jpg", bomb, tmp_path / "in" / "sliver.png", tmp_path / "in" / "broken.jpg"]
    out = predict_images(world[0].model_dir, paths, tmp_path / "pred", s, progress=False)
    doc = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert out["images"] == 3 and len(doc["images"]) == 3
    assert doc["skipped"][str(bomb)].startswith("decompression_bomb")
    assert doc["skipped"][str(tmp_path / "in" / "sliver.png")].split(":")[0] in ("bad_aspect_ratio", "too_small")
    assert doc["skipped"][str(tmp_path / "in" / "broken.jpg")].startswith(("undecodable_image", "truncated_image"))
    overlays = sorted(p.name for p in (tmp_path / "pred" / "overlays").glob("*.png"))
    assert len(overlays) == 3 and overlays == sorted(im["overlay"] for im in doc["images"])
