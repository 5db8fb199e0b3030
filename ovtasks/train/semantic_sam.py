"""``ovtasks train --model semantic-sam``: Semantic-SAM (the thesis, §2.3) on SA-1B-format masks and the
GX-validated pseudo-labels, mixed 1:4 in every batch.

* SA-1B samples (masks without names): each mask's box (jittered as in SAM's training) is the prompt;
  SAM's supervision — focal x20 + dice on the single-output mask and on the best multimask output, MSE
  of the predicted IoU.
* Generated samples (pseudo-labels with names): each annotation's box is the prompt; the semantic
  tokens are trained contrastively across the batch against the names present in it, the score token
  to predict the resulting cosine similarity. Their masks are not supervised (they came from a mask
  generator; SA-1B keeps SAM's mask quality).

The tiny default (random SAM, 128 px, 2-layer ViT) trains on the CPU for the demo; ``sam_model`` takes a
pretrained SAM by HF id, directory or model-store URI for a GPU (``freeze_image_encoder`` then keeps
its features and trains the decoder, tokens and heads).

Output directory: ``model.safetensors`` + ``sam_config.json`` (:func:`ovtasks.models.semantic_sam.load`),
``ovtasks_model.json`` (``architecture: semantic-sam``), ``text_embeddings.npy``, ``history.json``,
``loss_curve.png``; ``checkpoint-train.pt`` while a run is incomplete (resumed with weights_only).

:func:`predict` labels box prompts with any vocabulary; :func:`evaluate_semantic_sam` scores it on the
synthetic GT with the GT boxes as prompts (SAM's box-prompted protocol: it measures masks and names,
not detection, so its numbers are not comparable with the OV Mask R-CNN's).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ovtasks import __version__
from ovtasks.core.config import Settings
from ovtasks.data.groundtruth import boxes_xyxy
from ovtasks.models.loading import META
from ovtasks.models.semantic_sam import TOKEN_WEIGHT
from ovtasks.report.pictures import loss_curve
from ovtasks.train.data import training_data
from ovtasks.train.engine import checkpoint, optimizer_step, resume, warmup_cosine
from ovtasks.train.ov_maskrcnn import TrainedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SemanticSamConfig:
    steps: int = 200
    batch_size: int = 5  # images per step
    sa1b_share: int = 1  # SA-1B : generated images per batch = sa1b_share : generated_share (the thesis: 1:4)
    generated_share: int = 4
    max_prompts: int = 8  # boxes per image per step
    lr: float = 1e-3
    weight_decay: float = 1e-4
    sam_model: str | None = None  # None: a tiny random SAM (image_size, hidden)
    image_size: int = 128
    hidden: int = 64
    patch_size: int = 8  # the tiny SAM's patch: image_size / patch_size embedding grid, masks at 4x that
    freeze_image_encoder: bool = False
    # SA-1B masks: "bce" (default: the tiny SAM trained here from scratch learns masks with it) or "focal"
    # (x20, SAM's own; here it collapsed to empty masks, mIoU 0.00 vs 0.22 with bce, docs/model-quality.md); + dice
    pixel_loss: str = "bce"
    box_jitter: float = 0.1  # SAM: noise with std 10% of the box side, at most 20 px
    # the box also as SAM's dense mask prompt / SAM 2's high-resolution features (models/semantic_sam.py): on for a
    # SAM trained with them (`ovtasks train-sam --box-mask-prompt --hires`) whatever these say; these add them to
    # a SAM without them (the high-resolution path then starts at zero)
    box_mask_prompt: bool = False
    hires: bool = False
    seed: int = 0
    checkpoint_every: int = 50
    generator: str = "maskfree"
    window_shards: int = 0  # train on the newest N validated shards only (0: all)
    # the caption-pretrained backbone (`ovtasks pretrain-backbone` output with its name heads) attached as the namer:
    # at prediction, each prompt's name is the semantic tokens' probability x the namer's (models/semantic_sam.py
    # namer_prior). It is copied into the model directory (namer/) and not trained here. None: the tokens alone
    namer: str | None = None
    namer_token_weight: float = TOKEN_WEIGHT  # with a namer: the tokens' probabilities enter the product to this power


def _jitter(boxes: np.ndarray, frac: float, rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    if frac <= 0 or not len(boxes):
        return boxes
    side = np.repeat(boxes[:, 2:] - boxes[:, :2], 2, axis=0).reshape(-1, 4)
    noise = np.clip(rng.normal(0, 1, boxes.shape) * frac * side, -20, 20)
    out = boxes + noise.astype(np.float32)
    h, w = hw
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, w)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, h)
    out[:, 2:] = np.maximum(out[:, 2:], out[:, :2] + 1)
    return out


def _lowres_targets(model, masks: np.ndarray, low: int, device) -> torch.Tensor:
    """GT masks (n, H, W) bool → (n, low, low) in the padded input frame, as the decoder's logits are."""
    h, w = masks.shape[1:]
    rh, rw, _ = model.resized(h, w)
    t = F.interpolate(torch.from_numpy(masks).to(device)[:, None].float(), size=(rh, rw), mode="bilinear", align_corners=False)
    t = F.pad(t, (0, model.image_size - rw, 0, model.image_size - rh))
    return (F.interpolate(t, size=(low, low), mode="area")[:, 0] > 0.5).float()


def train_semantic_sam(clean_uri: str, pseudo_uri: str, sa1b_uri: str | None, out_dir: str, settings: Settings,
                       cfg: SemanticSamConfig = SemanticSamConfig(), progress: Callable[[dict], None] | None = None,
                       exclude_ids=(), sa1b_limit: int | None = 2000) -> TrainedModel:
    from ovtasks.models.semantic_sam import build, contrastive_losses, mask_losses, save
    from ovtasks.data.sa1b import iter_sa1b, masks_of

    generated, cats, emb, manifest = training_data(clean_uri, pseudo_uri, settings, cfg.generator, exclude_ids, cfg.window_shards)
    sa_stats: dict = {}
    sa1b = list(iter_sa1b(sa1b_uri, settings, sa1b_limit, sa_stats)) if sa1b_uri else []
    if sa1b_uri and not sa1b:
        raise ValueError(f"no readable SA-1B-format pair under {sa1b_uri} (skipped: {sa_stats.get('skipped')})")
    if not sa1b:
        log.warning("no SA-1B data: the mask decoder gets no mask supervision, only the semantic losses")
    manifest = {**manifest, "sa1b": {"uri": sa1b_uri, **sa_stats}}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = settings.device
    torch.manual_seed(cfg.seed)
    model = build(emb.shape[1], cfg.sam_model, cfg.image_size, cfg.hidden, settings.s3, cfg.patch_size, cfg.hires,
                  cfg.box_mask_prompt).to(device)
    if cfg.freeze_image_encoder:
        model.sam.vision_encoder.requires_grad_(False)
    text = torch.from_numpy(np.asarray(emb, np.float32)).to(device)
    cat_index = {c["id"]: i for i, c in enumerate(cats)}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(min(50, max(1, cfg.steps // 10)), cfg.steps))
    key, ckpt, hist_path = json.dumps(asdict(cfg), sort_keys=True), out / "checkpoint-train.pt", out / "history-train.json"
    data_sha = manifest["sha256"] + f":sa1b={sa_stats.get('images', 0)}"
    start, history = resume(ckpt, hist_path, model, opt, sched, key, data_sha, device) if ckpt.exists() else (0, [])
    n_sa = 0 if not sa1b else max(1, round(cfg.batch_size * cfg.sa1b_share / (cfg.sa1b_share + cfg.generated_share)))
    n_gen = max(1, cfg.batch_size - n_sa)
    model.train()
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        rng = np.random.default_rng([cfg.seed, step])  # a resumed run repeats the uninterrupted one
        torch.manual_seed(cfg.seed * 1_000_003 + step)
        batch = [("sa1b", sa1b[i]) for i in rng.choice(len(sa1b), size=min(n_sa, len(sa1b)), replace=False)] if n_sa else []
        batch += [("gen", generated[i]) for i in rng.choice(len(generated), size=min(n_gen, len(generated)), replace=False)]
        pixels = torch.stack([model.pixels(im, device) for _, (im, _) in batch])
        embeddings = model.embed(pixels)
        sa_losses, sem, score, labels = [], [], [], []
        for k, (kind, (image, anns)) in enumerate(batch):
            if kind == "gen":
                anns = [a for a in anns if a["category_id"] in cat_index]
            if not anns:
                continue
            pick = rng.choice(len(anns), size=min(cfg.max_prompts, len(anns)), replace=False)
            anns = [anns[i] for i in sorted(pick)]
            boxes = boxes_xyxy(anns)
            if kind == "sa1b":
                boxes = _jitter(boxes, cfg.box_jitter, rng, image.shape[:2])
            scale = model.resized(*image.shape[:2])[2]
            d = model.decode(embeddings[k: k + 1], torch.from_numpy(boxes * scale).to(device))
            if kind == "sa1b":
                sa_losses.append(mask_losses(d, _lowres_targets(model, masks_of(anns), d.masks.shape[-1], device), pixel_loss=cfg.pixel_loss))
            else:
                sem.append(d.semantic)
                score.append(d.score)
                labels += [cat_index[a["category_id"]] for a in anns]
        losses = {}
        if sa_losses:
            losses = {name: torch.stack([x[name] for x in sa_losses]).mean() for name in sa_losses[0]}
        if sem:
            losses.update(contrastive_losses(torch.cat(sem), torch.cat(score), torch.tensor(labels, device=device), text, model.scale()))
        if not losses:
            continue
        rec = {"step": step, **optimizer_step(losses, opt, sched, params, 1.0, f"step {step}", t0, lr_digits=7)}
        history.append(rec)
        if progress and (step % 10 == 0 or step == cfg.steps - 1):
            progress(rec)
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            checkpoint(ckpt, hist_path, model, opt, sched, step + 1, key, data_sha, history)
    if cfg.namer:
        from ovtasks.models.hub import resolve_model
        from ovtasks.models.name_cam import NameCam

        model.namer = NameCam.load(resolve_model(cfg.namer, settings.s3), device)
        model.token_weight = cfg.namer_token_weight
    save(model, out)
    np.save(out / "text_embeddings.npy", emb)
    last = history[-10:]
    metrics = {"steps": cfg.steps, "final_loss": float(np.mean([h["loss"] for h in last])) if last else None,
               "images": manifest["images"], "annotations": manifest["annotations"], "categories": len(cats),
               "sa1b_images": sa_stats.get("images", 0), **({"namer": model.namer.origin} if model.namer else {})}
    meta = {"architecture": "semantic-sam", "embed_dim": int(emb.shape[1]), "config": asdict(cfg), "categories": cats,
            "data_manifest": manifest, "metrics": metrics, "code_version": __version__}
    (out / META).write_text(json.dumps(meta, indent=2, default=str))
    (out / "history.json").write_text(json.dumps(history))
    loss_curve(history, out / "loss_curve.png", "Semantic-SAM: SA-1B masks + pseudo-label names (1:4)")
    ckpt.unlink(missing_ok=True)
    hist_path.unlink(missing_ok=True)
    return TrainedModel(str(out), metrics, history, manifest)
