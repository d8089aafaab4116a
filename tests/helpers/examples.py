"""Examples and datasets rendered for the few-shot tests and `make fewshot`: the shapes of the sample set, under
label names that say nothing ("kind 1".."kind 5", kind i+1 standing for SHAPES[i]) or the real ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from . import synthetic as S

SHAPES = list(S.SHAPES)
KINDS = [f"kind {i + 1}" for i in range(len(SHAPES))]
KIND_LIST = "labels.list='" + ",".join(KINDS) + "'"


MAX_SIDE = 200  # examples and datasets alike: examples come from the images they label


def render_examples(folder: Path, per_label: int, names=KINDS, seed: int = 7) -> Path:
    """`per_label` renders of each shape (colours and sizes drawn as `render_dataset` draws them), in a subfolder
    named after its label."""
    rng = np.random.default_rng(seed)
    for shape, name in zip(SHAPES, names):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_label):
            color = list(S.COLORS)[rng.integers(len(S.COLORS))]
            image = S.render(rng, shape, color, *S.sample_size(rng, S.MIN_SIDE, MAX_SIDE))
            image.save(folder / name / f"{shape}_{color}_{i}.jpg", quality=90)
    return folder


def render_dataset(folder: Path, count: int, seed: int) -> pd.DataFrame:
    """`count` renders of random shapes and colours in `folder`; their truth (path, shape, color, kind, both)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    items = S.sample_items(rng, count, max_side=MAX_SIDE)
    rows = []
    for i, (item, image) in enumerate(zip(items, S.render_items(rng, items))):
        name = f"{i:04d}.jpg"
        image.save(folder / name, quality=90)
        rows.append({"path": name, "shape": item.shape, "color": item.color,
                     "kind": KINDS[SHAPES.index(item.shape)], "both": f"{item.shape}|{item.color}"})
    return pd.DataFrame(rows)
