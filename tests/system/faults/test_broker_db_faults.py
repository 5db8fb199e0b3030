"""Broker and database faults during a DAG run on the production stack (CeleryExecutor, PostgreSQL,
Redis, SeaweedFS): the test's own Redis broker is SIGKILLed and restarted while `label` runs, and every
PostgreSQL connection of the Airflow database is terminated. The run completes or fails cleanly; if it
failed, a re-run completes. Its annotations equal those of an undisturbed run, none lost or duplicated."""

import json
import shutil
import signal
import subprocess
import time
import uuid

import pytest

from tests.support.airflow_stack import Stack, annotations, celery_env, free_port, shard_docs
from ovtasks.core.config import load_settings

DAG = "ovtasks_pseudo_label"


class OwnRedis:
    def __init__(self, workdir):
        self.port, self.workdir, self.proc = free_port(), workdir, None
        workdir.mkdir(parents=True, exist_ok=True)

    def start(self):
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server not found (the machine's Redis service ships it)")
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                      "--dir", str(self.workdir)], stdout=open(self.workdir / "redis.log", "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        import redis

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                redis.Redis(port=self.port, socket_connect_timeout=1).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.1)
        pytest.fail("own redis-server did not start")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def postgres_db():
    from tests.support.pg import fresh_database

    with fresh_database("airflow_faults", "broker/database faults") as db:
        yield db


def _terminate_connections(db: str) -> int:
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test")
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (db,))
    n = cur.fetchone()[0]
    conn.close()
    return n


def test_redis_restart_and_dropped_db_connections_during_a_run(synth_small, seaweed, postgres_db, tmp_path, record_fault):
    from ovtasks.ingest.pipeline import ingest
    from ovtasks.core.storage import open_store

    s3 = seaweed.env()
    bucket = f"ovt-faults-{uuid.uuid4().hex[:6]}"
    clean, labelled = f"s3://{bucket}/clean", f"s3://{bucket}/labelled"
    ingest(synth_small[0], clean, load_settings(env=s3), workers=1)
    broker = OwnRedis(tmp_path / "redis")
    broker.start()
    port = free_port()
    stack = Stack(celery_env(tmp_path, port, postgres_db, f"redis://127.0.0.1:{broker.port}/0", s3, clean, labelled), tmp_path / "logs")
    store = open_store(labelled, load_settings(env=s3).s3)
    try:
        af = stack.up(port, DAG)
        run1 = af.trigger(DAG)
        stack.wait_task_running(af, DAG, run1, "label")
        time.sleep(2)
        broker.kill()
        time.sleep(3)
        dropped = _terminate_connections(postgres_db)
        broker.start()  # same port, empty: whatever was queued in Redis is gone
        state1 = stack.wait(af, DAG, run1, 600)
        reruns = 0
        while state1 != "success" and reruns < 2:  # a clean failure is allowed; a re-run must complete
            reruns += 1
            run1 = af.trigger(DAG)
            state1 = stack.wait(af, DAG, run1, 600)
        assert state1 == "success", f"{af.task_states(DAG, run1)}\n{stack.tail()}"
        faulted = shard_docs(store)
        report = json.loads(store.get_bytes("pseudo/maskfree/report.json"))
        assert report["missing"] == [] and len(faulted) == 2

        # an undisturbed run from scratch gives the same annotations
        for key in store.list("pseudo/maskfree/"):
            store.delete(key)
        run2 = af.trigger(DAG)
        assert stack.wait(af, DAG, run2, 600) == "success", f"{af.task_states(DAG, run2)}\n{stack.tail()}"
        clean_run = annotations(shard_docs(store))
        got = annotations(faulted)
        assert got.keys() == clean_run.keys()
        for k in got:
            assert got[k] == clean_run[k], f"{k}: annotations differ from an undisturbed run"
            assert len(set(got[k])) == len(got[k])
        n = sum(map(len, got.values()))
        record_fault("broker restart and dropped database connections during a DAG run",
                     f"the Redis broker SIGKILLed 2 s into `label`, down 3 s, restarted empty; {dropped} PostgreSQL "
                     "connections of the Airflow DB terminated",
                     f"run {'succeeded' if reruns == 0 else f'failed cleanly, and re-run {reruns} time(s) succeeded'}; "
                     f"{n} annotations in {len(got)} shards, identical to an undisturbed run, none duplicated or missing"
                     + (f"; components that exited on the dropped connections and were restarted (as their Deployments "
                        f"would be): {stack.restarts}" if stack.restarts else ""), 0)
    finally:
        stack.stop()
        if broker.proc and broker.proc.poll() is None:
            broker.kill()
