"""Crash-safe file writing and hashing.

Nothing is ever visible half-written under its final name: writers fill a temporary file in the same directory
(so the rename stays on one filesystem), flush it to disk, then `os.replace` it into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

_HASH_BLOCK = 1 << 20
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry is on disk too.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success, rename it over `final`. On error, remove it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results should get the usual permissions
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
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


def copy_atomic(src: str | os.PathLike, final: str | os.PathLike) -> None:
    with atomic_path(final) as tmp:
        shutil.copyfile(src, tmp)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of the canonical JSON form (sorted keys) of `obj`: the fingerprint of a config or record list."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


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
