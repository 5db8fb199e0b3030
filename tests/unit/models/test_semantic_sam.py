"""Semantic-SAM: the decoder with 5 extra tokens, its losses, SA-1B-format data, 1:4 training, resume, evaluation."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from ovtasks.core.config import load_settings
from ovtasks.models.semantic_sam import NUM_MASKS, build, contrastive_losses, dice_loss, focal_loss, mask_losses
from ovtasks.data.sa1b import iter_sa1b, write_synthetic


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build(384).eval()


def _emb(model, h=96, w=128):
    img = (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)
    return model.embed(model.pixels(img, "cpu")[None])


def test_decoder_without_extra_tokens_is_sams_own(tiny):
    emb = _emb(tiny)
    boxes = torch.tensor([[10.0, 10, 60, 50], [30, 20, 120, 90]])
    ours = tiny.decode(emb, boxes, extra=False)
    sparse, dense = tiny.sam.prompt_encoder(input_points=None, input_labels=None, input_boxes=boxes[None], input_masks=None)
    pos = tiny.sam.get_image_wide_positional_embeddings()
    for multi, sl in ((True, slice(1, None)), (False, slice(0, 1))):
        masks, iou = tiny.sam.mask_decoder(image_embeddings=emb.emb, image_positional_embeddings=pos, sparse_prompt_embeddings=sparse,
                                           dense_prompt_embeddings=dense, multimask_output=multi)[:2]
        assert torch.allclose(masks[0], ours.masks[:, sl], atol=1e-5) and torch.allclose(iou[0], ours.iou[:, sl], atol=1e-5)


def test_extra_tokens_give_semantic_vectors_and_scores(tiny):
    d = tiny.decode(_emb(tiny), torch.tensor([[10.0, 10, 60, 50], [0, 0, 4, 4], [5, 5, 127, 95]]))
    assert d.masks.shape[:2] == (3, NUM_MASKS) and d.iou.shape == (3, NUM_MASKS) and d.score.shape == (3, NUM_MASKS)
    assert d.semantic.shape == (3, NUM_MASKS, 384) and torch.allclose(d.semantic.norm(dim=-1), torch.ones(3, NUM_MASKS), atol=1e-5)
    n_extra = sum(p.numel() for p in (tiny.semantic_tokens.weight, tiny.score_token.weight))
    assert tiny.semantic_tokens.weight.shape[0] + tiny.score_token.weight.shape[0] == 5 and n_extra == 5 * 32


def test_losses_reward_the_right_answer():
    target = torch.zeros(2, 16, 16)
    target[:, 4:12, 4:12] = 1
    good, bad = (target * 20 - 10), -(target * 20 - 10)
    assert focal_loss(good, target).max() < 1e-3 < focal_loss(bad, target).min()
    assert dice_loss(good, target).max() < 0.05 and dice_loss(bad, target).min() > 0.9

    from ovtasks.models.semantic_sam import Decoded

    # the multimask minimum: one right multimask output is enough
    masks = torch.stack([good, bad, good, bad], dim=1)
    loss = mask_losses(Decoded(masks, torch.ones(2, 4), None, None), target)
    worse = mask_losses(Decoded(torch.stack([good, bad, bad, bad], dim=1), torch.ones(2, 4), None, None), target)
    assert loss["loss_dice"] < worse["loss_dice"] and loss["loss_focal"] < worse["loss_focal"]
    # the IoU head is pushed to the IoU the masks really have: 1 for the good ones, 0 for the bad ones
    exact = mask_losses(Decoded(masks, torch.tensor([[1.0, 0, 1, 0]] * 2), None, None), target)
    assert exact["loss_iou"] < 1e-6 < loss["loss_iou"]
    # the BCE option (the demo's tiny SAM): same minimum over the multimask outputs, its own loss name
    bce = mask_losses(Decoded(masks, torch.ones(2, 4), None, None), target, pixel_loss="bce")
    bce_worse = mask_losses(Decoded(torch.stack([good, bad, bad, bad], dim=1), torch.ones(2, 4), None, None), target, pixel_loss="bce")
    assert set(bce) == {"loss_bce", "loss_dice", "loss_iou"} and bce["loss_bce"] < bce_worse["loss_bce"]
    with pytest.raises(ValueError, match="unknown pixel loss"):
        mask_losses(Decoded(masks, torch.ones(2, 4), None, None), target, pixel_loss="l2")

    text = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    labels = torch.tensor([0, 3, 3, 1])
    aligned = text[labels][:, None, :].expand(4, NUM_MASKS, 8)
    wrong = text[torch.tensor([3, 0, 0, 3])][:, None, :].expand(4, NUM_MASKS, 8)
    s = torch.tensor(20.0)
    a = contrastive_losses(aligned, torch.ones(4, NUM_MASKS), labels, text, s)
    w = contrastive_losses(wrong, torch.ones(4, NUM_MASKS), labels, text, s)
    assert a["loss_contrastive"] < w["loss_contrastive"] and a["loss_score"] < 1e-6


def test_sa1b_format_roundtrip_and_bad_pairs_skipped(tmp_path):
    s = load_settings(env={})
    info = write_synthetic(str(tmp_path / "sa"), s, images=6, per_tar=4)
    assert info["tars"] == 2 and info["images"] == 6
    pairs = list(iter_sa1b(str(tmp_path / "sa"), s))
    assert len(pairs) == 6
    img, anns = pairs[0]
    a = anns[0]
    assert set(a) >= {"segmentation", "bbox", "area", "predicted_iou", "point_coords", "crop_box", "stability_score"}
    assert "category_id" not in a and tuple(a["segmentation"]["size"]) == img.shape[:2]
    # a tar with a corrupt image and a JSON without its image: both skipped with reasons, the rest kept
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("sa_90.jpg", b"not a jpeg"), ("sa_90.json", json.dumps({"image": {"file_name": "sa_90.jpg"}, "annotations": [a]}).encode()),
                           ("sa_91.json", json.dumps({"image": {"file_name": "sa_91.jpg"}, "annotations": [a]}).encode())):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    (tmp_path / "sa" / "sa_000009.tar").write_bytes(buf.getvalue())
    stats = {}
    assert len(list(iter_sa1b(str(tmp_path / "sa"), s, stats=stats))) == 6
    assert stats["skipped"] == {"UnidentifiedImageError": 1, "KeyError": 1}


def test_train_mixes_1_to_4_resumes_and_evaluates(clean_small, labelled, synth_small, tmp_path, monkeypatch):
    from ovtasks.models.loading import load_model
    from ovtasks.evaluate.models import evaluate_semantic_sam
    from ovtasks.train.semantic_sam import SemanticSamConfig, train_semantic_sam

    s = load_settings(env={})
    sa = str(tmp_path / "sa")
    write_synthetic(sa, s, images=8)
    cfg = SemanticSamConfig(steps=4, batch_size=5, max_prompts=3, checkpoint_every=2)

    seen = []
    import ovtasks.models.semantic_sam as ssm

    real_mask, real_con = ssm.mask_losses, ssm.contrastive_losses
    monkeypatch.setattr(ssm, "mask_losses", lambda d, t, **kw: seen.append(("sa1b", len(t))) or real_mask(d, t, **kw))
    monkeypatch.setattr(ssm, "contrastive_losses", lambda *a: seen.append(("gen", len(a[2]))) or real_con(*a))
    full = train_semantic_sam(clean_small, labelled, sa, str(tmp_path / "full"), s, cfg)
    assert len(full.history) == 4 and all(np.isfinite(h["loss"]) for h in full.history)
    assert {"loss_bce", "loss_dice", "loss_iou", "loss_contrastive", "loss_score"} <= set(full.history[0])
    # 1 SA-1B image (a mask_losses call) and one contrastive call over 4 generated images per step
    assert [k for k, _ in seen].count("sa1b") == 4 and [k for k, _ in seen].count("gen") == 4
    assert full.metrics["sa1b_images"] == 8 and (tmp_path / "full" / "loss_curve.png").exists()
    monkeypatch.undo()

    class Killed(Exception):
        pass

    def kill(rec):
        if rec["step"] >= 3:
            raise Killed

    with pytest.raises(Killed):
        train_semantic_sam(clean_small, labelled, sa, str(tmp_path / "resumed"), s, cfg, progress=kill)
    assert (tmp_path / "resumed" / "checkpoint-train.pt").exists()
    resumed = train_semantic_sam(clean_small, labelled, sa, str(tmp_path / "resumed"), s, cfg)
    assert [h["step"] for h in resumed.history] == [0, 1, 2, 3]
    a, meta = load_model(full.model_dir)
    b, _ = load_model(resumed.model_dir)
    assert meta["architecture"] == "semantic-sam" and not list((tmp_path / "resumed").glob("checkpoint*"))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-6), k

    ev = evaluate_semantic_sam(a, synth_small[0], clean_small, s, limit=6)
    assert ev["prompts"] == "gt-boxes" and ev["images"] == 6
    assert ("constrained", "novel") in {(r["setting"], r["split"]) for r in ev["rows"]}
    assert set(ev["name_accuracy"]) == {"all", "base", "novel"} and all(0 <= v <= 100 for v in ev["name_accuracy"].values())
    assert "names right for GT-box prompts" in ev["table"] and ev["gt"]["images"] and isinstance(ev["predictions"], list)


def test_predict_with_no_boxes_and_any_vocabulary(tiny):
    from ovtasks.models.semantic_sam import predict

    img = (np.random.default_rng(1).random((80, 100, 3)) * 255).astype(np.uint8)
    assert predict(tiny, [img], [1], [np.zeros((0, 4))], [7], np.ones((1, 384))) == []
    preds = predict(tiny, [img, img], [1, 2], [np.array([[0, 0, 100, 80]]), np.array([[10, 10, 50, 40], [0, 0, 20, 20]])],
                    [7, 9], np.random.default_rng(0).normal(size=(2, 384)))
    assert all(p["category_id"] in (7, 9) and 0 <= p["score"] <= 1 and p["segmentation"]["size"] == [80, 100] for p in preds)
    assert {(p["image_id"], p["prompt"]) for p in preds} <= {(1, 0), (2, 0), (2, 1)}
