"""The weekly loop as the shipped deployment configures it. No Docker engine or helm binary exists here, so
the test takes the environment of ``docker/compose.yaml``'s workers (interpolated as compose does, from a
test ``.env``), checks the helm chart's ConfigMap renders the same pipeline settings, and runs the real stack
with exactly that environment: PostgreSQL, Redis, SeaweedFS for MinIO, MLflow started with compose's own
command (PostgreSQL backend, artifacts proxied to the S3 bucket), the api-server, scheduler and dag-processor,
and compose's two workers (``default`` and ``gpu`` queues) with **separate** scratch directories.

Models and the evaluation set are put in the store with ``ovtasks models upload`` (the operator guide's step);
an ingest triggered through the REST API starts the data-aware chain (clean-shards Asset -> pseudo-label ->
pseudo-label Asset -> retrain -> model Asset); a second retrain and both promotions are triggered through
the REST API; the champion answers an image through ``mlflow models serve``; ``ovtasks promote --version``
rolls back. A loopback SMTP server receives the promotion and failure mails.

Only a GPU can show the gpu worker's ``OVTASKS_DEVICE=cuda``: here it is replaced by ``cpu`` (listed below
with every other difference from compose's environment)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from tests.support.airflow_stack import BIN, PASSWORD, Stack, free_port
from tests.support.deploy_env import compose_services, render_config_map, service_env

from tests.support import ROOT
DAGS = ["ovtasks_pseudo_label", "ovtasks_retrain", "ovtasks_promote", "ovtasks_ingest"]
MODEL = "ovtasks-ov-maskrcnn"


@pytest.fixture
def databases():
    from tests.support.pg import fresh_database

    with fresh_database("airflow", "weekly loop") as airflow_db, fresh_database("mlflow", "weekly loop") as mlflow_db:
        yield airflow_db, mlflow_db


def _dotenv(seaweed, bucket: str) -> dict:
    """What an operator writes in docker/.env: a value for every key of docker/.env.example."""
    import re

    from cryptography.fernet import Fernet

    example = set(re.findall(r"^([A-Z_]+)=", (ROOT / "docker" / ".env.example").read_text(), re.M))
    dotenv = {"AIRFLOW_FERNET_KEY": Fernet.generate_key().decode(), "POSTGRES_PASSWORD": "unused-with-trust-auth",
              "AIRFLOW_API_SECRET_KEY": "test-only-api-secret", "AIRFLOW_JWT_SECRET": "test-only-jwt-secret-" + "x" * 64,
              "AIRFLOW_ADMIN_PASSWORD": PASSWORD, "MINIO_ROOT_USER": seaweed.access_key, "MINIO_ROOT_PASSWORD": seaweed.secret_key,
              "OVTASKS_BUCKET": bucket, "OVTASKS_ALERT_EMAILS": "ops@example.org"}
    assert set(dotenv) == example, set(dotenv) ^ example
    return dotenv


def _hosts(compose_value: str, where: dict) -> str:
    """The compose network's service names resolved to this machine's services (and the PostgreSQL role:
    the local server trusts ``postgres``; compose's role is ``airflow`` with a password)."""
    v = compose_value
    for old, new in where.items():
        v = v.replace(old, new)
    return v


def _mlflow(services: dict, where: dict, log: Path) -> tuple[subprocess.Popen, str]:
    """compose's ``mlflow`` service: its command and environment, hosts resolved to loopback."""
    port = free_port()
    args = [_hosts(a, where) for a in services["mlflow"]["command"]]
    args = [f"--host=127.0.0.1" if a.startswith("--host=") else f"--port={port}" if a.startswith("--port=") else a for a in args]
    env = {**os.environ, **{k: _hosts(v, where) for k, v in service_env(services, "mlflow").items()}}
    proc = subprocess.Popen([str(BIN / "mlflow"), *args, "--workers", "1"], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    pytest.fail(f"compose's mlflow command did not serve: {log.read_text()[-2000:]}")


def _wait_for_run(stack: Stack, af, dag: str, run_type: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [r for r in af.latest_runs(dag, 5) if r["run_type"] == run_type]
        if runs:
            return runs[0]["run_id"]
        time.sleep(2)
    pytest.fail(f"no {run_type} run of {dag}: {af.latest_runs(dag, 5)}\n{stack.tail()}")


def _cli(*args, env: dict) -> subprocess.CompletedProcess:
    r = subprocess.run([str(BIN / "ovtasks"), *args], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r


@pytest.mark.timeout(1500)
def test_weekly_loop_on_the_compose_environment(synth_small, clean_small, seaweed, databases, redis_db, smtp_server, tmp_path):
    from minio import Minio

    from ovtasks.core.config import load_settings
    from ovtasks.core.storage import open_store
    from ovtasks.train.wspn import WspnTrainConfig, train_wspn

    airflow_db, mlflow_db = databases
    bucket = f"ovt-loop-{uuid.uuid4().hex[:6]}"
    services = compose_services(_dotenv(seaweed, bucket))
    cpu, gpu = service_env(services, "worker-cpu"), service_env(services, "worker-gpu")
    assert {k: v for k, v in gpu.items() if k != "OVTASKS_DEVICE"} == cpu and gpu["OVTASKS_DEVICE"] == "cuda"

    # the chart's ConfigMap sets what compose sets, for the same bucket (the store endpoint and MLflow are
    # cluster service names in each)
    values = yaml.safe_load((ROOT / "helm" / "ovtasks" / "values.yaml").read_text())
    values["ovtasks"]["bucket"] = bucket
    chart = render_config_map(values)
    cluster_names = {"OVTASKS_S3__ENDPOINT", "MLFLOW_S3_ENDPOINT_URL", "OVTASKS_REGISTRY__TRACKING_URI"}
    same = {k: chart[k] for k in chart if k not in cluster_names and k != "OVTASKS_S3__SECURE" and k != "OVDAGS_ALERT_EMAILS"}
    assert same == {k: cpu[k] for k in same}, {k: (chart[k], cpu.get(k)) for k in same if chart[k] != cpu.get(k)}
    assert chart["OVTASKS_S3__SECURE"] == "false" and set(chart) <= set(cpu) | {"OVTASKS_S3__SECURE"}

    port = free_port()
    mc = Minio(seaweed.endpoint, access_key=seaweed.access_key, secret_key=seaweed.secret_key, secure=False)
    for b in (bucket, "mlflow-artifacts"):  # what compose's minio-init does
        if not mc.bucket_exists(b):
            mc.make_bucket(b)
    where = {"airflow:unused-with-trust-auth@postgres:5432/airflow": f"postgres@127.0.0.1:5432/{airflow_db}",
             "airflow:unused-with-trust-auth@postgres:5432/mlflow": f"postgres@127.0.0.1:5432/{mlflow_db}",
             "redis://redis:6379/0": redis_db, "http://airflow-apiserver:8080/": f"http://127.0.0.1:{port}/",
             "http://minio:9000": f"http://{seaweed.endpoint}", "minio:9000": seaweed.endpoint,
             "/opt/airflow/passwords/": f"{tmp_path}/passwords/"}
    mlflow_proc, mlflow_url = _mlflow(services, where, tmp_path / "mlflow.log")
    where["http://mlflow:5000"] = mlflow_url
    (tmp_path / "passwords").mkdir()
    (tmp_path / "passwords" / "simple_auth_manager_passwords.json").write_text(json.dumps({"admin": PASSWORD}))  # airflow-init's job

    # every difference from compose's worker environment, and why
    test_only = {
        "AIRFLOW_HOME": str(tmp_path / "home"), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),  # the image's
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
        # the smtp_default connection an operator creates in the UI, to a loopback server
        "AIRFLOW_CONN_SMTP_DEFAULT": smtp_server.env["AIRFLOW_CONN_SMTP_DEFAULT"],
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5", "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
        "OVDAGS_RETRY_DELAY_S": "1",  # seconds, not minutes, between tries
        "OVDAGS_RETRAIN_STEPS": "3", "OVDAGS_RETRAIN_EVAL_IMAGES": "6",  # a CPU-sized Asset-triggered retrain
        "OVTASKS_REGISTRY__MIN_NOVEL_AP50": "0",  # a 3-step model scores ~0: the gate's floor would refuse it
    }
    base = {**{k: _hosts(v, where) for k, v in cpu.items()}, **test_only}
    assert not [v for v in base.values() if any(h in v for h in ("postgres:5432", "redis:6379", "minio:", "mlflow:5000", "airflow-apiserver"))]
    scratch = {n: tmp_path / f"scratch-{n}" for n in ("api", "worker-cpu", "worker-gpu")}
    env = {**base, "OVTASKS_DATA_DIR": str(scratch["api"])}
    workers = {"worker-cpu": ("default", {**base, "OVTASKS_DATA_DIR": str(scratch["worker-cpu"])}),
               "worker-gpu": ("gpu", {**base, **{k: _hosts(v, where) for k, v in gpu.items()}, **test_only,
                                      "OVTASKS_DEVICE": "cpu",  # GPU only: compose's cuda
                                      "OVTASKS_DATA_DIR": str(scratch["worker-gpu"])})}

    # models, the evaluation set and the source shards in the store, as the operator guide says
    ops = {**base, "OVTASKS_DATA_DIR": str(tmp_path / "operator")}
    wspn = train_wspn(clean_small, str(tmp_path / "wspn"), load_settings(env={}), WspnTrainConfig(steps=5, max_images=16))
    _cli("models", "upload", str(ROOT / "models" / "itm-synth"), cpu["OVTASKS_MASKFREE__ITM_MODEL"], env=ops)
    _cli("models", "upload", wspn.model_uri, cpu["OVTASKS_MASKFREE__WSPN_MODEL"], env=ops)
    _cli("models", "upload", str(Path(synth_small[0]) / "gt" / "instances.json"), cpu["OVTASKS_PIPELINE__EVAL_GT_URI"], env=ops)
    s3 = load_settings(env={k: v for k, v in base.items() if k.startswith("OVTASKS_S3__")}).s3
    source = open_store(cpu["OVTASKS_PIPELINE__SOURCE_URI"], s3)
    for f in sorted(Path(synth_small[0]).iterdir()):
        if f.is_file():
            source.put_file(f.name, f)

    stack = Stack(env, tmp_path / "logs")
    try:
        af = stack.up(port, DAGS, workers=workers, pool_slots=2)  # compose's airflow-init: pool ovtasks_gpu 2
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

        promote1 = af.trigger("ovtasks_promote", {"who": "weekly-loop-test"})
        assert stack.wait(af, "ovtasks_promote", promote1, 300) == "success", stack.tail()
        retrain2 = af.trigger("ovtasks_retrain", {"steps": 3, "eval_images": 6})
        assert stack.wait(af, "ovtasks_retrain", retrain2, 600) == "success", stack.tail()
        promote2 = af.trigger("ovtasks_promote", {"who": "weekly-loop-test", "tolerance": 100.0})
        assert stack.wait(af, "ovtasks_promote", promote2, 300) == "success", stack.tail()
        failing = af.trigger("ovtasks_pseudo_label", {"generator": "no-such-generator"})
        assert stack.wait(af, "ovtasks_pseudo_label", failing, 300) == "failed"

        from mlflow import MlflowClient

        client = MlflowClient(mlflow_url, registry_uri=mlflow_url)
        champion = client.get_model_version_by_alias(MODEL, "champion")
        assert champion.version == "2" and champion.tags["promoted_by"] == "weekly-loop-test"
        assert client.get_model_version(MODEL, "1").tags["dag_run"].startswith(f"ovtasks_retrain/{retrain1}")
        assert champion.tags["eval_held_out_images"] == "6"

        # the champion answers an image; then the operator rolls back to version 1, audited
        from PIL import Image

        from ovtasks.data.clean import iter_clean

        sample = next(iter(iter_clean(clean_small, load_settings(env={}), 1)))
        Image.fromarray(sample.image).save(tmp_path / "query.png")
        from tests.support.serve_client import ask_served_model

        instances = ask_served_model(f"models:/{MODEL}@champion", mlflow_url, tmp_path / "query.png", "ball,box,star", tmp_path / "serve.log")
        assert isinstance(instances, list) and all(i["name"] in {"ball", "box", "star"} for i in instances)
        out = _cli("promote", "--version", "1", "--who", "weekly-loop-test", "--reason", "rollback drill", env=ops).stdout
        assert "champion now" in out and client.get_model_version_by_alias(MODEL, "champion").version == "1"

        subjects = [m["Subject"] for m in smtp_server.messages]
        assert f"[ovtasks] ov-maskrcnn challenger v1: promoted" in subjects, subjects
        assert f"[ovtasks] ov-maskrcnn challenger v2: promoted" in subjects, subjects
        assert any(x.startswith("[ovtasks] FAILED ovtasks_pseudo_label.") for x in subjects), subjects
        assert {m["To"] for m in smtp_server.messages} == {"ops@example.org"}  # compose's OVTASKS_ALERT_EMAILS
    finally:
        stack.stop()
        mlflow_proc.terminate()
        mlflow_proc.wait(timeout=30)
