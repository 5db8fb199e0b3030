"""COCO ground truth of the synthetic benchmark, for evaluation and reports only (never for training)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ovtasks.core.config import Settings
from ovtasks.core.storage import open_store


def to_pycoco(seg: dict) -> dict:
    """A stored RLE (JSON: ``counts`` as str) as pycocotools wants it (``counts`` as bytes)."""
    counts = seg["counts"]
    return {"size": seg["size"], "counts": counts.encode() if isinstance(counts, str) else counts}


def decode_rle(seg: dict) -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode(to_pycoco(seg)).astype(bool)


def encode_rles(masks: np.ndarray) -> list[dict]:
    """``(H, W, N)`` uint8 masks → N JSON-ready COCO RLEs (pycocotools encodes the stack in one call)."""
    from pycocotools import mask as mask_utils

    out = mask_utils.encode(np.asfortranarray(masks))
    return [{"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")} for r in out]


def encode_rle(mask: np.ndarray) -> dict:
    return encode_rles(mask.astype(np.uint8)[:, :, None])[0]


def rle_area(seg: dict) -> int:
    from pycocotools import mask as mask_utils

    return int(mask_utils.area(to_pycoco(seg)))


def rle_bbox(seg: dict) -> list[float]:
    """COCO xywh box of an RLE mask (same values as :func:`mask_bbox` on the decoded mask)."""
    from pycocotools import mask as mask_utils

    return [float(v) for v in mask_utils.toBbox(to_pycoco(seg))]


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
        store, key = _locate(uri, settings)
        return cls(json.loads(store.get_bytes(key)))

    @staticmethod
    def require(uri: str, settings: Settings) -> None:
        """Refuse, with what to do, when there is no evaluation set at ``uri``."""
        store, key = _locate(uri, settings)
        if not store.exists(key):
            raise FileNotFoundError(
                f"no evaluation set at {store.uri_for(key)}: set pipeline.eval_gt_uri (env OVTASKS_PIPELINE__EVAL_GT_URI) to a "
                "COCO instances JSON of images the models are not trained on, put in the store with "
                "`ovtasks models upload instances.json s3://BUCKET/eval/instances.json` (README: Evaluation set)")

    def names(self, split: str) -> set[str]:
        """The names of the categories of ``split`` ("base" or "novel"; a category without one is base)."""
        return {c["name"] for c in self.categories.values() if c.get("split", "base") == split}

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


def _locate(uri: str, settings: Settings):
    if uri.endswith(".json"):
        parent, _, name = uri.rpartition("/")
        return open_store(parent or ".", settings.s3), name
    return open_store(uri, settings.s3), "gt/instances.json"


def boxes_xyxy(anns: Sequence[dict]) -> np.ndarray:
    b = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
    b[:, 2:] += b[:, :2]
    return b
