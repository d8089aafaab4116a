"""Find the images of a dataset.

Rules (documented in the README):
- a dataset is a directory (searched recursively) or a single image file;
- a file is an image candidate when its extension, case-insensitive, is in `extensions`; it is then kept even
  if it turns out not to decode, so that the error is reported rather than the file silently dropped;
- symbolic links are followed, also when they point outside the dataset; every real directory is entered at
  most once, so a link loop (or two links to one folder) cannot repeat or hang the walk;
- a directory that cannot be listed is logged and skipped (its files were never discovered);
- records are sorted by their relative POSIX path, which makes every later stage deterministic.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .errors import UserError

log = logging.getLogger(__name__)

DEFAULT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageRecord:
    path: str  # relative to the dataset root, '/'-separated
    size: int  # bytes; -1 when the file cannot be stat'ed (a dangling link)
    mtime_ns: int

    def to_dict(self) -> dict:
        return asdict(self)


def dataset_root(location: str | os.PathLike) -> Path:
    """The directory that record paths are relative to: the dataset itself, or a single image's parent."""
    path = Path(location)
    if not path.exists():
        raise UserError(f"dataset not found: '{location}' does not exist; set dataset.path (DATASET=dir) "
                        "to a directory of images or dataset.image (IMAGE=file) to one image")
    return path.parent if path.is_file() else path


def discover(location: str | os.PathLike, extensions: Iterable[str] = DEFAULT_EXTENSIONS) -> list[ImageRecord]:
    location = Path(location)
    root = dataset_root(location)
    suffixes = _normalise_extensions(extensions)
    if location.is_file():
        files: Iterable[Path] = [location]
    else:
        files = (p for p in _walk(root) if p.suffix.lower() in suffixes)
    records = [_record(root, p) for p in files]
    records.sort(key=lambda r: r.path)
    return records


def _normalise_extensions(extensions: Iterable[str]) -> frozenset[str]:
    suffixes = frozenset(("." + e.lower().lstrip(".")) for e in extensions)
    if not suffixes:
        raise UserError("dataset.extensions is empty: list the image extensions to look for, e.g. [jpg, png]")
    return suffixes


def _walk(root: Path) -> Iterator[Path]:
    seen_dirs: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            st = directory.stat()
        except OSError as exc:
            log.warning("skipping directory %s: %s", directory, exc)
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:
            log.info("not entering %s again (symlink loop or second link to one folder)", directory)
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        try:
            entries = list(os.scandir(directory))
        except OSError as exc:
            log.warning("cannot list directory %s, its images are not classified: %s", directory, exc)
            continue
        for entry in entries:
            path = Path(entry.path)
            if _is_dir(entry):
                stack.append(path)
            else:
                yield path


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def _record(root: Path, path: Path) -> ImageRecord:
    rel = path.relative_to(root).as_posix()
    try:
        st = path.stat()
        return ImageRecord(rel, st.st_size, st.st_mtime_ns)
    except OSError:
        return ImageRecord(rel, -1, -1)
