"""SAM masks from boxes (transformers ``SamModel``), one image embedding per image.

Loads weights by Hugging Face id, local directory or model-store URI; :func:`save_tiny` writes a tiny
random model in the same layout for offline tests and CPU benchmarks.

:meth:`SamSegmenter.segment` resizes each image's long side to the vision encoder's input size and
pads it to a square (SAM's own preprocessing, done here in torch so that a micro-batch of images is
one tensor), computes the image embeddings once per image in micro-batches of ``batch_size``, then
decodes all boxes of the micro-batch together (``box_batch`` at a time, each box paired with its own
image's embedding) with multi-mask output, keeping the mask with the highest predicted IoU. Masks are upsampled and thresholded on the device, as many
at a time as ``pixel_budget`` allows (so a 4000x3000 image with many boxes never holds all its
full-size masks at once), and come back as COCO RLE at the original image size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ovtasks.data.groundtruth import encode_rles
from ovtasks.models.preprocess import resize_normalise, resolve_dtype
from ovtasks.models.hub import image_processor_config, resolve_model


@dataclass
class BoxMasks:
    """SAM's answer for one image's boxes, in the boxes' order."""

    rles: list[dict]  # COCO RLE at the image size
    areas: np.ndarray  # (N,) pixels
    iou: np.ndarray  # (N,) SAM's predicted IoU of the chosen mask

    @classmethod
    def empty(cls) -> "BoxMasks":
        return cls([], np.zeros(0, np.int64), np.zeros(0, np.float32))


class SamSegmenter:
    def __init__(self, model, mean, std, device: str = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 4,
                 box_batch: int = 64, mask_threshold: float = 0.0, pixel_budget: int = 1 << 26, extras=None):
        self.model = model.to(device=device, dtype=dtype).eval()
        # a SAM made by `ovtasks train-sam --hires / --box-mask-prompt` decodes through SemanticSam.decode (the stock
        # decoder with its additions); None: transformers' own prompt encoder and mask decoder
        self.extras = None if extras is None else extras.to(device=device, dtype=dtype).eval()
        self.size = int(model.config.vision_config.image_size)
        self.mean, self.std, self.device, self.dtype = tuple(mean), tuple(std), device, dtype
        self.batch_size, self.box_batch, self.mask_threshold = batch_size, box_batch, mask_threshold
        self.pixel_budget = pixel_budget  # upsampled mask pixels held at once

    @classmethod
    def load(cls, ref: str, device: str = "cpu", dtype: str = "auto", s3=None, **kwargs) -> "SamSegmenter":
        from transformers import SamModel

        from ovtasks.models.semantic_sam import SemanticSam, sam_extras

        path = resolve_model(ref, s3)
        model = SamModel.from_pretrained(path, use_safetensors=True)
        cfg = image_processor_config(path)
        mean, std = cfg.get("image_mean", (0.485, 0.456, 0.406)), cfg.get("image_std", (0.229, 0.224, 0.225))
        hires, box_prompt = sam_extras(path, model.config.mask_decoder_config.hidden_size)
        extras = SemanticSam(model, 1, mean, std, hires, box_prompt) if hires is not None or box_prompt else None
        return cls(model, mean, std, device, resolve_dtype(dtype, device), extras=extras, **kwargs)

    def _resized(self, h: int, w: int) -> tuple[int, int, float]:
        scale = self.size / max(h, w)
        return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5)), scale

    def _pixels(self, image: np.ndarray) -> torch.Tensor:
        h, w = image.shape[:2]
        rh, rw, _ = self._resized(h, w)
        x = resize_normalise(image, (rh, rw), self.mean, self.std, self.device, self.dtype)
        return F.pad(x, (0, self.size - rw, 0, self.size - rh))

    @torch.inference_mode()
    def embed(self, images: Sequence[np.ndarray]):
        """Image embeddings ``(B, C, h, w)`` for images of any sizes (with ``extras``: their ImageFeatures)."""
        x = torch.stack([self._pixels(im) for im in images])
        return self.model.get_image_embeddings(x) if self.extras is None else self.extras.embed(x)

    @torch.inference_mode()
    def segment(self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> list[BoxMasks]:
        """Masks for ``boxes[i]`` (``(N_i, 4)`` pixel xyxy) in ``images[i]``.

        The mask decoder runs on all boxes of a micro-batch of images together, ``box_batch`` boxes per call:
        each box is its own decoder batch row paired with its image's embedding (what SAM does inside for one
        image's boxes), so no box is padded and the masks equal decoding image by image."""
        if len(images) != len(boxes):
            raise ValueError(f"{len(images)} images but {len(boxes)} box arrays")
        out: list[BoxMasks] = [BoxMasks.empty() for _ in images]
        todo = [i for i, b in enumerate(boxes) if len(b)]
        for b0 in range(0, len(todo), self.batch_size):
            idx = todo[b0: b0 + self.batch_size]
            emb = self.embed([images[i] for i in idx])
            owner = np.concatenate([np.full(len(boxes[i]), k) for k, i in enumerate(idx)])
            scaled = np.concatenate([self._scaled(images[i].shape[:2], np.asarray(boxes[i], np.float32)) for i in idx])
            chosen, ious = [], []
            for c0 in range(0, len(scaled), self.box_batch):
                sel = torch.from_numpy(owner[c0: c0 + self.box_batch]).to(emb.device)
                c, iou = self._best_masks(emb[sel], scaled[c0: c0 + self.box_batch, None])
                chosen.append(c[:, 0])
                ious.append(iou[:, 0])
            chosen, ious = torch.cat(chosen), torch.cat(ious)
            start = 0
            for i in idx:
                end = start + len(boxes[i])
                out[i] = self._to_box_masks(chosen[start:end], ious[start:end], images[i].shape[:2])
                start = end
        return out

    def _scaled(self, hw: tuple[int, int], boxes: np.ndarray) -> np.ndarray:
        return boxes * self._resized(*hw)[2]

    def _best_masks(self, emb, boxes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits of the highest-IoU mask per box ``(B, n, mh, mw)`` and that IoU ``(B, n)`` for
        ``boxes`` ``(B, n, 4)`` already in the encoder's input frame."""
        bx = torch.from_numpy(np.ascontiguousarray(boxes)).to(self.device, self.dtype)
        if self.extras is None:
            sparse, dense = self.model.prompt_encoder(input_points=None, input_labels=None, input_boxes=bx, input_masks=None)
            low, iou = self.model.mask_decoder(image_embeddings=emb, image_positional_embeddings=self._pos(len(emb)),
                                               sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True)
        else:  # the same multimask outputs (1..3 of SemanticSam's 4), every box its own row
            b, n = bx.shape[:2]
            d = self.extras.decode(emb if b == 1 else emb[torch.arange(b, device=bx.device).repeat_interleave(n)],
                                   bx.reshape(-1, 4), extra=False)
            low, iou = d.masks[:, 1:].reshape(b, n, 3, *d.masks.shape[-2:]), d.iou[:, 1:].reshape(b, n, 3)
        low, iou = low.float(), iou.float()  # (B, n, 3, mh, mw), (B, n, 3)
        best = iou.argmax(dim=2, keepdim=True)
        chosen = torch.take_along_dim(low, best[..., None, None], dim=2)[:, :, 0]
        return chosen, torch.take_along_dim(iou, best, dim=2)[..., 0]

    def _pos(self, batch: int) -> torch.Tensor:
        pos = self.model.get_image_wide_positional_embeddings()
        return pos.expand(batch, *pos.shape[1:]) if pos.shape[0] != batch else pos

    def _to_box_masks(self, chosen: torch.Tensor, ious: torch.Tensor, hw: tuple[int, int]) -> BoxMasks:
        rles, areas = self._rles(chosen, hw)
        return BoxMasks(rles, np.asarray(areas, np.int64), ious.cpu().numpy().astype(np.float32))

    def _rles(self, chosen: torch.Tensor, hw: tuple[int, int]) -> tuple[list[dict], list[int]]:
        """Low-res logits ``(n, mh, mw)`` → COCO RLEs and areas at the image size, a bounded number at a time."""
        h, w = hw
        rh, rw, _ = self._resized(h, w)
        rles, areas = [], []
        per = max(1, int(self.pixel_budget // max(self.size * self.size, h * w)))
        for m0 in range(0, len(chosen), per):  # full-size masks a bounded number at a time
            up = F.interpolate(chosen[m0: m0 + per, None], size=(self.size, self.size), mode="bilinear", align_corners=False)
            up = F.interpolate(up[..., :rh, :rw], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            masks = up > self.mask_threshold
            areas += masks.sum(dim=(1, 2)).cpu().tolist()
            # (n, w, h) C order read as (h, w, n) is the Fortran layout pycocotools wants: no copy
            rles += encode_rles(masks.transpose(1, 2).to(torch.uint8).contiguous().cpu().numpy().transpose(2, 1, 0))
        return rles, areas

    @torch.inference_mode()
    def _decode(self, emb: torch.Tensor, hw: tuple[int, int], boxes: np.ndarray) -> BoxMasks:
        """One image's boxes against its single embedding, ``box_batch`` at a time (the per-image path, kept
        as the reference that :meth:`segment` is checked and benchmarked against)."""
        if not len(boxes):
            return BoxMasks.empty()
        chosen, ious = [], []
        for b0 in range(0, len(boxes), self.box_batch):
            c, iou = self._best_masks(emb, self._scaled(hw, boxes[b0: b0 + self.box_batch])[None])
            chosen.append(c[0])
            ious.append(iou[0])
        return self._to_box_masks(torch.cat(chosen), torch.cat(ious), hw)


def save_tiny(path: str | os.PathLike, image_size: int = 128, hidden: int = 32, seed: int = 0, full: bool = False) -> str:
    """Write a tiny random SAM (ViT encoder, 2 layers) with its image processor config to ``path``;
    ``full`` writes the real ViT-B architecture (transformers' defaults, 1024 px) with random weights."""
    from transformers import SamConfig, SamImageProcessor, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if full:
        SamModel(SamConfig()).save_pretrained(path)
        SamImageProcessor().save_pretrained(path)
        return str(path)
    vision = SamVisionConfig(hidden_size=hidden, output_channels=hidden, num_hidden_layers=2, num_attention_heads=2,
                             image_size=image_size, patch_size=16, window_size=4, global_attn_indexes=[1],
                             mlp_dim=2 * hidden, initializer_range=0.02, num_pos_feats=hidden // 2)
    prompt = SamPromptEncoderConfig(hidden_size=hidden, image_size=image_size, patch_size=16)
    decoder = SamMaskDecoderConfig(hidden_size=hidden, mlp_dim=2 * hidden, num_attention_heads=2, iou_head_hidden_dim=hidden)
    SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)).save_pretrained(path)
    SamImageProcessor(size={"longest_edge": image_size}, pad_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return str(path)
