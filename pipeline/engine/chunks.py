"""A content-addressed pool of chunk files: the unit of progress of long stages.

A chunk is named by a key that the stage derives from what decides its content (the stage's identity and the
records the chunk covers), so a chunk outlives any one cache entry: a rerun after a kill, a shard of another
process, or a run over a folder where one file changed all find the chunks they can reuse by key. Chunks never
move once written; sealing a stage only writes the list of the chunks it used. So no kill, at any moment, can
lose a finished chunk.

On disk: `<pool>/<key[:2]>/<key>.<sha256[:16]>.chunk` (the runner gives each stage identity a pool of its own:
`<cache>/<stage>/pool/<identity[:16]>`), or `....retry.chunk` for a provisional chunk (one that holds
failures worth trying again; it serves the run that wrote it, and the next run computes it again). A file
appears under its final name only when complete (temporary name, fsync, rename), and its name carries its
checksum, which the reader verifies as it reads: one read, no separate verification pass.

With a cache on object storage the pool lives in the store instead (`mirror`: the store and the pool's prefix
there): a chunk is one PUT (atomic: no temporary name needed), the pool is listed once per pool object, and a chunk
is read with one GET. Nothing is kept on local disk, so a node's disk does not fill with a run's embeddings (about
300 GB at 100M images).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from .failpoints import failpoint
from .files import TMP_PREFIX, is_orphan, remove, tmp_name
from .store import Store

log = logging.getLogger(__name__)

SUFFIX = ".chunk"
RETRY = ".retry"
_DIGEST_CHARS = 16


class ChunkCorrupt(Exception):
    """A chunk file is missing, truncated or fails its checksum."""

    def __init__(self, chunk: "ChunkFile", why: str) -> None:
        super().__init__(f"chunk {chunk.name}: {why}")
        self.chunk = chunk


@dataclass(frozen=True)
class ChunkFile:
    key: str
    name: str  # path relative to the pool
    size: int
    digest: str  # sha256 prefix
    final: bool  # False: provisional (holds failures to retry)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ChunkFile":
        return cls(**data)


def _parse(name: str) -> tuple[str, str, bool] | None:
    if not name.endswith(SUFFIX) or name.startswith("."):
        return None
    stem = name[: -len(SUFFIX)]
    final = not stem.endswith(RETRY)
    if not final:
        stem = stem[: -len(RETRY)]
    key, _, digest = stem.rpartition(".")
    if not key or len(digest) != _DIGEST_CHARS:
        return None
    return key, digest, final


class ChunkPool:
    def __init__(self, directory: Path, mirror: tuple[Store, str] | None = None) -> None:
        self.directory = Path(directory)
        self.mirror = mirror  # (store, this pool's prefix in it), for a cache on object storage
        self._mirrored: dict[str, int] | None = None  # name -> size in the store, listed once

    def path(self, chunk: ChunkFile) -> Path:
        return self.directory / chunk.name

    def scan(self) -> dict[str, ChunkFile]:
        """Every chunk in the pool by key (a final chunk wins over a provisional one); removes orphaned
        temporary files of killed writers on this host."""
        found: dict[str, ChunkFile] = {}
        for name, size in [*self._local_files(), *self.mirrored().items()]:
            parsed = _parse(name.rpartition("/")[2])
            if parsed is None:
                continue
            key, digest, final = parsed
            chunk = ChunkFile(key, name, size, digest, final)
            previous = found.get(key)
            if previous is None or (final and not previous.final) or (
                    final == previous.final and chunk.name < previous.name):
                found[key] = chunk
        return found

    def _local_files(self) -> Iterator[tuple[str, int]]:
        if not self.directory.is_dir():
            return
        for sub in os.scandir(self.directory):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                if entry.name.startswith(TMP_PREFIX):
                    if is_orphan(entry.name):
                        remove(Path(entry.path))
                    continue
                yield f"{sub.name}/{entry.name}", entry.stat().st_size

    def mirrored(self) -> dict[str, int]:
        """The chunks in the store (name -> size): one listing per pool object, kept up to date by its puts."""
        if self.mirror is None:
            return {}
        if self._mirrored is None:
            store, prefix = self.mirror
            self._mirrored = store.list(prefix)
        return self._mirrored

    def put(self, key: str, data: bytes, final: bool = True) -> ChunkFile:
        """Store `data` under `key` atomically (temporary file, fsync, rename; or one PUT to the store); a final
        chunk replaces any provisional one of the same key."""
        digest = hashlib.sha256(data).hexdigest()[:_DIGEST_CHARS]
        name = f"{key}.{digest}{'' if final else RETRY}{SUFFIX}"
        chunk = ChunkFile(key, f"{key[:2]}/{name}", len(data), digest, final)
        if self.mirror is not None:
            store, prefix = self.mirror
            store.put(f"{prefix}/{chunk.name}", data, kind="put chunk")
            self.mirrored()[chunk.name] = len(data)
        else:
            self._write_local(chunk, data)
        if final:  # the provisional chunks of this key are replaced
            provisional = f"{key[:2]}/{key}.", RETRY + SUFFIX
            for stale in [n for n in self.mirrored() if n.startswith(provisional[0]) and n.endswith(provisional[1])]:
                self._forget(stale)
            if self.mirror is None:
                for stale in (self.directory / key[:2]).glob(f"{key}.*{RETRY}{SUFFIX}"):
                    stale.unlink(missing_ok=True)
        failpoint("chunk.after_write")
        return chunk

    def _write_local(self, chunk: ChunkFile, data: bytes) -> None:
        path = self.path(chunk)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / tmp_name("chunk")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            failpoint("chunk.before_rename")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _forget(self, name: str) -> None:
        store, prefix = self.mirror
        store.delete(f"{prefix}/{name}")
        self.mirrored().pop(name, None)

    def present(self, chunk: ChunkFile) -> bool:
        """Cheap check (one stat, or the store's listing) that a recorded chunk is still there at its size."""
        try:
            return self.path(chunk).stat().st_size == chunk.size
        except OSError:
            return self.mirrored().get(chunk.name) == chunk.size

    def read(self, chunk: ChunkFile) -> bytes:
        """The chunk's bytes, verified against the checksum in its name (raises ChunkCorrupt)."""
        try:
            data = self.path(chunk).read_bytes()
        except FileNotFoundError:
            data = self._fetch(chunk)
        if len(data) != chunk.size:
            raise ChunkCorrupt(chunk, f"{len(data)} bytes, expected {chunk.size}")
        if hashlib.sha256(data).hexdigest()[:_DIGEST_CHARS] != chunk.digest:
            raise ChunkCorrupt(chunk, "checksum mismatch")
        return data

    def _fetch(self, chunk: ChunkFile) -> bytes:
        """A chunk that is not on local disk: from the store, if the pool has one."""
        data = None
        if self.mirror is not None:
            store, prefix = self.mirror
            data = store.get(f"{prefix}/{chunk.name}", kind="get chunk")
        if data is None:
            raise ChunkCorrupt(chunk, "missing")
        return data

    def discard(self, chunk: ChunkFile) -> None:
        log.warning("discarding chunk %s; it will be computed again", self.path(chunk))
        self.path(chunk).unlink(missing_ok=True)
        if self.mirror is not None:
            self._forget(chunk.name)
