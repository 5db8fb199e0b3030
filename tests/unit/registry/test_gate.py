"""The promotion gate's paired bootstrap: AP50 equals COCOeval's, and planted better / equal / worse
challengers and a 0.0 model get the right decision."""

import numpy as np
import pytest

from ovtasks.core.config import load_settings
from ovtasks.evaluate.coco import coco_ap, split_ids
from ovtasks.registry.gate import ap50, decide, evaluation_set_digest, match_table, paired_bootstrap
from ovtasks.data.groundtruth import GroundTruth, decode_rle, encode_rle, mask_bbox
from tests.unit.evaluate.test_evaluate import noisy_predictions


@pytest.fixture(scope="module")
def gt(synth_small):
    g = GroundTruth.load(synth_small[0], load_settings(env={}))
    return g.subset(sorted(im["id"] for im in g.coco["images"])[:60])


def degraded(gt, keep: float, seed: int):
    """Each GT instance found with probability ``keep`` (the mask slightly eroded), plus one spurious box
    per image: a model whose AP50 falls with ``keep``."""
    rng = np.random.default_rng(seed)
    preds = []
    for a in gt["annotations"]:
        if rng.random() >= keep:
            continue
        m = decode_rle(a["segmentation"])
        preds.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": float(0.5 + 0.5 * rng.random()),
                      "segmentation": encode_rle(m), "bbox": mask_bbox(m)})
    for im in gt["images"]:
        m = np.zeros((im["height"], im["width"]), bool)
        m[:10, :10] = True
        preds.append({"image_id": im["id"], "category_id": int(rng.choice([c["id"] for c in gt["categories"]])),
                      "score": float(0.9 * rng.random()), "segmentation": encode_rle(m), "bbox": mask_bbox(m)})
    return preds


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
@pytest.mark.parametrize("split", ["all", "base", "novel"])
def test_ap50_equals_cocoeval(gt, iou_type, split):
    preds = noisy_predictions(gt, seed=3)
    cats = split_ids(gt)[split]
    ref = coco_ap(gt, preds, iou_type, cats, backend="pycocotools")["AP50"]
    assert 0.05 < ref < 0.99
    assert ap50(match_table(gt, preds, cats, iou_type)) == pytest.approx(100 * ref, abs=1e-6)


def test_weights_replicate_images(gt):
    """Weight 2 on an image = that image twice (renamed copy) in a COCO evaluation."""
    preds = noisy_predictions(gt, seed=4)
    cats = split_ids(gt)["all"]
    table = match_table(gt, preds, cats)
    w = np.ones(len(table.image_ids))
    twice = table.image_ids[:10]
    w[:10] = 2
    big = 10_000_000
    doc = {"images": gt["images"] + [dict(im, id=im["id"] + big) for im in gt["images"] if im["id"] in twice],
           "categories": gt["categories"],
           "annotations": gt["annotations"] + [dict(a, image_id=a["image_id"] + big, id=a["id"] + big)
                                               for a in gt["annotations"] if a["image_id"] in twice]}
    dup = preds + [dict(p, image_id=p["image_id"] + big) for p in preds if p["image_id"] in twice]
    assert ap50(table, w) == pytest.approx(100 * coco_ap(doc, dup, "segm", cats, backend="pycocotools")["AP50"], abs=1e-6)


def test_planted_better_equal_worse_and_floor(gt):
    novel = split_ids(gt)["novel"]
    champion = degraded(gt, 0.6, seed=1)
    better = degraded(gt, 0.95, seed=2)
    worse = degraded(gt, 0.2, seed=3)
    margin, floor = 2.0, 5.0

    c = paired_bootstrap(gt, better, champion, novel, samples=300, seed=0)
    assert c.low > 0 and c.challenger > c.champion
    d = decide(c.challenger, c, margin, floor)
    assert d.promote and d.verdict == "better"

    c = paired_bootstrap(gt, champion, champion, novel, samples=300, seed=0)
    assert c.difference == 0 and c.low == 0 and c.high == 0
    d = decide(c.challenger, c, margin, floor)
    assert d.promote and d.verdict == "not_worse"

    c = paired_bootstrap(gt, worse, champion, novel, samples=300, seed=0)
    assert c.high < -margin
    d = decide(c.challenger, c, margin, floor)
    assert not d.promote and d.verdict == "worse" and "CI" in d.reason

    zero = paired_bootstrap(gt, [], champion, novel, samples=50, seed=0)
    assert zero.challenger == 0.0
    d = decide(zero.challenger, zero, margin, floor)
    assert not d.promote and d.verdict == "below_floor"
    assert not decide(0.0, None, margin, floor).promote  # no champion: the floor still holds
    assert decide(40.0, None, margin, floor).verdict == "first"


def test_bootstrap_is_seeded_and_checks_inputs(gt):
    novel = split_ids(gt)["novel"]
    a, b = degraded(gt, 0.7, seed=5), degraded(gt, 0.6, seed=6)
    assert paired_bootstrap(gt, a, b, novel, samples=100, seed=9) == paired_bootstrap(gt, a, b, novel, samples=100, seed=9)
    assert paired_bootstrap(gt, a, b, novel, samples=100, seed=9).low != paired_bootstrap(gt, a, b, novel, samples=100, seed=10).low
    with pytest.raises(ValueError, match="no GT instance"):
        paired_bootstrap(gt, a, b, [987654], samples=10)
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap(gt, a, b, novel, confidence=1.0)


def test_evaluation_set_digest(gt):
    same = {"images": list(reversed(gt["images"])), "annotations": list(reversed(gt["annotations"])), "categories": gt["categories"]}
    assert evaluation_set_digest(gt) == evaluation_set_digest(same)
    fewer = {**gt, "images": gt["images"][1:]}
    assert evaluation_set_digest(gt) != evaluation_set_digest(fewer)
