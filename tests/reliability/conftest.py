"""Shared pieces of the reliability suite: a generated dataset, a subprocess runner, and the summary table.

`make test` runs a fast subset (a few kill points); `make reliability` runs everything (`-m ""` plus
RELIABILITY_FULL=1: 24 kill points, 100,000 images for the memory test) and prints the table.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
FULL = os.environ.get("RELIABILITY_FULL") == "1"
STATS = {"faults injected": 0, "inputs tried": 0, "runs compared": 0, "mismatches": 0, "peak RSS MB": 0.0}


def render_dataset(root: Path, count: int, seed: int = 7, max_side: int = 160) -> None:
    from pipeline import synthetic

    rng = np.random.default_rng(seed)
    items = synthetic.sample_items(rng, count, min_side=64, max_side=max_side)
    for i, (item, img) in enumerate(zip(items, synthetic.render_items(rng, items))):
        sub = root / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        img.save(sub / f"{item.color}_{item.shape}_{i:04d}.jpg", quality=85)


def job_command(dataset: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / "classify.py"), f"dataset.path={dataset}", f"hydra.run.dir={out}",
            f"cache_dir={cache}", "progress=false", "device=cpu", *extra]


def run_job(cmd: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=900, **kw)
    record_peak_rss()
    return proc


def record_peak_rss() -> float:
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    STATS["peak RSS MB"] = max(STATS["peak RSS MB"], peak_mb)
    return peak_mb


def read_outputs(out: Path) -> dict:
    """The three result files, each parsed in full (a half-written one fails here)."""
    import pyarrow.parquet as pq

    return {
        "res.json": json.loads((out / "res.json").read_text(encoding="utf-8")),
        "predictions": pq.read_table(out / "predictions.parquet"),
        "errors": pq.read_table(out / "errors.parquet"),
    }


def compare_outputs(got: Path, want: Path) -> list[str]:
    """Differences between two runs' outputs: content, row order and probabilities bit for bit."""
    a, b = read_outputs(got), read_outputs(want)
    problems = []
    if (got / "res.json").read_bytes() != (want / "res.json").read_bytes():
        problems.append("res.json differs")
    for name in ("predictions", "errors"):
        if not a[name].equals(b[name]):
            problems.append(f"{name}.parquet differs")
    paths = a["predictions"].column("path").to_pylist()
    if len(paths) != len(set(paths)):
        problems.append("duplicate rows")
    STATS["runs compared"] += 1
    STATS["mismatches"] += bool(problems)
    return problems


@pytest.fixture(scope="session")
def stats():
    return STATS


def pytest_terminal_summary(terminalreporter):
    if not any(STATS[k] for k in ("faults injected", "inputs tried", "runs compared")):
        return
    terminalreporter.write_sep("=", "reliability summary")
    for key, value in STATS.items():
        terminalreporter.write_line(f"  {key:<16} {value:>10.0f}" if isinstance(value, float)
                                    else f"  {key:<16} {value:>10}")
    path = ROOT / "outputs" / "reliability.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({**STATS, "full": FULL, "time": time.time()}, indent=1))
