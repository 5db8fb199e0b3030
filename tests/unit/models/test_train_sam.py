"""``ovtasks train-sam``: SAM pretraining on SA-1B-format masks, saved as a plain transformers SamModel."""

import json

import pytest
import torch

from ovtasks.core.config import load_settings
from ovtasks.data.sa1b import write_synthetic
from ovtasks.models.semantic_sam import SemanticSam, build, sam_config
from ovtasks.train.sam import META_FILE, SamTrainConfig, train_sam


@pytest.fixture(scope="module")
def sa1b_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sa1b")
    write_synthetic(str(d), load_settings(env={}), images=24, seed=5, image_size=96, per_tar=10)
    return str(d)


def test_prompts_of_several_images_decode_as_each_image_alone():
    from transformers import SamModel

    torch.manual_seed(0)
    m = SemanticSam(SamModel(sam_config(64, 32, 8)), 8).eval()
    emb = m.embed(torch.randn(2, 3, 64, 64))
    b0 = torch.tensor([[4.0, 4, 30, 30], [10, 20, 50, 60]])
    b1 = torch.tensor([[0.0, 0, 20, 40]])
    with torch.no_grad():
        alone = torch.cat([m.decode(emb[:1], b0, extra=False).masks, m.decode(emb[1:], b1, extra=False).masks])
        together = m.decode(emb[torch.tensor([0, 0, 1])], torch.cat([b0, b1]), extra=False).masks
        with pytest.raises(ValueError, match="one per box"):
            m.decode(emb, torch.cat([b0, b1]), extra=False)
    assert torch.allclose(alone, together, atol=1e-5)


def test_train_sam_writes_a_sam_model_that_semantic_sam_starts_from(sa1b_dir, tmp_path):
    from transformers import SamModel

    s = load_settings(env={})
    cfg = SamTrainConfig(steps=4, batch_size=3, image_size=64, hidden=32, patch_size=8, holdout=4, warmup=2)
    res = train_sam(sa1b_dir, str(tmp_path / "sam"), s, cfg, command="ovtasks train-sam --steps 4")
    out = tmp_path / "sam"
    meta = json.loads((out / META_FILE).read_text())
    assert meta["command"] == "ovtasks train-sam --steps 4" and meta["config"]["hidden"] == 32
    m = res.metrics
    assert m["steps"] == 4 and m["train_images"] == 20 and m["heldout_images"] == 4 and m["heldout_prompts"] > 0
    assert 0.0 <= m["heldout_iou50"] <= 1.0 and 0.0 <= m["heldout_miou"] <= 1.0
    assert (out / "MODEL_COMPLETE").exists() and len(json.loads((out / "history.json").read_text())) >= 1
    sam = SamModel.from_pretrained(str(out))
    assert sam.config.vision_config.image_size == 64 and sam.config.vision_config.hidden_size == 32
    ssam = build(16, str(out))  # Semantic-SAM built on it keeps its weights and preprocessing
    w = ssam.sam.mask_decoder.iou_token.weight
    assert torch.equal(w, sam.mask_decoder.iou_token.weight) and ssam.mean == (0.485, 0.456, 0.406)


def test_train_sam_time_budget_and_bad_input(sa1b_dir, tmp_path):
    s = load_settings(env={})
    cfg = SamTrainConfig(steps=1000, batch_size=2, image_size=64, hidden=32, patch_size=8, holdout=4, max_seconds=0.0)
    assert train_sam(sa1b_dir, str(tmp_path / "cut"), s, cfg).metrics["steps"] == 0
    with pytest.raises(ValueError, match="need more than the 64 held out"):
        train_sam(sa1b_dir, str(tmp_path / "few"), s, SamTrainConfig(steps=1, holdout=64))
    with pytest.raises(ValueError, match="unknown pixel loss"):
        train_sam(sa1b_dir, str(tmp_path / "bad"), s, SamTrainConfig(steps=1, pixel_loss="l2"))


def test_a_scheduled_semantic_sam_retrain_starts_from_the_configured_sam(sa1b_dir, clean_small, labelled, tmp_path):
    from ovtasks.models.semantic_sam import load
    from ovtasks.orchestration.tasks import train_model

    s = load_settings(env={})
    cfg = SamTrainConfig(steps=2, batch_size=2, image_size=64, hidden=32, patch_size=8, holdout=4)
    start = train_sam(sa1b_dir, str(tmp_path / "sam"), s, cfg).model_uri
    s = load_settings(env={"OVTASKS_PIPELINE__SEMANTIC_SAM_START": start})
    train_model("semantic-sam", clean_small, labelled, str(tmp_path / "ssam"), s, "maskfree", 2, sa1b_uri=sa1b_dir)
    vc = load(tmp_path / "ssam").sam.config.vision_config
    assert (vc.image_size, vc.hidden_size) == (64, 32)  # the tiny random default is 128 px, hidden 64


def test_box_mask_prompt_is_the_share_of_each_cell_the_box_covers():
    from ovtasks.models.semantic_sam import box_masks

    m = box_masks(torch.tensor([[0.0, 0, 64, 64], [12.0, 4, 20, 36]]), 16, 128)  # 8 input px per cell
    assert m.shape == (2, 1, 16, 16)
    assert m[0, 0, :8, :8].eq(1).all() and m[0, 0, 8:].eq(0).all() and m[0, 0, :, 8:].eq(0).all()
    assert m[1, 0].sum().item() == pytest.approx(8 * 32 / 64)  # its area in cells
    assert m[1, 0, 1, 1].item() == pytest.approx(0.5) and m[1, 0, 0, 1].item() == pytest.approx(0.25)


def test_the_high_resolution_path_starts_as_a_no_op():
    from transformers import SamModel

    from ovtasks.models.semantic_sam import HiResFeatures

    torch.manual_seed(0)
    sam = SamModel(sam_config(64, 32, 8))
    plain, hires = SemanticSam(sam, 8).eval(), SemanticSam(sam, 8, hires=HiResFeatures(32)).eval()
    x, boxes = torch.randn(1, 3, 64, 64), torch.tensor([[4.0, 4, 30, 30], [10, 20, 50, 60]])
    with torch.no_grad():
        f = hires.embed(x)
        assert f.s0.shape == (1, 4, 32, 32) and f.s1.shape == (1, 8, 16, 16)  # 4x and 2x the 8 x 8 grid
        # (extra=False: the two models' own semantic tokens differ, and they take part in the decoder's attention)
        assert torch.allclose(plain.decode(plain.embed(x), boxes, False).masks, hires.decode(f, boxes, False).masks, atol=1e-6)
        hires.hires.out0.bias.fill_(1.0)  # once trained, it changes the masks
        assert not torch.allclose(plain.decode(plain.embed(x), boxes, False).masks, hires.decode(hires.embed(x), boxes, False).masks)


def test_a_sam_trained_with_its_additions_brings_them_to_semantic_sam_and_the_box_segmenter(sa1b_dir, tmp_path):
    import numpy as np

    from ovtasks.models.sam import SamSegmenter
    from ovtasks.models.semantic_sam import HIRES_FILE, load, save

    s = load_settings(env={})
    cfg = SamTrainConfig(steps=3, batch_size=2, image_size=64, hidden=32, patch_size=8, holdout=4, hires=True, box_mask_prompt=True)
    out = train_sam(sa1b_dir, str(tmp_path / "sam"), s, cfg).model_uri
    assert (tmp_path / "sam" / HIRES_FILE).exists()
    ssam = build(16, out).eval()
    assert ssam.hires is not None and ssam.box_mask_prompt
    assert build(16, None, 64, 32, patch_size=8).hires is None  # the plain tiny default has neither
    seg = SamSegmenter.load(out, batch_size=2)
    assert seg.extras is not None and seg.extras.box_mask_prompt
    rng = np.random.default_rng(0)
    ims = [(rng.random((48, 64, 3)) * 255).astype(np.uint8), (rng.random((64, 40, 3)) * 255).astype(np.uint8)]
    boxes = [np.array([[2, 2, 30, 40], [10, 5, 60, 45]], np.float32), np.array([[5, 5, 35, 60]], np.float32)]
    together = seg.segment(ims, boxes)
    for im, bx, got in zip(ims, boxes, together):  # the batched path equals one image at a time, with the additions
        alone = seg._decode(seg.embed([im]), im.shape[:2], bx)
        np.testing.assert_allclose(alone.iou, got.iou, atol=1e-5)
        with torch.no_grad():  # and SemanticSam's decoder gives the same multimask IoUs
            d = ssam.decode(ssam.embed(ssam.pixels(im, "cpu")[None]), torch.from_numpy(bx * ssam.resized(*im.shape[:2])[2]), extra=False)
        np.testing.assert_allclose(d.iou[:, 1:].max(1).values.numpy(), got.iou, atol=1e-5)
    save(ssam, tmp_path / "ssam")  # a Semantic-SAM keeps them through save / load
    back = load(tmp_path / "ssam")
    assert back.hires is not None and back.box_mask_prompt
    x = ssam.pixels(ims[0], "cpu")[None]
    with torch.no_grad():
        assert torch.allclose(ssam.decode(ssam.embed(x), torch.tensor([[2.0, 2, 50, 60]])).masks,
                              back.decode(back.embed(x), torch.tensor([[2.0, 2, 50, 60]])).masks, atol=1e-6)
