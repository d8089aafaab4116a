"""Parity of a device/dtype run with an fp32 CPU reference, image by image (the vendor's "precision test",
enforced; "parity" here, since precision is also a metric of the evaluation).

The vendor example logged the cosine similarity of one image's probabilities and never checked its threshold.
Here every image counts: the cosine of the probability vectors and of the image embeddings, and top-1 agreement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from .stages.discover import display_path
from .encoding.embeddings import embedding_matrix, iter_chunks
from .workflow import RunSummary


@dataclass
class ParityReport:
    table: pd.DataFrame  # one row per image classified by both runs
    min_cosine: float
    min_top1_agreement: float

    @property
    def top1_agreement(self) -> float:
        return float(self.table["top1_agrees"].mean()) if len(self.table) else 1.0

    @property
    def worst_prob_cosine(self) -> float:
        return float(self.table["prob_cosine"].min()) if len(self.table) else 1.0

    @property
    def worst_embedding_cosine(self) -> float:
        return float(self.table["embedding_cosine"].min()) if len(self.table) else 1.0

    @property
    def passed(self) -> bool:
        return (min(self.worst_prob_cosine, self.worst_embedding_cosine) >= self.min_cosine
                and self.top1_agreement >= self.min_top1_agreement)

    def lines(self) -> list[str]:
        verdict = "PASS" if self.passed else "FAIL"
        return [
            f"images compared       {len(self.table)}",
            f"min prob cosine       {self.worst_prob_cosine:.6f}   (threshold {self.min_cosine})",
            f"min embedding cosine  {self.worst_embedding_cosine:.6f}   (threshold {self.min_cosine})",
            f"top-1 agreement       {self.top1_agreement:.4f}     (threshold {self.min_top1_agreement})",
            f"max |prob diff|       {self.table['max_abs_prob_diff'].max() if len(self.table) else 0:.2e}",
            f"verdict               {verdict}",
        ]


def _embeddings(summary: RunSummary) -> dict[str, np.ndarray]:
    """Image embeddings by the path written in predictions.parquet."""
    rows = {}
    for chunk in iter_chunks(summary.artifacts["encode_images"]):
        ok = chunk.column("ok").to_numpy(zero_copy_only=False)
        emb = embedding_matrix(chunk)
        paths = chunk.column("path").to_pylist()
        rows.update({display_path(p): emb[k] for k, p in enumerate(paths) if ok[k]})
    return rows


def _predictions(summary: RunSummary) -> pd.DataFrame:
    return pq.read_table(summary.out_dir / "predictions.parquet", columns=["path", "label", "probs"]).to_pandas()


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


def compare(candidate: RunSummary, reference: RunSummary, min_cosine: float, min_top1: float) -> ParityReport:
    cand, ref = _predictions(candidate), _predictions(reference)
    merged = cand.merge(ref, on="path", suffixes=("_candidate", "_reference"))
    probs_c = np.stack(merged["probs_candidate"].to_numpy()) if len(merged) else np.zeros((0, 1))
    probs_r = np.stack(merged["probs_reference"].to_numpy()) if len(merged) else np.zeros((0, 1))
    emb_c, emb_r = _embeddings(candidate), _embeddings(reference)
    paths = list(merged["path"])
    e_c = np.stack([emb_c[p] for p in paths]) if paths else np.zeros((0, 1))
    e_r = np.stack([emb_r[p] for p in paths]) if paths else np.zeros((0, 1))
    table = pd.DataFrame({
        "path": merged["path"],
        "label_candidate": merged["label_candidate"],
        "label_reference": merged["label_reference"],
        "top1_agrees": merged["label_candidate"] == merged["label_reference"],
        "prob_cosine": _cosine(probs_c, probs_r),
        "embedding_cosine": _cosine(e_c, e_r),
        "max_abs_prob_diff": np.abs(probs_c - probs_r).max(1) if len(merged) else [],
    })
    return ParityReport(table, min_cosine, min_top1)
