"""Training speed: steps/s (and images/s) of the OV Mask R-CNN's and Semantic-SAM's training loops on one device.

The same loops as a retrain (AdamW, the models' losses, gradient clipping, the LR schedule) on synthetic data. The
rate is taken from the training history between the end of ``--warmup`` steps and the last step, so model building,
data loading before the loop and the first steps' kernel selection are left out.

``--model ov-maskrcnn`` trains on synthetic clean shards with their GT masks as targets (the speed does not depend on
where the masks came from). ``--size small`` is the CPU network `make demo` trains (the small CNN + FPN, 192-320 px);
``--size real`` the patent's (ResNet-50 FPN, 800-1333 px, random weights).

``--model semantic-sam`` trains as `make demo` does: on the maskfree generator's pseudo-labels of a synthetic shard
(the committed ITM, a WSPN trained 30 steps, the GX gate) mixed 1:4 with synthetic SA-1B-format images. ``--size
small`` starts from the committed SAM (`models/sam-synth`); ``--size real`` from a SAM ViT-B (1024 px) with random
weights.

    python benchmarks/train_speed.py                                   # CPU, small OV Mask R-CNN
    python benchmarks/train_speed.py --model semantic-sam
    python benchmarks/train_speed.py --device cuda --size real --steps 120 --batch-size 8
    python benchmarks/train_speed.py --device cuda --model semantic-sam --size real --steps 60

Writes benchmarks/results/train_speed[_semantic_sam].json (``..._cuda.json`` with ``--device cuda``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hostinfo import device_machine, write_device_result  # noqa: E402

from maskfree_speed import maskfree_models, synthetic_clean  # noqa: E402

from ovtasks.core.config import load_settings  # noqa: E402
from ovtasks.train.data import gt_training_data  # noqa: E402
from ovtasks.train.ov_maskrcnn import TrainConfig, fit_ov_maskrcnn  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SIZES = {"small": dict(backbone="small", min_size=192, max_size=320), "real": dict(backbone="resnet50_fpn", min_size=800, max_size=1333)}


def rate(history: list[dict], warmup: int) -> tuple[float, int, float]:
    """(steps/s, steps timed, seconds) between the end of step ``warmup`` and the last step of ``history``."""
    train = [h for h in history if h.get("phase", "train") == "train"]
    if len(train) <= warmup + 1:
        raise ValueError(f"{len(train)} steps leave nothing to time after {warmup} warm-up steps")
    first, last = train[warmup - 1] if warmup else {"step": -1, "seconds": 0.0}, train[-1]
    steps, seconds = last["step"] - first["step"], last["seconds"] - first["seconds"]
    if seconds <= 0:
        raise ValueError(f"{steps} steps in {seconds} s: too few to time (the history counts tenths of a second)")
    return steps / seconds, steps, seconds


def _result(model: str, size: str, device: str, steps: int, warmup: int, batch_size: int, images: int, image_size: int,
            history: list[dict], wall: float, **extra) -> dict:
    steps_per_s, timed, seconds = rate(history, warmup)
    return {"model": model, "size": size, **extra, "device": device, "steps": steps, "warmup": warmup,
            "batch_size": batch_size, "images": images, "image_size": image_size, "steps_timed": timed,
            "seconds_timed": round(seconds, 1), "steps_per_s": round(steps_per_s, 3),
            "images_per_s": round(steps_per_s * batch_size, 2), "wall_seconds": round(wall, 1),
            "final_loss": history[-1]["loss"], "torch_threads": torch.get_num_threads(), "machine": device_machine(device)}


def run(size: str, device: str, steps: int, warmup: int, batch_size: int, images: int, image_size: int, work: Path) -> dict:
    """OV Mask R-CNN on GT targets."""
    base = load_settings(env={})
    laion, clean = synthetic_clean(work, images, image_size, base)
    settings = base.model_copy(update={"device": device})
    data = gt_training_data(laion, clean, settings)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, checkpoint_every=steps + 1, **SIZES[size])
    t0 = time.perf_counter()
    trained = fit_ov_maskrcnn(*data, str(work / "model"), settings, cfg)
    return _result("ov-maskrcnn", size, device, steps, warmup, batch_size, len(data[0]), image_size, trained.history,
                   time.perf_counter() - t0, **SIZES[size])


def run_semantic_sam(size: str, device: str, steps: int, warmup: int, batch_size: int, images: int, image_size: int,
                     work: Path) -> dict:
    """Semantic-SAM on the maskfree pseudo-labels of a synthetic shard + synthetic SA-1B-format images, 1:4."""
    from ovtasks.data.sa1b import write_synthetic
    from ovtasks.demo import committed_sam
    from ovtasks.models.sam import save_tiny as save_sam
    from ovtasks.pseudolabel.runner import pseudo_label
    from ovtasks.train.semantic_sam import SemanticSamConfig, train_semantic_sam
    from ovtasks.validate.expectations import validate

    base = load_settings(env={})
    _, clean = synthetic_clean(work, images, image_size, base)
    models, settings, _ = maskfree_models(clean, work, "committed", device, 30, base)
    labelled = pseudo_label(clean, str(work), settings, models=models).report
    gate = validate(str(work), settings, "maskfree").report
    sa1b = str(work / "sa1b")
    write_synthetic(sa1b, settings, images=max(16, images // 4), image_size=settings.synth.image_size)
    if size == "real":
        sam = save_sam(work / "sam-vit-b", full=True)
    else:
        sam = str(committed) if (committed := committed_sam(settings)) is not None else None
    cfg = SemanticSamConfig(steps=steps, batch_size=batch_size, sam_model=sam, checkpoint_every=steps + 1)
    t0 = time.perf_counter()
    trained = train_semantic_sam(clean, str(work), sa1b, str(work / "semantic-sam"), settings, cfg)
    return _result("semantic-sam", size, device, steps, warmup, batch_size, images, image_size, trained.history,
                   time.perf_counter() - t0, sam_model="SAM ViT-B, random weights" if size == "real" else sam,
                   pseudo_label_annotations=labelled.get("annotations"),
                   gx_passed=gate.get("passed"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ov-maskrcnn", choices=("ov-maskrcnn", "semantic-sam"))
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    fn = run if args.model == "ov-maskrcnn" else run_semantic_sam
    with tempfile.TemporaryDirectory(prefix="ovtasks-train-speed-") as d:
        res = fn(args.size, args.device, args.steps, args.warmup, args.batch_size, args.images, args.image_size, Path(d))
    what = f"{res['backbone']}, {res['min_size']}-{res['max_size']} px" if args.model == "ov-maskrcnn" else res["sam_model"] or "tiny SAM"
    print(f"{args.model} ({res['size']}: {what}), {res['device']}, batch {res['batch_size']}: steps_per_s={res['steps_per_s']} "
          f"({res['images_per_s']} images/s over {res['steps_timed']} steps)")
    name = "train_speed" if args.model == "ov-maskrcnn" else "train_speed_semantic_sam"
    write_device_result(res, name, args.device, args.out, RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
