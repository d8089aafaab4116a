"""Stage `calibration`: the images that static int8 quantisation measures activation ranges on.

The dataset's first images in listing order (the first members of the first tar shards), preprocessed as the run
preprocesses them; when the dataset has fewer that decode, the bundled sample (`make demo`'s) tops them up. A
content stage: it is fingerprinted by the pixels it chose, so the int8 export, and every embedding made with it,
is reused as long as those first images stay the same, however much the rest of the dataset grows.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np

from ..engine import Artifact, StageContext
from ..errors import ImageError, UserError
from ..imaging import Preprocessor, load_and_preprocess
from .discover import Records

log = logging.getLogger(__name__)

VERSION = 1
# Besides this module, the code that decides its output (tests/unit/test_stage_versions.py holds VERSION to it).
CODE = ("pipeline.imaging",)
CALIBRATION_FILE = "calibration.npy"
SAMPLE = Path(__file__).resolve().parents[2] / "tests" / "assets" / "sample" / "images"


def calibrate(ctx: StageContext, *, records: Artifact, count: int, preprocess: dict, draft: bool,
              max_pixels: int) -> None:
    preprocessor = Preprocessor.from_params(preprocess)
    rows = _preprocessed(_dataset_images(ctx.runtime.source, records), preprocessor, draft, max_pixels, count)
    if len(rows) < count:
        sample = sorted(SAMPLE.glob("*")) if SAMPLE.is_dir() else []
        log.info("int8 calibration: %d of %d images from the dataset, topped up from the bundled sample (%d)",
                 len(rows), count, len(sample))
        rows += _preprocessed((p.read_bytes() for p in sample), preprocessor, draft, max_pixels, count - len(rows))
    if not rows:
        raise UserError("no image to calibrate int8 quantisation on: the dataset has none that decodes and the "
                         f"bundled sample ({SAMPLE}) is missing; use device.dtype=fp32")
    np.save(ctx.out / CALIBRATION_FILE, np.stack(rows).astype(np.float32))


def read_calibration(artifact: Artifact) -> np.ndarray:
    return np.load(artifact.file(CALIBRATION_FILE))


def _dataset_images(source, records: Artifact) -> Iterator[bytes]:
    for batch in Records(records).batches():
        for path in batch.column("path").to_pylist():
            try:
                if source.kind == "shards":
                    yield from (member.data for member in source.members(path))
                else:
                    yield source.read(path)
            except ImageError:
                continue


def _preprocessed(images: Iterator[bytes], preprocessor: Preprocessor, draft: bool, max_pixels: int,
                  count: int) -> list[np.ndarray]:
    rows: list[np.ndarray] = []
    for data in images:
        if len(rows) == count:
            break
        try:
            pixels, _ = load_and_preprocess(data, preprocessor, draft=draft, max_pixels=max_pixels)
        except ImageError:
            continue
        rows.append(np.asarray(pixels))
    return rows
