"""kill -9 at seeded moments, then the same command again: outputs identical to an uninterrupted run.

Two kinds of kill: injected at named points where a crash is likeliest to leave something half done
(PIPELINE_FAULT, see pipeline/faults.py), and sent from outside after a seeded random delay.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time

import pytest

from .conftest import FULL, STATS, compare_outputs, job_command, read_outputs, render_dataset, run_job

ARGS = ("encode.batch_size=4", "encode.chunk_size=16", "encode.num_workers=1", "labels=pairs")
INJECTED = ["stage.before:2", "stage.before:4", "stage.before_seal:1", "stage.before_seal:2",
            "stage.before_seal:3", "chunk.before_rename:1", "chunk.before_rename:7", "chunk.after_write:3",
            "chunk.after_write:14", "classify.row_group:2", "classify.row_group:9", "publish.file:1",
            "publish.file:2"]
FAST_INJECTED = ["chunk.before_rename:7", "classify.row_group:2", "publish.file:1"]
RANDOM_SEEDS = list(range(11)) if FULL else [0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill") / "images"
    render_dataset(root, 240)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    base = tmp_path_factory.mktemp("reference")
    started = time.perf_counter()
    proc = run_job(job_command(dataset, base / "out", base / "cache", *ARGS))
    assert proc.returncode == 0, proc.stderr
    return base / "out", time.perf_counter() - started


def _check_visible_files_whole(out):
    # Whatever a kill left under the final names must parse completely (it may be absent).
    for name in ("res.json", "predictions.parquet", "errors.parquet"):
        path = out / name
        if path.exists():
            if name.endswith(".json"):
                json.loads(path.read_text(encoding="utf-8"))
            else:
                import pyarrow.parquet as pq

                pq.read_table(path)


def _rerun_and_compare(dataset, base, reference_out):
    _check_visible_files_whole(base / "out")
    proc = run_job(job_command(dataset, base / "out", base / "cache", *ARGS))
    assert proc.returncode == 0, proc.stderr
    assert compare_outputs(base / "out", reference_out) == []
    outputs = read_outputs(base / "out")
    assert len(outputs["res.json"]) + outputs["errors"].num_rows == 241


@pytest.mark.parametrize("fault", INJECTED if FULL else FAST_INJECTED)
def test_injected_kill_then_rerun_is_identical(dataset, reference, tmp_path, fault):
    proc = run_job(job_command(dataset, tmp_path / "out", tmp_path / "cache", *ARGS),
                   env={"PIPELINE_FAULT": fault})
    assert proc.returncode == -signal.SIGKILL, f"fault {fault} never fired: {proc.stderr[-2000:]}"
    STATS["faults injected"] += 1
    _rerun_and_compare(dataset, tmp_path, reference[0])


@pytest.mark.parametrize("seed", RANDOM_SEEDS)
def test_random_time_kill_then_rerun_is_identical(dataset, reference, tmp_path, seed):
    delay = random.Random(seed).uniform(0.5, reference[1])
    proc = subprocess.Popen(job_command(dataset, tmp_path / "out", tmp_path / "cache", *ARGS),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    STATS["faults injected"] += 1
    _rerun_and_compare(dataset, tmp_path, reference[0])


def test_repeated_kills_still_converge(dataset, reference, tmp_path):
    # Killed again and again while resuming: every attempt keeps the chunks it finished.
    for n in range(1, 4):
        proc = run_job(job_command(dataset, tmp_path / "out", tmp_path / "cache", *ARGS),
                       env={"PIPELINE_FAULT": f"chunk.after_write:{n * 2}"})
        assert proc.returncode == -signal.SIGKILL
        STATS["faults injected"] += 1
    _rerun_and_compare(dataset, tmp_path, reference[0])
