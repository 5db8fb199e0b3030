"""`ovtasks status` and `ovtasks trigger` against a real api-server (apache-airflow-client, token auth):
the DAGs are serialized but no scheduler runs, so a triggered run stays queued, which is what we check."""

import pytest
from rich.console import Console

from ovtasks.core.config import load_settings


def _settings(ui_world, base, password="test-only-admin"):
    env = {**ui_world[1], "OVTASKS_AIRFLOW__URL": base, "OVTASKS_AIRFLOW__USERNAME": "admin"}
    if password:
        env["OVTASKS_AIRFLOW__PASSWORD"] = password
    return load_settings(env=env)


def test_status_and_trigger(ui_world, api_server):
    from ovtasks.cli.ops import status, trigger

    base, _ = api_server
    s = _settings(ui_world, base)
    con = Console(record=True, width=160)
    out = status(s, console=con)
    text = con.export_text()
    assert out["airflow_error"] is None and [r["dag_id"] for r in out["runs"]] == ["ovtasks_ingest", "ovtasks_pseudo_label",
                                                                                   "ovtasks_retrain", "ovtasks_promote"]
    assert "latest DAG runs" in text and "shards (maskfree)" in text and "ovtasks-ov-maskrcnn" in text
    assert out["stages"]["clean"] == 2 and out["models"][0]["challenger"] == "v2"

    run_id, state = trigger(s, "ovtasks_promote", {"reason": "cli-test"}, wait=False, timeout=0, console=con)
    assert state == "queued" and run_id
    # no scheduler: following it runs into the timeout, with the progress loop exercised
    _, state = trigger(s, "ovtasks_promote", {}, wait=True, timeout=3, console=con, poll=0.5)
    assert state == "timeout"
    after = status(s, console=Console(record=True, width=160))
    promote = next(r for r in after["runs"] if r["dag_id"] == "ovtasks_promote")
    assert promote["state"] == "queued" and promote["run_type"] == "manual"
    with pytest.raises(ValueError, match="unknown DAG"):
        trigger(s, "no_such_dag", {}, wait=False, timeout=0, console=con)


def test_status_without_airflow_still_reports_data_and_models(ui_world, capsys):
    from ovtasks.cli.main import main
    from ovtasks.cli.ops import AirflowUnavailable, connect, status

    with pytest.raises(AirflowUnavailable, match="OVTASKS_AIRFLOW__PASSWORD"):
        connect(_settings(ui_world, "http://127.0.0.1:9", password=None))
    con = Console(record=True, width=160)
    out = status(_settings(ui_world, "http://127.0.0.1:9"), console=con)
    assert "cannot log in to Airflow" in out["airflow_error"] and out["stages"]["source"] == 2
    assert "shards (maskfree)" in con.export_text()
    assert main(["trigger", "ovtasks_ingest", "--conf", "{not json"]) == 2
    assert "--conf is not JSON" in capsys.readouterr().err
