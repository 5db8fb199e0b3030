"""Grounding-DINO boxes for object names (transformers ``GroundingDinoForObjectDetection``), batched.

Loads weights by Hugging Face id, local directory or model-store URI (with its processor: a BERT
tokenizer and the image processor's size / mean / std). :func:`save_tiny` writes a tiny random model
in the same layout, for offline tests and CPU benchmarks.

What :meth:`GroundingDino.detect` does that the usual one-image, one-prompt loop does not:

* all of an image's names go into one prompt ``"cat. dog. tree."``; when the prompt would exceed the
  model's text length (256 tokens), the names are split into chunks, each chunk is a row of its own
  and the rows' detections are merged;
* rows of different images are batched (micro-batches of ``batch_size`` rows). Only rows whose
  resized images have the same size share a batch, so there is no pixel padding and batched results
  equal per-image results; texts are padded and masked;
* each query's score for a name is the highest token probability over that name's tokens; a query is
  kept when its best name scores above ``box_threshold`` (and ``text_threshold``);
* boxes are pixel ``xyxy`` of the original image, with NMS per image within a category (names that
  are synonyms of one category share a group id, so NMS also runs across them).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ovtasks.models.hub import image_processor_config, resolve_model
from ovtasks.models.preprocess import resize_normalise, resolve_dtype, shortest_edge_size

log = logging.getLogger(__name__)

# Grounding-DINO's text masks are built from these BERT ids ([CLS], [SEP], ".", "?"): the model
# hard-codes them, so any tokenizer used with it must put those tokens at these ids.
CLS_ID, SEP_ID, DOT_ID, QMARK_ID, PAD_ID = 101, 102, 1012, 1029, 0


@dataclass
class Detections:
    """Boxes for one image: pixel xyxy, scores, and the index of each box's name in the name list."""

    boxes: np.ndarray  # (N, 4) float32
    scores: np.ndarray  # (N,) float32
    labels: np.ndarray  # (N,) int64

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.scores)


@dataclass(frozen=True)
class PromptChunk:
    ids: list[int]  # [CLS] name . name . ... [SEP]
    names: list[int]  # index of each name in the caller's list
    positions: list[list[int]]  # token positions of each name in ``ids``


class GroundingDino:
    def __init__(self, model, tokenizer, shortest: int, longest: int, mean, std, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, box_threshold: float = 0.35, text_threshold: float = 0.25,
                 nms_iou: float = 0.5, max_detections: int = 100, batch_size: int = 4):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.shortest, self.longest, self.mean, self.std = shortest, longest, tuple(mean), tuple(std)
        self.device, self.dtype = device, dtype
        self.box_threshold, self.text_threshold = box_threshold, text_threshold
        self.nms_iou, self.max_detections, self.batch_size = nms_iou, max_detections, batch_size
        self.max_text_len = int(model.config.max_text_len)
        self._name_ids: dict[str, list[int]] = {}

    @classmethod
    def load(cls, ref: str, device: str = "cpu", dtype: str = "auto", s3=None, **kwargs) -> "GroundingDino":
        from transformers import AutoTokenizer, GroundingDinoForObjectDetection

        path = resolve_model(ref, s3)
        model = GroundingDinoForObjectDetection.from_pretrained(path, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
        for tok, want in (("[CLS]", CLS_ID), ("[SEP]", SEP_ID), (".", DOT_ID)):
            if tokenizer.convert_tokens_to_ids(tok) != want:
                raise ValueError(f"{ref}: tokenizer maps {tok!r} to {tokenizer.convert_tokens_to_ids(tok)}, "
                                 f"Grounding-DINO needs {want} (a bert-base-uncased vocabulary)")
        cfg = image_processor_config(path)
        size = cfg.get("size") or {"shortest_edge": 800, "longest_edge": 1333}
        mean, std = cfg.get("image_mean", (0.485, 0.456, 0.406)), cfg.get("image_std", (0.229, 0.224, 0.225))
        return cls(model, tokenizer, int(size["shortest_edge"]), int(size["longest_edge"]), mean, std, device,
                   resolve_dtype(dtype, device), **kwargs)

    # -- prompts -----------------------------------------------------------------------------------
    def _ids(self, name: str) -> list[int]:
        if name not in self._name_ids:
            clean = " ".join(name.lower().replace(".", " ").replace("?", " ").split())
            self._name_ids[name] = self.tokenizer(clean, add_special_tokens=False)["input_ids"] if clean else []
        return self._name_ids[name]

    def prompt_chunks(self, names: Sequence[str]) -> list[PromptChunk]:
        """Pack names into prompts of at most ``max_text_len`` tokens, in order. A name too long for a
        prompt of its own is cut to fit (and logged)."""
        chunks: list[PromptChunk] = []
        ids, idx, pos = [CLS_ID], [], []
        room = self.max_text_len - 1  # [SEP]
        for i, name in enumerate(names):
            tok = self._ids(name)
            if not tok:
                continue
            if len(tok) + 1 > room - 1:
                log.warning("object name too long for one prompt; truncated", extra={"name": name[:80], "tokens": len(tok)})
                tok = tok[: room - 2]
            if len(ids) + len(tok) + 1 > room:
                chunks.append(PromptChunk(ids + [SEP_ID], idx, pos))
                ids, idx, pos = [CLS_ID], [], []
            pos.append(list(range(len(ids), len(ids) + len(tok))))
            idx.append(i)
            ids = ids + tok + [DOT_ID]
        if idx:
            chunks.append(PromptChunk(ids + [SEP_ID], idx, pos))
        return chunks

    # -- inference ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def _forward(self, pixels: torch.Tensor, chunks: Sequence[PromptChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(len(c.ids) for c in chunks)
        ids = torch.full((len(chunks), n), PAD_ID, dtype=torch.long)
        att = torch.zeros((len(chunks), n), dtype=torch.long)
        for r, c in enumerate(chunks):
            ids[r, : len(c.ids)] = torch.tensor(c.ids)
            att[r, : len(c.ids)] = 1
        ids, att = ids.to(self.device), att.to(self.device)
        out = self.model(pixel_values=pixels, input_ids=ids, attention_mask=att, token_type_ids=torch.zeros_like(ids),
                         pixel_mask=torch.ones((pixels.shape[0],) + pixels.shape[-2:], dtype=torch.long, device=self.device))
        return out.logits.float().sigmoid()[:, :, :n], out.pred_boxes.float()

    def detect(self, images: Sequence[np.ndarray], names: Sequence[Sequence[str]],
               groups: Sequence[Sequence[int]] | None = None) -> list[Detections]:
        """Boxes for ``names[i]`` in ``images[i]``; labels index into ``names[i]``. ``groups[i][j]`` is the
        category of name j (NMS runs per group); by default every name is its own group."""
        if len(images) != len(names):
            raise ValueError(f"{len(images)} images but {len(names)} name lists")
        rows = []  # (image index, chunk, resized size)
        for i, (im, ns) in enumerate(zip(images, names)):
            size = shortest_edge_size(im.shape[0], im.shape[1], self.shortest, self.longest)
            rows += [(i, c, size) for c in self.prompt_chunks(ns)]
        found: list[list[tuple]] = [[] for _ in images]
        by_size: dict[tuple[int, int], list] = {}
        for r in rows:
            by_size.setdefault(r[2], []).append(r)
        for size, group in by_size.items():
            for b0 in range(0, len(group), self.batch_size):
                batch = group[b0: b0 + self.batch_size]
                pixels = torch.stack([resize_normalise(images[i], size, self.mean, self.std, self.device, self.dtype)
                                      for i, _, _ in batch])
                probs, boxes = self._forward(pixels, [c for _, c, _ in batch])
                for (i, chunk, _), p, b in zip(batch, probs, boxes):
                    found[i].append(self._decode(p, b, chunk, images[i].shape[:2]))
        out = []
        for i, parts in enumerate(found):
            parts = [p for p in parts if len(p[1])]
            if not parts:
                out.append(Detections.empty())
                continue
            bx = torch.cat([p[0] for p in parts])
            sc = torch.cat([p[1] for p in parts])
            lb = torch.cat([p[2] for p in parts])
            out.append(self._nms(bx, sc, lb, None if groups is None else groups[i]))
        return out

    def _decode(self, probs: torch.Tensor, boxes: torch.Tensor, chunk: PromptChunk, hw: tuple[int, int]):
        per_name = torch.stack([probs[:, pos].max(dim=1).values for pos in chunk.positions], dim=1)  # (Q, names)
        score, best = per_name.max(dim=1)
        keep = (score > self.box_threshold) & (score > self.text_threshold)
        h, w = hw
        cx, cy, bw, bh = boxes[keep].unbind(-1)
        xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1) * torch.tensor([w, h, w, h], dtype=torch.float32, device=boxes.device)
        xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, w)
        xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, h)
        labels = torch.tensor(chunk.names, device=boxes.device)[best[keep]]
        return xyxy.cpu(), score[keep].cpu(), labels.cpu()

    def _nms(self, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, groups) -> Detections:
        from torchvision.ops import batched_nms

        gid = labels if groups is None else torch.tensor(groups, dtype=torch.long)[labels]
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, scores, labels, gid = boxes[valid], scores[valid], labels[valid], gid[valid]
        keep = batched_nms(boxes, scores, gid, self.nms_iou)[: self.max_detections]  # sorted by score
        return Detections(boxes[keep].numpy().astype(np.float32), scores[keep].numpy().astype(np.float32),
                          labels[keep].numpy().astype(np.int64))


# -- a tiny random model in the real layout (offline tests, CPU benchmarks) ---------------------------
def bert_style_vocab(words: Sequence[str] = ()) -> list[str]:
    """A WordPiece vocabulary with bert-base-uncased's special ids (see CLS_ID..QMARK_ID): letters and
    digits (so every word tokenizes), their ``##`` continuations, then ``words``."""
    vocab = [f"[unused{i}]" for i in range(1030)]
    vocab[PAD_ID], vocab[100], vocab[CLS_ID], vocab[SEP_ID], vocab[103] = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
    vocab[DOT_ID], vocab[QMARK_ID] = ".", "?"
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list(",;:!'-\"()/&")
    seen = set(vocab)
    for t in chars + ["##" + c for c in chars] + [w.lower() for w in words]:
        if t not in seen:
            seen.add(t)
            vocab.append(t)
    return vocab


def save_tiny(path: str | os.PathLike, words: Sequence[str] = (), shortest: int = 64, longest: int = 96, seed: int = 0,
              d_model: int = 32, num_queries: int = 30, max_text_len: int = 256, full: bool = False) -> str:
    """Write a tiny random Grounding-DINO (Swin backbone, BERT text tower) with its tokenizer and image
    processor config to ``path``; :meth:`GroundingDino.load` opens it like any checkpoint. ``full``
    writes the real architecture instead (Swin-T, BERT-base, 900 queries: transformers' defaults) with
    random weights, for speed measurements."""
    from transformers import (BertConfig, BertTokenizerFast, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, SwinConfig)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = bert_style_vocab(words)
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    if full:
        cfg = GroundingDinoConfig(text_config=BertConfig(vocab_size=len(vocab)), max_text_len=max_text_len)
        GroundingDinoForObjectDetection(cfg).save_pretrained(path)
        GroundingDinoImageProcessor(size={"shortest_edge": shortest, "longest_edge": longest}).save_pretrained(path)
        return str(path)
    swin = SwinConfig(image_size=shortest, patch_size=4, embed_dim=16, depths=[1, 1, 1], num_heads=[1, 1, 2],
                      window_size=4, out_features=["stage1", "stage2", "stage3"])
    bert = BertConfig(vocab_size=len(vocab), hidden_size=d_model, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=2 * d_model, max_position_embeddings=max_text_len + 8)
    cfg = GroundingDinoConfig(backbone_config=swin, text_config=bert, d_model=d_model, encoder_layers=1, decoder_layers=2,
                              encoder_ffn_dim=2 * d_model, decoder_ffn_dim=2 * d_model, encoder_attention_heads=2,
                              decoder_attention_heads=2, num_queries=num_queries, encoder_n_points=2, decoder_n_points=2,
                              max_text_len=max_text_len)
    GroundingDinoForObjectDetection(cfg).save_pretrained(path)
    GroundingDinoImageProcessor(size={"shortest_edge": shortest, "longest_edge": longest}).save_pretrained(path)
    return str(path)
