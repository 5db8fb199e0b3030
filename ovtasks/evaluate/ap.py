"""Mask AP50 against COCO ground truth, split into base and novel categories (faster-coco-eval)."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from ovtasks.data.groundtruth import GroundTruth, encode_rle


def mask_ap50(gt: GroundTruth, image_ids: Iterable[int], detections: Sequence[dict]) -> dict[str, float | None]:
    """AP at IoU 0.5 of ``detections`` (dicts with image_id, category_id, score and a bool ``mask`` or
    an RLE ``segmentation``) over ``image_ids``: ``{"all", "base", "novel"}`` in percent.

    Detections of categories outside the GT (open-vocabulary names) are ignored, as COCOeval does.
    A split with no GT instance gives None. (:func:`ovtasks.evaluate.coco.coco_ap` does the work.)
    """
    from ovtasks.evaluate.coco import coco_ap, split_ids

    ids = set(image_ids)
    gt_doc = gt.subset(sorted(ids))
    dets = [{"image_id": d["image_id"], "category_id": d["category_id"], "score": float(d["score"]),
             "segmentation": d.get("segmentation") or encode_rle(d["mask"])} for d in detections if d["image_id"] in ids]
    out: dict[str, float | None] = {}
    for split, cat_ids in split_ids(gt_doc).items():
        ap50 = coco_ap(gt_doc, dets, "segm", cat_ids)["AP50"]
        out[split] = None if ap50 is None else round(100 * ap50, 2)
    return out


def box_mask(box, shape: tuple[int, int]) -> np.ndarray:
    """The filled xyxy ``box`` as a bool mask of ``shape``."""
    h, w = shape
    x1, y1, x2, y2 = box
    m = np.zeros((h, w), bool)
    m[int(max(0, np.floor(y1))):int(min(h, np.ceil(y2))), int(max(0, np.floor(x1))):int(min(w, np.ceil(x2)))] = True
    return m
