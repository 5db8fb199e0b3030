import json
import os
import subprocess
import sys
from pathlib import Path


from ovtasks.cli.main import main

BIN = Path(sys.executable).parent / "ovtasks"


def test_help_lists_subcommands():
    out = subprocess.run([str(BIN), "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("synth", "ingest", "demo", "config"):
        assert cmd in out


def test_synth_then_ingest_exit_codes(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "laion"), "--shards", "2", "--images-per-shard", "6", "--image-size", "96"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 12
    assert main(["ingest", "--src", str(tmp_path / "laion"), "--out", str(tmp_path / "clean"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "ingest report" in out and "ingest_report.json" in out
    (tmp_path / "laion" / "00001.tar").write_bytes(b"\x00" * 100)  # break one shard
    assert main(["ingest", "--src", str(tmp_path / "laion"), "--out", str(tmp_path / "clean2"), "--workers", "1"]) == 1
    report = json.loads((tmp_path / "clean2" / "ingest_report.json").read_text())
    assert report["failed_shards"] == 1 and report["shards"][0]["status"] == "ok"


def test_bad_config_and_missing_source_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OVTASKS_INGEST__MIN_SIDE", "-1")
    assert main(["config"]) == 2
    assert "ingest.min_side" in capsys.readouterr().err
    monkeypatch.delenv("OVTASKS_INGEST__MIN_SIDE")
    assert main(["ingest", "--src", str(tmp_path), "--out", str(tmp_path / "o")]) == 2


def test_config_masks_secrets(monkeypatch, capsys):
    monkeypatch.setenv("OVTASKS_S3__SECRET_KEY", "hunter2")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and json.loads(out)["s3"]["secret_key"] == "**********"


def test_logs_are_json_when_not_a_terminal(tmp_path):
    subprocess.run([str(BIN), "synth", "--out", str(tmp_path / "l"), "--shards", "1", "--images-per-shard", "4", "--image-size", "96"], check=True, capture_output=True)
    res = subprocess.run([str(BIN), "ingest", "--src", str(tmp_path / "l"), "--out", str(tmp_path / "c")],
                         capture_output=True, text=True, env={**os.environ, "OVTASKS_WORKERS": "1"})
    assert res.returncode == 0
    lines = [json.loads(line) for line in res.stderr.splitlines() if line.startswith("{")]
    assert any(line["msg"] == "ingest done" and line["seen"] == 4 for line in lines)
    assert "\r" not in res.stderr  # no progress bar when not on a terminal


def test_model_stage_commands(tmp_path, capsys, synth_small):
    from ovtasks.core.config import load_settings
    from ovtasks.ingest.pipeline import ingest

    clean = tmp_path / "clean"
    ingest(synth_small[0], str(clean), load_settings(env={}), workers=1)
    assert main(["train-wspn", "--src", str(clean), "--out", str(tmp_path / "wspn"), "--steps", "3", "--max-images", "16"]) == 0
    out = capsys.readouterr().out
    assert "train-wspn metrics" in out and (tmp_path / "wspn" / "wspn.pt").exists()
    # no ITM model configured: a clear usage error, exit 2
    assert main(["pseudo-label", "--src", str(clean), "--out", str(tmp_path / "pl"), "--wspn-model", str(tmp_path / "wspn")]) == 2
    assert "itm_model is not set" in capsys.readouterr().err
    assert main(["pseudo-label", "--src", str(tmp_path / "nothing"), "--out", str(tmp_path / "pl"), "--itm-model", "x"]) == 2
