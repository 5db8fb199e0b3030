"""The pseudo-label overlay sheet: one row per mask, its last column titled by the mask stage that made the masks."""

import numpy as np
import pytest
from PIL import Image

from ovtasks.data.clean import CleanSample
from ovtasks.pseudolabel.base import PairResult
from ovtasks.pseudolabel.candidates import Candidate
from ovtasks.pseudolabel.maskfree.activation import ActivationMap
from ovtasks.report.pictures import MASK_STAGES, overlay_grid


def test_overlay_grid_rows_and_mask_stage(tmp_path):
    img = np.full((48, 64, 3), 200, np.uint8)
    soft = np.zeros((48, 64), np.float32)
    soft[10:20, 10:30] = 1.0
    mask = soft > 0
    samples = [CleanSample("00000", "1", img, "a ball and a star", {})]
    results = [PairResult(0, Candidate("ball", 1, True, "ball", "lexicon"), 0.9, ActivationMap(mask, soft, 0.9, ()),
                          np.array([10, 10, 30, 20], np.float32), mask),
               PairResult(0, Candidate("star", 3, True, "star", "lexicon"), 0.2, reason="empty_mask")]  # no mask: no row
    sizes = {}
    for stage in MASK_STAGES:
        path = overlay_grid(samples, results, tmp_path / f"{stage}.png", novel={"ball"}, mask_stage=stage)
        sizes[stage] = Image.open(path).size
    assert sizes["wss"] == sizes["sam"] == (4 * 164 + 4, 1 * (160 + 18 + 4) + 30)  # four columns, one row
    assert (np.asarray(Image.open(tmp_path / "wss.png")) != np.asarray(Image.open(tmp_path / "sam.png"))).any()  # titles
    with pytest.raises(KeyError):
        overlay_grid(samples, results, tmp_path / "x.png", mask_stage="grabcut")
