"""Ingest stage: img2dataset / LAION shards in, clean webdataset shards + quarantine out.

Three phases, so that near-duplicate removal is global yet the output is deterministic:

1. ``stage_shard`` (one process per shard): stream the tar, check every sample (caption, safety,
   language, full decode, size/aspect), normalise images to RGB JPEG, hash them; write kept and
   rejected samples to local staging tars.
2. ``CrossShardDedup`` (main process): walk staged hashes in shard/key order; a sample within the
   Hamming distance of an earlier kept one (in an earlier shard; in-shard ones are caught in 1) is
   a near duplicate. Shard k is decided as soon as shards 0..k are staged.
3. ``publish_shard`` (a thread of the main process per shard, two at a time: it waits on the disk or the
   store while the workers decode the next shards): remove the old manifest, write the clean shard, the
   quarantine tar and index, then the manifest last (counts, checksums, config hash, code version).

Output layout under ``out``::

    shards/00000.tar              clean webdataset shard (<key>.jpg/.txt/.json)
    shards/00000.manifest.json    written last: the shard is complete when it exists
    quarantine/00000.tar          every rejected sample's original members + <key>.reason.json
    quarantine/00000.jsonl        one line per rejected sample: key, reason, detail
    ingest_report.json            {"seen", "kept", "quarantined": {reason: n}, "shards": [...]}

Invariant, per shard and in total: ``seen == kept + sum(quarantined.values())``.
"""

from __future__ import annotations

import hashlib
import io
import importlib
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import threading
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

from ovtasks import __version__

from ovtasks.core import history
from ovtasks.core.config import IngestConfig, Settings
from ovtasks.data.clean import image_id
from ovtasks.data.catalog import record_ingest
from ovtasks.core.imaging import ImageRejected, NearDuplicateIndex, decode_image, phash64
from ovtasks.ingest.langid import detect_language, is_english, load_model as load_language_model
from ovtasks.core.shards import (
    IMAGE_EXTS,
    TAR_TRAILER,
    RawSample,
    ShardReadError,
    ShardWriter,
    dumps_json,
    iter_tar_samples,
    normalise_metadata,
    read_parquet_metadata,
)
from ovtasks.core.storage import Store, open_store

log = logging.getLogger(__name__)

SHARD_RE = re.compile(r"(?P<name>[^/\x00-\x1f\x7f]+)\.tar")  # used with fullmatch: "00000.tar\n" is no shard

# Stable quarantine reason codes (the report and tests use them verbatim).
REASONS = (
    "unsafe_member_path", "unsafe_member_type", "duplicate_key", "truncated_tar", "unreadable_tar",
    "missing_image", "image_too_large", "download_failed", "missing_caption", "caption_not_utf8",
    "caption_too_long", "empty_caption", "punsafe", "missing_punsafe", "watermark", "non_english",
    "empty_image", "undecodable_image", "truncated_image", "decompression_bomb", "animated_image",
    "too_small", "bad_aspect_ratio", "near_duplicate",
    "oversized_tar_header", "malformed_tar_header", "metadata_too_large", "bad_metadata", "check_failed", "duplicate_image_id",
)
MAX_JSON_BYTES = 1 << 20  # a sample's .json metadata member
MAX_INDEX_KEY_CHARS = 256  # a key longer than this is shortened in the quarantine index (with its length)


@dataclass(frozen=True)
class Verdict:
    key: str
    reason: str | None  # None: kept
    detail: str = ""
    members: dict[str, bytes] = field(default_factory=dict)  # published (kept) or original (rejected)
    phash: int | None = None


@dataclass
class ShardStage:
    """Result of phase 1 for one shard; small enough to pass between processes."""

    name: str
    status: str = "ok"  # ok | failed
    error: str | None = None
    seen: int = 0
    quarantined: Counter = field(default_factory=Counter)
    kept: list[tuple[str, int]] = field(default_factory=list)  # (key, phash), in shard order
    kept_ends: list[int] = field(default_factory=list)  # where each kept sample's members end in the staged tar
    source_sha256: str = ""
    source_bytes: int = 0
    kept_path: str = ""
    rejected_path: str = ""
    kept_file: tuple[str, int] = ("", 0)  # (sha256, bytes) of the staged tars
    rejected_file: tuple[str, int] = ("", 0)
    rejected_index: list[dict] = field(default_factory=list)


class _HashingReader:
    """Forward-only reader that hashes what passes through (the source checksum in the manifest)."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self.sha = hashlib.sha256()
        self.bytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


_INVISIBLE = {cp: None for cp in (*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F, 0xAD, 0x200B, 0x200C, 0x200D,
                                  0x200E, 0x200F, 0x061C, *range(0x202A, 0x202F), *range(0x2066, 0x206A),
                                  0x2060, 0xFEFF)}
# control, soft-hyphen, zero-width, bidirectional marks / embeddings / overrides / isolates (U+200E-F, U+061C,
# U+202A-E, U+2066-9), BOM; tab/newline stay (whitespace)


def _caption(raw: RawSample, meta: dict, cfg: IngestConfig) -> tuple[str | None, str, str]:
    """(caption, reason, detail): caption None means rejected with reason. A caption is text: a list,
    dict, number or bool in the metadata is bad metadata, not a caption; invisible characters (controls,
    zero-width) are removed before the empty check."""
    if "txt" in raw.oversized:
        return None, "caption_too_long", f"{raw.oversized['txt']} bytes > {cfg.max_caption_bytes}"
    data = raw.members.get("txt")
    if data is not None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, "caption_not_utf8", str(exc)
    else:
        text = meta.get("caption")
        if text is None:
            return None, "missing_caption", "no .txt member and no TEXT/caption column"
        if not isinstance(text, str):
            return None, "bad_metadata", f"caption is a {type(text).__name__}, not text"
        if len(text.encode("utf-8")) > cfg.max_caption_bytes:
            return None, "caption_too_long", f"{len(text.encode('utf-8'))} bytes > {cfg.max_caption_bytes}"
    text = " ".join(text.translate(_INVISIBLE).split())
    if not text:
        return None, "empty_caption", "no visible character"
    return text, "", ""


def _score(meta: dict, name: str) -> float | None:
    """A finite float, or None when missing or unusable (bool, text, NaN, infinite)."""
    v = meta.get(name)
    if isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return None
    return f if math.isfinite(f) else None


def _probability(meta: dict, name: str) -> tuple[float | None, str]:
    """(value, problem): a present probability must be a finite number in [0, 1]; anything else is
    bad metadata (it would otherwise pass the filter as "missing")."""
    v = meta.get(name)
    if v is None:
        return None, ""
    f = _score(meta, name)
    if f is None or not 0.0 <= f <= 1.0:
        return None, f"{name}={str(v)[:40]!r} is not a probability"
    return f, ""


def check_sample(raw: RawSample, row: dict | None, cfg: IngestConfig) -> Verdict:
    """Apply every ingest filter to one sample, cheapest first; never raises for bad data."""
    def reject(reason: str, detail: str = "") -> Verdict:
        return Verdict(raw.key, reason, detail, dict(raw.members))

    for problem in ("oversized_tar_header", "malformed_tar_header", "unsafe_member_path", "unsafe_member_type", "duplicate_key",
                    "truncated_tar"):
        if problem in raw.problems:
            return reject(problem, f"tar member(s) of key {raw.key!r}")
    image_ext = next((e for e in IMAGE_EXTS if e in raw.members or e in raw.oversized), None)
    if image_ext is None:
        return reject("missing_image", f"members: {sorted(raw.members)}")
    if image_ext in raw.oversized:
        return reject("image_too_large", f"{raw.oversized[image_ext]} bytes > {cfg.max_image_bytes}")
    meta: dict = {}
    if "json" in raw.oversized:  # its punsafe / status would otherwise never be read
        return reject("metadata_too_large", f".json of {raw.oversized['json']} bytes > {MAX_JSON_BYTES}")
    if "json" in raw.members:
        try:
            loaded = json.loads(raw.members["json"])
            meta = normalise_metadata(loaded) if isinstance(loaded, dict) else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = {}
    if row:
        meta.update({k: v for k, v in row.items() if v is not None})
    status = meta.get("status")
    if status not in (None, "success"):
        return reject("download_failed", f"status={status!r}")
    caption, reason, detail = _caption(raw, meta, cfg)
    if caption is None:
        return reject(reason, detail)
    punsafe, problem = _probability(meta, "punsafe")
    pwatermark, problem2 = _probability(meta, "pwatermark")
    if problem or problem2:
        return reject("bad_metadata", problem or problem2)
    if cfg.punsafe_max is not None:
        if punsafe is None and not cfg.keep_missing_punsafe:
            return reject("missing_punsafe")
        if punsafe is not None and punsafe > cfg.punsafe_max:
            return reject("punsafe", f"{punsafe:.3f} > {cfg.punsafe_max}")
    if cfg.pwatermark_max is not None and pwatermark is not None and pwatermark > cfg.pwatermark_max:
        return reject("watermark", f"{pwatermark:.3f} > {cfg.pwatermark_max}")
    guess = detect_language(caption)
    if cfg.require_english and not is_english(guess, cfg.english_min_score, cfg.other_language_min_score):
        return reject("non_english", f"{guess.lang} p={guess.score:.2f}, en p={guess.english_score:.2f}")
    try:
        check_side = (cfg.check_view_side if cfg.dedup else 1) if cfg.scaled_decode else None
        decoded = decode_image(raw.members[image_ext], cfg, check_side=check_side)
    except ImageRejected as exc:
        return reject(exc.reason, exc.detail)
    w, h = decoded.size
    h64 = phash64(decoded.image) if cfg.dedup else None
    out_meta = {
        "key": raw.key,
        "url": meta.get("url"),
        "caption": caption,
        "width": w,
        "height": h,
        "similarity": _score(meta, "similarity"),
        "punsafe": punsafe,
        "pwatermark": pwatermark,
        "lang": guess.lang,
        "lang_score": round(guess.score, 4),
        "phash": f"{h64:016x}" if h64 is not None else None,
        "source_format": decoded.source_format,
        "source_mode": decoded.source_mode,
        "reencoded": decoded.reencoded,
        "sha256": hashlib.sha256(decoded.data).hexdigest(),
    }
    members = {"jpg": decoded.data, "txt": caption.encode("utf-8"), "json": dumps_json(out_meta)}
    return Verdict(raw.key, None, "", members, h64)


def _limits(cfg: IngestConfig) -> dict[str, int]:
    limits = {ext: cfg.max_image_bytes for ext in IMAGE_EXTS}
    limits["txt"] = cfg.max_caption_bytes
    limits["jpeg"] = cfg.max_image_bytes
    limits["json"] = MAX_JSON_BYTES
    return limits


def _reason_member(v: Verdict, shard: str) -> bytes:
    return dumps_json({"key": v.key, "shard": shard, "reason": v.reason, "detail": v.detail})


def stage_shard(src_uri: str, name: str, settings: Settings, staging_dir: str) -> ShardStage:
    """Phase 1 for shard ``name`` (``<name>.tar`` + optional ``<name>.parquet`` under ``src_uri``)."""
    cfg = settings.ingest
    store = open_store(src_uri, settings.s3)
    stage = ShardStage(name=name)
    stage.kept_path = os.path.join(staging_dir, f"{name}.kept.tar")
    stage.rejected_path = os.path.join(staging_dir, f"{name}.rejected.tar")
    rows: dict[str, dict] = {}
    if store.exists(f"{name}.parquet"):
        try:
            rows = read_parquet_metadata(store.get_bytes(f"{name}.parquet"), cfg.max_parquet_rows)
        except ValueError as exc:
            stage.status, stage.error = "failed", f"unreadable_parquet: {exc}"
            log.error("shard %s: %s", name, stage.error)
            return stage
    seen_keys: set[str] = set()
    local_dups = NearDuplicateIndex(cfg.dedup_max_distance)  # within this shard; across shards: phase 2
    kept_ids: dict[int, str] = {}  # COCO image id -> key of the kept sample (ids must be unique; across shards: phase 2)
    with open(stage.kept_path, "wb") as kf, open(stage.rejected_path, "wb") as rf, \
            ShardWriter(kf) as kept_w, ShardWriter(rf) as rej_w:

        def record(v: Verdict) -> None:
            stage.seen += 1
            if v.reason is None:
                ident = image_id(v.key)
                other = kept_ids.setdefault(ident, v.key)
                if other != v.key:
                    v = Verdict(v.key, "duplicate_image_id", f"image id {ident} is already {name}/{other}", v.members)
            if v.reason is None and v.phash is not None and cfg.dedup:
                original = local_dups.find_or_add(v.phash, v.key)
                if original is not None:
                    v = Verdict(v.key, "near_duplicate", f"near duplicate of {name}/{original}", v.members)
            if v.reason is None:
                kept_w.add(v.key, v.members)
                stage.kept.append((v.key, v.phash if v.phash is not None else -1))
                stage.kept_ends.append(kept_w.bytes)
            else:
                stage.quarantined[v.reason] += 1
                entry = {"key": _index_key(v.key), "reason": v.reason, "detail": v.detail[:2000]}
                stage.rejected_index.append(entry)
                if v.members:  # a sample absent from the tar has only its index line: nothing else to keep
                    rej_w.add(_safe_key(v.key, stage.seen), {**v.members, "reason.json": _reason_member(v, name)})

        row_for = _row_lookup(rows)
        try:
            with store.open_read(f"{name}.tar") as raw_stream:
                reader = _HashingReader(raw_stream)
                try:
                    for raw in iter_tar_samples(reader, _limits(cfg)):
                        row_key, row = row_for(raw.key)
                        seen_keys.add(row_key)
                        try:
                            verdict = check_sample(raw, row, cfg)
                        except Exception as exc:  # noqa: BLE001 - one sample's unforeseen failure never costs the shard
                            log.exception("shard %s: checking %r failed", name, raw.key[:MAX_INDEX_KEY_CHARS])
                            verdict = Verdict(raw.key, "check_failed", f"{type(exc).__name__}: {exc}", dict(raw.members))
                        record(verdict)
                    reader.drain()
                except ShardReadError as exc:
                    stage.status, stage.error = "failed", str(exc)
                    log.error("shard %s: %s", name, exc)
                    try:  # the manifest's source checksum covers the whole object, not what was read
                        reader.drain()
                    except Exception:  # noqa: BLE001 - the stream itself broke; the checksum says what was read
                        pass
                stage.source_sha256, stage.source_bytes = reader.sha.hexdigest(), reader.bytes
        except Exception as exc:  # store unreachable, object vanished: the shard fails, others go on
            stage.status, stage.error = "failed", f"unreadable_tar: {exc}"
            log.error("shard %s: %s", name, stage.error)
        # Parquet rows that said "success" but have no sample in the tar are not silently dropped.
        missing_reason = "truncated_tar" if stage.status == "failed" else "missing_image"
        for key, row in rows.items():
            if key not in seen_keys and row.get("status") in (None, "success"):
                record(Verdict(key, missing_reason, "listed in parquet, absent from tar", {}))
    stage.kept_file = (kept_w.sha.hexdigest(), kept_w.bytes)
    stage.rejected_file = (rej_w.sha.hexdigest(), rej_w.bytes)
    return stage


def _row_lookup(rows: dict[str, dict]) -> Callable[[str], tuple[str, dict | None]]:
    """``tar key -> (row key, parquet row)``: exact, else numerically (a parquet whose key column is an
    integer, ``12``, still matches the tar's ``000000012``)."""
    numeric = {int(k): k for k in rows if k.isdigit()}

    def lookup(key: str) -> tuple[str, dict | None]:
        if key in rows:
            return key, rows[key]
        if key.isdigit() and int(key) in numeric:
            k = numeric[int(key)]
            return k, rows[k]
        return key, None

    return lookup


def _index_key(key: str) -> str:
    """The key as the quarantine index records it (an absurdly long one shortened, its length kept)."""
    return key if len(key) <= MAX_INDEX_KEY_CHARS else f"{key[:MAX_INDEX_KEY_CHARS]}...({len(key)} chars)"


def _safe_key(key: str, n: int) -> str:
    """A quarantine member name that cannot escape (keys of unsafe members are rewritten)."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", key)[:60] or "sample"
    return f"{n:06d}_{cleaned}"


class CrossShardDedup:
    """Phase 2, incremental: feed staged shards in name order; each gets {key: earlier_copy}.

    A shard's decision depends only on shards before it, so it can be published as soon as every
    earlier shard is staged, while later shards are still being checked.
    """

    def __init__(self, max_distance: int, enabled: bool = True):
        self.index = NearDuplicateIndex(max_distance)
        self.enabled = enabled
        self.ids: dict[int, str] = {}

    def drops_for(self, stage: ShardStage) -> dict[str, dict]:
        """{key: {"reason", "detail"}} of this shard's kept samples that an earlier shard already has: a near
        duplicate image, or the same COCO image id (``1`` in one shard, ``000000001`` in another)."""
        drops: dict[str, dict] = {}
        for key, h in stage.kept:
            ident, number = f"{stage.name}/{key}", image_id(key)
            other = self.ids.setdefault(number, ident)
            if other != ident:
                drops[key] = {"reason": "duplicate_image_id", "detail": f"image id {number} is already {other}"}
                continue
            if not self.enabled or h < 0:
                continue
            original = self.index.find_or_add(h, ident)
            if original is not None:
                drops[key] = {"reason": "near_duplicate", "detail": f"near duplicate of {original}"}
        return drops


def _copy_bytes(src: BinaryIO, writer: ShardWriter, n: int) -> None:
    """Copy the next ``n`` bytes of ``src`` (whole tar members) into ``writer``, 1 MiB at a time."""
    while n > 0:
        chunk = src.read(min(n, 1 << 20))
        if not chunk:
            raise OSError(f"staged tar {getattr(src, 'name', '?')} ended {n} bytes early")
        writer.write_raw(chunk)
        n -= len(chunk)


def publish_shard(stage: ShardStage, drops: dict[str, dict], src_uri: str, out_uri: str, settings: Settings) -> dict:
    """Phase 3: write the shard's outputs atomically, manifest last; returns its report entry."""
    store = open_store(out_uri, settings.s3)
    name = stage.name
    entry = {"shard": name, "status": stage.status, "error": stage.error, "seen": stage.seen}
    store.delete(f"shards/{name}.manifest.json")  # a failed re-ingest must not leave the old output "complete"
    if stage.status == "failed" and not stage.seen:
        store.delete(f"shards/{name}.tar")  # stale: made from what the source held before
        entry.update(kept=0, quarantined={})
        return entry
    quarantined = Counter(stage.quarantined)
    index = list(stage.rejected_index)
    clean_path, quar_path = stage.kept_path, stage.rejected_path
    kept = len(stage.kept)
    if not drops:  # nothing to remove: the staged tars are the final ones
        digests = {clean_path: stage.kept_file, quar_path: stage.rejected_file}
    else:
        # Remove these few samples in place: the bytes before the first of them stay where they are (read once for
        # the checksum), the ones after it move down over the gaps, and the dropped samples are appended to the
        # staged quarantine tar. The staged tars are already the canonical serialisation, so this gives the bytes a
        # parse and rewrite would, without re-serialising or rewriting whole shards.
        starts = [0, *stage.kept_ends[:-1]]
        first = next(i for i, (key, _) in enumerate(stage.kept) if key in drops)
        with open(clean_path, "r+b") as cf, open(clean_path, "rb") as kf, open(quar_path, "r+b") as qf:
            clean_w = ShardWriter.resume(cf, starts[first])
            quar_w = ShardWriter.resume(qf, stage.rejected_file[1] - len(TAR_TRAILER))
            kf.seek(starts[first])
            kept, run = first, 0  # the writer never passes the reader: the output is the input less some samples
            for (key, _), start, end in zip(stage.kept[first:], starts[first:], stage.kept_ends[first:]):
                if key in drops:
                    _copy_bytes(kf, clean_w, run)
                    run = 0
                    raw = next(iter_tar_samples(io.BytesIO(kf.read(end - start) + TAR_TRAILER), {}, default_limit=1 << 62))
                    v = Verdict(raw.key, drops[key]["reason"], drops[key]["detail"], raw.members)
                    quarantined[v.reason] += 1
                    index.append({"key": raw.key, "reason": v.reason, "detail": v.detail})
                    quar_w.add(_safe_key(raw.key, stage.seen + len(index)), {**raw.members, "reason.json": _reason_member(v, name)})
                else:
                    run += end - start
                    kept += 1
            _copy_bytes(kf, clean_w, run)
            clean_w.close()
            clean_w.truncate()
            quar_w.close()
            quar_w.truncate()
        digests = {clean_path: (clean_w.sha.hexdigest(), clean_w.bytes), quar_path: (quar_w.sha.hexdigest(), quar_w.bytes)}
    index_bytes = b"".join(dumps_json(e) + b"\n" for e in index)
    files = {
        f"shards/{name}.tar": clean_path,
        f"quarantine/{name}.tar": quar_path,
    }
    for key, path in files.items():
        store.put_file(key, path, move=True)
    store.put_bytes(f"quarantine/{name}.jsonl", index_bytes)
    counts = {"seen": stage.seen, "kept": kept, "quarantined": dict(sorted(quarantined.items()))}
    assert counts["seen"] == kept + sum(quarantined.values()), counts
    manifest = {
        "stage": "ingest",
        "shard": name,
        "status": "complete" if stage.status == "ok" else "partial",
        "error": stage.error,
        "source": {"uri": f"{src_uri.rstrip('/')}/{name}.tar", "sha256": stage.source_sha256, "bytes": stage.source_bytes},
        "counts": counts,
        "files": {
            **{k: {"sha256": digests[p][0], "bytes": digests[p][1]} for k, p in files.items()},
            f"quarantine/{name}.jsonl": {"sha256": hashlib.sha256(index_bytes).hexdigest(), "bytes": len(index_bytes)},
        },
        "config_hash": settings.fingerprint("ingest"),
        "code_version": __version__,
    }
    store.put_bytes(f"shards/{name}.manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode())
    for p in (stage.kept_path, stage.rejected_path):
        if os.path.exists(p):
            os.unlink(p)
    entry.update(kept=kept, quarantined=counts["quarantined"])
    return entry


def list_shards(src: Store) -> list[str]:
    """Shard names (``00000`` for ``00000.tar``) at the top level of the source, sorted."""
    names = []
    for key in src.list():
        m = SHARD_RE.fullmatch(key)
        if m:
            names.append(m.group("name"))
    return sorted(names)


def _warm_for_workers(settings: Settings) -> None:
    """Import the parquet reader and load the language-ID model here, before workers are forked: they
    inherit both instead of each paying ~0.2 s of pyarrow import and the model load per ingest run (a
    process that runs ingest again, a worker or a benchmark, pays nothing the second time)."""
    importlib.import_module("pyarrow.parquet")

    if settings.ingest.require_english:
        load_language_model()


def _pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes: plain fork when this process has a single thread (fast, and safe then);
    otherwise a forkserver, since forking a multi-threaded process can deadlock the child."""
    if threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("fork")
    else:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["ovtasks.ingest.pipeline", "pyarrow.parquet", "fasttext"])
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


@dataclass(frozen=True)
class IngestResult:
    report: dict
    report_uri: str

    @property
    def failed_shards(self) -> int:
        return self.report["failed_shards"]


def ingest(src_uri: str, out_uri: str, settings: Settings, workers: int | None = None,
           progress: Callable[[str, int], Callable[[], None]] | None = None) -> IngestResult:
    """Ingest every shard under ``src_uri`` into ``out_uri``; returns the run report.

    ``progress(label, total)`` may return a tick callback (the CLI passes a progress bar).
    """
    workers = workers or settings.workers
    src = open_store(src_uri, settings.s3)
    names = list_shards(src)
    if not names:
        raise FileNotFoundError(f"no *.tar shards found at {src.uri}")
    staging = open_store(out_uri, settings.s3).scratch_dir()
    pool = None
    if workers > 1 and len(names) > 1:
        _warm_for_workers(settings)
        pool = _pool(min(workers, len(names)))
    dedup = CrossShardDedup(settings.ingest.dedup_max_distance, settings.ingest.dedup)
    tick = progress("ingest", len(names)) if progress else None
    try:
        if pool is None:
            entries = []
            for n in names:
                stage = stage_shard(src_uri, n, settings, staging)
                entries.append(publish_shard(stage, dedup.drops_for(stage), src_uri, out_uri, settings))
                if tick:
                    tick()
        else:
            # Stage every shard on the worker processes; publish shard k as soon as shards 0..k are staged (no
            # barrier), here on threads: publishing mostly waits for the disk (fsync) or the object store, so it
            # overlaps the workers' decoding instead of queueing behind it on their cores.
            staged = [pool.submit(stage_shard, src_uri, n, settings, staging) for n in names]
            with ThreadPoolExecutor(max_workers=2, thread_name_prefix="ovtasks-publish") as publisher:
                published = []
                for fut in staged:
                    stage = fut.result()
                    published.append(publisher.submit(publish_shard, stage, dedup.drops_for(stage), src_uri, out_uri, settings))
                entries = []
                for fut in published:
                    entries.append(fut.result())
                    if tick:
                        tick()
    finally:
        if pool is not None:
            pool.shutdown()
        shutil.rmtree(staging, ignore_errors=True)
    total: Counter = Counter()
    for e in entries:
        total.update(e.get("quarantined", {}))
    report = {
        "stage": "ingest",
        "src": src.uri,
        "out": open_store(out_uri, settings.s3).uri,
        "seen": sum(e["seen"] for e in entries),
        "kept": sum(e.get("kept", 0) for e in entries),
        "quarantined": dict(sorted(total.items())),
        "shards": entries,
        "failed_shards": sum(1 for e in entries if e["status"] != "ok"),
        "config_hash": settings.fingerprint("ingest"),
        "code_version": __version__,
    }
    assert report["seen"] == report["kept"] + sum(total.values()), report
    out = open_store(out_uri, settings.s3)
    out.put_bytes("ingest_report.json", json.dumps(report, indent=2, sort_keys=True).encode())
    history.record(out, "ingest", report)
    record_ingest(out, [e["shard"] for e in entries], len(names))
    log.info("ingest done", extra={"seen": report["seen"], "kept": report["kept"], "failed_shards": report["failed_shards"]})
    return IngestResult(report, out.uri_for("ingest_report.json"))
