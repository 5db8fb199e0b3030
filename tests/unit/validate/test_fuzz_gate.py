"""A structure-aware fuzzer for the second half of the pipeline (Hypothesis, seeded and bounded): pseudo-label
shards into the GX gate and the training loader, and image files into ``ovtasks predict`` / the served model.

Pseudo-label shards are built from the parts a real one has (images with ids and sizes, annotations with
boxes, RLE masks, ids, scores, categories) and then damaged as the red team did: non-finite, negative,
string or wrong-length boxes, RLEs that lie about their size or hold garbage, list / string / missing ids,
thousands of instances on one image, category tables that do not match. Properties of every example: the gate
finishes (no hang) within bounded memory, the shard either passes or fails with reasons (never an exception),
the good shard beside it always passes, and a shard that passes gives the trainer only finite boxes and masks of
its image's size. Image files: every one is either decoded to an 8-bit RGB array within the pixel cap or skipped
with an ingest reason.

The default suite runs ``FUZZ_EXAMPLES`` (default 30: 5 shards, 30 images); ``make fuzz`` runs thousands.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from ovtasks.core.config import load_settings
from ovtasks.data.groundtruth import encode_rle
from ovtasks.pseudolabel.candidates import Vocabulary
from ovtasks.validate.expectations import validate
from tests.support.bounded import call_within
from tests.unit.validate.test_validate import _write_shard, good_doc

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "30"))
SEED = int(os.environ.get("FUZZ_SEED", "20261208"))
VOCAB = Vocabulary.load(None)
HOSTILE_NUMBER = st.one_of(st.integers(-50, 80), st.floats(allow_nan=True, allow_infinity=True, width=32, allow_subnormal=False),
                           st.sampled_from(["3", "", None, True, [1], {"v": 1}]))


@st.composite
def segmentation(draw, h: int, w: int):
    kind = draw(st.sampled_from(["good", "good", "huge_size", "garbage", "wrong_size", "not_a_dict", "empty", "list_counts"]))
    if kind in ("good", "wrong_size", "empty"):
        m = np.zeros((h, w) if kind != "wrong_size" else (h + 3, w + 1), bool)
        if kind != "empty":
            y, x = draw(st.integers(0, max(0, h - 2))), draw(st.integers(0, max(0, w - 2)))
            m[y:y + draw(st.integers(1, 8)), x:x + draw(st.integers(1, 8))] = True
        return encode_rle(m)
    if kind == "huge_size":
        return {"size": [draw(st.integers(10_000, 40_000))] * 2, "counts": draw(st.text("0123456789abcdefghij", max_size=40))}
    if kind == "garbage":
        return {"size": [h, w], "counts": draw(st.text(max_size=30))}
    if kind == "list_counts":
        return {"size": [h, w], "counts": draw(st.lists(st.integers(-5, 500), max_size=8))}
    return draw(st.sampled_from(["counts", 7, None, [1, 2]]))


@st.composite
def shards(draw):
    doc = good_doc()
    images = doc["images"]
    n_bad_images = draw(st.integers(0, 2))
    for _ in range(n_bad_images):
        images.append({"id": draw(st.one_of(st.integers(0, 9), st.text(max_size=3), st.none())),
                       "height": draw(HOSTILE_NUMBER), "width": draw(HOSTILE_NUMBER)})
    anns = doc["annotations"]
    for i in range(draw(st.integers(0, 6))):
        h, w = 20, 20
        ann = {"id": 100 + i, "image_id": draw(st.one_of(st.integers(0, 5), st.just([0]), st.just("0"), st.none())),
               "category_id": draw(st.one_of(st.sampled_from([e.id for e in VOCAB.entries[:3]]), st.integers(-3, 10**7), st.just("7"))),
               "category_name": draw(st.one_of(st.sampled_from([e.name for e in VOCAB.entries[:3]]), st.text(max_size=5))),
               "known_category": draw(st.booleans()),
               "bbox": draw(st.one_of(st.lists(HOSTILE_NUMBER, min_size=0, max_size=5),
                                      st.tuples(st.integers(0, 18), st.integers(0, 18), st.integers(1, 6), st.integers(1, 6)).map(list),
                                      st.none(), st.just("0 0 1 1"))),
               "segmentation": draw(segmentation(h, w)), "area": draw(HOSTILE_NUMBER), "score": draw(HOSTILE_NUMBER)}
        if draw(st.booleans()):
            ann["pseudo_box"] = ann["bbox"]
        anns.append(ann)
    if draw(st.integers(0, 9)) == 0:  # a crowd on one image
        anns += [dict(anns[0], id=10_000 + k) for k in range(draw(st.integers(60, 3000)))]
    if draw(st.integers(0, 9)) == 0:
        doc = draw(st.sampled_from([[], {"images": images}, {"images": "x", "annotations": anns}, {"annotations": anns}]))
    return doc


@seed(SEED)
@settings(max_examples=max(5, EXAMPLES // 6), deadline=None, derandomize=True,  # two GX runs per example: ~6 s each
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(doc=shards())
def test_fuzzed_pseudo_label_shards_through_the_gate_and_the_loader(doc):
    from ovtasks.models.ov_maskrcnn import targets_from_coco

    with tempfile.TemporaryDirectory(prefix="ovtasks-fuzz-gate-") as d:
        base = Path(d) / "run" / "pseudo" / "maskfree"
        base.mkdir(parents=True)
        _write_shard(base, "00000", good_doc())
        _write_shard(base, "00001", doc)
        tracemalloc.start()
        try:
            rep = call_within(lambda: validate(str(Path(d) / "run"), load_settings(env={})).report, 120, "the gate")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 400 * 2**20, f"the gate peaked at {peak / 2**20:.0f} MiB"
        assert rep["passed"] + rep["failed"] == 2 and "00000" in rep["training_shards"]
        if "00001" not in rep["training_shards"]:
            assert rep["excluded"]["00001"], "a failed shard without a reason"
            return
        # it passed: what training reads of it is finite and shaped like its images
        sizes = {im["id"]: (im["height"], im["width"]) for im in doc["images"]}
        cat_index = {e.id: k for k, e in enumerate(VOCAB.entries)}
        by_image: dict = {}
        for a in doc["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        for image_id, anns in by_image.items():
            t = targets_from_coco(anns, cat_index, sizes[image_id])
            assert torch.isfinite(t["boxes"]).all() and t["masks"].shape[1:] == sizes[image_id]


# -- image files into predict / the served model


@st.composite
def image_files(draw):
    from PIL import Image

    mode = draw(st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "I;16", "I", "F", "1", "CMYK"]))
    w, h = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    fmt = draw(st.sampled_from(["PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF"]))
    im = Image.new("RGB", (w, h), (draw(st.integers(0, 255)), 40, 200)).convert(mode if mode not in ("I;16", "I", "F") else "L")
    if mode in ("I;16", "I", "F"):
        im = Image.fromarray(np.full((h, w), draw(st.integers(0, 65535)), np.uint16 if mode == "I;16" else np.int32 if mode == "I" else np.float32))
    buf = io.BytesIO()
    try:
        im.save(buf, format=fmt, **({"exif": _exif(draw(st.integers(1, 8)))} if fmt in ("JPEG", "PNG", "WEBP") else {}))
    except (OSError, ValueError, KeyError):  # that mode cannot be written in that format: write a PNG of it
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    damage = draw(st.sampled_from(["none", "none", "truncate", "flip", "huge_png_header"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif damage == "flip" and data:
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    elif damage == "huge_png_header" and data[:8] == b"\x89PNG\r\n\x1a\n":
        side = draw(st.integers(5_000, 60_000))
        data[16:24] = side.to_bytes(4, "big") * 2  # declared width and height (IHDR), CRC left stale
    return bytes(data)


def _exif(orientation: int) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@seed(SEED)
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=image_files())
def test_fuzzed_image_files_are_decoded_as_training_saw_them_or_skipped(data):
    from ovtasks.core.config import IngestConfig
    from ovtasks.core.imaging import ImageRejected
    from ovtasks.ingest.pipeline import REASONS
    from ovtasks.registry.serving import to_model_rgb

    tracemalloc.start()
    try:
        arr = call_within(lambda: to_model_rgb(data), 30, "decoding")
    except ImageRejected as exc:
        assert exc.reason in REASONS, exc.reason
        return
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 300 * 2**20
    cfg = IngestConfig()
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    assert arr.shape[0] * arr.shape[1] <= cfg.max_pixels and min(arr.shape[:2]) >= cfg.min_side
    assert math.isfinite(float(arr.mean())) and hashlib.sha256(arr.tobytes()).hexdigest()
