"""Crash-safe file writing, hashing and the canonical JSON that fingerprints are made of.

Nothing is ever visible half-written under its final name: writers fill a temporary file in the same directory
(so the rename stays on one filesystem), flush it to disk, then `os.replace` it into place. Temporary names
carry the host and process that made them, so that a later run can tell an orphan (its process is gone) from the
work of a live neighbour and sweep only the former.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import IO, Any, Iterator

_HASH_BLOCK = 1 << 20
_UMASK = os.umask(0o022)
os.umask(_UMASK)
TMP_PREFIX = ".tmp-"


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry is on disk too.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def owner_tag() -> str:
    """`<host>-<pid>`: who made a temporary file or directory (see `is_orphan`)."""
    host = socket.gethostname().replace("-", "_").replace(".", "_") or "host"
    return f"{host}-{os.getpid()}"


def tmp_name(tag: str) -> str:
    return f"{TMP_PREFIX}{tag}-{owner_tag()}-{uuid.uuid4().hex[:8]}"


def is_orphan(name: str) -> bool:
    """True for a temporary name (see `tmp_name`) whose maker ran on this host and has exited. Names made on
    other hosts are never judged: their process may be alive there."""
    if not name.startswith(TMP_PREFIX):
        return False
    parts = name.split("-")
    if len(parts) < 4 or not parts[-2].isdigit():
        return True  # not one of ours (an older layout): nothing can still be writing it
    return has_exited(f"{parts[-3]}-{parts[-2]}")


def has_exited(owner: str) -> bool:
    """True when `owner` (an `owner_tag`) is a process of this host that has exited; False when it is alive, is
    this process, or ran on another host (which this one cannot see)."""
    host, _, pid = owner.rpartition("-")
    if host != owner_tag().rsplit("-", 1)[0] or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove(path: Path) -> None:
    """Remove a file or a directory tree, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success, rename it over `final`. On error, remove it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / tmp_name(final.name.replace("-", "_"))
    open(tmp, "xb").close()
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_open(final: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """`open()` whose result appears under `final` only once fully written."""
    with atomic_path(final) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh


def write_json(final: str | os.PathLike, obj: Any) -> None:
    with atomic_open(final, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, ensure_ascii=False, indent=1, sort_keys=True)
        fh.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def copy_atomic(src: str | os.PathLike, final: str | os.PathLike) -> str:
    """Copy `src` to `final` atomically; returns the sha256 of what was copied (one read)."""
    digest = hashlib.sha256()
    with atomic_path(final) as tmp, open(src, "rb") as fin, open(tmp, "wb") as fout:
        while block := fin.read(_HASH_BLOCK):
            digest.update(block)
            fout.write(block)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _check_json(value: Any, where: str) -> None:
    """Refuse what JSON cannot say exactly: a fingerprint must never hash `str(obj)` of some object."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"{where} is {value}, which JSON cannot hold")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has a key {key!r} of type {type(key).__name__}; keys must be strings")
            _check_json(item, f"{where}.{key}")
        return
    raise TypeError(f"{where} is a {type(value).__name__} ({value!r:.60}), not JSON: pass plain values "
                    "(str, int, float, bool, None, lists, dicts) so the fingerprint hashes what decides results")


def canonical_json(obj: Any, where: str = "value") -> str:
    """Sorted, compact JSON of plain values only (anything else raises TypeError naming where it is)."""
    _check_json(obj, where)
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def sha256_json(obj: Any, where: str = "value") -> str:
    """The fingerprint of a config or record list: sha256 of its canonical JSON."""
    return hashlib.sha256(canonical_json(obj, where).encode("utf-8", "surrogatepass")).hexdigest()


class FileDigests:
    """sha256 of large files, memoised on (path, size, mtime, inode) like DVC's state db.

    Hashing a 1.7 GB checkpoint takes seconds; re-hashing it on every run would dominate a cached rerun.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def digest(self, path: str | os.PathLike) -> str:
        path = Path(path).resolve()
        st = path.stat()
        key = sha256_json([str(path), st.st_size, st.st_mtime_ns, st.st_ino])
        memo = self.directory / key[:2] / key
        with contextlib.suppress(OSError):
            return memo.read_text(encoding="ascii").strip()
        value = sha256_file(path)
        with contextlib.suppress(OSError):  # a read-only cache only costs speed
            with atomic_open(memo, "w", encoding="ascii") as fh:
                fh.write(value)
        return value
