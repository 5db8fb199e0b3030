"""Talking to a running Airflow 3 api-server through ``apache-airflow-client`` with token auth: get a JWT
from ``/auth/token``, unpause and trigger DAGs, read run and task-instance states, wait for a run."""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import dataclass


def get_token(base_url: str, username: str, password: str, timeout: float = 10.0) -> str:
    req = urllib.request.Request(f"{base_url.rstrip('/')}/auth/token", data=json.dumps({"username": username, "password": password}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())["access_token"]


@dataclass
class Airflow:
    base_url: str
    token: str

    @classmethod
    def login(cls, base_url: str, username: str, password: str) -> "Airflow":
        return cls(base_url.rstrip("/"), get_token(base_url, username, password))

    def _client(self):
        import airflow_client.client as ac

        return ac.ApiClient(ac.Configuration(host=self.base_url, access_token=self.token))

    def dag_ids(self) -> list[str]:
        from airflow_client.client.api.dag_api import DAGApi

        with self._client() as c:
            return sorted(d.dag_id for d in DAGApi(c).get_dags(limit=1000).dags)

    def unpause(self, dag_id: str) -> None:
        from airflow_client.client.api.dag_api import DAGApi
        from airflow_client.client.models.dag_patch_body import DAGPatchBody

        with self._client() as c:
            DAGApi(c).patch_dag(dag_id, DAGPatchBody(is_paused=False))

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        from airflow_client.client.api.dag_run_api import DagRunApi
        from airflow_client.client.models.trigger_dag_run_post_body import TriggerDAGRunPostBody

        with self._client() as c:
            run = DagRunApi(c).trigger_dag_run(dag_id, TriggerDAGRunPostBody(logical_date=None, conf=conf or {}))
            return run.dag_run_id

    def latest_runs(self, dag_id: str, limit: int = 1) -> list[dict]:
        """The newest runs of ``dag_id`` (by run_after), as plain dicts."""
        from airflow_client.client.api.dag_run_api import DagRunApi

        with self._client() as c:
            runs = DagRunApi(c).get_dag_runs(dag_id, limit=limit, order_by=["-run_after"]).dag_runs
        return [{"dag_id": r.dag_id, "run_id": r.dag_run_id, "state": r.state.value if r.state else None,
                 "run_type": r.run_type.value if r.run_type else None, "start": r.start_date, "end": r.end_date,
                 "duration": r.duration} for r in runs]

    def run_state(self, dag_id: str, run_id: str) -> str:
        from airflow_client.client.api.dag_run_api import DagRunApi

        with self._client() as c:
            return str(DagRunApi(c).get_dag_run(dag_id, run_id).state.value)

    def task_states(self, dag_id: str, run_id: str) -> list[tuple[str, int, str | None, int]]:
        """(task_id, map_index, state, try_number) of every task instance of the run."""
        from airflow_client.client.api.task_instance_api import TaskInstanceApi

        with self._client() as c:
            tis = TaskInstanceApi(c).get_task_instances(dag_id, run_id, limit=1000).task_instances
            return [(t.task_id, t.map_index, t.state.value if t.state else None, t.try_number) for t in tis]

    def wait(self, dag_id: str, run_id: str, timeout: float = 600, poll: float = 2.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.run_state(dag_id, run_id)
            if state in ("success", "failed"):
                return state
            time.sleep(poll)
        raise TimeoutError(f"{dag_id} run {run_id} not finished after {timeout:.0f} s: {self.task_states(dag_id, run_id)}")
