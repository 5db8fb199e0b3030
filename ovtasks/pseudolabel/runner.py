"""``ovtasks pseudo-label``: clean shards → COCO instance pseudo-masks with category names.

Two generators, same output. ``maskfree`` (patent FIG. 2) runs, per chunk of a shard's images:

1. object candidates from the caption (:mod:`ovtasks.pseudolabel.candidates`);
2. an activation map per (image, candidate) with iterative masking (:mod:`ovtasks.pseudolabel.maskfree.activation`);
3. proposals per image (:mod:`ovtasks.pseudolabel.maskfree.proposals`: WSPN top-K, or selective search);
4. the pseudo box per candidate (:mod:`ovtasks.pseudolabel.maskfree.pseudo_box`, eq. 6);
5. a mask per pseudo box, all boxes of the chunk trained at once (:mod:`ovtasks.pseudolabel.maskfree.wss`, eq. 7).

``grounded`` (thesis §2): candidates → Grounding-DINO boxes → SAM masks (:mod:`ovtasks.pseudolabel.grounded.generator`).

A shard is streamed ``label_chunk`` images at a time (grounded: ``grounded.batch_size``), and its
images, annotations and skipped candidates are spooled to local files, so memory stays flat in the
shard's size. If labelling a chunk raises, each of its images is retried alone; an image that fails
again is quarantined (``quarantined`` in the shard JSON, with its reason) and the shard completes.

Output under ``--out`` (all keys overwritten atomically; the manifest is written last)::

    pseudo/<generator>/NNNNN.json           COCO dict: images, annotations (RLE, xywh, score, ...), categories,
                                            skipped (candidate, reason), quarantined (image, reason)
    pseudo/<generator>/NNNNN.manifest.json  counts, sha256, model and code versions, config hash, skipped reasons
    pseudo/<generator>/categories.json      every category seen + text_embeddings.npy in the same order

A shard whose manifest is complete and was made by the same models and config is skipped (resume).
Candidates that yield no mask are listed in the shard JSON under ``skipped`` with their reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from ovtasks import __version__

from ovtasks.core import history
from ovtasks.core.config import Settings
from ovtasks.core.storage import open_store
from ovtasks.data.catalog import pseudo_row
from ovtasks.data.clean import CleanSample, chunks, complete_shards, iter_shard
from ovtasks.data.summary_index import GalleryCounts, write_pseudo
from ovtasks.data.groundtruth import encode_rle, mask_bbox, rle_area, rle_bbox
from ovtasks.pseudolabel.base import GENERATORS, Generator, PairResult
from ovtasks.pseudolabel.candidates import Candidate, Vocabulary, build_extractor

log = logging.getLogger(__name__)


def to_coco(samples: Sequence[CleanSample], results: Sequence[PairResult], generator: str, versions: dict,
            quarantined: Iterable[int] = ()) -> dict:
    """COCO dict for labelled ``samples``; images whose index is in ``quarantined`` are left out."""
    out_of = set(quarantined)
    images = [{"id": s.image_id, "key": s.key, "shard": s.shard, "width": int(s.image.shape[1]),
               "height": int(s.image.shape[0]), "caption": s.caption} for i, s in enumerate(samples) if i not in out_of]
    anns, skipped, cats = [], [], {}
    per_image: Counter = Counter()
    for r in results:
        s = samples[r.image_index]
        c = r.candidate
        cats.setdefault(c.category_id, {"id": c.category_id, "name": c.name, "known": c.known})
        if not r.has_mask:
            skipped.append({"image_id": s.image_id, "name": c.name, "reason": r.reason, "score": round(r.score, 4)})
            continue
        k = per_image[s.image_id]
        per_image[s.image_id] += 1
        x1, y1, x2, y2 = (float(v) for v in r.box)
        if r.rle is not None:
            seg, area, bbox = r.rle, float(rle_area(r.rle)), rle_bbox(r.rle)
        else:
            seg, area, bbox = encode_rle(r.mask), float(r.mask.sum()), mask_bbox(r.mask)
        ann = {
            "id": s.image_id * 1000 + k, "image_id": s.image_id, "category_id": c.category_id, "category_name": c.name,
            "known_category": c.known, "phrase": c.phrase, "candidate_source": c.source,
            "segmentation": seg, "area": area, "bbox": bbox,
            "pseudo_box": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)], "score": round(float(r.score), 6), "iscrowd": 0,
            "generator": generator, "model_versions": versions,
        }
        if r.mask_iou is not None:
            ann["mask_iou"] = round(float(r.mask_iou), 6)
        anns.append(ann)
    return {"images": images, "annotations": anns, "categories": sorted(cats.values(), key=lambda c: c["id"]), "skipped": skipped}


def run_fingerprint(settings: Settings, generator: str, versions: dict) -> str:
    parts = {"generator": generator, "candidates": settings.candidates.model_dump(mode="json"), "versions": versions}
    if generator == "maskfree":
        parts["maskfree"] = settings.maskfree.model_dump(mode="json")
    mf = settings.maskfree
    if generator == "grounded" or mf.proposals == "gdino" or mf.mask_stage == "sam" or mf.box_rerank == "namer":
        parts["grounded"] = settings.grounded.model_dump(mode="json", exclude={"batch_size", "box_batch"})
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def label_guarded(models: Generator, samples: Sequence[CleanSample], candidates: Sequence[Sequence[Candidate]],
                  settings: Settings) -> tuple[list[PairResult], dict[int, str]]:
    """``models.label`` on a chunk; if it raises, every image is retried alone and an image that fails
    again is quarantined. Returns the results (``image_index`` into ``samples``) and {index: reason}."""
    try:
        return models.label(samples, candidates, settings), {}
    except Exception as exc:  # noqa: BLE001 - any failure of a model call; each image gets its own chance
        if len(samples) == 1:
            return [], {0: f"{type(exc).__name__}: {exc}"[:500]}
        log.warning("labelling a chunk failed; retrying its images one at a time",
                    extra={"images": len(samples), "error": f"{type(exc).__name__}: {exc}"[:300]})
    results, quarantined = [], {}
    for i, (sample, cands) in enumerate(zip(samples, candidates)):
        try:
            alone = models.label([sample], [cands], settings)
        except Exception as exc:  # noqa: BLE001
            quarantined[i] = f"{type(exc).__name__}: {exc}"[:500]
            log.warning("image quarantined", extra={"key": sample.key, "shard": sample.shard, "reason": quarantined[i]})
            continue
        for r in alone:
            r.image_index = i
        results += alone
    return results, quarantined


class _Spool:
    """JSON lists of one shard spooled to local files, then joined into one COCO JSON file."""

    PARTS = ("images", "annotations", "skipped", "quarantined")

    def __init__(self, directory: str):
        self.dir = directory
        self.files = {k: open(os.path.join(directory, f"{k}.jsonl"), "w") for k in self.PARTS}
        self.counts: Counter = Counter()

    def add(self, part: str, items: Iterable[dict]) -> None:
        for item in items:
            self.files[part].write(json.dumps(item, separators=(",", ":")) + "\n")
            self.counts[part] += 1

    def join(self, categories: list[dict]) -> tuple[str, str, int]:
        """Write the COCO JSON; returns (path, sha256, bytes)."""
        for f in self.files.values():
            f.close()
        path = os.path.join(self.dir, "shard.json")
        h, size = hashlib.sha256(), 0
        with open(path, "wb") as out:
            def emit(text: str) -> None:
                nonlocal size
                b = text.encode()
                out.write(b)
                h.update(b)
                size += len(b)

            emit("{")
            for n, part in enumerate(self.PARTS):
                emit(("," if n else "") + json.dumps(part) + ":[")
                with open(os.path.join(self.dir, f"{part}.jsonl")) as fh:
                    for m, line in enumerate(fh):
                        emit(("," if m else "") + line.rstrip("\n"))
                emit("]")
            emit(',"categories":' + json.dumps(categories, separators=(",", ":")) + "}")
        return path, h.hexdigest(), size


def pseudo_label_shard(src_uri: str, out_uri: str, shard: str, settings: Settings, models: Generator,
                       vocab: Vocabulary, extractor, generator: str = "maskfree") -> dict:
    """Label one clean shard, streaming; writes the shard JSON then its manifest. Returns the report entry."""
    t0 = time.perf_counter()
    src, out = open_store(src_uri, settings.s3), open_store(out_uri, settings.s3)
    prefix = f"pseudo/{generator}/{shard}"
    out.delete(f"{prefix}.manifest.json")  # the shard is incomplete until the new manifest lands
    cats: dict[int, dict] = {}
    counts: Counter = Counter()
    reasons: Counter = Counter()
    gallery = GalleryCounts()
    with tempfile.TemporaryDirectory(prefix="ovtasks-pseudo-") as tmp:
        spool = _Spool(tmp)
        for chunk in chunks(iter_shard(src, shard), models.chunk_size(settings)):
            candidates = extractor.extract([s.caption for s in chunk])
            results, quarantined = label_guarded(models, chunk, candidates, settings)
            coco = to_coco(chunk, results, generator, models.versions, quarantined)
            for c in coco["categories"]:
                cats.setdefault(c["id"], c)
            spool.add("images", coco["images"])
            spool.add("annotations", coco["annotations"])
            gallery.add_coco(coco)
            spool.add("skipped", coco["skipped"])
            spool.add("quarantined", ({"image_id": chunk[i].image_id, "key": chunk[i].key, "reason": why}
                                      for i, why in sorted(quarantined.items())))
            reasons.update(s["reason"] for s in coco["skipped"])
            counts["images"] += len(chunk)
            counts["images_with_candidates"] += sum(1 for i, c in enumerate(candidates) if c and i not in quarantined)
            counts["candidates"] += sum(len(c) for i, c in enumerate(candidates) if i not in quarantined)
        categories = sorted(cats.values(), key=lambda c: c["id"])
        path, digest, size = spool.join(categories)
        out.put_file(f"{prefix}.json", path)
    counts.update(labelled=spool.counts["images"], quarantined=spool.counts["quarantined"],
                  annotations=spool.counts["annotations"])
    manifest = {
        "stage": "pseudo_label", "generator": generator, "shard": shard, "status": "complete",
        "source": {"uri": src.uri_for(f"shards/{shard}.tar")},
        "counts": {"images": counts["images"], "labelled": counts["labelled"], "quarantined": counts["quarantined"],
                   "images_with_candidates": counts["images_with_candidates"], "candidates": counts["candidates"],
                   "annotations": counts["annotations"], "skipped": dict(sorted(reasons.items()))},
        "files": {f"{prefix}.json": {"sha256": digest, "bytes": size}}, "categories": categories,
        "gallery": gallery.as_dict(),  # the summary index's score histograms (what the UI's Gallery pages by)
        "model_versions": models.versions, "fingerprint": run_fingerprint(settings, generator, models.versions),
        "config_hash": settings.fingerprint("grounded" if generator == "grounded" else "maskfree"), "code_version": __version__,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    out.put_bytes(f"{prefix}.manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode())
    return {"shard": shard, "status": "done", **manifest["counts"], "seconds": manifest["seconds"]}


def load_generator(settings: Settings, generator: str) -> Generator:
    """The models of ``generator``, loaded as ``settings`` names them (the one place that imports generators)."""
    if generator not in GENERATORS:
        raise ValueError(f"unknown generator {generator!r}; available: {', '.join(GENERATORS)}")
    if generator == "grounded":
        from ovtasks.pseudolabel.grounded.generator import load_grounded

        return load_grounded(settings)
    from ovtasks.pseudolabel.maskfree.generator import load_maskfree

    return load_maskfree(settings)


@dataclass(frozen=True)
class PseudoLabelResult:
    report: dict
    report_uri: str


def pseudo_label(src_uri: str, out_uri: str, settings: Settings, generator: str = "maskfree",
                 progress: Callable[[str, int], Callable[[], None]] | None = None, models: Generator | None = None) -> PseudoLabelResult:
    """Pseudo-label every complete clean shard under ``src_uri``; resumable (see module doc)."""
    if generator not in GENERATORS:
        raise ValueError(f"unknown generator {generator!r}; available: {', '.join(GENERATORS)}")
    src, out = open_store(src_uri, settings.s3), open_store(out_uri, settings.s3)
    shards = complete_shards(src)
    if not shards:
        raise FileNotFoundError(f"no complete clean shards (shards/*.manifest.json) under {src.uri}")
    models = models or load_generator(settings, generator)
    if models.name != generator:
        raise ValueError(f"models for the {models.name!r} generator given to run {generator!r}")
    vocab = Vocabulary.load(settings.candidates.vocabulary)
    extractor = build_extractor(settings, vocab)
    fp = run_fingerprint(settings, generator, models.versions)
    tick = progress("pseudo-label", len(shards)) if progress else None
    statuses = {}
    for shard in shards:
        entry = label_shard_unless_complete(src_uri, out_uri, shard, settings, models, vocab, extractor, generator, fp)
        statuses[shard] = entry["status"]
        if entry["status"] == "done":
            log.info("pseudo-labelled shard", extra={k: v for k, v in entry.items() if k != "categories"})
        if tick:
            tick()
    return finalize(src_uri, out_uri, settings, generator, statuses)


def label_shard_unless_complete(src_uri: str, out_uri: str, shard: str, settings: Settings, models: Generator, vocab, extractor,
                                generator: str, fingerprint: str) -> dict:
    """Label ``shard`` unless its manifest says it is complete for this exact run fingerprint (same models,
    config and code): the unit a retried or re-run task repeats."""
    out = open_store(out_uri, settings.s3)
    mkey = f"pseudo/{generator}/{shard}.manifest.json"
    if out.exists(mkey):
        m = json.loads(out.get_bytes(mkey))
        if m.get("status") == "complete" and m.get("fingerprint") == fingerprint:
            return {"shard": shard, "status": "skipped (complete)", **m["counts"], "seconds": 0.0}
    return pseudo_label_shard(src_uri, out_uri, shard, settings, models, vocab, extractor, generator)


def finalize(src_uri: str, out_uri: str, settings: Settings, generator: str = "maskfree",
             statuses: dict[str, str] | None = None) -> PseudoLabelResult:
    """The run report, ``categories.json`` and ``text_embeddings.npy`` from the complete shard manifests of
    every complete clean shard (a shard without one is listed as ``missing``, never silently left out)."""
    src, out = open_store(src_uri, settings.s3), open_store(out_uri, settings.s3)
    vocab = Vocabulary.load(settings.candidates.vocabulary)
    entries, categories, versions, fps, rows = [], {}, {}, set(), {}
    for shard in complete_shards(src):
        mkey = f"pseudo/{generator}/{shard}.manifest.json"
        m = json.loads(out.get_bytes(mkey)) if out.exists(mkey) else None
        if isinstance(m, dict):
            rows[shard] = pseudo_row(m, lambda shard=shard: json.loads(out.get_bytes(f"pseudo/{generator}/{shard}.json")))
        if not m or m.get("status") != "complete":
            entries.append({"shard": shard, "status": "missing", "images": 0, "annotations": 0, "candidates": 0, "quarantined": 0})
            continue
        cats = m.get("categories")
        if cats is None:  # manifests written before categories were recorded in them
            cats = json.loads(out.get_bytes(f"pseudo/{generator}/{shard}.json"))["categories"]
        for c in cats:
            categories.setdefault(c["id"], c)
        versions = m.get("model_versions", versions)
        fps.add(m.get("fingerprint"))
        status = (statuses or {}).get(shard, "complete")
        entries.append({"shard": shard, "status": status, **m["counts"], "seconds": m.get("seconds", 0.0) if status == "done" else 0.0})
    cats = sorted(categories.values(), key=lambda c: c["id"])
    for c in cats:
        entry = vocab.by_id.get(c["id"])
        c["split"] = entry.split if entry else "open"
    _write_embeddings(out, generator, cats, settings)
    total: Counter = Counter()
    for e in entries:
        total.update(e.get("skipped", {}))
    report = {"stage": "pseudo_label", "generator": generator, "src": src.uri, "out": out.uri, "shards": entries,
              "images": sum(e["images"] for e in entries), "annotations": sum(e["annotations"] for e in entries),
              "candidates": sum(e["candidates"] for e in entries), "skipped": dict(sorted(total.items())),
              "quarantined": sum(e.get("quarantined", 0) for e in entries), "missing": [e["shard"] for e in entries if e["status"] == "missing"],
              "model_versions": versions, "fingerprint": fps.pop() if len(fps) == 1 else sorted(f for f in fps if f),
              "code_version": __version__}
    out.put_bytes(f"pseudo/{generator}/report.json", json.dumps(report, indent=2, sort_keys=True).encode())
    history.record(out, "pseudo_label", report)
    write_pseudo(out, generator, rows)
    return PseudoLabelResult(report, out.uri_for(f"pseudo/{generator}/report.json"))


def _write_embeddings(out, generator: str, cats: list[dict], settings: Settings) -> None:
    """Category list plus one text embedding per category (same order), for open-vocabulary training: both or
    neither. The embeddings are computed first; when the text encoder fails, nothing is written (the previous
    pair, if any, stays a pair). The pairing record ``text_embeddings.json`` (both files' sha256 and the names in
    order) is written last, and training refuses a categories.json and text_embeddings.npy it does not pair."""
    try:
        from ovtasks.models.text_encoder import TextEncoder

        emb = TextEncoder(settings.candidates.text_encoder, settings.device, s3=settings.s3).encode([c["name"] for c in cats])
    except Exception as exc:  # embeddings are an extra: never lose the shards over them, but say so
        log.warning("categories and text embeddings not written (the text encoder failed)", extra={"error": repr(exc)})
        return
    write_category_embeddings(out, generator, cats, emb)


def write_category_embeddings(out, generator: str, cats: list[dict], emb: np.ndarray) -> None:
    """``categories.json``, ``text_embeddings.npy`` (row i: ``cats[i]``) and, last, their pairing record."""
    cat_blob = json.dumps(cats, indent=2).encode()
    buf = io.BytesIO()
    np.save(buf, np.asarray(emb))
    prefix = f"pseudo/{generator}"
    out.put_bytes(f"{prefix}/text_embeddings.npy", buf.getvalue())
    out.put_bytes(f"{prefix}/categories.json", cat_blob)
    out.put_bytes(f"{prefix}/{EMBEDDING_PAIR}", json.dumps(embedding_pair(cat_blob, buf.getvalue(), cats)).encode())


EMBEDDING_PAIR = "text_embeddings.json"


def embedding_pair(categories: bytes, embeddings: bytes, cats: list[dict]) -> dict:
    return {"categories_sha256": hashlib.sha256(categories).hexdigest(), "embeddings_sha256": hashlib.sha256(embeddings).hexdigest(),
            "names": [c["name"] for c in cats]}
