"""Shards built in memory for the ingest tests: noise images, good samples, tars, parquets, and one ingest run."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ovtasks.core.config import load_settings
from ovtasks.ingest.pipeline import ingest


CAPTION = "a photo of a red ball and a blue box on the kitchen table"


def noise_image(seed: int, size=(120, 100), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (size[1] // 10 + 1, size[0] // 10 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC).convert(mode)


def encode_image(im: Image.Image, fmt="JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def good_sample(seed: int) -> dict[str, bytes]:
    return {"jpg": encode_image(noise_image(seed)), "txt": CAPTION.encode(), "json": json.dumps({"punsafe": 0.01}).encode()}


def tar_of(members: list[tuple[str, bytes]], extra: list[tarfile.TarInfo] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for info in extra:
            t.addfile(info)
    return buf.getvalue()


def flatten(samples: dict[str, dict[str, bytes]]) -> list[tuple[str, bytes]]:
    return [(f"{k}.{ext}", data) for k, members in samples.items() for ext, data in members.items()]


def parquet_of(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def run_ingest(tmp_path: Path, files: dict[str, bytes], **env) -> tuple[dict, dict[str, str], Path]:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    settings = load_settings(env={f"OVTASKS_INGEST__{k.upper()}": str(v) for k, v in env.items()})
    report = ingest(str(src), str(out), settings, workers=1).report
    assert report["seen"] == report["kept"] + sum(report["quarantined"].values())
    for entry in report["shards"]:
        assert entry["seen"] == entry["kept"] + sum(entry["quarantined"].values())
    reasons = {}
    for p in sorted((out / "quarantine").glob("*.jsonl")):
        for line in p.read_text().splitlines():
            e = json.loads(line)
            reasons[e["key"]] = e["reason"]
    return report, reasons, out
