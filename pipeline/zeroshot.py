"""Zero-shot classification maths: pure functions of arrays, no I/O, no model, no files.

- label embeddings from prompts: one template, or an ensemble (the normalised mean of a label's normalised prompt
  embeddings, as the CLIP paper and open_clip's `build_zero_shot_classifier` do);
- scores: `softmax(logit_scale * cosine)` for CLIP-like families, as their `logits_per_image.softmax(-1)`, where
  labels compete; `sigmoid(logit_scale * cosine + logit_bias)` for SigLIP, where each label stands alone;
- decisions: top-k labels and scores, `unknown` below a minimum score, and in multi-label mode every label at or
  above a threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .labels import apply_template

Encoder = Callable[[list[str]], np.ndarray]  # prompts -> L2-normalised embeddings, one row per prompt


@dataclass(frozen=True)
class Scoring:
    """How a family turns cosines into scores (see `probabilities`)."""

    logit_scale: float
    logit_bias: float | None = None
    kind: str = "softmax"  # or "sigmoid"

    def scores(self, image_embeddings: np.ndarray, label_embeddings_: np.ndarray) -> np.ndarray:
        return probabilities(image_embeddings, label_embeddings_, self.logit_scale, self.logit_bias, self.kind)


def normalise(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def label_embeddings(encode: Encoder, texts: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """One L2-normalised row per label: its prompt's embedding, or with several templates the normalised mean
    of its prompts' (normalised) embeddings."""
    if len(templates) == 1:
        return normalise(encode([apply_template(templates[0], text) for text in texts]))
    total = sum(normalise(encode([apply_template(t, text) for text in texts])).astype(np.float64)
                for t in templates)
    return normalise(total)


def probabilities(image_embeddings: np.ndarray, label_embeddings_: np.ndarray, logit_scale: float,
                  logit_bias: float | None = None, scoring: str = "softmax") -> np.ndarray:
    """Per image and label, from L2-normalised embeddings (float32 out): softmax over the labels of
    logit_scale * cosine, or with scoring "sigmoid" each label's sigmoid(logit_scale * cosine + logit_bias)."""
    logits = (np.asarray(image_embeddings, np.float32) @ np.asarray(label_embeddings_, np.float32).T) \
        * np.float32(logit_scale)
    if scoring == "sigmoid":
        logits += np.float32(logit_bias or 0.0)
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits


@dataclass(frozen=True)
class Decisions:
    """Per image: the chosen label (-1 and `unknown_label` below the minimum score), the top-k, and in
    multi-label mode every label at or above the threshold (best first)."""

    label_index: np.ndarray  # (n,) int32, -1 for unknown
    labels: np.ndarray  # (n,) object: label names, or the unknown label
    score: np.ndarray  # (n,) float32: the best score (kept also when the label is unknown)
    topk_index: np.ndarray  # (n, k) int64, best first
    topk_score: np.ndarray  # (n, k) float32
    label_sets: list[list[str]] | None = None  # multi-label mode


def decide(probs: np.ndarray, labels: Sequence[str], topk: int, min_score: float | None = None,
           unknown_label: str = "unknown", threshold: float | np.ndarray | None = None) -> Decisions:
    """Single-label decisions; with `threshold` (multi-label mode: one score, or one per label) also each image's
    labels scoring at or above it, and `unknown` where none does (unless `min_score` decides that)."""
    decided = _single(probs, labels, topk, min_score, unknown_label)
    if threshold is None:
        return decided
    names = np.asarray(labels, dtype=object)
    passes = probs >= np.asarray(threshold, dtype=np.float32)
    label_index, chosen = decided.label_index, decided.labels
    if min_score is None:
        nothing = ~passes.any(axis=1)
        label_index = np.where(nothing, -1, label_index).astype(np.int32)
        chosen = np.where(nothing, unknown_label, chosen)
    order = np.argsort(-probs, axis=1, kind="stable")
    sets = [[str(names[j]) for j in row if ok[j]] for row, ok in zip(order, passes)]
    return Decisions(label_index, chosen, decided.score, decided.topk_index, decided.topk_score, sets)


def _single(probs: np.ndarray, labels: Sequence[str], topk: int, min_score: float | None,
            unknown_label: str) -> Decisions:
    names = np.asarray(labels, dtype=object)
    k = min(topk, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top_scores = np.take_along_axis(probs, order, axis=1).astype(np.float32)
    best = order[:, 0].astype(np.int32)
    chosen = names[best] if len(best) else np.asarray([], dtype=object)
    if min_score is not None:
        unsure = top_scores[:, 0] < min_score
        best = np.where(unsure, -1, best).astype(np.int32)
        chosen = np.where(unsure, unknown_label, chosen)
    return Decisions(best, chosen, top_scores[:, 0] if k else np.zeros(len(probs), np.float32), order, top_scores)
