"""The Hydra schema: typos fail at start-up, nothing is guessed from the demo, the vendor flags map onto the same
config, and every key's declared role (result / input / execution) is what the stages' fingerprints do."""

import shutil

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from pipeline import workflow
from pipeline.config import EXECUTION, INPUT, RESULT, compose, roles, translate_flags
from pipeline.engine import CACHED, CONTENT, Artifact, Runner
from tests.helpers import SAMPLE_IMAGES, TINY_CLIP, write_shards


def test_defaults_guess_nothing():
    cfg = compose([])
    assert cfg.model.path is None and cfg.labels.list is None and cfg.labels.file is None
    assert cfg.dataset.path is None and cfg.dataset.image is None
    assert cfg.device.type.value == "auto" and cfg.device.dtype.value == "auto" and cfg.encode.batch_size is None


@pytest.mark.parametrize("override", ["device.type=gpu", "encode.batch_size=abc", "labels.tempalte=x",
                                      "modle.path=x", "dataset.name=x"])
def test_typos_fail_at_start_up(override):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose([override])


def test_vendor_flags_map_to_overrides():
    argv = ["--model_path", "/m", "--label_list", "cat,dog", "--input_text=a _ photo", "--dataset_path", "d d",
            "--results_save_path", "out", "--warmup_image_path", "w.jpg", "--batch_size", "4", "encode.chunk_size=16"]
    cfg = compose([o for o in translate_flags(argv) if not o.startswith("hydra.")])
    assert (cfg.model.path, cfg.labels.list, cfg.labels.name) == ("/m", "cat,dog", "custom")
    assert (cfg.labels.template, cfg.dataset.path, cfg.encode.warmup_image) == ("a _ photo", "d d", "w.jpg")
    assert (cfg.encode.batch_size, cfg.encode.chunk_size) == (4, 16)
    assert "hydra.run.dir='out'" in translate_flags(argv)
    image = compose(translate_flags(["--input_image", "x.jpg"]))
    assert (image.dataset.image, image.dataset.path) == ("x.jpg", None)
    label_file = compose(translate_flags(["--label_file", "labels.txt"]))
    assert (label_file.labels.file, label_file.labels.list) == ("labels.txt", None)  # no default list to collide
    # OUT=s3://...: the outputs go to the bucket; Hydra's own run folder (its log) stays local
    assert translate_flags(["--results_save_path", "s3://b/run"]) == ["output_dir='s3://b/run'"]
    assert compose(translate_flags(["--results_save_path", "s3://b/run"])).output_dir == "s3://b/run"


@pytest.mark.parametrize("value", ["it's ${oc.env:HOME} a\\b\\", "红色,绿色", "[a,b]", "null", "x'y\\'z"])
def test_flag_values_stay_literal(value):
    assert compose(translate_flags(["--input_text", value])).labels.template == value


# ------------------------------------------------------------------------------- roles against fingerprints

SAMPLE_IMAGE = sorted(SAMPLE_IMAGES.glob("*.jpg"))[0]
# For every key of the schema: (overrides the comparison starts from, another value for the key).
ALTERNATIVES = {
    "model.path": ([], None), "model.name": ([], "another-name"), "model.allow_pickle": ([], "true"),
    "model.runtime": ([], "onnxruntime"),
    "model.calibration_images": (["device.dtype=int8", "model.runtime=onnxruntime"], "8"),
    "labels.name": ([], "renamed"), "labels.list": ([], "'circle,square'"), "labels.file": ([], None),
    "labels.template": ([], "'a drawing of a _.'"), "labels.templates": ([], "['a _.','the _.']"),
    "labels.examples": ([], None),
    "classify.adapter": ("examples", "gda"), "classify.calibrate": ("examples", "false"),
    "classify.target_precision": ("examples", "0.9"), "classify.review_size": ([], "10"),
    "dataset.path": ([], None), "dataset.image": ([], None), "dataset.extensions": ([], "[jpg]"),
    "dataset.format": ("mixed", "tar"), "dataset.path_column": ("manifest", "file"),
    "dataset.truth": ([], None), "dataset.truth_column": ([], "color"), "dataset.truth_member": ("tar", "cls"),
    "dataset.storage_options": ([], "{anon:true}"), "dataset.retries": ([], "1"), "dataset.io_timeout": ([], "5"),
    "dataset.listing": ([], "job-7"),
    "device.type": ([], "auto"), "device.dtype": ([], "int8"), "device.index": ([], "0"),
    "device.cpu_half": (["device.dtype=fp16", "model.runtime=torch"], "true"),
    "encode.batch_size": ([], "3"), "encode.num_workers": ([], "2"), "encode.chunk_size": ([], "7"),
    "encode.warmup_image": ([], str(SAMPLE_IMAGE)), "encode.compile": ([], "true"),
    "preprocess.draft": ([], "true"), "preprocess.backend": ([], "device"), "preprocess.max_pixels": ([], "1000"), "preprocess.timeout": ([], "5"),
    "classify.topk": ([], "2"), "classify.min_score": ([], "0.5"), "classify.unknown_label": ([], "none"),
    "classify.mode": (["model=tiny_siglip"], "multilabel"), "classify.threshold": ([], "0.3"),
    "parity.min_cosine": ([], "0.5"), "parity.min_top1_agreement": ([], "0.5"),
    "parity.reference_batch_size": ([], "3"), "shard.index": (["shard.count=2"], "1"), "shard.count": ([], "2"),
    "shard.timeout_hours": ([], "1"), "output_dir": ([], "elsewhere"), "cache_dir": ([], "elsewhere"),
    "cache_lock": ([], "soft"), "progress": ([], "true"), "report": ([], "false"), "embeddings": ([], "true"),
    "progress_interval": ([], "5"),
}


def _identities(compose_fixture, *overrides) -> dict[str, str]:
    """Identity (name, version, params) of every stage that is cached or fingerprinted by content."""
    pipeline = workflow.build(compose_fixture(*overrides))
    return {s.name: s.identity for s in pipeline.stages if s.kind in (CACHED, CONTENT)}


def test_every_schema_key_declares_its_role():
    declared = roles()
    assert sorted(k for k, role in declared.items() if role not in (RESULT, INPUT, EXECUTION)) == []
    assert sorted(declared) == sorted(ALTERNATIVES), "add the new key to ALTERNATIVES with another value"


def _base(base, tmp_path) -> list[str]:
    """The overrides a comparison starts from: a list, or "tar" (a folder of one tar shard), "mixed" (a folder
    of images and a tar shard, which is a folder of images unless dataset.format says otherwise) or "manifest" (a
    table with the paths in two columns, `path` and `file`)."""
    if not isinstance(base, str):
        return base
    if base == "examples":
        return [f"labels.examples={_examples(tmp_path / 'examples')}"]
    images = sorted(SAMPLE_IMAGES.glob("*.jpg"))[:3]
    if base == "manifest":
        table = tmp_path / "manifest.csv"
        table.write_text("path,file\n" + "".join(f"{p},{p}\n" for p in images))
        return [f"dataset.path={table}"]
    folder = tmp_path / base
    write_shards(folder, images, per_shard=3)
    if base == "mixed":
        for image in images:
            shutil.copy(image, folder / image.name)
    return [f"dataset.path={folder}"]


@pytest.mark.parametrize("key", sorted(k for k, role in roles().items() if role in (RESULT, EXECUTION)))
def test_result_keys_are_hashed_and_execution_keys_are_not(compose, key, tmp_path):
    base, value = ALTERNATIVES[key]
    base = _base(base, tmp_path)
    before = _identities(compose, *base)
    value = str(tmp_path / value) if key in ("output_dir", "cache_dir") else value
    after = _identities(compose, *base, f"{key}={value}")
    changed = sorted(name for name in before if before[name] != after[name])
    if roles()[key] == RESULT:
        assert changed, f"{key} is declared result-affecting but no stage hashes it"
    else:
        assert changed == [], f"{key} is declared execution-only but changes {changed}"


def _examples(folder):
    """Two sample images per shape, in a subfolder each: labels.examples for labels=shapes."""
    for shape in ("circle", "square", "triangle", "star", "cross"):
        (folder / shape).mkdir(parents=True)
        for image in sorted(SAMPLE_IMAGES.glob(f"*_{shape}_*.jpg"))[:2]:
            shutil.copy(image, folder / shape / image.name)
    return folder


def _downstream_fingerprints(compose_fixture, tmp_path, *overrides) -> dict[str, str]:
    """Fingerprints of every cached stage once the content stages have read the inputs."""
    pipeline = workflow.build(compose_fixture(*overrides, "report=false", cache=f"cache-{len(overrides)}"))
    runner = Runner(pipeline.cache_dir, pipeline.execution)
    upstream = runner.run(pipeline.stages, targets=tuple(s.name for s in pipeline.stages if s.kind == CONTENT))
    out = {name: art.fingerprint for name, art in upstream.items()}
    for stage in pipeline.stages:  # in DAG order: a stage's inputs are computed before it
        if stage.kind == CACHED and stage.name != "classify":
            fingerprint = stage.fingerprint({arg: upstream[src] for arg, src in stage.inputs.items()})
            upstream[stage.name] = Artifact(stage.name, fingerprint, None)
            out[stage.name] = upstream[stage.name].fingerprint
    return out


@pytest.mark.parametrize("key", sorted(k for k, role in roles().items() if role == INPUT))
def test_content_keys_follow_content_not_location(compose, key, tmp_path):
    """Moving a content input changes no fingerprint (classify only records where things were, so it is left
    out); changing its content changes some."""
    moved, changed = tmp_path / "moved", tmp_path / "changed"
    label_file = tmp_path / "labels.txt"
    label_file.write_text("circle\nsquare\n")
    truth = tmp_path / "truth.csv"
    truth.write_text("path,shape\n" + "".join(f"{p.name},circle\n" for p in sorted(SAMPLE_IMAGES.iterdir())))
    if key == "model.path":
        source, setup = TINY_CLIP, lambda d: (d / "tokenizer_config.json").write_text(
            (d / "tokenizer_config.json").read_text() + "\n")
    elif key == "dataset.path":
        source, setup = SAMPLE_IMAGES, lambda d: shutil.copy(SAMPLE_IMAGE, d / "extra.jpg")
    elif key == "dataset.image":
        source, setup = SAMPLE_IMAGE, lambda f: f.write_bytes(f.read_bytes()[:-10])
    elif key == "labels.file":
        source, setup = label_file, lambda f: f.write_text("circle\nstar\n")
    elif key == "labels.examples":
        source = _examples(tmp_path / "examples")
        setup = lambda d: shutil.copy(SAMPLE_IMAGE, d / "star" / "extra.jpg")  # noqa: E731
    else:
        assert key == "dataset.truth"
        source, setup = truth, lambda f: f.write_text(f.read_text().replace("circle\n", "square\n", 3))
    for target in (moved, changed):
        target.mkdir()
        if source.is_dir():
            shutil.copytree(source, target / source.name)
        else:
            shutil.copy2(source, target / source.name)
    setup(changed / source.name)
    extra = {"dataset.image": ["dataset.path=null"], "labels.file": ["labels=custom"]}.get(key, [])
    prints = {where: _downstream_fingerprints(compose, tmp_path, *extra, f"{key}={where / source.name}")
              for where in (source.parent, moved, changed)}
    assert prints[moved] == prints[source.parent]
    assert prints[changed] != prints[source.parent]
