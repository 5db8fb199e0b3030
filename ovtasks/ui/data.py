"""What the Airflow UI plugin shows, as plain functions over the store and the MLflow registry (the FastAPI
app in :mod:`ovtasks.ui.app` only adds auth and HTTP). Every function copes with an empty world: no
shards, no pseudo-labels, no registered model."""

from __future__ import annotations

import io
import json
import re
import threading
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np

from ovtasks.core import history
from ovtasks.core.config import Settings
from ovtasks.core.storage import open_store

SHARD = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


class NotFound(LookupError):
    pass


def _uris(settings: Settings) -> dict[str, str]:
    return settings.pipeline.resolved(settings.data_dir)


def _json(store, key: str) -> dict | None:
    """A stored JSON object; None when missing, unreadable or not an object (a list, a number)."""
    try:
        doc = json.loads(store.get_bytes(key)) if store.exists(key) else None
    except (ValueError, OSError):
        return None
    return doc if isinstance(doc, dict) else None


def _count(v) -> int | None:
    """A count as the page shows it: a non-negative integer or nothing (a manifest is input, not trusted)."""
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _dict(v) -> dict:
    return v if isinstance(v, dict) else {}


def _reasons(q) -> dict[str, int]:
    return {str(k)[:64]: n for k, n in _dict(q).items() if _count(n) is not None}


def check_generator(generator: str) -> str:
    if generator not in ("maskfree", "grounded"):
        raise NotFound(f"unknown generator {generator!r}")
    return generator


def check_shard(shard: str) -> str:
    if not SHARD.match(shard or ""):
        raise NotFound(f"bad shard name {shard!r}")
    return shard


# ---------------------------------------------------------------------------------------------
# datasets


def datasets(settings: Settings, generator: str | None = None) -> dict:
    """Shards per stage with counts, quarantine reasons, GX status per shard, and the trend across runs."""
    u, gen = _uris(settings), check_generator(generator or settings.pipeline.generator)
    source, clean, pseudo = (open_store(u[k], settings.s3) for k in ("source", "clean", "pseudo"))
    source_shards = sorted(k.rsplit("/", 1)[-1][:-4] for k in source.list("") if k.endswith(".tar") and "/" not in k)
    rows: dict[str, dict] = {s: {"shard": s, "source": True} for s in source_shards}
    reasons: Counter = Counter()
    for key in clean.list("shards/"):
        if not key.endswith(".manifest.json"):
            continue
        m = _json(clean, key) or {}
        shard = key.rsplit("/", 1)[-1][: -len(".manifest.json")]
        c = _dict(m.get("counts"))
        q = _reasons(c.get("quarantined"))
        reasons.update(q)
        rows.setdefault(shard, {"shard": shard, "source": False}).update(
            ingest={"seen": _count(c.get("seen")), "kept": _count(c.get("kept")), "quarantined": sum(q.values()), "reasons": q,
                    "status": "failed" if m.get("error") or m.get("status") != "complete" else "complete"})
    prefix = f"pseudo/{gen}"
    for key in pseudo.list(prefix + "/"):
        name = key.rsplit("/", 1)[-1]
        if "/" in key[len(prefix) + 1:] or not name.endswith(".manifest.json"):
            continue
        m = _json(pseudo, key) or {}
        shard = name[: -len(".manifest.json")]
        c = _dict(m.get("counts"))
        rows.setdefault(shard, {"shard": shard, "source": False})["pseudo"] = {
            "status": "complete" if m.get("status") == "complete" else "partial" if m else None,
            **{k: _count(c.get(k)) for k in ("images", "labelled", "annotations", "quarantined")}}
    gx = _json(pseudo, f"{prefix}/validation_report.json")
    for e in (gx or {}).get("shards", []) if isinstance((gx or {}).get("shards"), list) else []:
        if not isinstance(e, dict) or not isinstance(e.get("shard"), str):
            continue
        rows.setdefault(e["shard"], {"shard": e["shard"], "source": False})["gx"] = {
            "status": "passed" if e.get("success") is True else "failed",
            "reasons": [str(r)[:500] for r in e.get("reasons", [])] if isinstance(e.get("reasons"), list) else [],
            "data_docs": _dict(e.get("data_docs"))}
    shards = [rows[k] for k in sorted(rows)]
    stages = {"source": len(source_shards), "clean": sum(1 for r in shards if r.get("ingest", {}).get("status") == "complete"),
              "pseudo_labelled": sum(1 for r in shards if (r.get("pseudo") or {}).get("status") == "complete"),
              "gx_passed": sum(1 for r in shards if (r.get("gx") or {}).get("status") == "passed"),
              "gx_failed": sum(1 for r in shards if (r.get("gx") or {}).get("status") == "failed")}
    totals = {"seen": sum((r.get("ingest") or {}).get("seen") or 0 for r in shards),
              "kept": sum((r.get("ingest") or {}).get("kept") or 0 for r in shards),
              "annotations": sum((r.get("pseudo") or {}).get("annotations") or 0 for r in shards)}
    trend = {"ingest": history.load(clean, "ingest"), "pseudo_label": history.load(pseudo, "pseudo_label"),
             "validate": history.load(pseudo, "validate")}
    return {"generator": gen, "uris": {k: u[k] for k in ("source", "clean", "pseudo")}, "stages": stages, "totals": totals,
            "quarantine_reasons": dict(reasons.most_common()), "shards": shards, "trend": trend}


# ---------------------------------------------------------------------------------------------
# gallery


class _ShardIndex:
    """Per pseudo-label shard: image id -> (key, width, height, [annotations without masks]); cached by manifest."""

    def __init__(self, maxsize: int = 64):
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.maxsize = maxsize

    def get(self, store, prefix: str, shard: str) -> dict:
        m = _json(store, f"{prefix}/{shard}.manifest.json")
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
    """One page of pseudo-labelled images whose annotations pass the filters (category, score)."""
    gen = check_generator(generator or settings.pipeline.generator)
    per_page = max(1, min(per_page, settings.ui.page_size_max))
    page = max(1, page)
    pseudo = open_store(_uris(settings)["pseudo"], settings.s3)
    prefix = f"pseudo/{gen}"
    shards = sorted(k.rsplit("/", 1)[-1][: -len(".manifest.json")] for k in pseudo.list(prefix + "/")
                    if k.endswith(".manifest.json") and "/" not in k[len(prefix) + 1:])
    categories: Counter = Counter()
    start, stop, total, items = (page - 1) * per_page, page * per_page, 0, []
    for shard in shards:
        try:
            index = SHARD_INDEX.get(pseudo, prefix, shard)
        except NotFound:
            continue
        for image_id in sorted(index):
            im = index[image_id]
            categories.update(a["category"] for a in im["annotations"] if a["score"] >= min_score)
            anns = _matching(im["annotations"], category, min_score)
            if not anns:
                continue
            if start <= total < stop:
                items.append({"shard": shard, "image_id": image_id, "key": im["key"], "caption": im["caption"],
                              "width": im["width"], "height": im["height"],
                              "annotations": [{k: a[k] for k in ("id", "category", "score", "bbox")} for a in anns],
                              "thumbnail": f"api/gallery/{shard}/{image_id}.jpg"})
            total += 1
    return {"generator": gen, "page": page, "per_page": per_page, "total": total, "pages": (total + per_page - 1) // per_page,
            "filters": {"category": category, "min_score": min_score}, "categories": dict(categories.most_common()), "items": items}


class _ThumbCache:
    """Small JPEGs of clean-shard images on local disk, made in one streaming pass per shard (never whole
    shards over HTTP); keyed by the shard tar's sha256, so a re-ingested shard gets new thumbnails."""

    def __init__(self):
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def path(self, settings: Settings, shard: str, key: str) -> Path:
        from ovtasks.data.clean import iter_shard

        clean = open_store(_uris(settings)["clean"], settings.s3)
        m = _json(clean, f"shards/{shard}.manifest.json")
        if not m:
            raise NotFound(f"no clean shard {shard!r}")
        sha = str(_dict(_dict(m.get("files")).get(f"shards/{shard}.tar")).get("sha256", ""))[:16]
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
    from PIL import Image, ImageDraw
    from pycocotools import mask as mask_utils

    gen = check_generator(generator or settings.pipeline.generator)
    check_shard(shard)
    pseudo = open_store(_uris(settings)["pseudo"], settings.s3)
    index = SHARD_INDEX.get(pseudo, f"pseudo/{gen}", shard)
    if image_id not in index:
        raise NotFound(f"image {image_id} not in pseudo-label shard {shard!r}")
    im = index[image_id]
    base = Image.open(THUMBS.path(settings, shard, im["key"])).convert("RGB")
    sx, sy = base.width / im["width"], base.height / im["height"]
    arr = np.asarray(base).astype(np.float32)
    anns = _matching(im["annotations"], category, min_score)
    for i, a in enumerate(anns):
        seg = dict(a["segmentation"])
        if isinstance(seg.get("counts"), str):
            seg["counts"] = seg["counts"].encode()
        m = mask_utils.decode(seg).astype(bool)
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(base.size, Image.NEAREST)) > 127
        arr[m] = 0.5 * arr[m] + 0.5 * np.array(PALETTE[i % len(PALETTE)], np.float32)
    out = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for i, a in enumerate(anns):
        x, y, w, h = a["bbox"]
        box = [x * sx, y * sy, (x + w) * sx, (y + h) * sy]
        colour = PALETTE[i % len(PALETTE)]
        draw.rectangle(box, outline=colour, width=2)
        label = f"{a['category']} {a['score']:.2f}"
        draw.rectangle([box[0], max(0, box[1] - 12), box[0] + 6 * len(label) + 4, max(12, box[1])], fill=colour)
        draw.text((box[0] + 2, max(0, box[1] - 12)), label, fill=(0, 0, 0))
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=88)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# models


def _eval_rows(metrics: dict) -> list[dict]:
    rows: dict[tuple, dict] = {}
    for k, v in metrics.items():
        m = re.match(r"^(generalized|constrained)_(all|base|novel)_(box_AP50|box_AP|mask_AP50|mask_AP)$", k)
        if m:
            rows.setdefault((m[1], m[2]), {"setting": m[1], "split": m[2]})[m[3]] = round(float(v), 2)
    order = {"generalized": 0, "constrained": 1, "all": 0, "base": 1, "novel": 2}
    return [rows[k] for k in sorted(rows, key=lambda t: (order[t[0]], order[t[1]]))]


def models(settings: Settings) -> list[dict]:
    """Every registered version of both architectures, newest first, with its eval table, GX status,
    aliases and lineage (data manifest hash, DAG run, MLflow run)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from ovtasks.registry.lifecycle import ARCHITECTURES, registered_name, tracking_uri

    uri = tracking_uri(settings)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    out = []
    for arch in ARCHITECTURES:
        name = registered_name(settings, arch)
        try:
            versions = client.search_model_versions(f"name='{name}'")  # names are validated (config: registry)
            aliases = dict(client.get_registered_model(name).aliases or {}) if versions else {}
        except MlflowException:
            versions, aliases = [], {}
        for mv in sorted(versions, key=lambda v: -int(v.version)):
            try:
                run = client.get_run(mv.run_id) if mv.run_id else None
            except MlflowException:
                run = None
            tags = dict(mv.tags or {})
            refused, gate = tags.get("promotion_refused"), tags.get("promotion_gate")
            out.append({"name": name, "architecture": arch, "version": str(mv.version), "aliases": sorted(a for a, v in aliases.items() if str(v) == str(mv.version)),
                        "created": mv.creation_timestamp, "gx_status": tags.get("gx_status"),
                        "novel_mask_AP50": tags.get("novel_mask_AP50"), "eval_prompts": tags.get("eval_prompts"),
                        "lineage": {"data_manifest_sha256": tags.get("data_manifest_sha256"), "dag_run": tags.get("dag_run") or None,
                                    "mlflow_run": mv.run_id, "code_version": tags.get("code_version")},
                        "promotion": {k: tags[k] for k in ("promoted_by", "promoted_at", "promotion_reason", "previous_champion") if k in tags},
                        "promotion_refused": json.loads(refused) if refused else None,
                        "promotion_gate": json.loads(gate) if gate else None,
                        "evaluation": _eval_rows(run.data.metrics) if run else []})
    return out
