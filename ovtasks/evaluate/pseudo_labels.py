"""Pseudo-label quality on the synthetic benchmark: mask AP50 (base / novel) of the three stages the
patent compares (Table 3): (a) the GradCAM activation map thresholded as a mask, (b) the pseudo box
filled as a mask, (c) the WSS pseudo-mask; and the error budget (one stage replaced by its ground-truth
version at a time). The picture of the same results is :func:`ovtasks.report.pictures.overlay_grid`.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ovtasks.pseudolabel.candidates import Vocabulary, build_extractor
from ovtasks.core.config import Settings
from ovtasks.data.clean import iter_clean
from ovtasks.evaluate.ap import box_mask, mask_ap50
from ovtasks.data.groundtruth import GroundTruth, decode_rle
from ovtasks.pseudolabel.maskfree.generator import MaskFreeModels, label_images, sam_masks, wss_masks


def evaluate_pseudo_labels(clean_uri: str, gt_uri: str, settings: Settings, models: MaskFreeModels,
                           limit: int | None = None) -> tuple[dict, list, list]:
    """Returns ``(table, samples, results)``; ``table`` maps stage → {"all", "base", "novel"} AP50 (%)."""
    gt = GroundTruth.load(gt_uri, settings)
    samples = list(iter_clean(clean_uri, settings, limit))
    extractor = build_extractor(settings, Vocabulary.load(settings.candidates.vocabulary))
    t0 = time.perf_counter()
    results = label_images(samples, extractor.extract([s.caption for s in samples]), models, settings, keep_maps=True)
    seconds = time.perf_counter() - t0
    dets = {"gradcam": [], "pseudo_box": [], "wss": []}
    for r in results:
        s = samples[r.image_index]
        base = {"image_id": s.image_id, "category_id": r.candidate.category_id, "score": r.score}
        if r.activation is not None and r.activation.binary.any() and not r.instance:  # one map per name
            dets["gradcam"].append({**base, "mask": r.activation.binary})
        if r.box is not None:
            dets["pseudo_box"].append({**base, "mask": box_mask(r.box, s.image.shape[:2])})
        if r.mask is not None:
            dets["wss"].append({**base, "mask": r.mask})
    ids = [s.image_id for s in samples]
    table = {k: mask_ap50(gt, ids, v) for k, v in dets.items()}
    # the thread count is part of the result: BLAS sums differ with it, and WSS points are ranked on the map
    table["_meta"] = {"images": len(samples), "candidates": len(results), "masks": len(dets["wss"]),
                      "mask_stage": settings.maskfree.mask_stage,
                      "torch_threads": torch.get_num_threads(),
                      "seconds": round(seconds, 1), "images_per_second": round(len(samples) / max(seconds, 1e-9), 2)}
    return table, samples, results


BUDGET_ROWS = (
    ("chain", "real chain (c): ITM map -> proposals -> eq. 6 -> WSS"),
    ("selection_bound", "eq. 6 with the GT mask as Phi (selection bound), then WSS"),
    ("proposal_bound", "best proposal (max IoU with the GT instance) through WSS (proposal bound)"),
    ("mask_bound", "WSS on the GT box, points from the GT mask (mask-stage bound)"),
)


def _box_iou(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """IoU of ``(K, 4)`` xyxy ``boxes`` with one xyxy ``box`` (torchvision's ``box_iou``)."""
    import torch
    from torchvision.ops import box_iou

    if len(boxes) == 0:
        return np.zeros(0)
    return box_iou(torch.as_tensor(np.asarray(boxes, np.float32)), torch.as_tensor(np.asarray(box, np.float32))[None])[:, 0].numpy()


def _xyxy(ann: dict) -> np.ndarray:
    """A COCO annotation's xywh ``bbox`` as xyxy."""
    x, y, w, h = ann["bbox"]
    return np.array([x, y, x + w, y + h], np.float32)


def error_budget(samples, results, gt: GroundTruth, settings: Settings, models: MaskFreeModels | None = None) -> dict:
    """Pseudo-mask AP50 with one stage at a time replaced by its ground-truth version (see ``BUDGET_ROWS``),
    proposal recall@0.5 of the top-K and the ITM's grounding, from :func:`evaluate_pseudo_labels`' results
    (``keep_maps=True``). A pair whose name has no GT instance in its image keeps the chain's mask in every
    row (no stage can be "fixed" for it); otherwise each GT instance of the named category gets one mask
    per bound row. The bound rows' masks come from the chain's mask stage (``maskfree.mask_stage``: WSS, or SAM on
    the row's box from ``models``). Returns ``{row: {"all", "base", "novel"}, "_grounding": {...}, "_proposals": {...}}``."""
    from ovtasks.evaluate.ap import mask_ap50
    from ovtasks.pseudolabel.maskfree.pseudo_box import pseudo_box
    from ovtasks.core.imaging import grow_box
    from ovtasks.pseudolabel.maskfree.wss import WssJob, point_map

    cfg = settings.maskfree
    dets: dict[str, list] = {k: [] for k, _ in BUDGET_ROWS}
    jobs: dict[str, list] = {k: [] for k, _ in BUDGET_ROWS if k != "chain"}
    right, ious, grounded_pairs = 0, [], 0
    recall_hits, recall_total, seen_images = 0, 0, set()
    for n, r in enumerate(results):
        s = samples[r.image_index]
        base = {"image_id": s.image_id, "category_id": r.candidate.category_id, "score": r.score}
        inst = [a for a in gt.annotations(s.image_id) if a["category_id"] == r.candidate.category_id]
        props = r.proposals if r.proposals is not None else np.zeros((0, 4), np.float32)
        if s.image_id not in seen_images:  # recall@0.5 of the top-K over every GT instance of the image
            seen_images.add(s.image_id)
            for a in gt.annotations(s.image_id):
                recall_total += 1
                recall_hits += bool(len(props) and _box_iou(props, _xyxy(a)).max() >= 0.5)
        if not inst:
            if r.mask is not None:
                for k in dets:
                    dets[k].append({**base, "mask": r.mask})
            continue
        if r.mask is not None:
            dets["chain"].append({**base, "mask": r.mask})
        if r.instance:  # a name's further box (maskfree.instances=caption): the bounds already have every instance
            continue
        masks = [decode_rle(a["segmentation"]) for a in inst]
        union = np.logical_or.reduce(masks)
        amap = r.activation
        if amap is not None:
            grounded_pairs += 1
            peak = np.unravel_index(int(np.argmax(amap.soft)), amap.soft.shape)
            right += bool(union[peak])  # the map's peak lies on an instance of the named category
            phi = amap.binary
            ious.append(float((phi & union).sum() / max((phi | union).sum(), 1)))
        soft = amap.soft if amap is not None else np.zeros(s.image.shape[:2], np.float32)
        seed = cfg.seed * 1_000_003 + s.image_id * 31 + n
        box, _ = pseudo_box(union.astype(np.float32), props, cfg.box_area_exponent, cfg.box_ring)
        if box is not None:
            jobs["selection_bound"].append(({**base}, WssJob(s.image, grow_box(box, cfg.wss_box_margin, union.shape),
                                                              point_map(cfg.wss_point_map, soft, box), seed), box))
        for a, m in zip(inst, masks):
            g = _xyxy(a)
            if len(props):
                best = props[int(np.argmax(_box_iou(props, g)))]
                jobs["proposal_bound"].append(({**base}, WssJob(s.image, grow_box(best, cfg.wss_box_margin, m.shape),
                                                                 point_map(cfg.wss_point_map, soft, best), seed), best))
            jobs["mask_bound"].append(({**base}, WssJob(s.image, tuple(map(float, g)), m.astype(np.float32), seed), g))
    for k, items in jobs.items():
        if cfg.mask_stage == "sam":
            if models is None or models.sam is None:
                raise ValueError("maskfree.mask_stage=sam: error_budget needs the generator's models (its SAM)")
            masks = sam_masks(models.sam, [j.image for _, j, _ in items], [b for _, _, b in items])
        else:
            masks = wss_masks([j for _, j, _ in items], settings)
        dets[k] += [{**d, "mask": m} for (d, _, _), m in zip(items, masks) if m.any()]
    ids = [s.image_id for s in samples]
    table = {k: mask_ap50(gt, ids, v) for k, v in dets.items()}
    table["_grounding"] = {"pairs_with_gt": grounded_pairs, "right_object_rate": round(right / max(grounded_pairs, 1), 4),
                           "phi_iou_mean": round(float(np.mean(ious)) if ious else 0.0, 4), "rounds": cfg.masking_rounds}
    table["_proposals"] = {"recall_at_0.5": round(recall_hits / max(recall_total, 1), 4), "gt_instances": recall_total,
                           "top_k": cfg.top_k}
    table["_mask_stage"] = cfg.mask_stage
    return table


def format_budget(table: dict) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
    lines = ["| pseudo-masks with ... | mask AP50 base | mask AP50 novel | mask AP50 all |", "|---|---:|---:|---:|"]
    sam = table.get("_mask_stage") == "sam"
    for key, label in BUDGET_ROWS:
        t = table[key]
        if sam:  # maskfree.mask_stage=sam: SAM on each row's box makes the masks
            label = label.replace("WSS on the GT box, points from the GT mask", "SAM on the GT box").replace("WSS", "SAM")
        lines.append(f"| {label} | {fmt(t['base'])} | {fmt(t['novel'])} | {fmt(t['all'])} |")
    g, p = table["_grounding"], table["_proposals"]
    lines += ["", f"ITM grounding ({g['pairs_with_gt']} named pairs, G={g['rounds']}): map peak on the named object "
              f"{100 * g['right_object_rate']:.1f}%, IoU(Phi, GT instances) {g['phi_iou_mean']:.3f}; "
              f"proposal recall@0.5 of the top-{p['top_k']}: {100 * p['recall_at_0.5']:.1f}% of {p['gt_instances']} GT instances"]
    return "\n".join(lines)


def format_table(table: dict) -> str:
    stage = "SAM" if table.get("_meta", {}).get("mask_stage") == "sam" else "WSS"  # maskfree.mask_stage
    rows = [("(a) GradCAM map as mask", "gradcam"), ("(b) pseudo box as mask", "pseudo_box"), (f"(c) {stage} pseudo-mask", "wss")]
    fmt = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
    lines = ["| stage | mask AP50 base | mask AP50 novel | mask AP50 all |", "|---|---:|---:|---:|"]
    for label, key in rows:
        t = table[key]
        lines.append(f"| {label} | {fmt(t['base'])} | {fmt(t['novel'])} | {fmt(t['all'])} |")
    return "\n".join(lines)
