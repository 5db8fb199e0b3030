"""Worker death during training: `ovtasks train` is SIGKILLed at a random moment after a checkpoint; the
retried command resumes from that checkpoint and ends with the weights of an uninterrupted run."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

OVTASKS = str(Path(sys.executable).parent / "ovtasks")


def _cmd(clean, pseudo, out):
    return [OVTASKS, "train", "--src", clean, "--pseudo", pseudo, "--out", str(out), "--steps", "10", "--batch-size", "2",
            "--checkpoint-every", "2", "--min-size", "128", "--max-size", "160"]


def _weights(model_dir):
    from safetensors.numpy import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def test_killed_training_resumes_from_its_checkpoint(clean_small, labelled, tmp_path, record_fault):
    env = {**os.environ, "OVTASKS_DATA_DIR": str(tmp_path / "data"), "OVTASKS_LOG_FORMAT": "json"}
    full = subprocess.run(_cmd(clean_small, labelled, tmp_path / "full"), env=env, capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(clean_small, labelled, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpt = out / "checkpoint-train.pt"
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), "no checkpoint was written before the run ended"
    # a random point after the first checkpoint, inside the training time the uninterrupted run measured after
    # it (a fixed bound was longer than the whole run on an idle machine: the kill then came after the model)
    steps = json.loads((tmp_path / "full" / "history.json").read_text())
    span = steps[-1]["seconds"] - steps[1]["seconds"]
    delay = random.Random(os.getpid()).uniform(0.0, 0.7 * span)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "model.safetensors").exists()

    again = subprocess.run(_cmd(clean_small, labelled, out), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = [json.loads(line) for line in again.stderr.splitlines() if line.startswith("{") and '"resumed training"' in line]
    assert resumed and resumed[0]["step"] >= 2, "the retry did not resume from the checkpoint"
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == list(range(10))
    a, b = _weights(tmp_path / "full"), _weights(out)
    assert a.keys() == b.keys()
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst < 1e-5, f"resumed weights differ from the uninterrupted run by {worst}"
    record_fault("training worker SIGKILLed", f"`ovtasks train` (10 steps, checkpoint every 2) killed {delay:.2f} s after its first checkpoint",
                 f"the retry resumed at step {resumed[0]['step']}; history 0..9 without gaps or repeats; "
                 f"final weights equal the uninterrupted run's (max |diff| {worst:.1e})", 0)
