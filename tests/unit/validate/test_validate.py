"""The Great Expectations gate: a clean shard passes, and each expectation catches its own bad case."""

import copy
import json

import pytest

from ovtasks.pseudolabel.candidates import OPEN_VOCAB_ID_BASE, Vocabulary
from ovtasks.core.config import ValidateConfig, load_settings
from ovtasks.data.groundtruth import encode_rle
from ovtasks.validate.expectations import tables, validate, validate_tables

import numpy as np

VOCAB = Vocabulary.load(None)


def _ann(ann_id, image_id, x, y, w, h, cat=None, score=0.8, size=(20, 20)):
    cat = cat or VOCAB.entries[0]
    m = np.zeros(size, bool)
    m[y:y + h, x:x + w] = True
    return {"id": ann_id, "image_id": image_id, "category_id": cat.id, "category_name": cat.name, "known_category": True,
            "segmentation": encode_rle(m), "area": float(m.sum()), "bbox": [x, y, w, h], "pseudo_box": [x, y, w, h],
            "score": score, "iscrowd": 0}


def good_doc():
    images = [{"id": i, "width": 20, "height": 20} for i in range(4)]
    anns = [_ann(1, 0, 2, 2, 6, 6), _ann(2, 0, 10, 10, 5, 5, VOCAB.entries[1]), _ann(3, 1, 0, 0, 20, 20),
            _ann(4, 2, 4, 4, 4, 4), _ann(5, 3, 1, 1, 3, 3)]
    anns.append({**_ann(6, 3, 12, 1, 4, 4), "category_id": OPEN_VOCAB_ID_BASE + 17, "category_name": "lantern", "known_category": False})
    return {"images": images, "annotations": anns, "categories": []}


def _run(doc, tmp_path, cfg=None):
    cfg = cfg or ValidateConfig()
    a, i = tables(doc, VOCAB, cfg)
    return validate_tables("00000", a, i, cfg, str(tmp_path / "docs"))


def _failed(v):
    return {(f["expectation"], f["column"]) for f in v.failed}


def test_clean_shard_passes_and_writes_data_docs(tmp_path):
    v = _run(good_doc(), tmp_path)
    assert v.success and v.failed == []
    assert set(v.html) == {"annotations", "images"}
    assert "<html" in open(v.html["annotations"]).read().lower()


def _box_outside(d):
    d["annotations"][0]["pseudo_box"] = [15, 2, 9, 6]


def _tiny_mask_in_big_box(d):
    for a in d["annotations"]:
        a["pseudo_box"] = [0, 0, 20, 20]
        a["area"] = 1.0


def _score_above_one(d):
    d["annotations"][2]["score"] = 1.7


def _score_missing(d):
    d["annotations"][2]["score"] = None


def _rle_broken(d):
    d["annotations"][1]["segmentation"] = {"size": [20, 20], "counts": "\x00not-an-rle"}


def _rle_empty(d):
    d["annotations"][1]["segmentation"] = encode_rle(np.zeros((20, 20), bool))


def _rle_wrong_size(d):
    d["annotations"][1]["segmentation"] = encode_rle(np.ones((10, 10), bool))


def _category_unknown(d):
    d["annotations"][0]["category_id"] = 987654


def _category_name_mismatch(d):
    d["annotations"][0]["category_name"] = "not-" + d["annotations"][0]["category_name"]


def _open_vocab_id_in_vocab_range(d):
    d["annotations"][-1]["category_id"] = 3


def _duplicates(d):
    d["annotations"] += [dict(copy.deepcopy(d["annotations"][0]), id=100 + k, score=0.5) for k in range(3)]


def _too_many_instances(d):
    d["annotations"] += [_ann(200 + k, 1, k, k, 3, 3, VOCAB.entries[2 + k % 5]) for k in range(60)]


def _few_labelled_images(d):
    d["images"] += [{"id": 10 + k, "width": 20, "height": 20} for k in range(20)]


def _no_images(d):
    d["images"], d["annotations"] = [], []


CASES = [
    (_box_outside, ("expect_column_values_to_be_between", "box_overflow")),
    (_tiny_mask_in_big_box, ("expect_column_values_to_be_between", "mask_box_ratio")),
    (_score_above_one, ("expect_column_values_to_be_between", "score")),
    (_score_missing, ("expect_column_values_to_not_be_null", "score")),
    (_rle_broken, ("expect_column_values_to_be_in_set", "rle_valid")),
    (_rle_empty, ("expect_column_values_to_be_in_set", "rle_valid")),
    (_rle_wrong_size, ("expect_column_values_to_be_in_set", "rle_valid")),
    (_category_unknown, ("expect_column_values_to_be_in_set", "category_valid")),
    (_category_name_mismatch, ("expect_column_values_to_be_in_set", "category_valid")),
    (_open_vocab_id_in_vocab_range, ("expect_column_values_to_be_in_set", "category_valid")),
    (_duplicates, ("expect_column_mean_to_be_between", "duplicate")),
    (_too_many_instances, ("expect_column_values_to_be_between", "instances")),
    (_few_labelled_images, ("expect_column_mean_to_be_between", "labelled")),
    (_no_images, ("expect_table_row_count_to_be_between", None)),
]


@pytest.mark.parametrize("corrupt,expected", CASES, ids=[c[0].__name__.strip("_") for c in CASES])
def test_each_expectation_catches_its_case(corrupt, expected, tmp_path):
    doc = good_doc()
    corrupt(doc)
    v = _run(doc, tmp_path)
    assert not v.success and expected in _failed(v), v.failed


def test_mostly_tolerates_a_few_odd_ratios_and_thresholds_come_from_config(tmp_path):
    doc = good_doc()
    doc["annotations"][0]["area"] = 0.5  # one odd ratio of 6: under the 0.95 "mostly" it fails ...
    assert ("expect_column_values_to_be_between", "mask_box_ratio") in _failed(_run(doc, tmp_path))
    loose = ValidateConfig(mask_box_ratio_mostly=0.8)  # ... with 0.8 it passes
    assert _run(doc, tmp_path / "b", loose).success
    dup = good_doc()
    _duplicates(dup)
    assert _run(dup, tmp_path / "c", ValidateConfig(max_duplicate_rate=0.5)).success


def _write_shard(base, name, doc):
    """A pseudo-label shard and its complete manifest (which records the JSON's sha256, as pseudo-label writes it)."""
    import hashlib

    blob = json.dumps(doc).encode()
    (base / f"{name}.json").write_bytes(blob)
    (base / f"{name}.manifest.json").write_text(json.dumps({"status": "complete", "files": {
        f"pseudo/maskfree/{name}.json": {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}}}))


def test_validate_run_excludes_failing_shards_with_reasons(tmp_path, capsys):
    base = tmp_path / "run" / "pseudo" / "maskfree"
    base.mkdir(parents=True)
    bad = good_doc()
    _score_above_one(bad)
    for name, doc in (("00000", good_doc()), ("00001", bad)):
        _write_shard(base, name, doc)
    (base / "00002.json").write_text(json.dumps(good_doc()))
    (base / "00002.manifest.json").write_text(json.dumps({"status": "running"}))
    rep = validate(str(tmp_path / "run"), load_settings(env={})).report
    assert rep["training_shards"] == ["00000"] and rep["passed"] == 1 and rep["failed"] == 2
    assert any("score" in r for r in rep["excluded"]["00001"])
    assert rep["excluded"]["00002"] == ["pseudo-label manifest is not complete"]
    saved = json.loads((base / "00001.validation.json").read_text())
    assert saved["success"] is False and saved["results"]["annotations"]["success"] is False
    assert (base / "validation" / "00000" / "annotations.html").exists()
    assert json.loads((base / "validation_report.json").read_text())["training_shards"] == ["00000"]
    from ovtasks.cli.main import main

    assert main(["validate", "--src", str(tmp_path / "run")]) == 0
    assert "FAILED" in capsys.readouterr().out
    assert main(["validate", "--src", str(tmp_path / "run"), "--strict"]) == 3
    with pytest.raises(FileNotFoundError, match="no pseudo-label shards"):
        validate(str(tmp_path / "empty"), load_settings(env={}))


def test_validate_real_pseudo_labels(clean_small, tiny_grounded, tmp_path):
    """Random-weight Grounding-DINO + SAM output is noise: the gate must say so, with reasons."""
    from ovtasks.pseudolabel.runner import pseudo_label

    s = load_settings(env={"OVTASKS_GROUNDED__GDINO_MODEL": tiny_grounded[0], "OVTASKS_GROUNDED__SAM_MODEL": tiny_grounded[1],
                           "OVTASKS_GROUNDED__BOX_THRESHOLD": "0.3"})
    pseudo_label(clean_small, str(tmp_path / "g"), s, "grounded")
    rep = validate(str(tmp_path / "g"), s, "grounded").report
    assert len(rep["shards"]) == 2
    for e in rep["shards"]:
        assert e["rows"]["images"] > 0 and e["success"] == (not e["reasons"])


def test_a_shard_that_does_not_match_its_manifest_fails_and_training_rechecks(tmp_path, clean_small, labelled):
    """The gate checks the JSON against its manifest; training re-checks it against what the gate passed, so a
    relabel that lands between validation and training is left out instead of trained on unvalidated."""
    import shutil

    from ovtasks.train.data import training_data

    run = tmp_path / "run"
    shutil.copytree(labelled, run)
    base = run / "pseudo" / "maskfree"
    shards = sorted(p.name[:5] for p in base.glob("*.manifest.json"))
    s = load_settings(env={})
    doc = json.loads((base / f"{shards[0]}.json").read_text())
    doc["annotations"] = doc["annotations"][:-1]
    (base / f"{shards[0]}.json").write_text(json.dumps(doc))  # changed after its manifest was written
    rep = validate(str(run), s).report
    assert shards[0] not in rep["training_shards"] and "does not match its manifest" in rep["excluded"][shards[0]][0]
    _write_shard(base, shards[0], doc)  # relabelled properly: passes again
    assert set(validate(str(run), s).report["training_shards"]) == set(shards)
    doc["annotations"] = doc["annotations"][:-1]
    _write_shard(base, shards[0], doc)  # a relabel lands after validation, before training
    samples, _, _, manifest = training_data(clean_small, str(run), s)
    assert manifest["shards"] == shards[1:] and "changed since validation" in manifest["excluded"][shards[0]][0]


def test_validate_reads_only_its_generators_shards(tmp_path):
    """``pseudo/maskfree`` must not pick up a sibling generator's (``pseudo/maskfree2``) or a sub-folder's shards."""
    base = tmp_path / "run" / "pseudo" / "maskfree"
    for folder in (base, tmp_path / "run" / "pseudo" / "maskfree2", base / "old"):
        folder.mkdir(parents=True)
    _write_shard(base, "00000", good_doc())
    _write_shard(tmp_path / "run" / "pseudo" / "maskfree2", "00007", good_doc())
    _write_shard(base / "old", "00009", good_doc())
    rep = validate(str(tmp_path / "run"), load_settings(env={})).report
    assert rep["training_shards"] == ["00000"] and rep["passed"] == 1 and rep["failed"] == 0
