"""Stage `encode_images`: decode + preprocess in worker processes, run the vision tower in batches, and keep
the embeddings in checksummed chunks of the stage's chunk pool.

Chunks. For sources with a record per image (folder, manifest, bucket) the records are cut into chunks of about
`encode.chunk_size` images at content-defined boundaries (a chunk ends after an image whose path hashes to a
boundary, within half to twice the size), so adding or removing images changes only the chunks around them. For
tar shards, each shard is read whole by one worker and its images fill chunks of `encode.chunk_size` in stored
order (an index chunk records how many once the shard is read to its end). A chunk's key is the hash of the
stage's identity (model content, dtype, preprocessing, this module's VERSION) and of its records (path, size,
version): any process that needs the same chunk finds it by key, whether it was written before a kill, by
another shard, or by a run over a dataset where other images changed. Batches never straddle chunks, so a chunk
holds exactly the batches an uninterrupted run would have made (CPU fp32 results stay bit-identical).

Failures. An image that cannot be read or decoded becomes a row with its error, never an exception. A failure in
the image's bytes is final; one outside them (I/O error, permission denied, timeout) makes its chunk provisional,
and the stage `Incomplete`: the next run encodes that chunk again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..engine import Artifact, ChunkFile, ChunkPool, Incomplete, StageContext, write_chunk_list
from ..errors import ImageError
from ..imaging import Preprocessor, load_and_preprocess
from ..models import LoadedModel
from ..progress import Progress
from .discover import Records
from .runtime import Runtime

log = logging.getLogger(__name__)

VERSION = 4
# Besides this module, the code that decides its output (tests/unit/test_stage_versions.py holds VERSION to it).
CODE = ("pipeline.imaging", "pipeline.models", "pipeline.families", "pipeline.sources.folder",
        "pipeline.sources.tars", "pipeline.sources.remote", "pipeline.errors")


def chunk_schema(dim: int) -> pa.Schema:
    return pa.schema([("path", pa.binary()), ("ok", pa.bool_()), ("width", pa.int32()), ("height", pa.int32()),
                      ("error_type", pa.string()), ("error_message", pa.string()), ("transient", pa.bool_()),
                      ("truth", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])


# A decoded (or failed) image on its way from a worker: key, width, height, error type, message, transient, truth.
Row = tuple[bytes, int, int, "str | None", "str | None", bool, "str | None"]


# ------------------------------------------------------------------------------------------------ planning

@dataclass(frozen=True)
class ChunkSpan:
    start: int  # first record (row of the records file)
    stop: int  # one past the last
    key: str


def plan_chunks(records: Records, mean_size: int, identity: str) -> list[ChunkSpan]:
    """Content-defined chunks of about `mean_size` records (between half and twice that), keyed by content."""
    min_size, max_size = max(1, mean_size // 2), 2 * mean_size
    modulus = mean_size - min_size + 1
    spans: list[ChunkSpan] = []
    start = row = 0
    digest = hashlib.sha256(identity.encode())
    for batch in records.batches():
        for path, size, version in zip(*(batch.column(c).to_pylist() for c in ("path", "size", "version"))):
            digest.update(_record_bytes(path, size, version))
            row += 1
            length = row - start
            if length >= max_size or (length >= min_size and zlib.crc32(path) % modulus == 0):
                spans.append(ChunkSpan(start, row, digest.hexdigest()))
                start, digest = row, hashlib.sha256(identity.encode())
    if row > start:
        spans.append(ChunkSpan(start, row, digest.hexdigest()))
    return spans


def _record_bytes(path: bytes, size: int, version: str) -> bytes:
    return b"%d:%s%d:%s;" % (len(path), path, size, version.encode())


def shard_of(ordinal: int, count: int) -> int:
    """The process (of `count`) that encodes group `ordinal`: a chunk of the plan, or a tar shard."""
    return ordinal % count


@dataclass
class Plan:
    """What to encode: groups (a content-defined chunk, or a tar shard) and the chunks each is made of."""

    kind: str  # "images" or "shards"
    identity: str
    records: Records
    spans: list[ChunkSpan] = field(default_factory=list)  # kind images: one group per span
    shards: list[tuple[bytes, int, str]] = field(default_factory=list)  # kind shards: one group per record

    @property
    def groups(self) -> int:
        return len(self.spans) if self.kind == "images" else len(self.shards)

    def chunk_key(self, group: int, sub: int) -> str:
        if self.kind == "images":
            return self.spans[group].key
        return hashlib.sha256(self.identity.encode() + _record_bytes(*self.shards[group]) + b"%d" % sub).hexdigest()

    def index_key(self, group: int) -> str:
        return hashlib.sha256(self.identity.encode() + _record_bytes(*self.shards[group]) + b"index").hexdigest()


def make_plan(artifact: Artifact, kind: str, chunk_size: int, identity: str, memo: Path | None = None) -> Plan:
    records = Records(artifact)
    if kind == "images":
        started = time.perf_counter()
        spans = _memoised_spans(records, artifact.fingerprint, chunk_size, identity, memo)
        log.info("planned %d chunks in %.2fs", len(spans), time.perf_counter() - started)
        return Plan(kind, identity, records, spans=spans)
    table = records.table()
    shards = list(zip(*(table.column(c).to_pylist() for c in ("path", "size", "version"))))
    return Plan(kind, identity, records, shards=shards)


SPANS_SCHEMA = pa.schema([("start", pa.int64()), ("stop", pa.int64()), ("key", pa.string())])


def _memoised_spans(records: Records, records_fp: str, chunk_size: int, identity: str,
                    memo: Path | None) -> list[ChunkSpan]:
    """The chunk plan, computed once per (records, chunk size) by the first process under a lock: the others
    (shards of a 100M-image job) read a small file instead of every record."""
    if memo is None:
        return plan_chunks(records, chunk_size, identity)
    from ..engine.files import atomic_path
    from ..engine.locks import locked

    path = memo / f"{records_fp[:32]}-{identity[:16]}-{chunk_size}.spans.arrow"
    with locked(path.with_suffix(".lock")):
        if not path.exists():
            spans = plan_chunks(records, chunk_size, identity)
            table = pa.table({"start": [s.start for s in spans], "stop": [s.stop for s in spans],
                              "key": [s.key for s in spans]}, schema=SPANS_SCHEMA)
            with atomic_path(path) as tmp, ipc.new_file(str(tmp), SPANS_SCHEMA) as writer:
                writer.write_table(table)
            return spans
    table = ipc.open_file(pa.memory_map(str(path))).read_all()
    return [ChunkSpan(*row) for row in zip(*(table.column(c).to_pylist() for c in ("start", "stop", "key")))]


# ------------------------------------------------------------------------------------------ the stage

def encode_images(ctx: StageContext, *, records: Artifact, model: str, dtype: str, preprocess: dict,
                  draft: bool, max_pixels: int, truth_member: str | None = None,
                  towers: Artifact | None = None) -> Incomplete | None:
    """`towers`: an export_towers entry when the towers run on ONNX Runtime or OpenVINO; else torch runs them."""
    params = dict(model=model, dtype=dtype, preprocess=preprocess, draft=draft, max_pixels=max_pixels,
                  truth_member=truth_member, **exported(towers))
    listed, count = fill_chunks(ctx, records, params)[0], 0
    for chunk in listed:
        count += chunk_rows(ChunkPool(ctx.pool), chunk)
    write_chunk_list(ctx.out, listed, count=count)
    retry = [c for c in listed if not c.final]
    if retry:
        return Incomplete(f"{len(retry)} chunk(s) hold images that failed for reasons outside their bytes")
    return None


def encode_shard(ctx: StageContext, *, records: Artifact, shard: int, shards: int,
                 towers: Artifact | None = None, **params) -> int:
    """Encode only the groups of shard `shard` of `shards` into the stage's pool; the stage itself, run later by
    one process, finds them there. Returns the number of chunks this call encoded."""
    return fill_chunks(ctx, records, {**params, **exported(towers)}, shard, shards)[1]


def exported(towers: Artifact | None) -> dict:
    """Where an export of the towers lies, and its fingerprint: chunks are keyed by what made them, and an export
    is an input (its int8 calibration is content), not a param."""
    if towers is None:
        return {"export": None, "export_fingerprint": None}
    return {"export": str(towers.path), "export_fingerprint": towers.fingerprint}


def fill_chunks(ctx: StageContext, records: Artifact, params: dict, shard: int = 0,
                shards: int = 1) -> tuple[list[ChunkFile], int]:
    """Encode the chunks of this shard that the pool lacks (or holds only provisionally); returns every chunk
    of the plan that exists afterwards, in order, and how many chunks this call encoded."""
    runtime: Runtime = ctx.runtime
    pool = ChunkPool(ctx.pool)
    identity = ctx.key if not params.get("export_fingerprint") else \
        hashlib.sha256(f"{ctx.key}:{params['export_fingerprint']}".encode()).hexdigest()
    plan = make_plan(records, runtime.source.kind, runtime.chunk_size, identity, ctx.memo)
    found = pool.scan()
    mine = [g for g in range(plan.groups) if shard_of(g, shards) == shard]
    pending = {g: first for g in mine if (first := _first_pending(plan, g, found, pool)) is not None}
    done = len(mine) - len(pending)
    if done:
        ctx.resumed = True
        who = f"shard {shard}/{shards}" if shards > 1 else "image encoding"
        unit = "chunks" if plan.kind == "images" else "tar shards"
        log.info("resuming %s: %d of %d %s already done", who, done, len(mine), unit)
    counters = runtime.counters
    written: dict[str, ChunkFile] = {}
    images = 0
    if pending:
        written, images = _encode(plan, pending, pool, runtime, params)
        found.update(written)
    encoded = len(written) - len(_index_keys(plan, pending) & set(written))
    log.info("encoded %d images in %d chunks; %d %s reused", images, encoded, done,
             "chunks" if plan.kind == "images" else "tar shards")
    for key, value in (("chunks_encoded", encoded), ("chunks_reused", done), ("images_encoded", images)):
        counters[key] = counters.get(key, 0) + value
    return _listing(plan, found, pool), encoded


def _first_pending(plan: Plan, group: int, found: dict[str, ChunkFile], pool: ChunkPool) -> int | None:
    """None when the group is done; else the first chunk of it to encode (0, or later in a shard read before)."""
    if plan.kind == "images":
        chunk = found.get(plan.chunk_key(group, 0))
        return None if chunk is not None and chunk.final else 0
    count = _shard_chunk_count(plan, group, found, pool)
    sub = 0
    while (chunk := found.get(plan.chunk_key(group, sub))) is not None and chunk.final:
        sub += 1
    return None if count is not None and sub >= count else sub


def _shard_chunk_count(plan: Plan, group: int, found: dict[str, ChunkFile], pool: ChunkPool) -> int | None:
    """How many chunks a tar shard makes, once it has been read to its end; None before."""
    index = found.get(plan.index_key(group))
    return None if index is None else json.loads(pool.read(index))["chunks"]


def _listing(plan: Plan, found: dict[str, ChunkFile], pool: ChunkPool) -> list[ChunkFile]:
    if plan.kind == "images":
        return [found[span.key] for span in plan.spans if span.key in found]
    listed = []
    for group in range(plan.groups):
        count = _shard_chunk_count(plan, group, found, pool)
        sub = 0
        while (count is None or sub < count) and (chunk := found.get(plan.chunk_key(group, sub))) is not None:
            listed.append(chunk)
            sub += 1
    return listed


def chunk_rows(pool: ChunkPool, chunk: ChunkFile) -> int:
    """Rows of a chunk, from its footer (no full read)."""
    with pa.memory_map(str(pool.path(chunk))) as source:
        reader = ipc.open_file(source)
        return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))


# ----------------------------------------------------------------------------------- decoding in workers

class DecodeTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise DecodeTimeout()


@contextmanager
def _deadline(seconds: float):
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


# What a worker sends: group, chunk number in the group, batch number in the chunk, part number and parts in the
# batch, whether the batch closes the chunk, the group's chunk count when the item ends the group (-1: the
# group ended early for a reason worth retrying; None: not the end), the rows and their pixels.
Item = tuple[int, int, int, int, int, bool, "int | None", list, "torch.Tensor | None"]


class Decoder(IterableDataset):
    """The decode work of this run, split between DataLoader workers (worker w of n takes tasks w, w+n, ...):
    parts of batches for per-image sources, whole tar shards for shard sources. Memory-maps the records; no worker
    holds the list of paths."""

    def __init__(self, plan: Plan, pending: dict[int, int], runtime: Runtime, preprocessor: Preprocessor,
                 draft: bool, max_pixels: int, workers: int) -> None:
        self.plan, self.pending, self.source, self.preprocessor = plan, pending, runtime.source, preprocessor
        self.draft, self.max_pixels, self.timeout = draft, max_pixels, runtime.timeout
        self.batch_size, self.chunk_size, self.workers = runtime.batch_size, runtime.chunk_size, max(1, workers)

    def __iter__(self) -> Iterator[Item]:
        info = get_worker_info()
        me, every = (info.id, info.num_workers) if info is not None else (0, 1)
        tasks = self._image_tasks() if self.plan.kind == "images" else self._shard_tasks()
        for number, task in enumerate(tasks):
            if number % every == me:
                yield from task()

    # per-image sources ---------------------------------------------------------------------------------------

    def _image_tasks(self):
        # A batch is split into one part per worker: it is ready as soon as all workers together have decoded it,
        # and one large image delays only its part.
        part = max(1, -(-self.batch_size // self.workers))
        for group in sorted(self.pending):
            span = self.plan.spans[group]
            starts = range(span.start, span.stop, self.batch_size)
            for batch_no, start in enumerate(starts):
                stop = min(start + self.batch_size, span.stop)
                pieces = range(start, stop, part)
                for part_no, first in enumerate(pieces):
                    closes = batch_no == len(starts) - 1
                    yield lambda g=group, b=batch_no, p=part_no, n=len(pieces), c=closes, lo=first, \
                        hi=min(first + part, stop): [self._part(g, b, p, n, c, lo, hi)]

    def _part(self, group, batch_no, part_no, parts, closes, start, stop) -> Item:
        paths = self.plan.records.paths(start, stop)
        rows, pixels = [], []
        for path in paths:
            row, px = self._decode_one(path, lambda p=path: self.source.read(p), None)
            rows.append(row)
            if px is not None:
                pixels.append(px)
        return group, 0, batch_no, part_no, parts, closes, None, rows, _stack(pixels)

    # tar shards ----------------------------------------------------------------------------------------------

    def _shard_tasks(self):
        for group in sorted(self.pending):
            yield lambda g=group: self._shard(g, self.pending[g])

    def _shard(self, group: int, first_chunk: int) -> Iterator[Item]:
        name = self.plan.shards[group][0]
        skip, seen = first_chunk * self.chunk_size, 0
        sub, batch_no, in_chunk, rows, pixels = first_chunk, 0, 0, [], []
        failure = None
        members = iter(self.source.members(name))
        while True:
            try:
                with _deadline(self.timeout):
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
                yield group, sub, batch_no, 0, 1, closes, None, rows, _stack(pixels)
                rows, pixels, batch_no = [], [], batch_no + 1
                if closes:
                    sub, batch_no, in_chunk = sub + 1, 0, 0
        if failure is not None:  # the shard's own row: what came after the fault is unknown
            rows.append((name, -1, -1, failure.kind, str(failure), failure.transient, None))
        if rows or in_chunk:
            yield group, sub, batch_no, 0, 1, True, None, rows, _stack(pixels)
            sub += 1
        chunks = -1 if failure is not None and failure.transient else sub
        yield group, sub, 0, 0, 1, False, chunks, [], None

    # one image ----------------------------------------------------------------------------------------------

    def _decode_one(self, key: bytes, read, truth: str | None) -> tuple[Row, np.ndarray | None]:
        try:
            with _deadline(self.timeout):
                pixels, (width, height) = load_and_preprocess(read(), self.preprocessor, draft=self.draft,
                                                              max_pixels=self.max_pixels)
            return (key, width, height, None, None, False, truth), pixels
        except ImageError as exc:
            return (key, -1, -1, exc.kind, str(exc), exc.transient, truth), None
        except DecodeTimeout:
            return (key, -1, -1, "DecodeTimeout", f"reading and decoding took over {self.timeout:g}s "
                    "(preprocess.timeout)", True, truth), None
        except Exception as exc:  # noqa: BLE001 - one odd file must never end a million-image run
            return (key, -1, -1, type(exc).__name__, str(exc) or repr(exc), False, truth), None


def _as_is(item: Item) -> Item:
    return item


def _stack(inputs: list):
    """One image's worker output each -> a batch: stacked pixel values, a dict of stacked arrays, or (for
    on-device preprocessing) a list of 8-bit images of any sizes."""
    if not inputs:
        return None
    if isinstance(inputs[0], dict):
        return {key: torch.from_numpy(np.stack([item[key] for item in inputs])) for key in inputs[0]}
    if inputs[0].dtype == np.uint8:
        return [torch.from_numpy(np.ascontiguousarray(item)) for item in inputs]
    return torch.from_numpy(np.stack(inputs))


def _cat(batches: list):
    if len(batches) == 1:
        return batches[0]
    if isinstance(batches[0], dict):
        return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
    if isinstance(batches[0], list):
        return [image for batch in batches for image in batch]
    return torch.cat(batches)


def model_inputs(batch, preprocessor: Preprocessor, runtime: Runtime):
    """A decoded batch as the model takes it: preprocessed on the device where that is how it goes, padded to
    the fixed batch size where the device wants fixed shapes."""
    if isinstance(batch, list):
        batch = preprocessor.on(batch, runtime.device.device)
    return _pad(batch, runtime.pad_to)


# ---------------------------------------------------------------------------------------- the encode loop

@dataclass
class _Chunk:
    """A chunk being filled: each batch's rows and embeddings, by batch number."""

    batches: dict[int, tuple[list, np.ndarray | None]] = field(default_factory=dict)
    closing: int | None = None  # the last batch's number, once it is known

    def complete(self) -> bool:
        return self.closing is not None and len(self.batches) == self.closing + 1


def _encode(plan: Plan, pending: dict[int, int], pool: ChunkPool, runtime: Runtime,
            params: dict) -> tuple[dict[str, ChunkFile], int]:
    """Encode the pending groups; returns the chunks written (with the index chunks of tar shards read to their
    end) and how many images went through. The work goes in segments, each with a fresh set of decode workers,
    so that their number can follow what the run needs (see `WorkerTuner`)."""
    export = params.get("export")
    model = runtime.models.get(params["model"], params["dtype"], Path(export) if export else None)
    preprocessor = Preprocessor.from_params(params["preprocess"])
    tuner = WorkerTuner.for_runtime(runtime)
    run = _Encoding(plan, pool, model, runtime, preprocessor)
    segments = _segments(pending, tuner)
    total = sum(plan.spans[g].stop - plan.spans[g].start for g in pending) if plan.kind == "images" else None
    with Progress("encode images", total, "img", runtime.progress, runtime.progress_interval) as bar:
        run.progress = bar
        segment = next(segments, None)
        workers = tuner.count
        # The first workers start before the warm-up, so that the first batches decode while the model warms up.
        items = _loader(plan, segment, runtime, preprocessor, params, workers)
        warm_up(model, runtime, preprocessor)
        while segment is not None:
            started, before = time.perf_counter(), (run.images, dict(run.timing))
            run.consume(items)
            tuner.observe(workers, run.images - before[0], time.perf_counter() - started,
                          run.timing["data_wait_seconds"] - before[1]["data_wait_seconds"])
            segment, workers = next(segments, None), tuner.count
            if segment is not None:
                items = _loader(plan, segment, runtime, preprocessor, params, workers)
        run.finish()
    tuner.report()
    runtime.counters["decode_workers"] = tuner.count
    for key, seconds in run.timing.items():
        runtime.counters[key] = runtime.counters.get(key, 0.0) + seconds
    return run.written, run.images


def _loader(plan: Plan, segment: dict[int, int], runtime: Runtime, preprocessor: Preprocessor, params: dict,
            workers: int) -> Iterator[Item]:
    decoder = Decoder(plan, segment, runtime, preprocessor, params["draft"], params["max_pixels"], workers)
    loader = DataLoader(decoder, batch_size=None, collate_fn=_as_is, num_workers=workers,
                        prefetch_factor=4 if workers else None, persistent_workers=False,
                        pin_memory=runtime.device.is_accelerator)
    return iter(loader)


def _segments(pending: dict[int, int], tuner: "WorkerTuner") -> Iterator[dict[int, int]]:
    """The pending groups in runs: one group at a time while the worker count is being tuned, then larger runs
    (a fresh set of workers costs a fraction of a second)."""
    groups = sorted(pending)
    at = 0
    while at < len(groups):
        size = 1 if not tuner.settled else SETTLED_SEGMENT
        yield {g: pending[g] for g in groups[at:at + size]}
        at += size


SETTLED_SEGMENT = 32  # groups per segment once the worker count is settled


class WorkerTuner:
    """The number of decode workers, adapted while the run goes, by measured throughput: it grows while the model
    waits for data (up to `highest`: the cores, less one for the thread that drives an accelerator) as long as
    each step pays, and falls back when more workers slow the run down (on a CPU, decoders and the model share
    the cores). A count set in the config (`encode.num_workers`) stays as set."""

    def __init__(self, start: int, highest: int, fixed: bool) -> None:
        self.count, self.highest, self.fixed = start, max(start, highest), fixed
        self.rates: dict[int, float] = {}
        self.settled = fixed

    @classmethod
    def for_runtime(cls, runtime: Runtime) -> "WorkerTuner":
        return cls(runtime.num_workers, runtime.max_workers, runtime.workers_fixed)

    def observe(self, workers: int, images: int, seconds: float, waited: float) -> None:
        if self.settled or not images or seconds <= 0:
            return
        rate = images / seconds
        self.rates[workers] = max(rate, self.rates.get(workers, 0.0))
        better = self.rates.get(workers - 1)
        if better is not None and rate < better * GAIN:  # the last step did not pay: go back and stay
            self.count, self.settled = workers - 1, True
        elif waited / seconds > WAITING and workers < self.highest:
            self.count = workers + 1
        else:
            self.settled = True

    def report(self) -> None:
        if self.fixed:
            return
        tried = ", ".join(f"{k}: {v:.1f} img/s" for k, v in sorted(self.rates.items()))
        log.info("decode workers: settled on %d (tried %s)", self.count, tried or "-")


GAIN = 1.05  # a worker more must bring 5% more images per second to be kept
WAITING = 0.05  # the model waits for data more than this share of the time: try a worker more


class _Encoding:
    """The main process's side: decoded parts joined into the planned batches, batches through the model, each
    batch's embeddings into its chunk, complete chunks into the pool."""

    def __init__(self, plan: Plan, pool: ChunkPool, model: LoadedModel, runtime: Runtime,
                 preprocessor: Preprocessor) -> None:
        self.plan, self.pool, self.model, self.runtime = plan, pool, model, runtime
        self.preprocessor = preprocessor
        self.written: dict[str, ChunkFile] = {}
        self.parts: dict[tuple[int, int, int], list] = {}
        self.chunks: dict[tuple[int, int], _Chunk] = {}
        self.timing = {"data_wait_seconds": 0.0, "model_seconds": 0.0, "chunk_write_seconds": 0.0}
        self.images = 0
        self.progress = None
        self.in_flight = None  # the batch whose embeddings are still on their way back from the device

    def consume(self, items: Iterator[Item]) -> None:
        clock = time.perf_counter()
        for group, sub, batch_no, part_no, n_parts, closes, ends, rows, pixels in items:
            clock = _lap(self.timing, "data_wait_seconds", clock)
            if ends is not None:
                if ends >= 0:  # a tar shard read to its end: record how many chunks it makes
                    key = self.plan.index_key(group)
                    self.written[key] = self.pool.put(key, json.dumps({"chunks": ends}).encode())
                continue
            received = self.parts.setdefault((group, sub, batch_no), [])
            received.append((part_no, rows, pixels))
            if len(received) < n_parts:
                continue
            del self.parts[(group, sub, batch_no)]
            received.sort(key=lambda r: r[0])
            batch_rows = [row for _, part_rows, _ in received for row in part_rows]
            tensors = [px for _, _, px in received if px is not None]
            # Launch this batch before collecting the one before it: the device works while the host writes.
            launched = self.model.encode_images_async(model_inputs(_cat(tensors), self.preprocessor, self.runtime)) \
                if tensors else None
            _lap(self.timing, "model_seconds", clock)
            self._collect()  # times itself: model (waiting for the results) and chunk writing
            self.in_flight = ((group, sub, batch_no, closes), batch_rows, launched, len(batch_rows))
            clock = time.perf_counter()
        self._collect()

    def _collect(self) -> None:
        if self.in_flight is None:
            return
        started = time.perf_counter()
        (group, sub, batch_no, closes), batch_rows, launched, count = self.in_flight
        self.in_flight = None
        embeddings = None
        if launched is not None:
            ok = sum(1 for row in batch_rows if row[3] is None)
            embeddings = launched.result()[:ok]  # drop the rows that padded the batch to its fixed size
        self.timing["model_seconds"] += time.perf_counter() - started
        chunk = self.chunks.setdefault((group, sub), _Chunk())
        chunk.batches[batch_no] = (batch_rows, embeddings)
        if closes:
            chunk.closing = batch_no
        self.images += count
        if self.progress is not None:
            self.progress.update(count)
        if chunk.complete():
            started = time.perf_counter()
            key = self.plan.chunk_key(group, sub)
            self.written[key] = _write_chunk(self.pool, key, self.chunks.pop((group, sub)), self.model.embedding_dim)
            self.timing["chunk_write_seconds"] += time.perf_counter() - started

    def finish(self) -> None:
        self._collect()


def _pad(inputs, size: int | None):
    """Pad a short batch to `size` rows of zeros (accelerators: every new shape is an operator compilation on
    Ascend, a new kernel plan on CUDA); the padding rows' embeddings are dropped."""
    if not size:
        return inputs
    def pad(t: torch.Tensor) -> torch.Tensor:
        missing = size - t.shape[0]
        return t if missing <= 0 else torch.cat([t, t.new_zeros((missing, *t.shape[1:]))])
    return {k: pad(v) for k, v in inputs.items()} if isinstance(inputs, dict) else pad(inputs)


def _index_keys(plan: Plan, pending: dict[int, int]) -> set[str]:
    return {plan.index_key(g) for g in pending} if plan.kind == "shards" else set()


def _lap(timing: dict[str, float], key: str, since: float) -> float:
    now = time.perf_counter()
    timing[key] += now - since
    return now


def _write_chunk(pool: ChunkPool, key: str, chunk: _Chunk, dim: int) -> ChunkFile:
    rows = [row for b in sorted(chunk.batches) for row in chunk.batches[b][0]]
    found = [chunk.batches[b][1] for b in sorted(chunk.batches) if chunk.batches[b][1] is not None]
    path, width, height, kind, message, transient, truth = (list(col) for col in zip(*rows)) if rows else ([],) * 7
    ok = np.array([k is None for k in kind], dtype=bool)
    full = np.zeros((len(rows), dim), np.float32)
    if found:
        full[ok] = np.concatenate(found)
    table = pa.Table.from_arrays([
        pa.array(path, pa.binary()), pa.array(ok, pa.bool_()), pa.array(width, pa.int32()),
        pa.array(height, pa.int32()), pa.array(kind, pa.string()), pa.array(message, pa.string()),
        pa.array(transient, pa.bool_()), pa.array(truth, pa.string()),
        pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), dim)], schema=chunk_schema(dim))
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return pool.put(key, sink.getvalue().to_pybytes(), final=not any(transient))


# ------------------------------------------------------------------------------------------- reading back

def iter_chunks(artifact: Artifact) -> Iterator[pa.Table]:
    """The stage's chunks in record order, each verified as it is read (InputCorrupt when one is damaged)."""
    for chunk in artifact.chunks():
        yield ipc.open_file(pa.py_buffer(artifact.read_chunk(chunk))).read_all()


def embedding_matrix(chunk: pa.Table) -> np.ndarray:
    column = chunk.column("embedding").combine_chunks()
    return column.flatten().to_numpy().reshape(len(chunk), column.type.list_size)


def image_count(artifact: Artifact) -> int:
    """How many images the stage covered (classified or failed)."""
    return int(artifact.chunk_list()["count"])


# ---------------------------------------------------------------------------------------------- warm-up

def warm_up(model: LoadedModel, runtime: Runtime, preprocessor: Preprocessor) -> None:
    """One untimed batch first, so allocation, kernel selection or graph capture do not count as throughput."""
    if runtime.warmup_image:
        inputs, _ = load_and_preprocess(Path(runtime.warmup_image).read_bytes(), preprocessor)
    else:
        inputs = preprocessor.apply(builtin_warmup_image())
    count = runtime.batch_size if runtime.device.is_accelerator else 1
    started = time.perf_counter()
    model.encode_images(model_inputs(_stack([inputs] * count), preprocessor, runtime))
    runtime.counters["warmup_seconds"] = time.perf_counter() - started
    if getattr(model, "compiled", False):
        log.info("first call of the compiled vision tower (the compile cost) took %.1fs",
                 runtime.counters["warmup_seconds"])


def builtin_warmup_image():
    from PIL import Image

    y, x = np.mgrid[0:240, 0:320]
    rgb = np.stack([x * 255 // 319, y * 255 // 239, (x + y) * 255 // 558], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")
