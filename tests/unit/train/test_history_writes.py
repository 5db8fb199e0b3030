"""A training history survives a full disk and a truncated one does not stop a resume (red-team round three, item 20)."""

import errno
import json
import logging

import pytest
import torch

from ovtasks.train.engine import checkpoint, resume


def _parts():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def test_a_full_disk_while_writing_the_history_leaves_the_previous_one(tmp_path, monkeypatch):
    ckpt, hist = tmp_path / "checkpoint-train.pt", tmp_path / "history-train.json"
    model, opt, sched = _parts()
    checkpoint(ckpt, hist, model, opt, sched, 2, "k", "d", [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.9}])

    def full(fd):  # the disk fills while the new history is flushed
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("ovtasks.train.engine.os.fsync", full)
    with pytest.raises(OSError, match="No space"):
        checkpoint(ckpt, hist, model, opt, sched, 3, "k", "d", [{"step": s, "loss": 1.0} for s in range(3)])
    monkeypatch.undo()
    assert json.loads(hist.read_text()) == [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.9}]
    start, history = resume(ckpt, hist, *_parts(), "k", "d", "cpu")
    assert start == 2 and [h["step"] for h in history] == [0, 1]


@pytest.mark.parametrize("text", ['[{"step": 0, "loss": 1.0}, {"st', "", '{"step": 0}', '[{"loss": 1}]', "\xff\xfe"])
def test_an_unreadable_history_is_ignored_with_a_warning(tmp_path, caplog, text):
    ckpt, hist = tmp_path / "checkpoint-train.pt", tmp_path / "history-train.json"
    model, opt, sched = _parts()
    checkpoint(ckpt, hist, model, opt, sched, 2, "k", "d", [{"step": 0, "loss": 1.0}])
    hist.write_text(text, errors="surrogateescape") if text != "\xff\xfe" else hist.write_bytes(b"\xff\xfe\x00")
    with caplog.at_level(logging.WARNING):
        start, history = resume(ckpt, hist, *_parts(), "k", "d", "cpu")
    assert start == 2 and history == []
    assert any("history ignored" in r.getMessage() for r in caplog.records)
