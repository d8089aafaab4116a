"""Data parallel runs give exactly the one-process outputs: torchrun ranks (gloo), a dead rank, shard + merge."""

import os
import re
import signal
import subprocess
import sys

import pytest

from pipeline.config import compose
from tests.helpers import ROOT, output_differences, render_dataset

ARGS = ["progress=false", "device=cpu", "encode.batch_size=4", "encode.chunk_size=8", "encode.num_workers=0",
        "labels=pairs", "model=tiny_clip"]
pytestmark = pytest.mark.slow
# Thread count changes floating-point reduction order; torchrun uses 1 thread per rank, so the reference does too.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _job(dataset, out, cache, *extra, torchrun=0):
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    cmd = launcher + [str(ROOT / "jobs" / "classify.py"), f"dataset.path={dataset}", f"hydra.run.dir={out}",
                      f"cache_dir={cache}", *ARGS, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    render_dataset(base / "images", 70, seed=3)
    (base / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    ref = _job(base / "images", base / "ref", base / "ref-cache")
    assert ref.returncode == 0, ref.stderr
    return base


def test_two_ranks_equal_one_process(setup, tmp_path):
    proc = _job(setup / "images", tmp_path / "out", tmp_path / "cache", torchrun=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert output_differences(tmp_path / "out", setup / "ref") == []
    log = proc.stdout + proc.stderr  # Hydra logs to stdout
    assert "shard 1/2 done" in log and "encode_images resumed" in log


def test_dead_rank_then_rerun_skips_finished_chunks(setup, tmp_path):
    env_fault = {**ENV, "PIPELINE_FAULT": "chunk.after_write:2@1"}  # rank 1 dies after its second chunk
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "jobs" / "classify.py"), f"dataset.path={setup / 'images'}",
                           f"hydra.run.dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}", *ARGS],
                          capture_output=True, text=True, env=env_fault, timeout=600, cwd=ROOT)
    assert proc.returncode != 0
    assert "Signals.SIGKILL" in proc.stderr or str(-signal.SIGKILL) in proc.stderr or "exitcode" in proc.stderr
    rerun = _job(setup / "images", tmp_path / "out", tmp_path / "cache", torchrun=2)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert re.search(r"resuming shard 1/2: 2 of \d+ chunks already done", rerun.stdout + rerun.stderr)
    assert output_differences(tmp_path / "out", setup / "ref") == []


def test_independent_shards_then_merge(setup, tmp_path):
    for index in (1, 0, 2):  # any order, as a scheduler would run them
        proc = _job(setup / "images", tmp_path / f"shard{index}", tmp_path / "cache", f"shard.index={index}",
                    "shard.count=3")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"shard {index}/3 done" in proc.stdout + proc.stderr
        assert not (tmp_path / f"shard{index}" / "res.json").exists()
    merge = _job(setup / "images", tmp_path / "out", tmp_path / "cache")
    assert merge.returncode == 0
    done = re.search(r"resuming image encoding: (\d+) of (\d+) chunks already done", merge.stdout + merge.stderr)
    assert done and done.group(1) == done.group(2) and "encoded 0 images" in merge.stdout + merge.stderr
    assert output_differences(tmp_path / "out", setup / "ref") == []


def test_launcher_configs_compose():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    slurm = compose(["hydra/launcher=slurm", "shard.count=64"], return_hydra_config=True)
    local = compose(["hydra/launcher=local_parallel"], return_hydra_config=True)
    assert slurm.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert slurm.hydra.launcher.gpus_per_node == 1 and slurm.hydra.launcher.array_parallelism == 256
    assert slurm.shard.count == 64
    assert local.hydra.launcher._target_.endswith("joblib_launcher.JoblibLauncher")
