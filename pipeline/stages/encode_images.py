"""Stage `encode_images`: decode + preprocess in worker processes, run the vision tower in batches, and keep
the embeddings in checksummed chunks of the stage's chunk pool.

Chunks. The records are cut into chunks of about `encode.chunk_size` images with content-defined boundaries
(a chunk ends after an image whose path hashes to a boundary, within half to twice the size), so adding or
removing images changes only the chunks around them. A chunk's key is the hash of the stage's identity (model
content, dtype, preprocessing, this module's VERSION) and of its records (path, size, version): any process
that needs the same chunk finds it by key, whether it was written before a kill, by another shard, or by a run
over a folder where other files changed. Batches never straddle chunks, so a chunk holds exactly the batches an
uninterrupted run would have made (CPU fp32 results stay bit-identical).

Failures. An image that cannot be read or decoded becomes a row with its error, never an exception. A failure in
the image's bytes is final; one outside them (I/O error, permission denied, timeout) makes its chunk provisional,
and the stage `Incomplete`: the next run encodes that chunk again.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..engine import Artifact, ChunkFile, ChunkPool, Incomplete, StageContext, write_chunk_list
from ..errors import ImageError
from ..imaging import PreprocessSpec, load_and_preprocess, preprocess
from ..models import LoadedModel
from .discover import Records
from .runtime import Runtime

log = logging.getLogger(__name__)

VERSION = 2
# Besides this module, the code that decides its output (tests/unit/test_stage_versions.py holds VERSION to it).
CODE = ("pipeline.imaging", "pipeline.models", "pipeline.sources.folder", "pipeline.errors")


def chunk_schema(dim: int) -> pa.Schema:
    return pa.schema([("path", pa.binary()), ("ok", pa.bool_()), ("width", pa.int32()), ("height", pa.int32()),
                      ("error_type", pa.string()), ("error_message", pa.string()), ("transient", pa.bool_()),
                      ("embedding", pa.list_(pa.float32(), dim))])


# ------------------------------------------------------------------------------------------------ chunking

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
        columns = (batch.column("path").to_pylist(), batch.column("size").to_pylist(),
                   batch.column("version").to_pylist())
        for path, size, version in zip(*columns):
            digest.update(b"%d:%s%d:%s;" % (len(path), path, size, version.encode()))
            row += 1
            length = row - start
            if length >= max_size or (length >= min_size and zlib.crc32(path) % modulus == 0):
                spans.append(ChunkSpan(start, row, digest.hexdigest()))
                start, digest = row, hashlib.sha256(identity.encode())
    if row > start:
        spans.append(ChunkSpan(start, row, digest.hexdigest()))
    return spans


def shard_of(ordinal: int, count: int) -> int:
    """The shard that encodes the chunk at position `ordinal` of the plan."""
    return ordinal % count


# ------------------------------------------------------------------------------------------ the stage

def encode_images(ctx: StageContext, *, records: Artifact, model: str, dtype: str, preprocess: dict,
                  draft: bool, max_pixels: int) -> Incomplete | None:
    params = dict(model=model, dtype=dtype, preprocess=preprocess, draft=draft, max_pixels=max_pixels)
    table = Records(records)
    spans, chunks, _ = fill_chunks(ctx, table, params)
    listed = [chunks[span.key] for span in spans]
    write_chunk_list(ctx.out, listed, count=table.count)
    retry = [c for c in listed if not c.final]
    if retry:
        return Incomplete(f"{len(retry)} chunk(s) hold images that failed for reasons outside their bytes")
    return None


def encode_shard(ctx: StageContext, *, records: Artifact, shard: int, shards: int, **params) -> int:
    """Encode only the chunks of shard `shard` of `shards` into the stage's pool; the stage itself, run later by
    one process, finds them there. Returns the number of chunks this call encoded."""
    return fill_chunks(ctx, Records(records), params, shard, shards)[2]


def fill_chunks(ctx: StageContext, records: Records, params: dict, shard: int = 0,
                shards: int = 1) -> tuple[list[ChunkSpan], dict[str, ChunkFile], int]:
    """Encode the chunks of this shard that the pool lacks (or holds only provisionally); returns the plan,
    every chunk of the pool by key, and how many chunks this call encoded."""
    runtime: Runtime = ctx.runtime
    pool = ChunkPool(ctx.pool)
    spans = plan_chunks(records, runtime.chunk_size, ctx.key)
    chunks = pool.scan()
    mine = [span for k, span in enumerate(spans) if shard_of(k, shards) == shard]
    pending = [span for span in mine if span.key not in chunks or not chunks[span.key].final]
    done = len(mine) - len(pending)
    if done:
        ctx.resumed = True
        who = f"shard {shard}/{shards}" if shards > 1 else "image encoding"
        log.info("resuming %s: %d of %d chunks already done", who, done, len(mine))
    counters = runtime.counters
    counters["chunks_reused"] = counters.get("chunks_reused", 0) + done
    if pending:
        chunks.update(_encode(records, pending, pool, runtime, params))
    counters["chunks_encoded"] = counters.get("chunks_encoded", 0) + len(pending)
    images = sum(s.stop - s.start for s in pending)
    counters["images_encoded"] = counters.get("images_encoded", 0) + images
    log.info("encoded %d images in %d chunks; %d chunks reused", images, len(pending), done)
    return spans, chunks, len(pending)


# ----------------------------------------------------------------------------------- decoding in workers

class DecodeTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise DecodeTimeout()


class ImageReader(Dataset):
    """Read + decode + preprocess record `i` in a worker; a bad image yields an error row, never an exception.

    Each image gets `timeout` seconds (SIGALRM in the worker): an image whose read blocks or whose decoder spins
    is reported as DecodeTimeout (transient) instead of hanging the run. The records file is memory-mapped in
    each worker on first use: no worker holds the list of paths."""

    def __init__(self, records_file: Path, runtime: Runtime, spec: PreprocessSpec, draft: bool,
                 max_pixels: int) -> None:
        self.records_file, self.source, self.spec = records_file, runtime.source, spec
        self.draft, self.max_pixels, self.timeout = draft, max_pixels, runtime.timeout
        self._paths = None

    def __len__(self) -> int:
        return Records(self.records_file).count

    def path(self, index: int) -> bytes:
        if self._paths is None:
            self._paths = Records(self.records_file).table().column("path")
        return self._paths[index].as_py()

    def __getitem__(self, index: int) -> tuple:
        armed = self.timeout > 0 and threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGALRM, _on_alarm) if armed else None
        try:
            if armed:
                signal.setitimer(signal.ITIMER_REAL, self.timeout)
            data = self.source.read(self.path(index))
            pixels, (width, height) = load_and_preprocess(data, self.spec, draft=self.draft,
                                                          max_pixels=self.max_pixels)
            return index, pixels, width, height, None, None, False
        except ImageError as exc:
            return index, None, -1, -1, exc.kind, str(exc), exc.transient
        except DecodeTimeout:
            return (index, None, -1, -1, "DecodeTimeout",
                    f"reading and decoding took over {self.timeout:g}s (preprocess.timeout)", True)
        except Exception as exc:  # noqa: BLE001 - one odd file must never end a million-image run
            return index, None, -1, -1, type(exc).__name__, str(exc) or repr(exc), False
        finally:
            if armed:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)


def collate(items: list[tuple]) -> tuple[list[tuple], torch.Tensor | None]:
    good = [item[1] for item in items if item[1] is not None]
    pixels = torch.from_numpy(np.stack(good)) if good else None
    return [(i, w, h, kind, msg, transient) for i, _, w, h, kind, msg, transient in items], pixels


# ---------------------------------------------------------------------------------------- the encode loop

def _batches(spans: list[ChunkSpan], batch_size: int) -> Iterator[list[int]]:
    for span in spans:
        for start in range(span.start, span.stop, batch_size):
            yield list(range(start, min(start + batch_size, span.stop)))


def _encode(records: Records, pending: list[ChunkSpan], pool: ChunkPool, runtime: Runtime,
            params: dict) -> dict[str, ChunkFile]:
    model = runtime.models.get(params["model"], params["dtype"])
    spec = PreprocessSpec.from_dict(params["preprocess"])
    # Workers decode parts of a batch (one part per worker), not whole batches: a batch is then ready as soon
    # as all workers together have decoded it, and one large image delays only its part.
    part = max(1, -(-runtime.batch_size // max(1, runtime.num_workers)))
    parts = (batch[i:i + part] for batch in _batches(pending, runtime.batch_size)
             for i in range(0, len(batch), part))
    reader = ImageReader(records.path, runtime, spec, params["draft"], params["max_pixels"])
    loader = DataLoader(reader, batch_sampler=parts, collate_fn=collate, num_workers=runtime.num_workers,
                        prefetch_factor=4 if runtime.num_workers else None, persistent_workers=False)
    # Start the workers before the warm-up, so that the first batches decode while the model warms up.
    decoded = _whole_batches(iter(loader), _batches(pending, runtime.batch_size), part,
                             pin=runtime.device.is_accelerator)
    warm_up(model, runtime, spec)
    written: dict[str, ChunkFile] = {}
    timing = {"data_wait_seconds": 0.0, "model_seconds": 0.0, "chunk_write_seconds": 0.0}
    total = sum(s.stop - s.start for s in pending)
    remaining = iter(pending)
    span = next(remaining)
    rows: list[tuple] = []
    embeddings: list[np.ndarray] = []
    clock = time.perf_counter()
    with tqdm(total=total, unit="img", desc="encode images", disable=not runtime.progress, smoothing=0.1) as bar:
        for meta, pixels in decoded:
            clock = _lap(timing, "data_wait_seconds", clock)
            if pixels is not None:
                embeddings.append(model.encode_images(pixels))
            clock = _lap(timing, "model_seconds", clock)
            rows.extend(meta)
            bar.update(len(meta))
            if rows[-1][0] == span.stop - 1:
                written[span.key] = _write_chunk(pool, span, records, rows, embeddings, model.embedding_dim)
                rows, embeddings = [], []
                span = next(remaining, None)
            clock = _lap(timing, "chunk_write_seconds", clock)
    for key, seconds in timing.items():
        runtime.counters[key] = runtime.counters.get(key, 0.0) + seconds
    return written


def _whole_batches(decoded_parts: Iterator[tuple], batches: Iterator[list[int]], part: int,
                   pin: bool) -> Iterator[tuple]:
    """Join the decoded parts back into the planned batches (the DataLoader returns them in order). With `pin`
    (an accelerator), the batch is assembled straight into page-locked memory for a non-blocking copy."""
    for batch in batches:
        pieces = [next(decoded_parts) for _ in range(0, len(batch), part)]
        meta = [row for piece_meta, _ in pieces for row in piece_meta]
        tensors = [pixels for _, pixels in pieces if pixels is not None]
        if not tensors:
            yield meta, None
            continue
        shape = (sum(len(t) for t in tensors), *tensors[0].shape[1:])
        joined = torch.empty(shape, dtype=tensors[0].dtype, pin_memory=pin)
        yield meta, torch.cat(tensors, out=joined)


def _lap(timing: dict[str, float], key: str, since: float) -> float:
    now = time.perf_counter()
    timing[key] += now - since
    return now


def _write_chunk(pool: ChunkPool, span: ChunkSpan, records: Records, rows: list[tuple],
                 embeddings: list[np.ndarray], dim: int) -> ChunkFile:
    index, width, height, kind, message, transient = (list(col) for col in zip(*rows))
    ok = np.array([k is None for k in kind], dtype=bool)
    full = np.zeros((len(rows), dim), np.float32)
    if embeddings:
        full[ok] = np.concatenate(embeddings)
    table = pa.Table.from_arrays([
        records.slice(span.start, span.stop).column("path"), pa.array(ok), pa.array(width, pa.int32()),
        pa.array(height, pa.int32()), pa.array(kind, pa.string()), pa.array(message, pa.string()),
        pa.array(transient, pa.bool_()),
        pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), dim)], schema=chunk_schema(dim))
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return pool.put(span.key, sink.getvalue().to_pybytes(), final=not any(transient))


# ------------------------------------------------------------------------------------------- reading back

def iter_chunks(artifact: Artifact) -> Iterator[pa.Table]:
    """The stage's chunks in record order, each verified as it is read (InputCorrupt when one is damaged)."""
    for chunk in artifact.chunks():
        yield ipc.open_file(pa.py_buffer(artifact.read_chunk(chunk))).read_all()


def embedding_matrix(chunk: pa.Table) -> np.ndarray:
    column = chunk.column("embedding").combine_chunks()
    return column.flatten().to_numpy().reshape(len(chunk), column.type.list_size)


def image_count(artifact: Artifact) -> int:
    """How many records the stage covered (classified or failed)."""
    return int(artifact.chunk_list()["count"])


# ---------------------------------------------------------------------------------------------- warm-up

def warm_up(model: LoadedModel, runtime: Runtime, spec: PreprocessSpec) -> None:
    """One untimed batch first, so allocation, kernel selection or graph capture do not count as throughput."""
    if runtime.warmup_image:
        pixels, _ = load_and_preprocess(Path(runtime.warmup_image).read_bytes(), spec)
    else:
        pixels = preprocess(builtin_warmup_image(), spec)
    count = runtime.batch_size if runtime.device.is_accelerator else 1
    started = time.perf_counter()
    model.encode_images(torch.from_numpy(np.stack([pixels] * count)))
    runtime.counters["warmup_seconds"] = time.perf_counter() - started


def builtin_warmup_image():
    from PIL import Image

    y, x = np.mgrid[0:240, 0:320]
    rgb = np.stack([x * 255 // 319, y * 255 // 239, (x + y) * 255 // 558], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")
