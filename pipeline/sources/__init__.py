"""Where images come from: a local folder, a manifest table, webdataset tar shards, or an object-store prefix.

Each source lists records, and reads images:

- A record is (`path`, `size`, `version`) and comes in Arrow record batches, so a listing of any size streams
  in bounded memory; the discover stage fingerprints them, so a rerun notices what was added, removed or
  changed. For sources of kind `images` (folder, manifest, bucket) a record is one image: its key as written in
  every output, its size (-1 when unknown) and what the source reports as its version (a file's mtime, an
  object's ETag). For kind `tars` a record is one tar file; its images are known as it is read.
- `read(path)` (kind `images`) returns one image's bytes; `members(path)` (kind `tars`) streams a tar file's
  images. Both raise `ImageReadError`, transient unless the failure lies in the data itself (a missing file, a
  truncated tar file).
- `truth()` is the ground truth the source carries itself (a manifest's label column) as (path, truth) record
  batches in path order, or None.

One path for what decides a result: a stage never gets a source object built elsewhere. It hashes
`DatasetSettings.params(use)` and opens its source from exactly those params (`SourceProvider.open`); a setting
left out of them is None in the source, and a method that would need it fails at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import pyarrow as pa

# Paths as raw bytes: a file name that is not valid UTF-8 must still round-trip to the same file.
RECORDS_SCHEMA = pa.schema([("path", pa.binary()), ("size", pa.int64()), ("version", pa.string())])
BATCH_ROWS = 65_536


class Source(Protocol):
    kind: str  # IMAGES or TARS
    # For each use (RECORDS, READING, TRUTH), the settings (dataset.* keys) that decide what the source gives
    # for it: the stage that uses it so hashes exactly those (see `DatasetSettings.params`).
    SETTINGS: dict[str, tuple[str, ...]]

    def describe(self) -> str:
        """How the source is named in logs and in the outputs' metadata."""

    def records(self) -> Iterator[pa.RecordBatch]:
        """Every record, in bytewise order of path."""

    def truth(self) -> Iterator[pa.RecordBatch] | None:
        """Ground truth carried by the source itself: (path, truth) batches in path order."""


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


FOLDER, MANIFEST, TAR, BUCKET = "folder", "manifest", "tar", "bucket"
FORMATS = (FOLDER, MANIFEST, TAR, BUCKET)
IMAGES, TARS = "images", "tars"  # a source's kind: a record per image, or a record per tar file
RECORDS, READING, TRUTH = "records", "reading", "truth"  # what a stage does with a source (see SETTINGS)
DATASET, EXAMPLES = "dataset", "examples"  # the inputs that are sets of images: dataset.*, labels.examples


@dataclass(frozen=True)
class Location:
    """Where a dataset lives and how to reach it. It decides no result (a moved dataset is the same dataset), so
    it is never hashed; everything that does decide one is a setting (see SETTINGS), hashed by the stages."""

    path: str
    retries: int  # remote reads: attempts after the first (dataset.retries)
    timeout: float  # remote reads: seconds per request (dataset.io_timeout)
    storage_options: dict[str, Any] | None = None
    single_image: bool = False  # dataset.image: one file


@dataclass(frozen=True)
class DatasetSettings:
    """What the config says about a set of images that decides results: its format (resolved, never "auto") and
    its settings (for the dataset: extensions, path_column, truth_column, truth_member), each as it is hashed.
    `input` names which set it is: the dataset, or the examples (labels.examples)."""

    format: str
    values: dict[str, Any]
    input: str = DATASET

    def params(self, use: str) -> dict[str, Any]:
        """The settings that decide what a stage gets from the source when it uses it for `use` (RECORDS:
        listing; READING: the bytes, and for tar files which members are images and their truth; TRUTH: the
        truth the source carries), with the format: what that stage hashes, and all it may open its source
        from."""
        wanted = source_class(self.format).SETTINGS[use]
        return {"input": self.input, "format": self.format, **{name: self.values[name] for name in wanted}}


def source_class(format: str) -> type:
    from .bucket import BucketSource
    from .folder import FolderSource
    from .manifest import ManifestSource
    from .tars import TarSource

    return {FOLDER: FolderSource, MANIFEST: ManifestSource, TAR: TarSource, BUCKET: BucketSource}[format]


class SourceProvider:
    """Opens a set of images for a stage from the params that stage hashes, and from nothing else: a setting that
    decides a result cannot reach a stage unhashed. Knows only where each input is (its `Location`)."""

    def __init__(self, locations: dict[str, Location]) -> None:
        self.locations = dict(locations)
        self._opened: dict[str, Source] = {}

    def open(self, params: dict[str, Any]) -> "Source":
        """The source for `params` (from `DatasetSettings.params`); each distinct params opened once per
        process."""
        import json

        key = json.dumps(params, sort_keys=True)
        if key not in self._opened:
            settings = {name: value for name, value in params.items() if name not in ("input", "format")}
            location = self.locations[params["input"]]
            self._opened[key] = source_class(params["format"])(location, **settings)
        return self._opened[key]

    def __getstate__(self) -> dict:  # to decode workers: reopened there, never a parent's open handles
        return {"locations": self.locations, "_opened": {}}


def resolve_format(location: Location, requested: str, extensions) -> str:
    """What the dataset is: `requested`, or for "auto" what the location names (see `detect_format`); a bucket
    prefix that holds tar files and no images is tar shards."""
    if location.single_image:
        return FOLDER
    if requested != "auto":
        return requested
    found = detect_format(location.path, extensions)
    if found == BUCKET:
        from .bucket import BucketSource

        if BucketSource(location, extensions=list(extensions)).holds_only_tars():
            return TAR
    return found


def detect_format(location: str, extensions) -> str:
    """What `dataset.path` names, from the value (and, for a local folder, what it holds)."""
    from .folder import normalise_extensions
    from .manifest import SUFFIXES
    from .remote import is_url, scheme
    from .tars import is_tar

    lower = location.lower()
    if lower.endswith(SUFFIXES):
        return MANIFEST
    if "{" in location or is_tar(lower):
        return TAR
    suffixes = normalise_extensions(extensions)
    if is_url(location):
        if scheme(location) in ("http", "https"):
            from ..errors import UserError

            raise UserError(f"dataset.path {location}: an http(s) URL must name a manifest ({', '.join(SUFFIXES)}) "
                            "or tar shards (.tar, or a brace pattern); it cannot be listed")
        return BUCKET
    import os

    try:
        names = [e.name.lower() for e in os.scandir(location) if e.is_file()]
    except OSError:
        return FOLDER  # reported by the folder source
    has_tars = any(is_tar(n) for n in names)
    has_images = any(os.path.splitext(n)[1] in suffixes for n in names)
    return TAR if has_tars and not has_images else FOLDER
