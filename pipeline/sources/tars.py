"""webdataset tar shards ("tar files" in this code, where "shard" means a process's share of a job): one .tar, a
folder of them, or a brace pattern (`shards/data-{0000..0099}.tar`), local or at URLs (s3://, gs://, http(s)://).

- A record is one tar file: (its file name, size, version (mtime, or the object's ETag)). Work is planned,
  split between processes (`shard.*`, torchrun) and resumed by tar file, and a changed one re-encodes only itself.
- A tar file is read once, sequentially, by one worker, through the standard library's `tarfile` in stream mode
  ("r|*") over whatever file object fsspec gives: nothing is downloaded whole, nothing seeks. (The `webdataset`
  package would add its own pipeline and dependencies for what is, here, a loop over a tar stream and a key rule.)
- Members are grouped by key as webdataset does: the member's path up to the first dot of its file name
  (`a/b.x.jpg` has key `a/b` and extension `x.jpg`). A member whose file extension is an image extension is an
  image, keyed `<tar file name>/<member name>`; `dataset.truth_member` (`cls`, `txt`, or `json.<field>`) names
  the sibling member that holds its truth. Both settings decide what reading a tar file gives, so the stages
  that read them hash them (`SETTINGS`); listing tar files needs neither.
- A tar file that ends early (truncated) or cannot be read becomes an error row keyed by its name, after the
  images read before the fault.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import ImageReadError, UserError
from . import READING, RECORDS, TAR, TARS, TRUTH, Location, batches_of
from .folder import normalise_extensions, required
from .remote import Remote, check_reachable, is_url, strip_protocol

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_KEY = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


@dataclass(frozen=True)
class TarImage:
    name: str  # the member's path in the tar
    data: bytes
    truth: str | None


def is_tar(location: str) -> bool:
    return str(location).lower().endswith(TAR_SUFFIXES)


def expand(pattern: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


class TarSource:
    kind = TARS
    format = TAR
    root = None  # images live inside tar files: no file to show in a report
    SETTINGS = {RECORDS: (), READING: ("extensions", "truth_member"), TRUTH: ()}

    def __init__(self, location: Location, extensions: Iterable[str] | None = None,
                 truth_member: str | None = None) -> None:
        self.location = str(location.path)
        self.suffixes = normalise_extensions(extensions) if extensions is not None else None
        self.truth_member = truth_member  # None: no truth member (a hashed setting like the extensions)
        self.remote = Remote(self.location, location.storage_options, location.retries, location.timeout) \
            if is_url(self.location) else None
        self.tars = self._list()  # name -> (where, size, version)

    def describe(self) -> str:
        return self.location

    # ------------------------------------------------------------------------------------------------ listing

    def records(self):
        return batches_of((name.encode("utf-8", "surrogateescape"), size, version)
                          for name, (_, size, version) in sorted(self.tars.items()))

    def truth(self) -> None:
        return None  # carried by the tar files themselves (truth_member), read with the images

    def _list(self) -> dict[str, tuple[str, int, str]]:
        if "{" in self.location:
            found = [self._stat(path) for path in expand(self.location)]
            if not any(size >= 0 for _, size, _ in found):
                raise UserError(f"dataset.path {self.location}: the pattern matches no shard "
                                f"({len(found)} names tried, e.g. {found[0][0] if found else '-'})")
        elif is_tar(self.location):
            found = [self._stat(self.location)]
            if found[0][1] < 0:
                raise UserError(f"tar shard not found: {self.location} (dataset.path)")
        else:
            found = self._folder()
        tars: dict[str, tuple[str, int, str]] = {}
        for where, size, version in found:
            name = where.rstrip("/").rsplit("/", 1)[-1]
            if name in tars:
                raise UserError(f"two tar files named {name} ({tars[name][0]}, {where}): their file names are part "
                                "of every image's key and must differ")
            tars[name] = (where, size, version)
        return tars

    def _stat(self, where: str) -> tuple[str, int, str]:
        """(where, size, version); size -1 when the tar file is missing (read later, it becomes an error row)."""
        if self.remote is None:
            try:
                st = os.stat(where)
                return where, st.st_size, str(st.st_mtime_ns)
            except OSError:
                return where, -1, ""
        try:
            info = self.remote.with_retries(where, lambda: self.remote.fs.info(strip_protocol(where)))
        except ImageReadError:
            return where, -1, ""
        return where, int(info.get("size") or -1), _object_version(info)

    def _folder(self) -> list[tuple[str, int, str]]:
        if self.remote is None:
            folder = Path(self.location)
            if not folder.is_dir():
                raise UserError(f"dataset.path {self.location}: not a tar shard, a folder of shards or a pattern")
            return [self._stat(str(p)) for p in sorted(folder.iterdir()) if is_tar(p.name)]
        prefix = strip_protocol(self.location).rstrip("/")
        check_reachable(self.remote, prefix, "dataset.path (tar shards)")
        found = self.remote.fs.find(prefix, detail=True)
        return [(path if "://" in path else f"{self.remote.protocol}://{path}", int(info.get("size") or -1),
                 _object_version(info)) for path, info in sorted(found.items()) if is_tar(path)]

    # ------------------------------------------------------------------------------------------------ reading

    def members(self, tar: bytes) -> Iterator[TarImage]:
        """The tar file's images in stored order, read once, sequentially. Raises ImageReadError for one that
        cannot be opened or read to its end (after yielding what came before)."""
        required(self.suffixes, "extensions", "a tar source")
        name = tar.decode("utf-8", "surrogateescape")
        where = self.tars[name][0]
        handle = self._open(where)
        try:
            with tarfile.open(fileobj=handle, mode="r|*") as tar:
                yield from self._grouped(tar)
        except ImageReadError:
            raise
        except (tarfile.ReadError, EOFError, tarfile.CompressionError) as exc:
            raise ImageReadError("TruncatedTar", f"shard {name} ends early or is damaged: {exc}",
                                 transient=False) from None
        except OSError as exc:
            raise ImageReadError(type(exc).__name__, f"reading shard {name}: {exc}", transient=True) from None
        except Exception as exc:  # noqa: BLE001 - a network stream fails in many ways; the next run retries it
            raise ImageReadError(type(exc).__name__, f"reading shard {name}: {exc}", transient=True) from None
        finally:
            handle.close()

    def _open(self, where: str):
        if self.remote is None:
            try:
                return open(where, "rb")
            except FileNotFoundError:
                raise ImageReadError("FileNotFoundError", f"shard {where} not found", transient=False) from None
            except OSError as exc:
                raise ImageReadError(type(exc).__name__, f"shard {where}: {exc}", transient=True) from None
        return self.remote.with_retries(where, lambda: self.remote.fs.open(strip_protocol(where), "rb",
                                                                           block_size=8 << 20))

    def _grouped(self, tar: tarfile.TarFile) -> Iterator[TarImage]:
        key, group = None, []
        for member in tar:
            if not member.isfile():
                continue
            match = _KEY.match(member.name)
            if match is None:
                continue
            data = tar.extractfile(member).read()
            if match.group(1) != key:
                yield from self._images(group)
                key, group = match.group(1), []
            group.append((member.name, match.group(2), data))
        yield from self._images(group)

    def _images(self, group: list[tuple[str, str, bytes]]) -> Iterator[TarImage]:
        truth = _truth(group, self.truth_member) if self.truth_member else None
        for name, _, data in group:
            if os.path.splitext(name)[1].lower() in self.suffixes:
                yield TarImage(name, data, truth)


def _truth(group: list[tuple[str, str, bytes]], member: str) -> str | None:
    ext, _, field = member.partition(".")
    for _, member_ext, data in group:
        if member_ext.lower() != ext.lower():
            continue
        text = data.decode("utf-8", "replace").strip()
        if not field:
            return text or None
        try:
            value = json.loads(text)
            for part in field.split("."):
                value = value[part]
        except (ValueError, KeyError, TypeError, IndexError):
            return None
        return None if value is None else str(value)
    return None


def _object_version(info: dict) -> str:
    for key in ("ETag", "etag", "md5Hash", "generation", "mtime", "LastModified", "last_modified"):
        if info.get(key):
            return str(info[key])
    return ""
