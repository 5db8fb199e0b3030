"""``ovtasks`` command line: one sub-command per pipeline stage, plus ``demo`` and ``config``.

Configuration is parsed once here (``--config`` YAML + ``OVTASKS_*`` environment) and passed down.
Exit codes: 0 success, 1 a shard failed (details in the report), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

from ovtasks import __version__
from ovtasks.config import ConfigError, Settings, load_settings


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
    from ovtasks.synth import SynthSpec, generate

    spec = SynthSpec(seed=args.seed, shards=args.shards, images_per_shard=args.images_per_shard,
                     image_size=args.image_size or settings.synth.image_size,
                     failure_rate=settings.synth.failure_rate if args.failure_rate is None else args.failure_rate)
    progress = _progress_factory(sys.stderr.isatty())
    tick = progress("synth", spec.shards) if progress else None
    summary = generate(spec, args.out, settings, workers=args.workers or settings.workers, progress=(lambda n: tick()) if tick else None)
    print(json.dumps(summary, indent=2))
    return 0


def _report_rows(report: dict) -> list[tuple[str, str]]:
    rows = [("shards", f"{len(report['shards'])} ({report['failed_shards']} failed)"),
            ("seen", str(report["seen"])), ("kept", str(report["kept"]))]
    rows += [(f"quarantined: {k}", str(v)) for k, v in report["quarantined"].items()]
    return rows


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    from ovtasks.ingest import ingest

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


def cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    print(json.dumps(settings.model_dump(mode="json"), indent=2, default=str))
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from ovtasks.demo import run_demo

    return run_demo(args.out or str(settings.data_dir / "demo"), settings, shards=args.shards,
                    images_per_shard=args.images_per_shard, seed=args.seed, workers=args.workers)


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

    i = sub.add_parser("ingest", help="filter and normalise img2dataset shards into clean webdataset shards")
    i.add_argument("--src", required=True, help="URI holding NNNNN.tar (+ .parquet) shards")
    i.add_argument("--out", required=True, help="output URI for shards/, quarantine/ and ingest_report.json")
    i.add_argument("--workers", type=int, default=None, help="processes (default from config)")
    i.set_defaults(func=cmd_ingest)

    d = sub.add_parser("demo", help="run the pipeline end to end on embedded defaults and print where results are")
    d.add_argument("--out", default=None, help="default: <data_dir>/demo")
    d.add_argument("--shards", type=int, default=4)
    d.add_argument("--images-per-shard", type=int, default=64)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--workers", type=int, default=None)
    d.set_defaults(func=cmd_demo)

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
    from ovtasks.logs import setup_logging

    setup_logging(settings.log_format)
    try:
        return args.func(args, settings)
    except (FileNotFoundError, ValueError) as exc:
        print(f"ovtasks {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
