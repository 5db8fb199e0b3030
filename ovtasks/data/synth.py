"""Synthetic captioned benchmark in LAION / img2dataset format, with COCO ground truth.

Each image holds 1-4 objects of 14 shape categories (10 base, 4 novel) with category-specific
textures in random colours, rotated, scaled and partly occluded, on textured or cluttered
backgrounds. Captions read like alt-text: they name some of the objects (sometimes by synonym or
plural, with colour and count words and filler), never necessarily all. A configurable fraction of
samples is made to fail an ingest filter (non-English caption, high punsafe, too small, near-duplicate
image); their reason is recorded as ``expected_filter`` in the ground truth.

Everything is a pure function of ``(seed, shard, index)``, so output is deterministic and shards can
be generated in parallel. Output (below ``--out``)::

    00000.tar  00000.parquet  00000_stats.json  ...  gt/instances.json  gt/categories.json
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from ovtasks.core.config import Settings
from ovtasks.data.groundtruth import encode_rle, mask_bbox
from ovtasks.core.shards import ShardWriter, dumps_json
from ovtasks.core.storage import open_store


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    plural: str
    synonyms: tuple[str, ...]
    split: str  # "base" | "novel"
    texture: str


CATEGORIES: tuple[Category, ...] = (
    Category(1, "ball", "balls", ("sphere", "orb"), "base", "radial"),
    Category(2, "box", "boxes", ("crate", "cube"), "base", "planks"),
    Category(3, "star", "stars", ("starfish",), "base", "outline"),
    Category(4, "ring", "rings", ("donut", "doughnut"), "base", "diagonal"),
    Category(5, "cross", "crosses", ("plus sign",), "base", "solid"),
    Category(6, "triangle", "triangles", ("pyramid",), "base", "vgradient"),
    Category(7, "diamond", "diamonds", ("rhombus", "lozenge"), "base", "checker"),
    Category(8, "arrow", "arrows", ("pointer",), "base", "twotone"),
    Category(9, "leaf", "leaves", ("foliage",), "base", "vein"),
    Category(10, "hexagon", "hexagons", ("hex nut",), "base", "dots"),
    Category(11, "heart", "hearts", ("love heart",), "novel", "highlight"),
    Category(12, "moon", "moons", ("crescent",), "novel", "speckle"),
    Category(13, "flower", "flowers", ("blossom", "daisy"), "novel", "petals"),
    Category(14, "mushroom", "mushrooms", ("toadstool",), "novel", "spots"),
)
CATEGORY_BY_NAME = {c.name: c for c in CATEGORIES}

FAILURE_KINDS = ("non_english", "punsafe", "too_small", "near_duplicate")
FAILURE_WEIGHTS = (0.35, 0.25, 0.15, 0.25)

# ---------------------------------------------------------------------------------------------
# Shapes: each draws a filled binary mask of one object into an s x s "L" canvas.


def _poly(draw: ImageDraw.ImageDraw, s: int, pts) -> None:
    draw.polygon([(x * (s - 1), y * (s - 1)) for x, y in pts], fill=255)


def _star(d, s):
    pts = []
    for k in range(10):
        r = 0.5 if k % 2 == 0 else 0.2
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((0.5 + r * math.cos(a), 0.52 + r * math.sin(a)))
    _poly(d, s, pts)


def _heart(d, s):
    r = 0.26 * s
    d.ellipse([0.02 * s, 0.08 * s, 0.02 * s + 2 * r, 0.08 * s + 2 * r], fill=255)
    d.ellipse([0.98 * s - 2 * r, 0.08 * s, 0.98 * s, 0.08 * s + 2 * r], fill=255)
    _poly(d, s, [(0.04, 0.42), (0.96, 0.42), (0.5, 0.97)])


def _ring(d, s):
    d.ellipse([0, 0, s - 1, s - 1], fill=255)
    d.ellipse([0.27 * s, 0.27 * s, 0.73 * s, 0.73 * s], fill=0)


def _cross(d, s):
    d.rectangle([0.36 * s, 0.02 * s, 0.64 * s, 0.98 * s], fill=255)
    d.rectangle([0.02 * s, 0.36 * s, 0.98 * s, 0.64 * s], fill=255)


def _moon(d, s):
    d.ellipse([0, 0, s - 1, s - 1], fill=255)
    d.ellipse([0.3 * s, -0.08 * s, 1.25 * s, 0.9 * s], fill=0)


def _arrow(d, s):
    _poly(d, s, [(0.02, 0.38), (0.55, 0.38), (0.55, 0.12), (0.98, 0.5), (0.55, 0.88), (0.55, 0.62), (0.02, 0.62)])


def _leaf(d, s):
    pts = []
    for k in range(40):
        t = math.pi * k / 39
        pts.append((0.5 + 0.3 * math.sin(t), 0.04 + 0.86 * (1 - math.cos(t)) / 2))
    for k in range(40):
        t = math.pi * k / 39
        pts.append((0.5 - 0.3 * math.sin(t), 0.04 + 0.86 * (1 + math.cos(t)) / 2))
    _poly(d, s, pts)
    d.line([0.5 * s, 0.88 * s, 0.5 * s, 0.99 * s], fill=255, width=max(1, s // 20))


def _hexagon(d, s):
    _poly(d, s, [(0.5 + 0.48 * math.cos(math.pi / 3 * k), 0.5 + 0.48 * math.sin(math.pi / 3 * k)) for k in range(6)])


def _flower(d, s):
    pr = 0.17 * s
    for k in range(6):
        a = k * math.pi / 3
        cx, cy = 0.5 * s + 0.3 * s * math.cos(a), 0.5 * s + 0.3 * s * math.sin(a)
        d.ellipse([cx - pr, cy - pr, cx + pr, cy + pr], fill=255)
    d.ellipse([0.32 * s, 0.32 * s, 0.68 * s, 0.68 * s], fill=255)


def _mushroom(d, s):
    d.pieslice([0.02 * s, 0.05 * s, 0.98 * s, 0.95 * s], 180, 360, fill=255)
    d.rectangle([0.38 * s, 0.48 * s, 0.62 * s, 0.97 * s], fill=255)


SHAPES: dict[str, Callable[[ImageDraw.ImageDraw, int], None]] = {
    "ball": lambda d, s: d.ellipse([0, 0, s - 1, s - 1], fill=255),
    "box": lambda d, s: d.rounded_rectangle([0.06 * s, 0.06 * s, 0.94 * s, 0.94 * s], radius=0.08 * s, fill=255),
    "star": _star,
    "ring": _ring,
    "cross": _cross,
    "triangle": lambda d, s: _poly(d, s, [(0.5, 0.03), (0.98, 0.95), (0.02, 0.95)]),
    "diamond": lambda d, s: _poly(d, s, [(0.5, 0.0), (0.82, 0.5), (0.5, 1.0), (0.18, 0.5)]),
    "arrow": _arrow,
    "leaf": _leaf,
    "hexagon": _hexagon,
    "heart": _heart,
    "moon": _moon,
    "flower": _flower,
    "mushroom": _mushroom,
}

# ---------------------------------------------------------------------------------------------
# Colours and textures


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32) * 255


def colour_name(h: float, s: float, v: float) -> str:
    if v < 0.25:
        return "black"
    if s < 0.2:
        return "white" if v > 0.8 else "gray"
    deg = h * 360
    for limit, name in ((15, "red"), (40, "orange"), (70, "yellow"), (160, "green"), (250, "blue"), (290, "purple"), (335, "pink")):
        if deg < limit:
            return name
    return "red"


def _texture(kind: str, s: int, base: np.ndarray, alt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / max(s - 1, 1)
    w = np.zeros((s, s), np.float32)  # 0 -> base colour, 1 -> alt colour
    if kind == "radial":
        w = np.clip(np.hypot(xx - 0.35, yy - 0.35) * 1.3, 0, 1)
    elif kind == "planks":
        w = ((yy * 6).astype(int) % 2).astype(np.float32) * 0.6
    elif kind == "outline":
        w = np.clip((np.hypot(xx - 0.5, yy - 0.5) - 0.28) * 6, 0, 1)
    elif kind == "diagonal":
        w = (((xx + yy) * 8).astype(int) % 2).astype(np.float32)
    elif kind == "vgradient":
        w = yy
    elif kind == "checker":
        w = (((xx * 5).astype(int) + (yy * 5).astype(int)) % 2).astype(np.float32)
    elif kind == "twotone":
        w = (yy > 0.5).astype(np.float32)
    elif kind == "vein":
        w = (np.abs(xx - 0.5) < 0.03).astype(np.float32)
    elif kind == "dots":
        w = ((np.mod(xx * 7, 1) - 0.5) ** 2 + (np.mod(yy * 7, 1) - 0.5) ** 2 < 0.06).astype(np.float32)
    elif kind == "highlight":
        w = (np.hypot(xx - 0.3, yy - 0.3) < 0.1).astype(np.float32)
    elif kind == "speckle":
        w = (rng.random((s, s)) < 0.15).astype(np.float32)
    elif kind == "petals":
        w = (np.hypot(xx - 0.5, yy - 0.5) < 0.17).astype(np.float32)
    elif kind == "spots":
        spots = np.zeros((s, s), bool)
        for _ in range(5):
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.12, 0.4), rng.uniform(0.05, 0.09)
            spots |= np.hypot(xx - cx, yy - cy) < r
        w = np.where(yy > 0.5, 0.7, spots.astype(np.float32))
    shade = 1.0 + rng.normal(0, 0.04, (s, s)).astype(np.float32)
    img = base[None, None, :] * (1 - w[..., None]) + alt[None, None, :] * w[..., None]
    return np.clip(img * shade[..., None], 0, 255)


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    kind = rng.integers(0, 4)
    c1 = _hsv_to_rgb(rng.random(), rng.uniform(0.1, 0.9), rng.uniform(0.3, 1.0))
    c2 = _hsv_to_rgb(rng.random(), rng.uniform(0.1, 0.9), rng.uniform(0.3, 1.0))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # smooth blobs (upsampled noise)
        g = rng.random((6, 6)).astype(np.float32)
        weight = np.asarray(Image.fromarray((g * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32) / 255
    elif kind == 1:  # stripes at a random angle
        a = rng.uniform(0, math.pi)
        period = rng.uniform(6, 20)
        weight = (np.sin((xx * math.cos(a) + yy * math.sin(a)) / period * 2 * math.pi) > 0).astype(np.float32)
    elif kind == 2:  # gradient
        weight = (xx / max(w - 1, 1) + yy / max(h - 1, 1)) / 2
    else:  # checkerboard
        cell = int(rng.integers(8, 24))
        weight = (((xx // cell) + (yy // cell)) % 2).astype(np.float32)
    img = c1 * (1 - weight[..., None]) + c2 * weight[..., None]
    img += rng.normal(0, 10, (h, w, 1)).astype(np.float32)
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(4, 16))):  # clutter: thin lines and small specks
        col = tuple(int(c) for c in _hsv_to_rgb(rng.random(), rng.random(), rng.uniform(0.2, 1)))
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        if rng.random() < 0.6:
            draw.line([x0, y0, x0 + rng.normal(0, w / 3), y0 + rng.normal(0, h / 3)], fill=col, width=int(rng.integers(1, 3)))
        else:
            r = rng.uniform(1, max(2.0, min(h, w) / 40))
            draw.rectangle([x0, y0, x0 + r, y0 + r], fill=col)
    return np.asarray(canvas, np.float32)


# ---------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class Instance:
    category: Category
    mask: np.ndarray  # bool (H, W), visible part
    colour: str


def render_scene(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, list[Instance]]:
    """Render one image: (H, W, 3) uint8 and its visible instances (each >= 50% unoccluded)."""
    img = _background(height, width, rng)
    n_obj = int(rng.choice([1, 2, 3, 4], p=[0.3, 0.35, 0.22, 0.13]))
    full_masks: list[np.ndarray] = []
    visible: list[np.ndarray] = []
    placed: list[tuple[Category, str]] = []
    short = min(width, height)
    for _ in range(n_obj):
        cat = CATEGORIES[int(rng.integers(0, len(CATEGORIES)))]
        hue, sat, val = rng.random(), rng.uniform(0.35, 1.0), rng.uniform(0.35, 1.0)
        base = _hsv_to_rgb(hue, sat, val)
        alt = _hsv_to_rgb((hue + rng.uniform(0.3, 0.7)) % 1, rng.uniform(0.2, 1.0), rng.uniform(0.3, 1.0))
        size = max(8, int(short * rng.uniform(0.22, 0.5)))
        canvas = Image.new("L", (size, size), 0)
        SHAPES[cat.name](ImageDraw.Draw(canvas), size)
        patch = Image.fromarray(_texture(cat.texture, size, base, alt, rng).astype(np.uint8))
        angle = float(rng.uniform(-180, 180)) if cat.name not in ("mushroom", "heart") else float(rng.uniform(-35, 35))
        canvas = canvas.rotate(angle, resample=Image.NEAREST, expand=True)
        patch = patch.rotate(angle, resample=Image.BILINEAR, expand=True)
        pw, ph = canvas.size
        if pw >= width or ph >= height:
            continue
        obj_mask = np.asarray(canvas) > 127
        for _attempt in range(20):
            x0, y0 = int(rng.integers(0, width - pw)), int(rng.integers(0, height - ph))
            full = np.zeros((height, width), bool)
            full[y0:y0 + ph, x0:x0 + pw] = obj_mask
            ok = all((v & ~full).sum() >= 0.5 * f.sum() for v, f in zip(visible, full_masks))
            if ok:
                break
        else:
            continue
        region = img[y0:y0 + ph, x0:x0 + pw]
        region[obj_mask] = np.asarray(patch, np.float32)[obj_mask]
        visible = [v & ~full for v in visible]
        visible.append(full)
        full_masks.append(full)
        placed.append((cat, colour_name(hue, sat, val)))
    instances = [Instance(c, m, col) for (c, col), m in zip(placed, visible) if m.sum() >= 16]
    return np.clip(img, 0, 255).astype(np.uint8), instances


# ---------------------------------------------------------------------------------------------
# Captions

_NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four"}
_EN_TEMPLATES = (
    "a photo of {objs} on a {bg} background",
    "{objs}",
    "{Objs} - stock illustration",
    "cute {objs} wallpaper hd",
    "close-up of {objs}, free download",
    "IMG_{num}.jpg {objs}",
    "{objs} isolated, vector art",
    "my kid drew {objs} today!!",
    "{Objs} for sale in our shop",
    "still life with {objs}",
)
_BG_WORDS = ("textured", "cluttered", "striped", "noisy", "colorful", "checkered", "plain")
_FOREIGN: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "de": (
        ("Ein schönes Foto von {w} auf dem Tisch, kostenloser Download",
         "Hintergrundbild mit {w} für das Handy in hoher Qualität",
         "Mein Sohn hat heute {w} gemalt und wir sind sehr stolz"),
        {"ball": "einem Ball", "box": "einer Kiste", "star": "einem Stern", "ring": "einem Ring", "cross": "einem Kreuz",
         "triangle": "einem Dreieck", "diamond": "einer Raute", "arrow": "einem Pfeil", "leaf": "einem Blatt",
         "hexagon": "einem Sechseck", "heart": "einem Herz", "moon": "einem Mond", "flower": "einer Blume", "mushroom": "einem Pilz"},
    ),
    "fr": (
        ("Une très belle photo de {w} sur la table, téléchargement gratuit",
         "Fond d'écran avec {w} pour votre téléphone, haute qualité",
         "Mon fils a dessiné {w} aujourd'hui et nous sommes très fiers"),
        {"ball": "une balle", "box": "une boîte", "star": "une étoile", "ring": "un anneau", "cross": "une croix",
         "triangle": "un triangle", "diamond": "un losange", "arrow": "une flèche", "leaf": "une feuille",
         "hexagon": "un hexagone", "heart": "un cœur", "moon": "une lune", "flower": "une fleur", "mushroom": "un champignon"},
    ),
    "es": (
        ("Una foto muy bonita de {w} sobre la mesa, descarga gratuita",
         "Fondo de pantalla con {w} para tu teléfono, alta calidad",
         "Mi hijo dibujó {w} hoy y estamos muy orgullosos"),
        {"ball": "una pelota", "box": "una caja", "star": "una estrella", "ring": "un anillo", "cross": "una cruz",
         "triangle": "un triángulo", "diamond": "un rombo", "arrow": "una flecha", "leaf": "una hoja",
         "hexagon": "un hexágono", "heart": "un corazón", "moon": "una luna", "flower": "una flor", "mushroom": "una seta"},
    ),
}


def english_caption(rng: np.random.Generator, instances: list[Instance]) -> tuple[str, list[str]]:
    """Alt-text naming a random non-empty subset of the present categories; returns the names used."""
    counts: dict[str, list[Instance]] = {}
    for inst in instances:
        counts.setdefault(inst.category.name, []).append(inst)
    present = sorted(counts)
    named = [c for c in present if rng.random() < 0.7] or ([present[int(rng.integers(len(present)))]] if present else [])
    phrases = []
    for name in named:
        cat = CATEGORY_BY_NAME[name]
        n = len(counts[name])
        use_syn = rng.random() < 0.3
        word = cat.synonyms[int(rng.integers(len(cat.synonyms)))] if use_syn else cat.name
        if n > 1:
            word = (word + "s") if use_syn else cat.plural
        colour = counts[name][0].colour if rng.random() < 0.5 else ""
        count_word = _NUMBERS[min(n, 4)] if (n > 1 or rng.random() < 0.5) else ""
        if count_word == "a" and (colour or word)[0] in "aeiou":
            count_word = "an"
        phrases.append(" ".join(p for p in (count_word, colour, word) if p))
    if not phrases:
        phrases = ["some shapes"]
    objs = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    template = _EN_TEMPLATES[int(rng.integers(len(_EN_TEMPLATES)))]
    text = template.format(objs=objs, Objs=objs[0].upper() + objs[1:], bg=_BG_WORDS[int(rng.integers(len(_BG_WORDS)))], num=int(rng.integers(1000, 9999)))
    return text, named


def foreign_caption(rng: np.random.Generator, instances: list[Instance]) -> tuple[str, str]:
    lang = ("de", "fr", "es")[int(rng.integers(3))]
    templates, words = _FOREIGN[lang]
    name = instances[0].category.name if instances else "ball"
    return templates[int(rng.integers(len(templates)))].format(w=words[name]), lang


# ---------------------------------------------------------------------------------------------
# Samples and shards


@dataclass(frozen=True)
class SynthSpec:
    seed: int
    shards: int
    images_per_shard: int
    image_size: int = 192
    failure_rate: float = 0.15
    jpeg_quality: int = 90

    @property
    def key_digits(self) -> int:
        return max(4, len(str(max(self.images_per_shard - 1, 1))))

    def key(self, shard: int, idx: int) -> str:
        return f"{shard:05d}{idx:0{self.key_digits}d}"


def _plan(spec: SynthSpec, shard: int, idx: int) -> str | None:
    """Which ingest filter (if any) this sample is made to fail; decided independently of rendering."""
    rng = np.random.default_rng([spec.seed, shard, idx, 1])
    if rng.random() >= spec.failure_rate:
        return None
    kind = FAILURE_KINDS[int(rng.choice(len(FAILURE_KINDS), p=FAILURE_WEIGHTS))]
    if kind == "near_duplicate" and _duplicate_source(spec, shard, idx) is None:
        return "non_english"
    return kind


def _duplicate_source(spec: SynthSpec, shard: int, idx: int) -> int | None:
    """An earlier clean sample in the same shard whose image a near-duplicate re-uses."""
    if idx == 0:
        return None
    rng = np.random.default_rng([spec.seed, shard, idx, 2])
    for _ in range(8):  # a few random draws keep this O(1) per sample
        j = int(rng.integers(0, idx))
        if _plan_base(spec, shard, j):
            return j
    return None


def _plan_base(spec: SynthSpec, shard: int, idx: int) -> bool:
    rng = np.random.default_rng([spec.seed, shard, idx, 1])
    return rng.random() >= spec.failure_rate


def _scene_size(spec: SynthSpec, rng: np.random.Generator) -> tuple[int, int]:
    if rng.random() < 0.3:
        return spec.image_size, int(spec.image_size * 0.75)
    return spec.image_size, spec.image_size


def _render_image(spec: SynthSpec, shard: int, idx: int, small: bool) -> tuple[np.ndarray, list[Instance]]:
    rng = np.random.default_rng([spec.seed, shard, idx, 0])
    w, h = _scene_size(spec, rng)
    if small:
        w = h = max(24, spec.image_size // 4)
    return render_scene(rng, w, h)


def make_sample(spec: SynthSpec, shard: int, idx: int) -> dict:
    """Everything about one sample: encoded image, caption, LAION metadata and GT instances."""
    failure = _plan(spec, shard, idx)
    source = _duplicate_source(spec, shard, idx) if failure == "near_duplicate" else None
    pixels, instances = _render_image(spec, shard, idx if source is None else source, failure == "too_small")
    rng = np.random.default_rng([spec.seed, shard, idx, 3])
    if failure == "non_english":
        caption, lang = foreign_caption(rng, instances)
        named = []
    else:
        caption, named = english_caption(rng, instances)
        lang = "en"
    buf = io.BytesIO()
    quality = spec.jpeg_quality - 12 if source is not None else spec.jpeg_quality
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    jpeg = buf.getvalue()
    h, w = pixels.shape[:2]
    punsafe = float(rng.uniform(0.8, 0.99)) if failure == "punsafe" else float(rng.uniform(0.0, 0.2))
    return {
        "key": spec.key(shard, idx),
        "jpeg": jpeg,
        "caption": caption,
        "lang": lang,
        "named": named,
        "width": w,
        "height": h,
        "similarity": float(rng.uniform(0.28, 0.42)),
        "punsafe": punsafe,
        "pwatermark": float(rng.uniform(0.0, 0.3)),
        "instances": instances,
        "expected_filter": failure,
        "duplicate_of": spec.key(shard, source) if source is not None else None,
    }


def write_shard(spec: SynthSpec, shard: int, out_uri: str, settings: Settings) -> dict:
    """Write one shard (tar, parquet, stats) to the store; return its GT images and annotations."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = open_store(out_uri, settings.s3)
    name = f"{shard:05d}"
    rows: dict[str, list] = {c: [] for c in ("key", "URL", "TEXT", "WIDTH", "HEIGHT", "similarity", "punsafe", "pwatermark", "status", "error_message", "original_width", "original_height", "sha256")}
    images, annotations = [], []
    with tempfile.TemporaryDirectory(prefix="ovtasks-synth-") as tmp:
        tar_path = os.path.join(tmp, f"{name}.tar")
        with open(tar_path, "wb") as fh, ShardWriter(fh) as writer:
            for idx in range(spec.images_per_shard):
                s = make_sample(spec, shard, idx)
                key = s["key"]
                url = f"https://synthetic.ovtasks.invalid/{key}.jpg"
                sha = hashlib.sha256(s["jpeg"]).hexdigest()
                meta = {
                    "url": url, "caption": s["caption"], "key": key, "status": "success", "error_message": None,
                    "width": s["width"], "height": s["height"], "original_width": s["width"], "original_height": s["height"],
                    "exif": "{}", "sha256": sha, "similarity": s["similarity"], "punsafe": s["punsafe"], "pwatermark": s["pwatermark"],
                }
                writer.add(key, {"jpg": s["jpeg"], "txt": s["caption"].encode("utf-8"), "json": dumps_json(meta)})
                for col, val in (("key", key), ("URL", url), ("TEXT", s["caption"]), ("WIDTH", s["width"]), ("HEIGHT", s["height"]),
                                 ("similarity", s["similarity"]), ("punsafe", s["punsafe"]), ("pwatermark", s["pwatermark"]),
                                 ("status", "success"), ("error_message", None), ("original_width", s["width"]),
                                 ("original_height", s["height"]), ("sha256", sha)):
                    rows[col].append(val)
                image_id = int(key)
                images.append({
                    "id": image_id, "file_name": f"{key}.jpg", "key": key, "shard": name, "width": s["width"], "height": s["height"],
                    "caption": s["caption"], "caption_lang": s["lang"], "named_categories": s["named"],
                    "expected_filter": s["expected_filter"], "duplicate_of": s["duplicate_of"],
                })
                for k, inst in enumerate(s["instances"]):
                    annotations.append({
                        "id": image_id * 10 + k, "image_id": image_id, "category_id": inst.category.id,
                        "segmentation": encode_rle(inst.mask), "area": float(inst.mask.sum()), "bbox": mask_bbox(inst.mask),
                        "iscrowd": 0, "colour": inst.colour,
                    })
        pq_path = os.path.join(tmp, f"{name}.parquet")
        pq.write_table(pa.table(rows), pq_path)
        stats = {"count": spec.images_per_shard, "successes": spec.images_per_shard, "failed_to_download": 0,
                 "failed_to_resize": 0, "status_dict": {"success": spec.images_per_shard}, "synthetic_seed": spec.seed}
        store.put_file(f"{name}.tar", tar_path)
        store.put_file(f"{name}.parquet", pq_path)
        store.put_bytes(f"{name}_stats.json", json.dumps(stats, indent=2, sort_keys=True).encode())
    return {"images": images, "annotations": annotations}


def _write_shard_job(args):
    return write_shard(*args)


def categories_doc() -> list[dict]:
    return [{"id": c.id, "name": c.name, "plural": c.plural, "synonyms": list(c.synonyms), "split": c.split} for c in CATEGORIES]


def generate(spec: SynthSpec, out_uri: str, settings: Settings, workers: int = 1, progress=None) -> dict:
    """Write all shards and the GT files; returns a summary (counts per expected filter)."""
    jobs = [(spec, s, out_uri, settings) for s in range(spec.shards)]
    if workers > 1 and spec.shards > 1:
        with ProcessPoolExecutor(max_workers=min(workers, spec.shards)) as pool:
            parts = []
            for part in pool.map(_write_shard_job, jobs):
                parts.append(part)
                if progress:
                    progress(1)
    else:
        parts = []
        for job in jobs:
            parts.append(_write_shard_job(job))
            if progress:
                progress(1)
    images = [im for p in parts for im in p["images"]]
    annotations = [a for p in parts for a in p["annotations"]]
    coco = {
        "info": {"description": "ovtasks synthetic captioned benchmark", "seed": spec.seed, "version": 1},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c.id, "name": c.name, "supercategory": "shape", "split": c.split} for c in CATEGORIES],
    }
    store = open_store(out_uri, settings.s3)
    store.put_bytes("gt/instances.json", json.dumps(coco, separators=(",", ":")).encode())
    store.put_bytes("gt/categories.json", json.dumps(categories_doc(), indent=2).encode())
    expected: dict[str, int] = {}
    for im in images:
        k = im["expected_filter"] or "clean"
        expected[k] = expected.get(k, 0) + 1
    return {"out": store.uri, "shards": spec.shards, "images": len(images), "instances": len(annotations), "expected": expected}
