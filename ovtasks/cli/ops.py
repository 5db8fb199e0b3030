"""Operator commands over a running Airflow (``apache-airflow-client``, token auth) and the registry:
``ovtasks status`` (latest DAG runs, shards per stage, champion / challenger) and ``ovtasks trigger DAG``
(with a progress bar over the run's task instances)."""

from __future__ import annotations

import json
import sys
import time

from ovtasks.core.config import Settings

DAGS = ("ovtasks_ingest", "ovtasks_pseudo_label", "ovtasks_retrain", "ovtasks_promote")
DONE = {"success", "failed", "skipped", "upstream_failed", "removed"}


class AirflowUnavailable(RuntimeError):
    pass


def connect(settings: Settings):
    from ovtasks.orchestration.rest import Airflow

    a = settings.airflow
    if a.password is None:
        raise AirflowUnavailable("no Airflow password: set OVTASKS_AIRFLOW__PASSWORD or OVTASKS_AIRFLOW__PASSWORD_FILE "
                                 f"(user {a.username!r} at {a.url})")
    try:
        return Airflow.login(a.url, a.username, a.password.get_secret_value())
    except OSError as exc:
        raise AirflowUnavailable(f"cannot log in to Airflow at {a.url} as {a.username!r}: {exc}") from exc


def _fmt_time(t) -> str:
    return t.strftime("%Y-%m-%d %H:%M") if t else "—"


def status(settings: Settings, console=None, airflow=None) -> dict:
    """Print three tables and return what they show (the registry and the store are read directly; the DAG
    runs come from the api-server, and their absence is reported, not fatal)."""
    from rich.console import Console
    from rich.table import Table

    from ovtasks.ui.data import datasets

    console = console or Console()
    out: dict = {"runs": [], "airflow_error": None}
    t = Table(title="latest DAG runs")
    for col in ("DAG", "run", "state", "started", "duration"):
        t.add_column(col)
    try:
        af = airflow or connect(settings)
        for dag in DAGS:
            runs = af.latest_runs(dag, 1)
            r = runs[0] if runs else None
            out["runs"].append({"dag_id": dag, **(r or {})})
            colour = {"success": "green", "failed": "red", "running": "yellow"}.get((r or {}).get("state"), "white")
            t.add_row(dag, r["run_id"] if r else "(never ran)", f"[{colour}]{r['state']}[/]" if r else "—",
                      _fmt_time(r["start"]) if r else "—", f"{r['duration']:.0f}s" if r and r.get("duration") else "—")
        console.print(t)
    except Exception as exc:  # noqa: BLE001 - any failure to reach Airflow is shown, the rest still printed
        out["airflow_error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        console.print(f"[red]Airflow: {out['airflow_error']}[/]")

    d = datasets(settings)
    out["stages"], out["totals"] = d["stages"], d["totals"]
    t = Table(title=f"shards ({d['generator']})")
    for col in ("source", "clean", "pseudo-labelled", "GX passed", "GX failed", "images kept / seen", "pseudo-masks"):
        t.add_column(col, justify="right")
    s, tot = d["stages"], d["totals"]
    t.add_row(*map(str, (s["source"], s["clean"], s["pseudo_labelled"], s["gx_passed"], s["gx_failed"],
                         f"{tot['kept']} / {tot['seen']}", tot["annotations"])))
    console.print(t)

    out["models"] = _aliases(settings)
    t = Table(title="models")
    for col in ("registered model", "champion", "challenger", "challenger novel mask AP50", "GX", "gate (challenger - champion, CI)"):
        t.add_column(col)
    for m in out["models"]:
        t.add_row(m["name"], m["champion"] or "—", m["challenger"] or "—", str(m["challenger_novel_mask_AP50"] or "—"), m["gx"] or "—",
                  gate_text(m["gate"]))
    if not out["models"]:
        t.add_row("(none registered)", "—", "—", "—", "—", "—")
    console.print(t)
    return out


def _aliases(settings: Settings) -> list[dict]:
    from ovtasks.registry.lifecycle import registry_exists
    from ovtasks.ui.data import models

    if not registry_exists(settings):
        return []
    by_name: dict[str, dict] = {}
    for v in models(settings):
        m = by_name.setdefault(v["name"], {"name": v["name"], "champion": None, "challenger": None,
                                           "challenger_novel_mask_AP50": None, "gx": None, "gate": None})
        for alias in v["aliases"]:
            m[alias] = f"v{v['version']}"
            if alias == "challenger":
                m["challenger_novel_mask_AP50"], m["gx"], m["gate"] = v["novel_mask_AP50"], v["gx_status"], v.get("promotion_gate")
    return list(by_name.values())


def gate_text(gate: dict | None) -> str:
    """The last gate decision on the challenger: verdict and, against a champion, the difference and its interval."""
    if not gate:
        return "not run"
    c = gate.get("comparison")
    if not c:
        return gate["verdict"]
    return f"{gate['verdict']}: {c['difference']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}] ({100 * c['confidence']:.0f}%, {c['images']} images)"


def trigger(settings: Settings, dag_id: str, conf: dict, wait: bool, timeout: float, console=None, airflow=None,
            poll: float = 2.0) -> tuple[str, str]:
    """Trigger ``dag_id`` and optionally follow it with a progress bar; returns (run_id, state)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console()
    af = airflow or connect(settings)
    known = af.dag_ids()
    if dag_id not in known:
        raise ValueError(f"unknown DAG {dag_id!r}; known: {', '.join(d for d in known if d.startswith('ovtasks'))}")
    af.unpause(dag_id)
    run_id = af.trigger(dag_id, conf)
    console.print(f"triggered {dag_id} run [bold]{run_id}[/]" + (f" conf={json.dumps(conf)}" if conf else ""))
    if not wait:
        return run_id, "queued"
    deadline = time.monotonic() + timeout
    state = "queued"
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False, disable=not console.is_terminal) as bar:
        task = bar.add_task(dag_id, total=None)
        while time.monotonic() < deadline:
            tis = af.task_states(dag_id, run_id)
            done = sum(1 for _, _, st, _ in tis if st in DONE)
            running = [f"{t}[{m}]" if m >= 0 else t for t, m, st, _ in tis if st == "running"]
            bar.update(task, total=max(len(tis), 1), completed=done,
                       description=f"{dag_id}: {', '.join(running[:3]) or state}")
            state = af.run_state(dag_id, run_id)
            if state in ("success", "failed"):
                bar.update(task, completed=max(len(tis), 1), total=max(len(tis), 1), description=f"{dag_id}: {state}")
                break
            time.sleep(poll)
        else:
            state = "timeout"
    colour = {"success": "green", "failed": "red"}.get(state, "yellow")
    console.print(f"{dag_id} {run_id}: [{colour}]{state}[/]")
    if state == "failed":
        for t, m, st, tr in af.task_states(dag_id, run_id):
            if st in ("failed", "upstream_failed"):
                console.print(f"  {t}{f'[{m}]' if m >= 0 else ''}: {st} (try {tr})", style="red")
    return run_id, state


def main_status(settings: Settings) -> int:
    out = status(settings)
    return 0 if out["airflow_error"] is None else 3


def main_trigger(settings: Settings, dag_id: str, conf_text: str | None, wait: bool, timeout: float) -> int:
    try:
        conf = json.loads(conf_text) if conf_text else {}
    except ValueError as exc:
        raise ValueError(f"--conf is not JSON: {exc}") from exc
    try:
        _, state = trigger(settings, dag_id, conf, wait, timeout)
    except AirflowUnavailable as exc:
        print(f"ovtasks trigger: {exc}", file=sys.stderr)
        return 3
    return {"success": 0, "queued": 0, "failed": 1}.get(state, 5)
