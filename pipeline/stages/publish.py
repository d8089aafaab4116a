"""Stage `publish` (a sink): copy the classify stage's results into the run directory.

Each file replaces its old version atomically, `res.json` last (its presence says the others are current), and
each copy is checked against the cache entry's manifest in the same read: a damaged entry is recomputed.
"""

from __future__ import annotations

from pathlib import Path

from ..engine import Artifact, InputCorrupt, StageContext, failpoint
from ..engine.cache import read_manifest
from ..engine.files import copy_atomic, remove
from .classify import OPTIONAL_FILES, OUTPUT_FILES

VERSION = 1


def publish(ctx: StageContext, *, results: Artifact, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = read_manifest(results.path)["files"]
    for name in OPTIONAL_FILES:
        if name in files:
            _copy(results, name, out, files)
        else:
            remove(out / name)  # a stale file from an earlier run into this folder
    for name in OUTPUT_FILES:
        _copy(results, name, out, files)
        failpoint("publish.file")


def _copy(results: Artifact, name: str, out: Path, files: dict) -> None:
    if copy_atomic(results.file(name), out / name) != files[name]["sha256"]:
        raise InputCorrupt(results, f"{name} does not match its manifest")
