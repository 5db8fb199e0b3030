"""Alert-mail helpers for the tests (the ``smtp_server`` fixture in conftest.py, and tests that need an
unreachable server)."""

import json


def smtp_env(port: int) -> dict:
    """Airflow's SMTP connection (env form) to a plain loopback server, and two alert recipients."""
    conn = {"conn_type": "smtp", "host": "127.0.0.1", "port": port,
            "extra": {"disable_ssl": True, "disable_tls": True, "from_email": "ovtasks@localhost", "timeout": 10}}
    return {"AIRFLOW_CONN_SMTP_DEFAULT": json.dumps(conn), "OVDAGS_ALERT_EMAILS": "ops@example.org,ml@example.org"}
