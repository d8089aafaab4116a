"""The cache's shared copy on object storage (`CACHE=s3://bucket/prefix`, `gs://...`), through fsspec.

Object stores have no rename and no `flock`; what they do have is enough. A single PUT is atomic: a reader sees
the old object, or none, or all of the new one. A conditional PUT (`If-None-Match: *` on S3, `ifGenerationMatch=0`
on GCS; fsspec's `mode="create"`) fails when the object exists, which seals an entry and takes a lease.

The runner keeps a local working copy of what it uses (a temporary directory of the run) and mirrors it here:

- an entry's files go up under a prefix of their own (`<stage>/<fingerprint>/<upload id>/...`), then
  `<stage>/<fingerprint>/_manifest.json`, naming that prefix, is created conditionally: the entry exists exactly
  when its manifest does, one writer wins, and a killed upload leaves only files that no manifest names;
- chunks go up under their content-addressed names (`<stage>/pool/<identity>/<key[:2]>/<key>.<sha>.chunk`), so two
  writers of one chunk write the same bytes;
- a lease (`<stage>/<fingerprint>.lease`, created conditionally, renewed while held, broken when it expires) keeps
  two runs from computing one entry at once; like the file locks it only saves duplicate work.

Credentials and the endpoint come from the standard environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...;
`GOOGLE_APPLICATION_CREDENTIALS`), never from the config. Every request is counted by kind (`requests`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections import Counter
from typing import Any, Iterator

from .files import has_exited, owner_tag

log = logging.getLogger(__name__)

# A holder renews its lease every third of this; a lease not renewed this long is broken (at once when its holder
# ran on this host and has exited).
LEASE_SECONDS = 60.0
_WAIT_LOG_SECONDS = 30.0
PAGE = 1000


class Store:
    """Keys (`/`-separated, relative to the URL) on one bucket prefix; picklable (the filesystem is made per
    process, as async filesystems hold an event loop that does not survive a fork)."""

    def __init__(self, url: str) -> None:
        self.url = str(url).rstrip("/")
        self.protocol = self.url.split("://", 1)[0].lower()
        self.root = self.url.split("://", 1)[1]
        self.requests: Counter = Counter()
        self._fs, self._pid = None, None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fs": None, "_pid": None, "requests": Counter()}

    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():
            import fsspec

            # skip_instance_cache: credentials come from the environment, which fsspec's cache key does not see
            self._fs, self._pid = fsspec.filesystem(self.protocol, skip_instance_cache=True), os.getpid()
        return self._fs

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def get(self, key: str, kind: str = "get") -> bytes | None:
        """The object's bytes, or None when there is none (counted under `kind`)."""
        self.requests[kind] += 1
        try:
            return self.fs.cat_file(self.path(key))
        except FileNotFoundError:
            return None

    def put(self, key: str, data: bytes, kind: str = "put") -> None:
        self.requests[kind] += 1
        self.fs.pipe_file(self.path(key), data)

    def create(self, key: str, data: bytes) -> bool:
        """PUT only if no object is there (one conditional request); False when one was."""
        self.requests["conditional put"] += 1
        try:
            self.fs.pipe_file(self.path(key), data, mode="create")
            return True
        except FileExistsError:
            return False

    def upload(self, local: str | os.PathLike, key: str) -> None:
        """A local file as one object, streamed (multipart above the store's part size; it appears whole)."""
        self.requests["put"] += 1
        self.fs.put_file(str(local), self.path(key))

    def download(self, key: str, local: str | os.PathLike) -> bool:
        """The object into a local file, streamed; False when there is none."""
        self.requests["get"] += 1
        try:
            self.fs.get_file(self.path(key), str(local))
            return True
        except FileNotFoundError:
            return False

    def delete(self, key: str) -> None:
        self.requests["delete"] += 1
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(key))

    def list(self, prefix: str) -> dict[str, int]:
        """Every object under `prefix` (key relative to it -> size), a page of 1,000 per request."""
        base = self.path(prefix).rstrip("/")
        self.fs.invalidate_cache(base)  # other processes write here too: never answer from a listing cache
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            found = {}
        self.requests["list"] += max(1, -(-len(found) // PAGE))
        return {name[len(base) + 1:]: int(info.get("size") or 0) for name, info in found.items()
                if name.startswith(base + "/")}

    def get_json(self, key: str) -> Any | None:
        data = self.get(key)
        return None if data is None else json.loads(data)

    def check(self) -> None:
        """Raise when the bucket cannot be reached (before any work)."""
        bucket = self.root.split("/", 1)[0]
        self.requests["list"] += 1
        if not self.fs.exists(bucket):
            raise FileNotFoundError(f"bucket {bucket!r} of {self.url} does not exist")

    def request_line(self) -> str:
        total = sum(self.requests.values())
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.requests.items()) if n)
        return f"{total} requests to {self.url} ({kinds or 'none'})"

    @contextlib.contextmanager
    def lease(self, key: str) -> Iterator[None]:
        """Hold the lease at `key` (see the module doc); wait while another live holder has it."""
        started, delay = time.monotonic(), 0.2
        next_log = started + _WAIT_LOG_SECONDS
        while not self._take(key):
            time.sleep(delay)
            delay = min(2.0, delay * 2)
            if time.monotonic() >= next_log:
                log.info("waiting for %s (held by another run) for %.0fs", self.path(key), time.monotonic() - started)
                next_log += _WAIT_LOG_SECONDS
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(key, stop), daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            self.delete(key)

    def _take(self, key: str) -> bool:
        if self.create(key, self._lease_body()):
            return True
        held = self.get_json(key) or {}
        holder = str(held.get("holder", ""))
        if held.get("expires", 0) > time.time() and not has_exited(holder):
            return False
        log.info("breaking the lease %s of %s (%s)", self.path(key), holder or "nobody",
                 "its process has exited" if has_exited(holder) else "expired")
        self.delete(key)  # two breakers may both delete; the create below lets only one of them in
        return self.create(key, self._lease_body())

    def _renew(self, key: str, stop: threading.Event) -> None:
        while not stop.wait(LEASE_SECONDS / 3):
            self.put(key, self._lease_body())

    @staticmethod
    def _lease_body() -> bytes:
        return json.dumps({"holder": owner_tag(), "expires": time.time() + LEASE_SECONDS}).encode()


def upload_id() -> str:
    """A prefix of one upload of an entry's files (see the module doc)."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"
