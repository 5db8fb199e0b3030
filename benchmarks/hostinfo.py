"""What machine a benchmark ran on (shared by the benchmark scripts)."""

from __future__ import annotations

import platform


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
