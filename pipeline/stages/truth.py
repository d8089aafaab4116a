"""Stage `truth`: the ground truth per image, when it is known (see `pipeline.outputs.metrics` for the rules).

A content stage: the truth file may change between runs, and downstream stages rerun exactly when it did.
"""

from __future__ import annotations

import logging

from ..engine import Artifact, StageContext
from ..outputs import metrics
from ..sources import TARS
from .discover import Records, display_path

log = logging.getLogger(__name__)

VERSION = 12
TRUTH_FILE = "truth.parquet"


def load_truth(ctx: StageContext, *, records: Artifact, source: dict, mode: str, column: str,
               labels: list[str]) -> None:
    """`mode`: auto (the source's own truth, e.g. a manifest's label column; else folder-per-class when every top
    folder is a label), folders, or file (`execution.truth_file`, a location, so not hashed: this content stage
    is fingerprinted by the truth it read). `source`: the settings that decide the truth the source carries.
    Truth read with the images (a tar file's truth member) reaches classify in the chunks."""
    out = ctx.out / TRUTH_FILE
    dataset = ctx.execution.sources.open(source)
    carried = dataset.truth() if mode == "auto" else None
    if carried is not None:
        metrics.write_truth(out, carried)
    elif mode == "file":
        metrics.write_truth(out, metrics.truth_from_file(ctx.execution.truth_file, column))
    elif dataset.kind == TARS:
        metrics.write_truth(out, None)
    else:
        paths = ([display_path(p) for p in batch.column("path").to_pylist()] for batch in Records(records).batches())
        metrics.write_folder_truth(paths, labels, mode == "folders", out)
    found = _truth_labels(out)
    if found and not found & set(labels):
        log.warning("ground truth labels (%s ...) share nothing with the label set; no metrics are computed",
                    ", ".join(sorted(found)[:5]))
        metrics.write_truth(out, None)


def _truth_labels(path) -> set[str]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    labels: set[str] = set()
    for batch in pq.ParquetFile(path).iter_batches(columns=["truth"]):
        for value in pc.unique(batch.column("truth")).to_pylist():
            labels |= set(value.split(metrics.TRUTH_SEPARATOR))  # a multi-label truth is a set
    return labels


def truth_walk(artifact: Artifact) -> metrics.TruthWalk:
    """The truth, for paths asked in path order; the file is verified against the manifest as it is read."""
    import io

    return metrics.TruthWalk(io.BytesIO(artifact.read_bytes(TRUTH_FILE)))
