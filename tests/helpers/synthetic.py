"""Deterministic synthetic images: coloured shapes on plain or noisy backgrounds.

Everything here is driven by a caller-supplied ``numpy.random.Generator`` so the
same seed always gives the same images and captions.  Used to train and test
the tiny CLIP / Chinese-CLIP models shipped under ``tests/assets/models``.

Geometry: the shape always lies inside the central square of the image (side =
the short side), so CLIP's shortest-side resize + centre crop never cuts it,
and its size is relative to the short side.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterator, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

# English name -> (Chinese name, RGB)
COLORS: "OrderedDict[str, tuple[str, tuple[int, int, int]]]" = OrderedDict(
    [
        ("red", ("红色", (220, 30, 30))),
        ("green", ("绿色", (30, 165, 45))),
        ("blue", ("蓝色", (35, 70, 225))),
        ("yellow", ("黄色", (245, 215, 20))),
        ("purple", ("紫色", (135, 45, 185))),
        ("orange", ("橙色", (250, 125, 15))),
    ]
)

# English name -> Chinese name
SHAPES: "OrderedDict[str, str]" = OrderedDict(
    [
        ("circle", "圆形"),
        ("square", "正方形"),
        ("triangle", "三角形"),
        ("star", "星形"),
        ("cross", "十字形"),
    ]
)

EN_TEMPLATE = "a photo of a _."
ZH_TEMPLATE = "一张_的照片。"

MIN_SIDE = 64
MAX_SIDE = 4000
# shape circumradius as a fraction of the short side, and the largest offset of its centre
# from the image centre (fraction of the short side); the shape always stays in the central square
RADIUS_RANGE = (0.25, 0.42)
MAX_OFFSET = 0.12


# ---------------------------------------------------------------- labels


def shape_labels(lang: str = "en") -> list[str]:
    return list(SHAPES) if lang == "en" else list(SHAPES.values())


def color_labels(lang: str = "en") -> list[str]:
    return list(COLORS) if lang == "en" else [zh for zh, _ in COLORS.values()]


def pairs() -> list[tuple[str, str]]:
    """All (shape, color) pairs, colour-major: red circle, red square, ..."""
    return [(s, c) for c in COLORS for s in SHAPES]


def pair_label(shape: str, color: str, lang: str = "en") -> str:
    if lang == "en":
        return f"{color} {shape}"
    return f"{COLORS[color][0]}{SHAPES[shape]}"


def pair_labels(lang: str = "en") -> list[str]:
    return [pair_label(s, c, lang) for s, c in pairs()]


def labels(kind: str, lang: str = "en") -> list[str]:
    """kind: 'shapes', 'colors' or 'pairs'."""
    return {"shapes": shape_labels, "colors": color_labels, "pairs": pair_labels}[kind](lang)


def truth_label(kind: str, shape: str, color: str, lang: str = "en") -> str:
    if kind == "shapes":
        return shape if lang == "en" else SHAPES[shape]
    if kind == "colors":
        return color if lang == "en" else COLORS[color][0]
    return pair_label(shape, color, lang)


# ---------------------------------------------------------------- rendering


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Low-saturation background, light or dark, plain or noisy."""
    light = rng.random() < 0.5
    level = rng.uniform(170, 245) if light else rng.uniform(15, 95)
    tint = rng.normal(0.0, 1.0, 3)
    tint = tint / (np.abs(tint).max() + 1e-6) * level * rng.uniform(0.0, 0.05)
    base = np.clip(level + tint, 0, 255)
    style = rng.choice(["plain", "plain", "gradient", "noise"])
    if style == "plain":
        return Image.new("RGB", (w, h), tuple(int(round(v)) for v in base))
    if style == "gradient":
        grid = np.empty((2, 2, 3), np.float32)
    else:
        gw, gh = int(rng.integers(3, 9)), int(rng.integers(3, 9))
        grid = np.empty((gh, gw, 3), np.float32)
    # grey variation (same on all channels) keeps the saturation low
    amp = rng.uniform(10, 35)
    var = rng.uniform(-amp, amp, grid.shape[:2])[..., None]
    grid[...] = np.clip(base[None, None, :] + var, 0, 255)
    img = Image.fromarray(grid.astype(np.uint8), "RGB").resize((w, h), Image.BILINEAR)
    if style == "noise":
        # fine grain: a small tile of grey noise repeated over the image (fast at 4000 px)
        t = 97
        tile = rng.normal(0.0, rng.uniform(4, 14), (t, t, 1)).astype(np.float32)
        reps = (h // t + 1, w // t + 1, 1)
        grain = np.tile(tile, reps)[:h, :w]
        arr = np.asarray(img, dtype=np.float32) + grain
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return img


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = 1.0 if k % 2 == 0 else 0.42
            pts.append((rr * math.cos(a), rr * math.sin(a)))
    elif shape == "cross":
        t = 0.32
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t),
               (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]
    else:
        raise ValueError(f"unknown polygon shape {shape!r}")
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def render(rng: np.random.Generator, shape: str, color: str, width: int, height: int) -> Image.Image:
    """Render one RGB image of a ``color`` ``shape`` at a random place, size and rotation."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}")
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}")
    w, h = int(width), int(height)
    if w < 1 or h < 1:
        raise ValueError("width and height must be positive")
    img = _background(rng, w, h)

    side = min(w, h)
    r = side * rng.uniform(*RADIUS_RANGE)  # circumradius
    slack = min(max(side / 2 - r - side * 0.04, 0.0), MAX_OFFSET * side)
    cx = w / 2 + rng.uniform(-slack, slack)
    cy = h / 2 + rng.uniform(-slack, slack)
    angle = rng.uniform(0, 2 * math.pi)
    rgb = np.array(COLORS[color][1], np.float32) + rng.normal(0, 8, 3)
    rgb = tuple(int(v) for v in np.clip(rgb, 0, 255))

    # anti-aliased mask: supersample small images, draw large ones directly
    f = 4 if side < 256 else (2 if side < 1024 else 1)
    # only the bounding box of the shape is supersampled
    x0, y0 = max(int(cx - r) - 2, 0), max(int(cy - r) - 2, 0)
    x1, y1 = min(int(math.ceil(cx + r)) + 2, w), min(int(math.ceil(cy + r)) + 2, h)
    bw, bh = x1 - x0, y1 - y0
    mask = Image.new("L", (bw * f, bh * f), 0)
    draw = ImageDraw.Draw(mask)
    lcx, lcy, lr = (cx - x0) * f, (cy - y0) * f, r * f
    if shape == "circle":
        draw.ellipse([lcx - lr, lcy - lr, lcx + lr, lcy + lr], fill=255)
    else:
        draw.polygon(_polygon(shape, lcx, lcy, lr, angle), fill=255)
    if f > 1:
        mask = mask.resize((bw, bh), Image.BOX)
    patch = Image.new("RGB", (bw, bh), rgb)
    img.paste(patch, (x0, y0), mask)
    return img


# ---------------------------------------------------------------- sampling


class Item(NamedTuple):
    shape: str
    color: str
    width: int
    height: int


def sample_size(rng: np.random.Generator, min_side: int = MIN_SIDE, max_side: int = MAX_SIDE,
                max_aspect: float = 2.0) -> tuple[int, int]:
    """Long side log-uniform in [min_side, max_side], aspect ratio in [1, max_aspect]."""
    long = math.exp(rng.uniform(math.log(min_side), math.log(max_side)))
    aspect = rng.uniform(1.0, max_aspect) if rng.random() < 0.7 else 1.0
    short = max(min_side, long / aspect)
    long = max(long, short)
    w, h = (long, short) if rng.random() < 0.5 else (short, long)
    return int(round(w)), int(round(h))


def sample_items(rng: np.random.Generator, n: int, min_side: int = MIN_SIDE, max_side: int = MAX_SIDE,
                 max_aspect: float = 2.0, sizes: list[tuple[int, int]] | None = None) -> list[Item]:
    """``n`` draws, class-balanced over all (shape, color) pairs, shuffled.

    ``sizes``: optional explicit list of (w, h) cycled over; else sizes from :func:`sample_size`.
    """
    allp = pairs()
    reps = -(-n // len(allp))
    chosen = [allp[i] for i in rng.permutation(len(allp) * reps)[:n] % len(allp)]
    out = []
    for k, (s, c) in enumerate(chosen):
        if sizes:
            w, h = sizes[k % len(sizes)]
        else:
            w, h = sample_size(rng, min_side, max_side, max_aspect)
        out.append(Item(s, c, w, h))
    return out


def render_items(rng: np.random.Generator, items) -> Iterator[Image.Image]:
    for it in items:
        yield render(rng, it[0], it[1], it[2], it[3])


# ---------------------------------------------------------------- captions


def _an(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# (template, names_color, names_shape); {c} colour, {s} shape, {a} article before the next word
EN_PHRASES = [
    # pair
    ("a photo of a {c} {s}.", 1, 1),
    ("{c} {s}", 1, 1),
    ("a {c} {s}", 1, 1),
    ("{a} {c} {s}", 1, 1),
    ("this is a photo of {a} {c} {s}.", 1, 1),
    ("this is a photo of {c} {s}.", 1, 1),
    ("a picture of {a} {c} {s}.", 1, 1),
    ("a {s} that is {c}", 1, 1),
    ("a {c} colored {s}.", 1, 1),
    # colour only
    ("a photo of a {c}.", 1, 0),
    ("{c}", 1, 0),
    ("something {c}", 1, 0),
    ("{a} {c} thing", 1, 0),
    ("a photo of something {c}.", 1, 0),
    ("this is a photo of {c}.", 1, 0),
    ("the color {c}", 1, 0),
    ("{a} {c} object.", 1, 0),
    # shape only
    ("a photo of a {s}.", 0, 1),
    ("{s}", 0, 1),
    ("a {s}", 0, 1),
    ("{a} {s} shape", 0, 1),
    ("this is a photo of {a} {s}.", 0, 1),
    ("this is a photo of {s}.", 0, 1),
    ("a picture of a {s}.", 0, 1),
    ("a photo of a {s} shape.", 0, 1),
]

ZH_PHRASES = [
    ("一张{c}{s}的照片。", 1, 1),
    ("{c}{s}", 1, 1),
    ("一个{c}的{s}", 1, 1),
    ("{c}的{s}", 1, 1),
    ("这是一张{c}{s}的照片。", 1, 1),
    ("一张{c}的{s}的照片。", 1, 1),
    ("{c}{s}的图片", 1, 1),
    ("一张{c}的照片。", 1, 0),
    ("{c}", 1, 0),
    ("{c}的东西", 1, 0),
    ("一个{c}的物体", 1, 0),
    ("这是一张{c}的照片。", 1, 0),
    ("颜色是{c}", 1, 0),
    ("一张{s}的照片。", 0, 1),
    ("{s}", 0, 1),
    ("一个{s}", 0, 1),
    ("这是一张{s}的照片。", 0, 1),
    ("{s}的图片", 0, 1),
]


class Caption(NamedTuple):
    text: str
    shape: str | None  # None: the caption does not name a shape
    color: str | None  # None: the caption does not name a colour


def _fill(template: str, shape: str | None, color: str | None, lang: str) -> str:
    if lang == "en":
        first = template.split("{a} ", 1)[1][1] if "{a}" in template else "s"
        nxt = color if first == "c" else shape
        return template.format(c=color or "", s=shape or "", a=_an(nxt) if nxt else "a")
    return template.format(c=COLORS[color][0] if color else "", s=SHAPES[shape] if shape else "")


def all_captions(lang: str = "en") -> list[Caption]:
    """Every caption the generator can produce for ``lang`` ('en' or 'zh'), deterministic order."""
    phrases = EN_PHRASES if lang == "en" else ZH_PHRASES
    out: list[Caption] = []
    for tpl, has_c, has_s in phrases:
        for c in (COLORS if has_c else [None]):
            for s in (SHAPES if has_s else [None]):
                out.append(Caption(_fill(tpl, s, c, lang), s, c))
    return out


def caption_sets(lang: str = "en") -> list[tuple[str, list[Caption]]]:
    """One (kind, captions) entry per phrasing: the phrasing applied to every class of that
    kind, in :func:`labels` order ('shapes', 'colors' or 'pairs')."""
    phrases = EN_PHRASES if lang == "en" else ZH_PHRASES
    out = []
    for tpl, has_c, has_s in phrases:
        if has_c and has_s:
            out.append(("pairs", [Caption(_fill(tpl, s, c, lang), s, c) for s, c in pairs()]))
        elif has_c:
            out.append(("colors", [Caption(_fill(tpl, None, c, lang), None, c) for c in COLORS]))
        else:
            out.append(("shapes", [Caption(_fill(tpl, s, None, lang), s, None) for s in SHAPES]))
    return out


def caption(rng: np.random.Generator, shape: str, color: str, lang: str = "en") -> Caption:
    """A random caption of a ``color`` ``shape`` naming the colour, the shape or both."""
    phrases = EN_PHRASES if lang == "en" else ZH_PHRASES
    tpl, has_c, has_s = phrases[int(rng.integers(len(phrases)))]
    s, c = (shape if has_s else None), (color if has_c else None)
    return Caption(_fill(tpl, s, c, lang), s, c)
