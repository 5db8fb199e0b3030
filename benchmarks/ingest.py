"""Ingest throughput as a ratio to the raw decode limit, measured side by side in one run.

The limit: the same shards, on the same number of processes, only streamed from the tar and
decoded to RGB (no checks, no hashing, no writing). Ingest: the full stage (all filters, pHash,
language ID, global near-duplicate pass, publishing shards, quarantine and manifests).
Runs alternate (limit, ingest with full decodes, ingest, limit, ...) and the median of each is compared.

    python benchmarks/ingest.py                 # 512 px (LAION-like) and 256 px configurations
    python benchmarks/ingest.py --sizes 512 --repeats 5

Prints ``ratio=<x>`` per configuration and writes benchmarks/results/ingest.json. Target >= 1.0. Each
repeat also runs ingest with ``ingest.scaled_decode`` off (every image fully decoded, as before that
option) and with ``ingest.check_view_side=128`` (the view side before the 64 px default), so the row shows what
the reduced-scale decode and the smaller view each bought, and whether all publish the same images.

Two codec rows, side by side on the same data in the same run, that decide what the project keeps:
``phash``: ``ovtasks.core.imaging.phash64`` against ``imagehash.phash`` on the same decoded images (the
slower one is a test/benchmark dependency only); ``tar``: the hand-written streaming tar reader and
``ShardWriter`` against the standard library's ``tarfile`` on the same shards (read every member; write
the same members).

    python benchmarks/ingest.py --codecs-only   # just the two codec rows
"""

from __future__ import annotations

import argparse
import hashlib
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


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def phash_row(src: Path, repeats: int) -> dict:
    """Both perceptual hashes over the same decoded images (one process: the hash, not the pool, is measured)."""
    import imagehash

    from ovtasks.core.imaging import phash64

    images = []
    for path in sorted(src.glob("*.tar")):
        with open(path, "rb") as fh:
            for sample in iter_tar_samples(fh, {}, 1 << 40):
                ext = next((e for e in IMAGE_EXTS if e in sample.members), None)
                if ext:
                    images.append(Image.open(io.BytesIO(sample.members[ext])).convert("RGB"))
    ours = _best_of(lambda: [phash64(im) for im in images], repeats)
    theirs = _best_of(lambda: [imagehash.phash(im) for im in images], repeats)
    agree = sum((phash64(im) ^ int(str(imagehash.phash(im)), 16)).bit_count() for im in images) / len(images)
    res = {"images": len(images), "phash64_us": round(1e6 * ours / len(images), 1), "imagehash_us": round(1e6 * theirs / len(images), 1),
           "ratio_imagehash_over_phash64": round(theirs / ours, 2), "mean_bits_differing": round(agree, 2)}
    print(f"phash: phash64 {res['phash64_us']} us/image, imagehash.phash {res['imagehash_us']} us/image "
          f"(x{res['ratio_imagehash_over_phash64']}), {res['mean_bits_differing']} of 64 bits differ on average", flush=True)
    return res


def tar_row(src: Path, repeats: int) -> dict:
    """The project's tar reader and writer against ``tarfile`` on the same shards (page cache warm)."""
    import tarfile

    from ovtasks.core.shards import ShardWriter

    paths = sorted(src.glob("*.tar"))
    blobs = [p.read_bytes() for p in paths]
    members = []
    for blob in blobs:
        with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
            members.append([(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()])

    def read_ours():
        for blob in blobs:
            for _ in iter_tar_samples(io.BytesIO(blob), {}, 1 << 40):
                pass

    def read_tarfile():
        for blob in blobs:
            with tarfile.open(fileobj=io.BytesIO(blob), mode="r|") as tf:  # streaming, as ours
                for m in tf:
                    if m.isfile():
                        tf.extractfile(m).read()

    def write_ours():
        for ms in members:
            with ShardWriter(io.BytesIO()) as w:
                for name, data in ms:
                    key, _, ext = name.rpartition(".")
                    w.add(key, {ext: data})

    def write_tarfile(digest: bool = False):
        for ms in members:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
                for name, data in ms:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
            if digest:  # what ShardWriter also gives: the manifest's sha256 of every byte written
                hashlib.sha256(buf.getvalue()).hexdigest()

    r_ours, r_tf = _best_of(read_ours, repeats), _best_of(read_tarfile, repeats)
    w_ours, w_tf = _best_of(write_ours, repeats), _best_of(write_tarfile, repeats)
    w_tf_sha = _best_of(lambda: write_tarfile(digest=True), repeats)
    mb = sum(len(b) for b in blobs) / 1e6
    res = {"shards": len(paths), "megabytes": round(mb, 1), "read_ours_mb_s": round(mb / r_ours, 1), "read_tarfile_mb_s": round(mb / r_tf, 1),
           "read_ratio_ours_over_tarfile": round(r_tf / r_ours, 2), "write_ours_mb_s": round(mb / w_ours, 1),
           "write_tarfile_mb_s": round(mb / w_tf, 1), "write_ratio_ours_over_tarfile": round(w_tf / w_ours, 2),
           "write_tarfile_sha256_mb_s": round(mb / w_tf_sha, 1), "write_ratio_ours_over_tarfile_sha256": round(w_tf_sha / w_ours, 2)}
    print(f"tar: read {res['read_ours_mb_s']} MB/s (ours) vs {res['read_tarfile_mb_s']} MB/s (tarfile, x{res['read_ratio_ours_over_tarfile']}); "
          f"write {res['write_ours_mb_s']} (ours, with its sha256) vs {res['write_tarfile_mb_s']} MB/s (tarfile, x{res['write_ratio_ours_over_tarfile']}), "
          f"{res['write_tarfile_sha256_mb_s']} MB/s with the sha256 (x{res['write_ratio_ours_over_tarfile_sha256']})", flush=True)
    return res


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "pillow": Image.__version__, "platform": platform.platform()}


def _ingest_timed(src: Path, out: Path, settings, workers: int) -> tuple[float, dict, dict[str, str]]:
    t0 = time.perf_counter()
    report = ingest(str(src), str(out), settings, workers=workers).report
    dt = time.perf_counter() - t0
    kept = {}  # sample key -> sha256 of the published image bytes, over every clean shard
    for tar in sorted(out.glob("shards/*.tar")):
        with open(tar, "rb") as fh:
            for sample in iter_tar_samples(fh, {}, 1 << 40):
                kept[sample.key] = hashlib.sha256(sample.members["jpg"]).hexdigest()
    shutil.rmtree(out)
    return dt, report, kept


def run_config(size: int, shards: int, per_shard: int, workers: int, repeats: int, work: Path) -> dict:
    """Side by side, per repeat: the full-decode-only loop, ingest with full decodes (``scaled_decode``
    off: what ingest did before) and ingest as configured (header checks, reduced-scale JPEG decode)."""
    settings = load_settings(env={})
    full = load_settings(env={"OVTASKS_INGEST__SCALED_DECODE": "false"})
    view128 = load_settings(env={"OVTASKS_INGEST__CHECK_VIEW_SIDE": "128"})  # the view side before 64
    src = work / f"laion{size}"
    generate(SynthSpec(seed=0, shards=shards, images_per_shard=per_shard, image_size=size), str(src), settings, workers=workers)
    decode_limit(src, workers)  # warm the page cache for both sides
    limit_s, ingest_s, full_s, v128_s = [], [], [], []
    n = 0
    for r in range(repeats):
        dt, n = decode_limit(src, workers)
        limit_s.append(dt)
        dt, report_full, kept_full = _ingest_timed(src, work / f"clean{size}-full-{r}", full, workers)
        full_s.append(dt)
        dt, report_128, kept_128 = _ingest_timed(src, work / f"clean{size}-v128-{r}", view128, workers)
        v128_s.append(dt)
        dt, report, kept = _ingest_timed(src, work / f"clean{size}-{r}", settings, workers)
        ingest_s.append(dt)
    lim, ing, ing_full, ing_128 = (statistics.median(x) for x in (limit_s, ingest_s, full_s, v128_s))
    res = {"image_size": size, "shards": shards, "images": n, "workers": workers, "repeats": repeats,
           "decode_limit_s": round(lim, 3), "ingest_s": round(ing, 3), "ingest_full_decode_s": round(ing_full, 3),
           "decode_limit_images_per_s": round(n / lim, 1), "ingest_images_per_s": round(report["seen"] / ing, 1),
           "ingest_full_decode_images_per_s": round(report_full["seen"] / ing_full, 1),
           "check_view_side": settings.ingest.check_view_side, "ingest_view128_s": round(ing_128, 3),
           "ingest_view128_images_per_s": round(report_128["seen"] / ing_128, 1), "ratio_view128": round(lim / ing_128, 3),
           "published_keys_differing_view128": len(set(kept) ^ set(kept_128)),
           "kept": report["kept"], "quarantined": report["quarantined"],
           "kept_full_decode": report_full["kept"], "quarantined_full_decode": report_full["quarantined"],
           # near-duplicate pairs at the Hamming boundary may be decided the other way by the view's hash
           "published_keys_differing": len(set(kept) ^ set(kept_full)),
           "same_bytes_where_both_publish": all(kept[k] == kept_full[k] for k in set(kept) & set(kept_full))
           and all(kept[k] == kept_128[k] for k in set(kept) & set(kept_128)),
           "ratio_full_decode": round(lim / ing_full, 3), "ratio": round(lim / ing, 3)}
    print(f"{size}px x {n} images, {workers} workers: decode limit {res['decode_limit_images_per_s']} img/s, "
          f"ingest {res['ingest_images_per_s']} img/s (full decodes: {res['ingest_full_decode_images_per_s']}, 128 px view: "
          f"{res['ingest_view128_images_per_s']}) ratio={res['ratio']} (full decodes: {res['ratio_full_decode']}, 128 px view: "
          f"{res['ratio_view128']}), published keys differing: "
          f"{res['published_keys_differing']}, same bytes where both publish: {res['same_bytes_where_both_publish']}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 256])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--images-per-shard", type=int, default=400)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ingest.json"))
    ap.add_argument("--codecs-only", action="store_true", help="only the phash and tar rows (merged into --out)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ovtasks-bench-"))
    try:
        size = args.sizes[0]
        src = work / f"laion{size}"
        if args.codecs_only:
            generate(SynthSpec(seed=0, shards=args.shards, images_per_shard=args.images_per_shard, image_size=size), str(src),
                     load_settings(env={}), workers=args.workers)
            results = json.loads(Path(args.out).read_text())["results"] if Path(args.out).exists() else []
        else:
            results = [run_config(s, args.shards, args.images_per_shard, args.workers, args.repeats, work) for s in args.sizes]
        codecs = {"image_size": size, "phash": phash_row(src, args.repeats), "tar": tar_row(src, args.repeats)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {"benchmark": "ingest throughput / decode-only limit", "target_ratio": 1.0, "machine": machine(),
           "date": time.strftime("%Y-%m-%d"), "results": results, "codecs": codecs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
