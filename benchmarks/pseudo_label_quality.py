"""Pseudo-label quality on the synthetic benchmark (patent Table 3, first rows), measured in one run.

Mask AP50 for base and novel categories of (a) the GradCAM activation map thresholded as a mask,
(b) the pseudo box (eq. 6) filled as a mask, (c) the WSS pseudo-mask (eq. 7), against the synthetic
ground truth. Evaluation images (seed 0) are disjoint from the ITM training images (seed 1).

    python benchmarks/pseudo_label_quality.py --itm-model models/itm-synth
    python benchmarks/pseudo_label_quality.py --itm-model DIR --wspn-model DIR --shards 4

Without --wspn-model a WSPN is trained on the evaluation shards' captions first (no GT is used).
Writes benchmarks/results/pseudo_label_quality.{json,md} and pseudo_label_overlays.png.
Target: (c) novel AP50 >= 5x (a) novel AP50 (the patent: 5.2 -> 27.0 on COCO novel).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovtasks.config import load_settings  # noqa: E402
from ovtasks.ingest import ingest  # noqa: E402
from ovtasks.pseudo_label import load_maskfree  # noqa: E402
from ovtasks.quality import evaluate_pseudo_labels, format_table, overlay_grid  # noqa: E402
from ovtasks.synth import SynthSpec, generate  # noqa: E402
from ovtasks.train_wspn import WspnTrainConfig, train_wspn  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--itm-model", required=True)
    ap.add_argument("--wspn-model", default=None)
    ap.add_argument("--proposals", default="wspn", choices=("wspn", "selective_search"))
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--images-per-shard", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wspn-steps", type=int, default=300)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    base = load_settings(env={})
    with tempfile.TemporaryDirectory(prefix="ovtasks-quality-") as d:
        laion, clean = f"{d}/laion", f"{d}/clean"
        generate(SynthSpec(seed=args.seed, shards=args.shards, images_per_shard=args.images_per_shard), laion, base)
        ingest(laion, clean, base, workers=base.workers)
        wspn = args.wspn_model
        wspn_metrics = None
        if args.proposals == "wspn" and not wspn:
            trained = train_wspn(clean, f"{d}/wspn", base, WspnTrainConfig(steps=args.wspn_steps))
            wspn, wspn_metrics = trained.model_uri, trained.metrics
        settings = base.model_copy(update={"device": args.device, "maskfree": base.maskfree.model_copy(
            update={"itm_model": args.itm_model, "wspn_model": wspn, "proposals": args.proposals})})
        models = load_maskfree(settings)
        table, samples, results = evaluate_pseudo_labels(clean, laion, settings, models)
        picture = overlay_grid(samples, results, RESULTS / "pseudo_label_overlays.png")
    a, c = table["gradcam"]["novel"], table["wss"]["novel"]
    ratio = (c / a) if a else None
    meta = json.loads((Path(args.itm_model) / "ovtasks_itm.json").read_text()) if (Path(args.itm_model) / "ovtasks_itm.json").exists() else {}
    out = {"table": table, "novel_ratio_c_over_a": None if ratio is None else round(ratio, 2),
           "itm_model": args.itm_model, "itm_metrics": meta.get("metrics"), "wspn_metrics": wspn_metrics,
           "proposals": args.proposals, "images": table["_meta"]["images"], "settings": settings.maskfree.model_dump(mode="json")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pseudo_label_quality.json").write_text(json.dumps(out, indent=2, default=str))
    md = format_table(table) + f"\n\n(c)/(a) novel ratio: {out['novel_ratio_c_over_a']} (target >= 5)\n"
    (RESULTS / "pseudo_label_quality.md").write_text(md)
    print(md)
    print(f"picture: {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
