"""Choose the device and dtype, importing vendor plug-ins only when they are asked for."""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass

import torch

from .errors import UserError

log = logging.getLogger(__name__)

# The dtype of weights and activations; "int8" quantises the Linear weights of an fp32 model after loading
# (dynamic quantisation, CPU only): about 2.8x the fp32 speed of a ViT-B/16 tower on AVX-512, see `make bench`.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32}
DEVICE_TYPES = ("auto", "cpu", "cuda", "npu")


@dataclass(frozen=True)
class DeviceChoice:
    device: torch.device
    dtype_name: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def int8(self) -> bool:
        return self.dtype_name == "int8"

    @property
    def is_accelerator(self) -> bool:
        return self.device.type != "cpu"


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, which containers and schedulers narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _npu_available() -> bool:
    try:
        importlib.import_module("torch_npu")
    except ImportError:
        return False
    return bool(getattr(torch, "npu", None) and torch.npu.is_available())


def _require_npu() -> None:
    try:
        importlib.import_module("torch_npu")
    except ImportError as exc:
        raise UserError("device.type=npu needs torch_npu and the Ascend CANN toolkit: install the vendor's "
                        "CANN, then `pip install -e '.[npu]'`; or choose device.type=cpu|cuda|auto "
                        f"(import failed: {exc})") from None
    if not torch.npu.is_available():
        raise UserError("device.type=npu: torch_npu imports but no NPU is visible (check ASCEND_RT_VISIBLE_DEVICES "
                        "and the driver); choose another device.type")


def resolve(device_type: str, dtype: str, index: int | None = None, cpu_half: bool = False) -> DeviceChoice:
    """Resolve `auto` and validate the pair; fp16/bf16 on a CPU fall back to fp32 with a warning unless
    `cpu_half` (precision checks) asks for them anyway."""
    if device_type not in DEVICE_TYPES:
        raise UserError(f"device.type={device_type!r} is not one of {', '.join(DEVICE_TYPES)}")
    if dtype not in DTYPES:
        raise UserError(f"device.dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    if device_type == "auto":
        device_type = "npu" if _npu_available() else "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "int8" and device_type != "cpu":
        raise UserError(f"device.dtype=int8 (dynamic quantisation) runs on the CPU only, not on {device_type}; "
                        "use fp16 or bf16 there")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("device.type=cuda but torch sees no CUDA device (this torch build: "
                        f"{torch.__version__}); use device.type=cpu or auto")
    elif device_type == "npu":
        _require_npu()
    if device_type == "cpu" and dtype in ("fp16", "bf16") and not cpu_half:
        # Measured on AVX2 CPUs: fp16/bf16 matmuls run 5-70x slower than fp32, and gain no memory that matters.
        log.warning("device.dtype=%s on the CPU is slower than fp32 and less precise; using fp32", dtype)
        dtype = "fp32"
    device = torch.device(device_type if index is None or device_type == "cpu" else f"{device_type}:{index}")
    return DeviceChoice(device, dtype)
