"""Peak memory stays flat as the dataset grows: records read a batch at a time, outputs streamed, nothing held whole.

Each on torch and on OpenVINO: `make reliability` discovers and classifies 100,000 then 1,000,000 small generated
images (about half an hour per runtime), `make test` 2,000 then 20,000.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from .conftest import FULL, job_command, run_job

# Stated bound for the whole job process (Python, torch, transformers, a tiny model, 2 workers) at any size.
PEAK_RSS_LIMIT_MB = 1000
# What 10x more images may add on top.
GROWTH_LIMIT_MB = 100
SIZES = (100_000, 1_000_000) if FULL else (2_000, 20_000)


def _make_images(root, count):
    rng = np.random.default_rng(count)
    colors = rng.integers(0, 256, (count, 3), dtype=np.uint8)
    for i in range(count):
        folder = root / f"{i // 1000:03d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True)
        Image.new("RGB", (16, 12), tuple(int(c) for c in colors[i])).save(folder / f"{i:06d}.png", optimize=False)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """The small and the large dataset, made once for every runtime."""
    root = tmp_path_factory.mktemp("memory")
    made = {}
    for count in SIZES:
        _make_images(root / f"data{count}", count)
        made[count] = root / f"data{count}"
    return made


def _peak_rss_mb(tmp_path, data, count, runtime):
    cmd = job_command(data, tmp_path / f"out{count}", tmp_path / f"cache{count}", "encode.batch_size=256",
                      "encode.chunk_size=4096", "encode.num_workers=2", "labels=colors", f"model.runtime={runtime}")
    proc = run_job(cmd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert pq.read_metadata(tmp_path / f"out{count}" / "predictions.parquet").num_rows == count
    return proc.peak_mb


# OpenVINO (an exported runtime: its own threads and allocator use) once grew with the number of batches, where
# torch did not: glibc's mmap threshold, see pipeline.devices.fix_mmap_threshold.
@pytest.mark.parametrize("runtime", ["torch", "openvino"])
def test_peak_memory_flat_with_dataset_size(tmp_path, datasets, runtime):
    small, large = SIZES
    peak_small = _peak_rss_mb(tmp_path, datasets[small], small, runtime)
    peak_large = _peak_rss_mb(tmp_path, datasets[large], large, runtime)
    print(f"{runtime} peak RSS: {peak_small:.0f} MB at {small} images, {peak_large:.0f} MB at {large} images")
    assert peak_large < PEAK_RSS_LIMIT_MB
    assert peak_large - peak_small < GROWTH_LIMIT_MB
