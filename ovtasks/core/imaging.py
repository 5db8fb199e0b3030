"""Image decoding with the ingest guards, RGB normalisation and a 64-bit perceptual hash."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ovtasks.core.config import IngestConfig


class ImageRejected(Exception):
    """The image cannot be used; ``reason`` is a stable quarantine code, ``detail`` is for humans."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, EXIF orientation applied; decoded for checks only: luma (L) at 1/2-1/8 scale (see `size`)
    data: bytes  # JPEG bytes to publish (the original when it needed no change)
    source_format: str
    source_mode: str
    reencoded: bool
    size: tuple[int, int]  # (width, height) of the published image


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: transparency composited on white, 16/32-bit scaled to 8 bits."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0
        elif mode == "F":
            lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
            arr = (arr - lo) / (hi - lo or 1.0) * 255.0
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
        if mode == "RGB":
            return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def decode_image(data: bytes, cfg: IngestConfig, check_side: int | None = None) -> DecodedImage:
    """Decode ``data`` with every guard of the ingest stage; raise :class:`ImageRejected`.

    The header is checked first: the declared size against ``cfg.max_pixels`` (before any pixel is
    allocated), then the minimum side and aspect ratio (``too_small``, ``bad_aspect_ratio``: no pixel is
    decoded for them). An image published as its original bytes (an RGB JPEG without EXIF rotation) is
    decoded at reduced scale when ``check_side`` is given: libjpeg's DCT scaling to 1/2, 1/4 or 1/8, no
    smaller than ``check_side`` on either side. Every entropy-coded byte is still read, so a truncated or
    corrupt file fails exactly as in a full decode; only the inverse DCT, upsampling and colour
    conversion run on fewer pixels, and only for the luma channel: ``image`` is then that small grey view (all a
    32x32 grey hash needs; libjpeg skips the chroma channels' inverse DCT, upsampling and colour conversion).
    """
    if not data:
        raise ImageRejected("empty_image", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageRejected("decompression_bomb", str(exc)) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected("undecodable_image", str(exc) or type(exc).__name__) from exc
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageRejected("undecodable_image", f"declared size {w}x{h}")
    if w * h > cfg.max_pixels:
        raise ImageRejected("decompression_bomb", f"declared {w}x{h} = {w * h} px > {cfg.max_pixels}")
    try:
        frames = getattr(im, "n_frames", 1)  # a multi-page TIFF with an empty page raises here (TypeError)
    except Exception as exc:  # noqa: BLE001 - whatever the decoder raises, it is this image's defect
        raise ImageRejected("undecodable_image", f"frame count: {type(exc).__name__}: {exc}") from exc
    if frames > 1 and not cfg.allow_animated:
        raise ImageRejected("animated_image", f"{im.format} with {frames} frames")
    fmt, mode = im.format or "", im.mode
    try:  # EXIF sits in the header; a hostile EXIF block is this image's defect
        orientation = im.getexif().get(0x0112, 1) if fmt in ("JPEG", "TIFF", "WEBP", "PNG") else 1
    except (OSError, ValueError, TypeError, SyntaxError, KeyError, IndexError, ZeroDivisionError, MemoryError) as exc:
        raise ImageRejected("undecodable_image", f"reading EXIF: {type(exc).__name__}: {exc}") from exc
    size = (h, w) if orientation in _ROTATED else (w, h)
    if min(size) < cfg.min_side:
        raise ImageRejected("too_small", f"{size[0]}x{size[1]}, min side {cfg.min_side}")
    if max(size) / min(size) > cfg.max_aspect_ratio:
        raise ImageRejected("bad_aspect_ratio", f"{size[0]}x{size[1]} > {cfg.max_aspect_ratio}:1")
    write_through = fmt == "JPEG" and mode == "RGB" and orientation in (1, None)
    if write_through and check_side:
        im.draft("L", (check_side, check_side))  # luma only: chroma is entropy-decoded, never transformed
    # the bytes are in memory already: hand the decoder all of them in one call instead of 64 KiB pieces (libjpeg
    # suspends and resumes at each piece's end; ~20 us of a 0.8 ms reduced-scale decode at 100 KB)
    im.decodermaxblock = max(im.decodermaxblock, len(data))
    try:
        im.load()
    except OSError as exc:
        msg = str(exc)
        reason = "truncated_image" if "truncat" in msg.lower() or "broken data stream" in msg.lower() else "undecodable_image"
        raise ImageRejected(reason, msg) from exc
    except (ValueError, SyntaxError, MemoryError, Image.DecompressionBombError) as exc:
        raise ImageRejected("undecodable_image", str(exc) or type(exc).__name__) from exc
    if write_through:
        return DecodedImage(im, data, fmt, mode, reencoded=False, size=size)
    try:  # mode conversion and the JPEG re-encode can still fail on a hostile file
        out = ImageOps.exif_transpose(im) if orientation not in (1, None) else im
        rgb = _to_rgb(out)
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=cfg.reencode_quality)
    except (OSError, ValueError, TypeError, SyntaxError, KeyError, IndexError, ZeroDivisionError, MemoryError) as exc:
        raise ImageRejected("undecodable_image", f"normalising to RGB JPEG: {type(exc).__name__}: {exc}") from exc
    return DecodedImage(rgb, buf.getvalue(), fmt, mode, reencoded=True, size=rgb.size)


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


HASH_SIDE = 32  # phash64's thumbnail side
HASH_DECIMALS = 6  # phash64's DCT coefficients are compared at this precision
_DCT8 = _dct_matrix(HASH_SIDE)[:8]  # only the 8 lowest frequencies are needed
_DCT8_T = np.ascontiguousarray(_DCT8.T)


def phash64(image: Image.Image) -> int:
    """64-bit DCT perceptual hash (8x8 low frequencies of a 32x32 grey thumbnail vs their median).

    Same construction as ``imagehash.phash``; a few bits differ between near-identical images.
    """
    thumb = image.resize((HASH_SIDE, HASH_SIDE), Image.BOX, reducing_gap=2.0)
    if thumb.mode != "L":
        thumb = thumb.convert("L")
    grey = np.frombuffer(thumb.tobytes(), dtype=np.uint8).reshape(HASH_SIDE, HASH_SIDE)  # (asarray is slower)
    # the uint8 thumbnail is promoted to float64 by the product. Rounded to 1e-6: a flat or symmetric thumbnail has
    # coefficients that are exactly 0 but come out as +-1e-13 rounding noise whose signs depend on the BLAS kernel
    # (the CPU), and its hash would be that noise; real coefficients of 8-bit pixels are far from 1e-6 apart
    flat = np.round(_DCT8 @ grey @ _DCT8_T, HASH_DECIMALS).ravel()
    mid = np.partition(flat, (31, 32))  # the two middle values, as a full sort would place them
    median = (mid[31] + mid[32]) * 0.5
    return int.from_bytes(np.packbits(flat > median).tobytes(), "big")


class NearDuplicateIndex:
    """Finds a stored 64-bit hash within Hamming distance ``max_distance`` of a query.

    Multi-index hashing: the hash is cut into ``max_distance + 1`` bands; by pigeonhole two hashes
    within the distance agree exactly on at least one band, so only that band's bucket is scanned.
    """

    def __init__(self, max_distance: int):
        self.max_distance = max_distance
        nb = max_distance + 1
        edges = np.linspace(0, 64, nb + 1).astype(int)
        self._bands = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
        self._tables: list[dict[int, list[tuple[int, str]]]] = [{} for _ in self._bands]

    def _parts(self, h: int):
        for (a, b), table in zip(self._bands, self._tables):
            yield table, (h >> a) & ((1 << (b - a)) - 1)

    def find(self, h: int) -> str | None:
        for table, part in self._parts(h):
            for other, ident in table.get(part, ()):
                if (h ^ other).bit_count() <= self.max_distance:
                    return ident
        return None

    def add(self, h: int, ident: str) -> None:
        for table, part in self._parts(h):
            table.setdefault(part, []).append((h, ident))

    def find_or_add(self, h: int, ident: str) -> str | None:
        """The earlier near copy's ident, or None after storing ``h`` as ``ident``."""
        original = self.find(h)
        if original is None:
            self.add(h, ident)
        return original


def grow_box(box, margin: float, hw: tuple[int, int]) -> tuple[float, float, float, float]:
    """xyxy ``box`` grown by ``margin`` x its width / height on each side, clipped to the ``(H, W)`` image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if margin <= 0:
        return x1, y1, x2, y2
    h, w = hw
    dx, dy = margin * (x2 - x1), margin * (y2 - y1)
    return max(0.0, x1 - dx), max(0.0, y1 - dy), min(float(w), x2 + dx), min(float(h), y2 + dy)
