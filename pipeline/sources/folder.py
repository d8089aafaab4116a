"""A local folder of images (searched recursively), or one image file.

Rules (documented in the README):
- a file is an image candidate when its extension, case-insensitive, is in `extensions`; it is then kept even
  if it turns out not to decode, so that the error is reported rather than the file silently dropped;
- symbolic links are followed, also when they point outside the dataset; every real directory is entered at
  most once, so a link loop (or two links to one folder) cannot repeat or hang the walk;
- a directory that cannot be listed is logged and skipped (its files were never discovered);
- keys are paths relative to the folder, '/'-separated, in bytewise order; the walk visits directories in that
  same order, so the listing streams out sorted, holding one directory's entries at a time;
- a record's version is the file's mtime in nanoseconds: touching a file makes the next run encode it again.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa

from ..errors import ImageReadError, UserError
from . import FOLDER, IMAGES, READING, RECORDS, TRUTH, Location, batches_of

log = logging.getLogger(__name__)

DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")  # dataset.extensions' default
UNKNOWN = (-1, "")  # size and version of a file that cannot be stat'ed (a dangling link)


def normalise_extensions(extensions: Iterable[str]) -> frozenset[str]:
    suffixes = frozenset(("." + e.lower().lstrip(".")) for e in extensions)
    if not suffixes:
        raise UserError("dataset.extensions is empty: list the image extensions to look for, e.g. [jpg, png]")
    return suffixes


def extension_names(extensions: Iterable[str]) -> list[str]:
    """`dataset.extensions` as hashed: lower case, no dot, sorted, each once (`.JPG` and `jpg` are one)."""
    return sorted(e.lstrip(".") for e in normalise_extensions(extensions))


def required(value, name: str, source: str):
    """A setting the source was opened without: the stage that calls this must hash it (see DatasetSettings)."""
    if value is None:
        raise ValueError(f"{source} was opened without '{name}': the stage using it must hash that setting")
    return value


class FolderSource:
    """A directory, or one image file (then the directory is its parent and the key its name)."""

    kind = IMAGES
    format = FOLDER
    SETTINGS = {RECORDS: ("extensions",), READING: (), TRUTH: ()}

    def __init__(self, location: Location, extensions: Iterable[str] | None = None) -> None:
        path = Path(location.path)
        if not path.exists():
            raise UserError(f"dataset not found: '{path}' does not exist; set dataset.path (DATASET=dir) "
                            "to a directory of images or dataset.image (IMAGE=file) to one image")
        self.single = path.is_file()
        self.root = path.parent if self.single else path
        self.location = path
        self.suffixes = normalise_extensions(extensions) if extensions is not None else None

    def describe(self) -> str:
        return str(self.root.resolve())

    def records(self) -> Iterator[pa.RecordBatch]:
        if self.single:
            return batches_of(iter([_record(self.location, os.fsencode(self.location.name))]))
        required(self.suffixes, "extensions", "a folder source")
        return batches_of(self._walk())

    def read(self, path: bytes) -> bytes:
        return read_file(os.path.join(os.fsencode(self.root), path))

    def truth(self) -> None:
        return None

    def _walk(self) -> Iterator[tuple[bytes, int, str]]:
        seen_dirs: set[tuple[int, int]] = set()
        stack = [iter(self._entries(os.fsencode(self.root), b"", seen_dirs))]
        while stack:
            entry = next(stack[-1], None)
            if entry is None:
                stack.pop()
            elif entry[2]:
                stack.append(iter(self._entries(entry[0], entry[1] + b"/", seen_dirs)))
            elif os.path.splitext(entry[1])[1].lower().decode("utf-8", "surrogateescape") in self.suffixes:
                yield _record(entry[0], entry[1])

    @staticmethod
    def _entries(directory: bytes, prefix: bytes, seen_dirs: set[tuple[int, int]]) -> list[tuple[bytes, bytes, bool]]:
        """(absolute path, key, is a directory) of a directory's entries, in the order of their full keys:
        by name with '/' after a directory's name, since every key under directory 'a' starts with 'a/'
        (so 'a-b.jpg' < 'a.jpg' < 'a/x.jpg')."""
        shown = os.fsdecode(directory)
        try:
            st = os.stat(directory)
        except OSError as exc:
            log.warning("skipping directory %s: %s", shown, exc)
            return []
        if (st.st_dev, st.st_ino) in seen_dirs:
            log.info("not entering %s again (symlink loop or second link to one folder)", shown)
            return []
        seen_dirs.add((st.st_dev, st.st_ino))
        try:
            with os.scandir(directory) as it:
                entries = [(e.path, prefix + e.name, _is_dir(e)) for e in it]
        except OSError as exc:
            log.warning("cannot list directory %s, its images are not classified: %s", shown, exc)
            return []
        entries.sort(key=lambda e: e[1] + b"/" if e[2] else e[1])
        return entries


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def read_file(path: bytes | str) -> bytes:
    """A file's bytes; ImageReadError says why not, and whether a retry could help."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            # A FIFO or device named *.jpg would block or stream forever once opened: refuse it.
            raise ImageReadError("NotARegularFile", "not a regular file (a FIFO, device or socket?)", transient=False)
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError as exc:
        raise ImageReadError("FileNotFoundError", str(exc), transient=False) from None
    except IsADirectoryError as exc:
        raise ImageReadError("IsADirectoryError", str(exc), transient=False) from None
    except OSError as exc:  # permission denied, I/O error, stale NFS handle...: worth another try next run
        raise ImageReadError(type(exc).__name__, str(exc) or repr(exc), transient=True) from None


def _record(path: Path | bytes, key: bytes) -> tuple[bytes, int, str]:
    try:
        st = os.stat(path)
        return key, st.st_size, str(st.st_mtime_ns)
    except OSError:
        return (key, *UNKNOWN)
