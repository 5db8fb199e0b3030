"""img2dataset / webdataset shard I/O: streaming tar reader with safety checks, deterministic writer,
and LAION / Re-LAION parquet metadata.

A shard is ``NNNNN.tar`` holding, per sample, members ``<key>.<ext>`` (``jpg``/``png``/``webp``...,
``txt`` caption, ``json`` metadata), next to an optional ``NNNNN.parquet`` and ``NNNNN_stats.json``.
Members sharing a key are consecutive (webdataset convention); the reader groups them.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import BinaryIO, Iterator

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
FIXED_MTIME = 1_700_000_000  # written into tar headers so identical content gives identical bytes

# Column spellings: canonical name -> accepted spellings (LAION first, then Re-LAION / others).
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "key": ("key",),
    "url": ("URL", "url"),
    "caption": ("TEXT", "caption", "text"),
    "width": ("WIDTH", "width"),
    "height": ("HEIGHT", "height"),
    "similarity": ("similarity", "SIMILARITY", "clip_similarity"),
    "punsafe": ("punsafe", "PUNSAFE"),
    "pwatermark": ("pwatermark", "PWATERMARK"),
    "status": ("status",),
}


class ShardReadError(RuntimeError):
    """The shard as a whole cannot be read to its end (truncated or corrupt tar)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class RawSample:
    """One key's members as read from the tar, before any decoding.

    ``problems`` holds structural defects found while reading (an unsafe member name, a duplicate
    key, an oversized member whose bytes were not read, truncation); ``oversized`` names the
    extensions whose declared size exceeded their limit.
    """

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    oversized: dict[str, int] = field(default_factory=dict)


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/00012.jpg`` → (``dir/00012``, ``jpg``); the key ends at the basename's first dot."""
    path = PurePosixPath(name)
    base = path.name
    stem, dot, ext = base.partition(".")
    key = str(path.parent / stem) if str(path.parent) not in ("", ".") else stem
    return key, ext.lower() if dot else ""


def is_unsafe_name(name: str) -> bool:
    p = PurePosixPath(name)
    return name.startswith("/") or "\\" in name or ".." in p.parts or "\x00" in name


def normalise_ext(ext: str) -> str:
    return "jpg" if ext == "jpeg" else ext


def iter_tar_samples(fileobj: BinaryIO, limits: dict[str, int], default_limit: int = 1 << 20) -> Iterator[RawSample]:
    """Stream samples from a tar without seeking; memory is bounded by one sample's members.

    A member whose declared size exceeds ``limits[ext]`` (or ``default_limit``) is not read: its
    extension goes into ``oversized`` so the caller can quarantine the sample with a reason.
    Links, devices and names escaping the directory are reported as ``unsafe_member`` problems and
    never extracted. A key seen again after another key gets a ``duplicate_key`` problem.
    Raises :class:`ShardReadError` after yielding what was complete when the tar ends early.
    """
    seen_keys: set[str] = set()
    current: RawSample | None = None
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r|*")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardReadError("unreadable_tar", str(exc)) from exc
    try:
        for info in tar:
            if info.isdir():
                continue
            name = info.name
            key, ext = split_member_name(name)
            ext = normalise_ext(ext)
            if current is None or key != current.key:
                if current is not None:
                    yield current
                current = RawSample(key=key)
                if key in seen_keys:
                    current.problems.append("duplicate_key")
                seen_keys.add(key)
            if is_unsafe_name(name):
                current.problems.append("unsafe_member_path")
                continue
            if not info.isfile():
                current.problems.append("unsafe_member_type")
                continue
            if ext in current.members or ext in current.oversized:
                current.problems.append("duplicate_key")
                continue
            limit = limits.get(ext, default_limit)
            if info.size > limit:
                current.oversized[ext] = info.size
                continue
            fh = tar.extractfile(info)
            data = fh.read() if fh is not None else b""
            if len(data) != info.size:
                raise EOFError(f"member {name} ended after {len(data)} of {info.size} bytes")
            current.members[ext] = data
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        if current is not None:
            current.problems.append("truncated_tar")
            yield current
        raise ShardReadError("truncated_tar", str(exc)) from exc
    finally:
        tar.close()
    if current is not None:
        yield current


class ShardWriter:
    """Writes a webdataset tar with fixed metadata so that equal input gives byte-identical output."""

    def __init__(self, fileobj: BinaryIO):
        self._tar = tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = FIXED_MTIME
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def canonical_columns(names: list[str]) -> dict[str, str]:
    """Map canonical column names to the spelling present in ``names`` (LAION or Re-LAION)."""
    present = set(names)
    out = {}
    for canon, spellings in COLUMN_ALIASES.items():
        for s in spellings:
            if s in present:
                out[canon] = s
                break
    return out


def read_parquet_metadata(data: bytes) -> dict[str, dict]:
    """Rows of an img2dataset parquet keyed by sample key, with canonical column names.

    Only the columns we use are read. Raises ``ValueError`` if the file is not a readable parquet
    or has no ``key`` column.
    """
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(io.BytesIO(data))
        cols = canonical_columns(pf.schema_arrow.names)
        if "key" not in cols:
            raise ValueError("parquet has no 'key' column")
        table = pf.read(columns=list(cols.values()))
    except ValueError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError subclasses
        raise ValueError(f"unreadable parquet: {exc}") from exc
    rows: dict[str, dict] = {}
    columns = {canon: table.column(actual).to_pylist() for canon, actual in cols.items()}
    for i, key in enumerate(columns["key"]):
        rows[str(key)] = {canon: vals[i] for canon, vals in columns.items()}
    return rows


def normalise_metadata(meta: dict) -> dict:
    """Canonical names for a sample's own json (img2dataset writes both LAION and lowercase keys)."""
    cols = canonical_columns(list(meta))
    return {canon: meta[actual] for canon, actual in cols.items()}


def dumps_json(obj) -> bytes:
    """Deterministic compact JSON bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
