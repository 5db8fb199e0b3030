"""The pseudo-mask error budget: with a perfect activation map and the GT box among the proposals every bound
reaches the GT; a name without a GT instance keeps the chain's mask in every row; grounding and recall numbers."""

import numpy as np
import pytest

from ovtasks.pseudolabel.maskfree.activation import ActivationMap
from ovtasks.pseudolabel.candidates import Candidate
from ovtasks.core.config import load_settings
from ovtasks.data.clean import iter_clean
from ovtasks.data.groundtruth import GroundTruth, decode_rle
from ovtasks.pseudolabel.base import PairResult
from ovtasks.evaluate.pseudo_labels import error_budget, format_budget


def test_error_budget_on_planted_pairs(synth_small, clean_small):
    s = load_settings(env={})
    gt = GroundTruth.load(synth_small[0], s)
    samples = [x for x in iter_clean(clean_small, s) if len(gt.annotations(x.image_id)) == 1][:12]  # every GT instance planted
    names = {c["id"]: c["name"] for c in gt.coco["categories"]}
    results = []
    for i, smp in enumerate(samples):
        a = gt.annotations(smp.image_id)[0]
        m = decode_rle(a["segmentation"])
        x, y, w, h = a["bbox"]
        props = np.array([[x, y, x + w, y + h], [0, 0, 8, 8]], np.float32)
        perfect = ActivationMap(m, m.astype(np.float32), 0.9, ())
        # the chain's own mask: the left half of the box (a poor one), so the bounds must beat it
        half = np.zeros_like(m)
        half[int(y):int(y + h), int(x):int(x + w / 2)] = True
        cand = Candidate(names[a["category_id"]], a["category_id"], True, names[a["category_id"]], "lexicon")
        results.append(PairResult(i, cand, 0.9, perfect, props[0], half & m, proposals=props))
    # a name that is not in the image: its (wrong) mask stays in every row
    absent = next(c for c in gt.coco["categories"] if c["id"] not in {a["category_id"] for a in gt.annotations(samples[0].image_id)})
    junk = np.zeros(samples[0].image.shape[:2], bool)
    junk[:10, :10] = True
    results.append(PairResult(0, Candidate(absent["name"], absent["id"], True, absent["name"], "lexicon"), 0.5, None, None, junk))

    table = error_budget(samples, results, gt, s)
    for row in ("selection_bound", "proposal_bound", "mask_bound"):
        assert table[row]["all"] >= 80, (row, table[row])
        assert table[row]["all"] > table["chain"]["all"], (row, table)
    assert table["_grounding"] == {"pairs_with_gt": 12, "right_object_rate": 1.0, "phi_iou_mean": 1.0,
                                   "rounds": s.maskfree.masking_rounds}
    assert table["_proposals"] == {"recall_at_0.5": 1.0, "gt_instances": 12, "top_k": s.maskfree.top_k}
    text = format_budget(table)
    assert "mask-stage bound" in text and "recall@0.5" in text

    # maskfree.mask_stage=sam: every bound row's masks are SAM's on that row's box (here a SAM that fills the box)
    from ovtasks.data.groundtruth import encode_rle
    from ovtasks.models.sam import BoxMasks

    class BoxFiller:
        boxes: list = []

        def segment(self, images, boxes):
            out = []
            for image, bx in zip(images, boxes):
                rles = []
                for x1, y1, x2, y2 in np.asarray(bx).round().astype(int):
                    m = np.zeros(image.shape[:2], bool)
                    m[y1:y2, x1:x2] = True
                    rles.append(encode_rle(m))
                    self.boxes.append([x1, y1, x2, y2])
                out.append(BoxMasks(rles, np.zeros(len(rles)), np.zeros(len(rles))))
            return out

    sam_s = load_settings(env={"OVTASKS_MASKFREE__MASK_STAGE": "sam"})
    with pytest.raises(ValueError, match="needs the generator's models"):
        error_budget(samples, results, gt, sam_s)
    filler = BoxFiller()
    boxed = error_budget(samples, results, gt, sam_s, type("Models", (), {"sam": filler})())
    gt_boxes = [[round(v) for v in (a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3])]
                for smp in samples for a in gt.annotations(smp.image_id)]
    assert all(b in filler.boxes for b in gt_boxes) and len(filler.boxes) == 3 * 12  # three bound rows, 12 pairs each
    assert boxed["_mask_stage"] == "sam" and boxed["chain"] == table["chain"]  # the chain's own masks are kept
    assert "SAM on the GT box" in format_budget(boxed) and "WSS" not in format_budget(boxed)
