"""MLflow tracking and model registry: log a training run, register a challenger, promote it to champion.

* :func:`log_and_register` — one MLflow run: params (training config), metrics per step, the GX
  summary, the evaluation table, the loss-curve PNG (and any other pictures), the model directory
  as artifacts; then a new version of the registered model, tagged with the training-data manifest
  hash, GX status, evaluation numbers and code version, and given the alias ``challenger``.
* :func:`promote` — the gate: ``champion`` moves to the challenger only if the challenger's GX status
  is ``passed``, its novel mask AP50 is at least ``registry.min_novel_ap50`` (the floor), and a paired
  bootstrap over the evaluation images (:mod:`ovtasks.registry.gate`, both models' predictions on the same
  images, logged with each run) puts the lower end of the ``registry.promotion_confidence`` interval of
  challenger - champion above ``-registry.promotion_tolerance`` (better, or not worse beyond the
  margin). Otherwise it is refused with the reason and ``champion`` is left untouched. The interval
  and the verdict are tagged on the challenger (``promotion_gate``) either way; every alias move is
  tagged on the new champion (who, when, why, previous version), a refusal on the challenger.
* :func:`load_registered` — downloads ``models:/NAME@alias``, checks every file against the sha256 list the
  registry recorded at registration (:mod:`ovtasks.registry.integrity`) and loads it from safetensors (never a
  pickle).

Embedded default: ``sqlite:///<data_dir>/mlflow/mlflow.db`` with file artifacts beside it; production
sets ``registry.tracking_uri`` to an MLflow server (PostgreSQL backend, S3/MinIO artifacts through
``MLFLOW_S3_ENDPOINT_URL``).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ovtasks import __version__
from ovtasks.core.config import Settings

EVAL_DIR = "evaluation"  # run artifacts the gate pairs: gt.json (the evaluation set) and predictions.json


def _local_db(settings: Settings) -> Path:
    return Path(settings.data_dir).absolute() / "mlflow" / "mlflow.db"


def tracking_uri(settings: Settings) -> str:
    if settings.registry.tracking_uri:
        return settings.registry.tracking_uri
    _local_db(settings).parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{_local_db(settings)}"


def registry_exists(settings: Settings) -> bool:
    """A tracking server is configured, or the embedded SQLite registry has been created (reading must not
    create one: ``ovtasks status`` in any folder would leave ``data/mlflow/mlflow.db`` behind)."""
    return bool(settings.registry.tracking_uri) or _local_db(settings).exists()


ARCHITECTURES = ("ov-maskrcnn", "semantic-sam")


def registered_name(settings: Settings, architecture: str = "ov-maskrcnn") -> str:
    """Each architecture is its own registered model (its own champion): their numbers are not comparable."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; known: {ARCHITECTURES}")
    return settings.registry.model_name if architecture == "ov-maskrcnn" else settings.registry.semantic_sam_model_name


def _client(settings: Settings):
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(settings)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow, MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment(mlflow, client, settings: Settings) -> str:
    name = settings.registry.experiment
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = settings.registry.artifact_root
    if not location and tracking_uri(settings).startswith("sqlite:///"):
        location = (Path(tracking_uri(settings)[len("sqlite:///"):]).parent / "artifacts").as_uri()
    return client.create_experiment(name, artifact_location=location or None)


@dataclass
class Registered:
    name: str
    version: str
    run_id: str
    tags: dict


def log_and_register(settings: Settings, model_dir: str, params: dict, history: Sequence[dict], gx_report: dict,
                     evaluation: dict, pictures: Sequence[str] = (), data_manifest: dict | None = None,
                     dag_run: str | None = None) -> Registered:
    mlflow, client = _client(settings)
    exp_id = _experiment(mlflow, client, settings)
    meta_path = Path(model_dir) / "ovtasks_model.json"
    architecture = json.loads(meta_path.read_text()).get("architecture", "ov-maskrcnn") if meta_path.exists() else "ov-maskrcnn"
    name = registered_name(settings, architecture)
    gx_status = "passed" if gx_report.get("failed", 1) == 0 else ("partial" if gx_report.get("passed") else "failed")
    evaluation = dict(evaluation)
    eval_gt, eval_preds = evaluation.pop("gt", None), evaluation.pop("predictions", None)
    with mlflow.start_run(experiment_id=exp_id) as run:
        mlflow.log_params({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in params.items()})
        for h in history:
            mlflow.log_metrics({k: float(v) for k, v in h.items() if k not in ("step", "seconds", "phase")}, step=int(h["step"]))
        for r in evaluation.get("rows", []):
            for k in ("box_AP", "box_AP50", "mask_AP", "mask_AP50"):
                if r.get(k) is not None:
                    mlflow.log_metric(f"{r['setting']}_{r['split']}_{k}", float(r[k]))
        mlflow.log_dict({k: gx_report.get(k) for k in ("passed", "failed", "training_shards", "excluded", "thresholds")}, "gx_summary.json")
        mlflow.log_text(evaluation.get("table", ""), "evaluation.md")
        mlflow.log_dict(evaluation, "evaluation.json")
        if eval_gt is not None and eval_preds is not None:  # what the promotion gate compares image by image
            mlflow.log_dict(eval_gt, f"{EVAL_DIR}/gt.json")
            mlflow.log_dict(eval_preds, f"{EVAL_DIR}/predictions.json")
        for p in pictures:
            if p and Path(p).exists():
                mlflow.log_artifact(p, "pictures")
        from ovtasks.registry.serving import log_pyfunc  # a pyfunc: `mlflow models serve` and `ovtasks predict` answer images with it

        logged = log_pyfunc(mlflow, model_dir, architecture)
        tags = {"data_manifest_sha256": (data_manifest or {}).get("sha256", ""), "gx_status": gx_status,
                "novel_mask_AP50": str(evaluation.get("novel_mask_AP50")), "code_version": __version__,
                "dag_run": dag_run or "", "architecture": architecture,
                "eval_prompts": str(evaluation.get("prompts", "detections"))}
        if eval_gt is not None:
            from ovtasks.registry.gate import evaluation_set_digest

            tags["eval_set_sha256"] = evaluation_set_digest(eval_gt)
        held = (data_manifest or {}).get("held_out") or {}
        tags["eval_held_out_images"] = str(held.get("images", 0))  # 0: the training run held nothing out
        if held.get("images"):
            tags["eval_held_out_ids_sha256"] = held["ids_sha256"]
        mlflow.set_tags(tags)
        run_id = run.info.run_id
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - MLflow raises its own RestException / MlflowException for "missing"
        client.create_registered_model(name, description=(
            "Open-vocabulary instance segmentation trained on pseudo-masks (no human mask annotation) by ovtasks. "
            "Versions are pyfunc models: input a column 'image' (base64 JPEG/PNG), optionally 'names' (comma-separated "
            "vocabulary) and, for Semantic-SAM, 'boxes' (JSON list of xyxy prompts); output 'instances' (JSON: name, "
            "score, bbox, COCO RLE segmentation). "
            "Aliases: champion (in use), challenger (the last registered)."))
    manifest = data_manifest or {}
    description = (f"{architecture} trained on {manifest.get('images', '?')} images of {len(manifest.get('shards', []))} validated "
                   f"pseudo-label shards ({manifest.get('generator', '?')}, data sha256 {str(manifest.get('sha256', ''))[:12]}); "
                   f"novel mask AP50 {evaluation.get('novel_mask_AP50')} on {tags.get('eval_held_out_images', '0')} held-out images; "
                   f"code ovtasks {__version__}" + (f"; DAG run {dag_run}" if dag_run else ""))
    # the version points at the logged model (an MLflow 3 LoggedModel: a tracking server needs its id with the source)
    mv = client.create_model_version(name, logged.model_uri, run_id=run_id, tags=tags, description=description,
                                     model_id=logged.model_id)
    from ovtasks.registry.integrity import record

    record(mlflow, client, name, str(mv.version))  # every file's sha256, in the registry: checked before any load
    client.set_registered_model_alias(name, "challenger", mv.version)
    return Registered(name, str(mv.version), run_id, tags)


def _by_alias(client, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 - no such alias
        return None


def _ap(v) -> float | None:
    """A metric tag as a number; None when it is missing, not a number, or not finite (``nan``, ``inf``)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


REASON_MAX = 500  # characters: a model-version tag value holds 5000, the audit JSON carries it with more


def check_request(settings: Settings, tolerance, why: str) -> float:
    """The margin a promotion will use, refused (ValueError, before anything is read or written) when it is not
    a finite number in [0, registry.max_promotion_tolerance] or the reason is too long: the same bounds on every
    path (UI, DAG, CLI)."""
    cfg = settings.registry
    margin = cfg.promotion_tolerance if tolerance is None else tolerance
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise ValueError(f"tolerance must be a finite number of novel mask AP50 points, got {tolerance!r}")
    if not 0 <= margin <= cfg.max_promotion_tolerance:
        raise ValueError(f"tolerance {margin} is outside [0, {cfg.max_promotion_tolerance}] (registry.max_promotion_tolerance)")
    if len(why or "") > REASON_MAX:
        raise ValueError(f"reason is {len(why)} characters; at most {REASON_MAX}")
    return float(margin)


@dataclass
class PromotionResult:
    promoted: bool
    reason: str
    challenger: str | None
    champion_before: str | None
    champion_after: str | None
    gate: dict | None = None  # verdict, reason, margin, floor and the paired-bootstrap interval, when the gate ran


def _paired_evaluation(mlflow, version) -> tuple[dict, list] | None:
    """(GT, predictions) a version was evaluated with, from its run's artifacts; None if it has none."""
    import tempfile

    try:
        with tempfile.TemporaryDirectory(prefix="ovtasks-gate-") as d:
            local = Path(mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=EVAL_DIR, dst_path=d))
            return json.loads((local / "gt.json").read_text()), json.loads((local / "predictions.json").read_text())
    except Exception:  # noqa: BLE001 - MLflow raises its own exceptions for a missing artifact
        return None


def promote(settings: Settings, tolerance: float | None = None, who: str | None = None, why: str = "",
            architecture: str = "ov-maskrcnn") -> PromotionResult:
    """Move ``champion`` to ``challenger`` when the gate allows it (see module doc); ``tolerance``
    overrides ``registry.promotion_tolerance`` (the margin, in novel mask AP50 points; finite, at most
    ``registry.max_promotion_tolerance``). Serialised with every other move of the champion (:func:`promotion_lock`)."""
    margin = check_request(settings, tolerance, why)
    mlflow, client = _client(settings)
    cfg = settings.registry
    name = registered_name(settings, architecture)
    who = who or getpass.getuser()
    with promotion_lock(settings, name):
        return _promote_locked(settings, mlflow, client, name, margin, who, why)


@contextlib.contextmanager
def promotion_lock(settings: Settings, name: str, timeout: float = 600.0):
    """Serialises every move of ``name``'s champion (promotion and rollback), across processes and machines:
    a PostgreSQL advisory lock on the tracking server's database when ``registry.lock_db`` names one, else a
    lock file beside the embedded registry (one machine). Each decision reads the aliases inside the lock."""
    import hashlib

    key = int.from_bytes(hashlib.sha256(f"ovtasks-promote:{name}".encode()).digest()[:8], "big", signed=True)
    if settings.registry.lock_db:
        import psycopg2

        conn = psycopg2.connect(settings.registry.lock_db.get_secret_value(), connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SET lock_timeout = %s", (f"{int(timeout * 1000)}ms",))
                cur.execute("SELECT pg_advisory_lock(%s)", (key,))
            try:
                yield
            finally:
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_advisory_unlock(%s)", (key,))
        finally:
            conn.close()
        return
    import fcntl

    path = Path(settings.data_dir).absolute() / "mlflow" / f".promote-{key & 0xFFFFFFFF:08x}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _promote_locked(settings: Settings, mlflow, client, name: str, margin: float, who: str, why: str) -> PromotionResult:
    from ovtasks.registry.gate import decide, paired_bootstrap

    cfg = settings.registry
    ch = _by_alias(client, name, "challenger")
    champ = _by_alias(client, name, "champion")
    before = str(champ.version) if champ else None
    if ch is None:
        return PromotionResult(False, f"no challenger version of {name!r} to promote", None, before, before)
    reason, gate = None, None
    new = _ap(ch.tags.get("novel_mask_AP50"))
    if ch.tags.get("gx_status") != "passed":
        reason = f"challenger v{ch.version} GX status is {ch.tags.get('gx_status')!r}, not 'passed'"
    elif champ is not None and champ.version == ch.version:
        reason = f"v{ch.version} is already the champion"
    elif new is None:
        reason = (f"challenger v{ch.version} has no finite novel mask AP50 (tag novel_mask_AP50 = "
                  f"{ch.tags.get('novel_mask_AP50')!r}): refused, whatever the champion")
    else:
        comparison = None
        if champ is not None and new >= cfg.min_novel_ap50:
            a, b = _paired_evaluation(mlflow, ch), _paired_evaluation(mlflow, champ)
            if a is None or b is None:
                reason = (f"no paired evaluation to compare with: {'challenger v' + str(ch.version) if a is None else 'champion v' + str(champ.version)}"
                          " has no evaluation/ predictions logged with its run (register it again with its evaluation)")
            elif ch.tags.get("eval_set_sha256") != champ.tags.get("eval_set_sha256"):
                reason = (f"challenger v{ch.version} and champion v{champ.version} were evaluated on different image sets "
                          f"({ch.tags.get('eval_set_sha256')} vs {champ.tags.get('eval_set_sha256')}): a paired comparison needs the same set")
            else:
                from ovtasks.evaluate.coco import split_ids

                try:
                    comparison = paired_bootstrap(a[0], a[1], b[1], split_ids(a[0])["novel"], cfg.bootstrap_samples,
                                                  cfg.promotion_confidence, cfg.bootstrap_seed)
                except ValueError as exc:  # e.g. an evaluation set without any novel-category instance
                    reason = f"challenger v{ch.version} cannot be compared with champion v{champ.version}: {exc}"
        if reason is None:
            decision = decide(new, comparison, margin, cfg.min_novel_ap50)
            gate = {"verdict": decision.verdict, "reason": decision.reason, "margin": margin, "floor": cfg.min_novel_ap50,
                    "champion": before, **({"comparison": comparison.to_json()} if comparison else {})}
            client.set_model_version_tag(name, ch.version, "promotion_gate", json.dumps(gate))
            if not decision.promote:
                reason = f"challenger v{ch.version}: {decision.reason}"
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if reason:
        client.set_model_version_tag(name, ch.version, "promotion_refused", json.dumps({"by": who, "at": now, "reason": reason}))
        return PromotionResult(False, reason, str(ch.version), before, before, gate)
    ok = f"challenger v{ch.version} novel mask AP50 {new:.2f}: {gate['reason']}"
    _make_champion(client, name, ch.version, before, {"promoted_by": who, "promoted_at": now, "promotion_reason": why or ok})
    return PromotionResult(True, ok, str(ch.version), before, str(ch.version), gate)


def _make_champion(client, name: str, version, before: str | None, audit: dict) -> None:
    """Record on the version who moves the champion to it, when, why and which champion it replaces, then move the
    ``champion`` alias (last: a failure before it leaves the champion where it was)."""
    for k, v in {**audit, "previous_champion": before or ""}.items():
        client.set_model_version_tag(name, version, k, v)
    client.set_registered_model_alias(name, "champion", version)


def rollback(settings: Settings, version: str | int, who: str | None = None, why: str = "",
             architecture: str = "ov-maskrcnn") -> PromotionResult:
    """Point ``champion`` at an earlier (or any existing) version, without the gate: the operator's way back
    when a promoted model misbehaves in use. Audited like a promotion (who, when, why, the champion it
    replaced) on the version, and appended to its ``rollbacks`` history."""
    check_request(settings, None, why)
    _mlflow, client = _client(settings)
    name = registered_name(settings, architecture)
    with promotion_lock(settings, name):
        return _rollback_locked(client, name, version, who, why)


def _rollback_locked(client, name: str, version, who: str | None, why: str) -> PromotionResult:
    champ = _by_alias(client, name, "champion")
    before = str(champ.version) if champ else None
    try:
        mv = client.get_model_version(name, str(version))
    except Exception as exc:  # noqa: BLE001 - MLflow's RestException / MlflowException for "no such version"
        raise LookupError(f"{name!r} has no version {version}") from exc
    if before == str(mv.version):
        return PromotionResult(False, f"v{mv.version} is already the champion", None, before, before)
    who = who or getpass.getuser()
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    why = why or f"rollback from v{before}"
    history = json.loads(mv.tags.get("rollbacks", "[]")) + [{"by": who, "at": now, "reason": why, "replaced": before}]
    _make_champion(client, name, mv.version, before, {"promoted_by": who, "promoted_at": now, "promotion_reason": why,
                                                      "rollbacks": json.dumps(history)})
    return PromotionResult(True, f"champion set to v{mv.version} by {who} (was v{before}): {why}", str(mv.version), before,
                           str(mv.version))


def load_registered(settings: Settings, alias: str = "champion", device: str = "cpu", architecture: str = "ov-maskrcnn"):
    """(model, meta, version) of ``models:/NAME@alias``, loaded from safetensors."""
    from ovtasks.models.loading import load_model
    from ovtasks.registry.integrity import verified_download
    from ovtasks.registry.serving import trained_dir

    mlflow, client = _client(settings)
    name = registered_name(settings, architecture)
    if _by_alias(client, name, alias) is None:
        raise LookupError(f"registered model {name!r} has no {alias!r} alias")
    local, mv = verified_download(mlflow, client, f"models:/{name}@{alias}")
    model, meta = load_model(trained_dir(local), device)
    return model, meta, str(mv.version)
