"""Images under a prefix of an object store (s3://bucket/prefix/, gs://bucket/prefix/).

An image's key is its object key relative to the prefix; its record carries the object's size and ETag (or
generation), so an unchanged bucket reuses everything and a changed object re-encodes only its chunk. Listing
order is the store's, which for S3 and GCS is the bytewise order of keys.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator

from . import BUCKET, IMAGES, READING, RECORDS, TRUTH, Location, batches_of
from .folder import normalise_extensions, required
from .remote import Remote, check_reachable, strip_protocol
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
        """(key relative to the prefix, info) of every object under the prefix, in key order."""
        found = self.remote.fs.find(self.prefix.rstrip("/"), detail=True)
        for path, info in sorted(found.items()):
            yield path[len(self.prefix):], info

    def holds_only_tars(self) -> bool:
        """Whether the prefix holds tar files and no images (then it is tar shards, not a bucket of images)."""
        keys = [key for key, _ in self.objects()]
        suffixes = required(self.suffixes, "extensions", "a bucket source")
        return any(is_tar(k) for k in keys) and not any(os.path.splitext(k)[1].lower() in suffixes for k in keys)

    def records(self):
        required(self.suffixes, "extensions", "a bucket source")
        return batches_of((key.encode("utf-8", "surrogateescape"), int(info.get("size") or -1), _object_version(info))
                          for key, info in self.objects() if os.path.splitext(key)[1].lower() in self.suffixes)

    def truth(self) -> None:
        return None

    def read(self, path: bytes) -> bytes:
        return self.remote.read(self.prefix + path.decode("utf-8", "surrogateescape"))
