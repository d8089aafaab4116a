"""The multirun summary: `SweepSummary`, a Hydra callback, writes one summary.parquet for a whole multirun,
once, when it ends: a row per (job, label set, label)."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
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
    share of the images truly of that label that got it."""
    meta = read_metadata(predictions)
    table = pq.read_table(predictions, columns=["label", "label_index", "score", "truth"])
    labels = np.asarray(table.column("label").to_pylist(), dtype=object)
    scores = table.column("score").to_numpy()
    truth = np.asarray(table.column("truth").to_pylist(), dtype=object)
    total = len(labels)
    unknown_share = float((table.column("label_index").to_numpy() < 0).mean()) if total else 0.0
    names = list(meta["label_set"]["labels"]) + sorted(set(labels) - set(meta["label_set"]["labels"]))
    known = np.array([t is not None for t in truth], dtype=bool)
    recall = recall_by_label(Counter(zip(truth[known], labels[known])))
    rows = []
    for name in names:
        mine = labels == name
        truly = truth == name
        rows.append({"job": job, "label_set": meta["label_set"]["name"], "label": name, "count": int(mine.sum()),
                     "share": float(mine.mean()) if total else 0.0,
                     "mean_score": float(scores[mine].mean()) if mine.any() else None,
                     "unknown_share": unknown_share, "truth_count": int(truly.sum()),
                     "recall": recall.get(name)})
    return rows


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
