"""The model-agnostic engine: dependency order, skip, rerun on change, content stages, checksums, the chunk pool,
sealing, sweeping, incomplete entries, repair of corrupt inputs, params that must be JSON."""

import multiprocessing as mp
import os
import time

import pytest

from pipeline.engine import (CONTENT, SINK, ChunkPool, Incomplete, InputCorrupt, Runner, Stage,
                             topological_order, write_chunk_list)
from pipeline.engine.files import tmp_name


class Calls:
    def __init__(self):
        self.count = {}

    def stage(self, name, produce):
        def fn(ctx, **kwargs):
            self.count[name] = self.count.get(name, 0) + 1
            text = produce(kwargs)
            if ctx.out is not None:
                (ctx.out / "value.txt").write_text(text)
        return fn


def _read(art):
    return art.read_bytes("value.txt").decode()


def _stages(calls, source, factor, sink_log):
    return [
        Stage("sink", calls.stage("sink", lambda i: sink_log.append(_read(i["scaled"])) or ""),
              inputs={"scaled": "scale"}, kind=SINK),
        Stage("scale", calls.stage("scale", lambda i: str(int(_read(i["number"])) * i["factor"])),
              inputs={"number": "source"}, params={"factor": factor}),
        Stage("source", calls.stage("source", lambda i: source()), kind=CONTENT),
    ]


def test_order_skip_and_rerun_on_change(tmp_path):
    calls, sink_log, value = Calls(), [], {"v": "3"}
    runner = Runner(tmp_path)
    runner.run(_stages(calls, lambda: value["v"], 2, sink_log))
    assert sink_log == ["6"] and [r.status for r in runner.reports] == ["changed", "ran", "published"]

    runner = Runner(tmp_path)
    runner.run(_stages(calls, lambda: value["v"], 2, sink_log))
    assert [r.status for r in runner.reports] == ["unchanged", "reused", "published"]
    assert calls.count == {"source": 2, "scale": 1, "sink": 2}

    runner = Runner(tmp_path)
    runner.run(_stages(calls, lambda: value["v"], 5, sink_log))  # params change: only that stage reruns
    assert sink_log[-1] == "15" and calls.count["scale"] == 2

    value["v"] = "4"  # upstream content change propagates
    Runner(tmp_path).run(_stages(calls, lambda: value["v"], 5, sink_log))
    assert sink_log[-1] == "20" and calls.count["scale"] == 3


def test_stage_gets_exactly_its_hashed_params(tmp_path):
    seen = {}

    def fn(ctx, **kwargs):
        seen.update(kwargs)
        (ctx.out / "v").write_text("x")

    stage = Stage("s", fn, params={"a": 1, "b": [1, "x"], "c": {"d": None}})
    Runner(tmp_path, execution="not hashed").run([stage])
    assert seen == {"a": 1, "b": [1, "x"], "c": {"d": None}}
    assert Stage("s", fn, params={"a": 2}).fingerprint({}) != stage.fingerprint({})


@pytest.mark.parametrize("params,where", [({"a": object()}, "params.a"), ({"a": [1, {2}]}, r"params.a\[1\]"),
                                          ({"a": float("nan")}, "params.a"), ({"a": {1: 2}}, "params.a")])
def test_params_must_be_plain_json(params, where):
    with pytest.raises(TypeError, match=where):
        Stage("s", lambda ctx: None, params=params)


def test_corrupted_output_is_detected_and_recomputed(tmp_path, caplog):
    calls, sink_log = Calls(), []
    results = Runner(tmp_path).run(_stages(calls, lambda: "7", 3, sink_log))
    target = results["scale"].file("value.txt")
    target.write_text("99")  # bit rot, same size
    runner = Runner(tmp_path)
    runner.run(_stages(calls, lambda: "7", 3, sink_log))
    assert [r.status for r in runner.reports][1] == "ran" and sink_log == ["21", "21"]
    assert "checksum" in caplog.text


def test_corruption_found_while_reading_is_repaired(tmp_path, caplog):
    """Reuse checks sizes and mtimes only; a reader that finds bad bytes makes the runner recompute the input."""
    calls, sink_log = Calls(), []
    results = Runner(tmp_path).run(_stages(calls, lambda: "7", 3, sink_log))
    target = results["scale"].file("value.txt")
    st = target.stat()
    target.write_text("99")
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # bit rot that leaves the mtime alone
    runner = Runner(tmp_path)
    runner.run(_stages(calls, lambda: "7", 3, sink_log))
    assert sink_log == ["21", "21"] and calls.count["scale"] == 2
    assert "is corrupt" in caplog.text and [r.status for r in runner.reports] == ["unchanged", "reused", "published"]


def test_failed_stage_leaves_no_output_and_reruns(tmp_path):
    def boom(ctx, **_):
        (ctx.out / "half.txt").write_text("partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        Runner(tmp_path).run([Stage("s", boom, params={"p": 1})])
    assert [p.name for p in (tmp_path / "s").iterdir() if p.is_dir()] == []
    ok = Runner(tmp_path)
    ok.run([Stage("s", lambda ctx, **_: (ctx.out / "v").write_text("done"), params={"p": 1})])
    assert ok.reports[0].status == "ran"


def test_leftovers_of_killed_runs_are_swept_under_the_lock(tmp_path):
    stage = Stage("s", lambda ctx, **_: (ctx.out / "v").write_text("x"), params={"p": 1})
    fp = stage.fingerprint({})
    stage_dir = tmp_path / "s"
    stage_dir.mkdir()
    own = stage_dir / tmp_name(fp[:16])  # this fingerprint's build dir: whoever made it is gone once we hold the lock
    own.mkdir()
    dead = stage_dir / tmp_name("content").replace(f"-{os.getpid()}-", "-999999999-")  # a dead process on this host
    dead.mkdir()
    foreign = stage_dir / ".tmp-content-otherhost-12-abcd1234"  # another host's: may be alive there
    foreign.mkdir()
    legacy = stage_dir / f"{fp}.partial"  # scratch of the layout before the chunk pool
    legacy.mkdir()
    Runner(tmp_path).run([stage])
    left = sorted(p.name for p in stage_dir.iterdir() if p.is_dir())
    assert left == sorted([fp, foreign.name])


def test_incomplete_entry_serves_its_run_and_is_recomputed_with_its_dependents(tmp_path):
    attempts = []

    def flaky(ctx, **_):
        attempts.append(1)
        (ctx.out / "value.txt").write_text(str(len(attempts)))
        return Incomplete("a transient failure") if len(attempts) == 1 else None

    calls, sink_log = Calls(), []
    stages = [Stage("flaky", flaky, params={"p": 1}),
              Stage("double", calls.stage("double", lambda i: str(2 * int(_read(i["x"])))), inputs={"x": "flaky"}),
              Stage("sink", calls.stage("sink", lambda i: sink_log.append(_read(i["y"])) or ""),
                    inputs={"y": "double"}, kind=SINK)]
    first = Runner(tmp_path)
    results = first.run(stages)
    assert sink_log == ["2"] and not results["flaky"].final and not results["double"].final
    second = Runner(tmp_path)
    results = second.run(stages)
    assert sink_log == ["2", "4"] and results["flaky"].final and results["double"].final
    assert [r.status for r in second.reports] == ["ran", "ran", "published"]
    third = Runner(tmp_path)
    third.run(stages)
    assert [r.status for r in third.reports] == ["reused", "reused", "published"] and len(attempts) == 2


def test_topological_order_rejects_cycles_and_unknown_inputs():
    noop = lambda ctx, **_: None  # noqa: E731
    assert [s.name for s in topological_order([Stage("b", noop, {"x": "a"}), Stage("a", noop)])] == ["a", "b"]
    with pytest.raises(ValueError, match="cycle"):
        topological_order([Stage("a", noop, {"x": "b"}), Stage("b", noop, {"x": "a"})])
    with pytest.raises(ValueError, match="unknown"):
        topological_order([Stage("a", noop, {"x": "zzz"})])


# ------------------------------------------------------------------------------------------- the chunk pool

def _chunked_stage(attempts, kill_at=None, keys=("a", "b", "c")):
    """A long stage: one chunk per key in its pool, then the list of chunks it is made of."""

    def chunked(ctx, **_):
        pool = ctx.pool
        found = pool.scan()
        chunks = []
        for key in keys:
            full_key = f"{ctx.key[:8]}{key}"
            if full_key not in found:
                attempts.append(key)
                if key == kill_at and attempts.count(key) == 1:
                    raise KeyboardInterrupt  # a kill after the earlier chunks
                found[full_key] = pool.put(full_key, key.encode())
            else:
                ctx.resumed = True
            chunks.append(found[full_key])
        write_chunk_list(ctx.out, chunks, count=len(chunks))

    return Stage("long", chunked, params={"p": 0})


def _joined(artifact):
    return b"".join(artifact.read_chunk(c) for c in artifact.chunks()).decode()


def test_chunks_survive_a_kill_and_are_not_computed_again(tmp_path):
    attempts = []
    with pytest.raises(KeyboardInterrupt):
        Runner(tmp_path).run([_chunked_stage(attempts, kill_at="c")])
    runner = Runner(tmp_path)
    out = runner.run([_chunked_stage(attempts, kill_at="c")])
    assert attempts == ["a", "b", "c", "c"] and runner.reports[0].status == "resumed"
    assert _joined(out["long"]) == "abc"
    # sealing wrote only the list: the chunks stay where they were written, in the pool
    assert sorted(p.name for p in (tmp_path / "long").iterdir() if p.is_dir()) == sorted([out["long"].fingerprint,
                                                                                         "pool"])


def test_a_corrupt_chunk_is_recomputed_alone(tmp_path, caplog):
    attempts = []
    out = Runner(tmp_path).run([_chunked_stage(attempts)])
    bad = out["long"].chunks()[1]
    out["long"].pool.path(bad).write_bytes(b"X")  # same size, wrong bytes
    with pytest.raises(InputCorrupt, match="checksum"):
        _joined(out["long"])
    assert not out["long"].pool.path(bad).exists()  # the reader removed it
    runner = Runner(tmp_path)
    again = runner.run([_chunked_stage(attempts)])
    assert attempts == ["a", "b", "c", "b"] and _joined(again["long"]) == "abc"


def test_chunk_pool_detects_truncation_and_prefers_final(tmp_path):
    pool = ChunkPool(tmp_path)
    provisional = pool.put("k1", b"first try", final=False)
    assert pool.scan()["k1"] == provisional and not provisional.final
    final = pool.put("k1", b"second try")
    assert pool.scan() == {"k1": final} and not pool.path(provisional).exists()
    pool.path(final).write_bytes(b"short")
    assert not pool.present(final)


# ------------------------------------------------------------------------------------------------- locks

def _slow_stage(cache, queue):
    def fn(ctx, **_):
        queue.put("computing")
        time.sleep(0.5)
        (ctx.out / "v").write_text("x")
    runner = Runner(cache)
    runner.run([Stage("slow", fn, params={"p": 0})])
    queue.put(runner.reports[0].status)


def _concurrent_statuses(cache) -> list[str]:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_slow_stage, args=(cache, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    return sorted(queue.get(timeout=5) for _ in range(3))


def test_concurrent_runs_compute_once(tmp_path):
    assert _concurrent_statuses(tmp_path) == ["computing", "ran", "reused"]


def test_lock_falls_back_to_a_soft_lock_where_flock_is_unsupported(tmp_path, monkeypatch):
    """Lustre mounted without `flock` answers ENOSYS: the lock becomes a marker file and still excludes."""
    import errno
    import fcntl

    real_flock = fcntl.flock

    def no_flock(fd, op):
        if op & fcntl.LOCK_UN:
            return real_flock(fd, op)
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    assert _concurrent_statuses(tmp_path) == ["computing", "ran", "reused"]


def test_node_local_flock_mounts_use_soft_locks(tmp_path, monkeypatch):
    from pipeline.engine import locks

    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        f"40 22 0:40 / {tmp_path}/lustre rw,relatime - lustre 10.0.0.1@tcp:/fs rw,localflock\n"
        f"41 22 0:41 / {tmp_path}/nfs rw,relatime - nfs4 srv:/x rw,vers=4.2,local_lock=flock\n")
    monkeypatch.setattr(locks, "MOUNTINFO", str(mountinfo))
    (tmp_path / "lustre" / "cache").mkdir(parents=True)
    (tmp_path / "nfs").mkdir()
    assert "localflock" in locks.node_local_flock(tmp_path / "lustre" / "cache")
    assert "local_lock=flock" in locks.node_local_flock(tmp_path / "nfs")
    assert locks.node_local_flock(tmp_path) is None
    import filelock

    assert isinstance(locks.make_lock(tmp_path / "lustre" / "cache" / "x.lock"), filelock.SoftFileLock)
    assert not isinstance(locks.make_lock(tmp_path / "x.lock"), filelock.SoftFileLock)


def test_content_stage_shared_by_a_token_runs_once(tmp_path):
    """Shard processes of one job list the dataset once: the first under the token runs the content stage, the
    others reuse its entry; another token (a later job) runs it again and sees the world as it is then."""
    calls, sink_log, value = Calls(), [], {"v": "3"}
    first = Runner(tmp_path, reuse_tokens={"source": "job-1"})
    first.run(_stages(calls, lambda: value["v"], 2, sink_log))
    value["v"] = "4"  # the world changes after the listing
    second = Runner(tmp_path, reuse_tokens={"source": "job-1"})
    second.run(_stages(calls, lambda: value["v"], 2, sink_log))
    assert calls.count["source"] == 1 and [r.status for r in second.reports][0] == "reused" and sink_log == ["6", "6"]
    later = Runner(tmp_path, reuse_tokens={"source": "job-2"})
    later.run(_stages(calls, lambda: value["v"], 2, sink_log))
    assert calls.count["source"] == 2 and sink_log[-1] == "8"


def test_a_shardable_stage_runs_its_share_through_the_runner_and_a_whole_run_seals_it(tmp_path, caplog):
    """Shards fill the pool of a shardable stage (no entry sealed, reported like any stage, with their share);
    they refuse a stage that needs all of it; a later whole run finds their chunks and seals the entry."""
    def fill(ctx, **params):
        pool = ctx.pool
        index, count = ctx.shard
        found = pool.scan()
        listed = []
        for part in range(4):
            key = f"{ctx.key[:8]}-{part}"
            if key not in found and part % count == index:
                found[key] = pool.put(key, str(part * params["factor"]).encode())
            if key in found:
                listed.append(found[key])
        ctx.resumed = len(found) > 0 and count == 1
        if count == 1:
            write_chunk_list(ctx.out, listed, count=len(listed))

    parts = Stage("parts", fill, params={"factor": 3}, shardable=True)
    after = Stage("after", lambda ctx, parts: (ctx.out / "n").write_text(str(len(parts.chunks()))),
                  inputs={"parts": "parts"})
    with caplog.at_level("INFO"):
        for index in range(2):
            runner = Runner(tmp_path)
            results = runner.run([parts, after], targets=("parts",), shard=(index, 2))
            assert results["parts"].path is None and runner.reports[0].shard == (index, 2)
    assert "shard 1/2" in caplog.text and not (tmp_path / "parts" / results["parts"].fingerprint).exists()
    with pytest.raises(ValueError, match="needs all of"):
        Runner(tmp_path).run([parts, after], shard=(0, 2))
    whole = Runner(tmp_path)
    results = whole.run([parts, after])
    assert [r.status for r in whole.reports] == ["resumed", "ran"]
    assert sorted(results["parts"].pool.read(c).decode() for c in results["parts"].chunks()) == \
        ["0", "3", "6", "9"]
    assert (results["after"].path / "n").read_text() == "4"
    again = Runner(tmp_path)
    again.run([parts], shard=(1, 2))
    assert again.reports[0].status == "reused"  # a sealed entry serves the shards too
