"""SAM checkpoints side by side as Semantic-SAM's mask stage, box-prompted with the GT boxes of held-out synthetic
images, named by the caption-pretrained namer.

For each ``--sam`` directory (``ovtasks train-sam`` output, or any SamModel directory) a Semantic-SAM is built on
it *without* Semantic-SAM training (its semantic tokens' opinion is switched off: logit scale e^-10, so the names
come from the namer alone) and evaluated exactly as ``make demo`` evaluates Semantic-SAM
(:func:`ovtasks.evaluate.models.evaluate_semantic_sam`): names right, mask IoU with the GT mask, and mask AP50.
This separates what SAM's own stage and the namer give from what the few hundred Semantic-SAM steps add
(``benchmarks/model_quality.py --models semantic-sam`` measures the trained model). ``--box-only-namer`` also
evaluates the namer without the prompts' masks (the box and its crop only), on the same masks.

    python benchmarks/sam_prompts.py --sam models/sam-synth --namer models/backbone-synth --seeds 0,2

Each seed is its own synthetic evaluation set (2 x 64 images rendered with that seed, the first 64 with GT
evaluated). Writes sam_prompts.{json,md} to --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ovtasks.core.config import load_settings  # noqa: E402
from ovtasks.data.synth import SynthSpec, generate  # noqa: E402
from ovtasks.evaluate.models import evaluate_semantic_sam  # noqa: E402
from ovtasks.ingest.pipeline import ingest  # noqa: E402
from ovtasks.models.name_cam import NameCam  # noqa: E402
from ovtasks.models.semantic_sam import build  # noqa: E402
from ovtasks.models.text_encoder import TextEncoder  # noqa: E402


class _BoxOnly:
    """The namer as it was before masks: ``box_name_probs`` ignores the masks it is given."""

    def __init__(self, namer: NameCam):
        self.namer = namer
        self.knows, self.index = namer.knows, namer.index

    def box_name_probs(self, image, boxes, context: float = 1.0, masks=None):
        return self.namer.box_name_probs(image, boxes, context)


def evaluate(sam: str, namer: NameCam | None, root: str, settings, dim: int, images: int) -> dict:
    torch.manual_seed(0)
    model = build(dim, sam).eval()
    model.logit_scale.data.fill_(-10.0)  # the untrained tokens: (almost) no opinion
    model.namer = namer
    t = time.perf_counter()
    ev = evaluate_semantic_sam(model, f"{root}/laion", f"{root}/clean", settings, limit=images)
    return {"names": ev["name_accuracy"], "masks": ev["mask_quality"], "novel_mask_AP50": ev["novel_mask_AP50"],
            "all_mask_AP50": next(r["mask_AP50"] for r in ev["rows"] if r["setting"] == "generalized" and r["split"] == "all"),
            "rows": ev["rows"], "seconds": round(time.perf_counter() - t, 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sam", action="append", required=True, help="SAM directory (repeat to compare)")
    ap.add_argument("--namer", default=None, help="caption-pretrained backbone with its name heads (models/backbone-synth)")
    ap.add_argument("--box-only-namer", action="store_true", help="also evaluate the namer without the prompts' masks")
    ap.add_argument("--seeds", default="0,2", help="evaluation sets (synthetic seeds)")
    ap.add_argument("--eval-images", type=int, default=64)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    settings = load_settings(env={})
    dim = TextEncoder(settings.candidates.text_encoder, "cpu", s3=settings.s3).encode(["x"]).shape[1]
    namer = NameCam.load(args.namer) if args.namer else None
    namers = {"masked": namer, **({"box only": _BoxOnly(namer)} if args.box_only_namer and namer else {})}
    runs = []
    with tempfile.TemporaryDirectory(prefix="ovtasks-sam-prompts-") as d:
        for seed in [int(s) for s in args.seeds.split(",")]:
            root = f"{d}/s{seed}"
            generate(SynthSpec(seed=seed, shards=2, images_per_shard=64), f"{root}/laion", settings, workers=1)
            ingest(f"{root}/laion", f"{root}/clean", settings, workers=1)
            for sam in args.sam:
                meta = Path(sam) / "ovtasks_sam.json"
                made = json.loads(meta.read_text()) if meta.exists() else {}
                for how, nm in namers.items():
                    r = {"seed": seed, "sam": sam, "namer": how if nm else None, "command": made.get("command"),
                         "sam_heldout": {k: v for k, v in made.get("metrics", {}).items() if k.startswith("heldout_")},
                         **evaluate(sam, nm, root, settings, dim, args.eval_images)}
                    runs.append(r)
                    print(json.dumps({k: r[k] for k in ("seed", "sam", "namer", "names", "masks", "novel_mask_AP50", "all_mask_AP50")}),
                          flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sam_prompts.json").write_text(json.dumps({"config": vars(args), "runs": runs}, indent=2))
    md = ["| SAM | namer | eval set | names right % | mask mean IoU | IoU >= 0.5 % | mask AP50 all | novel |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        md.append(f"| {r['sam']} | {r['namer'] or 'none'} | {r['seed']} | {r['names']['all']:.1f} | {r['masks']['mean_iou']:.3f} | "
                  f"{r['masks']['iou50']:.1f} | {r['all_mask_AP50']:.1f} | {r['novel_mask_AP50']:.1f} |")
    for sam in args.sam:
        for how in namers:
            sel = [r for r in runs if r["sam"] == sam and (r["namer"] or "masked") == how]
            md.append(f"| {sam} | {how if namer else 'none'} | **mean** | {np.mean([r['names']['all'] for r in sel]):.1f} | "
                      f"{np.mean([r['masks']['mean_iou'] for r in sel]):.3f} | {np.mean([r['masks']['iou50'] for r in sel]):.1f} | "
                      f"{np.mean([r['all_mask_AP50'] for r in sel]):.1f} | **{np.mean([r['novel_mask_AP50'] for r in sel]):.1f}** |")
    (out / "sam_prompts.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
