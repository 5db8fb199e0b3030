"""A trained model directory (``ovtasks_model.json`` + safetensors) back as a model, for every architecture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


META = "ovtasks_model.json"


def load_model(model_dir: str, device: str = "cpu"):
    """(model, meta) from a trained directory (OV Mask R-CNN or Semantic-SAM); safetensors only."""
    from safetensors.torch import load_file

    meta = json.loads((Path(model_dir) / META).read_text())
    if meta.get("architecture") == "semantic-sam":
        from ovtasks.models.semantic_sam import load

        return load(model_dir, device), meta
    from ovtasks.models.ov_maskrcnn import build_from_config

    model = build_from_config(meta["embed_dim"], meta["config"])
    model.set_vocabulary(torch.from_numpy(np.load(Path(model_dir) / "text_embeddings.npy")))
    model.load_state_dict(load_file(str(Path(model_dir) / "model.safetensors")))
    return model.to(device).eval(), meta
