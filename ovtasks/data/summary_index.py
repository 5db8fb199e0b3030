"""The summary index: what the stages published, kept small so that the UI's Datasets and Gallery pages and
``ovtasks status`` answer in a time that does not grow with the number of shards.

One index per stage, in the store the stage writes to::

    clean:  index/ingest/summary.json          per chunk: row count and aggregates (+ the source shard count)
            index/ingest/chunks/c-<chunk>.json  one row per shard of that chunk
    pseudo: index/pseudo/<generator>/...        pseudo-label rows (status and counts)
            index/gallery/<generator>/...       the Gallery's score histograms of the complete shards
            index/gx/<generator>/...            GX verdict rows

A shard's chunk is its name without the last three characters (``01234`` → ``01``), so a chunk holds at most
a thousand numbered shards and chunks sort as their shards do. Every object is rewritten whole (one PUT,
atomic in S3 and on local disk): a chunk first, then the summary. Writers: ingest (its run's shards, merged
into their chunks), pseudo-label's finalize and validate (every shard; they read every manifest anyway). The
DAGs run one at a time (``max_active_runs=1``), so each index has one writer at a time. An index that is lost
or stale is rebuilt from the manifests by ``ovtasks index rebuild``; a reader that finds no index builds the
rows in memory from the manifests (the old cost, said in the answer's ``index`` field).

Gallery counts are exact on a grid of score thresholds ``k / 20``: per category (and ``*`` for any), how many
images have an annotation at or above each threshold, and how many annotations are. The Gallery applies its
``min_score`` rounded up to that grid.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Callable, Iterable

from ovtasks.core.storage import Store

GRID = 20
THRESHOLDS = [k / GRID for k in range(GRID + 1)]
ANY = "*"


def chunk_of(shard: str) -> str:
    return shard[:-3]


def grid_index(min_score: float) -> int:
    """The first grid threshold at or above ``min_score`` (the Gallery's filter, rounded up)."""
    return max(0, min(GRID, math.ceil(min_score * GRID - 1e-6)))  # 0.15 * 20 = 3.0000000000000004 is 3


class GalleryCounts:
    """Per category: images with an annotation at or above each threshold, and annotations at or above it."""

    def __init__(self):
        self.images: dict[str, list[int]] = {}
        self.annotations: dict[str, list[int]] = {}

    def add_image(self, anns: Iterable[tuple[str, float]]) -> None:
        """One image's annotations as (category, score)."""
        best: dict[str, float] = {}
        for cat, score in anns:
            row = self.annotations.setdefault(cat, [0] * (GRID + 1))
            for k, t in enumerate(THRESHOLDS):
                if score >= t:
                    row[k] += 1
            best[cat] = max(best.get(cat, -1.0), score)
        if best:
            best[ANY] = max(best.values())
        for cat, score in best.items():
            row = self.images.setdefault(cat, [0] * (GRID + 1))
            for k, t in enumerate(THRESHOLDS):
                if score >= t:
                    row[k] += 1

    def add_coco(self, coco: dict) -> None:
        """Every image of a COCO document (a pseudo-label shard or one chunk of it), named as the Gallery names
        categories (``category_name``, else the id)."""
        per_image: dict[int, list[tuple[str, float]]] = {im["id"]: [] for im in coco.get("images", [])}
        for a in coco.get("annotations", []):
            if a.get("image_id") in per_image:
                per_image[a["image_id"]].append((a.get("category_name", str(a.get("category_id"))), float(a.get("score", 0.0))))
        for image_id in sorted(per_image):
            self.add_image(per_image[image_id])

    def as_dict(self) -> dict:
        return {"images": dict(sorted(self.images.items())), "annotations": dict(sorted(self.annotations.items()))}

    @staticmethod
    def from_coco(coco: dict) -> dict:
        """The counts of a whole pseudo-label shard JSON (for manifests written before they recorded them)."""
        g = GalleryCounts()
        g.add_coco(coco)
        return g.as_dict()


def add_counts(into: dict, counts: dict) -> None:
    """Sum ``counts`` ({"images": {cat: [..]}, "annotations": {...}}) into ``into``."""
    for part in ("images", "annotations"):
        dst = into.setdefault(part, {})
        for cat, row in (counts.get(part) or {}).items():
            acc = dst.setdefault(cat, [0] * (GRID + 1))
            for k, v in enumerate(row[: GRID + 1]):
                acc[k] += int(v)


# ---- what a chunk's summary entry holds, per stage ------------------------------------------------------


def ingest_aggregate(rows: dict[str, dict]) -> dict:
    reasons: Counter = Counter()
    for r in rows.values():
        reasons.update(r.get("reasons") or {})
    return {"rows": len(rows), "complete": sum(1 for r in rows.values() if r.get("status") == "complete"),
            "seen": sum(r.get("seen") or 0 for r in rows.values()), "kept": sum(r.get("kept") or 0 for r in rows.values()),
            "reasons": dict(reasons)}


def pseudo_aggregate(rows: dict[str, dict]) -> dict:
    return {"rows": len(rows), "complete": sum(1 for r in rows.values() if r.get("status") == "complete"),
            "annotations": sum(r.get("annotations") or 0 for r in rows.values())}


def gallery_aggregate(rows: dict[str, dict]) -> dict:
    gallery: dict = {}
    for counts in rows.values():
        add_counts(gallery, counts)
    return {"rows": len(rows), "gallery": gallery}


def gx_aggregate(rows: dict[str, dict]) -> dict:
    return {"rows": len(rows), "passed": sum(1 for r in rows.values() if r.get("status") == "passed"),
            "failed": sum(1 for r in rows.values() if r.get("status") == "failed")}


class StageIndex:
    """One stage's index under ``root`` in ``store``: a summary and one object per chunk."""

    def __init__(self, store: Store, root: str, aggregate: Callable[[dict[str, dict]], dict]):
        self.store, self.root, self.aggregate = store, root.rstrip("/"), aggregate

    @property
    def summary_key(self) -> str:
        return f"{self.root}/summary.json"

    def chunk_key(self, chunk: str) -> str:
        return f"{self.root}/chunks/c-{chunk}.json"

    def _get(self, key: str) -> dict | None:
        try:
            doc = json.loads(self.store.get_bytes(key)) if self.store.exists(key) else None
        except (ValueError, OSError):
            return None
        return doc if isinstance(doc, dict) else None

    def summary(self) -> dict | None:
        """``{"chunks": {chunk: aggregate}, "extra": {...}}`` or None when there is no (readable) index."""
        doc = self._get(self.summary_key)
        return doc if doc and isinstance(doc.get("chunks"), dict) else None

    def chunk(self, chunk: str) -> dict[str, dict]:
        doc = self._get(self.chunk_key(chunk))
        rows = (doc or {}).get("rows")
        return rows if isinstance(rows, dict) else {}

    def _write(self, chunks: dict[str, dict[str, dict]], summary: dict) -> None:
        for c, rows in chunks.items():
            if rows:
                self.store.put_bytes(self.chunk_key(c), json.dumps({"rows": dict(sorted(rows.items()))}, sort_keys=True).encode())
            else:
                self.store.delete(self.chunk_key(c))
                summary["chunks"].pop(c, None)
                continue
            summary["chunks"][c] = self.aggregate(rows)
        summary["chunks"] = dict(sorted(summary["chunks"].items()))
        self.store.put_bytes(self.summary_key, json.dumps(summary, sort_keys=True).encode())

    def update(self, rows: dict[str, dict | None], extra: dict | None = None) -> None:
        """Merge ``rows`` (None removes a shard) into their chunks; the summary is rewritten last. A missing
        summary is not rebuilt here (that is ``ovtasks index rebuild``): the update starts one from these rows."""
        summary = self.summary() or {"chunks": {}, "extra": {}}
        summary.setdefault("extra", {}).update(extra or {})
        touched: dict[str, dict[str, dict]] = {}
        for shard, row in sorted(rows.items()):
            c = chunk_of(shard)
            if c not in touched:
                touched[c] = self.chunk(c)
            if row is None:
                touched[c].pop(shard, None)
            else:
                touched[c][shard] = row
        self._write(touched, summary)

    def replace(self, rows: dict[str, dict], extra: dict | None = None) -> None:
        """Exactly these rows: chunks no longer present are removed."""
        old = self.summary() or {"chunks": {}, "extra": {}}
        chunks: dict[str, dict[str, dict]] = {c: {} for c in old["chunks"]}
        for shard, row in rows.items():
            chunks.setdefault(chunk_of(shard), {})[shard] = row
        self._write(chunks, {"chunks": {}, "extra": {**(old.get("extra") or {}), **(extra or {})}})


def ingest_index(clean: Store) -> StageIndex:
    return StageIndex(clean, "index/ingest", ingest_aggregate)


def pseudo_index(pseudo: Store, generator: str) -> StageIndex:
    return StageIndex(pseudo, f"index/pseudo/{generator}", pseudo_aggregate)


def gallery_index(pseudo: Store, generator: str) -> StageIndex:
    return StageIndex(pseudo, f"index/gallery/{generator}", gallery_aggregate)


def gx_index(pseudo: Store, generator: str) -> StageIndex:
    return StageIndex(pseudo, f"index/gx/{generator}", gx_aggregate)


def split_pseudo_rows(rows: dict[str, dict]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Pseudo-label rows as built from manifests → (the Datasets rows, the Gallery's counts of complete shards):
    two indexes, so that a Datasets page never reads the score histograms."""
    lean = {s: {k: v for k, v in r.items() if k != "gallery"} for s, r in rows.items()}
    gallery = {s: r["gallery"] for s, r in rows.items() if r.get("status") == "complete" and isinstance(r.get("gallery"), dict)}
    return lean, gallery


def write_pseudo(pseudo: Store, generator: str, rows: dict[str, dict]) -> None:
    """Replace the pseudo-label and gallery indexes with ``rows`` (pseudo-label's finalize, the rebuild)."""
    lean, gallery = split_pseudo_rows(rows)
    gallery_index(pseudo, generator).replace(gallery)
    pseudo_index(pseudo, generator).replace(lean)
