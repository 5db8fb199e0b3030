"""What every pseudo-label generator shares: the :class:`Generator` interface the runner calls, the
per-pair result record, and how a model is named in manifests.

Generators (``maskfree``, ``grounded``) import this module (and share :func:`load_gdino`: Grounding-DINO is the
grounded generator's box model and a maskfree proposal source); only :mod:`ovtasks.pseudolabel.runner`
imports the generators.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from ovtasks.core.config import Settings
from ovtasks.data.clean import CleanSample
from ovtasks.pseudolabel.candidates import Candidate


GENERATORS = ("maskfree", "grounded")


def digest_path(path: str) -> str:
    """A model's files (or a hub id's name) as a 16-hex digest."""
    h = hashlib.sha256()
    if os.path.isdir(path):
        for root, _, files in sorted(os.walk(path)):
            for f in sorted(files):
                if f.endswith((".safetensors", ".pt", ".bin", ".json", ".txt")):
                    with open(os.path.join(root, f), "rb") as fh:
                        h.update(f.encode())
                        h.update(fh.read())
    elif os.path.isfile(path):
        with open(path, "rb") as fh:
            h.update(fh.read())
    else:
        h.update(path.encode())  # a hub id: its name is all we know
    return h.hexdigest()[:16]


def model_version(ref: str, settings: Settings) -> dict:
    """What names a model in manifests: the reference given and a digest of its files."""
    from ovtasks.models.hub import resolve_model

    return {"ref": ref, "digest": digest_path(resolve_model(ref, settings.s3))}


def check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")


@dataclass
class PairResult:
    """What the generator made of one (image, candidate) pair; ``mask`` None means skipped (``reason``)."""

    image_index: int
    candidate: Candidate
    score: float = 0.0
    activation: object = None  # ActivationMap
    box: np.ndarray | None = None  # xyxy
    mask: np.ndarray | None = None  # (H, W) bool
    reason: str | None = None
    proposals: np.ndarray | None = field(default=None, repr=False)
    rle: dict | None = None  # the mask as COCO RLE (generators that encode as they go)
    mask_iou: float | None = None  # the mask model's own quality estimate, when it has one
    instance: int = 0  # which of its candidate's boxes this is (> 0 only with maskfree.instances=caption)

    @property
    def has_mask(self) -> bool:
        return self.mask is not None or self.rle is not None


class Generator(Protocol):
    """A loaded pseudo-label generator (its models); the runner streams a shard through :meth:`label`."""

    name: str  # "maskfree" or "grounded": the output prefix pseudo/<name>/
    versions: dict  # what names its models in manifests (refs and digests)

    def chunk_size(self, settings: Settings) -> int:
        """Images of a shard labelled at a time."""

    def label(self, samples: Sequence[CleanSample], candidates: Sequence[Sequence[Candidate]], settings: Settings) -> list[PairResult]:
        """One :class:`PairResult` per (image, candidate) pair, or per kept box; ``image_index`` into ``samples``."""


def load_gdino(settings: Settings):
    from ovtasks.models.grounding_dino import GroundingDino

    g = settings.grounded
    if not g.gdino_model:
        raise ValueError("grounded.gdino_model is not set: point it at GroundingDinoForObjectDetection weights (HF id, directory or store URI)")
    return GroundingDino.load(g.gdino_model, settings.device, g.dtype, settings.s3, box_threshold=g.box_threshold,
                              text_threshold=g.text_threshold, nms_iou=g.nms_iou, max_detections=g.max_detections,
                              batch_size=g.batch_size)
