"""``ovtasks train-itm``: train a small BLIP image-text-matching model from scratch on clean shards.

No pretrained weights can be downloaded here, so the GradCAM stage needs an ITM model trained on the
data itself. Supervision comes only from captions (object names found by the lexicon extractor):

* positives: the prompt ("a photo of a {name}") for a name the caption mentions, or the caption;
* hard negatives that replace the object word: the prompt for a vocabulary name the caption does
  not mention, and the caption with its object word swapped for such a name;
* swapped captions: another image's caption naming a different set of objects.

Training has two stages. First the convolutional stem alone learns to tell the caption's object names
apart (multi-positive softmax over the vocabulary on its max-pooled feature map, flips and quarter
turns as augmentation): from scratch, the ITM loss barely moves a vision tower that cannot yet
see shapes, and the model sits on the "never matches" prior. Then the whole BLIP model trains on
ITM (+ ITC), the pretrained stem at a lower learning rate. A curriculum starts the ITM stage on
images whose caption names a single object, so the model first learns what each word looks like
before it must find one object among several. The trained model is saved in
transformers format (``BlipForImageTextRetrieval`` + ``BlipProcessor``) and loads like real BLIP.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ovtasks import __version__
from ovtasks.pseudolabel.candidates import Vocabulary
from ovtasks.core.config import Settings
from ovtasks.train.engine import TrainedCheckpoint, warmup_cosine
from ovtasks.train.data import flip_turn, name_targets, named_images, names_softmax_loss
from ovtasks.models.hub import publish_model
from ovtasks.models.itm import ConvStem, ItmModel, build_word_tokenizer, install_conv_stem, prompt_span, tiny_blip_config, word_mean

log = logging.getLogger(__name__)

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class ItmTrainConfig:
    steps: int = 3000
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup: int = 100
    image_size: int = 96
    patch_size: int = 8
    hidden: int = 96
    vision_layers: int = 3
    text_layers: int = 3
    heads: int = 4
    conv_stem: bool = True  # early convolutions instead of one patchify conv (learns far faster from scratch)
    # stride-1 conv blocks after the stride-2 ones: each widens a patch's receptive field by 2 patches
    # (8 px patches: 15 px with none, 47 px with the default 2)
    stem_extra: int = 2
    pretrain_steps: int = 3000  # stage 1: caption-name classification by the conv stem (0 skips it)
    pretrain_batch_size: int = 32
    pretrain_lr: float = 2e-3
    stem_lr_scale: float = 0.1  # the pretrained stem's learning rate in the ITM stage, relative to lr
    # GradCAM layer recorded in the checkpoint (used when maskfree.itm_layer is unset). In the small
    # model the first cross-attention layer is the word-specific one (its word query is still mostly
    # the word): measured right-object rates 0.72 / 0.47 / 0.0 for layers 0 / 1 / 2.
    gradcam_layer: int = 0
    curriculum: float = 0.3  # fraction of steps on single-object captions
    caption_fraction: float = 0.25  # rows that use whole captions instead of prompts
    itc_weight: float = 1.0  # image-text contrastive loss on the unimodal [CLS] projections (0 disables)
    # word-grounding loss (0 disables): the GradCAM layer's cross-attention of a present name's word pools
    # the stem's local patch features, which must classify as that name (attention-based multiple-instance
    # learning; rewards attending to the named object rather than to whatever answers "match")
    grounding_weight: float = 0.0
    # mosaic grounding loss (0 disables): 2x2 mosaics of four training images; a name that only one tile's
    # caption mentions must draw the GradCAM layer's word attention into that tile (-log of its attention
    # mass there), and the mosaic must match that name's prompt and not a name no tile mentions. Location
    # supervision from composition alone: no box or mask of any kind
    mosaic_weight: float = 0.0
    mosaic_batch: int = 12  # mosaics per step
    temperature: float = 0.07
    holdout: int = 200  # images kept out of training for the metrics
    seed: int = 0
    max_images: int | None = None


TrainedItm = TrainedCheckpoint


def _replace_object_word(caption: str, vocab: Vocabulary, new_name: str) -> str | None:
    hits = vocab.match(caption)
    if not hits:
        return None
    _, term = hits[0]
    i = caption.lower().find(term)
    return caption[:i] + new_name + caption[i + len(term):]


def _batch_texts(rng: np.random.Generator, idx: np.ndarray, captions, names, vocab_names, vocab: Vocabulary,
                 template: str, caption_fraction: float):
    """Three texts per image: one positive, one hard negative, one swapped/replaced negative."""
    texts, rows, labels = [], [], []
    for r, i in enumerate(idx):
        present = names[i]
        absent = [n for n in vocab_names if n not in present]
        pos_name = present[int(rng.integers(len(present)))]
        neg_name = absent[int(rng.integers(len(absent)))]
        if rng.random() < caption_fraction:
            pos = captions[i]
            neg = _replace_object_word(captions[i], vocab, neg_name) or prompt_span(template, neg_name)[0]
        else:
            pos = prompt_span(template, pos_name)[0]
            neg = prompt_span(template, neg_name)[0]
        j = int(rng.integers(len(captions)))
        tries = 0
        while set(names[j]) <= set(present) and tries < 10:
            j, tries = int(rng.integers(len(captions))), tries + 1
        other_name = [n for n in names[j] if n not in present]
        swapped = captions[j] if rng.random() < caption_fraction or not other_name else prompt_span(template, other_name[0])[0]
        texts += [pos, neg, swapped]
        rows += [r, r, r]
        labels += [1, 0, 0 if tries < 10 else 1]
    return texts, torch.tensor(rows), torch.tensor(labels)


def train_itm(src_uri: str, out_uri: str, settings: Settings, cfg: ItmTrainConfig = ItmTrainConfig(),
              gt_uri: str | None = None, progress: Callable[[int, dict], None] | None = None,
              command: str | None = None, init: str | None = None) -> TrainedItm:
    """Train on every complete clean shard under ``src_uri``; save to ``out_uri`` (dir or store URI).
    ``command``, when given, is recorded in ``ovtasks_itm.json`` (how to reproduce the checkpoint).
    ``init``: an ITM checkpoint (dir, HF id or store URI) to continue from instead of a random model (its
    tokenizer, image size and normalisation are kept; stage 1 is skipped)."""
    torch.manual_seed(cfg.seed)
    # denormal floats (AdamW's second moments of rarely-used embeddings underflow into them) made CPU steps
    # 6x slower as training went on (0.2 -> 1.3 s per step past step 1600 of a 12000-step run): flush them to 0
    torch.set_flush_denormal(True)
    rng = np.random.default_rng(cfg.seed)
    vocab = Vocabulary.load(settings.candidates.vocabulary)
    vocab_names = vocab.names()
    template = settings.maskfree.prompt
    images, captions, names, ids = named_images(src_uri, settings, cfg.image_size, cfg.max_images, vocab)
    n = len(captions)
    hold = min(cfg.holdout, n // 5)
    train_idx = np.arange(n - hold)
    single = np.array([i for i in train_idx if len(names[i]) == 1]) if cfg.curriculum > 0 else train_idx
    if len(single) < cfg.batch_size:
        single = train_idx

    if init:
        itm = ItmModel.load(init, settings.device, settings.maskfree.itm_layer, settings.s3)
        model = itm.model
        vc = model.config.vision_config
        if (vc.image_size, vc.patch_size) != (cfg.image_size, cfg.patch_size):
            raise ValueError(f"--init {init} is {vc.image_size} px / {vc.patch_size} px patches; the config asks for "
                             f"{cfg.image_size} / {cfg.patch_size}")
        emb = model.vision_model.embeddings.patch_embedding
        stem = emb if isinstance(emb, ConvStem) else None
        tc = model.config.text_config
        cfg = replace(cfg, hidden=vc.hidden_size, vision_layers=vc.num_hidden_layers, text_layers=tc.num_hidden_layers,
                      heads=vc.num_attention_heads, conv_stem=stem is not None,
                      stem_extra=stem.extra if stem is not None else cfg.stem_extra, pretrain_steps=0)
    else:
        words = set(vocab_names) | {t for e in vocab.entries for t in e.terms() for t in t.split()}
        for c in captions + [template.replace("{name}", "")]:
            words |= set(_TOKEN_RE.findall(c.lower()))
        tmp = tempfile.mkdtemp(prefix="ovtasks-itm-")
        tokenizer = build_word_tokenizer(words, tmp)
        from transformers import BlipForImageTextRetrieval

        model = BlipForImageTextRetrieval(tiny_blip_config(len(tokenizer), cfg.image_size, cfg.patch_size, cfg.hidden,
                                                           cfg.vision_layers, cfg.text_layers, cfg.heads))
        stem = install_conv_stem(model, cfg.stem_extra) if cfg.conv_stem else None
        sample = images[:2048].float()
        mean, std = sample.mean((0, 2, 3)) / 255, sample.std((0, 2, 3)) / 255
        itm = ItmModel(model, tokenizer, cfg.image_size, mean.tolist(), std.tolist(), settings.device, settings.maskfree.itm_layer)
    t0 = time.perf_counter()
    history: list[dict] = []
    pre_metrics: dict = {}
    pretrain = stem is not None and cfg.pretrain_steps > 0 and not init
    if pretrain:
        pre_metrics = _pretrain_stem(itm, stem, images, names, vocab_names, train_idx, np.arange(n - hold, n), cfg, rng,
                                     history, progress)
    stem_params = {id(p) for p in stem.parameters()} if stem is not None and (pretrain or init) else set()
    groups = [{"params": [p for p in model.parameters() if id(p) not in stem_params], "lr": cfg.lr}]
    if stem_params:
        groups.append({"params": list(stem.parameters()), "lr": cfg.lr * cfg.stem_lr_scale})
    # the GradCAM layer: maskfree.itm_layer when set (what inference will use), else the config's
    layer = min(cfg.gradcam_layer if settings.maskfree.itm_layer is None else settings.maskfree.itm_layer, cfg.text_layers - 1)
    grounder = None
    if cfg.grounding_weight > 0:
        grounder = _Grounder(itm, vocab_names, template, layer)
        groups.append({"params": list(grounder.head.parameters()), "lr": cfg.lr})
    mosaic = _Mosaic(itm, vocab_names, template, layer) if cfg.mosaic_weight > 0 else None
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup, cfg.steps))
    model.train()
    run_loss, run_acc, run_mos = 0.0, 0.0, {}
    for step in range(cfg.steps):
        pool = single if step < cfg.curriculum * cfg.steps else train_idx
        idx = rng.choice(pool, size=min(cfg.batch_size, len(pool)), replace=False)
        x = flip_turn(images[torch.from_numpy(idx)].float(), rng)
        texts, rows, labels = _batch_texts(rng, idx, captions, names, vocab_names, vocab, template, cfg.caption_fraction)
        ids_, am, _ = itm.tokenize(texts)
        embeds = itm.image_embeds(itm.preprocess(x))
        logits = itm.itm_logits(embeds[rows.to(embeds.device)], ids_, am)
        labels = labels.to(logits.device)
        loss = F.cross_entropy(logits, labels)
        if cfg.itc_weight > 0:
            loss = loss + cfg.itc_weight * _itc_loss(itm, embeds, idx, names, vocab_names, template, cfg.temperature)
        if grounder is not None:
            loss = loss + cfg.grounding_weight * grounder.loss(embeds, [names[i] for i in idx], rng)
        if mosaic is not None:
            m_loss, m_parts = mosaic.loss(images, names, pool, cfg.mosaic_batch, rng)
            loss = loss + cfg.mosaic_weight * m_loss
            run_mos = {k: 0.98 * run_mos.get(k, v) + 0.02 * v for k, v in m_parts.items()} if step else m_parts
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        run_loss = 0.98 * run_loss + 0.02 * loss.item() if step else loss.item()
        acc = (logits.argmax(-1) == labels).float().mean().item()
        run_acc = 0.98 * run_acc + 0.02 * acc if step else acc
        if step % 50 == 0 or step == cfg.steps - 1:
            rec = {"stage": "itm", "step": step, "loss": round(run_loss, 4), "acc": round(run_acc, 4),
                   **{k: round(v, 4) for k, v in run_mos.items()}, "seconds": round(time.perf_counter() - t0, 1)}
            history.append(rec)
            log.info("train-itm", extra=rec)
            if progress:
                progress(step, rec)
    if grounder is not None:
        grounder.close()
    model.eval()
    hold_idx = list(range(n - hold, n))
    metrics = caption_metrics(itm, images[hold_idx], [names[i] for i in hold_idx], vocab_names, template)
    if gt_uri:
        from ovtasks.data.groundtruth import GroundTruth

        gt = GroundTruth.load(gt_uri, settings)
        by_layer = {}
        for k in range(cfg.text_layers):  # report every layer; the recorded one is used for the main numbers
            itm.layer = k
            by_layer[k] = grounding_metrics(itm, images[hold_idx], [ids[i] for i in hold_idx], gt, template)
        metrics.update(by_layer[layer])
        metrics["right_object_rate_by_layer"] = {str(k): v["right_object_rate"] for k, v in by_layer.items()}
    metrics.update(pre_metrics)
    metrics.update(train_images=n - hold, holdout_images=hold, steps=cfg.steps,
                   train_seconds=round(time.perf_counter() - t0, 1))
    itm.layer = layer
    meta = {"conv_stem": cfg.conv_stem, "stem_extra": cfg.stem_extra, "gradcam_layer": layer, "trained_by": f"ovtasks {__version__} train-itm", "config": asdict(cfg), "metrics": metrics,
            "source": src_uri, "prompt": template, **({"command": command} if command else {}), **({"init": init} if init else {})}
    with tempfile.TemporaryDirectory(prefix="ovtasks-itm-out-") as d:
        itm.save(d, meta)
        (Path(d) / "history.json").write_text(json.dumps(history))
        uri = publish_model(d, out_uri, settings.s3)
    return TrainedItm(uri, metrics, history)


def _pretrain_stem(itm: ItmModel, stem: ConvStem, images: torch.Tensor, names, vocab_names, train_idx: np.ndarray,
                   hold_idx: np.ndarray, cfg: ItmTrainConfig, rng: np.random.Generator, history: list[dict],
                   progress: Callable[[int, dict], None] | None) -> dict:
    """Stage 1: the stem's max-pooled features classify the caption's names (softmax, every named
    object a positive). Returns the held-out top-1 (the best class is one the caption names)."""
    device = itm.device
    y = name_targets(names, vocab_names).to(device)
    head = torch.nn.Linear(stem.out_channels, len(vocab_names)).to(device)
    params = list(stem.convs.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.pretrain_lr, weight_decay=cfg.weight_decay)
    steps = cfg.pretrain_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup, steps))

    def logits(x: torch.Tensor) -> torch.Tensor:
        return head(stem.features(itm.preprocess(x)).amax((2, 3)))

    def holdout_top1() -> float:
        stem.eval()
        with torch.no_grad():
            hits = []
            for i0 in range(0, len(hold_idx), 128):
                rows = torch.from_numpy(hold_idx[i0:i0 + 128])
                best = logits(images[rows].float()).argmax(1)
                hits.append(y[rows.to(device), best])
        stem.train()
        return float(torch.cat(hits).mean()) if hits else float("nan")

    stem.train()
    t0, run, top1 = time.perf_counter(), None, None
    for step in range(steps):
        idx = torch.from_numpy(rng.choice(train_idx, size=min(cfg.pretrain_batch_size, len(train_idx)), replace=False))
        out = logits(flip_turn(images[idx].float(), rng))
        target = y[idx.to(device)]
        loss = names_softmax_loss(out, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
        if step % 250 == 0 or step == steps - 1:
            rec = {"stage": "pretrain", "step": step, "loss": round(run, 4), "seconds": round(time.perf_counter() - t0, 1)}
            if step == steps - 1 or step % 1000 == 0:
                rec["holdout_top1"] = top1 = round(holdout_top1(), 4)
            history.append(rec)
            log.info("train-itm pretrain", extra=rec)
            if progress:
                progress(step, rec)
    return {"pretrain_holdout_top1": top1, "pretrain_steps": steps}


class _Grounder:
    """The word-grounding loss (``ItmTrainConfig.grounding_weight``).

    For one present name per image, the prompt runs through the text encoder with cross-attention to
    the image; the word tokens' attention over the patch grid in ``layer`` (the GradCAM layer, mean over
    heads, [CLS] column dropped and renormalised) pools the patch embedding's *local* features (the conv
    stem's output, captured by a forward hook, before any transformer layer mixes the patches). A linear
    head must classify the pooled feature as the name. Attending to patches of another object, or to
    background, pools features of something else, so only attention on the named object lowers the
    loss: multiple-instance learning with the attention as the instance weights (Ilse et al., 2018)."""

    def __init__(self, itm: ItmModel, vocab_names: list[str], template: str, layer: int):
        self.itm, self.template, self.layer = itm, template, layer
        self.col = {n: j for j, n in enumerate(vocab_names)}
        stem = itm.model.vision_model.embeddings.patch_embedding
        self.head = torch.nn.Linear(itm.model.config.vision_config.hidden_size, len(vocab_names)).to(itm.device)
        self._local: list[torch.Tensor] = []
        self._hook = stem.register_forward_hook(lambda _m, _i, out: self._local.append(out))

    def close(self) -> None:
        self._hook.remove()

    def loss(self, embeds: torch.Tensor, present: list[list[str]], rng: np.random.Generator) -> torch.Tensor:
        local = self._local[-1].flatten(2).transpose(1, 2)  # (B, N, D): the stem output of this step's images
        self._local.clear()
        chosen = [ns[int(rng.integers(len(ns)))] for ns in present]
        prompts, spans = zip(*[prompt_span(self.template, n) for n in chosen])
        ids_, am, wm = self.itm.tokenize(prompts, spans)
        _, attn = self.itm.itm_logits_and_attention(embeds, ids_, am, self.layer)
        a = word_mean(attn.mean(1), wm)[:, 1:]  # (B, N): the word's attention over the patch grid
        a = a / a.sum(1, keepdim=True).clamp(min=1e-6)
        pooled = torch.einsum("bn,bnd->bd", a, local)
        target = torch.tensor([self.col[n] for n in chosen], device=pooled.device)
        return F.cross_entropy(self.head(pooled), target)


class _Mosaic:
    """The mosaic grounding loss (``ItmTrainConfig.mosaic_weight``).

    Four training images, each at half size, make one 2x2 mosaic of the model's input size. A name that
    exactly one tile's caption mentions is, by construction, somewhere in that tile and nowhere else. Its
    prompt runs through the text encoder; the word tokens' cross-attention over the patch grid in
    ``layer`` (the GradCAM layer, mean over heads, [CLS] column dropped and renormalised: what eq. 3
    weights by the gradient) must put its mass in that tile: ``-log`` of the mass there. The ITM head must
    also accept the prompt on the mosaic and reject the prompt of a name no tile mentions. Where the
    word-grounding loss only says *what* the attended patches must look like, this says *where* they
    are, from the composition alone; the tile is a quarter of the image, so the ITM's own loss still has
    to find the object inside it."""

    def __init__(self, itm: ItmModel, vocab_names: list[str], template: str, layer: int):
        self.itm, self.vocab_names, self.template, self.layer = itm, vocab_names, template, layer
        g = itm.grid
        if g % 2:
            raise ValueError(f"mosaic grounding needs an even patch grid, got {g}x{g}")
        rows = torch.arange(g).view(-1, 1).expand(g, g)
        cols = torch.arange(g).view(1, -1).expand(g, g)
        tile = (rows >= g // 2).long() * 2 + (cols >= g // 2).long()  # tile index of each patch (row-major 2x2)
        self.tile_masks = torch.stack([(tile == t).flatten() for t in range(4)]).float().to(itm.device)  # (4, N)

    def sample(self, names: list[list[str]], pool: np.ndarray, count: int, rng: np.random.Generator):
        """``count`` mosaics: (the four image indices, the target tile, its name, a name absent from all four)."""
        out = []
        for _ in range(count * 4):
            if len(out) == count:
                break
            quad = rng.choice(pool, size=4, replace=False)
            sets = [set(names[i]) for i in quad]
            unique = [(t, n) for t in range(4) for n in sorted(sets[t]) if not any(n in sets[u] for u in range(4) if u != t)]
            absent = [n for n in self.vocab_names if not any(n in s for s in sets)]
            if unique and absent:
                t, n = unique[int(rng.integers(len(unique)))]
                out.append((quad, t, n, absent[int(rng.integers(len(absent)))]))
        return out

    @staticmethod
    def compose(quads: torch.Tensor) -> torch.Tensor:
        """``(M, 4, 3, S, S)`` → ``(M, 3, S, S)``: each image at half size in one quarter (row-major)."""
        m, _, c, s, _ = quads.shape
        half = F.avg_pool2d(quads.reshape(m * 4, c, s, s), 2).reshape(m, 2, 2, c, s // 2, s // 2)
        return half.permute(0, 3, 1, 4, 2, 5).reshape(m, c, s, s)

    def loss(self, images: torch.Tensor, names: list[list[str]], pool: np.ndarray, count: int,
             rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
        picks = self.sample(names, pool, count, rng)
        if not picks:
            return torch.zeros((), device=self.itm.device), {}
        idx = torch.from_numpy(np.concatenate([q for q, *_ in picks]))
        x = flip_turn(images[idx].float(), rng).reshape(len(picks), 4, *images.shape[1:])
        embeds = self.itm.image_embeds(self.itm.preprocess(self.compose(x)))
        texts, spans = zip(*[prompt_span(self.template, n) for _, _, n, _ in picks] +
                           [prompt_span(self.template, a) for *_, a in picks])
        ids_, am, wm = self.itm.tokenize(texts, spans)
        rows = torch.arange(len(picks), device=embeds.device).repeat(2)
        logits, attn = self.itm.itm_logits_and_attention(embeds[rows], ids_, am, self.layer)
        m = len(picks)
        a = word_mean(attn[:m].mean(1), wm[:m])[:, 1:]  # (M, N): each target word's attention over the patches
        a = a / a.sum(1, keepdim=True).clamp(min=1e-6)
        target = self.tile_masks[torch.tensor([t for _, t, _, _ in picks], device=a.device)]
        mass = (a * target).sum(1)
        labels = torch.cat([torch.ones(m), torch.zeros(m)]).long().to(logits.device)
        loc = -(mass.clamp(min=1e-6).log()).mean()
        itm_loss = F.cross_entropy(logits, labels)
        return loc + itm_loss, {"mosaic_mass": float(mass.detach().mean()),
                                  "mosaic_itm_acc": float((logits.detach().argmax(-1) == labels).float().mean())}


def _itc_loss(itm: ItmModel, embeds: torch.Tensor, idx: np.ndarray, names, vocab_names, template: str, temperature: float) -> torch.Tensor:
    """Contrastive loss between image [CLS] and the prompt of every vocabulary name (multi-positive:
    the names the caption mentions). Shapes the vision features quickly, as in BLIP's ITC."""
    model = itm.model
    prompts, spans = zip(*[prompt_span(template, n) for n in vocab_names])
    ids_, am, wm = itm.tokenize(prompts, spans)
    hidden = model.text_encoder(input_ids=ids_, attention_mask=am).last_hidden_state
    # the object word's own output token: distinct per name from the first step (the [CLS] of prompts that
    # differ in one word starts out nearly identical, which stalls contrastive learning from scratch)
    w = wm.to(hidden.dtype)[..., None]
    text = (hidden * w).sum(1) / w.sum(1).clamp(min=1)
    t = F.normalize(model.text_proj(text), dim=-1)  # (V, P)
    v = F.normalize(model.vision_proj(embeds[:, 1:].mean(1)), dim=-1)  # (B, P): mean of patch tokens (learns faster than [CLS] from scratch)
    sim = v @ t.t() / temperature  # (B, V)
    target = name_targets([names[i] for i in idx], vocab_names).to(sim.device)
    target = target / target.sum(1, keepdim=True).clamp(min=1)
    return -(target * sim.log_softmax(1)).sum(1).mean()


def caption_metrics(itm: ItmModel, images: torch.Tensor, names: list[list[str]], vocab_names: list[str], template: str) -> dict:
    """Acceptance of prompts for caption-named objects; rejection of prompts for names not in the caption."""
    pos_t = [[prompt_span(template, n)[0] for n in ns] for ns in names]
    neg_t = [[prompt_span(template, n)[0] for n in vocab_names if n not in ns] for ns in names]
    pos = [p for ps in itm.match_probs(images, pos_t) for p in ps]
    neg = [p for ps in itm.match_probs(images, neg_t) for p in ps]
    return {"named_accepted": round(float(np.mean(np.array(pos) > 0.5)), 4),
            "unnamed_rejected": round(float(np.mean(np.array(neg) < 0.5)), 4)}


def grounding_metrics(itm: ItmModel, images: torch.Tensor, image_ids: list[int], gt, template: str) -> dict:
    """With ground truth: hard-negative rejection (truly absent names) and the "right object" rate.

    Right object: for an image with objects of several categories, the GradCAM map for one category is
    brighter (mean inside its GT masks) than on the other categories' objects.
    """
    absent_p, right, total = [], 0, 0
    all_names = [c["name"] for c in gt.categories.values()]
    for i, image_id in enumerate(image_ids):
        insts = gt.instances(image_id)
        present = sorted({g.category for g in insts})
        absent = [n for n in all_names if n not in present]
        absent_p += itm.match_probs(images[i:i + 1], [[prompt_span(template, n)[0] for n in absent]])[0]
        if len(present) < 2:
            continue
        prompts, spans = zip(*[prompt_span(template, n) for n in present])
        ids_, am, wm = itm.tokenize(prompts, spans)
        x = itm.preprocess(images[i:i + 1].float()).expand(len(present), -1, -1, -1)
        maps = itm.gradcam(x, ids_, am, wm).maps
        h, w = insts[0].mask.shape
        up = F.interpolate(maps[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0].cpu().numpy()
        for k, name in enumerate(present):
            own = np.zeros((h, w), bool)
            other = np.zeros((h, w), bool)
            for g in insts:
                if g.category == name:
                    own |= g.mask
                else:
                    other |= g.mask
            other &= ~own
            if own.any() and other.any():
                total += 1
                right += int(up[k][own].mean() > up[k][other].mean())
    return {"absent_rejected": round(float(np.mean(np.array(absent_p) < 0.5)), 4) if absent_p else None,
            "right_object_rate": round(right / total, 4) if total else None, "right_object_pairs": total}
