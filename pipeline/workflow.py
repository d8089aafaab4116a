"""Compose the classification DAG from a resolved config, check inputs early, run it and summarise.

Every check that can fail on user input runs before the model is loaded or an image is read.
"""

from __future__ import annotations

import errno
import functools
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from . import devices, distributed, stages
from .dag import CACHED, Artifact, CONTENT, SINK, Runner, Stage, StageReport
from .errors import UserError
from .labels import LabelSet, build_label_set, check_language
from .models import LoadedModel, inspect_model_dir, spec_of
from .storage import FileDigests

log = logging.getLogger(__name__)

_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}

# Bump when a stage's output format or semantics change: old cache entries then stop matching.
STAGE_VERSIONS = {"discover": 1, "truth": 1, "encode_labels": 1, "encode_images": 1, "classify": 1}


@dataclass
class Plan:
    stages: list[Stage]
    resources: stages.Resources
    label_set: LabelSet
    out_dir: Path
    cache_dir: Path


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
        return (f"{self.classified}/{self.discovered} images classified, {self.errors} errors, "
                f"{self.seconds:.1f}s ({rate:.1f} img/s); stages: {stage_states}; results in {self.out_dir}")


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


def plan(cfg: DictConfig, preloaded: LoadedModel | None = None, device_index: int | None = None) -> Plan:
    """Validate the config against the world (files, model, device) and build the stages."""
    for key in ("encode.batch_size", "encode.chunk_size", "classify.topk"):
        _positive(key, OmegaConf.select(cfg, key))
    label_set = build_label_set(cfg.labels.name, _plain(cfg.labels.list), cfg.labels.file,
                                cfg.labels.template, _plain(cfg.labels.templates))
    if cfg.classify.unknown_label in label_set.labels:
        raise UserError(f"classify.unknown_label={cfg.classify.unknown_label!r} is also one of the labels; "
                        "choose another name for the below-min_score outcome")
    info = inspect_model_dir(cfg.model.path, cfg.model.allow_pickle)
    check_language(label_set, info.takes_chinese, cfg.model.path)
    dataset = _dataset_location(cfg)
    truth_source = _truth_source(cfg)
    if cfg.encode.warmup_image and not Path(cfg.encode.warmup_image).is_file():
        raise UserError(f"warm-up image not found: '{cfg.encode.warmup_image}' (encode.warmup_image)")
    index = cfg.device.index if device_index is None else device_index
    choice = devices.resolve(cfg.device.type.value, cfg.device.dtype.value, index, cpu_half=cfg.device.cpu_half)
    cache_dir, out_dir = Path(cfg.cache_dir), Path(cfg.output_dir)
    _check_writable(cache_dir, "cache_dir (CACHE=)")
    _check_writable(out_dir, "the run directory (OUT=)")
    workers = cfg.encode.num_workers if cfg.encode.num_workers is not None else default_workers(choice)
    res = stages.Resources(dataset=dataset, model_info=info, device=choice, spec=spec_of(info),
                           batch_size=cfg.encode.batch_size, num_workers=int(workers),
                           chunk_size=cfg.encode.chunk_size, draft=cfg.preprocess.draft,
                           max_pixels=cfg.preprocess.max_pixels, timeout=cfg.preprocess.timeout,
                           warmup_image=cfg.encode.warmup_image, progress=cfg.progress, preloaded=preloaded)
    model_fp = info.fingerprint(FileDigests(cache_dir / "file-digests"))
    stage_list = _stages(cfg, res, label_set, model_fp, truth_source, out_dir)
    return Plan(stage_list, res, label_set, out_dir, cache_dir)


def _stages(cfg: DictConfig, res: stages.Resources, label_set: LabelSet, model_fp: str, truth_source: str | None,
            out_dir: Path) -> list[Stage]:
    """The DAG; each stage's params are exactly the config that decides its output."""
    dtype, spec = res.device.dtype_name, res.spec.to_dict()
    extensions = tuple(str(e) for e in cfg.dataset.extensions)
    unknown = {"min_score": cfg.classify.min_score, "unknown_label": cfg.classify.unknown_label}
    topk = cfg.classify.topk
    metadata = {"model": {"name": cfg.model.name or res.model_info.path.resolve().name,
                          "path": str(res.model_info.path), "family": res.model_info.family,
                          "fingerprint": model_fp},
                "label_set": label_set.to_dict(), "template": label_set.template,
                "templates": list(label_set.templates), "dataset": {"root": str(res.root.resolve())},
                "config": {"dtype": dtype, "topk": topk, "preprocess": spec, "draft": cfg.preprocess.draft}}
    stage_list = [
        Stage("discover", functools.partial(stages.discover_images, res=res, extensions=extensions),
              params={"extensions": sorted(e.lower().lstrip(".") for e in extensions)},
              version=STAGE_VERSIONS["discover"], kind=CONTENT),
        Stage("encode_labels", functools.partial(stages.encode_labels, res=res, label_set=label_set),
              params={"model": model_fp, "labels": label_set.to_dict(), "dtype": dtype},
              version=STAGE_VERSIONS["encode_labels"], kind=CACHED),
        Stage("encode_images", functools.partial(stages.encode_images, res=res), inputs=("discover",),
              params={"model": model_fp, "preprocess": spec, "draft": cfg.preprocess.draft,
                      "max_pixels": cfg.preprocess.max_pixels, "dtype": dtype},
              version=STAGE_VERSIONS["encode_images"], kind=CACHED),
        Stage("truth", functools.partial(stages.load_truth, source=truth_source, column=cfg.dataset.truth_column,
                                         labels=label_set.labels), inputs=("discover",),
              params={"source": truth_source, "column": cfg.dataset.truth_column, "labels": list(label_set.labels)},
              version=STAGE_VERSIONS["truth"], kind=CONTENT),
        Stage("classify", functools.partial(stages.classify, topk=topk, metadata=metadata, progress=cfg.progress,
                                            **unknown),
              inputs=("discover", "truth", "encode_labels", "encode_images"),
              params={"topk": topk, "metadata": metadata, **unknown},
              version=STAGE_VERSIONS["classify"], kind=CACHED),
        Stage("publish", functools.partial(stages.publish, out_dir=out_dir), inputs=("classify",), kind=SINK),
    ]
    if cfg.report:
        stage_list.append(Stage("report", functools.partial(stages.write_report, out_dir=out_dir,
                                                            dataset_root=res.root), inputs=("publish",), kind=SINK))
    return stage_list


def _truth_source(cfg: DictConfig) -> str | None:
    source = cfg.dataset.truth
    if source in (None, "auto", "folders"):
        return source
    if not Path(source).is_file():
        raise UserError(f"truth file not found: '{source}' (dataset.truth)")
    return str(Path(source).resolve())


def _check_writable(directory: Path, what: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise UserError(f"cannot write to {what} '{directory}': {exc.strerror or exc}; choose a writable "
                        "folder") from None


def _dataset_location(cfg: DictConfig) -> Path:
    path, image = cfg.dataset.path, cfg.dataset.image
    if path and image:
        raise UserError("both dataset.path and dataset.image are set; give a folder (DATASET=) or one image (IMAGE=)")
    if not path and not image:
        raise UserError("no input: set dataset.path (DATASET=dir, --dataset_path) or dataset.image (IMAGE=file, "
                        "--input_image)")
    location = Path(image or path)
    if image and not location.is_file():
        raise UserError(f"image not found: '{image}' (dataset.image / IMAGE=file)")
    if path and not location.is_dir():
        raise UserError(f"dataset folder not found: '{path}' (dataset.path / DATASET=dir)")
    return location


def run(cfg: DictConfig, preloaded: LoadedModel | None = None) -> RunSummary:
    started = time.perf_counter()
    shard = distributed.from_environment(cfg.shard.index, cfg.shard.count)
    the_plan = plan(cfg, preloaded, shard.local_rank if shard.distributed else None)
    distributed.init(shard, the_plan.resources.device.device.type, cfg.shard.timeout_hours)
    runner = Runner(the_plan.cache_dir)
    try:
        if shard.count > 1:
            _encode_own_shard(the_plan, runner, shard)
            distributed.barrier(shard)
            if not shard.merges:
                return RunSummary(0, 0, 0, time.perf_counter() - started, the_plan.out_dir, runner.reports,
                                  counters=the_plan.resources.counters, shard=shard)
        results = runner.run(the_plan.stages)
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        raise UserError(f"cannot write '{exc.filename or the_plan.cache_dir}': {exc.strerror}. Free some space or "
                        "choose another CACHE= / OUT=; the checkpoints already written stay valid and the same "
                        "command resumes from them") from exc
    finally:
        distributed.finish(shard)
    counts = stages.read_counts(results["classify"])
    if counts["discovered"] == 0:
        log.warning("no images found under %s (extensions: %s); outputs are empty", the_plan.resources.dataset,
                    ", ".join(cfg.dataset.extensions))
    if counts.get("metrics"):
        log.info("against ground truth: %s (metrics.parquet, confusion.parquet)", counts["metrics"])
    return RunSummary(counts["discovered"], counts["classified"], counts["errors"], time.perf_counter() - started,
                      the_plan.out_dir, runner.reports, results, the_plan.resources.counters)


def _encode_own_shard(the_plan: Plan, runner: Runner, shard: distributed.Shard) -> None:
    upstream = runner.run(the_plan.stages, targets=("discover",))
    encode = next(s for s in the_plan.stages if s.name == "encode_images")
    inputs = {name: upstream[name] for name in encode.inputs}
    started = time.perf_counter()
    chunks = stages.encode_shard(runner.scratch_dir(encode, inputs), inputs, the_plan.resources, shard.index,
                                 shard.count)
    runner.reports.append(StageReport(f"encode_images[shard {shard.index}/{shard.count}]",
                                      "ran" if chunks else "reused", time.perf_counter() - started))


def label_distribution(out_dir: Path, limit: int | None = None) -> list[tuple[str, list[tuple[str, float]]]]:
    """Per image, every label with its probability, best first (for the single-image mode's printout)."""
    table = pq.read_table(out_dir / "predictions.parquet", columns=["path", "probs"])
    from .writers import read_metadata

    labels = read_metadata(out_dir / "predictions.parquet")["label_set"]["labels"]
    rows = []
    for path, probs in zip(table.column("path").to_pylist(), table.column("probs").to_pylist()):
        ranked = sorted(zip(labels, probs), key=lambda lp: -lp[1])
        rows.append((path, ranked[:limit] if limit else ranked))
    return rows
