"""img2dataset / webdataset shard I/O: streaming tar reader with safety checks, deterministic writer,
and LAION / Re-LAION parquet metadata.

A shard is ``NNNNN.tar`` holding, per sample, members ``<key>.<ext>`` (``jpg``/``png``/``webp``...,
``txt`` caption, ``json`` metadata), next to an optional ``NNNNN.parquet`` and ``NNNNN_stats.json``.
Members sharing a key are consecutive (webdataset convention); the reader groups them.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator

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
    slash = name.rfind("/")
    stem, dot, ext = name[slash + 1:].partition(".")
    key = name[:slash + 1] + stem if slash > 0 else stem
    return key, ext.lower() if dot else ""


def is_unsafe_name(name: str) -> bool:
    return name.startswith("/") or "\\" in name or ".." in name.split("/") or "\x00" in name


def normalise_ext(ext: str) -> str:
    return "jpg" if ext == "jpeg" else ext


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
TAR_TRAILER = _ZERO_BLOCK * 2  # the end-of-archive marker ShardWriter.close writes
_REGULAR = (b"0", b"\x00", b"7")
_PASSIVE = (b"5",)  # directories: skipped
# PAX (x, g) and GNU long-name (L, K) headers are read into memory: a real one is a few hundred bytes.
# A larger one is skipped unread and its member quarantined (``OVERSIZED_HEADER``), never loaded.
MAX_META_HEADER_BYTES = 1 << 16
MAX_NAME_CHARS = 4096  # PATH_MAX: a longer member name is quarantined as an unsafe path
OVERSIZED_HEADER = b"H"  # pseudo typeflag iter_tar_members yields for a member behind an oversized header
MALFORMED_HEADER = b"B"  # ... and for a member behind a malformed PAX header (its data is the reason)


class _TarCorrupt(Exception):
    pass


def _read_exact(fh: BinaryIO, n: int) -> bytes:
    chunks, need = [], n
    while need:
        chunk = fh.read(need)
        if not chunk:
            break
        chunks.append(chunk)
        need -= len(chunk)
    data = b"".join(chunks) if len(chunks) != 1 else chunks[0]
    if len(data) != n:
        raise EOFError(f"unexpected end of data: wanted {n} bytes, got {len(data)}")
    return data


def _skip(fh: BinaryIO, n: int) -> None:
    while n:
        chunk = fh.read(min(n, 1 << 20))
        if not chunk:
            raise EOFError("unexpected end of data while skipping a member")
        n -= len(chunk)


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 (0xff first: negative)
        if field[0] == 0xFF:
            raise _TarCorrupt("a negative size in a base-256 field")
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\x00", 1)[0].strip()
    if text and not text.isdigit():  # int() would take "-1" or "+7"
        raise _TarCorrupt(f"bad octal field {text[:20]!r} (a negative size?)")
    try:
        return int(text, 8) if text else 0
    except ValueError as exc:
        raise _TarCorrupt(f"bad octal field {text[:20]!r}") from exc


def _checksum_ok(header: bytes) -> bool:
    stored = _octal(header[148:156])
    unsigned = sum(header[:148]) + 256 + sum(header[156:])
    return stored == unsigned


def _pax_records(data: bytes) -> dict[str, str]:
    """``"<len> <key>=<value>\\n"`` records; a record whose length does not cover itself, runs past the
    header or does not end in a newline makes the tar corrupt (a zero length would never advance)."""
    out, pos = {}, 0
    while pos < len(data):
        sp = data.find(b" ", pos, pos + 21)
        digits = data[pos:sp] if sp > pos else b""
        if not digits.isdigit():
            raise _TarCorrupt(f"bad PAX record at byte {pos}: no length")
        length = int(digits)
        if length <= sp - pos + 1 or pos + length > len(data) or data[pos + length - 1:pos + length] != b"\n":
            raise _TarCorrupt(f"bad PAX record at byte {pos}: length {length}")
        record = data[sp + 1:pos + length - 1]
        k, _, v = record.partition(b"=")
        out[k.decode("utf-8", "replace")] = v.decode("utf-8", "replace")
        pos += length
    return out


def iter_tar_members(fh: BinaryIO, limit_for: "Callable[[str], int]") -> Iterator[tuple[str, bytes, int | None]]:
    """Stream ``(name, typeflag, data_or_None, size)`` from a tar without ``tarfile``.

    Reads ustar, PAX (``path``/``size``) and GNU long-name headers, verifies header checksums and
    never seeks. A member larger than ``limit_for(name)`` is skipped unread (data ``None``).
    Raises ``EOFError`` on truncation and ``_TarCorrupt`` on a damaged header.
    """
    pending: dict[str, str] = {}
    oversized_header = malformed_header = ""
    saw_any = False
    while True:
        header = fh.read(_BLOCK)
        if len(header) < _BLOCK:
            if len(header) == 0 and not saw_any:
                raise _TarCorrupt("empty file")
            raise EOFError("unexpected end of data: no end-of-archive marker")
        if header == _ZERO_BLOCK:
            return
        saw_any = True
        if not _checksum_ok(header):
            raise _TarCorrupt("bad header checksum")
        typeflag = header[156:157]
        size = _octal(header[124:136])
        if typeflag in (b"x", b"g", b"L", b"K"):
            if size > MAX_META_HEADER_BYTES:  # skipped unread; the member it describes is quarantined
                _skip(fh, size + (-size) % _BLOCK)
                oversized_header = f"{typeflag.decode()} header of {size} bytes > {MAX_META_HEADER_BYTES}"
                continue
            data = _read_exact(fh, size)
            _skip(fh, (-size) % _BLOCK)
            if typeflag == b"x":
                try:
                    pending.update(_pax_records(data))
                except _TarCorrupt as exc:  # the PAX header's own ustar header framed it: only its member is bad
                    malformed_header = str(exc)
            elif typeflag == b"L":
                pending["path"] = data.rstrip(b"\x00").decode("utf-8", "replace")
            continue
        name = header[0:100].split(b"\x00", 1)[0]
        prefix = header[345:500].split(b"\x00", 1)[0] if header[257:263] == b"ustar\x00" else b""
        name = (prefix + b"/" + name if prefix else name).decode("utf-8", "replace")
        name = pending.pop("path", name)
        if "size" in pending:
            text = pending.pop("size").strip()
            if text.isdigit():
                size = int(text)
            else:  # the member keeps the size its ustar header gives: if that frames it wrongly, the next header fails
                malformed_header = malformed_header or f"bad PAX size {text[:20]!r} (a negative size?)"
        pending.clear()
        if malformed_header:
            _skip(fh, size + (-size) % _BLOCK)
            yield name, MALFORMED_HEADER, malformed_header.encode(), size
            malformed_header = ""
            continue
        if oversized_header:
            _skip(fh, size + (-size) % _BLOCK)
            yield name, OVERSIZED_HEADER, oversized_header.encode(), size
            oversized_header = ""
            continue
        if typeflag not in _REGULAR:
            size_on_disk = size if typeflag not in (b"1", b"2", b"3", b"4", b"5", b"6") else 0
            _skip(fh, size_on_disk + (-size_on_disk) % _BLOCK)
            yield name, typeflag, None, size
            continue
        if size > limit_for(name):
            _skip(fh, size + (-size) % _BLOCK)
            yield name, typeflag, None, size
            continue
        data = _read_exact(fh, size)
        _skip(fh, (-size) % _BLOCK)
        yield name, typeflag, data, size


def iter_tar_samples(fileobj: BinaryIO, limits: dict[str, int], default_limit: int = 1 << 20) -> Iterator[RawSample]:
    """Stream samples from a tar without seeking; memory is bounded by one sample's members.

    A member whose declared size exceeds ``limits[ext]`` (or ``default_limit``) is not read: its
    extension goes into ``oversized`` so the caller can quarantine the sample with a reason.
    Links, devices and names escaping the directory are reported as ``unsafe_member_*`` problems
    and never extracted. A key seen again after another key gets a ``duplicate_key`` problem.
    Raises :class:`ShardReadError` after yielding what was complete when the tar ends early.
    """
    def limit_for(name: str) -> int:
        return limits.get(normalise_ext(split_member_name(name)[1]), default_limit)

    seen_keys: set[str] = set()
    current: RawSample | None = None
    try:
        for name, typeflag, data, size in iter_tar_members(fileobj, limit_for):
            if typeflag in _PASSIVE:
                continue
            key, ext = split_member_name(name)
            ext = normalise_ext(ext)
            if current is None or key != current.key:
                if current is not None:
                    yield current
                current = RawSample(key=key)
                if key in seen_keys:
                    current.problems.append("duplicate_key")
                seen_keys.add(key)
            if typeflag == OVERSIZED_HEADER:
                current.problems.append("oversized_tar_header")
            elif typeflag == MALFORMED_HEADER:
                current.problems.append("malformed_tar_header")
            elif is_unsafe_name(name) or len(name) > MAX_NAME_CHARS:
                current.problems.append("unsafe_member_path")
            elif typeflag not in _REGULAR:
                current.problems.append("unsafe_member_type")
            elif ext in current.members or ext in current.oversized:
                current.problems.append("duplicate_key")
            elif data is None:
                current.oversized[ext] = size
            else:
                current.members[ext] = data
    except _TarCorrupt as exc:
        if current is None:
            raise ShardReadError("unreadable_tar", str(exc)) from exc
        current.problems.append("truncated_tar")
        yield current
        raise ShardReadError("truncated_tar", str(exc)) from exc
    except (EOFError, ValueError) as exc:
        if current is not None:
            current.problems.append("truncated_tar")
            yield current
        raise ShardReadError("truncated_tar", str(exc)) from exc
    if current is not None:
        yield current


def _header_template() -> bytes:
    h = bytearray(_BLOCK)
    h[100:108] = b"0000644\x00"
    h[108:116] = b"0000000\x00"
    h[116:124] = b"0000000\x00"
    h[136:148] = b"%011o\x00" % FIXED_MTIME
    h[148:156] = b" " * 8  # the checksum field counts as spaces while the checksum is computed
    h[257:265] = b"ustar\x0000"
    return bytes(h)


_HEADER = _header_template()  # every header's fixed fields: name, size and type are filled in per member
_HEADER_SUM = sum(_HEADER)


def _tar_header(name: bytes, size: int, typeflag: bytes = b"0") -> bytes:
    h = bytearray(_HEADER)
    h[0:len(name)] = name
    size_field = b"%011o\x00" % size
    h[124:136] = size_field
    h[156:157] = typeflag
    h[148:156] = b"%06o\x00 " % (_HEADER_SUM + sum(name) + sum(size_field) + typeflag[0])  # the sum of every byte, as before
    return bytes(h)


class ShardWriter:
    """Writes a webdataset tar with fixed metadata so that equal input gives byte-identical output.

    Plain ustar headers; names longer than 100 bytes get a PAX ``path`` record.
    """

    def __init__(self, fileobj: BinaryIO):
        self._out = fileobj
        self.count = 0
        self.sha = hashlib.sha256()  # of every byte written: the manifest checksum, no re-read
        self.bytes = 0
        self._closed = False

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self.sha.update(data)
        self.bytes += len(data)

    def _member(self, name: str, data: bytes) -> None:
        raw = name.encode("utf-8")
        if len(raw) > 100:
            rec = b" path=" + raw + b"\n"
            n = len(rec)
            n = len(str(n + len(str(n))).encode()) + n
            pax = str(n).encode() + rec
            self._write(_tar_header(b"././@PaxHeader", len(pax), b"x"))
            self._write(pax + bytes((-len(pax)) % _BLOCK))
            raw = raw[:100]
        self._write(_tar_header(raw, len(data)))
        self._write(data)
        pad = (-len(data)) % _BLOCK
        if pad:
            self._write(bytes(pad))

    @classmethod
    def resume(cls, fileobj: BinaryIO, length: int) -> "ShardWriter":
        """A writer that continues ``fileobj`` (opened ``r+b``) after its first ``length`` bytes: whole members
        that a ShardWriter wrote, without the trailer. Those bytes are read once for the checksum, not rewritten;
        what follows is overwritten (call :meth:`truncate` after :meth:`close` when the result is shorter)."""
        w = cls(fileobj)
        fileobj.seek(0)
        left = length
        while left > 0:
            chunk = fileobj.read(min(left, 1 << 20))
            if not chunk:
                raise OSError(f"{getattr(fileobj, 'name', '?')} ended {left} bytes before the {length} to resume after")
            w.sha.update(chunk)
            left -= len(chunk)
        w.bytes = length
        fileobj.seek(length)
        return w

    def truncate(self) -> None:
        """Cut the file at what this writer wrote (after :meth:`resume` over a longer file)."""
        self._out.flush()
        self._out.truncate(self.bytes)

    def write_raw(self, data: bytes) -> None:
        """Append bytes that are already whole members of this format (copied from another ShardWriter's tar)."""
        self._write(data)

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for ext, data in members.items():
            self._member(f"{key}.{ext}", data)
        self.count += 1

    def close(self) -> None:
        if not self._closed:
            self._write(TAR_TRAILER)
            self._closed = True

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


def read_parquet_metadata(data: bytes, max_rows: int | None = None) -> dict[str, dict]:
    """Rows of an img2dataset parquet keyed by sample key, with canonical column names.

    Only the columns we use are read, and none when the file declares more than ``max_rows`` rows.
    Raises ``ValueError`` if the file is not a readable parquet, has no ``key`` column or too many rows.
    """
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(io.BytesIO(data))
        cols = canonical_columns(pf.schema_arrow.names)
        if "key" not in cols:
            raise ValueError("parquet has no 'key' column")
        if max_rows is not None and pf.metadata.num_rows > max_rows:
            raise ValueError(f"parquet declares {pf.metadata.num_rows} rows > ingest.max_parquet_rows {max_rows}")
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
