"""Choose the device and dtype, importing vendor plug-ins only when they are asked for."""

from __future__ import annotations

import ctypes
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


MMAP_THRESHOLD = 1 << 20  # bytes: larger blocks are mapped on their own, and given back whole when freed
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc's malloc.h)


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at 1 MB for this process and the workers it forks; False where there is no
    glibc (nothing to fix).

    glibc raises the threshold to the size of each large block freed, up to 32 MB; later blocks of that size then
    come from the heap arenas (one per thread), whose freed pages are not given back. A run frees a few MB per
    batch, from the runtimes' own threads, so peak RSS grew with the number of batches: at batch 256 over 2,000
    then 20,000 images, OpenVINO 0.71 -> 1.23 GB, ONNX Runtime 0.97 GB at 20,000, torch 0.54 -> 0.60 GB. With the
    threshold fixed (which also stops the raising): OpenVINO 0.67 -> 0.69, ONNX Runtime 0.59 -> 0.62, torch
    0.53 -> 0.55 GB.

    Only the exported runtimes get it (workflow.run). It costs torch a fifth of its speed: every batch's
    activations above 1 MB become fresh mappings the kernel zero-fills. A random CLIP B/16, 64 mixed JPEGs,
    alternating runs: encode_images 20.1 / 20.9 / 21.2 s with the threshold at 1 MB, 15.9 / 17.2 / 16.0 s without
    (18.4 / 19.2 / 18.4 at 32 MB), for a peak RSS of 1.25 GB against 1.33-1.44 GB. torch's growth without it
    (0.51 -> 0.60 GB) is stopped by release_free_memory between chunks instead (0.51 -> 0.53 GB)."""
    try:
        return ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    except (OSError, AttributeError):
        return False


def release_free_memory() -> None:
    """Give the heap arenas' free pages back to the OS (glibc's malloc_trim); nothing where there is no glibc.
    Called between chunks: the arenas' freed blocks otherwise stay resident and add up over a long run."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


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


def _accelerator(device_type: str):
    return getattr(torch, device_type)


def visible_gpus_unused() -> str | None:
    """A note when the machine has an NVIDIA GPU that this torch cannot use (a CPU build of torch in the
    environment): `auto` would otherwise run on the CPU without a word."""
    if torch.cuda.is_available():
        return None
    gpus = sorted(os.listdir("/proc/driver/nvidia/gpus")) if os.path.isdir("/proc/driver/nvidia/gpus") else []
    if not gpus:
        return None
    return (f"{len(gpus)} NVIDIA GPU(s) on this machine, but this torch ({torch.__version__}) cannot use them "
            "(a CPU build, or a CUDA mismatch): running on the CPU. Install a CUDA build of torch into this "
            "environment to use them")


def supports_bf16(device_type: str) -> bool:
    if device_type == "cpu":
        return True
    return bool(_accelerator(device_type).is_bf16_supported())


# CPU flags of a bf16 dot-product instruction: x86's AVX512-BF16 and AMX-BF16, Arm's BF16 (Linux names).
_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 in hardware. Without it torch emulates bf16 matmuls (5-70x slower than
    fp32 on AVX2); with it a ViT's matmuls run at twice the fp32 rate or more. False where the flags cannot be
    read (not Linux): such a CPU keeps fp32."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return bool(_NATIVE_BF16_FLAGS & set(line.split(":", 1)[1].split()))
    except OSError:
        return False
    return False


def default_dtype(device_type: str) -> str:
    """fp32 on a CPU (half precision runs slower there); on an accelerator bf16 where the chip has it (an H100
    or an Ascend 910B does; a V100 or a 910A does not), else fp16."""
    if device_type == "cpu":
        return "fp32"
    return "bf16" if supports_bf16(device_type) else "fp16"


def device_index(device_type: str, local_rank: int | None) -> int | None:
    """This rank's device among those it sees: LOCAL_RANK when each rank sees all of a node's devices, 0 when
    each sees only its own (CUDA_VISIBLE_DEVICES, ASCEND_RT_VISIBLE_DEVICES, SLURM --gpus-per-task)."""
    if local_rank is None or device_type == "cpu":
        return local_rank if device_type != "cpu" else None
    count = int(_accelerator(device_type).device_count())
    return local_rank % count if count else 0


def resolve(device_type: str, dtype: str, index: int | None = None, cpu_half: bool = False,
            local_rank: int | None = None) -> DeviceChoice:
    """Resolve `auto` and validate the pair; fp16/bf16 on a CPU fall back to fp32 with a warning unless
    `cpu_half` (precision checks) asks for them anyway. `index` names the device; else a torchrun rank's
    `local_rank` picks it among those visible."""
    if device_type not in DEVICE_TYPES:
        raise UserError(f"device.type={device_type!r} is not one of {', '.join(DEVICE_TYPES)}")
    if dtype not in DTYPES and dtype != "auto":
        raise UserError(f"device.dtype={dtype!r} is not one of auto, {', '.join(DTYPES)}")
    if device_type == "auto":
        device_type = "npu" if _npu_available() else "cuda" if torch.cuda.is_available() else "cpu"
        if device_type == "cpu" and (note := visible_gpus_unused()):
            log.warning("%s", note)
    if dtype == "int8" and device_type != "cpu":
        raise UserError(f"device.dtype=int8 (dynamic quantisation) runs on the CPU only, not on {device_type}; "
                        "use fp16 or bf16 there")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("device.type=cuda but torch sees no CUDA device (this torch build: "
                        f"{torch.__version__}); use device.type=cpu or auto")
    elif device_type == "npu":
        _require_npu()
    if dtype == "auto":
        dtype = default_dtype(device_type)
    if dtype == "bf16" and not supports_bf16(device_type):
        raise UserError(f"device.dtype=bf16: this {device_type} device has no bfloat16 support (e.g. a V100, an "
                        "Ascend 910A); use device.dtype=fp16 or auto")
    if device_type == "cpu" and dtype in ("fp16", "bf16") and not cpu_half:
        if dtype == "bf16" and cpu_has_native_bf16():  # AVX512-BF16 or AMX: see README, Performance
            log.info("device.dtype=bf16 on a CPU with bf16 instructions (a B/16: 2.0x fp32 per image on torch, "
                     "3.1x on OpenVINO)")
        else:
            # Measured on AVX2 CPUs: fp16/bf16 matmuls run 5-70x slower than fp32, and gain no memory that matters.
            log.warning("device.dtype=%s on this CPU (no %s instructions) is slower than fp32 and less precise; "
                        "using fp32", dtype, "bf16" if dtype == "bf16" else "fp16")
            dtype = "fp32"
    if index is None:
        index = device_index(device_type, local_rank)
    device = torch.device(device_type if index is None or device_type == "cpu" else f"{device_type}:{index}")
    return DeviceChoice(device, dtype)
