"""The cache and the outputs on object storage (CACHE=s3://..., OUT=s3://...), on moto's S3 server: two runs racing
on one empty cache compute each entry once; a run killed between uploading an entry and sealing it leaves
nothing a later run takes for finished work; a rerun with a new label set reads each chunk once; and the requests
a run makes are counted in its log."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import pandas as pd
import pytest

from tests.helpers import ENV, JOB, SAMPLE_IMAGES, log_of, run
from tests.helpers.servers import s3_server

pytestmark = pytest.mark.slow
COMMON = ["model=tiny_clip", f"dataset.path={SAMPLE_IMAGES}", "encode.chunk_size=4", "progress=false",
          "report=false", "cache_dir=s3://jobs/cache"]
CHUNKS = 11  # the 38 sample images in chunks of about 4


def _command(tmp_path, name: str, labels: str = "shapes") -> list[str]:
    return [sys.executable, str(JOB), *COMMON, f"labels={labels}", f"output_dir=s3://jobs/runs/{name}",
            f"hydra.run.dir={tmp_path / name}"]


def _requests(log: str) -> dict[str, int]:
    line = re.search(r"cache: \d+ requests to s3://jobs/cache \((.*)\)", log).group(1)
    return {kind: int(n) for n, kind in (part.split(" ", 1) for part in line.split(", "))}


def _res(fs, name: str) -> dict:
    return json.loads(fs.cat_file(f"jobs/runs/{name}/res.json"))


def _status(log: str, stage: str) -> str:
    return re.search(rf"stage {stage} +(\w+)", log).group(1)


def test_runs_share_a_cache_and_write_their_outputs_in_a_bucket(tmp_path):
    reference = run([sys.executable, str(JOB), *COMMON[:-1], "labels=shapes", f"cache_dir={tmp_path / 'local'}",
                     f"hydra.run.dir={tmp_path / 'reference'}"])
    assert reference.returncode == 0, log_of(reference)[-3000:]
    expected = json.loads((tmp_path / "reference" / "res.json").read_text(encoding="utf-8"))
    with s3_server() as s3:
        fs = s3.filesystem()
        fs.mkdir("jobs")
        env = {**ENV, **s3.env}
        missing = run([*_command(tmp_path, "missing"), "cache_dir=s3://no-such-bucket/cache"], env=env)
        assert missing.returncode == 2, log_of(missing)[-3000:]
        assert "cannot reach cache_dir (CACHE=) s3://no-such-bucket/cache" in log_of(missing)
        assert "Traceback" not in log_of(missing)

        # Two runs race on the empty cache: each cached entry is computed by one and reused by the other, which
        # waited on its lease; neither sees a half-written entry, so both give the reference's labels.
        racers = [subprocess.Popen(_command(tmp_path, f"race-{i}"), env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
        logs = [proc.communicate(timeout=300)[0] for proc in racers]
        assert [proc.returncode for proc in racers] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
        for stage in ("encode_labels", "encode_images", "classify"):
            assert sorted(_status(log, stage) for log in logs) == ["ran", "reused"], (stage, logs)
        assert _res(fs, "race-0") == _res(fs, "race-1") == expected
        first = next(log for log in logs if _status(log, "encode_images") == "ran")
        # each chunk written once, and read once by classify (kept on no local disk; listing it needs no read)
        assert _requests(first)["put chunk"] == CHUNKS and _requests(first)["get chunk"] == CHUNKS

        # Killed after uploading the files of an entry (the new label set's encode_labels), before sealing it:
        # no manifest names the upload, so the next run computes that entry again and gets it right.
        killed = run(_command(tmp_path, "killed", "colors"), env={**env, "PIPELINE_FAULT": "store.before_seal:1"})
        assert killed.returncode == -9, log_of(killed)[-3000:]
        labels_dir = "jobs/cache/encode_labels"
        uploads = {key.split("/")[4] for key in fs.find(labels_dir) if key.count("/") >= 5}
        sealed = {json.loads(fs.cat_file(key))["upload"] for key in fs.find(labels_dir)
                  if key.endswith("_manifest.json")}
        assert len(uploads - sealed) == 1  # the killed run's upload, which nothing names

        rerun = run(_command(tmp_path, "colors", "colors"), env=env)
        log = log_of(rerun)
        assert rerun.returncode == 0, log[-3000:]
        assert "breaking the lease" in log and "its process has exited" in log  # the killed run's, at once
        assert _status(log, "encode_labels") == "ran" and _status(log, "encode_images") == "reused"
        colors = pd.read_parquet(io.BytesIO(fs.cat_file("jobs/runs/colors/predictions.parquet")))
        assert len(colors) == 38 and set(colors["label"]) <= {"red", "green", "blue", "yellow", "purple", "orange"}
        # a new label set reads each chunk once, from the bucket, and writes none
        requests = _requests(log)
        assert requests["get chunk"] == CHUNKS and "put chunk" not in requests, requests
        assert "AWS_SECRET_ACCESS_KEY" not in log and s3.secret not in log
        stored = fs.find("jobs/runs/colors")
        assert {key.rsplit("/", 1)[1] for key in stored} >= {"res.json", "predictions.parquet", "errors.parquet"}
