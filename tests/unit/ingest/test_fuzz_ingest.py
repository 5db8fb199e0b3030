"""A structure-aware fuzzer for the shard reader and the per-sample checks (Hypothesis, seeded and bounded).

Shards are built from parts a real img2dataset shard has (images in several formats, captions, metadata
JSON, PAX and GNU long-name headers, a parquet) and then damaged the way the red team did: corrupt or
negative sizes, malformed PAX records, byte flips, truncation, hostile metadata values. Properties of every
run: it finishes (no hang), its memory stays within the configured limits, ``seen == kept + quarantined``,
every kept image decodes as RGB, and nothing is written outside ``--out``.

The default suite runs a few dozen examples (``FUZZ_EXAMPLES``, default 30); ``make fuzz`` runs thousands.
Hypothesis is derandomized here, so a failure reproduces; ``FUZZ_SEED`` picks another sequence.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from ovtasks.core.config import load_settings
from ovtasks.ingest.pipeline import ingest
from ovtasks.core.shards import ShardReadError, iter_tar_samples
from tests.support.bounded import call_within
from tests.support.tar_bytes import BLOCK, member as _member, header as _header, pax as _pax

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "30"))
SEED = int(os.environ.get("FUZZ_SEED", "20261130"))
MAX_IMAGE_BYTES = 64 * 1024  # configured limits for the run: a member over them is never read
MAX_CAPTION_BYTES = 2000


def _image(kind: str, w: int, h: int, colour: int) -> bytes:
    from PIL import Image

    im = Image.new("RGB", (w, h), ((colour * 37) % 256, (colour * 91) % 256, (colour * 13) % 256))
    for x in range(0, w, 7):  # some structure, so pHash differs between colours
        im.putpixel((x, (x * colour) % h), (255, 255, 255))
    buf = io.BytesIO()
    fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP", "tif": "TIFF"}[kind]
    (im.convert("P") if kind == "gif" else im.convert("LA") if kind == "png" and colour % 3 == 0 else im).save(buf, fmt)
    return buf.getvalue()


text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60)
metadata_value = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True),
                           text, st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@st.composite
def samples(draw, index: int):
    key = draw(st.sampled_from([f"{index:09d}", f"{index}", f"dir/{index:05d}", f"k{index}.x", f"{'d' * 120}/{index}"]))
    members: dict[str, bytes] = {}
    kind = draw(st.sampled_from(["jpg", "png", "webp", "gif", "bmp", "tif", "none"]))
    if kind != "none":
        data = _image(kind, draw(st.integers(40, 140)), draw(st.integers(40, 140)), draw(st.integers(0, 200)))
        damage = draw(st.sampled_from(["none", "none", "truncate", "flip", "garbage", "empty"]))
        if damage == "truncate":
            data = data[: draw(st.integers(0, len(data)))]
        elif damage == "flip":
            pos = draw(st.integers(0, len(data) - 1))
            data = data[:pos] + bytes([data[pos] ^ draw(st.integers(1, 255))]) + data[pos + 1:]
        elif damage == "garbage":
            data = draw(st.binary(max_size=300))
        elif damage == "empty":
            data = b""
        members[kind] = data
    caption = draw(st.sampled_from(["a photo of a red ball and a blue box on the table", "", "\u200b\u200c", "\x00\x00"]) | text)
    if draw(st.booleans()):
        members["txt"] = caption.encode("utf-8", "surrogatepass") if draw(st.booleans()) else caption.encode("utf-16")
    if draw(st.booleans()):
        meta = {k: draw(metadata_value) for k in draw(st.lists(st.sampled_from(["punsafe", "pwatermark", "caption", "status",
                                                                                 "similarity", "key"]), max_size=4))}
        blob = json.dumps(meta, allow_nan=True).encode() if draw(st.booleans()) else draw(st.binary(max_size=80))
        members["json"] = blob
    return key, members


@st.composite
def shards(draw):
    """The bytes of one tar built from samples, with header-level damage at a random place."""
    n = draw(st.integers(1, 6))
    parts: list[bytes] = []
    for i in range(n):
        key, members = draw(samples(i))
        for ext, data in members.items():
            name = f"{key}.{ext}".encode("utf-8", "surrogatepass")
            header_kind = draw(st.sampled_from(["plain", "plain", "plain", "pax_path", "gnu_long", "pax_size", "bad_pax",
                                                "negative", "oversize", "symlink"]))
            if header_kind == "pax_path":
                parts.append(_member(b"././@PaxHeader", _pax([(b"path", name)]), b"x"))
                parts.append(_member(b"placeholder", data))
            elif header_kind == "gnu_long":
                parts.append(_member(b"././@LongLink", name + b"\x00", b"L"))
                parts.append(_member(name[:100], data))
            elif header_kind == "pax_size":
                parts.append(_member(b"././@PaxHeader", _pax([(b"size", draw(st.sampled_from([b"-1", b"abc", b"99999999999", b"0"])))]), b"x"))
                parts.append(_member(name, data))
            elif header_kind == "bad_pax":
                parts.append(_member(b"././@PaxHeader", draw(st.sampled_from([b"0 path=x\n", b"5 a\n", b"999 path=x\n", b"x"])), b"x"))
                parts.append(_member(name, data))
            elif header_kind == "negative":
                parts.append(_header(name, draw(st.sampled_from([b"-0000000001\x00", b"\xff" * 12, b"+7\x00"]))))
            elif header_kind == "oversize":
                parts.append(_member(name, data, size=draw(st.integers(len(data) + 1, 1 << 40))))
            elif header_kind == "symlink":
                parts.append(_member(name, b"", b"2"))
            else:
                parts.append(_member(name, data))
    tar = b"".join(parts) + bytes(2 * BLOCK)
    cut = draw(st.sampled_from(["none", "none", "truncate", "flip"]))
    if cut == "truncate":
        tar = tar[: draw(st.integers(0, len(tar)))]
    elif cut == "flip":
        pos = draw(st.integers(0, len(tar) - 1))
        tar = tar[:pos] + bytes([tar[pos] ^ draw(st.integers(1, 255))]) + tar[pos + 1:]
    return tar


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def _ingest_bounded(src: Path, out: Path, seconds: float = 60) -> tuple[dict, int]:
    s = load_settings(env={"OVTASKS_INGEST__MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
                           "OVTASKS_INGEST__MAX_CAPTION_BYTES": str(MAX_CAPTION_BYTES)})

    def go() -> tuple[dict, int]:
        tracemalloc.start()
        try:
            return ingest(str(src), str(out), s, workers=1).report, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    return call_within(go, seconds, "ingest")


@pytest.mark.timeout(1800)
@seed(SEED)
@settings(max_examples=EXAMPLES, deadline=None, derandomize="FUZZ_SEED" not in os.environ, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(shard_list=st.lists(shards(), min_size=1, max_size=3), parquet=st.booleans(), data=st.data())
def test_ingest_properties_hold_on_any_shard(shard_list, parquet, data):
    from PIL import Image

    work = Path(tempfile.mkdtemp(prefix="ovtasks-fuzz-"))
    try:
        src, out = work / "src", work / "out"
        src.mkdir()
        for i, tar in enumerate(shard_list):
            (src / f"{i:05d}.tar").write_bytes(tar)
        if parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            rows = [{"key": data.draw(st.sampled_from([f"{k:09d}", k, f"{k}"]), label="parquet key"),
                     "punsafe": data.draw(st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)), label="punsafe"),
                     "status": data.draw(st.sampled_from(["success", "failed_to_download"]), label="status")} for k in range(4)]
            try:
                buf = io.BytesIO()
                pq.write_table(pa.Table.from_pylist(rows), buf)
                (src / "00000.parquet").write_bytes(buf.getvalue())
            except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed key types: the parquet cannot be written at all
                pass
        source_before = _tree(src)
        outside_before = {p.name for p in work.iterdir()}
        report, peak = _ingest_bounded(src, out)

        assert report["seen"] == report["kept"] + sum(report["quarantined"].values())
        for e in report["shards"]:
            assert e["seen"] == e.get("kept", 0) + sum(e.get("quarantined", {}).values()), e
        # bounded memory: a few times the largest member the limits allow, never the shards' declared sizes
        assert peak < 48 * 1024 * 1024 + 8 * MAX_IMAGE_BYTES, f"peak {peak / 2**20:.1f} MiB"
        kept = 0
        for tar in sorted((out / "shards").glob("*.tar")):
            with open(tar, "rb") as fh:
                for raw in iter_tar_samples(fh, {}, 1 << 30):
                    im = Image.open(io.BytesIO(raw.members["jpg"]))
                    im.load()
                    assert im.mode == "RGB" and min(im.size) > 0
                    kept += 1
        assert kept == report["kept"]
        assert _tree(src) == source_before and {p.name for p in work.iterdir()} == outside_before | {"out"}  # nothing outside --out
        assert not [p for p in out.rglob("*") if p.name.startswith(".ovtmp-")]  # no scratch left behind
    finally:
        shutil.rmtree(work, ignore_errors=True)


@seed(SEED)
@settings(max_examples=EXAMPLES * 10, deadline=None, derandomize="FUZZ_SEED" not in os.environ, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(blob=st.one_of(shards(), st.binary(max_size=4096)))
def test_the_tar_reader_ends_or_raises_its_own_error(blob):
    """Any bytes: the reader yields samples and then ends, or raises ShardReadError; nothing else, never a hang."""
    n = 0
    try:
        for raw in iter_tar_samples(io.BytesIO(blob), {"jpg": MAX_IMAGE_BYTES}, default_limit=MAX_IMAGE_BYTES):
            n += 1
            assert all(len(v) <= MAX_IMAGE_BYTES for v in raw.members.values())
            assert n < 10_000
    except ShardReadError:
        pass
