"""``ovtasks pretrain-backbone``: the OV Mask R-CNN's body learns caption names, is saved, and starts a detector."""

import json

import numpy as np
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


def test_pretraining_continues_from_an_earlier_backbone(pretrained, clean_small, tmp_path):
    """``--init``: the body and heads start where the earlier run ended (zero steps leave them bit for bit), and the
    JSON records what it continued from."""
    from dataclasses import replace

    again = pretrain_backbone(clean_small, str(tmp_path / "zero"), load_settings(env={}), replace(CFG, steps=0, init=pretrained.model_uri))
    for f in ("backbone.safetensors", "heads.safetensors"):
        a, b = load_file(f"{pretrained.model_uri}/{f}"), load_file(f"{again.model_uri}/{f}")
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert again.metrics["holdout_top1"] == pretrained.metrics["holdout_top1"]
    more = pretrain_backbone(clean_small, str(tmp_path / "more"), load_settings(env={}), replace(CFG, steps=10, init=pretrained.model_uri))
    meta = json.loads(open(f"{more.model_uri}/ovtasks_backbone.json").read())
    assert meta["init_from"]["ref"] == pretrained.model_uri and meta["init_from"]["command"] == "ovtasks pretrain-backbone --test"
    assert meta["init_from"]["metrics"] == pretrained.metrics and meta["config"]["init"] == pretrained.model_uri
    assert more.history[0]["loss"] < pretrained.history[0]["loss"]  # it did not start from scratch


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


def test_the_name_heads_are_saved_and_give_class_activation_maps(pretrained, clean_small, tmp_path):
    from ovtasks.data.clean import iter_clean
    from ovtasks.models.name_cam import NameCam
    from ovtasks.train.backbone import body_logits, normalise

    heads = load_file(f"{pretrained.model_uri}/heads.safetensors")
    assert {k.split(".")[0] for k in heads} == {"1", "2", "3"}
    cam = NameCam.load(pretrained.model_uri)
    assert cam.image_size == CFG.image_size and cam.knows("ball") and not cam.knows("zebra")
    samples = list(iter_clean(clean_small, load_settings(env={}), 3))
    pix = _pixels([s.image for s in samples], CFG.image_size)
    maps, probs = cam.name_maps(pix, ["ball", "ring", "star"])
    assert maps.shape == (3, CFG.image_size // 8, CFG.image_size // 8)
    # the probability is the pretraining's own prediction (levels' logits summed, softmax over the vocabulary)
    with torch.no_grad():
        want = body_logits(cam.body, cam.heads, normalise(pix)).softmax(1)
    rows = [cam.vocabulary.index(n) for n in ("ball", "ring", "star")]
    torch.testing.assert_close(probs, want[torch.arange(3), rows])
    # a different name gives a different map of the same image
    assert not torch.allclose(cam.name_maps(pix[:1], ["ring"])[0], maps[:1])
    with pytest.raises(KeyError, match="zebra"):
        cam.name_maps(pix[:1], ["zebra"])
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("backbone.safetensors", "ovtasks_backbone.json"):
        (bare / f).write_bytes(open(f"{pretrained.model_uri}/{f}", "rb").read())
    with pytest.raises(FileNotFoundError, match="heads"):
        NameCam.load(str(bare))


def test_maskfree_activation_backbone_option(pretrained, clean_small, tiny_itm_dir):
    """``maskfree.activation=backbone``: known names get the backbone's map (its score), others keep the ITM's;
    the option off changes nothing; a missing backbone_model is a clear error."""
    from ovtasks.data.clean import iter_clean
    from ovtasks.models.name_cam import NameCam
    from ovtasks.pseudolabel.maskfree.activation import activation_maps
    from ovtasks.pseudolabel.maskfree.generator import load_maskfree

    env = {"OVTASKS_MASKFREE__ITM_MODEL": tiny_itm_dir, "OVTASKS_MASKFREE__PROPOSALS": "selective_search"}
    on = load_settings(env={**env, "OVTASKS_MASKFREE__ACTIVATION": "backbone",
                            "OVTASKS_MASKFREE__BACKBONE_MODEL": pretrained.model_uri})
    models = load_maskfree(on)
    assert models.versions["backbone"]["ref"] == pretrained.model_uri and isinstance(models.name_cam, NameCam)
    assert load_maskfree(load_settings(env=env)).name_cam is None
    with pytest.raises(ValueError, match="backbone_model"):
        load_maskfree(load_settings(env={**env, "OVTASKS_MASKFREE__ACTIVATION": "backbone"}))

    images = [s.image for s in iter_clean(clean_small, on, 3)]
    names = ["ball", "ring", "ball"]
    itm_only = activation_maps(models.itm, images, names, "a photo of a {name}", rounds=2)
    cam = models.name_cam
    partial = NameCam(cam.body, cam.heads, ["-" if n == "ring" else n for n in cam.vocabulary], cam.image_size)
    mixed = activation_maps(models.itm, images, names, "a photo of a {name}", rounds=2, name_cam=partial)
    pix = _pixels(images[::2], cam.image_size)  # activation_maps resizes as this does
    want = cam.name_maps(pix, ["ball", "ball"])[1]
    assert [m.score for m in mixed[::2]] == pytest.approx(want.tolist(), rel=1e-5)
    assert mixed[1].score == pytest.approx(itm_only[1].score, rel=1e-5)  # alone in its batch: float sums differ slightly
    np.testing.assert_allclose(mixed[1].soft, itm_only[1].soft, atol=1e-5)
    assert all(m.binary.any() and m.binary.shape == im.shape[:2] for m, im in zip(mixed, images))
    assert not np.array_equal(mixed[0].soft, itm_only[0].soft)


def _pixels(images, size):
    return torch.stack([torch.nn.functional.interpolate(torch.from_numpy(im).permute(2, 0, 1)[None].float(), size=(size, size),
                                                        mode="bilinear", align_corners=False, antialias=True)[0] for im in images])


def test_box_rerank_backbone_names_each_crop(pretrained, clean_small, tiny_itm_dir):
    """``maskfree.box_rerank=backbone``: one probability per box (NaN for a name the backbone does not know), the
    backbone's own prediction on the grown crop; end to end it only changes which box is chosen."""
    from ovtasks.data.clean import iter_clean
    from ovtasks.pseudolabel.candidates import Vocabulary, build_extractor
    from ovtasks.pseudolabel.maskfree.generator import label_images, load_maskfree
    from ovtasks.train.backbone import body_logits, normalise

    env = {"OVTASKS_MASKFREE__ITM_MODEL": tiny_itm_dir, "OVTASKS_MASKFREE__PROPOSALS": "selective_search",
           "OVTASKS_MASKFREE__WSS_ITERATIONS": "5", "OVTASKS_MASKFREE__MASKING_ROUNDS": "2"}
    on = load_settings(env={**env, "OVTASKS_MASKFREE__BOX_RERANK": "backbone", "OVTASKS_MASKFREE__BOX_RERANK_WEIGHT": "50",
                            "OVTASKS_MASKFREE__BOX_CROP_CONTEXT": "1.0", "OVTASKS_MASKFREE__BACKBONE_MODEL": pretrained.model_uri})
    models = load_maskfree(on)
    samples = list(iter_clean(clean_small, on, 6))
    img = samples[0].image
    boxes = np.array([[30, 30, 50, 50], [0, 0, 20, 20], [5, 5, 6, 6]], np.float32)
    got = models.name_cam.crop_probs([(img, boxes, "ball"), (img, boxes[:1], "zebra")], context=1.0)
    assert [len(x) for x in got] == [3, 1] and ((got[0] >= 0) & (got[0] <= 1)).all() and np.isnan(got[1]).all()
    crop = _pixels([img[10:70, 10:70]], models.name_cam.image_size)  # [30, 50] grown by its side on every side
    with torch.no_grad():
        want = body_logits(models.name_cam.body, models.name_cam.heads, normalise(crop)).softmax(1)[0]
    assert got[0][0] == pytest.approx(float(want[models.name_cam.index["ball"]]), rel=1e-5)

    cands = build_extractor(on, Vocabulary.load(None)).extract([s.caption for s in samples])
    off = label_images(samples, cands, load_maskfree(load_settings(env=env)), load_settings(env=env))
    res = label_images(samples, cands, models, on)
    assert [p.reason for p in res] == [p.reason for p in off]
    assert [p.score for p in res] == pytest.approx([p.score for p in off])  # the ITM's map and score are kept
    assert any(p.box is not None for p in res)


def test_box_rerank_namer_and_the_sam_mask_stage(pretrained, clean_small, tiny_itm_dir, tiny_grounded):
    """``box_rerank=namer``: each candidate box's opinion is the namer's probability of the name with SAM's mask of the
    box (what Semantic-SAM's namer gives a prompt); ``mask_stage=sam``: the pseudo box's mask is SAM's. Both need
    grounded.sam_model."""
    from ovtasks.data.clean import iter_clean
    from ovtasks.data.groundtruth import decode_rle
    from ovtasks.models.sam import SamSegmenter
    from ovtasks.pseudolabel.candidates import Vocabulary, build_extractor
    from ovtasks.pseudolabel.maskfree.generator import _second_opinions, label_images, load_maskfree

    env = {"OVTASKS_MASKFREE__ITM_MODEL": tiny_itm_dir, "OVTASKS_MASKFREE__PROPOSALS": "selective_search",
           "OVTASKS_MASKFREE__WSS_ITERATIONS": "5", "OVTASKS_MASKFREE__MASKING_ROUNDS": "2",
           "OVTASKS_MASKFREE__BACKBONE_MODEL": pretrained.model_uri, "OVTASKS_MASKFREE__BOX_CROP_CONTEXT": "1.0"}
    with pytest.raises(ValueError, match="grounded.sam_model"):
        load_maskfree(load_settings(env={**env, "OVTASKS_MASKFREE__MASK_STAGE": "sam"}))
    env["OVTASKS_GROUNDED__SAM_MODEL"] = tiny_grounded[1]
    on = load_settings(env={**env, "OVTASKS_MASKFREE__BOX_RERANK": "namer", "OVTASKS_MASKFREE__MASK_STAGE": "sam"})
    models = load_maskfree(on)
    assert models.versions["sam"]["mask_stage"] == "sam" and models.versions["backbone"]["box_rerank"] == "namer"
    samples = list(iter_clean(clean_small, on, 6))
    sam = SamSegmenter.load(tiny_grounded[1])
    img, boxes = samples[0].image, np.array([[30, 30, 50, 50], [0, 0, 20, 20]], np.float32)
    masks = np.stack([decode_rle(r).astype(bool) for r in sam.segment([img], [boxes])[0].rles])

    class Pair:  # what _second_opinions reads of a PairResult
        image_index, candidate = 0, type("C", (), {"name": "ball"})()

    [got] = _second_opinions([(Pair(), np.array([0, 1]))], samples, {0: boxes}, None, {}, models, on.maskfree)
    want = models.name_cam.box_name_probs(img, boxes, 1.0, masks)[:, models.name_cam.index["ball"]]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    cands = build_extractor(on, Vocabulary.load(None)).extract([s.caption for s in samples])
    res = label_images(samples, cands, models, on)
    off = label_images(samples, cands, load_maskfree(load_settings(env=env)), load_settings(env=env))
    assert [p.reason for p in res] == [p.reason for p in off] and any(p.mask is not None for p in res)
    for p in res:
        if p.mask is not None:  # SAM's mask of the chosen box, not WSS's
            [rle] = sam.segment([samples[p.image_index].image], [p.box[None]])[0].rles
            assert (p.mask == decode_rle(rle).astype(bool)).all()


class _OneHotNamer:
    """A namer sure that every box holds ``name``; it knows only ``vocabulary``."""

    def __init__(self, vocabulary, name):
        self.vocabulary, self.index = list(vocabulary), {n: i for i, n in enumerate(vocabulary)}
        self.name = name

    def knows(self, n):
        return n in self.index

    def box_name_probs(self, image, boxes, context=1.0, masks=None):
        self.masks = masks
        p = np.full((len(boxes), len(self.vocabulary)), 1e-6, np.float32)
        p[:, self.index[self.name]] = 1.0
        return p


def test_namer_prior_and_semantic_sam_naming_with_it():
    from ovtasks.models.semantic_sam import build, namer_prior, predict

    img = (np.random.default_rng(1).random((80, 100, 3)) * 255).astype(np.uint8)
    boxes = np.array([[10, 10, 50, 40], [0, 0, 20, 20]], np.float32)
    namer = _OneHotNamer(["ball", "ring", "star"], "ring")
    prior = namer_prior(namer, img, boxes, ["ball", "ring", "zebra", "cube"])
    # two of four names known: they share half the mass (nearly all on ring); the unknown ones get 1/4 each
    np.testing.assert_allclose(prior.sum(1), 1.0, rtol=1e-5)
    assert prior[:, 1] == pytest.approx([0.5, 0.5], rel=1e-4) and prior[:, 2:].tolist() == [[0.25, 0.25]] * 2
    assert namer_prior(namer, img, boxes, ["zebra", "cube"]).tolist() == [[0.5, 0.5]] * 2  # knows none: no opinion

    torch.manual_seed(0)
    model = build(384).eval()
    text = np.random.default_rng(0).normal(size=(3, 384))
    named, plain = {}, {}
    predict(model, [img], [1], [boxes], [7, 8, 9], text, names=plain)
    model.namer = namer
    predict(model, [img], [1], [boxes], [7, 8, 9], text, names=named, category_names=["ball", "ring", "star"])
    assert set(named.values()) == {8}  # the namer's certainty outweighs the untrained tokens
    assert namer.masks.shape == (2, 80, 100) and namer.masks.dtype == bool  # it was shown each prompt's mask
    other = {}
    predict(model, [img], [1], [boxes], [7, 8, 9], text, names=other)  # without category names: the tokens alone
    assert other == plain
    model.token_weight = 0.0  # the tokens without a say: the namer's probabilities are the scores' names
    scored = predict(model, [img], [1], [boxes], [7, 8, 9], text, category_names=["ball", "ring", "star"])
    assert scored and all(p["category_id"] == 8 for p in scored)


def test_semantic_sam_carries_its_namer(pretrained, clean_small, labelled, tmp_path):
    from ovtasks.models.loading import load_model
    from ovtasks.train.semantic_sam import SemanticSamConfig, train_semantic_sam

    s = load_settings(env={})
    trained = train_semantic_sam(clean_small, labelled, None, str(tmp_path / "ssam"), s,
                                 SemanticSamConfig(steps=2, batch_size=2, max_prompts=2, namer=pretrained.model_uri))
    assert trained.metrics["namer"]["ref"] == pretrained.model_uri
    model, _ = load_model(trained.model_dir)
    assert model.namer is not None and model.namer.knows("ball") and model.token_weight == 0.5
    img = (np.random.default_rng(2).random((96, 128, 3)) * 255).astype(np.uint8)
    boxes = np.array([[10, 10, 60, 50]], np.float32)
    from ovtasks.models.name_cam import NameCam

    want = NameCam.load(pretrained.model_uri).box_name_probs(img, boxes)
    np.testing.assert_allclose(model.namer.box_name_probs(img, boxes), want, rtol=1e-5)
    # with masks, the masked crop's prediction joins in; a row with an empty mask keeps the box's answer
    two = np.array([[10, 10, 60, 50], [20, 30, 90, 80]], np.float32)
    masks = np.zeros((2, 96, 128), bool)
    masks[0, 20:40, 15:50] = True
    plain, masked = model.namer.box_name_probs(img, two), model.namer.box_name_probs(img, two, masks=masks)
    np.testing.assert_allclose(masked[1], plain[1], rtol=1e-6)
    np.testing.assert_allclose(masked.sum(1), 1.0, rtol=1e-5)
    alone = model.namer.crop_logits(img, two[:1], 1.5, masks=masks[:1]).softmax(1).numpy()
    np.testing.assert_allclose(masked[0], 0.5 * (plain[0] + alone[0]), rtol=1e-5)
    assert want.shape == (1, len(model.namer.vocabulary)) and want.sum() == pytest.approx(1.0, rel=1e-5)
    without, _ = load_model(train_semantic_sam(clean_small, labelled, None, str(tmp_path / "plain"), s,
                                               SemanticSamConfig(steps=1, batch_size=2, max_prompts=2)).model_dir)
    assert without.namer is None
