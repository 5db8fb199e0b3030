"""Data commands: ``synth``, ``synth-sa1b``, ``ingest``, ``pseudo-label``, ``validate``."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ovtasks.cli.common import on_device, print_table, progress_factory, report_rows, with_overrides
from ovtasks.core.config import Settings


def cmd_synth(args: argparse.Namespace, settings: Settings) -> int:
    from ovtasks.data.synth import SynthSpec, generate

    spec = SynthSpec(seed=args.seed, shards=args.shards, images_per_shard=args.images_per_shard,
                     image_size=args.image_size or settings.synth.image_size,
                     failure_rate=settings.synth.failure_rate if args.failure_rate is None else args.failure_rate)
    progress = progress_factory(sys.stderr.isatty())
    tick = progress("synth", spec.shards) if progress else None
    summary = generate(spec, args.out, settings, workers=args.workers or settings.workers, progress=(lambda n: tick()) if tick else None)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_synth_sa1b(args: argparse.Namespace, settings: Settings) -> int:
    from ovtasks.data.sa1b import write_synthetic

    info = write_synthetic(args.out, settings, images=args.images, seed=args.seed, image_size=settings.synth.image_size)
    print_table([(k, str(v)) for k, v in info.items()], "synth-sa1b")
    return 0


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    from ovtasks.ingest.pipeline import ingest

    t0 = time.perf_counter()
    result = ingest(args.src, args.out, settings, workers=args.workers, progress=progress_factory(sys.stderr.isatty()))
    dt = time.perf_counter() - t0
    report = result.report
    print_table(report_rows(report) + [("seconds", f"{dt:.1f}"), ("images/s", f"{report['seen'] / dt:.1f}")], "ingest report")
    for e in report["shards"]:
        if e["status"] != "ok":
            print(f"FAILED shard {e['shard']}: {e['error']}", file=sys.stderr)
    print(f"\nreport: {result.report_uri}")
    return 1 if result.failed_shards else 0


def cmd_pseudo_label(args: argparse.Namespace, settings: Settings) -> int:
    from ovtasks.pseudolabel.runner import pseudo_label

    settings = with_overrides(on_device(args, settings), "maskfree", itm_model=args.itm_model, wspn_model=args.wspn_model,
                               proposals=args.proposals)
    settings = with_overrides(settings, "grounded", gdino_model=args.gdino_model, sam_model=args.sam_model,
                               dtype=args.dtype, batch_size=args.batch_size)
    t0 = time.perf_counter()
    result = pseudo_label(args.src, args.out, settings, args.generator, progress=progress_factory(sys.stderr.isatty()))
    rep = result.report
    dt = time.perf_counter() - t0
    rows = [("shards", f"{len(rep['shards'])} ({sum(1 for e in rep['shards'] if e['status'] != 'done')} skipped as complete)"),
            ("images", str(rep["images"])), ("quarantined images", str(rep["quarantined"])),
            ("candidates", str(rep["candidates"])), ("annotations", str(rep["annotations"]))]
    rows += [(f"skipped: {k}", str(v)) for k, v in rep["skipped"].items()]
    rows += [("seconds", f"{dt:.1f}")]
    print_table(rows, "pseudo-label report")
    print(f"\nreport: {result.report_uri}")
    return 0


def cmd_validate(args: argparse.Namespace, settings: Settings) -> int:
    from ovtasks.validate.expectations import validate

    result = validate(args.src, settings, args.generator, progress=progress_factory(sys.stderr.isatty()))
    rep = result.report
    rows = [(e["shard"], "passed" if e["success"] else "FAILED: " + "; ".join(e["reasons"])) for e in rep["shards"]]
    rows += [("training shards", f"{len(rep['training_shards'])} of {len(rep['shards'])}")]
    print_table(rows, "validation (Great Expectations)")
    print(f"\nreport: {result.report_uri}")
    return 3 if (args.strict and rep["failed"]) else 0


def add_commands(sub) -> None:
    """This group's sub-commands on ``sub`` (the top-level parser's sub-parsers)."""
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

    v = sub.add_parser("validate", help="Great Expectations gate over pseudo-label shards; failing shards are excluded from training")
    v.add_argument("--src", required=True, help="URI holding pseudo/<generator>/")
    v.add_argument("--generator", default="maskfree", choices=("maskfree", "grounded"))
    v.add_argument("--strict", action="store_true", help="exit 3 when any shard fails")
    v.set_defaults(func=cmd_validate)
