"""Alerts (ovtasks.orchestration.alerts) to a real local SMTP server (aiosmtpd) and a local Slack-style webhook, configured
through Airflow connections in the environment, as a deployment would."""

import http.server
import json
import socket
import threading

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def webhook():
    """(url, received JSON bodies) of an HTTP endpoint standing in for a Slack incoming webhook."""
    got = []

    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}/services/T0/B0/x", got
    srv.shutdown()


def test_failure_and_promotion_alerts_reach_mail_and_slack(smtp_server, webhook, monkeypatch):
    from ovtasks.orchestration.alerts import failure_text, promotion_text, send_alert

    url, posts = webhook
    mails = smtp_server.messages
    for k, v in {**smtp_server.env, "AIRFLOW_CONN_OVTASKS_SLACK": json.dumps({"conn_type": "http", "host": url})}.items():
        monkeypatch.setenv(k, v)

    class TI:
        dag_id, task_id, map_index, try_number = "ovtasks_ingest", "ingest_shard", 3, 3

    subject, body = failure_text({"ti": TI(), "run_id": "manual__1", "exception": OSError("disk <full>")})
    assert send_alert(subject, body) == ["smtp", "slack"]
    refused = {"promoted": False, "reason": "challenger v2: novel mask AP50 0.00 is below the floor 5.00", "challenger": "2",
               "champion_before": "1", "champion_after": "1", "gate": {"verdict": "below_floor"}}
    assert send_alert(*promotion_text("ov-maskrcnn", refused)) == ["smtp", "slack"]

    assert [m["Subject"] for m in mails] == ["[ovtasks] FAILED ovtasks_ingest.ingest_shard",
                                             "[ovtasks] ov-maskrcnn challenger v2: promotion REFUSED"]
    assert mails[0]["To"] == "ops@example.org, ml@example.org" and mails[0]["From"] == "ovtasks@localhost"
    text = mails[0].get_payload()[0].get_payload(decode=True).decode()
    assert "manual__1" in text and "disk &lt;full&gt;" in text  # escaped in the HTML body
    assert "below the floor" in posts[1]["text"] and posts[0]["text"].startswith("*[ovtasks] FAILED")


def test_slack_messages_carry_dag_parameters_as_text(webhook, monkeypatch):
    """A reason like ``<!channel> see <https://evil|here> & more`` must not ping the channel or make a link."""
    from ovtasks.orchestration.alerts import promotion_text, send_alert

    url, posts = webhook
    monkeypatch.delenv("OVDAGS_ALERT_EMAILS", raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_OVTASKS_SLACK", json.dumps({"conn_type": "http", "host": url}))
    hostile = "<!channel> see <https://evil.example|here> & <@U123>"
    r = {"promoted": False, "reason": hostile, "challenger": "2", "champion_before": "1", "champion_after": "1", "gate": None}
    assert send_alert(*promotion_text("ov-maskrcnn", r)) == ["slack"]
    text = posts[0]["text"]
    assert "<" not in text.replace("&lt;", "") and ">" not in text.replace("&gt;", "")
    assert "&lt;!channel&gt; see &lt;https://evil.example|here&gt; &amp; &lt;@U123&gt;" in text


def test_a_malformed_webhook_url_is_never_logged(monkeypatch, caplog):
    import logging

    from ovtasks.orchestration.alerts import send_alert

    monkeypatch.delenv("OVDAGS_ALERT_EMAILS", raising=False)
    secret = "T0SECRET/B0SECRET/xxxxSECRETxxxx"
    for bad in (f"http://127.0.0.1:{_free_port()}/services/{secret}", f"https://hooks slack com/services/{secret}",
                f"http://[::1:{secret}"):
        monkeypatch.setenv("AIRFLOW_CONN_OVTASKS_SLACK", json.dumps({"conn_type": "http", "host": bad}))
        with caplog.at_level(logging.WARNING, logger="ovtasks.orchestration.alerts"):
            assert send_alert("s", "b") == []
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "Slack not sent" in logged and "SECRET" not in logged


def test_unconfigured_or_unreachable_channels_never_raise(monkeypatch):
    from ovtasks.orchestration.alerts import send_alert

    monkeypatch.delenv("OVDAGS_ALERT_EMAILS", raising=False)
    assert send_alert("s", "b") == []  # nothing configured: nothing sent, no error
    from tests.support.mail import smtp_env

    for k, v in smtp_env(_free_port()).items():  # a port nobody listens on
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AIRFLOW_CONN_OVTASKS_SLACK", json.dumps({"conn_type": "http", "host": f"http://127.0.0.1:{_free_port()}/x"}))
    assert send_alert("s", "b") == []


def test_s3_and_mlflow_credentials_from_airflow_connections(monkeypatch):
    """Credentials the environment does not set come from Airflow Connections; the environment wins."""
    from ovtasks.orchestration.dag_defaults import settings

    for k in ("OVTASKS_S3__ACCESS_KEY", "OVTASKS_S3__SECRET_KEY", "OVTASKS_S3__ENDPOINT", "OVTASKS_REGISTRY__TRACKING_URI",
              "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(k, "")  # recorded first, so teardown restores the original state even of what settings() writes
        monkeypatch.delenv(k)
    monkeypatch.setenv("AIRFLOW_CONN_OVTASKS_S3", json.dumps({"conn_type": "aws", "login": "AKIA-conn", "password": "s3cret",
                                                               "extra": {"endpoint_url": "https://minio.internal:9443"}}))
    monkeypatch.setenv("AIRFLOW_CONN_OVTASKS_MLFLOW", json.dumps({"conn_type": "http", "host": "mlflow.internal", "port": 5000,
                                                                   "schema": "https", "login": "svc", "password": "pw"}))
    s = settings()
    assert s.s3.access_key.get_secret_value() == "AKIA-conn" and s.s3.secret_key.get_secret_value() == "s3cret"
    assert s.s3.endpoint == "minio.internal:9443" and s.s3.secure
    assert s.registry.tracking_uri == "https://mlflow.internal:5000"
    import os

    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "svc" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "pw"
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")

    monkeypatch.setenv("OVTASKS_S3__ACCESS_KEY", "from-env")  # the environment wins
    monkeypatch.setenv("OVTASKS_S3__SECRET_KEY", "env-secret")
    monkeypatch.setenv("OVTASKS_S3__ENDPOINT", "minio:9000")
    monkeypatch.setenv("OVTASKS_REGISTRY__TRACKING_URI", "http://mlflow:5000")
    s = settings()
    assert s.s3.access_key.get_secret_value() == "from-env" and s.s3.endpoint == "minio:9000" and not s.s3.secure
    assert s.registry.tracking_uri == "http://mlflow:5000"
