"""A manifest table (.csv, .tsv, .parquet or .jsonl, local or at a URL) listing the images.

- The `path` column (`dataset.path_column`) holds each image: a path relative to the manifest's folder, an
  absolute path, or a URL. The key of an image in every output is its path as written.
- A truth column (`dataset.truth_column`, default `label`), when the table has one, is the ground truth.
- A duplicate path is an error; so is a table without its path column (both before any image is read).
- The table is streamed in batches and sorted on disk (`sorting.py`): listing a 100M-row manifest holds one run
  of it in memory, not the table.
- A local image's record carries its size and mtime, so a changed file is encoded again. A URL's record carries
  the table's `version` column when there is one (an ETag, say), else nothing: a URL is then taken as unchanged
  while the manifest is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from ..errors import UserError
from . import BATCH_ROWS, IMAGES, MANIFEST, READING, RECORDS, TRUTH, Location, batches_of
from .folder import read_file, required
from .remote import Remote, check_reachable, is_url, strip_protocol
from .sorting import sorted_rows

SUFFIXES = (".csv", ".tsv", ".parquet", ".jsonl")
VERSION_COLUMN = "version"
_DUPLICATES_SHOWN = 5


class ManifestSource:
    kind = IMAGES
    format = MANIFEST
    # A path is read as the table writes it, whatever the column is called: reading needs no setting.
    SETTINGS = {RECORDS: ("path_column",), READING: (), TRUTH: ("path_column", "truth_column")}

    def __init__(self, location: Location, path_column: str | None = None, truth_column: str | None = None) -> None:
        self.location, self.path_column, self.truth_column = str(location.path), path_column, truth_column
        self.access = location  # how images at URLs are reached: storage options, retries, timeout
        self.remote = self._remote(self.location) if is_url(self.location) else None
        self.columns: list[str] | None = None
        if path_column is not None:  # listing or truth: the table's columns, checked before any image is read
            if self.remote is not None:
                check_reachable(self.remote, strip_protocol(self.location), "dataset.path (manifest)")
            elif not Path(self.location).is_file():
                raise UserError(f"manifest not found: '{self.location}' (dataset.path)")
            self.columns = _read_schema(self.location, self.remote)
            self._check_columns(self.columns)
        self._remotes: dict[str, Remote] = {}

    def _check_columns(self, names: list[str]) -> None:
        if self.path_column is not None and self.path_column not in names:
            raise UserError(f"manifest {self.location} has no column '{self.path_column}' (it has {names}); name "
                            "the image column with dataset.path_column")

    # ------------------------------------------------------------------------------------------------ listing

    def describe(self) -> str:
        return self.location if self.remote else str(Path(self.location).resolve())

    @property
    def root(self) -> Path | None:
        """Where relative local paths are found (for report thumbnails); None for a remote manifest."""
        return None if self.remote else Path(self.location).resolve().parent

    def records(self) -> Iterator[pa.RecordBatch]:
        """Records in bytewise order of path, streamed; a path listed twice stops the listing (after counting
        them all, to say how many)."""
        path_column = required(self.path_column, "path_column", "a manifest source")
        columns = [path_column] + ([VERSION_COLUMN] if VERSION_COLUMN in self.columns else [])
        duplicates = _Duplicates(self.location)

        def rows() -> Iterator[tuple[bytes, int, str]]:
            for row in sorted_rows(self._stream(columns), path_column):
                if not duplicates.seen(row[0]):
                    yield self._record(row[0].decode("utf-8", "surrogateescape"), row[1] if len(row) > 1 else None)
        yield from batches_of(rows())
        duplicates.check()

    def truth(self) -> Iterator[pa.RecordBatch] | None:
        """(path, truth) batches in bytewise order of path, rows without a truth left out; None when the table
        has no truth column (known from its schema: then no row is read)."""
        from ..outputs.metrics import TRUTH_SCHEMA, truth_table

        path_column = required(self.path_column, "path_column", "a manifest source")
        if required(self.truth_column, "truth_column", "a manifest source") not in self.columns:
            return None
        rows = sorted_rows(self._stream([path_column, self.truth_column]), path_column)

        def batches() -> Iterator[pa.RecordBatch]:
            for block in _blocks(rows):
                keys, values = zip(*block)
                table = truth_table(pa.chunked_array([pa.array(keys, pa.binary())]),
                                    pa.chunked_array([pa.array(values, pa.string())]))
                yield from table.cast(TRUTH_SCHEMA).to_batches()
        return batches()

    def _record(self, path: str, version: str | None) -> tuple[bytes, int, str]:
        key = path.encode("utf-8", "surrogateescape")
        where = self._where(path)
        if isinstance(where, tuple) or version is not None:
            return key, -1, "" if version is None else str(version)
        try:
            st = os.stat(where)
            return key, st.st_size, str(st.st_mtime_ns)
        except OSError:
            return key, -1, ""

    # ------------------------------------------------------------------------------------------------ reading

    def read(self, path: bytes) -> bytes:
        where = self._where(path.decode("utf-8", "surrogateescape"))
        if isinstance(where, tuple):
            url, remote_path = where
            protocol = url.split("://", 1)[0]
            if protocol not in self._remotes:
                self._remotes[protocol] = self._remote(url)
            return self._remotes[protocol].read(remote_path)
        return read_file(where)

    def _remote(self, url: str) -> Remote:
        return Remote(url, self.access.storage_options, self.access.retries, self.access.timeout)

    def _where(self, path: str) -> str | tuple[str, str]:
        """A local file path, or (url, path for its filesystem)."""
        if is_url(path):
            return path, strip_protocol(path)
        if self.remote is not None:
            if os.path.isabs(path):
                raise UserError(f"manifest {self.location} lists an absolute local path '{path}'; a remote "
                                "manifest can list URLs or paths relative to itself")
            url = self.location.rsplit("/", 1)[0] + "/" + path
            return url, strip_protocol(url)
        return path if os.path.isabs(path) else os.path.join(os.path.dirname(os.path.abspath(self.location)), path)

    # ------------------------------------------------------------------------------------------ the table

    def _stream(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """The table's `columns` as strings, in batches, in the table's order; a row without a path stops it."""
        for batch in _read_batches(self.location, self.remote, columns):
            arrays = [batch.column(name).cast(pa.string()) for name in columns]
            if arrays[0].null_count:
                raise UserError(f"manifest {self.location}: {arrays[0].null_count} rows have no '{columns[0]}'; "
                                "every row needs a path")
            yield pa.RecordBatch.from_arrays(arrays, names=columns)


class _Duplicates:
    """Paths met twice in a sorted stream: counted, the first few named, the listing refused at its end."""

    def __init__(self, location: str) -> None:
        self.location, self.previous, self.count, self.shown = location, None, 0, []

    def seen(self, key: bytes) -> bool:
        again = key == self.previous
        if again:
            self.count += 1
            if len(self.shown) < _DUPLICATES_SHOWN and (not self.shown or self.shown[-1] != key):
                self.shown.append(key.decode("utf-8", "replace"))
        self.previous = key
        return again

    def check(self) -> None:
        if self.count:
            raise UserError(f"manifest {self.location} lists {self.count} paths more than once "
                            f"({', '.join(self.shown)} ...); each image must appear once")


def _blocks(rows: Iterator[tuple], size: int = BATCH_ROWS) -> Iterator[list[tuple]]:
    block: list[tuple] = []
    for row in rows:
        block.append(row)
        if len(block) == size:
            yield block
            block = []
    if block:
        yield block


def _read_batches(location: str, remote: Remote | None, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """`columns` of the table, in batches as its format allows streaming them (parquet by row group, csv and tsv
    by block, jsonl by lines)."""
    import io

    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    suffix = _suffix(location)
    opener = (lambda: remote.fs.open(strip_protocol(location), "rb")) if remote else (lambda: open(location, "rb"))
    try:
        with opener() as fh:
            if suffix == ".parquet":
                yield from pq.ParquetFile(fh).iter_batches(batch_size=BATCH_ROWS, columns=columns)
            elif suffix == ".jsonl":
                for lines in _line_blocks(fh):
                    yield from pajson.read_json(io.BytesIO(lines)).select(columns).to_batches()
            else:
                parse = pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
                convert = pacsv.ConvertOptions(include_columns=columns, column_types={c: pa.string() for c in columns})
                yield from pacsv.open_csv(fh, parse_options=parse, convert_options=convert)
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError, KeyError) as exc:
        raise UserError(f"cannot read manifest {location}: {exc}") from None


def _line_blocks(fh, size: int = 16 << 20) -> Iterator[bytes]:
    """Whole lines, about `size` bytes at a time."""
    rest = b""
    while chunk := fh.read(size):
        cut = (rest + chunk).rfind(b"\n")
        if cut < 0:
            rest += chunk
            continue
        block, rest = (rest + chunk)[:cut + 1], (rest + chunk)[cut + 1:]
        if block.strip():
            yield block
    if rest.strip():
        yield rest


def _suffix(location: str) -> str:
    suffix = next((s for s in SUFFIXES if location.lower().endswith(s)), None)
    if suffix is None:
        raise UserError(f"manifest {location}: expected one of {', '.join(SUFFIXES)}")
    return suffix


def _read_schema(location: str, remote: Remote | None) -> list[str]:
    """The table's column names: for parquet its footer, for the text formats the first block."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    suffix = _suffix(location)
    opener = (lambda: remote.fs.open(strip_protocol(location), "rb")) if remote else (lambda: open(location, "rb"))
    try:
        with opener() as fh:
            if suffix == ".parquet":
                return pq.read_schema(fh).names
            if suffix == ".jsonl":
                return pajson.open_json(fh).schema.names
            options = pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
            return pacsv.open_csv(fh, parse_options=options).schema.names
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read manifest {location}: {exc}") from None
