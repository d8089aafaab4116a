"""A varied image set for precision tests: what int8 calibration on a dataset's first images does not prepare for.

The bundled sample is one kind of picture (a shape on a plain background at a few sizes); an int8 model calibrated
on such images can hold on them and fail elsewhere. This set mixes, by seed:
- shape renders from 64 px to `max_side` on plain, gradient and grainy backgrounds (the fixtures' held-out sampler),
- several shapes in one picture, and shapes on a busy texture,
- textures with no shape at all: multi-scale smooth noise (a photograph's spectrum, roughly), stripes, checkers,
  saturated colour noise,
- grey pictures, extreme aspect ratios and tiny thumbnails.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from . import fixtures as F
from . import synthetic as S

KINDS = ("render", "several", "on_texture", "smooth_noise", "stripes", "checkers", "colour_noise", "grey",
         "panorama", "thumbnail")


def write_varied_set(root: Path, count: int, seed: int, max_side: int = 1600) -> list[Path]:
    """`count` JPEGs named `<index>_<kind>.jpg`, every kind in turn; half of them plain shape renders."""
    rng = np.random.default_rng(seed)
    renders = S.render_items(rng, F.heldout_items(seed, count, max_side))
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        kind = "render" if index % 2 == 0 else KINDS[1 + (index // 2) % (len(KINDS) - 1)]
        image = next(renders) if kind == "render" else _picture(kind, rng, max_side)
        path = root / f"{index:03d}_{kind}.jpg"
        image.convert("RGB").save(path, quality=int(rng.integers(60, 96)))
        paths.append(path)
    return paths


def _picture(kind: str, rng: np.random.Generator, max_side: int) -> Image.Image:
    w, h = _size(rng, 96, max_side)
    if kind == "several":
        return _shapes_on(_smooth_noise(rng, w, h, 0.3), rng, int(rng.integers(2, 5)))
    if kind == "on_texture":
        return _shapes_on(_checkers(rng, w, h) if rng.random() < 0.5 else _stripes(rng, w, h), rng, 1)
    if kind == "smooth_noise":
        return _smooth_noise(rng, w, h, 1.0)
    if kind == "stripes":
        return _stripes(rng, w, h)
    if kind == "checkers":
        return _checkers(rng, w, h)
    if kind == "colour_noise":
        small = rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
        return Image.fromarray(small).resize((w, h), Image.NEAREST)
    if kind == "grey":
        shape, color = rng.choice(list(S.SHAPES)), rng.choice(list(S.COLORS))
        return S.render(rng, str(shape), str(color), w, h).convert("L")
    if kind == "panorama":
        side = int(rng.integers(64, 400))
        return _shapes_on(_smooth_noise(rng, side * 6, side, 0.5), rng, 1)
    if kind == "thumbnail":
        shape, color = rng.choice(list(S.SHAPES)), rng.choice(list(S.COLORS))
        return S.render(rng, str(shape), str(color), int(rng.integers(16, 48)), int(rng.integers(16, 48)))
    raise ValueError(f"unknown kind {kind!r}")


def _size(rng: np.random.Generator, low: int, high: int) -> tuple[int, int]:
    side = int(math.exp(rng.uniform(math.log(low), math.log(high))))
    aspect = rng.uniform(0.6, 1.7)
    return max(int(side * aspect), 16), side


def _smooth_noise(rng: np.random.Generator, w: int, h: int, contrast: float) -> Image.Image:
    """Octaves of upsampled noise, each half the amplitude of the last: a 1/f spectrum like a photograph's."""
    picture = np.zeros((h, w, 3), np.float32)
    for octave in range(5):
        cells = 2 ** (octave + 1)
        grid = rng.normal(0, 1, (cells, cells, 3)).astype(np.float32)
        layer = np.stack([np.asarray(Image.fromarray(grid[..., c]).resize((w, h), Image.BICUBIC))
                          for c in range(3)], -1)
        picture += layer / 2 ** octave
    mean = rng.uniform(60, 200, 3)
    return Image.fromarray(np.clip(mean + picture * 40 * contrast, 0, 255).astype(np.uint8))


def _stripes(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    period = rng.uniform(4, 60)
    angle = rng.uniform(0, math.pi)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    wave = np.sin((x * math.cos(angle) + y * math.sin(angle)) * 2 * math.pi / period)[..., None]
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    return Image.fromarray((a + (b - a) * (wave + 1) / 2).astype(np.uint8))


def _checkers(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    cell = int(rng.integers(4, 80))
    y, x = np.mgrid[0:h, 0:w]
    board = (((x // cell) + (y // cell)) % 2)[..., None]
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    return Image.fromarray(np.where(board == 1, a, b).astype(np.uint8))


def _shapes_on(background: Image.Image, rng: np.random.Generator, count: int) -> Image.Image:
    picture = background.convert("RGB")
    draw = ImageDraw.Draw(picture)
    w, h = picture.size
    for _ in range(count):
        r = min(w, h) * rng.uniform(0.12, 0.35)
        cx, cy = rng.uniform(r, max(w - r, r + 1)), rng.uniform(r, max(h - r, r + 1))
        colour = tuple(int(v) for v in S.COLORS[str(rng.choice(list(S.COLORS)))][1])
        shape = str(rng.choice(list(S.SHAPES)))
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon(S._polygon(shape, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=colour)
    return picture
