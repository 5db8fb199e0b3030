"""Image-text matching model (transformers ``BlipForImageTextRetrieval``) and its GradCAM (patent eq. 1-3).

Loads real BLIP ITM weights by Hugging Face id, local directory or model-store URI, or a small model
trained here from scratch (:func:`tiny_blip_config` + :func:`build_word_tokenizer`, used by
``ovtasks train-itm``). The same submodules are called either way:

* ``vision_model`` → image embeddings ``(B, 1 + N_R, D_v)`` (a [CLS] token, then an ``gh x gw`` grid);
* ``text_encoder`` with cross-attention to them → ``itm_head`` on [CLS] → logits ``(B, 2)``.

GradCAM (eq. 3): the cross-attention probabilities ``X`` of one text layer (eq. 1) are captured by a
forward hook on that layer's ``crossattention.self`` module (its second output; the ITM output itself
carries no cross-attentions in transformers 5.x), then ``phi = mean_heads(X * relu(dS/dX))`` at the
object word's tokens, with ``S`` the ITM "match" logit. The last layer gives a zero map for word
tokens (the ITM head reads only [CLS]), so the default layer is the middle one, unless the checkpoint's
``ovtasks_itm.json`` names a ``gradcam_layer`` (``train-itm`` records the one it was validated with).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ovtasks.models.hub import resolve_model

OVTASKS_META = "ovtasks_itm.json"


def tiny_blip_config(vocab_size: int, image_size: int = 128, patch_size: int = 8, hidden: int = 128,
                     vision_layers: int = 4, text_layers: int = 4, heads: int = 4, proj: int = 64):
    """A small BLIP config for training from scratch on CPU (or for shape tests)."""
    from transformers import BlipConfig

    vision = dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=vision_layers,
                  num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                  initializer_range=0.02,  # the vision default (1e-10) is meant for loading weights
                  attention_dropout=0.0)
    text = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                num_hidden_layers=text_layers, num_attention_heads=heads, encoder_hidden_size=hidden,
                max_position_embeddings=64, is_decoder=True,  # is_decoder=True builds the cross-attention layers
                attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0, pad_token_id=0,
                bos_token_id=2, sep_token_id=3, initializer_range=0.02)
    return BlipConfig(vision_config=vision, text_config=text, image_text_hidden_size=proj)


class ConvStem(torch.nn.Module):
    """Early convolutions in place of BLIP's single patchify convolution (Xiao et al., 2021, "Early
    convolutions help transformers see better"): stride-2 conv-BN-ReLU blocks down to the patch grid,
    ``extra`` stride-1 blocks to widen the receptive field, then a 1x1 projection to the hidden size.
    The output shape is the patchify conv's. ``features`` exposes the conv map for the caption-label
    pretraining stage of ``ovtasks train-itm`` (from scratch, ViT patch tokens hardly learn on small
    data; a CNN does)."""

    def __init__(self, out_dim: int, patch_size: int, width: int = 32, max_width: int = 96, extra: int = 2):
        super().__init__()
        n = int(round(math.log2(patch_size)))
        if 2 ** n != patch_size:
            raise ValueError(f"conv stem needs a power-of-two patch size, got {patch_size}")
        layers, c = [], 3
        chans = [min(width * 2 ** i, max_width) for i in range(n)]
        chans += [chans[-1]] * extra
        for i, o in enumerate(chans):
            layers += [torch.nn.Conv2d(c, o, 3, 2 if i < n else 1, 1, bias=False), torch.nn.BatchNorm2d(o), torch.nn.ReLU()]
            c = o
        self.convs = torch.nn.Sequential(*layers)
        self.out_channels, self.extra = c, extra
        self.proj = torch.nn.Conv2d(c, out_dim, 1)

    @property
    def weight(self) -> torch.Tensor:  # BlipVisionEmbeddings reads patch_embedding.weight.dtype
        return self.proj.weight

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.convs(x))


def install_conv_stem(model, extra: int = 2) -> ConvStem:
    vc = model.config.vision_config
    stem = ConvStem(vc.hidden_size, vc.patch_size, extra=extra)
    model.vision_model.embeddings.patch_embedding = stem
    return stem


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def build_word_tokenizer(words: Iterable[str], out_dir: str | os.PathLike):
    """A BERT-style fast tokenizer over a closed word list (plus the special tokens)."""
    from transformers import BertTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = list(SPECIAL_TOKENS) + sorted({w for w in words if w and w not in SPECIAL_TOKENS})
    (out_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)


@dataclass
class GradCamOutput:
    maps: torch.Tensor  # (B, gh, gw) float >= 0, the word's activation over the patch grid
    scores: torch.Tensor  # (B,) ITM match probability


class ItmModel:
    """A BLIP ITM model plus what is needed to feed it (tokenizer, image size and normalisation)."""

    def __init__(self, model, tokenizer, image_size: int, mean: Sequence[float], std: Sequence[float],
                 device: str = "cpu", layer: int | None = None):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.device = device
        n_layers = model.config.text_config.num_hidden_layers
        self.layer = n_layers // 2 if layer is None else int(layer)
        if not 0 <= self.layer < n_layers:
            raise ValueError(f"itm_layer {self.layer} out of range: the text encoder has {n_layers} layers")
        vc = model.config.vision_config
        self.grid = vc.image_size // vc.patch_size

    # ---- loading / saving ---------------------------------------------------------------------
    @classmethod
    def load(cls, ref: str, device: str = "cpu", layer: int | None = None, s3=None) -> "ItmModel":
        """From a Hugging Face id, a local directory or a model-store URI (``s3://...``)."""
        from transformers import BlipForImageTextRetrieval, BlipProcessor

        path = resolve_model(ref, s3)
        meta_file = Path(path) / OVTASKS_META
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        if meta.get("conv_stem"):  # trained here with a convolutional stem: build, swap the stem, load
            from safetensors.torch import load_file
            from transformers import BlipConfig

            model = BlipForImageTextRetrieval(BlipConfig.from_pretrained(path))
            install_conv_stem(model, int(meta.get("stem_extra", 2)))  # checkpoints before stem_extra used 2
            model.load_state_dict(load_file(str(Path(path) / "model.safetensors")), strict=True)
        else:
            model = BlipForImageTextRetrieval.from_pretrained(path, use_safetensors=True)
        processor = BlipProcessor.from_pretrained(path)
        ip = processor.image_processor
        size = ip.size["height"] if hasattr(ip.size, "__getitem__") and not isinstance(ip.size, int) else int(ip.size)
        if layer is None and meta.get("gradcam_layer") is not None:
            layer = int(meta["gradcam_layer"])
        return cls(model, processor.tokenizer, size, ip.image_mean, ip.image_std, device, layer)

    def save(self, out_dir: str | os.PathLike, meta: dict | None = None) -> Path:
        from transformers import BlipImageProcessor, BlipProcessor

        out_dir = Path(out_dir)
        self.model.save_pretrained(out_dir)
        ip = BlipImageProcessor(size={"height": self.image_size, "width": self.image_size},
                                image_mean=self.mean.flatten().tolist(), image_std=self.std.flatten().tolist())
        BlipProcessor(image_processor=ip, tokenizer=self.tokenizer).save_pretrained(out_dir)
        (out_dir / OVTASKS_META).write_text(json.dumps(meta or {}, indent=2, sort_keys=True))
        return out_dir

    # ---- inputs -------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` float pixels in [0, 255] → normalised ``(B, 3, S, S)`` model input."""
        x = images.to(self.device, torch.float32) / 255.0
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    def tokenize(self, prompts: Sequence[str], spans: Sequence[tuple[int, int]] | None = None):
        """Token ids, attention mask and, per prompt, a mask of the tokens inside the character ``span``."""
        enc = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=48,
                             return_offsets_mapping=spans is not None, return_tensors="pt")
        word_mask = None
        if spans is not None:
            offsets = enc.pop("offset_mapping")  # (B, L, 2)
            lo = torch.tensor([s[0] for s in spans]).view(-1, 1)
            hi = torch.tensor([s[1] for s in spans]).view(-1, 1)
            word_mask = (offsets[..., 1] > lo) & (offsets[..., 0] < hi) & (offsets[..., 1] > offsets[..., 0])
            word_mask = word_mask.to(self.device)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device), word_mask

    # ---- forward ------------------------------------------------------------------------------
    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.vision_model(pixel_values=pixels).last_hidden_state

    def itm_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ITM logits ``(B, 2)`` (index 1 = match) for aligned rows of image embeddings and texts."""
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.model.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                      encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts)
        return self.model.itm_head(out.last_hidden_state[:, 0, :])

    @torch.no_grad()
    def match_probs(self, images: torch.Tensor, texts_per_image: Sequence[Sequence[str]], batch: int = 32) -> list[list[float]]:
        """ITM match probability of every text in ``texts_per_image[i]`` on ``images[i]`` (``(N, 3, H, W)``
        pixels in [0, 255]), ``batch`` images at a time."""
        out: list[list[float]] = []
        for i0 in range(0, len(images), batch):
            chunk = texts_per_image[i0:i0 + batch]
            embeds = self.image_embeds(self.preprocess(images[i0:i0 + batch].float()))
            rows = torch.tensor([r for r, ts in enumerate(chunk) for _ in ts], device=embeds.device)
            texts = [t for ts in chunk for t in ts]
            if not texts:
                out += [[] for _ in chunk]
                continue
            ids_, am, _ = self.tokenize(texts)
            p = self.itm_logits(embeds[rows], ids_, am).softmax(-1)[:, 1].float().tolist()
            k = 0
            for ts in chunk:
                out.append(p[k:k + len(ts)])
                k += len(ts)
        return out

    def itm_logits_and_attention(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                 layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ITM logits and the cross-attention probabilities X (eq. 1) of text layer ``layer`` (default: the
        GradCAM layer), ``(B, heads, L, 1 + N_R)``, captured by a hook (part of the graph when grad is on)."""
        module = self.model.text_encoder.encoder.layer[self.layer if layer is None else layer].crossattention.self
        captured: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out[1]))
        try:
            logits = self.itm_logits(image_embeds, input_ids, attention_mask)
        finally:
            handle.remove()
        return logits, captured[-1]

    def gradcam(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                word_mask: torch.Tensor) -> GradCamOutput:
        """Eq. 3 for each row: ``(B, 3, S, S)`` pixels, ``(B, L)`` tokens, ``(B, L)`` word-token mask.

        Rows whose word mask is empty (the word was truncated away) get an all-zero map.
        """
        with torch.no_grad():
            embeds = self.image_embeds(pixels)
        embeds = embeds.detach().requires_grad_(True)  # builds the graph through the attention only
        with torch.enable_grad():
            logits, attn = self.itm_logits_and_attention(embeds, input_ids, attention_mask)  # attn: (B, heads, L, 1 + N_R)
            grad = torch.autograd.grad(logits[:, 1].sum(), attn)[0]
        cam = word_mean((attn.detach() * grad.clamp(min=0)).mean(1), word_mask)  # (B, 1 + N_R)
        cam = cam[:, 1:].reshape(-1, self.grid, self.grid)  # drop the image [CLS] column
        return GradCamOutput(cam, logits.detach().softmax(-1)[:, 1])


def word_mean(x: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
    """``(B, L, ...)`` per-token values → their mean over each row's word tokens, ``(B, ...)`` (zero for an empty mask)."""
    wm = word_mask.to(x.dtype).view(*word_mask.shape, *([1] * (x.dim() - 2)))
    return (x * wm).sum(1) / wm.sum(1).clamp(min=1)


def prompt_span(template: str, name: str) -> tuple[str, tuple[int, int]]:
    """The prompt text for ``name`` and the character span the name occupies in it."""
    start = template.index("{name}")
    return template.format(name=name), (start, start + len(name))


def to_chw_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """Same-size ``(H, W, 3)`` uint8 arrays → ``(B, 3, H, W)`` float tensor."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
