"""A small DAG runner with fingerprinted, resumable, checksummed stage outputs.

It knows nothing about images or models. A stage is a plain function `fn(ctx, inputs)` with declared inputs (other
stages' names) and params (the JSON-able config it reads). Its output is a directory in the cache named by a
fingerprint of (stage name, version, params, input fingerprints), as in DVC and HF `datasets`; "output exists and
checks out" means done, as in Luigi and doit. Three kinds of stage:

- `cached`: skipped when its fingerprint's output is present and every file matches the checksum in its manifest;
- `content`: always runs (it reads the outside world, e.g. lists a folder) and is fingerprinted by what it wrote,
  so downstream stages are skipped exactly when that content did not change;
- `sink`: always runs and publishes outside the cache (e.g. into a run directory).

Crash safety: outputs are built in a temporary directory and renamed into place whole; a per-fingerprint lock makes
a second concurrent run wait and then reuse; long stages write checksummed chunks to `ctx.scratch` as they go
(`ChunkStore`), which survives a kill and is removed once the stage's output is complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .faults import checkpoint
from .storage import read_json, sha256_file, sha256_json, write_json

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
CACHED, CONTENT, SINK = "cached", "content", "sink"


@dataclass(frozen=True)
class Artifact:
    stage: str
    fingerprint: str
    path: Path | None

    def file(self, name: str) -> Path:
        assert self.path is not None, f"stage {self.stage} has no stored output"
        return self.path / name


@dataclass
class StageContext:
    out: Path | None  # write the stage's files here (a temporary directory, renamed into the cache on success)
    scratch: Path | None  # survives a crash; for chunked progress of long stages
    fingerprint: str | None


StageFn = Callable[[StageContext, "dict[str, Artifact]"], None]


@dataclass(frozen=True)
class Stage:
    name: str
    fn: StageFn
    inputs: tuple[str, ...] = ()
    params: Any = None
    version: int = 1
    kind: str = CACHED

    def fingerprint(self, inputs: dict[str, Artifact], content: str | None = None) -> str:
        return sha256_json({
            "stage": self.name, "version": self.version, "params": self.params,
            "inputs": {name: art.fingerprint for name, art in sorted(inputs.items())}, "content": content,
        })


@dataclass
class StageReport:
    name: str
    status: str  # ran | reused | resumed | unchanged | changed | published
    seconds: float
    fingerprint: str | None = None


@dataclass
class Runner:
    cache_dir: Path
    reports: list[StageReport] = field(default_factory=list)

    def run(self, stages: list[Stage], targets: tuple[str, ...] | None = None) -> dict[str, Artifact]:
        """Run `stages` in dependency order; with `targets`, only those and what they depend on."""
        results: dict[str, Artifact] = {}
        ordered = topological_order(stages)
        if targets is not None:
            needed = _ancestors({s.name: s for s in ordered}, targets)
            ordered = [s for s in ordered if s.name in needed]
        for stage in ordered:
            started = time.perf_counter()
            checkpoint("stage.before")
            inputs = {name: results[name] for name in stage.inputs}
            artifact, status = self._run_one(stage, inputs)
            results[stage.name] = artifact
            report = StageReport(stage.name, status, time.perf_counter() - started, artifact.fingerprint)
            self.reports.append(report)
            fp = f" [{artifact.fingerprint[:12]}]" if artifact.fingerprint else ""
            log.info("stage %-15s %-9s %6.2fs%s", stage.name, status, report.seconds, fp)
        return results

    def scratch_dir(self, stage: Stage, inputs: dict[str, Artifact]) -> Path:
        """Where a cached stage keeps its chunked progress: lets several workers fill one stage's chunks."""
        return self.cache_dir / stage.name / f"{stage.fingerprint(inputs)}.partial"

    def _run_one(self, stage: Stage, inputs: dict[str, Artifact]) -> tuple[Artifact, str]:
        if stage.kind == SINK:
            stage.fn(StageContext(out=None, scratch=None, fingerprint=None), inputs)
            return Artifact(stage.name, "", None), "published"
        if stage.kind == CONTENT:
            return self._run_content(stage, inputs)
        if stage.kind != CACHED:
            raise ValueError(f"stage {stage.name}: unknown kind {stage.kind!r}")
        fingerprint = stage.fingerprint(inputs)
        final = self.cache_dir / stage.name / fingerprint
        with _locked(final.with_suffix(".lock")):
            if verify_output(final):
                return Artifact(stage.name, fingerprint, final), "reused"
            scratch = final.with_suffix(".partial")
            resumed = scratch.is_dir() and any(scratch.iterdir())
            self._build(stage, inputs, final, scratch, fingerprint)
            return Artifact(stage.name, fingerprint, final), "resumed" if resumed else "ran"

    def _run_content(self, stage: Stage, inputs: dict[str, Artifact]) -> tuple[Artifact, str]:
        stage_dir = self.cache_dir / stage.name
        tmp = _fresh_tmp(stage_dir, "content")
        try:
            stage.fn(StageContext(out=tmp, scratch=None, fingerprint=None), inputs)
            files = _file_digests(tmp)
            fingerprint = stage.fingerprint(inputs, content=sha256_json(files))
            final = stage_dir / fingerprint
            with _locked(final.with_suffix(".lock")):
                if verify_output(final):
                    return Artifact(stage.name, fingerprint, final), "unchanged"
                _discard(final)
                _seal(tmp, final, stage, fingerprint, files)
            return Artifact(stage.name, fingerprint, final), "changed"
        finally:
            _discard(tmp)

    def _build(self, stage: Stage, inputs: dict[str, Artifact], final: Path, scratch: Path, fp: str) -> None:
        if final.exists():
            log.warning("stage %s: cached output %s failed its checksum; discarding and recomputing", stage.name, final)
            _discard(final)
        scratch.mkdir(parents=True, exist_ok=True)
        tmp = _fresh_tmp(final.parent, fp[:16])
        try:
            stage.fn(StageContext(out=tmp, scratch=scratch, fingerprint=fp), inputs)
            _seal(tmp, final, stage, fp, _file_digests(tmp))
        finally:
            _discard(tmp)
        _discard(scratch)


def _ancestors(by_name: dict[str, Stage], targets: tuple[str, ...]) -> set[str]:
    needed, todo = set(), list(targets)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(by_name[name].inputs)
    return needed


def topological_order(stages: list[Stage]) -> list[Stage]:
    """Dependency order, stable with respect to the given order; rejects unknown inputs and cycles."""
    by_name = {s.name: s for s in stages}
    if len(by_name) != len(stages):
        raise ValueError("stage names must be unique")
    for stage in stages:
        missing = [i for i in stage.inputs if i not in by_name]
        if missing:
            raise ValueError(f"stage {stage.name} needs unknown stage(s) {missing}")
    ordered: list[Stage] = []
    done: set[str] = set()
    while len(ordered) < len(stages):
        ready = [s for s in stages if s.name not in done and all(i in done for i in s.inputs)]
        if not ready:
            raise ValueError(f"dependency cycle among {sorted(set(by_name) - done)}")
        ordered.append(ready[0])
        done.add(ready[0].name)
    return ordered


def verify_output(directory: Path) -> bool:
    """True when `directory` holds a complete output whose files all match their manifest checksums."""
    manifest_file = directory / MANIFEST
    if not manifest_file.is_file():
        return False
    try:
        files = read_json(manifest_file)["files"]
        for name, meta in files.items():
            path = directory / name
            if path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
                log.warning("checksum mismatch in %s", path)
                return False
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("unreadable cache entry %s: %s", directory, exc)
        return False
    return True


def _file_digests(directory: Path) -> dict[str, dict]:
    return {
        p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.rglob("*")) if p.is_file()
    }


def _seal(tmp: Path, final: Path, stage: Stage, fingerprint: str, files: dict[str, dict]) -> None:
    write_json(tmp / MANIFEST, {"stage": stage.name, "version": stage.version, "fingerprint": fingerprint,
                                "params": stage.params, "files": files, "created": time.time()})
    checkpoint("stage.before_seal")
    os.replace(tmp, final)  # a directory rename is atomic: readers see all of it or nothing


def _fresh_tmp(parent: Path, tag: str) -> Path:
    tmp = parent / f".tmp-{tag}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def _discard(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class ChunkStore:
    """Checksummed chunk files in a stage's scratch directory, each written atomically.

    A chunk is stored as `<key>.<sha256 prefix>.chunk`: a file only exists once complete, and its name carries the
    checksum, so a truncated or bit-rotted chunk is detected on resume, discarded and recomputed.
    """

    SUFFIX = ".chunk"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)

    def completed(self) -> dict[str, Path]:
        done: dict[str, Path] = {}
        for path in sorted(self.directory.glob(f"*{self.SUFFIX}")):
            key, _, digest = path.name[: -len(self.SUFFIX)].rpartition(".")
            if key and sha256_file(path).startswith(digest):
                done[key] = path
            else:
                log.warning("discarding corrupt chunk %s (checksum mismatch); it will be recomputed", path)
                path.unlink(missing_ok=True)
        return done

    def put(self, key: str, write: Callable[[Path], None]) -> Path:
        tmp = self.directory / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            write(tmp)
            digest = hashlib.sha256(tmp.read_bytes()).hexdigest()[:16]
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            final = self.directory / f"{key}.{digest}{self.SUFFIX}"
            checkpoint("chunk.before_rename")
            os.replace(tmp, final)
            checkpoint("chunk.after_write")
            return final
        finally:
            tmp.unlink(missing_ok=True)
