import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ovtasks.pseudolabel.maskfree.activation import activation_maps, normalise
from ovtasks.models.itm import ItmModel, build_word_tokenizer, install_conv_stem, prompt_span, tiny_blip_config

WORDS = "a photo of ball box star ring heart".split()


def tiny_itm(tmp_path, conv_stem=False, layers=3, seed=0, stem_extra=2):
    from transformers import BlipForImageTextRetrieval

    torch.manual_seed(seed)
    tok = build_word_tokenizer(WORDS, tmp_path / "tok")
    model = BlipForImageTextRetrieval(tiny_blip_config(len(tok), image_size=32, patch_size=8, hidden=32,
                                                       vision_layers=1, text_layers=layers, heads=2, proj=16))
    if conv_stem:
        install_conv_stem(model, stem_extra)
    return ItmModel(model, tok, 32, [0.5] * 3, [0.25] * 3)


def _inputs(itm, names, b=None):
    prompts, spans = zip(*[prompt_span("a photo of a {name}", n) for n in names])
    ids, am, wm = itm.tokenize(prompts, spans)
    x = itm.preprocess(torch.rand(len(names), 3, 40, 40) * 255)
    return x, ids, am, wm


def test_shapes_logits_and_gradcam(tmp_path):
    itm = tiny_itm(tmp_path)
    x, ids, am, wm = _inputs(itm, ["ball", "box", "heart"])
    assert x.shape == (3, 3, 32, 32)
    assert wm.sum(1).tolist() == [1, 1, 1] and wm[0, 5]  # [CLS] a photo of a ball [SEP]
    emb = itm.image_embeds(x)
    assert emb.shape == (3, 1 + 16, 32)
    assert itm.itm_logits(emb, ids, am).shape == (3, 2)
    out = itm.gradcam(x, ids, am, wm)
    assert out.maps.shape == (3, 4, 4) and (out.maps >= 0).all()
    assert ((out.scores >= 0) & (out.scores <= 1)).all()
    assert out.maps.sum() > 0


def test_gradcam_rows_are_independent(tmp_path):
    itm = tiny_itm(tmp_path)
    x, ids, am, wm = _inputs(itm, ["ball", "box"])
    both = itm.gradcam(x, ids, am, wm).maps
    one = itm.gradcam(x[1:], ids[1:], am[1:], wm[1:]).maps
    torch.testing.assert_close(both[1:], one, rtol=1e-4, atol=1e-7)


def test_last_layer_gives_zero_word_gradcam(tmp_path):
    """The ITM head reads only [CLS]: in the last layer word-token rows get no gradient (why the default is the middle)."""
    itm = tiny_itm(tmp_path)
    itm.layer = 2
    x, ids, am, wm = _inputs(itm, ["ball"])
    assert itm.gradcam(x, ids, am, wm).maps.abs().max() == 0
    assert ItmModel(itm.model, itm.tokenizer, 32, [0.5] * 3, [0.25] * 3).layer == 1
    with pytest.raises(ValueError, match="out of range"):
        ItmModel(itm.model, itm.tokenizer, 32, [0.5] * 3, [0.25] * 3, layer=5)


def test_empty_word_mask_gives_zero_map(tmp_path):
    itm = tiny_itm(tmp_path)
    x, ids, am, wm = _inputs(itm, ["ball"])
    assert itm.gradcam(x, ids, am, torch.zeros_like(wm)).maps.abs().max() == 0


@pytest.mark.parametrize("conv_stem,stem_extra", [(False, None), (True, None), (True, 0)])
def test_save_load_roundtrip(tmp_path, conv_stem, stem_extra):
    """A checkpoint without ``stem_extra`` (older ones) loads the 2-block stem; a recorded one is rebuilt as saved."""
    itm = tiny_itm(tmp_path, conv_stem=conv_stem, stem_extra=2 if stem_extra is None else stem_extra)
    itm.save(tmp_path / "m", {"conv_stem": conv_stem, **({} if stem_extra is None else {"stem_extra": stem_extra})})
    back = ItmModel.load(str(tmp_path / "m"))
    assert back.image_size == 32 and back.grid == 4 and back.layer == itm.layer
    x, ids, am, wm = _inputs(itm, ["star"])
    torch.testing.assert_close(itm.gradcam(x, ids, am, wm).maps, back.gradcam(x, ids, am, wm).maps)


def test_activation_maps_iterative_masking(tmp_path):
    itm = tiny_itm(tmp_path)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)]
    maps = activation_maps(itm, images, ["ball", "ring"], "a photo of a {name}", rounds=3, batch_size=1)
    assert [m.binary.shape for m in maps] == [(48, 64), (40, 40)]
    for m in maps:
        assert len(m.rounds) == 3 and m.binary.dtype == bool
        assert 0 <= m.soft.min() and m.soft.max() <= 1
        assert m.binary.any()  # round 1 always activates its own maximum
        assert (m.soft[m.binary] >= 0.45).all()  # every union pixel was >= 0.5 in some round (up to resampling)
    assert activation_maps(itm, [], [], "a photo of a {name}") == []
    with pytest.raises(ValueError):
        activation_maps(itm, images, ["ball"], "a photo of a {name}")


def test_normalise_constant_map_is_zero():
    m = torch.stack([torch.full((3, 3), 2.0), torch.arange(9.0).view(3, 3)])
    n = normalise(m)
    assert n[0].abs().max() == 0 and n[1].min() == 0 and n[1].max() == 1


def test_train_itm_two_stages_save_and_load(synth_small, tmp_path, monkeypatch):
    """Both stages run on real (small) ingested shards; the stem's pretraining fits its batch; the saved
    model loads through the same path as real BLIP and gives word maps on its patch grid."""
    from ovtasks.core.config import load_settings
    from ovtasks.ingest.pipeline import ingest
    from ovtasks.train.itm import ItmTrainConfig, train_itm

    settings = load_settings(env={})
    ingest(synth_small[0], str(tmp_path / "clean"), settings, workers=1)
    cfg = ItmTrainConfig(steps=6, batch_size=4, image_size=32, hidden=32, vision_layers=1, text_layers=2, heads=2,
                         warmup=2, pretrain_steps=40, pretrain_batch_size=8, holdout=4, max_images=12, grounding_weight=0.5)
    result = train_itm(str(tmp_path / "clean"), str(tmp_path / "itm"), settings, cfg, gt_uri=synth_small[0])
    pre = [h for h in result.history if h["stage"] == "pretrain"]
    itm_hist = [h for h in result.history if h["stage"] == "itm"]
    assert pre and itm_hist and pre[-1]["step"] == 39 and itm_hist[-1]["step"] == 5
    assert pre[-1]["loss"] < pre[0]["loss"]  # 8 training images, batch 8: stage 1 must fit them
    assert 0.0 <= result.metrics["pretrain_holdout_top1"] <= 1.0
    assert {"named_accepted", "unnamed_rejected", "absent_rejected", "right_object_rate"} <= set(result.metrics)
    assert set(result.metrics["right_object_rate_by_layer"]) == {"0", "1"}
    itm = ItmModel.load(result.model_uri)
    assert itm.layer == cfg.gradcam_layer == 0  # the checkpoint's recorded GradCAM layer, not the middle one
    assert ItmModel.load(result.model_uri, layer=1).layer == 1  # an explicit maskfree.itm_layer wins
    assert isinstance(itm.model.vision_model.embeddings.patch_embedding, torch.nn.Module)
    ids, am, wm = itm.tokenize(["a photo of a ball"], [(11, 15)])
    out = itm.gradcam(itm.preprocess(torch.full((1, 3, 32, 32), 128.0)), ids, am, wm)
    assert out.maps.shape == (1, 4, 4)

    # continue from that checkpoint with the mosaic grounding loss: no stage 1, the model's own shape and
    # tokenizer, the source recorded
    more = ItmTrainConfig(steps=4, batch_size=4, image_size=32, warmup=1, holdout=4, max_images=12, mosaic_weight=1.0,
                          mosaic_batch=2, hidden=999)
    cont = train_itm(str(tmp_path / "clean"), str(tmp_path / "itm2"), settings, more, init=result.model_uri)
    assert not [h for h in cont.history if h["stage"] == "pretrain"]
    assert "mosaic_mass" in cont.history[-1] and 0.0 <= cont.history[-1]["mosaic_mass"] <= 1.0
    meta = json.loads((Path(cont.model_uri) / "ovtasks_itm.json").read_text())
    assert meta["init"] == result.model_uri and meta["config"]["hidden"] == 32 and meta["config"]["text_layers"] == 2
    assert ItmModel.load(cont.model_uri).tokenizer.get_vocab() == itm.tokenizer.get_vocab()
    with pytest.raises(ValueError, match="px"):
        train_itm(str(tmp_path / "clean"), str(tmp_path / "itm3"), settings, replace(more, image_size=64), init=result.model_uri)

    # maskfree.itm_layer set: the grounding and mosaic losses work on that layer (the one inference will use),
    # and the checkpoint records it
    import ovtasks.train.itm as itm_mod

    seen = {}
    for name in ("_Grounder", "_Mosaic"):
        real = getattr(itm_mod, name)
        spy = type(name, (real,), {"__init__": lambda self, *a, _r=real, _n=name: (_r.__init__(self, *a), seen.update({_n: self.layer}))[0]})
        monkeypatch.setattr(itm_mod, name, spy)
    layer1 = load_settings(env={"OVTASKS_MASKFREE__ITM_LAYER": "1"})
    assert layer1.maskfree.itm_layer == 1
    last = train_itm(str(tmp_path / "clean"), str(tmp_path / "itm4"), layer1, replace(more, grounding_weight=0.5),
                     init=result.model_uri)
    assert seen == {"_Grounder": 1, "_Mosaic": 1}
    assert json.loads((Path(last.model_uri) / "ovtasks_itm.json").read_text())["gradcam_layer"] == 1


def test_mosaic_compose_and_sampling():
    """Each image lands, at half size, in its own quarter (row-major); a sampled target name is mentioned by
    its tile's caption only, and the negative by none of the four."""
    from ovtasks.train.itm import _Mosaic

    quads = torch.stack([torch.full((3, 8, 8), float(v)) for v in (10, 20, 30, 40)])[None]
    quads[0, 3, :, :2, :2] = 0.0  # the top-left 2x2 pixels of image 3 average into its tile's first pixel
    m = _Mosaic.compose(quads)[0, 0]
    assert m.shape == (8, 8)
    assert m[:4, :4].eq(10).all() and m[:4, 4:].eq(20).all() and m[4:, :4].eq(30).all()
    assert m[4, 4] == 0 and m[4:, 4:].sum() == 40 * 15
    names = [["ball"], ["ball", "box"], ["star"], ["ball", "star", "ring"], ["heart"], ["box"]]
    mosaic = _Mosaic.__new__(_Mosaic)
    mosaic.vocab_names = ["ball", "box", "star", "ring", "heart", "cone"]
    rng = np.random.default_rng(0)
    picks = mosaic.sample(names, np.arange(len(names)), 50, rng)
    assert len(picks) == 50
    for quad, t, name, absent in picks:
        assert name in names[quad[t]] and all(name not in names[q] for k, q in enumerate(quad) if k != t)
        assert all(absent not in names[q] for q in quad)


def test_mosaic_loss_draws_the_word_attention_into_its_tile(tmp_path):
    """The mosaic loss alone, on images of one coloured square each (one colour per name) at random places:
    after training, a name's word attention on a mosaic lies in the tile of the image that shows it."""
    from ovtasks.train.itm import _Mosaic

    names = ["ball", "box", "star", "ring", "heart"]
    colors = torch.tensor([[230.0, 20, 20], [20, 20, 230], [20, 230, 20], [230, 230, 20], [230, 20, 230]])
    itm = tiny_itm(tmp_path, conv_stem=True, layers=2)
    itm.model.train()
    rng = np.random.default_rng(0)
    n = 400
    kinds = rng.integers(4, size=n)  # "heart" is in no image: always a negative
    images = torch.full((n, 3, 32, 32), 128.0)
    for i, k in enumerate(kinds):
        r, c = rng.integers(0, 20, size=2)
        images[i, :, r:r + 12, c:c + 12] = colors[k][:, None, None]
    img_names = [[names[k]] for k in kinds]
    mosaic = _Mosaic(itm, names, "a photo of a {name}", layer=0)
    opt = torch.optim.Adam(itm.model.parameters(), lr=3e-3)
    masses = []
    for _ in range(150):
        loss, parts = mosaic.loss(images.to(torch.uint8), img_names, np.arange(n), 16, rng)
        masses.append(parts["mosaic_mass"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    before, after = np.mean(masses[:10]), np.mean(masses[-10:])
    assert before < 0.4  # about a quarter of the attention in the right tile before training
    assert after > 0.6, (before, after)  # measured: 0.27 -> 0.98 in 150 steps


def test_grounding_loss_moves_the_word_attention_onto_the_named_object(tmp_path):
    """The word-grounding loss alone, on images with two of four coloured squares (one colour per name) in
    random cells of the 4x4 patch grid: after training, the named word's cross-attention lies on its own
    square (with two objects of four possible names, pooling both cannot tell which one was named)."""
    from ovtasks.train.itm import _Grounder

    names = ["ball", "box", "star", "ring"]
    colors = torch.tensor([[230.0, 20, 20], [20, 20, 230], [20, 230, 20], [230, 230, 20]])
    itm = tiny_itm(tmp_path, conv_stem=True, layers=2)
    itm.model.train()
    grounder = _Grounder(itm, names, "a photo of a {name}", layer=0)
    opt = torch.optim.Adam(list(itm.model.parameters()) + list(grounder.head.parameters()), lr=3e-3)
    rng = np.random.default_rng(0)

    def batch(n):
        x = torch.full((n, 3, 32, 32), 128.0)
        kinds = np.stack([rng.choice(4, 2, replace=False) for _ in range(n)])
        cells = np.stack([rng.choice(16, 2, replace=False) for _ in range(n)])
        for i in range(n):
            for kind, cell in zip(kinds[i], cells[i]):
                r, k = divmod(int(cell), 4)
                x[i, :, r * 8:r * 8 + 8, k * 8:k * 8 + 8] = colors[kind][:, None, None]
        return x, kinds, cells

    def mass_on_own(x, kinds, cells, which):
        prompts, spans = zip(*[prompt_span("a photo of a {name}", names[k]) for k in kinds[:, which]])
        ids, am, wm = itm.tokenize(prompts, spans)
        with torch.no_grad():
            _, attn = itm.itm_logits_and_attention(itm.image_embeds(itm.preprocess(x)), ids, am, layer=0)
        grounder._local.clear()
        a = (attn.mean(1) * wm[..., None]).sum(1)[:, 1:]
        a = a / a.sum(1, keepdim=True)
        return float(a[torch.arange(len(x)), torch.from_numpy(cells[:, which])].mean())

    test = batch(32)
    before = [mass_on_own(*test, w) for w in (0, 1)]
    for _ in range(200):
        x, kinds, _cells = batch(16)
        loss = grounder.loss(itm.image_embeds(itm.preprocess(x)), [[names[k] for k in ks] for ks in kinds], rng)
        opt.zero_grad()
        loss.backward()
        opt.step()
    grounder.close()
    after = [mass_on_own(*test, w) for w in (0, 1)]
    assert max(before) < 0.1  # about 1/16 of the attention on the square before training
    assert min(after) > 3 * max(before), (before, after)  # measured: 0.062 -> 0.25 (0.30 after 400 steps)
