"""``ovtasks train --model ov-maskrcnn``: the open-vocabulary Mask R-CNN on validated pseudo-labels.

Training data: the clean shards' images and the pseudo-label shards that passed the GX gate
(``pseudo/<generator>/validation_report.json``: ``training_shards``; a missing report is an error,
never "train on everything"). Every caption name is a class: the vocabulary is the generator's
``categories.json`` and its text embeddings (``text_embeddings.npy``, same order).

Output directory (a model, loadable without unpickling anything)::

    model.safetensors       weights
    ovtasks_model.json      architecture, vocabulary (ids, names, splits), training config, data manifest hash
    text_embeddings.npy     the vocabulary's text embeddings
    history.json            loss per step;  loss_curve.png  the curves
    checkpoint-<phase>.pt   weights + optimizer + step, written every ``checkpoint_every`` steps and read
                            back with ``torch.load(weights_only=True)`` to resume a killed run (phases:
                            ``train`` on pseudo-labels, then the optional ``finetune`` on base-category GT);
                            gone once the model is written

:func:`predict` runs a trained model with any vocabulary; :func:`evaluate_model` scores it on COCO GT
(generalized and constrained, base / novel) with :mod:`ovtasks.evaluate.coco`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ovtasks import __version__
from ovtasks.core.config import Settings
from ovtasks.data.clean import complete_shards, iter_shard
from ovtasks.core.storage import open_store

log = logging.getLogger(__name__)
META = "ovtasks_model.json"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 4
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-4
    # "adamw" (default: from scratch on CPU-sized data it learns ~10x faster than SGD, see docs/model-quality.md)
    # or "sgd" (torchvision's reference recipe, lr 0.01-0.02, for a pretrained backbone)
    optimizer: str = "adamw"
    backbone: str = "small"
    min_size: int = 192
    max_size: int = 320
    background_weight: float = 0.2
    temperature: float = 0.05
    seed: int = 0
    checkpoint_every: int = 50
    generator: str = "maskfree"
    window_shards: int = 0  # train on the newest N validated shards only (0: all)
    finetune_steps: int = 0  # then this many steps on base-category GT at lr/10 (needs gt_uri)


@dataclass
class TrainedModel:
    model_dir: str
    metrics: dict
    history: list[dict]
    data_manifest: dict


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
    cats, emb, no_embedding = usable_categories(json.loads(pl.get_bytes(f"{prefix}/categories.json")),
                                                np.load(io.BytesIO(pl.get_bytes(f"{prefix}/text_embeddings.npy"))))
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


def eval_image_ids(gt_uri: str, clean_uri: str, settings: Settings, limit: int | None = None) -> list[int]:
    """The clean images that have GT, in shard order, the first ``limit`` of them: what :func:`evaluate_model`
    scores, and what GT-trained models (the oracle, the base fine-tune) must never train on."""
    from ovtasks.data.groundtruth import GroundTruth

    have = set(GroundTruth.load(gt_uri, settings).images)
    src, ids = open_store(clean_uri, settings.s3), []
    for shard in complete_shards(src):
        for s in iter_shard(src, shard):
            if s.image_id in have:
                ids.append(s.image_id)
            if limit and len(ids) >= limit:
                return ids
    return ids


def held_out_record(ids) -> dict:
    """What a training run recorded of the images it never trained on (the evaluation split)."""
    ids = sorted(int(i) for i in ids)
    return {"images": len(ids), "ids_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest()}


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


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0


def build_model(embed_dim: int, cfg: TrainConfig):
    from ovtasks.models.ov_maskrcnn import build

    return build(embed_dim, cfg.backbone, temperature=cfg.temperature, background_weight=cfg.background_weight,
                 min_size=cfg.min_size, max_size=cfg.max_size)


def train_ov_maskrcnn(clean_uri: str, pseudo_uri: str, out_dir: str, settings: Settings, cfg: TrainConfig = TrainConfig(),
                      progress: Callable[[dict], None] | None = None, gt_uri: str | None = None, exclude_ids=()) -> TrainedModel:
    """Train on the validated pseudo-labels; with ``cfg.finetune_steps`` and ``gt_uri``, then fine-tune on the
    base categories' GT (the patent's optional second stage), never on ``exclude_ids`` nor on novel GT."""
    samples, cats, emb, manifest = training_data(clean_uri, pseudo_uri, settings, cfg.generator, exclude_ids, cfg.window_shards)
    finetune = None
    if cfg.finetune_steps:
        if not gt_uri:
            raise ValueError("finetune_steps needs gt_uri (base-category GT)")
        finetune = gt_training_data(gt_uri, clean_uri, settings, "base", exclude_ids)
        manifest = {**manifest, "finetune": finetune[3]}
    return fit_ov_maskrcnn(samples, cats, emb, manifest, out_dir, settings, cfg, progress, finetune)


def fit_ov_maskrcnn(samples, cats, emb, manifest: dict, out_dir: str, settings: Settings, cfg: TrainConfig = TrainConfig(),
                    progress: Callable[[dict], None] | None = None, finetune=None) -> TrainedModel:
    """Train on ``samples`` [(image, COCO annotations)] whose category ids are ``cats``' (text embeddings ``emb``);
    then ``cfg.finetune_steps`` on ``finetune`` (same form), if given. Resumable phase by phase."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = build_model(emb.shape[1], cfg).to(settings.device)
    history = _fit_phase(model, samples, cats, emb, manifest["sha256"], out, settings.device, cfg, cfg.steps, "train", progress)
    if finetune is not None and cfg.finetune_steps:
        f_samples, f_cats, f_emb, f_manifest = finetune
        history += _fit_phase(model, f_samples, f_cats, f_emb, f_manifest["sha256"], out, settings.device, cfg, cfg.finetune_steps,
                              "finetune", progress, lr=cfg.lr * 0.1, step0=cfg.steps)
    model.set_vocabulary(torch.from_numpy(emb))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    np.save(out / "text_embeddings.npy", emb)
    last = [h["loss"] for h in history if h.get("phase", "train") == "train"][-10:]
    metrics = {"steps": cfg.steps, "final_loss": float(np.mean(last)) if last else None,
               "images": manifest["images"], "annotations": manifest["annotations"], "categories": len(cats)}
    if finetune is not None and cfg.finetune_steps:
        metrics["finetune_steps"] = cfg.finetune_steps
    meta = {"architecture": "ov-maskrcnn", "embed_dim": int(emb.shape[1]), "config": asdict(cfg), "categories": cats,
            "data_manifest": manifest, "metrics": metrics, "code_version": __version__}
    (out / META).write_text(json.dumps(meta, indent=2))
    (out / "history.json").write_text(json.dumps(history))
    loss_curve(history, out / "loss_curve.png")
    for phase in ("train", "finetune"):  # the finished-phase markers only matter while the run is incomplete
        (out / f"done-{phase}.safetensors").unlink(missing_ok=True)
        (out / f"history-{phase}.json").unlink(missing_ok=True)
    return TrainedModel(str(out), metrics, history, manifest)


def _fit_phase(model, samples, cats, emb, data_sha: str, out: Path, device: str, cfg: TrainConfig, steps: int, phase: str,
               progress, lr: float | None = None, step0: int = 0) -> list[dict]:
    from ovtasks.models.ov_maskrcnn import targets_from_coco

    model.set_vocabulary(torch.from_numpy(emb))
    cat_index = {c["id"]: i for i, c in enumerate(cats)}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg, lr or cfg.lr)
    warm = min(50, max(1, steps // 4))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps))))
    start, history = 0, []
    ckpt, hist_path, key = out / f"checkpoint-{phase}.pt", out / f"history-{phase}.json", json.dumps(asdict(cfg), sort_keys=True)
    done = out / f"done-{phase}.safetensors"
    if done.exists() and hist_path.exists():  # this phase finished before the run was killed
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(done)))
        return json.loads(hist_path.read_text())
    if ckpt.exists():
        start, history = resume(ckpt, hist_path, model, opt, sched, key, data_sha, device, step0)
    model.train()
    t0 = time.perf_counter()
    for step in range(start, steps):
        # everything random in a step derives from (seed, phase, step): a resumed run repeats the uninterrupted one
        torch.manual_seed(cfg.seed * 1_000_003 + step0 + step)
        pick = np.random.default_rng([cfg.seed, step0 + step]).choice(len(samples), size=min(cfg.batch_size, len(samples)), replace=False)
        batch = [samples[i] for i in pick]
        images = [_to_tensor(im).to(device) for im, _ in batch]
        targets = [{k: v.to(device) for k, v in targets_from_coco(anns, cat_index, im.shape[:2]).items()} for im, anns in batch]
        rec = {"step": step0 + step, "phase": phase,
               **optimizer_step(model(images, targets), opt, sched, params, 10.0, f"{phase} step {step}", t0, lr_digits=6)}
        history.append(rec)
        if progress and (step % 10 == 0 or step == steps - 1):
            progress(rec)
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
            checkpoint(ckpt, hist_path, model, opt, sched, step + 1, key, data_sha, history)
    from safetensors.torch import save_file

    hist_path.write_text(json.dumps(history))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(done))
    ckpt.unlink(missing_ok=True)
    return history


def make_optimizer(params, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use sgd or adamw")


def optimizer_step(losses: dict, opt, sched, params, clip: float, where: str, t0: float, lr_digits: int = 6) -> dict:
    """Sum the losses, refuse a non-finite total, step with gradient clipping; the history record's numbers."""
    total = sum(losses.values())
    if not torch.isfinite(total):
        raise FloatingPointError(f"non-finite loss at {where}: {({k: float(v) for k, v in losses.items()})}")
    opt.zero_grad()
    total.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    sched.step()
    return {"loss": round(total.item(), 5), **{k: round(v.item(), 5) for k, v in losses.items()},
            "lr": round(sched.get_last_lr()[0], lr_digits), "seconds": round(time.perf_counter() - t0, 1)}


def resume(ckpt: Path, hist_path: Path, model, opt, sched, key: str, data_sha: str, device: str, step0: int = 0) -> tuple[int, list]:
    """(first step to run, history so far) from a checkpoint written by :func:`checkpoint` for the same
    config and data; (0, []) otherwise. ``weights_only``: a checkpoint never unpickles arbitrary objects."""
    state = torch.load(ckpt, map_location=device, weights_only=True)
    if state.get("config") != key or state.get("data") != data_sha:
        log.warning("checkpoint ignored: other config or data", extra={"checkpoint": str(ckpt)})
        return 0, []
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    start = int(state["step"])
    history = json.loads(hist_path.read_text()) if hist_path.exists() else []
    log.info("resumed training", extra={"step": start, "checkpoint": str(ckpt)})
    return start, [h for h in history if h["step"] < step0 + start]


def checkpoint(ckpt: Path, hist_path: Path, model, opt, sched, step: int, key: str, data_sha: str, history: list) -> None:
    """Weights, optimizer, scheduler and step, written to a temporary file and renamed (never half-written)."""
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "step": step, "config": key, "data": data_sha}, tmp)
    hist_path.write_text(json.dumps(history))
    tmp.replace(ckpt)


def loss_curve(history: Sequence[dict], path: Path, title: str = "OV Mask R-CNN training on pseudo-labels") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    steps = [h["step"] for h in history]
    keys = ["loss"] + sorted({k for h in history for k in h if k.startswith("loss_")})
    for key in keys:
        vals = np.array([h.get(key, np.nan) for h in history], float)
        if len(vals):
            k = max(1, len(vals) // 30)
            ax.plot(steps[k - 1:], np.convolve(vals, np.ones(k) / k, mode="valid"), label=key, lw=1.5 if key == "loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (moving mean)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_model(model_dir: str, device: str = "cpu"):
    """(model, meta) from a trained directory (OV Mask R-CNN or Semantic-SAM); safetensors only."""
    from safetensors.torch import load_file

    meta = json.loads((Path(model_dir) / META).read_text())
    if meta.get("architecture") == "semantic-sam":
        from ovtasks.models.semantic_sam import load

        return load(model_dir, device), meta
    cfg = TrainConfig(**meta["config"])
    model = build_model(meta["embed_dim"], cfg)
    model.set_vocabulary(torch.from_numpy(np.load(Path(model_dir) / "text_embeddings.npy")))
    model.load_state_dict(load_file(str(Path(model_dir) / "model.safetensors")))
    return model.to(device).eval(), meta


@torch.no_grad()
def predict(model, images: Sequence[np.ndarray], image_ids: Sequence[int], category_ids: Sequence[int],
            text_embeddings: np.ndarray, device: str = "cpu", score_thresh: float = 0.05, batch_size: int = 4) -> list[dict]:
    """COCO predictions (RLE masks, xywh boxes) for ``images`` with vocabulary ``category_ids``."""
    from ovtasks.data.groundtruth import encode_rle

    model.set_vocabulary(torch.from_numpy(np.asarray(text_embeddings)))
    model.roi_heads.score_thresh = score_thresh
    model.eval()
    preds = []
    for b0 in range(0, len(images), batch_size):
        outs = model([_to_tensor(im).to(device) for im in images[b0:b0 + batch_size]])
        for image_id, o in zip(image_ids[b0:b0 + batch_size], outs):
            for box, label, score, mask in zip(o["boxes"], o["labels"], o["scores"], o["masks"]):
                m = (mask[0] > 0.5).cpu().numpy()
                if not m.any():
                    continue
                x1, y1, x2, y2 = (float(v) for v in box)
                preds.append({"image_id": int(image_id), "category_id": int(category_ids[int(label) - 1]), "score": float(score),
                              "bbox": [x1, y1, x2 - x1, y2 - y1], "segmentation": encode_rle(m)})
    return preds


def evaluation_inputs(gt_uri: str, clean_uri: str, settings: Settings, limit: int | None = None):
    """What both models are evaluated on: (gt, image ids, {id: image}, COCO subset, categories, their text
    embeddings, base/novel split ids)."""
    from ovtasks.evaluate.coco import split_ids
    from ovtasks.data.groundtruth import GroundTruth
    from ovtasks.models.text_encoder import TextEncoder

    gt = GroundTruth.load(gt_uri, settings)
    ids = eval_image_ids(gt_uri, clean_uri, settings, limit)
    wanted, images = set(ids), {}
    src = open_store(clean_uri, settings.s3)
    for shard in complete_shards(src):
        for s in iter_shard(src, shard):
            if s.image_id in wanted:
                images[s.image_id] = s.image
        if len(images) == len(wanted):
            break
    doc = gt.subset(ids)
    cats = doc["categories"]
    emb = TextEncoder(settings.candidates.text_encoder, settings.device, s3=settings.s3).encode([c["name"] for c in cats])
    return gt, ids, images, doc, cats, emb, split_ids(doc)


def evaluate_model(model, gt_uri: str, clean_uri: str, settings: Settings, limit: int | None = None) -> dict:
    """Evaluation table on COCO GT for the clean images that have GT: generalized (all categories) and
    constrained (novel-only and base-only vocabularies). ``gt`` (the evaluation set) and ``predictions``
    (generalized) are returned too: the promotion gate pairs two models' predictions image by image."""
    from ovtasks.evaluate.coco import evaluation_table, format_eval_table

    gt, ids, by_id, doc, cats, emb, splits = evaluation_inputs(gt_uri, clean_uri, settings, limit)
    images = [by_id[i] for i in ids]
    general = predict(model, images, ids, [c["id"] for c in cats], emb, settings.device)
    constrained = {}
    for split in ("novel", "base"):
        keep = [i for i, c in enumerate(cats) if c["id"] in set(splits[split])]
        if keep:
            constrained[split] = predict(model, images, ids, [cats[i]["id"] for i in keep], emb[keep], settings.device)
    rows = evaluation_table(doc, general, constrained)
    return {"rows": rows, "table": format_eval_table(rows), "images": len(ids),
            "novel_mask_AP50": next(r["mask_AP50"] for r in rows if r["setting"] == "generalized" and r["split"] == "novel"),
            "gt": doc, "predictions": general}
