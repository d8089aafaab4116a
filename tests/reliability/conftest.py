"""Shared pieces of the reliability suite: a generated dataset, a subprocess runner, and the summary table.

`make test` runs a fast subset (a few kill points); `make reliability` runs everything (`-m ""` plus
RELIABILITY_FULL=1: 24 kill points, 100,000 images for the memory test) and prints the table.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, job_command, log_of, output_differences, read_outputs, render_dataset, run  # noqa: F401

FULL = os.environ.get("RELIABILITY_FULL") == "1"
STATS = {"faults injected": 0, "inputs tried": 0, "runs compared": 0, "mismatches": 0, "peak RSS MB": 0.0}


# Runs a command as its child and writes that job's peak RSS (KB, with its worker processes) to a file: the
# suite's peak is then the jobs' own, not that of whatever else this pytest process ran. Its exit status, and a
# death by signal, are the job's.
_PROBE = ("import os,resource,subprocess,sys; p=subprocess.run(sys.argv[2:]); "
          "open(sys.argv[1],'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
          "os.kill(os.getpid(), -p.returncode) if p.returncode < 0 else sys.exit(p.returncode)")


def run_job(cmd: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    import sys
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".rss") as peak:
        proc = run([sys.executable, "-c", _PROBE, peak.name, *cmd], env=env, timeout=900, **kw)
        text = peak.read().strip()
    proc.peak_mb = int(text) / 1024 if text else None
    if text:
        STATS["peak RSS MB"] = max(STATS["peak RSS MB"], proc.peak_mb)
    return proc


def compare_outputs(got: Path, want: Path) -> list[str]:
    problems = output_differences(got, want)
    STATS["runs compared"] += 1
    STATS["mismatches"] += bool(problems)
    return problems


def leftovers(cache: Path) -> list[str]:
    """Temporary or scratch entries a killed run left in the stages' directories and chunk pools (the
    file-digests memo is not a stage)."""
    return sorted(str(p.relative_to(cache)) for p in cache.glob("*/**/*")
                  if (p.name.startswith(".tmp-") or p.name.endswith(".partial"))
                  and p.relative_to(cache).parts[0] != "file-digests")


@pytest.fixture(scope="session")
def stats():
    return STATS


def pytest_terminal_summary(terminalreporter):
    if not any(STATS[k] for k in ("faults injected", "inputs tried", "runs compared")):
        return
    terminalreporter.write_sep("=", "reliability summary")
    for key, value in STATS.items():
        terminalreporter.write_line(f"  {key:<16} {value:>10.0f}" if isinstance(value, float)
                                    else f"  {key:<16} {value:>10}")
    path = ROOT / "outputs" / "reliability.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({**STATS, "full": FULL, "time": time.time()}, indent=1))
