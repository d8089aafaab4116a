"""The commands a user types: make classify, the vendor flags, single-image mode, Hydra multirun, and what the
job says when something is wrong."""

import json
import shutil
import sys

import pandas as pd
import pytest

from tests.helpers import JOB, QUIET, SAMPLE_IMAGES, TINY_CHINESE_CLIP, TINY_CLIP, log_of, run

pytestmark = pytest.mark.slow


def test_make_classify_with_label_list_and_rerun_into_same_out(tmp_path):
    out = tmp_path / "my out"
    cmd = ["make", "-s", "classify", f"DATASET={SAMPLE_IMAGES}", f"MODEL={TINY_CHINESE_CLIP}",
           "LABEL_LIST=红色圆形,blue square,it's a star", "TEMPLATE=一张_的照片。", f"OUT={out}",
           f"CACHE={tmp_path / 'cache'}", "BATCH=4", "TOPK=2", "DEVICE=cpu", f"ARGS={' '.join(QUIET)}"]
    first = run(cmd)
    assert first.returncode == 0, first.stderr
    res = json.loads((out / "res.json").read_text(encoding="utf-8"))
    assert set(res.values()) <= {"红色圆形", "blue square", "it's a star"} and len(res) > 20
    preds = pd.read_parquet(out / "predictions.parquet")
    assert preds["topk_labels"].map(len).eq(2).all()
    assert "images classified" in log_of(first)
    (out / "res.json").write_text("{}")
    second = run(cmd)
    assert second.returncode == 0 and json.loads((out / "res.json").read_text(encoding="utf-8")) == res
    assert "encode_images reused" in log_of(second)


def test_make_classify_with_a_label_file_names_the_model_after_its_folder(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("圆形\n正方形\n三角形\n星形\n十字形\n", encoding="utf-8")
    model = tmp_path / "my-chinese-clip"
    shutil.copytree(TINY_CHINESE_CLIP, model)
    proc = run(["make", "-s", "classify", f"DATASET={SAMPLE_IMAGES}", f"MODEL={model}", f"LABELS={labels}",
                "TEMPLATE=一张_的照片。", f"OUT={tmp_path / 'out'}", f"CACHE={tmp_path / 'cache'}",
                f"ARGS={' '.join(QUIET)}"])
    assert proc.returncode == 0, log_of(proc)
    res = json.loads((tmp_path / "out" / "res.json").read_text(encoding="utf-8"))
    assert set(res.values()) <= {"圆形", "正方形", "三角形", "星形", "十字形"} and len(res) == 38
    from pipeline.outputs.writers import read_metadata

    meta = read_metadata(tmp_path / "out" / "predictions.parquet")
    assert meta["model"]["name"] == "my-chinese-clip" and meta["label_set"]["name"] == "custom"
    assert "my-chinese-clip (chinese_clip)" in (tmp_path / "out" / "report.html").read_text(encoding="utf-8")


@pytest.mark.parametrize("args,message", [
    ([f"DATASET={SAMPLE_IMAGES}", f"MODEL={TINY_CLIP}"], "no labels given"),
    ([f"DATASET={SAMPLE_IMAGES}", "LABEL_LIST=a,b"], "no model given"),
    ([f"MODEL={TINY_CLIP}", "LABEL_LIST=a,b"], "no input"),
])
def test_make_classify_guesses_nothing(tmp_path, args, message):
    proc = run(["make", "-s", "classify", *args, f"OUT={tmp_path / 'out'}", f"CACHE={tmp_path / 'cache'}"])
    assert proc.returncode != 0 and message in log_of(proc) and "Traceback" not in proc.stderr


def test_vendor_flags_and_single_image(tmp_path):
    image = sorted(SAMPLE_IMAGES.glob("*.jpg"))[0]
    proc = run([sys.executable, str(JOB), "--model_path", str(TINY_CLIP), "--input_image", str(image),
                "--label_list", "circle,square,triangle,star,cross", "--results_save_path", str(tmp_path / "o"),
                "--cache_dir", str(tmp_path / "c")] + QUIET)
    assert proc.returncode == 0, proc.stderr
    lines = [line.split() for line in proc.stdout.splitlines() if line.startswith("  ")]
    probs = [float(p) for p, _ in lines]
    assert [label for _, label in lines] and len(lines) == 5 and probs == sorted(probs, reverse=True)
    assert abs(sum(probs) - 1) < 1e-3
    assert json.loads((tmp_path / "o" / "res.json").read_text()) == {image.name: lines[0][1]}


def test_single_image_that_is_not_an_image_says_why_and_fails(tmp_path):
    fake = tmp_path / "cat.jpg"
    fake.write_text("this is a text file, not a picture")
    proc = run(["make", "-s", "classify", f"IMAGE={fake}", f"MODEL={TINY_CLIP}", "LABEL_LIST=cat,dog",
                f"OUT={tmp_path / 'out'}", f"CACHE={tmp_path / 'cache'}", f"ARGS={' '.join(QUIET)}"])
    assert proc.returncode != 0
    assert "cat.jpg: not classified: UnidentifiedImageError: not a recognised image format" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dataset_summary_names_the_error_kinds(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in sorted(p.name for p in SAMPLE_IMAGES.glob("*.jpg"))[:4]:
        shutil.copy(SAMPLE_IMAGES / name, data / name)
    for i in range(5):
        (data / f"text{i}.png").write_text("not an image")
    (data / "empty.jpg").write_bytes(b"")
    proc = run([sys.executable, str(JOB), f"dataset.path={data}", f"model.path={TINY_CLIP}", "labels=shapes",
                f"hydra.run.dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}"] + QUIET)
    assert proc.returncode == 0, log_of(proc)
    log = log_of(proc)
    assert "4/10 images classified, 6 errors" in log
    assert "UnidentifiedImageError: 5: text0.png, text1.png, text2.png and 2 more" in log
    assert "EmptyFile: 1: empty.jpg" in log


def test_user_error_exits_2_with_message(tmp_path):
    proc = run([sys.executable, str(JOB), f"model.path={TINY_CLIP}", "labels=pairs_zh", "dataset=sample",
                f"hydra.run.dir={tmp_path}"] + QUIET)
    assert proc.returncode == 2
    assert "does not take Chinese" in log_of(proc) and "Traceback" not in proc.stderr


def test_multirun_over_label_sets_reuses_image_embeddings(tmp_path):
    proc = run([sys.executable, str(JOB), "-m", "dataset=sample", "model=tiny_clip", "labels=shapes,colors",
                f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"] + QUIET)
    assert proc.returncode == 0, proc.stderr
    shapes = json.loads((tmp_path / "sweep" / "0" / "res.json").read_text())
    colors = json.loads((tmp_path / "sweep" / "1" / "res.json").read_text())
    assert shapes.keys() == colors.keys() and set(colors.values()) <= {"red", "green", "blue", "yellow",
                                                                        "purple", "orange"}
    log = (tmp_path / "sweep" / "1" / "classify.log").read_text()
    assert "encode_images   reused" in log


def test_progress_in_a_log_file_is_lines_not_bars(tmp_path):
    proc = run([sys.executable, str(JOB), "dataset=sample", "model=tiny_clip", "labels=shapes", "device=cpu",
                "encode.num_workers=0", "progress=true", "progress_interval=0", f"hydra.run.dir={tmp_path / 'o'}",
                f"cache_dir={tmp_path / 'c'}"])  # stdout and stderr are pipes here, as under SLURM
    assert proc.returncode == 0, log_of(proc)
    log = log_of(proc)
    assert "\r" not in log and "encode images: 38/38 img (100.0%)" in log and "classify: 38/38 img" in log
    assert "ETA 0:00:00" in log


@pytest.mark.parametrize("override,choices", [("cache_lock=bogus", "[auto, flock, soft]"),
                                              ("dataset.format=bogus", "[auto, folder, manifest, tar, bucket]")])
def test_a_closed_choice_outside_its_values_stops_before_any_work(tmp_path, override, choices):
    proc = run([sys.executable, str(JOB), "dataset=sample", "model=tiny_clip", "labels=shapes", override,
                f"hydra.run.dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}"] + QUIET)
    assert proc.returncode == 2, log_of(proc)
    assert f"Invalid value 'bogus', expected one of {choices}" in log_of(proc)
    assert "stage discover" not in log_of(proc) and not (tmp_path / "cache").exists()
