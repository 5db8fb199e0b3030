"""Stage 1 of Mask-free OVIS: activation maps for (image, object name) pairs (patent eq. 1-4).

For each pair the ITM model's GradCAM map (eq. 3) is taken at the object word of a text prompt
("a photo of a {name}"). Iterative masking then repeats G rounds: the most activated part (IM(phi),
the map normalised to [0, 1] and thresholded at 0.5) is replaced with the image mean and GradCAM is
recomputed, so the activation moves from the most discriminative part to the rest of the object.
The final map is the union of the rounds' IM masks (eq. 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ovtasks.models.itm import ItmModel, prompt_span

if TYPE_CHECKING:
    from ovtasks.models.name_cam import NameCam


@dataclass(frozen=True)
class ActivationMap:
    """Activation of one object name over one image, at the image's own size ``(H, W)``."""

    binary: np.ndarray  # bool: Phi_t of eq. 4, the union over rounds of IM(phi^i)
    soft: np.ndarray  # float32 in [0, 1]: max over rounds of the normalised maps (ranks pixels for WSS)
    score: float  # ITM match probability of the prompt on the unmasked image
    rounds: tuple[np.ndarray, ...]  # normalised map of each round at grid resolution (for pictures)


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max to [0, 1]; a constant map becomes all zeros. ``(B, h, w)`` → same."""
    flat = maps.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > 1e-12, (flat - lo) / span.clamp(min=1e-12), torch.zeros_like(flat))
    return out.view_as(maps)


def activation_maps(itm: ItmModel, images: Sequence[np.ndarray], names: Sequence[str], template: str,
                    rounds: int = 3, threshold: float = 0.5, batch_size: int = 16,
                    name_cam: "NameCam | None" = None) -> list[ActivationMap]:
    """One :class:`ActivationMap` per ``(images[i], names[i])`` pair; images are ``(H, W, 3)`` uint8.

    Pairs are processed in batches of ``batch_size``; an empty input returns an empty list. With ``name_cam``
    (``maskfree.activation=backbone``) a pair whose name the caption-pretrained backbone knows gets its class
    activation map instead of the ITM's GradCAM (same iterative masking), the rest the ITM's.
    """
    if len(images) != len(names):
        raise ValueError(f"{len(images)} images but {len(names)} names")
    by_cam = [name_cam is not None and name_cam.knows(n) for n in names]
    out: list[ActivationMap | None] = [None] * len(images)
    for use_cam in (False, True):
        idx = [i for i, c in enumerate(by_cam) if c == use_cam]
        for b0 in range(0, len(idx), batch_size):
            part = idx[b0:b0 + batch_size]
            ims, ns = [images[i] for i in part], [names[i] for i in part]
            if use_cam:
                maps = _batch(lambda pix, ns=ns: name_cam.name_maps(pix, ns), name_cam.image_size, name_cam.device,
                              ims, rounds, threshold)
            else:
                maps = _batch(_itm_gradcam(itm, ns, template), itm.image_size, itm.device, ims, rounds, threshold)
            for i, m in zip(part, maps):
                out[i] = m
    return out  # type: ignore[return-value]


def _itm_gradcam(itm: ItmModel, names: Sequence[str], template: str):
    """``pixels (B, 3, S, S) in [0, 255] -> (GradCAM maps, match probabilities)`` of the names' prompts."""
    prompts, spans = zip(*[prompt_span(template, n) for n in names])
    ids, am, wm = itm.tokenize(prompts, spans)

    def cam(pixels: torch.Tensor):
        c = itm.gradcam(itm.preprocess(pixels), ids, am, wm)
        return c.maps, c.scores
    return cam


def _batch(cam, s: int, device, images, rounds, threshold) -> list[ActivationMap]:
    """Eq. 4's rounds for one batch: ``cam(pixels)`` gives each image's map of its name and a match score."""
    pix = torch.stack([
        F.interpolate(torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].float(), size=(s, s),
                      mode="bilinear", align_corners=False, antialias=True)[0]
        for im in images]).to(device)  # (B, 3, S, S) in [0, 255]
    means = torch.stack([torch.from_numpy(np.ascontiguousarray(im)).float().mean((0, 1)) for im in images]).to(device)
    union = torch.zeros(len(images), s, s, dtype=torch.bool, device=device)
    soft = torch.zeros(len(images), s, s, device=device)
    per_round, score = [], None
    current = pix.clone()
    for _ in range(rounds):
        maps, scores = cam(current)
        if score is None:
            score = scores
        norm = normalise(maps)
        per_round.append(norm.cpu().numpy())
        up = F.interpolate(norm[:, None], size=(s, s), mode="bilinear", align_corners=False)[:, 0]
        im_mask = up >= threshold
        im_mask &= up > 0  # an all-zero map activates nothing
        union |= im_mask
        soft = torch.maximum(soft, up)
        # replace the most activated part with the image mean, then look again
        current = torch.where(im_mask[:, None], means[:, :, None, None].expand_as(current), current)
    results = []
    for i, im in enumerate(images):
        h, w = im.shape[:2]
        soft_i = F.interpolate(soft[i][None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        bin_i = F.interpolate(union[i][None, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0] >= 0.5
        results.append(ActivationMap(bin_i.cpu().numpy(), soft_i.cpu().numpy().astype(np.float32), float(score[i]),
                                     tuple(r[i] for r in per_round)))
    return results


@torch.no_grad()
def crop_match_probs(itm: ItmModel, queries: Sequence[tuple[np.ndarray, np.ndarray, str]], template: str,
                     context: float = 0.1, batch: int = 64) -> list[np.ndarray]:
    """For each ``(image, boxes (n, 4) xyxy, name)``: the ITM's match probability of the prompt for ``name``
    on each box's crop (the box grown by ``context`` x its side, clipped), resized to the model's input
    (``maskfree.box_rerank=crop`` re-ranks eq. 6's boxes by it)."""
    from ovtasks.models.preprocess import box_crops

    crops, texts, counts = [], [], []
    for image, boxes, name in queries:
        crops += box_crops(image, boxes, context, itm.image_size)
        texts += [prompt_span(template, name)[0]] * len(boxes)
        counts.append(len(boxes))
    probs = [ps[0] for ps in itm.match_probs(torch.stack(crops), [[t] for t in texts], batch)] if crops else []
    out, k = [], 0
    for n in counts:
        out.append(np.asarray(probs[k:k + n], np.float64))
        k += n
    return out
