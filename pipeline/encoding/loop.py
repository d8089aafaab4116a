"""The main process's side of image encoding: decoded parts joined into the planned batches, batches through the
vision tower, each batch's embeddings into its chunk, complete chunks into the pool. Batches never straddle
chunks, so a chunk holds exactly the batches an uninterrupted run would have made (CPU fp32 results stay
bit-identical whatever was resumed, and whichever shard wrote it)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generator, Iterator

import numpy as np
import torch

from ..devices import release_free_memory
from ..engine import ChunkFile, ChunkPool
from ..imaging import Preprocessor, load_and_preprocess
from ..models import LoadedModel
from ..progress import Progress
from ..sources import Source
from ..stages.execution import Execution
from .decode import PREFETCH, DecodedPart, Decoder, ImageRow, TarEnd, stack
from .embeddings import write_chunk
from .plan import Plan
from .tuner import Step, Watch, WorkerTuner

log = logging.getLogger(__name__)


def encode_groups(plan: Plan, pending: dict[int, int], pool: ChunkPool, execution: Execution, source: Source,
                  params: dict) -> tuple[dict[str, ChunkFile], int]:
    """Encode the pending groups (group -> its first chunk to encode); returns the chunks written (with the index
    chunks of tar files read to their end) and how many images went through. Each step of the tuner gets a
    fresh set of decode workers, and a step is stopped early only to change their number (see `WorkerTuner`)."""
    export = params.get("export")
    model = execution.models.get(params["model"], params["dtype"], Path(export) if export else None)
    preprocessor = Preprocessor.from_params(params["preprocess"])
    tuner = WorkerTuner(execution.num_workers, execution.max_workers, execution.workers_fixed, execution.min_workers)
    loop = BatchLoop(plan, pool, model, preprocessor, execution)

    def decoder(step: tuple[dict[int, int], range | None], workers: int) -> Decoder:
        return Decoder(plan, step[0], source, preprocessor, draft=params["draft"], max_pixels=params["max_pixels"],
                       timeout=execution.timeout, batch_size=execution.batch_size,
                       chunk_size=plan.chunk_size, workers=workers, window=step[1])

    pin = execution.device.is_accelerator
    with Progress("encode images", plan.images(pending), "img", execution.progress,
                  execution.progress_interval) as bar:
        loop.progress = bar
        steps = tuner.segments(pending, lambda group: plan.batches(group, execution.batch_size))
        step, workers = next(steps, None), tuner.count
        # The first workers start before the warm-up, so that the first batches decode while the model warms up.
        decoded = decoder(step, workers).start(pin)
        warm_up(model, execution, preprocessor)
        while step is not None:
            resume = loop.consume(decoded, tuner.watch(workers, step, PREFETCH))
            del decoded  # its workers stop before the next ones start
            step, workers = _next_step(steps, resume), tuner.count
            if step is not None:
                decoded = decoder(step, workers).start(pin)
        loop.finish()
    tuner.report()
    execution.counters["decode_workers"] = tuner.count
    for key, seconds in loop.timing.items():
        execution.counters[key] = execution.counters.get(key, 0.0) + seconds
    return loop.written, loop.images


def _next_step(steps: Generator[Step, int | None, None], resume: int | None) -> Step | None:
    """The next step, after the last one ran to its end (`resume` None) or stopped before batch `resume`."""
    try:
        return steps.send(resume)
    except StopIteration:
        return None


@dataclass
class ChunkInProgress:
    """A chunk being filled: each batch's rows and embeddings, by batch number."""

    batches: dict[int, tuple[list[ImageRow], np.ndarray | None]] = field(default_factory=dict)
    closing: int | None = None  # the last batch's number, once it is known

    def complete(self) -> bool:
        return self.closing is not None and len(self.batches) == self.closing + 1

    def rows_and_embeddings(self) -> tuple[list[ImageRow], list[np.ndarray]]:
        order = sorted(self.batches)
        rows = [row for b in order for row in self.batches[b][0]]
        return rows, [self.batches[b][1] for b in order if self.batches[b][1] is not None]


@dataclass
class InFlight:
    """A batch whose embeddings are still on their way back from the device."""

    part: DecodedPart  # its first part (group, chunk, batch, closes_chunk)
    rows: list[ImageRow]
    launched: object | None  # models.Embeddings, or None when no image of the batch decoded


class BatchLoop:
    def __init__(self, plan: Plan, pool: ChunkPool, model: LoadedModel, preprocessor: Preprocessor,
                 execution: Execution) -> None:
        self.plan, self.pool, self.model, self.preprocessor, self.execution = plan, pool, model, preprocessor, execution
        self.written: dict[str, ChunkFile] = {}
        self.parts: dict[tuple[int, int, int], list[DecodedPart]] = {}
        self.chunks: dict[tuple[int, int], ChunkInProgress] = {}
        self.timing = {"data_wait_seconds": 0.0, "model_seconds": 0.0, "chunk_write_seconds": 0.0}
        self.images = 0
        self.progress: Progress | None = None
        self.in_flight: InFlight | None = None

    def consume(self, decoded: Iterator[DecodedPart | TarEnd], watch: Watch | None = None) -> int | None:
        """Every batch of one step through the model; with a `watch` (the worker count being tuned), stops early
        when it says so and returns the batch of the step's group to resume from (None: the step is done)."""
        clock = time.perf_counter()
        for message in decoded:
            clock = _lap(self.timing, "data_wait_seconds", clock)
            if watch is not None:
                watch.arrived(clock, self.images, self.timing["data_wait_seconds"])
            if isinstance(message, TarEnd):
                self._tar_read(message)
                continue
            parts = self._batch_of(message)
            if parts is None:
                continue
            rows = [row for part in parts for row in part.rows]
            pixels = [part.pixels for part in parts if part.pixels is not None]
            # Launch this batch before collecting the one before it: the device works while the host writes.
            launched = self.model.encode_images_async(model_inputs(_cat(pixels), self.preprocessor,
                                                                   self.execution)) if pixels else None
            _lap(self.timing, "model_seconds", clock)
            self._collect()  # times itself: model (waiting for the results) and chunk writing
            self.in_flight = InFlight(parts[0], rows, launched)
            clock = time.perf_counter()
            resume = watch.after_batch(clock, self.images, self.timing["data_wait_seconds"],
                                       parts[0].batch) if watch is not None else None
            if resume is not None:  # parts come in task order, so no later batch has come whole: none is lost
                self._collect()
                self.parts = {slot: got for slot, got in self.parts.items() if slot[0] != message.group}
                return resume
        self._collect()
        if watch is not None:
            watch.finish(time.perf_counter(), self.images, self.timing["data_wait_seconds"])
        return None

    def finish(self) -> None:
        self._collect()

    def _batch_of(self, part: DecodedPart) -> list[DecodedPart] | None:
        """The batch's parts in order once all have come (None before)."""
        slot = (part.group, part.chunk, part.batch)
        received = self.parts.setdefault(slot, [])
        received.append(part)
        if len(received) < part.parts:
            return None
        del self.parts[slot]
        return sorted(received, key=lambda p: p.part)

    def _tar_read(self, end: TarEnd) -> None:
        if end.chunks >= 0:  # read to its end: record how many chunks it makes
            key = self.plan.index_key(end.group)
            self.written[key] = self.pool.put(key, json.dumps({"chunks": end.chunks}).encode())

    def _collect(self) -> None:
        if self.in_flight is None:
            return
        started = time.perf_counter()
        batch, self.in_flight = self.in_flight, None
        embeddings = None
        if batch.launched is not None:
            decoded = sum(1 for row in batch.rows if row.error_type is None)
            embeddings = batch.launched.result()[:decoded]  # drop the rows that padded the batch to its fixed size
        self.timing["model_seconds"] += time.perf_counter() - started
        part = batch.part
        chunk = self.chunks.setdefault((part.group, part.chunk), ChunkInProgress())
        chunk.batches[part.batch] = (batch.rows, embeddings)
        if part.closes_chunk:
            chunk.closing = part.batch
        self.images += len(batch.rows)
        if self.progress is not None:
            self.progress.update(len(batch.rows))
        if chunk.complete():
            started = time.perf_counter()
            key = self.plan.chunk_key(part.group, part.chunk)
            rows, found = self.chunks.pop((part.group, part.chunk)).rows_and_embeddings()
            self.written[key] = write_chunk(self.pool, key, rows, found, self.model.embedding_dim)
            release_free_memory()
            self.timing["chunk_write_seconds"] += time.perf_counter() - started


def model_inputs(batch, preprocessor: Preprocessor, execution: Execution):
    """A decoded batch as the model takes it: preprocessed on the device where that is how it goes, padded to
    the fixed batch size where the device wants fixed shapes."""
    if isinstance(batch, list):
        batch = preprocessor.on(batch, execution.device.device)
    return pad(batch, execution.pad_to)


def pad(inputs, size: int | None):
    """Pad a short batch to `size` rows of zeros (accelerators: every new shape is an operator compilation on
    Ascend, a new kernel plan on CUDA; exported runtimes: a per-shape cache); the padding rows' embeddings are
    dropped."""
    if not size:
        return inputs

    def padded(t: torch.Tensor) -> torch.Tensor:
        missing = size - t.shape[0]
        return t if missing <= 0 else torch.cat([t, t.new_zeros((missing, *t.shape[1:]))])
    return {k: padded(v) for k, v in inputs.items()} if isinstance(inputs, dict) else padded(inputs)


def _cat(batches: list):
    if len(batches) == 1:
        return batches[0]
    if isinstance(batches[0], dict):
        return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
    if isinstance(batches[0], list):
        return [image for batch in batches for image in batch]
    return torch.cat(batches)


def _lap(timing: dict[str, float], key: str, since: float) -> float:
    now = time.perf_counter()
    timing[key] += now - since
    return now


def warm_up(model: LoadedModel, execution: Execution, preprocessor: Preprocessor) -> None:
    """One untimed batch first, so allocation, kernel selection or graph capture do not count as throughput."""
    if execution.warmup_image:
        inputs, _ = load_and_preprocess(Path(execution.warmup_image).read_bytes(), preprocessor)
    else:
        inputs = preprocessor.apply(builtin_warmup_image())
    count = execution.batch_size if execution.device.is_accelerator else 1
    started = time.perf_counter()
    model.encode_images(model_inputs(stack([inputs] * count), preprocessor, execution))
    execution.counters["warmup_seconds"] = time.perf_counter() - started
    if getattr(model, "compiled", False):
        log.info("first call of the compiled vision tower (the compile cost) took %.1fs",
                 execution.counters["warmup_seconds"])


def builtin_warmup_image():
    from PIL import Image

    y, x = np.mgrid[0:240, 0:320]
    rgb = np.stack([x * 255 // 319, y * 255 // 239, (x + y) * 255 // 558], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")
