"""Sorting more rows than memory should hold (a 100M-row manifest): runs of RUN_ROWS rows sorted in memory and
spilled to temporary Arrow files on local disk, then merged, a small batch of each run at a time. Peak memory is
one run plus a batch per run, whatever the number of rows."""

from __future__ import annotations

import heapq
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

RUN_ROWS = 1 << 18  # rows sorted in memory at a time (a run of manifest paths: tens of MB)
MERGE_ROWS = 1024  # rows read from each run at a time while merging


def sorted_rows(batches: Iterable[pa.RecordBatch], key: str, run_rows: int | None = None) -> Iterator[tuple]:
    """Every row of `batches` as a tuple (the key first, as bytes: the UTF-8 of a string; then the other columns
    in order), in bytewise order of the key, the order of every listing; rows with equal keys keep their order."""
    with tempfile.TemporaryDirectory(prefix="sort-runs-") as spill:
        runs = list(_write_runs(batches, key, run_rows or RUN_ROWS, Path(spill)))
        yield from heapq.merge(*(_read_run(path) for path in runs), key=lambda row: row[0])


def _write_runs(batches: Iterable[pa.RecordBatch], key: str, run_rows: int, spill: Path) -> Iterator[Path]:
    pending: list[pa.RecordBatch] = []
    rows = 0
    for batch in batches:
        pending.append(batch)
        rows += batch.num_rows
        if rows >= run_rows:
            yield _spill(pending, key, spill)
            pending, rows = [], 0
    if pending:
        yield _spill(pending, key, spill)


def _spill(batches: list[pa.RecordBatch], key: str, spill: Path) -> Path:
    table = pa.Table.from_batches(batches)
    keys = table.column(key).cast(pa.binary())
    others = [name for name in table.column_names if name != key]
    ordered = pa.table([keys, *(table.column(name) for name in others)], names=[key, *others])
    ordered = ordered.take(pc.sort_indices(keys))  # stable: equal keys keep their order
    path = spill / f"run-{len(list(spill.iterdir())):06d}.arrow"
    with ipc.new_file(str(path), ordered.schema) as writer:
        writer.write_table(ordered, max_chunksize=MERGE_ROWS)
    return path


def _read_run(path: Path) -> Iterator[tuple]:
    with pa.OSFile(str(path)) as source:  # read, not mapped: a mapped run stays resident once merged
        reader = ipc.open_file(source)
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            yield from zip(*(column.to_pylist() for column in batch.columns))
