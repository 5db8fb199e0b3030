"""``ovtasks pretrain-backbone``: the OV Mask R-CNN's body learns caption names, is saved, and starts a detector."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ovtasks.core.config import load_settings
from ovtasks.models.ov_maskrcnn import build
from ovtasks.train.backbone import BackboneConfig, _average_precision, load_backbone, pretrain_backbone
from ovtasks.train.ov_maskrcnn import TrainConfig, train_ov_maskrcnn

CFG = BackboneConfig(steps=40, batch_size=8, image_size=64, holdout=4, max_images=20, warmup=5, lr=3e-3)


@pytest.fixture(scope="module")
def pretrained(clean_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("backbone") / "bb"
    return pretrain_backbone(clean_small, str(out), load_settings(env={}), CFG, command="ovtasks pretrain-backbone --test")


def test_pretraining_fits_the_caption_names_and_saves_the_body(pretrained):
    hist = pretrained.history
    assert hist[0]["step"] == 0 and hist[-1]["step"] == CFG.steps - 1
    assert hist[-1]["loss"] < 0.8 * hist[0]["loss"]  # 16 training images, batch 8: it must fit them
    m = pretrained.metrics
    assert m["train_images"] == 16 and m["holdout_images"] == 4 and 0.0 <= m["holdout_top1"] <= 1.0
    meta = json.loads(open(f"{pretrained.model_uri}/ovtasks_backbone.json").read())
    assert meta["architecture"] == "small" and meta["command"] == "ovtasks pretrain-backbone --test"
    assert meta["config"]["steps"] == CFG.steps and "ball" in meta["vocabulary"]
    weights = load_file(f"{pretrained.model_uri}/backbone.safetensors")
    assert set(weights) == set(build(8).backbone.body.state_dict())


def test_load_backbone_sets_the_body_only_and_refuses_what_does_not_fit(pretrained, tmp_path):
    torch.manual_seed(0)
    model = build(8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_backbone(model, pretrained.model_uri)
    saved = load_file(f"{pretrained.model_uri}/backbone.safetensors")
    after = model.state_dict()
    for k, v in saved.items():
        assert torch.equal(after[f"backbone.body.{k}"], v), k
    assert all(torch.equal(after[k], v) for k, v in before.items() if not k.startswith("backbone.body."))
    assert any(not torch.equal(after[f"backbone.body.{k}"], before[f"backbone.body.{k}"]) for k in saved)

    with pytest.raises(FileNotFoundError, match="pretrain-backbone"):
        load_backbone(model, str(tmp_path))
    other = tmp_path / "other"
    other.mkdir()
    (other / "backbone.safetensors").write_bytes(open(f"{pretrained.model_uri}/backbone.safetensors", "rb").read())
    (other / "ovtasks_backbone.json").write_text(json.dumps({"architecture": "resnet50_fpn"}))
    with pytest.raises(ValueError, match="resnet50_fpn"):
        load_backbone(model, str(other))


def test_the_detector_starts_from_it_and_records_it(pretrained, clean_small, labelled, tmp_path):
    s = load_settings(env={"OVTASKS_DATA_DIR": str(tmp_path / "data")})
    cfg = TrainConfig(steps=2, batch_size=2, min_size=128, max_size=160, backbone_init=pretrained.model_uri, backbone_lr_scale=0.0)
    trained = train_ov_maskrcnn(clean_small, labelled, str(tmp_path / "m"), s, cfg)
    got = load_file(f"{trained.model_dir}/model.safetensors")
    saved = load_file(f"{pretrained.model_uri}/backbone.safetensors")
    convs = [k for k in saved if k.endswith(".weight") and saved[k].dim() == 4]
    # the body's learning rate scaled to 0: after training it is still the pretrained one
    assert all(torch.equal(got[f"backbone.body.{k}"], saved[k]) for k in convs)
    assert trained.data_manifest["backbone_init"]["uri"] == pretrained.model_uri
    assert trained.data_manifest["backbone_init"]["metrics"]["steps"] == CFG.steps


def test_image_level_average_precision():
    assert _average_precision([0.9, 0.8, 0.1], [1, 0, 1]) == pytest.approx((1 + 2 / 3) / 2)
    assert _average_precision([0.9, 0.8], [0, 0]) != _average_precision([0.9, 0.8], [0, 0])  # nan without positives
