"""Stage 4 of Mask-free OVIS: instance masks inside pseudo boxes (patent eq. 7).

For each pseudo box the image is cropped and resized to ``S x S``; Z foreground and Z background
points are sampled from the most and least activated pixels of the activation map inside the box;
a tiny CNN per box (:mod:`ovtasks.models.wss`) is trained on those points only (cross-entropy, SGD)
and then predicts the whole crop, which is pasted back as the instance mask.

:func:`segment_boxes` trains all boxes at once on the points' neighbourhoods;
:func:`segment_boxes_sequential` is the straightforward reference (one box after another, the whole
crop through the network at every step). Both give the same masks from the same seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ovtasks.models.wss import PAD, BatchedWSS, gather_patches, init_params

TOP_FRACTION = 0.2  # default: foreground points come from the top 20% of activation inside the box, background from the bottom 20%


@dataclass(frozen=True)
class WssJob:
    image: np.ndarray  # (H, W, 3) uint8
    box: tuple[float, float, float, float]  # xyxy pixels
    activation: np.ndarray  # (H, W) float in [0, 1]
    seed: int


@dataclass(frozen=True)
class WssInputs:
    crops: torch.Tensor  # (B, 3, S + 4, S + 4) normalised, zero-padded
    points: torch.Tensor  # (B, 2Z, 2) long (row, col) in the unpadded crop
    targets: torch.Tensor  # (B, 2Z) float 1 = foreground, 0 = background
    boxes: list[tuple[int, int, int, int]]  # integer xyxy actually cropped


def box_prior(box, hw: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` float32: a tent over xyxy ``box``, 1 at its centre falling linearly to 0 at its edges, 0 outside."""
    h, w = hw
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    hx, hy = max((x2 - x1) / 2, 0.5), max((y2 - y1) / 2, 0.5)
    tx = np.clip(1.0 - np.abs(np.arange(w, dtype=np.float32) + 0.5 - cx) / hx, 0.0, 1.0)
    ty = np.clip(1.0 - np.abs(np.arange(h, dtype=np.float32) + 0.5 - cy) / hy, 0.0, 1.0)
    return np.outer(ty, tx).astype(np.float32)


def point_map(source: str, soft: np.ndarray, box) -> np.ndarray:
    """The map WSS draws its points from (``maskfree.wss_point_map``): ``map`` the activation (patent eq. 7),
    ``box`` the centre prior of ``box`` alone, ``map_box`` their product."""
    if source == "map":
        return soft
    prior = box_prior(box, soft.shape[:2])
    if source == "box":
        return prior
    if source == "map_box":
        return (soft * prior).astype(np.float32)
    raise ValueError(f"unknown wss_point_map {source!r} (map, box or map_box)")


def int_box(box, h: int, w: int) -> tuple[int, int, int, int]:
    """Pixel-aligned box inside the image, at least 1 px wide and tall."""
    x1, y1, x2, y2 = box
    x1, y1 = int(np.clip(np.floor(x1), 0, w - 1)), int(np.clip(np.floor(y1), 0, h - 1))
    x2, y2 = int(np.clip(np.ceil(x2), x1 + 1, w)), int(np.clip(np.ceil(y2), y1 + 1, h))
    return x1, y1, x2, y2


def prepare(jobs: Sequence[WssJob], size: int, points: int, device: str = "cpu", fg_fraction: float = TOP_FRACTION,
            bg_fraction: float = TOP_FRACTION) -> WssInputs:
    crops, pts, tgts, boxes = [], [], [], []
    for job in jobs:
        h, w = job.image.shape[:2]
        x1, y1, x2, y2 = int_box(job.box, h, w)
        boxes.append((x1, y1, x2, y2))
        crop = torch.from_numpy(np.ascontiguousarray(job.image[y1:y2, x1:x2])).permute(2, 0, 1)[None].float()
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0]
        crop = (crop - crop.mean((1, 2), keepdim=True)) / (crop.std((1, 2), keepdim=True) + 1.0)
        crops.append(F.pad(crop, (PAD, PAD, PAD, PAD)))
        act = torch.from_numpy(np.ascontiguousarray(job.activation[y1:y2, x1:x2], dtype=np.float32))[None, None]
        act = F.interpolate(act, size=(size, size), mode="bilinear", align_corners=False)[0, 0].flatten()
        g = torch.Generator().manual_seed(int(job.seed))
        order = torch.argsort(act + torch.rand(act.shape, generator=g) * 1e-6, descending=True)  # random tie-break
        kf, kb = max(1, int(len(order) * fg_fraction)), max(1, int(len(order) * bg_fraction))
        fg = order[:kf][torch.randint(kf, (points,), generator=g)]
        bg = order[-kb:][torch.randint(kb, (points,), generator=g)]
        idx = torch.cat([fg, bg])
        pts.append(torch.stack([idx // size, idx % size], 1))
        tgts.append(torch.cat([torch.ones(points), torch.zeros(points)]))
    return WssInputs(torch.stack(crops).to(device), torch.stack(pts).to(device), torch.stack(tgts).to(device), boxes)


def _paste(prob: torch.Tensor, box, h: int, w: int) -> np.ndarray:
    x1, y1, x2, y2 = box
    m = F.interpolate(prob[None, None], size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)[0, 0] >= 0.5
    full = np.zeros((h, w), bool)
    full[y1:y2, x1:x2] = m.cpu().numpy()
    return full


def segment_boxes(jobs: Sequence[WssJob], size: int = 64, points: int = 32, iterations: int = 100, lr: float = 0.25,
                  hidden: int = 16, device: str = "cpu", fg_fraction: float = TOP_FRACTION,
                  bg_fraction: float = TOP_FRACTION) -> list[np.ndarray]:
    """Masks ``(H, W)`` bool for every job, all boxes trained together on their sampled neighbourhoods;
    foreground / background points from the ``fg_fraction`` most / ``bg_fraction`` least activated pixels."""
    if not jobs:
        return []
    inp = prepare(jobs, size, points, device, fg_fraction, bg_fraction)
    net = BatchedWSS(init_params(len(jobs), 3, hidden, [j.seed for j in jobs], device))
    windows = BatchedWSS.point_windows(gather_patches(inp.crops, inp.points))  # fixed: the points do not move
    # sum over boxes of each box's mean loss: every box gets exactly its own gradient
    net.fit_points(windows, inp.targets, iterations, lr)
    with torch.no_grad():
        prob = net.full_logits(inp.crops).sigmoid()
    return [_paste(prob[i], inp.boxes[i], *j.image.shape[:2]) for i, j in enumerate(jobs)]


def segment_boxes_sequential(jobs: Sequence[WssJob], size: int = 64, points: int = 32, iterations: int = 100,
                             lr: float = 0.25, hidden: int = 16, device: str = "cpu") -> list[np.ndarray]:
    """Reference: one box after another, the whole crop through the network at every step."""
    out = []
    for job in jobs:
        inp = prepare([job], size, points, device)
        net = BatchedWSS(init_params(1, 3, hidden, [job.seed], device))
        opt = torch.optim.SGD(net.parameters(), lr=lr)
        rows, cols = inp.points[0, :, 0], inp.points[0, :, 1]
        for _ in range(iterations):
            logits = net.full_logits(inp.crops)[0]
            loss = F.binary_cross_entropy_with_logits(logits[rows, cols], inp.targets[0])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            prob = net.full_logits(inp.crops)[0].sigmoid()
        out.append(_paste(prob, inp.boxes[0], *job.image.shape[:2]))
    return out
