"""Every performance benchmark in one run, each a ratio measured side by side on this machine.

Runs each benchmark script in its own process (so one's memory or threads never colour another's),
collects its JSON, and writes

* ``benchmarks/results.json``: the machine, the date, one row per benchmark (what is compared, the
  ratio, the target, whether it is met, how long the benchmark took) and each benchmark's full output;
* ``benchmarks/results.md``: the same rows as a Markdown table, which is also written into the README
  between ``<!-- bench:start -->`` and ``<!-- bench:end -->``.

GPU numbers cannot be measured on a CPU machine: the rows from the last GPU runs
(``benchmarks/results/*_cuda.json``, made with the ``--device cuda`` forms of grounded.py and wss.py) are
listed in a second table with their device and the date they were committed, never mixed with this run.

    python benchmarks/run_all.py                  # everything (~25 min on 2 cores); make bench
    python benchmarks/run_all.py --only ingest coco_eval
    python benchmarks/run_all.py --reuse scaling  # take scaling from benchmarks/results/scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
README = ROOT / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"

sys.path.insert(0, str(BENCH))
from hostinfo import cpu_model, memory_gib  # noqa: E402


@dataclass(frozen=True)
class Bench:
    name: str
    script: str
    args: tuple[str, ...]
    compared: str
    target: str
    ratio: Callable[[dict], float]
    met: Callable[[float], bool]
    detail: Callable[[dict], str]


def _scaling_memory(d: dict) -> float:
    return max(v["memory_ratio_largest_vs_smallest"] for v in d["summary"].values())


BENCHES = [
    Bench("ingest", "ingest.py", ("--sizes", "512", "--repeats", "7"),
          "ingest throughput / decode-only limit (512 px, all filters, dedup, publish)", ">= 1.0",
          lambda d: d["results"][0]["ratio"], lambda r: r >= 1.0,
          lambda d: f"{d['results'][0]['ingest_images_per_s']} vs {d['results'][0]['decode_limit_images_per_s']} img/s, "
                    f"{d['results'][0]['workers']} workers; with full decodes (`ingest.scaled_decode` off) "
                    f"{d['results'][0].get('ingest_full_decode_images_per_s', '-')} img/s, ratio "
                    f"{d['results'][0].get('ratio_full_decode', '-')}; with the 128 px check view (`ingest.check_view_side=128`) "
                    f"{d['results'][0].get('ingest_view128_images_per_s', '-')} img/s, ratio {d['results'][0].get('ratio_view128', '-')}"),
    Bench("wss", "wss.py", ("--boxes", "64"),
          "WSS batched / sequential reference (CPU, same boxes, points, iterations)", ">= 30x on CPU",
          lambda d: d["speedup"], lambda r: r >= 30,
          lambda d: f"{d['sequential_seconds']} s vs {d['batched_seconds']} s for {d['boxes']} boxes; mask AP50 "
                    f"{d['ap50_batched']['all']} vs {d['ap50_sequential']['all']}"),
    Bench("ui_index", "ui_index.py", ("--sizes", "1000", "100000", "--requests", "40"),
          "UI Datasets / Gallery p95 latency (ms) at 100k shards, from the summary index", "<= 200 ms",
          lambda d: d["p95_ms_at_largest"], lambda r: r <= 200,
          lambda d: f"p95 datasets {d['rows'][-1]['with_index']['datasets']['p95_ms']} ms, gallery "
                    f"{d['rows'][-1]['with_index']['gallery']['p95_ms']} ms; peak RSS x{d['memory_ratio_largest_vs_smallest']} "
                    f"from {d['rows'][0]['shards']} to {d['rows'][-1]['shards']} shards (target <= 1.1); without the index at "
                    f"{d['rows'][0]['shards']} shards: {d['rows'][0]['without_index']['datasets']['p95_ms']} / "
                    f"{d['rows'][0]['without_index']['gallery']['p95_ms']} ms"),
    Bench("grounded", "grounded.py", ("--images", "16", "--names-per-image", "8", "--repeats", "1"),
          "grounded generator batched / per-(image, name) loop (small models, lexicon captions)", ">= 3x on CPU",
          lambda d: d["speedup"], lambda r: r >= 3,
          lambda d: "; ".join(f"{r['workload']}: {r['loop_img_s']} -> {r['batched_img_s']} img/s" for r in d["rows"])),
    Bench("coco_eval", "coco_eval.py", ("--images", "3000", "--repeats", "2"),
          "pycocotools time / ovtasks.evaluate.coco (faster-coco-eval), bbox + segm", ">= 5x",
          lambda d: d["speedup"], lambda r: r >= 5,
          lambda d: f"{d['images']} images, {d['predictions']} predictions, AP equal to 1e-6"),
    Bench("scaling", "scaling.py", (),
          "worker peak memory at 10k / at 1k images (max over ingest and pseudo-label)", "<= 1.1",
          _scaling_memory, lambda r: r <= 1.1,
          lambda d: "; ".join(f"{s}: {v['memory_ratio_largest_vs_smallest']}x memory, "
                              f"{v.get('worker_speedup_at_largest', '-')}x from 1 to 2 workers" for s, v in d["summary"].items())),
    Bench("airflow", "airflow_overhead.py", (),
          "scheduling overhead per mapped task / work of one mapped ingest task (one 10,000-image shard)", "<= 0.1",
          lambda d: d["overhead_ratio_per_mapped_task"], lambda r: r <= 0.1,
          lambda d: f"{d['mapped']['seconds_per_mapped_task']} s per mapped task vs {d['ingest_task_seconds']} s of work; "
                    f"DAG files parse in {min(v for k, v in d['parse_ms'].items() if k.startswith('ovtasks'))}-"
                    f"{max(v for k, v in d['parse_ms'].items() if k.startswith('ovtasks'))} ms, "
                    f"{d['parse_ratio_vs_empty_dag']}x an empty DAG"),
]

def _stages(r: dict) -> str:
    """The grounded row's two stages timed alone beside the run that overlaps them (where recorded)."""
    if "batched_gdino_s" not in r:
        return ""
    alone = r["batched_gdino_s"] + r["batched_sam_s"]
    return (f"; Grounding-DINO {r['batched_gdino_s']} s + SAM {r['batched_sam_s']} s alone = {alone:.2f} s, "
            f"together {r['batched_s']} s ({alone / r['batched_s']:.2f}x)")


GPU_RESULTS = {"grounded_cuda.json": ("grounded generator, images/s (lexicon captions)",
                                      lambda d: next(r["batched_img_s"] for r in d["rows"] if r["workload"] == d["headline"]),
                                      lambda d: f"{d['size']} models, {d['image_size']} px, {d['dtype']}, batch {d['batch_size']}"
                                      + _stages(next(r for r in d["rows"] if r["workload"] == d["headline"])),
                                      ">= 30 img/s per GPU at 800 px", lambda d: d["machine"]["gpu"]),
               "wss_cuda.json": ("maskfree WSS batched / sequential", lambda d: d["speedup"],
                                 lambda d: f"{d['boxes']} boxes, {d['iterations']} iterations, {d['sequential_seconds']} s vs {d['batched_seconds']} s",
                                 ">= 100x", lambda d: d["device"]),
               "maskfree_speed_cuda.json": ("maskfree generator end to end, images/s", lambda d: d["images_per_s"],
                                            lambda d: f"{d['size']} ITM, {d['image_size']} px, {d['images']} images, {d['pairs']} "
                                            f"(image, name) pairs, {d['machine']['cpus']} CPU cores (selective search)",
                                            "measured (`ovtasks plan --generator maskfree` input)",
                                            lambda d: d["machine"]["gpu"]),
               "train_speed_cuda.json": ("OV Mask R-CNN training, steps/s", lambda d: d["steps_per_s"],
                                         lambda d: f"{d['backbone']}, {d['min_size']}-{d['max_size']} px, batch {d['batch_size']}, "
                                         f"{d['images_per_s']} images/s over {d['steps_timed']} steps",
                                         "measured (retrain time per GPU)", lambda d: d["machine"]["gpu"]),
               "train_speed_semantic_sam_cuda.json": ("Semantic-SAM training, steps/s", lambda d: d["steps_per_s"],
                                                      lambda d: f"{d['sam_model']}, batch {d['batch_size']}, {d['images_per_s']} "
                                                      f"images/s over {d['steps_timed']} steps",
                                                      "measured (retrain time per GPU)", lambda d: d["machine"]["gpu"])}


def machine() -> dict:
    import torch

    return {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "memory_gib": memory_gib(),
            "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "platform": platform.platform()}


def run_bench(b: Bench, reuse: bool) -> dict:
    out = RESULTS / f"{b.script.removesuffix('.py')}.json"
    t0 = time.perf_counter()
    if not reuse:
        cmd = [sys.executable, str(BENCH / b.script), *b.args, "--out", str(out)]
        print(f"== {b.name}: {' '.join(cmd[1:])}", flush=True)
        r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, text=True, capture_output=True)
        if r.returncode != 0:
            print(r.stdout[-2000:], r.stderr[-4000:], sep="\n")
            return {"name": b.name, "compared": b.compared, "target": b.target, "error": f"exit {r.returncode}"}
    doc = json.loads(out.read_text())
    ratio = b.ratio(doc)
    row = {"name": b.name, "compared": b.compared, "ratio": ratio, "target": b.target, "met": b.met(ratio),
           "detail": b.detail(doc), "seconds": round(time.perf_counter() - t0, 1),
           "ran": "reused " + _committed(out) if reuse else "this run", "result": doc}
    print(f"   ratio={ratio} target {b.target} {'met' if row['met'] else 'MISSED'} ({row['seconds']} s)", flush=True)
    return row


def _committed(path: Path) -> str:
    """The date of the results file: its last commit, or its file time when it changed since (or never was committed)."""
    changed = subprocess.run(["git", "status", "--porcelain", "--", str(path)], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    r = subprocess.run(["git", "log", "-1", "--format=%cs", "--", str(path)], cwd=ROOT, capture_output=True, text=True)
    return (not changed and r.stdout.strip()) or time.strftime("%Y-%m-%d", time.localtime(path.stat().st_mtime))


def gpu_rows() -> list[dict]:
    rows = []
    for fname, (what, value, detail, target, device) in GPU_RESULTS.items():
        p = RESULTS / fname
        if p.exists():
            d = json.loads(p.read_text())
            rows.append({"name": fname, "what": what, "value": value(d), "target": target, "detail": detail(d),
                         "device": device(d), "committed": _committed(p)})
    return rows


def _reused_note(doc: dict) -> str:
    reused = [r["name"] for r in doc["rows"] if str(r.get("ran", "")).startswith("reused")]
    return f"; {', '.join(reused)} taken from earlier runs, as their rows say" if reused else ""


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"Ran {doc['date']} on {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, "
             f"{'GPU ' + m['gpu'] if m['gpu'] else 'no GPU'}; torch {m['torch']}; {doc['seconds']:.0f} s in all "
             f"(`make bench`{_reused_note(doc)}).", "",
             "| benchmark | compared side by side | ratio | target | met | details |", "|---|---|---:|---|---|---|"]
    for r in doc["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['compared']} | error | {r['target']} | no | {r['error']} |")
            continue
        ran = "" if r["ran"] == "this run" else f" ({r['ran']})"
        lines.append(f"| {r['name']} | {r['compared']} | **{r['ratio']}** | {r['target']} | {'yes' if r['met'] else '**no**'} "
                     f"| {r['detail']}{ran} |")
    if doc["gpu"]:
        lines += ["", "GPU (not measurable here: the last runs on a lent GPU, from `benchmarks/results/*_cuda.json`):", "",
                  "| measured | value | target | device | setting | committed |", "|---|---:|---|---|---|---|"]
        for g in doc["gpu"]:
            lines.append(f"| {g['what']} | {g['value']} | {g['target']} | {g['device']} | {g['detail']} | {g['committed']} |")
    return "\n".join(lines) + "\n"


def update_readme(table: str) -> bool:
    text = README.read_text()
    pat = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pat.search(text):
        return False
    README.write_text(pat.sub(lambda _: f"{START}\n{table}{END}", text))
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="benchmarks: " + ", ".join(b.name for b in BENCHES))
    ap.add_argument("--only", nargs="+", choices=[b.name for b in BENCHES])
    ap.add_argument("--reuse", nargs="+", default=[], choices=[b.name for b in BENCHES],
                    help="take these from their last results file instead of running them (marked in the table)")
    ap.add_argument("--out", default=str(BENCH / "results.json"))
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    chosen = [b for b in BENCHES if not args.only or b.name in args.only]
    rows = [run_bench(b, b.name in args.reuse) for b in chosen]
    doc = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "seconds": round(time.perf_counter() - t0, 1),
           "rows": rows, "gpu": gpu_rows()}
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    table = markdown(doc)
    Path(args.out).with_suffix(".md").write_text("# Benchmarks\n\n" + table)
    print("\n" + table)
    if not args.no_readme and not args.only:
        print("README updated" if update_readme(table) else f"README has no {START} ... {END} block; not updated")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
