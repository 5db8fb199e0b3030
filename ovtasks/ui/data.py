"""The UI plugin's Gallery as plain functions over the store: pages of pseudo-labelled images and their
thumbnails (the FastAPI app in :mod:`ovtasks.ui.app` only adds auth and HTTP; the Datasets and Models tabs
read :mod:`ovtasks.data.catalog` and :mod:`ovtasks.registry.listing`). Every function copes with an empty
world: no shards, no pseudo-labels."""

from __future__ import annotations

import io
import json
import re
import threading
from collections import Counter, OrderedDict
from pathlib import Path

from ovtasks.core.config import Settings
from ovtasks.core.storage import open_store
from ovtasks.data.catalog import NotFound, as_dict, check_generator, pipeline_uris, pseudo_stage, read_json
from ovtasks.data.summary_index import ANY, THRESHOLDS, grid_index

SHARD = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_shard(shard: str) -> str:
    if not SHARD.match(shard or ""):
        raise NotFound(f"bad shard name {shard!r}")
    return shard


# ---------------------------------------------------------------------------------------------
# datasets


# ---------------------------------------------------------------------------------------------
# gallery


class _ShardIndex:
    """Per pseudo-label shard: image id -> (key, width, height, [annotations without masks]); cached by manifest."""

    def __init__(self, maxsize: int = 64):
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.maxsize = maxsize

    def get(self, store, prefix: str, shard: str) -> dict:
        m = read_json(store, f"{prefix}/{shard}.manifest.json")
        if not m or m.get("status") != "complete":
            raise NotFound(f"no complete pseudo-label shard {shard!r}")
        tag = (store.uri, prefix, shard, json.dumps(m.get("files", {}), sort_keys=True))
        with self._lock:
            if tag in self._cache:
                self._cache.move_to_end(tag)
                return self._cache[tag]
        coco = json.loads(store.get_bytes(f"{prefix}/{shard}.json"))
        images = {im["id"]: {"key": im["key"], "width": im["width"], "height": im["height"], "caption": im.get("caption", ""),
                             "annotations": []} for im in coco["images"]}
        for a in coco["annotations"]:
            if a["image_id"] in images:
                images[a["image_id"]]["annotations"].append(
                    {"id": a["id"], "category": a.get("category_name", str(a["category_id"])), "score": a.get("score", 0.0),
                     "bbox": a["bbox"], "segmentation": a["segmentation"]})
        with self._lock:
            self._cache[tag] = images
            while len(self._cache) > self.maxsize:
                self._cache.popitem(last=False)
        return images


SHARD_INDEX = _ShardIndex()


def _matching(anns: list[dict], category: str | None, min_score: float) -> list[dict]:
    return [a for a in anns if a["score"] >= min_score and (not category or a["category"] == category)]


def gallery(settings: Settings, category: str | None = None, min_score: float = 0.0, page: int = 1, per_page: int = 24,
            generator: str | None = None) -> dict:
    """One page of pseudo-labelled images whose annotations pass the filters (category, score).

    Totals, category counts and which shards hold the page come from the summary index's score histograms
    (``min_score`` is rounded up to their grid of 0.05 and answered as ``filters.min_score``); only the
    shards on the page are opened."""
    gen = check_generator(generator or settings.pipeline.generator)
    per_page = max(1, min(per_page, settings.ui.page_size_max))
    page = max(1, page)
    k = grid_index(min_score)
    threshold = THRESHOLDS[k]
    pseudo = open_store(pipeline_uris(settings)["pseudo"], settings.s3)
    prefix = f"pseudo/{gen}"
    index, missing = pseudo_stage(settings, gen, "gallery")
    key = category or ANY

    def images_at(counts: dict) -> int:
        row = as_dict(as_dict(counts).get("images")).get(key)
        return int(row[k]) if isinstance(row, list) and len(row) > k else 0

    categories: Counter = Counter()
    chunks = index.summary()["chunks"]
    for agg in chunks.values():
        for cat, row in as_dict(as_dict(agg.get("gallery")).get("annotations")).items():
            if isinstance(row, list) and len(row) > k and row[k]:
                categories[cat] += int(row[k])
    total = sum(images_at(agg.get("gallery")) for agg in chunks.values())
    start, stop, seen, items = (page - 1) * per_page, page * per_page, 0, []
    for c, agg in chunks.items():
        n = images_at(agg.get("gallery"))
        if seen + n <= start:
            seen += n
            continue
        for shard, counts in sorted(index.chunk(c).items()):
            if seen >= stop:
                break
            m = images_at(counts)
            if seen + m <= start:
                seen += m
                continue
            try:
                images = SHARD_INDEX.get(pseudo, prefix, shard)
            except NotFound:
                continue
            for image_id in sorted(images):
                im = images[image_id]
                anns = _matching(im["annotations"], category, threshold)
                if not anns:
                    continue
                if start <= seen < stop:
                    items.append({"shard": shard, "image_id": image_id, "key": im["key"], "caption": im["caption"],
                                  "width": im["width"], "height": im["height"],
                                  "annotations": [{k2: a[k2] for k2 in ("id", "category", "score", "bbox")} for a in anns],
                                  "thumbnail": f"api/gallery/{shard}/{image_id}.jpg"})
                seen += 1
        if seen >= stop:
            break
    return {"generator": gen, "page": page, "per_page": per_page, "total": total, "pages": (total + per_page - 1) // per_page,
            "filters": {"category": category, "min_score": threshold}, "categories": dict(categories.most_common()),
            "items": items, "index": "complete" if not missing else "missing: read from the manifests; run `ovtasks index rebuild`"}


class _ThumbCache:
    """Small JPEGs of clean-shard images on local disk, made in one streaming pass per shard (never whole
    shards over HTTP); keyed by the shard tar's sha256, so a re-ingested shard gets new thumbnails."""

    def __init__(self):
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def path(self, settings: Settings, shard: str, key: str) -> Path:
        from ovtasks.data.clean import iter_shard

        clean = open_store(pipeline_uris(settings)["clean"], settings.s3)
        m = read_json(clean, f"shards/{shard}.manifest.json")
        if not m:
            raise NotFound(f"no clean shard {shard!r}")
        sha = str(as_dict(as_dict(m.get("files")).get(f"shards/{shard}.tar")).get("sha256", ""))[:16]
        if not re.fullmatch(r"[0-9a-f]{16}", sha):  # a name component from input: hex only (never "/../..")
            raise NotFound(f"clean shard {shard!r} has no valid sha256 in its manifest")
        root = Path(settings.ui.thumb_cache or Path(settings.data_dir) / "cache" / "ui") / f"{shard}-{sha}-{settings.ui.thumb_size}"
        done = root / ".complete"
        if not done.exists():
            with self._guard:
                lock = self._locks.setdefault(str(root), threading.Lock())
            with lock:
                if not done.exists():
                    from PIL import Image

                    root.mkdir(parents=True, exist_ok=True)
                    for s in iter_shard(clean, shard):
                        im = Image.fromarray(s.image)
                        im.thumbnail((settings.ui.thumb_size, settings.ui.thumb_size))
                        tmp = root / f".{_thumb_name(s.key)}.tmp"
                        im.save(tmp, "JPEG", quality=88)
                        tmp.replace(root / _thumb_name(s.key))
                    done.write_text("ok")
        p = root / _thumb_name(key)
        if not p.exists():
            raise NotFound(f"image {key!r} not in clean shard {shard!r}")
        return p


def _thumb_name(key: str) -> str:
    """A file name for any sample key (keys may hold "/" or be long): its hash."""
    import hashlib

    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32] + ".jpg"


THUMBS = _ThumbCache()


def thumbnail(settings: Settings, shard: str, image_id: int, category: str | None = None, min_score: float = 0.0,
              generator: str | None = None) -> bytes:
    """JPEG thumbnail with the image's pseudo-masks (passing the filters) overlaid, boxed and named with scores."""
    from PIL import Image

    from ovtasks.report.draw import annotate_thumbnail

    gen = check_generator(generator or settings.pipeline.generator)
    check_shard(shard)
    pseudo = open_store(pipeline_uris(settings)["pseudo"], settings.s3)
    index = SHARD_INDEX.get(pseudo, f"pseudo/{gen}", shard)
    if image_id not in index:
        raise NotFound(f"image {image_id} not in pseudo-label shard {shard!r}")
    im = index[image_id]
    base = Image.open(THUMBS.path(settings, shard, im["key"])).convert("RGB")
    out = annotate_thumbnail(base, _matching(im["annotations"], category, THRESHOLDS[grid_index(min_score)]), base.width / im["width"],
                             base.height / im["height"])
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=88)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# models
