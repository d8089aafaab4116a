"""Stage `calibration`: the images that static int8 quantisation measures activation ranges on.

The dataset's first images in listing order (the first members of the first tar files), preprocessed as the
run preprocesses them, up to `model.calibration_images`; fewer than `MIN_IMAGES` that decode is refused (ranges
measured on a handful of images clip the activations of the rest). A content stage: it is fingerprinted by the
pixels it chose, so the int8 export, and every embedding made with it, is reused as long as those first images
stay the same, however much the rest of the dataset grows.
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np

from ..engine import Artifact, StageContext
from ..errors import ImageError, UserError
from ..imaging import Preprocessor, load_and_preprocess
from ..sources import TARS
from .discover import Records

log = logging.getLogger(__name__)

VERSION = 8
CALIBRATION_FILE = "calibration.npy"
MIN_IMAGES = 16  # static int8 needs activation ranges from more than a handful of images


def calibrate(ctx: StageContext, *, records: Artifact, source: dict, count: int, preprocess: dict, draft: bool,
              max_pixels: int) -> None:
    """`source`: the settings that decide what reading the dataset gives (as encode_images hashes them)."""
    preprocessor = Preprocessor.from_params(preprocess)
    dataset = ctx.execution.sources.open(source)
    rows = _preprocessed(_dataset_images(dataset, records), preprocessor, draft, max_pixels, count)
    if len(rows) < min(count, MIN_IMAGES):
        raise UserError(f"int8 calibration needs at least {min(count, MIN_IMAGES)} images that decode; the dataset "
                        f"has {len(rows)}. Use device.dtype=fp32 (a dataset this small gains nothing from int8), "
                        "or classify a larger one")
    log.info("int8 calibration on the dataset's first %d images that decode (model.calibration_images=%d)",
             len(rows), count)
    np.save(ctx.out / CALIBRATION_FILE, np.stack(rows).astype(np.float32))


def read_calibration(artifact: Artifact) -> np.ndarray:
    return np.load(artifact.file(CALIBRATION_FILE))


def _dataset_images(source, records: Artifact) -> Iterator[bytes]:
    for batch in Records(records).batches():
        for path in batch.column("path").to_pylist():
            try:
                if source.kind == TARS:
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
