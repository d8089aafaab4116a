"""Few-shot adaptation, calibration and review ranking: pure functions of arrays, beside `zeroshot.py` (no I/O, no
model, no files).

A handful of labelled example embeddings make a better classifier over the same L2-normalised image embeddings.
Every head gives logits in the family's own units (`logit_scale * cosine`, `+ logit_bias` for sigmoid families), so
the family's softmax or sigmoid still applies:

- `none`: zero-shot as is;
- `tip`: Tip-Adapter (Zhang et al., ECCV 2022), training-free: a cache of the examples added to the text logits;
- `gda`: Gaussian discriminant analysis (Wang et al., ICLR 2024), training-free: the log-odds of a Gaussian per
  label with one shared, shrunk covariance, added to the text logits;
- `clap`: a linear head initialised from the label embeddings and trained on the examples with a class-adaptive
  penalty towards them (CLAP, Silva-Rodriguez et al., CVPR 2024), so that at 1-4 shots it stays near zero-shot
  where zero-shot already works, unlike a plain linear probe;
- `auto`: `choose` picks one of them and its settings by cross-validation on the examples alone.

Then: one temperature for the softmax of the logits (Guo et al., 2017) fitted on out-of-fold logits of the
examples, calibration error and reliability bins, per-label thresholds for multi-label mode, the score at which
the examples reach a precision, and an order in which a person should review the images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Sequence

import numpy as np

from .families import SIGMOID
from .zeroshot import Scoring


class Adapter(str, Enum):
    """How the examples change the classifier (a closed choice; `AUTO` lets `choose` decide)."""

    NONE = "none"
    TIP = "tip"
    GDA = "gda"
    CLAP = "clap"
    AUTO = "auto"


# The order `choose` prefers among heads that cross-validate alike: zero-shot; gda, a linear head of zero-shot's own
# form with one setting; tip, which keeps every example and has two; clap, a trained head.
SIMPLICITY = (Adapter.NONE, Adapter.GDA, Adapter.TIP, Adapter.CLAP)

# Candidate settings for `choose`, set on the tiny fixtures (see the module's tests and the experiment in its issue).
# tip: alpha weighs the cache in units of logit_scale * cosine; beta is how sharply affinity falls with distance.
TIP_ALPHAS = (0.1, 0.3, 1.0, 3.0, 10.0)
TIP_BETAS = (1.0, 5.0)
# gda: alpha weighs the discriminant's log-odds; shrinkage pulls the shared covariance towards the identity.
GDA_ALPHAS = (0.1, 0.3, 1.0, 3.0, 10.0)
GDA_SHRINKAGES = (0.75,)
# clap: the penalty on ||W_c - logit_scale * text_c||^2 (logit units), times the label's trust lambda_c.
CLAP_STRENGTHS = (1.0, 0.1, 0.01, 0.001, 0.0001)
# One example per label, text at chance (see `choose`): the cache alone, smooth in the cosine.
ONE_SHOT_TIP = {"alpha": max(TIP_ALPHAS), "beta": 1.0}
SIGNIFICANCE = 0.05  # one-sided, for both tests of `choose`: zero-shot against chance, an adapter against zero-shot
MAX_FOLDS = 5
LEAVE_ONE_OUT_MAX = 200  # examples up to which `choose` fits the temperature on leave-one-out logits
TEMPERATURE_PRIOR_WIDTH = 1.0  # log T ~ N(0, 1): T within a factor e^2 of 1 unless the examples say otherwise
DEFAULT_THRESHOLD = 0.5


# ---------------------------------------------------------------- heads


@dataclass(frozen=True, eq=False)
class Head:
    """A classifier over L2-normalised image embeddings whose `logits` are in the family's units:
    `images @ weights.T + bias`, plus for tip `cache_weight * exp(-beta * (1 - images @ cache_keys.T)) @
    cache_values`. none, gda and clap are linear heads (gda folds its log-odds into weights and bias)."""

    method: Adapter
    settings: dict
    kind: str  # the family's scoring: "softmax" or "sigmoid"
    weights: np.ndarray  # (L, D): logit_scale * label embeddings, or a trained head in the same units
    bias: np.ndarray  # (L,): the family's logit_bias (0 for softmax families), or a trained one
    cache_keys: np.ndarray | None = None  # (M, D) tip: the examples
    cache_values: np.ndarray | None = None  # (M, L) tip: one-hot labels divided by their class's example count
    cache_weight: float = 0.0  # tip: alpha * logit_scale
    beta: float = 0.0

    def logits(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.float32)
        logits = images @ self.weights.T + self.bias
        if self.cache_keys is not None:
            affinity = np.exp(-self.beta * (1.0 - images @ self.cache_keys.T))
            logits += self.cache_weight * (affinity @ self.cache_values)
        return logits.astype(np.float32)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """The family's scores: softmax over the labels, or each label's sigmoid."""
        return scores_from_logits(self.logits(images), self.kind)


def scores_from_logits(logits: np.ndarray, kind: str) -> np.ndarray:
    if kind == SIGMOID:
        return (1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))).astype(np.float32)
    return softmax(logits)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)


def zero_shot_logits(images: np.ndarray, text: np.ndarray, scoring: Scoring) -> np.ndarray:
    weights, bias = _text_classifier(text, scoring)
    return (np.asarray(images, np.float32) @ weights.T + bias).astype(np.float32)


def fit_none(examples: np.ndarray, example_labels: np.ndarray, text: np.ndarray, scoring: Scoring) -> Head:
    """Zero-shot as is; the examples are not used."""
    return Head(Adapter.NONE, {}, scoring.kind, *_text_classifier(text, scoring))


def fit_tip(examples: np.ndarray, example_labels: np.ndarray, text: np.ndarray, scoring: Scoring,
            alpha: float = 1.0, beta: float = 5.0) -> Head:
    """Tip-Adapter's cache on top of zero-shot. Two departures from the paper, so that one alpha means the same
    everywhere: the cache term is multiplied by logit_scale (alpha is in cosine units, whatever the family's
    scale), and a label's term is the mean affinity to its examples rather than the sum (alpha does not grow with
    the shot count, and a label with more examples than another is not favoured for that)."""
    weights, bias = _text_classifier(text, scoring)
    values = _one_hot(example_labels, len(text))
    counts = values.sum(axis=0)
    values = values / np.maximum(counts, 1.0)  # a label without examples gets no cache term
    return Head(Adapter.TIP, {"alpha": float(alpha), "beta": float(beta)}, scoring.kind, weights, bias,
                np.asarray(examples, np.float32), values.astype(np.float32), float(alpha * scoring.logit_scale),
                float(beta))


def fit_clap(examples: np.ndarray, example_labels: np.ndarray, text: np.ndarray, scoring: Scoring,
             strength: float = 0.1) -> Head:
    """A linear head W (and a bias per label for sigmoid families) initialised at the zero-shot classifier and fitted
    on the examples: cross-entropy (softmax families) or per-label binary cross-entropy (sigmoid families, as they
    were trained), plus `strength * sum_c lambda_c * ||W_c - W0_c||^2` (W0 = logit_scale * text). lambda_c is
    CLAP's class-adaptive trust: the mean zero-shot probability of label c over label c's examples, so a label the
    text already gets right stays near the text and one it gets wrong is free to move; a label without examples
    keeps lambda = 1. The problem is strictly convex, so full-batch L-BFGS from the fixed start reaches its one
    optimum, the same every time."""
    anchor_weights, anchor_bias = _text_classifier(text, scoring)
    labels = np.asarray(example_labels, np.int64)
    trust = class_trust(zero_shot_logits(examples, text, scoring), labels, len(text))
    weights, bias = _minimise_penalised_loss(np.asarray(examples, np.float64), labels, anchor_weights, anchor_bias,
                                             strength * trust, scoring.kind == SIGMOID)
    return Head(Adapter.CLAP, {"strength": float(strength)}, scoring.kind, weights, bias)


def fit_gda(examples: np.ndarray, example_labels: np.ndarray, text: np.ndarray, scoring: Scoring,
            alpha: float = 1.0, shrinkage: float = 0.75) -> Head:
    """Gaussian discriminant analysis on top of zero-shot, training-free (Wang et al., "A hard-to-beat baseline
    for training-free CLIP-based adaptation", ICLR 2024): each label a Gaussian around its examples' mean with
    one covariance shared by all labels, whose log-odds `x Sigma^-1 mu_c - mu_c Sigma^-1 mu_c / 2` are added to
    the zero-shot logits times alpha. The shared covariance is what a cache or a nearest mean lacks: the
    directions in which examples of one label vary (a shape's colour, say) count for less. Sigma is the pooled
    within-label covariance shrunk towards a multiple of the identity (Ledoit-Wolf's target); with no within-label
    variation to estimate (one example per label) it is the identity: the nearest mean. Both terms are log-odds,
    so alpha needs no logit_scale. The added log-odds are centred over the labels that have examples (a shift
    that softmax ignores keeps sigmoid scores at zero-shot's level), and a label without examples gets none. Labels
    get no prior from how many examples they have: the examples' proportions are not the images'."""
    weights, bias = _text_classifier(text, scoring)
    x = np.asarray(examples, np.float64)
    labels = np.asarray(example_labels, np.int64)
    present = np.flatnonzero(np.bincount(labels, minlength=len(text)) > 0)
    means = np.stack([x[labels == c].mean(axis=0) for c in present]) if len(present) else np.zeros((0, x.shape[1]))
    residuals = x - means[np.searchsorted(present, labels)]
    dof = len(x) - len(present)
    within = residuals.T @ residuals / dof if dof > 0 else np.zeros((x.shape[1], x.shape[1]))
    spread = np.trace(within) / x.shape[1]
    covariance = (1.0 - shrinkage) * within + shrinkage * spread * np.eye(x.shape[1]) if spread > 0 \
        else np.eye(x.shape[1])
    log_odds_weights = np.linalg.solve(covariance, means.T).T  # (present, D): Sigma^-1 mu_c
    log_odds_bias = -0.5 * np.sum(log_odds_weights * means, axis=1)
    added_weights = np.zeros(weights.shape, np.float64)
    added_bias = np.zeros(len(text), np.float64)
    if len(present):
        added_weights[present] = log_odds_weights - log_odds_weights.mean(axis=0)
        added_bias[present] = log_odds_bias - log_odds_bias.mean()
    return Head(Adapter.GDA, {"alpha": float(alpha), "shrinkage": float(shrinkage)}, scoring.kind,
                (weights + alpha * added_weights).astype(np.float32), (bias + alpha * added_bias).astype(np.float32))


FITS: dict[Adapter, Callable[..., Head]] = {Adapter.NONE: fit_none, Adapter.TIP: fit_tip, Adapter.GDA: fit_gda,
                                            Adapter.CLAP: fit_clap}


def fit(method: Adapter | str, examples: np.ndarray, example_labels: np.ndarray, text: np.ndarray,
        scoring: Scoring, settings: dict | None = None) -> Head:
    return FITS[Adapter(method)](examples, example_labels, text, scoring, **(settings or {}))


def class_trust(logits: np.ndarray, labels: np.ndarray, n_labels: int) -> np.ndarray:
    """(L,) CLAP's lambda_c: the mean softmax probability zero-shot gives label c on label c's examples (softmax
    for sigmoid families too: how well the text *classifies* them); 1 for a label without examples."""
    probs = softmax(logits)
    own = probs[np.arange(len(labels)), labels]
    total = np.bincount(labels, weights=own, minlength=n_labels)
    count = np.bincount(labels, minlength=n_labels)
    return np.where(count > 0, total / np.maximum(count, 1), 1.0)


def _text_classifier(text: np.ndarray, scoring: Scoring) -> tuple[np.ndarray, np.ndarray]:
    weights = (np.asarray(text, np.float32) * np.float32(scoring.logit_scale)).astype(np.float32)
    bias = scoring.logit_bias if scoring.kind == SIGMOID and scoring.logit_bias is not None else 0.0
    return weights, np.full(len(text), bias, np.float32)


def _one_hot(labels: np.ndarray, n_labels: int) -> np.ndarray:
    return np.eye(n_labels, dtype=np.float64)[np.asarray(labels, np.int64)]


def _minimise_penalised_loss(x: np.ndarray, labels: np.ndarray, anchor_weights: np.ndarray,
                             anchor_bias: np.ndarray, penalty: np.ndarray, sigmoid: bool,
                             max_iter: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """CLAP's objective, minimised by L-BFGS from the anchor (softmax families: no bias, a shift it ignores)."""
    n_labels, dim = anchor_weights.shape
    w0, b0 = anchor_weights.astype(np.float64), anchor_bias.astype(np.float64)
    target = _one_hot(labels, n_labels)

    def loss_and_gradient(params: np.ndarray) -> tuple[float, np.ndarray]:
        w = params[: n_labels * dim].reshape(n_labels, dim)
        b = params[n_labels * dim:] if sigmoid else b0
        logits = x @ w.T + b
        if sigmoid:  # per-label binary cross-entropy, summed over labels, as SigLIP is trained
            data = np.sum(np.logaddexp(0.0, logits) - target * logits)
            residual = _sigmoid(logits) - target
        else:
            z = logits - logits.max(axis=1, keepdims=True)
            log_norm = np.log(np.exp(z).sum(axis=1, keepdims=True))
            data = np.sum(log_norm) - np.sum(z * target)
            residual = np.exp(z - log_norm) - target
        loss = data / len(x) + np.sum(penalty * ((w - w0) ** 2).sum(axis=1))
        gradient = [residual.T @ x / len(x) + 2.0 * penalty[:, None] * (w - w0)]
        if sigmoid:
            loss += np.sum(penalty * (b - b0) ** 2)
            gradient.append(residual.sum(axis=0) / len(x) + 2.0 * penalty * (b - b0))
        return float(loss), np.concatenate([g.ravel() for g in gradient])

    start = np.concatenate([w0.ravel()] + ([b0] if sigmoid else []))
    params = _lbfgs(loss_and_gradient, start, max_iter) if len(x) else start
    weights = params[: n_labels * dim].reshape(n_labels, dim)
    bias = params[n_labels * dim:] if sigmoid else b0
    return weights.astype(np.float32), bias.astype(np.float32)


def _lbfgs(loss_and_gradient: Callable[[np.ndarray], tuple[float, np.ndarray]], params: np.ndarray,
           max_iter: int, history: int = 10, tolerance: float = 1e-7) -> np.ndarray:
    """Minimise a smooth function by L-BFGS (Nocedal & Wright, algorithm 7.4) with a backtracking (Armijo) line
    search. In numpy rather than torch's: the same steps whatever the machine's thread count, and no thread pool
    to fight over on a busy CPU for a problem this small."""
    value, gradient = loss_and_gradient(params)
    steps: list[tuple[np.ndarray, np.ndarray]] = []
    for _ in range(max_iter):
        direction = -_inverse_hessian_times(gradient, steps)
        slope = float(gradient @ direction)
        if slope >= 0.0:  # not a descent direction (rounding): fall back to the gradient
            steps, direction, slope = [], -gradient, -float(gradient @ gradient)
        step = 1.0
        while True:
            candidate = params + step * direction
            new_value, new_gradient = loss_and_gradient(candidate)
            if new_value <= value + 1e-4 * step * slope or step < 1e-12:
                break
            step /= 2.0
        s, y = candidate - params, new_gradient - gradient
        if s @ y > 1e-12:
            steps = (steps + [(s, y)])[-history:]
        converged = abs(value - new_value) <= 1e-12 * max(1.0, abs(value))
        params, value, gradient = candidate, new_value, new_gradient
        if converged or np.abs(gradient).max() < tolerance:
            break
    return params


def _inverse_hessian_times(gradient: np.ndarray, steps: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """L-BFGS's two-loop recursion; the first step is scaled to unit length."""
    if not steps:
        return gradient / max(float(np.linalg.norm(gradient)), 1.0)
    q = gradient.copy()
    ratios = []
    for s, y in reversed(steps):
        ratio = (s @ q) / (y @ s)
        ratios.append(ratio)
        q -= ratio * y
    s, y = steps[-1]
    q *= (s @ y) / (y @ y)
    for (s, y), ratio in zip(steps, reversed(ratios)):
        q += s * (ratio - (y @ q) / (y @ s))
    return q


# ---------------------------------------------------------------- cross-validation and `auto`


def stratified_folds(example_labels: np.ndarray, max_folds: int = MAX_FOLDS, seed: int = 0) -> np.ndarray:
    """(M,) the fold in which each example is held out; -1 for an example that is its label's only one (held out,
    its label would have nothing left to learn from: it is never scored, always trained on). Within a label the
    examples are dealt round-robin after a seeded shuffle, over min(max_folds, largest label count) folds: at up to
    `max_folds` shots per label that is leave-one-out per label (each fold holds out one example of every label),
    and a label with n >= 2 examples always keeps at least one in training."""
    labels = np.asarray(example_labels, np.int64)
    folds = np.full(len(labels), -1, np.int64)
    counts = np.bincount(labels) if len(labels) else np.zeros(0, np.int64)
    n_folds = int(min(max_folds, counts.max(initial=0)))
    rng = np.random.default_rng(seed)
    for label in np.flatnonzero(counts >= 2):
        members = rng.permutation(np.flatnonzero(labels == label))
        folds[members] = np.arange(len(members)) % n_folds
    return folds


def leave_one_out_folds(example_labels: np.ndarray) -> np.ndarray:
    """(M,) folds of one example each, for `out_of_fold_logits`; -1 for a label's only example, as in
    `stratified_folds`."""
    labels = np.asarray(example_labels, np.int64)
    counts = np.bincount(labels) if len(labels) else np.zeros(0, np.int64)
    return np.where(counts[labels] >= 2, np.arange(len(labels)), -1) if len(labels) else np.zeros(0, np.int64)


def out_of_fold_logits(examples: np.ndarray, example_labels: np.ndarray, text: np.ndarray, scoring: Scoring,
                       method: Adapter | str, settings: dict | None = None,
                       folds: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(held, logits): the indices of the examples with an honest logit row, and those rows, each from a head fitted
    without that example's fold. Zero-shot fits nothing, so every example is held; for a fitted head, an example
    that is its label's only one is not (see `stratified_folds`). Fit the temperature on these, not on logits of
    a head that has seen its own example."""
    examples = np.asarray(examples, np.float32)
    labels = np.asarray(example_labels, np.int64)
    if Adapter(method) is Adapter.NONE:
        return np.arange(len(labels)), zero_shot_logits(examples, text, scoring)
    folds = stratified_folds(labels) if folds is None else np.asarray(folds)
    held = np.flatnonzero(folds >= 0)
    logits = np.zeros((len(labels), len(text)), np.float32)
    for fold in np.unique(folds[held]):
        test, train = folds == fold, folds != fold
        head = fit(method, examples[train], labels[train], text, scoring, settings)
        logits[test] = head.logits(examples[test])
    return held, logits[held]


@dataclass(frozen=True)
class Candidate:
    """One row of the cross-validation table: a method, its settings, and how it did on the held-out examples
    (accuracy and loss None where they could not be estimated: one example per label, see `choose`)."""

    method: Adapter
    settings: dict
    accuracy: float | None  # top-1 on the held-out examples
    loss: float | None  # their mean cross-entropy after the temperature below: how `choose` ranks the candidates
    temperature: float  # fitted on the held-out logits (1.0 where there are none)
    scored: int  # held-out examples the figures are over


@dataclass(frozen=True)
class Choice:
    method: Adapter
    settings: dict
    head: Head  # the chosen method fitted on every example
    temperature: float  # for softmax(head.logits / T): fitted on the chosen method's leave-one-out logits
    uses_text: bool  # False: zero-shot was at chance, and every candidate was fitted with np.zeros_like(text)
    rule: str  # how it was chosen, for the log and the metadata
    table: list[Candidate] = field(default_factory=list)


def default_candidates() -> list[tuple[Adapter, dict]]:
    """Every method and setting `choose` compares, simplest method first and, within a method, the settings that
    stay nearest zero-shot first (smaller alpha, larger penalty)."""
    tips = [(Adapter.TIP, {"alpha": a, "beta": b}) for a in TIP_ALPHAS for b in TIP_BETAS]
    gdas = [(Adapter.GDA, {"alpha": a, "shrinkage": s}) for a in GDA_ALPHAS for s in sorted(GDA_SHRINKAGES)[::-1]]
    claps = [(Adapter.CLAP, {"strength": s}) for s in sorted(CLAP_STRENGTHS, reverse=True)]
    return [(Adapter.NONE, {})] + tips + gdas + claps


def choose(examples: np.ndarray, example_labels: np.ndarray, text: np.ndarray, scoring: Scoring,
           candidates: Sequence[tuple[Adapter, dict]] | None = None, max_folds: int = MAX_FOLDS,
           seed: int = 0) -> Choice:
    """`auto`: a method and its settings, chosen on the examples alone.

    Is the text worth anything? Zero-shot never saw the examples, so its accuracy on them is an unbiased estimate
    of its accuracy. If it is at chance (the one-sided binomial probability of so many right at 1/L is not under
    SIGNIFICANCE), the text says nothing, or misleads, and the adapters are fitted without it (zero label
    embeddings): the examples carry the decision.

    Cross-validation: stratified folds (`stratified_folds`, leave-one-out per label up to MAX_FOLDS shots); each
    candidate is fitted on the other folds and scored on the held-out one, so every scored example is judged by a
    head that never saw it, and zero-shot is scored on exactly the same examples. The score is the cross-entropy
    of the held-out logits after a temperature fitted on them: a proper score that uses every example's margin
    (top-1 on tens of examples moves by whole examples, and ties), and does not reward a head for being merely
    sharper, as the pipeline calibrates the chosen head the same way. Each method is represented by its best
    setting (on equal scores, the one nearest zero-shot); then the one-standard-error rule: the simplest method
    (SIMPLICITY: none < gda < tip < clap) whose score is within one standard error of the best, on the same
    examples. Where the text is worth something, an adapter so chosen must still be significantly better than
    zero-shot in top-1 on the held-out examples: of those where the two differ, it must be right on so many that
    a fair coin would do as well with probability under SIGNIFICANCE (a one-sided sign test, McNemar's exact
    form). With tens of examples a gain of one or two is noise, and the best of many settings is flattered by
    being picked; zero-shot gives way to a clear gain only.

    One example per label (no label has two): held out, an example's label would have no example left, so the
    adapters would be judged on labels they were never given, which says nothing about them. Only the first
    question can be answered: if zero-shot is above chance on the examples, it is kept (no adapter can be shown
    to do better); if not, the examples decide: tip with ONE_SHOT_TIP and no text, the nearest example by cosine,
    with no temperature (there is no held-out logit to fit one on).

    The chosen method is fitted on every example; its temperature comes from `_temperature`."""
    examples = np.asarray(examples, np.float32)
    labels = np.asarray(example_labels, np.int64)
    candidates = list(candidates if candidates is not None else default_candidates())
    text_right = int(np.sum(zero_shot_logits(examples, text, scoring).argmax(axis=1) == labels))
    p_chance = binomial_tail(text_right, len(labels), 1.0 / len(text))
    text_verdict = (f"zero-shot {text_right}/{len(labels)} right on the examples, P(so many at chance) = "
                    f"{p_chance:.3g}")
    uses_text = p_chance < SIGNIFICANCE
    # at chance the text says nothing (or misleads): the adapters start from no text at all
    adapter_text = np.asarray(text, np.float32) if uses_text else np.zeros_like(np.asarray(text, np.float32))
    folds = stratified_folds(labels, max_folds, seed)
    if not (folds >= 0).any():
        return _choose_one_shot(examples, labels, text, adapter_text, scoring, candidates, uses_text, text_verdict)
    rows, right, losses = zip(*(_cross_validate(examples, labels, text if Adapter(method) is Adapter.NONE
                                                else adapter_text, scoring, method, settings, folds)
                                for method, settings in candidates))
    chosen, best, why = _select(rows, right, losses, uses_text)
    row = rows[chosen]
    text = text if row.method is Adapter.NONE else adapter_text
    head = fit(row.method, examples, labels, text, scoring, row.settings)
    return Choice(row.method, row.settings, head, _temperature(examples, labels, text, scoring, row, folds),
                  uses_text or row.method is Adapter.NONE,
                  f"cross-validation, {len(np.unique(folds[folds >= 0]))} folds, {row.scored} held-out examples; "
                  f"{text_verdict}; lowest loss {_describe(rows[best])}; {why}; chosen {_describe(row)}", list(rows))


def _select(rows: Sequence[Candidate], right: Sequence[np.ndarray], losses: Sequence[np.ndarray],
            uses_text: bool) -> tuple[int, int, str]:
    """(chosen, lowest-loss, why): `choose`'s rule over the cross-validated candidates."""
    best_of: dict[Adapter, int] = {}  # each method's lowest loss; candidates come nearest zero-shot first
    for i, row in enumerate(rows):
        if row.method not in best_of or row.loss < rows[best_of[row.method]].loss - 1e-9:
            best_of[row.method] = i
    best = min(best_of.values(), key=lambda i: rows[i].loss)
    chosen = next(i for i in sorted(best_of.values(), key=lambda i: SIMPLICITY.index(rows[i].method))
                  if _within_one_standard_error(losses[i], losses[best]))
    zero_shot = best_of.get(Adapter.NONE)
    if chosen == zero_shot:
        why = "zero-shot within one standard error of the best"
    elif not uses_text or zero_shot is None:
        why = "no zero-shot to beat (at chance, or not a candidate): the simplest within one standard error of the best"
    else:
        fixed = int(np.sum(right[chosen] & ~right[zero_shot]))
        broken = int(np.sum(~right[chosen] & right[zero_shot]))
        p_better = binomial_tail(fixed, fixed + broken, 0.5)
        why = (f"the simplest within one standard error of the best fixes {fixed} and breaks {broken} of "
               f"zero-shot's: P(as good by chance) = {p_better:.3g}")
        chosen = chosen if p_better < SIGNIFICANCE else zero_shot
    return chosen, best, why


def _within_one_standard_error(losses: np.ndarray, best_losses: np.ndarray) -> bool:
    """Whether a candidate's mean held-out loss is within one standard error of the best's: the standard error of
    the mean per-example difference, the two being judged on the same examples (Breiman et al.'s one-SE rule)."""
    difference = losses - best_losses
    spread = float(np.std(difference, ddof=1) / math.sqrt(len(difference))) if len(difference) > 1 else 0.0
    return float(difference.mean()) <= spread + 1e-9


def _temperature(examples, labels, text, scoring, row: Candidate, folds: np.ndarray) -> float:
    """The chosen head's temperature, from logits as near the final head's as the examples allow: every example
    for zero-shot (it saw none), leave-one-out logits for a fitted head while that is cheap (a fold's head is
    trained on fewer examples, so it is less sure, and at a few shots its temperature would not fit the final
    head), the cross-validation folds beyond."""
    if row.method is Adapter.NONE:
        return fit_temperature(zero_shot_logits(examples, text, scoring), labels)
    if len(labels) <= LEAVE_ONE_OUT_MAX:
        folds = leave_one_out_folds(labels)
    held, logits = out_of_fold_logits(examples, labels, text, scoring, row.method, row.settings, folds)
    return fit_temperature(logits, labels[held])


def _describe(row: Candidate) -> str:
    settings = ", ".join(f"{k}={v:g}" for k, v in row.settings.items())
    return f"{row.method.value}({settings}): top-1 {row.accuracy:.3f}, loss {row.loss:.3f}"


def _cross_validate(examples, labels, text, scoring, method, settings, folds) -> tuple[Candidate, np.ndarray]:
    if Adapter(method) is Adapter.NONE:  # judged on the same examples as the fitted heads
        held = np.flatnonzero(folds >= 0)
        logits = zero_shot_logits(examples[held], text, scoring)
    else:
        held, logits = out_of_fold_logits(examples, labels, text, scoring, method, settings, folds)
    truth = labels[held]
    right = logits.argmax(axis=1) == truth
    temperature = fit_temperature(logits, truth)
    losses = per_example_log_loss(logits, truth, temperature)
    return (Candidate(Adapter(method), dict(settings), float(right.mean()), float(losses.mean()), temperature,
                      len(held)), right, losses)


def _choose_one_shot(examples, labels, text, adapter_text, scoring, candidates, text_informative,
                     text_verdict) -> Choice:
    logits = zero_shot_logits(examples, text, scoring)
    right = logits.argmax(axis=1) == labels
    temperature = fit_temperature(logits, labels)
    zero_shot = Candidate(Adapter.NONE, {}, float(right.mean()) if len(labels) else None,
                          negative_log_likelihood(logits, labels, temperature), temperature, len(labels))
    table = [zero_shot if Adapter(m) is Adapter.NONE else Candidate(Adapter(m), dict(s), None, None, 1.0, 0)
             for m, s in candidates]
    if text_informative or len(labels) == 0:
        method, settings, verdict = Adapter.NONE, {}, "above chance: zero-shot kept"
    else:  # no held-out logits for a head that uses the examples: its scores stay uncalibrated
        method, settings, verdict, temperature = Adapter.TIP, dict(ONE_SHOT_TIP), "at chance: the examples decide", 1.0
        text = adapter_text
    return Choice(method, settings, fit(method, examples, labels, text, scoring, settings), temperature,
                  text_informative or len(labels) == 0,
                  f"one example per label, nothing to cross-validate; {text_verdict}: {verdict}", table)


def binomial_tail(successes: int, trials: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, p); 1 for no trials. In logs: at thousands of examples the
    binomial coefficients overflow a float."""
    if successes <= 0:
        return 1.0
    if successes > trials or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    terms = [math.lgamma(trials + 1) - math.lgamma(k + 1) - math.lgamma(trials - k + 1) + k * math.log(p)
             + (trials - k) * math.log1p(-p) for k in range(successes, trials + 1)]
    largest = max(terms)
    return float(min(1.0, math.exp(largest) * sum(math.exp(t - largest) for t in terms)))


# ---------------------------------------------------------------- calibration


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean -log softmax(logits / T)[label]; 0 for no rows."""
    return float(per_example_log_loss(logits, labels, temperature).mean()) if len(labels) else 0.0


def per_example_log_loss(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(N,) -log softmax(logits / T)[label]."""
    z = np.asarray(logits, np.float64).reshape(len(labels), -1) / temperature
    z = z - z.max(axis=1, keepdims=True) if len(labels) else z
    log_norm = np.log(np.exp(z).sum(axis=1))
    return log_norm - z[np.arange(len(labels)), np.asarray(labels, np.int64)]


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = (0.01, 100.0),
                    prior_width: float | None = TEMPERATURE_PRIOR_WIDTH) -> float:
    """The T for softmax(logits / T) (Guo et al., 2017): the most probable given the examples, with a normal prior
    of width `prior_width` on log T around 0 (T = 1), i.e. minimising the summed cross-entropy plus
    (log T)^2 / (2 prior_width^2); None: the plain maximum-likelihood T. The prior matters where the examples are
    few: when all of them are right, the likelihood alone keeps improving as T goes to 0 and would make every score
    1.0; with hundreds it hardly moves T. A grid on log T within `bounds`, then golden-section search around the
    best point: no assumption that the objective has one minimum. Dividing by T > 0 never changes an argmax.
    1.0 (no change) without examples."""
    if len(labels) == 0:
        return 1.0
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels, np.int64)

    def objective(log_t: float) -> float:
        prior = 0.0 if prior_width is None else log_t ** 2 / (2.0 * prior_width ** 2)
        return negative_log_likelihood(logits, labels, math.exp(log_t)) * len(labels) + prior

    grid = np.linspace(math.log(bounds[0]), math.log(bounds[1]), 61)
    best = int(np.argmin([objective(g) for g in grid]))
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = objective(a), objective(b)
    while high - low > 1e-5:
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = objective(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = objective(b)
    return float(math.exp((low + high) / 2.0))


@dataclass(frozen=True)
class Reliability:
    """A reliability diagram's bins of equal width on [0, 1]: bin i holds confidences in (lower, upper] (the first
    also 0). Empty bins have count 0 and NaN confidence and accuracy."""

    lower: np.ndarray
    upper: np.ndarray
    count: np.ndarray
    confidence: np.ndarray  # mean top-1 confidence in the bin
    accuracy: np.ndarray  # fraction right in the bin


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> Reliability:
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)  # the bins' own edges decide
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=bins) / count
    return Reliability(edges[:-1], edges[1:], count, mean_confidence, accuracy)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """sum over bins of (count / N) * |accuracy - mean confidence| (Guo et al.'s ECE); 0 for no images."""
    table = reliability_bins(confidence, correct, bins)
    filled = table.count > 0
    if not filled.any():
        return 0.0
    gaps = np.abs(table.accuracy[filled] - table.confidence[filled])
    return float(np.sum(table.count[filled] * gaps) / table.count.sum())


def score_for_precision(scores: np.ndarray, correct: np.ndarray, target: float) -> float | None:
    """The smallest of the examples' scores s at which the decisions scoring s or more are right at least `target`
    of the time (precision of the top-1 decision); None when no score reaches it."""
    scores = np.asarray(scores, np.float64)
    order = np.argsort(-scores, kind="stable")
    ranked, right = scores[order], np.asarray(correct, np.float64)[order]
    # at a repeated score, only the last of its run counts: "scoring s or more" includes all of them
    last = np.r_[ranked[1:] != ranked[:-1], True]
    precision = np.cumsum(right) / np.arange(1, len(ranked) + 1)
    reached = last & (precision >= target)
    return float(ranked[reached].min()) if reached.any() else None


# ---------------------------------------------------------------- multi-label thresholds


def fit_label_thresholds(scores: np.ndarray, truth: np.ndarray, default: float = DEFAULT_THRESHOLD,
                         max_folds: int = MAX_FOLDS, seed: int = 0) -> np.ndarray:
    """(L,) per label (multi-label mode, sigmoid scores of the examples that no head was fitted on, or out-of-fold
    ones), a threshold: the cut maximising that label's F1 on the examples, where it is clearly better than
    `default`, else `default`.

    Clearly better is cross-validated: the cut is fitted on the other folds of the examples and applied to the
    held-out fold, and the held-out decisions' F1 must beat `default`'s F1 on the same examples by more than one
    positive example's worth (1 / positives). Where a model is calibrated (its sigmoid trained with the prompt),
    0.5 is already near the F1-optimal cut, and a cut fitted on tens of examples only adds noise; where the
    prompt or an adapter shifts the scores, the cut moves. A label with no positive or no negative example keeps
    `default`: its F1 cannot tell a cut."""
    scores = np.asarray(scores, np.float64)
    truth = np.asarray(truth, bool)
    folds = np.random.default_rng(seed).permutation(len(scores)) % max(1, min(max_folds, len(scores)))
    return np.array([_gated_threshold(scores[:, j], truth[:, j], default, folds) for j in range(scores.shape[1])],
                    np.float64)


def _gated_threshold(scores: np.ndarray, positive: np.ndarray, default: float, folds: np.ndarray) -> float:
    cut = best_f1_cut(scores, positive, default)
    if cut == default:
        return default
    held_out = np.zeros(len(scores), bool)
    for fold in np.unique(folds):
        test = folds == fold
        held_out[test] = scores[test] >= best_f1_cut(scores[~test], positive[~test], default)
    gain = _f1(held_out, positive) - _f1(scores >= default, positive)
    return cut if gain > 1.0 / positive.sum() else default


def best_f1_cut(scores: np.ndarray, positive: np.ndarray, default: float = DEFAULT_THRESHOLD) -> float:
    """The threshold maximising F1 of `scores >= threshold` against `positive`: halfway (in log-odds, where sigmoid
    scores are spread evenly) between the two neighbouring scores where the best cut lies, so that it sits in the
    gap, not on an example; of equally good cuts, the one nearest `default` in log-odds. `default` itself where
    the examples cannot tell (no positive or no negative)."""
    if positive.all() or not positive.any():
        return default
    values = np.unique(scores)
    log_odds = _log_odds(values)
    cuts = np.r_[values[0] / 2.0, _sigmoid((log_odds[1:] + log_odds[:-1]) / 2.0), default]
    predicted = scores[None, :] >= cuts[:, None]
    f1 = 2.0 * (predicted & positive).sum(axis=1) / (predicted.sum(axis=1) + positive.sum())
    best = np.flatnonzero(f1 >= f1.max() - 1e-12)
    return float(cuts[best[np.argmin(np.abs(_log_odds(cuts[best]) - _log_odds(np.float64(default))))]])


def _f1(predicted: np.ndarray, positive: np.ndarray) -> float:
    total = predicted.sum() + positive.sum()
    return float(2.0 * (predicted & positive).sum() / total) if total else 1.0


def _log_odds(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1.0 - 1e-12)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def f1_per_label(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(L,) F1 of each label's boolean decisions; 1.0 where a label has neither a positive nor a prediction."""
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    true_positives = (predicted & truth).sum(axis=0)
    total = predicted.sum(axis=0) + truth.sum(axis=0)
    return np.where(total > 0, 2.0 * true_positives / np.maximum(total, 1), 1.0)


def micro_f1(predicted: np.ndarray, truth: np.ndarray) -> float:
    """F1 over every (image, label) decision at once."""
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    total = predicted.sum() + truth.sum()
    return float(2.0 * (predicted & truth).sum() / total) if total else 1.0


# ---------------------------------------------------------------- review


DISAGREE, MARGIN, CONFIDENCE, THRESHOLD = "disagree", "margin", "confidence", "threshold"  # why to review


def review_priority(zero_shot_probs: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(priority, reason) per image, single-label mode: the smaller the priority, the sooner a person should look.
    `probs` are the run's decision scores (calibrated, adapted where examples were given). Images where zero-shot
    and the run pick different labels come first (priority below 0, reason DISAGREE); the others by the margin
    between their first two labels, reason CONFIDENCE where the label is more likely wrong than right (top-1
    under 0.5), else MARGIN. One number per image, so a queue of the first K streams over any number of images."""
    probs = np.asarray(probs, np.float64)
    top2 = -np.sort(-probs, axis=1)[:, :2] if probs.shape[1] > 1 else np.c_[probs, np.zeros(len(probs))]
    margin = top2[:, 0] - top2[:, 1]
    disagree = np.asarray(zero_shot_probs).argmax(axis=1) != probs.argmax(axis=1)
    reason = np.where(disagree, DISAGREE, np.where(top2[:, 0] < 0.5, CONFIDENCE, MARGIN)).astype(object)
    return np.where(disagree, margin - 1.0, margin), reason


def threshold_priority(scores: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(priority, label) per image, multi-label mode: how near the decision nearest to flipping is (the smallest
    distance of a label's score to its threshold), and that label's index."""
    distance = np.abs(np.asarray(scores, np.float64) - np.asarray(thresholds, np.float64))
    nearest = distance.argmin(axis=1)
    return distance[np.arange(len(distance)), nearest], nearest
