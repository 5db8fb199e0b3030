"""What the command groups share: progress bars, tables, setting overrides."""

from __future__ import annotations

import argparse
from typing import Callable

from ovtasks.core.config import Settings


def progress_factory(enabled: bool) -> Callable[[str, int], Callable[[], None]] | None:
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


def print_table(rows: list[tuple[str, str]], title: str) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}")
    print("-" * (width + 24))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def report_rows(report: dict) -> list[tuple[str, str]]:
    rows = [("shards", f"{len(report['shards'])} ({report['failed_shards']} failed)"),
            ("seen", str(report["seen"])), ("kept", str(report["kept"]))]
    rows += [(f"quarantined: {k}", str(v)) for k, v in report["quarantined"].items()]
    return rows


def with_overrides(settings: Settings, section: str, **values) -> Settings:
    """A copy of ``settings`` with ``section`` fields replaced (None values are ignored)."""
    values = {k: v for k, v in values.items() if v is not None}
    if not values:
        return settings
    merged = getattr(settings, section).model_copy(update=values)
    return settings.model_copy(update={section: type(merged).model_validate(merged.model_dump())})


def print_progress(step: int, rec: dict) -> None:
    print("  " + "  ".join(f"{k}={v}" for k, v in rec.items()), flush=True)


def on_device(args: argparse.Namespace, settings: Settings) -> Settings:
    return settings.model_copy(update={"device": args.device}) if args.device else settings


def report_trained(result, title: str) -> int:
    print_table([(k, str(v)) for k, v in result.metrics.items()], title)
    print(f"\nmodel: {result.model_uri}")
    return 0
