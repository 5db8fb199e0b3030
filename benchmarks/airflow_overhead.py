"""Airflow costs next to the work they schedule: DAG parse time and the overhead per mapped task instance.

* Parse: each ``dags/ovtasks_*.py`` and a reference DAG (one ``EmptyOperator``) are imported in the same
  fresh interpreter after ``airflow.sdk``, ``--repeats`` times each, alternating; the ratio is the median
  ovtasks parse time over the reference's (what our DAG files add to every parse loop of the
  dag-processor, which re-parses each file every ``min_file_process_interval``, 30 s by default).
* Mapped-task overhead: a generated DAG whose task is mapped over M no-op items runs with
  ``airflow dags test`` (the scheduler's own loop, in process, SQLite) for two values of M; the slope
  (seconds per extra mapped task instance) is compared with the work of one mapped ingest task
  (``orchestration.stage_ingest`` on one ``--shard-size`` shard, timed in the same run).

    python benchmarks/airflow_overhead.py
    python benchmarks/airflow_overhead.py --mapped 4 64 --repeats 7

Writes benchmarks/results/airflow_overhead.json. With the Celery executor each task instance also pays a
broker round trip and a worker-side process start (see the README's scale plan); ``dags test`` is the
scheduler-side floor.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"

REFERENCE_DAG = textwrap.dedent("""
    import pendulum
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.sdk import DAG

    with DAG("reference_empty", schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False):
        EmptyOperator(task_id="nothing")
""")

MAPPED_DAG = textwrap.dedent("""
    import pendulum
    from airflow.sdk import dag, task


    def build(m):
        @dag(dag_id=f"bench_mapped_{{m}}", schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False)
        def mapped():
            @task
            def items():
                return list(range(m))

            @task
            def work(i):
                return i

            work.expand(i=items())

        return mapped()


    for size in {sizes}:
        build(size)
""")

_PARSE = (
    "import sys, time, json, runpy; import airflow.sdk; out = {}\n"
    "for p in sys.argv[1:]:\n"
    "    t = time.perf_counter(); runpy.run_path(p); out[p] = time.perf_counter() - t\n"
    "print('RESULT ' + json.dumps(out))"
)


def parse_times(files: list[Path], repeats: int) -> dict[str, list[float]]:
    """Per file, ``repeats`` parse times, each in a fresh interpreter; the file order rotates per repeat."""
    times: dict[str, list[float]] = {str(f): [] for f in files}
    env = {**os.environ, "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    for r in range(repeats):
        for f in files[r % len(files):] + files[: r % len(files)]:  # each file once per process, first in turn
            out = subprocess.run([sys.executable, "-c", _PARSE, str(f)], capture_output=True, text=True, env=env,
                                 cwd=ROOT, timeout=300)
            if out.returncode != 0:
                raise RuntimeError(f"parsing {f} failed:\n{out.stderr[-2000:]}")
            res = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))[7:])
            times[str(f)].append(res[str(f)])
    return times


def mapped_overhead(work: Path, sizes: list[int], repeats: int) -> dict:
    from ovtasks.core.config import PathsConfig
    from ovtasks.orchestration.embedded import airflow_env, dags_test, prepare

    dags = work / "dags"
    dags.mkdir()
    (dags / "bench_mapped.py").write_text(MAPPED_DAG.format(sizes=sizes))
    env = airflow_env(work / "airflow", {}, PathsConfig(dags_folder=dags, plugins_folder=ROOT / "plugins"))
    prepare(env)
    secs: dict[int, list[float]] = {m: [] for m in sizes}
    for _ in range(repeats):
        for m in sizes:
            r = dags_test(f"bench_mapped_{m}", env, timeout=1800)
            if r.state != "success":
                raise RuntimeError(f"bench_mapped_{m}: {r.state}\n{r.log[-3000:]}")
            secs[m].append(r.seconds)
    med = {m: statistics.median(v) for m, v in secs.items()}
    lo, hi = min(sizes), max(sizes)
    return {"runs_seconds": {str(m): [round(x, 2) for x in v] for m, v in secs.items()},
            "median_seconds": {str(m): round(v, 2) for m, v in med.items()},
            "seconds_per_mapped_task": round((med[hi] - med[lo]) / (hi - lo), 4)}


def ingest_task_seconds(work: Path, shard_size: int, repeats: int) -> float:
    """Median wall time of one mapped ingest task (stage_ingest) on one shard."""
    from ovtasks.core.config import load_settings
    from ovtasks.orchestration.tasks import stage_ingest
    from ovtasks.data.synth import SynthSpec, generate

    settings = load_settings(env={})
    raw = work / "raw"
    generate(SynthSpec(seed=5, shards=1, images_per_shard=shard_size), str(raw), settings)
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        stage_ingest(str(raw), str(work / f"clean{r}"), "00000", settings, f"bench{r}")
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="parse repeats per file")
    ap.add_argument("--mapped", type=int, nargs=2, default=[4, 64], help="two map sizes for the slope")
    ap.add_argument("--mapped-repeats", type=int, default=3)
    ap.add_argument("--shard-size", type=int, default=10_000, help="images in the shard of the reference ingest task (img2dataset default)")
    ap.add_argument("--out", default=str(RESULTS / "airflow_overhead.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ovtasks-airflow-bench-"))
    try:
        ref = work / "reference_empty.py"
        ref.write_text(REFERENCE_DAG)
        ours = sorted((ROOT / "dags").glob("ovtasks_*.py"))
        times = parse_times([ref, *ours], args.repeats)
        ref_med = statistics.median(times[str(ref)])
        parse = {Path(f).name: round(statistics.median(v) * 1000, 1) for f, v in times.items()}
        ours_med = statistics.median([statistics.median(times[str(f)]) for f in ours])
        print("parse ms (median):", json.dumps(parse), flush=True)
        mapped = mapped_overhead(work, args.mapped, args.mapped_repeats)
        print("mapped:", json.dumps(mapped), flush=True)
        task_s = ingest_task_seconds(work, args.shard_size, 3)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {"benchmark": "Airflow parse time and mapped-task overhead vs the work", "date": time.strftime("%Y-%m-%d"),
           "machine": {"cores": len(os.sched_getaffinity(0)), "platform": platform.platform()},
           "parse_ms": parse, "parse_ratio_vs_empty_dag": round(ours_med / ref_med, 2),
           "mapped": mapped, "ingest_task_seconds": round(task_s, 3), "ingest_task_images": args.shard_size,
           "overhead_ratio_per_mapped_task": round(mapped["seconds_per_mapped_task"] / task_s, 4)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: doc[k] for k in ("parse_ratio_vs_empty_dag", "ingest_task_seconds", "overhead_ratio_per_mapped_task")}))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
