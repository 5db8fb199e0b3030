"""Weakly-supervised segmentation network (WSS, patent FIG. 2C / eq. 7): one tiny CNN per pseudo box.

The network is conv3x3 → ReLU → conv3x3 → ReLU → conv1x1 with *valid* convolutions, so each output
pixel sees exactly a 5x5 neighbourhood of the (2-pixel padded) crop. Two consequences make training
cheap and exactly equivalent to the whole-crop computation:

* the parameters of B boxes are stacked and all boxes are trained at once — as batched ``einsum``
  over sampled neighbourhoods, and inferred with grouped convolutions (``groups=B``);
* eq. 7 only looks at the 2Z sampled points, so training runs on their 5x5 neighbourhoods alone
  (:meth:`BatchedWSS.point_logits`); inference runs once on the whole crop (:meth:`full_logits`).

:func:`init_params` is deterministic per box (seeded), so the sequential reference in the tests and
benchmark starts from the very same weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RECEPTIVE = 5  # two 3x3 valid convolutions
PAD = RECEPTIVE // 2


def init_params(n_boxes: int, in_ch: int, hidden: int, seeds: list[int] | None = None, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Kaiming-uniform-like initial weights for ``n_boxes`` independent networks (box i from seed i)."""
    seeds = seeds if seeds is not None else list(range(n_boxes))
    shapes = {"w1": (hidden, in_ch, 3, 3), "b1": (hidden,), "w2": (hidden, hidden, 3, 3), "b2": (hidden,),
              "w3": (1, hidden), "b3": (1,)}
    fan_in = {"w1": in_ch * 9, "b1": in_ch * 9, "w2": hidden * 9, "b2": hidden * 9, "w3": hidden, "b3": hidden}
    out = {k: [] for k in shapes}
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        for k, shp in shapes.items():
            bound = 1.0 / math.sqrt(fan_in[k]) * (math.sqrt(6) if k.startswith("w") else 1.0)
            out[k].append((torch.rand(shp, generator=g) * 2 - 1) * bound)
    return {k: torch.stack(v).to(device) for k, v in out.items()}


class BatchedWSS:
    """``B`` independent WSS networks held as stacked tensors (``w1`` is ``(B, H, C, 3, 3)`` etc.)."""

    def __init__(self, params: dict[str, torch.Tensor]):
        self.p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}

    @property
    def n(self) -> int:
        return self.p["w1"].shape[0]

    def parameters(self) -> list[torch.Tensor]:
        return list(self.p.values())

    @staticmethod
    def point_windows(patches: torch.Tensor) -> torch.Tensor:
        """``(B, P, C, 5, 5)`` neighbourhoods → ``(B, P * 9, C * 9)``: the nine 3x3 input windows around
        each point, rows ordered (point, i, j), columns (channel, k, l). Computed once per training run."""
        b, n, c = patches.shape[:3]
        win = patches.unfold(3, 3, 1).unfold(4, 3, 1)  # (B, P, C, 3, 3, 3, 3): [i, j] position, [k, l] kernel
        return win.permute(0, 1, 3, 4, 2, 5, 6).reshape(b, n * 9, c * 9).contiguous()

    def point_logits(self, windows: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, P)`` at the points whose :meth:`point_windows` are given (batched matmuls)."""
        p = self.p
        b = windows.shape[0]
        hidden, c9 = p["w1"].shape[1], windows.shape[2]
        n = windows.shape[1] // 9
        h1 = torch.baddbmm(p["b1"][:, None, :], windows, p["w1"].reshape(b, hidden, c9).transpose(1, 2))
        h1 = h1.relu().reshape(b, n, 9 * hidden)  # cols (i, j, h)
        w2 = p["w2"].permute(0, 1, 3, 4, 2).reshape(b, hidden, 9 * hidden)  # (B, G, (i, j, h))
        h2 = torch.baddbmm(p["b2"][:, None, :], h1, w2.transpose(1, 2)).relu()
        return torch.bmm(h2, p["w3"].transpose(1, 2))[..., 0] + p["b3"]

    @torch.no_grad()
    def fit_points(self, windows: torch.Tensor, targets: torch.Tensor, iterations: int, lr: float) -> None:
        """Plain SGD on ``sum over boxes of mean BCE(point_logits(windows), targets)`` for ``iterations``
        steps, the gradients written out by hand (the network is two matmuls and a dot product). Same
        loss, same updates as autograd + ``torch.optim.SGD``, without building a graph 3 x ``iterations``
        times: on the CPU that bookkeeping cost more than the arithmetic of 64 boxes."""
        p = self.p
        b, n9, c9 = windows.shape
        hidden, n = p["w1"].shape[1], n9 // 9
        # flat layouts for the whole run: w1 (B, C*9, H), w2 ((i, j, h), G) as point_logits orders them
        w1 = p["w1"].reshape(b, hidden, c9).transpose(1, 2).contiguous()
        w2 = p["w2"].permute(0, 1, 3, 4, 2).reshape(b, hidden, 9 * hidden).transpose(1, 2).contiguous()
        w3 = p["w3"].transpose(1, 2).contiguous()  # (B, H, 1)
        b1, b2, b3 = p["b1"].detach().clone(), p["b2"].detach().clone(), p["b3"].detach().clone()
        windows_t = windows.transpose(1, 2).contiguous()
        for _ in range(iterations):
            a1 = torch.baddbmm(b1[:, None, :], windows, w1)  # (B, P*9, H)
            h1 = a1.relu().reshape(b, n, 9 * hidden)
            a2 = torch.baddbmm(b2[:, None, :], h1, w2)  # (B, P, G)
            h2 = a2.relu()
            z = torch.bmm(h2, w3)[..., 0] + b3  # (B, P)
            dz = (z.sigmoid() - targets) / n  # d(mean BCE with logits)/dz, per box
            g_w3 = torch.bmm(h2.transpose(1, 2), dz[..., None])
            g_a2 = (dz[..., None] * w3.transpose(1, 2)).mul_(a2 > 0)
            g_w2 = torch.bmm(h1.transpose(1, 2), g_a2)
            g_a1 = torch.bmm(g_a2, w2.transpose(1, 2)).reshape(b, n9, hidden).mul_(a1 > 0)
            g_w1 = torch.bmm(windows_t, g_a1)
            b3.sub_(dz.sum(1, keepdim=True), alpha=lr)
            b2.sub_(g_a2.sum(1), alpha=lr)
            b1.sub_(g_a1.sum(1), alpha=lr)
            w3.sub_(g_w3, alpha=lr)
            w2.sub_(g_w2, alpha=lr)
            w1.sub_(g_w1, alpha=lr)
        p["w1"].copy_(w1.transpose(1, 2).reshape(p["w1"].shape))
        p["w2"].copy_(w2.transpose(1, 2).reshape(b, hidden, 3, 3, hidden).permute(0, 1, 4, 2, 3))
        p["w3"].copy_(w3.transpose(1, 2))
        p["b1"].copy_(b1)
        p["b2"].copy_(b2)
        p["b3"].copy_(b3)

    def full_logits(self, crops: torch.Tensor) -> torch.Tensor:
        """``(B, C, S + 4, S + 4)`` padded crops → ``(B, S, S)`` logits (grouped convolutions)."""
        p = self.p
        b, c, hp, wp = crops.shape
        hidden = p["w1"].shape[1]
        x = crops.reshape(1, b * c, hp, wp)
        x = F.conv2d(x, p["w1"].reshape(b * hidden, c, 3, 3), p["b1"].reshape(-1), groups=b).relu()
        x = F.conv2d(x, p["w2"].reshape(b * hidden, hidden, 3, 3), p["b2"].reshape(-1), groups=b).relu()
        x = F.conv2d(x, p["w3"].reshape(b, hidden, 1, 1), p["b3"].reshape(-1), groups=b)
        return x[0]


def gather_patches(crops: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """5x5 neighbourhoods of ``points`` ``(B, P, 2)`` (row, col in the unpadded crop) from padded
    ``crops`` ``(B, C, S + 4, S + 4)`` → ``(B, P, C, 5, 5)``."""
    b, c, _, _ = crops.shape
    offs = torch.arange(RECEPTIVE, device=crops.device)
    rows = points[..., 0, None] + offs  # (B, P, 5) in padded coordinates (centre + 2 - 2 .. + 2)
    cols = points[..., 1, None] + offs
    bi = torch.arange(b, device=crops.device)[:, None, None, None]
    patches = crops.permute(0, 2, 3, 1)[bi, rows[..., :, None], cols[..., None, :]]  # (B, P, 5, 5, C)
    return patches.permute(0, 1, 4, 2, 3)
