"""review.parquet: the images a person should look at first, with the reason for each, as a bounded queue that
streams over any number of images (it keeps the `size` most in need, a heap).

Its first two columns are `path` and `label` (the run's label): corrected by hand, the table goes back in as
`EXAMPLES=` (labels.examples), and its paths, being the dataset's keys, take their embeddings from the dataset.
"""

from __future__ import annotations

import heapq
import itertools
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REVIEW_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("label", pa.string(), nullable=False),  # the run's label: correct it, then feed the table back
    pa.field("score", pa.float32(), nullable=False),
    pa.field("runner_up", pa.string(), nullable=True),  # the second label (single-label mode)
    pa.field("runner_up_score", pa.float32(), nullable=True),
    pa.field("zero_shot_label", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),  # disagree, margin, confidence (single); threshold (multi)
    pa.field("priority", pa.float32(), nullable=False),  # ascending: the order to review in
    pa.field("rank", pa.int32(), nullable=False),
    pa.field("truth", pa.string(), nullable=True),
])


class ReviewQueue:
    def __init__(self, size: int, labels: Sequence[str]) -> None:
        self.size, self.labels = size, list(labels)
        self._heap: list[tuple] = []  # (-priority, -order, row): the least urgent on top, to be dropped first
        self._order = itertools.count()

    def add(self, paths: Sequence[str], priority: np.ndarray, reasons: Sequence[str], probs: np.ndarray,
            zero_shot_top1: np.ndarray, truths: Sequence[str | None], focus: np.ndarray | None = None) -> None:
        """`focus`: the label each row is about (multi-label: the one nearest its threshold), else the top-1."""
        if self.size <= 0 or not len(paths):
            return
        keep = np.argsort(priority, kind="stable")[:self.size]  # no more than the queue can take from one chunk
        order = np.argsort(-probs[keep], axis=1, kind="stable")
        for k, i in enumerate(keep):
            first = int(focus[i]) if focus is not None else int(order[k, 0])
            second = int(order[k, 1]) if focus is None and probs.shape[1] > 1 else None
            row = (paths[i], self.labels[first], float(probs[i, first]),
                   self.labels[second] if second is not None else None,
                   float(probs[i, second]) if second is not None else None,
                   self.labels[int(zero_shot_top1[i])], reasons[i], float(priority[i]), truths[i])
            entry = (-float(priority[i]), -next(self._order), row)
            if len(self._heap) < self.size:
                heapq.heappush(self._heap, entry)
            elif entry > self._heap[0]:
                heapq.heapreplace(self._heap, entry)

    def write(self, path: Path) -> None:
        rows = [row for _, _, row in sorted(self._heap, reverse=True)]  # most urgent first, then first seen
        columns = list(zip(*rows)) if rows else [[] for _ in range(9)]
        names = ("path", "label", "score", "runner_up", "runner_up_score", "zero_shot_label", "reason", "priority",
                 "truth")
        data = dict(zip(names, columns))
        data["rank"] = list(range(1, len(rows) + 1))
        pq.write_table(pa.table({f.name: pa.array(data[f.name], f.type) for f in REVIEW_SCHEMA},
                                schema=REVIEW_SCHEMA), path)
