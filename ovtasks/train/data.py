"""What the detectors train and are scored on: validated pseudo-label shards joined to their clean images, the
held-out evaluation ids, base-category GT for fine-tuning."""

from __future__ import annotations

import hashlib
import io
import json
import logging

import numpy as np

from ovtasks.core.config import Settings
from ovtasks.core.storage import open_store
from ovtasks.data.clean import complete_shards, iter_clean, iter_shard

from ovtasks.data.holdout import held_out_record

log = logging.getLogger(__name__)


def training_data(clean_uri: str, pseudo_uri: str, settings: Settings, generator: str = "maskfree", exclude_ids=(),
                  window_shards: int = 0):
    """(samples [(image, annotations)], categories, text embeddings, data manifest) of the validated shards;
    ``exclude_ids``: images held out (the evaluation images of a benchmark)."""
    src, pl = open_store(clean_uri, settings.s3), open_store(pseudo_uri, settings.s3)
    prefix = f"pseudo/{generator}"
    if not pl.exists(f"{prefix}/validation_report.json"):
        raise FileNotFoundError(f"no {prefix}/validation_report.json under {pl.uri}: run `ovtasks validate` first "
                                "(only shards that pass the gate are trained on)")
    report = json.loads(pl.get_bytes(f"{prefix}/validation_report.json"))
    validated = {e["shard"]: e.get("sha256") for e in report.get("shards", [])}
    shards = [s for s in report["training_shards"] if s in set(complete_shards(src))]
    if window_shards:
        shards = sorted(shards)[-window_shards:]
    if not shards:
        raise ValueError(f"no shard passed validation (excluded: {report.get('excluded')})")
    cats, emb, no_embedding = usable_categories(*paired_categories(pl, prefix))
    known = {c["id"] for c in cats}
    dropped: dict[str, int] = {}
    samples, digest, exclude = [], hashlib.sha256(), set(exclude_ids)
    changed: dict[str, list[str]] = {}
    for shard in shards:
        blob = pl.get_bytes(f"{prefix}/{shard}.json")
        if hashlib.sha256(blob).hexdigest() != validated.get(shard):  # relabelled (or edited) since the gate passed it
            changed[shard] = ["pseudo-label JSON changed since validation: run validate again"]
            continue
        digest.update(shard.encode() + hashlib.sha256(blob).digest())
        doc = json.loads(blob)
        by_image: dict[int, list] = {}
        for a in doc["annotations"]:
            if a["category_id"] not in known:
                why = "no_text_embedding" if a["category_id"] in no_embedding else "unknown_category"
                dropped[why] = dropped.get(why, 0) + 1
                continue
            by_image.setdefault(a["image_id"], []).append(a)
        for s in iter_shard(src, shard):
            if s.image_id in by_image and s.image_id not in exclude:
                samples.append((s.image, by_image[s.image_id]))
    if changed:
        log.warning("shards left out of training: changed since validation", extra={"shards": sorted(changed)})
        shards = [s for s in shards if s not in changed]
        if not shards:
            raise ValueError(f"every validated shard changed since validation ({sorted(changed)}): run `ovtasks validate` again")
    if exclude:
        digest.update(json.dumps(sorted(exclude)).encode())
    manifest = {"source": "pseudo", "shards": shards, "excluded": {**report.get("excluded", {}), **changed}, "generator": generator,
                "images": len(samples), "annotations": sum(len(a) for _, a in samples), "sha256": digest.hexdigest(),
                "held_out": held_out_record(exclude),
                "dropped_annotations": dropped, "categories_without_embedding": sorted(no_embedding.values())}
    if dropped:
        log.warning("annotations left out of training", extra={"dropped": dropped, "categories": sorted(no_embedding.values())})
    return samples, cats, emb, manifest


def paired_categories(pl, prefix: str) -> tuple[list[dict], np.ndarray]:
    """``categories.json`` and ``text_embeddings.npy`` of a pseudo-label run, only when they are the pair finalize
    wrote together (its record ``text_embeddings.json``): "box" never trains with another category's embedding."""
    from ovtasks.pseudolabel.runner import EMBEDDING_PAIR, embedding_pair

    cat_blob, emb_blob = pl.get_bytes(f"{prefix}/categories.json"), pl.get_bytes(f"{prefix}/text_embeddings.npy")
    cats = json.loads(cat_blob)
    record = f"{prefix}/{EMBEDDING_PAIR}"
    if not pl.exists(record):
        raise ValueError(f"no {record}: categories.json and text_embeddings.npy are not known to be a pair "
                         "(finalize the pseudo-label run again)")
    if json.loads(pl.get_bytes(record)) != embedding_pair(cat_blob, emb_blob, cats):
        raise ValueError(f"{prefix}/categories.json and text_embeddings.npy are not the pair finalize wrote together "
                         "(one was replaced): finalize the pseudo-label run again")
    return cats, np.load(io.BytesIO(emb_blob), allow_pickle=False)


def usable_categories(cats: list[dict], emb: np.ndarray) -> tuple[list[dict], np.ndarray, dict[int, str]]:
    """Categories that have a finite, non-zero text embedding (row i of ``emb`` belongs to ``cats[i]``), their
    embeddings, and {id: name} of those that do not (their annotations are left out with that reason)."""
    keep, missing = [], {}
    for i, c in enumerate(cats):
        row = emb[i] if i < len(emb) else None
        if row is None or not np.all(np.isfinite(row)) or not np.any(row):
            missing[c["id"]] = c.get("name", str(c["id"]))
        else:
            keep.append(i)
    if not keep:
        raise ValueError(f"no category has a text embedding ({len(cats)} categories, embeddings {emb.shape})")
    return [cats[i] for i in keep], emb[keep], missing


def gt_training_data(gt_uri: str, clean_uri: str, settings: Settings, split: str | None = None, exclude_ids=()):
    """Like :func:`training_data` but with the synthetic benchmark's GT masks: only for the GT oracle of
    ``benchmarks/model_quality.py`` and the optional base-category fine-tune (``split="base"``); the held-out
    evaluation images (``exclude_ids``) are never used."""
    from ovtasks.data.groundtruth import GroundTruth
    from ovtasks.models.text_encoder import TextEncoder

    gt = GroundTruth.load(gt_uri, settings)
    cats = [c for c in gt.coco["categories"] if split is None or c.get("split") == split]
    if not cats:
        raise ValueError(f"no GT category has split {split!r}")
    keep, exclude = {c["id"] for c in cats}, set(exclude_ids)
    src, samples, digest = open_store(clean_uri, settings.s3), [], hashlib.sha256()
    for shard in complete_shards(src):
        for s in iter_shard(src, shard):
            anns = [a for a in gt.annotations(s.image_id) if a["category_id"] in keep]
            if anns and s.image_id not in exclude:
                samples.append((s.image, anns))
                digest.update(str(s.image_id).encode() + b",")
    if not samples:
        raise ValueError(f"no training image with {split or 'any'} GT outside the {len(exclude)} held-out images")
    emb = TextEncoder(settings.candidates.text_encoder, settings.device, s3=settings.s3).encode([c["name"] for c in cats])
    manifest = {"source": "gt", "split": split, "images": len(samples), "annotations": sum(len(a) for _, a in samples),
                "held_out": held_out_record(exclude), "sha256": digest.hexdigest()}
    return samples, [{"id": c["id"], "name": c["name"], "split": c.get("split")} for c in cats], np.asarray(emb, np.float32), manifest


def named_images(src_uri: str, settings: Settings, size: int, limit: int | None = None, vocab=None):
    """Every clean image whose caption names a vocabulary object, resized to ``size`` x ``size``: (uint8 tensor
    ``(N, 3, size, size)``, captions, the names each caption mentions, image ids). What the caption-supervised
    trainers (``train-itm``, ``pretrain-backbone``) learn from: the captions' names, nothing drawn by a person."""
    import torch
    import torch.nn.functional as F

    from ovtasks.pseudolabel.candidates import LexiconExtractor, Vocabulary

    extractor = LexiconExtractor(vocab or Vocabulary.load(settings.candidates.vocabulary))
    images, captions, names, ids = [], [], [], []
    for s in iter_clean(src_uri, settings, limit):
        cands = extractor.extract([s.caption])[0]
        if not cands:
            continue
        t = torch.from_numpy(s.image).permute(2, 0, 1)[None].float()
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        images.append(t[0].round().clamp(0, 255).to(torch.uint8))
        captions.append(s.caption)
        names.append([c.name for c in cands])
        ids.append(s.image_id)
    if not images:
        raise ValueError(f"no clean samples with object candidates under {src_uri}")
    return torch.stack(images), captions, names, ids


def flip_turn(x, rng: np.random.Generator):
    """Random horizontal flips per image and one random quarter turn per batch of ``(B, C, H, W)`` images:
    the caption-supervised trainers' augmentation (a caption never says which way up a shape is)."""
    import torch

    flip = torch.from_numpy(rng.random(len(x)) < 0.5)
    x[flip] = x[flip].flip(-1)
    return torch.rot90(x, int(rng.integers(4)), (2, 3))


def name_targets(names: list[list[str]], vocab_names: list[str]):
    """``(N, V)`` 0/1 targets: 1 where image i's caption mentions vocabulary name j."""
    import torch

    col = {n: j for j, n in enumerate(vocab_names)}
    y = torch.zeros(len(names), len(vocab_names))
    for i, ns in enumerate(names):
        for n in ns:
            y[i, col[n]] = 1.0
    return y


def names_softmax_loss(logits, target):
    """Cross-entropy of a softmax over the vocabulary against ``name_targets``: every name the caption
    mentions an equal positive (the caption-name classification of the ITM stem and the detector backbone)."""
    return -(target / target.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
