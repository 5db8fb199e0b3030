"""The training engine every trainer uses: the warmup-cosine schedule, one optimizer step (non-finite guard,
clipping, the history record), checkpoint and resume of a killed run."""

from __future__ import annotations

import json
import os
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)


@dataclass
class TrainedCheckpoint:
    """What a checkpoint-making command returns: where the model is, its metrics, its training history."""

    model_uri: str
    metrics: dict
    history: list[dict] = field(default_factory=list)


def warmup_cosine(warmup: int, steps: int) -> Callable[[int], float]:
    """The LR factor at scheduler step ``s``: linear warmup over ``warmup`` steps times a cosine decay to 0 at ``steps``."""
    steps = max(steps, 1)  # zero steps (a run that only evaluates) never calls it past the first
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))


def make_optimizer(params, cfg, lr: float) -> torch.optim.Optimizer:
    """``cfg.optimizer`` ("adamw" or "sgd", with ``cfg.momentum``) with ``cfg.weight_decay`` at ``lr``."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use sgd or adamw")


def optimizer_step(losses: dict, opt, sched, params, clip: float, where: str, t0: float, lr_digits: int = 6) -> dict:
    """Sum the losses, refuse a non-finite total, step with gradient clipping; the history record's numbers."""
    total = sum(losses.values())
    if not torch.isfinite(total):
        raise FloatingPointError(f"non-finite loss at {where}: {({k: float(v) for k, v in losses.items()})}")
    opt.zero_grad()
    total.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    sched.step()
    return {"loss": round(total.item(), 5), **{k: round(v.item(), 5) for k, v in losses.items()},
            "lr": round(sched.get_last_lr()[0], lr_digits), "seconds": round(time.perf_counter() - t0, 1)}


def resume(ckpt: Path, hist_path: Path, model, opt, sched, key: str, data_sha: str, device: str, step0: int = 0) -> tuple[int, list]:
    """(first step to run, history so far) from a checkpoint written by :func:`checkpoint` for the same
    config and data; (0, []) otherwise. ``weights_only``: a checkpoint never unpickles arbitrary objects."""
    state = torch.load(ckpt, map_location=device, weights_only=True)
    if state.get("config") != key or state.get("data") != data_sha:
        log.warning("checkpoint ignored: other config or data", extra={"checkpoint": str(ckpt)})
        return 0, []
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    start = int(state["step"])
    history = read_history(hist_path)
    log.info("resumed training", extra={"step": start, "checkpoint": str(ckpt)})
    return start, [h for h in history if h["step"] < step0 + start]


def checkpoint(ckpt: Path, hist_path: Path, model, opt, sched, step: int, key: str, data_sha: str, history: list) -> None:
    """Weights, optimizer, scheduler and step, written to a temporary file and renamed (never half-written)."""
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "step": step, "config": key, "data": data_sha}, tmp)
    write_json_atomic(hist_path, history)
    tmp.replace(ckpt)


def write_json_atomic(path: Path, obj) -> None:
    """``obj`` as JSON at ``path``: written to a temporary file beside it, flushed to disk, then renamed, so a
    full disk or a kill mid-write leaves the previous file (or none), never a truncated one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def read_history(path: Path) -> list:
    """A training history written by :func:`write_json_atomic`; an unreadable one (truncated by a crash of an older
    version, edited by hand) is ignored with a warning: the records are lost, the run goes on."""
    if not path.exists():
        return []
    try:
        history = json.loads(path.read_text())
        if isinstance(history, list) and all(isinstance(h, dict) and isinstance(h.get("step"), int) for h in history):
            return history
        problem = "not a list of step records"
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    log.warning("training history ignored: unreadable", extra={"history": str(path), "problem": problem[:200]})
    return []
