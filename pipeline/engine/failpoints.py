"""Failpoints for the reliability suite: named places where a test can kill the process (off unless set).

`PIPELINE_FAULT=<point>:<n>[@<rank>]` sends SIGKILL to this process the n-th time execution reaches
`failpoint(point)` (with `@rank`, only in the torchrun process of that RANK), which is as abrupt as a power cut
for everything above the OS: no `finally`, no atexit, no flush. The points sit where a crash is most likely to
leave something half done (between a write and its rename, between chunks, between stages). Costs one dict
lookup per call when unset.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "PIPELINE_FAULT"
POINTS = (
    "stage.before",  # a stage is about to run
    "stage.before_seal",  # a stage's files are written, its cache entry not yet sealed
    "store.before_seal",  # an entry's files are uploaded to the cache's store, its manifest not yet created
    "chunk.before_rename",  # a chunk file is written, not yet renamed
    "chunk.after_write",  # a chunk is in place; the next is not started
    "classify.row_group",  # a parquet row group has been written
    "publish.file",  # one result file has been replaced in the run directory, the others not yet
)
_hits: Counter = Counter()


def _target() -> tuple[str, int] | None:
    value = os.environ.get(ENV)
    if not value:
        return None
    value, _, rank = value.partition("@")
    if rank and rank != os.environ.get("RANK", "0"):
        return None
    point, _, count = value.rpartition(":")
    if point not in POINTS or not count.isdigit():
        raise ValueError(f"{ENV}={value!r}: expected <point>:<n> with point in {POINTS}")
    return point, int(count)


def failpoint(point: str) -> None:
    target = _target()
    if target is None or target[0] != point:
        return
    _hits[point] += 1
    if _hits[point] == target[1]:
        os.kill(os.getpid(), signal.SIGKILL)
