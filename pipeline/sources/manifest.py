"""A manifest table (.csv, .tsv, .parquet or .jsonl, local or at a URL) listing the images.

- The `path` column (`dataset.path_column`) holds each image: a path relative to the manifest's folder, an
  absolute path, or a URL. The key of an image in every output is its path as written.
- A truth column (`dataset.truth_column`, default `label`), when the table has one, is the ground truth.
- A duplicate path is an error; so is a table without its path column (both before any image is read).
- A local image's record carries its size and mtime, so a changed file is encoded again. A URL's record carries
  the table's `version` column when there is one (an ETag, say), else nothing: a URL is then taken as unchanged
  while the manifest is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import UserError
from . import IMAGES, MANIFEST, READING, RECORDS, RECORDS_SCHEMA, TRUTH, Location
from .folder import read_file, required
from .remote import Remote, check_reachable, is_url, strip_protocol

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
        self._table: pa.Table | None = None  # read when listed: a process that reuses a listing never reads it
        self._remotes: dict[str, Remote] = {}

    @property
    def table(self) -> pa.Table:
        if self._table is None:
            self._table = self._read()
        return self._table

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
        paths = self.table.column(required(self.path_column, "path_column", "a manifest source"))
        versions = self.table.column(VERSION_COLUMN) if VERSION_COLUMN in self.table.column_names else None
        for start in range(0, len(paths), 65_536):
            block = paths.slice(start, 65_536).to_pylist()
            given = versions.slice(start, 65_536).to_pylist() if versions is not None else [None] * len(block)
            rows = [self._record(p, v) for p, v in zip(block, given)]
            yield pa.RecordBatch.from_arrays([pa.array([r[0] for r in rows], pa.binary()),
                                              pa.array([r[1] for r in rows], pa.int64()),
                                              pa.array([r[2] for r in rows], pa.string())], schema=RECORDS_SCHEMA)

    def truth(self) -> pa.Table | None:
        from ..outputs.metrics import truth_table

        required(self.path_column, "path_column", "a manifest source")
        if required(self.truth_column, "truth_column", "a manifest source") not in self.columns:
            # known from the schema: the rows are read only for a truth
            return None
        return truth_table(self.table.column(self.path_column), self.table.column(self.truth_column))

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

    def _read(self) -> pa.Table:
        table = _read_table(self.location, self.remote)
        self._check_columns(table.column_names)
        paths = table.column(self.path_column).cast(pa.string())
        if paths.null_count:
            raise UserError(f"manifest {self.location}: {paths.null_count} rows have no '{self.path_column}'")
        table = table.set_column(table.column_names.index(self.path_column), self.path_column, paths)
        # Records come in bytewise order of their keys, as from every source.
        table = table.take(pc.sort_indices(paths.cast(pa.binary())))
        _refuse_duplicates(table.column(self.path_column), self.location)
        for name in (self.path_column, VERSION_COLUMN):
            if name in table.column_names:
                table = table.set_column(table.column_names.index(name), name, table.column(name).cast(pa.string()))
        return table


def _refuse_duplicates(paths: pa.ChunkedArray, location: str) -> None:
    values = paths.combine_chunks()
    if len(values) < 2:
        return
    same = pc.equal(values.slice(1), values.slice(0, len(values) - 1)).to_numpy(zero_copy_only=False)
    repeated = np.flatnonzero(same)
    if len(repeated):
        shown = sorted({values[int(i)].as_py() for i in repeated[:_DUPLICATES_SHOWN]})
        raise UserError(f"manifest {location} lists {len(repeated)} paths more than once ({', '.join(shown)} ...); "
                        "each image must appear once")


def _read_table(location: str, remote: Remote | None, schema_only: bool = False):
    """The whole table, or with `schema_only` only its column names (for parquet the footer; for text formats the
    first block)."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    suffix = next((s for s in SUFFIXES if location.lower().endswith(s)), None)
    if suffix is None:
        raise UserError(f"manifest {location}: expected one of {', '.join(SUFFIXES)}")
    opener = (lambda: remote.fs.open(strip_protocol(location), "rb")) if remote else (lambda: open(location, "rb"))
    try:
        with opener() as fh:
            if suffix == ".parquet":
                return pq.read_schema(fh).names if schema_only else pq.read_table(fh)
            if suffix == ".jsonl":
                return pajson.open_json(fh).schema.names if schema_only else pajson.read_json(fh)
            options = pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
            return pacsv.open_csv(fh, parse_options=options).schema.names if schema_only else \
                pacsv.read_csv(fh, parse_options=options)
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read manifest {location}: {exc}") from None


def _read_schema(location: str, remote: Remote | None) -> list[str]:
    return _read_table(location, remote, schema_only=True)
