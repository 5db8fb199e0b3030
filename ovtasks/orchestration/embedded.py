"""The embedded mode of the DAGs: a SQLite metadata DB under the data directory and each DAG run in
order with ``airflow dags test`` (no scheduler, no workers). Used by ``ovtasks demo`` and the chain test;
it also writes a script that opens the Airflow UI (``airflow standalone``) on the same database."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ovtasks.core.config import PathsConfig


def airflow_bin() -> str:
    return str(Path(sys.executable).parent / "airflow")


def airflow_env(home: str | os.PathLike, ovtasks_env: dict[str, str], paths: PathsConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    """Process environment for Airflow commands: its home and SQLite DB under ``home``, the project's
    DAGs and plugins (``paths``: the ovtasks UI), no examples, and the ``OVTASKS_*`` settings the tasks read."""
    home = Path(home).absolute()
    return {**(os.environ if base is None else base), "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__CORE__DAGS_FOLDER": str(Path(paths.dags_folder).absolute()),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(Path(paths.plugins_folder).absolute()),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "HF_HUB_OFFLINE": "1", **ovtasks_env}


@dataclass
class DagResult:
    dag_id: str
    state: str
    seconds: float
    log: str


class AirflowCommandError(RuntimeError):
    pass


def _run(args: list[str], env: dict, timeout: float) -> str:
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    if r.returncode != 0 and not args[1:3] == ["dags", "test"]:
        raise AirflowCommandError(f"{shlex.join(args[1:])} exited {r.returncode}:\n{out[-4000:]}")
    return out


def prepare(env: dict, gpu_slots: int = 1, timeout: float = 600) -> None:
    """Create or upgrade the metadata DB and the GPU pool."""
    pool = env.get("OVDAGS_GPU_POOL", "ovtasks_gpu")
    _run([airflow_bin(), "db", "migrate"], env, timeout)
    _run([airflow_bin(), "pools", "set", pool, str(gpu_slots), "ovtasks GPU tasks"], env, timeout)


_STATE = re.compile(r"state=(success|failed)")


def dags_test(dag_id: str, env: dict, conf: dict | None = None, timeout: float = 1800) -> DagResult:
    """One DAG run with ``airflow dags test``; its state is read from the run's own summary line."""
    t0 = time.perf_counter()
    out = _run([airflow_bin(), "dags", "test", dag_id] + (["-c", json.dumps(conf)] if conf else []), env, timeout)
    states = _STATE.findall(out)
    state = states[-1] if states else "unknown"
    return DagResult(dag_id, state, time.perf_counter() - t0, out)


def run_chain(env: dict, steps: list[tuple[str, dict | None]], log=print, timeout: float = 1800) -> list[DagResult]:
    """Run DAGs in order; stops at the first run that did not succeed (its log tail goes to ``log``)."""
    results = []
    for dag_id, conf in steps:
        r = dags_test(dag_id, env, conf, timeout)
        results.append(r)
        log(f"      {dag_id:<22} {r.state:<8} {r.seconds:6.1f}s" + (f"  conf={json.dumps(conf)}" if conf else ""))
        if r.state != "success":
            log(r.log[-3000:])
            break
    return results


def write_ui_script(path: str | os.PathLike, env: dict, port: int = 8080) -> Path:
    """A shell script that opens the Airflow UI on the embedded DB: ``airflow standalone`` (scheduler,
    dag-processor, triggerer and api-server in one process; it prints the admin password)."""
    keep = {k: v for k, v in env.items() if k.startswith(("AIRFLOW_HOME", "AIRFLOW__", "OVTASKS_", "OVDAGS_", "HF_HUB_OFFLINE"))}
    keep["AIRFLOW__API__PORT"] = str(port)
    lines = ["#!/bin/sh", "# Opens the Airflow UI on the demo's metadata DB: http://127.0.0.1:%d (user admin; the password is" % port,
             "# printed at start and kept in $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated). Ctrl-C stops it."]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(keep.items())]
    lines.append(f'export PATH={shlex.quote(str(Path(airflow_bin()).parent))}:"$PATH"  # standalone starts its parts as `airflow ...`')
    lines.append(f"exec {shlex.quote(airflow_bin())} standalone")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(lines) + "\n")
    p.chmod(0o755)
    return p
