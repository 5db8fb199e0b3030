"""Scaling curves: images/s and peak memory of ingest and pseudo-label at 1 and 2 workers, 1k/5k/10k images.

One synthetic LAION-format set of ``max(--images)`` images in shards of ``--shard-size``; the smaller
sets are its first shards, so every point sees the same images. Each (stage, workers, images) point
runs in fresh processes, the way the DAGs run it:

* ingest: ``ovtasks.ingest.pipeline.ingest(workers=W)`` (its own process pool over shards, then the global
  near-duplicate pass and publishing);
* pseudo-label: W worker processes, each labelling its share of the shards with
  ``orchestration.pseudo_label_group`` (what one mapped Celery task on the ``gpu`` queue runs; every
  worker loads its own models), then ``finalize``. Torch threads per worker = cores / W.

Pseudo-label uses the grounded generator with tiny random Grounding-DINO / SAM checkpoints at
128 px: on CPU the numbers measure the pipeline around the models (streaming, chunking, RLE,
spooling, store writes), which is what has to scale with workers and data; real model throughput
is in grounded.py / wss.py (and their ``_cuda`` results). Memory is sampled every 50 ms as the sum of
RSS over the stage's whole process tree (the parent and every worker), plus the largest single process.

    python benchmarks/scaling.py                           # 1k/5k/10k images x 1, 2 workers
    python benchmarks/scaling.py --images 500 1000 --workers 1 2 --shard-size 250

Writes benchmarks/results/scaling.json and benchmarks/results/scaling.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"

# one process of a stage: W = 1 runs in it, W > 1 starts the workers (ingest: its own pool; pseudo-label:
# a spawn pool of W processes running `label` on their share of the shards)
_STAGE = r"""
import json, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from functools import partial


def label(src, out, workers, env, shards):
    os.environ.update(env)
    import torch
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))
    from ovtasks.core.config import load_settings
    from ovtasks.orchestration.tasks import pseudo_label_group
    return pseudo_label_group(src, out, shards, load_settings(), "grounded")


if __name__ == "__main__":
    stage, src, out, workers, env = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
    os.environ.update(env)
    from ovtasks.core.config import load_settings
    s = load_settings()
    t0 = time.perf_counter()
    if stage == "ingest":
        from ovtasks.ingest.pipeline import ingest
        r = ingest(src, out, s, workers=workers).report
        counts = {"images": r["seen"], "kept": r["kept"]}
    else:
        from ovtasks.data.clean import complete_shards
        from ovtasks.pseudolabel.runner import finalize
        from ovtasks.core.storage import open_store
        shards = complete_shards(open_store(src, s.s3))
        parts = [shards[i::workers] for i in range(workers)]
        job = partial(label, src, out, workers, env)
        if workers == 1:
            job(parts[0])
        else:
            import multiprocessing as mp
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                list(pool.map(job, parts))
        r = finalize(src, out, s, "grounded").report
        assert not r["missing"], r["missing"]
        counts = {"images": r["images"], "annotations": r["annotations"]}
    print(json.dumps({"seconds": time.perf_counter() - t0, **counts}))
"""


class TreeMemory:
    """Peak of the summed RSS of a process and all its descendants, sampled every ``period`` s."""

    def __init__(self, pid: int, period: float = 0.05):
        self.proc, self.period = psutil.Process(pid), period
        self.peak_total = self.peak_single = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.proc] + self.proc.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            rss = []
            for p in procs:
                try:
                    rss.append(p.memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
            if rss:
                self.peak_total = max(self.peak_total, sum(rss))
                self.peak_single = max(self.peak_single, max(rss))
            self._stop.wait(self.period)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_stage(stage: str, src: Path, out: Path, workers: int, env: dict) -> dict:
    # a script file, not -c: spawned pool workers import `label` from it
    script = out.parent / f"_stage_{stage}.py"
    script.write_text(_STAGE)
    proc = subprocess.Popen([sys.executable, str(script), stage, str(src), str(out), str(workers), json.dumps(env)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(out.parent))
    with TreeMemory(proc.pid) as mem:
        stdout, stderr = proc.communicate(timeout=7200)
    if proc.returncode != 0:
        raise RuntimeError(f"{stage} with {workers} workers failed:\n{stderr[-3000:]}")
    res = json.loads(stdout.strip().splitlines()[-1])
    return {**res, "images_per_s": round(res["images"] / res["seconds"], 1), "seconds": round(res["seconds"], 2),
            "peak_rss_total_mib": round(mem.peak_total / 2**20), "peak_rss_process_mib": round(mem.peak_single / 2**20)}


def subset(full: Path, dest: Path, shards: int) -> Path:
    """A source directory holding the first ``shards`` shards of ``full`` (hard links, no copies)."""
    dest.mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        for f in full.glob(f"{i:05d}.*"):
            os.link(f, dest / f.name)
    return dest


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for stage, marker in (("ingest", "o"), ("pseudo_label", "s")):
        for w, style in zip(doc["workers"], ("-", "--", ":", "-.")):
            pts = [p for p in doc["points"] if p["stage"] == stage and p["workers"] == w]
            xs = [p["images"] for p in pts]
            axes[0].plot(xs, [p["images_per_s"] for p in pts], style, marker=marker, label=f"{stage}, {w} worker(s)")
            axes[1].plot(xs, [p["peak_rss_total_mib"] for p in pts], style, marker=marker, label=f"{stage}, {w} worker(s)")
    axes[0].set(title="throughput", xlabel="images in the run", ylabel="images / s", yscale="log")
    axes[1].set(title="peak memory (all processes of the stage)", xlabel="images in the run", ylabel="MiB")
    axes[1].set_ylim(bottom=0)
    axes[0].legend(fontsize=8, loc="center right")
    axes[1].legend(fontsize=8, loc="center right", bbox_to_anchor=(1.0, 0.3))
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"ovtasks scaling ({doc['machine']['cores']} cores; pseudo-label = grounded, tiny models, "
                 f"{doc['image_size']} px)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, nargs="+", default=[1000, 5000, 10000])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--out", default=str(RESULTS / "scaling.json"))
    ap.add_argument("--plot", default=str(RESULTS / "scaling.png"))
    args = ap.parse_args()
    if any(n % args.shard_size for n in args.images):
        ap.error("--images must be multiples of --shard-size")
    from ovtasks.pseudolabel.candidates import Vocabulary
    from ovtasks.core.config import load_settings
    from ovtasks.models import grounding_dino, sam
    from ovtasks.data.synth import SynthSpec, generate

    work = Path(tempfile.mkdtemp(prefix="ovtasks-scaling-"))
    points = []
    try:
        words = sorted({t for e in Vocabulary.load(None).entries for t in e.terms() for t in t.split()})
        env = {"OVTASKS_GROUNDED__GDINO_MODEL": grounding_dino.save_tiny(work / "gdino", words),
               "OVTASKS_GROUNDED__SAM_MODEL": sam.save_tiny(work / "sam"), "OVTASKS_DATA_DIR": str(work / "data"),
               "HF_HUB_OFFLINE": "1"}
        full = work / "raw-all"
        t0 = time.perf_counter()
        generate(SynthSpec(seed=3, shards=max(args.images) // args.shard_size, images_per_shard=args.shard_size,
                           image_size=args.image_size, failure_rate=0.05), str(full), load_settings(env={}))
        print(f"synthesised {max(args.images)} images in {time.perf_counter() - t0:.0f} s", flush=True)
        for n in sorted(args.images):
            raw = subset(full, work / f"raw{n}", n // args.shard_size)
            for w in args.workers:
                clean, out = work / f"clean{n}-{w}", work / f"out{n}-{w}"
                for stage, src, dst in (("ingest", raw, clean), ("pseudo_label", clean, out)):
                    p = {"stage": stage, "images_in": n, "workers": w, **run_stage(stage, src, dst, w, env)}
                    points.append(p)
                    print(json.dumps(p), flush=True)
                shutil.rmtree(out)
                shutil.rmtree(clean)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for p in points:
        p["images"] = p.pop("images_in")
    doc = {"benchmark": "scaling of ingest and pseudo-label with workers and data size", "images": args.images,
           "workers": args.workers, "shard_size": args.shard_size, "image_size": args.image_size,
           "generator": "grounded (tiny random models)", "date": time.strftime("%Y-%m-%d"),
           "machine": {"cores": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                       "memory_gib": round(psutil.virtual_memory().total / 2**30)},
           "points": points}
    by = {(p["stage"], p["workers"], p["images"]): p for p in points}
    lo, hi = min(args.images), max(args.images)
    doc["summary"] = {stage: {
        "memory_ratio_largest_vs_smallest": round(by[(stage, 1, hi)]["peak_rss_total_mib"] / by[(stage, 1, lo)]["peak_rss_total_mib"], 3),
        "throughput_ratio_largest_vs_smallest": round(by[(stage, 1, hi)]["images_per_s"] / by[(stage, 1, lo)]["images_per_s"], 3),
        **({"worker_speedup_at_largest": round(by[(stage, max(args.workers), hi)]["images_per_s"] / by[(stage, 1, hi)]["images_per_s"], 3)}
           if len(args.workers) > 1 else {}),
    } for stage in ("ingest", "pseudo_label")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, Path(args.plot))
    print(json.dumps(doc["summary"], indent=2))
    print(f"written {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
