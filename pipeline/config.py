"""Structured-config schema (Hydra ConfigStore) and the command-line flags of the vendor example.

The dataclasses are the schema: `conf/` YAML files and command-line overrides are merged into them, so an
unknown key or a wrong type (e.g. `device.type=gpu`, `encode.batch_size=abc`) fails at start-up.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from .discovery import DEFAULT_EXTENSIONS
from .imaging import DEFAULT_MAX_PIXELS

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class DeviceType(enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    npu = "npu"


class DType(enum.Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"
    int8 = "int8"  # CPU only: Linear weights int8 (dynamic quantisation), activations fp32


@dataclass
class ModelConfig:
    path: str = MISSING  # local Hugging Face folder: config.json, *.safetensors, tokenizer, preprocessor
    name: Optional[str] = None  # shown in reports; defaults to the folder name
    allow_pickle: bool = False  # *.bin weights can run code when unpickled: off unless you trust the source


@dataclass
class LabelsConfig:
    name: str = "custom"
    list: Any = None  # "cat,dog" (as the vendor's --label_list) or a YAML list of names or {name, prompt}
    file: Optional[str] = None  # UTF-8, one label per line, '#' comments
    template: str = "a photo of a _."  # exactly one '_' marks the label; '_' alone means the bare label
    templates: Optional[List[str]] = None  # a prompt ensemble; when set, it replaces `template`


@dataclass
class DatasetConfig:
    name: str = "custom"
    path: Optional[str] = None  # a folder, searched recursively
    image: Optional[str] = None  # or one image: its label distribution is printed
    extensions: List[str] = field(default_factory=lambda: [e.lstrip(".") for e in DEFAULT_EXTENSIONS])
    truth: Optional[str] = None  # null/auto: folder-per-class when every top folder is a label; "folders"; or a
    truth_column: str = "label"  # CSV/parquet file with columns path,<truth_column>


@dataclass
class DeviceConfig:
    type: DeviceType = DeviceType.auto
    dtype: DType = DType.fp32
    index: Optional[int] = None
    cpu_half: bool = False  # run fp16/bf16 on a CPU anyway (slow there; for precision checks only)


@dataclass
class EncodeConfig:
    batch_size: int = 8
    num_workers: Optional[int] = None  # null: chosen from the CPU count and the device
    chunk_size: int = 1024  # images per checkpoint chunk: what a crash can cost
    warmup_image: Optional[str] = None  # null: a built-in image


@dataclass
class PreprocessConfig:
    draft: bool = False  # reduced-scale JPEG decoding: faster, not bit-equal to the HF processor
    max_pixels: int = DEFAULT_MAX_PIXELS
    timeout: float = 60.0  # seconds per image; a decoder that spins longer is reported, not waited for


@dataclass
class ClassifyConfig:
    topk: int = 5
    min_score: Optional[float] = None  # best score below this: label `unknown_label` (scores still written)
    unknown_label: str = "unknown"


@dataclass
class PrecisionConfig:
    min_cosine: float = 0.99  # per image, probability vectors and image embeddings
    min_top1_agreement: float = 0.99
    reference_batch_size: int = 8


@dataclass
class ShardConfig:
    index: int = 0  # this job's shard, 0 <= index < count (torchrun sets these from RANK / WORLD_SIZE)
    count: int = 1  # > 1: encode only this shard's chunks; an ordinary run (count 1) then merges
    timeout_hours: float = 72.0  # how long torchrun ranks wait for the slowest one at the merge barrier


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    output_dir: str = "${hydra:runtime.output_dir}"
    cache_dir: str = "outputs/cache"
    progress: bool = True
    report: bool = True  # write report.html (summary, charts, galleries, errors) into the run directory


def register() -> None:
    """Make the schema and the `${project_root:}` resolver known to Hydra (idempotent)."""
    ConfigStore.instance().store(name="classify_schema", node=RunConfig)
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))


# ------------------------------------------------------------------------------------- vendor-example flags

# The vendor example's flags (and a few of ours, used by the Makefile) as Hydra overrides.
FLAG_OVERRIDES = {
    "--model_path": ("model.path",),
    "--input_text": ("labels.template",),
    "--label_list": ("labels.list", "labels.name=custom"),
    "--label_file": ("labels.file", "labels.name=custom"),
    "--input_image": ("dataset.image", "dataset=custom"),
    "--dataset_path": ("dataset.path", "dataset=custom"),
    "--warmup_image_path": ("encode.warmup_image",),
    "--results_save_path": ("hydra.run.dir",),
    "--device": ("device.type",),
    "--dtype": ("device.dtype",),
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
            out.extend(extra)
            out.append(f"{key}={quote_override_value(value)}")
        else:
            out.append(arg)
        i += 1
    return out
