"""Model quality on the synthetic benchmark (the patent's finding: a detector trained on the pseudo-masks
beats the pseudo-masks themselves), measured side by side in one run.

Novel mask AP50 (generalized: all categories in the vocabulary) on held-out images of:
  (1) the pseudo-labels themselves (maskfree generator, committed ITM, WSPN trained here on captions),
  (2) the OV Mask R-CNN trained on those pseudo-labels (held-out images excluded from training),
  (3) an oracle: the same model and budget trained on the GT masks of the same training images.

    python benchmarks/model_quality.py --itm-model models/itm-synth
    python benchmarks/model_quality.py --itm-model models/itm-synth --shards 8 --steps 600 --device cuda

Targets: (2) >= (1), and (2) >= 70% of (3), printed as ``oracle_fraction=<x>``.
Writes benchmarks/results/model_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovtasks.config import load_settings  # noqa: E402
from ovtasks.evaluate import evaluation_table, format_eval_table  # noqa: E402
from ovtasks.groundtruth import GroundTruth  # noqa: E402
from ovtasks.ingest import ingest  # noqa: E402
from ovtasks.pseudo_label import load_maskfree, pseudo_label  # noqa: E402
from ovtasks.storage import open_store  # noqa: E402
from ovtasks.synth import SynthSpec, generate  # noqa: E402
from ovtasks.train import (TrainConfig, eval_image_ids, evaluate_model, fit_ov_maskrcnn, gt_training_data, load_model,  # noqa: E402
                           training_data)
from ovtasks.train_wspn import WspnTrainConfig, train_wspn  # noqa: E402
from ovtasks.validate import validate  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def pseudo_label_predictions(root: str, gt: GroundTruth, ids: list[int], generator: str = "maskfree") -> list[dict]:
    """The pseudo-labels of the held-out images as COCO predictions, their names mapped to GT category ids."""
    store = open_store(root)
    by_name = {c["name"]: c["id"] for c in gt.coco["categories"]}
    wanted, preds = set(ids), []
    for key in store.list(f"pseudo/{generator}/"):
        if not key.endswith(".json") or not key.rsplit("/", 1)[-1][:5].isdigit() or "." in key.rsplit("/", 1)[-1][:-5]:
            continue
        doc = json.loads(store.get_bytes(key))
        names = {c["id"]: c["name"] for c in doc["categories"]}
        for a in doc["annotations"]:
            name = a.get("category_name") or names.get(a["category_id"])
            if a["image_id"] in wanted and name in by_name:
                preds.append({"image_id": a["image_id"], "category_id": by_name[name], "score": float(a.get("score", 1.0)),
                              "bbox": a["bbox"], "segmentation": a["segmentation"]})
    return preds


def novel(rows) -> float | None:
    return next(r["mask_AP50"] for r in rows if r["setting"] == "generalized" and r["split"] == "novel")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--itm-model", required=True)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--images-per-shard", type=int, default=64)
    ap.add_argument("--eval-images", type=int, default=64)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--wspn-steps", type=int, default=100)
    ap.add_argument("--backbone", default="small", choices=("small", "resnet50_fpn"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    base = load_settings(env={})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ovtasks-model-quality-") as d:
        laion, clean = f"{d}/laion", f"{d}/clean"
        generate(SynthSpec(seed=args.seed, shards=args.shards, images_per_shard=args.images_per_shard), laion, base, workers=base.workers)
        ingest(laion, clean, base, workers=base.workers)
        train_wspn(clean, f"{d}/wspn", base, WspnTrainConfig(steps=args.wspn_steps))
        settings = base.model_copy(update={"device": args.device, "maskfree": base.maskfree.model_copy(
            update={"itm_model": args.itm_model, "wspn_model": f"{d}/wspn"})})
        pseudo_label(clean, d, settings, models=load_maskfree(settings))
        gate = validate(d, settings, "maskfree").report
        gt = GroundTruth.load(laion, settings)
        held = eval_image_ids(laion, clean, settings, args.eval_images)
        doc = gt.subset(held)

        rows_pl = evaluation_table(doc, pseudo_label_predictions(d, gt, held))
        cfg = TrainConfig(steps=args.steps, batch_size=4, backbone=args.backbone, seed=args.seed)
        results = {}
        for name, data in (("pseudo", training_data(clean, d, settings, "maskfree", held)),
                           ("oracle", gt_training_data(laion, clean, settings, None, held))):
            t = time.perf_counter()
            trained = fit_ov_maskrcnn(*data, f"{d}/model-{name}", settings, cfg)
            model, _ = load_model(trained.model_dir, settings.device)
            ev = evaluate_model(model, laion, clean, settings, limit=args.eval_images)
            results[name] = {"rows": ev["rows"], "table": ev["table"], "train_images": trained.metrics["images"],
                             "train_annotations": trained.metrics["annotations"], "final_loss": trained.metrics["final_loss"],
                             "seconds": round(time.perf_counter() - t, 1)}

    pl, tr, orc = novel(rows_pl), novel(results["pseudo"]["rows"]), novel(results["oracle"]["rows"])
    fraction = round(tr / orc, 3) if orc else None
    out = {"novel_mask_AP50": {"pseudo_labels": pl, "trained_on_pseudo_labels": tr, "oracle_trained_on_gt": orc},
           "oracle_fraction": fraction, "trained_beats_pseudo_labels": tr is not None and pl is not None and tr >= pl,
           "pseudo_label_rows": rows_pl, "trained": results["pseudo"], "oracle": results["oracle"], "gx": {k: gate[k] for k in ("passed", "failed")},
           "config": {**vars(args), "train": cfg.__dict__}, "held_out_images": len(held),
           "machine": f"{platform.machine()} {platform.processor() or ''} {base.workers} workers".strip(),
           "seconds": round(time.perf_counter() - t0, 1)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "model_quality.json").write_text(json.dumps(out, indent=2, default=str))
    fmt = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
    md = ["| novel mask AP50 (generalized), held-out images | % |", "|---|---:|",
          f"| (1) pseudo-labels (maskfree) | {fmt(pl)} |",
          f"| (2) OV Mask R-CNN trained on (1), {args.steps} steps | {fmt(tr)} |",
          f"| (3) oracle: same model and budget on GT masks | {fmt(orc)} |",
          "", f"oracle_fraction={fraction} (target >= 0.7); trained >= pseudo-labels: {out['trained_beats_pseudo_labels']}",
          "", "Pseudo-labels:", format_eval_table(rows_pl), "", "Trained on pseudo-labels:", results["pseudo"]["table"],
          "", "Oracle:", results["oracle"]["table"], ""]
    (RESULTS / "model_quality.md").write_text("\n".join(md))
    print("\n".join(md))
    print(f"oracle_fraction={fraction}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
