"""Registered models that answer images: an MLflow pyfunc around a trained model directory.

Each registered version (OV Mask R-CNN or Semantic-SAM) is a pyfunc model from code (``MLmodel``, a signature,
an input example, the class as the file :mod:`ovtasks.registry.pyfunc_model`; the trained directory, safetensors
inside, as its artifact): nothing in it is a pickle. ``ovtasks serve models:/ovtasks-ov-maskrcnn@champion``
checks every file against the sha256 list the registry holds for the version, then answers HTTP requests with
``mlflow models serve``; :func:`ovtasks.registry.predict.predict_images` (``ovtasks predict``) runs a champion on
a folder of images after the same check.

Input: a table with a column ``image`` (the encoded image file, JPEG or PNG, base64), an optional column
``names`` (a comma-separated vocabulary; empty: the model's own training vocabulary) and, for Semantic-SAM
(a promptable model), ``boxes``: a JSON list of ``[x1, y1, x2, y2]`` pixel box prompts. Output: one row
per image, column ``instances``: a JSON list of ``{"name", "score", "bbox" (x, y, w, h), "segmentation"
(COCO RLE)}`` (for Semantic-SAM also ``prompt``, the index of the box it answers).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ovtasks import __version__

MODEL_ARTIFACT = "model_dir"
SCORE_THRESHOLD = 0.3


def encode_image(path_or_bytes) -> str:
    data = Path(path_or_bytes).read_bytes() if isinstance(path_or_bytes, (str, Path)) else bytes(path_or_bytes)
    return base64.b64encode(data).decode()


def to_model_rgb(data: bytes) -> np.ndarray:
    """An image file's bytes as the RGB array the models saw in training: ingest's own decoding
    (:func:`ovtasks.core.imaging.decode_image`: the declared size checked against ``ingest.max_pixels`` before any
    pixel is decoded, the minimum side and aspect ratio, EXIF orientation applied, 16-bit scaled to 8 bits,
    transparency composited on white). Raises :class:`ovtasks.core.imaging.ImageRejected` with its reason."""
    from ovtasks.core.config import IngestConfig
    from ovtasks.core.imaging import decode_image as ingest_decode

    return np.asarray(ingest_decode(data, IngestConfig()).image.convert("RGB"))


def decode_image(b64: str) -> np.ndarray:
    """A base64 image from a serving request, decoded as :func:`to_model_rgb` does."""
    from ovtasks.core.imaging import ImageRejected

    try:
        data = base64.b64decode(b64, validate=True)
    except Exception as exc:  # noqa: BLE001 - bad base64: a clear error for the caller
        raise ValueError(f"column 'image' must hold a base64-encoded JPEG or PNG: {type(exc).__name__}: {exc}") from exc
    try:
        return to_model_rgb(data)
    except ImageRejected as exc:
        raise ValueError(f"column 'image': {exc.reason}: {exc.detail}") from exc


class Segmenter:
    """A trained model directory with what it needs to answer: the model, its vocabulary and, for other
    vocabularies, the text encoder (loaded on first use)."""

    def __init__(self, model_dir: str, device: str = "cpu", text_encoder: str | None = None):
        from ovtasks.models.loading import load_model

        self.model, self.meta = load_model(model_dir, device)
        self.architecture = self.meta.get("architecture", "ov-maskrcnn")
        self.device = device
        self.categories = self.meta["categories"]
        self.embeddings = np.load(Path(model_dir) / "text_embeddings.npy")
        self._text_encoder_ref = text_encoder
        self._encoder = None

    def _vocabulary(self, names: str | None):
        wanted = [n.strip() for n in (names or "").split(",") if n.strip()]
        if not wanted:
            return [c["name"] for c in self.categories], self.embeddings
        if self._encoder is None:
            from ovtasks.core.config import load_settings
            from ovtasks.models.text_encoder import TextEncoder

            ref = self._text_encoder_ref or load_settings().candidates.text_encoder
            self._encoder = TextEncoder(ref, self.device)
        return wanted, self._encoder.encode(wanted)

    def segment(self, images: Sequence[np.ndarray], names: str | None = None, score_threshold: float = SCORE_THRESHOLD,
                boxes: Sequence[Sequence[Sequence[float]]] | None = None) -> list[list[dict]]:
        """Instances per image; ``boxes`` (per image, xyxy prompts) are required by Semantic-SAM, unused otherwise."""
        vocab, emb = self._vocabulary(names)
        ids, cat_ids = list(range(len(images))), list(range(len(vocab)))
        if self.architecture == "semantic-sam":
            from ovtasks.models.semantic_sam import predict as predict_prompted

            if boxes is None:
                raise ValueError("Semantic-SAM answers box prompts: give a column 'boxes' (JSON list of [x1, y1, x2, y2])")
            prompts = [np.asarray(b, np.float32).reshape(-1, 4) for b in boxes]
            preds = predict_prompted(self.model, list(images), ids, prompts, cat_ids, emb, self.device, category_names=vocab)
        else:
            from ovtasks.models.ov_maskrcnn import predict

            preds = predict(self.model, list(images), ids, cat_ids, emb, self.device, score_thresh=score_threshold)
        out: list[list[dict]] = [[] for _ in images]
        for p in preds:
            out[p["image_id"]].append({"name": vocab[p["category_id"]], "score": round(p["score"], 4),
                                       "bbox": [round(v, 1) for v in p["bbox"]], "segmentation": p["segmentation"],
                                       **({"prompt": p["prompt"]} if "prompt" in p else {})})
        return out


def signature():
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "image"), ColSpec("string", "names", required=False),
                                         ColSpec("string", "boxes", required=False)]),
                          outputs=Schema([ColSpec("string", "instances")]))


def input_example(architecture: str = "ov-maskrcnn"):
    """One small PNG, the model's own vocabulary and, for Semantic-SAM, one box prompt."""
    import pandas as pd
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 127, np.uint8)).save(buf, format="PNG")
    return pd.DataFrame({"image": [encode_image(buf.getvalue())], "names": [""],
                         "boxes": [json.dumps([[8, 8, 40, 40]]) if architecture == "semantic-sam" else ""]})


def log_pyfunc(mlflow, model_dir: str, architecture: str = "ov-maskrcnn"):
    """Log ``model_dir`` as this run's pyfunc model ``model`` (models-from-code: the class is the file
    :mod:`ovtasks.registry.pyfunc_model`, no pickle); returns MLflow's ModelInfo."""
    code = Path(__file__).with_name("pyfunc_model.py")
    return mlflow.pyfunc.log_model(name="model", python_model=str(code), artifacts={MODEL_ARTIFACT: model_dir},
                                   signature=signature(), input_example=input_example(architecture),
                                   pip_requirements=[f"ovtasks=={__version__}"])


def trained_dir(local: str | Path) -> str:
    """The trained model directory inside a downloaded registered model (a pyfunc keeps it under
    ``artifacts/``; older versions were the directory itself)."""
    local = Path(local)
    if (local / "ovtasks_model.json").exists():
        return str(local)
    found = sorted(local.rglob("ovtasks_model.json"))
    if not found:
        raise FileNotFoundError(f"no trained model (ovtasks_model.json) under {local}")
    return str(found[0].parent)
