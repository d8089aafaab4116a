import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub; a stray download fails loudly

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "tests" / "assets"
TINY_CLIP = ASSETS / "models" / "tiny-clip"
TINY_CHINESE_CLIP = ASSETS / "models" / "tiny-chinese-clip"
SAMPLE_IMAGES = ASSETS / "sample" / "images"
SAMPLE_TRUTH = ASSETS / "sample" / "truth.csv"


@pytest.fixture
def compose(tmp_path):
    """Compose the job config as `jobs/classify.py` would, with the run and cache directories in tmp_path."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pipeline.config import register

    register()

    def make(*overrides, out="out", cache="cache"):
        base = [f"output_dir={tmp_path / out}", f"cache_dir={tmp_path / cache}", "progress=false",
                "device=cpu", "encode.num_workers=0"]
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return hydra_compose("config", overrides=base + list(overrides))

    return make
