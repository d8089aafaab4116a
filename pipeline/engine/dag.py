"""A small DAG runner with fingerprinted, resumable, checksummed stage outputs.

It knows nothing about images or models. A stage is a plain function `fn(ctx, **inputs, **params)`: its inputs
are other stages' outputs (`Artifact`s, by argument name), its params are plain JSON values, and the runner calls
it with exactly the params it hashes, so nothing that changes a result can reach a stage unhashed. What changes
only how the work is done (batch size, workers, the device, where the data lives) comes in `ctx.execution`,
which the runner passes through untouched and never hashes.

A stage's output is a directory in the cache named by its fingerprint, sha256 of (name, version, params, input
fingerprints), as in DVC and HF `datasets`; "present and checks out" means done, as in Luigi and doit. Kinds:

- `cached`: skipped when its entry is present, final and intact;
- `content`: always runs (it reads the outside world, e.g. lists a folder) and is fingerprinted by what it wrote,
  so downstream stages are skipped exactly when that content did not change;
- `sink`: always runs and publishes outside the cache (e.g. into a run directory).

Long stages keep their progress in a chunk pool (`ctx.pool`, see `chunks.py`) that survives kills and
fingerprint changes; sealing writes only a list of chunks. `ctx.memo` holds indexes a stage derives from its
inputs (safe to delete). A content stage can be shared by a token (`reuse_tokens`): the processes of one job
then list the world once. A stage that returns `Incomplete` is sealed but
recomputed by the next run (and so is everything downstream). A stage that finds an input corrupt while reading
it raises `InputCorrupt`; the runner recomputes that input (its chunks that are still good are kept) and runs the
stage again.

With a `store` (a cache on object storage, `store.py`), `cache_dir` is the run's local working copy and the store
is the shared truth: entries are looked up there (`mirror.pull`) and sealed there (`mirror.push`), chunk pools and
reuse pointers are mirrored, and a lease in the store stands beside each lock.

A long stage can be `shardable`: a run given `shard=(index, count)` runs such a stage for that shard only (the
stage fills its part of the chunk pool, and nothing is sealed: shards run at once, with no lock on the entry
between them), and refuses the stages that need all of it; a later whole run seals it from the pool.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from . import cache, mirror
from .cache import Artifact, InputCorrupt
from .chunks import ChunkPool
from .failpoints import failpoint
from .files import atomic_open, canonical_json, remove, sha256_json, tmp_name
from .locks import locked
from .store import Store

log = logging.getLogger(__name__)

CACHED, CONTENT, SINK = "cached", "content", "sink"
KINDS = (CACHED, CONTENT, SINK)
POOL_DIR = "pool"
MEMO_DIR = "memo"
REUSE_DIR = "reuse"
# Beside a stage's entries (one directory per fingerprint) live these working directories, which are not entries.
WORK_DIRS = frozenset({POOL_DIR, MEMO_DIR, REUSE_DIR})
MAX_REPAIRS = 3


def entry_dirs(stage_dir: Path) -> list[Path]:
    """A stage's cache entries, sealed or in the making (`.tmp-*`), without its working directories."""
    return sorted(p for p in stage_dir.iterdir() if p.is_dir() and p.name not in WORK_DIRS)


WHOLE = (0, 1)  # a run's shard when it is not split between processes: (index, count)


@dataclass
class StageContext:
    out: Path | None  # write the stage's files here (a temporary directory, sealed into the cache on success)
    execution: Any  # how the work is done, never what it gives: passed through from the Runner, never hashed
    pool: ChunkPool | None = None  # the stage's chunk pool (cached stages): survives kills and fingerprint changes
    key: str = ""  # hash of (stage, version, params): namespaces the stage's chunk keys
    memo: Path | None = None  # for indexes derived from inputs (safe to delete: recomputed when missing)
    resumed: bool = False  # set by the stage when it found earlier progress to build on
    shard: tuple[int, int] = WHOLE  # (index, count): a shardable stage does only this shard (out is then None)


@dataclass(frozen=True)
class Incomplete:
    """Returned by a stage whose output holds failures worth retrying: sealed for this run, recomputed next."""

    reason: str


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable[..., Incomplete | None]
    inputs: Mapping[str, str] = field(default_factory=dict)  # argument name -> upstream stage name
    params: Mapping[str, Any] = field(default_factory=dict)  # plain JSON: hashed, and passed as keyword args
    version: int | str = 1  # kept beside the stage's code; bump when its output changes for the same params
    kind: str = CACHED
    shardable: bool = False  # a cached stage that can fill its chunk pool shard by shard (see the module doc)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"stage {self.name}: unknown kind {self.kind!r}")
        if self.shardable and self.kind != CACHED:
            raise ValueError(f"stage {self.name}: only a cached stage (with a chunk pool) can be shardable")
        canonical_json(dict(self.params), f"stage {self.name} params")  # refuses what is not JSON, now
        clash = set(self.inputs) & set(self.params)
        if clash:
            raise ValueError(f"stage {self.name}: {sorted(clash)} is both an input and a param")

    @property
    def identity(self) -> str:
        """What the stage computes, without its inputs: namespaces its chunk keys."""
        return sha256_json({"stage": self.name, "version": self.version, "params": dict(self.params)})

    def fingerprint(self, inputs: Mapping[str, Artifact], content: str | None = None) -> str:
        """A content stage's output by what it wrote, whatever its inputs were (downstream reads only that
        output); any other stage's by its identity and its inputs' fingerprints."""
        if content is not None:
            return sha256_json({"identity": self.identity, "content": content})
        return sha256_json({"identity": self.identity, "content": None,
                            "inputs": {arg: art.fingerprint for arg, art in sorted(inputs.items())}})


@dataclass
class StageReport:
    name: str
    status: str  # ran | reused | resumed | unchanged | changed | published
    seconds: float
    fingerprint: str | None = None
    shard: tuple[int, int] = WHOLE  # the shard of the stage this run did


@dataclass
class Runner:
    cache_dir: Path
    execution: Any = None
    lock_kind: str = "auto"
    # Content stages to reuse by a token instead of running again (e.g. one listing for all the shard processes
    # of one job): the first process under the token runs the stage, the others take its entry.
    reuse_tokens: dict[str, str] = field(default_factory=dict)
    reports: list[StageReport] = field(default_factory=list)
    store: Store | None = None  # the shared cache on object storage; cache_dir is then a local working copy

    def run(self, stages: list[Stage], targets: tuple[str, ...] | None = None,
            shard: tuple[int, int] = WHOLE) -> dict[str, Artifact]:
        """Run `stages` in dependency order; with `targets`, only those and what they depend on; with a `shard`
        of a split run, the shardable stages for that shard only (see the module doc)."""
        results: dict[str, Artifact] = {}
        ordered = topological_order(stages)
        by_name = {s.name: s for s in ordered}
        if targets is not None:
            needed = _ancestors(by_name, targets)
            ordered = [s for s in ordered if s.name in needed]
        for stage in ordered:
            started = time.perf_counter()
            failpoint("stage.before")
            own = shard if stage.shardable else WHOLE  # the shard of this stage that this run does
            if shard != WHOLE:
                _refuse_partial_inputs(stage, by_name)
            artifact, status = self._run_repairing(stage, by_name, results, own)
            results[stage.name] = artifact
            report = StageReport(stage.name, status, time.perf_counter() - started, artifact.fingerprint, own)
            self.reports.append(report)
            fp = f" [{artifact.fingerprint[:12]}]" if artifact.fingerprint else ""
            which = f" shard {own[0]}/{own[1]}" if own != WHOLE else ""
            log.info("stage %-15s %-9s %6.2fs%s%s", stage.name, status, report.seconds, fp, which)
        return results

    def context(self, stage: Stage, out: Path | None = None, shard: tuple[int, int] = WHOLE) -> StageContext:
        """The context a stage's function gets."""
        # One pool per stage identity: a run scans only the chunks it could use, however many models, dtypes or
        # preprocessing settings share the cache.
        identity = stage.identity
        pool = None
        if stage.kind == CACHED:
            where = f"{stage.name}/{POOL_DIR}/{identity[:16]}"
            pool = ChunkPool(self.cache_dir / where, (self.store, where) if self.store else None)
        memo = self.cache_dir / stage.name / MEMO_DIR / identity[:16]
        return StageContext(out=out, execution=self.execution, pool=pool, key=identity, memo=memo, shard=shard)

    @contextlib.contextmanager
    def _held(self, stage: str, name: str) -> Iterator[None]:
        """The lock on `name` among `stage`'s entries, and with a store its lease there too."""
        with locked(self.cache_dir / stage / f"{name}.lock", self.lock_kind):
            if self.store is None:
                yield
            else:
                with self.store.lease(f"{stage}/{name}.lease"):
                    yield

    def _have(self, stage: str, fingerprint: str, pool: ChunkPool | None) -> Path | None:
        """The final, intact entry of `fingerprint`: local, else pulled from the store; None when neither."""
        final = self.cache_dir / stage / fingerprint
        if cache.is_final(final) and cache.verify(final, pool):
            return final
        if final.exists() and cache.is_final(final):
            log.warning("stage %s: cached output %s failed its check; recomputing", stage, final)
        if self.store is not None and mirror.pull(self.store, stage, fingerprint, final):
            if cache.is_final(final) and cache.verify(final, pool):
                return final
            self.store.delete(mirror.manifest_key(stage, fingerprint))  # its chunks are gone: unseal it
        return None

    def _publish(self, stage: str, fingerprint: str, final: Path, final_flag: bool) -> bool:
        """Seal a final entry in the store too; False when the store had it already."""
        return final_flag and self.store is not None and mirror.push(self.store, stage, fingerprint, final)

    def _run_repairing(self, stage: Stage, by_name: dict[str, Stage], results: dict[str, Artifact],
                       shard: tuple[int, int]) -> tuple[Artifact, str]:
        for attempt in range(MAX_REPAIRS + 1):
            try:
                inputs = {arg: results[src] for arg, src in stage.inputs.items()}
                return self._run_shard(stage, inputs, shard) if shard != WHOLE else self._run_one(stage, inputs)
            except InputCorrupt as exc:
                if attempt == MAX_REPAIRS:
                    raise
                bad = exc.artifact
                log.warning("stage %s: input %s is corrupt (%s); recomputing it", stage.name, bad.stage, exc)
                if bad.path is not None:
                    remove(bad.path / cache.MANIFEST)  # no longer a valid entry; its intact chunks stay pooled
                if self.store is not None:
                    self.store.delete(mirror.manifest_key(bad.stage, bad.fingerprint))
                upstream = by_name[bad.stage]
                results[bad.stage], _ = self._run_one(upstream, {a: results[s] for a, s in upstream.inputs.items()})
        raise AssertionError("unreachable")

    def _run_one(self, stage: Stage, inputs: dict[str, Artifact]) -> tuple[Artifact, str]:
        if stage.kind == SINK:
            stage.fn(self.context(stage), **inputs, **stage.params)
            return Artifact(stage.name, "", None), "published"
        if stage.kind == CONTENT:
            return self._run_content(stage, inputs)
        return self._run_cached(stage, inputs)

    def _run_cached(self, stage: Stage, inputs: dict[str, Artifact]) -> tuple[Artifact, str]:
        fingerprint = stage.fingerprint(inputs)
        stage_dir = self.cache_dir / stage.name
        final = stage_dir / fingerprint
        ctx = self.context(stage)
        with self._held(stage.name, fingerprint):
            cache.sweep(stage_dir, fingerprint[:16])
            if self._have(stage.name, fingerprint, ctx.pool):
                return Artifact(stage.name, fingerprint, final, True, ctx.pool), "reused"
            ctx.out = stage_dir / tmp_name(fingerprint[:16])
            ctx.out.mkdir(parents=True)
            try:
                outcome = stage.fn(ctx, **inputs, **stage.params)
                final_flag = self._seal(stage, inputs, fingerprint, ctx.out, final, outcome)
                self._publish(stage.name, fingerprint, final, final_flag)
            finally:
                remove(ctx.out)
        return Artifact(stage.name, fingerprint, final, final_flag, ctx.pool), "resumed" if ctx.resumed else "ran"

    def _run_content(self, stage: Stage, inputs: dict[str, Artifact]) -> tuple[Artifact, str]:
        token = self.reuse_tokens.get(stage.name)
        if token is None:
            return self._run_content_now(stage, inputs)
        stage_dir = self.cache_dir / stage.name
        name = sha256_json({"token": token, "identity": stage.identity,
                            "inputs": {a: art.fingerprint for a, art in inputs.items()}})
        pointer, shared = stage_dir / REUSE_DIR / name, f"{stage.name}/{REUSE_DIR}/{name}"
        with self._held(stage.name, f"{REUSE_DIR}/{name}"):
            fingerprint = pointer.read_text().strip() if pointer.exists() else None
            if fingerprint is None and self.store is not None:
                fingerprint = (self.store.get(shared) or b"").decode() or None
            if fingerprint and self._have(stage.name, fingerprint, None):
                return Artifact(stage.name, fingerprint, stage_dir / fingerprint), "reused"
            artifact, status = self._run_content_now(stage, inputs)
            with atomic_open(pointer, "w", encoding="ascii") as fh:
                fh.write(artifact.fingerprint)
            if self.store is not None:
                self.store.put(shared, artifact.fingerprint.encode())
            return artifact, status

    def _run_shard(self, stage: Stage, inputs: dict[str, Artifact], shard: tuple[int, int]) -> tuple[Artifact, str]:
        """A shardable stage's shard: its chunks into the pool, nothing sealed, no lock on the entry (shards run
        at once; chunks are written atomically, each by key). Reused when a whole run has sealed the entry."""
        fingerprint = stage.fingerprint(inputs)
        ctx = self.context(stage, shard=shard)
        final = self._have(stage.name, fingerprint, ctx.pool)
        if final is not None:
            return Artifact(stage.name, fingerprint, final, True, ctx.pool), "reused"
        stage.fn(ctx, **inputs, **stage.params)
        return Artifact(stage.name, fingerprint, None, False, ctx.pool), "resumed" if ctx.resumed else "ran"

    def _run_content_now(self, stage: Stage, inputs: dict[str, Artifact]) -> tuple[Artifact, str]:
        stage_dir = self.cache_dir / stage.name
        tmp = stage_dir / tmp_name("content")
        tmp.mkdir(parents=True)
        try:
            outcome = stage.fn(self.context(stage, tmp), **inputs, **stage.params)
            files = cache.file_records(tmp)
            content = sha256_json({name: meta["sha256"] for name, meta in files.items()})
            fingerprint = stage.fingerprint(inputs, content=content)
            final = stage_dir / fingerprint
            with self._held(stage.name, fingerprint):
                cache.sweep(stage_dir, fingerprint[:16])
                if cache.is_final(final) and cache.verify(final, None):
                    return Artifact(stage.name, fingerprint, final), "unchanged"
                final_flag = self._seal(stage, inputs, fingerprint, tmp, final, outcome)
                new = self._publish(stage.name, fingerprint, final, final_flag) or self.store is None
            return Artifact(stage.name, fingerprint, final, final_flag), "changed" if new else "unchanged"
        finally:
            remove(tmp)

    @staticmethod
    def _seal(stage: Stage, inputs: dict[str, Artifact], fingerprint: str, tmp: Path, final: Path,
              outcome: Incomplete | None) -> bool:
        reasons = [outcome.reason] if isinstance(outcome, Incomplete) else []
        reasons += [f"input {a.stage} is not final" for a in inputs.values() if not a.final]
        if reasons:
            log.info("stage %s: %s; the next run computes it again", stage.name, "; ".join(reasons))
        cache.seal(tmp, final, {"stage": stage.name, "version": stage.version, "fingerprint": fingerprint,
                                "params": dict(stage.params), "final": not reasons,
                                "inputs": {arg: art.fingerprint for arg, art in inputs.items()}})
        return not reasons


def _refuse_partial_inputs(stage: Stage, by_name: dict[str, Stage]) -> None:
    partial = [name for name in stage.inputs.values() if by_name[name].shardable]
    if partial:
        raise ValueError(f"stage {stage.name} needs all of {partial}; a sharded run stops at them (run it as a "
                         "target's ancestor in a whole run)")


def _ancestors(by_name: dict[str, Stage], targets: tuple[str, ...]) -> set[str]:
    needed, todo = set(), list(targets)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(by_name[name].inputs.values())
    return needed


def topological_order(stages: list[Stage]) -> list[Stage]:
    """Dependency order, stable with respect to the given order; rejects unknown inputs and cycles."""
    by_name = {s.name: s for s in stages}
    if len(by_name) != len(stages):
        raise ValueError("stage names must be unique")
    for stage in stages:
        missing = [i for i in stage.inputs.values() if i not in by_name]
        if missing:
            raise ValueError(f"stage {stage.name} needs unknown stage(s) {missing}")
    ordered: list[Stage] = []
    done: set[str] = set()
    while len(ordered) < len(stages):
        ready = [s for s in stages if s.name not in done and all(i in done for i in s.inputs.values())]
        if not ready:
            raise ValueError(f"dependency cycle among {sorted(set(by_name) - done)}")
        ordered.append(ready[0])
        done.add(ready[0].name)
    return ordered
