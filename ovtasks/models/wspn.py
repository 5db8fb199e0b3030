"""Weakly-supervised proposal network (WSPN, patent FIG. 2B and eq. 5).

A CNN backbone, RoI pooling of given proposals (selective search), then two streams over the pooled
features: classification ``W_cls`` (softmax over classes) and detection ``W_det`` (softmax over
proposals), combined as ``W = softmax_c(W_cls) * softmax_n(W_det)``; the image-level score of class c
is ``p_c = sum_n W[n, c]``. A third head regresses box deltas. Training (eq. 5): binary cross-entropy
of ``p`` against image-level labels from the caption, plus smooth-L1 of the deltas towards pseudo
targets — high-scoring, non-overlapping proposals of each labelled class, chosen greedily.

Parts are injectable (``backbone`` with its ``stride`` and ``out_channels``), as in torchvision.
Boxes are float ``(N, 4)`` xyxy in input pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import box_iou, nms, roi_align


@dataclass(frozen=True)
class WSPNConfig:
    num_classes: int
    channels: tuple[int, ...] = (32, 64, 128, 128)  # backbone widths; each but the last halves the size
    roi_size: int = 7
    hidden: int = 256
    class_names: tuple[str, ...] = ()


class SmallBackbone(nn.Sequential):
    """conv-BN-ReLU blocks; stride ``2 ** (len(channels) - 1)``."""

    def __init__(self, channels=(32, 64, 128, 128)):
        layers, c_in = [], 3
        for i, c in enumerate(channels):
            stride = 2 if i < len(channels) - 1 else 1
            layers += [nn.Conv2d(c_in, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
        super().__init__(*layers)
        self.out_channels = c_in
        self.stride = 2 ** (len(channels) - 1)


def encode_deltas(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Faster R-CNN box deltas (dx, dy, dw, dh) turning ``src`` boxes into ``dst`` boxes."""
    sw, sh = (src[:, 2] - src[:, 0]).clamp(min=1), (src[:, 3] - src[:, 1]).clamp(min=1)
    dw, dh = (dst[:, 2] - dst[:, 0]).clamp(min=1), (dst[:, 3] - dst[:, 1]).clamp(min=1)
    sx, sy = src[:, 0] + 0.5 * sw, src[:, 1] + 0.5 * sh
    dx, dy = dst[:, 0] + 0.5 * dw, dst[:, 1] + 0.5 * dh
    return torch.stack([(dx - sx) / sw, (dy - sy) / sh, torch.log(dw / sw), torch.log(dh / sh)], 1)


def decode_deltas(src: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    sw, sh = (src[:, 2] - src[:, 0]).clamp(min=1), (src[:, 3] - src[:, 1]).clamp(min=1)
    sx, sy = src[:, 0] + 0.5 * sw, src[:, 1] + 0.5 * sh
    d = deltas.clone()
    d[:, 2:] = d[:, 2:].clamp(max=4.0)
    cx, cy = sx + d[:, 0] * sw, sy + d[:, 1] * sh
    w, h = sw * torch.exp(d[:, 2]), sh * torch.exp(d[:, 3])
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], 1)


class WSPN(nn.Module):
    def __init__(self, cfg: WSPNConfig, backbone: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone or SmallBackbone(cfg.channels)
        feat = self.backbone.out_channels * cfg.roi_size * cfg.roi_size
        self.fc = nn.Sequential(nn.Linear(feat, cfg.hidden), nn.ReLU(inplace=True), nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(inplace=True))
        self.cls_stream = nn.Linear(cfg.hidden, cfg.num_classes)
        self.det_stream = nn.Linear(cfg.hidden, cfg.num_classes)
        self.reg = nn.Linear(cfg.hidden, 4)
        nn.init.zeros_(self.reg.weight)
        nn.init.zeros_(self.reg.bias)

    def forward(self, images: torch.Tensor, proposals: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """``images`` ``(B, 3, H, W)`` normalised; ``proposals[b]`` ``(N_b, 4)``.

        Returns per image: ``W`` ``(N_b, C)`` instance scores, ``p`` ``(C,)`` image scores,
        ``det`` ``(N_b, C)`` softmax over proposals, ``deltas`` ``(N_b, 4)``. ``N_b = 0`` gives empty tensors
        and ``p = 0``.
        """
        feats = self.backbone(images)
        rois = roi_align(feats, [p.float() for p in proposals], output_size=self.cfg.roi_size,
                         spatial_scale=1.0 / self.backbone.stride, sampling_ratio=2, aligned=True)
        h = self.fc(rois.flatten(1))
        cls, det, deltas = self.cls_stream(h), self.det_stream(h), self.reg(h)
        out, k = [], 0
        for p in proposals:
            n = len(p)
            c, d = cls[k:k + n], det[k:k + n]
            if n == 0:
                z = cls.new_zeros((0, self.cfg.num_classes))
                out.append({"W": z, "det": z, "p": cls.new_zeros(self.cfg.num_classes), "deltas": cls.new_zeros((0, 4))})
            else:
                sd = d.softmax(0)
                w = c.softmax(1) * sd
                out.append({"W": w, "det": sd, "p": w.sum(0).clamp(1e-6, 1 - 1e-6), "deltas": deltas[k:k + n]})
            k += n
        return out


def pseudo_regression_targets(boxes: torch.Tensor, w: torch.Tensor, labels: torch.Tensor,
                              iou_thresh: float = 0.5, per_class: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5's pseudo targets: for each labelled class, greedily keep high-scoring non-overlapping
    proposals; every other proposal overlapping one of them (IoU >= ``iou_thresh``) regresses to it.

    Returns ``(index of proposals with a target, their target boxes)``.
    """
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long), boxes.new_zeros((0, 4))
    targets = []
    for c in torch.nonzero(labels > 0.5).flatten().tolist():
        keep = nms(boxes, w[:, c].detach(), iou_thresh)[:per_class]
        top = w[keep[0], c].item()
        targets += [boxes[i] for i in keep.tolist() if w[i, c].item() >= 0.5 * top]
    if not targets:
        return torch.zeros(0, dtype=torch.long), boxes.new_zeros((0, 4))
    t = torch.stack(targets)
    iou = box_iou(boxes, t)
    best, arg = iou.max(1)
    idx = torch.nonzero(best >= iou_thresh).flatten()
    return idx, t[arg[idx]]


def wspn_loss(out: list[dict], proposals: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eq. 5 for a batch: ``labels`` ``(B, C)`` in {0, 1}. Returns named losses (torchvision style)."""
    p = torch.stack([o["p"] for o in out])
    loss_cls = F.binary_cross_entropy(p, labels, reduction="sum") / len(out)
    reg_terms = []
    for o, boxes, y in zip(out, proposals, labels):
        idx, tgt = pseudo_regression_targets(boxes, o["W"], y)
        if len(idx):
            reg_terms.append(F.smooth_l1_loss(o["deltas"][idx], encode_deltas(boxes[idx], tgt), reduction="sum") / max(len(boxes), 1))
    loss_reg = torch.stack(reg_terms).sum() / len(out) if reg_terms else p.new_zeros(())
    return {"loss_cls": loss_cls, "loss_reg": loss_reg}


@torch.no_grad()
def top_proposals(out: dict, boxes: torch.Tensor, k: int, image_size: tuple[int, int], nms_iou: float = 0.7,
                  return_index: bool = False):
    """Refined boxes ranked by their detection confidence (max over classes of ``W_det``), NMS, top-K;
    with ``return_index``, also each kept box's row in ``boxes``."""
    if len(boxes) == 0:
        empty = boxes.new_zeros((0, 4)), boxes.new_zeros(0)
        return (*empty, torch.zeros(0, dtype=torch.long, device=boxes.device)) if return_index else empty
    refined = decode_deltas(boxes.float(), out["deltas"])
    h, w = image_size
    refined[:, 0::2] = refined[:, 0::2].clamp(0, w)
    refined[:, 1::2] = refined[:, 1::2].clamp(0, h)
    score = out["det"].max(1).values
    ok = ((refined[:, 2] - refined[:, 0]) >= 1) & ((refined[:, 3] - refined[:, 1]) >= 1)
    rows = torch.nonzero(ok).flatten()
    refined, score = refined[ok], score[ok]
    keep = nms(refined, score, nms_iou)[:k]
    return (refined[keep], score[keep], rows[keep]) if return_index else (refined[keep], score[keep])


def save_wspn(model: WSPN, path, extra: dict | None = None) -> None:
    torch.save({"config": asdict(model.cfg), "state_dict": model.state_dict(), "extra": extra or {}}, path)


def load_wspn(path, device: str = "cpu") -> tuple[WSPN, dict]:
    ckpt = torch.load(path, map_location=device, weights_only=True)  # never unpickle arbitrary objects
    cfg = dict(ckpt["config"])
    cfg["channels"] = tuple(cfg["channels"])
    cfg["class_names"] = tuple(cfg["class_names"])
    model = WSPN(WSPNConfig(**cfg))
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), ckpt.get("extra", {})
