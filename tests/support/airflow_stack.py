"""Production-mode Airflow on this machine for tests: CeleryExecutor on a PostgreSQL database, a Redis
broker, the pipeline's data in S3; api-server, scheduler, dag-processor and Celery workers as subprocesses,
each in its own process group (stopped by pid)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from tests.support.seaweed import free_port  # noqa: F401 - re-exported for the Airflow tests

from tests.support import ROOT
BIN = Path(sys.executable).parent
PASSWORD = "test-only-password"


def celery_env(tmp_path: Path, port: int, pg_db: str, broker_url: str, s3_env: dict, clean_uri: str, pseudo_uri: str) -> dict:
    (tmp_path / "passwords.json").write_text(json.dumps({"admin": PASSWORD}))
    pg = f"postgres@127.0.0.1:5432/{pg_db}"
    return {**os.environ, **s3_env, "AIRFLOW_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1",
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor", "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"), "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://{pg}",
            "AIRFLOW__CELERY__BROKER_URL": broker_url, "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql+psycopg2://{pg}",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}", "AIRFLOW__API_AUTH__JWT_SECRET": "test-only-jwt-secret-" + "x" * 64,
            "AIRFLOW__API__SECRET_KEY": "test-only-api-secret",
            "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(tmp_path / "passwords.json"),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
            "OVDAGS_RETRY_DELAY_S": "1", "OVTASKS_DATA_DIR": str(tmp_path / "data"),
            "OVTASKS_PIPELINE__CLEAN_URI": clean_uri, "OVTASKS_PIPELINE__PSEUDO_URI": pseudo_uri,
            "OVTASKS_MASKFREE__ITM_MODEL": str(ROOT / "models" / "itm-synth"), "OVTASKS_MASKFREE__PROPOSALS": "selective_search",
            "OVTASKS_MASKFREE__WSS_ITERATIONS": "40"}


class Stack:
    """Airflow components as subprocesses, each in its own process group (stopped by pid).

    Like their Deployments (helm) and ``restart: unless-stopped`` (compose), a component that exits on
    its own is started again (the scheduler exits its loop when its DB connection drops mid-query);
    ``restarts`` counts them. A component killed on purpose (:meth:`kill`) stays down."""

    def __init__(self, env: dict, logs: Path, wrap=None):
        """``wrap``: argv -> argv for every command (e.g. :meth:`ServiceNames.wrap`: service names resolved)."""
        self.env, self.logs, self.procs, self.args, self.envs = env, logs, {}, {}, {}
        self.wrap = wrap or list
        self.restarts: dict[str, int] = {}
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watch = threading.Thread(target=self._supervise, daemon=True)
        logs.mkdir(parents=True, exist_ok=True)

    def run(self, *args):
        r = subprocess.run(self.wrap([str(BIN / "airflow"), *args]), env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]

    def start(self, name: str, *args, env: dict | None = None):
        """Start ``airflow *args`` as component ``name``; ``env`` (when given) replaces the stack's environment
        for this one (e.g. a worker with its own scratch directory)."""
        log = open(self.logs / f"{name}.log", "ab")
        with self._lock:
            self.args[name], self.envs[name] = args, env or self.env
            self.procs[name] = subprocess.Popen(self.wrap([str(BIN / "airflow"), *args]), env=self.envs[name], cwd=ROOT, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)
        if not self._watch.is_alive() and not self._stopping.is_set():
            self._watch.start()

    def _supervise(self):
        while not self._stopping.wait(1.0):
            with self._lock:
                exited = [n for n, p in self.procs.items() if p.poll() is not None]
            for name in exited:
                if self._stopping.is_set():
                    return
                self.restarts[name] = self.restarts.get(name, 0) + 1
                with open(self.logs / f"{name}.log", "ab") as log:
                    log.write(f"\n=== exited; restarted by the test's supervisor ({self.restarts[name]}) ===\n".encode())
                self.start(name, *self.args[name], env=self.envs[name])

    def kill(self, name: str, sig=signal.SIGKILL):
        with self._lock:
            p = self.procs.pop(name)
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        p.wait(timeout=60)

    def stop(self):
        self._stopping.set()
        if self._watch.is_alive():
            self._watch.join(timeout=10)
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in sorted(self.logs.glob("*.log")))

    def up(self, port: int, dag: str | list[str], timeout: float = 180, workers: dict | None = None, pool_slots: int = 1,
           host: str = "127.0.0.1", init: bool = True, password: str = PASSWORD):
        """Migrate, create the GPU pool (``init``; off when the deployment's own init command did it), start
        every component on ``host``:``port`` and the Celery workers (default: one named ``worker`` for
        `default,gpu`; else ``{name: (queues, env)}``); the logged-in REST client (``admin``) once every DAG in
        ``dag`` is parsed (the first one is unpaused). An anonymous REST request must be refused."""
        from ovtasks.orchestration.rest import Airflow

        dags = [dag] if isinstance(dag, str) else list(dag)
        if init:
            self.run("db", "migrate")
            self.run("pools", "set", "ovtasks_gpu", str(pool_slots), "GPU tasks")
        self.start("api-server", "api-server", "--host", host, "--port", str(port))
        self.start("scheduler", "scheduler")
        self.start("dag-processor", "dag-processor")
        for name, (queues, env) in (workers or {"worker": ("default,gpu", None)}).items():
            self.start(name, "celery", "worker", "--queues", queues, env=env)
        deadline, af = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            try:
                af = af or Airflow.login(f"http://{host}:{port}", "admin", password)
                if set(dags) <= set(af.dag_ids()):
                    break
            except OSError:
                pass
            except Exception as exc:  # noqa: BLE001 - the api-server is still starting / DAG not parsed yet
                if "401" in str(exc) or "403" in str(exc):
                    raise
            time.sleep(2)
        else:
            pytest.fail(f"{dags} never showed up in the API\n{self.tail()}")
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"http://{host}:{port}/api/v2/dags", timeout=10)
        assert denied.value.code in (401, 403)
        af.unpause(dags[0])
        return af

    def wait(self, af, dag: str, run: str, timeout: float) -> str:
        try:
            return af.wait(dag, run, timeout=timeout)
        except TimeoutError as exc:
            pytest.fail(f"{exc}\n{self.tail()}")

    def wait_task_running(self, af, dag: str, run: str, task: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(t == task and st == "running" for t, _, st, _ in af.task_states(dag, run)):
                return
            time.sleep(0.5)
        pytest.fail(f"{task} never ran: {af.task_states(dag, run)}\n{self.tail()}")


def shard_docs(store, prefix="pseudo/maskfree") -> dict[str, bytes]:
    return {k: store.get_bytes(k) for k in store.list(prefix + "/") if k.endswith(".json") and k.rsplit("/", 1)[1][:5].isdigit()
            and ".manifest." not in k and ".validation." not in k}


def annotations(docs: dict[str, bytes]) -> dict[str, list[tuple]]:
    return {k: [(a["image_id"], a["category_id"], a["segmentation"]["counts"]) for a in json.loads(v)["annotations"]]
            for k, v in docs.items()}


class PartialWatcher:
    """Polls a store while a run works and records any object seen half-written: a shard JSON that does not
    parse, or a manifest naming files whose sha256 does not match (a manifest is written last)."""

    def __init__(self, store, prefix="pseudo/maskfree/", interval=0.2):
        import threading

        self.store, self.prefix, self.interval = store, prefix, interval
        self.problems, self.checks, self._stop = [], 0, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)

    def _loop(self):
        import hashlib

        while not self._stop.is_set():
            try:
                keys = self.store.list(self.prefix)
            except Exception:  # noqa: BLE001 - a listing racing a delete; try again
                keys = []
            for k in keys:
                name = k.rsplit("/", 1)[-1]
                try:
                    blob = self.store.get_bytes(k)
                except Exception:  # noqa: BLE001 - deleted between list and get (the test clears outputs)
                    continue
                self.checks += 1
                if name.endswith(".json"):
                    try:
                        doc = json.loads(blob)
                    except ValueError:
                        self.problems.append(f"{k}: not parseable JSON (half-written?)")
                        continue
                    if name.endswith(".manifest.json") and doc.get("status") == "complete":
                        for f, meta in doc.get("files", {}).items():
                            rel = f[len(self.prefix):] if f.startswith(self.prefix) else f.rsplit("/", 1)[-1]
                            try:
                                data = self.store.get_bytes(self.prefix + rel)
                            except Exception:  # noqa: BLE001
                                continue
                            if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
                                self.problems.append(f"{k}: names {f} whose bytes do not match")
            self._stop.wait(self.interval)
