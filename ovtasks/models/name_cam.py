"""The caption-pretrained backbone's name heads (``ovtasks pretrain-backbone``) as a model of its own:
where in an image the evidence for a name is, and which name a box holds. No box, mask or point trained it.

The pretrained body classifies which vocabulary names an image's caption mentions, with a linear head on
each of its last three stages over a global max-pool (``HEAD_LEVELS``). Because the pool is a max, the image's
logit for a name is its logit at the best location: applied at every location instead, each head gives a map
of where the evidence for the name is (CAM, Zhou et al. 2016). The levels' maps (strides 8, 16, 32) are
upsampled to the finest one's grid and summed, which is what the summed image logits rank.

Users: ``maskfree.activation=backbone`` (the map as stage 1's, in place of the ITM's GradCAM),
``maskfree.box_rerank=backbone`` (:meth:`NameCam.crop_probs` judges eq. 6's best boxes) and Semantic-SAM's namer
(:meth:`NameCam.box_name_probs`). It is a closed-vocabulary classifier: a name outside its training vocabulary
has no head row; each user leaves such a name to its own model (the ITM, the semantic tokens).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ovtasks.core.config import S3Config
from ovtasks.models.ov_maskrcnn import IMAGE_MEAN, IMAGE_STD, SMALL_CHANNELS

# The files of `ovtasks pretrain-backbone`'s output (ovtasks/train/backbone.py trains them).
WEIGHTS, HEADS, META = "backbone.safetensors", "heads.safetensors", "ovtasks_backbone.json"

# the body's outputs (layer2, layer3, layer4: strides 8, 16, 32) that each get a classifier head. A head on the
# last stage alone never left chance in 2250 steps (its 4x4 grid and ten layers give the first convolutions no
# usable signal); a head on layer2 alone did within ~500, as the ITM's stride-8 stem does. So every level
# classifies on its own, and each is trained for the detector's FPN, which reads them all.
HEAD_LEVELS = ("1", "2", "3")


def make_heads(classes: int) -> torch.nn.ModuleDict:
    return torch.nn.ModuleDict({k: torch.nn.Linear(SMALL_CHANNELS[int(k)], classes) for k in HEAD_LEVELS})


def level_logits(body: torch.nn.Module, heads: torch.nn.ModuleDict, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per level, vocabulary logits of normalised images: the level's features max-pooled over the image."""
    feats = body(x)
    return {k: heads[k](feats[k].amax((2, 3))) for k in HEAD_LEVELS}


def body_logits(body: torch.nn.Module, heads: torch.nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
    """The levels' logits summed: the held-out metrics' prediction."""
    return sum(level_logits(body, heads, x).values())


def normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8-valued ``(B, 3, H, W)`` → what the detector's transform feeds its backbone."""
    mean = torch.tensor(IMAGE_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=x.device).view(1, 3, 1, 1)
    return (x / 255.0 - mean) / std


class NameCam:
    """The body and its name heads, in eval mode on ``device``; ``image_size`` is the side it was trained at."""

    def __init__(self, body: torch.nn.Module, heads: torch.nn.ModuleDict, vocabulary: Sequence[str], image_size: int,
                 device: str = "cpu"):
        self.body, self.heads = body.to(device).eval(), heads.to(device).eval()
        self.vocabulary = list(vocabulary)
        self.index = {n: i for i, n in enumerate(self.vocabulary)}
        self.image_size = int(image_size)
        self.device = device
        self.origin: dict | None = None  # the pretrained backbone it came from (ref, how it was trained, its metrics)

    @classmethod
    def load(cls, ref: str, device: str = "cpu", s3: S3Config | None = None) -> "NameCam":
        """From ``ovtasks pretrain-backbone``'s directory or store URI; refuses one saved without its heads."""
        from safetensors.torch import load_file

        from ovtasks.models.hub import resolve_model
        from ovtasks.models.ov_maskrcnn import small_backbone

        path = Path(resolve_model(ref, s3))
        if not (path / META).exists() or not (path / WEIGHTS).exists():
            raise FileNotFoundError(f"{ref} is not a pretrained backbone (no {META} / {WEIGHTS}); make one with "
                                    "`ovtasks pretrain-backbone`")
        if not (path / HEADS).exists():
            raise FileNotFoundError(f"{ref} has no {HEADS} (saved before the heads were kept); retrain it with "
                                    "`ovtasks pretrain-backbone` to use it for activation maps")
        meta = json.loads((path / META).read_text())
        if meta.get("architecture") != "small":
            raise ValueError(f"backbone {ref} is {meta.get('architecture')!r}; name maps need the 'small' body")
        body = small_backbone().body
        body.load_state_dict(load_file(str(path / WEIGHTS)), strict=True)
        heads = make_heads(len(meta["vocabulary"]))
        heads.load_state_dict(load_file(str(path / HEADS)), strict=True)
        cam = cls(body, heads, meta["vocabulary"], meta["config"]["image_size"], device)
        cam.origin = meta.get("origin") or {"ref": ref, "trained_by": meta.get("trained_by"), "metrics": meta.get("metrics")}
        return cam

    def save(self, path) -> None:
        """The body, heads and a ``ovtasks_backbone.json`` naming its vocabulary and size (:meth:`load` reads it)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.body.state_dict().items()}, str(path / WEIGHTS))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()}, str(path / HEADS))
        meta = {"architecture": "small", "vocabulary": self.vocabulary, "config": {"image_size": self.image_size},
                **({"origin": self.origin} if self.origin else {})}
        (path / META).write_text(json.dumps(meta, indent=2))

    def knows(self, name: str) -> bool:
        return name in self.index

    @torch.no_grad()
    def name_maps(self, pixels: torch.Tensor, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixels`` ``(B, 3, H, W)`` in [0, 255] and one known name each → the name's summed per-level logit maps
        ``(B, H/8, W/8)`` (at ``image_size``) and its softmax probability over the vocabulary ``(B,)``."""
        missing = [n for n in names if n not in self.index]
        if missing:
            raise KeyError(f"names outside the backbone's vocabulary: {sorted(set(missing))}")
        s = self.image_size
        x = pixels.to(self.device, torch.float32)
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        feats = self.body(normalise(x))
        rows = torch.tensor([self.index[n] for n in names], device=self.device)
        grid = feats[HEAD_LEVELS[0]].shape[-2:]
        maps, logits = 0, 0
        for k in HEAD_LEVELS:
            head = self.heads[k]
            f = feats[k]
            logits = logits + head(f.amax((2, 3)))
            w, b = head.weight[rows], head.bias[rows]  # (B, C), (B,)
            m = torch.einsum("bchw,bc->bhw", f, w) + b[:, None, None]
            maps = maps + F.interpolate(m[:, None], size=grid, mode="bilinear", align_corners=False)[:, 0]
        probs = logits.softmax(1)[torch.arange(len(names), device=self.device), rows]
        return maps, probs

    @torch.no_grad()
    def crop_probs(self, queries: Sequence[tuple[np.ndarray, np.ndarray, str]], context: float = 1.0,
                   batch: int = 64) -> list[np.ndarray]:
        """For each ``(image (H, W, 3) uint8, boxes (n, 4) xyxy, name)``: the backbone's probability of ``name``
        (softmax over its vocabulary of the levels' summed logits) on each box's crop, the box grown by ``context``
        x its side on every side (clipped to the image) and resized to ``image_size``; NaN for an unknown name
        (``maskfree.box_rerank=backbone``)."""
        out = []
        for image, boxes, name in queries:
            if name not in self.index or not len(boxes):
                out.append(np.full(len(boxes), np.nan))
                continue
            probs = self.crop_logits(image, np.asarray(boxes, np.float32).reshape(-1, 4), context, batch).softmax(1)
            out.append(probs[:, self.index[name]].cpu().numpy().astype(np.float64))
        return out

    @torch.no_grad()
    def box_name_probs(self, image: np.ndarray, boxes: np.ndarray, context: float = 1.0, masks: np.ndarray | None = None,
                       mask_context: float = 1.5) -> np.ndarray:
        """``(n, V)`` probabilities over the vocabulary that each xyxy box of ``image`` holds each name: the mean of
        two softmaxes, the name maps' maximum inside the box (summed over levels) and the prediction on the box's
        crop grown by ``context`` (Semantic-SAM's namer; on held-out synthetic GT boxes the two together named
        54 % / 48 % of boxes right on two sets, the crop alone 49 % / 45 %, the maps alone 44 % / 40 %). With the
        boxes' ``masks`` ((n, H, W) bool), that is averaged with the prediction on the masked crop
        (:meth:`crop_logits` with the masks, grown by ``mask_context``); a row whose mask is empty keeps the box's
        answer. On two held-out synthetic sets, with the committed SAM's masks for the GT boxes: 78 / 67 % right, from
        53 / 46 % without the masks (benchmarks/sam_prompts.py; docs/model-quality.md, section 4)."""
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        if not len(boxes):
            return np.zeros((0, len(self.vocabulary)), np.float32)
        s, (h, w) = self.image_size, image.shape[:2]
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
        x = F.interpolate(t, size=(s, s), mode="bilinear", align_corners=False, antialias=True).to(self.device)
        feats = self.body(normalise(x))
        in_box = 0
        for k in HEAD_LEVELS:
            head, f = self.heads[k], feats[k][0]
            m = torch.einsum("chw,vc->vhw", f, head.weight) + head.bias[:, None, None]  # (V, gh, gw)
            gh, gw = m.shape[1:]
            cells = []
            for x1, y1, x2, y2 in boxes:
                i0 = min(int(np.floor(y1 / h * gh)), gh - 1)
                j0 = min(int(np.floor(x1 / w * gw)), gw - 1)
                i1, j1 = max(int(np.ceil(y2 / h * gh)), i0 + 1), max(int(np.ceil(x2 / w * gw)), j0 + 1)
                cells.append(m[:, i0:i1, j0:j1].amax((1, 2)))
            in_box = in_box + torch.stack(cells)
        crop = self.crop_logits(image, boxes, context)
        probs = 0.5 * (in_box.softmax(1) + crop.softmax(1))
        if masks is not None:
            have = np.asarray(masks).reshape(len(boxes), -1).any(1)
            if have.any():
                rows = torch.from_numpy(np.flatnonzero(have)).to(probs.device)
                masked = self.crop_logits(image, boxes[have], mask_context, masks=np.asarray(masks)[have]).softmax(1)
                probs[rows] = 0.5 * (probs[rows] + masked)
        return probs.cpu().numpy()

    @torch.no_grad()
    def crop_logits(self, image: np.ndarray, boxes: np.ndarray, context: float, batch: int = 64,
                    masks: np.ndarray | None = None) -> torch.Tensor:
        """``(n, V)`` summed level logits of each box's crop (grown by ``context`` x its side, clipped, resized
        to ``image_size``). With ``masks`` ((n, H, W) bool) every pixel outside a box's mask is set to the
        normalisation mean (zero input), so the region alone is classified, as open-vocabulary segmenters
        classify masked regions (OVSeg)."""
        from ovtasks.models.preprocess import box_crops

        fill = None if masks is None else tuple(255.0 * v for v in IMAGE_MEAN)
        crops = box_crops(image, boxes, context, self.image_size, masks, fill)
        out = [body_logits(self.body, self.heads, normalise(torch.stack(crops[i:i + batch]).to(self.device)))
               for i in range(0, len(crops), batch)]
        return torch.cat(out) if out else torch.zeros(0, len(self.vocabulary), device=self.device)
