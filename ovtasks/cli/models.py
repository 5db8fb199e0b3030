"""Model commands: ``train-itm``, ``train-sam``, ``pretrain-backbone``, ``train-wspn``, ``train``, ``promote``, ``predict``, ``serve``, ``models upload``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ovtasks.cli.common import on_device, print_progress, print_table, report_trained
from ovtasks.core.config import Settings


def cmd_train_itm(args: argparse.Namespace, settings: Settings) -> int:
    from ovtasks.train.itm import ItmTrainConfig, train_itm

    cfg = ItmTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         image_size=args.image_size, max_images=args.max_images, pretrain_steps=args.pretrain_steps,
                         grounding_weight=args.grounding_weight, patch_size=args.patch_size, stem_extra=args.stem_extra,
                         mosaic_weight=args.mosaic_weight, mosaic_batch=args.mosaic_batch)
    command = " ".join(["ovtasks", *(shlex.quote(a) for a in sys.argv[1:])])  # recorded in the checkpoint's JSON
    return report_trained(train_itm(args.src, args.out, on_device(args, settings), cfg, gt_uri=args.gt,
                                     progress=print_progress, command=command, init=args.init), "train-itm metrics")


def cmd_train_sam(args: argparse.Namespace, settings: Settings) -> int:
    from ovtasks.train.sam import SamTrainConfig, train_sam

    cfg = SamTrainConfig(steps=args.steps, batch_size=args.batch_size, max_prompts=args.max_prompts, lr=args.lr,
                         image_size=args.image_size, hidden=args.hidden, patch_size=args.patch_size, layers=args.layers,
                         heads=args.heads, holdout=args.holdout, seed=args.seed, max_images=args.max_images,
                         box_jitter=args.box_jitter, pixel_loss=args.pixel_loss, grad_clip=args.grad_clip, hires=args.hires,
                         box_mask_prompt=args.box_mask_prompt,
                         max_seconds=args.max_minutes * 60 if args.max_minutes else None)
    command = " ".join(["ovtasks", *(shlex.quote(a) for a in sys.argv[1:])])  # recorded in the checkpoint's JSON
    return report_trained(train_sam(args.sa1b, args.out, on_device(args, settings), cfg, progress=print_progress,
                                    command=command), "train-sam metrics")


def cmd_pretrain_backbone(args: argparse.Namespace, settings: Settings) -> int:
    from ovtasks.train.backbone import BackboneConfig, pretrain_backbone

    cfg = BackboneConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, image_size=args.image_size,
                         holdout=args.holdout, max_images=args.max_images, seed=args.seed, init=args.init)
    command = " ".join(["ovtasks", *(shlex.quote(a) for a in sys.argv[1:])])  # recorded in the checkpoint's JSON
    return report_trained(pretrain_backbone(args.src, args.out, on_device(args, settings), cfg, progress=print_progress,
                                            command=command), "pretrain-backbone metrics")


def cmd_models_upload(args: argparse.Namespace, settings: Settings) -> int:
    """Put a model directory (or one file, e.g. an evaluation set) in the store where the pipeline loads it.
    A directory gets its completion marker last (with each file's size and sha256), so a loader never
    reads a half-uploaded model."""
    from ovtasks.models.hub import COMPLETE_MARKER, is_store_uri, publish_model

    src = Path(args.src)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    if not is_store_uri(args.uri):
        raise ValueError(f"{args.uri!r} is not a store URI (s3://bucket/prefix)")
    if src.is_dir() and not any(p.is_file() for p in src.rglob("*")):
        raise ValueError(f"{src} holds no files")
    uri = publish_model(src, args.uri, settings.s3)
    n = sum(1 for p in src.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER) if src.is_dir() else 1
    print(f"uploaded {n} file(s) to {uri}" + (f" (marker {COMPLETE_MARKER} written last)" if src.is_dir() else ""))
    return 0


def cmd_predict(args: argparse.Namespace, settings: Settings) -> int:
    from ovtasks.registry.predict import predict_images

    paths: list[Path] = []
    for p in map(Path, args.images):
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"))
        elif p.exists():
            paths.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist")
    if not paths:
        raise ValueError("no images to predict on")
    r = predict_images(args.model, paths, args.out, on_device(args, settings), args.names, progress=sys.stderr.isatty() or args.progress)
    print(f"{r['images']} image(s), {r['instances']} instance(s), {r['skipped']} skipped -> {r['out']}/predictions.json, "
          f"{r['out']}/overlays/")
    return 0


def cmd_train_wspn(args: argparse.Namespace, settings: Settings) -> int:
    from ovtasks.train.wspn import WspnTrainConfig, train_wspn

    cfg = WspnTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          classes=args.classes, max_images=args.max_images)
    return report_trained(train_wspn(args.src, args.out, on_device(args, settings), cfg, progress=print_progress),
                           "train-wspn metrics")


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from ovtasks.registry.lifecycle import log_and_register
    from ovtasks.data.holdout import eval_image_ids
    from ovtasks.evaluate.models import evaluate_model
    from ovtasks.models.loading import load_model
    from ovtasks.train.ov_maskrcnn import train_ov_maskrcnn, TrainConfig

    settings = on_device(args, settings)
    progress = lambda r: print(json.dumps(r), file=sys.stderr, flush=True)  # noqa: E731
    if args.finetune_steps and not args.gt:
        print("ovtasks: --finetune-steps needs --gt (the base-category GT to fine-tune on)", file=sys.stderr)
        return 2
    if args.model == "semantic-sam":
        from ovtasks.evaluate.models import evaluate_semantic_sam
        from ovtasks.train.semantic_sam import SemanticSamConfig, train_semantic_sam

        if args.finetune_steps:
            print("ovtasks: --finetune-steps is for --model ov-maskrcnn", file=sys.stderr)
            return 2
        cfg = SemanticSamConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr or SemanticSamConfig.lr, seed=args.seed,
                                generator=args.generator,
                                sam_model=args.sam_model, freeze_image_encoder=args.freeze_image_encoder, namer=args.namer)
        trained = train_semantic_sam(args.src, args.pseudo, args.sa1b, args.out, settings, cfg, progress=progress)
        evaluate = evaluate_semantic_sam
    else:
        lr = args.lr or (TrainConfig.lr if args.optimizer == "adamw" else 0.01)
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, optimizer=args.optimizer, backbone=args.backbone, seed=args.seed,
                          generator=args.generator, finetune_steps=args.finetune_steps, checkpoint_every=args.checkpoint_every,
                          min_size=args.min_size, max_size=args.max_size, backbone_init=args.backbone_init,
                          backbone_lr_scale=args.backbone_lr_scale)
        held_out = eval_image_ids(args.gt, args.src, settings, args.eval_images) if args.finetune_steps else ()
        trained = train_ov_maskrcnn(args.src, args.pseudo, args.out, settings, cfg, progress=progress, gt_uri=args.gt, exclude_ids=held_out)
        evaluate = evaluate_model
    rows = [(k, str(v)) for k, v in trained.metrics.items()]
    if args.gt:
        model, _ = load_model(trained.model_dir, settings.device)
        ev = evaluate(model, args.gt, args.src, settings, limit=args.eval_images)
        print(ev["table"])
        if args.register:
            from ovtasks.core.storage import open_store

            gx = json.loads(open_store(args.pseudo, settings.s3).get_bytes(f"pseudo/{args.generator}/validation_report.json"))
            reg = log_and_register(settings, trained.model_dir, {**cfg.__dict__}, trained.history, gx, ev,
                                   [f"{trained.model_dir}/loss_curve.png"], trained.data_manifest)
            rows += [("registered", f"{reg.name} v{reg.version} (alias challenger)"), ("mlflow run", reg.run_id)]
    elif args.register:
        print("ovtasks: --register needs --gt (a version is registered with its evaluation)", file=sys.stderr)
        return 2
    print_table(rows, f"train {args.model}")
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Download the version, check it against the registry's record, then become ``mlflow models serve`` on the
    checked local copy (the alias is resolved once: the served version does not change under a running server)."""
    import os
    import shutil
    import tempfile

    from ovtasks.registry.integrity import verified_download
    from ovtasks.registry.lifecycle import _client

    mlflow, client = _client(settings)
    dst = args.dir or tempfile.mkdtemp(prefix="ovtasks-serve-")
    local, mv = verified_download(mlflow, client, args.model, dst)
    print(f"serving {mv.name} v{mv.version} (checked against its registered sha256 list) on http://{args.host}:{args.port}",
          file=sys.stderr, flush=True)
    mlflow_bin = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    os.execv(mlflow_bin, [mlflow_bin, "models", "serve", "-m", str(local), "--env-manager", "local", "-h", args.host,
                          "-p", str(args.port), "-w", str(args.workers)])
    return 0  # not reached


def cli_actor() -> str:
    """Who a promotion from the CLI is audited under: the registry login it acts with (MLflow's basic-auth user,
    which must be allowed to write the model), else the operating-system user; never an argument."""
    import getpass
    import os

    return os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()


def cmd_promote(args: argparse.Namespace, settings: Settings) -> int:
    from ovtasks.registry.lifecycle import promote, registry_exists

    if not registry_exists(settings):
        raise LookupError(f"no model registry at {Path(settings.data_dir).absolute() / 'mlflow'}: register a challenger first "
                          "(`ovtasks train --register` or the ovtasks_retrain DAG), or point OVTASKS_REGISTRY__TRACKING_URI "
                          "at the MLflow server")

    from ovtasks.cli.ops import gate_text

    if args.version is not None:
        from ovtasks.registry.lifecycle import rollback

        try:
            r = rollback(settings, args.version, cli_actor(), args.reason or "", architecture=args.model)
        except LookupError as exc:
            raise ValueError(str(exc)) from exc
        print_table([("champion set", "yes" if r.promoted else "NO"), ("reason", r.reason), ("champion before", str(r.champion_before)),
                      ("champion now", str(r.champion_after))], "rollback (no gate)")
        return 0 if r.promoted else 4
    r = promote(settings, args.tolerance, cli_actor(), args.reason or "", architecture=args.model)
    print_table([("promoted", "yes" if r.promoted else "NO"), ("reason", r.reason), ("challenger", str(r.challenger)),
                  ("champion before", str(r.champion_before)), ("champion now", str(r.champion_after)),
                  ("gate (challenger - champion, CI)", gate_text(r.gate))], "promotion gate")
    return 0 if r.promoted else 4


def add_commands(sub) -> None:
    """This group's sub-commands on ``sub`` (the top-level parser's sub-parsers)."""
    t = sub.add_parser("train-itm", help="train a small BLIP image-text-matching model from scratch on clean shards")
    t.add_argument("--src", required=True, help="URI of ingested (clean) shards")
    t.add_argument("--out", required=True, help="directory or store URI for the model")
    t.add_argument("--gt", default=None, help="synthetic GT root, only to report grounding metrics")
    t.add_argument("--steps", type=int, default=3500)
    t.add_argument("--batch-size", type=int, default=24)
    t.add_argument("--lr", type=float, default=1.5e-3)
    t.add_argument("--image-size", type=int, default=96)
    t.add_argument("--pretrain-steps", type=int, default=3000,
                   help="stage 1: steps of caption-name classification by the conv stem before ITM (0 skips)")
    t.add_argument("--patch-size", type=int, default=8, help="vision patch size in px (the GradCAM grid is image-size / patch-size)")
    t.add_argument("--stem-extra", type=int, default=2,
                   help="stride-1 conv blocks in the stem after the stride-2 ones (each widens a patch's receptive field by 2 patches)")
    t.add_argument("--grounding-weight", type=float, default=0.0,
                   help="weight of the word-grounding loss (attention-pooled local features classify the word; 0 = off)")
    t.add_argument("--mosaic-weight", type=float, default=0.0,
                   help="weight of the mosaic grounding loss (2x2 mosaics of training images: a name only one tile's caption "
                        "mentions must draw the word's attention into that tile; 0 = off)")
    t.add_argument("--mosaic-batch", type=int, default=12, help="mosaics per step for --mosaic-weight")
    t.add_argument("--init", default=None,
                   help="continue from this ITM checkpoint (dir, HF id or store URI) instead of a random model; skips stage 1")
    t.add_argument("--max-images", type=int, default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=None, help="cpu | cuda (default from config)")
    t.set_defaults(func=cmd_train_itm)

    s = sub.add_parser("train-sam", help="pretrain a small SAM on SA-1B-format masks (the starting point of Semantic-SAM)")
    s.add_argument("--sa1b", required=True, help="URI of SA-1B-format tars (ovtasks synth-sa1b, or the real SA-1B)")
    s.add_argument("--out", required=True, help="directory or store URI for the SamModel")
    s.add_argument("--steps", type=int, default=2000)
    s.add_argument("--batch-size", type=int, default=8, help="images per step")
    s.add_argument("--max-prompts", type=int, default=16, help="box prompts per image per step")
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--image-size", type=int, default=128)
    s.add_argument("--hidden", type=int, default=64)
    s.add_argument("--patch-size", type=int, default=8)
    s.add_argument("--layers", type=int, default=2, help="ViT layers of the image encoder (the last one global)")
    s.add_argument("--heads", type=int, default=2)
    s.add_argument("--box-jitter", type=float, default=0.1, help="box prompt noise, std as a fraction of the box side (SAM's 0.1)")
    s.add_argument("--pixel-loss", choices=("bce", "focal"), default="bce")
    s.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: none)")
    s.add_argument("--box-mask-prompt", action="store_true",
                   help="the box prompt also enters as SAM's dense mask prompt (a filled rectangle)")
    s.add_argument("--hires", action="store_true",
                   help="SAM 2's high-resolution features in the mask decoder (a conv stem on the pixels; saved as hires.safetensors)")
    s.add_argument("--holdout", type=int, default=128, help="images kept out of training for the metrics")
    s.add_argument("--max-images", type=int, default=None)
    s.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this long; the LR schedule anneals by time too (the steps done are in the metrics)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default=None, help="cpu | cuda (default from config)")
    s.set_defaults(func=cmd_train_sam)

    b = sub.add_parser("pretrain-backbone", help="pretrain the OV Mask R-CNN's backbone to classify the names captions "
                       "mention (no box or mask labels)")
    b.add_argument("--src", required=True, help="URI of ingested (clean) shards")
    b.add_argument("--out", required=True, help="directory or store URI for the backbone")
    b.add_argument("--steps", type=int, default=3000)
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--lr", type=float, default=2e-3)
    b.add_argument("--image-size", type=int, default=128, help="image side (the detector sees 192 px, train --min-size)")
    b.add_argument("--holdout", type=int, default=400, help="last images kept out of training for the metrics")
    b.add_argument("--max-images", type=int, default=None)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--init", default=None, help="continue from this pretrained backbone (with its heads; a fresh "
                   "warm-up and cosine schedule over --steps)")
    b.add_argument("--device", default=None, help="cpu | cuda (default from config)")
    b.set_defaults(func=cmd_pretrain_backbone)

    w = sub.add_parser("train-wspn", help="train the weakly-supervised proposal network on clean shards")
    w.add_argument("--src", required=True)
    w.add_argument("--out", required=True, help="directory or store URI for wspn.pt")
    w.add_argument("--steps", type=int, default=600)
    w.add_argument("--batch-size", type=int, default=8)
    w.add_argument("--lr", type=float, default=1e-3)
    w.add_argument("--classes", choices=("base", "all"), default="base", help="image labels from base categories only (default)")
    w.add_argument("--max-images", type=int, default=None)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--device", default=None)
    w.set_defaults(func=cmd_train_wspn)

    t = sub.add_parser("train", help="train a model on GX-validated pseudo-labels; optionally evaluate and register it")
    t.add_argument("--model", default="ov-maskrcnn", choices=("ov-maskrcnn", "semantic-sam"))
    t.add_argument("--src", required=True, help="clean shards URI")
    t.add_argument("--pseudo", required=True, help="URI holding pseudo/<generator>/ and its validation_report.json")
    t.add_argument("--out", required=True, help="model directory")
    t.add_argument("--generator", default="maskfree", choices=("maskfree", "grounded"))
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--lr", type=float, default=None, help="default: the model's (ov-maskrcnn 1e-3 with adamw, 0.01 with sgd; semantic-sam 1e-3)")
    t.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"), help="ov-maskrcnn optimizer")
    t.add_argument("--backbone", default="small", choices=("small", "resnet50_fpn"), help="ov-maskrcnn backbone")
    t.add_argument("--backbone-init", default=None,
                   help="ov-maskrcnn: start the backbone from `ovtasks pretrain-backbone`'s output (directory or store URI)")
    t.add_argument("--backbone-lr-scale", type=float, default=1.0, help="ov-maskrcnn: the pretrained body's LR relative to --lr")
    t.add_argument("--sa1b", default=None, help="semantic-sam: SA-1B-format tars (masks without names), mixed 1:4 with the pseudo-labels")
    t.add_argument("--sam-model", default=None, help="semantic-sam: pretrained SAM (HF id, directory, model-store URI); default a tiny random one")
    t.add_argument("--freeze-image-encoder", action="store_true", help="semantic-sam: train the decoder, tokens and heads only")
    t.add_argument("--namer", default=None, help="semantic-sam: attach `ovtasks pretrain-backbone`'s output (with its name heads) "
                   "to name each prompt beside the semantic tokens (directory or store URI)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-every", type=int, default=50, help="ov-maskrcnn: steps between resumable checkpoints")
    t.add_argument("--min-size", type=int, default=192, help="ov-maskrcnn: shorter image side fed to the model")
    t.add_argument("--max-size", type=int, default=320, help="ov-maskrcnn: longer image side cap")
    t.add_argument("--device", default=None)
    t.add_argument("--gt", default=None, help="COCO GT (synthetic laion URI) to evaluate on")
    t.add_argument("--eval-images", type=int, default=64)
    t.add_argument("--finetune-steps", type=int, default=0,
                   help="then fine-tune this many steps on the base categories' GT from --gt (the evaluation images are held out)")
    t.add_argument("--register", action="store_true", help="log the run to MLflow and register a challenger version")
    t.set_defaults(func=cmd_train)

    pr = sub.add_parser("promote", help="move the champion alias to the challenger if the gate allows it")
    pr.add_argument("--model", default="ov-maskrcnn", choices=("ov-maskrcnn", "semantic-sam"))
    pr.add_argument("--tolerance", type=float, default=None,
                    help="novel mask AP50 points (default registry.promotion_tolerance; finite, at most registry.max_promotion_tolerance)")
    pr.add_argument("--reason", default=None)
    pr.add_argument("--version", default=None,
                    help="roll back: make this existing version the champion, without the gate (audited on the version)")
    pr.set_defaults(func=cmd_promote)

    pd_ = sub.add_parser("predict", help="run a registered (models:/NAME@champion) or local model on image files; COCO JSON + overlays")
    pd_.add_argument("images", nargs="+", help="image files or folders")
    pd_.add_argument("--model", default="models:/ovtasks-ov-maskrcnn@champion", help="models:/NAME@alias, models:/NAME/VERSION or a directory")
    pd_.add_argument("--out", required=True, help="output folder (predictions.json, overlays/)")
    pd_.add_argument("--names", default=None, help="comma-separated vocabulary (default: the model's own)")
    pd_.add_argument("--device", default=None)
    pd_.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is not a terminal")
    pd_.set_defaults(func=cmd_predict)

    sv = sub.add_parser("serve", help="serve a registered version over HTTP (mlflow models serve) once every file matched "
                                      "the sha256 list the registry recorded at registration")
    sv.add_argument("model", nargs="?", default="models:/ovtasks-ov-maskrcnn@champion", help="models:/NAME@alias or models:/NAME/N")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=5001)
    sv.add_argument("--workers", type=int, default=1)
    sv.add_argument("--dir", default=None, help="where to keep the checked copy (default: a new temporary folder)")
    sv.set_defaults(func=cmd_serve)

    mo = sub.add_parser("models", help="model store: upload a model directory (or an evaluation set) for the pipeline")
    mo_sub = mo.add_subparsers(dest="models_command", required=True)
    up = mo_sub.add_parser("upload", help="upload SRC (a model directory or one file) to a store URI, completion marker last")
    up.add_argument("src", help="local model directory (e.g. models/itm-synth) or file (e.g. instances.json)")
    up.add_argument("uri", help="s3://bucket/prefix, e.g. s3://ovtasks/models/itm (the URI the config names)")
    up.set_defaults(func=cmd_models_upload)
