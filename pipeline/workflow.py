"""Build the classification DAG from a resolved config, check inputs early, run it and summarise.

Every check that can fail on user input runs before the model is loaded or an image is read. Each stage gets
exactly the config that decides its output, as hashed params; the rest travels in the `Execution`.
"""

from __future__ import annotations

import errno
import logging
import os
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
from .families import SIGMOID
from .inference import EXPORTED, resolve_runtime
from .labels import LabelSet, build_label_set, check_language
from .locations import Place, cache_place, output_place, upload_outputs
from .models import LoadedModel, ModelProvider, inspect_model_dir, preprocessor_of
from .outputs.writers import read_metadata
from .sources import (DATASET, EXAMPLES, READING, RECORDS, TRUTH, DatasetSettings, Location, SourceProvider,
                      resolve_format, source_class)
from .sources.examples import example_settings, label_indices, list_examples, listing_params
from .sources.folder import extension_names
from .stages import (calibration, classify, discover, discover_examples, encode_images, encode_labels, export_towers,
                     fit_classifier, publish, report, truth)
from .stages.execution import Execution, default_batch_size

log = logging.getLogger(__name__)

_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}
ERROR_EXAMPLES = 3  # paths shown per error kind in the end-of-run summary


@dataclass
class Pipeline:
    """The stages of one run and what they share at run time."""

    stages: list[Stage]
    execution: Execution
    label_set: LabelSet
    out_dir: Path
    cache_dir: Path  # local: the cache, or with a store the run's working copy of it
    cache: Place | None = None
    output: Place | None = None

    def cleanup(self) -> None:
        if self.cache is not None:
            self.cache.cleanup()  # the outputs' local folder stays: Hydra's run folder, with the log


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
    destination: str | None = None  # the store the outputs were uploaded to (OUT=s3://...)
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
                f"{self.seconds:.1f}s ({rate:.1f} img/s{read}); stages: {stage_states}; "
                f"results in {self.destination or self.out_dir}")

    def error_lines(self) -> list[str]:
        """Each kind of error with its count and its first paths (all listed in errors.parquet)."""
        lines = []
        for kind in self.error_kinds:
            more = f" and {kind.count - len(kind.examples)} more" if kind.count > len(kind.examples) else ""
            retry = " (transient: the next run tries these again)" if kind.transient else ""
            lines.append(f"  {kind.error_type}: {kind.count}{retry}: {', '.join(kind.examples)}{more}")
        return lines


def worker_counts(device: devices.DeviceChoice) -> tuple[int, int, int]:
    """(start, most, fewest) decode workers for one process. Next to an accelerator the CPU only decodes: start at
    all of this rank's cores (up to 16) less one, kept for the thread that drives the device, and let the tuner add
    workers while that pays. On a CPU the model needs the cores too: start at all of them, as a cheap model needs
    (the tiny fixture on 2 cores: 0.84 of an all-core Pillow loop with 2 workers throughout, 0.78 when it started
    at one and the tuner added the second), and fall back to half at the first observation when the model never
    waited for data (a B/16 on 2 cores: its encode_images 3% slower with 2 workers than with 1)."""
    cpus = max(1, devices.cpu_count() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if device.is_accelerator:
        most = max(1, cpus - 1)
        return min(16, most), most, min(16, most)
    return cpus, cpus, max(1, cpus // 2)


def _plain(value):
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _positive(name: str, value: int) -> int:
    if value is None or int(value) < 1:
        raise UserError(f"{name}={value} must be a positive integer")
    return int(value)


def build(cfg: DictConfig, preloaded: LoadedModel | None = None, local_rank: int | None = None,
          shows_progress: bool = True) -> Pipeline:
    """Validate the config against the world (files, model, device, dataset) and build the stages."""
    for key in ("encode.chunk_size", "classify.topk"):
        _positive(key, OmegaConf.select(cfg, key))
    if cfg.encode.batch_size is not None:
        _positive("encode.batch_size", cfg.encode.batch_size)
    label_set = _label_set(cfg)
    info = _model_info(cfg)
    check_language(label_set, info.takes_chinese, cfg.model.path, info.model_type)
    sources, dataset = _dataset(cfg)
    examples = _examples(cfg, sources, dataset, label_set)
    truth_mode, truth_file = _truth_source(cfg)
    if cfg.encode.warmup_image and not Path(cfg.encode.warmup_image).is_file():
        raise UserError(f"warm-up image not found: '{cfg.encode.warmup_image}' (encode.warmup_image)")
    choice = devices.resolve(cfg.device.type.value, cfg.device.dtype.value, cfg.device.index,
                             cpu_half=cfg.device.cpu_half, local_rank=local_rank)
    cache = cache_place(cfg.cache_dir)
    output = output_place(cfg.output_dir, _hydra_run_dir())
    cache_dir, out_dir = cache.local, output.local
    start, most, fewest = worker_counts(choice)
    fixed = cfg.encode.num_workers is not None
    batch = cfg.encode.batch_size or default_batch_size(choice)
    model_fp = info.fingerprint(FileDigests(cache_dir / "file-digests"))
    counters: dict = {}
    execution = Execution(
        sources=sources, models=ModelProvider(info, model_fp, choice.device, preloaded, counters,
                                              compile=cfg.encode.compile),
        device=choice, batch_size=batch,
        num_workers=int(cfg.encode.num_workers) if fixed else start, max_workers=most, min_workers=fewest,
        workers_fixed=fixed,
        chunk_size=cfg.encode.chunk_size, timeout=cfg.preprocess.timeout, warmup_image=cfg.encode.warmup_image,
        truth_file=truth_file, progress=cfg.progress and shows_progress, progress_interval=cfg.progress_interval,
        pad_to=batch if choice.is_accelerator else None,
        counters=counters)
    stages = _stages(cfg, execution, dataset, examples, label_set, cfg.model.name or info.name, model_fp, truth_mode,
                     out_dir)
    return Pipeline(stages, execution, label_set, out_dir, cache_dir, cache, output)


def _hydra_run_dir() -> str | None:
    """Hydra's folder of this run (its log and config), where outputs bound for a store are made first."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None


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


def _stages(cfg: DictConfig, execution: Execution, dataset: DatasetSettings, examples: DatasetSettings | None,
            label_set: LabelSet, model_name: str, model_fp: str, truth_mode: str, out_dir: Path) -> list[Stage]:
    """The DAG; each stage's params are exactly the config that decides its output."""
    dtype = execution.device.dtype_name
    info = execution.models.info
    backend = cfg.preprocess.backend.value
    on_device = backend == "device" or (backend == "auto" and execution.device.is_accelerator)
    preprocessor = preprocessor_of(info, on_device=on_device)  # ignored where the family runs the HF processor
    draft = cfg.preprocess.draft if cfg.preprocess.draft is not None else \
        (execution.device.is_accelerator and preprocessor.spec is not None)
    _check_family_options(cfg, info, preprocessor, draft)
    image_params = {"source": dataset.params(READING), "preprocess": preprocessor.params, "draft": draft,
                    "max_pixels": cfg.preprocess.max_pixels}
    towers = _towers_stages(cfg, execution, preprocessor, model_fp, image_params)
    uses = {"towers": "export_towers"} if towers else {}
    labels = list(label_set.labels)
    listed = execution.sources.open(dataset.params(RECORDS))
    metadata = _metadata(cfg, execution, label_set, model_name, model_fp, preprocessor.params, draft,
                         towers[-1].params["runtime"] if towers else "torch", listed.describe())
    adapted = _example_stages(cfg, examples, label_set, source_class(dataset.format).kind, model_fp, dtype,
                              {**image_params, "source": examples.params(READING)} if examples else {}, uses)
    stages = [
        Stage("discover", discover.discover, version=discover.VERSION, kind=CONTENT,
              params={"source": dataset.params(RECORDS)}),
        *towers,
        Stage("encode_labels", encode_labels.encode_labels, inputs=uses, version=encode_labels.VERSION, kind=CACHED,
              params={"model": model_fp, "dtype": dtype, "texts": list(label_set.texts),
                      "templates": list(label_set.templates)}),
        Stage("encode_images", encode_images.encode_images, inputs={"records": "discover", **uses},
              version=encode_images.VERSION, kind=CACHED, shardable=True,
              params={"model": model_fp, "dtype": dtype, **image_params}),
        Stage("truth", truth.load_truth, inputs={"records": "discover"}, version=truth.VERSION, kind=CONTENT,
              params={"source": dataset.params(TRUTH), "mode": truth_mode, "column": cfg.dataset.truth_column,
                      "labels": labels}),
        *adapted,
        Stage("classify", classify.classify, version=classify.VERSION, kind=CACHED,
              inputs={"truth": "truth", "label_embeddings": "encode_labels", "image_embeddings": "encode_images",
                      **({"classifier": "fit_classifier"} if adapted else {})},
              params={"labels": labels, "topk": cfg.classify.topk, "min_score": cfg.classify.min_score,
                      "unknown_label": cfg.classify.unknown_label, "metadata": metadata,
                      "embeddings": cfg.embeddings, "mode": cfg.classify.mode.value,
                      "threshold": cfg.classify.threshold, "review_size": cfg.classify.review_size}),
        Stage("publish", publish.publish, inputs={"results": "classify"}, params={"out_dir": str(out_dir)},
              version=publish.VERSION, kind=SINK),
    ]
    if cfg.report:
        root = getattr(listed, "root", None)
        stages.append(Stage("report", report.report, inputs={"published": "publish"}, version=report.VERSION,
                            params={"out_dir": str(out_dir), "dataset_root": str(root) if root else None},
                            kind=SINK))
    return stages


def _example_stages(cfg: DictConfig, examples: DatasetSettings | None, label_set: LabelSet, dataset_kind: str,
                    model_fp: str, dtype: str, image_params: dict, uses: dict) -> list[Stage]:
    """The examples' stages (none without labels.examples): listed, encoded through the same code and cache as
    the dataset's images (one image per chunk: adding five encodes five), and the classifier fitted on them."""
    if examples is None:
        return []
    return [
        Stage("discover_examples", discover_examples.discover_examples, inputs={"dataset_records": "discover"},
              version=discover_examples.VERSION, kind=CONTENT,
              params={"source": listing_params(examples), "labels": list(label_set.labels),
                      "texts": list(label_set.texts), "dataset_kind": dataset_kind}),
        Stage("encode_examples", encode_images.encode_images, inputs={"records": "discover_examples", **uses},
              version=encode_images.VERSION, kind=CACHED,
              params={"model": model_fp, "dtype": dtype, **image_params, "chunk_images": 1}),
        Stage("fit_classifier", fit_classifier.fit_classifier, version=fit_classifier.VERSION, kind=CACHED,
              inputs={"examples": "discover_examples", "encoded_examples": "encode_examples",
                      "image_embeddings": "encode_images", "label_embeddings": "encode_labels"},
              params={"adapter": cfg.classify.adapter.value, "calibrate": cfg.classify.calibrate,
                      "target_precision": cfg.classify.target_precision, "mode": cfg.classify.mode.value,
                      "threshold": cfg.classify.threshold}),
    ]


def _metadata(cfg: DictConfig, execution: Execution, label_set: LabelSet, model_name: str, model_fp: str,
              preprocess: dict, draft: bool, runtime: str, dataset_root: str) -> dict:
    """What the outputs say about how they were made (predictions.parquet's metadata)."""
    info = execution.models.info
    return {"model": {"name": model_name, "path": str(info.path), "fingerprint": model_fp,
                      "family": info.model_type},
            "label_set": label_set.to_dict(), "template": label_set.template,
            "templates": list(label_set.templates), "dataset": {"root": dataset_root},
            "config": {"dtype": execution.device.dtype_name, "topk": cfg.classify.topk, "preprocess": preprocess,
                       "draft": draft, "scoring": info.family.scoring, "runtime": runtime,
                       "mode": cfg.classify.mode.value}}


def _towers_stages(cfg: DictConfig, execution: Execution, preprocessor, model_fp: str,
                   image_params: dict) -> list[Stage]:
    """The stages that export the towers for ONNX Runtime or OpenVINO (none when torch runs them): for int8, the
    calibration images first. An exported runtime sees every batch at the batch size (short ones padded): each
    new shape is a new compiled plan that it keeps."""
    info, choice = execution.models.info, execution.device
    if execution.models.preloaded is not None:  # a torch model already in memory (benchmarks, notebooks) runs as is
        if cfg.model.runtime.value in EXPORTED:
            raise UserError(f"model.runtime={cfg.model.runtime.value} with a model passed in memory: pass none (the "
                            "run loads its export) or use model.runtime=torch")
        return []
    runtime = resolve_runtime(cfg.model.runtime.value, choice.device.type, choice.dtype_name,
                              preprocessor.spec is not None, info.model_type)
    if cfg.model.runtime.value == "auto" and not choice.is_accelerator:
        _log_auto_runtime(choice.dtype_name)
    if runtime not in EXPORTED:
        return []
    execution.pad_to = execution.batch_size
    spec = preprocessor.spec
    size = spec.crop_hw or spec.resize_hw
    if size is None:
        raise UserError(f"model.runtime={runtime}: '{info.path}' resizes to a shortest edge without a crop, so its "
                        "inputs have no fixed size to export; use model.runtime=torch")
    stages, inputs = [], {}
    if choice.int8:
        _positive("model.calibration_images", cfg.model.calibration_images)
        stages.append(Stage("calibration", calibration.calibrate, inputs={"records": "discover"},
                            version=calibration.VERSION, kind=CONTENT,
                            params={"count": cfg.model.calibration_images, **image_params}))
        inputs = {"calibration": "calibration"}
    # bf16 runs the fp32 export (OpenVINO converts as it compiles): one export serves both, its embeddings don't.
    export_dtype = "fp32" if choice.dtype_name == "bf16" else choice.dtype_name
    stages.append(Stage("export_towers", export_towers.export_towers, inputs=inputs, version=export_towers.VERSION,
                        kind=CACHED, params={"model": model_fp, "runtime": runtime, "dtype": export_dtype,
                                             "image_size": list(size)}))
    return stages


def _log_auto_runtime(dtype: str) -> None:
    """Why auto is torch on a CPU (measured, README "Performance"), and the faster choices that still pass the
    precision test, where this CPU has them."""
    log.info("model.runtime=auto: torch (OpenVINO fp32, the fastest exact runtime, is 1.1x torch per image on a "
             "B/16 and pays its export after about 1,400 images; model.runtime=openvino opts in)")
    if dtype == "fp32" and devices.cpu_has_native_bf16():
        log.info("this CPU has bf16 instructions: device.dtype=bf16 runs a B/16 at 2.0x fp32 per image on torch, "
                 "3.1x with model.runtime=openvino, within the 0.99 precision test")


def _check_family_options(cfg: DictConfig, info, preprocessor, draft: bool) -> None:
    if cfg.classify.mode.value == "multilabel" and info.family.scoring != SIGMOID:
        raise UserError(f"classify.mode=multilabel needs a score per label on its own, as SigLIP's sigmoid gives; "
                        f"'{info.path}' is a {info.model_type} model, whose softmax makes the labels compete for one "
                        "image (the scores sum to 1), so a threshold on them means nothing. Use a siglip or "
                        "siglip2 model, or classify.mode=single")
    if not 0 < cfg.classify.threshold < 1:
        raise UserError(f"classify.threshold={cfg.classify.threshold} must lie between 0 and 1")
    if draft and preprocessor.spec is None:
        raise UserError(f"preprocess.draft=true needs a fixed resize target; '{info.path}' ({info.model_type}) takes "
                        "a variable number of patches: leave preprocess.draft off for it")


def _truth_source(cfg: DictConfig) -> tuple[str, Path | None]:
    """(mode, file): auto, folders, or a truth file."""
    source = cfg.dataset.truth
    if source in (None, "auto", "folders"):
        return source or "auto", None
    if not Path(source).is_file():
        raise UserError(f"truth file not found: '{source}' (dataset.truth)")
    return "file", Path(source).resolve()


def _dataset(cfg: DictConfig) -> tuple[SourceProvider, DatasetSettings]:
    """Where the dataset is (execution: never hashed) and what decides its results (hashed by the stages that
    read it); the dataset is opened for listing here, so that a bad one stops the run before any work."""
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
    location = Location(str(image or path), retries=data.retries, timeout=data.io_timeout,
                        storage_options=_plain(data.storage_options), single_image=bool(image))
    values = {"extensions": extension_names(data.extensions), "path_column": data.path_column,
              "truth_column": data.truth_column, "truth_member": data.truth_member}
    dataset = DatasetSettings(resolve_format(location, data.format.value, values["extensions"]), values)
    sources = SourceProvider({DATASET: location})
    sources.open(dataset.params(RECORDS))
    return sources, dataset


def _examples(cfg: DictConfig, sources: SourceProvider, dataset: DatasetSettings,
              label_set: LabelSet) -> DatasetSettings | None:
    """The examples' settings (None without labels.examples), checked against the label set and the options
    before any image is read."""
    classify_cfg, adapter = cfg.classify, cfg.classify.adapter.value
    _check_adapter_options(cfg, adapter)
    if not cfg.labels.examples:
        return None
    data = cfg.dataset
    location = Location(str(cfg.labels.examples), retries=data.retries, timeout=data.io_timeout,
                        storage_options=_plain(data.storage_options))
    if "://" not in location.path and not Path(location.path).exists():
        raise UserError(f"examples not found: '{location.path}' (labels.examples / EXAMPLES=)")
    sources.locations[EXAMPLES] = location
    settings = example_settings(location, dataset.values["extensions"])
    listed = list_examples(sources.open(listing_params(settings)))
    if not listed.keys:
        raise UserError(f"no examples in '{location.path}' (labels.examples): give a subfolder of images per label, "
                        "or a path,label table")
    indices = label_indices(listed.names, label_set.labels, label_set.texts)
    if classify_cfg.mode.value == "single" and any(len(row) > 1 for row in indices):
        several = [key for key, row in zip(listed.keys, indices) if len(row) > 1]
        raise UserError(f"labels.examples gives {len(several)} examples several labels ({', '.join(several[:3])}); "
                        "in single-label mode each example has one (or use classify.mode=multilabel)")
    counts = Counter(i for row in indices for i in row)
    missing = [label for i, label in enumerate(label_set.labels) if not counts[i]]
    if missing and adapter != "none":
        raise UserError(f"labels.examples has no example of {len(missing)} labels ({', '.join(missing[:10])}); "
                        "give every label at least one, or classify.adapter=none to keep zero-shot")
    log.info("examples: %d in %s, %d to %d per label", len(listed.keys), location.path, min(counts.values()),
             max(counts.values()))
    return settings


def _check_adapter_options(cfg: DictConfig, adapter: str) -> None:
    classify_cfg, given = cfg.classify, bool(cfg.labels.examples)
    if classify_cfg.target_precision is not None:
        if not given:
            raise UserError("classify.target_precision needs examples to measure precision on: set EXAMPLES= "
                            "(labels.examples), or give classify.min_score instead")
        if classify_cfg.min_score is not None:
            raise UserError("classify.target_precision and classify.min_score both set: give one (the first "
                            "chooses the second on the examples)")
        if not 0 < classify_cfg.target_precision <= 1:
            raise UserError(f"classify.target_precision={classify_cfg.target_precision} must lie in (0, 1]")
    if adapter not in ("auto", "none") and not given:
        raise UserError(f"classify.adapter={adapter} fits a classifier on examples: set EXAMPLES= (labels.examples)")
    if adapter not in ("auto", "none") and classify_cfg.mode.value == "multilabel":
        raise UserError(f"classify.adapter={adapter} fits one label per image; in multi-label mode examples fit a "
                        "threshold per label instead: use classify.adapter=auto or none")
    if classify_cfg.review_size < 0:
        raise UserError(f"classify.review_size={classify_cfg.review_size} must be 0 or more")


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
    execution = pipeline.execution
    if any(stage.name == "export_towers" for stage in pipeline.stages):  # an exported runtime runs the towers
        devices.fix_mmap_threshold()  # before the first batch: memory that does not grow with the run's length
    distributed.init(shard, execution.device.device, cfg.shard.timeout_hours)
    token = distributed.listing_token(shard, cfg.dataset.listing)
    store = pipeline.cache.store
    runner = Runner(pipeline.cache_dir, execution, cfg.cache_lock.value,
                    reuse_tokens={"discover": token} if token else {}, store=store)
    try:
        if shard.count > 1:
            runner.run(pipeline.stages, targets=("encode_images",), shard=(shard.index, shard.count))
            distributed.barrier(shard)
            if not shard.merges:
                return RunSummary(0, 0, 0, time.perf_counter() - started, pipeline.out_dir, runner.reports,
                                  counters=execution.counters, shard=shard)
        results = runner.run(pipeline.stages)
        counts = classify.read_counts(results["classify"])
        kinds = error_kinds(pipeline.out_dir / "errors.parquet")
        if pipeline.output.store is not None:
            upload_outputs(pipeline.output)
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        raise UserError(f"cannot write '{exc.filename or pipeline.cache_dir}': {exc.strerror}. Free some space or "
                        "choose another CACHE= / OUT=; the checkpoints already written stay valid and the same "
                        "command resumes from them") from exc
    finally:
        distributed.finish(shard)
        execution.models.release()
        if store is not None:
            log.info("cache: %s", store.request_line())
        pipeline.cleanup()
    if counts["discovered"] == 0:
        log.warning("no images found in %s (extensions: %s); outputs are empty",
                    execution.sources.locations[DATASET].path, ", ".join(cfg.dataset.extensions))
    if counts.get("metrics"):
        log.info("against ground truth: %s (metrics.parquet, confusion.parquet)", counts["metrics"])
    read_after = bytes_read()
    return RunSummary(counts["discovered"], counts["classified"], counts["errors"], time.perf_counter() - started,
                      pipeline.out_dir, runner.reports, results, execution.counters,
                      error_kinds=kinds, destination=pipeline.output.store.url if pipeline.output.store else None,
                      bytes_read=read_after - read_before if read_before is not None else None,
                      cache_bytes_read={k: BYTES_READ[k] - cache_before[k] for k in BYTES_READ})


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
