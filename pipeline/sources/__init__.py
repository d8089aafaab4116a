"""Where images come from: a source lists its images as records, and reads one image's bytes.

A record is (`path`, `size`, `version`): the image's key as written in every output, its size in bytes (-1 when
unknown, e.g. a dangling link), and what the source reports as its version (a file's mtime in ns). Records come in
bytewise order of `path`, in Arrow record batches, so a listing of any size streams in bounded memory. The
discover stage fingerprints them: a rerun notices a changed, added or removed image by its record.

`read(path)` returns the bytes or raises `ImageReadError` (transient unless the record itself says the image
is unreadable, e.g. a dangling link or a FIFO).
"""

from __future__ import annotations

from typing import Iterator, Protocol

import pyarrow as pa

# Paths as raw bytes: a file name that is not valid UTF-8 must still round-trip to the same file.
RECORDS_SCHEMA = pa.schema([("path", pa.binary()), ("size", pa.int64()), ("version", pa.string())])
BATCH_ROWS = 65_536


class Source(Protocol):
    def describe(self) -> str:
        """How the source is named in logs and in the outputs' metadata."""

    def records(self) -> Iterator[pa.RecordBatch]:
        """Every image's record, in bytewise order of path."""

    def read(self, path: bytes) -> bytes:
        """One image's bytes; raises ImageReadError."""


def batches_of(rows: Iterator[tuple[bytes, int, str]], rows_per_batch: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Group (path, size, version) tuples into record batches of RECORDS_SCHEMA."""
    block: list[tuple[bytes, int, str]] = []
    for row in rows:
        block.append(row)
        if len(block) == rows_per_batch:
            yield _batch(block)
            block = []
    if block:
        yield _batch(block)


def _batch(rows: list[tuple[bytes, int, str]]) -> pa.RecordBatch:
    paths, sizes, versions = zip(*rows)
    return pa.RecordBatch.from_arrays([pa.array(paths, pa.binary()), pa.array(sizes, pa.int64()),
                                       pa.array(versions, pa.string())], schema=RECORDS_SCHEMA)
