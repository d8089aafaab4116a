"""Images under a prefix of an object store (s3://bucket/prefix/, gs://bucket/prefix/).

An image's key is its object key relative to the prefix; its record carries the object's size and ETag (or
generation), so an unchanged bucket reuses everything and a changed object re-encodes only its chunk. The listing
streams a page at a time (on S3) and is sorted on disk (`sorting.py`): the store's own order is not promised
(S3 directory buckets list unordered), and a 100M-object prefix is never held whole.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator

import pyarrow as pa

from . import BUCKET, IMAGES, READING, RECORDS, TRUTH, Location, batches_of
from .folder import normalise_extensions, required
from .remote import Remote, check_reachable, list_objects, strip_protocol
from .sorting import sorted_rows
from .tars import _object_version, is_tar


class BucketSource:
    kind = IMAGES
    format = BUCKET
    root = None  # no local files to show in a report
    SETTINGS = {RECORDS: ("extensions",), READING: (), TRUTH: ()}

    def __init__(self, location: Location, extensions: Iterable[str] | None = None) -> None:
        path = str(location.path)
        self.location = path if path.endswith("/") else path + "/"
        self.remote = Remote(path, location.storage_options, location.retries, location.timeout)
        self.prefix = strip_protocol(self.location).rstrip("/") + "/"
        self.suffixes = normalise_extensions(extensions) if extensions is not None else None
        if extensions is not None:  # a source that lists: the bucket must be there, and readable
            check_reachable(self.remote, self.prefix.rstrip("/"), "dataset.path (bucket)")

    def describe(self) -> str:
        return self.location

    def objects(self) -> Iterator[tuple[str, dict]]:
        """(key relative to the prefix, info) of every object under the prefix, in the store's order."""
        for path, info in list_objects(self.remote, self.prefix.rstrip("/")):
            yield path[len(self.prefix):], info

    def holds_only_tars(self) -> bool:
        """Whether the prefix holds tar files and no images (then it is tar shards, not a bucket of images); stops
        at the first image."""
        suffixes = required(self.suffixes, "extensions", "a bucket source")
        tars = False
        for key, _ in self.objects():
            if os.path.splitext(key)[1].lower() in suffixes:
                return False
            tars = tars or is_tar(key)
        return tars

    def records(self) -> Iterator[pa.RecordBatch]:
        """Records in bytewise order of key."""
        required(self.suffixes, "extensions", "a bucket source")
        listed = batches_of((key.encode("utf-8", "surrogateescape"), int(info.get("size") or -1), _object_version(info))
                            for key, info in self.objects() if os.path.splitext(key)[1].lower() in self.suffixes)
        return batches_of(sorted_rows(listed, "path"))

    def truth(self) -> None:
        return None

    def read(self, path: bytes) -> bytes:
        return self.remote.read(self.prefix + path.decode("utf-8", "surrogateescape"))
