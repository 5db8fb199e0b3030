"""`ovtasks serve` (the registry's sha256 check, then `mlflow models serve`) on loopback for the tests: start it
for a registered model, send one image, return the instances it answers with, stop it."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.support.seaweed import free_port

BIN = Path(sys.executable).parent


def ask_served_model(model_uri: str, tracking_uri: str, image: Path, names: str, log_path: Path, timeout: float = 120,
                     env: dict | None = None, wrap=None) -> list[dict]:
    """Serve ``model_uri`` (e.g. ``models:/m@champion``) from ``tracking_uri`` and POST ``image`` with the
    candidate ``names`` (comma-separated) as a ``dataframe_split`` request; the answer's instances. ``env``: more
    variables for the server (MLflow credentials); ``wrap``: argv -> argv (e.g. ServiceNames.wrap)."""
    from PIL import Image

    port = free_port()
    env = {**os.environ, "PATH": str(BIN) + os.pathsep + os.environ.get("PATH", ""),  # it execs uvicorn by name
           **(env or {}), "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri,
           "OVTASKS_REGISTRY__TRACKING_URI": tracking_uri}
    log = open(log_path, "w")
    argv = [str(BIN / "ovtasks"), "serve", model_uri, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    proc = subprocess.Popen((wrap or list)(argv), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        buf = io.BytesIO()
        Image.open(image).save(buf, format="PNG")
        body = json.dumps({"dataframe_split": {"columns": ["image", "names"],
                                               "data": [[base64.b64encode(buf.getvalue()).decode(), names]]}}).encode()
        deadline, answer = time.monotonic() + timeout, None
        while answer is None and proc.poll() is None and time.monotonic() < deadline:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"})
                answer = json.loads(urllib.request.urlopen(req, timeout=30).read())
            except OSError:
                time.sleep(1)
        assert answer is not None, Path(log_path).read_text()[-3000:]
        return json.loads(answer["predictions"][0]["instances"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
