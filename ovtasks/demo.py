"""``make demo``: the pipeline on embedded defaults (local store, synthetic data), with pictures.

Pipeline: synth → ingest → train-itm (or the committed checkpoint) → train-wspn → pseudo-label.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ovtasks.core.config import Settings
from ovtasks.report.pictures import ingest_overview, overlay_grid


def _airflow_chain(root: Path, settings: Settings, synth_uri: str, ingest_uri: str, train_steps: int, eval_images: int,
                   backbone: str | None = None):
    """Step 10: the same data through the DAGs with `airflow dags test` on a SQLite DB under ``root``.
    Ingest finds no new shard and pseudo-label finds every shard complete (their manifests), so only
    the weekly retrain does real work; then the promotion gate runs as a DAG."""
    from ovtasks.orchestration.embedded import AirflowCommandError, airflow_env, prepare, run_chain, write_ui_script
    from ovtasks.registry.lifecycle import registered_name, tracking_uri

    print(f"[10/10] Airflow (embedded): ovtasks_ingest -> ovtasks_pseudo_label -> ovtasks_retrain -> ovtasks_promote "
          f"with `airflow dags test`, SQLite DB {root / 'airflow' / 'airflow.db'}", flush=True)
    ovt = {"OVTASKS_DATA_DIR": str(Path(settings.data_dir).absolute()), "OVTASKS_PIPELINE__SOURCE_URI": synth_uri,
           "OVTASKS_PIPELINE__CLEAN_URI": ingest_uri, "OVTASKS_PIPELINE__PSEUDO_URI": str(root),
           "OVTASKS_PIPELINE__MODELS_URI": str(root / "models"), "OVTASKS_REGISTRY__TRACKING_URI": tracking_uri(settings),
           "OVTASKS_MASKFREE__ITM_MODEL": str(settings.maskfree.itm_model), "OVTASKS_MASKFREE__WSPN_MODEL": str(settings.maskfree.wspn_model),
           "OVDAGS_RETRY_DELAY_S": "5", **({"OVTASKS_PIPELINE__OV_MASKRCNN_BACKBONE": backbone} if backbone else {})}
    env = airflow_env(root / "airflow", ovt, settings.paths)
    try:
        prepare(env)
        chain = run_chain(env, [("ovtasks_ingest", None), ("ovtasks_pseudo_label", None),
                                ("ovtasks_retrain", {"steps": train_steps, "eval_images": eval_images}),
                                ("ovtasks_promote", {"reason": "demo: weekly retrain"})])
    except (AirflowCommandError, OSError) as exc:
        print(f"      Airflow step failed: {exc}", flush=True)
        return [], f"failed: {str(exc).splitlines()[0]}", None
    outcome = ""
    if chain and chain[-1].dag_id == "ovtasks_promote" and chain[-1].state == "success":
        from mlflow import MlflowClient

        c = MlflowClient(tracking_uri(settings), registry_uri=tracking_uri(settings))
        name = registered_name(settings, "ov-maskrcnn")
        ch = c.get_model_version_by_alias(name, "challenger")
        champ = c.get_registered_model(name).aliases.get("champion")
        outcome = (f"{name} v{ch.version} promoted to champion" if str(ch.version) == str(champ) else
                   f"{name} v{ch.version} not promoted: {json.loads(ch.tags.get('promotion_refused', '{}')).get('reason', '?')}")
    return chain, outcome, write_ui_script(root / "airflow" / "airflow-ui.sh", env)


# The committed ITM: the 4000 + 6000-step checkpoint of earlier sessions (two torch threads), then 2000 steps
# more with the mosaic grounding loss (one thread), then 2500 more at three times its weight (one thread; its
# `ovtasks_itm.json` records that last command, run with the previous checkpoint in models/itm-synth). Ingest ran
# with full decodes, as ingest did then (the 64 px check view finds 5 more near duplicates in these 20,480 images).
ITM_RECIPE = ("ovtasks synth --out data/itm/laion --shards 80 --images-per-shard 256 --seed 1 --failure-rate 0.02 && "
              "OVTASKS_INGEST__SCALED_DECODE=false ovtasks ingest --src data/itm/laion --out data/itm/clean && "
              "ovtasks train-itm --src data/itm/clean --out data/itm/base --gt data/itm/laion "
              "--pretrain-steps 4000 --steps 6000 --lr 1e-3 && "
              "ovtasks train-itm --src data/itm/clean --out data/itm/mosaic1 --gt data/itm/laion --init data/itm/base "
              "--steps 2000 --lr 3e-4 --mosaic-weight 1 && "
              "ovtasks train-itm --src data/itm/clean --out models/itm-synth --gt data/itm/laion --init data/itm/mosaic1 "
              "--steps 2500 --lr 3e-4 --mosaic-weight 3")

# SAM's own stage for Semantic-SAM (no SAM weights can be downloaded here): 6 x 750 synthetic SA-1B-format images
# (seeds 100-105), then train-sam on this CPU, one thread, with the box also as a mask prompt and SAM 2's
# high-resolution features (docs/model-quality.md, section 4)
SAM_RECIPE = ("for k in $(seq 100 105); do ovtasks synth-sa1b --out data/sam/sa1b/s$k --images 750 --seed $k; done && "
              "OMP_NUM_THREADS=1 ovtasks train-sam --sa1b data/sam/sa1b --out models/sam-synth --device cpu --steps 25000 "
              "--batch-size 8 --box-mask-prompt --hires")


# The OV Mask R-CNN's backbone, pretrained to classify the names the ITM data's captions mention (no box or mask
# labels; the same 20,480 seed-1 images as the ITM, none of them in the demo or the benchmarks)
BACKBONE_RECIPE = ("ovtasks synth --out data/itm/laion --shards 80 --images-per-shard 256 --seed 1 --failure-rate 0.02 && "
                   "OVTASKS_INGEST__SCALED_DECODE=false ovtasks ingest --src data/itm/laion --out data/itm/clean && "
                   "ovtasks pretrain-backbone --src data/itm/clean --out data/itm/backbone-3000 --steps 3000 --batch-size 32 "
                   "--image-size 128 && ovtasks pretrain-backbone --src data/itm/clean --out models/backbone-synth "
                   "--init data/itm/backbone-3000 --steps 6000 --batch-size 32 --image-size 128")


def detector_backbone(settings: Settings) -> str | None:
    """The backbone the demo's OV Mask R-CNN starts from: ``pipeline.ov_maskrcnn_backbone``, else the committed
    caption-pretrained one when present, else None (random)."""
    ref = settings.pipeline.ov_maskrcnn_backbone
    if ref is None and (Path(settings.paths.committed_backbone) / "backbone.safetensors").exists():
        ref = str(Path(settings.paths.committed_backbone).absolute())
        print(f"      starting from the committed caption-pretrained backbone {ref}\n      (made by: {BACKBONE_RECIPE})", flush=True)
    return ref


def committed_sam(settings: Settings) -> Path | None:
    """The committed SAM (``paths.committed_sam``, made by ``SAM_RECIPE``) when its weights are there, else None."""
    path = Path(settings.paths.committed_sam)
    return path if (path / "model.safetensors").exists() else None


def _itm_model(settings: Settings, root: Path, ingest_uri: str, synth_uri: str, train_itm_steps: int | None) -> str:
    """Step 3: the configured ITM, else the committed checkpoint, else one trained here for ``train_itm_steps``."""
    itm_uri = settings.maskfree.itm_model
    if itm_uri:
        print(f"[3/10] train-itm: skipped, using maskfree.itm_model={itm_uri}", flush=True)
    elif train_itm_steps is None and (Path(settings.paths.committed_itm) / "model.safetensors").exists():
        itm_uri = str(Path(settings.paths.committed_itm).absolute())
        print(f"[3/10] train-itm: using the committed checkpoint {itm_uri}\n      (made by: {ITM_RECIPE};"
              " pass --train-itm-steps N to train one here)", flush=True)
    else:
        from ovtasks.train.itm import ItmTrainConfig, train_itm

        itm_uri = str(root / "models" / "itm")
        steps = train_itm_steps or 300
        print(f"[3/10] train-itm: {steps} steps on {ingest_uri} -> {itm_uri}", flush=True)
        train_itm(ingest_uri, itm_uri, settings, ItmTrainConfig(steps=steps, pretrain_steps=steps, lr=1e-3, batch_size=24, holdout=32), gt_uri=synth_uri)
    return itm_uri


def run_demo(out: str, settings: Settings, shards: int = 8, images_per_shard: int = 64, seed: int = 0, workers: int | None = None,
             train_itm_steps: int | None = None, wspn_steps: int = 100, eval_images: int = 64, train_steps: int = 600,
             semantic_sam_steps: int = 500, airflow: bool = True, airflow_train_steps: int = 150) -> int:
    """The whole pipeline on synthetic data. The first ``eval_images`` images with GT are held out of every
    training (they are what the models are scored on). Step 10's weekly retrain trains a second, shorter
    model (``airflow_train_steps``), so its promotion shows the gate comparing two models on the same images."""
    from ovtasks.ingest.pipeline import ingest
    from ovtasks.pseudolabel.maskfree.generator import load_maskfree
    from ovtasks.pseudolabel.runner import pseudo_label
    from ovtasks.data.groundtruth import GroundTruth
    from ovtasks.evaluate.pseudo_labels import error_budget, evaluate_pseudo_labels
    from ovtasks.data.synth import SynthSpec, generate
    from ovtasks.train.wspn import WspnTrainConfig, train_wspn
    from ovtasks.registry.lifecycle import log_and_register, promote, tracking_uri
    from ovtasks.data.holdout import eval_image_ids
    from ovtasks.evaluate.models import evaluate_model
    from ovtasks.models.loading import load_model
    from ovtasks.train.ov_maskrcnn import train_ov_maskrcnn, TrainConfig
    from ovtasks.validate.expectations import validate

    root = Path(out).absolute()
    workers = workers or settings.workers
    t0 = time.perf_counter()
    synth_uri, ingest_uri = str(root / "laion"), str(root / "clean")
    print(f"[1/10] synth: {shards} shards x {images_per_shard} images -> {synth_uri}", flush=True)
    summary = generate(SynthSpec(seed=seed, shards=shards, images_per_shard=images_per_shard,
                                 image_size=settings.synth.image_size, failure_rate=settings.synth.failure_rate),
                       synth_uri, settings, workers=workers)
    print(f"[2/10] ingest -> {ingest_uri}", flush=True)
    result = ingest(synth_uri, ingest_uri, settings, workers=workers)
    picture = ingest_overview(synth_uri, ingest_uri, settings, root / "report" / "ingest_overview.png")
    itm_uri = _itm_model(settings, root, ingest_uri, synth_uri, train_itm_steps)
    wspn_uri = str(root / "models" / "wspn")
    print(f"[4/10] train-wspn: {wspn_steps} steps on the clean shards' captions -> {wspn_uri}", flush=True)
    wspn = train_wspn(ingest_uri, wspn_uri, settings, WspnTrainConfig(steps=wspn_steps))
    settings = settings.model_copy(update={"maskfree": settings.maskfree.model_copy(update={"itm_model": itm_uri, "wspn_model": wspn_uri})})
    print(f"[5/10] pseudo-label (maskfree) -> {root}/pseudo/maskfree/", flush=True)
    models = load_maskfree(settings)
    pl = pseudo_label(ingest_uri, str(root), settings, models=models)
    print(f"[6/10] validate (Great Expectations) -> {root}/pseudo/maskfree/validation_report.json", flush=True)
    gate = validate(str(root), settings, "maskfree").report
    model_dir = str(root / "models" / "ov-maskrcnn")
    print(f"[7/10] train ov-maskrcnn: {train_steps} steps on the validated pseudo-labels -> {model_dir}", flush=True)
    held = eval_image_ids(synth_uri, ingest_uri, settings, eval_images)
    backbone = detector_backbone(settings)
    trained = train_ov_maskrcnn(ingest_uri, str(root), model_dir, settings,
                                TrainConfig(steps=train_steps, batch_size=4, backbone_init=backbone), exclude_ids=held)
    print(f"[8/10] evaluate on the synthetic GT, register in MLflow ({tracking_uri(settings)}), promote", flush=True)
    ov_model, _ = load_model(model_dir, settings.device)
    ev = evaluate_model(ov_model, synth_uri, ingest_uri, settings, limit=eval_images)
    reg = log_and_register(settings, model_dir, {"steps": train_steps, "batch_size": 4, "backbone_init": backbone}, trained.history, gate, ev,
                           [f"{model_dir}/loss_curve.png", str(root / "report" / "pseudo_label_overlays.png")], trained.data_manifest)
    promo = promote(settings, who="demo", why="demo run")
    ssam_dir, sa1b_uri = str(root / "models" / "semantic-sam"), str(root / "sa1b")
    print(f"[9/10] Semantic-SAM: SA-1B-format masks ({sa1b_uri}) + the pseudo-labels' names, 1:4, {semantic_sam_steps} steps "
          f"-> {ssam_dir}; box-prompted evaluation; registered as its own model", flush=True)
    from ovtasks.data.sa1b import write_synthetic
    from ovtasks.evaluate.models import evaluate_semantic_sam
    from ovtasks.train.semantic_sam import SemanticSamConfig, train_semantic_sam

    write_synthetic(sa1b_uri, settings, images=512, image_size=settings.synth.image_size)
    sam_start = settings.pipeline.semantic_sam_start
    if sam_start is None and (committed := committed_sam(settings)) is not None:
        sam_start = str(committed.absolute())
        print(f"      starting from the committed SAM {sam_start}\n      (made by: {SAM_RECIPE})", flush=True)
    namer = settings.pipeline.semantic_sam_namer or backbone
    if namer:
        print(f"      naming prompts with the caption-pretrained backbone {namer} beside the semantic tokens", flush=True)
    ssam = train_semantic_sam(ingest_uri, str(root), sa1b_uri, ssam_dir, settings,
                              SemanticSamConfig(steps=semantic_sam_steps, sam_model=sam_start, namer=namer), exclude_ids=held)
    ssam_model = load_model(ssam_dir, settings.device)[0]
    ssam_ev = evaluate_semantic_sam(ssam_model, synth_uri, ingest_uri, settings, limit=eval_images)
    ssam_plain = None
    if ssam_model.namer is not None:  # the same model without its namer: what the semantic tokens name alone
        ssam_model.namer = None
        ssam_plain = evaluate_semantic_sam(ssam_model, synth_uri, ingest_uri, settings, limit=eval_images)
    ssam_reg = log_and_register(settings, ssam_dir, {"steps": semantic_sam_steps}, ssam.history, gate, ssam_ev,
                                [f"{ssam_dir}/loss_curve.png"], ssam.data_manifest)
    table, samples, results = evaluate_pseudo_labels(ingest_uri, synth_uri, settings, models, limit=eval_images)
    gt = GroundTruth.load(synth_uri, settings)
    budget = error_budget(samples, results, gt, settings, models)
    overlays = overlay_grid(samples, results, root / "report" / "pseudo_label_overlays.png", novel=gt.names("novel"),
                            mask_stage=settings.maskfree.mask_stage)
    (root / "report" / "pseudo_label_quality.json").write_text(json.dumps({**table, "error_budget": budget}, indent=2))
    chain, af_outcome, ui_script = [], "", None
    if airflow:
        chain, af_outcome, ui_script = _airflow_chain(root, settings, synth_uri, ingest_uri, airflow_train_steps, eval_images, backbone)
    else:
        print("[10/10] Airflow: skipped (--no-airflow)", flush=True)
    run = DemoRun(root, settings, synth_uri, ingest_uri, itm_uri, wspn_uri, model_dir, ssam_dir, summary, result, wspn, pl, gate,
                  trained, train_steps, reg, promo, ssam, semantic_sam_steps, ssam_reg, table, budget, ev, ssam_ev, chain, af_outcome,
                  ui_script, picture, overlays, time.perf_counter() - t0, ssam_plain)
    print_summary(run)
    return 1 if result.failed_shards else 0


@dataclass
class DemoRun:
    """What each step of the demo produced; :func:`print_summary` shows it."""

    root: Path
    settings: Settings
    synth_uri: str
    ingest_uri: str
    itm_uri: str
    wspn_uri: str
    model_dir: str
    ssam_dir: str
    synth: dict
    ingest: Any
    wspn: Any
    pseudo: Any
    gate: dict
    trained: Any
    train_steps: int
    reg: Any
    promo: Any
    ssam: Any
    ssam_steps: int
    ssam_reg: Any
    table: dict
    budget: dict
    ev: dict
    ssam_ev: dict
    chain: list
    airflow_outcome: str
    ui_script: Any
    picture: Path
    overlays: Path
    seconds: float
    ssam_plain: dict | None = None  # Semantic-SAM evaluated again without its namer


def print_summary(run: DemoRun) -> None:
    """The table a newcomer reads at the end of ``make demo``: every stage's counts, the pseudo-label quality and
    its error budget, both models' evaluations, and where each result is."""
    from ovtasks.evaluate.pseudo_labels import format_budget, format_table
    from ovtasks.registry.lifecycle import tracking_uri

    rep = run.ingest.report
    print("\n== ovtasks demo summary ==")
    print(f"{'stage':<14}{'in':>8}{'out':>8}{'dropped':>9}  details")
    print(f"{'synth':<14}{run.synth['images']:>8}{run.synth['images']:>8}{0:>9}  {run.synth['instances']} GT instances, "
          f"made to fail: {', '.join(f'{k}={v}' for k, v in sorted(run.synth['expected'].items()) if k != 'clean')}")
    q = sum(rep["quarantined"].values())
    print(f"{'ingest':<14}{rep['seen']:>8}{rep['kept']:>8}{q:>9}  {', '.join(f'{k}={v}' for k, v in rep['quarantined'].items())}")
    print(f"{'train-wspn':<14}{run.wspn.metrics['images']:>8}{'':>8}{'':>9}  image-label accuracy {run.wspn.metrics['label_accuracy']}")
    plr = run.pseudo.report
    print(f"{'pseudo-label':<14}{plr['candidates']:>8}{plr['annotations']:>8}{sum(plr['skipped'].values()):>9}  "
          f"candidates -> masks; skipped: {', '.join(f'{k}={v}' for k, v in plr['skipped'].items()) or 'none'}")
    print(f"{'validate':<14}{len(run.gate['shards']):>8}{run.gate['passed']:>8}{run.gate['failed']:>9}  shards passing the GX gate"
          + "".join(f"; {sh} excluded: {'; '.join(r)}" for sh, r in run.gate["excluded"].items()))
    print(f"{'train':<14}{run.trained.metrics['images']:>8}{'':>8}{'':>9}  OV Mask R-CNN, {run.train_steps} steps, "
          f"final loss {run.trained.metrics['final_loss']:.3f}")
    print(f"{'register':<14}{'':>8}{'':>8}{'':>9}  {run.reg.name} v{run.reg.version}: challenger; promotion "
          f"{'accepted' if run.promo.promoted else 'refused'}: {run.promo.reason}")
    print(f"{'semantic-sam':<14}{run.ssam.metrics['images']:>8}{'':>8}{'':>9}  + {run.ssam.metrics['sa1b_images']} SA-1B-format images, "
          f"{run.ssam_steps} steps, final loss {run.ssam.metrics['final_loss']:.3f}; {run.ssam_reg.name} v{run.ssam_reg.version}: challenger")
    if run.chain:
        print(f"{'airflow':<14}{'':>8}{'':>8}{'':>9}  " + ", ".join(f"{r.dag_id} {r.state} ({r.seconds:.0f}s)" for r in run.chain)
              + (f"; {run.airflow_outcome}" if run.airflow_outcome else ""))
    print(f"\npseudo-label quality on {run.table['_meta']['images']} images (mask AP50 %, synthetic GT; torch threads "
          f"{run.table['_meta']['torch_threads']}: a run with another thread count gives other floating-point sums and "
          "moves these by a few points):")
    print(format_table(run.table))
    print("\nerror budget: one stage at a time replaced by its ground-truth version (mask AP50 %):")
    print(format_budget(run.budget))
    print(f"\nOV Mask R-CNN trained on the pseudo-labels, evaluated on {run.ev['images']} images (%):")
    print(run.ev["table"])
    print(f"\nSemantic-SAM, GT boxes as prompts (names and masks, not detection), {run.ssam_ev['images']} images (%):")
    print(run.ssam_ev["table"])
    if run.ssam_plain:
        acc = run.ssam_plain["name_accuracy"]
        print(f"(names above: the semantic tokens x the caption-pretrained namer; the same model's tokens alone name "
              f"{acc['all']:.1f}% right (base {acc['base']:.1f}%, novel {acc['novel']:.1f}%), novel mask AP50 "
              f"{run.ssam_plain['novel_mask_AP50']:.1f})")
    print(f"\nfinished in {run.seconds:.1f}s. Results:")
    print(f"  synthetic LAION shards + COCO GT : {run.synth_uri}  (gt/instances.json, gt/categories.json)")
    print(f"  clean shards + manifests        : {run.ingest_uri}/shards/")
    print(f"  quarantine (with reasons)       : {run.ingest_uri}/quarantine/")
    print(f"  pseudo-masks (COCO per shard)   : {run.root}/pseudo/maskfree/  (report.json, categories.json, text_embeddings.npy)")
    print(f"  validation (GX)                 : {run.root}/pseudo/maskfree/validation_report.json, "
          f"data docs {run.root}/pseudo/maskfree/validation/<shard>/annotations.html")
    print(f"  models                          : ITM {run.itm_uri}, WSPN {run.wspn_uri}, OV Mask R-CNN {run.model_dir}, Semantic-SAM {run.ssam_dir}")
    print(f"  MLflow (runs, registry)         : {tracking_uri(run.settings)}  -> open with: "
          f".venv/bin/mlflow ui --backend-store-uri {tracking_uri(run.settings)}")
    if run.ui_script:
        print(f"  Airflow (embedded, SQLite)      : {run.root / 'airflow'}  -> open the UI with: sh {run.ui_script}"
              "  (http://127.0.0.1:8080, user admin, password printed at start)")
    print(f"  loss curves                     : {run.model_dir}/loss_curve.png, {run.ssam_dir}/loss_curve.png")
    print(f"  pictures                        : {run.picture}")
    print(f"                                    {run.overlays}")
