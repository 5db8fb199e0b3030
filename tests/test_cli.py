import json
import os
import subprocess
import sys
from pathlib import Path


from ovtasks.cli import main

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
