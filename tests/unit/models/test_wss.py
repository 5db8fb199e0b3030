import numpy as np
import torch

from ovtasks.models.wss import BatchedWSS, gather_patches, init_params
from ovtasks.pseudolabel.maskfree.wss import WssJob, int_box, segment_boxes, segment_boxes_sequential


def _jobs(n=3):
    rng = np.random.default_rng(1)
    jobs = []
    for i in range(n):
        img = rng.integers(0, 255, (80, 90, 3), dtype=np.uint8)
        img[20:50, 30:60] = (200, 30 * i, 40)
        act = np.zeros((80, 90), np.float32)
        act[25:45, 35:55] = 1.0
        jobs.append(WssJob(img, (15.3, 10.0, 70.0, 62.7), act, seed=i))
    return jobs


def test_point_logits_equal_whole_crop_logits():
    torch.manual_seed(0)
    net = BatchedWSS(init_params(2, 3, 4))
    crops = torch.randn(2, 3, 20, 20)  # 16 x 16 crop, padded by 2
    pts = torch.tensor([[[0, 0], [15, 15], [7, 3]], [[3, 9], [0, 15], [12, 12]]])
    full = net.full_logits(crops)
    at = torch.stack([full[b, pts[b, :, 0], pts[b, :, 1]] for b in range(2)])
    torch.testing.assert_close(net.point_logits(BatchedWSS.point_windows(gather_patches(crops, pts))), at, rtol=1e-5, atol=1e-5)


def test_fit_points_equals_autograd_sgd():
    """The hand-written backward of ``fit_points`` takes the steps autograd + ``torch.optim.SGD`` take."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    crops = torch.randn(3, 3, 20, 20)
    pts = torch.randint(0, 16, (3, 10, 2))
    targets = (torch.arange(10) < 5).float().expand(3, 10)
    windows = BatchedWSS.point_windows(gather_patches(crops, pts))
    ref, fast = BatchedWSS(init_params(3, 3, 4)), BatchedWSS(init_params(3, 3, 4))
    opt = torch.optim.SGD(ref.parameters(), lr=0.25)
    for _ in range(20):
        loss = F.binary_cross_entropy_with_logits(ref.point_logits(windows), targets, reduction="none").mean(1).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    fast.fit_points(windows, targets, 20, 0.25)
    for k in ref.p:
        assert not torch.equal(ref.p[k], init_params(3, 3, 4)[k])  # the weights did move
        torch.testing.assert_close(fast.p[k], ref.p[k], rtol=1e-5, atol=1e-6)


def test_batched_equals_sequential():
    jobs = _jobs()
    a = segment_boxes(jobs, size=24, points=8, iterations=15, hidden=4)
    b = segment_boxes_sequential(jobs, size=24, points=8, iterations=15, hidden=4)
    for x, y in zip(a, b):
        assert x.shape == (80, 90) and x.any()
        assert (x ^ y).sum() <= 2  # float summation order only


def test_masks_follow_the_object_and_stay_in_the_box():
    [m] = segment_boxes(_jobs(1), size=32, points=16, iterations=60)
    obj = np.zeros((80, 90), bool)
    obj[20:50, 30:60] = True
    iou = (m & obj).sum() / (m | obj).sum()
    assert iou > 0.6
    assert not m[:10].any() and not m[63:].any()  # nothing outside the box


def test_degenerate_boxes_and_empty_input():
    assert segment_boxes([], iterations=2) == []
    img = np.zeros((10, 10, 3), np.uint8)
    job = WssJob(img, (5.0, 5.0, 5.0, 5.0), np.zeros((10, 10), np.float32), 0)  # zero-area box
    assert int_box(job.box, 10, 10) == (5, 5, 6, 6)
    [m] = segment_boxes([job], size=8, points=2, iterations=2)
    assert m.shape == (10, 10) and m.sum() <= 1
