"""Shards as Ray tasks (hydra/launcher=ray, through hydra-ray-launcher) over a cache and outputs on S3 (moto's
server): a local Ray with two workers runs two shard tasks, each killed in the middle of encoding and run again by
Ray; the merge then equals a one-process run, and no chunk a killed task had finished is encoded again. Nothing
is shared between the processes but the bucket: each has its own temporary folder and working folder."""

from __future__ import annotations

import io
import json
import re
import sys

import pandas as pd
import pytest

from tests.helpers import JOB, SAMPLE_IMAGES, log_of, run
from tests.helpers.servers import s3_server

pytestmark = pytest.mark.slow
COMMON = ["model=tiny_clip", "labels=shapes", f"dataset.path={SAMPLE_IMAGES}", "encode.chunk_size=4",
          "progress=false", "report=false"]


def _outputs(read):
    predictions = pd.read_parquet(io.BytesIO(read("predictions.parquet")))
    return json.loads(read("res.json")), predictions


def test_shard_tasks_on_ray_over_a_bucket_survive_a_killed_worker_and_merge_to_the_one_process_result(tmp_path):
    reference = run([sys.executable, str(JOB), *COMMON, f"cache_dir={tmp_path / 'ref-cache'}",
                     f"hydra.run.dir={tmp_path / 'ref'}"])
    assert reference.returncode == 0, log_of(reference)[-3000:]
    with s3_server() as s3:
        fs = s3.filesystem()
        fs.mkdir("jobs")
        bucket = ["cache_dir=s3://jobs/cache", "dataset.listing=ray-test"]
        merge_tmp = tmp_path / "tmp-merge"
        merge_tmp.mkdir()
        # Every task's worker is killed (SIGKILL, as a lost node) after its fourth chunk; Ray runs the task again,
        # and the retry, with 1 or 2 chunks left (the shards have 6 and 5), finishes before a fourth.
        sweep = run([sys.executable, str(JOB), "-m", "hydra/launcher=ray", "hydra.launcher.ray.init.num_cpus=2",
                     "shard.index=range(0,2)", "shard.count=2", *COMMON, *bucket,
                     f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                    env={**s3.env, "PIPELINE_FAULT": "chunk.after_write:4"})
        log = log_of(sweep)
        assert sweep.returncode == 0, log[-3000:]
        assert "Task _run_job failed. There are 3 retries remaining" in log, log[-3000:]  # Ray folds repeats
        for shard in (0, 1):
            resumed = re.search(rf"resuming shard {shard}/2: 4 of (\d+) chunks already done", log)
            assert resumed, log[-3000:]
            total = int(resumed.group(1))
            # the retry encodes only the chunks the killed task had not finished
            assert re.search(rf"encoded \d+ images in {total - 4} chunks; 4 chunks reused", log), log[-3000:]
            assert f"shard {shard}/2 done" in log

        merge = run([sys.executable, str(JOB), *COMMON, *bucket, "output_dir=s3://jobs/runs/merged",
                     f"hydra.run.dir={tmp_path / 'merged'}"], env={**s3.env, "TMPDIR": str(merge_tmp)})
        assert merge.returncode == 0 and "encoded 0 images" in log_of(merge), log_of(merge)[-3000:]
        assert "stage discover        reused" in log_of(merge)  # the listing the first task made, from the bucket
        res, predictions = _outputs(lambda name: fs.cat_file(f"jobs/runs/merged/{name}"))
        stored = fs.find("jobs/cache")
        chunks = [key for key in stored if key.endswith(".chunk")]
        entries = {key.split("/")[2] for key in stored if key.endswith("/_manifest.json")}
    ref_res, ref_predictions = _outputs(lambda name: (tmp_path / "ref" / name).read_bytes())
    assert res == ref_res and len(res) == 38
    assert predictions["path"].tolist() == ref_predictions["path"].tolist()
    assert predictions["label"].tolist() == ref_predictions["label"].tolist()
    for ours, theirs in zip(predictions["probs"], ref_predictions["probs"]):
        assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-5
    assert len(chunks) == 11 and {"discover", "encode_images", "classify"} <= entries
    # the local working copies of the cache were temporary (the merge's in its own TMPDIR) and are gone
    assert not list(merge_tmp.glob("pipeline-*"))
    assert not [p for run_dir in ("sweep", "merged") for p in (tmp_path / run_dir).glob("**/pool")]


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
