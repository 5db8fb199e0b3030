"""What data the pipeline holds: shards per stage with counts, quarantine reasons, GX status and the trend
across runs (``ovtasks status`` and the UI's Datasets tab), served from the summary index
(:mod:`ovtasks.data.summary_index`) whose rows this module builds from the stages' manifests."""

from __future__ import annotations

import json
from collections import Counter
from typing import Callable

from ovtasks.core import history
from ovtasks.core.config import Settings
from ovtasks.core.storage import open_store
from ovtasks.data.summary_index import (GalleryCounts, chunk_of, gallery_aggregate, gallery_index, gx_aggregate, gx_index,
                                        ingest_aggregate, ingest_index, pseudo_aggregate, pseudo_index, split_pseudo_rows,
                                        write_pseudo)


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


# ---- one row per shard and stage, from the manifests (the index's rows; also the fallback without one) ----


def ingest_row(m: dict) -> dict:
    c = as_dict(m.get("counts"))
    q = reason_counts(c.get("quarantined"))
    return {"seen": as_count(c.get("seen")), "kept": as_count(c.get("kept")), "quarantined": sum(q.values()), "reasons": q,
            "status": "failed" if m.get("error") or m.get("status") != "complete" else "complete"}


def pseudo_row(m: dict, coco: Callable[[], dict] | None) -> dict:
    """``coco()`` reads the shard JSON, only for a complete manifest without recorded gallery counts; without
    ``coco`` the row has no gallery counts (the Datasets page does not need them)."""
    c = as_dict(m.get("counts"))
    status = "complete" if m.get("status") == "complete" else "partial" if m else None
    row = {"status": status, **{k: as_count(c.get(k)) for k in ("images", "labelled", "annotations", "quarantined")}}
    if status == "complete" and coco is not None:
        gallery = m.get("gallery")
        if not isinstance(gallery, dict):
            try:
                gallery = GalleryCounts.from_coco(coco())
            except (ValueError, OSError, KeyError, TypeError, AttributeError):
                gallery = {}
        row["gallery"] = gallery
    return row


def gx_rows(report: dict | None) -> dict[str, dict]:
    rows = {}
    for e in (report or {}).get("shards", []) if isinstance((report or {}).get("shards"), list) else []:
        if not isinstance(e, dict) or not isinstance(e.get("shard"), str):
            continue
        rows[e["shard"]] = {"status": "passed" if e.get("success") is True else "failed",
                            "reasons": [str(r)[:500] for r in e.get("reasons", [])] if isinstance(e.get("reasons"), list) else [],
                            "data_docs": as_dict(e.get("data_docs"))}
    return rows


def manifest_names(store, prefix: str) -> list[str]:
    """Sorted shard names of ``<prefix>/<shard>.manifest.json`` (directly under ``prefix``, not a sibling or sub-folder)."""
    return sorted(k.rsplit("/", 1)[-1][: -len(".manifest.json")] for k in store.list(prefix + "/")
                  if k.endswith(".manifest.json") and "/" not in k[len(prefix) + 1:])


def scan_ingest(clean) -> dict[str, dict]:
    return {shard: ingest_row(read_json(clean, f"shards/{shard}.manifest.json") or {}) for shard in manifest_names(clean, "shards")}


def scan_pseudo(pseudo, generator: str, gallery: bool = True) -> dict[str, dict]:
    prefix = f"pseudo/{generator}"

    def coco(shard: str) -> Callable[[], dict] | None:
        return (lambda: json.loads(pseudo.get_bytes(f"{prefix}/{shard}.json"))) if gallery else None

    return {shard: pseudo_row(read_json(pseudo, f"{prefix}/{shard}.manifest.json") or {}, coco(shard))
            for shard in manifest_names(pseudo, prefix)}


def source_shards(settings: Settings) -> list[str]:
    source = open_store(pipeline_uris(settings)["source"], settings.s3)
    return sorted(k.rsplit("/", 1)[-1][:-4] for k in source.list("") if k.endswith(".tar") and "/" not in k)


# ---- writers: the stages and ``ovtasks index rebuild`` ------------------------------------------------


def record_ingest(clean, shards: list[str], source_count: int | None = None) -> None:
    """After an ingest run: its shards' rows (a shard left without a manifest leaves the index)."""
    rows = {}
    for shard in shards:
        key = f"shards/{shard}.manifest.json"
        rows[shard] = ingest_row(read_json(clean, key) or {}) if clean.exists(key) else None
    ingest_index(clean).update(rows, None if source_count is None else {"source_shards": source_count})


def record_pseudo(pseudo, generator: str) -> None:
    write_pseudo(pseudo, generator, scan_pseudo(pseudo, generator))


def record_gx(pseudo, generator: str, report: dict) -> None:
    gx_index(pseudo, generator).replace(gx_rows(report))


def rebuild(settings: Settings, generators: tuple[str, ...] = ("maskfree", "grounded")) -> dict:
    """Every index rewritten from the manifests (``ovtasks index rebuild``); returns the row counts."""
    u = pipeline_uris(settings)
    clean, pseudo = open_store(u["clean"], settings.s3), open_store(u["pseudo"], settings.s3)
    rows = scan_ingest(clean)
    ingest_index(clean).replace(rows, {"source_shards": len(source_shards(settings))})
    out = {"ingest": len(rows)}
    for gen in generators:
        record_pseudo(pseudo, gen)
        record_gx(pseudo, gen, read_json(pseudo, f"pseudo/{gen}/validation_report.json"))
        out[f"pseudo/{gen}"] = sum(v["rows"] for v in pseudo_index(pseudo, gen).summary()["chunks"].values())
        out[f"gx/{gen}"] = sum(v["rows"] for v in gx_index(pseudo, gen).summary()["chunks"].values())
    return out


# ---- readers --------------------------------------------------------------------------------------------


class _InMemory:
    """A StageIndex's reading side over rows scanned from the manifests (when the store has no index)."""

    def __init__(self, rows: dict[str, dict], aggregate, extra: dict | None = None):
        self._chunks: dict[str, dict[str, dict]] = {}
        for shard, row in rows.items():
            self._chunks.setdefault(chunk_of(shard), {})[shard] = row
        self._summary = {"chunks": {c: aggregate(r) for c, r in sorted(self._chunks.items())}, "extra": extra or {}}

    def summary(self) -> dict:
        return self._summary

    def chunk(self, chunk: str) -> dict[str, dict]:
        return self._chunks.get(chunk, {})


def pseudo_stage(settings: Settings, generator: str, part: str = "pseudo"):
    """The pseudo-label index, or with ``part="gallery"`` the Gallery's, and whether it was missing (then an
    in-memory scan of the manifests stands in)."""
    pseudo = open_store(pipeline_uris(settings)["pseudo"], settings.s3)
    index = pseudo_index(pseudo, generator) if part == "pseudo" else gallery_index(pseudo, generator)
    if index.summary() is None:
        lean, gallery = split_pseudo_rows(scan_pseudo(pseudo, generator, gallery=part == "gallery"))
        return (_InMemory(lean, pseudo_aggregate) if part == "pseudo" else _InMemory(gallery, gallery_aggregate)), True
    return index, False


def stage_indexes(settings: Settings, generator: str) -> tuple[dict, list[str]]:
    """The three stages' indexes (an in-memory scan where the store has none) and the names of those missing."""
    u = pipeline_uris(settings)
    clean, pseudo = open_store(u["clean"], settings.s3), open_store(u["pseudo"], settings.s3)
    out, missing = {}, []
    ing = ingest_index(clean)
    if ing.summary() is None:
        missing.append("ingest")
        ing = _InMemory(scan_ingest(clean), ingest_aggregate, {"source_shards": len(source_shards(settings))})
    out["ingest"] = ing
    out["pseudo"], pseudo_missing = pseudo_stage(settings, generator)
    if pseudo_missing:
        missing.append(f"pseudo/{generator}")
    gx = gx_index(pseudo, generator)
    if gx.summary() is None:
        missing.append(f"gx/{generator}")
        gx = _InMemory(gx_rows(read_json(pseudo, f"pseudo/{generator}/validation_report.json")), gx_aggregate)
    out["gx"] = gx
    return out, missing


def _total(summary: dict, key: str) -> int:
    return sum(int(a.get(key) or 0) for a in summary["chunks"].values())


def datasets(settings: Settings, generator: str | None = None, page: int = 1, per_page: int | None = None) -> dict:
    """Stage counts, totals, quarantine reasons and the trend, and one page of the shard table (every shard
    ingest published, with its pseudo-label and GX columns), from the summary index."""
    u, gen = pipeline_uris(settings), check_generator(generator or settings.pipeline.generator)
    per_page = max(1, min(per_page or settings.ui.page_size_max, settings.ui.page_size_max))
    page = max(1, page)
    idx, missing = stage_indexes(settings, gen)
    ing, ps, gx = (idx[k].summary() for k in ("ingest", "pseudo", "gx"))
    reasons: Counter = Counter()
    for a in ing["chunks"].values():
        reasons.update(reason_counts(a.get("reasons")))
    total_shards = _total(ing, "rows")
    start, stop, seen, shards = (page - 1) * per_page, page * per_page, 0, []
    for c, agg in ing["chunks"].items():
        n = int(agg.get("rows") or 0)
        if seen + n > start and seen < stop:
            rows, prow, grow = idx["ingest"].chunk(c), idx["pseudo"].chunk(c), idx["gx"].chunk(c)
            for shard in sorted(rows):
                if start <= seen < stop:
                    r = {"shard": shard, "source": True, "ingest": rows[shard]}
                    if shard in prow:
                        r["pseudo"] = prow[shard]
                    if shard in grow:
                        r["gx"] = grow[shard]
                    shards.append(r)
                seen += 1
        else:
            seen += n
        if seen >= stop:
            break
    clean, pseudo = open_store(u["clean"], settings.s3), open_store(u["pseudo"], settings.s3)
    stages = {"source": int(ing.get("extra", {}).get("source_shards") or 0), "clean": _total(ing, "complete"),
              "pseudo_labelled": _total(ps, "complete"), "gx_passed": _total(gx, "passed"), "gx_failed": _total(gx, "failed")}
    totals = {"seen": _total(ing, "seen"), "kept": _total(ing, "kept"), "annotations": _total(ps, "annotations")}
    trend = {"ingest": history.load(clean, "ingest"), "pseudo_label": history.load(pseudo, "pseudo_label"),
             "validate": history.load(pseudo, "validate")}
    return {"generator": gen, "uris": {k: u[k] for k in ("source", "clean", "pseudo")}, "stages": stages, "totals": totals,
            "quarantine_reasons": dict(reasons.most_common()), "shards": shards, "page": page, "per_page": per_page,
            "total_shards": total_shards, "pages": (total_shards + per_page - 1) // per_page,
            "index": "complete" if not missing else f"missing for {', '.join(missing)}: read from the manifests "
                                                     f"(slow with many shards); run `ovtasks index rebuild`",
            "trend": trend}
