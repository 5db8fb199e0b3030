import torch

from ovtasks.models.wspn import (
    WSPN,
    WSPNConfig,
    decode_deltas,
    encode_deltas,
    load_wspn,
    pseudo_regression_targets,
    save_wspn,
    top_proposals,
    wspn_loss,
)


def tiny():
    torch.manual_seed(0)
    return WSPN(WSPNConfig(num_classes=3, channels=(8, 8, 16), roi_size=3, hidden=16, class_names=("a", "b", "c")))


def test_shapes_and_score_normalisation():
    m = tiny()
    boxes = [torch.tensor([[0, 0, 10, 10], [5, 5, 30, 30.]]), torch.zeros((0, 4))]
    out = m(torch.randn(2, 3, 32, 32), boxes)
    assert out[0]["W"].shape == (2, 3) and out[0]["deltas"].shape == (2, 4) and out[0]["p"].shape == (3,)
    torch.testing.assert_close(out[0]["det"].sum(0), torch.ones(3))  # softmax over proposals
    assert ((out[0]["p"] > 0) & (out[0]["p"] < 1)).all()
    assert out[1]["W"].shape == (0, 3) and out[1]["p"].abs().sum() == 0  # zero proposals


def test_loss_is_finite_and_trains():
    m = tiny()
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    boxes = [torch.tensor([[0, 0, 12, 12], [2, 2, 14, 14], [16, 16, 30, 30.]])] * 2
    y = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    x = torch.randn(2, 3, 32, 32)
    first = None
    for _ in range(30):
        losses = wspn_loss(m(x, boxes), boxes, y)
        loss = losses["loss_cls"] + losses["loss_reg"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(losses) == {"loss_cls", "loss_reg"} and torch.isfinite(loss)
    assert loss.item() < first


def test_pseudo_targets_and_deltas():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30.]])
    w = torch.tensor([[0.9], [0.1], [0.05]])
    idx, tgt = pseudo_regression_targets(boxes, w, torch.tensor([1.0]))
    assert idx.tolist() == [0, 1] and torch.equal(tgt[1], boxes[0])  # the overlapping box regresses to the top one
    assert len(pseudo_regression_targets(boxes, w, torch.tensor([0.0]))[0]) == 0  # no labels, no targets
    torch.testing.assert_close(decode_deltas(boxes, encode_deltas(boxes, boxes.flip(0))), boxes.flip(0))


def test_top_proposals_and_checkpoint(tmp_path):
    m = tiny().eval()
    boxes = torch.tensor([[0, 0, 10, 10], [5, 5, 30, 30.], [0, 0, 10, 10.5]])
    out = m(torch.randn(1, 3, 32, 32), [boxes])[0]
    top, score = top_proposals(out, boxes, k=2, image_size=(32, 32))
    assert top.shape[0] <= 2 and (top[:, 2] <= 32).all()
    empty, _ = top_proposals(m(torch.randn(1, 3, 32, 32), [torch.zeros((0, 4))])[0], torch.zeros((0, 4)), 5, (32, 32))
    assert empty.shape == (0, 4)
    save_wspn(m, tmp_path / "w.pt", {"note": 1})
    back, extra = load_wspn(tmp_path / "w.pt")
    assert extra == {"note": 1} and back.cfg == m.cfg
    torch.testing.assert_close(back(torch.ones(1, 3, 32, 32), [boxes])[0]["W"], m(torch.ones(1, 3, 32, 32), [boxes])[0]["W"])


def test_selective_search_thread_pool_matches_the_loop_in_order():
    import io

    import numpy as np
    from PIL import Image

    from ovtasks.pseudolabel.maskfree.proposals import SelectiveSearch
    from ovtasks.data.synth import SynthSpec, make_sample

    spec = SynthSpec(seed=2, shards=1, images_per_shard=6, failure_rate=0.0)
    images = [np.array(Image.open(io.BytesIO(make_sample(spec, 0, i)["jpeg"])).convert("RGB")) for i in range(6)]
    images.append(np.zeros((40, 70, 3), np.uint8))  # blank: few or no boxes, must not shift the order
    loop = SelectiveSearch(threads=1).propose(images)
    pooled = SelectiveSearch(threads=3).propose(images)
    assert len(pooled) == len(images)
    assert sum(len(b) for b in loop) > 0
    for a, b in zip(loop, pooled):
        assert a.dtype == b.dtype == np.float32 and np.array_equal(a, b)


def test_selective_search_is_repeatable_on_an_image_with_many_regions():
    """OpenCV orders the regions differently on every call; an image with more than 800 of them (noise over
    8 px cells: ~1000) must still give the same boxes every time (it did not, and made WSPN training vary)."""
    import numpy as np

    from ovtasks.pseudolabel.maskfree.proposals import SelectiveSearch, selective_search

    rng = np.random.default_rng(0)
    cells = (rng.random((21, 21, 3)) * 255).astype(np.uint8)
    image = np.clip(np.kron(cells, np.ones((8, 8, 1), np.uint8))[:160, :160].astype(int)
                    + rng.integers(-20, 20, (160, 160, 3)), 0, 255).astype(np.uint8)
    runs = [selective_search(image) for _ in range(4)] + SelectiveSearch(threads=2).propose([image, image])
    assert len(runs[0]) == 400
    assert all(np.array_equal(runs[0], r) for r in runs[1:])


def test_proposals_with_the_wspn_instance_scores_of_the_names():
    import numpy as np

    from ovtasks.pseudolabel.maskfree.proposals import WSPNProposals, wspn_input

    class Fixed:  # selective search stand-in: the same boxes for every image
        def propose(self, images):
            return [np.array([[0, 0, 20, 20], [10, 10, 40, 40], [30, 5, 60, 30], [2, 30, 25, 60]], np.float32) for _ in images]

    images = [np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8) for i in range(2)]
    src = WSPNProposals(tiny(), top_k=3, base=Fixed())
    boxes, scores = src.propose_with_scores(images, [["b", "zebra"], ["c"]])
    plain = src.propose(images)
    assert all(np.array_equal(a, b) for a, b in zip(boxes, plain))  # the same boxes as propose()
    assert scores[0].shape == (len(boxes[0]), 2) and scores[1].shape == (len(boxes[1]), 1)
    assert np.isnan(scores[0][:, 1]).all()  # a name the WSPN has no class for
    for s in (scores[0][:, 0], scores[1][:, 0]):
        assert np.isclose(s.max(), 1.0) and (s > 0).all()
    # the scores are W[kept row, class] over the best kept row, rows matching top_proposals' kept boxes
    raw = torch.from_numpy(Fixed().propose(images[:1])[0])
    res = src.model(wspn_input(images[:1], "cpu"), [raw])[0]
    top, _, rows = top_proposals(res, raw, 3, (64, 64), return_index=True)
    col = res["W"][rows, 1]
    np.testing.assert_allclose(scores[0][:, 0], (col / col.max()).detach().numpy(), rtol=1e-5)
    assert np.allclose(top.numpy(), boxes[0])
