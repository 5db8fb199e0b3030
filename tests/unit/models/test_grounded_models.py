"""Grounding-DINO and SAM wrappers on tiny random checkpoints: shapes, chunking, batching, edge sizes."""

import json

import numpy as np
import pytest
import torch

from ovtasks.data.groundtruth import decode_rle
from ovtasks.models.grounding_dino import DOT_ID, GroundingDino
from ovtasks.models.preprocess import resolve_dtype
from ovtasks.models.sam import SamSegmenter

RNG = np.random.default_rng(0)


def _img(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def gdino(tiny_grounded):
    return GroundingDino.load(tiny_grounded[0], box_threshold=0.3, text_threshold=0.2, max_detections=1000)


@pytest.fixture(scope="module")
def sam(tiny_grounded):
    return SamSegmenter.load(tiny_grounded[1], batch_size=3, box_batch=2)


def test_detect_shapes_and_bounds(gdino):
    ims = [_img(80, 100, 1), _img(64, 64, 2)]
    dets = gdino.detect(ims, [["ball", "dog"], ["cat"]])
    assert len(dets) == 2
    for im, names, d in zip(ims, [["ball", "dog"], ["cat"]], dets):
        assert d.boxes.dtype == np.float32 and d.boxes.shape == (len(d), 4) and len(d) > 0
        h, w = im.shape[:2]
        assert (d.boxes[:, 0] >= 0).all() and (d.boxes[:, 2] <= w).all() and (d.boxes[:, 3] <= h).all()
        assert (d.boxes[:, 2] > d.boxes[:, 0]).all() and (d.boxes[:, 3] > d.boxes[:, 1]).all()
        assert ((d.scores > 0.3) & (d.scores <= 1)).all() and (np.diff(d.scores) <= 0).all()
        assert set(d.labels.tolist()) <= set(range(len(names)))


def test_zero_candidates_and_zero_boxes(gdino, tiny_grounded):
    calls = []
    orig = gdino._forward
    gdino._forward = lambda *a: calls.append(1) or orig(*a)
    try:
        dets = gdino.detect([_img(50, 60), _img(70, 40)], [[], []])
    finally:
        gdino._forward = orig
    assert [len(d) for d in dets] == [0, 0] and not calls  # no model call without a name
    strict = GroundingDino.load(tiny_grounded[0], box_threshold=1.0)
    assert [len(d) for d in strict.detect([_img(50, 60)], [["ball"]])] == [0]


def test_300_candidates_are_chunked_and_merged(gdino):
    names = [f"thing{i}" for i in range(300)]
    chunks = gdino.prompt_chunks(names)
    assert len(chunks) > 1
    assert all(len(c.ids) <= gdino.max_text_len for c in chunks)
    assert [i for c in chunks for i in c.names] == list(range(300))
    for c in chunks:  # every name's tokens are followed by a "." separator
        assert all(c.ids[p[-1] + 1] == DOT_ID for p in c.positions)
    im = _img(64, 80, 3)
    merged = gdino.detect([im], [names])[0]
    assert merged.labels.max() >= len(chunks[0].names)  # names from later chunks are found too
    # same as running each chunk's names on its own and pooling (NMS never spans two names)
    pooled = []
    for c in chunks:
        d = gdino.detect([im], [[names[i] for i in c.names]])[0]
        pooled += [(tuple(np.round(b, 3)), c.names[lab]) for b, lab in zip(d.boxes, d.labels)]
    assert sorted(pooled) == sorted((tuple(np.round(b, 3)), int(lab)) for b, lab in zip(merged.boxes, merged.labels))


def test_nms_within_a_category_and_across_its_synonyms(gdino):
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [30, 30, 40, 40]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0, 0, 1, 1])  # names 0 and 1
    free = gdino._nms(boxes, scores, labels, None)  # two categories: one box per overlapping cluster per name
    assert free.scores.tolist() == pytest.approx([0.9, 0.7, 0.6]) and free.labels.tolist() == [0, 1, 1]
    same = gdino._nms(boxes, scores, labels, [5, 5])  # synonyms of one category: NMS across them
    assert same.scores.tolist() == pytest.approx([0.9, 0.6]) and same.labels.tolist() == [0, 1]
    flat = gdino._nms(torch.tensor([[5, 5, 5, 9.0]]), torch.tensor([0.9]), torch.tensor([0]), None)
    assert len(flat) == 0  # zero-area boxes are dropped


def test_batch_equals_per_image(gdino, sam):
    ims = [_img(80, 100, 5), _img(64, 64, 6), _img(80, 100, 7), _img(120, 90, 8)]
    names = [["ball", "dog"], ["cat"], ["dog", "tree", "ball"], ["cup"]]
    batch = gdino.detect(ims, names)
    for im, ns, b in zip(ims, names, batch):
        one = gdino.detect([im], [ns])[0]
        assert np.array_equal(one.labels, b.labels)
        np.testing.assert_allclose(one.boxes, b.boxes, atol=1e-3)
        np.testing.assert_allclose(one.scores, b.scores, atol=1e-5)
    boxes = [d.boxes[:3] for d in batch]
    masks = sam.segment(ims, boxes)
    for im, bx, m in zip(ims, boxes, masks):
        one = sam.segment([im], [bx])[0]
        np.testing.assert_allclose(one.iou, m.iou, atol=1e-5)
        for r1, r2 in zip(one.rles, m.rles):
            a, b = decode_rle(r1), decode_rle(r2)
            assert (a ^ b).sum() <= max(2, 0.001 * a.size)


def test_sam_cross_image_decode_equals_per_image_decode(tiny_grounded):
    """One mask-decoder call for a micro-batch (boxes padded to the largest count) gives each image the masks
    that decoding it alone gives."""
    s = SamSegmenter.load(tiny_grounded[1], batch_size=4, box_batch=64)
    ims = [_img(80, 100, 21), _img(64, 64, 22), _img(120, 90, 23)]
    boxes = [np.array([[5, 5, 60, 70], [20, 10, 90, 50], [0, 0, 100, 80]], np.float32),
             np.array([[10, 10, 40, 40]], np.float32), np.array([[3, 8, 80, 100], [30, 30, 60, 90]], np.float32)]
    together = s.segment(ims, boxes)
    for im, bx, m in zip(ims, boxes, together):
        emb = s.embed([im])
        alone = s._decode(emb, im.shape[:2], bx)
        assert len(m.rles) == len(bx) and m.iou.shape == (len(bx),)
        np.testing.assert_allclose(alone.iou, m.iou, atol=1e-5)
        for r1, r2 in zip(alone.rles, m.rles):
            a, b = decode_rle(r1), decode_rle(r2)
            assert a.shape == im.shape[:2] and (a ^ b).sum() <= max(2, 0.001 * a.size)


def test_sam_masks_are_rles_at_image_size(sam):
    im = _img(80, 100, 9)
    boxes = np.array([[10, 10, 50, 60], [0, 0, 100, 80], [30, 5, 31, 6]], np.float32)
    res = sam.segment([im, im], [boxes, np.zeros((0, 4), np.float32)])
    assert len(res[0].rles) == 3 and res[1].rles == [] and res[0].iou.shape == (3,)
    for rle, area in zip(res[0].rles, res[0].areas):
        m = decode_rle(rle)
        assert m.shape == (80, 100) and m.sum() == area
    # the decode path equals SamModel's own forward on the same inputs
    with torch.no_grad():
        scale = sam._resized(80, 100)[2]
        ref = sam.model(pixel_values=sam._pixels(im)[None], input_boxes=torch.from_numpy(boxes * scale)[None], multimask_output=True)
    np.testing.assert_allclose(ref.iou_scores[0].max(-1).values.numpy(), res[0].iou, atol=1e-5)


def test_tiny_and_huge_images(gdino, sam):
    tiny, huge = _img(1, 1, 10), _img(3000, 4000, 11)
    dets = gdino.detect([tiny, huge], [["ball"], ["dog", "cat"]])
    for im, d in zip((tiny, huge), dets):
        h, w = im.shape[:2]
        assert (d.boxes[:, 2] <= w).all() and (d.boxes[:, 3] <= h).all()
    res = sam.segment([tiny, huge], [d.boxes[:2] for d in dets])
    for im, r in zip((tiny, huge), res):
        assert all(decode_rle(x).shape == im.shape[:2] for x in r.rles)


def test_dtypes(tiny_grounded):
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("auto", "cuda") == torch.bfloat16
    with pytest.raises(ValueError, match="float16 needs a CUDA device"):
        resolve_dtype("float16", "cpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8", "cpu")
    g = GroundingDino.load(tiny_grounded[0], dtype="bfloat16", box_threshold=0.3)
    s = SamSegmenter.load(tiny_grounded[1], dtype="bfloat16")
    assert g.model.dtype == torch.bfloat16 and s.model.dtype == torch.bfloat16
    d = g.detect([_img(64, 64)], [["ball"]])[0]
    r = s.segment([_img(64, 64)], [d.boxes[:2]])[0]
    assert d.boxes.dtype == np.float32 and len(r.rles) == min(2, len(d))


def test_loading_refuses_a_non_bert_vocabulary(tiny_grounded, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_grounded[0], bad)
    tok = json.loads((bad / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["[CLS]"], vocab["[unused5]"] = vocab["[unused5]"], vocab["[CLS]"]
    (bad / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="bert-base-uncased"):
        GroundingDino.load(str(bad))


def test_load_from_the_model_store(tiny_grounded, tmp_path, monkeypatch):
    from ovtasks.models.hub import publish_model

    monkeypatch.setenv("OVTASKS_MODEL_CACHE", str(tmp_path / "cache"))
    g_uri = publish_model(tiny_grounded[0], f"file://{tmp_path}/store/gdino")
    s_uri = publish_model(tiny_grounded[1], f"file://{tmp_path}/store/sam")
    g, s = GroundingDino.load(g_uri, box_threshold=0.3), SamSegmenter.load(s_uri)
    ref = GroundingDino.load(tiny_grounded[0], box_threshold=0.3)
    im = _img(64, 64, 12)
    np.testing.assert_array_equal(g.detect([im], [["ball"]])[0].boxes, ref.detect([im], [["ball"]])[0].boxes)
    assert s.size == 128
