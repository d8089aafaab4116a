"""Shards as Ray tasks (hydra/launcher=ray, through hydra-ray-launcher): a local Ray with two workers runs two
shard tasks, each killed in the middle of encoding and run again by Ray; the merge then equals a one-process
run, and no chunk a killed task had finished is encoded again."""

from __future__ import annotations

import json
import re
import sys

import pandas as pd
import pytest

from tests.helpers import JOB, SAMPLE_IMAGES, log_of, run

pytestmark = pytest.mark.slow
COMMON = ["model=tiny_clip", "labels=shapes", f"dataset.path={SAMPLE_IMAGES}", "encode.chunk_size=4",
          "progress=false", "report=false"]


def _outputs(run_dir):
    predictions = pd.read_parquet(run_dir / "predictions.parquet")
    return json.loads((run_dir / "res.json").read_text(encoding="utf-8")), predictions


def test_shard_tasks_on_ray_survive_a_killed_worker_and_merge_to_the_one_process_result(tmp_path):
    reference = run([sys.executable, str(JOB), *COMMON, f"cache_dir={tmp_path / 'ref-cache'}",
                     f"hydra.run.dir={tmp_path / 'ref'}"])
    assert reference.returncode == 0, log_of(reference)[-3000:]

    # Every task's worker is killed (SIGKILL, as a lost node) after its fourth chunk; Ray runs the task again,
    # and the retry, with 1 or 2 chunks left (the shards have 6 and 5), finishes before a fourth.
    sweep = run([sys.executable, str(JOB), "-m", "hydra/launcher=ray", "hydra.launcher.ray.init.num_cpus=2",
                 "shard.index=range(0,2)", "shard.count=2", "dataset.listing=ray-test", *COMMON,
                 f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                env={"PIPELINE_FAULT": "chunk.after_write:4"})
    log = log_of(sweep)
    assert sweep.returncode == 0, log[-3000:]
    assert "Task _run_job failed. There are 3 retries remaining" in log, log[-3000:]  # Ray folds repeated reports
    for shard in (0, 1):
        resumed = re.search(rf"resuming shard {shard}/2: 4 of (\d+) chunks already done", log)
        assert resumed, log[-3000:]
        total = int(resumed.group(1))
        # the retry encodes only the chunks the killed task had not finished
        assert re.search(rf"encoded \d+ images in {total - 4} chunks; 4 chunks reused", log), log[-3000:]
        assert f"shard {shard}/2 done" in log

    merge = run([sys.executable, str(JOB), *COMMON, "dataset.listing=ray-test", f"cache_dir={tmp_path / 'cache'}",
                 f"hydra.run.dir={tmp_path / 'merged'}"])
    assert merge.returncode == 0 and "encoded 0 images" in log_of(merge), log_of(merge)[-3000:]
    res, predictions = _outputs(tmp_path / "merged")
    ref_res, ref_predictions = _outputs(tmp_path / "ref")
    assert res == ref_res and len(res) == 38
    assert predictions["path"].tolist() == ref_predictions["path"].tolist()
    assert predictions["label"].tolist() == ref_predictions["label"].tolist()
    for ours, theirs in zip(predictions["probs"], ref_predictions["probs"]):
        assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-5


def test_a_user_error_in_a_ray_task_is_not_retried(tmp_path):
    """A bad input fails the task once, with its message and exit status 2; only a dead worker is run again."""
    sweep = run([sys.executable, str(JOB), "-m", "hydra/launcher=ray", "hydra.launcher.ray.init.num_cpus=2",
                 "shard.index=range(0,2)", "shard.count=2", "model=tiny_clip", "labels=shapes",
                 f"dataset.path={tmp_path / 'missing'}", f"cache_dir={tmp_path / 'cache'}",
                 f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    log = log_of(sweep)
    assert sweep.returncode == 2 and "dataset not found" in log, log[-3000:]
    assert "retries remaining" not in log, log[-3000:]


def test_the_cluster_command_composes():
    """The README's Ray-cluster command cannot run here (no cluster); its launcher config and overrides compose,
    every key set without a `+`."""
    from pipeline.config import compose
    from tests.integration.test_readme import blocks

    command = next(block for block in blocks("text") if "hydra/launcher=ray" in block)
    overrides = [word.strip("'") for word in command.replace("\\\n", " ").split("#")[0].split()
                 if "=" in word and not word.startswith("-")]
    overrides = [o for o in overrides if o.split("=")[0] in ("hydra/launcher", "shard.index", "shard.count") or
                 o.startswith(("hydra.launcher.", "dataset.", "model.", "labels=", "cache_dir=", "device="))]
    cfg = compose([o if o != "shard.index=range(0,256)" else "shard.index=3" for o in overrides],
                  return_hydra_config=True)
    ray = cfg.hydra.launcher.ray
    assert cfg.hydra.launcher._target_ == "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
    assert ray.init.address == "auto" and ray.remote.num_gpus == 1 and ray.remote.max_retries == 3
    assert cfg.shard.count == 256 and cfg.dataset.path == "s3://bucket/images" and len(cfg.labels.list) == 1000
