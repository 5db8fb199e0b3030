"""The promotion gate's statistics: a paired bootstrap of mask AP50 over the evaluation images.

Two models evaluated on the same images are compared image by image: each bootstrap sample draws the
evaluation images with replacement (the same draw for both models), recomputes both models' AP50 on
that sample and keeps the difference. The ``confidence`` interval of the difference (percentile
bootstrap, seeded) says whether the challenger is better, not worse beyond a margin, or worse.

AP50 here is COCO's (``COCOeval`` at IoU 0.5, area "all", 100 detections per image and category,
101-point interpolated precision, averaged over the categories that have GT): each detection is
matched to GT once, on the full set, exactly as COCOeval matches it, and a bootstrap sample only
re-weights images (an image drawn k times counts k times), so no COCO evaluation runs per sample.
:func:`ap50` on unit weights equals :func:`ovtasks.evaluate.coco.coco_ap`'s AP50 (a test checks).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np

RECALL_POINTS = np.linspace(0.0, 1.0, 101)


@dataclass(frozen=True)
class MatchTable:
    """What AP50 needs from one model's predictions, per category, in descending score order: whether
    each kept detection matched a GT instance (IoU >= 0.5) and the index of its image; and the GT count
    per image."""

    image_ids: tuple[int, ...]
    matched: Mapping[int, np.ndarray]  # category id -> (D,) bool
    image_index: Mapping[int, np.ndarray]  # category id -> (D,) int into image_ids
    gt_counts: Mapping[int, np.ndarray]  # category id -> (I,) int


def _iou(dets: Sequence[dict], gts: Sequence[dict], iou_type: str) -> np.ndarray:
    from pycocotools import mask as mask_utils

    from ovtasks.data.groundtruth import to_pycoco

    if iou_type == "segm":
        d, g = [to_pycoco(x["segmentation"]) for x in dets], [to_pycoco(x["segmentation"]) for x in gts]
    else:
        d, g = [list(x["bbox"]) for x in dets], [list(x["bbox"]) for x in gts]
    return np.asarray(mask_utils.iou(d, g, [int(x.get("iscrowd", 0)) for x in gts]), np.float64).reshape(len(dets), len(gts))


def match_table(gt: Mapping, predictions: Sequence[dict], cat_ids: Sequence[int], iou_type: str = "segm",
                threshold: float = 0.5, max_dets: int = 100) -> MatchTable:
    """Match ``predictions`` to ``gt`` (a COCO dict) per image and category as COCOeval does: detections in
    descending score order, each takes the still-unmatched GT instance of highest IoU >= ``threshold``."""
    image_ids = tuple(sorted(im["id"] for im in gt["images"]))
    where = {i: k for k, i in enumerate(image_ids)}
    cats = sorted(set(cat_ids))
    gts: dict[tuple[int, int], list[dict]] = {}
    for a in gt["annotations"]:
        if a["category_id"] in cats and a["image_id"] in where:
            gts.setdefault((a["image_id"], a["category_id"]), []).append(a)
    dts: dict[tuple[int, int], list[dict]] = {}
    for p in predictions:
        if p["category_id"] in cats and p["image_id"] in where:
            dts.setdefault((p["image_id"], p["category_id"]), []).append(p)
    matched, index, counts = {}, {}, {}
    for c in cats:
        counts[c] = np.array([len(gts.get((i, c), ())) for i in image_ids], np.int64)
        s_all, m_all, i_all = [], [], []
        for i in image_ids:  # COCOeval concatenates images in id order, then sorts stably by score
            d = sorted(dts.get((i, c), ()), key=lambda x: -float(x["score"]))[:max_dets]
            if not d:
                continue
            g = gts.get((i, c), [])
            hit = np.zeros(len(d), bool)
            if g:
                ious = _iou(d, g, iou_type)
                taken = np.zeros(len(g), bool)
                for k in range(len(d)):
                    best, m = min(threshold, 1 - 1e-10), -1
                    for j in range(len(g)):
                        if taken[j] or ious[k, j] < best:
                            continue
                        best, m = ious[k, j], j
                    if m >= 0:
                        taken[m], hit[k] = True, True
            s_all.append(np.array([float(x["score"]) for x in d]))
            m_all.append(hit)
            i_all.append(np.full(len(d), where[i]))
        s = np.concatenate(s_all) if s_all else np.zeros(0)
        order = np.argsort(-s, kind="mergesort")
        matched[c] = (np.concatenate(m_all) if m_all else np.zeros(0, bool))[order]
        index[c] = (np.concatenate(i_all) if i_all else np.zeros(0, np.int64))[order]
    return MatchTable(image_ids, matched, index, counts)


def ap50(table: MatchTable, weights: np.ndarray | None = None) -> float | None:
    """AP50 in percent with image ``weights`` (default 1 each); None when no category has GT."""
    w = np.ones(len(table.image_ids)) if weights is None else np.asarray(weights, np.float64)
    aps = []
    for c, counts in table.gt_counts.items():
        n_gt = float(counts @ w)
        if n_gt <= 0:
            continue
        dw = w[table.image_index[c]]
        tp = np.cumsum(dw * table.matched[c])
        fp = np.cumsum(dw * ~table.matched[c])
        if not len(tp):
            aps.append(0.0)
            continue
        recall = tp / n_gt
        precision = tp / (tp + fp + np.spacing(1))
        precision = np.maximum.accumulate(precision[::-1])[::-1]  # COCO's interpolation: max to the right
        at = np.searchsorted(recall, RECALL_POINTS, side="left")
        p = np.where(at < len(precision), precision[np.minimum(at, len(precision) - 1)], 0.0)
        aps.append(float(p.mean()))
    return None if not aps else 100.0 * float(np.mean(aps))


@dataclass(frozen=True)
class Comparison:
    """Challenger minus champion, mask AP50 in percent points, over ``images`` paired evaluation images."""

    challenger: float
    champion: float
    difference: float
    low: float
    high: float
    confidence: float
    samples: int
    seed: int
    images: int

    def to_json(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def paired_bootstrap(gt: Mapping, challenger: Sequence[dict], champion: Sequence[dict], cat_ids: Sequence[int],
                     samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> Comparison:
    """Percentile-bootstrap interval of AP50(challenger) - AP50(champion) on ``cat_ids``, images resampled."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    a, b = match_table(gt, challenger, cat_ids), match_table(gt, champion, cat_ids)
    pa, pb = ap50(a), ap50(b)
    if pa is None or pb is None:
        raise ValueError(f"no GT instance of categories {sorted(set(cat_ids))} in the evaluation set")
    n = len(a.image_ids)
    rng = np.random.default_rng(seed)
    diffs = np.empty(samples)
    for k in range(samples):
        w = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        da, db = ap50(a, w), ap50(b, w)
        diffs[k] = (da or 0.0) - (db or 0.0)  # a sample without any GT of these categories counts as a tie
    lo, hi = np.quantile(diffs, [(1 - confidence) / 2, 1 - (1 - confidence) / 2])
    return Comparison(pa, pb, pa - pb, float(lo), float(hi), confidence, samples, seed, n)


@dataclass(frozen=True)
class Decision:
    promote: bool
    verdict: str  # "better" | "not_worse" | "worse" | "inconclusive" | "below_floor" | "first"
    reason: str


def decide(challenger_ap50: float, comparison: Comparison | None, margin: float, floor: float) -> Decision:
    """The gate: never below ``floor``; with a champion, promote when the interval's lower end of
    challenger - champion is above ``-margin`` (better, or not worse beyond the margin)."""
    if challenger_ap50 < floor:
        return Decision(False, "below_floor", f"novel mask AP50 {challenger_ap50:.2f} is below the floor {floor:.2f}")
    if comparison is None:
        return Decision(True, "first", f"novel mask AP50 {challenger_ap50:.2f} >= floor {floor:.2f} (no champion yet)")
    c = comparison
    ci = (f"difference {c.difference:+.2f} points, {100 * c.confidence:.0f}% CI [{c.low:+.2f}, {c.high:+.2f}] "
          f"over {c.images} images ({c.samples} paired bootstrap samples)")
    if c.low > 0:
        return Decision(True, "better", f"better than the champion: {ci}")
    if c.low >= -margin:
        return Decision(True, "not_worse", f"not worse than the champion beyond margin {margin:.2f}: {ci}")
    if c.high < -margin:
        return Decision(False, "worse", f"worse than the champion beyond margin {margin:.2f}: {ci}")
    return Decision(False, "inconclusive", f"cannot rule out a loss beyond margin {margin:.2f}: {ci}")


def evaluation_set_digest(gt: Mapping) -> str:
    """Names an evaluation set: its images and GT annotations (order-free)."""
    items = sorted((a["image_id"], a["category_id"], json.dumps(a.get("segmentation"), sort_keys=True)) for a in gt["annotations"])
    blob = json.dumps({"images": sorted(im["id"] for im in gt["images"]), "annotations": items})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
