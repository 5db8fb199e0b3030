"""Run history for trends: each stage run leaves one small summary object, ``history/<stage>/<UTC time>-<id>.json``
in the store it wrote to (never overwritten, so concurrent runs cannot lose each other's entry)."""

from __future__ import annotations

import json
import time
import uuid

from ovtasks.core.storage import Store

KEEP = {"ingest": ("seen", "kept", "quarantined", "failed_shards", "run"),
        "pseudo_label": ("generator", "images", "annotations", "candidates", "quarantined", "skipped", "missing"),
        "validate": ("generator", "passed", "failed", "excluded")}


def record(store: Store, stage: str, report: dict) -> str:
    """Write the summary of ``report`` (the fields of KEEP[stage]) and return its key."""
    now = time.time()
    entry = {"stage": stage, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
             **{k: report.get(k) for k in KEEP[stage] if k in report}}
    key = f"history/{stage}/{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}{int(now % 1 * 1000):03d}Z-{uuid.uuid4().hex[:8]}.json"
    store.put_bytes(key, json.dumps(entry, sort_keys=True).encode())
    return key


def load(store: Store, stage: str, limit: int = 100) -> list[dict]:
    """The newest ``limit`` entries of ``stage``, oldest first; an unreadable entry is skipped, not fatal."""
    keys = sorted(k for k in store.list(f"history/{stage}/") if k.endswith(".json"))[-limit:]
    out = []
    for k in keys:
        try:
            out.append(json.loads(store.get_bytes(k)))
        except (ValueError, OSError):
            continue
    return out
