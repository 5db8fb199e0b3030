"""``ovtasks train-sam``: pretrain a small Segment Anything model on SA-1B-format masks (no names).

Semantic-SAM starts from SAM, and SAM's masks come from its SA-1B training. No SAM weights can be
downloaded here, and the few hundred Semantic-SAM steps of a demo cannot teach a random SAM to segment
(docs/model-quality.md, section 4). This command does SAM's own stage on SA-1B-format tars: box prompts
(each mask's box, jittered as in SAM's training) and SAM's mask supervision (per-pixel loss + dice on the
single-output mask and on the best of the three multimask outputs, MSE of the predicted IoU). The
prompts of a whole batch of images are decoded in one call (one image embedding per box), so a GPU
trains thousands of steps in minutes.

The result is a plain ``transformers`` ``SamModel`` directory (``model.safetensors``, ``config.json``,
``preprocessor_config.json``) that ``ovtasks train --model semantic-sam --sam-model DIR`` and any
``SamModel.from_pretrained`` load like Meta's weights, plus ``ovtasks_sam.json``: the exact command,
the configuration, the training time and the held-out metrics (box-prompted mask IoU on SA-1B-format
images kept out of training).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ovtasks import __version__
from ovtasks.core.config import Settings
from ovtasks.data.groundtruth import boxes_xyxy
from ovtasks.models.hub import publish_model
from ovtasks.models.semantic_sam import SAM_META as META_FILE
from ovtasks.train.engine import TrainedCheckpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamTrainConfig:
    steps: int = 2000
    batch_size: int = 8  # images per step
    max_prompts: int = 16  # boxes per image per step
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    image_size: int = 128
    hidden: int = 64
    patch_size: int = 8
    layers: int = 2
    heads: int = 2
    pixel_loss: str = "bce"  # "bce" or "focal" (x20, SAM's own; collapses to empty masks from scratch here)
    box_jitter: float = 0.1
    grad_clip: float = 1.0  # max gradient norm (0: no clipping)
    # SAM 2's high-resolution features in the mask decoder's upscaling, from a conv stem on the pixels
    # (models/semantic_sam.py HiResFeatures), saved beside the SamModel as hires.safetensors
    hires: bool = False
    # the box prompt also enters as SAM's dense mask prompt (the share of each cell the box covers)
    box_mask_prompt: bool = False
    holdout: int = 128  # images kept out of training for the metrics
    # wall-clock budget (None: none). The LR schedule follows max(step / steps, elapsed / max_seconds), so a run
    # cut short by the budget still warms up and anneals; the steps it did are in the metrics
    max_seconds: float | None = None
    seed: int = 0
    max_images: int | None = None


TrainedSam = TrainedCheckpoint


def _prepare(model, pairs) -> tuple[list[torch.Tensor], list[np.ndarray], list[torch.Tensor]]:
    """Per image: SAM's input pixels (fp16, CPU), the prompts' boxes in the padded input frame, and the
    masks at the decoder's output resolution (bool, CPU)."""
    from ovtasks.data.sa1b import masks_of
    from ovtasks.train.semantic_sam import _lowres_targets

    low = 4 * model.image_size // model.sam.config.vision_config.patch_size
    pixels, boxes, targets = [], [], []
    for image, anns in pairs:
        scale = model.resized(*image.shape[:2])[2]
        pixels.append(model.pixels(image, "cpu").to(torch.float16))
        boxes.append((boxes_xyxy(anns) * scale).astype(np.float32))
        targets.append(_lowres_targets(model, masks_of(anns), low, "cpu").bool())
    return pixels, boxes, targets


@torch.no_grad()
def evaluate_sam(model, pairs, device: str, chunk: int = 16) -> dict:
    """Box-prompted masks on held-out images, at the image's own resolution (the low-resolution logits
    upsampled as :func:`ovtasks.models.semantic_sam.predict` does): mean IoU with the GT mask, the share of
    prompts with IoU >= 0.5 and >= 0.75, and the share of empty predictions."""
    from ovtasks.data.sa1b import masks_of
    from ovtasks.models.semantic_sam import image_logits

    model.eval()
    ious = []
    empty = 0
    for i0 in range(0, len(pairs), chunk):
        part = pairs[i0:i0 + chunk]
        emb = model.embed(torch.stack([model.pixels(im, device) for im, _ in part]))
        for k, (image, anns) in enumerate(part):
            h, w = image.shape[:2]
            scale = model.resized(h, w)[2]
            d = model.decode(emb[k:k + 1], torch.from_numpy(boxes_xyxy(anns) * scale).to(device), extra=False)
            pred = (image_logits(model, d.masks[:, :1], h, w)[:, 0] > 0).cpu().numpy()
            gt = masks_of(anns).astype(bool)
            inter = (pred & gt).reshape(len(gt), -1).sum(1)
            union = (pred | gt).reshape(len(gt), -1).sum(1)
            ious += (inter / np.maximum(union, 1)).tolist()
            empty += int((pred.reshape(len(gt), -1).sum(1) == 0).sum())
    ious = np.asarray(ious, np.float64)
    n = max(1, len(ious))
    return {"prompts": int(len(ious)), "miou": round(float(ious.mean()) if len(ious) else 0.0, 4),
            "iou50": round(float((ious >= 0.5).sum() / n), 4), "iou75": round(float((ious >= 0.75).sum() / n), 4),
            "empty": round(empty / n, 4)}


def train_sam(sa1b_uri: str, out_uri: str, settings: Settings, cfg: SamTrainConfig = SamTrainConfig(),
              progress: Callable[[int, dict], None] | None = None, command: str | None = None,
              log_every: int = 50) -> TrainedSam:
    """Train a tiny random SAM on every SA-1B-format pair under ``sa1b_uri`` (the last ``cfg.holdout``
    pairs are held out for the metrics); save it to ``out_uri`` (directory or store URI)."""
    from transformers import SamModel

    from ovtasks.data.sa1b import iter_sa1b
    from ovtasks.models.semantic_sam import HIRES_FILE, HiResFeatures, SemanticSam, mask_losses, sam_config
    from ovtasks.train.semantic_sam import _jitter

    if cfg.pixel_loss not in ("bce", "focal"):
        raise ValueError(f"unknown pixel loss {cfg.pixel_loss!r}; use bce or focal")
    torch.manual_seed(cfg.seed)
    device = settings.device
    stats: dict = {}
    t_load = time.perf_counter()
    pairs = list(iter_sa1b(sa1b_uri, settings, cfg.max_images, stats))
    if len(pairs) <= cfg.holdout:
        raise ValueError(f"{len(pairs)} readable SA-1B-format pairs under {sa1b_uri} (skipped: {stats.get('skipped')}); "
                         f"need more than the {cfg.holdout} held out")
    train_pairs, held = pairs[:-cfg.holdout] if cfg.holdout else pairs, pairs[-cfg.holdout:] if cfg.holdout else []
    # embed_dim only sizes the (unused here) semantic head: SemanticSam is used for its SAM preprocessing/decoder
    model = SemanticSam(SamModel(sam_config(cfg.image_size, cfg.hidden, cfg.patch_size, cfg.layers, cfg.heads)), 8,
                        hires=HiResFeatures(cfg.hidden) if cfg.hires else None, box_mask_prompt=cfg.box_mask_prompt).to(device)
    pixels, boxes, targets = _prepare(model, train_pairs)
    load_s = time.perf_counter() - t_load
    params = list(model.sam.parameters()) + (list(model.hires.parameters()) if model.hires is not None else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = min(cfg.warmup, max(1, cfg.steps // 10))
    history: list[dict] = []
    model.train()
    t0 = time.perf_counter()
    done = 0
    for step in range(cfg.steps):
        elapsed = time.perf_counter() - t0
        if cfg.max_seconds is not None and elapsed >= cfg.max_seconds:
            break
        progress_frac = max(step / cfg.steps, elapsed / cfg.max_seconds if cfg.max_seconds else 0.0)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(progress_frac, 1.0)))
        rng = np.random.default_rng([cfg.seed, step])
        idx = rng.choice(len(train_pairs), size=min(cfg.batch_size, len(train_pairs)), replace=False)
        owner, bx, tg = [], [], []
        for j, i in enumerate(idx):
            n = len(boxes[i])
            pick = np.sort(rng.choice(n, size=min(cfg.max_prompts, n), replace=False))
            bx.append(_jitter(boxes[i][pick], cfg.box_jitter, rng, (model.image_size, model.image_size)))
            tg.append(targets[i][torch.from_numpy(pick)])
            owner += [j] * len(pick)
        x = torch.stack([pixels[i] for i in idx]).to(device, torch.float32)
        emb = model.embed(x)[torch.tensor(owner, device=device)]
        d = model.decode(emb, torch.from_numpy(np.concatenate(bx)).to(device), extra=False)
        losses = mask_losses(d, torch.cat(tg).to(device).float(), pixel_loss=cfg.pixel_loss)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train-sam: non-finite loss at step {step}: { {k: float(v) for k, v in losses.items()} }")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        done = step + 1
        if step % log_every == 0 or step == cfg.steps - 1:
            rec = {"step": step, "lr": round(opt.param_groups[0]["lr"], 7), "loss": round(float(loss.detach()), 4), **{k: round(float(v.detach()), 4) for k, v in losses.items()},
                   "prompts": len(owner), "seconds": round(time.perf_counter() - t0, 1)}
            history.append(rec)
            if progress:
                progress(step, rec)
    train_s = time.perf_counter() - t0
    metrics = {"train_images": len(train_pairs), "heldout_images": len(held), "steps": done,
               "train_seconds": round(train_s, 1), "load_seconds": round(load_s, 1), "device": str(device),
               **({"heldout_" + k: v for k, v in evaluate_sam(model, held, device).items()} if held else {})}
    meta = {"architecture": "sam", "config": asdict(cfg), "metrics": metrics, "source": sa1b_uri,
            "skipped": stats.get("skipped", {}), "code_version": __version__, **({"command": command} if command else {})}
    with tempfile.TemporaryDirectory(prefix="ovtasks-sam-out-") as d:
        model.sam.save_pretrained(d, safe_serialization=True)
        if model.hires is not None:
            from safetensors.torch import save_model

            save_model(model.hires, str(Path(d) / HIRES_FILE))
        (Path(d) / "preprocessor_config.json").write_text(json.dumps(
            {"image_processor_type": "SamImageProcessor", "image_mean": list(model.mean), "image_std": list(model.std),
             "size": {"longest_edge": model.image_size}, "pad_size": {"height": model.image_size, "width": model.image_size}}, indent=1))
        (Path(d) / META_FILE).write_text(json.dumps(meta, indent=1))
        (Path(d) / "history.json").write_text(json.dumps(history))
        uri = publish_model(d, out_uri, settings.s3)
    return TrainedSam(uri, metrics, history)
