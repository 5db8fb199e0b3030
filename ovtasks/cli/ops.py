"""Operator commands: ``status`` (latest DAG runs through the Airflow REST API, shards per stage, champion /
challenger), ``trigger DAG`` (with a progress bar over the run's task instances), ``plan`` (capacity for N
images a week), ``demo`` and ``config``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

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

    from ovtasks.data.catalog import datasets

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
    from ovtasks.registry.listing import models

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


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from ovtasks.cli.ops import main_status

    return main_status(settings)


def cmd_trigger(args: argparse.Namespace, settings: Settings) -> int:
    from ovtasks.cli.ops import main_trigger

    return main_trigger(settings, args.dag, args.conf, not args.no_wait, args.timeout)


def cmd_plan(args: argparse.Namespace, settings: Settings) -> int:
    import yaml

    from ovtasks.orchestration.capacity import helm_values, measured, plan, render

    m = None
    gpu, ingest = args.gpu_images_per_s, args.ingest_images_per_core_s
    if gpu is None or ingest is None:
        # FileNotFoundError: no benchmark yet (exit 2, one line)
        m = measured(settings.paths.benchmark_results, generator=args.generator, gpu=gpu is None)
        gpu, ingest = gpu or m.gpu_images_per_s, ingest or m.ingest_images_per_core_s
    p = plan(args.images_per_week, gpu, ingest, args.window_hours, args.efficiency, args.shard_size, args.image_kb,
             max_map_length=settings.pipeline.max_map_length)
    if args.values_out:
        Path(args.values_out).write_text(yaml.safe_dump(helm_values(p), sort_keys=False))
    print(json.dumps(p.as_dict(), indent=2) if args.json else render(p, m))
    return 0


def cmd_index_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    """Rewrite the summary index (what the UI and ``status`` read) from the stages' manifests."""
    from ovtasks.data.catalog import rebuild

    counts = rebuild(settings, tuple(args.generator) if args.generator else ("maskfree", "grounded"))
    for name, n in counts.items():
        print(f"index {name:<16} {n} shards")
    return 0


def cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    print(json.dumps(settings.model_dump(mode="json"), indent=2, default=str))
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from ovtasks.demo import run_demo

    return run_demo(args.out or str(settings.data_dir / "demo"), settings, shards=args.shards,
                    images_per_shard=args.images_per_shard, seed=args.seed, workers=args.workers,
                    train_itm_steps=args.train_itm_steps, airflow=not args.no_airflow)


def add_commands(sub) -> None:
    """This group's sub-commands on ``sub`` (the top-level parser's sub-parsers)."""
    st = sub.add_parser("status", help="latest DAG runs (Airflow REST API), shards per stage, champion / challenger")
    st.set_defaults(func=cmd_status)

    tr = sub.add_parser("trigger", help="trigger a DAG through the Airflow REST API and follow it with a progress bar")
    tr.add_argument("dag", help="e.g. ovtasks_retrain")
    tr.add_argument("--conf", default=None, help='JSON params, e.g. \'{"steps": 300}\'')
    tr.add_argument("--no-wait", action="store_true", help="return once triggered")
    tr.add_argument("--timeout", type=float, default=6 * 3600, help="seconds to follow the run (exit 5 past it)")
    tr.set_defaults(func=cmd_trigger)

    pn = sub.add_parser("plan", help="GPU workers, pool slots, mapped tasks and helm values for N images a week (from measured throughput)")
    pn.add_argument("--images-per-week", type=float, required=True, help="e.g. 10e6")
    pn.add_argument("--generator", default="grounded", choices=("maskfree", "grounded"))
    pn.add_argument("--gpu-images-per-s", type=float, default=None, help="default: the generator's last GPU benchmark (grounded_cuda.json / maskfree_speed_cuda.json)")
    pn.add_argument("--ingest-images-per-core-s", type=float, default=None, help="default: benchmarks/results/ingest.json")
    pn.add_argument("--window-hours", type=float, default=72.0, help="pseudo-labelling must finish within (default 72)")
    pn.add_argument("--efficiency", type=float, default=0.7, help="fraction of the measured rate sustained (default 0.7)")
    pn.add_argument("--shard-size", type=int, default=10_000, help="images per source shard (img2dataset default 10000)")
    pn.add_argument("--image-kb", type=float, default=50.0, help="mean JPEG size")
    pn.add_argument("--values-out", default=None, help="write the helm overrides to this file")
    pn.add_argument("--json", action="store_true")
    pn.set_defaults(func=cmd_plan)

    d = sub.add_parser("demo", help="run the pipeline end to end on embedded defaults and print where results are")
    d.add_argument("--out", default=None, help="default: <data_dir>/demo")
    d.add_argument("--shards", type=int, default=8)
    d.add_argument("--images-per-shard", type=int, default=64)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--workers", type=int, default=None)
    d.add_argument("--train-itm-steps", type=int, default=None, help="train the ITM here instead of using the committed checkpoint")
    d.add_argument("--no-airflow", action="store_true", help="skip step 10 (the same chain through the DAGs with `airflow dags test`)")
    d.set_defaults(func=cmd_demo)

    ix = sub.add_parser("index", help="the summary index the UI and `status` read")
    ix_sub = ix.add_subparsers(dest="index_command", required=True)
    rb = ix_sub.add_parser("rebuild", help="rewrite it from the stages' manifests (after it was lost, or a stage wrote without it)")
    rb.add_argument("--generator", action="append", choices=("maskfree", "grounded"),
                    help="pseudo-label generator(s) to index (default: both)")
    rb.set_defaults(func=cmd_index_rebuild)

    c = sub.add_parser("config", help="print the effective configuration (secrets masked)")
    c.set_defaults(func=cmd_config)
