"""Open-vocabulary Mask R-CNN (patent eq. 8) on torchvision's Mask R-CNN.

* the box classifier is an **embedding head**: region features → ``h_emb`` (a linear layer) →
  L2-normalised embedding, compared by cosine / temperature with the L2-normalised text embeddings
  of the vocabulary and a **learned background embedding** ``bg`` (eq. 8: a softmax over
  ``{bg, c_1..c_N}``);
* box regression and the mask head are **class-agnostic** (one box delta, one mask per region);
  torchvision's heads index them by class, so the single outputs are expanded (views, no copies);
* the classification loss weights the background class by ``background_weight`` (0.2 in the
  patent, "to improve the recall of novel classes");
* the vocabulary is a buffer set by :meth:`OVMaskRCNN.set_vocabulary`, so any vocabulary can be used
  at inference; labels are indices into it, 1-based (0 is background), as in torchvision.

``forward(images, targets)`` returns torchvision's ``loss_*`` dict in training and a list of
per-image dicts (``boxes``, ``labels``, ``scores``, ``masks``) at inference. Backbones:
``resnet50_fpn`` (the patent's) or ``small`` (a 4-stage CNN with an FPN, for the CPU).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.roi_heads import RoIHeads


class EmbeddingPredictor(nn.Module):
    """Region features → (class logits over {bg} ∪ vocabulary, class-agnostic box deltas expanded per class)."""

    def __init__(self, in_channels: int, embed_dim: int, temperature: float = 0.05):
        super().__init__()
        self.h_emb = nn.Linear(in_channels, embed_dim)
        self.bbox_pred = nn.Linear(in_channels, 4)
        self.background = nn.Parameter(torch.randn(embed_dim) * 0.02)
        self.temperature = temperature
        self.register_buffer("text", torch.zeros(0, embed_dim), persistent=False)
        self.last_logits: torch.Tensor | None = None

    def set_vocabulary(self, text_embeddings: torch.Tensor) -> None:
        if text_embeddings.ndim != 2 or text_embeddings.shape[1] != self.h_emb.out_features:
            raise ValueError(f"text embeddings must be (N, {self.h_emb.out_features}), got {tuple(text_embeddings.shape)}")
        self.text = F.normalize(text_embeddings.float(), dim=-1).to(self.h_emb.weight.device)

    @property
    def num_classes(self) -> int:
        return 1 + len(self.text)

    def forward(self, x: torch.Tensor):
        if len(self.text) == 0:
            raise RuntimeError("no vocabulary: call set_vocabulary(text_embeddings) first")
        x = x.flatten(start_dim=1)
        r = F.normalize(self.h_emb(x), dim=-1)
        classes = torch.cat([F.normalize(self.background, dim=0)[None], self.text], dim=0)
        logits = r @ classes.t() / self.temperature  # eq. 8 before the softmax
        self.last_logits = logits
        deltas = self.bbox_pred(x)
        return logits, deltas.repeat(1, self.num_classes)  # class-agnostic: the same deltas for every class


class AgnosticMaskPredictor(nn.Module):
    """One mask per region; expanded to every class channel so torchvision can index it by label."""

    def __init__(self, in_channels: int, hidden: int, predictor: EmbeddingPredictor):
        super().__init__()
        self.conv5_mask = nn.ConvTranspose2d(in_channels, hidden, 2, 2)
        self.mask_fcn_logits = nn.Conv2d(hidden, 1, 1)
        for layer in (self.conv5_mask, self.mask_fcn_logits):  # torchvision's MaskRCNNPredictor init
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        self._predictor = [predictor]  # not a submodule: only to read the vocabulary size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask_fcn_logits(F.relu(self.conv5_mask(x)))
        return m.expand(-1, self._predictor[0].num_classes, -1, -1)


class OVRoIHeads(RoIHeads):
    """torchvision's RoI heads with the background class weighted in the classification loss."""

    background_weight = 0.2

    def select_training_samples(self, proposals, targets):
        out = super().select_training_samples(proposals, targets)
        self._labels = out[2]
        return out

    def forward(self, features, proposals, image_shapes, targets=None):
        result, losses = super().forward(features, proposals, image_shapes, targets)
        if self.training and "loss_classifier" in losses:
            logits = self.box_predictor.last_logits
            labels = torch.cat(self._labels, dim=0)
            weight = torch.ones(logits.shape[1], device=logits.device)
            weight[0] = self.background_weight
            losses["loss_classifier"] = F.cross_entropy(logits, labels, weight=weight)
        return result, losses


# the detector transform's normalisation of [0, 1] images (torchvision's ImageNet statistics; named here so that
# a backbone pretrained elsewhere, ``ovtasks pretrain-backbone``, sees the same input)
IMAGE_MEAN, IMAGE_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SMALL_CHANNELS = (32, 48, 64, 96)  # the small body's layer1 .. layer4 widths


def small_backbone(out_channels: int = 64) -> BackboneWithFPN:
    """A 4-stage CNN (strides 4-32) with an FPN: Mask R-CNN's interface at a CPU-friendly size."""
    from collections import OrderedDict

    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, 2, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
                             nn.Conv2d(o, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

    c1, c2, c3, c4 = SMALL_CHANNELS
    body = nn.Sequential(OrderedDict([("stem", block(3, 24)), ("layer1", block(24, c1)), ("layer2", block(c1, c2)),
                                      ("layer3", block(c2, c3)), ("layer4", block(c3, c4))]))
    return BackboneWithFPN(body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}, list(SMALL_CHANNELS), out_channels)


class OVMaskRCNN(MaskRCNN):
    def __init__(self, embed_dim: int, backbone: str = "small", temperature: float = 0.05, background_weight: float = 0.2,
                 min_size: int = 256, max_size: int = 512, **kwargs):
        rep, mask_ch = 1024, 256  # torchvision's TwoMLPHead and MaskRCNNHeads widths
        if backbone == "small":
            from torchvision.models.detection.faster_rcnn import TwoMLPHead
            from torchvision.models.detection.mask_rcnn import MaskRCNNHeads

            bb, rep, mask_ch = small_backbone(), 256, 64
            kwargs.setdefault("box_head", TwoMLPHead(bb.out_channels * 7 * 7, rep))
            kwargs.setdefault("mask_head", MaskRCNNHeads(bb.out_channels, (mask_ch, mask_ch), 1))
            for k, v in (("rpn_pre_nms_top_n_train", 600), ("rpn_post_nms_top_n_train", 300),
                         ("rpn_pre_nms_top_n_test", 300), ("rpn_post_nms_top_n_test", 150), ("box_batch_size_per_image", 128)):
                kwargs.setdefault(k, v)
        elif backbone == "resnet50_fpn":
            from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

            bb = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=5)
        else:
            raise ValueError(f"unknown backbone {backbone!r}; use small or resnet50_fpn")
        predictor = EmbeddingPredictor(rep, embed_dim, temperature)
        kwargs.setdefault("image_mean", IMAGE_MEAN)
        kwargs.setdefault("image_std", IMAGE_STD)
        super().__init__(bb, num_classes=None, min_size=min_size, max_size=max_size, box_predictor=predictor,
                         mask_predictor=AgnosticMaskPredictor(mask_ch, mask_ch, predictor), **kwargs)
        self.roi_heads.__class__ = OVRoIHeads  # same parts and settings, weighted classification loss
        self.roi_heads.background_weight = background_weight
        self.embed_dim, self.backbone_name = embed_dim, backbone

    @property
    def predictor(self) -> EmbeddingPredictor:
        return self.roi_heads.box_predictor

    def set_vocabulary(self, text_embeddings: torch.Tensor) -> None:
        """Text embeddings ``(N, embed_dim)`` of the names; labels 1..N refer to them."""
        self.predictor.set_vocabulary(text_embeddings)


def build(embed_dim: int, backbone: str = "small", **kwargs) -> OVMaskRCNN:
    return OVMaskRCNN(embed_dim, backbone, **kwargs)


# the training config's architecture fields and their defaults (``ovtasks train``'s TrainConfig uses these)
ARCHITECTURE = {"backbone": "small", "temperature": 0.05, "background_weight": 0.2, "min_size": 192, "max_size": 320}


def build_from_config(embed_dim: int, config: dict) -> OVMaskRCNN:
    """The network a training config (``ovtasks_model.json``'s ``config``) describes; missing fields take their defaults."""
    arch = {k: config.get(k, v) for k, v in ARCHITECTURE.items()}
    return build(embed_dim, arch.pop("backbone"), **arch)


def targets_from_coco(anns: Sequence[dict], cat_index: dict[int, int], hw: tuple[int, int]) -> dict:
    """COCO annotations of one image → a torchvision target (boxes xyxy, 1-based labels, masks)."""
    from ovtasks.data.groundtruth import decode_rle

    boxes, labels, masks = [], [], []
    for a in anns:
        if a["category_id"] not in cat_index:
            continue
        x, y, w, h = a["bbox"]
        if w < 1 or h < 1:
            continue
        boxes.append([x, y, x + w, y + h])
        labels.append(cat_index[a["category_id"]] + 1)
        masks.append(torch.from_numpy(decode_rle(a["segmentation"])))
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.stack(masks).to(torch.uint8) if masks else torch.zeros((0, *hw), dtype=torch.uint8)}


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 → ``(3, H, W)`` float in [0, 1], the detector's input."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0


@torch.no_grad()
def predict(model, images: Sequence[np.ndarray], image_ids: Sequence[int], category_ids: Sequence[int],
            text_embeddings: np.ndarray, device: str = "cpu", score_thresh: float = 0.05, batch_size: int = 4) -> list[dict]:
    """COCO predictions (RLE masks, xywh boxes) for ``images`` with vocabulary ``category_ids``."""
    from ovtasks.data.groundtruth import encode_rle

    model.set_vocabulary(torch.from_numpy(np.asarray(text_embeddings)))
    model.roi_heads.score_thresh = score_thresh
    model.eval()
    preds = []
    for b0 in range(0, len(images), batch_size):
        outs = model([to_tensor(im).to(device) for im in images[b0:b0 + batch_size]])
        for image_id, o in zip(image_ids[b0:b0 + batch_size], outs):
            for box, label, score, mask in zip(o["boxes"], o["labels"], o["scores"], o["masks"]):
                m = (mask[0] > 0.5).cpu().numpy()
                if not m.any():
                    continue
                x1, y1, x2, y2 = (float(v) for v in box)
                preds.append({"image_id": int(image_id), "category_id": int(category_ids[int(label) - 1]), "score": float(score),
                              "bbox": [x1, y1, x2 - x1, y2 - y1], "segmentation": encode_rle(m)})
    return preds
