"""A code change can never pass as current: changing what decides a stage's output fails here until the stage's
VERSION is bumped (and recorded), so old cache entries are never served for new code."""

import inspect

import pytest

import pipeline.imaging
from tests.helpers import stage_code


def test_every_stage_version_matches_its_code():
    assert stage_code.stale() == []


def test_a_change_to_preprocessing_makes_image_embeddings_stale():
    source = inspect.getsource(pipeline.imaging)
    changed = source.replace("img = img.resize(target, resample=spec.resample)",
                             "img = img.resize(target, resample=Image.Resampling.NEAREST)")
    assert changed != source
    problems = sorted(stage_code.stale({"pipeline.imaging": changed}))
    # both stages that preprocess images: the calibration images of int8 exports, and the embeddings
    assert [p.split(":")[0] for p in problems] == ["calibration", "encode_images"]
    assert "bump VERSION in pipeline/stages/encode_images.py" in problems[1]


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
