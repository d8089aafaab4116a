"""Packaging: the project installs into an environment that already has its own torch (a CUDA or NPU build, or a
newer release) without touching that torch, and the extras the README names exist.

pyproject.toml asks only a range of torch; the exact CPU wheel is `make install`'s business, not the metadata's.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import sys
import time
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import ROOT, run

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
EXTRAS = PROJECT["optional-dependencies"]
# Every extra the README's Install section names.
DOCUMENTED_EXTRAS = {"npu", "onnx", "openvino", "torchao", "slurm", "joblib", "s3", "gcs", "http"}
# What the tests exercise: all three runtimes, both launchers, S3 and HTTP sources.
TESTED_EXTRAS = ["onnx", "openvino", "torchao", "slurm", "joblib", "s3", "http"]
FAKE_TORCH = "2.6.0"  # inside the range, older than the wheel `make install` takes: pip must leave it be


def _requirements(names: list[str]) -> dict[str, Requirement]:
    """Requirements by canonical name; self-references (`clip-batch-classify[onnx]`) expanded."""
    out = {}
    for line in names:
        req = Requirement(line)
        if canonicalize_name(req.name) == canonicalize_name(PROJECT["name"]):
            for extra in req.extras:
                out.update(_requirements(EXTRAS[extra]))
        else:
            out[canonicalize_name(req.name)] = req
    return out


def test_torch_is_a_range_that_admits_the_makefile_wheel_and_newer_releases():
    """An exact pin would make pip replace a CUDA, NPU or newer torch with the CPU wheel this machine installs."""
    torch = _requirements(PROJECT["dependencies"])["torch"]
    assert not any(spec.operator in ("==", "===", "~=") for spec in torch.specifier), torch
    pinned = re.search(r"pip install -q torch==(\S+)", (ROOT / "Makefile").read_text(encoding="utf-8")).group(1)
    for version in (pinned, FAKE_TORCH, "2.13.0+cu128", "3.0.0"):
        assert torch.specifier.contains(version), (torch, version)


def test_every_documented_extra_exists_and_the_test_extra_covers_the_runtimes():
    """`pip install -e '.[x]'` with an unknown x only warns; a README naming one that is gone misleads quietly."""
    readme = set(re.findall(r"\.\[([a-z0-9_,-]+)\]", (ROOT / "README.md").read_text(encoding="utf-8")))
    named = DOCUMENTED_EXTRAS | {extra for group in readme for extra in group.split(",")}
    assert named <= set(EXTRAS), named - set(EXTRAS)
    test = _requirements(EXTRAS["test"])
    for extra in TESTED_EXTRAS:
        assert set(_requirements(EXTRAS[extra])) <= set(test), (extra, set(_requirements(EXTRAS[extra])) - set(test))
    everything = set(_requirements(EXTRAS["all"]))
    for extra in set(EXTRAS) - {"all", "npu", "test"}:
        assert set(_requirements(EXTRAS[extra])) <= everything, extra
    assert not {"torchvision", "torch-npu"} & everything  # those need matching hardware and a matching torch


def _fake_torch_wheel(folder: Path, version: str) -> Path:
    """A pure-Python wheel named torch: nothing but its metadata and `torch.__version__`."""
    dist_info = f"torch-{version}.dist-info"
    files = {
        "torch/__init__.py": f'__version__ = "{version}"\n',
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n"
                                 "Summary: stand-in for tests/integration/test_install.py\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test_install\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    files[f"{dist_info}/RECORD"] = "\n".join(record + [f"{dist_info}/RECORD,,"]) + "\n"
    wheel = folder / f"torch-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


@pytest.mark.slow
def test_installing_into_an_env_with_its_own_torch_leaves_that_torch_alone(tmp_path):
    """A fresh venv with a (fake) torch 2.6.0 stands for a CUDA or NPU environment: pip must plan to install the
    project and the extra's packages around it, never another torch. Needs the package index (one resolution)."""
    venv = tmp_path / "venv"
    proc = run([sys.executable, "-m", "venv", str(venv)], timeout=300)
    assert proc.returncode == 0, proc.stderr
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    wheel = _fake_torch_wheel(tmp_path, FAKE_TORCH)
    proc = run([*pip, "install", "-q", "--no-index", "--no-deps", str(wheel)], timeout=300)
    assert proc.returncode == 0, proc.stderr
    # A copy of the metadata, so that the editable build's egg-info lands here, not in the checkout.
    project = tmp_path / "project"
    (project / "pipeline").mkdir(parents=True)
    (project / "pipeline" / "__init__.py").write_text("", encoding="utf-8")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    report = tmp_path / "report.json"
    start = time.monotonic()
    proc = run([*pip, "install", "-q", "--dry-run", "--report", str(report), "-e", f"{project}[slurm]"], timeout=900)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, f"pip could not resolve the project (is the package index reachable?):\n{proc.stderr}"
    planned = {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
               for item in json.loads(report.read_text(encoding="utf-8"))["install"]}
    assert "torch" not in planned, f"pip would replace torch {FAKE_TORCH} with {planned.get('torch')}"
    assert {"clip-batch-classify", "hydra-submitit-launcher", "transformers", "sentencepiece"} <= set(planned), planned
    shown = run([*pip, "show", "torch"], timeout=120)
    assert f"Version: {FAKE_TORCH}" in shown.stdout.splitlines(), shown.stdout
    print(f"dry-run resolution: {seconds:.1f} s, {len(planned)} packages planned")
