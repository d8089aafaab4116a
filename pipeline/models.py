"""Load CLIP / Chinese-CLIP from a local Hugging Face directory and run only the tower that is needed.

`inspect_model_dir` validates a directory cheaply (no weights read) so that bad paths fail before heavy work;
`LoadedModel` is the same code that loads `openai/clip-vit-large-patch14` or
`OFA-Sys/chinese-clip-vit-base-patch16` on a user's machine, never touching the network. Stages ask a
`ModelProvider` for the model by its content fingerprint (a hashed param); the provider knows where it lives.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .devices import DeviceChoice
from .errors import UserError
from .imaging import PreprocessSpec
from .engine.files import FileDigests, sha256_json

log = logging.getLogger(__name__)

FAMILIES = ("clip", "chinese_clip")
SAFE_WEIGHTS = ("*.safetensors",)
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
_TOKENIZER_FILES = {
    "clip": (("tokenizer.json",), ("vocab.json", "merges.txt")),
    "chinese_clip": (("tokenizer.json",), ("vocab.txt",)),
}


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    family: str  # the config's model_type: "clip" or "chinese_clip"
    weight_files: tuple[Path, ...]
    uses_pickle: bool

    @property
    def takes_chinese(self) -> bool:
        return self.family == "chinese_clip"

    @property
    def name(self) -> str:
        """The model's name in reports: its folder's name."""
        return self.path.resolve().name

    def fingerprint(self, digests: FileDigests) -> str:
        """Content hash of everything that decides the outputs: weights, config, tokenizer, processor."""
        files = sorted(p for p in self.path.iterdir() if p.is_file() and not p.name.startswith("."))
        return sha256_json({p.name: digests.digest(p) for p in files})


def inspect_model_dir(path: str | Path, allow_pickle: bool = False) -> ModelInfo:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model directory not found: '{path}'; set model.path (MODEL=dir) to a local Hugging Face "
                        "model folder (config.json, *.safetensors, tokenizer and preprocessor files)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"'{config_file}' is missing: model.path must be a Hugging Face model folder")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"'{config_file}' is not valid JSON: {exc}") from None
    if model_type not in FAMILIES:
        raise UserError(f"'{config_file}' has model_type={model_type!r}; supported: {', '.join(FAMILIES)} "
                        "(CLIPModel, ChineseCLIPModel)")
    weights, uses_pickle = _weight_files(path, allow_pickle)
    # transformers < 5 saves preprocessor_config.json; 5 nests the image processor in processor_config.json.
    if not any((path / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        raise UserError(f"no image-processor settings in '{path}' (preprocessor_config.json or "
                        "processor_config.json): save the model's processor into that folder")
    if not any(all((path / f).is_file() for f in group) for group in _TOKENIZER_FILES[model_type]):
        wanted = " or ".join("+".join(g) for g in _TOKENIZER_FILES[model_type])
        raise UserError(f"no tokenizer files in '{path}': expected {wanted}")
    return ModelInfo(path=path, family=model_type, weight_files=weights, uses_pickle=uses_pickle)


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
    """A model on its device, with its tokenizer and preprocessing settings."""

    def __init__(self, info: ModelInfo, choice: DeviceChoice) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, ChineseCLIPModel, CLIPModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar is noise in a batch log

        self.info = info
        self.choice = choice
        model_cls = CLIPModel if info.family == "clip" else ChineseCLIPModel
        log.info("loading %s from %s (%s, %s)", model_cls.__name__, info.path, choice.device, choice.dtype_name)
        self.model = model_cls.from_pretrained(
            info.path, local_files_only=True, use_safetensors=not info.uses_pickle,
            dtype=choice.dtype, attn_implementation="sdpa",
        ).to(choice.device).eval()
        if choice.int8:
            self.model = quantize_linear_int8(self.model)
        self.tokenizer = AutoTokenizer.from_pretrained(info.path, local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(info.path, local_files_only=True, backend="pil")
        self.spec = PreprocessSpec.from_hf(processor)

    @property
    def embedding_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp().cpu())

    @torch.inference_mode()
    def encode_text(self, prompts: list[str], batch_size: int = 256) -> np.ndarray:
        """L2-normalised text embeddings, float32, one row per prompt; the text tower runs once per prompt."""
        rows = []
        max_len = min(int(self.tokenizer.model_max_length), 512)
        for start in range(0, len(prompts), batch_size):
            tokens = self.tokenizer(prompts[start:start + batch_size], padding=True, truncation=True,
                                    max_length=max_len, return_tensors="pt").to(self.choice.device)
            out = self.model.get_text_features(**tokens)
            rows.append(_normalise(out.pooler_output))
        return torch.cat(rows).numpy()

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> np.ndarray:
        """L2-normalised image embeddings, float32; only the vision tower runs."""
        pixel_values = pixel_values.to(self.choice.device, dtype=self.choice.dtype, non_blocking=True)
        out = self.model.get_image_features(pixel_values=pixel_values)
        return _normalise(out.pooler_output).numpy()


def quantize_linear_int8(model):
    """int8 weights for every Linear layer, activations quantised on the fly (CPU). `make bench ARGS=--options`
    measures its speed, `make precision DTYPE=int8` its agreement with fp32."""
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, but still ships, works and is tested here
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


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
    _loaded: dict = field(default_factory=dict)

    def get(self, fingerprint: str, dtype: str) -> LoadedModel:
        if fingerprint != self.fingerprint:
            raise ValueError(f"asked for model {fingerprint[:12]}, this run has {self.fingerprint[:12]}")
        if self.preloaded is not None:
            return self.preloaded
        if dtype not in self._loaded:
            started = time.perf_counter()
            self._loaded[dtype] = LoadedModel(self.info, DeviceChoice(self.device, dtype))
            self.counters["model_load_seconds"] = time.perf_counter() - started
        return self._loaded[dtype]


def spec_of(info: ModelInfo) -> PreprocessSpec:
    """Preprocessing settings without loading weights (for workers and fingerprints)."""
    from transformers import AutoImageProcessor

    return PreprocessSpec.from_hf(AutoImageProcessor.from_pretrained(info.path, local_files_only=True, backend="pil"))
