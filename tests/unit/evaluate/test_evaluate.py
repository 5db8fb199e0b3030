"""COCO evaluation: faster-coco-eval agrees with pycocotools, and the base/novel, generalized/constrained table."""

import numpy as np
import pytest
from scipy import ndimage

from ovtasks.core.config import load_settings
from ovtasks.evaluate.coco import coco_ap, evaluation_table, format_eval_table, split_ids
from ovtasks.data.groundtruth import GroundTruth, decode_rle, encode_rle, mask_bbox


@pytest.fixture(scope="module")
def gt(synth_small):
    g = GroundTruth.load(synth_small[0], load_settings(env={}))
    return g.subset(sorted(im["id"] for im in g.coco["images"])[:40])


def noisy_predictions(gt, seed=0):
    """GT masks eroded / dilated / shifted, random scores, some wrong categories, some spurious."""
    rng = np.random.default_rng(seed)
    cats = [c["id"] for c in gt["categories"]]
    preds = []
    for a in gt["annotations"]:
        if rng.random() < 0.15:
            continue  # missed
        m = decode_rle(a["segmentation"])
        op = rng.integers(0, 3)
        m = ndimage.binary_erosion(m, iterations=1) if op == 0 else ndimage.binary_dilation(m, iterations=2) if op == 1 else np.roll(m, int(rng.integers(-4, 5)), axis=1)
        if not m.any():
            continue
        cat = a["category_id"] if rng.random() > 0.2 else int(rng.choice(cats))
        preds.append({"image_id": a["image_id"], "category_id": cat, "score": float(rng.random()),
                      "segmentation": encode_rle(m), "bbox": mask_bbox(m)})
    for im in gt["images"][:15]:  # spurious detections
        m = np.zeros((im["height"], im["width"]), bool)
        y, x = rng.integers(0, im["height"] - 20), rng.integers(0, im["width"] - 20)
        m[y:y + 15, x:x + 15] = True
        preds.append({"image_id": im["id"], "category_id": int(rng.choice(cats)), "score": float(rng.random()),
                      "segmentation": encode_rle(m), "bbox": mask_bbox(m)})
    return preds


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("split", ["all", "base", "novel"])
def test_faster_coco_eval_matches_pycocotools(gt, iou_type, split):
    preds = noisy_predictions(gt)
    cats = split_ids(gt)[split]
    fast = coco_ap(gt, preds, iou_type, cats, backend="faster")
    ref = coco_ap(gt, preds, iou_type, cats, backend="pycocotools")
    assert 0.05 < ref["AP50"] < 0.99  # a real, non-trivial score
    assert fast["AP"] == pytest.approx(ref["AP"], abs=1e-6) and fast["AP50"] == pytest.approx(ref["AP50"], abs=1e-6)


def test_perfect_empty_and_missing_splits(gt):
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0, "segmentation": a["segmentation"],
                "bbox": a["bbox"]} for a in gt["annotations"]]
    assert coco_ap(gt, perfect, "segm")["AP50"] == pytest.approx(1.0)
    assert coco_ap(gt, [], "segm") == {"AP": 0.0, "AP50": 0.0}
    assert coco_ap(gt, perfect, "segm", cat_ids=[123456]) == {"AP": None, "AP50": None}
    open_vocab = [dict(p, category_id=5_000_000) for p in perfect]
    assert coco_ap(gt, open_vocab, "segm")["AP50"] == 0.0  # names outside the GT are ignored
    with pytest.raises(ValueError, match="unknown evaluation backend"):
        coco_ap(gt, perfect, "segm", backend="nope")


def test_evaluation_table(gt):
    preds = noisy_predictions(gt)
    novel = set(split_ids(gt)["novel"])
    constrained = {"novel": [p for p in preds if p["category_id"] in novel]}
    rows = evaluation_table(gt, preds, constrained)
    assert [(r["setting"], r["split"]) for r in rows] == [("generalized", "all"), ("generalized", "base"),
                                                          ("generalized", "novel"), ("constrained", "novel")]
    for r in rows:
        assert all(0 <= r[k] <= 100 for k in ("box_AP", "box_AP50", "mask_AP", "mask_AP50"))
        assert r["mask_AP"] <= r["mask_AP50"]
    assert "| constrained | novel |" in format_eval_table(rows)
    no_boxes = [{k: v for k, v in p.items() if k != "bbox"} for p in preds]
    assert evaluation_table(gt, no_boxes)[0]["box_AP"] is None
    with pytest.raises(ValueError, match="unknown split"):
        evaluation_table(gt, preds, {"rare": preds})
