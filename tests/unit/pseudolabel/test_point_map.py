"""maskfree.wss_point_map: where WSS draws its foreground / background points from."""

from __future__ import annotations

import numpy as np
import pytest

from ovtasks.core.config import load_settings
from ovtasks.core.imaging import grow_box
from ovtasks.pseudolabel.maskfree.wss import WssJob, box_prior, point_map, prepare


def test_box_prior_is_a_tent_inside_the_box_and_zero_outside():
    p = box_prior((10, 20, 30, 60), (80, 50))
    assert p.shape == (80, 50) and p.dtype == np.float32
    assert p[:, :10].max() == 0 and p[:, 30:].max() == 0 and p[:20].max() == 0 and p[60:].max() == 0
    assert p[40, 20] == p.max() > 0.9  # the centre pixel
    assert p[40, 19] == p[40, 20] and p[39, 20] == p[40, 20]  # symmetric about the centre (20, 40)
    assert p[40, 12] < p[40, 16] < p[40, 20] and p[25, 20] < p[32, 20] < p[40, 20]


def test_point_map_sources():
    soft = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    box = (5, 5, 25, 25)
    assert point_map("map", soft, box) is soft
    np.testing.assert_array_equal(point_map("box", soft, box), box_prior(box, (40, 40)))
    np.testing.assert_allclose(point_map("map_box", soft, box), soft * box_prior(box, (40, 40)))
    with pytest.raises(ValueError, match="wss_point_map"):
        point_map("gt", soft, box)


def test_box_points_fall_in_the_centre_and_background_points_outside_the_box():
    """With a margin, the crop is the grown box: foreground points inside the eq. 6 box, every background
    point outside it, whatever the activation map says."""
    h = w = 96
    image = np.zeros((h, w, 3), np.uint8)
    box = (30.0, 30.0, 60.0, 60.0)
    soft = np.zeros((h, w), np.float32)
    soft[0:10, 0:10] = 1.0  # a map that points somewhere else entirely
    grown = grow_box(box, 0.5, (h, w))
    inp = prepare([WssJob(image, grown, point_map("box", soft, box), seed=3)], size=64, points=32)
    x1, y1, x2, y2 = inp.boxes[0]
    pts = inp.points[0].numpy().astype(float)
    rows = y1 + (pts[:, 0] + 0.5) * (y2 - y1) / 64  # back to image pixels
    cols = x1 + (pts[:, 1] + 0.5) * (x2 - x1) / 64
    fg, bg = slice(0, 32), slice(32, 64)
    assert np.all((rows[fg] > 30) & (rows[fg] < 60) & (cols[fg] > 30) & (cols[fg] < 60))
    assert np.all((rows[bg] < 31) | (rows[bg] > 59) | (cols[bg] < 31) | (cols[bg] > 59))


def test_setting_defaults_to_the_patents_map():
    s = load_settings(env={})
    assert s.maskfree.wss_point_map == "map"
    assert load_settings(env={"OVTASKS_MASKFREE__WSS_POINT_MAP": "box"}).maskfree.wss_point_map == "box"
