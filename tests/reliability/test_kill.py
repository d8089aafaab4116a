"""kill -9 at seeded moments, then the same command again: outputs identical to an uninterrupted run.

Two kinds of kill: injected at named points where a crash is likeliest to leave something half done
(PIPELINE_FAULT, see pipeline/faults.py), and sent from outside after a seeded random delay.
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.engine.dag import entry_dirs

from .conftest import (FULL, STATS, compare_outputs, job_command, leftovers, log_of, read_outputs, render_dataset,
                       run_job)

ARGS = ("encode.batch_size=4", "encode.chunk_size=16", "encode.num_workers=1", "labels=pairs")
INJECTED = ["stage.before:2", "stage.before:4", "stage.before_seal:1", "stage.before_seal:2",
            "stage.before_seal:3", "chunk.before_rename:1", "chunk.before_rename:7", "chunk.after_write:3",
            "chunk.after_write:14", "classify.row_group:2", "classify.row_group:9", "publish.file:1",
            "publish.file:2"]
FAST_INJECTED = ["stage.before_seal:3", "chunk.before_rename:7", "classify.row_group:2", "publish.file:1"]
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


def _finished_chunks(cache: Path) -> int:
    return sum(1 for _ in (cache / "encode_images" / "pool").glob("*/*/*.chunk"))


def _rerun_and_compare(dataset, base, reference_out):
    """Rerun, then: outputs equal the uninterrupted run's, every chunk finished before the kill was reused (no
    image encoded twice), and nothing temporary is left in the cache."""
    _check_visible_files_whole(base / "out")
    finished = _finished_chunks(base / "cache")
    proc = run_job(job_command(dataset, base / "out", base / "cache", *ARGS))
    assert proc.returncode == 0, proc.stderr
    assert compare_outputs(base / "out", reference_out) == []
    outputs = read_outputs(base / "out")
    assert len(outputs["res.json"]) + outputs["errors"].num_rows == 241
    encoded = re.search(r"encoded (\d+) images in (\d+) chunks; (\d+) chunks reused", log_of(proc))
    if encoded:  # the kill came after the image embeddings were sealed: no encoding ran at all
        assert int(encoded.group(3)) == finished, log_of(proc)[-3000:]
    assert leftovers(base / "cache") == []
    return proc


@pytest.mark.parametrize("fault", INJECTED if FULL else FAST_INJECTED)
def test_injected_kill_then_rerun_is_identical(dataset, reference, tmp_path, fault):
    proc = run_job(job_command(dataset, tmp_path / "out", tmp_path / "cache", *ARGS),
                   env={"PIPELINE_FAULT": fault})
    assert proc.returncode == -signal.SIGKILL, f"fault {fault} never fired: {proc.stderr[-2000:]}"
    STATS["faults injected"] += 1
    _rerun_and_compare(dataset, tmp_path, reference[0])


def test_kill_at_seal_of_image_embeddings_encodes_nothing_again(dataset, reference, tmp_path):
    """The third seal is encode_images' (after discover and encode_labels): its chunks stay in the pool."""
    proc = run_job(job_command(dataset, tmp_path / "out", tmp_path / "cache", *ARGS),
                   env={"PIPELINE_FAULT": "stage.before_seal:3"})
    assert proc.returncode == -signal.SIGKILL
    stage_dir = tmp_path / "cache" / "encode_images"
    entries = [p.name for p in entry_dirs(stage_dir)]
    assert len(entries) == 1 and entries[0].startswith(".tmp-")  # killed while sealing: no entry, its temp dir
    assert _finished_chunks(tmp_path / "cache") > 1
    STATS["faults injected"] += 1
    rerun = _rerun_and_compare(dataset, tmp_path, reference[0])
    assert "encoded 0 images in 0 chunks" in log_of(rerun)
    assert re.search(r"stage encode_images +resumed", log_of(rerun))


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


def _images_in_finished_chunks(cache: Path) -> int:
    """Images held by the finished chunks in the pool (tar shards' index chunks hold no images)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    total = 0
    for path in (cache / "encode_images" / "pool").glob("*/*/*.chunk"):
        if path.name.endswith(".retry.chunk"):
            continue
        try:
            total += ipc.open_file(pa.memory_map(str(path))).read_all().num_rows
        except pa.ArrowInvalid:
            pass
    return total


@pytest.fixture(scope="module")
def s3():
    from tests.helpers.servers import s3_server

    with s3_server() as server:
        yield server


@pytest.mark.parametrize("kind", ["tar", "s3"])
def test_kill_mid_encoding_on_tar_shards_and_a_bucket(dataset, tmp_path, kind, request):
    """kill -9 while encoding tar shards (read sequentially, resumed inside a shard) or a bucket; the rerun's
    outputs equal an uninterrupted run's and it encodes exactly the images no finished chunk held."""
    from tests.helpers import write_shards
    from pipeline.config import quote_override_value

    images = sorted(dataset.rglob("*.jpg"))
    env = {}
    if kind == "tar":
        shards = write_shards(tmp_path / "shards", images, per_shard=40)
        location = quote_override_value(f"{tmp_path}/shards/data-{{0000..{len(shards) - 1:04d}}}.tar")
    else:
        s3 = request.getfixturevalue("s3")
        fs = s3.filesystem()
        bucket = f"kill-{abs(hash(str(tmp_path))) % 10**8}"
        fs.mkdir(bucket)
        for image in images:
            fs.pipe(f"{bucket}/set/{image.relative_to(dataset).as_posix()}", image.read_bytes())
        location, env = f"s3://{bucket}/set/", s3.env
    args = (*ARGS, "dataset.truth=null")
    ref = run_job(job_command(location, tmp_path / "ref", tmp_path / "ref-cache", *args), env=env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = run_job(job_command(location, tmp_path / "out", tmp_path / "cache", *args),
                     env={**env, "PIPELINE_FAULT": "chunk.after_write:3"})
    assert killed.returncode == -signal.SIGKILL
    STATS["faults injected"] += 1
    already = _images_in_finished_chunks(tmp_path / "cache")
    assert already > 0
    rerun = run_job(job_command(location, tmp_path / "out", tmp_path / "cache", *args), env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert compare_outputs(tmp_path / "out", tmp_path / "ref") == []
    encoded = re.search(r"encoded (\d+) images in (\d+) chunks", log_of(rerun))
    assert encoded and int(encoded.group(1)) == len(images) - already  # no image encoded twice
    assert leftovers(tmp_path / "cache") == []


def test_corrupt_chunk_found_by_a_streamed_classify_is_recomputed_alone(dataset, tmp_path):
    """Bit rot in one chunk (same size, same mtime): the reuse check (stat) passes, classify finds it as it
    reads, that chunk alone is encoded again, and the outputs equal a clean run's."""
    import os

    ref = run_job(job_command(dataset, tmp_path / "ref", tmp_path / "ref-cache", *ARGS[:-1], "labels=colors"))
    assert ref.returncode == 0, ref.stderr[-2000:]
    first = run_job(job_command(dataset, tmp_path / "out", tmp_path / "cache", *ARGS))
    assert first.returncode == 0
    chunks = sorted((tmp_path / "cache" / "encode_images" / "pool").glob("*/*/*.chunk"))
    victim = chunks[len(chunks) // 2]
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    STATS["faults injected"] += 1
    rerun = run_job(job_command(dataset, tmp_path / "out2", tmp_path / "cache", *ARGS[:-1], "labels=colors"))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = log_of(rerun)
    assert "is corrupt" in log and "checksum mismatch" in log
    assert re.search(r"encoded \d+ images in 1 chunks; \d+ chunks reused", log)
    assert compare_outputs(tmp_path / "out2", tmp_path / "ref") == []
