"""Model quality on the synthetic benchmark (the patent's finding: a detector trained on the pseudo-masks
beats the pseudo-masks themselves), measured side by side in one run.

Novel mask AP50 (generalized: all categories in the vocabulary) on held-out images of:
  (1) the pseudo-labels themselves (maskfree generator, committed ITM, WSPN trained here on captions),
  (2) the OV Mask R-CNN trained on those pseudo-labels (held-out images excluded from training),
  (3) an oracle: the same model and budget trained on the GT masks of the same training images;
  optionally (``--models ...,semantic-sam``) Semantic-SAM trained as ``make demo`` trains it (SA-1B-format
  masks + the pseudo-labels' names, 1:4, from the committed SAM), prompted with the GT boxes of the held-out
  images: names right, mask IoU and novel mask AP50, with the caption-pretrained namer (``--backbone-init``)
  and without it, on the same trained model.

    python benchmarks/model_quality.py --itm-model models/itm-synth
    python benchmarks/model_quality.py --itm-model models/itm-synth --seeds 0,1,2    # spread over training seeds
    python benchmarks/model_quality.py --itm-model models/itm-synth --shards 8 --steps 600 --device cuda
    python benchmarks/model_quality.py --itm-model models/itm-synth --backbone-init models/backbone-synth   # caption-pretrained backbone
    python benchmarks/model_quality.py --itm-model models/itm-synth --backbone-init models/backbone-synth --models semantic-sam

Targets: (3) >= 50 within 20 minutes of training, (2) >= (1), and (2) >= 70% of (3) (``oracle_fraction``).
Every stage's output is hashed (pseudo-label shards, trained weights) into the JSON, so two runs can be
compared stage by stage; ``--seeds`` trains both models once per seed and reports mean and range.
Writes model_quality.{json,md} to --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ovtasks.core.config import load_settings  # noqa: E402
from ovtasks.evaluate.coco import evaluation_table, format_eval_table  # noqa: E402
from ovtasks.data.groundtruth import GroundTruth  # noqa: E402
from ovtasks.ingest.pipeline import ingest  # noqa: E402
from ovtasks.pseudolabel.maskfree.generator import load_maskfree  # noqa: E402
from ovtasks.pseudolabel.runner import pseudo_label  # noqa: E402
from ovtasks.core.storage import open_store  # noqa: E402
from ovtasks.data.synth import SynthSpec, generate  # noqa: E402
from ovtasks.data.holdout import eval_image_ids  # noqa: E402
from ovtasks.evaluate.models import evaluate_model  # noqa: E402
from ovtasks.models.loading import load_model  # noqa: E402
from ovtasks.train.data import gt_training_data, training_data  # noqa: E402
from ovtasks.train.ov_maskrcnn import TrainConfig, fit_ov_maskrcnn  # noqa: E402
from ovtasks.train.wspn import WspnTrainConfig, train_wspn  # noqa: E402
from ovtasks.validate.expectations import validate  # noqa: E402

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
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--images-per-shard", type=int, default=64)
    ap.add_argument("--eval-images", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--seeds", default=None, help="comma-separated training seeds (default: --seed); mean and range reported")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a maskfree setting")
    ap.add_argument("--sam-model", default=None, metavar="DIR",
                    help="grounded.sam_model, for --set mask_stage=sam / box_rerank=namer (e.g. models/sam-synth)")
    ap.add_argument("--wspn-steps", type=int, default=300)
    ap.add_argument("--backbone", default="small", choices=("small", "resnet50_fpn"))
    ap.add_argument("--backbone-init", default=None, metavar="DIR",
                    help="both models start from this caption-pretrained backbone (`ovtasks pretrain-backbone`, e.g. "
                         "models/backbone-synth); default random")
    ap.add_argument("--backbone-lr-scale", type=float, default=1.0, help="the pretrained body's LR relative to --lr")
    ap.add_argument("--models", default="pseudo,oracle",
                    help="which to train: pseudo (the student), oracle, and with --backbone-init also pseudo-random / "
                         "oracle-random (the same from a random backbone, side by side on the same pseudo-labels); "
                         "semantic-sam (the demo's recipe; with --backbone-init its namer, evaluated with and without it)")
    ap.add_argument("--ssam-steps", type=int, default=500, help="semantic-sam: training steps (the demo's 500)")
    ap.add_argument("--keep-semantic-sam", default=None, metavar="DIR", help="semantic-sam: copy the trained model here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(RESULTS), help="results directory (model_quality.json / .md)")
    args = ap.parse_args()
    base = load_settings(env={})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ovtasks-model-quality-") as d:
        laion, clean = f"{d}/laion", f"{d}/clean"
        generate(SynthSpec(seed=args.seed, shards=args.shards, images_per_shard=args.images_per_shard), laion, base, workers=base.workers)
        ingest(laion, clean, base, workers=base.workers)
        train_wspn(clean, f"{d}/wspn", base, WspnTrainConfig(steps=args.wspn_steps))
        digests_wspn = _digest(Path(d) / "wspn", "*", d)
        maskfree = base.maskfree.model_validate({**base.maskfree.model_dump(), "itm_model": args.itm_model, "wspn_model": f"{d}/wspn",
                                                 **dict(kv.split("=", 1) for kv in args.set)})
        grounded = base.grounded.model_copy(update={"sam_model": args.sam_model}) if args.sam_model else base.grounded
        settings = base.model_copy(update={"device": args.device, "maskfree": maskfree, "grounded": grounded})
        pseudo_label(clean, d, settings, models=load_maskfree(settings))
        gate = validate(d, settings, "maskfree").report
        gt = GroundTruth.load(laion, settings)
        held = eval_image_ids(laion, clean, settings, args.eval_images)
        doc = gt.subset(held)
        digests = {"wspn": digests_wspn, "pseudo_labels": _digest(Path(d) / "pseudo" / "maskfree", "*.json", d)}

        rows_pl = evaluation_table(doc, pseudo_label_predictions(d, gt, held))
        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
        lr = args.lr or (1e-3 if args.optimizer == "adamw" else 0.01)
        data = {"pseudo": training_data(clean, d, settings, "maskfree", held), "oracle": gt_training_data(laion, clean, settings, None, held)}
        wanted = args.models.split(",")
        if {"pseudo-random", "oracle-random"} & set(wanted) and not args.backbone_init:
            ap.error("pseudo-random / oracle-random compare against --backbone-init; without it pseudo / oracle are random")
        runs: dict[str, list] = {m: [] for m in ("pseudo", "oracle", "pseudo-random", "oracle-random")}
        ssam = semantic_sam_rows(laion, clean, d, settings, held, args) if "semantic-sam" in wanted else None
        for seed in seeds:
            cfg = TrainConfig(steps=args.steps, batch_size=4, backbone=args.backbone, seed=seed, optimizer=args.optimizer, lr=lr,
                              backbone_init=args.backbone_init, backbone_lr_scale=args.backbone_lr_scale)
            for name in [m for m in runs if m in wanted]:
                t = time.perf_counter()
                random_body = replace(cfg, backbone_init=None, backbone_lr_scale=1.0)
                trained = fit_ov_maskrcnn(*data[name.split("-")[0]], f"{d}/model-{name}-{seed}", settings,
                                          random_body if name.endswith("-random") else cfg)
                train_s = time.perf_counter() - t
                model, _ = load_model(trained.model_dir, settings.device)
                ev = evaluate_model(model, laion, clean, settings, limit=args.eval_images)
                runs[name].append({"seed": seed, "novel": novel(ev["rows"]), "rows": ev["rows"], "table": ev["table"],
                                   "train_images": trained.metrics["images"], "train_annotations": trained.metrics["annotations"],
                                   "final_loss": trained.metrics["final_loss"], "train_seconds": round(train_s, 1),
                                   "final_loss_mask": float(np.mean([h["loss_mask"] for h in trained.history[-50:]])),
                                   "weights_sha256": _digest(Path(trained.model_dir), "model.safetensors")})
                print(f"seed {seed} {name}: novel mask AP50 {runs[name][-1]['novel']} ({train_s:.0f} s training)", flush=True)

    pl = novel(rows_pl)
    tr, orc = _summary([r["novel"] for r in runs["pseudo"]]), _summary([r["novel"] for r in runs["oracle"]])
    fraction = round(tr["mean"] / orc["mean"], 3) if orc["mean"] and tr["mean"] is not None else None
    oracle_s = max((r["train_seconds"] for r in runs["oracle"]), default=float("nan"))
    randoms = {f"{k}_random_backbone": _summary([r["novel"] for r in runs[f"{k}-random"]]) for k in ("pseudo", "oracle")
               if runs[f"{k}-random"]}
    out = {"novel_mask_AP50": {"pseudo_labels": pl, "trained_on_pseudo_labels": tr, "oracle_trained_on_gt": orc, **randoms},
           "oracle_fraction": fraction, "trained_beats_pseudo_labels": tr["mean"] is not None and pl is not None and tr["mean"] >= pl,
           "targets": {"oracle_ge_50": (orc["mean"] or 0) >= 50, "oracle_within_20_min": oracle_s <= 1200,
                       "student_ge_pseudo_labels": tr["mean"] is not None and pl is not None and tr["mean"] >= pl,
                       "student_ge_70pct_oracle": fraction is not None and fraction >= 0.7},
           "pseudo_label_rows": rows_pl, "trained": runs["pseudo"], "oracle": runs["oracle"],
           **{f"{k.replace('-', '_')}_backbone": runs[k] for k in ("pseudo-random", "oracle-random") if runs[k]}, "digests": digests,
           **({"semantic_sam": ssam} if ssam else {}),
           "gx": {k: gate[k] for k in ("passed", "failed")},
           "config": {**vars(args), "train": {**cfg.__dict__, "seed": seeds}}, "held_out_images": len(held),
           "machine": f"{platform.machine()} {platform.processor() or ''} {base.workers} workers, torch threads {torch.get_num_threads()}".strip(),
           "seconds": round(time.perf_counter() - t0, 1)}
    results = Path(args.out)
    results.mkdir(parents=True, exist_ok=True)
    (results / "model_quality.json").write_text(json.dumps(out, indent=2, default=str))
    fmt = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
    spread = lambda x: fmt(x["mean"]) + ("" if x["n"] == 1 else f" (range {fmt(x['min'])}-{fmt(x['max'])}, {x['n']} seeds)")  # noqa: E731
    body = ", from the caption-pretrained backbone" if args.backbone_init else ""
    md = ["| novel mask AP50 (generalized), held-out images | % |", "|---|---:|",
          f"| (1) pseudo-labels (maskfree) | {fmt(pl)} |",
          *([f"| (2) OV Mask R-CNN trained on (1), {args.steps} steps{body} | {spread(tr)} |"] if tr["n"] else []),
          *([f"| (3) oracle: same model and budget on GT masks | {spread(orc)} |"] if orc["n"] else []),
          *(f"| {label}, from a random backbone (side by side) | {spread(randoms[key])} |" for key, label in
            (("pseudo_random_backbone", "(2)"), ("oracle_random_backbone", "(3)")) if key in randoms),
          "", f"oracle_fraction={fraction} (target >= 0.7); trained >= pseudo-labels: {out['trained_beats_pseudo_labels']}; "
          f"oracle training {oracle_s:.0f} s (target <= 1200 s); {len(held)} held-out images; {args.shards * args.images_per_shard} synthetic images",
          *(["", "maskfree overrides: " + " ".join(args.set)] if args.set else []),
          *(["", f"grounded.sam_model: {args.sam_model}"] if args.sam_model else []),
          *(["", f"backbone from {args.backbone_init}"] if args.backbone_init else []),
          "", "Pseudo-labels:", format_eval_table(rows_pl),
          *(semantic_sam_md(ssam) if ssam else []),
          *(x for name, title in (("pseudo", "Trained on pseudo-labels"), ("oracle", "Oracle"),
                                  ("pseudo-random", "Trained on pseudo-labels, random backbone"),
                                  ("oracle-random", "Oracle, random backbone")) if runs[name]
            for x in ("", f"{title} (seed {seeds[0]}):", runs[name][0]["table"])), ""]
    (results / "model_quality.md").write_text("\n".join(md))
    print("\n".join(md))
    print(f"oracle_fraction={fraction}")
    return 0


def semantic_sam_rows(laion: str, clean: str, root: str, settings, held: list[int], args) -> dict:
    """Semantic-SAM as ``make demo`` trains it, on these pseudo-labels; GT-box prompts on the held-out images,
    evaluated with the namer (``--backbone-init``) and, on the same model, without it."""
    from ovtasks.data.sa1b import write_synthetic
    from ovtasks.demo import committed_sam
    from ovtasks.evaluate.models import evaluate_semantic_sam
    from ovtasks.train.semantic_sam import SemanticSamConfig, train_semantic_sam

    sa1b = f"{root}/sa1b"
    write_synthetic(sa1b, settings, images=512, image_size=settings.synth.image_size)
    start = str(committed) if (committed := committed_sam(settings)) is not None else None
    t = time.perf_counter()
    trained = train_semantic_sam(clean, root, sa1b, f"{root}/semantic-sam", settings,
                                 SemanticSamConfig(steps=args.ssam_steps, sam_model=start, seed=args.seed, namer=args.backbone_init),
                                 exclude_ids=held)
    train_s = time.perf_counter() - t
    if args.keep_semantic_sam:
        import shutil

        shutil.copytree(trained.model_dir, args.keep_semantic_sam, dirs_exist_ok=True)
    model, _ = load_model(trained.model_dir, settings.device)
    out = {"steps": args.ssam_steps, "sam_start": start, "train_seconds": round(train_s, 1), "namer": args.backbone_init}
    namer = model.namer
    for key, attached in (("with_namer", namer), ("tokens_only", None)):
        if key == "with_namer" and namer is None:
            continue
        model.namer = attached
        ev = evaluate_semantic_sam(model, laion, clean, settings, limit=args.eval_images)
        out[key] = {"novel_mask_AP50": ev["novel_mask_AP50"], "name_accuracy": ev["name_accuracy"], "mask_quality": ev["mask_quality"],
                    "rows": ev["rows"], "table": ev["table"]}
        print(f"semantic-sam {key}: names {ev['name_accuracy']}, novel mask AP50 {ev['novel_mask_AP50']}", flush=True)
    return out


def semantic_sam_md(ssam: dict) -> list[str]:
    rows = ["", f"Semantic-SAM ({ssam['steps']} steps from {ssam['sam_start'] or 'a random SAM'}, {ssam['train_seconds']:.0f} s), "
            "GT boxes as prompts:", "",
            "| names from | names right (all / base / novel) | mask IoU >= 0.5 | novel mask AP50 |", "|---|---:|---:|---:|"]
    for key, label in (("with_namer", "semantic tokens x caption-pretrained namer"), ("tokens_only", "semantic tokens alone")):
        if key in ssam:
            r = ssam[key]
            acc = r["name_accuracy"]
            rows.append(f"| {label} | {acc['all']:.1f} / {acc['base']:.1f} / {acc['novel']:.1f} % | "
                        f"{r['mask_quality']['iou50']:.1f} % | {r['novel_mask_AP50']:.1f} |")
    return rows


def _digest(root: Path, pattern: str, tmp: str | None = None) -> str:
    """sha256 over the files matching ``pattern`` under ``root`` (names and bytes, sorted); the run's temporary
    directory ``tmp``, which the files name (model refs, sources), is hashed as ``<tmp>`` so that two runs with
    the same outputs get the same digest."""
    h = hashlib.sha256()
    for p in sorted(q for q in root.glob(pattern) if q.is_file()):
        data = p.read_bytes()
        h.update(p.name.encode() + (data.replace(tmp.encode(), b"<tmp>") if tmp else data))
    return h.hexdigest()[:16]


def _summary(values: list) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "min": None, "max": None, "n": 0}
    return {"mean": round(float(np.mean(vals)), 2), "min": min(vals), "max": max(vals), "n": len(vals), "values": vals}


if __name__ == "__main__":
    sys.exit(main())
