"""CPU runtimes: torch, ONNX Runtime and OpenVINO, in fp32 and int8. Each passes `make precision` against torch
fp32; exports are cached entries keyed by the model, the runtime, the dtype and the calibration images."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import inference, workflow
from pipeline.errors import UserError
from tests.helpers import ROOT, SAMPLE_IMAGES, log_of, run

COMBINATIONS = [(runtime, dtype) for runtime in inference.RUNTIMES for dtype in ("fp32", "int8")]


@pytest.mark.slow
@pytest.mark.parametrize("runtime,dtype", COMBINATIONS)
def test_make_precision_passes_for_every_runtime_and_dtype(runtime, dtype, tmp_path):
    out = tmp_path / "precision"
    proc = run(["make", "-s", "precision", "MODEL=tests/assets/models/tiny-clip", "DATASET=tests/assets/sample/images",
                "LABELS=tests/assets/sample/labels/shapes.txt", f"RUNTIME={runtime}", f"DTYPE={dtype}",
                f"OUT={out}", f"ARGS=cache_dir={tmp_path / 'cache'} progress=false"])
    assert proc.returncode == 0, log_of(proc)[-3000:]
    assert f"on {runtime} batch" in proc.stdout and "verdict               PASS" in proc.stdout
    table = pq.read_table(out / "precision.parquet").to_pandas()
    assert len(table) == 38 and table["prob_cosine"].min() >= 0.99 and table["embedding_cosine"].min() >= 0.99
    if dtype == "fp32":  # the same maths in another runtime: equal to rounding
        assert table["max_abs_prob_diff"].max() < 1e-5 and table["top1_agrees"].all()


def _fingerprints(summary) -> dict[str, str]:
    return {name: artifact.fingerprint for name, artifact in summary.artifacts.items()}


def _states(summary) -> dict[str, str]:
    return {r.name: r.status for r in summary.reports}


def test_export_is_a_cached_entry_keyed_by_model_runtime_and_dtype(compose):
    first = workflow.run(compose("model.runtime=onnxruntime", "report=false"))
    assert _states(first)["export_towers"] == "ran"
    files = sorted(p.name for p in first.artifacts["export_towers"].path.iterdir())
    assert files == ["_manifest.json", "image.onnx", "text.onnx", "towers.json"], files
    again = workflow.run(compose("model.runtime=onnxruntime", "report=false", out="again"))
    assert _states(again)["export_towers"] == "reused" and _states(again)["encode_images"] == "reused"
    other = workflow.run(compose("model.runtime=openvino", "report=false", out="other"))
    assert _states(other)["export_towers"] == "ran" and _states(other)["encode_images"] == "ran"
    torch_run = workflow.run(compose("model.runtime=torch", "report=false", out="torch"))
    assert "export_towers" not in _states(torch_run) and _states(torch_run)["encode_images"] == "ran"
    labels = {s.out_dir.name: pq.read_table(s.out_dir / "predictions.parquet").column("label").to_pylist()
              for s in (first, other, torch_run)}
    assert labels["out"] == labels["other"] == labels["torch"]


def test_exported_runtimes_see_one_image_batch_shape(compose, monkeypatch):
    """Short batches (each chunk's last) are padded to the batch size: a new shape is a new compiled plan that the
    runtime keeps, so the shapes it sees must not grow with the dataset. The padding never reaches a result."""
    shapes = []
    call = inference.ExportedTowers._call

    def recording(self, tower, inputs):
        if tower == "image":
            shapes.append(tuple(next(iter(inputs.values())).shape))
        return call(self, tower, inputs)

    monkeypatch.setattr(inference.ExportedTowers, "_call", recording)
    args = ("encode.batch_size=5", "encode.chunk_size=8", "report=false")
    exported = workflow.run(compose("model.runtime=onnxruntime", *args))
    assert len(shapes) > 3 and {s[0] for s in shapes} == {5}, shapes
    reference = workflow.run(compose("model.runtime=torch", *args, out="torch"))
    ours, theirs = (pq.read_table(s.out_dir / "predictions.parquet").to_pandas() for s in (exported, reference))
    assert len(ours) == 38 and ours["path"].tolist() == theirs["path"].tolist()
    assert ours["label"].tolist() == theirs["label"].tolist()
    assert np.abs(np.stack(ours["probs"]) - np.stack(theirs["probs"])).max() < 1e-5


def _images(tmp_path, names):
    folder = tmp_path / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in names:
        shutil.copy(SAMPLE_IMAGES / source, folder / name)
    return folder


def test_int8_calibrates_on_the_first_images_and_keeps_them_as_the_dataset_grows(compose, tmp_path, caplog):
    sources = sorted(p.name for p in SAMPLE_IMAGES.glob("*.jpg"))
    folder = _images(tmp_path, [(f"a{i:02d}.jpg", s) for i, s in enumerate(sources[:6])])
    args = ("model.runtime=openvino", "device.dtype=int8", "model.calibration_images=4", "report=false",
            f"dataset.path={folder}")
    first = workflow.run(compose(*args))
    calibration = np.load(first.artifacts["calibration"].file("calibration.npy"))
    assert calibration.shape == (4, 3, 64, 64)  # the tiny CLIP input size; the first four of six images
    _images(tmp_path, [("z99.jpg", sources[7])])  # sorts last: the first four stay the same
    grown = workflow.run(compose(*args, out="grown"))
    assert _states(grown)["calibration"] == "unchanged" and _states(grown)["export_towers"] == "reused"
    assert grown.classified == 7 and _states(grown)["encode_images"] == "ran"
    _images(tmp_path, [("a00.jpg", sources[9])])  # the first image changes: a new int8 model
    changed = workflow.run(compose(*args, out="changed"))
    assert _states(changed)["calibration"] == "changed" and _states(changed)["export_towers"] == "ran"


def test_int8_calibrates_on_the_dataset_alone_and_refuses_too_few_images(compose, tmp_path, caplog):
    """An installed package has no sample to top up from: the run says how many images it calibrated on, and
    refuses int8 below the stated minimum."""
    from pipeline.stages.calibration import MIN_IMAGES

    names = sorted(p.name for p in SAMPLE_IMAGES.glob("*.jpg"))
    few = _images(tmp_path / "few", [(f"{i}.jpg", name) for i, name in enumerate(names[:MIN_IMAGES - 1])])
    with pytest.raises(UserError, match=f"at least {MIN_IMAGES} images that decode; the dataset has {MIN_IMAGES - 1}"):
        workflow.run(compose("model.runtime=onnxruntime", "device.dtype=int8", "report=false",
                             f"dataset.path={few}"))
    with caplog.at_level("INFO"):
        summary = workflow.run(compose("model.runtime=onnxruntime", "device.dtype=int8", "report=false",
                                       "model.calibration_images=20", out="enough"))
    assert np.load(summary.artifacts["calibration"].file("calibration.npy")).shape[0] == 20
    assert "int8 calibration on the dataset's first 20 images that decode" in caplog.text


def test_auto_is_torch_and_exported_runtimes_are_opt_in():
    """Faster on a CPU once exported, but opt-in: auto runs the reference's own code (README "Performance")."""
    for device in ("cpu", "cuda"):
        assert inference.resolve_runtime("auto", device, "fp32", True, "clip") == inference.TORCH
    assert inference.resolve_runtime("openvino", "cpu", "int8", True, "clip") == inference.OPENVINO
    assert inference.resolve_runtime("onnxruntime", "cpu", "fp32", True, "clip") == inference.ONNXRUNTIME


@pytest.mark.parametrize("args,message", [
    (("openvino", "cuda", "fp32", True, "clip"), "runs on the CPU; this run's device is cuda"),
    (("onnxruntime", "cpu", "fp32", False, "siglip2"), "do not export to a fixed graph"),
    (("openvino", "cpu", "bf16", True, "clip"), "runs fp32 or int8, not bf16"),
    (("tensorrt", "cpu", "fp32", True, "clip"), "is not one of auto, torch, onnxruntime, openvino"),
])
def test_runtime_refusals_are_clear(args, message):
    with pytest.raises(UserError, match=message):
        inference.resolve_runtime(*args)


def test_a_runtime_that_is_not_installed_names_its_extra(monkeypatch):
    monkeypatch.setattr(inference, "installed", lambda name: name == inference.TORCH)
    with pytest.raises(UserError, match=r"pip install -e '\.\[openvino\]'"):
        inference.resolve_runtime("openvino", "cpu", "fp32", True, "clip")


def test_half_precision_is_refused_on_exported_runtimes(compose):
    with pytest.raises(UserError, match="runs fp32 or int8, not bf16"):
        workflow.build(compose("model.runtime=onnxruntime", "device.dtype=bf16", "device.cpu_half=true"))


def test_runtime_flag_and_make_variable_reach_the_config(tmp_path):
    proc = run([sys.executable, "jobs/classify.py", "--runtime", "onnxruntime", "--cfg", "job", "--package", "model"],
               cwd=ROOT)
    assert proc.returncode == 0 and "runtime: onnxruntime" in proc.stdout, log_of(proc)
