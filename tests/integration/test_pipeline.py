"""End to end through the DAG: reference parity, reuse, resume, bad inputs, and the report files."""

import csv
import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import workflow
from pipeline.errors import UserError
from pipeline.imaging import decode
from pipeline.outputs.writers import read_metadata
from pipeline.encoding import loop
from pipeline.stages import discover
from tests.helpers import SAMPLE_IMAGES, SAMPLE_TRUTH, TINY_CHINESE_CLIP, TINY_CLIP
from tests.helpers import statuses as _statuses


def _hf_reference(model_dir, family, paths, prompts):
    from transformers import AutoProcessor, ChineseCLIPModel, CLIPModel

    model_cls = CLIPModel if family == "clip" else ChineseCLIPModel
    model = model_cls.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir, backend="pil")
    images = [decode(p) for p in paths]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model(**inputs).logits_per_image.softmax(-1).numpy()


@pytest.mark.parametrize("model,family,labels", [("tiny_clip", "clip", "shapes"),
                                                 ("tiny_chinese_clip", "chinese_clip", "shapes_zh"),
                                                 ("tiny_chinese_clip", "chinese_clip", "pairs")])
@pytest.mark.slow
def test_probabilities_equal_hugging_face_reference(compose, model, family, labels):
    cfg = compose(f"model={model}", f"labels={labels}", "encode.batch_size=5")
    summary = workflow.run(cfg)
    assert summary.errors == 0 and summary.classified == summary.discovered > 20
    table = pq.read_table(summary.out_dir / "predictions.parquet").to_pandas()
    ours = np.stack(table["probs"].to_numpy())
    labels = list(cfg.labels.list)
    prompts = [cfg.labels.template.replace("_", label) for label in labels]
    model_dir = TINY_CLIP if family == "clip" else TINY_CHINESE_CLIP
    reference = _hf_reference(model_dir, family, [SAMPLE_IMAGES / p for p in table["path"]], prompts)
    assert np.abs(ours - reference).max() < 1e-4
    assert (table["label"] == [labels[i] for i in reference.argmax(1)]).all()

    from transformers import pipeline as hf_pipeline

    zero_shot = hf_pipeline("zero-shot-image-classification", model=str(model_dir))
    template = cfg.labels.template.replace("_", "{}")
    for path, label in list(zip(table["path"], table["label"]))[:8]:
        result = zero_shot(decode(SAMPLE_IMAGES / path), candidate_labels=labels,
                           hypothesis_template=template)
        assert result[0]["label"] == label, path


def test_demo_labels_match_truth(compose):
    summary = workflow.run(compose("dataset=sample", "model=tiny_clip", "labels=shapes"))
    predicted = json.loads((summary.out_dir / "res.json").read_text(encoding="utf-8"))
    with open(SAMPLE_TRUTH, newline="", encoding="utf-8") as fh:
        truth = {row["path"]: row["shape"] for row in csv.DictReader(fh) if row.get("shape")}
    hits = [predicted[path] == shape for path, shape in truth.items()]
    accuracy = sum(hits) / len(hits)
    print(f"demo shape accuracy: {accuracy:.3f} on {len(hits)} images")
    assert len(hits) >= 20 and accuracy >= 0.9


def _dataset_with_bad_files(root):
    root.mkdir()
    for i, name in enumerate(sorted(p.name for p in SAMPLE_IMAGES.iterdir())[:10]):
        shutil.copy(SAMPLE_IMAGES / name, root / f"{i:02d}_{name}")
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.png").write_text("not an image")
    good = (root / sorted(p.name for p in root.iterdir() if p.suffix == ".jpg")[0]).read_bytes()
    (root / "nested").mkdir()
    (root / "nested" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    return 10, {"empty.jpg", "text.png", "nested/truncated.jpg"}


def test_bad_images_are_reported_and_counts_add_up(compose, tmp_path):
    n_good, bad = _dataset_with_bad_files(tmp_path / "data")
    summary = workflow.run(compose(f"dataset.path={tmp_path / 'data'}", "encode.batch_size=4"))
    errors = pd.read_parquet(summary.out_dir / "errors.parquet")
    res = json.loads((summary.out_dir / "res.json").read_text())
    assert set(errors["path"]) == bad and (errors["stage"] == "decode").all() and not errors["transient"].any()
    assert set(errors.loc[errors.path == "text.png", "error_type"]) == {"UnidentifiedImageError"}
    assert all(errors["message"].str.len() > 0)
    assert summary.discovered == len(res) + len(errors) == n_good + len(bad)
    assert list(res) == sorted(res)  # res.json is sorted by path, as the vendor example writes it


def test_decode_workers_split_batches_without_changing_results(compose, tmp_path):
    """Two workers decode parts of each batch of 5 (3 + 2 images), bad files among them: the batches the
    model sees, hence every probability bit and every error row, are those of decoding in the main process."""
    _dataset_with_bad_files(tmp_path / "data")
    runs = {}
    for workers in (0, 2):
        summary = workflow.run(compose(f"dataset.path={tmp_path / 'data'}", "encode.batch_size=5",
                                       "encode.chunk_size=11", f"encode.num_workers={workers}",
                                       out=f"out{workers}", cache=f"cache{workers}"))
        runs[workers] = {name: pq.read_table(summary.out_dir / f"{name}.parquet") for name in ("predictions", "errors")}
        runs[workers]["res.json"] = (summary.out_dir / "res.json").read_bytes()
        assert summary.counters["model_seconds"] > 0
    assert runs[2]["res.json"] == runs[0]["res.json"]
    assert runs[2]["predictions"].equals(runs[0]["predictions"]) and runs[2]["errors"].equals(runs[0]["errors"])
    assert runs[0]["errors"].num_rows == 3 and runs[0]["predictions"].num_rows == 10


def test_label_sets_reuse_image_embeddings(compose):
    first = workflow.run(compose("labels=shapes"))
    second = workflow.run(compose("labels=colors", out="out2"))
    assert _statuses(first)["encode_images"] == "ran"
    assert _statuses(second)["encode_images"] == "reused" and _statuses(second)["encode_labels"] == "ran"
    again = workflow.run(compose("labels=colors", out="out3"))
    assert {s for s in _statuses(again).values() if s != "published"} == {"unchanged", "reused"}
    # how the work is done is not what it computes: other batches, workers, chunking of progress, device choice
    other = workflow.run(compose("labels=colors", "encode.batch_size=3", "encode.num_workers=1", "device=auto",
                                 "preprocess.timeout=30", out="out4"))
    assert _statuses(other)["encode_images"] == "reused" and _statuses(other)["classify"] == "reused"
    assert (other.out_dir / "res.json").read_bytes() == (second.out_dir / "res.json").read_bytes()
    # what it computes is: another dtype re-encodes the images
    assert _statuses(workflow.run(compose("labels=colors", "device.dtype=int8", out="out5")))["encode_images"] == "ran"
    colors = pd.read_parquet(second.out_dir / "predictions.parquet")
    assert set(colors["label"]) <= {"red", "green", "blue", "yellow", "purple", "orange"}
    assert read_metadata(second.out_dir / "predictions.parquet")["label_set"]["name"] == "colors"


def test_resume_after_crash_gives_identical_outputs(compose, monkeypatch):
    args = ("encode.batch_size=3", "encode.chunk_size=7")
    reference = workflow.run(compose(*args, out="ref", cache="cache_ref"))

    real_write = loop.write_chunk
    written = []

    def crash_after_two(*a, **kw):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated kill")
        written.append(1)
        return real_write(*a, **kw)

    monkeypatch.setattr(loop, "write_chunk", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        workflow.run(compose(*args))
    monkeypatch.setattr(loop, "write_chunk", real_write)
    resumed = workflow.run(compose(*args))
    assert _statuses(resumed)["encode_images"] == "resumed"
    chunks = len(resumed.artifacts["encode_images"].chunks())
    assert resumed.counters["chunks_reused"] == 2 and resumed.counters["chunks_encoded"] == chunks - 2
    for name in ("res.json", "predictions.parquet", "errors.parquet"):
        if name.endswith(".parquet"):
            assert pq.read_table(resumed.out_dir / name).equals(pq.read_table(reference.out_dir / name)), name
        else:
            assert (resumed.out_dir / name).read_bytes() == (reference.out_dir / name).read_bytes()


def _no_image_read(monkeypatch):
    def fail(*a, **kw):
        raise AssertionError("an image was read before the input error was reported")
    monkeypatch.setattr(discover, "discover", fail)


@pytest.mark.parametrize("overrides,message", [
    (("labels=pairs_zh",), r"\(clip\) is English-only and does not take Chinese"),
    (("labels.template=no placeholder",), "exactly one"),
    (("labels.template=_ and _",), "exactly one"),
    (("labels=custom", "labels.list=''"), "no labels"),
    (("labels=custom", "labels.list='cat,dog,cat'"), "repeats labels"),
    (("labels=custom", "labels.file=/nonexistent/labels.txt"), "label file not found"),
    (("model.path=/nonexistent/model",), "model directory not found"),
    (("dataset.path=/nonexistent/data",), "dataset not found"),
    (("encode.batch_size=0",), "must be a positive integer"),
    (("labels=custom",), "no labels given"),
    (("model=custom",), "no model given"),
    (("dataset=custom",), "no input"),
    ((f"dataset.image={SAMPLE_IMAGES / 'red_circle_00.jpg'}",), "both dataset.path and dataset.image"),
    (("device=cuda",), "no CUDA device"),
    (("device=npu",), "torch_npu"),
    (("device=cuda", "device.dtype=int8"), "int8 .* CPU only"),
])
def test_bad_input_fails_early_with_a_clear_message(compose, monkeypatch, overrides, message):
    _no_image_read(monkeypatch)
    with pytest.raises(UserError, match=message):
        workflow.run(compose(*overrides))


def test_pickle_weights_need_permission(compose, tmp_path, monkeypatch):
    model = tmp_path / "pickled"
    shutil.copytree(TINY_CLIP, model)
    from safetensors.torch import load_file

    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    _no_image_read(monkeypatch)
    with pytest.raises(UserError, match="allow_pickle"):
        workflow.run(compose(f"model.path={model}"))


def test_parquet_reads_the_same_in_pandas_polars_duckdb(compose):
    import duckdb
    import polars as pl

    summary = workflow.run(compose("labels=pairs", "classify.topk=3"))
    path = summary.out_dir / "predictions.parquet"
    pdf = pd.read_parquet(path)
    plf = pl.read_parquet(path)
    ddf = duckdb.sql(f"SELECT * FROM read_parquet('{path}') ORDER BY path").df()
    assert list(pdf.columns) == plf.columns == list(ddf.columns)
    assert pdf["path"].tolist() == plf["path"].to_list() == ddf["path"].tolist()
    assert pdf["label"].tolist() == plf["label"].to_list() == ddf["label"].tolist()
    assert np.array_equal(pdf["score"].to_numpy(), plf["score"].to_numpy())
    assert [list(x) for x in pdf["topk_labels"]] == plf["topk_labels"].to_list() == \
        [list(x) for x in ddf["topk_labels"]]
    probs = np.stack(pdf["probs"].to_numpy())
    assert probs.shape == (len(pdf), 30) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert np.array_equal(probs, np.array(plf["probs"].to_list(), dtype=np.float32))
    assert (pdf["score"].to_numpy() == probs.max(1)).all() and (pdf["width"] > 0).all()
    meta = read_metadata(path)
    assert meta["model"]["family"] == "clip" and len(meta["label_set"]["labels"]) == 30
    assert meta["model"]["name"] == "tiny-clip"
    assert meta["template"] == "a photo of a _." and meta["config"]["topk"] == 3
    errors = pl.read_parquet(summary.out_dir / "errors.parquet")
    assert errors.columns == ["path", "stage", "error_type", "message", "transient"] and errors.height == 0


def test_empty_dataset_gives_empty_outputs(compose, tmp_path):
    (tmp_path / "empty").mkdir()
    summary = workflow.run(compose(f"dataset.path={tmp_path / 'empty'}"))
    assert (summary.discovered, summary.classified, summary.errors) == (0, 0, 0)
    assert json.loads((summary.out_dir / "res.json").read_text()) == {}
    assert len(pd.read_parquet(summary.out_dir / "predictions.parquet")) == 0


def test_decode_timeout_reported_and_all_failed_chunks_handled(compose):
    # Every image exceeds a 1-microsecond budget: each is reported, none hangs, chunks of only errors are fine.
    summary = workflow.run(compose("preprocess.timeout=0.000001", "encode.chunk_size=4"))
    errors = pd.read_parquet(summary.out_dir / "errors.parquet")
    assert summary.classified == 0 and len(errors) == summary.discovered > 0
    assert set(errors["error_type"]) == {"DecodeTimeout"} and errors["transient"].all()
    assert not summary.artifacts["encode_images"].final  # a timeout is retried by the next run
    kinds = summary.error_kinds
    assert [(k.error_type, k.count, k.transient) for k in kinds] == [("DecodeTimeout", summary.discovered, True)]
    assert kinds[0].examples == sorted(errors["path"])[:3]
    assert json.loads((summary.out_dir / "res.json").read_text()) == {}


def test_embeddings_output_round_trips_to_the_probabilities(compose):
    """embeddings=true: embeddings.parquet (row for row beside predictions.parquet) times the label embeddings
    of label_embeddings.parquet, through softmax(logit_scale * ...), gives back `probs` within 1e-5."""
    import json

    summary = workflow.run(compose("labels=pairs", "embeddings=true", "encode.chunk_size=7"))
    images = pq.read_table(summary.out_dir / "embeddings.parquet")
    labels = pq.read_table(summary.out_dir / "label_embeddings.parquet")
    predictions = pq.read_table(summary.out_dir / "predictions.parquet")
    assert images.column("path").to_pylist() == predictions.column("path").to_pylist() and len(images) > 30
    matrix = np.stack(images.column("embedding").to_numpy(zero_copy_only=False))
    label_matrix = np.stack(labels.column("embedding").to_numpy(zero_copy_only=False))
    assert labels.column("label").to_pylist() == read_metadata(summary.out_dir / "predictions.parquet")[
        "label_set"]["labels"]
    scale = json.loads(labels.schema.metadata[b"clip_pipeline"])["logit_scale"]
    logits = scale * matrix.astype(np.float64) @ label_matrix.T.astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    assert np.abs(probs - np.stack(predictions.column("probs").to_numpy(zero_copy_only=False))).max() < 1e-5
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1, atol=1e-5)
    again = workflow.run(compose("labels=pairs", out="plain"))  # without: no stale embeddings in the run directory
    assert not (again.out_dir / "embeddings.parquet").exists()
