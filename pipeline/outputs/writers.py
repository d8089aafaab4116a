"""Output files: predictions.parquet, errors.parquet and res.json, all streamed chunk by chunk.

Writers only write: what each image's label is was decided by `pipeline.zeroshot`. Schemas are explicit (pyarrow
infers nothing from the first rows), so a chunk with only nulls where another has values still matches, and
pandas, polars and DuckDB read the same types. Nothing is held whole in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..zeroshot import Decisions

METADATA_KEY = b"clip_pipeline"

ERRORS_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("error_type", pa.string(), nullable=False),
    pa.field("message", pa.string(), nullable=False),
    # true: the failure lay outside the image's bytes (I/O, permission, timeout) and the next run tries again;
    # false: the bytes do not decode, and the image is not tried again until it changes
    pa.field("transient", pa.bool_(), nullable=False),
])


def predictions_schema(metadata: dict[str, Any], multilabel: bool = False) -> pa.Schema:
    fields = [
        pa.field("path", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        *([pa.field("labels", pa.list_(pa.string()), nullable=False)] if multilabel else []),  # at the threshold
        pa.field("label_index", pa.int32(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("topk_labels", pa.list_(pa.string()), nullable=False),
        pa.field("topk_scores", pa.list_(pa.float32()), nullable=False),
        pa.field("probs", pa.list_(pa.float32()), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("truth", pa.string(), nullable=True),  # ground truth when known (dataset.truth), else null
        pa.field("is_example", pa.bool_(), nullable=False),  # one of labels.examples: left out of the metrics
    ]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata, ensure_ascii=False, sort_keys=True)})


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The run's description stored in a predictions.parquet ({} when absent or unreadable)."""
    raw = (pq.read_schema(path).metadata or {}).get(METADATA_KEY)
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


class PredictionsWriter:
    def __init__(self, path: Path, labels: Sequence[str], metadata: dict[str, Any], multilabel: bool = False) -> None:
        self.labels = np.asarray(labels, dtype=object)
        self.multilabel = multilabel
        self.schema = predictions_schema(metadata, multilabel)
        self._writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        self.rows = 0

    def write(self, paths: Sequence[str], decided: Decisions, probs: np.ndarray, sizes: np.ndarray,
              truths: Sequence[str | None], is_example: np.ndarray) -> None:
        """One row group: `probs` is (n, L) float32; `sizes` is (n, 2) width, height."""
        n, num_labels = probs.shape
        k = decided.topk_index.shape[1]
        offsets_k = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
        offsets_l = pa.array(np.arange(0, (n + 1) * num_labels, num_labels, dtype=np.int32))
        table = pa.Table.from_arrays([
            pa.array(paths, pa.string()),
            pa.array(decided.labels, pa.string()),
            *([pa.array(decided.label_sets, pa.list_(pa.string()))] if self.multilabel else []),
            pa.array(decided.label_index, pa.int32()),
            pa.array(decided.score, pa.float32()),
            pa.ListArray.from_arrays(offsets_k, pa.array(self.labels[decided.topk_index].reshape(-1), pa.string())),
            pa.ListArray.from_arrays(offsets_k, pa.array(decided.topk_score.reshape(-1), pa.float32())),
            pa.ListArray.from_arrays(offsets_l, pa.array(probs.reshape(-1).astype(np.float32))),
            pa.array(sizes[:, 0].astype(np.int32)),
            pa.array(sizes[:, 1].astype(np.int32)),
            pa.array(truths, pa.string()),
            pa.array(is_example, pa.bool_()),
        ], schema=self.schema)
        self._writer.write_table(table)
        self.rows += n

    def close(self) -> None:
        self._writer.close()


class ErrorsWriter:
    def __init__(self, path: Path) -> None:
        self._writer = pq.ParquetWriter(path, ERRORS_SCHEMA, compression="zstd")
        self.rows = 0

    def write(self, rows: Sequence[tuple[str, str, str, str, bool]]) -> None:
        """Rows of (path, stage, error_type, message, transient)."""
        if not rows:
            return
        columns = list(zip(*rows))
        self._writer.write_table(pa.Table.from_arrays(
            [pa.array(c, f.type) for c, f in zip(columns, ERRORS_SCHEMA)], schema=ERRORS_SCHEMA))
        self.rows += len(rows)

    def close(self) -> None:
        self._writer.close()


class ResJsonWriter:
    """`res.json` as the vendor example writes it (image -> label, sorted), streamed one entry per line; in
    multi-label mode image -> list of labels."""

    def __init__(self, path: Path) -> None:
        self._fh = open(path, "w", encoding="utf-8")
        self._fh.write("{")
        self._first = True

    def write(self, paths: Sequence[str], labels: Sequence) -> None:
        for path, label in zip(paths, labels):
            sep = "\n" if self._first else ",\n"
            self._fh.write(f"{sep}  {json.dumps(path, ensure_ascii=False)}: "
                           f"{json.dumps(label, ensure_ascii=False)}")
            self._first = False

    def close(self) -> None:
        self._fh.write("\n}\n" if not self._first else "}\n")
        self._fh.close()


def _vectors(matrix: np.ndarray) -> pa.FixedSizeListArray:
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def _meta(metadata: dict[str, Any]) -> dict[bytes, str]:
    return {METADATA_KEY: json.dumps(metadata, ensure_ascii=False, sort_keys=True)}


class EmbeddingsWriter:
    """embeddings.parquet: each classified image's L2-normalised embedding, row for row beside
    predictions.parquet (same paths, same order)."""

    def __init__(self, path: Path, dim: int, metadata: dict[str, Any]) -> None:
        self.schema = pa.schema([pa.field("path", pa.string(), nullable=False),
                                 pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False)],
                                metadata=_meta(metadata))
        self._writer = pq.ParquetWriter(path, self.schema, compression="zstd")

    def write(self, paths: Sequence[str], embeddings: np.ndarray) -> None:
        self._writer.write_table(pa.Table.from_arrays([pa.array(paths, pa.string()), _vectors(embeddings)],
                                                      schema=self.schema))

    def close(self) -> None:
        self._writer.close()


def write_label_embeddings(path: Path, labels: Sequence[str], embeddings: np.ndarray, logit_scale: float,
                           metadata: dict[str, Any]) -> None:
    """label_embeddings.parquet: each label's embedding (templates ensembled), with the logit scale in the
    metadata, so that `softmax(logit_scale * image @ labels.T)` gives back `probs`."""
    schema = pa.schema([pa.field("label", pa.string(), nullable=False),
                        pa.field("embedding", pa.list_(pa.float32(), embeddings.shape[1]), nullable=False)],
                       metadata=_meta({**metadata, "logit_scale": logit_scale}))
    pq.write_table(pa.Table.from_arrays([pa.array(labels, pa.string()), _vectors(embeddings)], schema=schema), path)
