"""Build the classification DAG from a resolved config, check inputs early, run it and summarise.

Every check that can fail on user input runs before the model is loaded or an image is read. Each stage gets
exactly the config that decides its output, as hashed params; the rest travels in the `Runtime`.
"""

from __future__ import annotations

import errno
import logging
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from . import devices, distributed
from .engine import CACHED, CONTENT, SINK, Artifact, Runner, Stage, StageReport
from .engine.files import FileDigests
from .errors import UserError
from .labels import LabelSet, build_label_set, check_language
from .models import LoadedModel, ModelProvider, inspect_model_dir, spec_of
from .outputs.writers import read_metadata
from .sources import Source, open_source
from .sources.folder import normalise_extensions
from .stages import classify, discover, encode_images, encode_labels, publish, report, truth
from .stages.runtime import Runtime

log = logging.getLogger(__name__)

_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}
ERROR_EXAMPLES = 3  # paths shown per error kind in the end-of-run summary


@dataclass
class Pipeline:
    """The stages of one run and what they share at run time."""

    stages: list[Stage]
    runtime: Runtime
    label_set: LabelSet
    out_dir: Path
    cache_dir: Path


@dataclass
class ErrorKind:
    error_type: str
    count: int
    examples: list[str]
    transient: bool


@dataclass
class RunSummary:
    discovered: int
    classified: int
    errors: int
    seconds: float
    out_dir: Path
    reports: list[StageReport]
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    counters: dict = field(default_factory=dict)
    shard: distributed.Shard | None = None  # set when this process only encoded a shard
    error_kinds: list[ErrorKind] = field(default_factory=list)
    bytes_read: int | None = None  # by this process (not its decode workers) during the run; Linux only
    cache_bytes_read: dict = field(default_factory=dict)  # verified reads from the cache: entries' files, chunks

    def stage_seconds(self, name: str) -> float:
        return sum(r.seconds for r in self.reports if r.name == name)

    def line(self) -> str:
        if self.shard is not None:
            then = ("rank 0 merges and writes the results" if self.shard.distributed else
                    "when every shard is done, run once more without shard.* to merge and write the results")
            return (f"shard {self.shard.index}/{self.shard.count} done in {self.seconds:.1f}s "
                    f"({self.reports[-1].status}); {then}")
        stage_states = ", ".join(f"{r.name} {r.status}" for r in self.reports)
        rate = self.classified / self.seconds if self.seconds else 0.0
        read = f", {self.bytes_read / 1e6:,.1f} MB read" if self.bytes_read is not None else ""
        if self.cache_bytes_read:
            read += (f" ({self.cache_bytes_read['chunks'] / 1e6:,.1f} MB of chunks, "
                     f"{self.cache_bytes_read['files'] / 1e6:,.1f} MB of other cache files)")
        return (f"{self.classified}/{self.discovered} images classified, {self.errors} errors, "
                f"{self.seconds:.1f}s ({rate:.1f} img/s{read}); stages: {stage_states}; results in {self.out_dir}")

    def error_lines(self) -> list[str]:
        """Each kind of error with its count and its first paths (all listed in errors.parquet)."""
        lines = []
        for kind in self.error_kinds:
            more = f" and {kind.count - len(kind.examples)} more" if kind.count > len(kind.examples) else ""
            retry = " (transient: the next run tries these again)" if kind.transient else ""
            lines.append(f"  {kind.error_type}: {kind.count}{retry}: {', '.join(kind.examples)}{more}")
        return lines


def default_workers(device: devices.DeviceChoice) -> int:
    cpus = devices.cpu_count()
    # On an accelerator the CPU only decodes, so use it all; on a CPU the model needs the cores too.
    return min(16, cpus) if device.is_accelerator else max(1, cpus // 2)


def _plain(value):
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _positive(name: str, value: int) -> int:
    if value is None or int(value) < 1:
        raise UserError(f"{name}={value} must be a positive integer")
    return int(value)


def build(cfg: DictConfig, preloaded: LoadedModel | None = None, device_index: int | None = None,
          shows_progress: bool = True) -> Pipeline:
    """Validate the config against the world (files, model, device) and build the stages."""
    for key in ("encode.batch_size", "encode.chunk_size", "classify.topk"):
        _positive(key, OmegaConf.select(cfg, key))
    label_set = _label_set(cfg)
    info = _model_info(cfg)
    check_language(label_set, info.takes_chinese, cfg.model.path)
    source = _source(cfg)
    truth_mode, truth_file = _truth_source(cfg)
    if cfg.encode.warmup_image and not Path(cfg.encode.warmup_image).is_file():
        raise UserError(f"warm-up image not found: '{cfg.encode.warmup_image}' (encode.warmup_image)")
    index = cfg.device.index if device_index is None else device_index
    choice = devices.resolve(cfg.device.type.value, cfg.device.dtype.value, index, cpu_half=cfg.device.cpu_half)
    cache_dir, out_dir = Path(cfg.cache_dir), Path(cfg.output_dir)
    _check_writable(cache_dir, "cache_dir (CACHE=)")
    _check_writable(out_dir, "the run directory (OUT=)")
    workers = cfg.encode.num_workers if cfg.encode.num_workers is not None else default_workers(choice)
    model_fp = info.fingerprint(FileDigests(cache_dir / "file-digests"))
    counters: dict = {}
    runtime = Runtime(source=source, models=ModelProvider(info, model_fp, choice.device, preloaded, counters),
                      device=choice, batch_size=cfg.encode.batch_size, num_workers=int(workers),
                      chunk_size=cfg.encode.chunk_size, timeout=cfg.preprocess.timeout,
                      warmup_image=cfg.encode.warmup_image, truth_file=truth_file,
                      progress=cfg.progress and shows_progress, progress_interval=cfg.progress_interval,
                      counters=counters)
    stages = _stages(cfg, runtime, label_set, cfg.model.name or info.name, model_fp, truth_mode, out_dir)
    return Pipeline(stages, runtime, label_set, out_dir, cache_dir)


def _label_set(cfg: DictConfig) -> LabelSet:
    labels = cfg.labels
    if not (labels.list or labels.file):
        raise UserError("no labels given: set LABEL_LIST=\"cat,dog\" (labels.list, --label_list), LABELS=file "
                        "(labels.file, --label_file), or a named set labels=<name> from conf/labels/")
    label_set = build_label_set(labels.name, _plain(labels.list), labels.file, labels.template,
                                _plain(labels.templates))
    if cfg.classify.unknown_label in label_set.labels:
        raise UserError(f"classify.unknown_label={cfg.classify.unknown_label!r} is also one of the labels; "
                        "choose another name for the below-min_score outcome")
    return label_set


def _model_info(cfg: DictConfig):
    if not cfg.model.path:
        raise UserError("no model given: set MODEL=dir (model.path, --model_path) to a local Hugging Face model "
                        "folder, or model=<name> from conf/model/")
    return inspect_model_dir(cfg.model.path, cfg.model.allow_pickle)


def _stages(cfg: DictConfig, runtime: Runtime, label_set: LabelSet, model_name: str, model_fp: str,
            truth_mode: str, out_dir: Path) -> list[Stage]:
    """The DAG; each stage's params are exactly the config that decides its output."""
    dtype = runtime.device.dtype_name
    spec = spec_of(runtime.models.info).to_dict()
    labels = list(label_set.labels)
    metadata = {"model": {"name": model_name, "path": str(runtime.models.info.path), "fingerprint": model_fp,
                          "family": runtime.models.info.family},
                "label_set": label_set.to_dict(), "template": label_set.template,
                "templates": list(label_set.templates), "dataset": {"root": runtime.source.describe()},
                "config": {"dtype": dtype, "topk": cfg.classify.topk, "preprocess": spec,
                           "draft": cfg.preprocess.draft}}
    extensions = sorted(e.lstrip(".") for e in normalise_extensions(cfg.dataset.extensions))
    source = runtime.source
    image_params = {"model": model_fp, "dtype": dtype, "preprocess": spec, "draft": cfg.preprocess.draft,
                    "max_pixels": cfg.preprocess.max_pixels}
    if source.kind == "shards":  # the truth travels with the images in a tar shard
        image_params["truth_member"] = cfg.dataset.truth_member
    stages = [
        Stage("discover", discover.discover, version=discover.VERSION, kind=CONTENT,
              params={"extensions": extensions, "format": source.format,
                      "path_column": cfg.dataset.path_column}),
        Stage("encode_labels", encode_labels.encode_labels, version=encode_labels.VERSION, kind=CACHED,
              params={"model": model_fp, "dtype": dtype, "texts": list(label_set.texts),
                      "templates": list(label_set.templates)}),
        Stage("encode_images", encode_images.encode_images, inputs={"records": "discover"},
              version=encode_images.VERSION, kind=CACHED, params=image_params),
        Stage("truth", truth.load_truth, inputs={"records": "discover"}, version=truth.VERSION, kind=CONTENT,
              params={"mode": truth_mode, "column": cfg.dataset.truth_column, "labels": labels}),
        Stage("classify", classify.classify, version=classify.VERSION, kind=CACHED,
              inputs={"truth": "truth", "label_embeddings": "encode_labels", "image_embeddings": "encode_images"},
              params={"labels": labels, "topk": cfg.classify.topk, "min_score": cfg.classify.min_score,
                      "unknown_label": cfg.classify.unknown_label, "metadata": metadata,
                      "embeddings": cfg.embeddings}),
        Stage("publish", publish.publish, inputs={"results": "classify"}, params={"out_dir": str(out_dir)},
              version=publish.VERSION, kind=SINK),
    ]
    if cfg.report:
        root = getattr(runtime.source, "root", None)
        stages.append(Stage("report", report.report, inputs={"published": "publish"}, version=report.VERSION,
                            params={"out_dir": str(out_dir), "dataset_root": str(root) if root else None},
                            kind=SINK))
    return stages


def _truth_source(cfg: DictConfig) -> tuple[str, Path | None]:
    """(mode, file): auto, folders, or a truth file."""
    source = cfg.dataset.truth
    if source in (None, "auto", "folders"):
        return source or "auto", None
    if not Path(source).is_file():
        raise UserError(f"truth file not found: '{source}' (dataset.truth)")
    return "file", Path(source).resolve()


def _check_writable(directory: Path, what: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise UserError(f"cannot write to {what} '{directory}': {exc.strerror or exc}; choose a writable "
                        "folder") from None


def _source(cfg: DictConfig) -> Source:
    data = cfg.dataset
    path, image = data.path, data.image
    if path and image:
        raise UserError("both dataset.path and dataset.image are set; give a dataset (DATASET=) or one image (IMAGE=)")
    if not path and not image:
        raise UserError("no input: set dataset.path (DATASET=dir, --dataset_path) or dataset.image (IMAGE=file, "
                        "--input_image)")
    if image and not Path(image).is_file():
        raise UserError(f"image not found: '{image}' (dataset.image / IMAGE=file)")
    if path and "://" not in path and "{" not in path and not Path(path).exists():
        raise UserError(f"dataset not found: '{path}' (dataset.path / DATASET=): give a folder, a manifest, tar "
                        "shards or a bucket URL")
    return open_source(str(image or path), image=bool(image), format=data.format, extensions=list(data.extensions),
                       path_column=data.path_column, truth_column=data.truth_column, truth_member=data.truth_member,
                       storage_options=_plain(data.storage_options), retries=data.retries, timeout=data.io_timeout)


def bytes_read() -> int | None:
    """Bytes this process has read through read() calls (files, pipes, sockets, page cache or not)."""
    try:
        with open("/proc/self/io", encoding="ascii") as fh:
            return int(next(line for line in fh if line.startswith("rchar:")).split()[1])
    except (OSError, StopIteration, ValueError):
        return None


def run(cfg: DictConfig, preloaded: LoadedModel | None = None) -> RunSummary:
    from .engine.cache import BYTES_READ

    started, read_before, cache_before = time.perf_counter(), bytes_read(), dict(BYTES_READ)
    shard = distributed.from_environment(cfg.shard.index, cfg.shard.count)
    pipeline = build(cfg, preloaded, shard.local_rank if shard.distributed else None,
                     shows_progress=not shard.distributed or shard.index == 0)
    distributed.init(shard, pipeline.runtime.device.device.type, cfg.shard.timeout_hours)
    token = distributed.listing_token(shard, cfg.dataset.listing)
    runner = Runner(pipeline.cache_dir, pipeline.runtime, cfg.cache_lock,
                    reuse_tokens={"discover": token} if token else {})
    try:
        if shard.count > 1:
            _encode_own_shard(pipeline, runner, shard)
            distributed.barrier(shard)
            if not shard.merges:
                return RunSummary(0, 0, 0, time.perf_counter() - started, pipeline.out_dir, runner.reports,
                                  counters=pipeline.runtime.counters, shard=shard)
        results = runner.run(pipeline.stages)
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        raise UserError(f"cannot write '{exc.filename or pipeline.cache_dir}': {exc.strerror}. Free some space or "
                        "choose another CACHE= / OUT=; the checkpoints already written stay valid and the same "
                        "command resumes from them") from exc
    finally:
        distributed.finish(shard)
    counts = classify.read_counts(results["classify"])
    if counts["discovered"] == 0:
        log.warning("no images found in %s (extensions: %s); outputs are empty", pipeline.runtime.source.describe(),
                    ", ".join(cfg.dataset.extensions))
    if counts.get("metrics"):
        log.info("against ground truth: %s (metrics.parquet, confusion.parquet)", counts["metrics"])
    read_after = bytes_read()
    return RunSummary(counts["discovered"], counts["classified"], counts["errors"], time.perf_counter() - started,
                      pipeline.out_dir, runner.reports, results, pipeline.runtime.counters,
                      error_kinds=error_kinds(pipeline.out_dir / "errors.parquet"),
                      bytes_read=read_after - read_before if read_before is not None else None,
                      cache_bytes_read={k: BYTES_READ[k] - cache_before[k] for k in BYTES_READ})


def _encode_own_shard(pipeline: Pipeline, runner: Runner, shard: distributed.Shard) -> None:
    upstream = runner.run(pipeline.stages, targets=("discover",))
    encode = next(s for s in pipeline.stages if s.name == "encode_images")
    started = time.perf_counter()
    encoded = encode_images.encode_shard(runner.context(encode), records=upstream["discover"], shard=shard.index,
                                         shards=shard.count, **encode.params)
    runner.reports.append(StageReport(f"encode_images[shard {shard.index}/{shard.count}]",
                                      "ran" if encoded else "reused", time.perf_counter() - started))


def error_kinds(errors_file: Path) -> list[ErrorKind]:
    """Error types by count, each with its first paths; streamed, so a run with millions of errors is fine."""
    counts: Counter = Counter()
    examples: dict[str, list[str]] = {}
    transient: dict[str, bool] = {}
    for batch in pq.ParquetFile(errors_file).iter_batches(columns=["path", "error_type", "transient"]):
        for path, kind, retry in zip(*(batch.column(i).to_pylist() for i in range(3))):
            counts[kind] += 1
            transient[kind] = transient.get(kind, False) or retry
            if len(examples.setdefault(kind, [])) < ERROR_EXAMPLES:
                examples[kind].append(path)
    return [ErrorKind(kind, n, examples[kind], transient[kind]) for kind, n in counts.most_common()]


def label_distribution(out_dir: Path) -> list[tuple[str, list[tuple[str, float]]]]:
    """Per image, every label with its probability, best first (for the single-image mode's printout)."""
    table = pq.read_table(out_dir / "predictions.parquet", columns=["path", "probs"])
    labels = read_metadata(out_dir / "predictions.parquet")["label_set"]["labels"]
    rows = []
    for path, probs in zip(table.column("path").to_pylist(), table.column("probs").to_pylist()):
        rows.append((path, sorted(zip(labels, probs), key=lambda lp: -lp[1])))
    return rows


def image_errors(out_dir: Path) -> list[tuple[str, str, str]]:
    """(path, error type, message) of every image in errors.parquet (single-image mode shows the reason)."""
    table = pq.read_table(out_dir / "errors.parquet", columns=["path", "error_type", "message"])
    return list(zip(*(table.column(i).to_pylist() for i in range(3))))
