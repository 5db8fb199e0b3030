"""Reading clean (ingested) shards back: the input of every model stage.

A clean shard is ``shards/NNNNN.tar`` whose ``shards/NNNNN.manifest.json`` exists (written last by
ingest). Shards without a manifest are incomplete and are never read.
"""

from __future__ import annotations

import io
import itertools
import json
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from ovtasks.core.config import Settings
from ovtasks.core.shards import iter_tar_samples
from ovtasks.core.storage import Store, open_store


@dataclass(frozen=True)
class CleanSample:
    shard: str
    key: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    caption: str
    meta: dict

    @property
    def image_id(self) -> int:
        return image_id(self.key)


_HASHED = 1 << 52  # ids of non-numeric keys: 2^52 + a 52-bit hash (disjoint from numeric keys, exact in JSON / JS)


def image_id(key: str) -> int:
    """COCO image id of a sample key: the number itself for a numeric key of up to 15 digits (img2dataset and
    the synthetic data set: ``000000012`` -> 12, which is what their GT uses), else 2^52 + a 52-bit hash of the
    key. Two keys with one id (``1`` and ``000000001``) cannot both be kept: ingest quarantines the later one
    (``duplicate_image_id``)."""
    if key.isascii() and key.isdigit() and len(key) <= 15:
        return int(key)
    import hashlib

    return _HASHED + int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:7], "big") % _HASHED


def complete_shards(store: Store) -> list[str]:
    """Names of shards whose ingest manifest is present, sorted."""
    names = []
    for key in store.list("shards"):
        if key.endswith(".manifest.json"):
            names.append(key.rsplit("/", 1)[-1][: -len(".manifest.json")])
    return sorted(names)


def iter_shard(store: Store, name: str) -> Iterator[CleanSample]:
    """Samples of one clean shard, streamed."""
    with store.open_read(f"shards/{name}.tar") as fh:
        for raw in iter_tar_samples(fh, {}, default_limit=1 << 30):
            data = raw.members.get("jpg") or raw.members.get("png") or raw.members.get("webp")
            if data is None:
                continue
            meta = json.loads(raw.members["json"]) if "json" in raw.members else {}
            caption = meta.get("caption") or raw.members.get("txt", b"").decode("utf-8", "replace")
            image = np.array(Image.open(io.BytesIO(data)).convert("RGB"))  # writable: torch.from_numpy needs it
            yield CleanSample(name, raw.key, image, caption, meta)


def iter_clean(uri: str, settings: Settings, limit: int | None = None) -> Iterator[CleanSample]:
    """Samples of every complete clean shard under ``uri`` in shard order (at most ``limit``)."""
    store = open_store(uri, settings.s3)
    names = complete_shards(store)
    if not names:
        raise FileNotFoundError(f"no complete clean shards (shards/*.manifest.json) under {store.uri}")
    n = 0
    for name in names:
        for s in iter_shard(store, name):
            yield s
            n += 1
            if limit is not None and n >= limit:
                return


def chunks(items: Iterable, n: int) -> Iterator[list]:
    """Consecutive lists of ``n`` items (the last may be shorter), streaming."""
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk
