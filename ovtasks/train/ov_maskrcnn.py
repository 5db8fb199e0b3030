"""``ovtasks train --model ov-maskrcnn``: the open-vocabulary Mask R-CNN on validated pseudo-labels.

Training data: the clean shards' images and the pseudo-label shards that passed the GX gate
(``pseudo/<generator>/validation_report.json``: ``training_shards``; a missing report is an error,
never "train on everything"). Every caption name is a class: the vocabulary is the generator's
``categories.json`` and its text embeddings (``text_embeddings.npy``, same order).

Output directory (a model, loadable without unpickling anything)::

    model.safetensors       weights
    ovtasks_model.json      architecture, vocabulary (ids, names, splits), training config, data manifest hash
    text_embeddings.npy     the vocabulary's text embeddings
    history.json            loss per step;  loss_curve.png  the curves
    checkpoint-<phase>.pt   weights + optimizer + step, written every ``checkpoint_every`` steps and read
                            back with ``torch.load(weights_only=True)`` to resume a killed run (phases:
                            ``train`` on pseudo-labels, then the optional ``finetune`` on base-category GT);
                            gone once the model is written

The loop is :mod:`ovtasks.train.engine`'s; :func:`ovtasks.models.ov_maskrcnn.predict` runs a trained model with any
vocabulary and :func:`ovtasks.evaluate.models.evaluate_model` scores it on COCO GT (generalized and constrained,
base / novel).
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

from ovtasks import __version__
from ovtasks.core.config import Settings
from ovtasks.models.loading import META
from ovtasks.models.ov_maskrcnn import ARCHITECTURE, build_from_config, to_tensor
from ovtasks.report.pictures import loss_curve
from ovtasks.train.data import gt_training_data, training_data
from ovtasks.train.engine import (checkpoint, make_optimizer, optimizer_step, read_history, resume, warmup_cosine,
                                  write_json_atomic)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 4
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-4
    # "adamw" (default: from scratch on CPU-sized data it learns ~10x faster than SGD, see docs/model-quality.md)
    # or "sgd" (torchvision's reference recipe, lr 0.01-0.02, for a pretrained backbone)
    optimizer: str = "adamw"
    backbone: str = ARCHITECTURE["backbone"]
    min_size: int = ARCHITECTURE["min_size"]
    max_size: int = ARCHITECTURE["max_size"]
    background_weight: float = ARCHITECTURE["background_weight"]
    temperature: float = ARCHITECTURE["temperature"]
    seed: int = 0
    checkpoint_every: int = 50
    generator: str = "maskfree"
    window_shards: int = 0  # train on the newest N validated shards only (0: all)
    finetune_steps: int = 0  # then this many steps on base-category GT at lr/10 (needs gt_uri)
    # the backbone body to start from: `ovtasks pretrain-backbone`'s output (directory or store URI), pretrained on
    # caption names only; None: random
    backbone_init: str | None = None
    backbone_lr_scale: float = 1.0  # the pretrained body's learning rate relative to lr (with backbone_init)


@dataclass
class TrainedModel:
    model_dir: str
    metrics: dict
    history: list[dict]
    data_manifest: dict


def build_model(embed_dim: int, cfg: TrainConfig):
    return build_from_config(embed_dim, asdict(cfg))


def train_ov_maskrcnn(clean_uri: str, pseudo_uri: str, out_dir: str, settings: Settings, cfg: TrainConfig = TrainConfig(),
                      progress: Callable[[dict], None] | None = None, gt_uri: str | None = None, exclude_ids=()) -> TrainedModel:
    """Train on the validated pseudo-labels; with ``cfg.finetune_steps`` and ``gt_uri``, then fine-tune on the
    base categories' GT (the patent's optional second stage), never on ``exclude_ids`` nor on novel GT."""
    samples, cats, emb, manifest = training_data(clean_uri, pseudo_uri, settings, cfg.generator, exclude_ids, cfg.window_shards)
    finetune = None
    if cfg.finetune_steps:
        if not gt_uri:
            raise ValueError("finetune_steps needs gt_uri (base-category GT)")
        finetune = gt_training_data(gt_uri, clean_uri, settings, "base", exclude_ids)
        manifest = {**manifest, "finetune": finetune[3]}
    return fit_ov_maskrcnn(samples, cats, emb, manifest, out_dir, settings, cfg, progress, finetune)


def fit_ov_maskrcnn(samples, cats, emb, manifest: dict, out_dir: str, settings: Settings, cfg: TrainConfig = TrainConfig(),
                    progress: Callable[[dict], None] | None = None, finetune=None) -> TrainedModel:
    """Train on ``samples`` [(image, COCO annotations)] whose category ids are ``cats``' (text embeddings ``emb``);
    then ``cfg.finetune_steps`` on ``finetune`` (same form), if given. Resumable phase by phase."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = build_model(emb.shape[1], cfg)
    if cfg.backbone_init:
        from ovtasks.train.backbone import load_backbone

        pre = load_backbone(model, cfg.backbone_init, settings.s3)
        manifest = {**manifest, "backbone_init": {"uri": cfg.backbone_init, "source": pre.get("source"),
                                                  "command": pre.get("command"), "metrics": pre.get("metrics")}}
    model = model.to(settings.device)
    history = _fit_phase(model, samples, cats, emb, manifest["sha256"], out, settings.device, cfg, cfg.steps, "train", progress)
    if finetune is not None and cfg.finetune_steps:
        f_samples, f_cats, f_emb, f_manifest = finetune
        history += _fit_phase(model, f_samples, f_cats, f_emb, f_manifest["sha256"], out, settings.device, cfg, cfg.finetune_steps,
                              "finetune", progress, lr=cfg.lr * 0.1, step0=cfg.steps)
    model.set_vocabulary(torch.from_numpy(emb))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    np.save(out / "text_embeddings.npy", emb)
    last = [h["loss"] for h in history if h.get("phase", "train") == "train"][-10:]
    metrics = {"steps": cfg.steps, "final_loss": float(np.mean(last)) if last else None,
               "images": manifest["images"], "annotations": manifest["annotations"], "categories": len(cats)}
    if finetune is not None and cfg.finetune_steps:
        metrics["finetune_steps"] = cfg.finetune_steps
    meta = {"architecture": "ov-maskrcnn", "embed_dim": int(emb.shape[1]), "config": asdict(cfg), "categories": cats,
            "data_manifest": manifest, "metrics": metrics, "code_version": __version__}
    (out / META).write_text(json.dumps(meta, indent=2))
    (out / "history.json").write_text(json.dumps(history))
    loss_curve(history, out / "loss_curve.png")
    for phase in ("train", "finetune"):  # the finished-phase markers only matter while the run is incomplete
        (out / f"done-{phase}.safetensors").unlink(missing_ok=True)
        (out / f"history-{phase}.json").unlink(missing_ok=True)
    return TrainedModel(str(out), metrics, history, manifest)


def _fit_phase(model, samples, cats, emb, data_sha: str, out: Path, device: str, cfg: TrainConfig, steps: int, phase: str,
               progress, lr: float | None = None, step0: int = 0) -> list[dict]:
    from ovtasks.models.ov_maskrcnn import targets_from_coco

    model.set_vocabulary(torch.from_numpy(emb))
    cat_index = {c["id"]: i for i, c in enumerate(cats)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = params
    if cfg.backbone_init and cfg.backbone_lr_scale != 1.0:
        body = {id(p) for p in model.backbone.body.parameters()}
        groups = [{"params": [p for p in params if id(p) not in body]},
                  {"params": [p for p in params if id(p) in body], "lr": (lr or cfg.lr) * cfg.backbone_lr_scale}]
    opt = make_optimizer(groups, cfg, lr or cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(min(50, max(1, steps // 4)), steps))
    start, history = 0, []
    ckpt, hist_path, key = out / f"checkpoint-{phase}.pt", out / f"history-{phase}.json", json.dumps(asdict(cfg), sort_keys=True)
    done = out / f"done-{phase}.safetensors"
    if done.exists() and hist_path.exists():  # this phase finished before the run was killed
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(done)))
        return read_history(hist_path)
    if ckpt.exists():
        start, history = resume(ckpt, hist_path, model, opt, sched, key, data_sha, device, step0)
    model.train()
    t0 = time.perf_counter()
    for step in range(start, steps):
        # everything random in a step derives from (seed, phase, step): a resumed run repeats the uninterrupted one
        torch.manual_seed(cfg.seed * 1_000_003 + step0 + step)
        pick = np.random.default_rng([cfg.seed, step0 + step]).choice(len(samples), size=min(cfg.batch_size, len(samples)), replace=False)
        batch = [samples[i] for i in pick]
        images = [to_tensor(im).to(device) for im, _ in batch]
        targets = [{k: v.to(device) for k, v in targets_from_coco(anns, cat_index, im.shape[:2]).items()} for im, anns in batch]
        rec = {"step": step0 + step, "phase": phase,
               **optimizer_step(model(images, targets), opt, sched, params, 10.0, f"{phase} step {step}", t0, lr_digits=6)}
        history.append(rec)
        if progress and (step % 10 == 0 or step == steps - 1):
            progress(rec)
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
            checkpoint(ckpt, hist_path, model, opt, sched, step + 1, key, data_sha, history)
    from safetensors.torch import save_file

    write_json_atomic(hist_path, history)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(done))
    ckpt.unlink(missing_ok=True)
    return history
