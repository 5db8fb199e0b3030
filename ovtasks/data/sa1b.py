"""SA-1B-format data: masks without names (Segment Anything's release format), for Semantic-SAM training.

SA-1B ships tar files of ``sa_<id>.jpg`` + ``sa_<id>.json`` pairs; each JSON is::

    {"image": {"image_id", "width", "height", "file_name"},
     "annotations": [{"id", "segmentation": {"size": [h, w], "counts": RLE}, "bbox": [x, y, w, h], "area",
                      "predicted_iou", "stability_score", "point_coords": [[x, y]], "crop_box": [x, y, w, h]}]}

:func:`write_synthetic` renders that format from the synthetic scene generator (its own seed, so none of
these images are benchmark images); :func:`iter_sa1b` reads any directory or bucket of such tars (the
real SA-1B included). A pair that cannot be read is skipped with its reason in ``stats``, never fatal.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from typing import Iterator

import numpy as np
from PIL import Image

from ovtasks.core.config import Settings
from ovtasks.data.groundtruth import decode_rle, encode_rle, mask_bbox
from ovtasks.core.storage import open_store

log = logging.getLogger(__name__)


def write_synthetic(out_uri: str, settings: Settings, images: int = 64, seed: int = 7, image_size: int = 192,
                    per_tar: int = 256) -> dict:
    from ovtasks.data.synth import render_scene

    store = open_store(out_uri, settings.s3)
    n_tars, masks = 0, 0
    for t0 in range(0, images, per_tar):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for idx in range(t0, min(images, t0 + per_tar)):
                rng = np.random.default_rng([seed, idx])
                h = image_size if rng.random() < 0.7 else int(image_size * 0.75)
                pixels, instances = render_scene(rng, image_size, h)
                jpg = io.BytesIO()
                Image.fromarray(pixels).save(jpg, format="JPEG", quality=92)
                anns = []
                for k, inst in enumerate(instances):
                    x, y, w, hh = mask_bbox(inst.mask)
                    ys, xs = np.nonzero(inst.mask)
                    j = len(ys) // 2
                    anns.append({"id": idx * 100 + k, "segmentation": encode_rle(inst.mask), "bbox": [x, y, w, hh],
                                 "area": int(inst.mask.sum()), "predicted_iou": 1.0, "stability_score": 1.0,
                                 "point_coords": [[float(xs[j]), float(ys[j])]], "crop_box": [0, 0, pixels.shape[1], pixels.shape[0]]})
                masks += len(anns)
                doc = {"image": {"image_id": idx, "width": int(pixels.shape[1]), "height": int(pixels.shape[0]),
                                 "file_name": f"sa_{idx}.jpg"}, "annotations": anns}
                for name, data in ((f"sa_{idx}.jpg", jpg.getvalue()), (f"sa_{idx}.json", json.dumps(doc).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        store.put_bytes(f"sa_{n_tars:06d}.tar", buf.getvalue())
        n_tars += 1
    return {"out": store.uri, "tars": n_tars, "images": images, "masks": masks}


def iter_sa1b(uri: str, settings: Settings, limit: int | None = None, stats: dict | None = None) -> Iterator[tuple[np.ndarray, list[dict]]]:
    """(RGB image, SA-1B annotations) pairs from every ``*.tar`` under ``uri``; unreadable pairs are counted in
    ``stats["skipped"]`` by reason."""
    stats = stats if stats is not None else {}
    skipped = stats.setdefault("skipped", {})
    store, n = open_store(uri, settings.s3), 0
    for key in sorted(k for k in store.list("") if k.endswith(".tar")):
        with tarfile.open(fileobj=io.BytesIO(store.get_bytes(key)), mode="r") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for name in sorted(members):
                if not name.endswith(".json"):
                    continue
                stem = name[:-5]
                try:
                    doc = json.loads(tar.extractfile(members[name]).read())
                    jpg = members.get(doc["image"].get("file_name", stem + ".jpg")) or members.get(stem + ".jpg")
                    if jpg is None:
                        raise KeyError("image file missing")
                    with Image.open(io.BytesIO(tar.extractfile(jpg).read())) as im:
                        image = np.asarray(im.convert("RGB"))
                    anns = [a for a in doc["annotations"] if a.get("area", 1) > 0]
                    if not anns:
                        raise ValueError("no mask")
                    if tuple(anns[0]["segmentation"]["size"]) != image.shape[:2]:
                        raise ValueError(f"mask size {anns[0]['segmentation']['size']} != image {list(image.shape[:2])}")
                except Exception as exc:  # noqa: BLE001 - a bad pair is skipped with its reason, never fatal
                    reason = type(exc).__name__
                    skipped[reason] = skipped.get(reason, 0) + 1
                    log.warning("sa1b pair skipped", extra={"tar": key, "member": name, "reason": f"{reason}: {exc}"})
                    continue
                stats["images"] = stats.get("images", 0) + 1
                yield image, anns
                n += 1
                if limit and n >= limit:
                    return


def masks_of(anns: list[dict]) -> np.ndarray:
    return np.stack([decode_rle(a["segmentation"]) for a in anns])
