"""Bad-input corpus: every kind is built here, ingested next to a good sample, and must end with
its exact quarantine reason (or be kept, converted) while seen == kept + quarantined holds."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovtasks.core.shards import iter_tar_samples
from tests.support.shard_builders import CAPTION, encode_image, flatten, good_sample, noise_image, parquet_of, run_ingest, tar_of


def _kept(out: Path) -> dict[str, dict]:
    kept = {}
    for p in sorted((out / "shards").glob("*.tar")):
        with open(p, "rb") as fh:
            for raw in iter_tar_samples(fh, {}, 1 << 40):
                kept[raw.key] = {**json.loads(raw.members["json"]), "_jpg": raw.members["jpg"]}
    return kept


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(w: int, h: int) -> bytes:
    """A tiny file declaring a w x h image: a bomb if anything allocated the declared size."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b"")


def _animated_gif() -> bytes:
    frames = [noise_image(i, mode="P") for i in range(3)]
    return encode_image(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


def _exif_rotated() -> bytes:
    im = noise_image(50, size=(160, 90))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    return encode_image(im, exif=exif.tobytes())


# (kind, bad sample members, expected quarantine reason)
REJECTED = [
    ("truncated_jpeg", lambda: {"jpg": encode_image(noise_image(9))[:700], "txt": CAPTION.encode()}, "truncated_image"),
    ("zero_bytes", lambda: {"jpg": b"", "txt": CAPTION.encode()}, "empty_image"),
    ("garbage_bytes", lambda: {"jpg": b"\x00\x01not an image at all" * 20, "txt": CAPTION.encode()}, "undecodable_image"),
    ("animated_gif", lambda: {"gif": _animated_gif(), "txt": CAPTION.encode()}, "animated_image"),
    ("huge_declared_size", lambda: {"png": _png_header_only(60000, 60000), "txt": CAPTION.encode()}, "decompression_bomb"),
    ("bomb_below_pil_limit", lambda: {"png": _png_header_only(9000, 9000), "txt": CAPTION.encode()}, "decompression_bomb"),
    ("non_utf8_caption", lambda: {"jpg": encode_image(noise_image(10)), "txt": "un café crème".encode("latin-1")}, "caption_not_utf8"),
    ("empty_caption", lambda: {"jpg": encode_image(noise_image(11)), "txt": b"   \n\t "}, "empty_caption"),
    ("caption_100kb", lambda: {"jpg": encode_image(noise_image(12)), "txt": b"a red ball " * 10_000}, "caption_too_long"),
    ("no_image_member", lambda: {"txt": CAPTION.encode(), "json": b"{}"}, "missing_image"),
    ("non_english", lambda: {"jpg": encode_image(noise_image(13)), "txt": "Ein schönes Foto von einem roten Ball auf dem Küchentisch".encode()}, "non_english"),
    ("high_punsafe", lambda: {"jpg": encode_image(noise_image(14)), "txt": CAPTION.encode(), "json": b'{"punsafe": 0.97}'}, "punsafe"),
    ("too_small", lambda: {"jpg": encode_image(noise_image(15, size=(40, 40))), "txt": CAPTION.encode()}, "too_small"),
    ("bad_aspect", lambda: {"jpg": encode_image(noise_image(16, size=(400, 70))), "txt": CAPTION.encode()}, "bad_aspect_ratio"),
    ("failed_download_status", lambda: {"jpg": encode_image(noise_image(17)), "txt": CAPTION.encode(), "json": b'{"status": "failed_to_download"}'}, "download_failed"),
]


@pytest.mark.parametrize("kind, build, reason", REJECTED, ids=[r[0] for r in REJECTED])
def test_rejected_kinds(tmp_path, kind, build, reason):
    samples = {"000000000": good_sample(1), "000000001": build(), "000000002": good_sample(2)}
    report, reasons, out = run_ingest(tmp_path, {"00000.tar": tar_of(flatten(samples))})
    assert reasons == {"000000001": reason}
    assert report["seen"] == 3 and report["kept"] == 2 and report["quarantined"] == {reason: 1}
    assert report["failed_shards"] == 0
    assert set(_kept(out)) == {"000000000", "000000002"}


def test_cmyk_is_converted(tmp_path):
    samples = {"000000000": {"jpg": encode_image(noise_image(20, mode="CMYK")), "txt": CAPTION.encode()}}
    report, reasons, out = run_ingest(tmp_path, {"00000.tar": tar_of(flatten(samples))})
    meta = _kept(out)["000000000"]
    assert meta["source_mode"] == "CMYK" and meta["reencoded"]
    assert Image.open(io.BytesIO(meta["_jpg"])).mode == "RGB"


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.full((90, 120), 40000, dtype=np.uint16)  # 40000/65535 -> ~155 in 8 bits
    arr[:, :60] = 10000
    png = encode_image(Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(png)).mode.startswith("I")
    samples = {"000000000": {"png": png, "txt": CAPTION.encode()}}
    _, reasons, out = run_ingest(tmp_path, {"00000.tar": tar_of(flatten(samples))})
    img = np.asarray(Image.open(io.BytesIO(_kept(out)["000000000"]["_jpg"])).convert("L"), np.float32)
    assert abs(img[:, 80:].mean() - 40000 / 257) < 3 and abs(img[:, :40].mean() - 10000 / 257) < 3


def test_palette_with_transparency_and_la(tmp_path):
    p = noise_image(21, mode="P")
    p.info["transparency"] = 0
    la = noise_image(22, mode="LA")
    samples = {"000000000": {"png": encode_image(p, "PNG", transparency=0), "txt": CAPTION.encode()},
               "000000001": {"png": encode_image(la, "PNG"), "txt": CAPTION.encode()}}
    _, reasons, out = run_ingest(tmp_path, {"00000.tar": tar_of(flatten(samples))})
    kept = _kept(out)
    assert reasons == {} and {m["source_mode"] for m in kept.values()} == {"P", "LA"}


def test_exif_orientation_applied(tmp_path):
    samples = {"000000000": {"jpg": _exif_rotated(), "txt": CAPTION.encode()}}
    _, _, out = run_ingest(tmp_path, {"00000.tar": tar_of(flatten(samples))})
    meta = _kept(out)["000000000"]
    assert (meta["width"], meta["height"]) == (90, 160) and meta["reencoded"]
    assert Image.open(io.BytesIO(meta["_jpg"])).size == (90, 160)


def test_duplicate_keys(tmp_path):
    members = flatten({"000000000": good_sample(1), "000000001": good_sample(2)}) + flatten({"000000000": good_sample(3)})
    report, reasons, out = run_ingest(tmp_path, {"00000.tar": tar_of(members)})
    assert report["quarantined"] == {"duplicate_key": 1} and report["kept"] == 2
    assert _kept(out)["000000000"]["_jpg"] == good_sample(1)["jpg"]  # the first occurrence wins


def test_path_traversal_and_links_never_extracted(tmp_path):
    link = tarfile.TarInfo("000000002.jpg")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    members = flatten({"000000000": good_sample(1)}) + [("../../evil.jpg", good_sample(4)["jpg"]), ("../../evil.txt", CAPTION.encode())]
    report, reasons, out = run_ingest(tmp_path, {"00000.tar": tar_of(members, [link])})
    assert reasons == {"../../evil": "unsafe_member_path", "000000002": "unsafe_member_type"}
    assert report["kept"] == 1
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path.parent / "evil.jpg").exists()
    for p in out.rglob("*"):
        assert p.resolve().is_relative_to(out.resolve())


def test_truncated_tar_fails_shard_but_not_run(tmp_path):
    good = tar_of(flatten({f"00001{i:04d}": good_sample(30 + i) for i in range(3)}))
    whole = tar_of(flatten({f"00000{i:04d}": good_sample(40 + i) for i in range(4)}))
    truncated = whole[: len(whole) * 2 // 3]
    report, reasons, out = run_ingest(tmp_path, {"00000.tar": truncated, "00001.tar": good})
    shards = {e["shard"]: e for e in report["shards"]}
    assert shards["00000"]["status"] == "failed" and "truncated_tar" in shards["00000"]["error"]
    assert shards["00001"]["status"] == "ok" and shards["00001"]["kept"] == 3
    assert report["failed_shards"] == 1
    assert "truncated_tar" in report["quarantined"] and shards["00000"]["kept"] >= 1
    manifest = json.loads((out / "shards" / "00000.manifest.json").read_text())
    assert manifest["status"] == "partial"


def test_truncated_tar_with_parquet_accounts_for_missing_rows(tmp_path):
    samples = {f"00000{i:04d}": good_sample(60 + i) for i in range(4)}
    whole = tar_of(flatten(samples))
    rows = [{"key": k, "URL": f"http://x/{k}", "TEXT": CAPTION, "punsafe": 0.0, "status": "success"} for k in samples]
    report, reasons, _ = run_ingest(tmp_path, {"00000.tar": whole[: len(whole) // 2], "00000.parquet": parquet_of(rows)})
    assert report["seen"] == 4  # rows never reached in the tar are counted, not lost
    assert report["quarantined"].get("truncated_tar", 0) >= 2


def test_unreadable_parquet_fails_shard_only(tmp_path):
    files = {"00000.tar": tar_of(flatten({"000000000": good_sample(1)})), "00000.parquet": b"PAR1 this is not parquet",
             "00001.tar": tar_of(flatten({"000010000": good_sample(2)}))}
    report, _, _ = run_ingest(tmp_path, files)
    shards = {e["shard"]: e for e in report["shards"]}
    assert shards["00000"]["status"] == "failed" and "unreadable_parquet" in shards["00000"]["error"]
    assert shards["00001"]["kept"] == 1 and report["failed_shards"] == 1


def test_missing_caption_column(tmp_path):
    samples = {"000000000": {"jpg": encode_image(noise_image(5)), "json": b'{"url": "http://x"}'}}
    rows = [{"key": "000000000", "URL": "http://x", "punsafe": 0.0}]
    report, reasons, _ = run_ingest(tmp_path, {"00000.tar": tar_of(flatten(samples)), "00000.parquet": parquet_of(rows)})
    assert reasons == {"000000000": "missing_caption"}


def test_relaion_columns(tmp_path):
    samples = {"000000000": {"jpg": encode_image(noise_image(6))}, "000000001": {"jpg": encode_image(noise_image(7))}}
    rows = [{"key": "000000000", "url": "http://a", "caption": CAPTION, "punsafe": 0.1, "status": "success"},
            {"key": "000000001", "url": "http://b", "caption": CAPTION, "punsafe": 0.9, "status": "success"}]
    report, reasons, out = run_ingest(tmp_path, {"00000.tar": tar_of(flatten(samples)), "00000.parquet": parquet_of(rows)})
    assert reasons == {"000000001": "punsafe"}
    meta = _kept(out)["000000000"]
    assert meta["caption"] == CAPTION and meta["url"] == "http://a"


def test_parquet_row_without_tar_sample(tmp_path):
    rows = [{"key": "000000000", "TEXT": CAPTION, "status": "success"}, {"key": "000000009", "TEXT": CAPTION, "status": "success"},
            {"key": "000000010", "TEXT": CAPTION, "status": "failed_to_download"}]
    report, reasons, _ = run_ingest(tmp_path, {"00000.tar": tar_of(flatten({"000000000": good_sample(1)})), "00000.parquet": parquet_of(rows)})
    assert reasons == {"000000009": "missing_image"} and report["kept"] == 1


def test_oversized_image_not_read(tmp_path):
    samples = {"000000000": {"jpg": encode_image(noise_image(8)) + b"\x00" * 5000, "txt": CAPTION.encode()}}
    _, reasons, _ = run_ingest(tmp_path, {"00000.tar": tar_of(flatten(samples))}, max_image_bytes=4000)
    assert reasons == {"000000000": "image_too_large"}


def test_exact_duplicate_across_shards(tmp_path):
    files = {"00000.tar": tar_of(flatten({"000000000": good_sample(1)})), "00001.tar": tar_of(flatten({"000010000": good_sample(1)}))}
    report, reasons, _ = run_ingest(tmp_path, files)
    assert reasons == {"000010000": "near_duplicate"} and report["kept"] == 1


def _assert_canonical(out: Path, tar: str) -> list[str]:
    """The tar holds exactly the bytes a parse and rewrite of its samples gives; returns its keys."""
    from ovtasks.core.shards import ShardWriter

    data = (out / tar).read_bytes()
    buf = io.BytesIO()
    with ShardWriter(buf) as w:
        keys = []
        for raw in iter_tar_samples(io.BytesIO(data), {}, 1 << 40):
            w.add(raw.key, raw.members)
            keys.append(raw.key)
    assert buf.getvalue() == data, tar
    return keys


def _assert_manifest_checksums(out: Path, shard: str) -> dict:
    import hashlib

    manifest = json.loads((out / f"shards/{shard}.manifest.json").read_text())
    for key, f in manifest["files"].items():
        data = (out / key).read_bytes()
        assert hashlib.sha256(data).hexdigest() == f["sha256"] and len(data) == f["bytes"], key
    return manifest


def test_cross_shard_drops_leave_canonical_tars(tmp_path):
    """Shard 1 loses two samples that shard 0 already has (one in the middle, one last, one under a key longer
    than a ustar name) after one of its own was quarantined: its published tars hold exactly the
    samples a parse and rewrite would, byte for byte, and every sample is in one of them."""
    long_key = "k" * 120
    files = {"00000.tar": tar_of(flatten({"000000000": good_sample(1), "000000001": good_sample(2)})),
             "00001.tar": tar_of(flatten({"000010000": good_sample(3), "000010001": {"jpg": b"", "txt": CAPTION.encode()},
                                          "000010002": good_sample(1), long_key: good_sample(4),
                                          "000010004": good_sample(5), "000010005": good_sample(2)}))}
    report, reasons, out = run_ingest(tmp_path, files)
    assert reasons == {"000010001": "empty_image", "000010002": "near_duplicate", "000010005": "near_duplicate"}
    assert _assert_canonical(out, "shards/00001.tar") == ["000010000", long_key, "000010004"]
    keys = _assert_canonical(out, "quarantine/00001.tar")
    assert [k.split("_", 1)[1] for k in keys] == ["000010001", "000010002", "000010005"], keys
    manifest = _assert_manifest_checksums(out, "00001")
    assert manifest["counts"] == {"seen": 6, "kept": 3, "quarantined": {"empty_image": 1, "near_duplicate": 2}}


@pytest.mark.parametrize("dropped", [(0,), (0, 1), (0, 1, 2), (2,)], ids=["first", "first-two", "all", "last"])
def test_cross_shard_drops_in_place_at_any_position(tmp_path, dropped):
    """Publishing removes cross-shard duplicates from the staged tar in place (the bytes before the first one are
    only read for the checksum): whichever kept samples go, first, all or last, the published tars are canonical,
    hold the right samples in order, and the manifest's checksums are those of the files."""
    shard1 = {f"00001000{i}": good_sample(1 + i if i in dropped else 10 + i) for i in range(3)}
    files = {"00000.tar": tar_of(flatten({f"00000000{i}": good_sample(1 + i) for i in range(3)})),
             "00001.tar": tar_of(flatten({"000010009": {"jpg": b"", "txt": CAPTION.encode()}, **shard1}))}
    report, reasons, out = run_ingest(tmp_path, files)
    assert reasons == {"000010009": "empty_image", **{f"00001000{i}": "near_duplicate" for i in dropped}}
    assert _assert_canonical(out, "shards/00001.tar") == [f"00001000{i}" for i in range(3) if i not in dropped]
    keys = _assert_canonical(out, "quarantine/00001.tar")
    assert [k.split("_", 1)[1] for k in keys] == ["000010009", *(f"00001000{i}" for i in dropped)]
    manifest = _assert_manifest_checksums(out, "00001")
    assert manifest["counts"]["kept"] == 3 - len(dropped)
    assert not [p for p in out.rglob("*") if ".ovtmp-" in p.name or p.name.endswith((".kept.tar", ".rejected.tar"))]


def test_every_reason_is_documented():
    from ovtasks.ingest.pipeline import REASONS

    for _, _, reason in REJECTED:
        assert reason in REASONS
