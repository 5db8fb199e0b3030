"""What data the pipeline holds, read from the stages' manifests: shards per stage with counts, quarantine
reasons, GX status and the trend across runs (``ovtasks status`` and the UI's Datasets tab)."""

from __future__ import annotations

import json
from collections import Counter

from ovtasks.core import history
from ovtasks.core.config import Settings
from ovtasks.core.storage import open_store


class NotFound(LookupError):
    pass


def pipeline_uris(settings: Settings) -> dict[str, str]:
    return settings.pipeline.resolved(settings.data_dir)


def read_json(store, key: str) -> dict | None:
    """A stored JSON object; None when missing, unreadable or not an object (a list, a number)."""
    try:
        doc = json.loads(store.get_bytes(key)) if store.exists(key) else None
    except (ValueError, OSError):
        return None
    return doc if isinstance(doc, dict) else None


def as_count(v) -> int | None:
    """A count as the page shows it: a non-negative integer or nothing (a manifest is input, not trusted)."""
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def as_dict(v) -> dict:
    return v if isinstance(v, dict) else {}


def reason_counts(q) -> dict[str, int]:
    return {str(k)[:64]: n for k, n in as_dict(q).items() if as_count(n) is not None}


def check_generator(generator: str) -> str:
    if generator not in ("maskfree", "grounded"):
        raise NotFound(f"unknown generator {generator!r}")
    return generator


def datasets(settings: Settings, generator: str | None = None) -> dict:
    """Shards per stage with counts, quarantine reasons, GX status per shard, and the trend across runs."""
    u, gen = pipeline_uris(settings), check_generator(generator or settings.pipeline.generator)
    source, clean, pseudo = (open_store(u[k], settings.s3) for k in ("source", "clean", "pseudo"))
    source_shards = sorted(k.rsplit("/", 1)[-1][:-4] for k in source.list("") if k.endswith(".tar") and "/" not in k)
    rows: dict[str, dict] = {s: {"shard": s, "source": True} for s in source_shards}
    reasons: Counter = Counter()
    for key in clean.list("shards/"):
        if not key.endswith(".manifest.json"):
            continue
        m = read_json(clean, key) or {}
        shard = key.rsplit("/", 1)[-1][: -len(".manifest.json")]
        c = as_dict(m.get("counts"))
        q = reason_counts(c.get("quarantined"))
        reasons.update(q)
        rows.setdefault(shard, {"shard": shard, "source": False}).update(
            ingest={"seen": as_count(c.get("seen")), "kept": as_count(c.get("kept")), "quarantined": sum(q.values()), "reasons": q,
                    "status": "failed" if m.get("error") or m.get("status") != "complete" else "complete"})
    prefix = f"pseudo/{gen}"
    for key in pseudo.list(prefix + "/"):
        name = key.rsplit("/", 1)[-1]
        if "/" in key[len(prefix) + 1:] or not name.endswith(".manifest.json"):
            continue
        m = read_json(pseudo, key) or {}
        shard = name[: -len(".manifest.json")]
        c = as_dict(m.get("counts"))
        rows.setdefault(shard, {"shard": shard, "source": False})["pseudo"] = {
            "status": "complete" if m.get("status") == "complete" else "partial" if m else None,
            **{k: as_count(c.get(k)) for k in ("images", "labelled", "annotations", "quarantined")}}
    gx = read_json(pseudo, f"{prefix}/validation_report.json")
    for e in (gx or {}).get("shards", []) if isinstance((gx or {}).get("shards"), list) else []:
        if not isinstance(e, dict) or not isinstance(e.get("shard"), str):
            continue
        rows.setdefault(e["shard"], {"shard": e["shard"], "source": False})["gx"] = {
            "status": "passed" if e.get("success") is True else "failed",
            "reasons": [str(r)[:500] for r in e.get("reasons", [])] if isinstance(e.get("reasons"), list) else [],
            "data_docs": as_dict(e.get("data_docs"))}
    shards = [rows[k] for k in sorted(rows)]
    stages = {"source": len(source_shards), "clean": sum(1 for r in shards if r.get("ingest", {}).get("status") == "complete"),
              "pseudo_labelled": sum(1 for r in shards if (r.get("pseudo") or {}).get("status") == "complete"),
              "gx_passed": sum(1 for r in shards if (r.get("gx") or {}).get("status") == "passed"),
              "gx_failed": sum(1 for r in shards if (r.get("gx") or {}).get("status") == "failed")}
    totals = {"seen": sum((r.get("ingest") or {}).get("seen") or 0 for r in shards),
              "kept": sum((r.get("ingest") or {}).get("kept") or 0 for r in shards),
              "annotations": sum((r.get("pseudo") or {}).get("annotations") or 0 for r in shards)}
    trend = {"ingest": history.load(clean, "ingest"), "pseudo_label": history.load(pseudo, "pseudo_label"),
             "validate": history.load(pseudo, "validate")}
    return {"generator": gen, "uris": {k: u[k] for k in ("source", "clean", "pseudo")}, "stages": stages, "totals": totals,
            "quarantine_reasons": dict(reasons.most_common()), "shards": shards, "trend": trend}
