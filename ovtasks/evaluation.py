"""Mask AP50 against COCO ground truth, split into base and novel categories (pycocotools)."""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Iterable, Sequence

import numpy as np

from ovtasks.groundtruth import GroundTruth, encode_rle


def mask_ap50(gt: GroundTruth, image_ids: Iterable[int], detections: Sequence[dict]) -> dict[str, float | None]:
    """AP at IoU 0.5 of ``detections`` (dicts with image_id, category_id, score and a bool ``mask`` or
    an RLE ``segmentation``) over ``image_ids``: ``{"all", "base", "novel"}`` in percent.

    Detections of categories outside the GT (open-vocabulary names) are ignored, as COCOeval does.
    A split with no GT instance gives None.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = sorted(set(image_ids))
    gt_doc = gt.subset(ids)
    coco_gt = COCO()
    coco_gt.dataset = copy.deepcopy(gt_doc)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
    known = {c["id"] for c in gt_doc["categories"]}
    dets = []
    for d in detections:
        if d["category_id"] not in known or d["image_id"] not in set(ids):
            continue
        seg = d.get("segmentation") or encode_rle(d["mask"])
        dets.append({"image_id": d["image_id"], "category_id": d["category_id"], "score": float(d["score"]),
                     "segmentation": {"size": seg["size"], "counts": seg["counts"]}})
    out: dict[str, float | None] = {}
    splits = {"all": sorted(known),
              "base": sorted(c["id"] for c in gt_doc["categories"] if c.get("split") == "base"),
              "novel": sorted(c["id"] for c in gt_doc["categories"] if c.get("split") == "novel")}
    for split, cat_ids in splits.items():
        has_gt = any(a["category_id"] in set(cat_ids) for a in gt_doc["annotations"])
        if not has_gt:
            out[split] = None
            continue
        if not dets:
            out[split] = 0.0
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
            ev = COCOeval(coco_gt, coco_dt, "segm")
            ev.params.imgIds = ids
            ev.params.catIds = cat_ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        ap50 = float(ev.stats[1])
        out[split] = round(100 * max(ap50, 0.0), 2)  # -1 (nothing to score) counts as 0
    return out


def box_mask(box, shape: tuple[int, int]) -> np.ndarray:
    """The filled xyxy ``box`` as a bool mask of ``shape``."""
    h, w = shape
    x1, y1, x2, y2 = box
    m = np.zeros((h, w), bool)
    m[int(max(0, np.floor(y1))):int(min(h, np.ceil(y2))), int(max(0, np.floor(x1))):int(min(w, np.ceil(x2)))] = True
    return m
