"""COCO ground truth of the synthetic benchmark, for evaluation and reports only (never for training)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from ovtasks.config import Settings
from ovtasks.storage import open_store


def decode_rle(seg: dict) -> np.ndarray:
    from pycocotools import mask as mask_utils

    counts = seg["counts"]
    return mask_utils.decode({"size": seg["size"], "counts": counts.encode() if isinstance(counts, str) else counts}).astype(bool)


def encode_rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_bbox(seg: dict) -> list[float]:
    """COCO xywh box of an RLE mask (same values as :func:`mask_bbox` on the decoded mask)."""
    from pycocotools import mask as mask_utils

    counts = seg["counts"]
    return [float(v) for v in mask_utils.toBbox({"size": seg["size"], "counts": counts.encode() if isinstance(counts, str) else counts})]


def mask_bbox(mask: np.ndarray) -> list[float]:
    """COCO xywh box of a non-empty bool mask."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


@dataclass(frozen=True)
class GtInstance:
    category: str
    split: str
    mask: np.ndarray  # bool (H, W)


class GroundTruth:
    def __init__(self, coco: dict):
        self.coco = coco
        self.categories = {c["id"]: c for c in coco["categories"]}
        self._anns: dict[int, list[dict]] = {}
        for a in coco["annotations"]:
            self._anns.setdefault(a["image_id"], []).append(a)
        self.images = {im["id"]: im for im in coco["images"]}

    @classmethod
    def load(cls, uri: str, settings: Settings) -> "GroundTruth":
        """``uri`` is the synthetic data root (holding ``gt/instances.json``) or the JSON file itself."""
        if uri.endswith(".json"):
            parent, _, name = uri.rpartition("/")
            return cls(json.loads(open_store(parent or ".", settings.s3).get_bytes(name)))
        return cls(json.loads(open_store(uri, settings.s3).get_bytes("gt/instances.json")))

    def annotations(self, image_id: int) -> list[dict]:
        """The raw COCO annotations of one image (empty when it has none)."""
        return list(self._anns.get(image_id, []))

    def instances(self, image_id: int) -> list[GtInstance]:
        out = []
        for a in self._anns.get(image_id, []):
            c = self.categories[a["category_id"]]
            out.append(GtInstance(c["name"], c.get("split", "base"), decode_rle(a["segmentation"])))
        return out

    def subset(self, image_ids) -> dict:
        """A COCO dict restricted to ``image_ids`` (for pycocotools)."""
        ids = set(image_ids)
        return {"images": [self.images[i] for i in sorted(ids) if i in self.images],
                "annotations": [a for i in sorted(ids) for a in self._anns.get(i, [])],
                "categories": list(self.categories.values())}
