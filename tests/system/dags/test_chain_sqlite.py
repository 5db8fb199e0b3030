"""The embedded mode: the four DAGs run with `airflow dags test` on a SQLite metadata DB, in order, on a
small synthetic set; then the staged/mapped ingest is checked against `ovtasks ingest` byte for byte."""

import json
import shutil
from pathlib import Path

from ovtasks.core.config import PathsConfig, load_settings

from tests.support import ROOT


def _env(tmp: Path, data: Path, source: str) -> dict:
    from ovtasks.orchestration.embedded import airflow_env

    return airflow_env(tmp / "home", {"OVTASKS_DATA_DIR": str(data), "OVTASKS_PIPELINE__SOURCE_URI": source,
                                      "OVTASKS_MASKFREE__ITM_MODEL": str(ROOT / "models" / "itm-synth"),
                                      "OVTASKS_MASKFREE__PROPOSALS": "selective_search", "OVTASKS_MASKFREE__WSS_ITERATIONS": "10",
                                      "OVDAGS_RETRY_DELAY_S": "1",
                                      "OVTASKS_REGISTRY__MIN_NOVEL_AP50": "0"},  # a 3-step model: the chain's mechanics
                       PathsConfig(dags_folder=ROOT / "dags", plugins_folder=ROOT / "plugins"))


def test_whole_chain_with_airflow_dags_test(synth_small, tmp_path, smtp_server):
    from ovtasks.orchestration.embedded import dags_test, prepare, run_chain, write_ui_script

    data = tmp_path / "data"
    env = {**_env(tmp_path, data, synth_small[0]), **smtp_server.env}  # alerts go to a real SMTP server on loopback
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == f"sqlite:///{tmp_path / 'home' / 'airflow.db'}"
    prepare(env)
    chain = run_chain(env, [("ovtasks_ingest", None), ("ovtasks_pseudo_label", None),
                            ("ovtasks_retrain", {"steps": 3, "eval_images": 6}), ("ovtasks_promote", {"reason": "ci"})])
    assert [(r.dag_id, r.state) for r in chain] == [("ovtasks_ingest", "success"), ("ovtasks_pseudo_label", "success"),
                                                     ("ovtasks_retrain", "success"), ("ovtasks_promote", "success")], chain[-1].log[-3000:]

    report = json.loads((data / "clean" / "ingest_report.json").read_text())
    assert report["seen"] == 80 and report["seen"] == report["kept"] + sum(report["quarantined"].values())
    assert not [p for p in (data / "clean" / "_staging").rglob("*") if p.is_file()]  # staging removed
    pl = json.loads((data / "pseudo" / "maskfree" / "report.json").read_text())
    assert pl["missing"] == [] and len(pl["shards"]) == 2 and pl["annotations"] > 0
    assert (data / "pseudo" / "maskfree" / "validation_report.json").exists()
    assert len(list((data / "models" / "ov-maskrcnn").glob("*/model.safetensors"))) == 1

    from mlflow import MlflowClient

    from ovtasks.registry.lifecycle import tracking_uri

    s = load_settings(env={"OVTASKS_DATA_DIR": str(data)})
    c = MlflowClient(tracking_uri(s), registry_uri=tracking_uri(s))
    mv = c.get_model_version_by_alias(s.registry.model_name, "champion")
    assert str(mv.version) == "1" and mv.tags["promoted_by"] == "airflow:dag_test" and mv.tags["dag_run"].startswith("ovtasks_retrain/")
    assert mv.tags["eval_held_out_images"] == "6"  # the 6 evaluated images were held out of training, recorded
    # no evaluation set: the retrain run fails with what to do, before training
    no_eval = dict(env, OVTASKS_PIPELINE__EVAL_GT_URI=str(tmp_path / "nowhere" / "instances.json"), OVDAGS_RETRY_DELAY_S="0")
    refused = dags_test("ovtasks_retrain", no_eval, {"steps": 3, "eval_images": 6})
    assert refused.state == "failed" and "no evaluation set at" in refused.log and "OVTASKS_PIPELINE__EVAL_GT_URI" in refused.log

    # a second ingest run finds nothing new and changes nothing; a failing run reads as failed
    before = {p: p.read_bytes() for p in (data / "clean" / "shards").iterdir()}
    assert dags_test("ovtasks_ingest", env).state == "success"
    assert {p: p.read_bytes() for p in (data / "clean" / "shards").iterdir()} == before
    bad = dict(env, OVTASKS_PIPELINE__SOURCE_URI="s3x://nowhere", OVDAGS_RETRY_DELAY_S="0")
    assert dags_test("ovtasks_ingest", bad).state == "failed"
    subjects = [m["Subject"] for m in smtp_server.messages]
    assert subjects[0] == "[ovtasks] ov-maskrcnn challenger v1: promoted", subjects  # the promote DAG's decision
    assert any(x.startswith("[ovtasks] FAILED ovtasks_retrain.") for x in subjects), subjects  # the run without an eval set
    assert any(x.startswith("[ovtasks] FAILED ovtasks_ingest.") for x in subjects), subjects

    ui = write_ui_script(tmp_path / "ui.sh", env).read_text()
    assert "airflow standalone" in ui.splitlines()[-1] and f"AIRFLOW_HOME={tmp_path / 'home'}" in ui and "OVTASKS_DATA_DIR=" in ui


def test_mapped_ingest_equals_cli_ingest_and_retries_are_idempotent(synth_small, clean_small, tmp_path):
    from ovtasks.orchestration.tasks import dedup_staged, finish_ingest, new_shards, publish_ingest, stage_ingest

    s = load_settings(env={})
    src, out = synth_small[0], str(tmp_path / "clean")
    shards = new_shards(src, out, s)
    assert shards == ["00000", "00001"]
    staged = [stage_ingest(src, out, sh, s, "run1") for sh in reversed(shards)]  # any order, any worker
    stage_ingest(src, out, "00000", s, "run1")  # a retried stage task
    dedup_staged(out, [x["shard"] for x in staged], s, "run1")
    entries = [publish_ingest(src, out, sh, s, "run1") for sh in shards]
    again = publish_ingest(src, out, "00001", s, "run1")  # a retried publish task
    assert again == entries[1]
    summary = finish_ingest(src, out, entries, s, "run1")
    assert summary["seen"] == summary["kept"] + sum(summary["quarantined"].values())
    ref = Path(clean_small)
    for sub in ("shards", "quarantine"):
        for p in sorted((ref / sub).iterdir()):
            mine = Path(out) / sub / p.name
            if p.name.endswith(".manifest.json"):
                a, b = json.loads(p.read_text()), json.loads(mine.read_text())
                assert a["counts"] == b["counts"] and a["files"] == b["files"], p.name
            else:
                assert mine.read_bytes() == p.read_bytes(), p.name
    assert new_shards(src, out, s) == []
    shutil.rmtree(out)


def test_shard_groups_fit_the_map_limit():
    from ovtasks.orchestration.tasks import shard_groups

    shards = [f"{i:05d}" for i in range(2500)]
    groups = shard_groups(shards, per_group=1, max_groups=1024)
    assert len(groups) <= 1024 and [s for g in groups for s in g] == shards
    assert shard_groups(shards[:10], 1, 1024) == [[s] for s in shards[:10]]
    assert shard_groups(shards[:10], 4, 1024) == [shards[0:4], shards[4:8], shards[8:10]]
    assert shard_groups([], 1, 1024) == []
