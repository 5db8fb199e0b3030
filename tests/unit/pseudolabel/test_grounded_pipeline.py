"""``pseudo-label --generator grounded`` (and maskfree with Grounding-DINO proposals) end to end on
ingested synthetic shards with tiny random Grounding-DINO and SAM: format, resume, quarantine, CLI."""

import json

import numpy as np
import pytest

from ovtasks.core.config import load_settings
from ovtasks.data.clean import iter_shard
from ovtasks.data.groundtruth import decode_rle
from ovtasks.pseudolabel.runner import load_generator, pseudo_label
from ovtasks.core.storage import open_store


def _settings(tiny_grounded, **extra):
    env = {"OVTASKS_GROUNDED__GDINO_MODEL": tiny_grounded[0], "OVTASKS_GROUNDED__SAM_MODEL": tiny_grounded[1],
           "OVTASKS_GROUNDED__BOX_THRESHOLD": "0.3", "OVTASKS_GROUNDED__BATCH_SIZE": "4"}
    env.update(extra)
    return load_settings(env=env)


def _assert_same_annotations(got, want):
    """Equal up to float noise: batched and single-image model calls differ in the last bits."""
    assert [(a["id"], a["category_id"]) for a in got] == [(a["id"], a["category_id"]) for a in want]
    for a, b in zip(got, want):
        assert a["score"] == pytest.approx(b["score"], abs=1e-5) and a["pseudo_box"] == pytest.approx(b["pseudo_box"], abs=0.02)
        ma, mb = decode_rle(a["segmentation"]), decode_rle(b["segmentation"])
        assert (ma ^ mb).sum() <= max(2, 0.001 * ma.size)


def _doc(out, shard="00000"):
    return json.loads((out / "pseudo" / "grounded" / f"{shard}.json").read_text())


def test_grounded_outputs_resume_and_determinism(clean_small, tiny_grounded, tmp_path):
    s = _settings(tiny_grounded)
    out = tmp_path / "out"
    rep = pseudo_label(clean_small, str(out), s, "grounded").report
    assert [e["status"] for e in rep["shards"]] == ["done", "done"] and rep["annotations"] > 0
    assert rep["quarantined"] == 0
    doc = _doc(out)
    man = json.loads((out / "pseudo" / "grounded" / "00000.manifest.json").read_text())
    assert man["counts"]["images"] == man["counts"]["labelled"] + man["counts"]["quarantined"] == len(doc["images"])
    assert man["model_versions"]["gdino"]["ref"] == tiny_grounded[0] and man["model_versions"]["dtype"] == "float32"
    sizes = {im["id"]: (im["height"], im["width"]) for im in doc["images"]}
    cat_ids = {c["id"] for c in doc["categories"]}
    for ann in doc["annotations"]:
        assert ann["generator"] == "grounded" and ann["category_id"] in cat_ids and isinstance(ann["mask_iou"], float)
        m = decode_rle(ann["segmentation"])
        assert m.shape == sizes[ann["image_id"]] and m.sum() == ann["area"] > 0
        x, y, w, h = ann["bbox"]
        ys, xs = np.nonzero(m)
        assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    # same annotation fields as the maskfree generator writes
    assert {"segmentation", "bbox", "area", "category_id", "category_name", "score", "generator", "model_versions",
            "pseudo_box", "iscrowd", "phrase", "known_category"} <= set(doc["annotations"][0])
    assert all(sk["reason"] in ("no_box", "empty_mask") for sk in doc["skipped"])
    assert len(doc["annotations"]) == len({a["id"] for a in doc["annotations"]})
    before = (out / "pseudo" / "grounded" / "00000.json").read_bytes()
    assert [e["status"] for e in pseudo_label(clean_small, str(out), s, "grounded").report["shards"]] == ["skipped (complete)"] * 2
    # a rerun from scratch is byte-identical; another micro-batch size changes nothing but float noise
    pseudo_label(clean_small, str(tmp_path / "again"), s, "grounded")
    assert (tmp_path / "again" / "pseudo" / "grounded" / "00000.json").read_bytes() == before
    pseudo_label(clean_small, str(tmp_path / "b3"), _settings(tiny_grounded, OVTASKS_GROUNDED__BATCH_SIZE="3"), "grounded")
    other = _doc(tmp_path / "b3")
    assert other["images"] == doc["images"] and other["skipped"] == doc["skipped"]
    _assert_same_annotations(other["annotations"], doc["annotations"])


def test_an_image_that_breaks_its_batch_is_retried_alone_then_quarantined(clean_small, tiny_grounded, tmp_path):
    s = _settings(tiny_grounded)
    samples = list(iter_shard(open_store(clean_small), "00000"))
    bad = samples[5]
    models = load_generator(s, "grounded")
    real, seen = models.sam.segment, []

    def segment(images, boxes):
        seen.append(len(images))
        if any(im.shape == bad.image.shape and np.array_equal(im, bad.image) for im in images):
            raise RuntimeError("CUDA out of memory (injected)")
        return real(images, boxes)

    models.sam.segment = segment
    rep = pseudo_label(clean_small, str(tmp_path / "q"), s, "grounded", models=models).report
    assert rep["quarantined"] == 1 and [e["status"] for e in rep["shards"]] == ["done", "done"]
    doc = _doc(tmp_path / "q")
    assert doc["quarantined"] == [{"image_id": bad.image_id, "key": bad.key, "reason": "RuntimeError: CUDA out of memory (injected)"}]
    assert bad.image_id not in {im["id"] for im in doc["images"]}
    assert len(doc["images"]) + 1 == len(samples) and max(seen) <= 4 and 1 in seen
    # every other image got exactly what an undisturbed run gives it
    models.sam.segment = real
    clean_doc = json.loads(json.dumps(pseudo_label(clean_small, str(tmp_path / "ok"), s, "grounded", models=models).report))
    assert clean_doc["quarantined"] == 0
    ok = _doc(tmp_path / "ok")
    _assert_same_annotations(doc["annotations"], [a for a in ok["annotations"] if a["image_id"] != bad.image_id])


def test_shards_are_labelled_in_bounded_chunks(clean_small, tiny_grounded, tmp_path):
    s = _settings(tiny_grounded, OVTASKS_GROUNDED__BATCH_SIZE="2", OVTASKS_GROUNDED__PIPELINE_DEPTH="3")
    models = load_generator(s, "grounded")
    real, sizes = models.label, []
    models.label = lambda samples, cands, settings: sizes.append(len(samples)) or real(samples, cands, settings)
    rep = pseudo_label(clean_small, str(tmp_path / "c"), s, "grounded", models=models).report
    assert max(sizes) == 6 and sum(sizes) == rep["images"]


def test_detection_of_the_next_micro_batch_overlaps_segmentation(clean_small, tiny_grounded, tmp_path):
    """Pipelined (SAM on micro-batch k while Grounding-DINO detects k+1) and plain order write the same shard."""
    import threading

    s = _settings(tiny_grounded, OVTASKS_GROUNDED__BATCH_SIZE="2", OVTASKS_GROUNDED__PIPELINE_DEPTH="3")
    models = load_generator(s, "grounded")
    detect, segment = models.gdino.detect, models.sam.segment
    calls, second_detect, overlapped = [], threading.Event(), []

    def spy_detect(*a, **k):
        calls.append("detect")
        if calls.count("detect") % 3 == 2:
            second_detect.set()
        return detect(*a, **k)

    def spy_segment(images, boxes):
        if not overlapped:  # the first micro-batch's SAM call waits for the next micro-batch's detection
            overlapped.append(second_detect.wait(timeout=20))
        assert threading.current_thread() is not threading.main_thread()
        return segment(images, boxes)

    models.gdino.detect, models.sam.segment = spy_detect, spy_segment
    pseudo_label(clean_small, str(tmp_path / "piped"), s, "grounded", models=models)
    assert overlapped == [True]
    plain = _settings(tiny_grounded, OVTASKS_GROUNDED__BATCH_SIZE="2", OVTASKS_GROUNDED__PIPELINE_DEPTH="1")
    pseudo_label(clean_small, str(tmp_path / "plain"), plain, "grounded")
    for shard in ("00000", "00001"):
        got, want = _doc(tmp_path / "piped", shard), _doc(tmp_path / "plain", shard)
        assert got["images"] == want["images"] and got["skipped"] == want["skipped"]
        _assert_same_annotations(got["annotations"], want["annotations"])


def test_maskfree_with_grounding_dino_proposals(clean_small, tiny_grounded, tiny_itm_dir, tmp_path):
    s = _settings(tiny_grounded, OVTASKS_MASKFREE__ITM_MODEL=tiny_itm_dir, OVTASKS_MASKFREE__PROPOSALS="gdino",
                  OVTASKS_MASKFREE__WSS_ITERATIONS="5", OVTASKS_MASKFREE__MASKING_ROUNDS="1", OVTASKS_MASKFREE__TOP_K="7")
    models = load_generator(s, "maskfree")
    assert models.proposals.name == "gdino" and models.versions["gdino"]["top_k"] == 7
    samples = list(iter_shard(open_store(clean_small), "00000"))[:4]
    boxes = models.proposals.propose([x.image for x in samples], [["ball", "dog"]] * 4)
    assert all(0 < len(b) <= 7 for b in boxes)
    with pytest.raises(ValueError, match="object names"):
        models.proposals.propose([samples[0].image])
    rep = pseudo_label(clean_small, str(tmp_path / "mf"), s, "maskfree", models=models).report
    assert rep["annotations"] > 0
    with pytest.raises(ValueError, match="gdino_model is not set"):
        load_generator(load_settings(env={"OVTASKS_MASKFREE__ITM_MODEL": tiny_itm_dir, "OVTASKS_MASKFREE__PROPOSALS": "gdino"}), "maskfree")


def test_missing_grounded_models_and_mismatched_generator(tiny_grounded, clean_small, tmp_path):
    with pytest.raises(ValueError, match="sam_model is not set"):
        load_generator(load_settings(env={"OVTASKS_GROUNDED__GDINO_MODEL": tiny_grounded[0]}), "grounded")
    with pytest.raises(ValueError, match="gdino_model is not set"):
        load_generator(load_settings(env={"OVTASKS_GROUNDED__SAM_MODEL": tiny_grounded[1]}), "grounded")
    models = load_generator(_settings(tiny_grounded), "grounded")
    with pytest.raises(ValueError, match="'grounded' generator given to run 'maskfree'"):
        pseudo_label(clean_small, str(tmp_path / "x"), _settings(tiny_grounded), "maskfree", models=models)


def test_cli_grounded(clean_small, tiny_grounded, tmp_path, capsys):
    from ovtasks.cli.main import main

    rc = main(["pseudo-label", "--src", clean_small, "--out", str(tmp_path / "cli"), "--generator", "grounded",
               "--gdino-model", tiny_grounded[0], "--sam-model", tiny_grounded[1], "--dtype", "float32", "--batch-size", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "quarantined images" in printed and "annotations" in printed
    assert (tmp_path / "cli" / "pseudo" / "grounded" / "00001.manifest.json").exists()
