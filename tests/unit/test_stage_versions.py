"""A code change can never pass as current: changing what decides a stage's output fails here until the stage's
VERSION is bumped (and recorded), so old cache entries are never served for new code. What a stage's code is comes
from the import graph (tests/helpers/stage_code.py), not from a list someone keeps."""

import inspect

import pytest

import pipeline.devices
import pipeline.imaging
import pipeline.inference
from tests.helpers import stage_code


def _flagged(module, old: str, new: str) -> set[str]:
    source = inspect.getsource(module)
    changed = source.replace(old, new)
    assert changed != source, f"{old!r} is not in {module.__name__}"
    return {problem.split(":")[0] for problem in stage_code.stale({module.__name__: changed})}


def test_every_stage_version_matches_its_code():
    assert stage_code.stale() == []


def test_a_change_to_preprocessing_makes_image_embeddings_stale():
    flagged = _flagged(pipeline.imaging, "img = img.resize(target, resample=spec.resample)",
                       "img = img.resize(target, resample=Image.Resampling.NEAREST)")
    # both stages that preprocess images: the calibration images of int8 exports, and the embeddings
    assert {"calibration", "encode_images"} <= flagged


def test_a_change_to_the_torch_towers_makes_every_stage_that_runs_them_stale():
    flagged = _flagged(pipeline.inference, "return self.model.get_image_features(**inputs).pooler_output",
                       "return self.model.get_image_features(**inputs).pooler_output * 2")
    # reached through ctx.execution.models, not imported by the stage modules themselves
    assert {"encode_images", "encode_labels", "export_towers"} <= flagged


def test_a_change_to_the_dtype_table_makes_every_stage_that_runs_a_model_stale():
    flagged = _flagged(pipeline.devices, '"int8": torch.float32}', '"int8": torch.bfloat16}')
    assert {"encode_images", "encode_labels", "export_towers", "calibration"} <= flagged


def test_a_stage_code_is_its_import_closure():
    modules = stage_code.stage_modules("encode_images")
    for name in ("pipeline.stages.encode_images", "pipeline.encoding.loop", "pipeline.encoding.decode",
                 "pipeline.inference", "pipeline.devices", "pipeline.imaging", "pipeline.sources.tars",
                 "pipeline.engine.files"):
        assert name in modules
    assert "pipeline.workflow" not in modules and "pipeline.outputs.report_html" not in modules


def test_comments_and_docstrings_change_nothing():
    source = inspect.getsource(pipeline.imaging)
    reworded = source.replace('"""RGB PIL image -> float32 array', '"""An RGB PIL image as a float32 array') \
        .replace("# Report the image's true size", "# The true size of the image")
    assert reworded != source
    assert stage_code.stale({"pipeline.imaging": reworded}) == []


def test_record_never_rewrites_a_version(tmp_path, monkeypatch):
    monkeypatch.setattr(stage_code, "RECORD", tmp_path / "record.json")
    assert len(stage_code.record()) == len(stage_code.STAGES)
    monkeypatch.setattr(stage_code, "stage_digest", lambda stage, sources=None: "other code")
    with pytest.raises(SystemExit, match="bump its VERSION first"):
        stage_code.record()
