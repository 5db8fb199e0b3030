"""What every ovtasks DAG shares: task defaults (retries with backoff, timeouts), the failure callback,
the Asset URIs and the GPU queue/pool names. Imported at DAG parse time: standard library only.

Deployment knobs of the DAGs themselves use the ``OVDAGS_`` prefix (``OVTASKS_*`` is the pipeline's
own configuration, which rejects unknown keys)."""

from __future__ import annotations

import logging
import os
import re
from datetime import timedelta

log = logging.getLogger("ovtasks.dags")

GPU_QUEUE = os.environ.get("OVDAGS_GPU_QUEUE", "gpu")
GPU_POOL = os.environ.get("OVDAGS_GPU_POOL", "ovtasks_gpu")


def _store_asset(override: str, setting: str, suffix: str, fallback: str) -> str:
    """An Asset URI: ``OVDAGS_*`` when set, else the real store location the pipeline setting names (what
    compose / helm set, e.g. ``s3://ovtasks/clean``), else a logical URI (the embedded default's local paths)."""
    if os.environ.get(override):
        return os.environ[override]
    where = os.environ.get(setting, "")
    if "://" in where and not where.startswith("file://"):
        return where.rstrip("/") + suffix
    return fallback


CLEAN_ASSET_URI = _store_asset("OVDAGS_CLEAN_ASSET", "OVTASKS_PIPELINE__CLEAN_URI", "", "ovtasks://clean-shards")
PSEUDO_ASSET_URI = _store_asset("OVDAGS_PSEUDO_ASSET", "OVTASKS_PIPELINE__PSEUDO_URI", "/pseudo", "ovtasks://pseudo-labels")
MODEL_ASSET_URI = _store_asset("OVDAGS_MODEL_ASSET", "OVTASKS_PIPELINE__MODELS_URI", "", "ovtasks://models")
RETRAIN_CRON = os.environ.get("OVDAGS_RETRAIN_CRON", "0 0 * * 0")  # weekly, Sunday 00:00 UTC
# the defaults of a retrain run that nobody triggered by hand (the weekly or the Asset-triggered one):
# size them to the deployment (training steps for its GPUs; evaluation images of its evaluation set)
RETRAIN_STEPS = int(os.environ.get("OVDAGS_RETRAIN_STEPS", "300"))
RETRAIN_EVAL_IMAGES = int(os.environ.get("OVDAGS_RETRAIN_EVAL_IMAGES", "64"))
TAGS = ["ovtasks"]


def on_failure(context) -> None:
    """One readable line for a failed task (which DAG run / task / try, and the exception), and an alert
    (:mod:`ovtasks.orchestration.alerts`: mail and Slack, where configured)."""
    ti = context.get("task_instance") or context.get("ti")
    exc = context.get("exception")
    log.error("ovtasks task failed: dag=%s run=%s task=%s map_index=%s try=%s error=%s: %s",
              getattr(ti, "dag_id", "?"), context.get("run_id"), getattr(ti, "task_id", "?"), getattr(ti, "map_index", -1),
              getattr(ti, "try_number", "?"), type(exc).__name__ if exc else "?", exc)
    from ovtasks.orchestration.alerts import failure_text, send_alert  # Airflow calls this once the task has no retry left

    send_alert(*failure_text(context))


def default_args(timeout_minutes: int = 60) -> dict:
    return {"owner": "ovtasks", "retries": 2, "retry_delay": timedelta(seconds=int(os.environ.get("OVDAGS_RETRY_DELAY_S", "30"))),
            "retry_exponential_backoff": True, "max_retry_delay": timedelta(minutes=10),
            "execution_timeout": timedelta(minutes=timeout_minutes), "on_failure_callback": on_failure}


def run_key(run_id: str) -> str:
    """A DAG run id as a store key component."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)[:120]


def settings():
    """The ovtasks settings, read in the task (OVTASKS_CONFIG + OVTASKS_* env), never at parse time, with the S3
    and MLflow credentials from Airflow Connections where the environment does not set them
    (:func:`with_connections`)."""
    from ovtasks.core.config import load_settings

    return with_connections(load_settings())


def _connection(conn_id: str):
    try:
        from airflow.sdk import BaseHook

        return BaseHook.get_connection(conn_id)
    except Exception:  # noqa: BLE001 - no such connection: the environment's values stand
        return None


def with_connections(s):
    """Fill credentials the environment left unset from Airflow Connections (env vars win):

    * ``OVDAGS_S3_CONN_ID`` (default ``ovtasks_s3``, type aws): login / password are the access / secret key,
      extra ``endpoint_url`` (``https://host:port`` sets TLS) the endpoint when ``s3.endpoint`` is unset;
    * ``OVDAGS_MLFLOW_CONN_ID`` (default ``ovtasks_mlflow``, type http): its URL is the tracking URI when
      ``registry.tracking_uri`` is unset; login / password become ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``.
    """
    from urllib.parse import urlsplit

    from pydantic import SecretStr

    s3 = s.s3
    if s3.access_key is None:
        conn = _connection(os.environ.get("OVDAGS_S3_CONN_ID", "ovtasks_s3"))
        if conn is not None and conn.login:
            update = {"access_key": SecretStr(conn.login), "secret_key": SecretStr(conn.password or "")}
            endpoint = (conn.extra_dejson or {}).get("endpoint_url", "")
            if endpoint and not s3.endpoint:
                u = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
                update.update(endpoint=u.netloc, secure=u.scheme == "https")
            s = s.model_copy(update={"s3": s3.model_copy(update=update)})
    conn = None
    if s.registry.tracking_uri is None or "MLFLOW_TRACKING_USERNAME" not in os.environ:
        conn = _connection(os.environ.get("OVDAGS_MLFLOW_CONN_ID", "ovtasks_mlflow"))
    if conn is not None:
        if s.registry.tracking_uri is None and conn.host:
            host = conn.host if "://" in conn.host else f"{conn.schema or 'http'}://{conn.host}"
            uri = f"{host}:{conn.port}" if conn.port else host
            s = s.model_copy(update={"registry": s.registry.model_copy(update={"tracking_uri": uri})})
        if conn.login and "MLFLOW_TRACKING_USERNAME" not in os.environ:
            os.environ["MLFLOW_TRACKING_USERNAME"] = conn.login  # MLflow's client reads its credentials from the env
            os.environ["MLFLOW_TRACKING_PASSWORD"] = conn.password or ""
    return s
