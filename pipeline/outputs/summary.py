"""The multirun summary: `SweepSummary`, a Hydra callback, writes one summary.parquet for a whole multirun,
once, when it ends: a row per (job, label set, label)."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ..engine.files import atomic_path
from .metrics import recall_by_label
from .writers import read_metadata

log = logging.getLogger(__name__)

SUMMARY_SCHEMA = pa.schema([
    ("job", pa.string()), ("label_set", pa.string()), ("label", pa.string()), ("count", pa.int64()),
    ("share", pa.float64()), ("mean_score", pa.float64()), ("unknown_share", pa.float64()),
    ("truth_count", pa.int64()), ("recall", pa.float64()),
])


def job_rows(job: str, predictions: Path) -> list[dict[str, Any]]:
    """A row per label of one job: how many images got it, their mean score, and (with truth) its recall: the
    share of the images truly of that label that got it. Streams the file by row group."""
    meta = read_metadata(predictions)
    counts: Counter = Counter()
    score_sums: Counter = Counter()
    truth_counts: Counter = Counter()
    confusion: Counter = Counter()
    total = unknown = 0
    for batch in pq.ParquetFile(predictions).iter_batches(columns=["label", "label_index", "score", "truth"]):
        labels, truths = batch.column("label").to_pylist(), batch.column("truth").to_pylist()
        scores = batch.column("score").to_numpy()
        total += len(labels)
        unknown += int((batch.column("label_index").to_numpy() < 0).sum())
        counts.update(labels)
        for label, score in zip(labels, scores.tolist()):
            score_sums[label] += score
        known = [(t, p) for t, p in zip(truths, labels) if t is not None]
        truth_counts.update(t for t, _ in known)
        confusion.update(known)
    recall = recall_by_label(confusion)
    names = list(meta["label_set"]["labels"]) + sorted(set(counts) - set(meta["label_set"]["labels"]))
    return [{"job": job, "label_set": meta["label_set"]["name"], "label": name, "count": counts[name],
             "share": counts[name] / total if total else 0.0,
             "mean_score": score_sums[name] / counts[name] if counts[name] else None,
             "unknown_share": unknown / total if total else 0.0, "truth_count": truth_counts[name],
             "recall": recall.get(name)} for name in names]


def write_sweep_summary(sweep_dir: Path) -> Path | None:
    rows = []
    for job_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name)):
        predictions = job_dir / "predictions.parquet"
        if predictions.is_file():
            rows += job_rows(job_dir.name, predictions)
    if not rows:
        return None
    target = sweep_dir / "summary.parquet"
    with atomic_path(target) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA), tmp)
    return target


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        target = write_sweep_summary(Path(config.hydra.sweep.dir))
        if target is not None:
            log.info("sweep summary: %s", target)
