"""What to encode: the records cut into groups and chunks, each chunk keyed by what decides its content.

For sources with a record per image (folder, manifest, bucket) the records are cut into chunks of about
`encode.chunk_size` images at content-defined boundaries (a chunk ends after an image whose path hashes to a
boundary, within half to twice the size), so adding or removing images changes only the chunks around them; each
chunk is a group. For tar sources each tar file is a group, read whole by one worker, whose images fill chunks of
`encode.chunk_size` in stored order (an index chunk records how many once the tar file is read to its end).

A chunk's key is the hash of the stage's identity (model content, dtype, preprocessing, source settings, the
stage's VERSION) and of its records (path, size, version): any process that needs the same chunk finds it by
key, whether it was written before a kill, by another shard, or by a run over a dataset where other images
changed.
"""

from __future__ import annotations

import hashlib
import logging
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

from ..engine import Artifact
from ..engine.files import atomic_path
from ..engine.locks import locked
from ..sources import IMAGES
from ..stages.discover import Records

log = logging.getLogger(__name__)

PLAN_SCHEMA = pa.schema([("start", pa.int64()), ("stop", pa.int64()), ("key", pa.string())])


@dataclass(frozen=True)
class PlannedChunk:
    start: int  # first record (row of the records file)
    stop: int  # one past the last
    key: str


def plan_chunks(records: Records, mean_size: int, identity: str) -> list[PlannedChunk]:
    """Content-defined chunks of about `mean_size` records (between half and twice that), keyed by content."""
    min_size, max_size = max(1, mean_size // 2), 2 * mean_size
    modulus = mean_size - min_size + 1
    chunks: list[PlannedChunk] = []
    start = row = 0
    digest = hashlib.sha256(identity.encode())
    for batch in records.batches():
        for path, size, version in zip(*(batch.column(c).to_pylist() for c in ("path", "size", "version"))):
            digest.update(record_bytes(path, size, version))
            row += 1
            length = row - start
            if length >= max_size or (length >= min_size and zlib.crc32(path) % modulus == 0):
                chunks.append(PlannedChunk(start, row, digest.hexdigest()))
                start, digest = row, hashlib.sha256(identity.encode())
    if row > start:
        chunks.append(PlannedChunk(start, row, digest.hexdigest()))
    return chunks


def record_bytes(path: bytes, size: int, version: str) -> bytes:
    return b"%d:%s%d:%s;" % (len(path), path, size, version.encode())


def shard_of(group: int, shards: int) -> int:
    """The shard (of `shards`) that encodes `group`."""
    return group % shards


@dataclass
class Plan:
    """The groups to encode: planned chunks (kind IMAGES), or tar files (kind TARS) and the chunks each makes."""

    kind: str
    identity: str
    records: Records
    chunk_size: int  # mean images per planned chunk; a tar file's images fill chunks of exactly this many
    chunks: list[PlannedChunk] = field(default_factory=list)  # kind IMAGES: one group per planned chunk
    tars: list[tuple[bytes, int, str]] = field(default_factory=list)  # kind TARS: one group per tar file's record

    @property
    def groups(self) -> int:
        return len(self.chunks) if self.kind == IMAGES else len(self.tars)

    def images(self, groups) -> int | None:
        """How many images `groups` hold (None for tar files, whose images are known as they are read)."""
        return sum(self.chunks[g].stop - self.chunks[g].start for g in groups) if self.kind == IMAGES else None

    def batches(self, group: int, batch_size: int) -> int | None:
        """How many batches a group's images make (None for a tar file: its count is known once it is read)."""
        if self.kind != IMAGES:
            return None
        return -(-(self.chunks[group].stop - self.chunks[group].start) // batch_size)

    def chunk_key(self, group: int, number: int) -> str:
        """The key of chunk `number` of `group` (a planned chunk is its group's only chunk)."""
        if self.kind == IMAGES:
            return self.chunks[group].key
        return hashlib.sha256(self.identity.encode() + record_bytes(*self.tars[group]) + b"%d" % number).hexdigest()

    def index_key(self, group: int) -> str:
        """The key of a tar file's index chunk: how many chunks its images made."""
        return hashlib.sha256(self.identity.encode() + record_bytes(*self.tars[group]) + b"index").hexdigest()


def make_plan(records: Artifact, kind: str, chunk_size: int, identity: str, memo: Path | None = None) -> Plan:
    listed = Records(records)
    if kind == IMAGES:
        started = time.perf_counter()
        chunks = _memoised_chunks(listed, records.fingerprint, chunk_size, identity, memo)
        log.info("planned %d chunks in %.2fs", len(chunks), time.perf_counter() - started)
        return Plan(kind, identity, listed, chunk_size, chunks=chunks)
    table = listed.table()
    tars = list(zip(*(table.column(c).to_pylist() for c in ("path", "size", "version"))))
    return Plan(kind, identity, listed, chunk_size, tars=tars)


def _memoised_chunks(records: Records, records_fp: str, chunk_size: int, identity: str,
                     memo: Path | None) -> list[PlannedChunk]:
    """The chunk plan, computed once per (records, chunk size) by the first process under a lock: the others
    (shards of a 100M-image job) read a small file instead of every record."""
    if memo is None:
        return plan_chunks(records, chunk_size, identity)
    path = memo / f"{records_fp[:32]}-{identity[:16]}-{chunk_size}.spans.arrow"
    with locked(path.with_suffix(".lock")):
        if not path.exists():
            chunks = plan_chunks(records, chunk_size, identity)
            table = pa.table({"start": [c.start for c in chunks], "stop": [c.stop for c in chunks],
                              "key": [c.key for c in chunks]}, schema=PLAN_SCHEMA)
            with atomic_path(path) as tmp, ipc.new_file(str(tmp), PLAN_SCHEMA) as writer:
                writer.write_table(table)
            return chunks
    table = ipc.open_file(pa.memory_map(str(path))).read_all()
    return [PlannedChunk(*row) for row in zip(*(table.column(c).to_pylist() for c in ("start", "stop", "key")))]
