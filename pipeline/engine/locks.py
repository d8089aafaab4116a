"""Inter-process locks on the cache, including on cluster file systems.

Built on the `filelock` package: `flock` where the file system supports it, and a soft lock (a marker file that
names its host, process and start time, so that a dead holder's marker is broken) where `flock` raises ENOSYS
(Lustre mounted without `flock`; filelock switches by itself). Some mounts accept `flock` but honour it on one
node only (Lustre with `localflock`, NFS with `local_lock=flock|all`): two nodes would both "hold" the lock.
`auto` detects those from the mount table and uses the soft lock there; `soft` forces it (`cache_lock=soft`).

Locks only save duplicate work: every write in the cache is an atomic rename, so two runs racing without a lock
would still leave a correct cache.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

import filelock

log = logging.getLogger(__name__)

LOCK_KINDS = ("auto", "flock", "soft")
_WAIT_LOG_SECONDS = 30.0
MOUNTINFO = "/proc/self/mountinfo"


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, file-system type, options) for each mount, from the kernel's mount table."""
    rows = []
    with contextlib.suppress(OSError):
        with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                fields, tail = left.split(), right.split()
                if len(fields) < 6 or len(tail) < 1:
                    continue
                point = fields[4].replace("\\040", " ")
                options = set(fields[5].split(","))
                if len(tail) >= 3:
                    options |= set(tail[2].split(","))
                rows.append((point, tail[0], options))
    return rows


def node_local_flock(directory: Path) -> str | None:
    """Why `flock` under `directory` would lock one node only, or None when it is coherent (or unknown)."""
    real = os.path.realpath(directory)
    best = None
    for point, fstype, options in _mounts():
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) > len(best[0])):
            best = (point, fstype, options)
    if best is None:
        return None
    point, fstype, options = best
    if fstype == "lustre" and "localflock" in options:
        return f"{point} is Lustre mounted with localflock"
    if fstype.startswith("nfs") and ({"local_lock=flock", "local_lock=all"} & options):
        return f"{point} is NFS mounted with {sorted({'local_lock=flock', 'local_lock=all'} & options)[0]}"
    return None


def make_lock(path: Path, kind: str = "auto") -> filelock.BaseFileLock:
    if kind not in LOCK_KINDS:
        raise ValueError(f"lock kind {kind!r} is not one of {LOCK_KINDS}")
    if kind == "auto":
        reason = node_local_flock(path.parent)
        if reason:
            log.info("soft locks for %s: %s (flock there is not seen by other nodes)", path.parent, reason)
            kind = "soft"
    if kind == "soft":
        return filelock.SoftFileLock(str(path))
    return filelock.FileLock(str(path))  # falls back to a soft marker by itself where flock raises ENOSYS


@contextlib.contextmanager
def locked(path: Path, kind: str = "auto") -> Iterator[None]:
    """Hold the lock at `path` (created if needed); say so in the log while waiting for another holder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = make_lock(path, kind)
    waited = 0.0
    while True:
        try:
            lock.acquire(timeout=_WAIT_LOG_SECONDS)
            break
        except filelock.Timeout:
            waited += _WAIT_LOG_SECONDS
            log.info("waiting for %s (held by another run) for %.0fs", path, waited)
    try:
        yield
    finally:
        lock.release()
