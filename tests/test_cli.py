"""The commands a user types: make classify, the vendor flags, single-image mode, Hydra multirun."""

import json
import os
import subprocess
import sys

import pandas as pd
from conftest import ROOT, SAMPLE_IMAGES, TINY_CHINESE_CLIP, TINY_CLIP

JOB = [sys.executable, str(ROOT / "jobs" / "classify.py")]
QUIET = ["progress=false", "device=cpu", "encode.num_workers=0"]


def _run(cmd, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=kw.pop("cwd", ROOT), env=env, timeout=300, **kw)


def test_make_classify_with_label_list_and_rerun_into_same_out(tmp_path):
    out = tmp_path / "my out"
    cmd = ["make", "-s", "classify", f"DATASET={SAMPLE_IMAGES}", f"MODEL={TINY_CHINESE_CLIP}",
           "LABEL_LIST=红色圆形,blue square,it's a star", "TEMPLATE=一张_的照片。", f"OUT={out}",
           f"CACHE={tmp_path / 'cache'}", "BATCH=4", "TOPK=2", "DEVICE=cpu", f"ARGS={' '.join(QUIET)}"]
    first = _run(cmd)
    assert first.returncode == 0, first.stderr
    res = json.loads((out / "res.json").read_text(encoding="utf-8"))
    assert set(res.values()) <= {"红色圆形", "blue square", "it's a star"} and len(res) > 20
    preds = pd.read_parquet(out / "predictions.parquet")
    assert preds["topk_labels"].map(len).eq(2).all()
    assert "images classified" in first.stderr + first.stdout
    (out / "res.json").write_text("{}")
    second = _run(cmd)
    assert second.returncode == 0 and json.loads((out / "res.json").read_text(encoding="utf-8")) == res
    assert "encode_images reused" in second.stderr + second.stdout


def test_vendor_flags_and_single_image(tmp_path):
    image = sorted(SAMPLE_IMAGES.glob("*.jpg"))[0]
    proc = _run(JOB + ["--model_path", str(TINY_CLIP), "--input_image", str(image), "--label_list",
                       "circle,square,triangle,star,cross", "--results_save_path", str(tmp_path / "o"),
                       "--cache_dir", str(tmp_path / "c")] + QUIET)
    assert proc.returncode == 0, proc.stderr
    lines = [line.split() for line in proc.stdout.splitlines() if line.startswith("  ")]
    probs = [float(p) for p, _ in lines]
    assert [label for _, label in lines] and len(lines) == 5 and probs == sorted(probs, reverse=True)
    assert abs(sum(probs) - 1) < 1e-3
    assert json.loads((tmp_path / "o" / "res.json").read_text()) == {image.name: lines[0][1]}


def test_user_error_exits_2_with_message(tmp_path):
    proc = _run(JOB + [f"model.path={TINY_CLIP}", "labels=pairs_zh", f"hydra.run.dir={tmp_path}"] + QUIET)
    assert proc.returncode == 2
    assert "does not take Chinese" in proc.stderr + proc.stdout and "Traceback" not in proc.stderr


def test_multirun_over_label_sets_reuses_image_embeddings(tmp_path):
    proc = _run(JOB + ["-m", "labels=shapes,colors", f"cache_dir={tmp_path / 'cache'}",
                       f"hydra.sweep.dir={tmp_path / 'sweep'}"] + QUIET)
    assert proc.returncode == 0, proc.stderr
    shapes = json.loads((tmp_path / "sweep" / "0" / "res.json").read_text())
    colors = json.loads((tmp_path / "sweep" / "1" / "res.json").read_text())
    assert shapes.keys() == colors.keys() and set(colors.values()) <= {"red", "green", "blue", "yellow",
                                                                        "purple", "orange"}
    log = (tmp_path / "sweep" / "1" / "classify.log").read_text()
    assert "encode_images   reused" in log
