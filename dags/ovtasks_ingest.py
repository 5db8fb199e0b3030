"""ovtasks_ingest: new img2dataset shards at the source URI → clean webdataset shards + quarantine.

Per shard, mapped: stage (filters) → one cross-shard near-duplicate pass → publish (manifest last).
Updates the clean-shards Asset that ``ovtasks_pseudo_label`` is scheduled on.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import Asset, dag, get_current_context, task

from ovtasks.orchestration.dag_defaults import CLEAN_ASSET_URI, TAGS, default_args, run_key, settings

CLEAN = Asset(CLEAN_ASSET_URI)


@dag(dag_id="ovtasks_ingest", schedule="@hourly", start_date=datetime(2026, 1, 1), catchup=False, max_active_runs=1,
     tags=TAGS + ["ingest"], default_args=default_args(60), doc_md=__doc__)
def ovtasks_ingest():
    @task(doc_md="Source shards without a complete manifest for the current ingest config.")
    def list_new() -> list[str]:
        from ovtasks.orchestration.tasks import new_shards, uris

        s = settings()
        return new_shards(uris(s)["source"], uris(s)["clean"], s)

    @task(doc_md="Filters one shard; staged tars and perceptual hashes go to the store's _staging/<run>/.")
    def stage(shard: str) -> dict:
        from ovtasks.orchestration.tasks import stage_ingest, uris

        s = settings()
        return stage_ingest(uris(s)["source"], uris(s)["clean"], shard, s, run_key(get_current_context()["run_id"]))

    @task(doc_md="Cross-shard near-duplicates of this run's shards, in name order (as `ovtasks ingest`).")
    def dedup(staged: list[dict]) -> list[str]:
        from ovtasks.orchestration.tasks import dedup_staged, uris

        s = settings()
        shards = sorted(x["shard"] for x in staged)
        dedup_staged(uris(s)["clean"], shards, s, run_key(get_current_context()["run_id"]))
        return shards

    @task(doc_md="Publishes one shard atomically, manifest last.")
    def publish(shard: str) -> dict:
        from ovtasks.orchestration.tasks import publish_ingest, uris

        s = settings()
        return publish_ingest(uris(s)["source"], uris(s)["clean"], shard, s, run_key(get_current_context()["run_id"]))

    @task(outlets=[CLEAN], doc_md="Run report (seen = kept + quarantined), staging removed, clean-shards Asset updated.")
    def report(entries: list[dict]) -> dict:
        from ovtasks.orchestration.tasks import finish_ingest, uris

        s = settings()
        return finish_ingest(uris(s)["source"], uris(s)["clean"], list(entries), s, run_key(get_current_context()["run_id"]))

    shards = dedup(stage.expand(shard=list_new()))
    report(publish.expand(shard=shards))


ovtasks_ingest()
