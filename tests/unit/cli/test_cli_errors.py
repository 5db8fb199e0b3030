"""Every CLI error is one line naming the problem, with exit 2 for usage / config / input errors (1 means
only "some shard failed" / "the run failed"); never a traceback. Each subcommand runs against a table of bad
arguments, in a separate process as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _run(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ovtasks"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OVTASKS_LOG_FORMAT": "text", **(env or {})})


UNREACHABLE_S3 = {"OVTASKS_S3__ENDPOINT": "127.0.0.1:9", "OVTASKS_S3__ACCESS_KEY": "k", "OVTASKS_S3__SECRET_KEY": "s"}

# (id, arguments with {file} / {dir} / {ro} placeholders, extra env, words the one line must contain)
CASES = [
    ("synth_out_is_a_file", ["synth", "--out", "{file}", "--shards", "1", "--images-per-shard", "2"], {}, "afile"),
    ("sa1b_out_is_a_file", ["synth-sa1b", "--out", "{file}/x", "--images", "1"], {}, "afile"),
    ("ingest_src_missing", ["ingest", "--src", "{dir}/nowhere", "--out", "{dir}/o"], {}, "no *.tar shards"),
    ("ingest_src_is_a_tar", ["ingest", "--src", "{tar}", "--out", "{dir}/o"], {}, "is a file"),
    ("ingest_out_is_a_file", ["ingest", "--src", "{shards}", "--out", "{file}"], {}, "afile"),
    ("ingest_out_unwritable", ["ingest", "--src", "{shards}", "--out", "{ro}/o"], {}, "ro"),
    ("ingest_s3_unreachable", ["ingest", "--src", "s3://bucket/laion", "--out", "{dir}/o"], UNREACHABLE_S3, "127.0.0.1:9"),
    ("ingest_s3_not_configured", ["ingest", "--src", "s3://bucket/laion", "--out", "{dir}/o"], {}, "OVTASKS_S3__ENDPOINT"),
    ("bad_config_value", ["ingest", "--src", "{shards}", "--out", "{dir}/o"], {"OVTASKS_WORKERS": "lots"}, "workers"),
    ("unknown_config_key", ["status"], {"OVTASKS_INGEST__NO_SUCH_KEY": "1"}, "ingest.no_such_key"),
    ("train_itm_src_missing", ["train-itm", "--src", "{dir}/nowhere", "--out", "{dir}/o"], {}, "nowhere"),
    ("train_wspn_src_missing", ["train-wspn", "--src", "{dir}/nowhere", "--out", "{dir}/o"], {}, "nowhere"),
    ("pseudo_label_src_missing", ["pseudo-label", "--src", "{dir}/nowhere", "--out", "{dir}/o"], {}, "nowhere"),
    ("validate_src_missing", ["validate", "--src", "{dir}/nowhere"], {}, "nowhere"),
    ("train_src_missing", ["train", "--src", "{dir}/nowhere", "--pseudo", "{dir}/nowhere", "--out", "{dir}/o"], {}, "nowhere"),
    ("promote_without_registry", ["promote"], {}, "no model registry"),
    ("rollback_to_a_missing_version", ["promote", "--version", "7"], {}, "no model registry"),
    ("trigger_conf_not_json", ["trigger", "ovtasks_retrain", "--conf", "steps=3"], {}, "--conf"),
    ("predict_model_missing", ["predict", "{file}", "--model", "{dir}/nowhere", "--out", "{dir}/p"], {}, "nowhere"),
    ("models_upload_src_missing", ["models", "upload", "{dir}/nowhere", "s3://b/models/itm"], {}, "nowhere"),
    ("models_upload_uri_not_a_store", ["models", "upload", "{file}", "{dir}/x"], {}, "not a store URI"),
    ("plan_negative_images", ["plan", "--images-per-week", "-5"], {}, "images"),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory, synth_small):
    d = tmp_path_factory.mktemp("cli-errors")
    (d / "afile").write_text("not a directory")
    ro = d / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes into a read-only directory; sysfs refuses even root
        ro = Path("/sys/ro-ovtasks-test")
    shards = Path(synth_small[0])
    yield {"dir": str(d), "file": str(d / "afile"), "ro": str(ro), "shards": str(shards), "tar": str(shards / "00000.tar")}
    (d / "ro").chmod(0o755)


@pytest.mark.parametrize("case, args, env, words", CASES, ids=[c[0] for c in CASES])
def test_bad_arguments_give_one_line_and_exit_2(places, tmp_path, case, args, env, words):
    r = _run([a.format(**places) for a in args], tmp_path, env)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, (r.returncode, r.stdout[-1500:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines and lines[-1].startswith("ovtasks"), r.stderr[-2000:]
    assert words.lower() in lines[-1].lower(), lines[-1]
    assert not (tmp_path / "data").exists(), "a failed command left data/ in the working directory"


def test_a_closed_pipe_ends_quietly(tmp_path):
    r = subprocess.run(f"'{BIN / 'ovtasks'}' plan --images-per-week 10e6 --gpu-images-per-s 20 --ingest-images-per-core-s 500 | head -2",
                       shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=120, executable="/bin/bash")
    assert len(r.stdout.splitlines()) == 2 and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr[-2000:]


def test_status_reads_without_creating_a_registry(tmp_path):
    r = _run(["status"], tmp_path, {"OVTASKS_AIRFLOW__URL": "http://127.0.0.1:9"})
    assert r.returncode == 3 and "Traceback" not in r.stderr  # Airflow unreachable: documented exit 3
    assert not (tmp_path / "data" / "mlflow").exists()


def test_an_internal_error_is_one_line_with_its_own_code(tmp_path, monkeypatch, capsys):
    from ovtasks.cli import main as cli

    def broken(args, settings):
        raise ZeroDivisionError("a bug")

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), broken))
    assert cli.main(["config"]) == cli.EXIT_INTERNAL
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "ovtasks config: internal error: ZeroDivisionError: a bug (set OVTASKS_TRACEBACK=1 for the traceback)"


def _with_func(parser, func):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            action.choices["config"].set_defaults(func=func)
    return parser
