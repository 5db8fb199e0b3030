"""The pictures a run leaves behind: the ingest overview, the pseudo-label sheet, loss curves."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Collection, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ovtasks.core.config import Settings
from ovtasks.core.shards import iter_tar_samples
from ovtasks.core.storage import open_store
from ovtasks.report.draw import font, heat, overlay_instances, tile


def ingest_overview(synth_uri: str, ingest_uri: str, settings: Settings, path: Path, n_kept: int = 12, n_rejected: int = 6) -> Path:
    """A picture: kept samples with their GT masks, then quarantined samples with their reasons."""
    src, out = open_store(synth_uri, settings.s3), open_store(ingest_uri, settings.s3)
    gt = json.loads(src.get_bytes("gt/instances.json"))
    names = {c["id"]: c["name"] for c in gt["categories"]}
    anns: dict[int, list] = {}
    for a in gt["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    shard_keys = sorted(k for k in out.list("shards") if k.endswith(".tar"))
    tiles = []
    with out.open_read(shard_keys[0]) as fh:
        for raw in iter_tar_samples(fh, {}, default_limit=1 << 30):
            meta = json.loads(raw.members["json"])
            img = Image.open(io.BytesIO(raw.members["jpg"])).convert("RGB")
            tiles.append(tile(overlay_instances(img, anns.get(int(raw.key), []), names), meta["caption"], f"kept {raw.key}", (20, 120, 40), 192))
            if len(tiles) >= n_kept:
                break
    rejected = []
    for qkey in sorted(k for k in out.list("quarantine") if k.endswith(".tar")):
        with out.open_read(qkey) as fh:
            for raw in iter_tar_samples(fh, {}, default_limit=1 << 30):
                reason = json.loads(raw.members["reason.json"])
                if "jpg" not in raw.members or reason["reason"] in {r for r, _ in rejected}:
                    continue
                try:
                    img = Image.open(io.BytesIO(raw.members["jpg"])).convert("RGB")
                except Exception:
                    continue
                caption = raw.members.get("txt", b"").decode("utf-8", "replace")
                rejected.append((reason["reason"], tile(img, caption, f"quarantined: {reason['reason']}", (190, 20, 20), 192)))
                if len(rejected) >= n_rejected:
                    break
        if len(rejected) >= n_rejected:
            break
    tiles += [t for _, t in rejected]
    cols = 6
    rows = (len(tiles) + cols - 1) // cols
    tw, th = tiles[0].size
    sheet = Image.new("RGB", (cols * (tw + 6) + 6, rows * (th + 6) + 34), (255, 255, 255))
    ImageDraw.Draw(sheet).text((8, 8), "ovtasks ingest: kept samples with ground-truth masks, then one quarantined sample per reason", fill=(0, 0, 0), font=font(16))
    for i, t in enumerate(tiles):
        sheet.paste(t, (6 + (i % cols) * (tw + 6), 34 + (i // cols) * (th + 6)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


MASK_STAGES = {"wss": "WSS mask (eq. 7)", "sam": "SAM mask (box prompt)"}  # maskfree.mask_stage -> column title


def overlay_grid(samples, results, path: Path, n: int = 8, novel: Collection[str] = (), mask_stage: str = "wss") -> Path:
    """Rows of (image + caption name, activation map, pseudo box, mask) for the first ``n`` masks; names in
    ``novel`` are labelled novel, the others base; ``mask_stage`` (``maskfree.mask_stage``) titles the last column."""
    rows = [r for r in results if r.mask is not None][:n]
    cell, pad = 160, 4
    sheet = Image.new("RGB", (4 * (cell + pad) + pad, len(rows) * (cell + 18 + pad) + 30), "white")
    d = ImageDraw.Draw(sheet)
    d.text((pad, 6), f"Mask-free OVIS pseudo-labels: image | activation map (G rounds) | pseudo box (eq. 6) | {MASK_STAGES[mask_stage]}",
           fill="black", font=font(13))
    for k, r in enumerate(rows):
        s = samples[r.image_index]
        img = s.image
        y0 = 30 + k * (cell + 18 + pad)
        heated = (img * 0.4 + heat(r.activation.soft) * 0.6).astype(np.uint8)
        boxed = Image.fromarray(img.copy())
        bd = ImageDraw.Draw(boxed)
        for b in (r.proposals if r.proposals is not None else [])[:50]:
            bd.rectangle(list(map(float, b)), outline=(160, 160, 160))
        bd.rectangle(list(map(float, r.box)), outline=(255, 40, 40), width=2)
        masked = img.astype(np.float32)
        masked[r.mask] = masked[r.mask] * 0.4 + np.array([40, 220, 60]) * 0.6
        tiles = [Image.fromarray(img), Image.fromarray(heated), boxed, Image.fromarray(masked.astype(np.uint8))]
        for j, t in enumerate(tiles):
            t = t.copy()
            t.thumbnail((cell, cell))
            sheet.paste(t, (pad + j * (cell + pad), y0))
        d.text((pad, y0 + cell + 2), f"'{r.candidate.name}' ({'novel' if r.candidate.name in novel else 'base'}) itm={r.score:.2f}  {s.caption[:60]}",
               fill=(30, 30, 30), font=font(11))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def loss_curve(history: Sequence[dict], path: Path, title: str = "OV Mask R-CNN training on pseudo-labels") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    steps = [h["step"] for h in history]
    keys = ["loss"] + sorted({k for h in history for k in h if k.startswith("loss_")})
    for key in keys:
        vals = np.array([h.get(key, np.nan) for h in history], float)
        if len(vals):
            k = max(1, len(vals) // 30)
            ax.plot(steps[k - 1:], np.convolve(vals, np.ones(k) / k, mode="valid"), label=key, lw=1.5 if key == "loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (moving mean)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
