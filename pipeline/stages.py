"""The classification stages: plain functions `fn(ctx, inputs, ...)` for the DAG runner.

discover -> encode_images (decode + preprocess in DataLoader workers, batched vision tower, chunked checkpoints)
         \\                                                                                 \\
encode_labels (text tower once per label set) ------------------------------------------------> classify -> publish

Runtime resources (the dataset root, the model, batch size, workers) come in through `Resources`; they do not
enter fingerprints. What decides results comes in as stage params and does.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import evaluation
from .dag import Artifact, ChunkStore, StageContext
from .devices import DeviceChoice
from .faults import checkpoint
from .discovery import ImageRecord, discover
from .imaging import DEFAULT_MAX_PIXELS, ImageDecodeError, PreprocessSpec, load_and_preprocess, preprocess
from .labels import LabelSet
from .models import LoadedModel, ModelInfo
from .storage import read_json, write_json
from .writers import ErrorsWriter, PredictionsWriter, ResJsonWriter

log = logging.getLogger(__name__)

IMAGES_FILE = "images.parquet"
# Paths as raw bytes: a file name that is not valid UTF-8 must still round-trip to the same file.
IMAGES_SCHEMA = pa.schema([("path", pa.binary()), ("size", pa.int64()), ("mtime_ns", pa.int64())])
OUTPUT_FILES = ("predictions.parquet", "errors.parquet", "res.json")
EVALUATION_FILES = ("metrics.parquet", "confusion.parquet")  # only when ground truth is known


@dataclass
class Resources:
    """What the stages need at run time but that does not change results (so stays out of fingerprints)."""

    dataset: Path  # a directory, or a single image file
    model_info: ModelInfo
    device: DeviceChoice
    spec: PreprocessSpec
    batch_size: int = 8
    num_workers: int = 0
    chunk_size: int = 1024
    draft: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    timeout: float = 60.0
    warmup_image: str | None = None
    progress: bool = True
    counters: dict = field(default_factory=dict)
    preloaded: LoadedModel | None = None  # a model already in memory (benchmarks, notebooks)

    @cached_property
    def model(self) -> LoadedModel:
        # Loaded on first use: a rerun whose stages are all cached never pays for it.
        if self.preloaded is not None:
            return self.preloaded
        started = time.perf_counter()
        model = LoadedModel(self.model_info, self.device)
        self.counters["model_load_seconds"] = time.perf_counter() - started
        return model

    @property
    def root(self) -> Path:
        return self.dataset.parent if self.dataset.is_file() else self.dataset


# ---------------------------------------------------------------------------------------------------- discover

def discover_images(ctx: StageContext, inputs: dict[str, Artifact], *, res: Resources,
                    extensions: tuple[str, ...]) -> None:
    records = discover(res.dataset, extensions)
    table = pa.table({"path": [os.fsencode(r.path) for r in records], "size": [r.size for r in records],
                      "mtime_ns": [r.mtime_ns for r in records]}, schema=IMAGES_SCHEMA)
    pq.write_table(table, ctx.out / IMAGES_FILE)
    log.info("discovered %d images under %s", len(records), res.dataset)


def read_records(artifact: Artifact) -> list[ImageRecord]:
    table = pq.read_table(artifact.file(IMAGES_FILE))
    columns = [table.column(name).to_pylist() for name in ("path", "size", "mtime_ns")]
    return [ImageRecord(os.fsdecode(path), size, mtime) for path, size, mtime in zip(*columns)]


# ---------------------------------------------------------------------------------------------- encode labels

def encode_labels(ctx: StageContext, inputs: dict[str, Artifact], *, res: Resources, label_set: LabelSet) -> None:
    model = res.model
    started = time.perf_counter()
    if len(label_set.templates) == 1:
        embeddings = model.encode_text(label_set.prompts())
    else:
        total = sum(model.encode_text(label_set.prompts(t)) for t in label_set.templates)
        embeddings = total / np.linalg.norm(total, axis=1, keepdims=True)
    np.save(ctx.out / "text_embeddings.npy", embeddings.astype(np.float32))
    write_json(ctx.out / "labels.json", {**label_set.to_dict(), "logit_scale": model.logit_scale})
    log.info("encoded %d labels x %d templates in %.2fs (text tower once per prompt, not per image)",
             len(label_set.labels), len(label_set.templates), time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------- encode images

CHUNK_SCHEMA_FIELDS = [("index", pa.int64()), ("width", pa.int32()), ("height", pa.int32()),
                       ("error_type", pa.string()), ("error_message", pa.string())]


class DecodeTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise DecodeTimeout()


class ImageFiles(Dataset):
    """Decode + preprocess in DataLoader workers; a bad file yields an error record, never an exception.

    Each image gets `timeout` seconds (SIGALRM in the worker): a file that makes a decoder spin or block is
    reported as DecodeTimeout instead of hanging the run."""

    def __init__(self, root: Path, paths: list[str], spec: PreprocessSpec, draft: bool, max_pixels: int,
                 timeout: float = 0.0) -> None:
        self.root, self.paths, self.spec, self.draft, self.max_pixels = root, paths, spec, draft, max_pixels
        self.timeout = timeout

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple:
        armed = self.timeout > 0 and threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGALRM, _on_alarm) if armed else None
        try:
            if armed:
                signal.setitimer(signal.ITIMER_REAL, self.timeout)
            pixels, (width, height) = load_and_preprocess(self.root / self.paths[index], self.spec,
                                                          draft=self.draft, max_pixels=self.max_pixels)
            return index, pixels, width, height, None, None
        except ImageDecodeError as exc:
            return index, None, -1, -1, exc.kind, str(exc)
        except DecodeTimeout:
            return index, None, -1, -1, "DecodeTimeout", f"decoding took over {self.timeout:g}s (preprocess.timeout)"
        except Exception as exc:  # noqa: BLE001 - one odd file must never end a million-image run
            return index, None, -1, -1, type(exc).__name__, str(exc) or repr(exc)
        finally:
            if armed:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)


def collate(items: list[tuple]) -> tuple[list[tuple], torch.Tensor | None]:
    good = [item[1] for item in items if item[1] is not None]
    pixels = torch.from_numpy(np.stack(good)) if good else None
    return [(i, w, h, et, em) for i, _, w, h, et, em in items], pixels


def chunk_plan(total: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_size, total)) for start in range(0, total, chunk_size)]


def chunk_key(start: int, end: int) -> str:
    return f"images-{start:010d}-{end:010d}"


def encode_images(ctx: StageContext, inputs: dict[str, Artifact], *, res: Resources) -> None:
    records = read_records(inputs["discover"])
    plan, store, _ = _fill_chunks(records, ChunkStore(ctx.scratch), res)
    done = store.completed()
    chunk_files = []
    for start, end in plan:
        name = f"{chunk_key(start, end)}.arrow"
        os.replace(done[chunk_key(start, end)], ctx.out / name)
        chunk_files.append(name)
    write_json(ctx.out / "chunks.json", {"chunks": chunk_files, "count": len(records)})


def encode_shard(scratch: Path, inputs: dict[str, Artifact], res: Resources, index: int, count: int) -> int:
    """Encode only the chunks of shard `index` of `count` (chunk k belongs to shard k % count) into the
    stage's scratch store; the stage itself, run later by one process, finds them done and seals them.
    Returns the number of chunks this call encoded."""
    return _fill_chunks(read_records(inputs["discover"]), ChunkStore(scratch), res, index, count)[2]


def _fill_chunks(records: list[ImageRecord], store: ChunkStore, res: Resources, shard: int = 0,
                 shards: int = 1) -> tuple[list[tuple[int, int]], ChunkStore, int]:
    """Encode the chunks of this shard that the store does not hold yet; returns (plan, store, chunks encoded)."""
    plan = chunk_plan(len(records), res.chunk_size)
    done = store.completed()
    mine = [span for k, span in enumerate(plan) if k % shards == shard]
    pending = [span for span in mine if chunk_key(*span) not in done]
    if len(pending) < len(mine):
        who = f"shard {shard}/{shards}" if shards > 1 else "image encoding"
        log.info("resuming %s: %d of %d chunks already done", who, len(mine) - len(pending), len(mine))
    if pending:
        _encode_chunks(records, pending, store, res)
    return plan, store, len(pending)


def _encode_chunks(records: list[ImageRecord], pending: list[tuple[int, int]], store: ChunkStore,
                   res: Resources) -> None:
    model = res.model
    # Batches never straddle a chunk boundary: a resumed chunk then sees exactly the batches an uninterrupted run
    # would have, which keeps CPU fp32 results bit-identical.
    batches = [list(range(b, min(b + res.batch_size, end))) for start, end in pending
               for b in range(start, end, res.batch_size)]
    # Workers decode parts of a batch (one part per worker), not whole batches: a batch is then ready as soon
    # as all workers together have decoded it, and one large image delays only its part.
    part = max(1, -(-res.batch_size // max(1, res.num_workers)))
    parts = [batch[i:i + part] for batch in batches for i in range(0, len(batch), part)]
    dataset = ImageFiles(res.root, [r.path for r in records], res.spec, res.draft, res.max_pixels, res.timeout)
    loader = DataLoader(dataset, batch_sampler=parts, collate_fn=collate, num_workers=res.num_workers,
                        prefetch_factor=4 if res.num_workers else None, persistent_workers=False)
    # Start the workers before the warm-up, so that the first batches decode while the model warms up.
    decoded = _whole_batches(iter(loader), batches, part, pin=res.device.is_accelerator)
    warm_up(model, res)
    remaining = iter(pending)
    current = next(remaining)
    rows: list[tuple] = []
    embeddings: list[np.ndarray] = []
    total = sum(e - s for s, e in pending)
    # Where the stage's time goes (the benchmark's profile): waiting for decoded batches, the model, writing.
    timing = {"data_wait_seconds": 0.0, "model_seconds": 0.0, "chunk_write_seconds": 0.0}
    clock = time.perf_counter()
    with tqdm(total=total, unit="img", desc="encode images", disable=not res.progress, smoothing=0.1) as bar:
        for meta, pixels in decoded:
            clock = _lap(timing, "data_wait_seconds", clock)
            if pixels is not None:
                embeddings.append(model.encode_images(pixels))
            clock = _lap(timing, "model_seconds", clock)
            rows.extend(meta)
            bar.update(len(meta))
            if rows and rows[-1][0] == current[1] - 1:
                _write_chunk(store, current, rows, embeddings, model.embedding_dim)
                rows, embeddings = [], []
                current = next(remaining, None)
            clock = _lap(timing, "chunk_write_seconds", clock)
    for key, seconds in timing.items():
        res.counters[key] = res.counters.get(key, 0.0) + seconds


def _whole_batches(decoded_parts: Iterator[tuple], batches: list[list[int]], part: int,
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


def _write_chunk(store: ChunkStore, span: tuple[int, int], rows: list[tuple], embeddings: list[np.ndarray],
                 dim: int) -> None:
    matrix = np.concatenate(embeddings) if embeddings else np.zeros((0, dim), np.float32)
    full = np.zeros((len(rows), dim), np.float32)
    ok = np.array([r[3] is None for r in rows], dtype=bool)
    full[ok] = matrix
    columns = [pa.array(col, type=t) for col, (_, t) in zip(zip(*rows), CHUNK_SCHEMA_FIELDS)]
    emb = pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), dim)
    table = pa.Table.from_arrays(columns + [pa.array(ok), emb],
                                 names=[n for n, _ in CHUNK_SCHEMA_FIELDS] + ["ok", "embedding"])

    def write(path: Path) -> None:
        with ipc.new_file(path, table.schema) as writer:
            writer.write_table(table)

    store.put(chunk_key(*span), write)


def iter_chunks(artifact: Artifact) -> Iterator[pa.Table]:
    for name in read_json(artifact.file("chunks.json"))["chunks"]:
        with ipc.open_file(artifact.file(name)) as reader:
            yield reader.read_all()


def warm_up(model: LoadedModel, res: Resources) -> None:
    """One untimed batch first, so allocation, kernel selection or graph capture do not count as throughput."""
    if res.warmup_image:
        pixels, _ = load_and_preprocess(res.warmup_image, res.spec)
    else:
        pixels = preprocess(builtin_warmup_image(), res.spec)
    count = res.batch_size if res.device.is_accelerator else 1
    started = time.perf_counter()
    model.encode_images(torch.from_numpy(np.stack([pixels] * count)))
    res.counters["warmup_seconds"] = time.perf_counter() - started


def builtin_warmup_image():
    from PIL import Image

    y, x = np.mgrid[0:240, 0:320]
    rgb = np.stack([x * 255 // 319, y * 255 // 239, (x + y) * 255 // 558], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


# ---------------------------------------------------------------------------------------------------- classify

def load_truth(ctx: StageContext, inputs: dict[str, Artifact], *, source: str | None, column: str,
               labels: tuple[str, ...]) -> None:
    """Ground truth per image path (empty when none is known); see pipeline/evaluation.py for the rules."""
    if source in (None, "", "auto", "folders"):
        paths = [r.path for r in read_records(inputs["discover"])]
        truth = evaluation.truth_from_folders(paths, labels, forced=source == "folders")
    else:
        truth = evaluation.truth_from_file(source, column)
    if truth and not set(truth.values()) & set(labels):
        log.warning("ground truth labels (%s ...) share nothing with the label set; no metrics are computed",
                    ", ".join(sorted(set(truth.values()))[:5]))
        truth = {}
    evaluation.write_truth(ctx.out / "truth.parquet", truth)


def classify(ctx: StageContext, inputs: dict[str, Artifact], *, topk: int, metadata: dict,
             min_score: float | None = None, unknown_label: str = "unknown", progress: bool = False) -> None:
    records = read_records(inputs["discover"])
    truth = evaluation.read_truth(inputs["truth"].file("truth.parquet"))
    labels_art = inputs["encode_labels"]
    label_info = read_json(labels_art.file("labels.json"))
    text = torch.from_numpy(np.load(labels_art.file("text_embeddings.npy")))
    scale = float(label_info["logit_scale"])
    predictions = PredictionsWriter(ctx.out / "predictions.parquet", label_info["labels"], metadata,
                                    min_score, unknown_label)
    errors = ErrorsWriter(ctx.out / "errors.parquet")
    res_json = ResJsonWriter(ctx.out / "res.json")
    metrics = evaluation.MetricsAccumulator(label_info["labels"]) if truth else None
    chunks = read_json(inputs["encode_images"].file("chunks.json"))["chunks"]
    try:
        for chunk in tqdm(iter_chunks(inputs["encode_images"]), total=len(chunks), unit="chunk", desc="classify",
                          disable=not progress):
            _classify_chunk(chunk, records, text, scale, topk, predictions, errors, res_json, truth, metrics)
    finally:
        predictions.close(), errors.close(), res_json.close()
    counts = {"discovered": len(records), "classified": predictions.rows, "errors": errors.rows}
    if metrics is not None and metrics.total:
        pq.write_table(metrics.metrics_table(), ctx.out / "metrics.parquet")
        pq.write_table(metrics.confusion_table(), ctx.out / "confusion.parquet")
        counts["metrics"] = metrics.headline()
        if metrics.outside_label_set:
            log.warning("%d images have a true label outside the label set (%s ...); they count as misses",
                        sum(metrics.outside_label_set.values()), ", ".join(list(metrics.outside_label_set)[:5]))
    write_json(ctx.out / "counts.json", counts)


def probabilities(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: float) -> np.ndarray:
    """softmax(logit_scale * cosine), as CLIPModel's logits_per_image.softmax(-1)."""
    return (image_embeddings @ text_embeddings.T * logit_scale).softmax(dim=-1).numpy()


def _classify_chunk(chunk: pa.Table, records: list[ImageRecord], text: torch.Tensor, scale: float, topk: int,
                    predictions: PredictionsWriter, errors: ErrorsWriter, res_json: ResJsonWriter,
                    truth: dict[str, str], metrics: evaluation.MetricsAccumulator | None) -> None:
    index = chunk.column("index").to_numpy()
    ok = chunk.column("ok").to_numpy(zero_copy_only=False)
    paths = [records[i].path for i in index]
    bad = np.flatnonzero(~ok)
    errors.write([(paths[i], "decode", chunk.column("error_type")[i].as_py(), chunk.column("error_message")[i].as_py())
                  for i in bad])
    good = np.flatnonzero(ok)
    if not len(good):
        return
    emb = chunk.column("embedding").combine_chunks().flatten().to_numpy().reshape(len(index), -1)[good]
    probs = probabilities(torch.from_numpy(np.ascontiguousarray(emb)), text, scale)
    sizes = np.stack([chunk.column("width").to_numpy()[good], chunk.column("height").to_numpy()[good]], axis=1)
    good_paths = [paths[i] for i in good]
    truths = [truth.get(p) for p in good_paths]
    predicted = predictions.write(good_paths, probs, topk, sizes, truths)
    res_json.write(good_paths, predicted)
    if metrics is not None:
        metrics.add(truths, predicted, probs)
    checkpoint("classify.row_group")


# ---------------------------------------------------------------------------------------------------- publish

def publish(ctx: StageContext, inputs: dict[str, Artifact], *, out_dir: Path) -> None:
    """Copy the results into the run directory; each file replaces its old version atomically."""
    from .storage import copy_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    source = inputs["classify"]
    for name in EVALUATION_FILES:
        if source.file(name).exists():
            copy_atomic(source.file(name), out_dir / name)
        else:
            (out_dir / name).unlink(missing_ok=True)  # a stale file from an earlier run into this folder
    for name in OUTPUT_FILES:  # res.json last: its presence says the others are current
        copy_atomic(source.file(name), out_dir / name)
        checkpoint("publish.file")


def write_report(ctx: StageContext, inputs: dict[str, Artifact], *, out_dir: Path, dataset_root: Path) -> None:
    from .report import build_report

    build_report(out_dir, dataset_root)


def read_counts(artifact: Artifact) -> dict:
    return json.loads(artifact.file("counts.json").read_text())
