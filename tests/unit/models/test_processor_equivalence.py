"""Our batched torch pre- and post-processing for Grounding-DINO and SAM against transformers' own
processors, one image at a time: the same resized size, pixels within one 8-bit level (transformers
resizes in PIL and rounds to uint8 before normalising; we resize the float image), the same boxes and
scores from the same network outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ovtasks.models.grounding_dino import GroundingDino, PromptChunk, save_tiny as save_tiny_gdino
from ovtasks.models.preprocess import resize_normalise, shortest_edge_size
from ovtasks.models.sam import SamSegmenter, save_tiny as save_tiny_sam

SIZES = [(120, 90), (50, 300), (64, 64), (333, 217)]


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = (rng.random((max(2, h // 8), max(2, w // 8), 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))  # smooth, like a photo


def _one_level(std) -> float:
    return 1.0 / 255 / min(std) + 1e-5


@pytest.fixture(scope="module")
def gdino_dir(tmp_path_factory):
    return save_tiny_gdino(tmp_path_factory.mktemp("gdino"), ["cat", "dog"])


@pytest.mark.parametrize("hw", SIZES)
def test_grounding_dino_pixels_equal_the_image_processor(gdino_dir, hw):
    from transformers import GroundingDinoImageProcessor

    proc = GroundingDinoImageProcessor.from_pretrained(gdino_dir)
    im = _image(*hw)
    ref = proc(images=Image.fromarray(im), return_tensors="pt", do_pad=False)["pixel_values"][0]
    size = shortest_edge_size(*hw, proc.size["shortest_edge"], proc.size["longest_edge"])
    ours = resize_normalise(im, size, proc.image_mean, proc.image_std, "cpu", torch.float32)
    assert tuple(ours.shape) == tuple(ref.shape)
    assert float((ours - ref).abs().max()) <= _one_level(proc.image_std)


def test_grounding_dino_boxes_and_scores_equal_the_processor_post_processing(gdino_dir):
    from transformers import GroundingDinoProcessor
    from transformers.models.grounding_dino.modeling_grounding_dino import GroundingDinoObjectDetectionOutput

    proc = GroundingDinoProcessor.from_pretrained(gdino_dir)
    gd = GroundingDino.load(gdino_dir, box_threshold=0.3, text_threshold=0.3)
    (chunk,) = gd.prompt_chunks(["cat", "dog"])
    q, length = 40, len(chunk.ids)
    g = torch.Generator().manual_seed(0)
    logits = torch.full((1, q, length), -30.0)
    for pos in chunk.positions:  # only the names' tokens light up, as for a well-trained model
        logits[0, :, pos] = torch.randn(q, len(pos), generator=g) * 2
    wh = torch.rand(q, 2, generator=g) * 0.3 + 0.05
    centre = torch.rand(q, 2, generator=g) * (1 - wh) + wh / 2  # boxes inside the image (we clamp, it does not)
    boxes = torch.cat([centre, wh], 1)[None]
    h, w = 120, 90
    ref = proc.post_process_grounded_object_detection(
        GroundingDinoObjectDetectionOutput(logits=logits, pred_boxes=boxes), torch.tensor([chunk.ids]), threshold=0.3,
        text_threshold=0.3, target_sizes=[(h, w)])[0]
    xyxy, scores, _ = gd._decode(logits[0].sigmoid(), boxes[0], chunk, (h, w))
    order_ref, order = ref["scores"].argsort(), scores.argsort()
    assert len(scores) == len(ref["scores"]) > 0
    assert torch.allclose(scores[order], ref["scores"][order_ref], atol=1e-6)
    assert torch.allclose(xyxy[order], ref["boxes"][order_ref], atol=1e-4)


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory):
    return save_tiny_sam(tmp_path_factory.mktemp("sam"), image_size=128)


@pytest.mark.parametrize("hw", SIZES)
def test_sam_pixels_equal_the_image_processor(sam_dir, hw):
    from transformers import SamImageProcessor

    proc = SamImageProcessor.from_pretrained(sam_dir)
    sam = SamSegmenter.load(sam_dir)
    im = _image(*hw)
    ref = proc(images=Image.fromarray(im), return_tensors="pt")
    ours = sam._pixels(im)
    assert tuple(ours.shape) == tuple(ref["pixel_values"][0].shape)
    assert tuple(ref["reshaped_input_sizes"][0].tolist()) == sam._resized(*hw)[:2]
    assert float((ours - ref["pixel_values"][0]).abs().max()) <= _one_level(proc.image_std)


@pytest.mark.parametrize("hw", SIZES)
def test_sam_masks_equal_the_processor_post_processing(sam_dir, hw):
    from pycocotools import mask as mask_utils
    from transformers import SamProcessor

    proc = SamProcessor.from_pretrained(sam_dir)
    sam = SamSegmenter.load(sam_dir)
    low = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(hw[0])) * 4  # the decoder's low-res logits
    ref = proc.post_process_masks(low[None, :, None], [list(hw)], [list(sam._resized(*hw)[:2])], mask_threshold=0.0)[0][:, 0]
    rles, areas = sam._rles(low, hw)
    ours = torch.from_numpy(np.stack([mask_utils.decode(r) for r in rles]).astype(bool))
    assert ours.shape == ref.shape and torch.equal(ours, ref.bool())
    assert areas == ref.sum(dim=(1, 2)).tolist()
