"""A small world for the UI: the synthetic shards, their ingest, pseudo-labels (from the GT, validated) and
two registered model versions; plus an empty one; plus Airflow's simple auth manager with three users."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tests.support.seaweed import free_port

from ovtasks.core.config import load_settings

from tests.support import ROOT
PASSWORDS = {"admin": "test-only-admin", "viewer": "test-only-viewer", "op": "test-only-op"}


def world_env(synth_small, clean_small, labelled, data_dir) -> dict:
    return {"OVTASKS_DATA_DIR": str(data_dir), "OVTASKS_PIPELINE__SOURCE_URI": synth_small[0],
            "OVTASKS_PIPELINE__CLEAN_URI": clean_small, "OVTASKS_PIPELINE__PSEUDO_URI": labelled,
            "OVTASKS_REGISTRY__MIN_NOVEL_AP50": "1.0"}  # the planted versions score 2.0 and 3.0


def register_versions(settings, tmp: Path, aps=(2.0, 3.0)) -> None:
    """Two versions through the real registry code (a model directory with its metadata file)."""
    from ovtasks.registry.lifecycle import log_and_register

    model = tmp / "model"
    model.mkdir(exist_ok=True)
    (model / "ovtasks_model.json").write_text(json.dumps({"architecture": "ov-maskrcnn"}))
    (model / "model.safetensors").write_bytes(b"not used by the UI")
    for i, ap in enumerate(aps):
        rows = [{"setting": st, "split": sp, "box_AP": 1.0, "box_AP50": 2.0, "mask_AP": 0.5, "mask_AP50": ap}
                for st in ("generalized", "constrained") for sp in ("base", "novel")]
        log_and_register(settings, str(model), {"steps": i + 1}, [{"step": 0, "loss": 1.0}], {"passed": 2, "failed": 0},
                         {"rows": rows, "novel_mask_AP50": ap, "table": "|"}, data_manifest={"sha256": f"manifest{i}"},
                         dag_run=f"ovtasks_retrain/manual__{i}")


@pytest.fixture(scope="session")
def make_ui_world(synth_small, clean_small, labelled, tmp_path_factory):
    """A fresh world (its own MLflow registry with versions 1 and 2, no champion): (settings, env)."""

    def make():
        d = tmp_path_factory.mktemp("ui-world")
        env = world_env(synth_small, clean_small, labelled, d)
        s = load_settings(env=env)
        register_versions(s, d)
        return s, env

    return make


@pytest.fixture(scope="session")
def ui_world(make_ui_world):
    """Shared by the browser and CLI tests (the browser test may promote v2)."""
    return make_ui_world()


@pytest.fixture(scope="session")
def ui_empty(tmp_path_factory):
    d = tmp_path_factory.mktemp("ui-empty")
    return load_settings(env={"OVTASKS_DATA_DIR": str(d)})


@pytest.fixture(scope="module")
def simple_auth(tmp_path_factory):
    """Airflow's SimpleAuthManager (users admin / viewer / op) configured in this process, restored after."""
    home = tmp_path_factory.mktemp("airflow-home")
    os.environ.setdefault("AIRFLOW_HOME", str(home))
    from airflow.api_fastapi.app import purge_cached_app
    from airflow.configuration import conf

    pw = home / "passwords.json"
    pw.write_text(json.dumps(PASSWORDS))
    wanted = {("core", "auth_manager"): "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
              ("core", "simple_auth_manager_users"): "admin:admin,viewer:viewer,op:op",
              ("core", "simple_auth_manager_passwords_file"): str(pw),
              ("core", "simple_auth_manager_all_admins"): "False",
              ("api_auth", "jwt_secret"): "test-only-jwt-secret-" + "y" * 64}
    conn = f"sqlite:///{home / 'airflow.db'}"  # the token checks read the revoked_token table
    r = subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": conn})
    assert r.returncode == 0, r.stderr[-2000:]
    wanted[("database", "sql_alchemy_conn")] = conn
    old = {k: conf.get(*k, fallback=None) for k in wanted}

    def apply(values):
        from airflow import settings as af_settings

        for (section, key), v in values.items():
            if v is not None:
                conf.set(section, key, v)
        af_settings.dispose_orm(do_log=False)
        af_settings.configure_vars()
        af_settings.configure_orm()
        purge_cached_app()

    apply(wanted)
    yield PASSWORDS
    apply(old)


@pytest.fixture(scope="session")
def api_server(ui_world, tmp_path_factory):
    home = tmp_path_factory.mktemp("api-server-home")
    (home / "passwords.json").write_text(json.dumps({"admin": "test-only-admin"}))
    port = free_port()
    env = {**os.environ, **ui_world[1], "AIRFLOW_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
           "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",  # api-server test user
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
           "AIRFLOW__API_AUTH__JWT_SECRET": "test-only-jwt-secret-" + "z" * 64, "AIRFLOW__API__SECRET_KEY": "test-only-api-secret",
           "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}"}
    airflow = str(Path(sys.executable).parent / "airflow")
    r = subprocess.run([airflow, "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([airflow, "dags", "reserialize"], env=env, capture_output=True, text=True, timeout=300)  # DAGs in the DB
    assert r.returncode == 0, r.stderr[-2000:]
    log = home / "api-server.log"
    proc = subprocess.Popen([airflow, "api-server", "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{base}/api/v2/monitor/health", timeout=5)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"api-server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(1)
    yield base, log
    os.killpg(proc.pid, 15)
    proc.wait(timeout=60)
