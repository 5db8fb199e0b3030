#!/usr/bin/env python3
"""Start the MLflow server as docker/compose.yaml and the helm chart run it (the image's entrypoint).

``mlflow-start server ARGS...``
    1. writes the basic-auth config (``MLFLOW_AUTH_CONFIG_PATH``) from the environment:
       ``MLFLOW_AUTH_ADMIN_USERNAME`` / ``MLFLOW_AUTH_ADMIN_PASSWORD`` (the admin created on the first start),
       ``MLFLOW_AUTH_DATABASE_URI`` (where users and permissions live); every user but the admin starts with
       no permission on anything it did not create;
    2. runs ``mlflow db upgrade`` on ``MLFLOW_BACKEND_STORE_URI`` (a newer MLflow refuses an older schema);
    3. replaces itself with ``mlflow server ARGS... --backend-store-uri $MLFLOW_BACKEND_STORE_URI``.
``mlflow-start check URL HOST``
    the health check: a logged-in API call sent with ``Host: HOST`` (the service name the workers use).
    ``/health`` answers even while the server refuses every real call (a Host header not in --allowed-hosts,
    a wrong password), so it proves nothing about the workers' view.
"""

from __future__ import annotations

import base64
import configparser
import os
import subprocess
import sys
import tempfile
import urllib.request

REQUIRED = ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_DATABASE_URI", "MLFLOW_AUTH_ADMIN_USERNAME",
            "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")


def write_auth_config(env: dict, directory: str) -> str:
    cfg = configparser.ConfigParser(interpolation=None)
    cfg["mlflow"] = {
        "default_permission": "NO_PERMISSIONS",
        "database_uri": env["MLFLOW_AUTH_DATABASE_URI"],
        "admin_username": env["MLFLOW_AUTH_ADMIN_USERNAME"],
        "admin_password": env["MLFLOW_AUTH_ADMIN_PASSWORD"],
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
    }
    fd, path = tempfile.mkstemp(prefix="basic_auth.", suffix=".ini", dir=directory)
    with os.fdopen(fd, "w") as f:  # mode 0600: it holds the admin password
        cfg.write(f)
    return path


def server(args: list[str]) -> int:
    missing = [k for k in REQUIRED if not os.environ.get(k)]
    if missing:
        print(f"mlflow-start: set {', '.join(missing)} (from a secret)", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env["MLFLOW_AUTH_CONFIG_PATH"] = write_auth_config(env, tempfile.gettempdir())
    backend = env["MLFLOW_BACKEND_STORE_URI"]
    subprocess.run([sys.executable, "-m", "mlflow", "db", "upgrade", backend], env=env, check=True)
    argv = [sys.executable, "-m", "mlflow", "server", *args, f"--backend-store-uri={backend}"]
    os.execve(sys.executable, argv, env)
    return 0  # not reached


def check(url: str, host: str) -> int:
    user, password = os.environ["MLFLOW_AUTH_ADMIN_USERNAME"], os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"]
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", headers={
        "Host": host, "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()})
    with urllib.request.urlopen(req, timeout=8) as r:
        return 0 if r.status == 200 else 1


def main(argv: list[str]) -> int:
    if argv[:1] == ["server"]:
        return server(argv[1:])
    if argv[:1] == ["check"] and len(argv) == 3:
        return check(argv[1], argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
