"""The Mask-free OVIS generator (patent FIG. 2): per chunk of a shard, stages 2-5 for every (image, candidate)
pair: the ITM activation map with iterative masking, proposals, the eq. 6 pseudo box, the eq. 7 WSS mask."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
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
    name_cam: object = None  # NameCam when maskfree.activation or box_rerank is backbone

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
    if "backbone" in (cfg.activation, cfg.box_rerank):
        from ovtasks.models.name_cam import NameCam

        if not cfg.backbone_model:
            raise ValueError(f"maskfree.activation={cfg.activation} / box_rerank={cfg.box_rerank} needs "
                             "maskfree.backbone_model (`ovtasks pretrain-backbone` output)")
        bb_path = resolve_model(cfg.backbone_model, settings.s3)
        name_cam = NameCam.load(bb_path, settings.device)
        versions["backbone"] = {"ref": cfg.backbone_model, "digest": digest_path(bb_path), "activation": cfg.activation,
                                "box_rerank": cfg.box_rerank}
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
    return MaskFreeModels(itm, proposals, versions, name_cam=name_cam)


def label_images(samples: Sequence[CleanSample], candidates: Sequence[Sequence[Candidate]], models: MaskFreeModels,
                 settings: Settings, keep_maps: bool = False) -> list[PairResult]:
    """Run stages 2-5 for already-extracted candidates; one :class:`PairResult` per (image, candidate)."""
    from ovtasks.pseudolabel.maskfree.activation import activation_maps, crop_match_probs
    from ovtasks.pseudolabel.maskfree.pseudo_box import best_boxes, rerank
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
    chosen = []  # (pair, map, seed index, eq. 6's best boxes, their relative scores)
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
        top, rel, reason = best_boxes(phi, boxes[p.image_index], cfg.box_area_exponent, cfg.box_ring,
                                      1 if cfg.box_rerank == "none" else cfg.box_rerank_top)
        if reason:
            p.reason = reason
            continue
        chosen.append((p, amap, k, top, rel))
    if cfg.box_rerank != "none" and chosen:  # option: a second opinion on eq. 6's best boxes
        if cfg.box_rerank == "crop":  # the ITM judges each box's crop
            second = crop_match_probs(models.itm, [(samples[p.image_index].image, boxes[p.image_index][top], p.candidate.name)
                                                   for p, _, _, top, _ in chosen], cfg.prompt, cfg.box_crop_context)
        elif cfg.box_rerank == "backbone":  # the caption-pretrained backbone names each box's crop
            second = models.name_cam.crop_probs([(samples[p.image_index].image, boxes[p.image_index][top], p.candidate.name)
                                                 for p, _, _, top, _ in chosen], cfg.box_crop_context)
        else:  # the WSPN's instance score of the name (column j of the image's candidates)
            second = [class_scores[p.image_index][top, candidates[p.image_index].index(p.candidate)] for p, _, _, top, _ in chosen]
        chosen = [(p, amap, k, top[[rerank(rel, q, cfg.box_rerank_weight)]], rel) for (p, amap, k, top, rel), q in zip(chosen, second)]
    jobs, job_pairs = [], []
    for p, amap, k, top, _ in chosen:
        box = np.asarray(boxes[p.image_index][top[0]], np.float32)
        p.box = box
        sample = samples[p.image_index]
        jobs.append(WssJob(sample.image, grow_box(box, cfg.wss_box_margin, sample.image.shape[:2]),
                           point_map(cfg.wss_point_map, amap.soft, box), cfg.seed * 1_000_003 + sample.image_id * 31 + k))
        job_pairs.append(p)
    for p, m in zip(job_pairs, wss_masks(jobs, settings)):
        if m.any():
            p.mask = m
        else:
            p.reason = "empty_mask"
    if not keep_maps:
        for p in pairs:
            p.activation = None
    return pairs


def wss_masks(jobs: Sequence, settings: Settings) -> list[np.ndarray]:
    """Eq. 7 masks for ``WssJob``s with the ``maskfree.wss_*`` settings, 256 boxes trained at once (bounded memory)."""
    from ovtasks.pseudolabel.maskfree.wss import segment_boxes

    cfg, out = settings.maskfree, []
    for j0 in range(0, len(jobs), 256):
        out += segment_boxes(jobs[j0:j0 + 256], cfg.wss_crop, cfg.wss_points, cfg.wss_iterations, cfg.wss_lr,
                             cfg.wss_hidden, settings.device, cfg.wss_fg_fraction, cfg.wss_bg_fraction)
    return out
