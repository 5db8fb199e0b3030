"""Hostile shards, round two (defects a red-team pass found): hand-built tars and parquets through the real
``ingest``. Each ends with the run finishing, every sample accounted for (seen == kept + quarantined) and
the good samples kept."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from ovtasks.core.config import load_settings
from ovtasks.ingest.pipeline import ingest, list_shards
from tests.support.bounded import call_within
from tests.support.tar_bytes import BLOCK, end as _end, header as _header, member as _member, pax as _pax
from tests.support.shard_builders import CAPTION, encode_image, flatten, good_sample, noise_image, parquet_of, run_ingest, tar_of


def _good_members(key: str, seed: int) -> bytes:
    return b"".join(_member(f"{key}.{ext}".encode(), data) for ext, data in good_sample(seed).items())


def _ingest_within(tmp_path: Path, files: dict[str, bytes], seconds: float = 60, **env):
    """``run_ingest`` that must finish within ``seconds``."""
    return call_within(lambda: run_ingest(tmp_path, files, **env), seconds, "ingest")


@pytest.mark.parametrize("record", [b"0 path=x\n", b"3 path=x\n", b"1 x\n", b"99999 path=x\n", b"abc\n"],
                         ids=["length_zero", "shorter_than_its_digits", "length_one", "past_the_header", "no_length"])
def test_a_malformed_pax_record_quarantines_its_member_and_keeps_the_rest(tmp_path, record):
    """The PAX header's own ustar header frames it, so only the member it describes is bad: the samples before
    it (including the one in progress) and after it are kept, the member is quarantined with its reason."""
    bad = _member(b"././@PaxHeader", record, b"x") + _member(b"000000001.jpg", encode_image(noise_image(3)))
    tar = _good_members("000000000", 1) + _good_members("000000002", 2) + bad + _good_members("000000003", 3) + _end()
    report, reasons, _ = _ingest_within(tmp_path, {"00000.tar": tar})
    assert report["kept"] == 3 and report["shards"][0]["status"] != "failed", report["shards"][0]
    assert reasons == {"000000001": "malformed_tar_header"}
    assert json.loads((tmp_path / "out" / "ingest_report.json").read_text())["seen"] == report["seen"]


@pytest.mark.parametrize("size_field", [b"-0000000001\x00", b"\xff" * 12])
def test_negative_member_size_is_a_corrupt_shard_not_a_read_of_everything(tmp_path, size_field):
    tar = _good_members("000000000", 1) + _good_members("000000002", 2) + _header(b"000000001.jpg", size_field) + bytes(BLOCK) * 4 + _end()
    report, _, _ = _ingest_within(tmp_path, {"00000.tar": tar})
    assert report["kept"] == 1 and report["shards"][0]["status"] == "failed" and "negative" in report["shards"][0]["error"]


@pytest.mark.parametrize("pax", [b"11 size=-1\n", b"12 size=abc\n"])
def test_a_bad_pax_size_with_intact_framing_quarantines_its_member(tmp_path, pax):
    tar = (_good_members("000000000", 1) + _good_members("000000002", 2) + _member(b"././@PaxHeader", pax, b"x")
           + _member(b"000000001.jpg", b"x" * 10) + _good_members("000000003", 3) + _end())
    report, reasons, _ = _ingest_within(tmp_path, {"00000.tar": tar})
    assert report["kept"] == 3 and reasons == {"000000001": "malformed_tar_header"}


def test_a_bad_pax_size_that_loses_the_framing_fails_the_shard_but_keeps_what_came_before(tmp_path):
    """The member's ustar header says 0 bytes but 10 follow: the next header is garbage, the framing is lost."""
    body = b"x" * 10 + bytes(BLOCK - 10)
    tar = (_good_members("000000000", 1) + _good_members("000000002", 2) + _member(b"././@PaxHeader", b"11 size=-1\n", b"x")
           + _header(b"000000001.jpg", b"00000000000\x00") + body + _good_members("000000003", 3) + _end())
    report, _, _ = _ingest_within(tmp_path, {"00000.tar": tar})
    assert report["shards"][0]["status"] == "failed" and report["kept"] == 2


@pytest.mark.parametrize("typeflag", [b"x", b"L"])
def test_oversized_meta_header_is_skipped_unread_and_its_member_quarantined(tmp_path, typeflag, monkeypatch):
    import ovtasks.core.shards as shards

    monkeypatch.setattr(shards, "MAX_META_HEADER_BYTES", 4096)  # 4 KiB here; 64 KiB by default
    payload = b"n" * 20_000 if typeflag == b"L" else b"20016 path=" + b"p" * 20_004 + b"\n"  # a well-formed record
    reads = []
    real_read_exact = shards._read_exact

    def spy(fh, n):
        reads.append(n)
        return real_read_exact(fh, n)

    monkeypatch.setattr(shards, "_read_exact", spy)
    tar = (_good_members("000000000", 1) + _member(b"././@LongLink", payload, typeflag) + _member(b"000000001.jpg", encode_image(noise_image(3)))
           + _member(b"000000001.txt", CAPTION.encode()) + _good_members("000000002", 2) + _end())
    report, reasons, _ = _ingest_within(tmp_path, {"00000.tar": tar})
    assert max(reads) < 20_000  # the header's bytes were never read into memory
    assert report["kept"] == 2 and reasons == {"000000001": "oversized_tar_header"}, reasons
    assert report["shards"][0]["status"] == "ok"


def test_a_very_long_member_name_is_quarantined_and_shortened_in_the_index(tmp_path):
    from ovtasks.ingest.pipeline import MAX_INDEX_KEY_CHARS

    name = ("d" * 5000 + "/000000001").encode()
    record = _pax([(b"path", name)])
    tar = (_good_members("000000000", 1) + _member(b"././@PaxHeader", record, b"x") + _member(b"x.jpg", encode_image(noise_image(3)))
           + _end())
    report, reasons, out = _ingest_within(tmp_path, {"00000.tar": tar})
    assert report["kept"] == 1 and list(reasons.values()) == ["unsafe_member_path"]
    (key,) = reasons
    assert len(key) < MAX_INDEX_KEY_CHARS + 40 and key.endswith("chars)")


def _multipage_tiff_with_empty_page() -> bytes:
    """A two-page TIFF whose second IFD is empty: PIL's n_frames raises TypeError on it."""
    data = bytearray(encode_image(noise_image(21), "TIFF", save_all=True, append_images=[noise_image(22)]))
    import struct

    first_ifd = struct.unpack("<I", data[4:8])[0]
    entries = struct.unpack("<H", data[first_ifd:first_ifd + 2])[0]
    next_ptr = first_ifd + 2 + 12 * entries
    second = struct.unpack("<I", data[next_ptr:next_ptr + 4])[0]
    data[second:second + 2] = b"\x00\x00"  # the second page has no entries
    return bytes(data)


def test_one_bad_image_never_costs_the_rest_of_its_shard(tmp_path, monkeypatch):
    tiff = _multipage_tiff_with_empty_page()
    with pytest.raises(Exception):  # noqa: B017 - the defect: PIL itself raises on this file
        Image.open(io.BytesIO(tiff)).n_frames
    samples = {"000000000": good_sample(1), "000000001": {"tif": tiff, "txt": CAPTION.encode()}, "000000002": good_sample(2),
               "000000003": {"png": encode_image(noise_image(4), "PNG"), "txt": CAPTION.encode()}, "000000004": good_sample(5)}
    import ovtasks.core.imaging as imaging

    real_save = Image.Image.save

    def failing_jpeg_save(self, fp, format=None, **kw):  # the re-encode of the PNG fails (disk, codec)
        if format == "JPEG" and self.size == (120, 100) and getattr(fp, "getvalue", None) and failing_jpeg_save.armed:
            failing_jpeg_save.armed = False
            raise OSError("encoder error -2")
        return real_save(self, fp, format, **kw)

    failing_jpeg_save.armed = True
    monkeypatch.setattr(imaging.Image.Image, "save", failing_jpeg_save)
    report, reasons, _ = _ingest_within(tmp_path, {"00000.tar": tar_of(flatten(samples))})
    assert reasons == {"000000001": "undecodable_image", "000000003": "undecodable_image"}, reasons
    assert report["kept"] == 3 and report["shards"][0]["status"] == "ok"


def test_an_unforeseen_exception_in_the_checks_quarantines_one_sample(tmp_path, monkeypatch):
    import ovtasks.ingest.pipeline as ingest_mod

    real = ingest_mod.detect_language

    def flaky(text):
        if "green" in text:
            raise RuntimeError("language model crashed")
        return real(text)

    monkeypatch.setattr(ingest_mod, "detect_language", flaky)
    samples = {"000000000": good_sample(1), "000000001": {**good_sample(3), "txt": b"a photo of a green ball on the table"}, "000000002": good_sample(2)}
    report, reasons, _ = _ingest_within(tmp_path, {"00000.tar": tar_of(flatten(samples))})
    assert reasons == {"000000001": "check_failed"} and report["kept"] == 2


@pytest.mark.parametrize("meta, reason", [
    ({"punsafe": 0.99, "pad": "x" * (1 << 20)}, "metadata_too_large"),
    ({"punsafe": float("-inf")}, "bad_metadata"),
    ({"punsafe": -3}, "bad_metadata"),
    ({"punsafe": "low"}, "bad_metadata"),
    ({"punsafe": True}, "bad_metadata"),
    ({"punsafe": 0.01, "pwatermark": float("nan")}, "bad_metadata"),
], ids=["json_over_1MiB", "minus_infinity", "negative", "text", "bool", "nan_watermark"])
def test_metadata_that_would_bypass_the_filters(tmp_path, meta, reason):
    bad = {"jpg": encode_image(noise_image(3)), "txt": CAPTION.encode(), "json": json.dumps(meta).encode()}
    report, reasons, out = _ingest_within(tmp_path, {"00000.tar": tar_of(flatten({"000000000": good_sample(1), "000000001": bad}))})
    assert reasons == {"000000001": reason} and report["kept"] == 1
    for line in (out / "quarantine" / "00000.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c} written"))


@pytest.mark.parametrize("caption, reason", [
    (["a", "red", "ball"], "bad_metadata"), ({"text": CAPTION}, "bad_metadata"), (True, "bad_metadata"), (12, "bad_metadata"),
    ("\u200b\u200c\u200d\ufeff", "empty_caption"), ("\x00\x00\x00", "empty_caption"),
    ("\u202a\u202b\u202c\u202d\u202e", "empty_caption"), ("\u2066\u2067\u2068\u2069 \u200e\u200f\u061c", "empty_caption"),
], ids=["list", "dict", "bool", "int", "zero_width", "nuls", "bidi_embeddings", "bidi_isolates_marks"])
def test_captions_that_are_not_text(tmp_path, caption, reason):
    bad = {"jpg": encode_image(noise_image(3)), "json": json.dumps({"caption": caption, "punsafe": 0.01}).encode()}
    report, reasons, _ = _ingest_within(tmp_path, {"00000.tar": tar_of(flatten({"000000000": good_sample(1), "000000001": bad}))})
    assert reasons == {"000000001": reason} and report["kept"] == 1


def test_integer_parquet_keys_match_the_tar_keys(tmp_path):
    samples = {"000000000": good_sample(1), "000000001": {"jpg": encode_image(noise_image(3)), "txt": CAPTION.encode()}}
    rows = [{"key": 0, "punsafe": 0.01, "status": "success"}, {"key": 1, "punsafe": 0.99, "status": "success"}]
    report, reasons, _ = _ingest_within(tmp_path, {"00000.tar": tar_of(flatten(samples)), "00000.parquet": parquet_of(rows)})
    assert reasons == {"000000001": "punsafe"} and report["kept"] == 1  # the parquet's punsafe counted


def test_a_failed_reingest_does_not_leave_the_old_output_complete(tmp_path):
    from ovtasks.data.clean import complete_shards
    from ovtasks.core.storage import open_store

    report, _, out = run_ingest(tmp_path, {"00000.tar": tar_of(flatten({"000000000": good_sample(1)}))})
    assert report["kept"] == 1 and complete_shards(open_store(str(out))) == ["00000"]
    (tmp_path / "src" / "00000.tar").write_bytes(b"\x00garbage, not a tar" * 30)  # the source changed and is now unreadable
    again = ingest(str(tmp_path / "src"), str(out), load_settings(env={}), workers=1).report
    assert again["failed_shards"] == 1
    assert complete_shards(open_store(str(out))) == [] and not (out / "shards" / "00000.tar").exists()


def test_a_name_with_a_trailing_newline_is_not_a_shard(tmp_path):
    from ovtasks.core.storage import open_store

    src = tmp_path / "src"
    src.mkdir()
    (src / "00000.tar").write_bytes(tar_of(flatten({"000000000": good_sample(1)})))
    (src / "00000.tar\n").write_bytes(tar_of(flatten({"000000000": good_sample(1)})))
    assert list_shards(open_store(str(src))) == ["00000"]
    report = ingest(str(src), str(tmp_path / "out"), load_settings(env={}), workers=1).report
    assert report["kept"] == 1 and report["quarantined"] == {}


def test_parquet_rows_without_samples_cost_an_index_line_not_a_tar_member(tmp_path):
    rows = [{"key": f"{i:09d}", "TEXT": CAPTION, "status": "success"} for i in range(2000)]
    report, reasons, out = run_ingest(tmp_path, {"00000.tar": tar_of(flatten({"000000000": good_sample(1)})), "00000.parquet": parquet_of(rows)})
    assert report["quarantined"] == {"missing_image": 1999} and len(reasons) == 1999
    assert (out / "quarantine" / "00000.tar").stat().st_size < 10_000  # 2 KB per missing row before


def test_a_failed_shard_manifest_hashes_the_whole_source(tmp_path):
    import hashlib

    broken = _good_members("000000000", 1) + b"\x01" * BLOCK + _good_members("000000001", 2) + _end()  # a damaged header
    report, _, out = run_ingest(tmp_path, {"00000.tar": broken})
    assert report["shards"][0]["status"] == "failed"
    manifest = json.loads((out / "shards" / "00000.manifest.json").read_text())
    assert manifest["source"]["sha256"] == hashlib.sha256(broken).hexdigest() and manifest["source"]["bytes"] == len(broken)


def test_scratch_left_by_a_killed_run_is_removed_by_the_next(tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    code = ("import os, sys; from ovtasks.core.storage import open_store; d = open_store(sys.argv[1]).scratch_dir(); "
            "open(os.path.join(d, 'staged.tar'), 'wb').write(b'x' * 1000); print(d, flush=True); os.kill(os.getpid(), 9)")
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120)
    left = Path(r.stdout.strip())
    assert r.returncode == -9 and left.is_dir() and left.parent == out  # what SIGKILL leaves behind
    run_ingest(tmp_path, {"00000.tar": tar_of(flatten({"000000000": good_sample(1)}))})
    assert not left.exists() and not [p for p in out.iterdir() if p.name.startswith(".ovtmp-")]
    from ovtasks.core.storage import open_store

    mine = Path(open_store(str(out)).scratch_dir())  # a live process's scratch is never touched
    open_store(str(out)).scratch_dir()
    assert mine.is_dir() and str(os.getpid()) in mine.name


def test_coco_image_ids_are_unique_for_every_key_ingest_keeps(tmp_path):
    from ovtasks.data.clean import complete_shards, image_id, iter_shard
    from ovtasks.core.storage import open_store

    assert image_id("000000012") == 12 and image_id("dir/00012") != image_id("dir/00013")
    assert image_id("dir/00012") >= 1 << 52 and image_id("1" * 16) >= 1 << 52 and image_id("x" * 5000) < 1 << 53
    shard0 = {"dir/00012": good_sample(1), "dir/00013": good_sample(2), "1": good_sample(3), "000000001": good_sample(4)}
    shard1 = {"0001": good_sample(5), "dir/00014": good_sample(6)}
    report, reasons, out = _ingest_within(tmp_path, {"00000.tar": tar_of(flatten(shard0)), "00001.tar": tar_of(flatten(shard1))})
    assert reasons == {"000000001": "duplicate_image_id", "0001": "duplicate_image_id"}, reasons
    store = open_store(str(out))
    ids = [s.image_id for sh in complete_shards(store) for s in iter_shard(store, sh)]
    assert len(ids) == len(set(ids)) == report["kept"] == 4


def test_a_parquet_with_too_many_rows_fails_its_shard_unread(tmp_path):
    rows = [{"key": f"{i:09d}", "TEXT": CAPTION, "status": "success"} for i in range(300)]
    report, _, _ = run_ingest(tmp_path, {"00000.tar": tar_of(flatten({"000000000": good_sample(1)})), "00000.parquet": parquet_of(rows),
                                   "00001.tar": tar_of(flatten({"000010000": good_sample(2)}))}, max_parquet_rows=200)
    failed = {e["shard"]: e for e in report["shards"]}
    assert failed["00000"]["status"] == "failed" and "300 rows > ingest.max_parquet_rows 200" in failed["00000"]["error"]
    assert report["kept"] == 1  # the other shard goes on
