"""Concurrent runs on one cache, a parallel Hydra multirun, disk full and unwritable output folders."""

from __future__ import annotations

import errno
import subprocess

import pytest

from pipeline import workflow
from pipeline.engine import files as storage
from pipeline.engine.dag import entry_dirs
from pipeline.errors import UserError

from .conftest import STATS, compare_outputs, job_command, leftovers, render_dataset, run_job

ARGS = ("encode.batch_size=4", "encode.chunk_size=16", "encode.num_workers=1", "labels=shapes")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("conc") / "images"
    render_dataset(root, 120, seed=11)
    return root


def test_two_runs_at_once_on_one_cache(dataset, tmp_path):
    ref = run_job(job_command(dataset, tmp_path / "ref", tmp_path / "ref_cache", *ARGS))
    assert ref.returncode == 0, ref.stderr
    procs = [subprocess.Popen(job_command(dataset, tmp_path / f"out{i}", tmp_path / "shared", *ARGS),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    for i in range(2):
        assert compare_outputs(tmp_path / f"out{i}", tmp_path / "ref") == []
    # One cache entry per stage fingerprint: nothing was computed twice into two entries, nothing is corrupt.
    entries = entry_dirs(tmp_path / "shared" / "encode_images")
    assert len(entries) == 1 and leftovers(tmp_path / "shared") == []


def test_parallel_multirun_with_joblib_launcher(dataset, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc = run_job(job_command(dataset, tmp_path / "unused", tmp_path / "cache", "encode.num_workers=0",
                               "encode.batch_size=4", "encode.chunk_size=16")[:2] +
                   ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"dataset.path={dataset}",
                    "model=tiny_clip",
                    f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'sweep'}", "progress=false",
                    "device=cpu", "encode.num_workers=0", "encode.batch_size=4", "encode.chunk_size=16",
                    "labels=shapes,colors,shapes"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert compare_outputs(tmp_path / "sweep" / "0", tmp_path / "sweep" / "2") == []


def test_disk_full_gives_clear_error_and_keeps_checkpoints(compose, monkeypatch):
    first = workflow.run(compose("encode.chunk_size=8", "encode.batch_size=4"))
    from pipeline.engine.chunks import ChunkPool

    real_put = ChunkPool.put
    calls = []

    def full_after_three(self, key, data, final=True):
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.directory / key))
        calls.append(key)
        return real_put(self, key, data, final)

    monkeypatch.setattr(ChunkPool, "put", full_after_three)
    with pytest.raises(UserError, match="No space left on device.*resumes") as info:
        workflow.run(compose("encode.chunk_size=8", "encode.batch_size=4", "preprocess.max_pixels=99999999",
                             out="out2"))
    STATS["faults injected"] += 1
    assert "CACHE=" in str(info.value)
    monkeypatch.setattr(ChunkPool, "put", real_put)
    resumed = workflow.run(compose("encode.chunk_size=8", "encode.batch_size=4", "preprocess.max_pixels=99999999",
                                   out="out2"))
    assert {r.name: r.status for r in resumed.reports}["encode_images"] == "resumed"
    assert compare_outputs(resumed.out_dir, first.out_dir) == []


def test_unwritable_output_folder_fails_before_work(compose, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot write to the run directory"):
        workflow.run(compose(f"output_dir={blocker / 'out'}"))
    with pytest.raises(UserError, match="cannot write to cache_dir"):
        workflow.run(compose(f"cache_dir={blocker / 'cache'}"))


def test_atomic_writer_never_leaves_partial_file(tmp_path):
    target = tmp_path / "result.json"
    storage.write_json(target, {"old": 1})
    with pytest.raises(RuntimeError):
        with storage.atomic_open(target, "w") as fh:
            fh.write('{"new": ')
            raise RuntimeError("crash mid-write")
    assert storage.read_json(target) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
