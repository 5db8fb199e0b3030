"""Drawing parts shared by every picture: the palette, the font, mask overlays, captioned tiles, a heat map."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (128, 0, 0)]


def font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def overlay_instances(image: Image.Image, anns: list[dict], names: dict[int, str]) -> Image.Image:
    """Draw COCO RLE instance masks (translucent fill + box + name) onto an RGB image."""
    from pycocotools import mask as mask_utils

    base = np.asarray(image.convert("RGB"), np.float32)
    draw_boxes = []
    for ann in anns:
        rle = dict(ann["segmentation"])
        m = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
        colour = np.array(PALETTE[(ann["category_id"] - 1) % len(PALETTE)], np.float32)
        base[m] = base[m] * 0.45 + colour * 0.55
        draw_boxes.append((ann["bbox"], tuple(int(c) for c in colour), names.get(ann["category_id"], "?")))
    out = Image.fromarray(base.astype(np.uint8))
    d = ImageDraw.Draw(out)
    label_font = font(11)
    for (x, y, w, h), colour, name in draw_boxes:
        d.rectangle([x, y, x + w - 1, y + h - 1], outline=colour, width=1)
        d.text((x + 2, y + 1), name, fill=(255, 255, 255), font=label_font, stroke_width=2, stroke_fill=(0, 0, 0))
    return out


def wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if len(line) + len(w) + 1 > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    lines.append(line)
    return "\n".join(lines[:3])


def tile(img: Image.Image, caption: str, label: str, label_colour, cell: int) -> Image.Image:
    tile = Image.new("RGB", (cell, cell + 58), (250, 250, 250))
    im = img.copy()
    im.thumbnail((cell, cell))
    tile.paste(im, ((cell - im.width) // 2, (cell - im.height) // 2))
    d = ImageDraw.Draw(tile)
    d.text((4, cell + 2), label, fill=label_colour, font=font(12))
    d.text((4, cell + 17), wrap(caption, cell // 6), fill=(40, 40, 40), font=font(10))
    return tile


def heat(a: np.ndarray) -> np.ndarray:
    a = np.clip(a, 0, 1)
    return np.stack([a * 255, np.clip(a * 2 - 1, 0, 1) * 255, (1 - a) * 80], -1).astype(np.uint8)


# the gallery's colours, one per instance of a thumbnail (the palette without its two palest / darkest entries)
GALLERY_PALETTE = [c for c in PALETTE if c not in ((220, 190, 255), (128, 0, 0))]


def annotate_thumbnail(base: Image.Image, anns: list[dict], sx: float, sy: float) -> Image.Image:
    """A gallery thumbnail: each annotation's RLE mask tinted, its box (scaled by ``sx``, ``sy`` from the image
    to the thumbnail) outlined and labelled with its category and score."""
    from pycocotools import mask as mask_utils

    arr = np.asarray(base).astype(np.float32)
    for i, a in enumerate(anns):
        seg = dict(a["segmentation"])
        if isinstance(seg.get("counts"), str):
            seg["counts"] = seg["counts"].encode()
        m = mask_utils.decode(seg).astype(bool)
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(base.size, Image.NEAREST)) > 127
        arr[m] = 0.5 * arr[m] + 0.5 * np.array(GALLERY_PALETTE[i % len(GALLERY_PALETTE)], np.float32)
    out = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for i, a in enumerate(anns):
        x, y, w, h = a["bbox"]
        box = [x * sx, y * sy, (x + w) * sx, (y + h) * sy]
        colour = GALLERY_PALETTE[i % len(GALLERY_PALETTE)]
        draw.rectangle(box, outline=colour, width=2)
        label = f"{a['category']} {a['score']:.2f}"
        draw.rectangle([box[0], max(0, box[1] - 12), box[0] + 6 * len(label) + 4, max(12, box[1])], fill=colour)
        draw.text((box[0] + 2, max(0, box[1] - 12)), label, fill=(0, 0, 0))
    return out
