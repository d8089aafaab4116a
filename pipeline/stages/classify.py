"""Stage `classify`: image embeddings x label embeddings -> decisions -> predictions.parquet, errors.parquet,
res.json, review.parquet (and metrics.parquet, confusion.parquet, calibration.parquet when the truth is known),
streamed chunk by chunk in path order.

With a classifier fitted on examples (`fit_classifier`) the run's scores are the adapted head's, calibrated;
zero-shot's are computed beside them for the review queue and for metrics on the same images. Images that are
examples are marked (`is_example`) and left out of the metrics.

Each chunk is verified as it is read (one read, no separate pass); a damaged chunk stops this stage with
`InputCorrupt`, the runner encodes that chunk again, and this stage runs again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import fewshot, zeroshot
from ..encoding.embeddings import embedding_matrix, image_count, iter_chunks
from ..engine import Artifact, StageContext, failpoint
from ..engine.files import read_json, write_json
from ..outputs.metrics import RELIABILITY_SCHEMA, MetricsAccumulator, MultiLabelMetrics, ReliabilityAccumulator
from ..outputs.review import ReviewQueue
from ..outputs.writers import (EmbeddingsWriter, ErrorsWriter, PredictionsWriter, ResJsonWriter,
                               write_label_embeddings)
from ..progress import Progress
from .discover import display_path
from .encode_labels import read_label_embeddings
from .fit_classifier import CHOICE_FILE, read_classifier, read_failed
from .truth import truth_walk

log = logging.getLogger(__name__)

VERSION = 12
COUNTS_FILE = "counts.json"
OUTPUT_FILES = ("predictions.parquet", "errors.parquet", "review.parquet", "res.json")
# Only written when asked for (embeddings=true), when the truth is known, or when examples made a classifier.
OPTIONAL_FILES = ("embeddings.parquet", "label_embeddings.parquet", "metrics.parquet", "confusion.parquet",
                  "calibration.parquet", CHOICE_FILE)


@dataclass
class Scorer:
    """The run's scores for a chunk's embeddings, and zero-shot's beside them."""

    text: np.ndarray
    scoring: zeroshot.Scoring
    head: fewshot.Head | None = None  # single-label mode with examples: the fitted head
    temperature: float = 1.0

    def scores(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the run's scores, zero-shot's). With a head: the softmax of its logits at the fitted temperature."""
        zero_shot = self.scoring.scores(matrix, self.text)
        if self.head is None:
            return zero_shot, zero_shot
        return fewshot.softmax(self.head.logits(matrix), self.temperature), zero_shot

    def uncalibrated(self, matrix: np.ndarray) -> np.ndarray:
        return fewshot.softmax(self.head.logits(matrix), 1.0)


def classify(ctx: StageContext, *, truth: Artifact, label_embeddings: Artifact, image_embeddings: Artifact,
             labels: list[str], topk: int, min_score: float | None, unknown_label: str, metadata: dict,
             embeddings: bool = False, mode: str = "single", threshold: float | None = None, review_size: int = 0,
             classifier: Artifact | None = None) -> None:
    """`mode` single: one label per image; multilabel: every label scoring `threshold` or more (sigmoid scores;
    with a classifier, its thresholds per label)."""
    text, scoring = read_label_embeddings(label_embeddings)
    multilabel = mode == "multilabel"
    scorer, thresholds, min_score, examples, chosen = _classifier(classifier, text, scoring, multilabel, threshold,
                                                                  min_score)
    run = _Outputs(ctx, labels, metadata, text, scoring, embeddings, multilabel, thresholds, review_size,
                   zero_shot_threshold=threshold if classifier is not None else None)
    decide = dict(labels=labels, topk=topk, min_score=min_score, unknown_label=unknown_label,
                  threshold=thresholds if multilabel else None)
    truths = truth_walk(truth)
    progress = Progress("classify", image_count(image_embeddings), "img", ctx.execution.progress,
                        ctx.execution.progress_interval)
    try:
        if classifier is not None:
            run.errors.write([(p, "example", k, m, t) for p, k, m, t in
                              zip(*(read_failed(classifier).column(c).to_pylist() for c in
                                    ("path", "error_type", "message", "transient")))])
        for chunk in iter_chunks(image_embeddings):
            progress.update(len(chunk))
            run.chunk(chunk, scorer, decide, truths, examples)
            failpoint("classify.row_group")
    finally:
        progress.close()
        run.close()
    counts = run.finish(image_count(image_embeddings))
    if chosen:
        write_json(ctx.out / CHOICE_FILE, chosen)
    write_json(ctx.out / COUNTS_FILE, counts)


def _classifier(artifact: Artifact | None, text, scoring, multilabel: bool, threshold, min_score):
    """(scorer, thresholds, min_score, example paths in the dataset, what was chosen) from fit_classifier."""
    if artifact is None:
        return Scorer(text, scoring), threshold, min_score, frozenset(), None
    head, chosen, fitted = read_classifier(artifact)
    if chosen.get("min_score") is not None:  # classify.target_precision, reached on the examples at this score
        min_score = chosen["min_score"]
    thresholds = fitted if multilabel and len(fitted) else threshold
    scorer = Scorer(text, scoring) if multilabel else Scorer(text, scoring, head, chosen["temperature"])
    return scorer, thresholds, min_score, frozenset(chosen["in_dataset"]), chosen


class _Outputs:
    """Every file the stage writes, and what it accumulates over the chunks (metrics, review, calibration)."""

    def __init__(self, ctx: StageContext, labels, metadata, text, scoring, embeddings: bool, multilabel: bool,
                 thresholds, review_size: int, zero_shot_threshold: float | None) -> None:
        """`zero_shot_threshold`: set when a classifier was fitted on examples, so that zero-shot's figures (at
        this threshold in multi-label mode) go beside the run's."""
        out = ctx.out
        self.out, self.multilabel, self.labels, self.thresholds = out, multilabel, labels, thresholds
        self.predictions = PredictionsWriter(out / "predictions.parquet", labels, metadata, multilabel)
        self.errors = ErrorsWriter(out / "errors.parquet")
        self.res_json = ResJsonWriter(out / "res.json")
        self.vectors = EmbeddingsWriter(out / "embeddings.parquet", text.shape[1], metadata) if embeddings else None
        if embeddings:
            write_label_embeddings(out / "label_embeddings.parquet", labels, text, scoring.logit_scale,
                                   {**metadata, "logit_bias": scoring.logit_bias, "scoring": scoring.kind})
        self.metrics = MultiLabelMetrics(labels, thresholds) if multilabel else MetricsAccumulator(labels)
        adapted = zero_shot_threshold is not None
        self.zero_shot_threshold = zero_shot_threshold
        self.zero_shot_metrics = None if not adapted else \
            MultiLabelMetrics(labels, zero_shot_threshold) if multilabel else MetricsAccumulator(labels)
        self.calibration = (ReliabilityAccumulator(), ReliabilityAccumulator()) if adapted and not multilabel else None
        self.review = ReviewQueue(review_size, labels)

    def chunk(self, chunk: pa.Table, scorer: Scorer, decide: dict, truths, examples: frozenset) -> None:
        paths = [display_path(p) for p in chunk.column("path").to_pylist()]
        ok = chunk.column("ok").to_numpy(zero_copy_only=False)
        self.errors.write(_error_rows(chunk, paths, ok))
        good = np.flatnonzero(ok)
        if not len(good):
            return
        matrix = embedding_matrix(chunk)[good]
        probs, zero_shot = scorer.scores(matrix)
        decided = zeroshot.decide(probs, **decide)
        good_paths = [paths[i] for i in good]
        sizes = np.stack([chunk.column("width").to_numpy()[good], chunk.column("height").to_numpy()[good]], 1)
        carried = chunk.column("truth").to_pylist()  # truth read with the image (tar shards)
        known = [truths.get(p) or carried[i] for p, i in zip(good_paths, good)]
        is_example = np.array([p in examples for p in good_paths], bool)
        self.predictions.write(good_paths, decided, probs, sizes, known, is_example)
        self.res_json.write(good_paths, decided.label_sets if self.multilabel else decided.labels)
        if self.vectors is not None:
            self.vectors.write(good_paths, matrix)
        scored = [None if example else truth for truth, example in zip(known, is_example)]  # examples: no metrics
        self.metrics.add(scored, decided.label_sets if self.multilabel else decided.labels, probs)
        self._beside(scorer, matrix, probs, zero_shot, scored, decide)
        self._queue(good_paths, probs, zero_shot, known)

    def _beside(self, scorer: Scorer, matrix, probs, zero_shot, scored, decide: dict) -> None:
        """Zero-shot's metrics on the same images, and the calibration before and after the temperature."""
        if self.zero_shot_metrics is None:
            return
        plain = zeroshot.decide(zero_shot, **{**decide, "threshold": self.zero_shot_threshold if self.multilabel
                                              else None})
        self.zero_shot_metrics.add(scored, plain.label_sets if self.multilabel else plain.labels, zero_shot)
        known = np.array([t is not None for t in scored], bool)
        if self.calibration is None or not known.any():
            return
        index = {label: i for i, label in enumerate(self.labels)}
        truth = np.array([index.get(t, -1) for t, k in zip(scored, known) if k])
        for accumulator, scores in zip(self.calibration, (scorer.uncalibrated(matrix[known]), probs[known])):
            accumulator.add(scores.max(axis=1), scores.argmax(axis=1) == truth)

    def _queue(self, paths, probs, zero_shot, known) -> None:
        if self.multilabel:
            priority, focus = fewshot.threshold_priority(probs, np.broadcast_to(self.thresholds, probs.shape[1:]))
            reasons = [fewshot.THRESHOLD] * len(paths)
        else:
            (priority, reasons), focus = fewshot.review_priority(zero_shot, probs), None
        self.review.add(paths, priority, reasons, probs, zero_shot.argmax(axis=1), known, focus)

    def close(self) -> None:
        for writer in (self.predictions, self.errors, self.res_json, self.vectors):
            if writer is not None:
                writer.close()

    def finish(self, discovered: int) -> dict:
        self.review.write(self.out / "review.parquet")
        counts = {"discovered": discovered, "classified": self.predictions.rows, "errors": self.errors.rows}
        if not self.metrics.total:
            return counts
        tables = [self.metrics.metrics_table()]
        if self.zero_shot_metrics is not None:
            tables.append(self.zero_shot_metrics.metrics_table(prefix="zero_shot_"))
        if self.calibration is not None:
            before, after = (a.ece() for a in self.calibration)
            tables.append(pa.table({"scope": ["calibration"] * 2, "label": [None, None],
                                    "metric": ["ece_uncalibrated", "ece_calibrated"], "value": [before, after]},
                                   schema=tables[0].schema))
            rows = self.calibration[0].rows("uncalibrated") + self.calibration[1].rows("calibrated")
            pq.write_table(pa.Table.from_pylist([dict(zip(RELIABILITY_SCHEMA.names, r)) for r in rows],
                                                schema=RELIABILITY_SCHEMA), self.out / "calibration.parquet")
        pq.write_table(pa.concat_tables(tables), self.out / "metrics.parquet")
        if (confusion := self.metrics.confusion_table()) is not None:
            pq.write_table(confusion, self.out / "confusion.parquet")
        counts["metrics"] = self.metrics.headline()
        if self.zero_shot_metrics is not None:
            counts["metrics"] += f"; zero-shot on the same images: {self.zero_shot_metrics.headline()}"
        if self.metrics.outside_label_set:
            outside = self.metrics.outside_label_set
            log.warning("%d images have a true label outside the label set (%s ...); they count as misses",
                        sum(outside.values()), ", ".join(list(outside)[:5]))
        return counts


def _error_rows(chunk: pa.Table, paths: list[str], ok: np.ndarray) -> list[tuple]:
    kinds = chunk.column("error_type").to_pylist()
    messages = chunk.column("error_message").to_pylist()
    transient = chunk.column("transient").to_pylist()
    return [(paths[i], "decode", kinds[i], messages[i], transient[i]) for i in np.flatnonzero(~ok)]


def read_counts(artifact: Artifact) -> dict:
    return read_json(artifact.file(COUNTS_FILE))

