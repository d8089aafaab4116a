"""Stage `fit_classifier`: the classifier the examples make (pipeline/fewshot.py), fitted on their embeddings.

Single-label mode: a few-shot head (`classify.adapter`; `auto` chooses by cross-validation on the examples alone,
never on the images being classified) and, with `classify.calibrate`, a temperature for its softmax, fitted on
its leave-one-out logits; `classify.target_precision` becomes the score at which the examples' calibrated
decisions reach that precision. Multi-label mode: the zero-shot scores, with a threshold per label fitted on the
examples (cross-validated, kept at `classify.threshold` where the examples cannot show a better one).

An example's embedding comes from `encode_examples`, or from the dataset's chunks when the example is one of its
images (only the chunks that can hold it are read). An example that did not decode is listed, and the run goes on.
Everything chosen is written to `classifier.json` (and the log): the method, its settings, the rule that chose
it, every candidate's cross-validated accuracy, the temperature, the thresholds, the calibration error on the
examples before and after.
"""

from __future__ import annotations

import io
import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import fewshot
from ..engine import Artifact, StageContext
from ..engine.files import write_json
from ..encoding.embeddings import embedding_matrix, iter_chunks, lookup
from .discover_examples import read_examples
from .encode_labels import read_label_embeddings

log = logging.getLogger(__name__)

VERSION = 7
HEAD_FILE = "classifier.npz"
CHOICE_FILE = "classifier.json"
FAILED_FILE = "example_errors.parquet"
FAILED_SCHEMA = pa.schema([("path", pa.string()), ("error_type", pa.string()), ("message", pa.string()),
                           ("transient", pa.bool_())])
RELIABILITY_BINS = 10


def fit_classifier(ctx: StageContext, *, examples: Artifact, encoded_examples: Artifact, image_embeddings: Artifact,
                   label_embeddings: Artifact, adapter: str, calibrate: bool, target_precision: float | None,
                   mode: str, threshold: float) -> None:
    listed = read_examples(examples)
    text, scoring = read_label_embeddings(label_embeddings)
    vectors, labels, failed = _example_vectors(listed, encoded_examples, image_embeddings, text.shape[1])
    if mode == "multilabel":
        fitted = _thresholds(vectors, labels, text, scoring, calibrate, threshold)
    else:
        fitted = _single_label(vectors, np.array([row[0] for row in labels], np.int64), text, scoring, adapter,
                               calibrate, target_precision)
    head = fitted.pop("head")
    np.savez(ctx.out / HEAD_FILE, **_arrays(head), thresholds=np.asarray(fitted["thresholds"], np.float32))
    summary = {**fitted, "examples": len(listed), "used": len(vectors), "failed": len(failed),
               "per_label": np.bincount([i for row in labels for i in row], minlength=len(text)).tolist(),
               "in_dataset": [p for p, inside in zip(listed.column("path").to_pylist(),
                                                      listed.column("in_dataset").to_pylist()) if inside]}
    write_json(ctx.out / CHOICE_FILE, summary)
    pq.write_table(pa.Table.from_pylist(failed, schema=FAILED_SCHEMA), ctx.out / FAILED_FILE)
    log.info("classifier: %s %s, temperature %.3f, on %d examples (%d failed); %s", summary["method"],
             json.dumps(summary["settings"]), summary["temperature"], len(vectors), len(failed), summary["rule"])


def _single_label(x: np.ndarray, y: np.ndarray, text: np.ndarray, scoring, adapter: str, calibrate: bool,
                  target_precision: float | None) -> dict:
    if not len(x):  # every example failed to decode (each is listed): nothing to fit
        adapter, log_rule = "none", "no example decoded: zero-shot"
    else:
        log_rule = f"classify.adapter={adapter}"
    if adapter == "auto":
        choice = fewshot.choose(x, y, text, scoring)
        head, temperature, rule, table = choice.head, choice.temperature, choice.rule, choice.table
        fitted_on = text if choice.uses_text else np.zeros_like(text)  # at chance the text was left out
    else:
        head, fitted_on, temperature, rule, table = fewshot.fit(adapter, x, y, text, scoring), text, None, log_rule, []
    # the examples' scores from heads that did not see them: the calibration report and the precision target
    held, logits = fewshot.out_of_fold_logits(x, y, fitted_on, scoring, head.method, head.settings,
                                              fewshot.leave_one_out_folds(y))
    if temperature is None:
        temperature = fewshot.fit_temperature(logits, y[held])
    # Zero-shot keeps the scale the model learned with its prompts (a temperature from a few dozen examples only
    # adds noise to it, measured by `make fewshot`); a head the examples made gets its temperature.
    temperature = temperature if calibrate and head.method is not fewshot.Adapter.NONE else 1.0
    before, after = (_calibration(logits, y[held], t) for t in (1.0, temperature))
    min_score = None
    if target_precision is not None:
        confidence = fewshot.softmax(logits, temperature).max(axis=1)
        min_score = fewshot.score_for_precision(confidence, logits.argmax(axis=1) == y[held], target_precision)
    return {"head": head, "method": head.method.value, "settings": head.settings, "temperature": temperature,
            "rule": rule, "thresholds": [], "min_score": min_score, "target_precision": target_precision,
            "calibration_before": before, "calibration_after": after,
            "candidates": [_candidate(row) for row in table]}


def _thresholds(x: np.ndarray, labels: list[list[int]], text: np.ndarray, scoring, calibrate: bool,
                threshold: float) -> dict:
    truth = np.zeros((len(labels), len(text)), bool)
    for row, indices in enumerate(labels):
        truth[row, indices] = True
    scores = scoring.scores(x, text)  # zero-shot: fitted on nothing, so the examples' scores are held out already
    thresholds = fewshot.fit_label_thresholds(scores, truth, default=threshold) if calibrate \
        else np.full(len(text), threshold)
    fitted = int(np.sum(thresholds != threshold))
    return {"head": fewshot.fit_none(x, np.zeros(len(x), np.int64), text, scoring), "method": "none",
            "settings": {}, "temperature": 1.0, "thresholds": thresholds.tolist(), "min_score": None,
            "target_precision": None, "rule": f"multi-label: a threshold per label fitted on the examples where "
                                              f"they show a better one than {threshold} ({fitted} of {len(text)})",
            "micro_f1_before": fewshot.micro_f1(scores >= threshold, truth),
            "micro_f1_after": fewshot.micro_f1(scores >= thresholds, truth), "candidates": []}


def _calibration(logits: np.ndarray, y: np.ndarray, temperature: float) -> dict:
    """The examples' calibration at a temperature: expected calibration error and the reliability diagram's bins."""
    probs = fewshot.softmax(logits, temperature)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == y
    bins = fewshot.reliability_bins(confidence, correct, RELIABILITY_BINS)
    return {"ece": fewshot.expected_calibration_error(confidence, correct, RELIABILITY_BINS),
            "bins": [{"lower": float(lo), "upper": float(hi), "count": int(n),
                      "confidence": None if n == 0 else float(c), "accuracy": None if n == 0 else float(a)}
                     for lo, hi, n, c, a in zip(bins.lower, bins.upper, bins.count, bins.confidence, bins.accuracy)]}


def _candidate(row: fewshot.Candidate) -> dict:
    return {"method": row.method.value, "settings": row.settings, "accuracy": row.accuracy, "loss": row.loss,
            "scored": row.scored}


def _example_vectors(listed: pa.Table, encoded: Artifact, dataset: Artifact, dim: int):
    """(embeddings, each one's labels, failures) of the examples, from their own encoding or the dataset's."""
    rows: dict[str, tuple] = {}  # path -> (ok, embedding or (error type, message, transient))
    for chunk in iter_chunks(encoded):
        _collect(chunk, rows)
    inside = [os.fsencode(p) for p, found in zip(listed.column("path").to_pylist(),
                                                   listed.column("in_dataset").to_pylist()) if found]
    for table in lookup(dataset, inside).values() if inside else ():
        _collect(table, rows)
    vectors, labels, failed = [], [], []
    for path, indices in zip(listed.column("path").to_pylist(), listed.column("labels").to_pylist()):
        ok, value = rows.get(path, (False, ("NotInDataset", "no image of the dataset has this key", False)))
        if ok:
            vectors.append(value)
            labels.append(indices)
        else:
            failed.append({"path": path, "error_type": value[0], "message": value[1], "transient": value[2]})
    return (np.stack(vectors) if vectors else np.zeros((0, dim), np.float32)), labels, failed


def _collect(chunk: pa.Table, rows: dict) -> None:
    matrix = embedding_matrix(chunk)
    columns = {name: chunk.column(name).to_pylist() for name in ("path", "ok", "error_type", "error_message",
                                                                 "transient")}
    for i, path in enumerate(columns["path"]):
        key = os.fsdecode(path)
        rows[key] = (True, matrix[i]) if columns["ok"][i] else \
            (False, (columns["error_type"][i], columns["error_message"][i], columns["transient"][i]))


def _arrays(head: fewshot.Head) -> dict:
    empty = np.zeros((0, head.weights.shape[1]), np.float32)
    return {"weights": head.weights, "bias": head.bias,
            "cache_keys": head.cache_keys if head.cache_keys is not None else empty,
            "cache_values": head.cache_values if head.cache_values is not None else np.zeros((0, len(head.bias))),
            "cache_weight": np.float32(head.cache_weight), "beta": np.float32(head.beta)}


def read_classifier(artifact: Artifact) -> tuple[fewshot.Head, dict, np.ndarray]:
    """(head, what was chosen, per-label thresholds) of a fit_classifier entry, verified as they are read."""
    summary = json.loads(artifact.read_bytes(CHOICE_FILE))
    arrays = np.load(io.BytesIO(artifact.read_bytes(HEAD_FILE)))
    cached = len(arrays["cache_keys"]) > 0
    head = fewshot.Head(fewshot.Adapter(summary["method"]), summary["settings"], "", arrays["weights"],
                        arrays["bias"], arrays["cache_keys"] if cached else None,
                        arrays["cache_values"] if cached else None, float(arrays["cache_weight"]),
                        float(arrays["beta"]))
    return head, summary, arrays["thresholds"]


def read_failed(artifact: Artifact) -> pa.Table:
    return pq.read_table(io.BytesIO(artifact.read_bytes(FAILED_FILE)))
