"""Model and checkpoint loading never unpickles arbitrary objects: a pickle whose __reduce__ would run code
(here: create a marker directory) is refused by every loader, and the code never runs."""

import os

import pytest
import torch


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _evil(path, marker, wrap=lambda p: p):
    torch.save(wrap(Payload(marker)), path)
    return path


def test_training_checkpoint_refuses_a_malicious_pickle(tmp_path, record_fault):
    from ovtasks.train.engine import resume

    marker = tmp_path / "pwned-checkpoint"
    ckpt = _evil(tmp_path / "checkpoint-train.pt", marker, lambda p: {"model": p, "config": "k", "data": "d", "step": 5})
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|unsupported"):
        resume(ckpt, tmp_path / "history.json", None, None, None, "k", "d", "cpu")
    assert not marker.exists(), "the pickle's code ran"
    record_fault("malicious pickle as a training checkpoint", "torch.save of an object whose __reduce__ calls os.makedirs",
                 "resume() refused it (torch.load weights_only=True raised); the payload never ran", 0)


def test_wspn_loader_refuses_a_malicious_pickle(tmp_path, record_fault):
    from ovtasks.models.wspn import load_wspn

    marker = tmp_path / "pwned-wspn"
    path = _evil(tmp_path / "wspn.pt", marker, lambda p: {"config": {}, "state_dict": {}, "extra": p})
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|unsupported"):
        load_wspn(path)
    assert not marker.exists(), "the pickle's code ran"
    record_fault("malicious pickle as a WSPN model", "a .pt file carrying a code-running object in 'extra'",
                 "load_wspn refused it (weights_only=True); the payload never ran", 0)


def test_hf_model_directories_load_safetensors_only(tmp_path, record_fault):
    """A model directory whose weights are a pickle (pytorch_model.bin) is refused, not unpickled."""
    from ovtasks.models.sam import SamSegmenter, save_tiny

    good = save_tiny(tmp_path / "sam")
    assert SamSegmenter.load(good).model is not None  # the safetensors layout loads
    bad = tmp_path / "sam-pickled"
    bad.mkdir()
    for name in os.listdir(good):
        if not name.endswith(".safetensors"):
            (bad / name).write_bytes((tmp_path / "sam" / name).read_bytes())
    marker = tmp_path / "pwned-hf"
    _evil(bad / "pytorch_model.bin", marker)
    with pytest.raises(Exception, match="(?i)safetensors|no file named|does not appear to have"):
        SamSegmenter.load(str(bad))
    assert not marker.exists(), "the pickle's code ran"
    record_fault("model directory with pickled weights", "pytorch_model.bin with a code-running object instead of model.safetensors",
                 "from_pretrained(use_safetensors=True) refused the directory; the payload never ran", 0)
