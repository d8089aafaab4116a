"""Stage `truth`: the ground truth per image, when it is known (see `pipeline.outputs.metrics` for the rules).

A content stage: the truth file may change between runs, and downstream stages rerun exactly when it did.
"""

from __future__ import annotations

import logging

from ..engine import Artifact, StageContext
from ..outputs import metrics
from .discover import Records, display_path

log = logging.getLogger(__name__)

VERSION = 3
# Besides this module, the code that decides its output (tests/unit/test_stage_versions.py holds VERSION to it).
CODE = ("pipeline.outputs.metrics", "pipeline.sources.manifest")
TRUTH_FILE = "truth.parquet"


def load_truth(ctx: StageContext, *, records: Artifact, mode: str, column: str, labels: list[str]) -> None:
    """`mode`: auto (the source's own truth, e.g. a manifest's label column; else folder-per-class when every top
    folder is a label), folders, or file (`runtime.truth_file`, a location, so not hashed: this content stage is
    fingerprinted by the truth it read). Truth read with the images (tar shards) reaches classify in the chunks."""
    carried = ctx.runtime.source.truth() if mode == "auto" else None
    if carried is not None:
        truth = carried
    elif ctx.runtime.source.kind == "shards":
        truth = {}
    elif mode in ("auto", "folders"):
        paths = [display_path(p) for batch in Records(records).batches() for p in batch.column("path").to_pylist()]
        truth = metrics.truth_from_folders(paths, labels, forced=mode == "folders")
    else:
        truth = metrics.truth_from_file(ctx.runtime.truth_file, column)
    if truth and not set(truth.values()) & set(labels):
        log.warning("ground truth labels (%s ...) share nothing with the label set; no metrics are computed",
                    ", ".join(sorted(set(truth.values()))[:5]))
        truth = {}
    metrics.write_truth(ctx.out / TRUTH_FILE, truth)


def read_truth(artifact: Artifact) -> dict[str, str]:
    import io

    return metrics.read_truth(io.BytesIO(artifact.read_bytes(TRUTH_FILE)))
