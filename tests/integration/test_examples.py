"""Better labels than zero-shot: examples (labels.examples) through the same stages and cache as the dataset, a
few-shot classifier chosen on the examples alone, calibrated scores, and the review queue that closes the loop.

The fixtures: the bundled sample renders, label names that say nothing about them ("kind 1".."kind 5" standing
for the shapes) or the real ones, and examples rendered apart with other seeds (tests/helpers/synthetic.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import workflow
from pipeline.errors import UserError
from tests.helpers import SAMPLE_TRUTH, statuses
from tests.helpers import synthetic as S
from tests.helpers.examples import KIND_LIST, KINDS, SHAPES, render_dataset, render_examples

pytestmark = pytest.mark.slow


def kind_truth(tmp_path: Path) -> Path:
    table = pd.read_csv(SAMPLE_TRUTH)
    table["kind"] = [KINDS[SHAPES.index(shape)] for shape in table["shape"]]
    table.to_csv(tmp_path / "kinds.csv", index=False)
    return tmp_path / "kinds.csv"


def overall(summary, scope: str = "overall") -> dict[str, float]:
    metrics = pd.read_parquet(summary.out_dir / "metrics.parquet")
    return {m: v for s, m, v in zip(metrics["scope"], metrics["metric"], metrics["value"]) if s == scope}


def kinds_run(compose, tmp_path, *extra, out: str = "out"):
    return workflow.run(compose(KIND_LIST, f"dataset.truth={kind_truth(tmp_path)}", "dataset.truth_column=kind",
                                "report=false", *extra, out=out))


def test_four_examples_per_label_turn_meaningless_names_into_labels(compose, tmp_path):
    examples = render_examples(tmp_path / "examples", 4, seed=1000)  # the first draw of `make fewshot`
    summary = kinds_run(compose, tmp_path, f"labels.examples={examples}")
    adapted, zero_shot = overall(summary)["top1_accuracy"], overall(summary, "zero_shot_overall")["top1_accuracy"]
    assert zero_shot < 0.35  # near chance (0.2): the names say nothing
    assert adapted >= 0.90, adapted
    choice = json.loads((summary.out_dir / "classifier.json").read_text())
    assert choice["method"] != "none" and choice["used"] == 20 and choice["candidates"]
    assert "zero-shot" in choice["rule"]  # the rule is written out, with the test on the text


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
def test_with_the_real_names_auto_never_falls_below_zero_shot(compose, tmp_path, shots):
    examples = render_examples(tmp_path / "examples", shots, names=SHAPES, seed=shots)
    summary = workflow.run(compose("report=false", f"labels.examples={examples}"))
    adapted, zero_shot = overall(summary)["top1_accuracy"], overall(summary, "zero_shot_overall")["top1_accuracy"]
    assert adapted >= zero_shot - 0.01, (adapted, zero_shot)


@pytest.mark.parametrize("model,shots", [("tiny_clip", 8), ("tiny_siglip", 4)])
def test_the_temperature_lowers_calibration_error_on_held_out_images(compose, tmp_path, model, shots):
    """The first draw of `make fewshot` at these shot counts (where the README's table has it lowered in most
    draws; it lists every setting, including those where the temperature does not help)."""
    truth = render_dataset(tmp_path / "heldout", 300, seed=2024)
    truth.to_csv(tmp_path / "truth.csv", index=False)
    examples = render_examples(tmp_path / "examples", shots, seed=1000)
    summary = workflow.run(compose(f"model={model}", KIND_LIST, f"dataset.path={tmp_path / 'heldout'}",
                                   f"dataset.truth={tmp_path / 'truth.csv'}", "dataset.truth_column=kind",
                                   "report=false", f"labels.examples={examples}"))
    ece = overall(summary, "calibration")
    assert ece["ece_calibrated"] < ece["ece_uncalibrated"], ece
    bins = pd.read_parquet(summary.out_dir / "calibration.parquet")
    assert set(bins["scores"]) == {"uncalibrated", "calibrated"} and bins["count"].sum() == 2 * 300
    # the temperature never changes a label: the uncalibrated head decides the same
    assert overall(summary)["top1_accuracy"] > 0.8


def test_thresholds_per_label_raise_the_sigmoid_micro_f1(compose, tmp_path):
    """SigLIP, shapes and colours at once, with a prompt that puts the colours' scores far from 0.5."""
    truth = render_dataset(tmp_path / "heldout", 150, seed=7)
    truth.to_csv(tmp_path / "truth.csv", index=False)
    examples = render_dataset(tmp_path / "examples", 40, seed=8)[["path", "both"]].rename(columns={"both": "label"})
    examples.to_csv(tmp_path / "examples" / "labelled.csv", index=False)
    labels = "labels.list='" + ",".join(SHAPES + list(S.COLORS)) + "'"
    args = ("model=tiny_siglip", labels, "labels.template='a picture of a _.'", "classify.mode=multilabel",
            f"dataset.path={tmp_path / 'heldout'}", f"dataset.truth={tmp_path / 'truth.csv'}",
            "dataset.truth_column=both", "report=false", f"labels.examples={tmp_path / 'examples' / 'labelled.csv'}")
    fixed = workflow.run(compose(*args, "classify.calibrate=false", out="fixed"))
    fitted = workflow.run(compose(*args, out="fitted"))
    assert statuses(fitted)["encode_images"] == "reused" and statuses(fitted)["encode_examples"] == "reused"
    assert overall(fitted)["micro_f1"] > overall(fixed)["micro_f1"] + 0.05, (overall(fixed), overall(fitted))
    assert overall(fitted, "zero_shot_overall")["micro_f1"] == overall(fixed)["micro_f1"]  # side by side
    choice = json.loads((fitted.out_dir / "classifier.json").read_text())
    assert len(choice["thresholds"]) == 11 and any(t != 0.5 for t in choice["thresholds"])
    assert choice["in_dataset"] == []  # the table's paths name files beside it, though the dataset has those keys


def test_a_reviewed_table_fed_back_encodes_no_dataset_image_and_raises_top1(compose, tmp_path):
    first = kinds_run(compose, tmp_path, out="zero-shot")
    review = pd.read_parquet(first.out_dir / "review.parquet")
    assert list(review.columns[:2]) == ["path", "label"] and len(review) == 38
    assert review["rank"].tolist()[:3] == [1, 2, 3]
    assert review["priority"].is_monotonic_increasing
    # a person checks the first 20 and writes the right label
    truth = pd.read_csv(kind_truth(tmp_path)).set_index("path")["kind"]
    checked = review.head(20)
    checked = checked[checked["path"].isin(truth.index)].assign(label=lambda t: t["path"].map(truth))
    checked[["path", "label"]].to_csv(tmp_path / "reviewed.csv", index=False)
    second = kinds_run(compose, tmp_path, f"labels.examples={tmp_path / 'reviewed.csv'}", out="reviewed")
    states = statuses(second)
    assert states["encode_images"] == "reused" and states["discover"] == "unchanged"
    assert second.counters["images_encoded"] == 0  # the examples' embeddings came from the dataset's chunks
    assert overall(second)["top1_accuracy"] > overall(first)["top1_accuracy"] + 0.3
    predictions = pd.read_parquet(second.out_dir / "predictions.parquet")
    assert predictions["is_example"].sum() == len(checked)  # marked, and left out of the metrics:
    assert overall(second)["images_with_truth"] == 37 - len(checked)


def test_adding_examples_encodes_only_them_and_reuses_every_image_embedding(compose, tmp_path):
    examples = render_examples(tmp_path / "examples", 2)
    first = kinds_run(compose, tmp_path, f"labels.examples={examples}", out="first")
    render_examples(tmp_path / "more", 1, seed=3)
    for label in KINDS:
        for image in (tmp_path / "more" / label).iterdir():
            shutil.copy(image, examples / label / f"added-{image.name}")
    again = kinds_run(compose, tmp_path, f"labels.examples={examples}", out="again")
    assert statuses(again)["encode_images"] == "reused" and statuses(again)["encode_examples"] == "resumed"
    assert again.counters["images_encoded"] == 5  # one chunk per example: five added, five encoded
    other = kinds_run(compose, tmp_path, f"labels.examples={examples}", "classify.adapter=tip", out="tip")
    assert all(statuses(other)[s] in ("reused", "unchanged") for s in ("encode_images", "encode_examples"))
    assert other.seconds < first.seconds


def test_target_precision_sets_the_minimum_score_on_the_examples(compose, tmp_path):
    examples = render_examples(tmp_path / "examples", 8)
    summary = kinds_run(compose, tmp_path, f"labels.examples={examples}", "classify.target_precision=0.99")
    choice = json.loads((summary.out_dir / "classifier.json").read_text())
    assert choice["target_precision"] == 0.99 and choice["min_score"] is not None
    predictions = pd.read_parquet(summary.out_dir / "predictions.parquet")
    unsure = predictions["score"] < choice["min_score"]
    assert (predictions.loc[unsure, "label"] == "unknown").all()
    assert (predictions.loc[~unsure, "label"] != "unknown").all()


def test_an_example_that_does_not_decode_is_listed_and_the_run_goes_on(compose, tmp_path):
    examples = render_examples(tmp_path / "examples", 3)
    (examples / KINDS[0] / "broken.jpg").write_bytes(b"not an image")
    summary = kinds_run(compose, tmp_path, f"labels.examples={examples}")
    errors = pd.read_parquet(summary.out_dir / "errors.parquet")
    assert errors[errors["stage"] == "example"]["path"].tolist() == [f"{KINDS[0]}/broken.jpg"]
    assert summary.classified == 38


def _an_example(folder: Path) -> Path:
    return sorted((folder / KINDS[0]).iterdir())[0]


@pytest.mark.parametrize("make,message", [
    (lambda d: (d / "kind 9").mkdir() or shutil.copy(_an_example(d), d / "kind 9"), "not in the label set: kind 9"),
    (lambda d: shutil.rmtree(d / "kind 2"), "no example of 1 labels \\(kind 2\\)"),
    (lambda d: shutil.copy(_an_example(d), d / "loose.jpg"), "outside a label's subfolder"),
    (lambda d: [shutil.rmtree(p) for p in list(d.iterdir())], "no examples in"),
])
def test_bad_examples_stop_before_any_image_is_read(compose, tmp_path, make, message):
    examples = render_examples(tmp_path / "examples", 2)
    make(examples)
    with pytest.raises(UserError, match=message):
        workflow.build(compose(KIND_LIST, f"labels.examples={examples}"))


@pytest.mark.parametrize("overrides,message", [
    (("classify.target_precision=0.9",), "needs examples"),
    (("classify.adapter=tip",), "fits a classifier on examples"),
    (("labels.examples=/nonexistent/examples",), "examples not found"),
])
def test_options_that_need_examples_say_so(compose, overrides, message):
    with pytest.raises(UserError, match=message):
        workflow.build(compose(*overrides))


def test_examples_in_a_table_by_name_or_prompt_text(compose, tmp_path):
    """A table of paths relative to it, labels by display name or by prompt text."""
    render_examples(tmp_path / "imgs", 3, names=SHAPES)
    rows = [(f"imgs/{p.parent.name}/{p.name}", p.parent.name) for p in sorted((tmp_path / "imgs").rglob("*.jpg"))]
    pd.DataFrame(rows, columns=["path", "label"]).to_parquet(tmp_path / "examples.parquet")
    labels = "labels.list=[{name: round, prompt: circle},square,triangle,star,cross]"
    summary = workflow.run(compose(labels, "report=false", f"labels.examples={tmp_path / 'examples.parquet'}",
                                   "dataset.truth=null"))
    assert json.loads((summary.out_dir / "classifier.json").read_text())["used"] == 15
    assert "round" in set(pd.read_parquet(summary.out_dir / "predictions.parquet")["label"])
