"""The layout shows the architecture, and the arrows point one way: jobs -> workflow -> stages -> engine.

The engine imports nothing above it, the zero-shot maths does no I/O, and the runtime package never reaches
into the test tooling (fixture training, renders, benchmark helpers) that lives in tests/helpers."""

import ast
from pathlib import Path

from tests.helpers import ROOT

PACKAGE = ROOT / "pipeline"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved)."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}
    return names


def _ours(names: set[str], prefix: str) -> set[str]:
    return {n for n in names if n == prefix or n.startswith(prefix + ".")}


def test_engine_imports_nothing_above_it():
    for path in (PACKAGE / "engine").glob("*.py"):
        above = {n for n in _ours(_imports(path), "pipeline") if not n.startswith("pipeline.engine")}
        assert above == set(), f"{path.name} imports {sorted(above)}"


def test_stages_import_neither_the_workflow_nor_jobs():
    for path in (PACKAGE / "stages").glob("*.py"):
        names = _imports(path)
        assert not _ours(names, "pipeline.workflow") | _ours(names, "pipeline.cli") | _ours(names, "jobs"), path


def test_zero_shot_maths_is_pure():
    names = _imports(PACKAGE / "zeroshot.py")
    allowed = {"__future__", "dataclasses", "typing", "numpy", "pipeline.labels", "pipeline.labels.apply_template"}
    assert {n for n in names if not n.startswith(("__future__.", "dataclasses.", "typing."))} <= allowed
    source = (PACKAGE / "zeroshot.py").read_text()
    assert "open(" not in source and "Path" not in source


def test_few_shot_maths_is_pure():
    names = {n for n in _imports(PACKAGE / "fewshot.py")
             if not n.startswith(("__future__.", "dataclasses.", "typing.", "enum.", "math."))}
    assert names <= {"__future__", "dataclasses", "typing", "enum", "math", "numpy", "pipeline.families",
                     "pipeline.families.SIGMOID", "pipeline.zeroshot", "pipeline.zeroshot.Scoring"}, names
    source = (PACKAGE / "fewshot.py").read_text()
    assert "open(" not in source and "Path" not in source


def test_runtime_package_never_imports_test_tooling():
    for path in PACKAGE.rglob("*.py"):
        names = _imports(path)
        assert not _ours(names, "tests") and not _ours(names, "jobs"), path


def test_one_module_per_stage_with_its_version():
    import importlib

    for stage in ("discover", "encode_labels", "encode_images", "truth", "discover_examples", "fit_classifier",
                  "classify", "publish", "report"):
        module = importlib.import_module(f"pipeline.stages.{stage}")
        assert isinstance(module.VERSION, int), stage
