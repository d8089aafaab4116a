"""Structured-config schema (Hydra ConfigStore), the Hydra compose helper, and the vendor example's flags.

The dataclasses are the schema: `conf/` YAML files and command-line overrides are merged into them, so an
unknown key or a wrong type (e.g. `device.type=gpu`, `encode.batch_size=abc`) fails at start-up.

Every key also says what it does to results (`ROLE` in its field's metadata), and tests hold the stages to it:
- `result`: decides outputs; it reaches a stage only as a hashed param, so changing it recomputes what it decides
  (and a run on a warm cache gives what the same run gives on an empty one: tests/integration/test_warm_cache.py);
- `input`: names an input whose content is fingerprinted (a model folder, the dataset, a label or truth file):
  moving the input changes nothing, changing its content recomputes what depends on it;
- `execution`: changes only how the work is done (device, batch size, workers, where outputs go): never hashed.
"""

from __future__ import annotations

import enum
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from .imaging import DEFAULT_MAX_PIXELS
from .sources.folder import DEFAULT_EXTENSIONS
from .sources.remote import is_url

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULT, INPUT, EXECUTION = "result", "input", "execution"
ROLE = "role"


def _key(role: str, default: Any = None, factory: Any = None):
    if factory is not None:
        return field(default_factory=factory, metadata={ROLE: role})
    return field(default=default, metadata={ROLE: role})


class DeviceType(enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    npu = "npu"


class DType(enum.Enum):
    auto = "auto"  # fp32 on a CPU; bf16 on an accelerator that has it, else fp16
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"  # on a CPU only where it has bf16 instructions (AVX512-BF16, AMX, Arm BF16): torch or openvino
    int8 = "int8"  # CPU only, vision tower: static (onnxruntime, openvino) or dynamic (torch) int8 quantisation


class DatasetFormat(enum.Enum):
    auto = "auto"  # from the value: a manifest's suffix, .tar or a brace pattern, a bucket URL, else a folder
    folder = "folder"
    manifest = "manifest"
    tar = "tar"
    bucket = "bucket"


class CacheLock(enum.Enum):
    auto = "auto"  # flock, or the soft lock where flock fails or holds on one node only (pipeline/engine/locks.py)
    flock = "flock"
    soft = "soft"


class InferenceRuntime(enum.Enum):
    auto = "auto"
    torch = "torch"
    onnxruntime = "onnxruntime"
    openvino = "openvino"


@dataclass
class ModelConfig:
    # A local Hugging Face folder: config.json, *.safetensors, tokenizer, preprocessor.
    path: Optional[str] = _key(INPUT)
    name: Optional[str] = _key(RESULT)  # shown in outputs' metadata and reports; default: the folder's name
    # *.bin weights can run code when unpickled: off unless you trust the source.
    allow_pickle: bool = _key(EXECUTION, False)
    # What runs the towers: torch, or an export for onnxruntime or openvino (CPU; README "Performance"). auto: torch.
    runtime: InferenceRuntime = _key(RESULT, InferenceRuntime.auto)
    # int8 with onnxruntime or openvino: images its activation ranges are calibrated on (the dataset's first ones)
    calibration_images: int = _key(RESULT, 64)


@dataclass
class LabelsConfig:
    name: str = _key(RESULT, "custom")
    list: Any = _key(RESULT)  # "cat,dog" (as the vendor's --label_list) or a YAML list of names or {name, prompt}
    file: Optional[str] = _key(INPUT)  # UTF-8, one label per line, '#' comments
    template: str = _key(RESULT, "a photo of a _.")  # exactly one '_' marks the label; '_' alone: bare label
    templates: Optional[List[str]] = _key(RESULT)  # a prompt ensemble; when set, it replaces `template`
    # A few images per label: a folder with a subfolder per label (its name or display name), or a table with
    # columns path,label (csv, tsv, parquet, jsonl; paths relative to the table, or keys of the dataset's images).
    examples: Optional[str] = _key(INPUT)


@dataclass
class DatasetConfig:
    # A folder (searched recursively), a manifest (.csv .tsv .parquet .jsonl), tar shards (.tar, a folder of them, a
    # brace pattern) or a bucket prefix (s3://, gs://); local or a URL. See pipeline/sources/.
    path: Optional[str] = _key(INPUT)
    image: Optional[str] = _key(INPUT)  # or one image: its label distribution is printed
    format: DatasetFormat = _key(RESULT, DatasetFormat.auto)  # what dataset.path is
    extensions: List[str] = _key(RESULT, factory=lambda: list(DEFAULT_EXTENSIONS))
    path_column: str = _key(RESULT, "path")  # a manifest's column of image paths
    # null/auto: the source's own (a manifest's truth_column), else folder-per-class when every top folder is a
    # label; "folders"; or a CSV/parquet file with columns path,<truth_column>
    truth: Optional[str] = _key(INPUT)
    truth_column: str = _key(RESULT, "label")
    truth_member: Optional[str] = _key(RESULT)  # tar shards: cls, txt or json.<field> holds each image's truth
    # fsspec options for remote sources (endpoint, credentials, anon=true...); the environment's are the default.
    storage_options: Any = _key(EXECUTION)
    retries: int = _key(EXECUTION, 3)  # remote reads: attempts after the first, with backoff (0.5 s, 1 s, 2 s ...)
    # Runs given the same name share one listing (the first lists, the others reuse it); null: list afresh, except
    # that torchrun ranks share their job's listing, and so do the tasks of one SLURM array.
    listing: Optional[str] = _key(EXECUTION)
    io_timeout: float = _key(EXECUTION, 60.0)  # remote reads: seconds per request


@dataclass
class DeviceConfig:
    type: DeviceType = _key(EXECUTION, DeviceType.auto)
    dtype: DType = _key(RESULT, DType.auto)
    index: Optional[int] = _key(EXECUTION)
    # run fp16 on a CPU anyway, and bf16 on one without bf16 instructions (slow there; for parity checks only)
    cpu_half: bool = _key(RESULT, False)


@dataclass
class EncodeConfig:
    batch_size: Optional[int] = _key(EXECUTION)  # null: 8 on a CPU, 128 on an accelerator
    # null: adapted while the run goes (see pipeline/encoding/tuner.py); a number fixes it
    num_workers: Optional[int] = _key(EXECUTION)
    chunk_size: int = _key(EXECUTION, 1024)  # mean images per checkpoint chunk: what a crash can cost
    warmup_image: Optional[str] = _key(EXECUTION)  # null: a built-in image
    compile: bool = _key(EXECUTION, False)  # torch.compile the vision tower (CUDA graphs on CUDA); costs a first call


class Backend(enum.Enum):
    auto = "auto"  # pil on a CPU (bit-equal to the HF processor); device next to an accelerator (fast)
    pil = "pil"  # our replica of the HF processor, in the decode workers
    device = "device"  # workers decode; resize, crop and normalisation run as torch ops on the model's device


@dataclass
class PreprocessConfig:
    backend: Backend = _key(RESULT, Backend.auto)
    # Reduced-scale JPEG decoding: faster, not bit-equal to the HF processor. null: on next to an accelerator.
    draft: Optional[bool] = _key(RESULT)
    max_pixels: int = _key(RESULT, DEFAULT_MAX_PIXELS)
    # Seconds per image; an image that takes longer is listed as a (transient) error and tried again next run.
    timeout: float = _key(EXECUTION, 60.0)


class Adapter(enum.Enum):
    """How examples (labels.examples) change the classifier; see pipeline/fewshot.py."""

    auto = "auto"  # chosen by cross-validation on the examples (none without examples)
    none = "none"  # zero-shot
    tip = "tip"  # Tip-Adapter's cache of the examples
    gda = "gda"  # Gaussian discriminant analysis on the examples, added to the text's logits
    clap = "clap"  # a linear head trained on the examples, held close to the text's


class Mode(enum.Enum):
    single = "single"  # one label per image (softmax or sigmoid scores)
    multilabel = "multilabel"  # every label scoring classify.threshold or more (sigmoid families)


@dataclass
class ClassifyConfig:
    mode: Mode = _key(RESULT, Mode.single)
    threshold: float = _key(RESULT, 0.5)  # multilabel: the score a label needs
    topk: int = _key(RESULT, 5)
    min_score: Optional[float] = _key(RESULT)  # best score below this: label `unknown_label` (scores still written)
    # Or the precision the examples must reach: the run picks the min_score at which they do (needs examples).
    target_precision: Optional[float] = _key(RESULT)
    unknown_label: str = _key(RESULT, "unknown")
    adapter: Adapter = _key(RESULT, Adapter.auto)
    # With examples: a temperature for single-label scores, a threshold per label for multi-label ones.
    calibrate: bool = _key(RESULT, True)
    review_size: int = _key(RESULT, 1000)  # rows of review.parquet: the images a person should look at first


@dataclass
class ParityConfig:
    """`jobs/precision.py` (the vendor's precision test): a device/dtype against an fp32 CPU run."""

    min_cosine: float = _key(EXECUTION, 0.99)  # per image, probability vectors and image embeddings
    min_top1_agreement: float = _key(EXECUTION, 0.99)
    reference_batch_size: int = _key(EXECUTION, 8)


@dataclass
class ShardConfig:
    # This job's shard, 0 <= index < count (torchrun sets these from RANK / WORLD_SIZE).
    index: int = _key(EXECUTION, 0)
    count: int = _key(EXECUTION, 1)  # > 1: encode only this shard's chunks; an ordinary run (count 1) then merges
    timeout_hours: float = _key(EXECUTION, 72.0)  # how long torchrun ranks wait for the slowest at the merge barrier


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    parity: ParityConfig = field(default_factory=ParityConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    output_dir: str = _key(EXECUTION, "${hydra:runtime.output_dir}")
    cache_dir: str = _key(EXECUTION, "outputs/cache")
    cache_lock: CacheLock = _key(EXECUTION, CacheLock.auto)
    embeddings: bool = _key(RESULT, False)  # also write embeddings.parquet and label_embeddings.parquet
    progress: bool = _key(EXECUTION, True)  # a bar on a terminal; in a log file, a line every progress_interval s
    progress_interval: float = _key(EXECUTION, 30.0)
    report: bool = _key(EXECUTION, True)  # write report.html (summary, charts, galleries, errors) into the run dir


def roles(schema: type = RunConfig, prefix: str = "") -> dict[str, str | None]:
    """Every leaf key of the schema with its ROLE (None where a key lacks one: a test fails on it)."""
    from dataclasses import fields, is_dataclass

    out: dict[str, str | None] = {}
    for f in fields(schema):
        if is_dataclass(f.type) or (isinstance(f.type, str) and f.type.endswith("Config")):
            out.update(roles(globals()[f.type] if isinstance(f.type, str) else f.type, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = f.metadata.get(ROLE)
    return out


def register() -> None:
    """Make the schema and the `${project_root:}` resolver known to Hydra (idempotent)."""
    ConfigStore.instance().store(name="classify_schema", node=RunConfig)
    # conf/hydra/launcher/ray.yaml shares its name with the plugin's schema, on purpose (`hydra/launcher=ray`, every
    # key settable without a `+`); Hydra warns that such matching is deprecated. The file names its own target, so
    # it works with or without the matching.
    warnings.filterwarnings("ignore", message=r"(?s).*'hydra/launcher/ray' is validated against ConfigStore schema")
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))


def compose(overrides: list[str], config_name: str = "config", return_hydra_config: bool = False) -> DictConfig:
    """The job's config as `jobs/classify.py` composes it, for tests, the benchmark and notebooks."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)


# ------------------------------------------------------------------------------------- vendor-example flags

# The vendor example's flags (and a few of ours, used by the Makefile) as Hydra overrides.
FLAG_OVERRIDES = {
    "--model_path": ("model.path",),
    "--input_text": ("labels.template",),
    "--label_list": ("labels.list", "labels.name=custom"),
    "--label_file": ("labels.file", "labels.name=custom"),
    "--examples": ("labels.examples",),
    "--input_image": ("dataset.image", "dataset=custom"),
    "--dataset_path": ("dataset.path", "dataset=custom"),
    "--warmup_image_path": ("encode.warmup_image",),
    "--results_save_path": ("hydra.run.dir",),
    "--device": ("device.type",),
    "--dtype": ("device.dtype",),
    "--runtime": ("model.runtime",),
    "--batch_size": ("encode.batch_size",),
    "--topk": ("classify.topk",),
    "--cache_dir": ("cache_dir",),
}


def quote_override_value(value: str) -> str:
    """A Hydra override value that stays one literal string whatever it holds (spaces, commas, quotes, '$')."""
    # Hydra's quoted strings: backslashes are literal except a run before a quote or at the end, which is doubled.
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
    escaped = escaped.replace("'", "\\'").replace("${", "\\${")
    return f"'{escaped}'"


def translate_flags(argv: list[str]) -> list[str]:
    """Rewrite `--flag value` / `--flag=value` pairs into Hydra overrides; leave everything else as it is."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")
        if name in FLAG_OVERRIDES:
            if eq:
                value = inline
            elif i + 1 < len(argv):
                i += 1
                value = argv[i]
            else:
                raise SystemExit(f"error: {name} needs a value")
            key, *extra = FLAG_OVERRIDES[name]
            if name == "--results_save_path" and is_url(value):
                key = "output_dir"  # Hydra's own run folder stays local (its log); the outputs go up there
            out.extend(extra)
            out.append(f"{key}={quote_override_value(value)}")
        else:
            out.append(arg)
        i += 1
    return out
