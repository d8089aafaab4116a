"""Decode workers: DataLoader processes that read and preprocess images and send them back in parts of batches.

An image that cannot be read or decoded becomes a row with its error (`ImageRow.error_type`), never an
exception: a failure in the image's bytes is final; one outside them (I/O error, permission denied, timeout) is
`transient`, and the chunk that holds it is encoded again by the next run.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import ImageError
from ..imaging import Preprocessor, load_and_preprocess
from ..sources import IMAGES, Source
from .plan import Plan


class ImageRow(NamedTuple):
    """One image as it goes into a chunk: decoded (its size), or failed (its error)."""

    key: bytes
    width: int  # -1 when it failed
    height: int
    error_type: str | None  # None: decoded
    message: str | None
    transient: bool  # the failure lies outside the image's bytes: the next run tries again
    truth: str | None  # read with the image (a tar file's truth member)


class DecodedPart(NamedTuple):
    """What a worker sends: part `part` of `parts` of batch `batch` of chunk `chunk` of group `group`."""

    group: int
    chunk: int  # the chunk's number within its group (always 0 for a planned chunk)
    batch: int  # the batch's number within its chunk
    part: int
    parts: int
    closes_chunk: bool  # the batch is its chunk's last
    rows: list[ImageRow]
    pixels: Any  # the decoded images' model inputs, stacked (None when none decoded)


class TarEnd(NamedTuple):
    """A tar file read to its end: how many chunks its images made (-1: it ended early for a transient reason,
    so its chunk count is unknown until a later run reads it whole)."""

    group: int
    chunks: int


class DecodeTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise DecodeTimeout()


@contextmanager
def deadline(seconds: float):
    """At most `seconds` for the block (SIGALRM; only where signals can be delivered: a process's main
    thread): a read that blocks or a decoder that spins raises DecodeTimeout instead of hanging the run."""
    armed = seconds > 0 and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGALRM, _on_alarm) if armed else None
    try:
        if armed:
            signal.setitimer(signal.ITIMER_REAL, seconds)
        yield
    finally:
        if armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


PREFETCH = 4  # messages each worker decodes ahead (DataLoader's prefetch_factor)


class Decoder(IterableDataset):
    """The decode work of one segment, split between DataLoader workers (worker w of n takes tasks w, w+n, ...):
    parts of batches for per-image sources, whole tar files for tar sources. Memory-maps the records; no worker
    holds the list of paths."""

    def __init__(self, plan: Plan, segment: dict[int, int], source: Source, preprocessor: Preprocessor, *,
                 draft: bool, max_pixels: int, timeout: float, batch_size: int, chunk_size: int,
                 workers: int, window: range | None = None) -> None:
        self.plan, self.segment, self.source, self.preprocessor = plan, segment, source, preprocessor
        self.window = window  # the batches of the segment's one group to decode (None: all of them)
        self.draft, self.max_pixels, self.timeout = draft, max_pixels, timeout
        self.batch_size, self.chunk_size, self.workers = batch_size, chunk_size, workers

    def __iter__(self) -> Iterator[DecodedPart | TarEnd]:
        info = get_worker_info()  # None: decoding in the main process
        me, every = (info.id, info.num_workers) if info is not None else (0, 1)
        tasks = self._image_tasks() if self.plan.kind == IMAGES else self._tar_tasks()
        for number, task in enumerate(tasks):
            if number % every == me:
                yield from task()

    def start(self, pin_memory: bool) -> Iterator[DecodedPart | TarEnd]:
        """Start the workers (none: decode in this process); their output, as it arrives."""
        workers = self.workers
        return iter(DataLoader(self, batch_size=None, collate_fn=_as_is, num_workers=workers,
                               prefetch_factor=PREFETCH if workers else None, persistent_workers=False,
                               pin_memory=pin_memory))

    # per-image sources ---------------------------------------------------------------------------------------

    def _image_tasks(self) -> Iterator[Callable[[], list[DecodedPart]]]:
        # A batch is split into one part per worker: it is ready as soon as all workers together have decoded it,
        # and one large image delays only its part.
        size = max(1, -(-self.batch_size // max(1, self.workers)))
        for group in sorted(self.segment):
            chunk = self.plan.chunks[group]
            starts = range(chunk.start, chunk.stop, self.batch_size)
            for batch, start in enumerate(starts):
                if self.window is not None and batch not in self.window:
                    continue
                stop = min(start + self.batch_size, chunk.stop)
                pieces = range(start, stop, size)
                for part, first in enumerate(pieces):
                    header = DecodedPart(group, 0, batch, part, len(pieces), batch == len(starts) - 1, [], None)
                    yield lambda h=header, lo=first, hi=min(first + size, stop): [self._part(h, lo, hi)]

    def _part(self, header: DecodedPart, start: int, stop: int) -> DecodedPart:
        rows, pixels = [], []
        for path in self.plan.records.paths(start, stop):
            row, px = self._decode_one(path, lambda p=path: self.source.read(p), None)
            rows.append(row)
            if px is not None:
                pixels.append(px)
        return header._replace(rows=rows, pixels=stack(pixels))

    # tar files -----------------------------------------------------------------------------------------------

    def _tar_tasks(self) -> Iterator[Callable[[], Iterator[DecodedPart | TarEnd]]]:
        for group in sorted(self.segment):
            yield lambda g=group: self._tar(g, self.segment[g])

    def _tar(self, group: int, first_chunk: int) -> Iterator[DecodedPart | TarEnd]:
        name = self.plan.tars[group][0]
        skip, seen = first_chunk * self.chunk_size, 0
        chunk, batch, in_chunk, rows, pixels = first_chunk, 0, 0, [], []
        failure = None
        members = iter(self.source.members(name))
        while True:
            try:
                with deadline(self.timeout):
                    member = next(members, None)
            except ImageError as exc:
                failure = exc
            except DecodeTimeout:
                failure = ImageError("DecodeTimeout", f"reading shard took over {self.timeout:g}s", transient=True)
            if failure is not None or member is None:
                break
            seen += 1
            if seen <= skip:  # in a chunk finished by an earlier run: read past it, do not decode it
                continue
            key = name + b"/" + member.name.encode("utf-8", "surrogateescape")
            row, px = self._decode_one(key, lambda m=member: m.data, member.truth)
            rows.append(row)
            if px is not None:
                pixels.append(px)
            in_chunk += 1
            if len(rows) == self.batch_size or in_chunk == self.chunk_size:
                closes = in_chunk == self.chunk_size
                yield DecodedPart(group, chunk, batch, 0, 1, closes, rows, stack(pixels))
                rows, pixels, batch = [], [], batch + 1
                if closes:
                    chunk, batch, in_chunk = chunk + 1, 0, 0
        if failure is not None:  # the tar file's own row: what came after the fault is unknown
            rows.append(ImageRow(name, -1, -1, failure.kind, str(failure), failure.transient, None))
        if rows or in_chunk:
            yield DecodedPart(group, chunk, batch, 0, 1, True, rows, stack(pixels))
            chunk += 1
        yield TarEnd(group, -1 if failure is not None and failure.transient else chunk)

    # one image ----------------------------------------------------------------------------------------------

    def _decode_one(self, key: bytes, read, truth: str | None) -> tuple[ImageRow, np.ndarray | None]:
        try:
            with deadline(self.timeout):
                pixels, (width, height) = load_and_preprocess(read(), self.preprocessor, draft=self.draft,
                                                              max_pixels=self.max_pixels)
            return ImageRow(key, width, height, None, None, False, truth), pixels
        except ImageError as exc:
            return ImageRow(key, -1, -1, exc.kind, str(exc), exc.transient, truth), None
        except DecodeTimeout:
            return ImageRow(key, -1, -1, "DecodeTimeout", f"reading and decoding took over {self.timeout:g}s "
                            "(preprocess.timeout)", True, truth), None
        except Exception as exc:  # noqa: BLE001 - one odd file must never end a million-image run
            return ImageRow(key, -1, -1, type(exc).__name__, str(exc) or repr(exc), False, truth), None


def _as_is(message):
    return message


def stack(inputs: list):
    """One image's worker output each -> a batch: stacked pixel values, a dict of stacked arrays, or (for
    on-device preprocessing) a list of 8-bit images of any sizes."""
    if not inputs:
        return None
    if isinstance(inputs[0], dict):
        return {key: torch.from_numpy(np.stack([item[key] for item in inputs])) for key in inputs[0]}
    if inputs[0].dtype == np.uint8:
        return [torch.from_numpy(np.ascontiguousarray(item)) for item in inputs]
    return torch.from_numpy(np.stack(inputs))
