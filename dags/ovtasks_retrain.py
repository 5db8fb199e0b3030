"""ovtasks_retrain: validate → train → evaluate → register a challenger, weekly or when new pseudo-labels
land (the pseudo-label Asset), whichever comes first, and on demand. Registering updates the model Asset.

The GX gate decides which pseudo-label shards are trained on (failing ones are excluded with their
reasons in the run report). The new MLflow model version gets the alias ``challenger``; promotion is
``ovtasks_promote``'s job.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, get_current_context, task

from ovtasks.orchestration.dag_defaults import (GPU_POOL, GPU_QUEUE, MODEL_ASSET_URI, PSEUDO_ASSET_URI, RETRAIN_CRON, RETRAIN_EVAL_IMAGES,
                                     RETRAIN_STEPS, TAGS, default_args, run_key, settings)

PSEUDO, MODEL = Asset(PSEUDO_ASSET_URI), Asset(MODEL_ASSET_URI)


@dag(dag_id="ovtasks_retrain", schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable(RETRAIN_CRON, timezone="UTC"), assets=[PSEUDO]), start_date=datetime(2026, 1, 1), catchup=False, max_active_runs=1,
     tags=TAGS + ["train", "mlflow"], default_args=default_args(240), doc_md=__doc__,
     params={"model": Param("ov-maskrcnn", enum=["ov-maskrcnn", "semantic-sam"]),
             "steps": Param(RETRAIN_STEPS, type="integer", minimum=1, description="default: OVDAGS_RETRAIN_STEPS (300)"),
             "window_shards": Param(0, type="integer", minimum=0, description="newest N validated shards; 0 = all"),
             "generator": Param("", type="string", description="empty: pipeline.generator"),
             "eval_images": Param(RETRAIN_EVAL_IMAGES, type="integer", minimum=1, description="default: OVDAGS_RETRAIN_EVAL_IMAGES (64)")})
def ovtasks_retrain():
    @task(doc_md="Great Expectations gate over every pseudo-label shard; fails when no shard passes.")
    def validate() -> dict:
        from ovtasks.orchestration.tasks import uris, validate_pseudo

        s = settings()
        return validate_pseudo(uris(s)["pseudo"], s, get_current_context()["params"]["generator"] or s.pipeline.generator)

    @task(queue=GPU_QUEUE, pool=GPU_POOL, doc_md="Trains on the validated shards, never on the evaluation images (held out, recorded "
          "in the model's data manifest). Checkpoints and the model go to pipeline.models_uri (the store in a deployment), "
          "so a retry on any worker resumes and the register task on any worker finds the model.")
    def train(gate: dict) -> dict:
        from ovtasks.orchestration.tasks import model_run_uri, train_run, uris

        s, ctx = settings(), get_current_context()
        p, u = ctx["params"], uris(s)
        out = model_run_uri(s, p["model"], run_key(ctx["run_id"]))
        return train_run(p["model"], u["clean"], u["pseudo"], out, s, p["generator"] or s.pipeline.generator, p["steps"],
                         p["window_shards"], u["sa1b"], eval_gt_uri=u["eval_gt"], eval_images=p["eval_images"])

    @task(queue=GPU_QUEUE, pool=GPU_POOL, outlets=[MODEL], doc_md="Evaluates on the held-out images only (refuses otherwise; base/novel, "
          "generalized/constrained), logs to MLflow, registers the challenger (updates the model Asset).")
    def register(trained: dict) -> dict:
        from ovtasks.orchestration.tasks import evaluate_and_register, uris

        s, ctx = settings(), get_current_context()
        p, u = ctx["params"], uris(s)
        return evaluate_and_register(trained["model_dir"], u["eval_gt"], u["clean"], u["pseudo"], s, p["generator"] or s.pipeline.generator,
                                     p["eval_images"], dag_run=f"{ctx['dag'].dag_id}/{ctx['run_id']}", require_held_out=True)

    register(train(validate()))


ovtasks_retrain()
