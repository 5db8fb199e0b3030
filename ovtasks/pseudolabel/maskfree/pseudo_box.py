"""Stage 3 of Mask-free OVIS: the pseudo box (patent eq. 6).

``b* = argmax_b sum_{p in b} Phi(p) / sqrt(|b|)`` over the proposals, with ``Phi`` the activation map
(eq. 4). Box sums come from an integral image, so scoring K boxes costs O(HW + K). ``exponent`` (0.5 in the
patent) is the power of the area in the denominator: lower favours larger boxes (a measured option,
``maskfree.box_area_exponent``). ``ring > 0`` (``maskfree.box_ring``, off in the patent) scores a box by its
contrast with its surroundings instead: from the box's sum it subtracts its area times the mean ``Phi`` of the
ring around it (the box grown by ``ring`` x its side on every side), so a box inside a wide activated area or one
that cuts an activated blob scores less than one that encloses the blob.
"""

from __future__ import annotations

import numpy as np


def _sums(ii: np.ndarray, boxes: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    b = np.round(np.asarray(boxes, np.float64)).astype(np.int64)
    x1, x2 = np.clip(b[:, 0], 0, w), np.clip(b[:, 2], 0, w)
    y1, y2 = np.clip(b[:, 1], 0, h), np.clip(b[:, 3], 0, h)
    area = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    return ii[y2, x2] - ii[y1, x2] - ii[y2, x1] + ii[y1, x1], area


def box_scores(activation: np.ndarray, boxes: np.ndarray, exponent: float = 0.5, ring: float = 0.0) -> np.ndarray:
    """Eq. 6 score of each ``(K, 4)`` xyxy box over ``activation`` ``(H, W)`` (with ``ring > 0``, less the
    surrounding ring's mean times the box's area); boxes with no pixel inside the image score ``-inf``."""
    if len(boxes) == 0:
        return np.zeros(0, np.float64)
    h, w = activation.shape
    ii = np.zeros((h + 1, w + 1), np.float64)
    ii[1:, 1:] = np.asarray(activation, np.float64).cumsum(0).cumsum(1)
    total, area = _sums(ii, boxes, h, w)
    if ring > 0:
        b = np.asarray(boxes, np.float64)
        dx, dy = ring * (b[:, 2] - b[:, 0]), ring * (b[:, 3] - b[:, 1])
        outer, outer_area = _sums(ii, np.stack([b[:, 0] - dx, b[:, 1] - dy, b[:, 2] + dx, b[:, 3] + dy], 1), h, w)
        ring_area = outer_area - area
        ring_mean = np.where(ring_area > 0, (outer - total) / np.maximum(ring_area, 1), 0.0)
        total = total - area * ring_mean
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.sqrt(np.maximum(area, 1)) if exponent == 0.5 else np.power(np.maximum(area, 1).astype(np.float64), exponent)
        score = np.where(area > 0, total / norm, -np.inf)
    return score


def pseudo_box(activation: np.ndarray, boxes: np.ndarray, exponent: float = 0.5,
               ring: float = 0.0) -> tuple[np.ndarray | None, str | None]:
    """``(b*, None)``, or ``(None, reason)`` when there are no proposals, the map is empty or every
    proposal has zero area."""
    top, _, reason = best_boxes(activation, boxes, exponent, ring, 1)
    return (None, reason) if reason else (np.asarray(boxes[top[0]], np.float32), None)


def best_boxes(activation: np.ndarray, boxes: np.ndarray, exponent: float = 0.5, ring: float = 0.0,
               n: int = 1) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Indices of eq. 6's ``n`` best proposals (best first) and their scores relative to the best one
    (only boxes with a positive score), or empty arrays and the reason :func:`pseudo_box` gives."""
    empty = np.zeros(0, np.int64), np.zeros(0, np.float64)
    if len(boxes) == 0:
        return (*empty, "no_proposals")
    if not np.any(activation > 0):
        return (*empty, "empty_activation")
    scores = box_scores(activation, boxes, exponent, ring)
    order = np.argsort(-scores, kind="stable")
    best = scores[order[0]]
    if not np.isfinite(best) or best <= 0:
        return (*empty, "zero_area_boxes" if not np.isfinite(best) else "no_activation_in_proposals")
    order = np.array([i for i in order[:n] if np.isfinite(scores[i]) and scores[i] > 0], np.int64)
    return order, scores[order] / best, None


def rerank(relative: np.ndarray, second: np.ndarray, weight: float) -> int:
    """Position (in ``relative``) of the box that maximises eq. 6's relative score x a second opinion in
    [0, 1] (``maskfree.box_rerank``) ** ``weight``; ties go to eq. 6's order; a missing opinion (NaN) is 0."""
    match = np.nan_to_num(np.asarray(second, np.float64), nan=0.0)
    return int(np.argmax(relative * np.power(np.clip(match, 1e-6, 1.0), weight)))
