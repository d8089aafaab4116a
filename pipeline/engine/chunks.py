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
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .failpoints import failpoint
from .files import TMP_PREFIX, is_orphan, remove, tmp_name

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
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path(self, chunk: ChunkFile) -> Path:
        return self.directory / chunk.name

    def scan(self) -> dict[str, ChunkFile]:
        """Every chunk in the pool by key (a final chunk wins over a provisional one); removes orphaned
        temporary files of killed writers on this host."""
        found: dict[str, ChunkFile] = {}
        if not self.directory.is_dir():
            return found
        for sub in os.scandir(self.directory):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                if entry.name.startswith(TMP_PREFIX):
                    if is_orphan(entry.name):
                        remove(Path(entry.path))
                    continue
                parsed = _parse(entry.name)
                if parsed is None:
                    continue
                key, digest, final = parsed
                chunk = ChunkFile(key, f"{sub.name}/{entry.name}", entry.stat().st_size, digest, final)
                previous = found.get(key)
                if previous is None or (final and not previous.final) or (
                        final == previous.final and chunk.name < previous.name):
                    found[key] = chunk
        return found

    def put(self, key: str, data: bytes, final: bool = True) -> ChunkFile:
        """Store `data` under `key` atomically (temporary file, fsync, rename); a final chunk replaces any
        provisional one of the same key."""
        digest = hashlib.sha256(data).hexdigest()[:_DIGEST_CHARS]
        sub = self.directory / key[:2]
        sub.mkdir(parents=True, exist_ok=True)
        name = f"{key}.{digest}{'' if final else RETRY}{SUFFIX}"
        tmp = sub / tmp_name("chunk")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            failpoint("chunk.before_rename")
            os.replace(tmp, sub / name)
        finally:
            tmp.unlink(missing_ok=True)
        if final:
            for stale in sub.glob(f"{key}.*{RETRY}{SUFFIX}"):
                stale.unlink(missing_ok=True)
        failpoint("chunk.after_write")
        return ChunkFile(key, f"{key[:2]}/{name}", len(data), digest, final)

    def present(self, chunk: ChunkFile) -> bool:
        """Cheap check (one stat) that a recorded chunk is still there at its recorded size."""
        try:
            return self.path(chunk).stat().st_size == chunk.size
        except OSError:
            return False

    def read(self, chunk: ChunkFile) -> bytes:
        """The chunk's bytes, verified against the checksum in its name (raises ChunkCorrupt)."""
        try:
            data = self.path(chunk).read_bytes()
        except FileNotFoundError:
            raise ChunkCorrupt(chunk, "missing") from None
        if len(data) != chunk.size:
            raise ChunkCorrupt(chunk, f"{len(data)} bytes, expected {chunk.size}")
        if hashlib.sha256(data).hexdigest()[:_DIGEST_CHARS] != chunk.digest:
            raise ChunkCorrupt(chunk, "checksum mismatch")
        return data

    def discard(self, chunk: ChunkFile) -> None:
        log.warning("discarding chunk %s; it will be computed again", self.path(chunk))
        self.path(chunk).unlink(missing_ok=True)
