"""Cache entries: one directory per (stage, fingerprint), sealed by a manifest, swept of what a kill left behind.

An entry is built in a temporary directory and renamed into place whole, with `_manifest.json` listing each
file's size, mtime and sha256, and (for stages with a chunk pool) the chunks it is made of. What each check costs:

- reuse: one stat per file and per chunk (size; a file whose mtime moved, e.g. a copied cache, is hashed once);
- reading: `Artifact.read_bytes` and the chunk pool verify checksums as the consumer reads, so corruption is found
  in the one read that was needed anyway, and the runner recomputes what was corrupt (`InputCorrupt`).

An entry is `final` unless its stage said otherwise (it holds failures worth retrying); a non-final entry serves
the run that made it, and the next run computes it again. Entries that depend on a non-final entry are non-final.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .chunks import ChunkFile, ChunkPool
from .failpoints import failpoint
from .files import TMP_PREFIX, is_orphan, read_json, remove, sha256_file, tmp_name, write_json

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
CHUNK_LIST = "_chunks.json"  # the chunks (in the stage's pool) an entry is made of
LEGACY_SUFFIX = ".partial"  # scratch directories of the layout before the chunk pool


# Bytes read from the cache through verified reads in this process (entries' files and pool chunks): what
# "each chunk is read once" is measured by.
BYTES_READ = {"files": 0, "chunks": 0}


class InputCorrupt(Exception):
    """Raised by a stage that found an input entry (or one of its chunks) corrupt while reading it."""

    def __init__(self, artifact: "Artifact", why: str) -> None:
        super().__init__(f"{artifact.stage} [{artifact.fingerprint[:12]}]: {why}")
        self.artifact = artifact


@dataclass(frozen=True)
class Artifact:
    """A stage's stored output, as downstream stages receive it."""

    stage: str
    fingerprint: str
    path: Path | None
    final: bool = True
    pool: ChunkPool | None = None

    def file(self, name: str) -> Path:
        assert self.path is not None, f"stage {self.stage} has no stored output"
        return self.path / name

    def read_bytes(self, name: str) -> bytes:
        """A file of this entry, verified against the manifest as it is read (raises InputCorrupt)."""
        import hashlib

        meta = read_json(self.file(MANIFEST))["files"].get(name)
        data = self.file(name).read_bytes()
        BYTES_READ["files"] += len(data)
        if meta is None or len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise InputCorrupt(self, f"{name} does not match its manifest")
        return data

    def chunk_list(self) -> dict:
        return read_json(self.file(CHUNK_LIST))

    def chunks(self) -> list[ChunkFile]:
        return [ChunkFile.from_dict(c) for c in self.chunk_list()["chunks"]]

    def read_chunk(self, chunk: ChunkFile) -> bytes:
        """A chunk's bytes, verified; a corrupt chunk is removed from the pool and reported (InputCorrupt)."""
        from .chunks import ChunkCorrupt

        pool = self.pool
        try:
            data = pool.read(chunk)
            BYTES_READ["chunks"] += len(data)
            return data
        except ChunkCorrupt as exc:
            pool.discard(chunk)
            raise InputCorrupt(self, str(exc)) from None


def write_chunk_list(out: Path, chunks: list[ChunkFile], **extra: Any) -> None:
    write_json(out / CHUNK_LIST, {"chunks": [c.to_dict() for c in chunks], **extra})


def file_records(directory: Path) -> dict[str, dict]:
    records = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            st = path.stat()
            records[path.relative_to(directory).as_posix()] = {
                "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}
    return records


def read_manifest(directory: Path) -> dict | None:
    try:
        return read_json(directory / MANIFEST)
    except (OSError, ValueError):
        return None


def verify(directory: Path, pool: ChunkPool | None) -> bool:
    """True when `directory` holds a complete entry whose files (and chunks) check out; see the module doc."""
    manifest = read_manifest(directory)
    if manifest is None:
        return False
    try:
        for name, meta in manifest["files"].items():
            path = directory / name
            st = path.stat()
            if st.st_size != meta["size"]:
                log.warning("size mismatch in %s", path)
                return False
            if st.st_mtime_ns != meta["mtime_ns"] and sha256_file(path) != meta["sha256"]:
                log.warning("checksum mismatch in %s", path)
                return False
        if CHUNK_LIST in manifest["files"]:
            for chunk in Artifact("", "", directory).chunks():
                if pool is None or not pool.present(chunk):
                    log.warning("chunk %s of %s is missing or truncated", chunk.name, directory)
                    return False
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("unreadable cache entry %s: %s", directory, exc)
        return False
    return True


def is_final(directory: Path) -> bool:
    manifest = read_manifest(directory)
    return bool(manifest and manifest.get("final", True))


def seal(tmp: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest into `tmp` and rename `tmp` to `final`, replacing an older entry there."""
    write_json(tmp / MANIFEST, {**manifest, "files": file_records(tmp), "created": time.time()})
    failpoint("stage.before_seal")
    if final.exists():
        # A non-final or damaged entry of the same fingerprint: move it aside first (a directory rename cannot
        # replace a non-empty directory). A kill in between leaves no entry, which only means recomputing it.
        trash = final.parent / tmp_name("trash")
        os.replace(final, trash)
        remove(trash)
    os.replace(tmp, final)  # a directory rename is atomic: readers see all of it or nothing


def sweep(stage_dir: Path, own_tag: str) -> list[str]:
    """Remove what killed runs left in `stage_dir`: temporary directories of this fingerprint (the caller holds
    its lock, so none is live), orphans of dead processes on this host, and scratch of the older layout."""
    removed = []
    if not stage_dir.is_dir():
        return removed
    for entry in os.scandir(stage_dir):
        name = entry.name
        stale = (name.startswith(f"{TMP_PREFIX}{own_tag}-") or is_orphan(name)
                 or (entry.is_dir() and name.endswith(LEGACY_SUFFIX)))
        if stale:
            remove(Path(entry.path))
            removed.append(name)
    if removed:
        log.info("removed %d leftover(s) of interrupted runs in %s: %s", len(removed), stage_dir,
                 ", ".join(sorted(removed)[:5]))
    return removed
