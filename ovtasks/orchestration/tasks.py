"""Task bodies of the Airflow DAGs (``dags/``): plain functions of URIs and small manifests, so the DAG files
stay thin and everything here is tested without a scheduler.

Ingest runs in three steps so shards can be mapped across workers yet deduplicated across shards exactly
as ``ovtasks ingest`` does: :func:`stage_ingest` per shard (filters; staged tars + the shard's perceptual
hashes go to ``_staging/<run>/`` in the output store, so any worker can publish them), :func:`dedup_staged`
once (cross-shard near-duplicates, in shard-name order), :func:`publish_ingest` per shard (atomic, manifest
last). A retried task repeats its step from the staged inputs; a shard whose manifest is complete is
never redone.

Pseudo-labelling maps over groups of shards (:func:`shard_groups`: at most ``max_map_length`` groups, so
any number of shards fits Airflow's mapping limit); :func:`pseudo_label_group` loads the models once per
group and skips shards already complete for the same run fingerprint; :func:`finalize_pseudo_label`
writes the run report and vocabulary from the manifests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from ovtasks.core import history
from ovtasks.core.config import Settings
from ovtasks.core.storage import open_store
from ovtasks.data.catalog import record_ingest

log = logging.getLogger(__name__)
STAGING = "_staging"


def uris(settings: Settings) -> dict[str, str]:
    return settings.pipeline.resolved(settings.data_dir)


# ---------------------------------------------------------------------------------------------
# ingest


def new_shards(src_uri: str, out_uri: str, settings: Settings) -> list[str]:
    """Source shards without a complete ingest manifest for the current ingest config."""
    from ovtasks.ingest.pipeline import list_shards

    src, out = open_store(src_uri, settings.s3), open_store(out_uri, settings.s3)
    todo, cfg = [], settings.fingerprint("ingest")
    for name in list_shards(src):
        key = f"shards/{name}.manifest.json"
        if out.exists(key):
            m = json.loads(out.get_bytes(key))
            if m.get("status") == "complete" and m.get("config_hash") == cfg:
                continue
        todo.append(name)
    return todo


def _staged(run: str, shard: str, what: str) -> str:
    return f"{STAGING}/{run}/{shard}.{what}"


def stage_ingest(src_uri: str, out_uri: str, shard: str, settings: Settings, run: str) -> dict:
    from ovtasks.ingest.pipeline import stage_shard

    out = open_store(out_uri, settings.s3)
    tmp = out.scratch_dir()
    try:
        stage = stage_shard(src_uri, shard, settings, tmp)
        for what, path in (("kept.tar", stage.kept_path), ("rejected.tar", stage.rejected_path)):
            if os.path.exists(path):
                out.put_file(_staged(run, shard, what), path)
        doc = asdict(stage)
        doc["quarantined"] = dict(stage.quarantined)
        out.put_bytes(_staged(run, shard, "stage.json"), json.dumps(doc).encode())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"shard": shard, "status": stage.status, "seen": stage.seen, "kept": len(stage.kept)}


def _load_stage(out, run: str, shard: str):
    from ovtasks.ingest.pipeline import ShardStage

    doc = json.loads(out.get_bytes(_staged(run, shard, "stage.json")))
    doc["quarantined"] = Counter(doc["quarantined"])
    doc["kept"] = [tuple(k) for k in doc["kept"]]
    doc["kept_file"], doc["rejected_file"] = tuple(doc["kept_file"]), tuple(doc["rejected_file"])
    return ShardStage(**doc)


def dedup_staged(out_uri: str, shards: list[str], settings: Settings, run: str) -> dict:
    """Cross-shard near-duplicate decisions for this run's staged shards, in name order (as the CLI)."""
    from ovtasks.ingest.pipeline import CrossShardDedup

    out = open_store(out_uri, settings.s3)
    dedup = CrossShardDedup(settings.ingest.dedup_max_distance, settings.ingest.dedup)
    dropped = 0
    for shard in sorted(shards):
        drops = dedup.drops_for(_load_stage(out, run, shard))
        out.put_bytes(_staged(run, shard, "drops.json"), json.dumps(drops).encode())
        dropped += len(drops)
    return {"shards": len(shards), "near_duplicates": dropped}


def publish_ingest(src_uri: str, out_uri: str, shard: str, settings: Settings, run: str) -> dict:
    from ovtasks.ingest.pipeline import publish_shard

    out = open_store(out_uri, settings.s3)
    stage = _load_stage(out, run, shard)
    drops = json.loads(out.get_bytes(_staged(run, shard, "drops.json")))
    tmp = out.scratch_dir()
    try:
        stage.kept_path, stage.rejected_path = os.path.join(tmp, f"{shard}.kept.tar"), os.path.join(tmp, f"{shard}.rejected.tar")
        for what, path in (("kept.tar", stage.kept_path), ("rejected.tar", stage.rejected_path)):
            if out.exists(_staged(run, shard, what)):
                out.get_file(_staged(run, shard, what), path)
        entry = publish_shard(stage, drops, src_uri, out_uri, settings)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def finish_ingest(src_uri: str, out_uri: str, entries: list[dict], settings: Settings, run: str) -> dict:
    """The run's ``ingest_report.json`` (same form as ``ovtasks ingest``) and removal of its staging area."""
    from ovtasks import __version__
    from ovtasks.ingest.pipeline import list_shards

    out = open_store(out_uri, settings.s3)
    total: Counter = Counter()
    for e in entries:
        total.update(e.get("quarantined", {}))
    report = {"stage": "ingest", "src": open_store(src_uri, settings.s3).uri, "out": out.uri, "run": run,
              "seen": sum(e["seen"] for e in entries), "kept": sum(e.get("kept", 0) for e in entries),
              "quarantined": dict(sorted(total.items())), "shards": sorted(entries, key=lambda e: e["shard"]),
              "failed_shards": sum(1 for e in entries if e["status"] != "ok"), "config_hash": settings.fingerprint("ingest"),
              "code_version": __version__}
    if report["seen"] != report["kept"] + sum(total.values()):
        raise RuntimeError(f"ingest counts do not add up: seen {report['seen']} != kept {report['kept']} + quarantined {dict(total)}")
    out.put_bytes("ingest_report.json", json.dumps(report, indent=2, sort_keys=True).encode())
    history.record(out, "ingest", report)
    record_ingest(out, [e["shard"] for e in entries], len(list_shards(open_store(src_uri, settings.s3))))
    for key in out.list(f"{STAGING}/{run}/"):
        out.delete(key)
    return {k: report[k] for k in ("seen", "kept", "quarantined", "failed_shards")}


# ---------------------------------------------------------------------------------------------
# pseudo-labels


def shard_groups(shards: list[str], per_group: int = 1, max_groups: int = 1024) -> list[list[str]]:
    """Consecutive groups of at least ``per_group`` shards, never more than ``max_groups`` groups."""
    if not shards:
        return []
    size = max(per_group, math.ceil(len(shards) / max_groups))
    return [shards[i: i + size] for i in range(0, len(shards), size)]


def pending_pseudo_shards(src_uri: str, out_uri: str, settings: Settings, generator: str) -> list[str]:
    """Complete clean shards without a complete pseudo-label manifest (a cheap pre-filter: the fingerprint
    check against the loaded models happens in :func:`pseudo_label_group`)."""
    from ovtasks.data.clean import complete_shards

    src, out = open_store(src_uri, settings.s3), open_store(out_uri, settings.s3)
    todo = []
    for shard in complete_shards(src):
        key = f"pseudo/{generator}/{shard}.manifest.json"
        if not out.exists(key) or json.loads(out.get_bytes(key)).get("status") != "complete":
            todo.append(shard)
    return todo


def pseudo_label_group(src_uri: str, out_uri: str, shards: list[str], settings: Settings, generator: str) -> list[dict]:
    from ovtasks.pseudolabel.candidates import Vocabulary, build_extractor
    from ovtasks.pseudolabel.runner import label_shard_unless_complete, load_generator, run_fingerprint

    models = load_generator(settings, generator)
    vocab = Vocabulary.load(settings.candidates.vocabulary)
    extractor = build_extractor(settings, vocab)
    fp = run_fingerprint(settings, generator, models.versions)
    out = []
    for shard in shards:
        e = label_shard_unless_complete(src_uri, out_uri, shard, settings, models, vocab, extractor, generator, fp)
        out.append({k: e[k] for k in ("shard", "status", "images", "labelled", "quarantined", "annotations")})
        log.info("pseudo-label shard", extra=out[-1])
    return out


def finalize_pseudo_label(src_uri: str, out_uri: str, settings: Settings, generator: str) -> dict:
    from ovtasks.pseudolabel.runner import finalize

    r = finalize(src_uri, out_uri, settings, generator).report
    if r["missing"]:
        raise RuntimeError(f"pseudo-label shards missing after the run: {r['missing']}")
    return {k: r[k] for k in ("images", "annotations", "quarantined")} | {"shards": len(r["shards"])}


# ---------------------------------------------------------------------------------------------
# retrain and promote


def validate_pseudo(pseudo_uri: str, settings: Settings, generator: str) -> dict:
    from ovtasks.validate.expectations import validate

    r = validate(pseudo_uri, settings, generator).report
    if not r["training_shards"]:
        raise RuntimeError(f"no shard passed the GX gate; excluded: {r['excluded']}")
    return {"passed": r["passed"], "failed": r["failed"], "training_shards": len(r["training_shards"]), "excluded": r["excluded"]}


def model_run_uri(settings: Settings, model: str, run: str) -> str:
    """Where a retrain run's model lives: ``<pipeline.models_uri>/<model>/<run>``. In a deployment that is a store
    URI, so a retried train task, or the register task on another worker, finds the checkpoints and the model."""
    base = uris(settings)["models"].removeprefix("file://")
    return f"{base.rstrip('/')}/{model}/{run}"


@contextlib.contextmanager
def store_workdir(uri: str, settings: Settings, every_s: float = 10.0) -> Iterator[Path]:
    """A local directory mirrored to the store prefix ``uri`` while training runs in it.

    On entry every object already there (checkpoints of a killed try) is downloaded, so training resumes on
    whichever worker retries it; then a thread uploads each file that changed every ``every_s`` seconds
    (checkpoints are renamed into place, so only whole files are seen; ``*.tmp`` are skipped). The caller
    publishes the finished model (:func:`publish_model`, marker last); the directory is removed on exit."""
    import tempfile
    import threading

    from ovtasks.models.hub import COMPLETE_MARKER

    store = open_store(uri, settings.s3)
    local = Path(tempfile.mkdtemp(prefix="ovtasks-train-"))
    sent: dict[str, tuple[int, int]] = {}
    for key in store.list():
        if key != COMPLETE_MARKER:
            store.get_file(key, local / key)
            st = (local / key).stat()
            sent[key] = (st.st_mtime_ns, st.st_size)

    def sync() -> None:
        for p in sorted(local.rglob("*")):
            key = p.relative_to(local).as_posix()
            try:
                if not p.is_file() or p.name.endswith(".tmp"):
                    continue
                st = p.stat()
                if sent.get(key) != (st.st_mtime_ns, st.st_size):
                    store.put_file(key, p)
                    sent[key] = (st.st_mtime_ns, st.st_size)
            except FileNotFoundError:  # replaced or removed by the trainer meanwhile: the next pass sees it
                continue

    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            try:
                sync()
            except Exception as exc:  # noqa: BLE001 - a store hiccup must not kill training; the next pass retries
                log.warning("checkpoint upload failed", extra={"uri": uri, "error": str(exc)})

    thread = threading.Thread(target=loop, name="ovtasks-checkpoint-sync", daemon=True)
    thread.start()
    try:
        yield local
    finally:
        stop.set()
        thread.join()
        try:
            sync()  # what the last interval wrote (after a failed try too: the retry resumes from it)
        except Exception as exc:  # noqa: BLE001 - the original error, if any, is the one to report
            log.warning("final checkpoint upload failed", extra={"uri": uri, "error": str(exc)})
        shutil.rmtree(local, ignore_errors=True)


def _trained_summary(meta: dict, model_dir: str) -> dict:
    """What the train task returns (XCom): from a trained model's metrics and data manifest."""
    m, manifest = meta.get("metrics", {}), meta.get("data_manifest", {})
    return {"model_dir": model_dir, "final_loss": m.get("final_loss"), "images": m.get("images"),
            "data_sha256": manifest.get("sha256"), "held_out_images": (manifest.get("held_out") or {}).get("images", 0)}


def train_run(model: str, clean_uri: str, pseudo_uri: str, run_uri: str, settings: Settings, generator: str, steps: int,
              window_shards: int = 0, sa1b_uri: str | None = None, eval_gt_uri: str | None = None, eval_images: int = 64,
              sync_every_s: float = 10.0) -> dict:
    """:func:`train_model` for the retrain DAG: into ``run_uri`` directly when it is a local path, else through a
    :func:`store_workdir` (checkpoints mirrored to the store, the finished model published there with its
    completion marker). A try that finds the model already complete returns it without training again."""
    from ovtasks.models.hub import COMPLETE_MARKER, is_store_uri, publish_model

    if not is_store_uri(run_uri):
        return train_model(model, clean_uri, pseudo_uri, run_uri, settings, generator, steps, window_shards, sa1b_uri,
                           eval_gt_uri, eval_images)
    store = open_store(run_uri, settings.s3)
    if store.exists(COMPLETE_MARKER):
        log.info("model already complete in the store; not training again", extra={"uri": run_uri})
        return _trained_summary(json.loads(store.get_bytes("ovtasks_model.json")), store.uri)
    with store_workdir(run_uri, settings, sync_every_s) as local:
        out = train_model(model, clean_uri, pseudo_uri, str(local), settings, generator, steps, window_shards, sa1b_uri,
                          eval_gt_uri, eval_images)
        uri = publish_model(local, run_uri, settings.s3)
        keep = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()} | {COMPLETE_MARKER}
        for key in store.list():  # checkpoints of the finished phases
            if key not in keep:
                store.delete(key)
    return {**out, "model_dir": uri}


def train_model(model: str, clean_uri: str, pseudo_uri: str, out_dir: str, settings: Settings, generator: str, steps: int,
                window_shards: int = 0, sa1b_uri: str | None = None, eval_gt_uri: str | None = None,
                eval_images: int = 64) -> dict:
    """Train into ``out_dir`` (resumes from its checkpoint when a killed task is retried). With ``eval_gt_uri``,
    the evaluation split (the first ``eval_images`` clean images that have GT, what ``evaluate_and_register``
    scores) is held out of training and recorded in the model's data manifest."""
    from ovtasks.data.holdout import eval_image_ids

    held: list[int] = []
    if eval_gt_uri:
        from ovtasks.data.groundtruth import GroundTruth

        GroundTruth.require(eval_gt_uri, settings)
        held = eval_image_ids(eval_gt_uri, clean_uri, settings, eval_images)
    if model == "semantic-sam":
        from ovtasks.train.semantic_sam import SemanticSamConfig, train_semantic_sam

        t = train_semantic_sam(clean_uri, pseudo_uri, sa1b_uri or None, out_dir, settings,
                               SemanticSamConfig(steps=steps, generator=generator, window_shards=window_shards,
                                                 sam_model=settings.pipeline.semantic_sam_start,
                                                 namer=settings.pipeline.semantic_sam_namer), exclude_ids=held)
    elif model == "ov-maskrcnn":
        from ovtasks.train.ov_maskrcnn import TrainConfig, train_ov_maskrcnn

        t = train_ov_maskrcnn(clean_uri, pseudo_uri, out_dir, settings,
                              TrainConfig(steps=steps, generator=generator, window_shards=window_shards,
                                          backbone_init=settings.pipeline.ov_maskrcnn_backbone), exclude_ids=held)
    else:
        raise ValueError(f"unknown model {model!r}")
    return _trained_summary({"metrics": t.metrics, "data_manifest": t.data_manifest}, t.model_dir)


def check_held_out(data_manifest: dict, eval_gt: dict) -> None:
    """Refuse to score a model on images it may have trained on: the evaluated image ids must be exactly
    the split its training run held out (``data_manifest["held_out"]``)."""
    from ovtasks.data.holdout import held_out_record

    held = data_manifest.get("held_out") or {}
    evaluated = held_out_record(img["id"] for img in eval_gt.get("images", []))
    if not held.get("images"):
        raise ValueError("the model was trained without a held-out evaluation split; its evaluation would include "
                         "training images (train it through the retrain DAG, which holds the evaluation images out)")
    if held["ids_sha256"] != evaluated["ids_sha256"]:
        raise ValueError(f"the {evaluated['images']} evaluation images are not the {held['images']} images the model's "
                         "training held out (the evaluation set or eval_images changed since training): retrain")


def evaluate_and_register(model_dir: str, gt_uri: str, clean_uri: str, pseudo_uri: str, settings: Settings, generator: str,
                          eval_images: int = 64, dag_run: str | None = None, require_held_out: bool = False) -> dict:
    from ovtasks.data.groundtruth import GroundTruth
    from ovtasks.registry.lifecycle import log_and_register
    from ovtasks.models.loading import load_model

    GroundTruth.require(gt_uri, settings)
    from ovtasks.models.hub import resolve_model

    model_dir = resolve_model(model_dir, settings.s3)  # a store URI (the retrain DAG's) is fetched once, complete
    model, meta = load_model(model_dir, settings.device)
    if meta["architecture"] == "semantic-sam":
        from ovtasks.evaluate.models import evaluate_semantic_sam as evaluate
    else:
        from ovtasks.evaluate.models import evaluate_model as evaluate
    ev = evaluate(model, gt_uri, clean_uri, settings, limit=eval_images)
    if require_held_out:
        check_held_out(meta.get("data_manifest") or {}, ev["gt"])
    gx = json.loads(open_store(pseudo_uri, settings.s3).get_bytes(f"pseudo/{generator}/validation_report.json"))
    history = json.loads((open(os.path.join(model_dir, "history.json"))).read())
    reg = log_and_register(settings, model_dir, meta["config"], history, gx, ev, [os.path.join(model_dir, "loss_curve.png")],
                           meta["data_manifest"], dag_run=dag_run)
    return {"name": reg.name, "version": reg.version, "run_id": reg.run_id, "novel_mask_AP50": ev["novel_mask_AP50"],
            "gx_status": reg.tags["gx_status"]}


def promote_model(settings: Settings, model: str, tolerance: float | None, who: str, why: str) -> dict:
    from ovtasks.registry.lifecycle import promote

    r = promote(settings, tolerance, who, why, architecture=model)
    return asdict(r)
