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

VERSION = 10
EMBEDDINGS_FILE = "label_embeddings.npy"
SCALE_FILE = "scale.json"


def encode_labels(ctx: StageContext, *, model: str, dtype: str, texts: list[str], templates: list[str],
                  towers: Artifact | None = None) -> None:
    """`towers`: an export_towers entry when the towers run on ONNX Runtime or OpenVINO; else torch runs them."""
    loaded = ctx.execution.models.get(model, dtype, towers.path if towers is not None else None)
    started = time.perf_counter()
    embeddings = zeroshot.label_embeddings(loaded.encode_text, texts, templates)
    np.save(ctx.out / EMBEDDINGS_FILE, embeddings.astype(np.float32))
    write_json(ctx.out / SCALE_FILE, {"logit_scale": loaded.logit_scale, "logit_bias": loaded.logit_bias,
                                      "kind": loaded.family.scoring})
    log.info("encoded %d labels x %d templates in %.2fs (text tower once per prompt, not per image)",
             len(texts), len(templates), time.perf_counter() - started)


def read_label_embeddings(artifact: Artifact) -> tuple[np.ndarray, zeroshot.Scoring]:
    """(label embeddings, how they are scored), each verified against the entry's manifest as it is read."""
    import io
    import json

    embeddings = np.load(io.BytesIO(artifact.read_bytes(EMBEDDINGS_FILE)))
    return embeddings, zeroshot.Scoring(**json.loads(artifact.read_bytes(SCALE_FILE)))
