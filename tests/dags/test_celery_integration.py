"""Production mode on this machine: CeleryExecutor on the real PostgreSQL (a database made by the test) and
Redis, the api-server, scheduler, dag-processor and a Celery worker for `default,gpu` as subprocesses,
the pipeline's data in a SeaweedFS S3 bucket. `ovtasks_pseudo_label` is triggered through the REST API
(apache-airflow-client, token auth); then the worker is SIGKILLed mid-task and the retry must give the
same annotations, none duplicated or missing. Everything started here is stopped by pid."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from ovtasks.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DAG = "ovtasks_pseudo_label"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_db():
    from pg import fresh_database

    with fresh_database("airflow", "Celery integration") as db:
        yield db


@pytest.fixture
def redis_db():
    import redis

    n = 9
    try:
        r = redis.Redis(host="127.0.0.1", port=6379, db=n, socket_connect_timeout=3)
        r.flushdb()
    except redis.ConnectionError as exc:
        print(f"\nSKIP Celery integration: Redis at 127.0.0.1:6379 unreachable: {exc}", file=sys.stderr)
        pytest.skip(f"Redis unreachable: {exc}")
    yield f"redis://127.0.0.1:6379/{n}"
    r.flushdb()


class Stack:
    """Airflow components as subprocesses, each in its own process group (stopped by pid)."""

    def __init__(self, env: dict, logs: Path):
        self.env, self.logs, self.procs = env, logs, {}

    def run(self, *args):
        r = subprocess.run([str(BIN / "airflow"), *args], env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]

    def start(self, name: str, *args):
        log = open(self.logs / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen([str(BIN / "airflow"), *args], env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def kill(self, name: str, sig=signal.SIGKILL):
        p = self.procs.pop(name)
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        p.wait(timeout=60)

    def stop(self):
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in sorted(self.logs.glob("*.log")))


def _shard_docs(store, prefix="pseudo/maskfree"):
    return {k: store.get_bytes(k) for k in store.list(prefix + "/") if k.endswith(".json") and k.rsplit("/", 1)[1][:5].isdigit()
            and ".manifest." not in k and ".validation." not in k}


def _wait(af, run, stack, timeout):
    try:
        return af.wait(DAG, run, timeout=timeout)
    except TimeoutError as exc:
        pytest.fail(f"{exc}\n{stack.tail()}")


def test_pseudo_label_on_celery_survives_a_killed_worker(synth_small, seaweed, postgres_db, redis_db, tmp_path):
    from ovtasks.airflow_api import Airflow
    from ovtasks.ingest import ingest
    from ovtasks.storage import open_store

    s3 = seaweed.env()
    bucket = f"ovt-celery-{uuid.uuid4().hex[:6]}"
    clean, labelled = f"s3://{bucket}/clean", f"s3://{bucket}/labelled"
    ingest(synth_small[0], clean, load_settings(env=s3), workers=1)

    port = _port()
    (tmp_path / "passwords.json").write_text(json.dumps({"admin": "test-only-password"}))
    pg = f"postgres@127.0.0.1:5432/{postgres_db}"
    env = {**os.environ, **s3, "AIRFLOW_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1",
           "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor", "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"), "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://{pg}",
           "AIRFLOW__CELERY__BROKER_URL": redis_db, "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql+psycopg2://{pg}",
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
           "OVTASKS_PIPELINE__CLEAN_URI": clean, "OVTASKS_PIPELINE__PSEUDO_URI": labelled,
           "OVTASKS_MASKFREE__ITM_MODEL": str(ROOT / "models" / "itm-synth"), "OVTASKS_MASKFREE__PROPOSALS": "selective_search",
           "OVTASKS_MASKFREE__WSS_ITERATIONS": "40"}
    logs = tmp_path / "logs"
    logs.mkdir()
    stack = Stack(env, logs)
    try:
        stack.run("db", "migrate")
        stack.run("pools", "set", "ovtasks_gpu", "1", "GPU tasks")
        stack.start("api-server", "api-server", "--port", str(port))
        stack.start("scheduler", "scheduler")
        stack.start("dag-processor", "dag-processor")
        stack.start("worker", "celery", "worker", "--queues", "default,gpu")
        deadline = time.monotonic() + 180
        af = None
        while time.monotonic() < deadline:
            try:
                af = af or Airflow.login(f"http://127.0.0.1:{port}", "admin", "test-only-password")
                if DAG in af.dag_ids():
                    break
            except OSError:
                pass
            except Exception as exc:  # noqa: BLE001 - the api-server is still starting / DAG not parsed yet
                if "401" in str(exc) or "403" in str(exc):
                    raise
            time.sleep(2)
        else:
            pytest.fail(f"{DAG} never showed up in the API\n{stack.tail()}")
        # the REST API refuses a request without a token
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/dags", timeout=10)
        assert denied.value.code in (401, 403)
        af.unpause(DAG)

        run1 = af.trigger(DAG)
        assert _wait(af, run1, stack, 400) == "success", f"{af.task_states(DAG, run1)}\n{stack.tail()}"
        store = open_store(labelled, load_settings(env=s3).s3)
        first = _shard_docs(store)
        assert len(first) == 2 and json.loads(store.get_bytes("pseudo/maskfree/report.json"))["missing"] == []
        anns = {k: [(a["image_id"], a["category_id"], a["segmentation"]["counts"]) for a in json.loads(v)["annotations"]] for k, v in first.items()}
        assert sum(map(len, anns.values())) > 0

        # run 2 from scratch; SIGKILL the worker (and its task process) while it labels, start a new one
        for key in store.list("pseudo/maskfree/"):
            store.delete(key)
        run2 = af.trigger(DAG)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if any(t == "label" and st == "running" for t, _, st, _ in af.task_states(DAG, run2)):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"label never ran: {af.task_states(DAG, run2)}\n{stack.tail()}")
        time.sleep(3)  # in the middle of a shard
        stack.kill("worker")
        stack.start("worker2", "celery", "worker", "--queues", "default,gpu")
        assert _wait(af, run2, stack, 500) == "success", f"{af.task_states(DAG, run2)}\n{stack.tail()}"
        tries = [tr for t, _, st, tr in af.task_states(DAG, run2) if t == "label"]
        assert max(tries) >= 2, f"the kill did not hit a label task: {af.task_states(DAG, run2)}"
        second = _shard_docs(store)
        assert second.keys() == first.keys()
        for k in first:
            again = [(a["image_id"], a["category_id"], a["segmentation"]["counts"]) for a in json.loads(second[k])["annotations"]]
            assert again == anns[k], f"{k}: annotations differ after the killed worker's retry"
            assert len(set(again)) == len(again)
    finally:
        stack.stop()
