"""Semantic-SAM (the thesis, §2.2): SAM whose mask decoder carries 5 extra learned tokens — 4 semantic
tokens, one per mask output, and 1 cosine-similarity score token — and a semantic output aligned with
the text embedding space (768-d for CLIP-L; the configured text encoder's size otherwise).

The extra tokens join SAM's IoU and mask tokens as queries of the decoder's two-way transformer (so they
attend to the prompt and the image exactly as SAM's own output tokens do). Their outputs go through
two small MLP heads: ``semantic_head`` maps each semantic token to an L2-normalised vector of the text
embedding size (the meaning of the corresponding mask), ``score_head`` maps the score token to the 4
masks' predicted cosine similarity with their true name. Everything else is transformers' ``SamModel``,
loaded by Hugging Face id, local directory or model-store URI, or built tiny and random for the CPU.

:meth:`SemanticSam.decode` reimplements ``SamMaskDecoder.forward`` with the extra tokens and returns all
4 masks (SAM's single-output mask 0 and its 3 multimask outputs); with ``extra=False`` it is exactly
the stock decoder (a test checks this, so a transformers upgrade that changes the decoder is caught).
Two optional additions, carried by a SAM directory that ``ovtasks train-sam`` made with them: the box also
entered as SAM's dense mask prompt (``box_mask_prompt``, :func:`box_masks`) and SAM 2's high-resolution
features added into the decoder's upscaling (:class:`HiResFeatures`). Without them ``decode`` is the stock one.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NUM_MASKS = 4  # SAM's mask tokens: 0 = single output, 1..3 = multimask outputs
NAMER_DIR = "namer"  # the caption-pretrained backbone naming prompts beside the semantic tokens, when attached
HIRES_FILE = "hires.safetensors"  # a SAM directory's high-resolution feature path (HiResFeatures), when it has one
TOKEN_WEIGHT = 0.5  # the semantic tokens' power in the product with the namer's probabilities (SemanticSam.token_weight)
SAM_META = "ovtasks_sam.json"  # `ovtasks train-sam`'s record in a SAM directory (its config says how boxes are prompted)


class _MLP(nn.Module):
    def __init__(self, dim_in: int, hidden: int, dim_out: int, layers: int = 3):
        super().__init__()
        dims = [dim_in] + [hidden] * (layers - 1) + [dim_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class HiResFeatures(nn.Module):
    """High-resolution features for the mask decoder's upscaling, as SAM 2 feeds its backbone's stride-4 and
    stride-8 maps into it (``use_high_res_features_in_sam``): a ViT encoder has no early stages, so a small
    conv stem on the input pixels makes them. ``s0`` matches the second upscaling (``hidden / 8`` channels,
    4x the embedding grid), ``s1`` the first (``hidden / 4`` channels, 2x the grid). Each branch's last conv
    starts at zero, so a SAM trained without the path decodes exactly as before until this is trained."""

    def __init__(self, hidden: int):
        super().__init__()
        c0, c1 = max(1, hidden // 8), max(1, hidden // 4)
        self.stem0 = nn.Sequential(nn.Conv2d(3, c0, 3, 2, 1), nn.GELU(), nn.Conv2d(c0, c0, 3, 1, 1), nn.GELU())
        self.stem1 = nn.Sequential(nn.Conv2d(c0, c1, 3, 2, 1), nn.GELU(), nn.Conv2d(c1, c1, 3, 1, 1), nn.GELU())
        self.out0, self.out1 = nn.Conv2d(c0, c0, 1), nn.Conv2d(c1, c1, 1)
        for conv in (self.out0, self.out1):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, pixels: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixels`` (B, 3, S, S) → (s0 (B, hidden/8, 4g, 4g), s1 (B, hidden/4, 2g, 2g)) for a g x g embedding."""
        x = self.stem0(pixels)
        if x.shape[-1] != 4 * grid:
            x = F.adaptive_avg_pool2d(x, 4 * grid)
        y = self.stem1(x)
        if y.shape[-1] != 2 * grid:
            y = F.adaptive_avg_pool2d(y, 2 * grid)
        return self.out0(x), self.out1(y)


@dataclass
class ImageFeatures:
    """What :meth:`SemanticSam.embed` gives per image: SAM's embedding and, with a high-resolution path, its two
    maps. Indexing picks images (``feats[k:k + 1]``, ``feats[owner]`` for one row per box) from all of them."""

    emb: torch.Tensor  # (B, C, g, g)
    s0: torch.Tensor | None = None
    s1: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.emb.shape

    @property
    def device(self) -> torch.device:
        return self.emb.device

    def __len__(self) -> int:
        return len(self.emb)

    def __getitem__(self, idx) -> "ImageFeatures":
        return ImageFeatures(self.emb[idx], None if self.s0 is None else self.s0[idx], None if self.s1 is None else self.s1[idx])


@dataclass
class Decoded:
    """One image's answer for its ``n`` box prompts."""

    masks: torch.Tensor  # (n, 4, h, w) low-resolution logits in the padded input frame
    iou: torch.Tensor  # (n, 4) predicted IoU
    semantic: torch.Tensor | None  # (n, 4, D) unit vectors in the text embedding space
    score: torch.Tensor | None  # (n, 4) predicted cosine similarity with the true name


class SemanticSam(nn.Module):
    def __init__(self, sam, embed_dim: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                 hires: HiResFeatures | None = None, box_mask_prompt: bool = False):
        super().__init__()
        self.sam = sam
        self.hires = hires
        self.box_mask_prompt = bool(box_mask_prompt)
        hidden = sam.config.mask_decoder_config.hidden_size
        self.embed_dim = int(embed_dim)
        self.semantic_tokens = nn.Embedding(NUM_MASKS, hidden)
        self.score_token = nn.Embedding(1, hidden)
        self.semantic_head = _MLP(hidden, hidden, self.embed_dim)
        self.score_head = _MLP(hidden, hidden, NUM_MASKS)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.namer = None  # NameCam: the caption-pretrained backbone naming each prompt beside the semantic tokens
        # with a namer: the semantic tokens' probabilities enter the product to this power (they learn names from the
        # pseudo-labels' boxes and are far less sure than the namer; docs/model-quality.md, section 4)
        self.token_weight = TOKEN_WEIGHT

    @property
    def image_size(self) -> int:
        return int(self.sam.config.vision_config.image_size)

    def resized(self, h: int, w: int) -> tuple[int, int, float]:
        scale = self.image_size / max(h, w)
        return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5)), scale

    def pixels(self, image: np.ndarray, device, dtype=torch.float32) -> torch.Tensor:
        """SAM's preprocessing: long side to ``image_size``, normalise, pad bottom/right to a square."""
        from ovtasks.models.preprocess import resize_normalise

        h, w = image.shape[:2]
        rh, rw, _ = self.resized(h, w)
        x = resize_normalise(image, (rh, rw), self.mean, self.std, device, dtype)
        return F.pad(x, (0, self.image_size - rw, 0, self.image_size - rh))

    def embed(self, pixels: torch.Tensor) -> ImageFeatures:
        emb = self.sam.get_image_embeddings(pixels)
        if self.hires is None:
            return ImageFeatures(emb)
        return ImageFeatures(emb, *self.hires(pixels.to(emb.dtype), emb.shape[-1]))

    def decode(self, feats: ImageFeatures, boxes: torch.Tensor, extra: bool = True) -> Decoded:
        """``feats``: one image's features (batch 1), or one per box (prompts of several images decoded in one
        call); ``boxes``: (n, 4) xyxy in the padded input frame."""
        dec = self.sam.mask_decoder
        emb = feats.emb
        masks_in = box_masks(boxes, 4 * emb.shape[-1], self.image_size).to(emb.dtype) if self.box_mask_prompt else None
        sparse, dense = self.sam.prompt_encoder(input_points=None, input_labels=None, input_boxes=boxes[None], input_masks=masks_in)
        n = sparse.shape[1]
        out_tokens = [dec.iou_token.weight, dec.mask_tokens.weight]
        if extra:
            out_tokens += [self.semantic_tokens.weight, self.score_token.weight]
        tokens = torch.cat(out_tokens, dim=0).repeat(1, n, 1, 1)
        tokens = torch.cat((tokens, sparse), dim=2).to(dec.iou_token.weight.dtype)
        if emb.shape[0] not in (1, n):
            raise ValueError(f"{emb.shape[0]} embeddings for {n} boxes: give one, or one per box")
        image = emb.expand(n, -1, -1, -1) + dense
        pos = self.sam.get_image_wide_positional_embeddings().repeat_interleave(n, 0)
        q, image = dec.transformer(point_embeddings=tokens, image_embeddings=image, image_positional_embeddings=pos,
                                   attention_similarity=None, target_embedding=None)[:2]
        _, c, h, w = emb.shape
        image = image.transpose(2, 3).reshape(n, c, h, w)
        if feats.s0 is None:
            up = dec.activation(dec.upscale_layer_norm(dec.upscale_conv1(image)))
            up = dec.activation(dec.upscale_conv2(up))
        else:  # SAM 2: each upscaling adds its high-resolution map before its norm / activation
            s0, s1 = (f.expand(n, -1, -1, -1) if f.shape[0] == 1 else f for f in (feats.s0, feats.s1))
            up = dec.activation(dec.upscale_layer_norm(dec.upscale_conv1(image) + s1))
            up = dec.activation(dec.upscale_conv2(up) + s0)
        k = dec.num_mask_tokens
        hyper = torch.stack([dec.output_hypernetworks_mlps[i](q[:, :, 1 + i, :]) for i in range(k)], dim=2)
        _, cu, hu, wu = up.shape
        masks = (hyper @ up.reshape(1, n, cu, hu * wu)).reshape(n, k, hu, wu)
        iou = dec.iou_prediction_head(q[:, :, 0, :])[0]
        if not extra:
            return Decoded(masks, iou, None, None)
        sem = F.normalize(self.semantic_head(q[0, :, 1 + k: 1 + k + NUM_MASKS, :]).float(), dim=-1)
        score = self.score_head(q[0, :, 1 + k + NUM_MASKS, :])
        return Decoded(masks, iou, sem, score)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(100.0)).exp()


def box_masks(boxes: torch.Tensor, size: int, frame: int) -> torch.Tensor:
    """Boxes ``(n, 4)`` xyxy in a ``frame`` x ``frame`` input → ``(n, 1, size, size)`` the share of each cell the
    box covers (SAM's mask-prompt input: 4x the embedding grid)."""
    b = boxes.float() * (size / frame)
    edges = torch.arange(size, device=boxes.device, dtype=torch.float32)

    def cover(lo, hi):  # (n, size): overlap of [lo, hi) with each cell [i, i + 1)
        return (torch.minimum(hi[:, None], edges + 1) - torch.maximum(lo[:, None], edges)).clamp(0, 1)

    return (cover(b[:, 1], b[:, 3])[:, :, None] * cover(b[:, 0], b[:, 2])[:, None, :])[:, None]


def sam_config(image_size: int = 128, hidden: int = 32, patch_size: int = 16, layers: int = 2, heads: int = 2):
    """A tiny SAM config (ViT encoder with ``layers`` layers, the last one global, ``image_size / patch_size``
    embedding grid) for CPU training and tests."""
    from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    vision = SamVisionConfig(hidden_size=hidden, output_channels=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                             image_size=image_size, patch_size=patch_size, window_size=4, global_attn_indexes=[layers - 1],
                             mlp_dim=2 * hidden, initializer_range=0.02, num_pos_feats=hidden // 2)
    prompt = SamPromptEncoderConfig(hidden_size=hidden, image_size=image_size, patch_size=patch_size)
    decoder = SamMaskDecoderConfig(hidden_size=hidden, mlp_dim=2 * hidden, num_attention_heads=heads, iou_head_hidden_dim=hidden)
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def build(embed_dim: int, sam_model: str | None = None, image_size: int = 128, hidden: int = 32, s3=None,
          patch_size: int = 16, hires: bool = False, box_mask_prompt: bool = False) -> SemanticSam:
    """From a pretrained SAM (HF id, directory, model-store URI; a directory made by ``ovtasks train-sam`` brings its
    high-resolution path and box mask prompt, :func:`sam_extras`) or, with ``sam_model=None``, a tiny random one.
    ``hires`` adds a (new, zero-started) high-resolution path where the SAM has none; ``box_mask_prompt`` turns the
    box mask prompt on where the SAM was trained without it."""
    from transformers import SamModel

    if sam_model is None:
        sam = SamModel(sam_config(image_size, hidden, patch_size))
        return SemanticSam(sam, embed_dim, hires=HiResFeatures(hidden) if hires else None, box_mask_prompt=box_mask_prompt)
    from ovtasks.models.hub import image_processor_config, resolve_model

    path = resolve_model(sam_model, s3)
    cfg = image_processor_config(path)
    sam = SamModel.from_pretrained(path, use_safetensors=True)
    own_hires, own_box = sam_extras(path, sam.config.mask_decoder_config.hidden_size)
    if own_hires is None and hires:
        own_hires = HiResFeatures(sam.config.mask_decoder_config.hidden_size)
    return SemanticSam(sam, embed_dim, cfg.get("image_mean", (0.485, 0.456, 0.406)), cfg.get("image_std", (0.229, 0.224, 0.225)),
                       own_hires, own_box or box_mask_prompt)


def sam_extras(path: str | os.PathLike, hidden: int) -> tuple[HiResFeatures | None, bool]:
    """What a SAM directory adds to the stock model: its high-resolution path (``hires.safetensors``, None without
    one) and whether it was trained with the box as a mask prompt (``ovtasks_sam.json``'s config; False for any
    other SAM, e.g. Meta's)."""
    import json

    from safetensors.torch import load_model

    path = Path(path)
    meta = path / SAM_META
    box = bool(json.loads(meta.read_text()).get("config", {}).get("box_mask_prompt", False)) if meta.exists() else False
    if not (path / HIRES_FILE).exists():
        return None, box
    hires = HiResFeatures(hidden)
    load_model(hires, str(path / HIRES_FILE))
    return hires, box


def save(model: SemanticSam, path: str | os.PathLike) -> None:
    """``model.safetensors`` (every weight) + ``sam_config.json``; :func:`load` reads them back without pickles."""
    import json

    from safetensors.torch import save_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path / "model.safetensors"))  # SAM ties its positional embeddings: stored once
    (path / "sam_config.json").write_text(json.dumps({"sam": model.sam.config.to_dict(), "embed_dim": model.embed_dim,
                                                      "image_mean": model.mean, "image_std": model.std,
                                                      "hires": model.hires is not None,
                                                      "box_mask_prompt": model.box_mask_prompt,
                                                      "token_weight": model.token_weight}, indent=1, default=str))
    if model.namer is not None:
        model.namer.save(path / NAMER_DIR)


def load(path: str | os.PathLike, device: str = "cpu") -> SemanticSam:
    import json

    from safetensors.torch import load_model
    from transformers import SamConfig, SamModel

    path = Path(path)
    doc = json.loads((path / "sam_config.json").read_text())
    sam = SamModel(SamConfig.from_dict(doc["sam"]))
    hires = HiResFeatures(sam.config.mask_decoder_config.hidden_size) if doc.get("hires") else None
    model = SemanticSam(sam, doc["embed_dim"], doc["image_mean"], doc["image_std"], hires, doc.get("box_mask_prompt", False))
    load_model(model, str(path / "model.safetensors"))
    model.token_weight = float(doc.get("token_weight", TOKEN_WEIGHT))
    if (path / NAMER_DIR).is_dir():
        from ovtasks.models.name_cam import NameCam

        model.namer = NameCam.load(str(path / NAMER_DIR), device)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Losses (SAM's for SA-1B samples; contrastive across the batch for generated ones)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Per-mask sigmoid focal loss, mean over pixels: (..., h, w) → (...)."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    p = logits.sigmoid().flatten(-2)
    t = target.flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + eps) / (p.sum(-1) + t.sum(-1) + eps)


def mask_losses(d: Decoded, target: torch.Tensor, focal_weight: float = 20.0, pixel_loss: str = "focal") -> dict[str, torch.Tensor]:
    """SAM's supervision for ``n`` prompts with GT masks ``target`` (n, h, w): focal x20 + dice on the
    single-output mask and on the best of the 3 multimask outputs (SAM's ambiguity-aware minimum), and MSE
    between the predicted IoU and the IoU the masks actually have, for all 4. ``pixel_loss="bce"`` puts
    plain per-pixel BCE (weight 1) in place of the focal term: a small SAM trained from scratch collapsed
    to empty masks under focal x20 (objects cover ~2 % of the frame), see docs/model-quality.md."""
    t = target[:, None].expand_as(d.masks).float()
    dice = dice_loss(d.masks.float(), t)
    if pixel_loss == "focal":
        focal = focal_weight * focal_loss(d.masks.float(), t)
    elif pixel_loss == "bce":
        focal = F.binary_cross_entropy_with_logits(d.masks.float(), t, reduction="none").flatten(-2).mean(-1)
    else:
        raise ValueError(f"unknown pixel loss {pixel_loss!r}; use focal or bce")
    per = focal + dice  # (n, 4)
    best = per[:, 1:].argmin(dim=1)
    rows = torch.arange(len(per), device=per.device)
    with torch.no_grad():
        pred = d.masks > 0
        inter = (pred & t.bool()).flatten(-2).sum(-1).float()
        union = (pred | t.bool()).flatten(-2).sum(-1).float()
        actual = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return {f"loss_{pixel_loss}": (focal[:, 0] + focal[rows, best + 1]).mean(),
            "loss_dice": (dice[:, 0] + dice[rows, best + 1]).mean(),
            "loss_iou": F.mse_loss(d.iou.float(), actual)}


def contrastive_losses(semantic: torch.Tensor, score: torch.Tensor, labels: torch.Tensor, text: torch.Tensor,
                       scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """``semantic`` (P, 4, D) unit vectors of all prompts of the batch's generated samples, ``labels`` (P,)
    indices into ``text`` (V, D): InfoNCE of every semantic token against the names present in the batch
    (the batch's other names are the negatives), plus MSE of the score token to the realised cosine."""
    present, target = torch.unique(labels, return_inverse=True)
    t = F.normalize(text[present].float(), dim=-1)
    logits = scale * semantic @ t.T  # (P, 4, U)
    ce = F.cross_entropy(logits.reshape(-1, len(present)), target.repeat_interleave(semantic.shape[1]))
    cos = (semantic * t[target][:, None, :]).sum(-1)
    return {"loss_contrastive": ce, "loss_score": F.mse_loss(score.float(), cos.detach())}


def image_logits(model, low: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Decoder logits ``(n, k, low, low)`` over the padded input frame → ``(n, k, h, w)`` over the image itself
    (up to the input size, the padding cut off, up to the image's size; SAM's postprocessing)."""
    rh, rw, _ = model.resized(h, w)
    up = F.interpolate(low.float(), size=(model.image_size, model.image_size), mode="bilinear", align_corners=False)
    return F.interpolate(up[..., :rh, :rw], size=(h, w), mode="bilinear", align_corners=False)


@torch.no_grad()
def predict(model, images: Sequence[np.ndarray], image_ids: Sequence[int], boxes: Sequence[np.ndarray], category_ids: Sequence[int],
            text_embeddings: np.ndarray, device: str = "cpu", mask_threshold: float = 0.0, names: dict | None = None,
            category_names: Sequence[str] | None = None) -> list[dict]:
    """COCO predictions for box prompts ``boxes[i]`` ((n, 4) pixel xyxy) in ``images[i]``: SAM's single-output
    mask (box prompts are unambiguous), named by its semantic token's nearest text embedding; score =
    softmax probability of that name x predicted IoU; ``prompt``: the box's index in ``boxes[i]`` (a prompt
    whose mask is empty gives no prediction). ``names``, when given, receives ``{(image_id, prompt): category_id}``
    for every prompt, empty mask or not. With a namer attached (``model.namer``) and ``category_names`` given,
    the tokens' probabilities, to the power ``model.token_weight``, are multiplied by the namer's (:func:`namer_prior`,
    which also sees each prompt's mask) before the best name is taken."""
    from ovtasks.data.groundtruth import encode_rles, mask_bbox

    model.eval()
    text = F.normalize(torch.from_numpy(np.asarray(text_embeddings, np.float32)).to(device), dim=-1)
    use_namer = model.namer is not None and category_names is not None
    preds = []
    for image, image_id, bx in zip(images, image_ids, boxes):
        if not len(bx):
            continue
        h, w = image.shape[:2]
        scale = model.resized(h, w)[2]
        emb = model.embed(model.pixels(image, device)[None])
        d = model.decode(emb, torch.from_numpy(np.asarray(bx, np.float32) * scale).to(device))
        masks = (image_logits(model, d.masks[:, :1], h, w)[:, 0] > mask_threshold).cpu().numpy()
        prob = (model.scale() * d.semantic[:, 0] @ text.T).softmax(-1)
        if use_namer:
            prior = torch.from_numpy(namer_prior(model.namer, image, np.asarray(bx, np.float32), category_names, masks)).to(prob)
            prob = prob.pow(model.token_weight) * prior
            prob = prob / prob.sum(-1, keepdim=True).clamp(min=1e-12)
        p, label = prob.max(-1)
        score = p * d.iou[:, 0].clamp(0, 1)
        rles = encode_rles(masks.transpose(1, 2, 0).astype(np.uint8))
        for k, (m, rle, lab, sc) in enumerate(zip(masks, rles, label.tolist(), score.tolist())):
            if names is not None:
                names[(int(image_id), k)] = int(category_ids[lab])
            if m.any():
                preds.append({"image_id": int(image_id), "category_id": int(category_ids[lab]), "score": float(sc),
                              "bbox": mask_bbox(m), "segmentation": rle, "prompt": k})
    return preds


def namer_prior(namer, image: np.ndarray, boxes: np.ndarray, category_names: Sequence[str],
                masks: np.ndarray | None = None) -> np.ndarray:
    """``(n, K)`` the namer's belief over the requested categories for each box (and its mask, when given: the
    masked region is classified too, ``NameCam.box_name_probs``): its probabilities of the names it knows,
    renormalised over them and given their share ``|known| / K`` of the mass; a name it does not know gets
    ``1 / K`` (no opinion), so an open-vocabulary name is left to the semantic tokens."""
    k = len(category_names)
    prior = np.full((len(boxes), k), 1.0 / max(k, 1), np.float32)
    known = [j for j, n in enumerate(category_names) if namer.knows(n)]
    if known and len(boxes):
        p = namer.box_name_probs(image, boxes, masks=masks)[:, [namer.index[category_names[j]] for j in known]]
        p = p / np.clip(p.sum(1, keepdims=True), 1e-12, None)
        prior[:, known] = p * (len(known) / k)
    return prior
