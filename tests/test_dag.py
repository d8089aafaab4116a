"""The model-agnostic runner: dependency order, skip, rerun on change, content stages, checksums, chunks, locks."""

import multiprocessing as mp
import time

import pytest

from pipeline.dag import CONTENT, SINK, ChunkStore, Runner, Stage, topological_order


class Calls:
    def __init__(self):
        self.count = {}

    def stage(self, name, produce):
        def fn(ctx, inputs):
            self.count[name] = self.count.get(name, 0) + 1
            text = produce(inputs)
            if ctx.out is not None:
                (ctx.out / "value.txt").write_text(text)
        return fn


def _read(art):
    return art.file("value.txt").read_text()


def _stages(calls, source, factor, sink_log):
    return [
        Stage("sink", calls.stage("sink", lambda i: sink_log.append(_read(i["scale"])) or ""), inputs=("scale",),
              kind=SINK),
        Stage("scale", calls.stage("scale", lambda i: str(int(_read(i["source"])) * factor)), inputs=("source",),
              params={"factor": factor}),
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


def test_corrupted_output_is_detected_and_recomputed(tmp_path, caplog):
    calls, sink_log = Calls(), []
    results = Runner(tmp_path).run(_stages(calls, lambda: "7", 3, sink_log))
    results["scale"].file("value.txt").write_text("99")  # bit rot, same size
    runner = Runner(tmp_path)
    runner.run(_stages(calls, lambda: "7", 3, sink_log))
    assert [r.status for r in runner.reports][1] == "ran" and sink_log == ["21", "21"]
    assert "checksum" in caplog.text


def test_failed_stage_leaves_no_output_and_reruns(tmp_path):
    def boom(ctx, inputs):
        (ctx.out / "half.txt").write_text("partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        Runner(tmp_path).run([Stage("s", boom, params=1)])
    assert not [p for p in (tmp_path / "s").iterdir() if p.is_dir() and not p.name.endswith(".partial")]
    ok = Runner(tmp_path)
    ok.run([Stage("s", lambda ctx, i: (ctx.out / "v").write_text("done"), params=1)])
    assert ok.reports[0].status == "ran"


def test_topological_order_rejects_cycles_and_unknown_inputs():
    noop = lambda ctx, inputs: None  # noqa: E731
    assert [s.name for s in topological_order([Stage("b", noop, ("a",)), Stage("a", noop)])] == ["a", "b"]
    with pytest.raises(ValueError, match="cycle"):
        topological_order([Stage("a", noop, ("b",)), Stage("b", noop, ("a",))])
    with pytest.raises(ValueError, match="unknown"):
        topological_order([Stage("a", noop, ("zzz",))])


def test_chunk_store_detects_corruption(tmp_path, caplog):
    store = ChunkStore(tmp_path)
    store.put("c0", lambda p: p.write_bytes(b"a" * 100))
    bad = store.put("c1", lambda p: p.write_bytes(b"b" * 100))
    bad.write_bytes(b"b" * 50)  # truncated on disk
    assert sorted(ChunkStore(tmp_path).completed()) == ["c0"]
    assert not bad.exists() and "corrupt chunk" in caplog.text


def test_resume_from_scratch_chunks(tmp_path):
    attempts = []

    def chunked(ctx, inputs):
        store = ChunkStore(ctx.scratch)
        for key in ("a", "b", "c"):
            if key in store.completed():
                continue
            attempts.append(key)
            if key == "c" and attempts.count("c") == 1:
                raise KeyboardInterrupt  # a kill after two chunks
            store.put(key, lambda p, k=key: p.write_text(k))
        (ctx.out / "all.txt").write_text("".join(p.read_text() for _, p in sorted(store.completed().items())))

    with pytest.raises(KeyboardInterrupt):
        Runner(tmp_path).run([Stage("long", chunked, params=0)])
    runner = Runner(tmp_path)
    out = runner.run([Stage("long", chunked, params=0)])
    assert attempts == ["a", "b", "c", "c"] and runner.reports[0].status == "resumed"
    assert out["long"].file("all.txt").read_text() == "abc"
    assert not (tmp_path / "long" / f"{out['long'].fingerprint}.partial").exists()


def _slow_stage(cache, queue):
    def fn(ctx, inputs):
        queue.put("computing")
        time.sleep(0.5)
        (ctx.out / "v").write_text("x")
    runner = Runner(cache)
    runner.run([Stage("slow", fn, params=0)])
    queue.put(runner.reports[0].status)


def test_concurrent_runs_compute_once(tmp_path):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_slow_stage, args=(tmp_path, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    messages = sorted(queue.get(timeout=5) for _ in range(3))
    assert messages == ["computing", "ran", "reused"]
