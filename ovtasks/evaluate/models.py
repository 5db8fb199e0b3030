"""Trained models scored on COCO GT: OV Mask R-CNN (generalized and constrained) and Semantic-SAM (GT boxes as prompts)."""

from __future__ import annotations

from ovtasks.core.config import Settings
from ovtasks.core.storage import open_store
from ovtasks.data.clean import complete_shards, iter_shard
from ovtasks.data.groundtruth import boxes_xyxy
from ovtasks.data.holdout import eval_image_ids
from ovtasks.models import ov_maskrcnn, semantic_sam


def evaluation_inputs(gt_uri: str, clean_uri: str, settings: Settings, limit: int | None = None):
    """What both models are evaluated on: (gt, image ids, {id: image}, COCO subset, categories, their text
    embeddings, base/novel split ids)."""
    from ovtasks.evaluate.coco import split_ids
    from ovtasks.data.groundtruth import GroundTruth
    from ovtasks.models.text_encoder import TextEncoder

    gt = GroundTruth.load(gt_uri, settings)
    ids = eval_image_ids(gt_uri, clean_uri, settings, limit)
    wanted, images = set(ids), {}
    src = open_store(clean_uri, settings.s3)
    for shard in complete_shards(src):
        for s in iter_shard(src, shard):
            if s.image_id in wanted:
                images[s.image_id] = s.image
        if len(images) == len(wanted):
            break
    doc = gt.subset(ids)
    cats = doc["categories"]
    emb = TextEncoder(settings.candidates.text_encoder, settings.device, s3=settings.s3).encode([c["name"] for c in cats])
    return gt, ids, images, doc, cats, emb, split_ids(doc)


def evaluate_model(model, gt_uri: str, clean_uri: str, settings: Settings, limit: int | None = None) -> dict:
    """Evaluation table on COCO GT for the clean images that have GT: generalized (all categories) and
    constrained (novel-only and base-only vocabularies). ``gt`` (the evaluation set) and ``predictions``
    (generalized) are returned too: the promotion gate pairs two models' predictions image by image."""
    from ovtasks.evaluate.coco import evaluation_table, format_eval_table

    gt, ids, by_id, doc, cats, emb, splits = evaluation_inputs(gt_uri, clean_uri, settings, limit)
    images = [by_id[i] for i in ids]
    general = ov_maskrcnn.predict(model, images, ids, [c["id"] for c in cats], emb, settings.device)
    constrained = {}
    for split in ("novel", "base"):
        keep = [i for i, c in enumerate(cats) if c["id"] in set(splits[split])]
        if keep:
            constrained[split] = ov_maskrcnn.predict(model, images, ids, [cats[i]["id"] for i in keep], emb[keep], settings.device)
    rows = evaluation_table(doc, general, constrained)
    return {"rows": rows, "table": format_eval_table(rows), "images": len(ids),
            "novel_mask_AP50": next(r["mask_AP50"] for r in rows if r["setting"] == "generalized" and r["split"] == "novel"),
            "gt": doc, "predictions": general}


def prompt_mask_quality(gt, ids, predictions: list[dict]) -> dict:
    """Class-agnostic quality of box-prompted masks: IoU of each GT-box prompt's mask with that GT mask
    (a prompt whose mask came out empty counts 0). Separates the masks from the names, which mask AP
    scores together."""
    import numpy as np

    from ovtasks.data.groundtruth import decode_rle

    by_prompt = {(p["image_id"], p["prompt"]): p for p in predictions}
    ious = []
    for i in ids:
        for k, a in enumerate(gt.annotations(i)):
            p = by_prompt.get((i, k))
            if p is None:
                ious.append(0.0)
                continue
            m, g = decode_rle(p["segmentation"]).astype(bool), decode_rle(a["segmentation"]).astype(bool)
            ious.append(float((m & g).sum() / max(1, (m | g).sum())))
    v = np.asarray(ious) if ious else np.zeros(1)
    return {"prompts": len(ious), "mean_iou": round(float(v.mean()), 4), "iou50": round(100 * float((v >= 0.5).mean()), 2)}


def evaluate_semantic_sam(model, gt_uri: str, clean_uri: str, settings: Settings, limit: int | None = None) -> dict:
    """Box-prompted evaluation on the held-out GT images (GT boxes as prompts), generalized and constrained."""
    from ovtasks.evaluate.coco import evaluation_table, format_eval_table

    gt, ids, images, doc, cats, emb, splits = evaluation_inputs(gt_uri, clean_uri, settings, limit)

    def run(keep: list[int], names: dict | None = None) -> list[dict]:
        kept = {cats[i]["id"] for i in keep}
        boxes = [boxes_xyxy([a for a in gt.annotations(i) if a["category_id"] in kept]) for i in ids]
        return semantic_sam.predict(model, [images[i] for i in ids], ids, boxes, [cats[i]["id"] for i in keep], emb[keep], settings.device,
                                    names=names, category_names=[cats[i]["name"] for i in keep])

    named: dict = {}
    general = run(list(range(len(cats))), named)
    constrained = {split: run([i for i, c in enumerate(cats) if c["id"] in set(splits[split])]) for split in ("novel", "base")
                   if splits[split]}
    rows = evaluation_table(doc, general, constrained)
    # names: the share of GT-box prompts whose predicted name (over the whole vocabulary) is the GT category
    truth = [((i, k), a["category_id"], gt.categories[a["category_id"]].get("split")) for i in ids for k, a in enumerate(gt.annotations(i))]
    acc = {split: (sum(named.get(key) == c for key, c, sp in truth if split in ("all", sp))
                   / max(1, sum(1 for *_, sp in truth if split in ("all", sp)))) for split in ("all", "base", "novel")}
    masks = prompt_mask_quality(gt, ids, general)
    return {"rows": rows, "table": format_eval_table(rows) + "\n\nnames right for GT-box prompts: "
            + ", ".join(f"{k} {100 * v:.1f}%" for k, v in acc.items())
            + f"\nmasks of GT-box prompts (names aside): mean IoU {masks['mean_iou']:.3f}, IoU >= 0.5 for {masks['iou50']:.1f}%",
            "name_accuracy": {k: round(100 * v, 2) for k, v in acc.items()}, "mask_quality": masks,
            "images": len(ids), "prompts": "gt-boxes",
            "novel_mask_AP50": next(r["mask_AP50"] for r in rows if r["setting"] == "generalized" and r["split"] == "novel"),
            "gt": doc, "predictions": general}
