"""Metrics against ground truth, checked against an independent pandas computation; sweep summary."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.callbacks import write_sweep_summary
from pipeline.evaluation import MetricsAccumulator, truth_from_file, truth_from_folders
from pipeline.errors import UserError


def _independent(truth, pred, probs, labels):
    df = pd.DataFrame({"truth": truth, "pred": pred})
    rank = [int((p > p[labels.index(t)]).sum()) for p, t in zip(probs, truth)]
    recall = df.groupby("truth").apply(lambda g: (g.pred == g.name).mean(), include_groups=False)
    precision = df.groupby("pred").apply(lambda g: (g.truth == g.name).mean(), include_groups=False)
    return {"top1": (df.truth == df.pred).mean(), "top5": np.mean(np.array(rank) < 5),
            "mean_recall": recall.mean(), "recall": recall.to_dict(), "precision": precision.to_dict()}


def test_metrics_match_independent_computation():
    rng = np.random.default_rng(0)
    labels = [f"l{i}" for i in range(8)]
    n = 500
    probs = rng.dirichlet(np.ones(8), n).astype(np.float32)
    truth = [labels[i] for i in rng.integers(0, 8, n)]
    pred = [labels[i] for i in probs.argmax(1)]
    acc = MetricsAccumulator(labels)
    for start in range(0, n, 64):  # streamed in row groups, as the classify stage does
        acc.add(truth[start:start + 64], pred[start:start + 64], probs[start:start + 64])
    metrics = acc.metrics_table().to_pandas()
    overall = metrics[metrics.scope == "overall"].set_index("metric")["value"]
    want = _independent(truth, pred, probs, labels)
    assert overall["top1_accuracy"] == pytest.approx(want["top1"])
    assert overall["top5_accuracy"] == pytest.approx(want["top5"])
    assert overall["mean_per_class_recall"] == pytest.approx(want["mean_recall"])
    per_class = metrics[metrics.scope == "class"].pivot(index="label", columns="metric", values="value")
    for label in labels:
        assert per_class.loc[label, "recall"] == pytest.approx(want["recall"][label])
        assert per_class.loc[label, "precision"] == pytest.approx(want["precision"][label])
    confusion = acc.confusion_table().to_pandas()
    assert confusion["count"].sum() == n
    crosstab = pd.crosstab(pd.Series(truth, name="t"), pd.Series(pred, name="p"))
    for row in confusion.itertuples():
        assert crosstab.loc[row.true_label, row.predicted_label] == row.count


def test_truth_sources(tmp_path):
    paths = ["cat/1.jpg", "dog/2.jpg", "dog/x/3.jpg"]
    assert truth_from_folders(paths, ["cat", "dog"], forced=False) == {"cat/1.jpg": "cat", "dog/2.jpg": "dog",
                                                                         "dog/x/3.jpg": "dog"}
    assert truth_from_folders(paths + ["loose.jpg"], ["cat", "dog"], forced=False) == {}
    assert truth_from_folders(["a/1.jpg"], ["cat"], forced=False) == {}
    (tmp_path / "t.csv").write_text("path,shape,color\na.jpg,circle,red\nb.jpg,,blue\n")
    assert truth_from_file(tmp_path / "t.csv", "shape") == {"a.jpg": "circle"}
    with pytest.raises(UserError, match="truth_column"):
        truth_from_file(tmp_path / "t.csv", "label")


def test_sweep_summary_rows(compose, tmp_path):
    from pipeline import workflow

    for job, labels in (("0", "shapes"), ("1", "colors")):
        workflow.run(compose(f"labels={labels}", "classify.min_score=0.3", out=f"sweep/{job}"))
    target = write_sweep_summary(tmp_path / "sweep")
    summary = pq.read_table(target).to_pandas()
    assert set(summary.label_set) == {"shapes", "colors"}
    for job in ("0", "1"):
        preds = pd.read_parquet(tmp_path / "sweep" / job / "predictions.parquet")
        mine = summary[summary.job == job].set_index("label")
        assert mine["count"].sum() == len(preds)
        for label, count in preds.label.value_counts().items():
            assert mine.loc[label, "count"] == count
            assert mine.loc[label, "mean_score"] == pytest.approx(preds[preds.label == label].score.mean())
        assert mine["unknown_share"].iloc[0] == pytest.approx((preds.label == "unknown").mean())
