"""``ovtasks train-wspn``: train the weakly-supervised proposal network on clean shards (patent eq. 5).

Image-level labels come from the captions (lexicon candidates), restricted to the vocabulary's base
categories by default, as in the patent (the WSPN is trained on base image-labels and proposes boxes
for any object). Proposals are selective-search boxes, computed once per image.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ovtasks import __version__
from ovtasks.pseudolabel.candidates import LexiconExtractor, Vocabulary
from ovtasks.core.config import Settings
from ovtasks.data.clean import chunks, iter_clean
from ovtasks.models.hub import publish_model
from ovtasks.models.wspn import WSPN, WSPNConfig, save_wspn, wspn_loss
from ovtasks.models.preprocess import wspn_input
from ovtasks.pseudolabel.maskfree.proposals import SelectiveSearch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WspnTrainConfig:
    steps: int = 600
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    classes: str = "base"  # "base" | "all"
    max_proposals: int = 300  # per image per step (random subset)
    seed: int = 0
    max_images: int | None = None


@dataclass
class TrainedWspn:
    model_uri: str
    metrics: dict
    history: list[dict]


def _pad_batch(images: list[np.ndarray]) -> list[np.ndarray]:
    h = max(i.shape[0] for i in images)
    w = max(i.shape[1] for i in images)
    out = []
    for im in images:
        canvas = np.zeros((h, w, 3), np.uint8)
        canvas[: im.shape[0], : im.shape[1]] = im
        out.append(canvas)
    return out


def train_wspn(src_uri: str, out_uri: str, settings: Settings, cfg: WspnTrainConfig = WspnTrainConfig(),
               progress: Callable[[int, dict], None] | None = None) -> TrainedWspn:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    vocab = Vocabulary.load(settings.candidates.vocabulary)
    classes = vocab.names("base") if cfg.classes == "base" else vocab.names()
    cls_index = {n: i for i, n in enumerate(classes)}
    extractor = LexiconExtractor(vocab)
    images, labels, proposals = [], [], []
    search = SelectiveSearch()  # every core, in chunks (the images are all kept for training anyway)
    t0 = time.perf_counter()
    for chunk in chunks(iter_clean(src_uri, settings, cfg.max_images), 64):
        for s, boxes in zip(chunk, search.propose([s.image for s in chunk])):
            if len(boxes) == 0:
                continue
            y = np.zeros(len(classes), np.float32)
            for c in extractor.extract([s.caption])[0]:
                if c.name in cls_index:
                    y[cls_index[c.name]] = 1
            images.append(s.image)
            labels.append(y)
            proposals.append(torch.from_numpy(boxes))
    if not images:
        raise ValueError(f"no clean samples with proposals under {src_uri}")
    ss_seconds = time.perf_counter() - t0
    model = WSPN(WSPNConfig(num_classes=len(classes), class_names=tuple(classes))).to(settings.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    history = []
    model.train()
    t1 = time.perf_counter()
    for step in range(cfg.steps):
        idx = rng.choice(len(images), size=min(cfg.batch_size, len(images)), replace=False)
        batch = _pad_batch([images[i] for i in idx])
        flip = rng.random() < 0.5
        props = []
        for i in idx:
            p = proposals[i]
            if len(p) > cfg.max_proposals:
                p = p[torch.from_numpy(rng.choice(len(p), cfg.max_proposals, replace=False))]
            props.append(p.to(settings.device))
        x = wspn_input(batch, settings.device)
        if flip:  # horizontal flip of images and boxes
            wdt = x.shape[-1]
            x = x.flip(-1)
            props = [torch.stack([wdt - p[:, 2], p[:, 1], wdt - p[:, 0], p[:, 3]], 1) for p in props]
        y = torch.from_numpy(np.stack([labels[i] for i in idx])).to(settings.device)
        out = model(x, props)
        losses = wspn_loss(out, props, y)
        loss = losses["loss_cls"] + losses["loss_reg"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == cfg.steps - 1:
            rec = {"step": step, **{k: round(v.item(), 4) for k, v in losses.items()}, "seconds": round(time.perf_counter() - t1, 1)}
            history.append(rec)
            log.info("train-wspn", extra=rec)
            if progress:
                progress(step, rec)
    model.eval()
    with torch.no_grad():  # image-level classification accuracy on the training labels (a sanity check)
        correct = total = 0
        for i in range(0, len(images), 16):
            chunk = list(range(i, min(i + 16, len(images))))
            out = model(wspn_input(_pad_batch([images[j] for j in chunk]), settings.device), [proposals[j].to(settings.device) for j in chunk])
            p = torch.stack([o["p"] for o in out]).cpu().numpy()
            y = np.stack([labels[j] for j in chunk])
            correct += int(((p > 0.5) == (y > 0.5)).sum())
            total += y.size
    metrics = {"images": len(images), "classes": len(classes), "label_accuracy": round(correct / total, 4),
               "selective_search_seconds": round(ss_seconds, 1), "train_seconds": round(time.perf_counter() - t1, 1),
               "mean_proposals": round(float(np.mean([len(p) for p in proposals])), 1)}
    with tempfile.TemporaryDirectory(prefix="ovtasks-wspn-") as d:
        path = Path(d) / "wspn.pt"
        save_wspn(model.cpu(), path, {"trained_by": f"ovtasks {__version__} train-wspn", "config": asdict(cfg),
                                     "metrics": metrics, "source": src_uri, "history": history})
        uri = publish_model(d, out_uri, settings.s3)
    return TrainedWspn(uri, metrics, history)
