"""Output files: predictions.parquet, errors.parquet and res.json, all streamed chunk by chunk.

Schemas are explicit (pyarrow infers nothing from the first rows), so a chunk with only nulls where another has
values still matches, and pandas, polars and DuckDB read the same types. Nothing is held whole in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

METADATA_KEY = b"clip_pipeline"

ERRORS_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("error_type", pa.string(), nullable=False),
    pa.field("message", pa.string(), nullable=False),
])


def predictions_schema(metadata: dict[str, Any]) -> pa.Schema:
    fields = [
        pa.field("path", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("label_index", pa.int32(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("topk_labels", pa.list_(pa.string()), nullable=False),
        pa.field("topk_scores", pa.list_(pa.float32()), nullable=False),
        pa.field("probs", pa.list_(pa.float32()), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("truth", pa.string(), nullable=True),  # ground truth when known (dataset.truth), else null
    ]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata, ensure_ascii=False, sort_keys=True)})


def read_metadata(path: str | Path) -> dict[str, Any]:
    return json.loads(pq.read_schema(path).metadata[METADATA_KEY])


def display_path(path: str) -> str:
    """File names that are not valid UTF-8 (surrogate-escaped by the OS layer) shown with replacement chars."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class PredictionsWriter:
    def __init__(self, path: Path, labels: Sequence[str], metadata: dict[str, Any],
                 min_score: float | None = None, unknown_label: str = "unknown") -> None:
        self.labels = np.asarray(labels, dtype=object)
        self.min_score, self.unknown_label = min_score, unknown_label
        self.schema = predictions_schema(metadata)
        self._writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        self.rows = 0

    def write(self, paths: Sequence[str], probs: np.ndarray, topk: int, sizes: np.ndarray,
              truths: Sequence[str | None]) -> np.ndarray:
        """One row group: `probs` is (n, L) float32; `sizes` is (n, 2) width, height. Returns the top labels."""
        n, num_labels = probs.shape
        k = min(topk, num_labels)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        top_scores = np.take_along_axis(probs, order, axis=1)
        best = order[:, 0].astype(np.int32)
        best_labels = self.labels[best]
        if self.min_score is not None:
            unsure = top_scores[:, 0] < self.min_score
            best = np.where(unsure, -1, best).astype(np.int32)
            best_labels = np.where(unsure, self.unknown_label, best_labels)
        offsets_k = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
        offsets_l = pa.array(np.arange(0, (n + 1) * num_labels, num_labels, dtype=np.int32))
        table = pa.Table.from_arrays([
            pa.array([display_path(p) for p in paths], pa.string()),
            pa.array(best_labels, pa.string()),
            pa.array(best),
            pa.array(top_scores[:, 0].astype(np.float32)),
            pa.ListArray.from_arrays(offsets_k, pa.array(self.labels[order].reshape(-1), pa.string())),
            pa.ListArray.from_arrays(offsets_k, pa.array(top_scores.reshape(-1).astype(np.float32))),
            pa.ListArray.from_arrays(offsets_l, pa.array(probs.reshape(-1).astype(np.float32))),
            pa.array(sizes[:, 0].astype(np.int32)),
            pa.array(sizes[:, 1].astype(np.int32)),
            pa.array(truths, pa.string()),
        ], schema=self.schema)
        self._writer.write_table(table)
        self.rows += n
        return best_labels

    def close(self) -> None:
        self._writer.close()


class ErrorsWriter:
    def __init__(self, path: Path) -> None:
        self._writer = pq.ParquetWriter(path, ERRORS_SCHEMA, compression="zstd")
        self.rows = 0

    def write(self, rows: Sequence[tuple[str, str, str, str]]) -> None:
        if not rows:
            return
        columns = list(zip(*rows))
        columns[0] = [display_path(p) for p in columns[0]]
        self._writer.write_table(pa.Table.from_arrays([pa.array(c, pa.string()) for c in columns],
                                                      schema=ERRORS_SCHEMA))
        self.rows += len(rows)

    def close(self) -> None:
        self._writer.close()


class ResJsonWriter:
    """`res.json` as the vendor example writes it (image -> label, sorted), streamed one entry per line."""

    def __init__(self, path: Path) -> None:
        self._fh = open(path, "w", encoding="utf-8")
        self._fh.write("{")
        self._first = True

    def write(self, paths: Sequence[str], labels: Sequence[str]) -> None:
        for path, label in zip(paths, labels):
            sep = "\n" if self._first else ",\n"
            self._fh.write(f"{sep}  {json.dumps(display_path(path), ensure_ascii=False)}: "
                           f"{json.dumps(label, ensure_ascii=False)}")
            self._first = False

    def close(self) -> None:
        self._fh.write("\n}\n" if not self._first else "}\n")
        self._fh.close()
