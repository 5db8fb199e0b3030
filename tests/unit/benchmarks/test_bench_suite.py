"""benchmarks/run_all.py: rows from each benchmark's JSON, the Markdown table, the README block, and the
scaling benchmark's process-tree memory sampler (the benchmarks themselves run in `make bench`, not here)."""

import importlib.util
import json
import subprocess
import sys
import time

from tests.support import ROOT


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_rows_table_and_readme_block(tmp_path, monkeypatch):
    ra = _load("run_all")
    results = tmp_path / "results"
    results.mkdir()
    (results / "coco_eval.json").write_text(json.dumps({"speedup": 4.2, "images": 10, "predictions": 7}))
    monkeypatch.setattr(ra, "RESULTS", results)
    bench = next(b for b in ra.BENCHES if b.name == "coco_eval")
    row = ra.run_bench(bench, reuse=True)
    assert row["ratio"] == 4.2 and row["met"] is False and row["ran"].startswith("reused")
    doc = {"date": "2026-01-01", "seconds": 1.0, "rows": [row, {"name": "x", "compared": "a / b", "target": ">= 1", "error": "exit 1"}],
           "gpu": [], "machine": {"cores": 2, "cpu": "cpu", "memory_gib": 1, "gpu": None, "torch": "t"}}
    table = ra.markdown(doc)
    assert "| coco_eval |" in table and "**4.2**" in table and "**no**" in table and "| x | a / b | error |" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{ra.START}\nold table\n{ra.END}\nrest\n")
    monkeypatch.setattr(ra, "README", readme)
    assert ra.update_readme(table)
    text = readme.read_text()
    assert "old table" not in text and "**4.2**" in text and text.startswith("intro\n") and text.endswith("rest\n")
    readme.write_text("no block\n")
    assert not ra.update_readme(table)


def test_every_benchmark_row_reads_its_committed_result():
    ra = _load("run_all")
    for b in ra.BENCHES:
        path = ra.RESULTS / f"{b.script.removesuffix('.py')}.json"
        assert (ROOT / "benchmarks" / b.script).exists()
        if path.exists():
            doc = json.loads(path.read_text())
            assert isinstance(b.ratio(doc), (int, float)) and isinstance(b.detail(doc), str)
    assert {g["name"] for g in ra.gpu_rows()} <= set(ra.GPU_RESULTS)


def test_tree_memory_sums_children():
    sc = _load("scaling")
    code = "import subprocess, sys, time; x = bytearray(150 << 20); p = subprocess.Popen([sys.executable, '-c', 'x = bytearray(150 << 20); import time; time.sleep(2)']); time.sleep(2); p.wait()"
    proc = subprocess.Popen([sys.executable, "-c", code])
    with sc.TreeMemory(proc.pid, period=0.02) as mem:
        proc.wait(timeout=60)
        time.sleep(0.1)
    assert mem.peak_single >= 150 << 20
    assert mem.peak_total >= 300 << 20  # parent and child together


def test_maskfree_speed_runs_end_to_end_and_feeds_the_plan(tmp_path):
    """benchmarks/maskfree_speed.py, tiny (4 images, a 2-step WSPN, the committed ITM, CPU): it labels every image and
    writes what `ovtasks plan --generator maskfree` reads (a GPU run is the same script with --device cuda)."""
    from ovtasks.orchestration.capacity import measured

    ms = _load("maskfree_speed")
    res = ms.run(images=4, image_size=256, size="committed", device="cpu", wspn_steps=2, repeats=1, work=tmp_path / "work")
    assert res["images"] >= 3 and res["pairs"] >= res["images"] - 1 and res["masks"] <= res["pairs"]
    assert abs(res["images_per_s"] - res["images"] / res["seconds"]) <= 0.01 * res["images_per_s"] and res["machine"]["gpu"] is None
    results = tmp_path / "results"
    results.mkdir()
    (results / "maskfree_speed_cuda.json").write_text(json.dumps(res))
    (results / "ingest.json").write_text((ROOT / "benchmarks" / "results" / "ingest.json").read_text())
    assert measured(results, generator="maskfree").gpu_images_per_s == res["images_per_s"]


def test_train_speed_times_the_steps_after_warmup(tmp_path):
    """benchmarks/train_speed.py: the rate comes from the history between the warm-up's last step and the last step;
    a tiny CPU run (the small network, GT targets) gives a rate and the fields the GPU row reads."""
    import pytest

    ts = _load("train_speed")
    hist = [{"step": i, "seconds": s, "loss": 1.0} for i, s in enumerate((5.0, 5.5, 6.0, 6.5, 7.0))]
    assert ts.rate(hist, 1) == (2.0, 4, 2.0) and ts.rate(hist, 0) == (5 / 7.0, 5, 7.0)  # steps 1-4 after step 0; all 5 from t0
    with pytest.raises(ValueError, match="nothing to time"):
        ts.rate(hist, 4)
    res = ts.run("small", "cpu", steps=4, warmup=1, batch_size=2, images=8, image_size=256, work=tmp_path)
    assert res["steps_timed"] == 3 and res["steps_per_s"] > 0 and res["images_per_s"] == round(res["steps_per_s"] * 2, 2)
    assert res["backbone"] == "small" and res["machine"]["gpu"] is None


def test_train_speed_semantic_sam_trains_on_gated_pseudo_labels(tmp_path):
    """The Semantic-SAM side of benchmarks/train_speed.py, tiny: pseudo-labels from the maskfree generator pass the GX
    gate and the loop is timed after its warm-up."""
    ts = _load("train_speed")
    res = ts.run_semantic_sam("small", "cpu", steps=4, warmup=1, batch_size=2, images=12, image_size=256, work=tmp_path)
    assert res["model"] == "semantic-sam" and res["steps_timed"] == 3 and res["steps_per_s"] > 0
    assert res["pseudo_label_annotations"] > 0 and res["gx_passed"] == 1
