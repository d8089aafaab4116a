"""Ground truth and the metrics computed against it.

Truth comes from the folder-per-class layout (`dataset/<label>/...`; detected when every image sits in a top-level
folder named after a label, or forced with `dataset.truth=folders`) or from a CSV/parquet file with a path column
and a label column (`dataset.truth=file.csv`, `dataset.truth_column=label`). Paths in the file are relative to the
dataset folder, '/'-separated.
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


def truth_from_folders(paths: Sequence[str], labels: Sequence[str], forced: bool) -> dict[str, str]:
    tops = {p: p.split("/", 1)[0] for p in paths if "/" in p}
    label_set = set(labels)
    if forced or (paths and len(tops) == len(paths) and set(tops.values()) <= label_set):
        return tops
    return {}


def truth_from_file(file: str | Path, column: str) -> dict[str, str]:
    file = Path(file)
    if not file.is_file():
        raise UserError(f"truth file not found: '{file}' (dataset.truth)")
    try:
        table = pq.read_table(file) if file.suffix.lower() == ".parquet" else pacsv.read_csv(file)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"cannot read truth file '{file}': {exc}") from None
    missing = [c for c in ("path", column) if c not in table.column_names]
    if missing:
        raise UserError(f"truth file '{file}' lacks column(s) {missing}; it has {table.column_names} "
                        "(set dataset.truth_column to the label column)")
    paths = table.column("path").cast(pa.string()).to_pylist()
    values = table.column(column).cast(pa.string()).to_pylist()
    return {p: v for p, v in zip(paths, values) if p is not None and v not in (None, "")}


def recall_by_label(confusion: Counter) -> dict[str, float]:
    """Per true label: the share of its images predicted as it (confusion counts (truth, predicted) pairs)."""
    support: Counter = Counter()
    for (truth, _), count in confusion.items():
        support[truth] += count
    return {label: confusion.get((label, label), 0) / n for label, n in support.items() if n}


def write_truth(path: Path, truth: dict[str, str]) -> None:
    items = sorted(truth.items())
    pq.write_table(pa.table({"path": [p for p, _ in items], "truth": [t for _, t in items]}, schema=TRUTH_SCHEMA),
                   path)


def read_truth(path) -> dict[str, str]:
    table = pq.read_table(path)
    return dict(zip(table.column("path").to_pylist(), table.column("truth").to_pylist()))


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

    def metrics_table(self) -> pa.Table:
        rows = [("overall", None, "images_with_truth", float(self.total)),
                ("overall", None, "top1_accuracy", self.top1 / self.total),
                ("overall", None, "top5_accuracy", self.top5 / self.total)]
        recall = recall_by_label(self.confusion)
        support, predicted = Counter(), Counter()
        for (truth, pred), count in self.confusion.items():
            support[truth] += count
            predicted[pred] += count
        for label in self.labels:
            hits = self.confusion.get((label, label), 0)
            precision = hits / predicted[label] if predicted[label] else float("nan")
            rows += [("class", label, "precision", precision),
                     ("class", label, "recall", recall.get(label, float("nan"))),
                     ("class", label, "support", float(support[label]))]
        # Over the labels of the label set that have images (a true label outside the set has no recall row).
        recalls = [recall[label] for label in self.labels if label in recall]
        rows.insert(3, ("overall", None, "mean_per_class_recall", float(np.mean(recalls)) if recalls else float("nan")))
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
