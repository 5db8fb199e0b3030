"""Image preprocessing shared by the model wrappers: dtype choice, resize + normalise onto the device, the
shortest-edge size rule of the Hugging Face processors, ImageNet-normalised batches."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` is bf16 on CUDA and fp32 elsewhere; half precision on the CPU is refused (slow, and
    some kernels are missing)."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    if dtype == "float16" and not device.startswith("cuda"):
        raise ValueError("float16 needs a CUDA device; use float32 or bfloat16 on the CPU")
    return DTYPES[dtype]


def resize_normalise(image: np.ndarray, size: tuple[int, int], mean, std, device: str, dtype: torch.dtype) -> torch.Tensor:
    """``(H, W, 3)`` uint8 → ``(3, h, w)`` normalised tensor, bilinear with antialiasing."""
    x = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None].float() / 255.0
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return ((x - m) / s)[0].to(dtype)


def shortest_edge_size(h: int, w: int, shortest: int, longest: int) -> tuple[int, int]:
    """DETR-style resize: the short side to ``shortest`` unless the long side would pass ``longest``."""
    scale = shortest / min(h, w)
    if max(h, w) * scale > longest:
        scale = longest / max(h, w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


IMAGE_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics
IMAGE_STD = (0.229, 0.224, 0.225)


def wspn_input(images: Sequence[np.ndarray], device: str = "cpu") -> torch.Tensor:
    """Same-size uint8 images → normalised ``(B, 3, H, W)``."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().to(device) / 255.0
    mean = torch.tensor(IMAGE_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def box_crops(image: np.ndarray, boxes, context: float, size: int, masks: np.ndarray | None = None,
              fill: Sequence[float] | None = None) -> list[torch.Tensor]:
    """Each xyxy box of ``image`` (H, W, 3) uint8 grown by ``context`` x its side on every side, clipped to the
    image (at least one pixel), resized to ``(3, size, size)`` float in [0, 255] (antialiased bilinear). With
    ``masks`` ((n, H, W) bool, one per box), pixels outside a box's mask take the colour ``fill`` first."""
    from ovtasks.core.imaging import grow_box

    h, w = image.shape[:2]
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    colour = None if masks is None else torch.tensor(fill, dtype=torch.float32).view(1, 3, 1, 1)
    crops = []
    for k, b in enumerate(boxes):
        x1, y1, x2, y2 = grow_box(b, context, (h, w))
        x1, y1 = min(int(x1), w - 1), min(int(y1), h - 1)
        x2, y2 = max(int(np.ceil(x2)), x1 + 1), max(int(np.ceil(y2)), y1 + 1)
        region = t[..., y1:y2, x1:x2]
        if colour is not None:
            region = torch.where(torch.from_numpy(np.ascontiguousarray(masks[k][y1:y2, x1:x2])), region, colour)
        crops.append(F.interpolate(region, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0])
    return crops
