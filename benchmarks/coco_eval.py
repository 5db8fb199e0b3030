"""COCO evaluation speed: ovtasks.evaluate.coco (faster-coco-eval) vs pycocotools, same GT and predictions.

GT: ``--images`` synthetic 128 px images with 2-6 instances each (rectangles and discs, 20
categories, half of them "novel"); predictions: the GT masks perturbed (eroded, dilated, shifted),
relabelled 20 % of the time, 15 % missed, plus spurious ones, random scores. Both backends evaluate
``bbox`` and ``segm`` over all categories, side by side in one run, best of ``--repeats``; their AP
numbers are checked equal to 1e-6.

    python benchmarks/coco_eval.py --images 3000

Prints ``speedup=<x>`` (segm + bbox time of pycocotools / ours) and writes
benchmarks/results/coco_eval.json. Aim: >= 5x (faster-coco-eval alone measured 3.0x here).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovtasks.evaluate.coco import coco_ap  # noqa: E402
from ovtasks.data.groundtruth import encode_rle, mask_bbox  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def shape_mask(rng, size: int) -> np.ndarray:
    m = np.zeros((size, size), bool)
    cx, cy, r = rng.integers(15, size - 15), rng.integers(15, size - 15), rng.integers(6, 14)
    if rng.random() < 0.5:
        m[cy - r:cy + r, cx - r:cx + int(r * 1.5)] = True
    else:
        yy, xx = np.ogrid[:size, :size]
        m[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = True
    return m


def make_data(n: int, seed: int, size: int = 128):
    rng = np.random.default_rng(seed)
    cats = [{"id": i + 1, "name": f"c{i}", "split": "novel" if i % 2 else "base"} for i in range(20)]
    images, anns, preds = [], [], []
    for i in range(n):
        images.append({"id": i + 1, "width": size, "height": size})
        for _ in range(rng.integers(2, 7)):
            m = shape_mask(rng, size)
            c = int(rng.integers(1, 21))
            rle = encode_rle(m)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c, "segmentation": rle, "area": float(m.sum()),
                         "bbox": mask_bbox(m), "iscrowd": 0})
            if rng.random() < 0.15:
                continue
            shift = int(rng.integers(-3, 4))
            p = np.roll(m, shift, axis=int(rng.integers(0, 2)))
            preds.append({"image_id": i + 1, "category_id": c if rng.random() > 0.2 else int(rng.integers(1, 21)),
                          "score": float(rng.random()), "segmentation": encode_rle(p), "bbox": mask_bbox(p)})
        if rng.random() < 0.5:
            p = shape_mask(rng, size)
            preds.append({"image_id": i + 1, "category_id": int(rng.integers(1, 21)), "score": float(rng.random()),
                          "segmentation": encode_rle(p), "bbox": mask_bbox(p)})
    return {"images": images, "annotations": anns, "categories": cats}, preds


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "coco_eval.json"))
    args = ap.parse_args()
    gt, preds = make_data(args.images, args.seed)
    rows, total = {}, {"faster": 0.0, "pycocotools": 0.0}
    for iou_type in ("bbox", "segm"):
        res = {}
        for backend in ("pycocotools", "faster"):
            t, r = timed(lambda: coco_ap(gt, preds, iou_type, backend=backend), args.repeats)
            res[backend] = (t, r)
            total[backend] += t
        (tp, rp), (tf, rf) = res["pycocotools"], res["faster"]
        assert abs(rp["AP"] - rf["AP"]) < 1e-6 and abs(rp["AP50"] - rf["AP50"]) < 1e-6, (rp, rf)
        rows[iou_type] = {"pycocotools_s": round(tp, 3), "ours_s": round(tf, 3), "speedup": round(tp / tf, 2),
                          "AP": round(rf["AP"], 6), "AP50": round(rf["AP50"], 6)}
        print(iou_type, json.dumps(rows[iou_type]), flush=True)
    speedup = round(total["pycocotools"] / total["faster"], 2)
    out = {"images": args.images, "annotations": len(gt["annotations"]), "predictions": len(preds), "rows": rows,
           "speedup": speedup, "target": ">= 5x", "machine": platform.platform()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"speedup={speedup}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
