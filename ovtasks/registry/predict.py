"""``ovtasks predict``: a registered or local model on image files, predictions and overlay pictures out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ovtasks.core.imaging import ImageRejected
from ovtasks.registry.serving import Segmenter, to_model_rgb, trained_dir


def predict_images(model_ref: str, paths: Sequence[str | Path], out_dir: str | Path, settings, names: str | None = None,
                   progress: bool = True) -> dict:
    """``ovtasks predict``: run a registered (``models:/NAME@alias`` / ``models:/NAME/N``, checked against the
    registry's sha256 list first) or local model on
    image files; write ``predictions.json`` (COCO results + images + categories) and one overlay picture per
    image under ``out_dir`` (``overlays/NNNNNN-<file name>.png``, named in ``images[].overlay``). A file that cannot be
    read, that ingest would reject (over ``ingest.max_pixels``, extreme aspect ratio, ...) or that the model fails on is
    listed in ``skipped`` with its reason; the rest is written."""
    from PIL import Image
    from tqdm import tqdm

    from ovtasks.report.draw import overlay_instances

    local = model_ref
    if model_ref.startswith(("models:/", "runs:/")) or "://" in model_ref:  # registered versions only, loaded as registered
        from ovtasks.registry.integrity import verified_download
        from ovtasks.registry.lifecycle import _client

        mlflow, client = _client(settings)
        local, _ = verified_download(mlflow, client, model_ref)
    seg = Segmenter(trained_dir(local), settings.device)
    if seg.architecture == "semantic-sam":
        raise ValueError("Semantic-SAM answers box prompts, which `ovtasks predict` does not take: serve it "
                         "(`ovtasks serve`) and send a 'boxes' column with each image")
    out = Path(out_dir)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    images, results, skipped, cat_ids = [], [], {}, {}
    for i, path in enumerate(tqdm(list(paths), desc="predict", unit="img", disable=not progress), start=1):
        path = Path(path)
        try:  # ingest's decoding and guards (pixel cap before decoding, aspect ratio, EXIF, 16-bit, alpha)
            arr = to_model_rgb(path.read_bytes())
            found = seg.segment([arr], names)[0]
        except ImageRejected as exc:  # one bad file never stops the folder
            skipped[str(path)] = f"{exc.reason}: {exc.detail}"
            continue
        except Exception as exc:  # noqa: BLE001 - an unreadable file or a model failure on this image alone
            skipped[str(path)] = f"{type(exc).__name__}: {exc}"
            continue
        overlay = f"{i:06d}-{path.name}.png"  # unique per input: x/a.png, y/a.png and x/a.jpg are three overlays
        images.append({"id": i, "file_name": str(path), "height": arr.shape[0], "width": arr.shape[1], "overlay": overlay})
        anns = []
        for inst in found:
            cid = cat_ids.setdefault(inst["name"], len(cat_ids) + 1)
            anns.append({"image_id": i, "category_id": cid, "score": inst["score"], "bbox": inst["bbox"],
                         "segmentation": inst["segmentation"]})
        results += anns
        overlay_instances(Image.fromarray(arr), anns, {v: k for k, v in cat_ids.items()}).save(out / "overlays" / overlay)
    doc = {"model": model_ref, "images": images, "annotations": results,
           "categories": [{"id": v, "name": k} for k, v in cat_ids.items()], "skipped": skipped}
    (out / "predictions.json").write_text(json.dumps(doc))
    return {"images": len(images), "instances": len(results), "skipped": len(skipped), "out": str(out)}
