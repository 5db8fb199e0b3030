"""Where model weights come from: a Hugging Face id, a local directory, or the object store's model cache.

``resolve_model(ref)`` returns something ``from_pretrained`` / ``torch.load`` can open:

* an existing local path → itself;
* ``s3://bucket/prefix`` or ``file://...`` → the files under that prefix, mirrored into a local cache
  directory keyed by the URI and the objects' names and sizes (re-downloaded only when they change);
* anything else → returned unchanged as a Hugging Face id (transformers resolves it; with
  ``HF_HUB_OFFLINE=1`` and no local copy that fails with transformers' own clear error).

``publish_model(local, uri)`` uploads a directory or file to the store (files first, then a
``MODEL_COMPLETE`` marker, so a half-uploaded model is never picked up).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from urllib.parse import urlparse

from ovtasks.core.config import S3Config
from ovtasks.core.storage import open_store

COMPLETE_MARKER = "MODEL_COMPLETE"


def cache_root() -> Path:
    return Path(os.environ.get("OVTASKS_MODEL_CACHE", Path.home() / ".cache" / "ovtasks" / "models"))


def is_store_uri(ref: str) -> bool:
    return urlparse(ref).scheme in ("s3", "file")


def resolve_model(ref: str | os.PathLike, s3: S3Config | None = None) -> str:
    """A local path for ``ref`` (see module doc); store models are cached locally."""
    ref = os.fspath(ref)
    if os.path.exists(ref):
        return ref
    if not is_store_uri(ref):
        return ref  # a Hugging Face id
    parsed = urlparse(ref)
    if parsed.scheme == "file" and os.path.isfile(parsed.path):  # one local file (wspn.pt): nothing to cache
        return parsed.path
    store = open_store(ref, s3)
    keys = [k for k in store.list() if k and k != COMPLETE_MARKER]
    if not keys:  # maybe a single object rather than a prefix
        parent, _, name = ref.rstrip("/").rpartition("/")
        pstore = open_store(parent, s3)
        if not pstore.exists(name):
            raise FileNotFoundError(f"no model at {ref}")
        target = cache_root() / hashlib.sha256(ref.encode()).hexdigest()[:16] / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            pstore.get_file(name, target)
        return str(target)
    if not store.exists(COMPLETE_MARKER):
        raise FileNotFoundError(f"model at {ref} is incomplete (no {COMPLETE_MARKER} marker): upload still running?")
    marker = store.get_bytes(COMPLETE_MARKER)
    target = cache_root() / hashlib.sha256(ref.encode() + marker).hexdigest()[:16]
    if not (target / COMPLETE_MARKER).exists():
        for key in keys:
            if key.startswith("/") or ".." in key.split("/") or "\\" in key:
                raise ValueError(f"model at {ref} holds an object named {key[:200]!r}, which would be written outside the model cache")
            dest = target / key
            dest.parent.mkdir(parents=True, exist_ok=True)
            store.get_file(key, dest)
        (target / COMPLETE_MARKER).write_bytes(marker)
    return str(target)


def image_processor_config(path: str) -> dict:
    """The image processor settings (``size``, ``image_mean``, ``image_std``, ...) saved with a model:
    its ``preprocessor_config.json`` for a local directory ({} when it has none: the model class's
    defaults apply), or transformers' ``AutoImageProcessor`` for a Hugging Face id."""
    local = Path(path)
    if local.is_dir():
        cfg = local / "preprocessor_config.json"
        return json.loads(cfg.read_text()) if cfg.exists() else {}
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(path).to_dict()


def publish_model(local: str | os.PathLike, uri: str, s3: S3Config | None = None) -> str:
    """Upload a model directory (or one file) to ``uri``; returns the URI to load it from."""
    local = Path(local)
    if local.is_file():
        parent, _, name = uri.rstrip("/").rpartition("/")
        open_store(parent, s3).put_file(name, local)
        return uri
    store = open_store(uri, s3)
    store.delete(COMPLETE_MARKER)
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)
    manifest = {}
    for p in files:
        key = p.relative_to(local).as_posix()
        store.put_file(key, p)
        manifest[key] = {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    store.put_bytes(COMPLETE_MARKER, json.dumps(manifest, sort_keys=True).encode())
    return store.uri
