"""The code that decides each cached stage's output, fingerprinted, so that changing it without bumping the
stage's VERSION fails a test (tests/unit/test_stage_versions.py) instead of silently reusing old cache entries.

A stage's code is its own module, the module of the run context every stage is handed (`ctx.execution`: the
model provider, the device, the sources, whose code the stage runs without importing it), and every module of
`pipeline` those import, transitively, found in the syntax trees (imports inside functions too): nobody lists
them by hand, so a change to the towers, the preprocessing, the dtype table or the engine's hashing flags every
stage that runs it. The digest is of the syntax trees
without docstrings: comments, formatting and docstrings can change freely; anything else needs a new VERSION.
The record (tests/assets/stage_code.json) maps each stage and VERSION to its digest, and an existing line is
never rewritten:

    python -m tests.helpers.stage_code --record    # after bumping a VERSION
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import sys
from functools import lru_cache
from pathlib import Path

RECORD = Path(__file__).resolve().parents[1] / "assets" / "stage_code.json"
PACKAGE = "pipeline"
PACKAGE_DIR = Path(__file__).resolve().parents[2] / PACKAGE
# The stages whose outputs are stored in the cache (cached or content stages); sinks only copy them out.
STAGES = ("discover", "calibration", "export_towers", "encode_labels", "encode_images", "truth", "discover_examples",
          "fit_classifier", "classify")
EXECUTION = f"{PACKAGE}.stages.execution"  # what the runner hands every stage as ctx.execution


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


def module_file(name: str) -> Path:
    """The source file of a module of the package (a package's __init__.py)."""
    relative = Path(*name.split("."))
    package = PACKAGE_DIR.parent / relative / "__init__.py"
    return package if package.is_file() else PACKAGE_DIR.parent / relative.with_suffix(".py")


def is_module(name: str) -> bool:
    return name.split(".")[0] == PACKAGE and module_file(name).is_file()


def _source(name: str, sources: dict[str, str]) -> str:
    return sources[name] if name in sources else module_file(name).read_text(encoding="utf-8")


def direct_imports(name: str, source: str) -> set[str]:
    """The package's modules that `source` (module `name`) imports anywhere in its code, and the packages
    Python runs on the way to them (their __init__)."""
    package = name if module_file(name).name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import zeroshot`
    with_parents = {".".join(n.split(".")[:i]) for n in found for i in range(1, n.count(".") + 2)}
    return {n for n in with_parents if is_module(n)} - {name}


def closure(roots: list[str], sources: dict[str, str] | None = None) -> list[str]:
    """`roots` and every module of the package they import, transitively, sorted."""
    sources = sources or {}
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(direct_imports(name, _source(name, sources)) - seen)
    return sorted(seen)


def stage_modules(stage: str, sources: dict[str, str] | None = None) -> list[str]:
    return closure([f"{PACKAGE}.stages.{stage}", EXECUTION], sources)


@lru_cache(maxsize=None)
def _digest_of_file(name: str) -> str:
    return source_digest(module_file(name).read_text(encoding="utf-8"))


def stage_digest(stage: str, sources: dict[str, str] | None = None) -> str:
    """Digest of the stage's code; `sources` replaces modules' sources (to show what a change would do)."""
    sources = sources or {}
    parts = [f"{name}:{source_digest(sources[name]) if name in sources else _digest_of_file(name)}"
             for name in stage_modules(stage, sources)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def version(stage: str) -> str:
    """The stage's VERSION, read from its module's syntax tree (no import)."""
    tree = ast.parse(module_file(f"{PACKAGE}.stages.{stage}").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "VERSION" for t in node.targets):
            return str(ast.literal_eval(node.value))
    raise SystemExit(f"pipeline/stages/{stage}.py has no VERSION")


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
            problems.append(f"{stage}: the code that decides its output (pipeline/stages/{stage}.py and the "
                            f"{len(stage_modules(stage, sources)) - 1} modules it imports) changed since VERSION "
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
    elif "--modules" in sys.argv[1:]:
        for stage in STAGES:
            print(f"{stage}: {' '.join(stage_modules(stage))}")
    else:
        print("\n".join(stale()) or "every stage VERSION is current")
