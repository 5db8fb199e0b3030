"""The GX gate under hostile pseudo-labels (red-team round three, items 8-11): a malformed annotation fails its
shard alone, duplicates are found without an n^2 matrix, an RLE's declared size is checked before it is decoded,
and the box training reads is validated."""

import copy
import json
import time
import tracemalloc

import numpy as np
import pytest

from ovtasks.core.config import ValidateConfig, load_settings
from ovtasks.data.groundtruth import encode_rle
from ovtasks.validate.expectations import tables, validate
from tests.unit.validate.test_validate import VOCAB, _ann, _failed, _run, _write_shard, good_doc


@pytest.mark.parametrize("field, value", [("bbox", [1, 2, 3]), ("image_id", [0]), ("area", "big"), ("image_id", None),
                                          ("segmentation", "counts"), ("score", {"v": 1}), ("category_id", "7")])
def test_one_malformed_annotation_fails_its_shard_alone(tmp_path, field, value):
    base = tmp_path / "run" / "pseudo" / "maskfree"
    base.mkdir(parents=True)
    bad = good_doc()
    bad["annotations"][2][field] = value
    for name, doc in (("00000", good_doc()), ("00001", bad), ("00002", good_doc())):
        _write_shard(base, name, doc)
    rep = validate(str(tmp_path / "run"), load_settings(env={})).report
    assert rep["training_shards"] == ["00000", "00002"] and rep["excluded"]["00001"], rep
    assert (base / "validation_report.json").exists() and (base / "00002.validation.json").exists()


@pytest.mark.parametrize("doc", [[], {"images": "x", "annotations": []}, {"images": [{"id": "a", "height": 1, "width": 1}],
                                                                          "annotations": []},
                                 {"images": [], "annotations": [1, "two"]}], ids=["list", "images_str", "str_id", "ann_scalars"])
def test_a_malformed_shard_document_fails_with_its_reason(tmp_path, doc):
    base = tmp_path / "run" / "pseudo" / "maskfree"
    base.mkdir(parents=True)
    _write_shard(base, "00000", doc)
    _write_shard(base, "00001", good_doc())
    rep = validate(str(tmp_path / "run"), load_settings(env={})).report
    assert rep["training_shards"] == ["00001"] and rep["excluded"]["00000"]


def test_twelve_thousand_annotations_on_one_image_fail_fast_on_the_instance_cap():
    """12,000 instances on one image: the old all-pairs IoU built a 12,000^2 matrix (1.2 GB, 15 s)."""
    doc = {"images": [{"id": 0, "width": 64, "height": 64}], "categories": [],
           "annotations": [_ann(i, 0, i % 40, (i // 40) % 40, 8, 8, size=(64, 64)) for i in range(12_000)]}
    tracemalloc.start()
    t0 = time.perf_counter()
    ann_df, img_df = tables(doc, VOCAB, ValidateConfig())
    seconds, (_, peak) = time.perf_counter() - t0, tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 300 * 2**20, f"{peak / 2**20:.0f} MiB"  # the tables themselves, not a matrix
    assert int(img_df["instances"].iloc[0]) == 12_000 > ValidateConfig().max_instances_per_image
    assert seconds < 120  # bounded, not a timing target: the suite runs on a shared 2-core machine


def test_duplicates_are_still_found_by_the_sweep(tmp_path):
    d = good_doc()
    twin = copy.deepcopy(d["annotations"][0])
    twin["id"], twin["score"] = 99, 0.5
    d["annotations"].append(twin)
    a, _ = tables(d, VOCAB, ValidateConfig())
    assert a["duplicate"].tolist() == [0.0] * 6 + [1.0]  # the lower-scored copy, not the original
    far = copy.deepcopy(d)
    far["annotations"][-1] = {**_ann(99, 0, 12, 2, 6, 6), "score": 0.5}  # same size, no overlap
    assert tables(far, VOCAB, ValidateConfig())[0]["duplicate"].sum() == 0


def test_an_rle_declaring_a_huge_size_is_never_decoded(tmp_path):
    d = good_doc()
    d["annotations"][0]["segmentation"] = {"size": [20000, 20000], "counts": "0" * 40}
    d["annotations"].append({**copy.deepcopy(d["annotations"][0]), "id": 77})
    tracemalloc.start()
    a, _ = tables(d, VOCAB, ValidateConfig())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50 * 2**20 and not a["rle_valid"].iloc[0]
    assert ("expect_column_values_to_be_in_set", "rle_valid") in _failed(_run(d, tmp_path))


@pytest.mark.parametrize("bbox", [[float("nan"), 0, 4, 4], [2, 2, 60, 4], ["2", 2, 4, 4], [2, 2, 0, 4], [2, 2, -3, 4], None])
def test_the_box_training_reads_is_validated(tmp_path, bbox):
    """The pseudo box may be fine while ``bbox`` (what training reads) is NaN, outside the image or a string."""
    d = good_doc()
    d["annotations"][0]["bbox"] = bbox
    assert ("expect_column_values_to_be_between", "bbox_overflow") in _failed(_run(d, tmp_path))
