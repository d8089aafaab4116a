"""Load any zero-shot dual encoder of `pipeline.families` from a local Hugging Face folder (or a hub id already
in the local HF cache) and run only the tower that is needed.

`inspect_model_dir` validates a directory cheaply (no weights read) so that bad paths fail before heavy work;
`LoadedModel` is the same code that loads `openai/clip-vit-large-patch14` or `google/siglip-base-patch16-224` on
a user's machine, never touching the network. Stages ask a `ModelProvider` for the model by its content
fingerprint (a hashed param); the provider knows where it lives.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .devices import DeviceChoice
from .engine.files import FileDigests, sha256_json
from .errors import UserError
from .families import FAMILIES, HF, MULTILINGUAL_VOCABULARY, Family, canonical_text
from .imaging import Preprocessor
from .inference import TORCH, ExportedTowers, TorchTowers, read_scores

log = logging.getLogger(__name__)
# transformers imports torchao (int8 on torch) when it is installed, whose import logs kernels it cannot load on
# this build and enum registrations: noise in every run's log, about nothing this project uses.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

SAFE_WEIGHTS = ("*.safetensors",)
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    model_type: str  # the config's model_type (a key of pipeline.families.FAMILIES)
    weight_files: tuple[Path, ...]
    uses_pickle: bool
    vocabulary: int = 0  # the text tower's vocabulary size, from config.json

    @property
    def family(self) -> Family:
        """How the family is scored and fed."""
        return FAMILIES[self.model_type]

    @property
    def takes_chinese(self) -> bool:
        """Whether the tokenizer and the training data cover Chinese: per family, and for SigLIP (English and
        multilingual checkpoints share the family) by the size of the vocabulary."""
        multilingual = self.family.multilingual
        return self.vocabulary >= MULTILINGUAL_VOCABULARY if multilingual is None else multilingual

    @property
    def name(self) -> str:
        """The model's name in reports: its folder's name."""
        return self.path.resolve().name

    def fingerprint(self, digests: FileDigests) -> str:
        """Content hash of everything that decides the outputs: weights, config, tokenizer, processor."""
        files = sorted(p for p in self.path.iterdir() if p.is_file() and not p.name.startswith("."))
        return sha256_json({p.name: digests.digest(p) for p in files})


def resolve_model_path(value: str) -> Path:
    """A local folder, or a hub id (`org/name`) whose snapshot is in the local Hugging Face cache. Nothing is
    downloaded: a hub id that is not in the cache is an error that says how to get it."""
    path = Path(value)
    if path.exists() or not _HUB_ID.match(str(value)):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(value), local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        raise UserError(f"model '{value}' is neither a local folder nor in the Hugging Face cache; download it "
                        f"once with `huggingface-cli download {value}` (or `huggingface-cli download {value} "
                        f"--local-dir models/{value.split('/')[-1]}` and MODEL=models/{value.split('/')[-1]}); "
                        "nothing is downloaded at run time") from None


def inspect_model_dir(path: str | Path, allow_pickle: bool = False) -> ModelInfo:
    path = resolve_model_path(str(path))
    if not path.is_dir():
        raise UserError(f"model directory not found: '{path}'; set model.path (MODEL=dir) to a local Hugging Face "
                        "model folder (config.json, *.safetensors, tokenizer and preprocessor files)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"'{config_file}' is missing: model.path must be a Hugging Face model folder")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"'{config_file}' is not valid JSON: {exc}") from None
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        supported = ", ".join(f"{f.model_type} ({f.model_class})" for f in FAMILIES.values())
        raise UserError(f"'{config_file}' has model_type={model_type!r}; supported: {supported}")
    weights, uses_pickle = _weight_files(path, allow_pickle)
    # transformers < 5 saves preprocessor_config.json; 5 nests the image processor in processor_config.json.
    if not any((path / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        raise UserError(f"no image-processor settings in '{path}' (preprocessor_config.json or "
                        "processor_config.json): save the model's processor into that folder")
    family = FAMILIES[model_type]
    if not any(all((path / f).is_file() for f in group) for group in family.tokenizer_files):
        wanted = " or ".join("+".join(g) for g in family.tokenizer_files)
        raise UserError(f"no tokenizer files in '{path}': expected {wanted}")
    vocabulary = int((config.get("text_config") or {}).get("vocab_size") or config.get("vocab_size") or 0)
    return ModelInfo(path=path, model_type=model_type, weight_files=weights, uses_pickle=uses_pickle,
                     vocabulary=vocabulary)


def _weight_files(path: Path, allow_pickle: bool) -> tuple[tuple[Path, ...], bool]:
    safe = sorted(p for pattern in SAFE_WEIGHTS for p in path.glob(pattern))
    if safe:
        return tuple(safe), False
    pickled = sorted(p for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
    if not pickled:
        raise UserError(f"no weights in '{path}': expected model.safetensors (or *.safetensors shards)")
    if not allow_pickle:
        raise UserError(f"'{path}' has only pickle weights ({', '.join(p.name for p in pickled)}), which can run "
                        "arbitrary code when loaded. Convert them to safetensors, or set model.allow_pickle=true "
                        "if you trust their source")
    return tuple(pickled), True


class LoadedModel:
    """A model's towers on their device or runtime, with its tokenizer, its preprocessing and its scoring."""

    def __init__(self, info: ModelInfo, choice: DeviceChoice, compile: bool = False,
                 export: Path | None = None) -> None:
        from transformers import AutoTokenizer

        self.info, self.choice, self.family = info, choice, info.family
        if export is None:
            self.towers = TorchTowers(_load_torch_model(info, choice, compile))
            self.logit_scale, self.logit_bias = scores_of(info, self.towers.model)
        else:  # an export by the export_towers stage: no torch weights are loaded
            self.towers = ExportedTowers.load(export, choice.dtype_name)
            self.logit_scale, self.logit_bias = read_scores(export)
            log.info("towers run on %s in %s (export in %s)", self.towers.runtime, choice.dtype_name, export)
        self.compiled = compile
        self.tokenizer = AutoTokenizer.from_pretrained(info.path, local_files_only=True)
        self.preprocessor = preprocessor_of(info)  # the reference (CPU) preprocessing, for callers outside runs
        self.preprocess_spec = self.preprocessor.spec
        self._dim: int | None = None

    @property
    def model(self):
        """The HF torch model (torch runtime only)."""
        return self.towers.model

    @property
    def text_kwargs(self) -> dict:
        """The tokenizer's arguments, as the family's reference tokenises (padding, truncation)."""
        kwargs = dict(self.family.text)
        if kwargs.get("padding") is True:
            kwargs.update(truncation=True, max_length=min(int(self.tokenizer.model_max_length), 512))
        return kwargs

    @property
    def embedding_dim(self) -> int:
        if self._dim is None:
            self._dim = int(self.encode_text([""]).shape[1])
        return self._dim

    def prompts(self, texts: list[str]) -> list[str]:
        """Prompts as the family's reference feeds them (SigLIP2: lower case, no punctuation)."""
        return [canonical_text(t) for t in texts] if self.family.canonical else list(texts)

    @torch.inference_mode()
    def encode_text(self, prompts: list[str], batch_size: int = 256) -> np.ndarray:
        """L2-normalised text embeddings, float32, one row per prompt; the text tower runs once per prompt."""
        rows = []
        prompts = self.prompts(prompts)
        for start in range(0, len(prompts), batch_size):
            tokens = self.tokenizer(prompts[start:start + batch_size], return_tensors="pt", **self.text_kwargs)
            rows.append(_normalise(self.towers.text(dict(tokens.to(self.choice.device)))))
        return torch.cat(rows).numpy()

    def encode_images(self, inputs: torch.Tensor | dict[str, torch.Tensor]) -> np.ndarray:
        """L2-normalised image embeddings, float32; only the vision tower runs. `inputs` are pixel values, or
        the dict of tensors a family's HF processor makes (SigLIP2: patches, their mask and shapes)."""
        return self.encode_images_async(inputs).result()

    @torch.inference_mode()
    def encode_images_async(self, inputs: torch.Tensor | dict[str, torch.Tensor]) -> "Embeddings":
        """Launch the vision tower on a batch; the embeddings come back to the host without blocking (an
        accelerator copies them into page-locked memory while the next batch is prepared)."""
        if not isinstance(inputs, dict):
            inputs = {"pixel_values": inputs}
        # Copy first, cast on the device: the host never converts into a temporary that a non-blocking copy might
        # read after it is freed (torch_npu does so for a cast inside the copy).
        moved = {key: value.to(self.choice.device, non_blocking=True) for key, value in inputs.items()}
        if self.towers.runtime == TORCH:  # an export takes fp32 pixels and casts inside (bf16 on OpenVINO)
            moved["pixel_values"] = moved["pixel_values"].to(self.choice.dtype)
        features = self.towers.image(moved).float()
        features = features / features.norm(p=2, dim=-1, keepdim=True)
        return Embeddings.of(features)


def _load_torch_model(info: ModelInfo, choice: DeviceChoice, compile: bool):
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar is noise in a batch log
    model_cls = getattr(transformers, info.family.model_class)
    log.info("loading %s from %s (%s, %s)", model_cls.__name__, info.path, choice.device, choice.dtype_name)
    model = model_cls.from_pretrained(
        info.path, local_files_only=True, use_safetensors=not info.uses_pickle,
        dtype=choice.dtype,  # transformers takes SDPA attention where the family supports it
    ).to(choice.device).eval()
    if choice.int8:
        quantize_linear_int8(model.vision_model)
    if choice.device.type == "npu":
        text_attention_eager(model)
    if compile:  # CUDA graphs on CUDA ("reduce-overhead"): launch costs vanish for the fixed batch shape
        mode = "reduce-overhead" if choice.device.type == "cuda" else None
        model.vision_model = torch.compile(model.vision_model, mode=mode)
    return model


def text_attention_eager(model) -> None:
    """The text tower with eager attention: on Ascend NPUs the SDPA path with a boolean padding mask gives wrong
    results (Ascend/pytorch #88); the text tower runs once per label, so eager costs nothing that matters."""
    try:
        model.set_attn_implementation({"text_config": "eager"})
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        log.warning("could not switch the text tower to eager attention (%s); check `make precision` on the NPU "
                    "with prompts of unequal length", exc)


class Embeddings:
    """Embeddings on their way to the host: `result()` waits for the copy only when they are needed."""

    def __init__(self, host: torch.Tensor, event=None) -> None:
        self.host, self.event = host, event

    @classmethod
    def of(cls, features: torch.Tensor) -> "Embeddings":
        if features.device.type == "cpu":
            return cls(features)
        host = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
        host.copy_(features, non_blocking=True)
        event = getattr(torch, features.device.type).Event()
        event.record()
        return cls(host, event)

    def result(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.host.numpy()


def scores_of(info: ModelInfo, model) -> tuple[float, float | None]:
    """(logit scale, logit bias) from the checkpoint's own fp32 values (a bf16 copy of ln 100 is 4.59375: the
    scale would be 98.86, and every probability less peaked), read from the weights file when it has them."""
    family = info.family
    raw = {key: _stored_scalar(info, key) for key in filter(None, (family.scale_key, family.bias_key))}
    for key in raw:
        if raw[key] is None:  # not found in the file (pickle weights, other names): the loaded parameter
            raw[key] = float(getattr(model, key).detach().float().cpu())
    scale = 1.0 / raw["temperature"] if family.scale_key == "temperature" else math.exp(raw["logit_scale"])
    return float(scale), raw.get(family.bias_key) if family.bias_key else None


def _stored_scalar(info: ModelInfo, key: str) -> float | None:
    if info.uses_pickle:
        return None
    from safetensors import safe_open

    for file in info.weight_files:
        with safe_open(str(file), framework="pt") as fh:
            if key in fh.keys():
                return float(fh.get_tensor(key).double().reshape(-1)[0])
    return None


def quantize_linear_int8(module: torch.nn.Module) -> None:
    """int8 weights for every Linear layer of `module` (the vision tower), activations quantised per token on the
    fly (torchao's dynamic int8, CPU). The text tower stays fp32: it runs once per prompt, never per image.
    `make precision DTYPE=int8 RUNTIME=torch` measures its agreement with fp32, `make bench` its speed."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        raise UserError("device.dtype=int8 with model.runtime=torch needs torchao: pip install -e '.[torchao]' "
                        "(make install includes it), or run int8 on model.runtime=openvino or onnxruntime") from None
    quantize_(module, Int8DynamicActivationInt8WeightConfig())


def _normalise(features: torch.Tensor) -> torch.Tensor:
    # Normalise in fp32 whatever the model dtype: the cosine is what the label scores depend on.
    features = features.float()
    return (features / features.norm(p=2, dim=-1, keepdim=True)).cpu()


@dataclass
class ModelProvider:
    """Loads the model on first use (a rerun whose stages are all cached never pays for it), once per dtype."""

    info: ModelInfo
    fingerprint: str
    device: torch.device
    preloaded: LoadedModel | None = None  # a model already in memory (benchmarks, notebooks)
    counters: dict = field(default_factory=dict)
    compile: bool = False  # torch.compile the vision tower (encode.compile)
    _loaded: dict = field(default_factory=dict)

    def get(self, fingerprint: str, dtype: str, export: Path | None = None) -> LoadedModel:
        """The model in `dtype`: its torch towers, or those of an `export` (a folder written by export_towers)."""
        if fingerprint != self.fingerprint:
            raise ValueError(f"asked for model {fingerprint[:12]}, this run has {self.fingerprint[:12]}")
        if self.preloaded is not None:
            return self.preloaded
        key = (dtype, str(export))
        if key not in self._loaded:
            started = time.perf_counter()
            self._loaded[key] = LoadedModel(self.info, DeviceChoice(self.device, dtype), self.compile, export)
            self.counters["model_load_seconds"] = time.perf_counter() - started
        return self._loaded[key]

    def release(self) -> None:
        """Free the models now, not at some later garbage collection: an OpenVINO model freed by the collector
        in the middle of a later run (its thread pool torn down while that run forks decode workers) crashed it."""
        if self._loaded:
            self._loaded.clear()
            gc.collect()


def preprocessor_of(info: ModelInfo, on_device: bool = False) -> Preprocessor:
    """The family's preprocessing without loading weights (for workers and fingerprints): ours where it replicates
    the HF processor (on the CPU, or with `on_device` as torch ops on the model's device), else the HF processor
    itself (after our decoding)."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(info.path, local_files_only=True, backend="pil")
    return Preprocessor.from_hf(processor, own=info.family.images != HF, on_device=on_device)
