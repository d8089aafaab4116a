"""Where the towers run: torch, or an export run by ONNX Runtime or OpenVINO (CPU).

A `Towers` object turns model inputs into unnormalised embeddings, one tower at a time; `LoadedModel`
(pipeline/models.py) does the rest (tokenising, normalising, scoring) the same way whatever runs the towers.
Exports are made and cached by the `export_towers` stage (pipeline/export.py); this module only loads them.

`model.runtime=auto` (the default) is torch, on every device: it runs the reference's own code, and an export
costs time once per model. The exported runtimes are faster on a CPU and opt-in (README "Performance", CPU
runtimes); `make bench ARGS=--runtimes-only` re-measures them on another CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

log = logging.getLogger(__name__)

TORCH, ONNXRUNTIME, OPENVINO = "torch", "onnxruntime", "openvino"
RUNTIMES = (TORCH, ONNXRUNTIME, OPENVINO)
EXPORTED = (ONNXRUNTIME, OPENVINO)
EXPORTED_DTYPES = {ONNXRUNTIME: ("fp32", "int8"), OPENVINO: ("fp32", "bf16", "int8")}
_MODULES = {ONNXRUNTIME: "onnxruntime", OPENVINO: "openvino"}
_EXTRAS = {ONNXRUNTIME: "onnx", OPENVINO: "openvino"}
TOWERS_FILE = "towers.json"  # in an export: which runtime, its files, the input names, and the model's scores


def installed(runtime: str) -> bool:
    return runtime == TORCH or importlib.util.find_spec(_MODULES[runtime]) is not None


def resolve_runtime(requested: str, device_type: str, dtype: str, exportable: bool, family: str) -> str:
    """The runtime a run uses: `auto` resolved, and a named one checked against the device, dtype and model."""
    if requested not in (*RUNTIMES, "auto"):
        raise UserError(f"model.runtime={requested!r} is not one of auto, {', '.join(RUNTIMES)}")
    if requested in ("auto", TORCH):
        return TORCH
    if device_type != "cpu":
        raise UserError(f"model.runtime={requested} runs on the CPU; this run's device is {device_type}: use "
                        "model.runtime=torch (or auto) there")
    if dtype not in EXPORTED_DTYPES[requested]:
        wanted = " or ".join(EXPORTED_DTYPES[requested])
        raise UserError(f"model.runtime={requested} runs {wanted}, not {dtype}: set device.dtype to one of them, or "
                        "model.runtime=torch" + (" (or openvino, for bf16)" if dtype == "bf16" else ""))
    if not exportable:
        raise UserError(f"model.runtime={requested}: a {family} model's image inputs (variable patch counts and "
                        "their shapes) do not export to a fixed graph; use model.runtime=torch")
    if not installed(requested):
        raise UserError(f"model.runtime={requested} needs the {_MODULES[requested]} package: "
                        f"pip install -e '.[{_EXTRAS[requested]}]' (make install includes it)")
    return requested


def cpu_threads() -> int:
    """The threads a CPU runtime may use: as many as torch takes (its default: the cores this process has)."""
    return max(1, torch.get_num_threads())


class TorchTowers:
    """The HF model's own towers, on its device."""

    runtime = TORCH

    def __init__(self, model) -> None:
        self.model = model

    def image(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.get_image_features(**inputs).pooler_output

    def text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.get_text_features(**tokens).pooler_output


class ExportedTowers:
    """The towers of an export (ONNX Runtime or OpenVINO) on the CPU; inputs and outputs as torch tensors."""

    def __init__(self, runtime: str, folder: Path, files: dict, names: dict, threads: int, bf16: bool) -> None:
        self.runtime = runtime
        self.names = names  # tower -> its input names, in the exported order
        if runtime == ONNXRUNTIME:
            self._run = {tower: _onnxruntime_session(folder / file, threads) for tower, file in files.items()}
        else:
            self._run = {tower: _openvino_model(folder / file, threads, bf16) for tower, file in files.items()}

    @classmethod
    def load(cls, folder: Path, dtype: str, threads: int | None = None) -> "ExportedTowers":
        """`dtype`: the run's; bf16 runs an fp32 export in bf16 (OpenVINO converts it as it compiles)."""
        manifest = json.loads((folder / TOWERS_FILE).read_text(encoding="utf-8"))
        return cls(manifest["runtime"], folder, manifest["files"], manifest["inputs"], threads or cpu_threads(),
                   dtype == "bf16")

    def image(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._call("image", inputs)

    def text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._call("text", tokens)

    def _call(self, tower: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        missing = [name for name in self.names[tower] if name not in inputs]
        if missing:
            raise ValueError(f"the exported {tower} tower needs inputs {missing}")
        feeds = {name: np.ascontiguousarray(inputs[name].cpu().numpy()) for name in self.names[tower]}
        return torch.from_numpy(np.asarray(self._run[tower](feeds)))


def read_scores(folder: Path) -> tuple[float, float | None]:
    """(logit scale, logit bias) as the export recorded them from the fp32 model."""
    scores = json.loads((folder / TOWERS_FILE).read_text(encoding="utf-8"))["scores"]
    return float(scores["logit_scale"]), scores["logit_bias"]


def _onnxruntime_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)[0]


def _openvino_model(path: Path, threads: int, bf16: bool):
    import openvino as ov

    # f32 unless the run asks for bf16: on CPUs with AVX512-BF16 or AMX OpenVINO would otherwise run fp32 models in
    # bf16 on its own, which changes results. An int8 export runs its quantised layers in int8 either way.
    # LATENCY: one stream over all threads, as each batch is one synchronous call.
    with own_signal_stack():
        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
                                                              "INFERENCE_NUM_THREADS": threads,
                                                              "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    return lambda feeds: request.infer(feeds)[0]


class _SignalStack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextlib.contextmanager
def own_signal_stack():
    """Give the thread back its own alternate signal stack (usually none) after OpenVINO compiles a model.

    Compiling installs an alternate signal stack (11.5 kB) on the calling thread, and the memory goes when the
    model goes. The next signal delivered to that thread (SIGCHLD, when a decode worker or a child process exits)
    then finds no stack to run on, and the kernel kills the process with SIGSEGV: a long-lived process (a test
    session, a benchmark, a multirun) died so, in waitpid or poll, minutes after its OpenVINO models were freed.
    Python's handlers need no alternate stack."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        before = _SignalStack()
        known = libc.sigaltstack(None, ctypes.byref(before)) == 0
    except (OSError, AttributeError):  # no sigaltstack (Windows): nothing to keep
        known = False
    try:
        yield
    finally:
        if known:
            libc.sigaltstack(ctypes.byref(before), None)
