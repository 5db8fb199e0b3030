"""COCO evaluation of open-vocabulary instance segmentation: box and mask AP / AP50, base and novel.

:func:`coco_ap` runs one COCO evaluation (``bbox`` or ``segm``) over a set of categories with
faster-coco-eval (C++; default) or pycocotools (the reference; a test checks both agree to 1e-6).
:func:`evaluation_table` reports, as in the OVIS literature:

* **generalized** — the model's vocabulary is every category; AP over all, base and novel
  categories of the same predictions;
* **constrained** — the vocabulary is one split (the model was asked only for those names); AP of
  that split's categories on the predictions made with that vocabulary. The caller supplies those
  predictions (``constrained={"novel": preds, ...}``), since only the model can re-rank names.

Ground truth and predictions are COCO dicts/lists: GT ``{"images", "annotations", "categories"}``
with ``split`` on each category; predictions ``{"image_id", "category_id", "score", "bbox" (xywh),
"segmentation" (RLE)}``. Predictions of categories outside the GT are ignored (as COCOeval does).
"""

from __future__ import annotations

import contextlib
import io
from typing import Iterable, Mapping, Sequence

BACKENDS = ("faster", "pycocotools")


def _coco_classes(backend: str):
    if backend == "faster":
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    raise ValueError(f"unknown evaluation backend {backend!r}; use one of {BACKENDS}")


def _clean_dets(dets: Sequence[dict], known: set[int], images: set[int], iou_type: str) -> list[dict]:
    out = []
    for d in dets:
        if d["category_id"] not in known or d["image_id"] not in images:
            continue
        item = {"image_id": d["image_id"], "category_id": d["category_id"], "score": float(d["score"])}
        if iou_type == "segm":
            seg = d["segmentation"]
            item["segmentation"] = {"size": list(seg["size"]), "counts": seg["counts"]}
            if "bbox" in d:
                item["bbox"] = list(d["bbox"])
        else:
            item["bbox"] = list(d["bbox"])
        out.append(item)
    return out


def _copy_ann(a: Mapping, new_id: int) -> dict:
    out = dict(a, id=new_id)
    if isinstance(out.get("segmentation"), dict):
        out["segmentation"] = dict(out["segmentation"])
    return out


def coco_ap(gt: Mapping, dets: Sequence[dict], iou_type: str = "segm", cat_ids: Iterable[int] | None = None,
            backend: str = "faster") -> dict[str, float | None]:
    """``{"AP", "AP50"}`` in [0, 1] over ``cat_ids`` (default all). None when those categories have no GT;
    0.0 when there are GT instances but no predictions."""
    COCO, COCOeval = _coco_classes(backend)
    cats = sorted(c["id"] for c in gt["categories"]) if cat_ids is None else sorted(set(cat_ids))
    if not any(a["category_id"] in set(cats) for a in gt["annotations"]):
        return {"AP": None, "AP50": None}
    images = {im["id"] for im in gt["images"]}
    dets = _clean_dets(dets, {c["id"] for c in gt["categories"]}, images, iou_type)
    if not any(d["category_id"] in set(cats) for d in dets):
        return {"AP": 0.0, "AP50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        # two-level copies (the evaluators add fields to annotations and their segmentations; a deep
        # copy of thousands of annotations cost more than the evaluation itself). COCOeval marks
        # "unmatched" with id 0, so a GT annotation with id 0 would never count as matched:
        # renumber from 1 (ids carry no meaning for the metrics)
        doc = {"images": [dict(im) for im in gt["images"]], "categories": [dict(c) for c in gt["categories"]],
               "annotations": [_copy_ann(a, i + 1) for i, a in enumerate(gt["annotations"])]}
        coco_gt.dataset = doc
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)  # _clean_dets made fresh dicts
        # one IoU worker: faster-coco-eval's thread pool (a future per image x category) cost more than
        # it saved here (segm on 3000 images: 1.43 s with 8 workers, 0.99 s with 1)
        ev = COCOeval(coco_gt, coco_dt, iou_type, **({"rle_iou_max_workers": 1} if backend == "faster" else {}))
        ev.params.imgIds = sorted(images)
        ev.params.catIds = cats
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap, ap50 = float(ev.stats[0]), float(ev.stats[1])
    return {"AP": max(ap, 0.0), "AP50": max(ap50, 0.0)}  # -1 (nothing to score) counts as 0


def split_ids(gt: Mapping) -> dict[str, list[int]]:
    cats = gt["categories"]
    return {"all": sorted(c["id"] for c in cats),
            "base": sorted(c["id"] for c in cats if c.get("split") == "base"),
            "novel": sorted(c["id"] for c in cats if c.get("split") == "novel")}


def evaluation_table(gt: Mapping, predictions: Sequence[dict], constrained: Mapping[str, Sequence[dict]] | None = None,
                     backend: str = "faster") -> list[dict]:
    """Rows ``{"setting", "split", "box_AP", "box_AP50", "mask_AP", "mask_AP50"}`` in percent (None: no GT)."""
    ids = split_ids(gt)
    runs = [("generalized", split, predictions) for split in ("all", "base", "novel")]
    runs += [("constrained", split, preds) for split, preds in (constrained or {}).items()]
    rows = []
    for setting, split, preds in runs:
        if split not in ids:
            raise ValueError(f"unknown split {split!r}; GT has {sorted(ids)}")
        row = {"setting": setting, "split": split}
        has_boxes = all("bbox" in p for p in preds)
        for kind, iou_type in (("box", "bbox"), ("mask", "segm")):
            if kind == "box" and not has_boxes:
                row["box_AP"] = row["box_AP50"] = None
                continue
            r = coco_ap(gt, preds, iou_type, ids[split], backend)
            row[f"{kind}_AP"] = None if r["AP"] is None else round(100 * r["AP"], 2)
            row[f"{kind}_AP50"] = None if r["AP50"] is None else round(100 * r["AP50"], 2)
        rows.append(row)
    return rows


def format_eval_table(rows: Sequence[dict]) -> str:
    def f(v):
        return "–" if v is None else f"{v:.1f}"

    lines = ["| setting | split | box AP | box AP50 | mask AP | mask AP50 |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['setting']} | {r['split']} | {f(r['box_AP'])} | {f(r['box_AP50'])} | {f(r['mask_AP'])} | {f(r['mask_AP50'])} |"
              for r in rows]
    return "\n".join(lines)
