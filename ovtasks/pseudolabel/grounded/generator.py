"""The grounded pseudo-label generator (thesis pipeline): object candidates → Grounding-DINO boxes → SAM masks.

Per micro-batch of images: every image's candidate names go into one Grounding-DINO prompt (chunked
past the model's text length), boxes are decoded per image with NMS per category, and SAM decodes all
of an image's boxes against one image embedding. One :class:`~ovtasks.pseudolabel.base.PairResult` per
kept box (the category is the candidate the box was grounded to, the score Grounding-DINO's); a
candidate that got no box is reported as skipped (``no_box``).

The same Grounding-DINO model serves the maskfree generator as its proposal source
(``maskfree.proposals: gdino``, :class:`ovtasks.pseudolabel.maskfree.proposals.GDinoProposals`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

from ovtasks.core.config import Settings
from ovtasks.data.clean import CleanSample
from ovtasks.pseudolabel.base import PairResult, check_device, load_gdino, model_version
from ovtasks.pseudolabel.candidates import Candidate


@dataclass
class GroundedModels:
    gdino: object  # GroundingDino
    sam: object  # SamSegmenter
    versions: dict
    name: str = "grounded"

    def chunk_size(self, settings: Settings) -> int:
        return settings.grounded.batch_size * settings.grounded.pipeline_depth

    def label(self, samples: Sequence[CleanSample], candidates: Sequence[Sequence[Candidate]], settings: Settings) -> list:
        return label_grounded(samples, candidates, self)


def load_grounded(settings: Settings) -> GroundedModels:
    from ovtasks.models.sam import SamSegmenter
    
    g = settings.grounded
    check_device(settings.device)
    if not g.sam_model:
        raise ValueError("grounded.sam_model is not set: point it at SamModel weights (HF id, directory or store URI)")
    gdino = load_gdino(settings)
    sam = SamSegmenter.load(g.sam_model, settings.device, g.dtype, settings.s3, batch_size=g.batch_size, box_batch=g.box_batch)
    versions = {"gdino": model_version(g.gdino_model, settings), "sam": model_version(g.sam_model, settings),
                "dtype": str(gdino.dtype).replace("torch.", "")}
    return GroundedModels(gdino, sam, versions)


def _segment_on(sam, stream, images, boxes):
    import torch

    with torch.cuda.stream(stream) if stream is not None else nullcontext():
        return sam.segment(images, boxes)  # its results are on the CPU: the stream has finished when this returns


def detect_and_segment(models: GroundedModels, images: list, names: list, category_ids: list) -> tuple[list, list]:
    """Grounding-DINO boxes, then SAM masks, per image. With more than one micro-batch of images
    (``gdino.batch_size``), a two-stage pipeline: SAM segments micro-batch k on a worker thread (its own
    CUDA stream on a GPU) while Grounding-DINO detects on micro-batch k+1. Every image is detected and
    segmented exactly as in the plain order; only the two models' work overlaps."""
    step = max(1, int(getattr(models.gdino, "batch_size", len(images)) or len(images)))
    parts = [range(s, min(len(images), s + step)) for s in range(0, len(images), step)]
    if len(parts) < 2:
        dets = models.gdino.detect(images, names, category_ids)
        return dets, models.sam.segment(images, [d.boxes for d in dets])
    stream = None
    if str(getattr(models.sam, "device", "cpu")).startswith("cuda"):
        import torch

        stream = torch.cuda.Stream(device=models.sam.device)
    dets, futures = [], []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sam-stage") as pool:
        for part in parts:
            d = models.gdino.detect([images[i] for i in part], [names[i] for i in part], [category_ids[i] for i in part])
            dets += d
            futures.append(pool.submit(_segment_on, models.sam, stream, [images[i] for i in part], [x.boxes for x in d]))
        masks = [m for f in futures for m in f.result()]
    return dets, masks


def label_grounded(samples: Sequence[CleanSample], candidates: Sequence[Sequence[Candidate]], models: GroundedModels) -> list:
    todo = [i for i, c in enumerate(candidates) if c]
    if not todo:
        return []
    images = [samples[i].image for i in todo]
    dets, masks = detect_and_segment(models, images, [[c.name for c in candidates[i]] for i in todo],
                                     [[c.category_id for c in candidates[i]] for i in todo])
    results = []
    for i, det, bm in zip(todo, dets, masks):
        cands = candidates[i]
        for j, box in enumerate(det.boxes):
            r = PairResult(i, cands[int(det.labels[j])], float(det.scores[j]), box=box, mask_iou=float(bm.iou[j]))
            if bm.areas[j] > 0:
                r.rle = bm.rles[j]
            else:
                r.reason = "empty_mask"
            results.append(r)
        found = {int(k) for k in det.labels}
        results += [PairResult(i, c, reason="no_box") for j, c in enumerate(cands) if j not in found]
    return results
