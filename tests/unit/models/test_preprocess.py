"""Box crops shared by the ITM's and the backbone's box judges and the namer's masked regions."""

import numpy as np
import torch

from ovtasks.models.preprocess import box_crops


def test_box_crops_grow_clip_and_fill_outside_the_mask():
    img = np.zeros((40, 60, 3), np.uint8)
    img[10:20, 20:40] = 200
    boxes = np.array([[20, 10, 40, 20], [0, 0, 60, 40]], np.float32)
    plain = box_crops(img, boxes, 0.0, 8)
    assert len(plain) == 2 and plain[0].shape == (3, 8, 8)
    assert torch.allclose(plain[0], torch.full((3, 8, 8), 200.0))  # the box itself: all object
    grown = box_crops(img, boxes[:1], 0.5, 8)[0]  # half a side on each side: object in the middle, background around
    assert grown[:, 4, 4].eq(200).all() and grown[:, 0, 0].eq(0).all()
    masks = np.zeros((2, 40, 60), bool)
    masks[0, 10:20, 20:30] = True  # the left half of the object only
    filled = box_crops(img, boxes, 0.0, 8, masks, (1.0, 2.0, 3.0))
    fill = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1)
    assert torch.allclose(filled[0][:, :, :3], torch.full((3, 8, 3), 200.0), atol=1e-3)  # inside the mask: the image
    assert torch.allclose(filled[0][:, :, 5:], fill.expand(3, 8, 3), atol=1e-3)  # outside: the fill
    assert torch.allclose(filled[1], fill.expand(3, 8, 8), atol=1e-3)  # an empty mask: all fill
