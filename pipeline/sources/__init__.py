"""Where images come from: a local folder, a manifest table, webdataset tar shards, or an object-store prefix.

Each source lists records, and reads images:

- A record is (`path`, `size`, `version`) and comes in Arrow record batches, so a listing of any size streams
  in bounded memory; the discover stage fingerprints them, so a rerun notices what was added, removed or
  changed. For sources of kind `images` (folder, manifest, bucket) a record is one image: its key as written in
  every output, its size (-1 when unknown) and what the source reports as its version (a file's mtime, an
  object's ETag). For kind `shards` (tar) a record is one shard; its images are known as it is read.
- `read(path)` (kind `images`) returns one image's bytes; `members(path)` (kind `shards`) streams a shard's
  images. Both raise `ImageReadError`, transient unless the failure lies in the data itself (a missing file, a
  truncated shard).
- `truth()` is the ground truth the source carries itself (a manifest's label column) as a (path, truth) table,
  or None.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import pyarrow as pa

# Paths as raw bytes: a file name that is not valid UTF-8 must still round-trip to the same file.
RECORDS_SCHEMA = pa.schema([("path", pa.binary()), ("size", pa.int64()), ("version", pa.string())])
BATCH_ROWS = 65_536


class Source(Protocol):
    kind: str  # "images" or "shards"

    def describe(self) -> str:
        """How the source is named in logs and in the outputs' metadata."""

    def records(self) -> Iterator[pa.RecordBatch]:
        """Every record, in bytewise order of path."""

    def truth(self) -> pa.Table | None:
        """Ground truth carried by the source itself: a table of (path, truth)."""


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


FORMATS = ("auto", "folder", "manifest", "tar", "bucket")


def detect_format(location: str, extensions) -> str:
    """What `dataset.path` names, from the value (and, for a folder or a bucket prefix, what it holds)."""
    from .folder import normalise_extensions
    from .manifest import SUFFIXES
    from .remote import is_url, scheme
    from .tars import is_tar

    lower = location.lower()
    if lower.endswith(SUFFIXES):
        return "manifest"
    if "{" in location or is_tar(lower):
        return "tar"
    suffixes = normalise_extensions(extensions)
    if is_url(location):
        if scheme(location) in ("http", "https"):
            from ..errors import UserError

            raise UserError(f"dataset.path {location}: an http(s) URL must name a manifest ({', '.join(SUFFIXES)}) "
                            "or tar shards (.tar, or a brace pattern); it cannot be listed")
        return "bucket"  # a prefix of tar shards is recognised once listed (see open_source)
    import os

    try:
        names = [e.name.lower() for e in os.scandir(location) if e.is_file()]
    except OSError:
        return "folder"  # reported by the folder source
    has_tars = any(is_tar(n) for n in names)
    has_images = any(os.path.splitext(n)[1] in suffixes for n in names)
    return "tar" if has_tars and not has_images else "folder"


def open_source(location: str, *, image: bool = False, format: str = "auto", extensions=(), path_column: str = "path",
                truth_column: str = "label", truth_member: str | None = None, storage_options: dict | None = None,
                retries: int = 3, timeout: float = 60.0) -> "Source":
    """The source that `dataset.path` (or `dataset.image`) names; `format` forces what it is."""
    from .bucket import BucketSource
    from .folder import FolderSource
    from .manifest import ManifestSource
    from .tars import TarSource, is_tar

    if image:
        return FolderSource(location, extensions)
    if format not in FORMATS:
        from ..errors import UserError

        raise UserError(f"dataset.format={format!r} is not one of {', '.join(FORMATS)}")
    kind = detect_format(location, extensions) if format == "auto" else format
    remote = dict(storage_options=storage_options, retries=retries, timeout=timeout)
    if kind == "manifest":
        return ManifestSource(location, path_column, truth_column, **remote)
    if kind == "tar":
        return TarSource(location, extensions, truth_member, **remote)
    if kind == "bucket":
        bucket = BucketSource(location, extensions, **remote)
        if format == "auto" and _only_tars(bucket, is_tar):
            return TarSource(location, extensions, truth_member, **remote)
        return bucket
    return FolderSource(location, extensions)


def _only_tars(bucket, is_tar) -> bool:
    import os

    keys = [key for key, _ in bucket.objects()]
    has_images = any(os.path.splitext(k)[1].lower() in bucket.suffixes for k in keys)
    return any(is_tar(k) for k in keys) and not has_images
