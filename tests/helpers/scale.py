"""`make scale`: memory, time and bytes read at 100k, 1M and 10M images, measured on real runs of the job.

Large datasets are built cheaply: 8 tiny PNG files and four links back to their own folder (`l0` ... `l3` ->
`.`), so that `imgs/l2/l0/l3/5.png` is a distinct path to a real file; a manifest (parquet) lists as many such
paths as wanted. Every run is a separate `jobs/classify.py` process measured from outside (peak RSS of it and its
decode workers, wall time) and from its own log (stage times, bytes read).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from . import ENV, JOB, ROOT

FILES, LINKS = 8, 4
_PROBE = ("import resource,subprocess,sys; p=subprocess.run(sys.argv[2:]); "
          "open(sys.argv[1],'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
          "sys.exit(p.returncode)")


def build_images(root: Path) -> None:
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    for k in range(FILES):
        Image.new("RGB", (16, 12), tuple(int(c) for c in rng.integers(0, 256, 3))).save(root / "imgs" / f"{k}.png")
    for k in range(LINKS):
        link = root / "imgs" / f"l{k}"
        if not link.is_symlink():
            link.symlink_to(".")


def write_manifest(root: Path, count: int) -> Path:
    """A parquet manifest of `count` distinct paths to the 8 files, through the looping links."""
    depth = max(1, math.ceil(math.log(max(2, count // FILES), LINKS)))
    path = root / f"manifest-{count}.parquet"
    if path.exists():
        return path
    writer = pq.ParquetWriter(path, pa.schema([("path", pa.string())]))
    step = 1_000_000
    for start in range(0, count, step):
        index = np.arange(start, min(start + step, count))
        groups, files = index // FILES, index % FILES
        digits = [(groups // LINKS ** d) % LINKS for d in range(depth)]
        parts = ["imgs"] + [np.char.add("l", d.astype(str)) for d in reversed(digits)] + \
            [np.char.add(files.astype(str), ".png")]
        joined = parts[0]
        for part in parts[1:]:
            joined = np.char.add(np.char.add(joined, "/"), part)
        writer.write_table(pa.table({"path": pa.array(joined.tolist(), pa.string())}))
    writer.close()
    return path


def run_job(overrides: list[str]) -> dict:
    """One job as its own process: exit status, wall time, peak RSS (MB) and what its log says."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as peak:
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _PROBE, peak.name, sys.executable, str(JOB), *overrides],
                              capture_output=True, text=True, env=ENV, cwd=ROOT)
        wall = time.perf_counter() - started
        rss = int(peak.read().strip() or 0) / 1024
    log = proc.stdout + proc.stderr
    if proc.returncode:
        raise RuntimeError(f"job failed ({proc.returncode}): {log[-3000:]}")
    stages = {m.group(1): float(m.group(3)) for m in re.finditer(r"stage (\S+) +(\w+) +([\d.]+)s", log)}
    read = re.search(r"([\d,.]+) MB read \(([\d,.]+) MB of chunks, ([\d,.]+) MB of other", log)
    run_seconds = re.search(r"errors, ([\d.]+)s \(", log)
    plan = re.search(r"planned (\d+) chunks in ([\d.]+)s", log)
    encoded = re.search(r"encoded (\d+) images", log)
    return {"wall_s": wall, "peak_rss_mb": rss, "stages": stages,
            "run_s": float(run_seconds.group(1)) if run_seconds else None,
            "mb_read": float(read.group(1).replace(",", "")) if read else None,
            "chunk_mb_read": float(read.group(2).replace(",", "")) if read else None,
            "plan_s": float(plan.group(2)) if plan else 0.0,
            "images_encoded": int(encoded.group(1)) if encoded else 0}


def common(work: Path, manifest: Path, listing: str) -> list[str]:
    return [f"dataset.path={manifest}", f"dataset.listing={listing}", "model=tiny_clip", "labels=colors",
            f"cache_dir={work / ('cache-' + listing)}", "progress=false", "report=false", "device=cpu"]


def shard_case(work: Path, count: int, shards: int) -> dict:
    """Shard 0 of `shards` over a `count`-image dataset (about 10,000 images when count/shards = 10,000); the
    listing and the chunk plan are made first by another shard process, as in a real job."""
    manifest = write_manifest(work, count)
    base = common(work, manifest, f"scale-{count}")
    lister = run_job(base + [f"shard.index={shards - 1}", f"shard.count={shards}",
                             f"hydra.run.dir={work / f'lister-{count}'}"])
    measured = run_job(base + ["shard.index=0", f"shard.count={shards}", f"hydra.run.dir={work / f'shard-{count}'}"])
    return {"images": count, "shards": shards, "lister": lister, "shard": measured}


def whole_case(work: Path, count: int) -> dict:
    """A whole run over `count` images at default settings, then a rerun with another label set (same listing)."""
    manifest = write_manifest(work, count)
    base = common(work, manifest, f"whole-{count}")
    first = run_job(base + [f"hydra.run.dir={work / 'whole'}"])
    rerun = run_job([o if o != "labels=colors" else "labels=shapes" for o in base] +
                    [f"hydra.run.dir={work / 'whole-rerun'}"])
    pool = work / f"cache-whole-{count}" / "encode_images" / "pool"
    chunk_mb = sum(p.stat().st_size for p in pool.glob("*/*/*.chunk")) / 1e6
    return {"images": count, "first": first, "rerun": rerun, "chunk_mb": chunk_mb}


def run_scale(out: Path, shard_sizes=(100_000, 10_000_000), whole=1_000_000, keep: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    # The datasets are loops of links (imgs/l0 -> .): outside the project unless kept, because a tree walk that
    # follows links (setuptools' egg_info, for one: `make install`) would never end in them.
    work = out / "work" if keep else Path(tempfile.mkdtemp(prefix="scale-work-"))
    try:
        build_images(work)
        started = time.perf_counter()
        report = {"shards": [shard_case(work, n, max(1, n // 10_000)) for n in shard_sizes]}
        print(f"[scale] shard cases done at {time.perf_counter() - started:.0f}s", flush=True)
        if whole:
            report["whole"] = whole_case(work, whole)
        report["seconds"] = time.perf_counter() - started
        (out / "scale.json").write_text(json.dumps(report, indent=1))
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return report


def print_table(report: dict) -> None:
    rows = [("case", "images", "peak RSS MB", "wall s", "notes")]
    small, large = report["shards"][0], report["shards"][-1]
    for case in report["shards"]:
        s = case["shard"]
        rows.append((f"shard 0 of {case['shards']:,}", f"{case['images']:,}", f"{s['peak_rss_mb']:.0f}",
                     f"{s['wall_s']:.1f}", f"{s['images_encoded']:,} images encoded; listing + plan by another "
                     f"shard: {case['lister']['stages'].get('discover', 0):.1f}s + {case['lister']['plan_s']:.1f}s"))
    rss, wall = (large["shard"]["peak_rss_mb"] / small["shard"]["peak_rss_mb"],
                 large["shard"]["wall_s"] / small["shard"]["wall_s"])
    per_image = wall * small["shard"]["images_encoded"] / max(1, large["shard"]["images_encoded"])
    rows.append(("  large / small shard", "", f"{rss:.2f}", f"{wall:.2f}",
                 f"targets <= 1.2, <= 1.5; wall per image encoded {per_image:.2f}"))
    for case in report["shards"]:
        lister = case["lister"]
        rows.append((f"listing shard of {case['shards']:,}", f"{case['images']:,}", f"{lister['peak_rss_mb']:.0f}",
                     f"{lister['wall_s']:.1f}", f"lists the manifest ({lister['stages'].get('discover', 0):.1f}s) "
                     f"and plans, then encodes its own {lister['images_encoded']:,} images"))
    listing = large["lister"]["peak_rss_mb"] / small["lister"]["peak_rss_mb"]
    rows.append(("  large / small listing", "", f"{listing:.2f}", "", "target <= 1.2: the manifest is sorted on disk "
                 "in bounded runs, never held whole"))
    if "whole" in report:
        whole = report["whole"]
        first, rerun = whole["first"], whole["rerun"]
        discovery = first["stages"].get("discover", 0.0) + first["plan_s"]
        rows.append(("whole run", f"{whole['images']:,}", f"{first['peak_rss_mb']:.0f}", f"{first['wall_s']:.1f}",
                     f"discovery + planning {discovery:.1f}s = {discovery / first['run_s']:.1%} of the run "
                     "(target <= 1 GB, <= 10%)"))
        classify, stages = rerun["stages"]["classify"], sum(rerun["stages"].values())
        rows.append(("rerun, new label set", f"{whole['images']:,}", f"{rerun['peak_rss_mb']:.0f}",
                     f"{rerun['wall_s']:.1f}", f"stages {stages:.1f}s / classify alone {classify:.1f}s = "
                     f"{stages / classify:.2f} (target <= 1.2); with the run's set-up {rerun['run_s']:.1f}s = "
                     f"{rerun['run_s'] / classify:.2f}, the process {rerun['wall_s'] / classify:.2f}; chunks read "
                     f"{rerun['chunk_mb_read']:.1f} MB of {whole['chunk_mb']:.1f} MB in the pool; all reads "
                     f"{rerun['mb_read']:.0f} MB"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
