"""Maskfree generator, end to end: images/s of its labelling on one device (what `ovtasks plan --generator
maskfree` needs, and what the GPU rows of `make bench` list when a GPU run committed it).

One labelling call per chunk of ``label_chunk`` images, as a pseudo-label worker makes them: the ITM's GradCAM
activation map per (image, name), selective search scored and refined by the WSPN (top 50), the eq. 6 pseudo box,
and the WSS mask (eq. 7) of every box, on synthetic clean shards with the lexicon's candidates from their captions.
Selective search runs on the CPU cores whatever the device (a thread per core), so on a GPU worker the number
depends on its cores as much as on the GPU; the JSON records both.

Models: ``--size committed`` is the committed ITM (``paths.committed_itm``, the one `make demo` uses);
``--size real`` a BLIP-base-shaped ITM (ViT-B/16 at 384 px, BERT-base text tower with cross-attention) with random
weights, as on a deployment that loads BLIP ITM weights (the speed does not depend on the weights). The WSPN is
trained here for ``--wspn-steps`` steps (its architecture is the deployed one; the steps only make its scores
non-degenerate).

    python benchmarks/maskfree_speed.py                                   # CPU, committed ITM
    python benchmarks/maskfree_speed.py --device cuda --size real --images 128

Writes benchmarks/results/maskfree_speed.json (``maskfree_speed_cuda.json`` with ``--device cuda``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hostinfo import device_machine, write_device_result  # noqa: E402

from ovtasks.core.config import load_settings  # noqa: E402
from ovtasks.data.clean import iter_clean  # noqa: E402
from ovtasks.data.synth import SynthSpec, generate  # noqa: E402
from ovtasks.ingest.pipeline import ingest  # noqa: E402
from ovtasks.pseudolabel.candidates import Vocabulary, build_extractor  # noqa: E402
from ovtasks.pseudolabel.maskfree.generator import load_maskfree  # noqa: E402
from ovtasks.train.wspn import WspnTrainConfig, train_wspn  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def save_real_itm(out: Path, words) -> str:
    """A BLIP-base-shaped ITM (transformers' BlipConfig defaults: ViT-B/16 at 384 px, BERT-base) with random weights,
    saved in the layout `ItmModel.load` reads."""
    from transformers import BlipConfig, BlipForImageTextRetrieval

    from ovtasks.models.itm import ItmModel, build_word_tokenizer

    tok = build_word_tokenizer(words, out)
    cfg = BlipConfig(text_config={"vocab_size": len(tok), "pad_token_id": 0, "bos_token_id": 2, "sep_token_id": 3})  # as tiny_blip_config
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(cfg)
    vc = cfg.vision_config
    ItmModel(model, tok, vc.image_size, (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)).save(out, {"random_weights": True})
    return str(out)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def synthetic_clean(work: Path, images: int, image_size: int, base) -> tuple[str, str]:
    """One synthetic shard of ``images`` images and its ingested clean shard under ``work``: (laion, clean) URIs."""
    laion, clean = work / "laion", work / "clean"
    generate(SynthSpec(seed=0, shards=1, images_per_shard=images, image_size=image_size), str(laion), base)
    ingest(str(laion), str(clean), base, workers=1)
    return str(laion), str(clean)


def maskfree_models(clean: str, work: Path, size: str, device: str, wspn_steps: int, base):
    """(models, settings, WSPN training seconds): the ITM (committed, or BLIP-base-shaped random) and a WSPN trained
    ``wspn_steps`` steps on ``clean``, loaded as a pseudo-label worker loads them."""
    if size == "real":
        vocab = Vocabulary.load(base.candidates.vocabulary)
        words = {w.lower() for s in iter_clean(clean, base) for w in s.caption.replace(".", " ").replace(",", " ").split()}
        itm = save_real_itm(work / "itm", sorted(words | {w for n in vocab.names() for w in n.split()}))
    else:
        itm = str(base.paths.committed_itm)
    t0 = time.perf_counter()
    wspn = train_wspn(clean, str(work / "wspn"), base.model_copy(update={"device": device}), WspnTrainConfig(steps=wspn_steps)).model_uri
    wspn_s = time.perf_counter() - t0
    maskfree = base.maskfree.model_copy(update={"itm_model": itm, "wspn_model": wspn})
    settings = base.model_copy(update={"device": device, "maskfree": maskfree})
    return load_maskfree(settings), settings, wspn_s


def run(images: int, image_size: int, size: str, device: str, wspn_steps: int, repeats: int, work: Path) -> dict:
    base = load_settings(env={})
    _, clean = synthetic_clean(work, images, image_size, base)
    samples = list(iter_clean(clean, base))
    vocab = Vocabulary.load(base.candidates.vocabulary)
    models, settings, wspn_s = maskfree_models(clean, work, size, device, wspn_steps, base)
    candidates = build_extractor(settings, vocab).extract([s.caption for s in samples])
    chunk = models.chunk_size(settings)
    chunks = [(samples[i:i + chunk], candidates[i:i + chunk]) for i in range(0, len(samples), chunk)]
    models.label(*chunks[0], settings)  # warm-up: lazy initialisation, kernel selection
    times, pairs, masks = [], 0, 0
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        results = [r for s, c in chunks for r in models.label(s, c, settings)]
        _sync(device)
        times.append(time.perf_counter() - t0)
        pairs, masks = len(results), sum(r.mask is not None for r in results)
    seconds = statistics.median(times)
    return {"images": len(samples), "image_size": image_size, "pairs": pairs, "masks": masks, "label_chunk": chunk,
            "seconds": round(seconds, 3), "images_per_s": round(len(samples) / seconds, 2), "repeats": repeats,
            "seconds_each": [round(t, 3) for t in times], "device": device, "size": size, "itm_model": "random BLIP-base shape"
            if size == "real" else settings.maskfree.itm_model, "wspn_steps": wspn_steps, "wspn_train_s": round(wspn_s, 1),
            "proposals": settings.maskfree.proposals, "torch_threads": torch.get_num_threads(),
            "machine": device_machine(device)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=512, help="synthetic image side (LAION-like: 512)")
    ap.add_argument("--size", default="committed", choices=("committed", "real"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--wspn-steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ovtasks-maskfree-speed-") as d:
        res = run(args.images, args.image_size, args.size, args.device, args.wspn_steps, args.repeats, Path(d))
    print(f"maskfree, {res['size']} ITM, {res['device']}: {res['images']} images of {res['image_size']} px, {res['pairs']} "
          f"(image, name) pairs, {res['masks']} masks in {res['seconds']} s: images_per_s={res['images_per_s']}")
    write_device_result(res, "maskfree_speed", args.device, args.out, RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
