"""Every DAG loads with no import errors; tags, retries, timeouts, queues, pools and docs are set; parsing is cheap."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.support import ROOT
DAGS = ROOT / "dags"
EXPECTED = {"ovtasks_ingest", "ovtasks_pseudo_label", "ovtasks_retrain", "ovtasks_promote"}


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow-home")
    os.environ.setdefault("AIRFLOW_HOME", str(home))
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def test_no_import_errors_and_all_dags_present(dagbag):
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) == EXPECTED


def test_every_task_retries_with_backoff_timeout_and_docs(dagbag):
    for dag in dagbag.dags.values():
        assert "ovtasks" in dag.tags and dag.doc_md, dag.dag_id
        for t in dag.tasks:
            where = f"{dag.dag_id}.{t.task_id}"
            assert t.retries >= 2 and t.retry_exponential_backoff, where
            assert t.execution_timeout is not None and t.on_failure_callback, where
            assert t.doc_md, where


def test_gpu_work_runs_on_the_gpu_queue_and_pool(dagbag):
    from ovtasks.orchestration.dag_defaults import GPU_POOL, GPU_QUEUE

    gpu = {(d.dag_id, t.task_id) for d in dagbag.dags.values() for t in d.tasks if t.queue == GPU_QUEUE}
    assert gpu == {("ovtasks_pseudo_label", "label"), ("ovtasks_retrain", "train"), ("ovtasks_retrain", "register")}
    for d in dagbag.dags.values():
        for t in d.tasks:
            assert t.queue in ("default", GPU_QUEUE)
            assert (t.pool == GPU_POOL) == (t.queue == GPU_QUEUE), (d.dag_id, t.task_id)


def test_schedules_and_assets(dagbag):
    from ovtasks.orchestration.dag_defaults import CLEAN_ASSET_URI, MODEL_ASSET_URI, PSEUDO_ASSET_URI

    ingest, label = dagbag.dags["ovtasks_ingest"], dagbag.dags["ovtasks_pseudo_label"]
    assert [o.uri.rstrip("/") for o in ingest.get_task("report").outlets] == [CLEAN_ASSET_URI]
    assert [o.uri.rstrip("/") for o in label.get_task("finalize").outlets] == [PSEUDO_ASSET_URI]
    assert CLEAN_ASSET_URI in str(label.timetable.asset_condition)
    retrain = dagbag.dags["ovtasks_retrain"]
    assert "0 0 * * 0" in repr(retrain.timetable.timetable) and PSEUDO_ASSET_URI in str(retrain.timetable.asset_condition)
    assert [o.uri.rstrip("/") for o in retrain.get_task("register").outlets] == [MODEL_ASSET_URI]
    assert not dagbag.dags["ovtasks_promote"].timetable.can_be_scheduled
    assert set(dagbag.dags["ovtasks_retrain"].params) >= {"model", "steps", "window_shards"}
    params = dagbag.dags["ovtasks_promote"].params
    assert set(params) >= {"model", "tolerance", "reason"} and "who" not in params  # the actor is the triggering user


@pytest.mark.parametrize("path", sorted(DAGS.glob("ovtasks_*.py")), ids=lambda p: p.name)
def test_parse_is_cheap_and_imports_nothing_heavy(path):
    """A fresh interpreter imports the DAG file (airflow.sdk itself excluded from the timing); torch,
    transformers, mlflow, GX and the store clients must not be imported at parse time."""
    code = (
        "import sys, time; import airflow.sdk; t=time.perf_counter(); import runpy; "
        f"runpy.run_path({str(path)!r}); dt=time.perf_counter()-t; "
        "heavy=[m for m in ('torch','transformers','mlflow','great_expectations','minio','pycocotools','ovtasks.core.storage') if m in sys.modules]; "
        "import json; print('RESULT ' + json.dumps({'seconds': dt, 'heavy': heavy}))"
    )
    env = {**os.environ, "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    seconds, heavy = res["seconds"], ",".join(res["heavy"])
    print(f"{path.name}: parsed in {seconds * 1000:.0f} ms (process {time.perf_counter() - t0:.1f} s)")
    assert heavy == "", f"heavy imports at parse time: {heavy}"
    assert seconds < 1.0


def test_asset_uris_are_the_store_locations_compose_and_helm_set():
    """With the pipeline settings of a deployment in the environment, the Assets are the real store prefixes."""
    code = ("from ovtasks.orchestration import dag_defaults as a; import json; "
            "print(json.dumps([a.CLEAN_ASSET_URI, a.PSEUDO_ASSET_URI, a.MODEL_ASSET_URI]))")
    env = {**os.environ, "OVTASKS_PIPELINE__CLEAN_URI": "s3://ovtasks/clean", "OVTASKS_PIPELINE__PSEUDO_URI": "s3://ovtasks/labelled",
           "OVTASKS_PIPELINE__MODELS_URI": "s3://ovtasks/runs"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["s3://ovtasks/clean", "s3://ovtasks/labelled/pseudo", "s3://ovtasks/runs"]
    env["OVDAGS_CLEAN_ASSET"] = "s3://elsewhere/clean"  # an explicit override wins
    env.pop("OVTASKS_PIPELINE__MODELS_URI")  # not set: a logical URI
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["s3://elsewhere/clean", "s3://ovtasks/labelled/pseudo", "ovtasks://models"]
