"""Ground truth and the metrics computed against it, both as streams.

Truth comes from the folder-per-class layout (`dataset/<label>/...`; detected when every image sits in a top-level
folder named after a label, or forced with `dataset.truth=folders`), from a CSV/parquet file with a path column
and a label column (`dataset.truth=file.csv`, `dataset.truth_column=label`; paths relative to the dataset,
'/'-separated), or from the source itself (a manifest's column, tar shards' members). It is stored sorted by path,
and classify walks it beside the image embeddings (which come in path order): no lookup table of every image.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..errors import UserError

log = logging.getLogger(__name__)

TRUTH_SCHEMA = pa.schema([("path", pa.string()), ("truth", pa.string())])
METRICS_SCHEMA = pa.schema([("scope", pa.string()), ("label", pa.string()), ("metric", pa.string()),
                            ("value", pa.float64())])
CONFUSION_SCHEMA = pa.schema([("true_label", pa.string()), ("predicted_label", pa.string()), ("count", pa.int64())])


def write_folder_truth(paths: Iterable[list[str]], labels: Sequence[str], forced: bool, out: Path) -> int:
    """Truth from each image's top folder, streamed from path batches (in path order) into `out`; with `forced`
    false, only when every image sits in a top folder named after a label (else nothing is written). Returns the
    number of images with truth."""
    label_set, rows, usable = set(labels), 0, True
    with pq.ParquetWriter(out, TRUTH_SCHEMA) as writer:
        for batch in paths:
            tops = [p.split("/", 1)[0] if "/" in p else None for p in batch]
            if not forced and any(t is None or t not in label_set for t in tops):
                usable = False
                break
            kept = [(p, t) for p, t in zip(batch, tops) if t is not None]
            if kept:
                writer.write_table(pa.table({"path": [p for p, _ in kept], "truth": [t for _, t in kept]},
                                            schema=TRUTH_SCHEMA))
                rows += len(kept)
    if not usable:
        write_truth(out, _empty_truth())
        return 0
    return rows


def truth_from_file(file: str | Path, column: str) -> pa.Table:
    """(path, truth) from a CSV/parquet file; `column` may name several columns joined by '+' (multi-label: the
    image's truth is the set of their values)."""
    file = Path(file)
    if not file.is_file():
        raise UserError(f"truth file not found: '{file}' (dataset.truth)")
    try:
        table = pq.read_table(file) if file.suffix.lower() == ".parquet" else pacsv.read_csv(file)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"cannot read truth file '{file}': {exc}") from None
    columns = column.split("+")
    missing = [c for c in ("path", *columns) if c not in table.column_names]
    if missing:
        raise UserError(f"truth file '{file}' lacks column(s) {missing}; it has {table.column_names} "
                        "(set dataset.truth_column to the label column)")
    if len(columns) == 1:
        return truth_table(table.column("path"), table.column(column))
    values = [table.column(c).cast(pa.string()).to_pylist() for c in columns]
    joined = [TRUTH_SEPARATOR.join(v for v in row if v) or None for row in zip(*values)]
    return truth_table(table.column("path"), pa.chunked_array([pa.array(joined, pa.string())]))


def truth_table(paths: pa.ChunkedArray, values: pa.ChunkedArray) -> pa.Table:
    """(path, truth) rows with a path and a non-empty truth."""
    import pyarrow.compute as pc

    table = pa.table({"path": paths.cast(pa.string()), "truth": values.cast(pa.string())}, schema=TRUTH_SCHEMA)
    keep = pc.and_(pc.is_valid(table.column("path")),
                   pc.and_(pc.is_valid(table.column("truth")), pc.not_equal(table.column("truth"), "")))
    return table.filter(keep)


def _empty_truth() -> pa.Table:
    return pa.table({"path": pa.array([], pa.string()), "truth": pa.array([], pa.string())}, schema=TRUTH_SCHEMA)


def write_truth(out: Path, truth: pa.Table | Iterable[pa.RecordBatch] | None) -> None:
    """Store truth sorted by the UTF-8 bytes of its paths, the order images come in: a table is sorted here;
    batches (a source's streamed truth) come sorted already and are written as they come."""
    import pyarrow.compute as pc

    if truth is None or isinstance(truth, pa.Table):
        table = _empty_truth() if truth is None else truth
        pq.write_table(table.take(pc.sort_indices(table.column("path").cast(pa.binary()))), out)
        return
    with pq.ParquetWriter(out, TRUTH_SCHEMA) as writer:
        for batch in truth:
            writer.write_batch(batch)


class TruthWalk:
    """Looks up truth for paths asked in increasing order, reading the sorted truth file once, row group by row
    group. A path asked out of order (a file name that is not valid UTF-8 sorts differently) finds nothing."""

    def __init__(self, source) -> None:
        self._batches = pq.ParquetFile(source).iter_batches(batch_size=65_536)
        self._keys: list[bytes] = []
        self._values: list[str] = []
        self._at = 0

    def _fill(self) -> bool:
        for batch in self._batches:
            if batch.num_rows:
                self._keys = [p.encode("utf-8", "surrogatepass") for p in batch.column("path").to_pylist()]
                self._values = batch.column("truth").to_pylist()
                self._at = 0
                return True
        return False

    def get(self, path: str) -> str | None:
        key = path.encode("utf-8", "surrogatepass")
        while True:
            if self._at >= len(self._keys) and not self._fill():
                return None
            current = self._keys[self._at]
            if current == key:
                return self._values[self._at]
            if current > key:
                return None
            self._at += 1


def recall_by_label(confusion: Counter) -> dict[str, float]:
    """Per true label: the share of its images predicted as it (confusion counts (truth, predicted) pairs)."""
    support: Counter = Counter()
    for (truth, _), count in confusion.items():
        support[truth] += count
    return {label: confusion.get((label, label), 0) / n for label, n in support.items() if n}


class MetricsAccumulator:
    """Streams over prediction row groups: top-1/top-5 hits, per-class counts and the confusion matrix."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = list(labels)
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.confusion: Counter = Counter()
        self.top1 = self.top5 = self.total = 0
        self.outside_label_set: Counter = Counter()

    def add(self, truths: Iterable[str | None], predicted: Sequence[str], probs: np.ndarray) -> None:
        for row, (truth, pred) in enumerate(zip(truths, predicted)):
            if truth is None:
                continue
            self.total += 1
            self.confusion[(truth, pred)] += 1
            self.top1 += truth == pred
            k = self.index.get(truth)
            if k is None:
                self.outside_label_set[truth] += 1
                continue
            # Rank of the true label among all labels (ties broken as argsort does): top-5 without top-k limits.
            self.top5 += int((probs[row] > probs[row, k]).sum()) < 5

    def metrics_table(self, prefix: str = "") -> pa.Table:
        """Scopes `overall` and `class`; with a `prefix` (`zero_shot_`), the same figures of another classifier
        on the same images, beside the run's own."""
        overall, per_class = prefix + "overall", prefix + "class"
        rows = [(overall, None, "images_with_truth", float(self.total)),
                (overall, None, "top1_accuracy", self.top1 / self.total),
                (overall, None, "top5_accuracy", self.top5 / self.total)]
        recall = recall_by_label(self.confusion)
        support, predicted = Counter(), Counter()
        for (truth, pred), count in self.confusion.items():
            support[truth] += count
            predicted[pred] += count
        for label in self.labels:
            hits = self.confusion.get((label, label), 0)
            precision = hits / predicted[label] if predicted[label] else float("nan")
            rows += [(per_class, label, "precision", precision),
                     (per_class, label, "recall", recall.get(label, float("nan"))),
                     (per_class, label, "support", float(support[label]))]
        # Over the labels of the label set that have images (a true label outside the set has no recall row).
        recalls = [recall[label] for label in self.labels if label in recall]
        rows.insert(3, (overall, None, "mean_per_class_recall", float(np.mean(recalls)) if recalls else float("nan")))
        return pa.Table.from_arrays([pa.array(col, t.type) for col, t in zip(zip(*rows), METRICS_SCHEMA)],
                                    schema=METRICS_SCHEMA)

    def confusion_table(self) -> pa.Table:
        items = sorted(self.confusion.items())
        return pa.table({"true_label": [t for (t, _), _ in items], "predicted_label": [p for (_, p), _ in items],
                         "count": [c for _, c in items]}, schema=CONFUSION_SCHEMA)

    def headline(self) -> str:
        table = {r["metric"]: r["value"] for r in self.metrics_table().to_pylist() if r["scope"] == "overall"}
        return (f"top-1 {table['top1_accuracy']:.3f}, top-5 {table['top5_accuracy']:.3f}, mean per-class recall "
                f"{table['mean_per_class_recall']:.3f} on {self.total} images with truth")


TRUTH_SEPARATOR = "|"  # multi-label truth: the labels of one image, joined
AP_BINS = 4096


class MultiLabelMetrics:
    """Multi-label metrics as a stream: per label, true/false positives and negatives at the threshold, and
    histograms of the scores of positive and negative images, from which the average precision comes (ranking by
    score, ties within 1/AP_BINS); mAP is their mean over the labels that occur."""

    def __init__(self, labels: Sequence[str], threshold: float | np.ndarray) -> None:
        """`threshold`: one score for every label, or one per label (fitted on examples)."""
        self.labels = list(labels)
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.threshold = np.broadcast_to(np.asarray(threshold, np.float64), (len(self.labels),))
        size = len(self.labels)
        self.tp, self.fp, self.fn = (np.zeros(size, np.int64) for _ in range(3))
        self.positives = np.zeros((size, AP_BINS), np.int32)
        self.negatives = np.zeros((size, AP_BINS), np.int32)
        self.total = 0
        self.outside_label_set: Counter = Counter()

    def add(self, truths: Iterable[str | None], predicted: Sequence[Sequence[str]], probs: np.ndarray) -> None:
        rows = [(i, t) for i, t in enumerate(truths) if t is not None]
        if not rows:
            return
        which = np.array([i for i, _ in rows])
        truth = np.zeros((len(rows), len(self.labels)), bool)
        for r, (_, text) in enumerate(rows):
            for label in text.split(TRUTH_SEPARATOR):
                label = label.strip()
                if label in self.index:
                    truth[r, self.index[label]] = True
                elif label:
                    self.outside_label_set[label] += 1
        scores = probs[which]
        said = scores >= self.threshold
        self.tp += (said & truth).sum(0)
        self.fp += (said & ~truth).sum(0)
        self.fn += (~said & truth).sum(0)
        bins = np.clip((scores * AP_BINS).astype(np.int64), 0, AP_BINS - 1)
        for j in range(len(self.labels)):
            self.positives[j] += np.bincount(bins[truth[:, j], j], minlength=AP_BINS).astype(np.int32)
            self.negatives[j] += np.bincount(bins[~truth[:, j], j], minlength=AP_BINS).astype(np.int32)
        self.total += len(rows)

    def average_precision(self, j: int) -> float:
        pos, neg = self.positives[j][::-1].astype(np.float64), self.negatives[j][::-1].astype(np.float64)
        if not pos.sum():
            return float("nan")
        tp, fp = np.cumsum(pos), np.cumsum(neg)
        precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
        return float((precision * pos).sum() / pos.sum())

    def metrics_table(self, prefix: str = "") -> pa.Table:
        overall, per_class = prefix + "overall", prefix + "class"
        precision = np.divide(self.tp, self.tp + self.fp, out=np.full(len(self.labels), np.nan),
                              where=(self.tp + self.fp) > 0)
        recall = np.divide(self.tp, self.tp + self.fn, out=np.full(len(self.labels), np.nan),
                           where=(self.tp + self.fn) > 0)
        f1 = np.divide(2 * self.tp, 2 * self.tp + self.fp + self.fn, out=np.full(len(self.labels), np.nan),
                       where=(2 * self.tp + self.fp + self.fn) > 0)
        ap = np.array([self.average_precision(j) for j in range(len(self.labels))])
        tp, fp, fn = self.tp.sum(), self.fp.sum(), self.fn.sum()
        present = ~np.isnan(ap)
        rows = [(overall, None, "images_with_truth", float(self.total)),
                *([(overall, None, "threshold", float(self.threshold[0]))] if self._one_threshold else []),
                (overall, None, "micro_precision", tp / (tp + fp) if tp + fp else float("nan")),
                (overall, None, "micro_recall", tp / (tp + fn) if tp + fn else float("nan")),
                (overall, None, "micro_f1", 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")),
                (overall, None, "macro_f1", float(np.nanmean(f1[present])) if present.any() else float("nan")),
                (overall, None, "mAP", float(ap[present].mean()) if present.any() else float("nan"))]
        for j, label in enumerate(self.labels):
            rows += [(per_class, label, "precision", float(precision[j])),
                     (per_class, label, "recall", float(recall[j])), (per_class, label, "f1", float(f1[j])),
                     (per_class, label, "ap", float(ap[j])),
                     (per_class, label, "support", float(self.tp[j] + self.fn[j])),
                     *([(per_class, label, "threshold", float(self.threshold[j]))] if not self._one_threshold else [])]
        return pa.Table.from_arrays([pa.array(col, t.type) for col, t in zip(zip(*rows), METRICS_SCHEMA)],
                                    schema=METRICS_SCHEMA)

    @property
    def _one_threshold(self) -> bool:
        return bool(np.all(self.threshold == self.threshold[0]))

    def confusion_table(self) -> None:
        return None  # no single predicted label to cross with a single true one

    def headline(self) -> str:
        table = {r["metric"]: r["value"] for r in self.metrics_table().to_pylist() if r["scope"] == "overall"}
        at = f"threshold {self.threshold[0]:g}" if self._one_threshold else "the thresholds fitted per label"
        return (f"mAP {table['mAP']:.3f}, micro F1 {table['micro_f1']:.3f}, macro F1 {table['macro_f1']:.3f} at "
                f"{at} on {self.total} images with truth")


RELIABILITY_SCHEMA = pa.schema([("scores", pa.string()), ("lower", pa.float64()), ("upper", pa.float64()),
                                ("count", pa.int64()), ("confidence", pa.float64()), ("accuracy", pa.float64())])


class ReliabilityAccumulator:
    """How well top-1 scores match accuracy on the images with truth, as a stream: per bin of equal width, the
    count, the summed score and the hits; the expected calibration error (Guo et al., 2017) from them."""

    def __init__(self, bins: int = 10) -> None:
        self.bins = bins
        self.count = np.zeros(bins, np.int64)
        self.confidence = np.zeros(bins, np.float64)
        self.hits = np.zeros(bins, np.float64)

    def add(self, confidence: np.ndarray, correct: np.ndarray) -> None:
        index = np.clip(np.ceil(np.asarray(confidence, np.float64) * self.bins).astype(np.int64) - 1, 0,
                        self.bins - 1)  # bin i holds (i/bins, (i+1)/bins], as pipeline.fewshot.reliability_bins
        self.count += np.bincount(index, minlength=self.bins)
        self.confidence += np.bincount(index, weights=confidence, minlength=self.bins)
        self.hits += np.bincount(index, weights=np.asarray(correct, np.float64), minlength=self.bins)

    def ece(self) -> float:
        filled = self.count > 0
        gaps = np.abs(self.hits[filled] - self.confidence[filled])  # count * |accuracy - mean confidence|
        return float(gaps.sum() / self.count.sum()) if filled.any() else float("nan")

    def rows(self, name: str) -> list[tuple]:
        edges = np.linspace(0.0, 1.0, self.bins + 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            confidence, accuracy = self.confidence / self.count, self.hits / self.count
        return [(name, float(edges[i]), float(edges[i + 1]), int(self.count[i]), float(confidence[i]),
                 float(accuracy[i])) for i in range(self.bins)]
