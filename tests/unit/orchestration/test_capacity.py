"""The capacity plan (``ovtasks plan``): arithmetic from measured throughput, and helm values the chart accepts."""

import json
import math
import subprocess
import sys

import pytest
import yaml

from ovtasks.core.config import load_settings
from ovtasks.orchestration.capacity import helm_values, measured, plan
from tests.unit.deploy.test_deploy_files import CHART, _errors, _values


def test_gpu_workers_follow_throughput_window_and_efficiency():
    p = plan(10e6, gpu_images_per_s=12.5, ingest_images_per_core_s=200, window_hours=72, efficiency=0.7)
    assert p.gpu_hours == round(10e6 / 12.5 / 3600, 1)
    assert p.gpu_workers == math.ceil(10e6 / 12.5 / (72 * 3600 * 0.7)) == 5
    assert p.shards == 1000 and p.mapped_pseudo_tasks == 1000 and p.shards_per_task == 1
    # twice the throughput halves the workers; a 24 h window triples them
    assert plan(10e6, 25, 200).gpu_workers == 3
    assert plan(10e6, 12.5, 200, window_hours=24).gpu_workers == 14
    assert plan(1000, 12.5, 200).gpu_workers == 1  # never zero


def test_past_max_map_length_shards_are_grouped_and_big_plans_get_notes():
    p = plan(200e6, 12.5, 200)
    assert p.shards == 20_000 and p.shards_per_task == math.ceil(20_000 / 1024) and p.mapped_pseudo_tasks <= 1024
    assert any("max_map_length" in n for n in p.notes) and any("64 GPU workers" in n for n in p.notes)
    small_shards = plan(10e6, 12.5, 200, shard_size=5_000_000)  # 2 shards for 5 GPUs
    assert any("shard groups" in n for n in small_shards.notes)


@pytest.mark.parametrize("bad", [dict(images_per_week=0), dict(gpu_images_per_s=-1), dict(efficiency=1.5), dict(window_hours=200)])
def test_bad_inputs_are_clear_errors(bad):
    kw = dict(images_per_week=1e6, gpu_images_per_s=10, ingest_images_per_core_s=100) | bad
    with pytest.raises(ValueError):
        plan(**kw)


def test_helm_values_of_a_plan_validate_against_the_chart_schema():
    p = plan(50e6, 12.5, 200)
    v = _values("values.yaml", "values-production.example.yaml")
    over = helm_values(p)
    v["ovtasks"].update(over["ovtasks"])
    v["airflow"]["workers"]["celery"]["sets"] = over["airflow"]["workers"]["celery"]["sets"]  # helm replaces lists
    assert _errors(v) == []
    gpu = {s["name"]: s for s in v["airflow"]["workers"]["celery"]["sets"]}["gpu"]
    assert gpu["keda"]["maxReplicaCount"] == p.gpu_workers == v["ovtasks"]["gpuPoolSlots"]
    assert {"name": "OVTASKS_PIPELINE__SHARDS_PER_TASK", "value": str(p.shards_per_task)} in gpu["env"]
    assert (CHART / "values.schema.json").exists()


def test_measured_throughput_comes_from_the_committed_results():
    m = measured(load_settings(env={}).paths.benchmark_results)
    doc = json.loads((CHART.parents[1] / "benchmarks" / "results" / "grounded_cuda.json").read_text())
    assert m.gpu_images_per_s in [r["batched_img_s"] for r in doc["rows"]] and doc["machine"]["gpu"] in m.gpu_source
    with pytest.raises(FileNotFoundError, match="gpu-images-per-s"):
        measured(load_settings(env={}).paths.benchmark_results, generator="maskfree")


def test_maskfree_throughput_comes_from_its_gpu_run(tmp_path):
    """``--generator maskfree`` reads ``maskfree_speed_cuda.json`` (benchmarks/maskfree_speed.py on a GPU); a GPU rate
    given on the command line needs only ingest's result; an unknown generator is a clear error."""
    import shutil

    committed = load_settings(env={}).paths.benchmark_results
    shutil.copy(committed / "ingest.json", tmp_path / "ingest.json")
    with pytest.raises(FileNotFoundError, match="maskfree_speed.py"):
        measured(tmp_path, generator="maskfree")
    (tmp_path / "maskfree_speed_cuda.json").write_text(json.dumps(
        {"images_per_s": 7.5, "size": "real", "image_size": 512, "machine": {"gpu": "NVIDIA H200", "cpus": 16}}))
    m = measured(tmp_path, generator="maskfree")
    assert m.gpu_images_per_s == 7.5 and "NVIDIA H200 with 16 CPU cores" in m.gpu_source and "real ITM" in m.gpu_source
    assert m.ingest_images_per_core_s == measured(committed).ingest_images_per_core_s
    (tmp_path / "maskfree_speed_cuda.json").unlink()
    only_ingest = measured(tmp_path, generator="maskfree", gpu=False)
    assert only_ingest.gpu_source == "--gpu-images-per-s" and only_ingest.ingest_images_per_core_s > 0
    with pytest.raises(ValueError, match="unknown generator"):
        measured(tmp_path, generator="llm")


def test_cli_plan_writes_values(tmp_path):
    out = tmp_path / "plan.yaml"
    r = subprocess.run([sys.executable, "-m", "ovtasks.cli.main", "plan", "--images-per-week", "20e6", "--gpu-images-per-s", "20",
                        "--ingest-images-per-core-s", "200", "--values-out", str(out), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["gpu_workers"] == math.ceil(20e6 / 20 / (72 * 3600 * 0.7))
    assert yaml.safe_load(out.read_text())["ovtasks"]["gpuPoolSlots"] == doc["gpu_workers"]
    r = subprocess.run([sys.executable, "-m", "ovtasks.cli.main", "plan", "--images-per-week", "1e6", "--generator", "maskfree"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "gpu-images-per-s" in r.stderr
    # with the GPU rate given, the maskfree plan takes only ingest's rate from the committed results
    r = subprocess.run([sys.executable, "-m", "ovtasks.cli.main", "plan", "--images-per-week", "1e6", "--generator", "maskfree",
                        "--gpu-images-per-s", "8"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "8.0 images/s per GPU (--gpu-images-per-s)" in r.stdout
