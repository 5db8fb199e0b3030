"""Production mode on this machine: CeleryExecutor on the real PostgreSQL (a database made by the test) and
Redis, the api-server, scheduler, dag-processor and a Celery worker for `default,gpu` as subprocesses,
the pipeline's data in a SeaweedFS S3 bucket. `ovtasks_pseudo_label` is triggered through the REST API
(apache-airflow-client, token auth); then the worker is SIGKILLed mid-task and the retry must give the
same annotations, none duplicated or missing. Everything started here is stopped by pid."""

import json
import time
import uuid

from tests.support.airflow_stack import PartialWatcher, Stack, annotations, celery_env, free_port, shard_docs
from ovtasks.core.config import load_settings

DAG = "ovtasks_pseudo_label"


def test_pseudo_label_on_celery_survives_a_killed_worker(synth_small, seaweed, postgres_db, redis_db, tmp_path, record_fault):
    from ovtasks.ingest.pipeline import ingest
    from ovtasks.core.storage import open_store

    s3 = seaweed.env()
    bucket = f"ovt-celery-{uuid.uuid4().hex[:6]}"
    clean, labelled = f"s3://{bucket}/clean", f"s3://{bucket}/labelled"
    ingest(synth_small[0], clean, load_settings(env=s3), workers=1)

    port = free_port()
    env = celery_env(tmp_path, port, postgres_db, redis_db, s3, clean, labelled)
    stack = Stack(env, tmp_path / "logs")
    try:
        af = stack.up(port, DAG)

        run1 = af.trigger(DAG)
        assert stack.wait(af, DAG, run1, 400) == "success", f"{af.task_states(DAG, run1)}\n{stack.tail()}"
        store = open_store(labelled, load_settings(env=s3).s3)
        first = shard_docs(store)
        assert len(first) == 2 and json.loads(store.get_bytes("pseudo/maskfree/report.json"))["missing"] == []
        anns = annotations(first)
        assert sum(map(len, anns.values())) > 0

        # run 2 from scratch; SIGKILL the worker (and its task process) while it labels, start a new one
        for key in store.list("pseudo/maskfree/"):
            store.delete(key)
        with PartialWatcher(store) as watcher:  # nothing half-written is ever visible, kill included
            run2 = af.trigger(DAG)
            stack.wait_task_running(af, DAG, run2, "label")
            time.sleep(3)  # in the middle of a shard
            stack.kill("worker")
            stack.start("worker2", "celery", "worker", "--queues", "default,gpu")
            assert stack.wait(af, DAG, run2, 500) == "success", f"{af.task_states(DAG, run2)}\n{stack.tail()}"
        assert watcher.checks > 0 and watcher.problems == [], watcher.problems[:5]
        tries = [tr for t, _, st, tr in af.task_states(DAG, run2) if t == "label"]
        assert max(tries) >= 2, f"the kill did not hit a label task: {af.task_states(DAG, run2)}"
        second = shard_docs(store)
        assert second.keys() == first.keys()
        for k, again in annotations(second).items():
            assert again == anns[k], f"{k}: annotations differ after the killed worker's retry"
            assert len(set(again)) == len(again)
        n = sum(map(len, anns.values()))
        record_fault("Celery worker SIGKILLed during pseudo-labelling",
                     f"`airflow celery worker` (and its task process) SIGKILLed 3 s into a `label` task of ovtasks_pseudo_label "
                     f"(CeleryExecutor, PostgreSQL, Redis, SeaweedFS); a new worker started",
                     f"Airflow retried the task (try {max(tries)}) and the run succeeded; {len(second)} shard files with {n} "
                     f"annotations, identical (image, category, RLE) to an uninterrupted run, none duplicated or missing; "
                     f"{watcher.checks} reads of the store during the run saw no half-written object", 0)
    finally:
        stack.stop()
