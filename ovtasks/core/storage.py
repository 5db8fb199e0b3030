"""Object store: one interface, a local-directory backend and an S3 backend (``minio`` client).

URIs: a plain path or ``file://`` path selects :class:`LocalStore`; ``s3://bucket/prefix`` selects
:class:`S3Store`. A store is rooted at its URI and addressed by *keys*: relative ``/``-separated
paths that may not escape the root (no ``..``, no absolute paths, no backslashes, no NUL, and for the
local backend no symlink that resolves outside the root).

Every write is an atomic publish: readers see either the previous object or the complete new one,
never a partial one. Locally a temporary file in the destination directory is ``os.replace``-d into
place; on S3 a single PUT (or a completed multipart upload) is already atomic, so data is staged in a
local temporary file and uploaded in one operation.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import socket
import tempfile
import uuid
from abc import ABC, abstractmethod
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator
from urllib.parse import urlparse

from ovtasks.core.config import S3Config

_TMP_MARK = ".ovtmp-"


class StoreError(RuntimeError):
    """A storage operation failed (missing object, unreachable server, bad bucket...)."""


class StoreKeyError(ValueError):
    """A key would address something outside the store's root."""


def check_key(key: str) -> str:
    """Return ``key`` normalised, or raise :class:`StoreKeyError` if it could escape the root."""
    if not isinstance(key, str) or key == "":
        raise StoreKeyError(f"key must be a non-empty string, got {key!r}")
    if "\x00" in key or "\\" in key:
        raise StoreKeyError(f"key {key!r} contains NUL or backslash")
    if key.startswith("/"):
        raise StoreKeyError(f"key {key!r} is absolute")
    parts = key.split("/")
    if any(p in ("..", ".") for p in parts):
        raise StoreKeyError(f"key {key!r} has a '.' or '..' component")
    parts = [p for p in parts if p]
    if not parts:
        raise StoreKeyError(f"key {key!r} is empty after normalisation")
    return "/".join(parts)


def join_key(*parts: str) -> str:
    return check_key("/".join(p.strip("/") for p in parts if p and p.strip("/")))


class Store(ABC):
    """Operations the pipeline stages need. Keys are relative to the store's root URI."""

    uri: str

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def put_file(self, key: str, path: str | os.PathLike, move: bool = False) -> None:
        """Publish a local file atomically. ``move=True`` lets the store consume the file (a rename
        when it is on the same local filesystem); the caller must not use it afterwards."""

    @abstractmethod
    def get_file(self, key: str, path: str | os.PathLike) -> None:
        """Download to a local path (written atomically there too)."""

    @abstractmethod
    def open_read(self, key: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """A streaming, forward-only reader; memory use does not depend on the object's size."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` (recursive), sorted. Temporary in-flight files are never listed."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def version(self, key: str) -> str | None:
        """What changes whenever the object is replaced (its size and ETag on S3, size, mtime and inode on
        disk); None when it does not exist."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; removing a missing object is not an error."""

    @abstractmethod
    def child(self, prefix: str) -> "Store":
        """A store rooted at ``prefix`` below this one."""

    def scratch_dir(self) -> str:
        """A private local directory for staging files before publishing them (caller removes it)."""
        return tempfile.mkdtemp(prefix="ovtasks-")

    def uri_for(self, key: str) -> str:
        return self.uri.rstrip("/") + "/" + check_key(key)

    @contextlib.contextmanager
    def writer(self, key: str) -> Iterator[BinaryIO]:
        """Write through a local temporary file; publish on success, discard on exception."""
        check_key(key)
        fd, tmp = tempfile.mkstemp(prefix="ovtasks-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                yield fh
            self.put_file(key, tmp)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


class LocalStore(Store):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        path = self.root / check_key(key)
        resolved_root = self.root.resolve()
        resolved = path.resolve()
        if resolved != resolved_root and resolved_root not in resolved.parents:
            raise StoreKeyError(f"key {key!r} resolves outside {self.root} (symlink?)")
        return path

    def _publish(self, path: Path, fill) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{_TMP_MARK}{uuid.uuid4().hex}-{path.name}"
        try:
            with open(tmp, "wb") as fh:
                fill(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        self._publish(self._path(key), lambda fh: fh.write(data))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise StoreError(f"no object {self.uri_for(key)}") from exc

    def put_file(self, key: str, path: str | os.PathLike, move: bool = False) -> None:
        if move:
            dest = self._path(key)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(path, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(path, dest)  # atomic within one filesystem
                return
            except OSError:
                pass  # another filesystem: copy below

        def fill(fh):
            with open(path, "rb") as src:
                shutil.copyfileobj(src, fh, 1 << 20)

        self._publish(self._path(key), fill)

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        LocalStore(Path(path).parent).put_file(Path(path).name, self._existing(key))

    def _existing(self, key: str) -> Path:
        p = self._path(key)
        if not p.is_file():
            raise StoreError(f"no object {self.uri_for(key)}")
        return p

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[BinaryIO]:
        with open(self._existing(key), "rb") as fh:
            yield fh

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            if not prefix:
                raise StoreError(f"{self.root} is a file: give the directory that holds it (a store is a folder or an s3:// prefix)")
            return [check_key(prefix)]
        if not base.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(_TMP_MARK))
            for name in filenames:
                if name.startswith(_TMP_MARK):
                    continue
                full = Path(dirpath) / name
                if full.is_symlink():
                    continue
                keys.append(full.relative_to(self.root).as_posix())
        return sorted(keys)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def version(self, key: str) -> str | None:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            return None
        return f"{st.st_size}-{st.st_mtime_ns}-{st.st_ino}"

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def child(self, prefix: str) -> "LocalStore":
        return LocalStore(self._path(prefix))

    def scratch_dir(self) -> str:
        """A private directory on the store's filesystem (never listed), so put_file(move=True)
        is a rename. The caller removes it; one left by a killed process (its pid gone from this
        host) is removed by the next call."""
        self.root.mkdir(parents=True, exist_ok=True)
        host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
        for old in self.root.glob(f"{_TMP_MARK}scratch-{host}-*-*"):
            pid = old.name.split("-")[3] if old.name.count("-") >= 4 else ""
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        return tempfile.mkdtemp(prefix=f"{_TMP_MARK}scratch-{host}-{os.getpid()}-", dir=self.root)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str, cfg: S3Config, client=None):
        if not bucket:
            raise StoreError("s3 URI needs a bucket: s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = check_key(prefix) if prefix.strip("/") else ""
        self.cfg = cfg
        self.client = _Unreachable(client or make_s3_client(cfg), cfg)
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._bucket_checked = False

    def _name(self, key: str) -> str:
        key = check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _ensure_bucket(self) -> None:
        if self._bucket_checked:
            return
        from minio.error import S3Error

        try:
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)
        except S3Error as exc:
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise StoreError(f"cannot create bucket {self.bucket}: {exc}") from exc
        self._bucket_checked = True

    def _missing(self, exc) -> bool:
        return getattr(exc, "code", None) in ("NoSuchKey", "NoSuchBucket", "NoSuchObject")

    def put_bytes(self, key: str, data: bytes) -> None:
        self._ensure_bucket()
        self.client.put_object(self.bucket, self._name(key), io.BytesIO(data), len(data))

    def get_bytes(self, key: str) -> bytes:
        with self.open_read(key) as fh:
            return fh.read()

    def put_file(self, key: str, path: str | os.PathLike, move: bool = False) -> None:
        self._ensure_bucket()
        self.client.fput_object(self.bucket, self._name(key), str(path))
        if move:
            os.unlink(path)

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{_TMP_MARK}{uuid.uuid4().hex}-{path.name}"
        try:
            with self.open_read(key) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[BinaryIO]:
        from minio.error import S3Error

        try:
            resp = self.client.get_object(self.bucket, self._name(key))
        except S3Error as exc:
            if self._missing(exc):
                raise StoreError(f"no object {self.uri_for(key)}") from exc
            raise StoreError(f"cannot read {self.uri_for(key)}: {exc}") from exc
        try:
            yield resp
        finally:
            resp.close()
            resp.release_conn()

    def list(self, prefix: str = "") -> list[str]:
        from minio.error import S3Error

        start = self._name(prefix) if prefix else self.prefix
        query = start + "/" if start and not self._is_object(start) else start
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            names = [
                o.object_name[strip:]
                for o in self.client.list_objects(self.bucket, prefix=query, recursive=True)
                if not o.is_dir and o.object_name[strip:]  # the store's root object itself has no key
            ]
        except S3Error as exc:
            if exc.code == "NoSuchBucket":
                return []
            raise StoreError(f"cannot list {self.uri}/{prefix}: {exc}") from exc
        return sorted(names)

    def _is_object(self, name: str) -> bool:
        from minio.error import S3Error

        try:
            self.client.stat_object(self.bucket, name)
            return True
        except S3Error:
            return False

    def exists(self, key: str) -> bool:
        return self._is_object(self._name(key))

    def version(self, key: str) -> str | None:
        from minio.error import S3Error

        try:
            st = self.client.stat_object(self.bucket, self._name(key))
        except S3Error:
            return None
        return f"{st.size}-{st.etag}-{st.version_id or ''}"

    def delete(self, key: str) -> None:
        from minio.error import S3Error

        try:
            self.client.remove_object(self.bucket, self._name(key))
        except S3Error as exc:
            if not self._missing(exc):
                raise StoreError(f"cannot delete {self.uri_for(key)}: {exc}") from exc

    def child(self, prefix: str) -> "S3Store":
        sub = self._name(prefix)
        return S3Store(self.bucket, sub, self.cfg, client=self.client)


class _Unreachable:
    """The S3 client with transport failures (server down past the retry budget, connection reset) turned
    into a StoreError that says so; urllib3 has already retried with bounded exponential backoff."""

    def __init__(self, client, cfg: S3Config):
        self._client, self._cfg = client, cfg

    def __getattr__(self, name):
        import urllib3

        fn = getattr(self._client, name)
        if not callable(fn):
            return fn

        def call(*args, **kwargs):
            try:
                out = fn(*args, **kwargs)
                # list_objects is lazy: drain it here so its transport errors are caught too
                return list(out) if name == "list_objects" else out
            except (urllib3.exceptions.HTTPError, ConnectionError) as exc:
                raise StoreError(f"S3 at {self._cfg.endpoint} unreachable: {name} failed after {self._cfg.retries} retries "
                                 f"with exponential backoff: {type(exc).__name__}: {str(exc)[:300]}") from exc

        return call


def make_s3_client(cfg: S3Config):
    """A ``minio.Minio`` client from config; refuses to run without credentials."""
    import urllib3
    from minio import Minio

    if not cfg.endpoint:
        raise StoreError("s3:// URI used but no S3 endpoint configured (OVTASKS_S3__ENDPOINT)")
    static = cfg.access_key is not None and cfg.secret_key is not None
    if not static and cfg.credentials != "chain":
        raise StoreError(
            "s3:// URI used but no credentials configured "
            "(OVTASKS_S3__ACCESS_KEY / OVTASKS_S3__SECRET_KEY or their _FILE variants, or OVTASKS_S3__CREDENTIALS=chain)"
        )
    retry = urllib3.Retry(
        total=cfg.retries,
        backoff_factor=0.2,
        backoff_max=10,
        status_forcelist=(500, 502, 503, 504),
        allowed_methods=None,
    )
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=10, read=300),
        retries=retry,
        maxsize=16,
        cert_reqs="CERT_REQUIRED" if (cfg.secure and cfg.cert_check) else "CERT_NONE",
    )
    if static:
        keys = {"access_key": cfg.access_key.get_secret_value(), "secret_key": cfg.secret_key.get_secret_value()}
    else:
        keys = {"credentials": aws_chain()}
    return Minio(cfg.endpoint, secure=cfg.secure, region=cfg.region, http_client=http, **keys)


def aws_chain():
    """The standard credential chain, in the AWS SDKs' order: environment (``AWS_ACCESS_KEY_ID`` ..., then
    ``MINIO_*``), the shared files (``~/.aws/credentials``), then web identity (``AWS_WEB_IDENTITY_TOKEN_FILE`` +
    ``AWS_ROLE_ARN``: EKS IRSA), container credentials (ECS / EKS pod identity) and the instance profile."""
    from minio.credentials import (AWSConfigProvider, ChainedProvider, EnvAWSProvider, EnvMinioProvider,
                                   IamAwsProvider)

    return ChainedProvider([EnvAWSProvider(), EnvMinioProvider(), AWSConfigProvider(), IamAwsProvider()])


def open_store(uri: str | os.PathLike, s3: S3Config | None = None) -> Store:
    """The store rooted at ``uri``: a local path, ``file://`` path or ``s3://bucket/prefix``."""
    text = os.fspath(uri)
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        return S3Store(parsed.netloc, parsed.path.lstrip("/"), s3 or S3Config())
    if parsed.scheme == "file":
        return LocalStore(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:
        raise StoreError(f"unsupported URI scheme {parsed.scheme!r} in {text!r}")
    return LocalStore(text)


def key_name(key: str) -> str:
    """Last component of a key (``a/b/00001.tar`` → ``00001.tar``)."""
    return PurePosixPath(key).name
