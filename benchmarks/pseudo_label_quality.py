"""Pseudo-label quality on the synthetic benchmark (patent Table 3, first rows) and its error budget,
measured in one run.

Mask AP50 for base and novel categories of (a) the GradCAM activation map thresholded as a mask,
(b) the pseudo box (eq. 6) filled as a mask, (c) the WSS pseudo-mask (eq. 7), against the synthetic
ground truth. Evaluation images (seed 0) are disjoint from the ITM training images (seed 1).

The error budget (:func:`ovtasks.evaluate.pseudo_labels.error_budget`) replaces one stage at a time by its
ground-truth version: WSS on GT boxes with points from the GT mask (mask-stage bound), the best
proposal through WSS (proposal bound, with the top-K's recall@0.5), eq. 6 with the GT mask as Phi
(selection bound); plus the ITM's grounding (map peak on the named object, IoU of Phi with the GT).
The stage whose bound is furthest above the real chain is where the loss is.

    python benchmarks/pseudo_label_quality.py --itm-model models/itm-synth
    python benchmarks/pseudo_label_quality.py --itm-model DIR --wspn-model DIR --shards 4
    python benchmarks/pseudo_label_quality.py --itm-model models/itm-synth --set masking_rounds=5 --set mask_fraction=0.3

Without --wspn-model a WSPN is trained on the evaluation shards' captions first (no GT is used).
``--set KEY=VALUE`` overrides a ``maskfree`` setting (a measured option; the default is the patent's).
Writes benchmarks/results/pseudo_label_quality.{json,md} and pseudo_label_overlays.png.
Targets: (c) novel AP50 >= 25 and base >= 35, with (a) < (b) < (c) (the patent: 5.2 -> 27.0 on COCO novel).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovtasks.core.config import load_settings  # noqa: E402
from ovtasks.ingest.pipeline import ingest  # noqa: E402
from ovtasks.pseudolabel.maskfree.generator import load_maskfree  # noqa: E402
from ovtasks.data.groundtruth import GroundTruth  # noqa: E402
from ovtasks.evaluate.pseudo_labels import error_budget, evaluate_pseudo_labels, format_budget, format_table  # noqa: E402
from ovtasks.report.pictures import overlay_grid  # noqa: E402
from ovtasks.data.synth import SynthSpec, generate  # noqa: E402
from ovtasks.train.wspn import WspnTrainConfig, train_wspn  # noqa: E402
from ovtasks.models.hub import COMPLETE_MARKER  # noqa: E402

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
    ap.add_argument("--wspn-cache", default=None, metavar="DIR",
                    help="keep the WSPN trained on the evaluation set under DIR/seed<S>-steps<N> and reuse it next time "
                         "(two ITMs are then scored against the same proposals)")
    ap.add_argument("--sam-model", default=None, metavar="DIR",
                    help="grounded.sam_model, for --set mask_stage=sam / box_rerank=namer (e.g. models/sam-synth)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a maskfree setting")
    ap.add_argument("--out", default=str(RESULTS), help="results directory")
    args = ap.parse_args()
    overrides = dict(kv.split("=", 1) for kv in args.set)
    results_dir = Path(args.out)
    base = load_settings(env={})
    with tempfile.TemporaryDirectory(prefix="ovtasks-quality-") as d:
        laion, clean = f"{d}/laion", f"{d}/clean"
        generate(SynthSpec(seed=args.seed, shards=args.shards, images_per_shard=args.images_per_shard), laion, base)
        ingest(laion, clean, base, workers=base.workers)
        wspn = args.wspn_model
        wspn_metrics = None
        cached = Path(args.wspn_cache) / f"seed{args.seed}-steps{args.wspn_steps}" if args.wspn_cache else None
        if args.proposals == "wspn" and not wspn and cached and (cached / COMPLETE_MARKER).exists():
            wspn = str(cached)
            print(f"WSPN: reusing {wspn}")
        elif args.proposals == "wspn" and not wspn:
            trained = train_wspn(clean, str(cached) if cached else f"{d}/wspn", base, WspnTrainConfig(steps=args.wspn_steps))
            wspn, wspn_metrics = trained.model_uri, trained.metrics
        maskfree = base.maskfree.model_validate({**base.maskfree.model_dump(), "itm_model": args.itm_model, "wspn_model": wspn,
                                                 "proposals": args.proposals, **overrides})
        grounded = base.grounded.model_copy(update={"sam_model": args.sam_model}) if args.sam_model else base.grounded
        settings = base.model_copy(update={"device": args.device, "maskfree": maskfree, "grounded": grounded})
        models = load_maskfree(settings)
        table, samples, results = evaluate_pseudo_labels(clean, laion, settings, models)
        gt = GroundTruth.load(laion, settings)
        budget = error_budget(samples, results, gt, settings, models)
        picture = overlay_grid(samples, results, results_dir / "pseudo_label_overlays.png", novel=gt.names("novel"),
                               mask_stage=settings.maskfree.mask_stage)
    a, c = table["gradcam"]["novel"], table["wss"]["novel"]
    ratio = (c / a) if a else None
    meta = json.loads((Path(args.itm_model) / "ovtasks_itm.json").read_text()) if (Path(args.itm_model) / "ovtasks_itm.json").exists() else {}
    out = {"table": table, "novel_ratio_c_over_a": None if ratio is None else round(ratio, 2),
           "itm_model": args.itm_model, "itm_metrics": meta.get("metrics"), "wspn_metrics": wspn_metrics,
           "proposals": args.proposals, "images": table["_meta"]["images"], "settings": settings.maskfree.model_dump(mode="json"),
           "overrides": overrides, "sam_model": args.sam_model, "error_budget": budget,
           "targets_met": {"novel_c_ge_25": (c or 0) >= 25, "base_c_ge_35": (table["wss"]["base"] or 0) >= 35,
                           "a_lt_b_lt_c": (a or 0) < (table["pseudo_box"]["novel"] or 0) < (c or 0)}}
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "pseudo_label_quality.json").write_text(json.dumps(out, indent=2, default=str))
    md = (format_table(table) + f"\n\n{table['_meta']['images']} held-out images, torch threads {table['_meta']['torch_threads']}; overrides: {overrides or 'none (defaults)'}\n\n"
          "Error budget (one stage replaced by its ground-truth version at a time):\n\n" + format_budget(budget) + "\n")
    (results_dir / "pseudo_label_quality.md").write_text(md)
    print(md)
    print(f"picture: {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
