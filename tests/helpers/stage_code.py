"""The code that decides each cached stage's output, fingerprinted, so that changing it without bumping the
stage's VERSION fails a test (tests/unit/test_stage_versions.py) instead of silently reusing old cache entries.

A stage's code is its own module plus the modules it names in `CODE`. The digest is of their syntax trees
without docstrings: comments, formatting and docstrings can change freely; anything else needs a new VERSION.
The record (tests/assets/stage_code.json) maps each stage and VERSION to its digest, and an existing line is
never rewritten:

    python -m tests.helpers.stage_code --record    # after bumping a VERSION
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import json
import sys
from pathlib import Path

RECORD = Path(__file__).resolve().parents[1] / "assets" / "stage_code.json"
STAGES = ("discover", "calibration", "export_towers", "encode_labels", "encode_images", "truth", "classify")  # the cached or content stages


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def source_digest(source: str) -> str:
    tree = _strip_docstrings(ast.parse(source))
    return hashlib.sha256(ast.dump(tree, annotate_fields=False, include_attributes=False).encode()).hexdigest()


def stage_modules(stage: str) -> list[str]:
    module = importlib.import_module(f"pipeline.stages.{stage}")
    return [module.__name__, *module.CODE]


def stage_digest(stage: str, sources: dict[str, str] | None = None) -> str:
    """Digest of the stage's code; `sources` replaces a module's source (to show what a change would do)."""
    sources = sources or {}
    parts = []
    for name in stage_modules(stage):
        text = sources.get(name) or inspect.getsource(importlib.import_module(name))
        parts.append(f"{name}:{source_digest(text)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def version(stage: str) -> str:
    return str(importlib.import_module(f"pipeline.stages.{stage}").VERSION)


def read_record() -> dict[str, dict[str, str]]:
    return json.loads(RECORD.read_text()) if RECORD.exists() else {}


def stale(sources: dict[str, str] | None = None) -> list[str]:
    """What is wrong with the record against the code, one line per stage ([] when every VERSION is current)."""
    record, problems = read_record(), []
    for stage in STAGES:
        digest, current = stage_digest(stage, sources), version(stage)
        recorded = record.get(stage, {}).get(current)
        if recorded is None:
            problems.append(f"{stage}: VERSION {current} is not recorded; run python -m tests.helpers.stage_code "
                            "--record")
        elif recorded != digest:
            modules = ", ".join(stage_modules(stage))
            problems.append(f"{stage}: the code that decides its output ({modules}) changed since VERSION "
                            f"{current} was recorded; bump VERSION in pipeline/stages/{stage}.py (old cache entries "
                            "would otherwise pass as current), then run python -m tests.helpers.stage_code --record")
    return problems


def record() -> list[str]:
    """Add the current (stage, VERSION) digests to the record; never rewrite an existing one."""
    data, added = read_record(), []
    for stage in STAGES:
        digest, current = stage_digest(stage), version(stage)
        known = data.setdefault(stage, {})
        if current in known and known[current] != digest:
            raise SystemExit(f"{stage}: VERSION {current} is recorded with other code; bump its VERSION first")
        if current not in known:
            known[current] = digest
            added.append(f"{stage} {current}")
    RECORD.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return added


if __name__ == "__main__":
    if "--record" in sys.argv[1:]:
        print("recorded:", ", ".join(record()) or "nothing new")
    else:
        print("\n".join(stale()) or "every stage VERSION is current")
