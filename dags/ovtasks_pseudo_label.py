"""ovtasks_pseudo_label: clean shards → COCO pseudo-masks, on the GPU queue.

Scheduled on the clean-shards Asset. Shards are mapped in groups (never more than max_map_length
groups, so any number of shards fits); each group loads the models once and skips shards already
complete for the same models and config. The GPU pool caps concurrent GPU tasks.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import Asset, Param, dag, get_current_context, task

from ovtasks.orchestration.dag_defaults import CLEAN_ASSET_URI, GPU_POOL, GPU_QUEUE, PSEUDO_ASSET_URI, TAGS, default_args, settings

CLEAN, PSEUDO = Asset(CLEAN_ASSET_URI), Asset(PSEUDO_ASSET_URI)


@dag(dag_id="ovtasks_pseudo_label", schedule=[CLEAN], start_date=datetime(2026, 1, 1), catchup=False, max_active_runs=1,
     tags=TAGS + ["pseudo-label", "gpu"], default_args=default_args(180), doc_md=__doc__,
     params={"generator": Param("", type="string", description="maskfree | grounded; empty: pipeline.generator")})
def ovtasks_pseudo_label():
    @task(doc_md="Groups of clean shards still to label (at most max_map_length groups).")
    def plan() -> list[list[str]]:
        from ovtasks.orchestration.tasks import pending_pseudo_shards, shard_groups, uris

        s = settings()
        gen = get_current_context()["params"]["generator"] or s.pipeline.generator
        todo = pending_pseudo_shards(uris(s)["clean"], uris(s)["pseudo"], s, gen)
        return shard_groups(todo, s.pipeline.shards_per_task, s.pipeline.max_map_length)

    @task(queue=GPU_QUEUE, pool=GPU_POOL, doc_md="Labels a group of shards (models loaded once); complete shards are skipped.")
    def label(shards: list[str]) -> list[dict]:
        from ovtasks.orchestration.tasks import pseudo_label_group, uris

        s = settings()
        gen = get_current_context()["params"]["generator"] or s.pipeline.generator
        return pseudo_label_group(uris(s)["clean"], uris(s)["pseudo"], list(shards), s, gen)

    @task(outlets=[PSEUDO], doc_md="Run report, vocabulary and text embeddings from the shard manifests; fails if a shard is missing.")
    def finalize(done: list) -> dict:
        from ovtasks.orchestration.tasks import finalize_pseudo_label, uris

        s = settings()
        gen = get_current_context()["params"]["generator"] or s.pipeline.generator
        return finalize_pseudo_label(uris(s)["clean"], uris(s)["pseudo"], s, gen)

    finalize(label.expand(shards=plan()))


ovtasks_pseudo_label()
