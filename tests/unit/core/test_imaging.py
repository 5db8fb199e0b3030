import io

import numpy as np
import pytest
from PIL import Image

from ovtasks.core.config import IngestConfig
from ovtasks.core.imaging import ImageRejected, NearDuplicateIndex, decode_image, phash64


def _noise(seed: int, size=(96, 80)) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


def _jpeg(im: Image.Image, q=90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=q)
    return buf.getvalue()


def test_phash_near_and_far():
    a, b = _noise(1), _noise(2)
    ha = phash64(a)
    h_re = phash64(Image.open(io.BytesIO(_jpeg(a, 60))))
    h_b = phash64(b)
    assert (ha ^ h_re).bit_count() <= 4
    assert (ha ^ h_b).bit_count() > 12
    assert 0 <= ha < 2**64


def test_phash_agrees_with_imagehash_construction():
    imagehash = pytest.importorskip("imagehash")
    im = _noise(3, (128, 128))
    ours = phash64(im)
    theirs = int(str(imagehash.phash(im)), 16)
    assert (ours ^ theirs).bit_count() <= 8  # same construction, different resampling filter


def test_phash_is_the_sorted_median_formulation_bit_for_bit():
    """The hash decides near-duplicates, so a faster formulation must not move a single bit: the
    float64 product on the uint8 thumbnail and the partitioned median equal the explicit cast, another
    BLAS kernel (the transposed matrix not made contiguous) and a full sort, on noise, flat and two-level
    images. (Flat and two-level thumbnails have coefficients that are exactly zero in theory and +-1e-13 in
    floating point, with signs that depend on the kernel: without the rounding this failed on one CPU.)"""
    from ovtasks.core.imaging import HASH_DECIMALS, HASH_SIDE, _DCT8

    def reference(image):
        thumb = image.resize((HASH_SIDE, HASH_SIDE), Image.BOX, reducing_gap=2.0).convert("L")
        grey = np.frombuffer(thumb.tobytes(), dtype=np.uint8).reshape(HASH_SIDE, HASH_SIDE)
        flat = np.round(_DCT8 @ grey.astype(np.float64) @ _DCT8.T, HASH_DECIMALS).ravel()
        median = np.sort(flat)[31:33].mean()
        return int.from_bytes(np.packbits(flat > median).tobytes(), "big")

    rng = np.random.default_rng(0)
    images = [_noise(k, (int(rng.integers(40, 200)), int(rng.integers(40, 200)))) for k in range(200)]
    images += [Image.new("RGB", (64, 64), (c, c, c)) for c in (0, 128, 255)]
    half = np.zeros((64, 64, 3), np.uint8)
    half[:, 32:] = 255
    images.append(Image.fromarray(half))
    assert [phash64(im) for im in images] == [reference(im) for im in images]
    assert phash64(images[201]) == 1 << 63  # flat grey: the DC coefficient alone is above the median


@pytest.mark.parametrize("distance", [0, 2, 4, 8])
def test_near_duplicate_index_matches_brute_force(distance):
    rng = np.random.default_rng(distance)
    index = NearDuplicateIndex(distance)
    stored = []
    for i in range(300):
        h = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))
        if i % 3 == 0 and stored:  # plant near copies
            base = stored[int(rng.integers(len(stored)))][0]
            flips = rng.choice(64, size=int(rng.integers(0, distance + 3)), replace=False)
            h = base
            for f in flips:
                h ^= 1 << int(f)
        brute = next((ident for other, ident in stored if (h ^ other).bit_count() <= distance), None)
        found = index.find(h)
        assert (found is None) == (brute is None)
        if found is None:
            index.add(h, str(i))
            stored.append((h, str(i)))


def test_decode_rejects_and_converts():
    cfg = IngestConfig()
    with pytest.raises(ImageRejected) as e:
        decode_image(b"", cfg)
    assert e.value.reason == "empty_image"
    with pytest.raises(ImageRejected) as e:
        decode_image(b"GIF89a not really", cfg)
    assert e.value.reason == "undecodable_image"
    data = _jpeg(_noise(4))
    with pytest.raises(ImageRejected) as e:
        decode_image(data[: len(data) // 2], cfg)
    assert e.value.reason == "truncated_image"
    ok = decode_image(data, cfg)
    assert ok.data == data and not ok.reencoded and ok.image.mode == "RGB"


def test_checks_from_the_header_and_a_reduced_scale_view():
    """Size and aspect are judged from the header (EXIF rotation applied), before any pixel is decoded;
    a write-through JPEG decoded for checks only is a 1/2-1/8 view that still hashes like the full image,
    and a truncated file fails exactly as in a full decode."""
    cfg = IngestConfig()
    big = _noise(5, (512, 384))
    data = _jpeg(big)
    full = decode_image(data, cfg)
    view = decode_image(data, cfg, check_side=32)
    assert full.image.size == full.size == view.size == (512, 384)
    assert view.image.size == (64, 48) and view.data == data and not view.reencoded
    assert view.image.mode == "L" and full.image.mode == "RGB"  # the view is luma only: chroma is never transformed
    assert (phash64(full.image) ^ phash64(view.image)).bit_count() <= 4  # as much as a JPEG re-encode moves it
    for cut in (len(data) // 2, len(data) - 40):
        with pytest.raises(ImageRejected) as e:
            decode_image(data[:cut], cfg, check_side=32)
        assert e.value.reason == "truncated_image"
    # a truncated small image is rejected for its size without its pixels being read
    small = _jpeg(_noise(6, (48, 200)))
    with pytest.raises(ImageRejected) as e:
        decode_image(small[: len(small) // 2], cfg)
    assert e.value.reason == "too_small" and "48x200" in e.value.detail
    with pytest.raises(ImageRejected) as e:
        decode_image(_jpeg(_noise(7, (400, 96))), cfg)
    assert e.value.reason == "bad_aspect_ratio"
    # EXIF orientation 6 (rotate 90): the published image is 96 x 160, re-encoded, decoded in full
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    _noise(8, (160, 96)).save(buf, "JPEG", quality=90, exif=exif)
    rotated = decode_image(buf.getvalue(), cfg, check_side=32)
    assert rotated.reencoded and rotated.size == rotated.image.size == (96, 160)
