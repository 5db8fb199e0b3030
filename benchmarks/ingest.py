"""Ingest throughput as a ratio to the raw decode limit, measured side by side in one run.

The limit: the same shards, on the same number of processes, only streamed from the tar and
decoded to RGB (no checks, no hashing, no writing). Ingest: the full stage (all filters, pHash,
language ID, global near-duplicate pass, publishing shards, quarantine and manifests).
Runs alternate (limit, ingest, limit, ingest, ...) and the median of each is compared.

    python benchmarks/ingest.py                 # 512 px (LAION-like) and 256 px configurations
    python benchmarks/ingest.py --sizes 512 --repeats 5

Prints ``ratio=<x>`` per configuration and writes benchmarks/results/ingest.json. Target >= 0.8.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hostinfo import cpu_model  # noqa: E402
from ovtasks.core.config import load_settings  # noqa: E402
from ovtasks.ingest.pipeline import ingest  # noqa: E402
from ovtasks.core.shards import IMAGE_EXTS, iter_tar_samples  # noqa: E402
from ovtasks.data.synth import SynthSpec, generate  # noqa: E402


def decode_shard(path: str) -> int:
    n = 0
    with open(path, "rb") as fh:
        for sample in iter_tar_samples(fh, {}, 1 << 40):
            ext = next((e for e in IMAGE_EXTS if e in sample.members), None)
            if ext:
                Image.open(io.BytesIO(sample.members[ext])).convert("RGB")
                n += 1
    return n


def decode_limit(src: Path, workers: int) -> tuple[float, int]:
    paths = sorted(str(p) for p in src.glob("*.tar"))
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        n = sum(pool.map(decode_shard, paths))
    return time.perf_counter() - t0, n


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "pillow": Image.__version__, "platform": platform.platform()}


def run_config(size: int, shards: int, per_shard: int, workers: int, repeats: int, work: Path) -> dict:
    settings = load_settings(env={})
    src = work / f"laion{size}"
    generate(SynthSpec(seed=0, shards=shards, images_per_shard=per_shard, image_size=size), str(src), settings, workers=workers)
    decode_limit(src, workers)  # warm the page cache for both sides
    limit_s, ingest_s = [], []
    n = 0
    for r in range(repeats):
        dt, n = decode_limit(src, workers)
        limit_s.append(dt)
        out = work / f"clean{size}-{r}"
        t0 = time.perf_counter()
        report = ingest(str(src), str(out), settings, workers=workers).report
        ingest_s.append(time.perf_counter() - t0)
        shutil.rmtree(out)
    lim, ing = statistics.median(limit_s), statistics.median(ingest_s)
    res = {"image_size": size, "shards": shards, "images": n, "workers": workers, "repeats": repeats,
           "decode_limit_s": round(lim, 3), "ingest_s": round(ing, 3),
           "decode_limit_images_per_s": round(n / lim, 1), "ingest_images_per_s": round(report["seen"] / ing, 1),
           "kept": report["kept"], "quarantined": report["quarantined"], "ratio": round(lim / ing, 3)}
    print(f"{size}px x {n} images, {workers} workers: decode limit {res['decode_limit_images_per_s']} img/s, "
          f"ingest {res['ingest_images_per_s']} img/s  ratio={res['ratio']}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 256])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--images-per-shard", type=int, default=400)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ingest.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ovtasks-bench-"))
    try:
        results = [run_config(s, args.shards, args.images_per_shard, args.workers, args.repeats, work) for s in args.sizes]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {"benchmark": "ingest throughput / decode-only limit", "target_ratio": 0.8, "machine": machine(),
           "date": time.strftime("%Y-%m-%d"), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
