"""Stage `discover`: list the dataset's images into an Arrow file of records (see `pipeline.sources`).

A content stage: it runs every time (the folder may have changed) and is fingerprinted by the records it wrote,
so everything downstream is reused exactly when no image was added, removed or changed (size or mtime).
The records file is Arrow IPC, uncompressed, read a record batch at a time: no process holds the list whole.
It is read, not memory-mapped: a pass over a mapped file leaves every page it touched resident in the process
(a 10M-image listing: 0.78 GB of RSS after planning), where a read batch is freed once used.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.ipc as ipc

from ..engine import Artifact, StageContext
from ..sources import RECORDS_SCHEMA

log = logging.getLogger(__name__)

VERSION = 12
RECORDS_FILE = "records.arrow"


def discover(ctx: StageContext, *, source: dict) -> None:
    """`source`: the settings that decide the listing (see pipeline.sources.DatasetSettings)."""
    dataset = ctx.execution.sources.open(source)
    count = 0
    with ipc.new_file(ctx.out / RECORDS_FILE, RECORDS_SCHEMA) as writer:
        for batch in dataset.records():
            writer.write_batch(batch)
            count += batch.num_rows
    log.info("discovered %d images in %s", count, dataset.describe())


class Records:
    """The records of a discover entry: `count`, slices, and paths of a slice. A slice touches
    only the record batches it overlaps, so its cost does not grow with the dataset (a shard of a 100M-image
    job reads its paths a batch of images at a time)."""

    def __init__(self, artifact: Artifact | Path) -> None:
        self.path = artifact.file(RECORDS_FILE) if isinstance(artifact, Artifact) else Path(artifact)
        self._reader = ipc.open_file(pa.OSFile(str(self.path)))
        sizes = [self._reader.get_batch(i).num_rows for i in range(self._reader.num_record_batches)]
        self._starts = [0, *itertools.accumulate(sizes)]  # first row of each batch, then the count
        self.count = self._starts[-1]
        self._firsts: list[tuple[bytes, int]] | None = None

    def batches(self) -> Iterator[pa.RecordBatch]:
        for i in range(self._reader.num_record_batches):
            yield self._reader.get_batch(i)

    def table(self) -> pa.Table:
        return self._reader.read_all()

    def slice(self, start: int, stop: int) -> pa.Table:
        stop = min(stop, self.count)
        if start >= stop:
            return self._reader.schema.empty_table()
        first = bisect.bisect_right(self._starts, start) - 1
        last = bisect.bisect_left(self._starts, stop)  # one past the last batch that holds a row of the slice
        batches = [self._reader.get_batch(i) for i in range(first, last)]
        return pa.Table.from_batches(batches, self._reader.schema).slice(start - self._starts[first], stop - start)

    def paths(self, start: int = 0, stop: int | None = None) -> list[bytes]:
        stop = self.count if stop is None else stop
        return self.slice(start, stop).column("path").to_pylist()

    def contains(self, path: bytes) -> bool:
        """Whether a record has this path (records are in bytewise order of path): one batch read."""
        if self._firsts is None:  # the first path of each non-empty batch, once
            self._firsts = [(self._reader.get_batch(i).column(0)[0].as_py(), i)
                            for i in range(self._reader.num_record_batches) if self._starts[i + 1] > self._starts[i]]
        at = bisect.bisect_right(self._firsts, (path, float("inf"))) - 1
        if at < 0:
            return False
        column = self._reader.get_batch(self._firsts[at][1]).column(0).to_pylist()
        at = bisect.bisect_left(column, path)
        return at < len(column) and column[at] == path


def display_path(path: bytes) -> str:
    """A record's key as shown in outputs: UTF-8, with replacement characters where it is not valid UTF-8."""
    return path.decode("utf-8", "replace")


def os_path(path: bytes) -> str:
    """A record's key as the OS layer spells it (surrogate escapes for bytes that are not UTF-8)."""
    return os.fsdecode(path)
