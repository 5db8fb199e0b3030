"""``ovtasks pretrain-backbone``: the OV Mask R-CNN's backbone pretrained on caption names only.

Offline there is no ImageNet checkpoint, and a detector trained from a random backbone on a few hundred
images with noisy pseudo-masks learns boxes before it learns what is in them. This gives it a start that
uses nothing but the captions: the backbone body (``ovtasks.models.ov_maskrcnn.small_backbone``) learns
to classify which vocabulary names an image's caption mentions: at each of its last three stages
(``HEAD_LEVELS``), a global max-pool, a linear layer and a softmax over the vocabulary with every named
object a positive (the ITM stem's stage-1 recipe). No box, mask or point of any kind is used. The input
is what the detector sees: the image scaled to [0, 1] and normalised with the detector's mean and std
(at ``image_size``; the detector's shorter side is 192 px, 128 px costs less than half as much).

Output directory::

    backbone.safetensors     the body's weights (stem, layer1 .. layer4), keys as in ``model.backbone.body``
    heads.safetensors        the per-level name classifiers (``HEAD_LEVELS``; rows in ``vocabulary`` order), for
                             class activation maps (``maskfree.activation=backbone``)
    ovtasks_backbone.json    architecture, the command that made it, config, held-out metrics, vocabulary
    history.json             loss per logged step

:func:`load_backbone` puts those weights into an :class:`~ovtasks.models.ov_maskrcnn.OVMaskRCNN`
(``ovtasks train --backbone-init``, ``TrainConfig.backbone_init``, ``pipeline.ov_maskrcnn_backbone``).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ovtasks import __version__
from ovtasks.core.config import S3Config, Settings
from ovtasks.models.hub import publish_model, resolve_model
from ovtasks.models.name_cam import HEADS, META, WEIGHTS, body_logits, level_logits, make_heads, normalise  # noqa: F401
from ovtasks.models.ov_maskrcnn import IMAGE_MEAN, IMAGE_STD, small_backbone
from ovtasks.pseudolabel.candidates import Vocabulary
from ovtasks.train.data import flip_turn, name_targets, named_images, names_softmax_loss
from ovtasks.train.engine import TrainedCheckpoint, warmup_cosine

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class BackboneConfig:
    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    image_size: int = 128  # the detector's shorter side is 192 (TrainConfig.min_size); 128 costs 0.44x as much
    holdout: int = 400  # last images of the source, kept out of training for the metrics
    max_images: int | None = None
    seed: int = 0
    init: str | None = None  # continue from a pretrained backbone with its heads (directory or store URI)


def _average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Image-level AP of one class (mean precision at each positive, ranked by score); nan without positives."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=float)
    pos = labels.sum()
    if pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = labels[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / pos)


@torch.no_grad()
def holdout_metrics(body, head, images: torch.Tensor, y: torch.Tensor, device: str) -> dict:
    """top-1 (the best-scoring name is one the caption mentions) and image-level mAP over the names."""
    body.eval()
    out = []
    for i0 in range(0, len(images), 128):
        out.append(body_logits(body, head, normalise(images[i0:i0 + 128].float().to(device))).cpu())
    body.train()
    logits = torch.cat(out)
    top1 = float(y[torch.arange(len(y)), logits.argmax(1)].mean())
    aps = [_average_precision(logits[:, j].numpy(), y[:, j].numpy()) for j in range(y.shape[1])]
    aps = [a for a in aps if a == a]
    return {"holdout_top1": round(top1, 4), "holdout_map": round(float(np.mean(aps)), 4) if aps else None,
            "holdout_images": len(images)}


def pretrain_backbone(src_uri: str, out_uri: str, settings: Settings, cfg: BackboneConfig = BackboneConfig(),
                      progress: Callable[[int, dict], None] | None = None, command: str | None = None) -> TrainedCheckpoint:
    """Train the body on every complete clean shard under ``src_uri``; save to ``out_uri`` (dir or store URI)."""
    from safetensors.torch import save_file

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = settings.device
    vocab_names = Vocabulary.load(settings.candidates.vocabulary).names()
    images, _, names, _ = named_images(src_uri, settings, cfg.image_size, cfg.max_images)
    n = len(images)
    hold = min(cfg.holdout, n // 5)
    train_idx = np.arange(n - hold)
    y = name_targets(names, vocab_names)
    body = small_backbone().body.to(device)
    head = make_heads(len(vocab_names)).to(device)
    origin = None
    if cfg.init:  # a further round with a fresh schedule: the body and heads of an earlier run
        from ovtasks.models.name_cam import NameCam

        start = NameCam.load(cfg.init, device, settings.s3)
        if start.vocabulary != vocab_names:
            raise ValueError(f"--init {cfg.init} was trained on another vocabulary ({len(start.vocabulary)} names)")
        body.load_state_dict(start.body.state_dict())
        head.load_state_dict(start.heads.state_dict())
        was = json.loads((Path(resolve_model(cfg.init, settings.s3)) / META).read_text())
        origin = {"ref": cfg.init, **{k: was[k] for k in ("command", "metrics", "config", "init_from") if k in was}}
    params = list(body.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup, cfg.steps))
    body.train()
    t0, run, history = time.perf_counter(), None, []
    for step in range(cfg.steps):
        idx = torch.from_numpy(rng.choice(train_idx, size=min(cfg.batch_size, len(train_idx)), replace=False))
        target = y[idx].to(device)
        per_level = level_logits(body, head, normalise(flip_turn(images[idx].float(), rng).to(device)))
        loss = sum(names_softmax_loss(lo, target) for lo in per_level.values()) / len(per_level)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
        if step % 50 == 0 or step == cfg.steps - 1:
            rec = {"step": step, "loss": round(run, 4), "seconds": round(time.perf_counter() - t0, 1)}
            history.append(rec)
            log.info("pretrain-backbone", extra=rec)
            if progress:
                progress(step, rec)
    metrics = holdout_metrics(body, head, images[n - hold:], y[n - hold:], device) if hold else {}
    metrics.update(train_images=n - hold, steps=cfg.steps, train_seconds=round(time.perf_counter() - t0, 1))
    meta = {"architecture": "small", "trained_by": f"ovtasks {__version__} pretrain-backbone", "config": asdict(cfg),
            "metrics": metrics, "source": src_uri, "vocabulary": vocab_names, "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD,
            **({"command": command} if command else {}), **({"init_from": origin} if origin else {})}
    with tempfile.TemporaryDirectory(prefix="ovtasks-backbone-") as d:
        save_file({k: v.detach().cpu().contiguous() for k, v in body.state_dict().items()}, str(Path(d) / WEIGHTS))
        save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(Path(d) / HEADS))
        (Path(d) / META).write_text(json.dumps(meta, indent=2))
        (Path(d) / "history.json").write_text(json.dumps(history))
        uri = publish_model(d, out_uri, settings.s3)
    return TrainedCheckpoint(uri, metrics, history)


def load_backbone(model, ref: str, s3: S3Config | None = None) -> dict:
    """Put a pretrained body (``ovtasks pretrain-backbone``'s directory or store URI) into an OV Mask R-CNN;
    returns its ``ovtasks_backbone.json``. Refuses a body of another architecture or with other weights' names."""
    from safetensors.torch import load_file

    path = Path(resolve_model(ref, s3))
    if not (path / META).exists() or not (path / WEIGHTS).exists():
        raise FileNotFoundError(f"{ref} is not a pretrained backbone (no {META} / {WEIGHTS}); make one with "
                                "`ovtasks pretrain-backbone`")
    meta = json.loads((path / META).read_text())
    if meta.get("architecture") != model.backbone_name:
        raise ValueError(f"backbone {ref} is {meta.get('architecture')!r}; the model's backbone is {model.backbone_name!r}")
    model.backbone.body.load_state_dict(load_file(str(path / WEIGHTS)), strict=True)
    return meta
