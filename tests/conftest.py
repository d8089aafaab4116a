import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub; a stray download fails loudly



@pytest.fixture
def compose(tmp_path):
    """Compose the job config as `jobs/classify.py` would, with the run and cache directories in tmp_path.
    Model, labels and dataset default to the bundled ones (tiny CLIP, shapes, the sample set)."""
    from pipeline.config import compose as compose_config

    def make(*overrides, out="out", cache="cache"):
        base = [f"output_dir={tmp_path / out}", f"cache_dir={tmp_path / cache}", "progress=false", "device=cpu",
                "encode.num_workers=0", "model=tiny_clip", "labels=shapes", "dataset=sample"]
        return compose_config(base + list(overrides))

    return make
