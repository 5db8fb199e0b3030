"""Capacity plan for a weekly run over N images: GPU workers, pool slots, mapped tasks, store traffic,
and the helm values that express it (``ovtasks plan``).

Everything is derived from measured throughput: images/s per GPU of the pseudo-label generator (its last GPU run:
``benchmarks/results/grounded_cuda.json`` or ``maskfree_speed_cuda.json``) and ingest
images/s per CPU core (``benchmarks/results/ingest.json``). The plan is arithmetic, not a promise: the
``efficiency`` factor stands for model loading, retries, stragglers and a shard group that lands last.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from ovtasks.orchestration.tasks import shard_groups

MAX_MAP_LENGTH = 1024  # Airflow's [core] max_map_length default; pipeline.max_map_length mirrors it


@dataclass(frozen=True)
class Measured:
    gpu_images_per_s: float  # pseudo-label images/s on one GPU
    gpu_source: str
    ingest_images_per_core_s: float
    ingest_source: str


GPU_RESULTS = {"grounded": "grounded_cuda.json", "maskfree": "maskfree_speed_cuda.json"}  # what `make bench` lists


def measured(results: Path, generator: str = "grounded", gpu: bool = True) -> Measured:
    """Throughputs from the committed benchmark results: the generator's last GPU run (grounded: the lexicon
    workload, the synthetic captions' names; maskfree: ``benchmarks/maskfree_speed.py --device cuda``) and ingest.
    ``gpu=False``: ingest only (the GPU rate is given on the command line)."""
    if generator not in GPU_RESULTS:
        raise ValueError(f"unknown generator {generator!r}: one of {sorted(GPU_RESULTS)}")
    gpu_file = results / GPU_RESULTS[generator]
    if not gpu:
        gpu_rate, gpu_source = 0.0, "--gpu-images-per-s"
    elif not gpu_file.exists():
        script = "grounded.py" if generator == "grounded" else "maskfree_speed.py"
        raise FileNotFoundError(f"no measured GPU throughput for the {generator!r} generator under {results} ({gpu_file.name}); "
                                f"run benchmarks/{script} --device cuda on a GPU, or pass --gpu-images-per-s")
    else:
        g = json.loads(gpu_file.read_text())
        if generator == "grounded":
            gpu_rate = next(r for r in g["rows"] if r["workload"] == g["headline"])["batched_img_s"]
            gpu_source = f"{gpu_file.name}: {g['machine']['gpu']}, {g['size']} models, {g['image_size']} px, {g['dtype']}"
        else:
            gpu_rate = g["images_per_s"]
            gpu_source = (f"{gpu_file.name}: {g['machine']['gpu']} with {g['machine']['cpus']} CPU cores, {g['size']} ITM, "
                          f"{g['image_size']} px")
    ing = json.loads((results / "ingest.json").read_text())
    best = max(ing["results"], key=lambda r: r["image_size"])  # the LAION-like size
    per_core = best["ingest_images_per_s"] / best["workers"]
    return Measured(gpu_rate, gpu_source, per_core,
                    f"ingest.json: {best['image_size']} px, {best['ingest_images_per_s']} img/s on {best['workers']} cores")


@dataclass(frozen=True)
class Plan:
    images_per_week: int
    window_hours: float
    efficiency: float
    gpu_images_per_s: float
    gpu_workers: int
    gpu_hours: float
    shards: int
    shards_per_task: int
    mapped_pseudo_tasks: int
    ingest_cores: int
    default_workers: int
    store_read_gb: float
    store_write_gb: float
    store_mb_per_s_during_window: float
    notes: tuple[str, ...]

    def as_dict(self) -> dict:
        return asdict(self)


def plan(images_per_week: float, gpu_images_per_s: float, ingest_images_per_core_s: float, window_hours: float = 72.0,
         efficiency: float = 0.7, shard_size: int = 10_000, image_kb: float = 50.0, ingest_window_hours: float = 12.0,
         cores_per_default_worker: int = 2, max_map_length: int = MAX_MAP_LENGTH) -> Plan:
    """GPU workers so that pseudo-labelling ``images_per_week`` finishes within ``window_hours`` at
    ``efficiency`` of the measured rate; ingest cores to finish within ``ingest_window_hours``."""
    if images_per_week <= 0 or gpu_images_per_s <= 0 or ingest_images_per_core_s <= 0:
        raise ValueError("images per week and both throughputs must be positive")
    if not 0 < efficiency <= 1 or window_hours <= 0 or window_hours > 168 or ingest_window_hours <= 0:
        raise ValueError("efficiency must be in (0, 1] and the windows within a week")
    n = int(images_per_week)
    gpu_seconds = n / gpu_images_per_s
    gpus = max(1, math.ceil(gpu_seconds / (window_hours * 3600 * efficiency)))
    shards = max(1, math.ceil(n / shard_size))
    groups = shard_groups(list(range(shards)), 1, max_map_length)  # exactly how the pseudo-label DAG maps them
    per_task, mapped = len(groups[0]), len(groups)
    cores = max(1, math.ceil(n / (ingest_images_per_core_s * ingest_window_hours * 3600 * efficiency)))
    gb = n * image_kb / 1e6
    # reads: raw once (ingest), clean once per pseudo-label run and once per training epoch; writes: clean
    read_gb, write_gb = 3 * gb, gb
    notes = []
    if gpus > mapped:
        notes.append(f"{gpus} GPU workers but only {mapped} shard groups: use smaller shards (img2dataset number_sample_per_shard)")
    if per_task > 1:
        notes.append(f"{shards} shards exceed max_map_length {max_map_length}: {per_task} shards per mapped task")
    if gpus > 64:
        notes.append("more than 64 GPU workers: split the week into several pseudo-label runs (one per source prefix) "
                     "so that one DAG run's mapped task count and the scheduler's loop stay small")
    return Plan(n, window_hours, efficiency, gpu_images_per_s, gpus, round(gpu_seconds / 3600, 1), shards, per_task, mapped,
                cores, max(1, math.ceil(cores / cores_per_default_worker)), round(read_gb, 1), round(write_gb, 1),
                round((gb * 2) * 1000 / (window_hours * 3600), 2), tuple(notes))


GPU_WORKER_IMAGE = {"repository": "ovtasks-gpu-worker", "tag": "0.1.0"}  # as helm/ovtasks/values.yaml


def helm_values(p: Plan) -> dict:
    """Helm overrides for the plan: the gpu worker set's KEDA ceiling, the GPU pool, the default set.

    Helm replaces lists whole, so both worker sets are written out in full (image, resources, env): a
    partial set would drop the gpu set's image and ``OVTASKS_DEVICE=cuda`` from the chart's values."""
    return {
        "ovtasks": {"gpuPoolSlots": p.gpu_workers},
        "airflow": {"workers": {"celery": {"sets": [
            {"name": "default", "queue": "default", "replicas": p.default_workers,
             "resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "16Gi"}},
             "keda": {"enabled": False}},
            {"name": "gpu", "queue": "gpu", "replicas": 1, "image": dict(GPU_WORKER_IMAGE),
             "resources": {"requests": {"cpu": "8", "memory": "48Gi", "nvidia.com/gpu": 1},
                           "limits": {"memory": "96Gi", "nvidia.com/gpu": 1}},
             "nodeSelector": {"nvidia.com/gpu.present": "true"},
             "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
             "env": [{"name": "OVTASKS_DEVICE", "value": "cuda"},
                     {"name": "OVTASKS_PIPELINE__SHARDS_PER_TASK", "value": str(p.shards_per_task)}],
             "keda": {"enabled": True, "minReplicaCount": 0, "maxReplicaCount": p.gpu_workers,
                      "pollingInterval": 15, "cooldownPeriod": 600}},
        ]}}},
    }


def render(p: Plan, m: Measured | None) -> str:
    import yaml

    rows = [("images per week", f"{p.images_per_week:,}"),
            ("GPU throughput used", f"{p.gpu_images_per_s} images/s per GPU" + (f" ({m.gpu_source})" if m else "")),
            ("GPU hours of pseudo-labelling", f"{p.gpu_hours}"),
            (f"GPU workers (finish in {p.window_hours:g} h at {p.efficiency:.0%} efficiency)", f"{p.gpu_workers}"),
            ("shards (10k images each) / mapped pseudo-label tasks", f"{p.shards} / {p.mapped_pseudo_tasks} ({p.shards_per_task} shard(s) per task)"),
            ("ingest CPU cores (12 h window) / default workers", f"{p.ingest_cores} / {p.default_workers}"),
            ("object store read / written per week", f"{p.store_read_gb} GB / {p.store_write_gb} GB"),
            ("object store load during the pseudo-label window", f"{p.store_mb_per_s_during_window} MB/s")]
    w = max(len(k) for k, _ in rows)
    out = [f"{k:<{w}}  {v}" for k, v in rows]
    out += [f"note: {n}" for n in p.notes]
    out += ["", "# helm values (helm install ... -f this.yaml, after values-production.example.yaml)",
            yaml.safe_dump(helm_values(p), sort_keys=False).rstrip()]
    return "\n".join(out)
