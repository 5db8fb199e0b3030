"""OV Mask R-CNN training speed: steps/s (and images/s) of `ovtasks train`'s loop on one device.

The same loop as a retrain (AdamW, the model's losses, gradient clipping, the LR schedule), on synthetic clean
shards with their GT masks as targets (the speed does not depend on where the masks came from). The rate is taken
from the training history between the end of ``--warmup`` steps and the last step, so model building, data loading
before the loop and the first steps' kernel selection are left out.

``--size small`` is the CPU network `make demo` trains (the small CNN + FPN, 192-320 px); ``--size real`` the
patent's (ResNet-50 FPN, 800-1333 px, random weights).

    python benchmarks/train_speed.py                                   # CPU, small network
    python benchmarks/train_speed.py --device cuda --size real --steps 120 --batch-size 8

Writes benchmarks/results/train_speed.json (``train_speed_cuda.json`` with ``--device cuda``).
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

from ovtasks.core.config import load_settings  # noqa: E402
from ovtasks.data.synth import SynthSpec, generate  # noqa: E402
from ovtasks.ingest.pipeline import ingest  # noqa: E402
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


def run(size: str, device: str, steps: int, warmup: int, batch_size: int, images: int, image_size: int, work: Path) -> dict:
    base = load_settings(env={})
    laion, clean = work / "laion", work / "clean"
    generate(SynthSpec(seed=0, shards=1, images_per_shard=images, image_size=image_size), str(laion), base)
    ingest(str(laion), str(clean), base, workers=1)
    settings = base.model_copy(update={"device": device})
    data = gt_training_data(str(laion), str(clean), settings)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, checkpoint_every=steps + 1, **SIZES[size])
    t0 = time.perf_counter()
    trained = fit_ov_maskrcnn(*data, str(work / "model"), settings, cfg)
    wall = time.perf_counter() - t0
    steps_per_s, timed, seconds = rate(trained.history, warmup)
    return {"model": "ov-maskrcnn", "size": size, **SIZES[size], "device": device, "steps": steps, "warmup": warmup,
            "batch_size": batch_size, "images": len(data[0]), "image_size": image_size, "steps_timed": timed,
            "seconds_timed": round(seconds, 1), "steps_per_s": round(steps_per_s, 3),
            "images_per_s": round(steps_per_s * batch_size, 2), "wall_seconds": round(wall, 1),
            "final_loss": trained.history[-1]["loss"], "torch_threads": torch.get_num_threads(),
            "machine": device_machine(device)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ovtasks-train-speed-") as d:
        res = run(args.size, args.device, args.steps, args.warmup, args.batch_size, args.images, args.image_size, Path(d))
    print(f"ov-maskrcnn ({res['size']}: {res['backbone']}, {res['min_size']}-{res['max_size']} px), {res['device']}, batch "
          f"{res['batch_size']}: steps_per_s={res['steps_per_s']} ({res['images_per_s']} images/s over {res['steps_timed']} steps)")
    write_device_result(res, "train_speed", args.device, args.out, RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
