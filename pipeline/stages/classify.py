"""Stage `classify`: image embeddings x label embeddings -> decisions -> predictions.parquet, errors.parquet,
res.json (and metrics.parquet, confusion.parquet when the truth is known), streamed chunk by chunk in path order.

Each chunk is verified as it is read (one read, no separate pass); a damaged chunk stops this stage with
`InputCorrupt`, the runner encodes that chunk again, and this stage runs again.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import zeroshot
from ..engine import Artifact, StageContext, failpoint
from ..engine.files import read_json, write_json
from ..outputs.metrics import MetricsAccumulator, MultiLabelMetrics
from ..progress import Progress
from ..outputs.writers import (EmbeddingsWriter, ErrorsWriter, PredictionsWriter, ResJsonWriter,
                               write_label_embeddings)
from .discover import display_path
from ..encoding.embeddings import embedding_matrix, image_count, iter_chunks
from .encode_labels import read_label_embeddings
from .truth import truth_walk

log = logging.getLogger(__name__)

VERSION = 5
COUNTS_FILE = "counts.json"
OUTPUT_FILES = ("predictions.parquet", "errors.parquet", "res.json")
# Only written when asked for (embeddings=true) or when ground truth is known.
OPTIONAL_FILES = ("embeddings.parquet", "label_embeddings.parquet", "metrics.parquet", "confusion.parquet")


def classify(ctx: StageContext, *, truth: Artifact, label_embeddings: Artifact, image_embeddings: Artifact,
             labels: list[str], topk: int, min_score: float | None, unknown_label: str, metadata: dict,
             embeddings: bool = False, mode: str = "single", threshold: float | None = None) -> None:
    """`mode` single: one label per image; multilabel: every label scoring `threshold` or more (sigmoid scores)."""
    truths = truth_walk(truth)
    text, scoring = read_label_embeddings(label_embeddings)
    multilabel = mode == "multilabel"
    predictions = PredictionsWriter(ctx.out / "predictions.parquet", labels, metadata, multilabel)
    errors = ErrorsWriter(ctx.out / "errors.parquet")
    res_json = ResJsonWriter(ctx.out / "res.json")
    vectors = EmbeddingsWriter(ctx.out / "embeddings.parquet", text.shape[1], metadata) if embeddings else None
    if embeddings:
        write_label_embeddings(ctx.out / "label_embeddings.parquet", labels, text, scoring.logit_scale,
                               {**metadata, "logit_bias": scoring.logit_bias, "scoring": scoring.kind})
    scores = MultiLabelMetrics(labels, threshold) if multilabel else MetricsAccumulator(labels)
    decide = dict(labels=labels, topk=topk, min_score=min_score, unknown_label=unknown_label,
                  threshold=threshold if multilabel else None)
    progress = Progress("classify", image_count(image_embeddings), "img", ctx.execution.progress,
                        ctx.execution.progress_interval)
    try:
        for chunk in iter_chunks(image_embeddings):
            progress.update(len(chunk))
            paths = [display_path(p) for p in chunk.column("path").to_pylist()]
            ok = chunk.column("ok").to_numpy(zero_copy_only=False)
            errors.write(_error_rows(chunk, paths, ok))
            good = np.flatnonzero(ok)
            if len(good):
                matrix = embedding_matrix(chunk)[good]
                probs = scoring.scores(matrix, text)
                decided = zeroshot.decide(probs, **decide)
                good_paths = [paths[i] for i in good]
                sizes = np.stack([chunk.column("width").to_numpy()[good], chunk.column("height").to_numpy()[good]], 1)
                carried = chunk.column("truth").to_pylist()  # truth read with the image (tar shards)
                known = [truths.get(p) or carried[i] for p, i in zip(good_paths, good)]
                predictions.write(good_paths, decided, probs, sizes, known)
                res_json.write(good_paths, decided.label_sets if multilabel else decided.labels)
                if vectors is not None:
                    vectors.write(good_paths, matrix)
                scores.add(known, decided.label_sets if multilabel else decided.labels, probs)
            failpoint("classify.row_group")
    finally:
        progress.close()
        for writer in (predictions, errors, res_json, vectors):
            if writer is not None:
                writer.close()
    counts = {"discovered": image_count(image_embeddings), "classified": predictions.rows, "errors": errors.rows}
    if scores.total:
        pq.write_table(scores.metrics_table(), ctx.out / "metrics.parquet")
        if (confusion := scores.confusion_table()) is not None:
            pq.write_table(confusion, ctx.out / "confusion.parquet")
        counts["metrics"] = scores.headline()
        if scores.outside_label_set:
            log.warning("%d images have a true label outside the label set (%s ...); they count as misses",
                        sum(scores.outside_label_set.values()), ", ".join(list(scores.outside_label_set)[:5]))
    write_json(ctx.out / COUNTS_FILE, counts)


def _error_rows(chunk: pa.Table, paths: list[str], ok: np.ndarray) -> list[tuple]:
    kinds = chunk.column("error_type").to_pylist()
    messages = chunk.column("error_message").to_pylist()
    transient = chunk.column("transient").to_pylist()
    return [(paths[i], "decode", kinds[i], messages[i], transient[i]) for i in np.flatnonzero(~ok)]


def read_counts(artifact: Artifact) -> dict:
    return read_json(artifact.file(COUNTS_FILE))
