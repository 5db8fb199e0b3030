"""Pseudo-label quality on the synthetic benchmark: mask AP50 (base / novel) of the three stages the
patent compares (Table 3): (a) the GradCAM activation map thresholded as a mask, (b) the pseudo box
filled as a mask, (c) the WSS pseudo-mask. Plus a picture: image, activation map, box, mask.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ovtasks.candidates import Vocabulary, build_extractor
from ovtasks.config import Settings
from ovtasks.dataset import iter_clean
from ovtasks.evaluation import box_mask, mask_ap50
from ovtasks.groundtruth import GroundTruth
from ovtasks.pseudo_label import MaskFreeModels, label_images


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
        if r.activation is not None and r.activation.binary.any():
            dets["gradcam"].append({**base, "mask": r.activation.binary})
        if r.box is not None:
            dets["pseudo_box"].append({**base, "mask": box_mask(r.box, s.image.shape[:2])})
        if r.mask is not None:
            dets["wss"].append({**base, "mask": r.mask})
    ids = [s.image_id for s in samples]
    table = {k: mask_ap50(gt, ids, v) for k, v in dets.items()}
    table["_meta"] = {"images": len(samples), "candidates": len(results), "masks": len(dets["wss"]),
                      "seconds": round(seconds, 1), "images_per_second": round(len(samples) / max(seconds, 1e-9), 2)}
    return table, samples, results


def format_table(table: dict) -> str:
    rows = [("(a) GradCAM map as mask", "gradcam"), ("(b) pseudo box as mask", "pseudo_box"), ("(c) WSS pseudo-mask", "wss")]
    fmt = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
    lines = ["| stage | mask AP50 base | mask AP50 novel | mask AP50 all |", "|---|---:|---:|---:|"]
    for label, key in rows:
        t = table[key]
        lines.append(f"| {label} | {fmt(t['base'])} | {fmt(t['novel'])} | {fmt(t['all'])} |")
    return "\n".join(lines)


def _heat(a: np.ndarray) -> np.ndarray:
    a = np.clip(a, 0, 1)
    return np.stack([a * 255, np.clip(a * 2 - 1, 0, 1) * 255, (1 - a) * 80], -1).astype(np.uint8)


def overlay_grid(samples, results, path: Path, n: int = 8) -> Path:
    """Rows of (image + caption name, activation map, pseudo box, WSS mask) for the first ``n`` masks."""
    from ovtasks.demo import _font

    rows = [r for r in results if r.mask is not None][:n]
    cell, pad = 160, 4
    sheet = Image.new("RGB", (4 * (cell + pad) + pad, len(rows) * (cell + 18 + pad) + 30), "white")
    d = ImageDraw.Draw(sheet)
    d.text((pad, 6), "Mask-free OVIS pseudo-labels: image | activation map (G rounds) | pseudo box (eq. 6) | WSS mask (eq. 7)",
           fill="black", font=_font(13))
    for k, r in enumerate(rows):
        s = samples[r.image_index]
        img = s.image
        y0 = 30 + k * (cell + 18 + pad)
        heat = (img * 0.4 + _heat(r.activation.soft) * 0.6).astype(np.uint8)
        boxed = Image.fromarray(img.copy())
        bd = ImageDraw.Draw(boxed)
        for b in (r.proposals if r.proposals is not None else [])[:50]:
            bd.rectangle(list(map(float, b)), outline=(160, 160, 160))
        bd.rectangle(list(map(float, r.box)), outline=(255, 40, 40), width=2)
        masked = img.astype(np.float32)
        masked[r.mask] = masked[r.mask] * 0.4 + np.array([40, 220, 60]) * 0.6
        tiles = [Image.fromarray(img), Image.fromarray(heat), boxed, Image.fromarray(masked.astype(np.uint8))]
        for j, t in enumerate(tiles):
            t = t.copy()
            t.thumbnail((cell, cell))
            sheet.paste(t, (pad + j * (cell + pad), y0))
        d.text((pad, y0 + cell + 2), f"'{r.candidate.name}' ({'novel' if _is_novel(r) else 'base'}) itm={r.score:.2f}  {s.caption[:60]}",
               fill=(30, 30, 30), font=_font(11))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _is_novel(r) -> bool:
    from ovtasks.synth import CATEGORY_BY_NAME

    c = CATEGORY_BY_NAME.get(r.candidate.name)
    return bool(c and c.split == "novel")
