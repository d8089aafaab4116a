"""The Hydra schema rejects typos at start-up; the vendor example's flags map onto the same config."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from pipeline.config import PROJECT_ROOT, register, translate_flags

register()


def _compose(overrides):
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def test_defaults_compose_to_the_sample_job():
    cfg = _compose([])
    assert cfg.model.path.endswith("tests/assets/models/tiny-clip")
    assert list(cfg.labels.list) == ["circle", "square", "triangle", "star", "cross"]
    assert cfg.device.type.value == "auto" and cfg.encode.batch_size == 8


@pytest.mark.parametrize("override", ["device.type=gpu", "encode.batch_size=abc", "labels.tempalte=x",
                                      "modle.path=x"])
def test_typos_fail_at_start_up(override):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        _compose([override])


def test_vendor_flags_map_to_overrides():
    argv = ["--model_path", "/m", "--label_list", "cat,dog", "--input_text=a _ photo", "--dataset_path", "d d",
            "--results_save_path", "out", "--warmup_image_path", "w.jpg", "--batch_size", "4", "encode.chunk_size=16"]
    cfg = _compose([o for o in translate_flags(argv) if not o.startswith("hydra.")])
    assert (cfg.model.path, cfg.labels.list, cfg.labels.name) == ("/m", "cat,dog", "custom")
    assert (cfg.labels.template, cfg.dataset.path, cfg.encode.warmup_image) == ("a _ photo", "d d", "w.jpg")
    assert (cfg.encode.batch_size, cfg.encode.chunk_size) == (4, 16)
    assert "hydra.run.dir='out'" in translate_flags(argv)
    image = _compose(translate_flags(["--input_image", "x.jpg"]))
    assert (image.dataset.image, image.dataset.path) == ("x.jpg", None)


@pytest.mark.parametrize("value", ["it's ${oc.env:HOME} a\\b\\", "红色,绿色", "[a,b]", "null", "x'y\\'z"])
def test_flag_values_stay_literal(value):
    assert _compose(translate_flags(["--input_text", value])).labels.template == value
