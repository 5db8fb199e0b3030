"""The code of every registered ovtasks model (MLflow *models-from-code*).

MLflow records this file with each version and runs it when the version is loaded (``mlflow models serve``,
``mlflow.pyfunc.load_model``): nothing is unpickled, and the weights are safetensors in the artifact
``model_dir``. ``ovtasks serve`` / ``ovtasks predict`` / the retrain DAG load a version only after every file of
it matched the sha256 list recorded in the registry at registration (:mod:`ovtasks.registry.integrity`).
"""

import json
import os

import mlflow.pyfunc
from mlflow.models import set_model

from ovtasks.registry.serving import MODEL_ARTIFACT, Segmenter, decode_image


class OvtasksPyfunc(mlflow.pyfunc.PythonModel):
    """Input: a table with ``image`` (base64 JPEG/PNG), optional ``names`` (comma-separated vocabulary) and, for
    Semantic-SAM, ``boxes`` (JSON list of xyxy prompts). Output: ``instances`` (JSON list per image)."""

    def load_context(self, context):
        self.segmenter = Segmenter(context.artifacts[MODEL_ARTIFACT], os.environ.get("OVTASKS_DEVICE", "cpu"))

    def predict(self, context, model_input, params=None):
        import pandas as pd

        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in df.columns:
            raise ValueError(f"input needs a column 'image' (base64 JPEG/PNG); got {list(df.columns)}")
        names = df["names"].fillna("") if "names" in df.columns else pd.Series([""] * len(df))
        boxes = df["boxes"] if "boxes" in df.columns else pd.Series([None] * len(df))
        rows = []
        for b64, vocab, bx in zip(df["image"], names, boxes):  # one image at a time: each may have its own vocabulary
            prompts = [json.loads(bx)] if isinstance(bx, str) and bx.strip() else None
            rows.append(json.dumps(self.segmenter.segment([decode_image(b64)], vocab, boxes=prompts)[0]))
        return pd.DataFrame({"instances": rows})


set_model(OvtasksPyfunc())
