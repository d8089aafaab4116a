"""What the test suite shares, in one place: asset paths, running the job as a user would, generated datasets,
and comparing two runs' outputs. (Fixture training, synthetic renders and the benchmark live here too: tooling,
not product, so out of the `pipeline` package.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "tests" / "assets"
TINY_CLIP = ASSETS / "models" / "tiny-clip"
TINY_CHINESE_CLIP = ASSETS / "models" / "tiny-chinese-clip"
SAMPLE_IMAGES = ASSETS / "sample" / "images"
SAMPLE_TRUTH = ASSETS / "sample" / "truth.csv"
SAMPLE_LABELS = ASSETS / "sample" / "labels"
JOB = ROOT / "jobs" / "classify.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}  # tests never reach a hub; a stray download fails loudly
# Quiet, CPU, main-process decoding: what most tests want unless they test those.
QUIET = ["progress=false", "device=cpu", "encode.num_workers=0"]


def run(cmd: list[str], env: dict | None = None, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run a command as a user would, from the project root, offline; text output captured."""
    return subprocess.run(cmd, capture_output=True, text=True, cwd=kw.pop("cwd", ROOT),
                          env={**ENV, **(env or {})}, timeout=timeout, **kw)


def job_command(dataset: Path, out: Path, cache: Path, *extra: str, model: str = "tiny_clip") -> list[str]:
    return [sys.executable, str(JOB), f"dataset.path={dataset}", f"model={model}", f"hydra.run.dir={out}",
            f"cache_dir={cache}", "progress=false", "device=cpu", *extra]


def log_of(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr  # Hydra logs to stdout


def render_dataset(root: Path, count: int, seed: int = 7, max_side: int = 160) -> None:
    """`count` rendered coloured shapes (JPEG) in three sub-folders."""
    from . import synthetic

    rng = np.random.default_rng(seed)
    items = synthetic.sample_items(rng, count, min_side=64, max_side=max_side)
    for i, (item, img) in enumerate(zip(items, synthetic.render_items(rng, items))):
        sub = root / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        img.save(sub / f"{item.color}_{item.shape}_{i:04d}.jpg", quality=85)


def read_outputs(out: Path) -> dict:
    """The three result files, each parsed in full (a half-written one fails here)."""
    import pyarrow.parquet as pq

    return {
        "res.json": json.loads((out / "res.json").read_text(encoding="utf-8")),
        "predictions": pq.read_table(out / "predictions.parquet"),
        "errors": pq.read_table(out / "errors.parquet"),
    }


def output_differences(got: Path, want: Path) -> list[str]:
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
    return problems


def statuses(summary) -> dict[str, str]:
    return {r.name: r.status for r in summary.reports}


def write_shards(root: Path, images: list[Path], per_shard: int, truth: dict[str, str] | None = None,
                 name: str = "data-{:04d}.tar") -> list[Path]:
    """webdataset tar shards of `images` (each `key.<ext>`, with `key.cls` when `truth` names its label)."""
    import io
    import tarfile

    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for number, start in enumerate(range(0, len(images), per_shard)):
        path = root / name.format(number)
        with tarfile.open(path, "w") as tar:
            for image in images[start:start + per_shard]:
                stem = image.name.split(".", 1)[0]
                members = [(image.name, image.read_bytes())]
                if truth and image.name in truth:
                    members.append((f"{stem}.cls", truth[image.name].encode()))
                for member, data in members:
                    info = tarfile.TarInfo(member)
                    info.size, info.mtime = len(data), 1_700_000_000
                    tar.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards
