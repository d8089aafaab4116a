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


# `make test` runs in two processes (pytest-xdist, --dist loadscope). A scope runs whole in one process: a test
# module, so that its module fixtures (the README's workspace, an S3 server) are made once, or a class, where a
# module splits its tests into classes. Scopes are handed out in collection order, so the long ones go first:
# started last, they would finish last while the other process idles.
HEAVY_FIRST = ("test_readme", "test_kill", "test_ray", "test_bench", "test_warm_cache", "test_runtimes", "test_cli",
               "test_memory", "test_evaluation", "test_parity", "test_distributed", "test_families", "test_examples",
               # reliability/ is collected after integration/: left in collection order, these 30-50 s modules
               # ran last, one process busy and the other idle
               "test_hostile_inputs", "test_concurrency_and_disk", "test_object_store", "test_install",
               "test_fixture_models", "test_device_preprocessing", "test_sources")


def _rank(item) -> int:
    name = item.module.__name__.rsplit(".", 1)[-1]
    return HEAVY_FIRST.index(name) if name in HEAVY_FIRST else len(HEAVY_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_rank)  # stable: within a module, the order stays as written
