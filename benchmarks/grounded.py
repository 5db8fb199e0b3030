"""Grounded generator speed: our batched pipeline vs the per-image, per-prompt loop, same models.

The loop is how Grounded-SAM / autodistill label a data set: for every image, one Grounding-DINO call
per object name ("ball."), then SAM's image embedding once per image and one SAM decode per box.
Ours (:func:`ovtasks.pseudolabel.grounded.generator.label_grounded`): all of an image's names in one prompt, images batched,
one SAM embedding per image and all its boxes decoded together. Both run on the same images, names,
models and thresholds, side by side in one run. With one name per image both give the same boxes
(checked). With several names they differ by design: in one prompt each Grounding-DINO query goes to
its best name (the model's own post-processing), while one prompt per name lets every query match
every name, so the loop returns more, mostly duplicate, boxes.

Models are random small configurations (no weights can be downloaded here; speed does not depend on
the weights): Grounding-DINO with a Swin backbone and a BERT text tower, SAM with a ViT encoder, sizes
set by ``--size`` (``small`` for the CPU, ``real`` for Swin-T / ViT-B shaped models on a GPU).

    python benchmarks/grounded.py                          # CPU, small models, synthetic captions
    python benchmarks/grounded.py --device cuda --size real --image-size 800 --dtype bfloat16 --images 256

The headline workload uses the lexicon's candidates from the synthetic captions; the table adds
workloads with 1, 4 and 8 names per image (what an LLM extractor proposes for a real caption), since the
loop's cost grows with the number of names and ours barely does. Prints ``speedup=<x>`` for the
headline and writes benchmarks/results/grounded.json. Target: >= 3x on the CPU.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovtasks.pseudolabel.candidates import Vocabulary, build_extractor  # noqa: E402
from ovtasks.core.config import load_settings  # noqa: E402
from ovtasks.pseudolabel.grounded.generator import GroundedModels, label_grounded  # noqa: E402
from ovtasks.models.grounding_dino import GroundingDino, save_tiny as save_gdino  # noqa: E402
from ovtasks.models.sam import SamSegmenter, save_tiny as save_sam  # noqa: E402
from ovtasks.data.synth import SynthSpec, make_sample  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SIZES = {  # (gdino kwargs, sam kwargs)
    "small": (dict(d_model=64, num_queries=100), dict(image_size=256, hidden=64)),
    "real": (dict(full=True), dict(full=True)),  # Swin-T + BERT-base Grounding-DINO, SAM ViT-B
}


def build_models(work: Path, size: str, image_size: int, device: str, dtype: str, batch: int, words, max_det: int = 100):
    gk, sk = SIZES[size]
    gdir = save_gdino(work / "gdino", words, shortest=image_size, longest=int(image_size * 1333 / 800), **gk)
    sdir = save_sam(work / "sam", **sk)
    gdino = GroundingDino.load(gdir, device, dtype, box_threshold=0.3, text_threshold=0.25, batch_size=batch, max_detections=max_det)
    sam = SamSegmenter.load(sdir, device, dtype, batch_size=batch, box_batch=64)
    return GroundedModels(gdino, sam, {})


def per_prompt_loop(models: GroundedModels, images, names):
    """The reference: one Grounding-DINO call per (image, name); SAM embedding per image, one decode per box."""
    g, s = models.gdino, models.sam
    out = []
    for im, ns in zip(images, names):
        boxes, labels, scores = [], [], []
        for j, n in enumerate(ns):
            d = g.detect([im], [[n]])[0]
            boxes.append(d.boxes)
            labels += [j] * len(d)
            scores.append(d.scores)
        boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32)
        masks = []
        if len(boxes):
            emb = s.embed([im])
            masks = [s._decode(emb, im.shape[:2], b[None]) for b in boxes]
        out.append((boxes, labels, masks))
    return out


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    res = fn()
    sync(device)
    return time.perf_counter() - t0, res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=256, help="Grounding-DINO short side and synthetic image size")
    ap.add_argument("--size", choices=tuple(SIZES), default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--names-per-image", type=int, nargs="*", default=[1, 4, 8])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each side; the fastest counts")
    ap.add_argument("--max-detections", type=int, default=100,
                    help="boxes kept per image; random weights fill the cap, a trained model at 0.35 keeps ~5-15")
    ap.add_argument("--out", default=None, help="default benchmarks/results/grounded[_cuda].json")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    settings = load_settings(env={})
    vocab = Vocabulary.load(None)
    words = sorted({t for e in vocab.entries for t in e.terms() for t in t.split()})
    spec = SynthSpec(seed=args.seed, shards=1, images_per_shard=args.images, image_size=args.image_size, failure_rate=0.0)
    samples = [make_sample(spec, 0, i) for i in range(args.images)]
    images = [np.array(Image.open(io.BytesIO(s["jpeg"])).convert("RGB")) for s in samples]
    extractor = build_extractor(settings, vocab)
    cands = extractor.extract([s["caption"] for s in samples])
    workloads = {"lexicon (synthetic captions)": [[c.name for c in cs] for cs in cands]}
    pool = [e.name for e in vocab.entries]
    for k in args.names_per_image:
        workloads[f"{k} names per image"] = [[pool[(i * 7 + j) % len(pool)] for j in range(k)] for i in range(args.images)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="ovtasks-grounded-bench-") as d:
        models = build_models(Path(d), args.size, args.image_size, args.device, args.dtype, args.batch_size, words,
                              args.max_detections)
        from ovtasks.pseudolabel.candidates import Candidate

        for wname, names in workloads.items():
            cand_lists = [[Candidate(n, j, True, n, "bench") for j, n in enumerate(ns)] for ns in names]
            # warm-up (allocator, kernels) on one full micro-batch, both ways
            label_grounded(_fake(images[:args.batch_size]), cand_lists[:args.batch_size], models)
            per_prompt_loop(models, images[:2], names[:2])
            runs = [timed(lambda: label_grounded(_fake(images), cand_lists, models), args.device) for _ in range(args.repeats)]
            t_batch, res = min(runs, key=lambda r: r[0])
            # where the batched time goes: Grounding-DINO alone, then SAM alone on its boxes
            t_gd, dets = timed(lambda: models.gdino.detect(images, names), args.device)
            t_sam, _ = timed(lambda: models.sam.segment(images, [d.boxes for d in dets]), args.device)
            runs = [timed(lambda: per_prompt_loop(models, images, names), args.device) for _ in range(args.repeats)]
            t_loop, ref = min(runs, key=lambda r: r[0])
            n_batch = sum(1 for r in res if r.box is not None)
            n_loop = sum(len(b) for b, _, _ in ref)
            if all(len(ns) == 1 for ns in names):
                ours = [np.stack([r.box for r in res if r.image_index == i and r.box is not None] or [np.zeros(4)]) for i in range(len(images))]
                for (b, _, _), o in zip(ref, ours):
                    if len(b):
                        assert np.allclose(np.sort(b, axis=0), np.sort(o, axis=0), atol=1e-2), "batched and loop boxes differ"
            rows.append({"workload": wname, "names_per_image": round(sum(map(len, names)) / len(names), 2),
                         "boxes_batched": n_batch, "boxes_per_image": round(n_batch / len(images), 1), "boxes_loop": n_loop,
                         "loop_s": round(t_loop, 3), "batched_s": round(t_batch, 3),
                         "loop_img_s": round(len(images) / t_loop, 2), "batched_img_s": round(len(images) / t_batch, 2),
                         "speedup": round(t_loop / t_batch, 2), "batched_gdino_s": round(t_gd, 3), "batched_sam_s": round(t_sam, 3)})
            print(json.dumps(rows[-1]), flush=True)
    head = rows[0]
    out = {"rows": rows, "headline": head["workload"], "speedup": head["speedup"], "target": ">= 3x on CPU",
           "images": args.images, "image_size": args.image_size, "size": args.size, "device": args.device, "dtype": args.dtype,
           "batch_size": args.batch_size, "repeats": args.repeats, "max_detections": args.max_detections, "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                                                      "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}}
    name = "grounded.json" if args.device == "cpu" else f"grounded_{args.device.split(':')[0]}.json"
    path = Path(args.out) if args.out else RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print("\n| workload | names/image | loop img/s | batched img/s | speedup |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workload']} | {r['names_per_image']} | {r['loop_img_s']} | {r['batched_img_s']} | {r['speedup']}x |")
    print(f"\nspeedup={head['speedup']}")
    return 0


class _Sample:
    def __init__(self, image):
        self.image = image


def _fake(images):
    return [_Sample(im) for im in images]


if __name__ == "__main__":
    sys.exit(main())
