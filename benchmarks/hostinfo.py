"""What machine a benchmark ran on (shared by the benchmark scripts)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def memory_gib() -> int:
    try:
        with open("/proc/meminfo") as fh:
            return round(int(next(x for x in fh if x.startswith("MemTotal")).split()[1]) / 2**20)
    except (OSError, StopIteration):
        return 0


def device_machine(device: str) -> dict:
    """CPU count, GPU name (None off CUDA), torch version and platform: what a device benchmark's rate depends on."""
    import os

    import torch

    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else None
    return {"cpus": os.cpu_count(), "gpu": gpu, "torch": torch.__version__, "platform": platform.platform()}


def write_device_result(res: dict, name: str, device: str, out: str | None, results_dir) -> Path:
    """Write ``res`` (dated) to ``out``, or to ``results_dir/<name>.json`` (``<name>_cuda.json`` on CUDA: the GPU
    rows `make bench` lists and `ovtasks plan` reads), and say where."""
    import json
    import time

    path = Path(out) if out else Path(results_dir) / f"{name}{'_cuda' if device.startswith('cuda') else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**res, "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n")
    print(f"written {path}")
    return path
