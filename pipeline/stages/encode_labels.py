"""Stage `encode_labels`: the text tower once per prompt (never per image), into one embedding per label.

Its params are the model's content fingerprint, the dtype, the label texts and the templates; display names and
the label set's name are not: renaming a label re-encodes nothing.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from .. import zeroshot
from ..engine import Artifact, StageContext
from ..engine.files import write_json

log = logging.getLogger(__name__)

VERSION = 2
# Besides this module, the code that decides its output (tests/unit/test_stage_versions.py holds VERSION to it).
CODE = ("pipeline.zeroshot", "pipeline.labels", "pipeline.models")
EMBEDDINGS_FILE = "label_embeddings.npy"
SCALE_FILE = "scale.json"


def encode_labels(ctx: StageContext, *, model: str, dtype: str, texts: list[str], templates: list[str]) -> None:
    loaded = ctx.runtime.models.get(model, dtype)
    started = time.perf_counter()
    embeddings = zeroshot.label_embeddings(loaded.encode_text, texts, templates)
    np.save(ctx.out / EMBEDDINGS_FILE, embeddings.astype(np.float32))
    write_json(ctx.out / SCALE_FILE, {"logit_scale": loaded.logit_scale})
    log.info("encoded %d labels x %d templates in %.2fs (text tower once per prompt, not per image)",
             len(texts), len(templates), time.perf_counter() - started)


def read_label_embeddings(artifact: Artifact) -> tuple[np.ndarray, float]:
    """(label embeddings, logit scale), each verified against the entry's manifest as it is read."""
    import io
    import json

    embeddings = np.load(io.BytesIO(artifact.read_bytes(EMBEDDINGS_FILE)))
    scale = json.loads(artifact.read_bytes(SCALE_FILE))["logit_scale"]
    return embeddings, float(scale)
