"""Every command line the README documents runs here, verbatim, as a user would type it, and does what the
README says.

The commands run in a workspace that looks like a checkout (the project's files, linked) with what the README's
examples name: `photos` (the sample images), `models/clip-vit-large-patch14` and
`models/chinese-clip-vit-base-patch16` (the tiny fixture models of those families), `labels.txt` and `cat.jpg`.
A command added to the README without a check here fails `test_every_readme_command_is_checked`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pandas as pd
import pytest
import torch

from pipeline.devices import cpu_has_native_bf16
from pipeline.outputs.writers import read_metadata
from tests.helpers import ENV, ROOT, SAMPLE_IMAGES, TINY_CHINESE_CLIP, TINY_CLIP, write_shards
from tests.helpers.servers import s3_server

pytestmark = pytest.mark.slow
README = ROOT / "README.md"
LABELS = ["cat", "dog", "red fox"]
# Documented but not run from here, and why.
NOT_RUN_HERE = {
    "make test": "it is this test suite",
}


def blocks(language: str) -> list[str]:
    """The fenced code blocks of the README in `language`."""
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def readme_commands() -> list[str]:
    lines = []
    for block in blocks("sh"):
        lines += [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return lines


def _without_comment(command: str) -> str:
    return re.sub(r"\s+#\s.*$", "", command).strip()


HTTP_PORT = 8765  # the README's web-server example
S3_ENV: dict[str, str] = {}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Iterator[Path]:
    """A checkout-like folder with the README examples' data: photos, models, labels.txt, cat.jpg, photos.csv,
    shards/ (with .cls truth), urls.csv behind a web server on 127.0.0.1:8765, and an S3 endpoint (moto) holding
    s3://my-bucket/photos/, reached through the standard AWS_* environment."""
    ws = tmp_path_factory.mktemp("checkout")
    for entry in ROOT.iterdir():
        if entry.name not in ("outputs", ".git"):
            (ws / entry.name).symlink_to(entry)
    shutil.copytree(SAMPLE_IMAGES, ws / "photos")
    images = sorted(p for p in (ws / "photos").iterdir())
    (ws / "models").mkdir()
    shutil.copytree(TINY_CLIP, ws / "models" / "clip-vit-large-patch14")
    shutil.copytree(TINY_CHINESE_CLIP, ws / "models" / "chinese-clip-vit-base-patch16")
    (ws / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    for number, label in enumerate(LABELS):  # examples/<label>/: three sample images each
        (ws / "examples" / label).mkdir(parents=True)
        for image in images[number * 3:number * 3 + 3]:
            shutil.copy(image, ws / "examples" / label / image.name)
    # a reviewed review.parquet: dataset keys, labels set by hand
    pd.DataFrame({"path": [p.name for p in images[:9]], "label": [LABELS[i % 3] for i in range(9)]}) \
        .to_csv(ws / "reviewed.csv", index=False)
    shutil.copy(sorted(SAMPLE_IMAGES.glob("*.jpg"))[0], ws / "cat.jpg")
    pd.DataFrame({"path": [f"photos/{p.name}" for p in images]}).to_csv(ws / "photos.csv", index=False)
    write_shards(ws / "shards", images, per_shard=8, truth={p.name: LABELS[i % 2] for i, p in enumerate(images)})
    pd.DataFrame({"path": [f"http://127.0.0.1:{HTTP_PORT}/photos/{p.name}" for p in images]}) \
        .to_csv(ws / "urls.csv", index=False)
    web = subprocess.Popen(["python3", "-m", "http.server", str(HTTP_PORT), "--bind", "127.0.0.1", "--directory",
                            str(ws)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with s3_server() as s3:
            fs = s3.filesystem()
            fs.mkdir("my-bucket")
            for image in images:
                fs.pipe(f"my-bucket/photos/{image.name}", image.read_bytes())
            S3_ENV.update(s3.env)
            yield ws
    finally:
        web.kill()
        web.wait()


def _shell(ws: Path, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=ws, env={**ENV, **S3_ENV}, capture_output=True, text=True,
                          timeout=600)


def _bucket():
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=S3_ENV["AWS_ENDPOINT_URL"], key=S3_ENV["AWS_ACCESS_KEY_ID"],
                             secret=S3_ENV["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)


def _newest_run(ws: Path) -> Path:
    return max((p.parent for p in (ws / "outputs" / "runs").glob("*/*/res.json")), key=lambda p: p.stat().st_mtime)


def _res(run_dir: Path) -> dict:
    return json.loads((run_dir / "res.json").read_text(encoding="utf-8"))


def _all_labelled(run_dir: Path, labels) -> None:
    res = _res(run_dir)
    assert len(res) == 38 and set(res.values()) <= set(labels), res


def _distribution(proc, labels) -> list[str]:
    shown = re.findall(r"^ +\d\.\d{4}  (.+)$", proc.stdout, flags=re.M)
    assert sorted(shown) == sorted(labels), proc.stdout
    return shown


def _no_cuda(proc) -> None:
    if torch.cuda.is_available():
        assert proc.returncode == 0, proc.stdout + proc.stderr
    else:
        assert proc.returncode == 2 and "torch sees no CUDA device" in proc.stdout + proc.stderr


def _check(command: str, proc, ws: Path) -> None:
    log = proc.stdout + proc.stderr
    if "--device cuda" in command or "DEVICE=cuda" in command:
        return _no_cuda(proc)
    assert proc.returncode == 0, log[-3000:]
    if command.startswith("make demo"):
        run_dir = _newest_run(ws)
        assert len(_res(run_dir)) == 38 and (run_dir / "metrics.parquet").exists() and "top-1" in log
    elif "DATASET=photos.csv" in command:
        assert sorted(_res(_newest_run(ws)))[0] == "photos/blue_circle_00.jpg" and len(_res(_newest_run(ws))) == 38
    elif "DATASET='shards/" in command:
        run_dir = _newest_run(ws)
        assert sorted(_res(run_dir))[0] == "data-0000.tar/blue_circle_00.jpg" and len(_res(run_dir)) == 38
        assert pd.read_parquet(run_dir / "predictions.parquet")["truth"].notna().all()
        assert (run_dir / "metrics.parquet").exists()
    elif "CACHE=s3://my-bucket/cache OUT=s3://my-bucket/runs/photos" in command:
        fs = _bucket()
        res = json.loads(fs.cat_file("my-bucket/runs/photos/res.json"))
        assert len(res) == 38 and set(res.values()) <= {"cat", "dog"} and "results in s3://my-bucket/runs/" in log
        assert [key for key in fs.find("my-bucket/cache/encode_images/pool") if key.endswith(".chunk")]
    elif "DATASET=s3://my-bucket/photos/" in command:
        assert sorted(_res(_newest_run(ws)))[0] == "blue_circle_00.jpg" and len(_res(_newest_run(ws))) == 38
    elif f"DATASET=http://127.0.0.1:{HTTP_PORT}/urls.csv" in command:
        res = _res(_newest_run(ws))
        assert len(res) == 38 and sorted(res)[0] == f"http://127.0.0.1:{HTTP_PORT}/photos/blue_circle_00.jpg"
    elif "IMAGE=cat.jpg" in command or "--input_image cat.jpg" in command:
        _distribution(proc, ["cat", "dog"])
    elif "OUT=results-emb EMBEDDINGS=1" in command:
        assert len(pd.read_parquet(ws / "results-emb" / "embeddings.parquet")) == 38
    elif "OUT=results " in command:
        preds = pd.read_parquet(ws / "results" / "predictions.parquet")
        assert len(preds) == 38 and preds["topk_labels"].map(len).eq(2).all() and (ws / "cache").is_dir()
    elif command.startswith("make report RUN=results"):
        assert (ws / "results" / "report.html").stat().st_mtime >= (ws / "results" / "res.json").stat().st_mtime
        assert "report.html" in proc.stdout
    elif "LABELS=labels.txt" in command and "make classify" in command:
        run_dir = _newest_run(ws)
        _all_labelled(run_dir, LABELS)
        meta = read_metadata(run_dir / "predictions.parquet")
        assert meta["model"]["name"] == "chinese-clip-vit-base-patch16" and meta["template"] == "一张_的照片。"
    elif "--results_save_path results-vendor" in command:
        _all_labelled(ws / "results-vendor", LABELS)
        assert read_metadata(ws / "results-vendor" / "predictions.parquet")["template"] == "a photo of a _."
    elif " -m dataset=sample" in command:
        sweep = max((ws / "outputs" / "multirun").glob("*/*"), key=lambda p: p.stat().st_mtime)
        summary = pd.read_parquet(sweep / "summary.parquet")
        assert set(summary["label_set"]) == {"shapes", "colors", "pairs"}
        assert "encode_images   reused" in (sweep / "2" / "classify.log").read_text()
    elif command.startswith("make precision"):
        assert "verdict               PASS" in proc.stdout
        if "RUNTIME=openvino DTYPE=int8" in command:
            assert "int8 on openvino batch" in proc.stdout
    elif "NPROC=2" in command:
        _all_labelled(ws / "results-2ranks", ["cat", "dog"])
        assert "shard 1/2 done" in log
    elif "hydra/launcher=ray" in command:
        sweep = max((ws / "outputs" / "multirun").glob("*/*"), key=lambda p: p.stat().st_mtime)
        logs = [(sweep / str(i) / "classify.log").read_text() for i in (0, 1)]
        assert "shard 0/2 done" in logs[0] and "shard 1/2 done" in logs[1]
        assert re.search(r"encoded [1-9]\d* images", logs[0]) and _bucket().find("my-bucket/cache-ray")
    elif "output_dir=s3://my-bucket/runs/photos-ray" in command:  # the merge of the Ray shards
        assert not re.search(r"encoded [1-9]\d* images", log), log[-3000:]
        res = json.loads(_bucket().cat_file("my-bucket/runs/photos-ray/res.json"))
        assert len(res) == 38 and set(res.values()) <= set(LABELS)
    elif "hydra/launcher=local_parallel" in command:
        sweep = max((ws / "outputs" / "multirun").glob("*/*"), key=lambda p: p.stat().st_mtime)
        logs = [(sweep / str(i) / "classify.log").read_text() for i in (0, 1)]
        assert "shard 0/2 done" in logs[0] and "shard 1/2 done" in logs[1]
    elif "cache_dir=cache" in command:  # the merge of the two shards above
        # every chunk was encoded by the shards (or by an earlier run into this cache): nothing is encoded again
        assert re.search(r"stage encode_images +(reused|resumed)", log)
        assert not re.search(r"encoded [1-9]\d* images", log)
        _all_labelled(_newest_run(ws), LABELS)
    elif "RUNTIME=openvino DTYPE=bf16" in command:
        run_dir = _newest_run(ws)
        _all_labelled(run_dir, ["cat", "dog"])
        config = read_metadata(run_dir / "predictions.parquet")["config"]
        dtype = "bf16" if cpu_has_native_bf16() else "fp32"  # bf16 falls back where the CPU lacks it
        assert config["runtime"] == "openvino" and config["dtype"] == dtype and f"towers run on openvino in {dtype}" in log
    elif "EXAMPLES=reviewed.csv" in command:
        run_dir = _newest_run(ws)
        _all_labelled(run_dir, LABELS)
        assert re.search(r"stage encode_images +reused", log) and "encoded 0 images" in log
        assert pd.read_parquet(run_dir / "predictions.parquet")["is_example"].sum() == 9
    elif "EXAMPLES=examples" in command:
        run_dir = ws / "results-examples" if "OUT=results-examples" in command else _newest_run(ws)
        _all_labelled(run_dir, LABELS + ["unknown"])
        choice = json.loads((run_dir / "classifier.json").read_text())
        assert choice["used"] == 9 and (run_dir / "review.parquet").exists()
        if "target_precision" in command:
            assert choice["target_precision"] == 0.95
    elif 'LABEL_LIST="cat,dog,red fox"' in command:
        _all_labelled(_newest_run(ws), LABELS)
    else:
        raise AssertionError(f"no check for README command: {command}")


def test_every_readme_command_is_checked(workspace):
    """Runs the README's commands in order (later ones use what earlier ones wrote) and checks each."""
    ran = []
    for command in readme_commands():
        if _without_comment(command) in NOT_RUN_HERE:
            continue
        proc = _shell(workspace, command)
        _check(command, proc, workspace)
        ran.append(command)
    assert len(ran) == len(readme_commands()) - len(NOT_RUN_HERE) >= 20


def test_readme_python_snippets(workspace):
    """Run after the commands (the module's first test): the snippets read what they wrote."""
    outputs = []
    for block in blocks("python"):
        proc = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", block], cwd=workspace, env=ENV,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
    assert len(outputs) == 3 and "count_star()" in outputs[0]
    max_diff = float(outputs[1].splitlines()[0])
    assert max_diff < 1e-5 and "cos" in outputs[1]
    assert "runner_up" in outputs[2] and "reason" in outputs[2]  # the review queue, most urgent first


def test_slurm_template_composes():
    """The SLURM commands cannot run here; their launcher config and overrides compose."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from pipeline.config import compose

    cfg = compose(["hydra/launcher=slurm", "shard.index=3", "shard.count=256", "dataset.path=/data/images",
                   "model.path=/models/clip-vit-large-patch14", "labels=imagenet1k", "cache_dir=/shared/cache",
                   "device=cuda"], return_hydra_config=True)
    assert cfg.hydra.launcher.array_parallelism == 256 and len(cfg.labels.list) == 1000
    assert "torchrun --nnodes 4" in blocks("text")[0]
