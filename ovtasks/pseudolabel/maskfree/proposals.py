"""Stage 2 of Mask-free OVIS: box proposals for an image.

Sources (pluggable through :class:`ProposalSource`): selective search (OpenCV contrib, unsupervised)
the WSPN, which scores and refines selective-search boxes and keeps the top K, and Grounding-DINO
boxes for the image's object names (patent Table 5 compares proposal generators). Boxes are float
``(N, 4)`` xyxy in image pixels.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, Sequence

import numpy as np
import torch

from ovtasks.models.preprocess import wspn_input
from ovtasks.models.wspn import WSPN, top_proposals


class ProposalSource(Protocol):
    name: str

    def propose(self, images: Sequence[np.ndarray], names: Sequence[Sequence[str]] | None = None) -> list[np.ndarray]:
        """Per image ``(H, W, 3)`` uint8 → ``(N, 4)`` float32 xyxy boxes (N may be 0). ``names`` are the
        image's object candidates; text-free sources ignore them."""


def selective_search(image: np.ndarray, max_side: int = 160, min_size: int = 6, max_boxes: int = 400) -> np.ndarray:
    """Selective-search boxes (OpenCV "fast" mode) as ``(N, 4)`` float32 xyxy in ``image`` pixels.

    The image is searched at ``max_side`` (speed) and boxes are scaled back; boxes smaller than
    ``min_size`` pixels on a side and exact duplicates are dropped, and the first ``max_boxes`` in coordinate
    order are kept. A blank image yields few or no boxes. Every region is considered before that cut: OpenCV
    returns them in an order that differs from call to call, so cutting its list first made an image with
    more than ``2 * max_boxes`` regions give other boxes on every run.
    """
    import cv2

    cv2.setNumThreads(1)
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA) if scale < 1 else image
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(small[..., ::-1]))  # OpenCV wants BGR
    ss.switchToSelectiveSearchFast()
    rects = ss.process()
    if rects is None or len(rects) == 0:
        return np.zeros((0, 4), np.float32)
    rects = np.asarray(rects, np.float32) / scale
    boxes = np.stack([rects[:, 0], rects[:, 1], rects[:, 0] + rects[:, 2], rects[:, 1] + rects[:, 3]], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
    boxes = np.unique(np.round(boxes[keep]), axis=0)[:max_boxes]
    return boxes.astype(np.float32)


class SelectiveSearch:
    """Selective search over a batch of images, ``threads`` images at a time.

    OpenCV releases the GIL inside ``process()`` and each call is single-threaded, so a thread pool
    over the batch uses every core (profiling showed one core busy and the rest idle: 61 % of a
    maskfree run was this loop). Results are in input order and identical to the sequential loop.
    """

    name = "selective_search"

    def __init__(self, max_boxes: int = 400, threads: int | None = None):
        self.max_boxes = max_boxes
        self.threads = max(1, threads if threads is not None else len(os.sched_getaffinity(0)))
        self._pool: ThreadPoolExecutor | None = None

    def propose(self, images: Sequence[np.ndarray], names: Sequence[Sequence[str]] | None = None) -> list[np.ndarray]:
        if self.threads == 1 or len(images) < 2:
            return [selective_search(im, max_boxes=self.max_boxes) for im in images]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="selective-search")
        return list(self._pool.map(lambda im: selective_search(im, max_boxes=self.max_boxes), images))


class WSPNProposals:
    """Selective-search boxes scored and refined by a trained WSPN; top K per image."""

    name = "wspn"

    def __init__(self, model: WSPN, top_k: int = 50, device: str = "cpu", base: SelectiveSearch | None = None):
        self.model, self.top_k, self.device = model.to(device).eval(), top_k, device
        self.base = base or SelectiveSearch()

    def propose(self, images: Sequence[np.ndarray], names: Sequence[Sequence[str]] | None = None) -> list[np.ndarray]:
        return self.propose_with_scores(images, [[] for _ in images])[0]

    @torch.no_grad()
    def propose_with_scores(self, images: Sequence[np.ndarray], names: Sequence[Sequence[str]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per image, the refined top-K boxes and ``(n_boxes, len(names[i]))``: the WSPN's instance score
        ``W[box, name]`` divided by its best box's (1 for the box it rates highest for that name; NaN for a name
        the WSPN has no class for)."""
        raw = self.base.propose(images)
        index = {n: j for j, n in enumerate(self.model.cfg.class_names)}
        boxes_out, scores_out = [], []
        for im, boxes, ns in zip(images, raw, names):  # one at a time: images may differ in size
            b = torch.from_numpy(boxes).to(self.device)
            res = self.model(wspn_input([im], self.device), [b])[0]
            top, _, kept = top_proposals(res, b, self.top_k, im.shape[:2], return_index=True)
            w = res["W"][kept]
            cols = np.full((len(top), len(ns)), np.nan)
            for j, n in enumerate(ns):
                if n in index and len(top):
                    col = w[:, index[n]]
                    cols[:, j] = (col / col.max().clamp(min=1e-12)).cpu().numpy()
            boxes_out.append(top.cpu().numpy().astype(np.float32))
            scores_out.append(cols)
        return boxes_out, scores_out


class GDinoProposals:
    """Grounding-DINO boxes for each image's object names, all names pooled, the top K by score."""

    name = "gdino"

    def __init__(self, gdino, top_k: int = 50):
        self.gdino, self.top_k = gdino, top_k

    def propose(self, images: Sequence[np.ndarray], names: Sequence[Sequence[str]] | None = None) -> list[np.ndarray]:
        if names is None:
            raise ValueError("Grounding-DINO proposals need each image's object names")
        return [d.boxes[: self.top_k] for d in self.gdino.detect(images, names)]
