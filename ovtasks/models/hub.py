"""Where model weights come from: a Hugging Face id, a local directory, or the object store's model cache.

``resolve_model(ref)`` returns something ``from_pretrained`` / ``torch.load`` can open:

* an existing local path → itself;
* ``s3://bucket/prefix`` or ``file://...`` → the files its completion marker lists, mirrored into a local cache
  directory keyed by the URI and the marker, each checked against the marker's sha256 (see :func:`resolve_model`);
* anything else → returned unchanged as a Hugging Face id (transformers resolves it; with
  ``HF_HUB_OFFLINE=1`` and no local copy that fails with transformers' own clear error).

``publish_model(local, uri)`` uploads a directory or file to the store (the old marker removed, files of an
earlier upload that the new one lacks deleted, the files, then a ``MODEL_COMPLETE`` marker listing each file's
size and sha256, so a half-uploaded model is never picked up).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
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
    """A local path for ``ref`` (see module doc); store models are cached locally.

    A model directory is cached under a key of its URI and its completion marker, and holds exactly the files the
    marker lists, each checked against the marker's sha256 (a cache that does not match is fetched again; a file
    replaced while it was being read makes the load start over with the new marker, a few times, then fail). A
    single-object model (``wspn.pt``) is cached under a key of its URI and its version (size and ETag), so a
    re-upload to the same URI is fetched again."""
    ref = os.fspath(ref)
    if os.path.exists(ref):
        return ref
    if not is_store_uri(ref):
        return ref  # a Hugging Face id
    parsed = urlparse(ref)
    if parsed.scheme == "file" and os.path.isfile(parsed.path):  # one local file (wspn.pt): nothing to cache
        return parsed.path
    store = open_store(ref, s3)
    if not store.exists(COMPLETE_MARKER) and not [k for k in store.list() if k]:  # maybe a single object
        return _resolve_object(ref, s3)
    for _attempt in range(3):
        if not store.exists(COMPLETE_MARKER):
            raise FileNotFoundError(f"model at {ref} is incomplete (no {COMPLETE_MARKER} marker): upload still running?")
        marker = store.get_bytes(COMPLETE_MARKER)
        files = _marker_files(ref, marker)
        target = cache_root() / hashlib.sha256(ref.encode() + marker).hexdigest()[:16]
        if (target / COMPLETE_MARKER).exists() and _cache_matches(target, files):
            return str(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=_mkdir(cache_root())))
        try:
            if _fetch(store, files, staging):
                (staging / COMPLETE_MARKER).write_bytes(marker)
                shutil.rmtree(target, ignore_errors=True)
                os.replace(staging, target)
                return str(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        # a file did not match the marker: a re-upload is in flight; read the marker again
    raise OSError(f"model at {ref} kept changing while it was read (a re-upload in flight?): try again when it is done")


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _marker_files(ref: str, marker: bytes) -> dict[str, str]:
    """{key: sha256} the completion marker lists; keys that would escape the cache directory are refused."""
    try:
        listed = json.loads(marker)
        files = {k: v["sha256"] for k, v in listed.items()}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"model at {ref}: its {COMPLETE_MARKER} marker is not a file list (upload it again with "
                         "`ovtasks models upload`)") from exc
    for key in files:
        if not key or key.startswith("/") or ".." in key.split("/") or "\\" in key or key == COMPLETE_MARKER:
            raise ValueError(f"model at {ref} lists a file named {key[:200]!r}, which would be written outside the model cache")
    return files


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cache_matches(target: Path, files: dict[str, str]) -> bool:
    present = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()} - {COMPLETE_MARKER}
    return present == set(files) and all(file_sha256(target / k) == sha for k, sha in files.items())


def _fetch(store, files: dict[str, str], staging: Path) -> bool:
    """Download exactly the listed files; False as soon as one does not match its sha256."""
    for key, sha in sorted(files.items()):
        dest = staging / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        store.get_file(key, dest)
        if file_sha256(dest) != sha:
            return False
    return True


def _resolve_object(ref: str, s3: S3Config | None) -> str:
    parent, _, name = ref.rstrip("/").rpartition("/")
    pstore = open_store(parent, s3)
    for _attempt in range(3):
        version = pstore.version(name)
        if version is None:
            raise FileNotFoundError(f"no model at {ref}")
        target = cache_root() / hashlib.sha256(f"{ref}\0{version}".encode()).hexdigest()[:16] / name
        if target.exists():
            return str(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
        pstore.get_file(name, tmp)
        if pstore.version(name) == version:  # not replaced while it was read
            os.replace(tmp, target)
            return str(target)
        tmp.unlink(missing_ok=True)
    raise OSError(f"model at {ref} kept changing while it was read (a re-upload in flight?): try again when it is done")


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
    store.delete(COMPLETE_MARKER)  # loaders wait from here on
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)
    new = {p.relative_to(local).as_posix() for p in files}
    for stale in store.list():  # an upload replaces the whole version: no file of an earlier one stays
        if stale not in new and stale != COMPLETE_MARKER:
            store.delete(stale)
    manifest = {}
    for p in files:
        key = p.relative_to(local).as_posix()
        store.put_file(key, p)
        manifest[key] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
    store.put_bytes(COMPLETE_MARKER, json.dumps(manifest, sort_keys=True).encode())
    return store.uri
