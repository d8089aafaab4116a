"""Images under a prefix of an object store (s3://bucket/prefix/, gs://bucket/prefix/).

An image's key is its object key relative to the prefix; its record carries the object's size and ETag (or
generation), so an unchanged bucket reuses everything and a changed object re-encodes only its chunk. Listing
order is the store's, which for S3 and GCS is the bytewise order of keys.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator

from . import batches_of
from .folder import normalise_extensions
from .remote import Remote, check_reachable, strip_protocol
from .tars import _object_version


class BucketSource:
    kind = "images"
    format = "bucket"
    root = None  # no local files to show in a report

    def __init__(self, location: str, extensions: Iterable[str], storage_options: dict[str, Any] | None = None,
                 retries: int = 3, timeout: float = 60.0) -> None:
        self.location = location if location.endswith("/") else location + "/"
        self.remote = Remote(location, storage_options, retries, timeout)
        self.prefix = strip_protocol(self.location).rstrip("/") + "/"
        self.suffixes = normalise_extensions(extensions)
        check_reachable(self.remote, self.prefix.rstrip("/"), "dataset.path (bucket)")

    def describe(self) -> str:
        return self.location

    def objects(self) -> Iterator[tuple[str, dict]]:
        """(key relative to the prefix, info) of every object under the prefix, in key order."""
        found = self.remote.fs.find(self.prefix.rstrip("/"), detail=True)
        for path, info in sorted(found.items()):
            yield path[len(self.prefix):], info

    def records(self):
        return batches_of((key.encode("utf-8", "surrogateescape"), int(info.get("size") or -1), _object_version(info))
                          for key, info in self.objects() if os.path.splitext(key)[1].lower() in self.suffixes)

    def truth(self) -> None:
        return None

    def read(self, path: bytes) -> bytes:
        return self.remote.read(self.prefix + path.decode("utf-8", "surrogateescape"))
