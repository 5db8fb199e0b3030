"""``ovtasks`` command line: one sub-command per pipeline stage, plus ``demo`` and ``config``.

Configuration is parsed once here (``--config`` YAML + ``OVTASKS_*`` environment) and passed down.
Exit codes: 0 success, 1 a shard failed (details in the report), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from ovtasks import __version__
from ovtasks.core.config import ConfigError, Settings, load_settings


def _progress_factory(enabled: bool) -> Callable[[str, int], Callable[[], None]] | None:
    """A tqdm bar per phase on a terminal; nothing otherwise (logs stay structured)."""
    if not enabled:
        return None
    from tqdm import tqdm

    def make(label: str, total: int) -> Callable[[], None]:
        bar = tqdm(total=total, desc=label, unit="shard", leave=True)

        def tick() -> None:
            bar.update(1)
            if bar.n >= bar.total:
                bar.close()

        return tick

    return make


def _print_table(rows: list[tuple[str, str]], title: str) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}")
    print("-" * (width + 24))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def cmd_synth(args: argparse.Namespace, settings: Settings) -> int:
    from ovtasks.data.synth import SynthSpec, generate

    spec = SynthSpec(seed=args.seed, shards=args.shards, images_per_shard=args.images_per_shard,
                     image_size=args.image_size or settings.synth.image_size,
                     failure_rate=settings.synth.failure_rate if args.failure_rate is None else args.failure_rate)
    progress = _progress_factory(sys.stderr.isatty())
    tick = progress("synth", spec.shards) if progress else None
    summary = generate(spec, args.out, settings, workers=args.workers or settings.workers, progress=(lambda n: tick()) if tick else None)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_synth_sa1b(args: argparse.Namespace, settings: Settings) -> int:
    from ovtasks.data.sa1b import write_synthetic

    info = write_synthetic(args.out, settings, images=args.images, seed=args.seed, image_size=settings.synth.image_size)
    _print_table([(k, str(v)) for k, v in info.items()], "synth-sa1b")
    return 0


def _report_rows(report: dict) -> list[tuple[str, str]]:
    rows = [("shards", f"{len(report['shards'])} ({report['failed_shards']} failed)"),
            ("seen", str(report["seen"])), ("kept", str(report["kept"]))]
    rows += [(f"quarantined: {k}", str(v)) for k, v in report["quarantined"].items()]
    return rows


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    from ovtasks.ingest.pipeline import ingest

    t0 = time.perf_counter()
    result = ingest(args.src, args.out, settings, workers=args.workers, progress=_progress_factory(sys.stderr.isatty()))
    dt = time.perf_counter() - t0
    report = result.report
    _print_table(_report_rows(report) + [("seconds", f"{dt:.1f}"), ("images/s", f"{report['seen'] / dt:.1f}")], "ingest report")
    for e in report["shards"]:
        if e["status"] != "ok":
            print(f"FAILED shard {e['shard']}: {e['error']}", file=sys.stderr)
    print(f"\nreport: {result.report_uri}")
    return 1 if result.failed_shards else 0


def _with_overrides(settings: Settings, section: str, **values) -> Settings:
    """A copy of ``settings`` with ``section`` fields replaced (None values are ignored)."""
    values = {k: v for k, v in values.items() if v is not None}
    if not values:
        return settings
    merged = getattr(settings, section).model_copy(update=values)
    return settings.model_copy(update={section: type(merged).model_validate(merged.model_dump())})


def _print_progress(step: int, rec: dict) -> None:
    print("  " + "  ".join(f"{k}={v}" for k, v in rec.items()), flush=True)


def _on_device(args: argparse.Namespace, settings: Settings) -> Settings:
    return settings.model_copy(update={"device": args.device}) if args.device else settings


def _report_trained(result, title: str) -> int:
    _print_table([(k, str(v)) for k, v in result.metrics.items()], title)
    print(f"\nmodel: {result.model_uri}")
    return 0


def cmd_train_itm(args: argparse.Namespace, settings: Settings) -> int:
    from ovtasks.train.itm import ItmTrainConfig, train_itm

    cfg = ItmTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         image_size=args.image_size, max_images=args.max_images, pretrain_steps=args.pretrain_steps,
                         grounding_weight=args.grounding_weight)
    command = " ".join(["ovtasks", *(shlex.quote(a) for a in sys.argv[1:])])  # recorded in the checkpoint's JSON
    return _report_trained(train_itm(args.src, args.out, _on_device(args, settings), cfg, gt_uri=args.gt,
                                     progress=_print_progress, command=command), "train-itm metrics")


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
    r = predict_images(args.model, paths, args.out, _on_device(args, settings), args.names, progress=sys.stderr.isatty() or args.progress)
    print(f"{r['images']} image(s), {r['instances']} instance(s), {r['skipped']} skipped -> {r['out']}/predictions.json, "
          f"{r['out']}/overlays/")
    return 0


def cmd_train_wspn(args: argparse.Namespace, settings: Settings) -> int:
    from ovtasks.train.wspn import WspnTrainConfig, train_wspn

    cfg = WspnTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          classes=args.classes, max_images=args.max_images)
    return _report_trained(train_wspn(args.src, args.out, _on_device(args, settings), cfg, progress=_print_progress),
                           "train-wspn metrics")


def cmd_pseudo_label(args: argparse.Namespace, settings: Settings) -> int:
    from ovtasks.pseudolabel.runner import pseudo_label

    settings = _with_overrides(_on_device(args, settings), "maskfree", itm_model=args.itm_model, wspn_model=args.wspn_model,
                               proposals=args.proposals)
    settings = _with_overrides(settings, "grounded", gdino_model=args.gdino_model, sam_model=args.sam_model,
                               dtype=args.dtype, batch_size=args.batch_size)
    t0 = time.perf_counter()
    result = pseudo_label(args.src, args.out, settings, args.generator, progress=_progress_factory(sys.stderr.isatty()))
    rep = result.report
    dt = time.perf_counter() - t0
    rows = [("shards", f"{len(rep['shards'])} ({sum(1 for e in rep['shards'] if e['status'] != 'done')} skipped as complete)"),
            ("images", str(rep["images"])), ("quarantined images", str(rep["quarantined"])),
            ("candidates", str(rep["candidates"])), ("annotations", str(rep["annotations"]))]
    rows += [(f"skipped: {k}", str(v)) for k, v in rep["skipped"].items()]
    rows += [("seconds", f"{dt:.1f}")]
    _print_table(rows, "pseudo-label report")
    print(f"\nreport: {result.report_uri}")
    return 0


def cmd_validate(args: argparse.Namespace, settings: Settings) -> int:
    from ovtasks.validate.expectations import validate

    result = validate(args.src, settings, args.generator, progress=_progress_factory(sys.stderr.isatty()))
    rep = result.report
    rows = [(e["shard"], "passed" if e["success"] else "FAILED: " + "; ".join(e["reasons"])) for e in rep["shards"]]
    rows += [("training shards", f"{len(rep['training_shards'])} of {len(rep['shards'])}")]
    _print_table(rows, "validation (Great Expectations)")
    print(f"\nreport: {result.report_uri}")
    return 3 if (args.strict and rep["failed"]) else 0


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from ovtasks.registry.lifecycle import log_and_register
    from ovtasks.data.holdout import eval_image_ids
    from ovtasks.evaluate.models import evaluate_model
    from ovtasks.models.loading import load_model
    from ovtasks.train.ov_maskrcnn import train_ov_maskrcnn, TrainConfig

    settings = _on_device(args, settings)
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
                                sam_model=args.sam_model, freeze_image_encoder=args.freeze_image_encoder)
        trained = train_semantic_sam(args.src, args.pseudo, args.sa1b, args.out, settings, cfg, progress=progress)
        evaluate = evaluate_semantic_sam
    else:
        lr = args.lr or (TrainConfig.lr if args.optimizer == "adamw" else 0.01)
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, optimizer=args.optimizer, backbone=args.backbone, seed=args.seed,
                          generator=args.generator, finetune_steps=args.finetune_steps, checkpoint_every=args.checkpoint_every,
                          min_size=args.min_size, max_size=args.max_size)
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
    _print_table(rows, f"train {args.model}")
    return 0


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
            r = rollback(settings, args.version, args.who, args.reason or "", architecture=args.model)
        except LookupError as exc:
            raise ValueError(str(exc)) from exc
        _print_table([("champion set", "yes" if r.promoted else "NO"), ("reason", r.reason), ("champion before", str(r.champion_before)),
                      ("champion now", str(r.champion_after))], "rollback (no gate)")
        return 0 if r.promoted else 4
    r = promote(settings, args.tolerance, args.who, args.reason or "", architecture=args.model)
    _print_table([("promoted", "yes" if r.promoted else "NO"), ("reason", r.reason), ("challenger", str(r.challenger)),
                  ("champion before", str(r.champion_before)), ("champion now", str(r.champion_after)),
                  ("gate (challenger - champion, CI)", gate_text(r.gate))], "promotion gate")
    return 0 if r.promoted else 4


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from ovtasks.cli.ops import main_status

    return main_status(settings)


def cmd_trigger(args: argparse.Namespace, settings: Settings) -> int:
    from ovtasks.cli.ops import main_trigger

    return main_trigger(settings, args.dag, args.conf, not args.no_wait, args.timeout)


def cmd_plan(args: argparse.Namespace, settings: Settings) -> int:
    import yaml

    from ovtasks.orchestration.capacity import helm_values, measured, plan, render

    m = None
    gpu, ingest = args.gpu_images_per_s, args.ingest_images_per_core_s
    if gpu is None or ingest is None:
        m = measured(settings.paths.benchmark_results, generator=args.generator)  # FileNotFoundError: no benchmark yet (exit 2, one line)
        gpu, ingest = gpu or m.gpu_images_per_s, ingest or m.ingest_images_per_core_s
    p = plan(args.images_per_week, gpu, ingest, args.window_hours, args.efficiency, args.shard_size, args.image_kb,
             max_map_length=settings.pipeline.max_map_length)
    if args.values_out:
        Path(args.values_out).write_text(yaml.safe_dump(helm_values(p), sort_keys=False))
    print(json.dumps(p.as_dict(), indent=2) if args.json else render(p, m))
    return 0


def cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    print(json.dumps(settings.model_dump(mode="json"), indent=2, default=str))
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from ovtasks.demo import run_demo

    return run_demo(args.out or str(settings.data_dir / "demo"), settings, shards=args.shards,
                    images_per_shard=args.images_per_shard, seed=args.seed, workers=args.workers,
                    train_itm_steps=args.train_itm_steps, airflow=not args.no_airflow)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ovtasks", description="Open-vocabulary pseudo-mask platform: pipeline stages as commands.")
    p.add_argument("--version", action="version", version=f"ovtasks {__version__}")
    p.add_argument("--config", help="YAML config file (default $OVTASKS_CONFIG); OVTASKS_* env vars override it")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("synth", help="write the synthetic captioned benchmark (LAION/img2dataset shards + COCO GT)")
    s.add_argument("--out", required=True, help="output URI (path or s3://bucket/prefix)")
    s.add_argument("--shards", type=int, default=2)
    s.add_argument("--images-per-shard", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=None, help="longest side in px (default from config: 192)")
    s.add_argument("--failure-rate", type=float, default=None, help="fraction made to fail an ingest filter")
    s.add_argument("--workers", type=int, default=None)
    s.set_defaults(func=cmd_synth)

    sa = sub.add_parser("synth-sa1b", help="write SA-1B-format tars (masks without names) from the synthetic scene generator")
    sa.add_argument("--out", required=True)
    sa.add_argument("--images", type=int, default=256)
    sa.add_argument("--seed", type=int, default=7, help="keep it apart from the benchmark's seeds (0 and the ITM's 1)")
    sa.set_defaults(func=cmd_synth_sa1b)

    i = sub.add_parser("ingest", help="filter and normalise img2dataset shards into clean webdataset shards")
    i.add_argument("--src", required=True, help="URI holding NNNNN.tar (+ .parquet) shards")
    i.add_argument("--out", required=True, help="output URI for shards/, quarantine/ and ingest_report.json")
    i.add_argument("--workers", type=int, default=None, help="processes (default from config)")
    i.set_defaults(func=cmd_ingest)

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
    t.add_argument("--grounding-weight", type=float, default=0.0,
                   help="weight of the word-grounding loss (attention-pooled local features classify the word; 0 = off)")
    t.add_argument("--max-images", type=int, default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=None, help="cpu | cuda (default from config)")
    t.set_defaults(func=cmd_train_itm)

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

    pl = sub.add_parser("pseudo-label", help="clean shards -> COCO instance pseudo-masks (resumes complete shards)")
    pl.add_argument("--src", required=True, help="URI of ingested (clean) shards")
    pl.add_argument("--out", required=True, help="output URI; writes pseudo/<generator>/")
    pl.add_argument("--generator", default="maskfree", choices=("maskfree", "grounded"))
    pl.add_argument("--device", default=None, help="cpu | cuda (default from config)")
    pl.add_argument("--itm-model", default=None, help="override maskfree.itm_model")
    pl.add_argument("--wspn-model", default=None, help="override maskfree.wspn_model")
    pl.add_argument("--proposals", default=None, choices=("wspn", "selective_search", "gdino"),
                    help="maskfree proposal source (gdino: Grounding-DINO boxes, needs --gdino-model)")
    pl.add_argument("--gdino-model", default=None, help="override grounded.gdino_model (HF id, directory or store URI)")
    pl.add_argument("--sam-model", default=None, help="override grounded.sam_model (HF id, directory or store URI)")
    pl.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16", "float16"),
                    help="grounded model dtype (auto: bf16 on CUDA, fp32 on CPU)")
    pl.add_argument("--batch-size", type=int, default=None, help="override grounded.batch_size (images per micro-batch)")
    pl.set_defaults(func=cmd_pseudo_label)

    st = sub.add_parser("status", help="latest DAG runs (Airflow REST API), shards per stage, champion / challenger")
    st.set_defaults(func=cmd_status)
    tr = sub.add_parser("trigger", help="trigger a DAG through the Airflow REST API and follow it with a progress bar")
    tr.add_argument("dag", help="e.g. ovtasks_retrain")
    tr.add_argument("--conf", default=None, help='JSON params, e.g. \'{"steps": 300}\'')
    tr.add_argument("--no-wait", action="store_true", help="return once triggered")
    tr.add_argument("--timeout", type=float, default=6 * 3600, help="seconds to follow the run (exit 5 past it)")
    tr.set_defaults(func=cmd_trigger)

    d = sub.add_parser("demo", help="run the pipeline end to end on embedded defaults and print where results are")
    d.add_argument("--out", default=None, help="default: <data_dir>/demo")
    d.add_argument("--shards", type=int, default=8)
    d.add_argument("--images-per-shard", type=int, default=64)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--workers", type=int, default=None)
    d.add_argument("--train-itm-steps", type=int, default=None, help="train the ITM here instead of using the committed checkpoint")
    d.add_argument("--no-airflow", action="store_true", help="skip step 10 (the same chain through the DAGs with `airflow dags test`)")
    d.set_defaults(func=cmd_demo)

    v = sub.add_parser("validate", help="Great Expectations gate over pseudo-label shards; failing shards are excluded from training")
    v.add_argument("--src", required=True, help="URI holding pseudo/<generator>/")
    v.add_argument("--generator", default="maskfree", choices=("maskfree", "grounded"))
    v.add_argument("--strict", action="store_true", help="exit 3 when any shard fails")
    v.set_defaults(func=cmd_validate)

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
    t.add_argument("--sa1b", default=None, help="semantic-sam: SA-1B-format tars (masks without names), mixed 1:4 with the pseudo-labels")
    t.add_argument("--sam-model", default=None, help="semantic-sam: pretrained SAM (HF id, directory, model-store URI); default a tiny random one")
    t.add_argument("--freeze-image-encoder", action="store_true", help="semantic-sam: train the decoder, tokens and heads only")
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
    pr.add_argument("--tolerance", type=float, default=None, help="novel mask AP50 points (default registry.promotion_tolerance)")
    pr.add_argument("--who", default=None)
    pr.add_argument("--reason", default=None)
    pr.add_argument("--version", default=None,
                    help="roll back: make this existing version the champion, without the gate (audited on the version)")
    pr.set_defaults(func=cmd_promote)

    pn = sub.add_parser("plan", help="GPU workers, pool slots, mapped tasks and helm values for N images a week (from measured throughput)")
    pn.add_argument("--images-per-week", type=float, required=True, help="e.g. 10e6")
    pn.add_argument("--generator", default="grounded", choices=("maskfree", "grounded"))
    pn.add_argument("--gpu-images-per-s", type=float, default=None, help="default: the last GPU benchmark (grounded)")
    pn.add_argument("--ingest-images-per-core-s", type=float, default=None, help="default: benchmarks/results/ingest.json")
    pn.add_argument("--window-hours", type=float, default=72.0, help="pseudo-labelling must finish within (default 72)")
    pn.add_argument("--efficiency", type=float, default=0.7, help="fraction of the measured rate sustained (default 0.7)")
    pn.add_argument("--shard-size", type=int, default=10_000, help="images per source shard (img2dataset default 10000)")
    pn.add_argument("--image-kb", type=float, default=50.0, help="mean JPEG size")
    pn.add_argument("--values-out", default=None, help="write the helm overrides to this file")
    pn.add_argument("--json", action="store_true")
    pn.set_defaults(func=cmd_plan)

    pd_ = sub.add_parser("predict", help="run a registered (models:/NAME@champion) or local model on image files; COCO JSON + overlays")
    pd_.add_argument("images", nargs="+", help="image files or folders")
    pd_.add_argument("--model", default="models:/ovtasks-ov-maskrcnn@champion", help="models:/NAME@alias, models:/NAME/VERSION or a directory")
    pd_.add_argument("--out", required=True, help="output folder (predictions.json, overlays/)")
    pd_.add_argument("--names", default=None, help="comma-separated vocabulary (default: the model's own)")
    pd_.add_argument("--device", default=None)
    pd_.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is not a terminal")
    pd_.set_defaults(func=cmd_predict)

    mo = sub.add_parser("models", help="model store: upload a model directory (or an evaluation set) for the pipeline")
    mo_sub = mo.add_subparsers(dest="models_command", required=True)
    up = mo_sub.add_parser("upload", help="upload SRC (a model directory or one file) to a store URI, completion marker last")
    up.add_argument("src", help="local model directory (e.g. models/itm-synth) or file (e.g. instances.json)")
    up.add_argument("uri", help="s3://bucket/prefix, e.g. s3://ovtasks/models/itm (the URI the config names)")
    up.set_defaults(func=cmd_models_upload)

    c = sub.add_parser("config", help="print the effective configuration (secrets masked)")
    c.set_defaults(func=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"ovtasks: {exc}", file=sys.stderr)
        return 2
    from ovtasks.core.logs import setup_logging

    setup_logging(settings.log_format)
    try:
        code = args.func(args, settings)
        sys.stdout.flush()
        return code
    except BrokenPipeError:  # `ovtasks plan ... | head -2`: the reader left; stop quietly, as `yes | head` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print(f"ovtasks {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every error is one line and an exit code, never a traceback
        code, message = explain_error(exc)
        print(f"ovtasks {args.command}: {message}", file=sys.stderr)
        if os.environ.get("OVTASKS_TRACEBACK"):
            traceback.print_exc()
        return code


EXIT_INTERNAL = 70  # sysexits EX_SOFTWARE: a bug in ovtasks, not in the input


def explain_error(exc: BaseException) -> tuple[int, str]:
    """(exit code, one line): 2 for what the user can fix (arguments, config, input files, the store or
    a service that cannot be reached or refuses), 70 for anything else (a bug; OVTASKS_TRACEBACK=1 shows it)."""
    from ovtasks.core.storage import StoreError

    def one_line(text: str) -> str:
        text = " / ".join(line.strip() for line in str(text).splitlines() if line.strip())
        return text if len(text) <= 500 else text[:497] + "..."

    if isinstance(exc, OSError) and getattr(exc, "filename", None):
        return 2, one_line(f"{exc.strerror or type(exc).__name__}: {exc.filename}")
    user_side = (ValueError, LookupError, OSError, StoreError, TimeoutError)
    try:
        from minio.error import MinioException
        from urllib3.exceptions import HTTPError as Urllib3Error

        user_side += (MinioException, Urllib3Error)
    except ImportError:  # pragma: no cover - both are dependencies
        pass
    if isinstance(exc, user_side):
        return 2, one_line(str(exc) or type(exc).__name__)
    return EXIT_INTERNAL, one_line(f"internal error: {type(exc).__name__}: {exc} (set OVTASKS_TRACEBACK=1 for the traceback)")


if __name__ == "__main__":
    sys.exit(main())
