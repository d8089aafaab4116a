"""Zero-shot classification maths: pure functions of arrays, no I/O, no model, no files.

- label embeddings from prompts: one template, or an ensemble (the normalised mean of a label's normalised prompt
  embeddings, as the CLIP paper and open_clip's `build_zero_shot_classifier` do);
- probabilities: `softmax(logit_scale * cosine)`, as `CLIPModel`'s `logits_per_image.softmax(-1)`;
- decisions: top-k labels and scores, and `unknown` below a minimum score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .labels import apply_template

Encoder = Callable[[list[str]], np.ndarray]  # prompts -> L2-normalised embeddings, one row per prompt


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


def probabilities(image_embeddings: np.ndarray, label_embeddings_: np.ndarray, logit_scale: float) -> np.ndarray:
    """softmax over labels of logit_scale * cosine, per image; both inputs L2-normalised, float32 out."""
    logits = (np.asarray(image_embeddings, np.float32) @ np.asarray(label_embeddings_, np.float32).T) \
        * np.float32(logit_scale)
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits


@dataclass(frozen=True)
class Decisions:
    """Per image: the chosen label (-1 and `unknown_label` below the minimum score) and the top-k."""

    label_index: np.ndarray  # (n,) int32, -1 for unknown
    labels: np.ndarray  # (n,) object: label names, or the unknown label
    score: np.ndarray  # (n,) float32: the best score (kept also when the label is unknown)
    topk_index: np.ndarray  # (n, k) int64, best first
    topk_score: np.ndarray  # (n, k) float32


def decide(probs: np.ndarray, labels: Sequence[str], topk: int, min_score: float | None = None,
           unknown_label: str = "unknown") -> Decisions:
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
