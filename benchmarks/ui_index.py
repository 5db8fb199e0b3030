"""The UI's Datasets and Gallery endpoints at scale, from the summary index (`ovtasks.data.summary_index`).

Writes N synthetic shards' manifests to a local store the way the stages leave them (clean manifests, pseudo-label
manifests with their gallery counts and a small shard JSON each, the GX report, N source tars), builds the index
(`ovtasks index rebuild`), then starts the UI app in a fresh process per size and requests random pages of
both endpoints through HTTP (FastAPI's test client): p50 / p95 latency per endpoint and the peak RSS of that
process. The same requests without the index (what the endpoints did before: every manifest read per request)
are measured at the smallest size only, since they grow with N.

    python benchmarks/ui_index.py                         # 1,000 and 100,000 shards
    python benchmarks/ui_index.py --sizes 1000 10000 --requests 20

Writes benchmarks/results/ui_index.json. Targets: p95 <= 200 ms per endpoint at 100k shards; peak memory at
100k no more than 1.1x the peak at 1k.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CATS = ["ball", "box", "star", "ring", "heart", "flower", "car", "cup"]


def make_world(root: Path, shards: int, per_shard: int, templates: int = 64) -> dict[str, dict]:
    """N shards' files; their contents cycle through ``templates`` random shard JSONs (writing 300k files is
    the cost here, not making them). Returns the pseudo-label rows as the stages would index them."""
    from ovtasks.data.summary_index import GalleryCounts

    import numpy as np

    rng = np.random.default_rng(0)
    (root / "laion").mkdir(parents=True)
    (root / "clean" / "shards").mkdir(parents=True)
    pseudo = root / "pseudo" / "maskfree"
    pseudo.mkdir(parents=True)
    made = []
    for t in range(templates):
        images, anns = [], []
        for j in range(per_shard):
            images.append({"id": j, "key": f"{t:03d}{j:04d}", "width": 256, "height": 256, "caption": "a photo"})
            for _ in range(int(rng.integers(0, 4))):
                anns.append({"id": len(anns), "image_id": j, "category_id": 1, "category_name": CATS[int(rng.integers(len(CATS)))],
                             "score": round(float(rng.random()), 3), "bbox": [1, 2, 30, 40], "segmentation": {"size": [256, 256], "counts": "0"}})
        coco = {"images": images, "annotations": anns, "categories": []}
        made.append((json.dumps(coco).encode(), GalleryCounts.from_coco(coco), len(anns)))
    report = []
    for i in range(shards):
        name = f"{i:06d}"
        blob, gallery, n_anns = made[i % templates]
        (root / "laion" / f"{name}.tar").write_bytes(b"")
        q = {"too_small": i % 4, "near_duplicate": i % 3}
        (root / "clean" / "shards" / f"{name}.manifest.json").write_text(json.dumps(
            {"stage": "ingest", "shard": name, "status": "complete", "counts": {"seen": 100, "kept": 100 - sum(q.values()), "quarantined": q}}))
        (pseudo / f"{name}.json").write_bytes(blob)
        (pseudo / f"{name}.manifest.json").write_text(json.dumps(
            {"stage": "pseudo_label", "shard": name, "status": "complete", "gallery": gallery,
             "counts": {"images": per_shard, "labelled": per_shard, "annotations": n_anns, "quarantined": 0},
             "files": {f"pseudo/maskfree/{name}.json": {"sha256": name, "bytes": len(blob)}}}))
        report.append({"shard": name, "success": bool(i % 50), "reasons": [] if i % 50 else ["empty masks"]})
    (pseudo / "validation_report.json").write_text(json.dumps({"shards": report}))
    return {"report": {"shards": report}, "shards": shards}


def index_with_writers(root: Path, world: dict) -> None:
    """The index as the stages leave it: the rows ingest and pseudo-label's finalize build from their manifests
    (the same row builders), and validate's GX rows from its report."""
    from ovtasks.core.storage import open_store
    from ovtasks.data.catalog import gx_rows, scan_ingest, scan_pseudo
    from ovtasks.data.summary_index import gx_index, ingest_index, write_pseudo

    clean, pseudo = open_store(str(root / "clean")), open_store(str(root))
    ingest_index(clean).replace(scan_ingest(clean), {"source_shards": world["shards"]})
    write_pseudo(pseudo, "maskfree", scan_pseudo(pseudo, "maskfree"))
    gx_index(pseudo, "maskfree").replace(gx_rows(world["report"]))


SERVE = r"""
import json, random, statistics, sys, time
from fastapi.testclient import TestClient
from ovtasks.core.config import load_settings
from ovtasks.ui.app import create_app
root, n, requests, shards = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
settings = load_settings(env={"OVTASKS_DATA_DIR": root})
client = TestClient(create_app(lambda: settings, auth_dependency=lambda: object()))
rng = random.Random(0)
out, pages = {}, {}
for name in ("datasets", "gallery"):
    times = []
    for r in range(requests + 1):
        if name == "datasets":
            url = f"/api/datasets?page={rng.randint(1, max(1, shards // 100))}&per_page=100"
        else:  # a random page that exists, of a random filter (its page count asked once, not timed)
            q = f"category={rng.choice(['', 'ball', 'cup', 'star'])}&min_score={rng.choice([0, 0.25, 0.5, 0.9])}&per_page=24"
            if q not in pages:
                pages[q] = client.get(f"/api/gallery?{q}&page=1").json()["pages"]
            url = f"/api/gallery?{q}&page={rng.randint(1, max(1, pages[q]))}"
        t0 = time.perf_counter()
        resp = client.get(url)
        dt = time.perf_counter() - t0
        assert resp.status_code == 200, (url, resp.text[:200])
        body = resp.json()
        if r:  # the first request warms imports and caches
            times.append(dt)
    times.sort()
    out[name] = {"p50_ms": round(1000 * statistics.median(times), 1), "p95_ms": round(1000 * times[int(0.95 * (len(times) - 1))], 1),
                 "requests": len(times), "index": body["index"], "items": len(body.get("items", body.get("shards", [])))}
# VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across fork + exec)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
out["peak_rss_mib"] = round(hwm / 1024, 1)
print(json.dumps(out))
"""


def serve(root: Path, shards: int, requests: int) -> dict:
    r = subprocess.run([sys.executable, "-c", SERVE, str(root), str(shards), str(requests), str(shards)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000])
    ap.add_argument("--images-per-shard", type=int, default=8)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ui_index.json"))
    args = ap.parse_args()
    from ovtasks.core.config import load_settings
    from ovtasks.data.catalog import rebuild

    rows = []
    for n in args.sizes:
        work = Path(tempfile.mkdtemp(prefix="ovtasks-ui-bench-"))
        try:
            t0 = time.perf_counter()
            world = make_world(work, n, args.images_per_shard)
            row = {"shards": n, "images": n * args.images_per_shard, "world_seconds": round(time.perf_counter() - t0, 1)}
            t0 = time.perf_counter()
            if n == min(args.sizes):
                row["without_index"] = serve(work, n, max(3, args.requests // 8))
                counts = rebuild(load_settings(env={"OVTASKS_DATA_DIR": str(work)}), ("maskfree",))
                row["rebuild_seconds"] = round(time.perf_counter() - t0, 1)
                row["indexed"] = counts
            else:
                index_with_writers(work, world)
                row["index_write_seconds"] = round(time.perf_counter() - t0, 1)
            row["with_index"] = serve(work, n, args.requests)
            rows.append(row)
            print(json.dumps(row), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    big, small = rows[-1], rows[0]
    p95 = max(big["with_index"][e]["p95_ms"] for e in ("datasets", "gallery"))
    doc = {"benchmark": "UI endpoints from the summary index", "rows": rows,
           "p95_ms_at_largest": p95, "memory_ratio_largest_vs_smallest": round(big["with_index"]["peak_rss_mib"] / small["with_index"]["peak_rss_mib"], 3),
           "targets": {"p95_ms": 200, "memory_ratio": 1.1}, "date": time.strftime("%Y-%m-%d")}
    doc["met"] = p95 <= 200 and doc["memory_ratio_largest_vs_smallest"] <= 1.1
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"p95={p95} ms at {big['shards']} shards; memory x{doc['memory_ratio_largest_vs_smallest']} ({small['shards']} -> {big['shards']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
