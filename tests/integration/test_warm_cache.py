"""Warm equals cold, as a property: for every source kind (folder, manifest, tar shards, a bucket on a real S3
endpoint) and every config key the schema marks `result`, a run on a cache warmed by a base run gives exactly
the outputs of the same run on an empty cache.

The cases come from the schema's role table (`pipeline.config.roles`): a new result key fails here until it has
a changed value in CHANGES, and a new source kind until it has a dataset in SOURCES. A change that cannot be seen
on these fixtures (a key that does not apply to a source kind) is listed in UNOBSERVABLE with the reason; every
other change must alter the outputs, or the comparison would prove nothing.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import workflow
from pipeline.config import RESULT, compose, roles
from pipeline.errors import UserError
from pipeline.sources import FORMATS
from tests.helpers import SAMPLE_IMAGES, write_shards
from tests.helpers.servers import s3_server

pytestmark = pytest.mark.slow

# Large JPEGs (reduced-scale "draft" decoding shows), a PNG (an extension filter shows), two over 1.2 MP.
IMAGES = ["blue_circle_00.jpg", "green_cross_01.png", "orange_cross_00.jpg", "purple_star_00.jpg",
          "yellow_square_00.jpg"]
TRUTH = {name: tuple(name.split("_")[:2][::-1]) for name in IMAGES}  # name -> (shape, colour)
COMMON = ["model=tiny_clip", "labels=shapes", "report=false", "progress=false", "device=cpu",
          "encode.num_workers=0", "encode.batch_size=2", "encode.chunk_size=3"]


@dataclass(frozen=True)
class Change:
    value: str
    # overrides of the base run (and the changed one) besides COMMON and the source's; "{examples}" is a folder of
    # two examples per shape
    base: tuple[str, ...] = ()


WITH_EXAMPLES = ("labels.examples={examples}",)


# Every result key of the schema, with another value for it (and what its base run needs for it to matter).
CHANGES = {
    "model.name": Change("renamed-model"),
    "model.runtime": Change("onnxruntime"),
    "model.calibration_images": Change("5", ("model.runtime=onnxruntime", "device.dtype=int8",
                                             "model.calibration_images=4")),
    "labels.name": Change("renamed"),
    "labels.list": Change("'circle,square,star'"),
    "labels.template": Change("'a drawing of a _.'"),
    "labels.templates": Change("['a photo of a _.','a drawing of a _.']"),
    "dataset.format": Change("tar"),
    "dataset.extensions": Change("[jpg]"),
    "dataset.path_column": Change("file"),
    "dataset.truth_column": Change("color"),
    "dataset.truth_member": Change("txt"),
    "device.dtype": Change("int8"),
    "device.cpu_half": Change("true", ("device.dtype=fp16",)),
    "preprocess.backend": Change("device"),
    "preprocess.draft": Change("true"),
    "preprocess.max_pixels": Change("1200000"),
    "classify.mode": Change("multilabel", ("model=tiny_siglip",)),
    "classify.threshold": Change("0.3", ("model=tiny_siglip", "classify.mode=multilabel")),
    "classify.topk": Change("2"),
    "classify.min_score": Change("0.999"),
    "classify.unknown_label": Change("none", ("classify.min_score=0.999",)),
    "classify.adapter": Change("gda", WITH_EXAMPLES),
    "classify.calibrate": Change("false", (*WITH_EXAMPLES, "classify.adapter=gda")),  # zero-shot keeps its scale
    "classify.target_precision": Change("0.9", WITH_EXAMPLES),
    "classify.review_size": Change("3"),
    "embeddings": Change("true"),
}

# (key, source kind) -> why changing the key cannot change that source's outputs.
UNOBSERVABLE = {
    ("dataset.format", "tar"): "tar shards are detected as tar already: forcing it is the same run",
    ("dataset.extensions", "manifest"): "a manifest names its images; extensions filter folders, tar members and "
                                        "bucket objects",
    ("dataset.path_column", "folder"): "only a manifest has columns",
    ("dataset.path_column", "tar"): "only a manifest has columns",
    ("dataset.path_column", "bucket"): "only a manifest has columns",
    ("dataset.truth_column", "tar"): "a tar file's truth is a member (dataset.truth_member), not a column",
    ("dataset.truth_member", "folder"): "only tar files have members",
    ("dataset.truth_member", "manifest"): "only tar files have members",
    ("dataset.truth_member", "bucket"): "only tar files have members",
}
# (key, source kind) -> what the changed run stops with, at start-up (checked instead).
REFUSED = {("dataset.format", "manifest"): "not a tar shard, a folder of shards or a pattern"}


@dataclass
class Dataset:
    overrides: list[str]
    env: dict = field(default_factory=dict)


def _truth_file(path: Path) -> Path:
    path.write_text("path,shape,color\n" + "".join(f"{n},{s},{c}\n" for n, (s, c) in TRUTH.items()))
    return path


def _folder(root: Path, s3) -> Dataset:
    folder = root / "folder"
    folder.mkdir()
    for name in IMAGES:
        shutil.copy(SAMPLE_IMAGES / name, folder / name)
    # A tar of three of them beside the images: a folder of images unless dataset.format=tar
    write_shards(folder, [SAMPLE_IMAGES / n for n in IMAGES[:3]], per_shard=3, name="extra-{:02d}.tar")
    return Dataset([f"dataset.path={folder}", f"dataset.truth={_truth_file(root / 'truth.csv')}",
                    "dataset.truth_column=shape"])


def _manifest(root: Path, s3) -> Dataset:
    (root / "imgs").mkdir()
    for name in IMAGES:
        shutil.copy(SAMPLE_IMAGES / name, root / "imgs" / name)
    rows = "".join(f"imgs/{n},{root / 'imgs' / n},{s},{c}\n" for n, (s, c) in TRUTH.items())
    (root / "list.csv").write_text("path,file,shape,color\n" + rows)
    return Dataset([f"dataset.path={root / 'list.csv'}", "dataset.truth_column=shape"])


def _tar(root: Path, s3) -> Dataset:
    images = [SAMPLE_IMAGES / n for n in IMAGES]
    write_shards(root / "shards", images, per_shard=4, truth={n: TRUTH[n][0] for n in IMAGES})
    for number, start in enumerate(range(0, len(images), 4)):  # a colour member beside each shape member
        _append_members(root / "shards" / f"data-{number:04d}.tar",
                        {f"{Path(n).stem}.txt": TRUTH[n][1] for n in IMAGES[start:start + 4]})
    return Dataset([f"dataset.path={root / 'shards'}", "dataset.truth_member=cls"])


def _append_members(tar_path: Path, members: dict[str, str]) -> None:
    import io
    import tarfile

    with tarfile.open(tar_path, "a") as tar:
        for name, text in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(text.encode()), 1_700_000_000
            tar.addfile(info, io.BytesIO(text.encode()))


def _bucket(root: Path, s3) -> Dataset:
    fs = s3.filesystem()
    fs.mkdir("warm-bucket")
    for name in IMAGES:
        fs.pipe(f"warm-bucket/photos/{name}", (SAMPLE_IMAGES / name).read_bytes())
    return Dataset(["dataset.path=s3://warm-bucket/photos/", f"dataset.truth={_truth_file(root / 'truth.csv')}",
                    "dataset.truth_column=shape"], env=s3.env)


SOURCES = {"folder": _folder, "manifest": _manifest, "tar": _tar, "bucket": _bucket}
RESULT_KEYS = sorted(key for key, role in roles().items() if role == RESULT)
CASES = [(source, key) for source in SOURCES for key in RESULT_KEYS]


def test_every_result_key_and_source_kind_is_covered():
    assert sorted(CHANGES) == RESULT_KEYS, "give the new result key another value in CHANGES"
    assert set(SOURCES) == set(FORMATS), "give the new source kind a dataset in SOURCES"
    assert sorted(c.source for c in WarmCache.__subclasses__()) == sorted(SOURCES), "and a class below"
    assert {(s, k) for k, s in UNOBSERVABLE} <= set(CASES) and {(s, k) for k, s in REFUSED} <= set(CASES)


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def world(tmp_path_factory, s3):
    """The datasets, made when first asked for, and a memo of base runs (one per source and base overrides),
    each with its warmed cache."""
    return {"root": tmp_path_factory.mktemp("warm"), "datasets": {}, "bases": {}, "s3": s3}


def _dataset(world, source: str) -> Dataset:
    if source not in world["datasets"]:
        folder = world["root"] / source
        folder.mkdir()
        world["datasets"][source] = SOURCES[source](folder, world["s3"])
    return world["datasets"][source]


def _examples(world) -> Path:
    """Two sample images per shape (none of IMAGES), a subfolder each."""
    folder = world["root"] / "examples"
    if not folder.is_dir():
        for shape in ("circle", "square", "triangle", "star", "cross"):
            (folder / shape).mkdir(parents=True)
            for image in [p for p in sorted(SAMPLE_IMAGES.glob(f"*_{shape}_*.jpg")) if p.name not in IMAGES][:2]:
                shutil.copy(image, folder / shape / image.name)
    return folder


def _run(world, source: str, overrides: list[str], out: Path, cache: Path, monkeypatch) -> Path:
    dataset = _dataset(world, source)
    for key, value in dataset.env.items():
        monkeypatch.setenv(key, value)
    overrides = [o.format(examples=_examples(world)) if "{examples}" in o else o for o in overrides]
    cfg = compose(COMMON + dataset.overrides + overrides + [f"output_dir={out}", f"cache_dir={cache}"])
    return workflow.run(cfg).out_dir


def _outputs(out: Path) -> dict:
    """Every file a run wrote, parsed: tables (their values' repr, exact for floats and equal for NaNs) with their
    schema metadata, JSON as values."""
    found = {}
    for path in sorted(out.iterdir()):
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            found[path.name] = (repr(table.to_pydict()), table.schema.metadata)
        elif path.suffix == ".json":
            found[path.name] = json.loads(path.read_text(encoding="utf-8"))
    return found


def _base(world, source: str, change: Change, monkeypatch) -> tuple[dict, Path]:
    key = (source, change.base)
    if key not in world["bases"]:
        where = world["root"] / "bases" / f"{source}-{len(world['bases'])}"
        out = _run(world, source, list(change.base), where / "out", where / "cache", monkeypatch)
        world["bases"][key] = (_outputs(out), where / "cache")
    return world["bases"][key]


class WarmCache:
    """The property for one source kind: a class each, so that `make test`'s processes share the kinds out (a
    class runs whole in one process, its base runs memoised)."""

    source: str

    @pytest.mark.parametrize("key", RESULT_KEYS)
    def test_a_warm_cache_gives_what_an_empty_one_gives(self, world, key, tmp_path, monkeypatch):
        source, change = self.source, CHANGES[key]
        base_outputs, base_cache = _base(world, source, change, monkeypatch)
        overrides = [*change.base, f"{key}={change.value}"]
        warm_cache = tmp_path / "warm-cache"
        shutil.copytree(base_cache, warm_cache)
        if (key, source) in REFUSED:
            with pytest.raises(UserError, match=REFUSED[key, source]):
                _run(world, source, overrides, tmp_path / "warm", warm_cache, monkeypatch)
            return
        warm = _outputs(_run(world, source, overrides, tmp_path / "warm", warm_cache, monkeypatch))
        if (key, source) in UNOBSERVABLE:
            assert warm == base_outputs, f"{key} changed {source} outputs, though listed as unobservable"
            return
        cold = _outputs(_run(world, source, overrides, tmp_path / "cold", tmp_path / "cold-cache", monkeypatch))
        assert warm == cold, f"{source}: {key}={change.value} on a warm cache differs from an empty one"
        assert cold != base_outputs, f"{source}: {key}={change.value} changed no output; the case proves nothing"


class TestFolder(WarmCache):
    source = "folder"


class TestManifest(WarmCache):
    source = "manifest"


class TestTarShards(WarmCache):
    source = "tar"


class TestBucket(WarmCache):
    source = "bucket"


def test_a_changed_extension_filter_on_tar_shards_is_not_served_from_the_cache(tmp_path, monkeypatch):
    """The case that was found: the 38 sample images (.jpg, .png, .webp) in a tar, classified once; then with
    dataset.extensions=[jpg] on the same cache. The member filter decides what a tar gives, so it is hashed."""
    images = sorted(SAMPLE_IMAGES.iterdir())
    write_shards(tmp_path / "shards", images, per_shard=len(images))
    args = [f"dataset.path={tmp_path / 'shards'}", "model=tiny_clip", "labels=shapes", "report=false",
            "progress=false", "device=cpu", "encode.num_workers=0"]
    jpg = "dataset.extensions=[jpg]"
    first = workflow.run(compose(args + [f"output_dir={tmp_path / 'all'}", f"cache_dir={tmp_path / 'c'}"]))
    warm = workflow.run(compose(args + [jpg, f"output_dir={tmp_path / 'warm'}", f"cache_dir={tmp_path / 'c'}"]))
    cold = workflow.run(compose(args + [jpg, f"output_dir={tmp_path / 'cold'}", f"cache_dir={tmp_path / 'e'}"]))
    assert (first.discovered, warm.discovered, cold.discovered) == (38, 32, 32)
    assert warm.classified == cold.classified == 32
    assert _outputs(warm.out_dir) == _outputs(cold.out_dir)
