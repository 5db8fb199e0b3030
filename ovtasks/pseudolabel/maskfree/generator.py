"""The Mask-free OVIS generator (patent FIG. 2): per chunk of a shard, stages 2-5 for every (image, candidate)
pair: the ITM activation map with iterative masking, proposals, the eq. 6 pseudo box, the eq. 7 WSS mask."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ovtasks import __version__
from ovtasks.core.config import Settings
from ovtasks.data.clean import CleanSample
from ovtasks.pseudolabel.base import PairResult, check_device, digest_path, load_gdino, model_version
from ovtasks.pseudolabel.candidates import Candidate


@dataclass
class MaskFreeModels:
    itm: object  # ItmModel
    proposals: object  # ProposalSource
    versions: dict
    name: str = "maskfree"
    name_cam: object = None  # NameCam when maskfree.activation or box_rerank is backbone (or namer)
    sam: object = None  # SamSegmenter when maskfree.mask_stage is sam or box_rerank is namer

    def chunk_size(self, settings: Settings) -> int:
        return settings.label_chunk

    def label(self, samples: Sequence[CleanSample], candidates: Sequence[Sequence[Candidate]], settings: Settings) -> list[PairResult]:
        return label_images(samples, candidates, self, settings)


def load_maskfree(settings: Settings) -> MaskFreeModels:
    """The ITM model and proposal source named by ``settings.maskfree`` (ids, directories or store URIs)."""
    from ovtasks.models.hub import resolve_model
    from ovtasks.models.itm import ItmModel
    from ovtasks.models.wspn import load_wspn
    from ovtasks.pseudolabel.maskfree.proposals import GDinoProposals, SelectiveSearch, WSPNProposals

    cfg = settings.maskfree
    check_device(settings.device)
    if not cfg.itm_model:
        raise ValueError("maskfree.itm_model is not set: train one with `ovtasks train-itm` or point it at BLIP ITM weights")
    itm_path = resolve_model(cfg.itm_model, settings.s3)
    itm = ItmModel.load(itm_path, settings.device, cfg.itm_layer)
    versions = {"itm": {"ref": cfg.itm_model, "digest": digest_path(itm_path), "layer": itm.layer}, "code": __version__}
    name_cam = None
    if "backbone" in (cfg.activation, cfg.box_rerank) or cfg.box_rerank == "namer":
        from ovtasks.models.name_cam import NameCam

        if not cfg.backbone_model:
            raise ValueError(f"maskfree.activation={cfg.activation} / box_rerank={cfg.box_rerank} needs "
                             "maskfree.backbone_model (`ovtasks pretrain-backbone` output)")
        bb_path = resolve_model(cfg.backbone_model, settings.s3)
        name_cam = NameCam.load(bb_path, settings.device)
        versions["backbone"] = {"ref": cfg.backbone_model, "digest": digest_path(bb_path), "activation": cfg.activation,
                                "box_rerank": cfg.box_rerank}
    sam = None
    if cfg.mask_stage == "sam" or cfg.box_rerank == "namer":
        from ovtasks.models.sam import SamSegmenter

        g = settings.grounded
        if not g.sam_model:
            raise ValueError(f"maskfree.mask_stage={cfg.mask_stage} / box_rerank={cfg.box_rerank} needs grounded.sam_model "
                             "(SamModel weights: HF id, directory or store URI; `ovtasks train-sam` makes one)")
        sam = SamSegmenter.load(g.sam_model, settings.device, g.dtype, settings.s3, batch_size=g.batch_size,
                                box_batch=g.box_batch)
        versions["sam"] = {**model_version(g.sam_model, settings), "mask_stage": cfg.mask_stage}
    if cfg.proposals == "wspn":
        if not cfg.wspn_model:
            raise ValueError("maskfree.wspn_model is not set: train one with `ovtasks train-wspn` or use proposals=selective_search")
        wspn_path = resolve_model(cfg.wspn_model, settings.s3)
        import os

        if os.path.isdir(wspn_path):
            wspn_path = os.path.join(wspn_path, "wspn.pt")
        model, _ = load_wspn(wspn_path, settings.device)
        proposals = WSPNProposals(model, cfg.top_k, settings.device)
        versions["wspn"] = {"ref": cfg.wspn_model, "digest": digest_path(wspn_path), "top_k": cfg.top_k}
    elif cfg.proposals == "gdino":
        proposals = GDinoProposals(load_gdino(settings), cfg.top_k)
        versions["gdino"] = {**model_version(settings.grounded.gdino_model, settings), "top_k": cfg.top_k}
    else:
        proposals = SelectiveSearch()
        versions["proposals"] = "selective_search"
    return MaskFreeModels(itm, proposals, versions, name_cam=name_cam, sam=sam)


def label_images(samples: Sequence[CleanSample], candidates: Sequence[Sequence[Candidate]], models: MaskFreeModels,
                 settings: Settings, keep_maps: bool = False) -> list[PairResult]:
    """Run stages 2-5 for already-extracted candidates; one :class:`PairResult` per (image, candidate)."""
    from ovtasks.pseudolabel.maskfree.activation import activation_maps
    from ovtasks.pseudolabel.maskfree.pseudo_box import best_boxes, box_scores, rerank
    from ovtasks.core.imaging import grow_box
    from ovtasks.pseudolabel.maskfree.wss import WssJob, point_map

    cfg = settings.maskfree
    pairs = [PairResult(i, c) for i, cands in enumerate(candidates) for c in cands]
    if not pairs:
        return []
    maps = activation_maps(models.itm, [samples[p.image_index].image for p in pairs], [p.candidate.name for p in pairs],
                           cfg.prompt, cfg.masking_rounds, cfg.mask_fraction, cfg.batch_size,
                           models.name_cam if cfg.activation == "backbone" else None)
    with_cands = sorted({p.image_index for p in pairs})
    names = [[c.name for c in candidates[i]] for i in with_cands]
    class_scores: dict = {}
    if cfg.box_rerank == "wspn":
        if not hasattr(models.proposals, "propose_with_scores"):
            raise ValueError("maskfree.box_rerank=wspn needs maskfree.proposals=wspn (the WSPN's instance scores)")
        found, scores = models.proposals.propose_with_scores([samples[i].image for i in with_cands], names)
        boxes, class_scores = dict(zip(with_cands, found)), dict(zip(with_cands, scores))
    else:
        boxes = dict(zip(with_cands, models.proposals.propose([samples[i].image for i in with_cands], names)))
    chosen = []  # one _Choice per pair that gets a box
    nth: Counter = Counter()
    for p, amap in zip(pairs, maps):
        k = nth[p.image_index]  # the seed depends on the image and the candidate, not on the chunk
        nth[p.image_index] += 1
        p.score, p.activation = amap.score, amap
        if keep_maps:
            p.proposals = boxes[p.image_index]
        if p.score < cfg.min_score:
            p.reason = "low_itm_score"
            continue
        phi = amap.binary.astype(np.float32) if cfg.box_map == "binary" else amap.soft
        want = min(p.candidate.count, cfg.max_instances) if cfg.instances == "caption" else 1
        chosen.append(_Choice(p, amap, k, phi, want))
    for r in range(max((c.want for c in chosen), default=0)):  # round r picks each name's (r+1)-th box
        todo = []
        for c in chosen if r == 0 else [c for c in chosen if c.want > r and len(c.picked) == r]:
            props = boxes[c.pair.image_index]
            allowed = np.arange(len(props)) if r == 0 else _apart(props, c.picked, cfg.instance_iou)
            top, rel, reason = best_boxes(c.phi, props[allowed], cfg.box_area_exponent, cfg.box_ring,
                                          1 if cfg.box_rerank == "none" else cfg.box_rerank_top)
            if reason and r == 0:
                c.pair.reason = reason
            elif not reason:
                todo.append((c, allowed[top], rel))
        if cfg.box_rerank != "none" and todo:  # option: a second opinion on eq. 6's best boxes
            second = _second_opinions([(c.pair, top) for c, top, _ in todo], samples, boxes, candidates, class_scores,
                                      models, cfg)
            todo = [(c, top[[rerank(rel, q, cfg.box_rerank_weight)]], rel) for (c, top, rel), q in zip(todo, second)]
        for c, top, _ in todo:
            c.picked.append(int(top[0]))
    chosen = [c for c in chosen if c.picked]
    extra: dict[int, list] = {}  # a pair's further instances (instances=caption), after it in the output
    jobs, job_pairs = [], []
    for c in chosen:
        p, props = c.pair, boxes[c.pair.image_index]
        sample = samples[p.image_index]
        if len(c.picked) > 1:  # a further instance scores the ITM's score x its eq. 6 score relative to the best box
            eq6 = box_scores(c.phi, props, cfg.box_area_exponent, cfg.box_ring)
            best = float(np.max(eq6))
        for j, b in enumerate(c.picked):
            q = p if j == 0 else PairResult(p.image_index, p.candidate, p.score * float(np.clip(eq6[b] / best, 0, 1)),
                                            p.activation, instance=j)
            if j:
                extra.setdefault(id(p), []).append(q)
            box = np.asarray(props[b], np.float32)
            q.box = box
            jobs.append(WssJob(sample.image, grow_box(box, cfg.wss_box_margin, sample.image.shape[:2]),
                               point_map(cfg.wss_point_map, c.amap.soft, box),
                               cfg.seed * 1_000_003 + sample.image_id * 31 + c.seed_index + 7919 * j))
            job_pairs.append(q)
    masks = sam_masks(models.sam, [j.image for j in jobs], [p.box for p in job_pairs]) if cfg.mask_stage == "sam" \
        else wss_masks(jobs, settings)
    for p, m in zip(job_pairs, masks):
        if m.any():
            p.mask = m
        else:
            p.reason = "empty_mask"
    if extra:
        pairs = [q for p in pairs for q in (p, *extra.get(id(p), ()))]
    if not keep_maps:
        for p in pairs:
            p.activation = None
    return pairs


@dataclass
class _Choice:
    """A pair on its way to its boxes: its map, the seed index of its candidate, Phi, how many boxes it wants and
    the proposals picked so far (indices into the image's proposals)."""

    pair: PairResult
    amap: object
    seed_index: int
    phi: np.ndarray
    want: int
    picked: list = field(default_factory=list)


def _apart(props: np.ndarray, picked: list, max_iou: float) -> np.ndarray:
    """Indices of the proposals that overlap every picked one by less than ``max_iou``."""
    import torch
    from torchvision.ops import box_iou

    iou = box_iou(torch.as_tensor(np.asarray(props, np.float32)), torch.as_tensor(np.asarray(props[picked], np.float32)))
    return np.flatnonzero(iou.max(1).values.numpy() < max_iou)


def _second_opinions(entries, samples, boxes, candidates, class_scores, models: MaskFreeModels, cfg) -> list:
    """``maskfree.box_rerank``'s opinion in [0, 1] of each ``(pair, proposal indices)`` entry's boxes."""
    from ovtasks.pseudolabel.maskfree.activation import crop_match_probs

    if cfg.box_rerank == "crop":  # the ITM judges each box's crop
        return crop_match_probs(models.itm, [(samples[p.image_index].image, boxes[p.image_index][top], p.candidate.name)
                                             for p, top in entries], cfg.prompt, cfg.box_crop_context)
    if cfg.box_rerank == "backbone":  # the caption-pretrained backbone names each box's crop
        return models.name_cam.crop_probs([(samples[p.image_index].image, boxes[p.image_index][top], p.candidate.name)
                                           for p, top in entries], cfg.box_crop_context)
    if cfg.box_rerank == "namer":  # ... and the region SAM segments in it, as Semantic-SAM's namer names a prompt
        cam, out = models.name_cam, []
        regions = sam_masks(models.sam, [samples[p.image_index].image for p, _ in entries],
                            [boxes[p.image_index][top] for p, top in entries], per_image=True)
        for (p, top), masks in zip(entries, regions):
            if not cam.knows(p.candidate.name):
                out.append(np.full(len(top), np.nan))
                continue
            probs = cam.box_name_probs(samples[p.image_index].image, boxes[p.image_index][top], cfg.box_crop_context, masks)
            out.append(probs[:, cam.index[p.candidate.name]].astype(np.float64))
        return out
    # the WSPN's instance score of the name (column j of the image's candidates)
    return [class_scores[p.image_index][top, candidates[p.image_index].index(p.candidate)] for p, top in entries]


def sam_masks(sam, images: Sequence[np.ndarray], boxes: Sequence, per_image: bool = False) -> list[np.ndarray]:
    """SAM's (H, W) bool mask for each image's xyxy box (``per_image``: for each image's ``(n, 4)`` boxes, an
    ``(n, H, W)`` array), a few images at a time (the segmenter's micro-batches)."""
    from ovtasks.data.groundtruth import decode_rle

    out = []
    for i0 in range(0, len(images), 16):
        chunk = [np.asarray(b, np.float32).reshape(-1, 4) for b in boxes[i0:i0 + 16]]
        for image, found in zip(images[i0:i0 + 16], sam.segment(images[i0:i0 + 16], chunk)):
            masks = np.stack([decode_rle(r).astype(bool) for r in found.rles]) if found.rles else \
                np.zeros((0, *image.shape[:2]), bool)
            out.append(masks if per_image else masks[0])
    return out


def wss_masks(jobs: Sequence, settings: Settings) -> list[np.ndarray]:
    """Eq. 7 masks for ``WssJob``s with the ``maskfree.wss_*`` settings, 256 boxes trained at once (bounded memory)."""
    from ovtasks.pseudolabel.maskfree.wss import segment_boxes

    cfg, out = settings.maskfree, []
    for j0 in range(0, len(jobs), 256):
        out += segment_boxes(jobs[j0:j0 + 256], cfg.wss_crop, cfg.wss_points, cfg.wss_iterations, cfg.wss_lr,
                             cfg.wss_hidden, settings.device, cfg.wss_fg_fraction, cfg.wss_bg_fraction)
    return out
