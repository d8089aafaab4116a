"""Benchmark primitives for `make bench` (kept out of the `pipeline` package): real-size random-weight models,
mixed-size JPEGs, timers, the peak-matmul probe and FLOP counting.

Everything that `make bench` prints as a ratio is measured in the same process, on the same images and labels,
as medians over repeats, so that machine noise cancels as far as it can.
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from . import synthetic
from pipeline.imaging import PreprocessSpec, load_and_preprocess

# Architectures of real models, from their published config.json files (no download).
REAL_MODELS = {
    "clip-vit-large-patch14": {
        "family": "clip",
        "config": dict(
            text_config=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, max_position_embeddings=77, projection_dim=768),
            vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                               num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768),
            projection_dim=768),
        "processor": dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
    },
    "chinese-clip-vit-base-patch16": {
        "family": "chinese_clip",
        "config": dict(
            text_config=dict(vocab_size=21128, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, max_position_embeddings=512, type_vocab_size=2),
            vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, image_size=224, patch_size=16),
            projection_dim=512),
        "processor": dict(size={"height": 224, "width": 224}, do_center_crop=False),
    },
    "siglip-base-patch16-224": {
        "family": "siglip",
        "config": dict(
            text_config=dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, max_position_embeddings=64),
            vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, image_size=224, patch_size=16)),
        "processor": dict(size={"height": 224, "width": 224}),
    },
}
FAMILY_CLASSES = {"clip": ("CLIPConfig", "CLIPModel", "CLIPImageProcessorPil"),
                  "chinese_clip": ("ChineseCLIPConfig", "ChineseCLIPModel", "ChineseCLIPImageProcessorPil"),
                  "siglip": ("SiglipConfig", "SiglipModel", "SiglipImageProcessorPil")}
MIXED_SIZES = [(320, 240), (640, 480), (500, 375), (1024, 768), (1600, 1200), (2048, 1536), (4000, 3000)]


def build_real_size_model(name: str, out: Path, tokenizer_from: Path) -> Path:
    """Save a randomly initialised model of the real architecture, in the real format, with a tokenizer."""
    import transformers

    spec = REAL_MODELS[name]
    config_cls, model_cls, processor_cls = (getattr(transformers, n) for n in FAMILY_CLASSES[spec["family"]])
    torch.manual_seed(0)
    model, processor = model_cls(config_cls(**spec["config"])), processor_cls(**spec["processor"])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    # The tiny fixture tokenizer's ids all fall inside the real vocabulary; prompts are ~10 tokens either way.
    for item in tokenizer_from.iterdir():
        if item.name not in ("config.json", "model.safetensors", "preprocessor_config.json",
                             "processor_config.json"):
            shutil.copy(item, out / item.name)
    return out


def make_mixed_jpegs(root: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    items = synthetic.sample_items(rng, count, sizes=MIXED_SIZES)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (item, img) in enumerate(zip(items, synthetic.render_items(rng, items))):
        path = root / f"{i:04d}_{item.width}x{item.height}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


def synchronize(device: torch.device | str = "cpu") -> None:
    """Wait for queued accelerator work, so that a timer measures the work and not its launch."""
    kind = torch.device(device).type
    if kind != "cpu" and hasattr(torch, kind):
        getattr(torch, kind).synchronize()


def median_time(fn: Callable[[], object], repeats: int, device: torch.device | str = "cpu") -> float:
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# GEMM shapes for the peak probe: square ones, and those of a ViT MLP on a batch of 8 (B/16: 8 x 197 tokens, width
# 768; L/14: 8 x 257 tokens, width 1024). The peak is the best median over all of them.
PEAK_SHAPES = [(2048, 2048, 2048), (3072, 3072, 3072), (1576, 768, 3072), (2056, 1024, 4096)]
ACCELERATOR_SHAPES = [(8192, 8192, 8192)]  # a GPU's peak needs large GEMMs (3072^3 stays below an H200's)
# Dense half-precision peaks from the datasheets, to set the measured peak beside (TFLOP/s).
DATASHEET_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


def matmul_gflops(m: int, k: int, n: int, seconds: float = 1.0, rounds: int = 5,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Median rate of (m x k) @ (k x n) over `rounds` rounds of about `seconds` each (this process's
    threads). Long rounds, not single calls: a single call is at the mercy of a noisy neighbour."""
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    one = median_time(lambda: torch.mm(a, b, out=out), 3, device)
    calls = max(1, round(seconds / max(one, 1e-6)))

    def run():
        for _ in range(calls):
            torch.mm(a, b, out=out)

    return 2 * m * k * n * calls / median_time(run, rounds, device) / 1e9


def peak_matmul_gflops(seconds: float = 1.0, rounds: int = 5, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> float:
    shapes = PEAK_SHAPES + (ACCELERATOR_SHAPES if torch.device(device).type != "cpu" else [])
    return max(matmul_gflops(*shape, seconds=seconds, rounds=rounds, device=device, dtype=dtype)
               for shape in shapes)


def datasheet_tflops(device: torch.device | str) -> float | None:
    """The device's dense half-precision peak from its datasheet, when it is one we know."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DATASHEET_TFLOPS.items() if key in name), None)


def cpu_copy(model):
    """The same architecture on the CPU (random weights: FLOPs do not depend on them), to count the FLOPs of a
    model that lives on an accelerator."""
    return type(model)(model.config).eval()


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call, counted by torch's FlopCounterMode. Count on the CPU: on an NPU fused kernels
    (npu_fusion_attention) escape the counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        fn()
    return float(counter.get_total_flops())


def vision_ceiling(model, pixels: torch.Tensor, batch_size: int, repeats: int) -> float:
    """Images/s of the vision tower alone on preprocessed tensors already on its device in its dtype
    (no decoding, no copies, no writing)."""
    param = next(model.parameters())
    batches = [b.to(param.device, param.dtype) for b in torch.split(pixels, batch_size)]

    def run():
        with torch.inference_mode():
            for batch in batches:
                model.get_image_features(pixel_values=batch)

    with torch.inference_mode():
        model.get_image_features(pixel_values=batches[0])  # warm-up
    return len(pixels) / median_time(run, repeats, param.device)


def _plain_pillow(args: tuple[str, PreprocessSpec]) -> int:
    """The raw rate to beat: open, convert, resize, crop, normalise, nothing else."""
    path, spec = args
    img = Image.open(path).convert("RGB")
    w, h = spec.resize_target(*img.size)
    arr = np.asarray(img.resize((w, h), resample=spec.resample), dtype=np.float32)
    if spec.crop_hw:
        top, left = (h - spec.crop_hw[0]) // 2, (w - spec.crop_hw[1]) // 2
        arr = arr[top:top + spec.crop_hw[0], left:left + spec.crop_hw[1]]
    arr = (arr / 255.0 - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return arr.shape[0]


def plain_pillow_rate(paths: list[Path], spec: PreprocessSpec, processes: int, repeats: int) -> float:
    with mp.get_context("fork").Pool(processes) as pool:
        work = [(str(p), spec) for p in paths]
        pool.map(_plain_pillow, work[:processes])  # start-up outside the timing
        return len(paths) / median_time(lambda: pool.map(_plain_pillow, work, chunksize=1), repeats)


def decode_ms(path: Path, spec: PreprocessSpec, repeats: int = 5) -> dict[str, float]:
    """One core, one image: our full decode, our draft decode, and the HF processor (after a PIL decode)."""
    from transformers import CLIPImageProcessorPil

    hf = CLIPImageProcessorPil(size={"shortest_edge": spec.shortest_edge or spec.resize_hw[0]},
                               crop_size={"height": spec.crop_hw[0], "width": spec.crop_hw[1]}
                               if spec.crop_hw else None, do_center_crop=spec.crop_hw is not None)
    ours = median_time(lambda: load_and_preprocess(path.read_bytes(), spec), repeats)
    draft = median_time(lambda: load_and_preprocess(path.read_bytes(), spec, draft=True), repeats)
    hf_time = median_time(lambda: hf(images=Image.open(path).convert("RGB"), return_tensors="np"), repeats)
    return {"ours": ours * 1e3, "ours_draft": draft * 1e3, "hf_processor": hf_time * 1e3}


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
