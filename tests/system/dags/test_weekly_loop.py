"""The weekly loop as the shipped deployment runs it. No Docker engine or helm binary exists here, so the test
gives each compose service its own loopback address and resolves the compose service names (``postgres``,
``redis``, ``seaweedfs``, ``mlflow``, ``airflow-apiserver``) through a hosts file in a private mount namespace
(tests/support/service_names.py), then runs compose's own commands with compose's own environment
(``docker/compose.yaml`` interpolated as compose does, from a test ``.env``): SeaweedFS and its bucket init,
MLflow through the image's entrypoint (basic-auth on, ``--allowed-hosts``, ``mlflow db upgrade``), airflow-init
(migrate, the FAB admin from the secret, the GPU pool), the api-server, scheduler and dag-processor, and the two
workers (``default`` and ``gpu`` queues) with **separate** scratch directories. PostgreSQL and Redis are the
machine's servers, under the names ``postgres`` and ``redis``, with compose's role, databases and Redis db.

The workers also get every service-link variable Kubernetes would inject for the Services of the helm chart's
render (the same worker under helm), and the chart's rendered ConfigMap must set what compose sets.

Models and the evaluation set are put in the store with ``ovtasks models upload`` (the operator guide's step);
an ingest triggered through the REST API starts the data-aware chain (clean-shards Asset -> pseudo-label ->
pseudo-label Asset -> retrain -> model Asset); a second retrain and both promotions are triggered through
the REST API; the champion answers an image through ``ovtasks serve`` (sha256 check, then ``mlflow models serve``); ``ovtasks promote --version``
rolls back. A loopback SMTP server receives the promotion and failure mails; task logs land in the store.

Everything that differs from compose is listed in the test (``REWRITES`` and ``test_only``): where a container
has its own filesystem, ports and addresses, the test has paths in its tmp dir and loopback addresses; only a
GPU can show the gpu worker's ``OVTASKS_DEVICE=cuda`` (here ``cpu``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.support.airflow_stack import BIN, Stack
from tests.support.deploy_env import compose_services, service_env
from tests.support.service_names import ServiceNames, port_free

from tests.support import ROOT
DAGS = ["ovtasks_pseudo_label", "ovtasks_retrain", "ovtasks_promote", "ovtasks_ingest"]
MODEL = "ovtasks-ov-maskrcnn"
# each compose service on its own loopback address; PostgreSQL and Redis are the machine's (on 127.0.0.1)
ADDRESSES = {"postgres": "127.0.0.1", "redis": "127.0.0.1", "seaweedfs": "127.0.0.21", "mlflow": "127.0.0.22",
             "airflow-apiserver": "127.0.0.23"}
# compose's databases (docker/postgres-init) and Redis db: the test owns these names on the machine's servers
DATABASES = ("airflow", "mlflow", "mlflow_auth")


@pytest.fixture
def names(tmp_path):
    names = ServiceNames(tmp_path, ADDRESSES)
    reason = names.why_not()
    busy = [f"{a}:{p}" for a, p in (("127.0.0.21", 8333), ("127.0.0.21", 9333), ("127.0.0.22", 5000), ("127.0.0.23", 8080))
            if not port_free(a, p)]
    if reason or busy:
        msg = reason or f"ports in use: {busy}"
        print(f"\nSKIP weekly loop under service names: {msg}", file=sys.stderr)
        pytest.skip(msg)
    return names


@pytest.fixture
def compose_databases():
    """What compose's postgres container holds: the role ``airflow`` and docker/postgres-init's databases."""
    import psycopg2

    from tests.support.pg import admin_connection

    conn = admin_connection("weekly loop")
    cur = conn.cursor()
    cur.execute("SELECT 1 FROM pg_roles WHERE rolname = 'airflow'")
    if not cur.fetchone():
        cur.execute("CREATE ROLE airflow LOGIN CREATEDB")
    for db in DATABASES:
        cur.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    cur.execute("CREATE DATABASE airflow OWNER airflow")  # POSTGRES_DB
    init = psycopg2.connect(host="127.0.0.1", port=5432, user="airflow", dbname="airflow")
    init.autocommit = True
    sql = "\n".join(line for line in (ROOT / "docker" / "postgres-init" / "10-mlflow.sql").read_text().splitlines()
                    if not line.strip().startswith("--"))
    for stmt in filter(str.strip, sql.split(";")):
        init.cursor().execute(stmt)
    init.close()
    yield
    for db in DATABASES:
        cur.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    conn.close()


def _dotenv(bucket: str) -> dict:
    """What an operator writes in docker/.env: a value for every key of docker/.env.example."""
    import re
    import secrets

    from cryptography.fernet import Fernet

    example = set(re.findall(r"^([A-Z0-9_]+)=", (ROOT / "docker" / ".env.example").read_text(), re.M))
    dotenv = {"AIRFLOW_FERNET_KEY": Fernet.generate_key().decode(), "POSTGRES_PASSWORD": "unused-with-trust-auth",
              "AIRFLOW_API_SECRET_KEY": secrets.token_hex(16), "AIRFLOW_JWT_SECRET": secrets.token_hex(32),
              "AIRFLOW_ADMIN_PASSWORD": secrets.token_hex(12), "S3_ACCESS_KEY": "ovt-" + secrets.token_hex(4),
              "S3_SECRET_KEY": secrets.token_hex(16), "MLFLOW_ADMIN_PASSWORD": secrets.token_hex(12),
              "MLFLOW_FLASK_SECRET_KEY": secrets.token_hex(32), "OVTASKS_BUCKET": bucket, "OVTASKS_ALERT_EMAILS": "ops@example.org"}
    assert set(dotenv) == example, set(dotenv) ^ example
    return dotenv


def _rewrite(value: str, rewrites: dict[str, str]) -> str:
    for old, new in rewrites.items():
        value = value.replace(old, new)
    return value


def _start(names: ServiceNames, argv: list[str], env: dict, log: Path, cwd: Path = ROOT) -> subprocess.Popen:
    return subprocess.Popen(names.wrap(argv), env=env, cwd=cwd, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_http(url: str, proc: subprocess.Popen, log: Path, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{what} did not serve at {url}: {log.read_text(errors='replace')[-3000:]}")


def _wait_for_run(stack: Stack, af, dag: str, run_type: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [r for r in af.latest_runs(dag, 5) if r["run_type"] == run_type]
        if runs:
            return runs[0]["run_id"]
        time.sleep(2)
    pytest.fail(f"no {run_type} run of {dag}: {af.latest_runs(dag, 5)}\n{stack.tail()}")


def _in_names(names: ServiceNames, argv: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(names.wrap(argv), env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r


# What a worker's MLflow client sees, run under the service names with compose's worker environment: the
# registry through http://mlflow:5000 with the basic-auth login; and what an anonymous caller is refused.
MLFLOW_CHECK = """
import json, os, sys, urllib.error, urllib.request
from mlflow import MlflowClient
base = os.environ["OVTASKS_REGISTRY__TRACKING_URI"]  # http://mlflow:5000; the login from MLFLOW_TRACKING_USERNAME/PASSWORD
c = MlflowClient(base, registry_uri=base)
name = sys.argv[1]
champ = c.get_model_version_by_alias(name, "champion")
v1 = c.get_model_version(name, "1")
out = {"champion": champ.version, "promoted_by": champ.tags.get("promoted_by"), "v1_dag_run": v1.tags.get("dag_run"),
       "held_out": champ.tags.get("eval_held_out_images"), "anonymous": {}}
for what, method, path, body in [
        ("alias", "POST", "/api/2.0/mlflow/registered-models/alias", {"name": name, "alias": "champion", "version": "1"}),
        ("artifact", "PUT", "/api/2.0/mlflow-artifacts/artifacts/evil/python_model.pkl", None),
        ("search", "GET", "/api/2.0/mlflow/experiments/search?max_results=1", None)]:
    data = json.dumps(body).encode() if body else (b"x" if method == "PUT" else None)
    req = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        out["anonymous"][what] = urllib.request.urlopen(req, timeout=10).status
    except urllib.error.HTTPError as e:
        out["anonymous"][what] = e.code
print(json.dumps(out))
"""


@pytest.mark.timeout(1500)
def test_weekly_loop_on_the_compose_environment(synth_small, clean_small, names, compose_databases, smtp_server, tmp_path):
    import redis
    from minio import Minio

    from ovtasks.core.config import load_settings
    from ovtasks.core.storage import open_store
    from ovtasks.train.wspn import WspnTrainConfig, train_wspn
    from tests.support.chart import config_map, merged_values, render, service_links, services as chart_services

    bucket = f"ovt-loop-{uuid.uuid4().hex[:6]}"
    dotenv = _dotenv(bucket)
    services = compose_services(dotenv)
    cpu, gpu = service_env(services, "worker-cpu"), service_env(services, "worker-gpu")
    assert {k: v for k, v in gpu.items() if k != "OVTASKS_DEVICE"} == cpu and gpu["OVTASKS_DEVICE"] == "cuda"

    # the chart (rendered by Helm's engine) sets what compose sets for the same bucket; the store, MLflow and
    # remote-log endpoints are each stack's own service names
    objects = render(merged_values("values-production.example.yaml", overrides={"ovtasks": {"bucket": bucket, "evaluationGt": ""}}))
    chart = config_map(objects)
    own_names = {"OVTASKS_S3__ENDPOINT", "OVTASKS_REGISTRY__TRACKING_URI", "AIRFLOW_CONN_OVTASKS_S3", "OVTASKS_AIRFLOW__URL"}
    chart_only = {"OVTASKS_S3__SECURE", "OVTASKS_S3__CREDENTIALS", "OVDAGS_ALERT_EMAILS"}
    same = {k: chart[k] for k in chart if k not in own_names | chart_only}
    assert same == {k: cpu.get(k) for k in same}, {k: (chart[k], cpu.get(k)) for k in same if chart[k] != cpu.get(k)}
    # under helm the same worker also gets a service link for every Service of the release
    links = service_links(chart_services(objects))

    # every difference from compose, and why: a container's own filesystem, addresses and ports become paths
    # in tmp_path and this machine's loopback addresses
    data = tmp_path / "seaweedfs"
    data.mkdir()
    REWRITES = {"-dir=/data": f"-dir={data}", "/tmp/s3.json": str(tmp_path / "s3.json"),  # the container's volume, /tmp
                "-ip.bind=0.0.0.0": f"-ip.bind={ADDRESSES['seaweedfs']}",  # its own network namespace's wildcard
                "--host=0.0.0.0": f"--host={ADDRESSES['mlflow']}", "http://127.0.0.1:5000": "http://mlflow:5000"}
    path = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # the image's binaries (weed, mlflow, airflow)

    # seaweedfs and store-init: compose's commands
    weed = _start(names, ["sh", "-c", _rewrite(services["seaweedfs"]["command"][0], REWRITES)],
                  {**os.environ, **service_env(services, "seaweedfs"), **path}, tmp_path / "seaweedfs.log", cwd=tmp_path)
    mc = Minio(f"{ADDRESSES['seaweedfs']}:8333", access_key=dotenv["S3_ACCESS_KEY"], secret_key=dotenv["S3_SECRET_KEY"], secure=False)
    procs = [weed]
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                mc.list_buckets()
                break
            except Exception as exc:  # noqa: BLE001 - not up yet
                if weed.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"compose's seaweedfs did not serve: {exc}\n{(tmp_path / 'seaweedfs.log').read_text()[-3000:]}")
                time.sleep(0.5)
        _in_names(names, ["sh", "-c", services["store-init"]["command"][0]], {**os.environ, **service_env(services, "store-init"), **path})
        assert {b.name for b in mc.list_buckets()} >= {bucket, "mlflow-artifacts"}

        # mlflow: the image's entrypoint (docker/mlflow-start.py) with compose's command and environment
        mlflow_args = [_rewrite(a, REWRITES) for a in services["mlflow"]["command"]] + ["--workers", "1"]  # 1: CPU-sized
        mlflow_env = {**os.environ, **service_env(services, "mlflow"), **path}
        mlflow = _start(names, [sys.executable, str(ROOT / "docker" / "mlflow-start.py"), *mlflow_args], mlflow_env, tmp_path / "mlflow.log")
        procs.append(mlflow)
        _wait_http(f"http://{ADDRESSES['mlflow']}:5000/health", mlflow, tmp_path / "mlflow.log", "compose's mlflow")
        health = [_rewrite(a, REWRITES) for a in services["mlflow"]["healthcheck"]["test"][1:]]  # CMD python mlflow-start check ...
        _in_names(names, [sys.executable, str(ROOT / "docker" / "mlflow-start.py"), *health[2:]], mlflow_env)

        redis.Redis(host="127.0.0.1", port=6379, db=0).flushdb()  # compose's broker db, owned by this test
        test_only = {
            "AIRFLOW_HOME": str(tmp_path / "home"), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),  # the image's
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"), **path, "HF_HUB_OFFLINE": "1",
            # the smtp_default connection an operator creates in the UI, to a loopback server
            "AIRFLOW_CONN_SMTP_DEFAULT": smtp_server.env["AIRFLOW_CONN_SMTP_DEFAULT"],
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5", "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
            "OVDAGS_RETRY_DELAY_S": "1",  # seconds, not minutes, between tries
            "OVDAGS_RETRAIN_STEPS": "3", "OVDAGS_RETRAIN_EVAL_IMAGES": "6",  # a CPU-sized Asset-triggered retrain
            "OVTASKS_REGISTRY__MIN_NOVEL_AP50": "0",  # a 3-step model scores ~0: the gate's floor would refuse it
        }
        base = {**cpu, **test_only}
        scratch = {n: tmp_path / f"scratch-{n}" for n in ("api", "worker-cpu", "worker-gpu")}
        env = {**base, "OVTASKS_DATA_DIR": str(scratch["api"])}
        workers = {"worker-cpu": ("default", {**base, **links, "OVTASKS_DATA_DIR": str(scratch["worker-cpu"])}),
                   "worker-gpu": ("gpu", {**base, **gpu, **test_only, **links,
                                          "OVTASKS_DEVICE": "cpu",  # GPU only: compose's cuda
                                          "OVTASKS_DATA_DIR": str(scratch["worker-gpu"])})}

        # airflow-init: compose's command (migrate, the FAB admin from AIRFLOW_ADMIN_PASSWORD, the GPU pool)
        init_env = {**service_env(services, "airflow-init"), **test_only}
        _in_names(names, ["bash", "-c", services["airflow-init"]["command"][0]], init_env)

        # models, the evaluation set and the source shards in the store, as the operator guide says
        ops = {**base, "OVTASKS_DATA_DIR": str(tmp_path / "operator")}
        wspn = train_wspn(clean_small, str(tmp_path / "wspn"), load_settings(env={}), WspnTrainConfig(steps=5, max_images=16))
        upload = [(str(ROOT / "models" / "itm-synth"), cpu["OVTASKS_MASKFREE__ITM_MODEL"]),
                  (wspn.model_uri, cpu["OVTASKS_MASKFREE__WSPN_MODEL"]),
                  (str(Path(synth_small[0]) / "gt" / "instances.json"), cpu["OVTASKS_PIPELINE__EVAL_GT_URI"])]
        for src, dst in upload:
            _in_names(names, [str(BIN / "ovtasks"), "models", "upload", src, dst], ops)
        s3 = load_settings(env={"OVTASKS_S3__ENDPOINT": f"{ADDRESSES['seaweedfs']}:8333", "OVTASKS_S3__ACCESS_KEY": dotenv["S3_ACCESS_KEY"],
                                "OVTASKS_S3__SECRET_KEY": dotenv["S3_SECRET_KEY"]}).s3  # the host's view: the published port
        source = open_store(cpu["OVTASKS_PIPELINE__SOURCE_URI"], s3)
        for f in sorted(Path(synth_small[0]).iterdir()):
            if f.is_file():
                source.put_file(f.name, f)

        stack = Stack(env, tmp_path / "logs", wrap=names.wrap)
        try:
            af = stack.up(8080, DAGS, workers=workers, host=ADDRESSES["airflow-apiserver"], init=False,
                          password=dotenv["AIRFLOW_ADMIN_PASSWORD"])
            for dag in DAGS[1:3]:
                af.unpause(dag)
            ingest = af.trigger("ovtasks_ingest")
            af.unpause("ovtasks_ingest")  # its hourly run, if one is due, queues behind and finds nothing new
            assert stack.wait(af, "ovtasks_ingest", ingest, 400) == "success", f"{af.task_states('ovtasks_ingest', ingest)}\n{stack.tail()}"

            # the clean-shards Asset starts pseudo-labelling; the pseudo-label Asset starts the retrain
            label = _wait_for_run(stack, af, "ovtasks_pseudo_label", "asset_triggered")
            assert stack.wait(af, "ovtasks_pseudo_label", label, 600) == "success", stack.tail()
            retrain1 = _wait_for_run(stack, af, "ovtasks_retrain", "asset_triggered")
            assert stack.wait(af, "ovtasks_retrain", retrain1, 600) == "success", stack.tail()

            store = open_store(f"s3://{bucket}", s3)
            assert json.loads(store.get_bytes("labelled/pseudo/maskfree/report.json"))["missing"] == []
            models = [k for k in store.list("runs/") if k.endswith("model.safetensors")]
            assert len(models) == 1, models  # the model went to the store, not to a worker's disk
            for d in scratch.values():
                assert not list(d.rglob("*.safetensors")) and not list(d.rglob("pseudo/maskfree/*.json")), d

            promote1 = af.trigger("ovtasks_promote", {"who": "someone-else"})  # a "who" in the conf is not the actor
            assert stack.wait(af, "ovtasks_promote", promote1, 300) == "success", stack.tail()
            retrain2 = af.trigger("ovtasks_retrain", {"steps": 3, "eval_images": 6})
            assert stack.wait(af, "ovtasks_retrain", retrain2, 600) == "success", stack.tail()
            # a user who may trigger DAGs but has no admin role: the promote run fails, whatever its conf says
            from ovtasks.orchestration.rest import Airflow

            _in_names(names, [str(BIN / "airflow"), "users", "create", "--role", "Op", "--username", "analyst", "--password",
                              "analyst-pw-123", "--firstname", "A", "--lastname", "N", "--email", "analyst@localhost"], init_env)
            op = Airflow.login(af.base_url, "analyst", "analyst-pw-123")
            bypass = op.trigger("ovtasks_promote", {"who": "admin", "tolerance": 10.0})
            assert stack.wait(op, "ovtasks_promote", bypass, 300) == "failed"
            promote2 = af.trigger("ovtasks_promote", {"tolerance": 10.0})  # registry.max_promotion_tolerance
            assert stack.wait(af, "ovtasks_promote", promote2, 300) == "success", stack.tail()
            failing = af.trigger("ovtasks_pseudo_label", {"generator": "no-such-generator"})
            assert stack.wait(af, "ovtasks_pseudo_label", failing, 300) == "failed"

            # the registry as a worker sees it (http://mlflow:5000, logged in), and refused to anonymous callers
            seen = json.loads(_in_names(names, [sys.executable, "-c", MLFLOW_CHECK, MODEL], ops).stdout.strip().splitlines()[-1])
            assert seen["champion"] == "2" and seen["promoted_by"] == "admin" and seen["held_out"] == "6"  # the triggering user
            assert seen["v1_dag_run"].startswith(f"ovtasks_retrain/{retrain1}")
            assert seen["anonymous"] == {"alias": 401, "artifact": 401, "search": 401}, seen

            # the UI plugin (in the api-server) lists the registered versions through MLflow's service name
            req = urllib.request.Request(f"{af.base_url}/ovtasks/api/models", headers={"Authorization": f"Bearer {af.token}"})
            listed = json.loads(urllib.request.urlopen(req, timeout=60).read())
            assert "2" in json.dumps(listed) and "champion" in json.dumps(listed), listed

            # the champion answers an image; then the operator rolls back to version 1, audited
            from PIL import Image

            from ovtasks.data.clean import iter_clean
            from tests.support.serve_client import ask_served_model

            sample = next(iter(iter_clean(clean_small, load_settings(env={}), 1)))
            Image.fromarray(sample.image).save(tmp_path / "query.png")
            instances = ask_served_model(f"models:/{MODEL}@champion", cpu["OVTASKS_REGISTRY__TRACKING_URI"], tmp_path / "query.png",
                                         "ball,box,star", tmp_path / "serve.log", env=ops, wrap=names.wrap)
            assert isinstance(instances, list) and all(i["name"] in {"ball", "box", "star"} for i in instances)
            out = _in_names(names, [str(BIN / "ovtasks"), "promote", "--version", "1", "--reason", "rollback drill"], ops).stdout
            assert "champion now" in out
            rolled = json.loads(_in_names(names, [sys.executable, "-c", MLFLOW_CHECK, MODEL], ops).stdout.strip().splitlines()[-1])
            assert rolled["champion"] == "1" and rolled["promoted_by"] == "admin"  # the CLI acts as its MLflow login

            # task logs are in the store (remote logging), not only on the worker that ran the task
            logs = store.list("airflow-logs/")
            assert any("dag_id=ovtasks_retrain" in k for k in logs) and any("dag_id=ovtasks_pseudo_label" in k for k in logs), logs[:20]

            subjects = [m["Subject"] for m in smtp_server.messages]
            assert "[ovtasks] ov-maskrcnn challenger v1: promoted" in subjects, subjects
            assert "[ovtasks] ov-maskrcnn challenger v2: promoted" in subjects, subjects
            assert any(x.startswith("[ovtasks] FAILED ovtasks_pseudo_label.") for x in subjects), subjects
            assert any(x.startswith("[ovtasks] FAILED ovtasks_promote.") for x in subjects), subjects  # the refused bypass
            assert {m["To"] for m in smtp_server.messages} == {"ops@example.org"}  # compose's OVTASKS_ALERT_EMAILS
        finally:
            stack.stop()
    finally:
        import signal

        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            p.wait(timeout=30)
