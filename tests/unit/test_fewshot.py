"""Few-shot heads, `auto`, calibration, thresholds and review order (pipeline/fewshot.py) on synthetic embeddings:
labels are points on a sphere, images and examples those points plus noise, and the text either the points
themselves (zero-shot already right) or random directions (zero-shot at chance)."""

import numpy as np
import pytest

from pipeline import fewshot as FS
from pipeline.zeroshot import Scoring, normalise

LABELS, DIM, NOISE = 5, 32, 0.3  # noise per dimension: about 96% zero-shot with the right text
SOFTMAX = Scoring(30.0)
SIGMOID = Scoring(30.0, -8.0, "sigmoid")


class World:
    """Label centroids, a right and a random text classifier, and draws of labelled embeddings."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.centroids = normalise(self.rng.normal(size=(LABELS, DIM)))
        self.random_text = normalise(self.rng.normal(size=(LABELS, DIM)))

    def draw(self, per_label: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(per_label * LABELS) % LABELS
        return normalise(self.centroids[labels] + NOISE * self.rng.normal(size=(len(labels), DIM))), labels


def accuracy(head: FS.Head, images: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(head.logits(images).argmax(axis=1) == labels))


@pytest.fixture(scope="module")
def world():
    w = World(0)
    w.test = w.draw(100)
    return w


# ---------------------------------------------------------------- heads and `auto`


@pytest.mark.parametrize("scoring", [SOFTMAX, SIGMOID], ids=["softmax", "sigmoid"])
def test_adapters_beat_zero_shot_when_the_text_is_random(world, scoring):
    examples, labels = world.draw(4)
    text = world.random_text
    zero_shot = accuracy(FS.fit_none(examples, labels, text, scoring), *world.test)
    assert zero_shot < 0.35
    heads = {"tip": FS.fit_tip(examples, labels, text, scoring, alpha=10.0, beta=1.0),
             "gda": FS.fit_gda(examples, labels, text, scoring, alpha=10.0),
             "clap": FS.fit_clap(examples, labels, text, scoring, strength=1e-4),
             "auto": FS.choose(examples, labels, text, scoring).head}
    for name, head in heads.items():  # the linear head has the most to unlearn: a random text at logit_scale 30
        assert accuracy(head, *world.test) > zero_shot + (0.2 if name == "clap" else 0.4), name
    assert heads["auto"].method is not FS.Adapter.NONE


@pytest.mark.parametrize("shots", [1, 2, 4, 8])
def test_auto_keeps_zero_shot_when_the_text_is_right(world, shots):
    examples, labels = world.draw(shots)
    zero_shot = accuracy(FS.fit_none(examples, labels, world.centroids, SOFTMAX), *world.test)
    choice = FS.choose(examples, labels, world.centroids, SOFTMAX)
    assert zero_shot > 0.9
    assert accuracy(choice.head, *world.test) >= zero_shot - 0.01, choice.rule


def test_clap_moves_the_labels_the_text_gets_wrong_and_keeps_the_others(world):
    """CLAP's class-adaptive penalty: labels 3 and 4 have each other's text, labels 0-2 the right one."""
    text = world.centroids[[0, 1, 2, 4, 3]]
    examples, labels = world.draw(2)
    head = FS.fit_clap(examples, labels, text, SOFTMAX, strength=0.01)
    drift = np.linalg.norm(head.weights - SOFTMAX.logit_scale * text, axis=1)
    assert drift[3:].min() > 5 * drift[:3].max()
    images, truth = world.test
    zero_shot = FS.zero_shot_logits(images, text, SOFTMAX).argmax(axis=1)
    adapted = head.logits(images).argmax(axis=1)
    kept = truth < 3  # the labels whose text is right
    assert np.mean(adapted[kept] == truth[kept]) > np.mean(zero_shot[kept] == truth[kept]) - 0.05
    assert np.mean(adapted == truth) > np.mean(zero_shot == truth) + 0.15


@pytest.mark.parametrize("shots", [1, 2])
def test_clap_at_one_or_two_shots_stays_at_a_right_text(world, shots):
    examples, labels = world.draw(shots)
    zero_shot = accuracy(FS.fit_none(examples, labels, world.centroids, SOFTMAX), *world.test)
    for strength in FS.CLAP_STRENGTHS:
        clap = FS.fit_clap(examples, labels, world.centroids, SOFTMAX, strength=strength)
        assert accuracy(clap, *world.test) >= zero_shot - 0.01, strength


def test_class_trust_follows_zero_shot_per_label():
    examples = np.eye(3, 4, dtype=np.float32)[[0, 0, 1, 1]]
    text = np.eye(3, 4, dtype=np.float32)[[0, 2, 1]]  # label 0 is right, label 1's text points at label 2's images
    trust = FS.class_trust(FS.zero_shot_logits(examples, text, SOFTMAX), np.array([0, 0, 1, 1]), 3)
    assert trust[0] > 0.99 and trust[1] < 0.01 and trust[2] == 1.0  # label 2 has no examples


def test_heads_reduce_to_zero_shot_and_tip_alpha_is_scale_free(world):
    examples, labels = world.draw(3)
    images = world.test[0][:50]
    zero_shot = FS.zero_shot_logits(images, world.random_text, SIGMOID)
    for head in (FS.fit_none(examples, labels, world.random_text, SIGMOID),
                 FS.fit_tip(examples, labels, world.random_text, SIGMOID, alpha=0.0),
                 FS.fit_gda(examples, labels, world.random_text, SIGMOID, alpha=0.0)):
        np.testing.assert_allclose(head.logits(images), zero_shot, atol=1e-4, err_msg=head.method.value)
    # clap under a heavy penalty, where the text is trusted (lambda_c near 1: a random text is not)
    clap = FS.fit_clap(examples, labels, world.centroids, SIGMOID, strength=1e4)
    np.testing.assert_allclose(clap.logits(images), FS.zero_shot_logits(images, world.centroids, SIGMOID), atol=1e-3)
    # the cache term is in units of logit_scale: logits / logit_scale do not depend on the scale
    tip = [FS.fit_tip(examples, labels, world.random_text, Scoring(scale), alpha=0.5).logits(images) / scale
           for scale in (10.0, 100.0)]
    np.testing.assert_allclose(tip[0], tip[1], atol=1e-5)
    # gda's added log-odds are centred over the labels: softmax ignores them, sigmoid keeps zero-shot's level
    gda = FS.fit_gda(examples, labels, world.random_text, SIGMOID, alpha=1.0).logits(images)
    np.testing.assert_allclose(gda.mean(axis=1), zero_shot.mean(axis=1), atol=1e-3)


def test_one_example_per_label_keeps_an_informative_text_and_lets_examples_decide_otherwise(world):
    examples, labels = world.draw(1)
    kept = FS.choose(examples, labels, world.centroids, SOFTMAX)
    assert kept.method is FS.Adapter.NONE and "above chance" in kept.rule
    assert all(row.accuracy is None for row in kept.table if row.method is not FS.Adapter.NONE)
    text_at_chance = np.roll(world.centroids, 1, axis=0)  # every label's text points at another label's images
    replaced = FS.choose(examples, labels, text_at_chance, SOFTMAX)
    assert (replaced.method, replaced.settings) == (FS.Adapter.TIP, FS.ONE_SHOT_TIP)
    assert accuracy(replaced.head, *world.test) > 0.5


def test_auto_reports_every_candidate_and_prefers_the_simpler_on_ties(world):
    examples, labels = world.draw(3)
    candidates = FS.default_candidates()
    choice = FS.choose(examples, labels, world.centroids, SOFTMAX)
    assert [(row.method, row.settings) for row in choice.table] == [(FS.Adapter(m), s) for m, s in candidates]
    assert all(0.0 <= row.accuracy <= 1.0 and row.scored == len(labels) for row in choice.table)
    # two candidates that are the same head: the simpler wins
    same = FS.choose(examples, labels, world.centroids, SOFTMAX,
                     candidates=[(FS.Adapter.TIP, {"alpha": 0.0}), (FS.Adapter.NONE, {})])
    assert same.table[0].loss == pytest.approx(same.table[1].loss) and same.method is FS.Adapter.NONE
    assert choice.uses_text and "one standard error" in choice.rule


def test_a_text_at_chance_is_left_out_of_the_adapters(world):
    examples, labels = world.draw(4)
    choice = FS.choose(examples, labels, world.random_text, SOFTMAX)
    assert not choice.uses_text and choice.method is not FS.Adapter.NONE
    without_text = FS.fit(choice.method, examples, labels, np.zeros_like(world.random_text), SOFTMAX,
                          choice.settings)
    np.testing.assert_array_equal(choice.head.logits(examples), without_text.logits(examples))
    assert 0.0 < choice.temperature < 100.0


def test_binomial_tail():
    assert FS.binomial_tail(0, 5, 0.2) == 1.0 and FS.binomial_tail(6, 5, 0.2) == 0.0
    assert FS.binomial_tail(3, 5, 0.2) == pytest.approx(10 * 0.2 ** 3 * 0.8 ** 2 + 5 * 0.2 ** 4 * 0.8 + 0.2 ** 5)
    assert FS.binomial_tail(5, 5, 0.5) == pytest.approx(1 / 32)
    # 16 shots of 1000 labels: no overflow
    assert FS.binomial_tail(8000, 16000, 0.5) == pytest.approx(0.5, abs=0.01)
    assert FS.binomial_tail(100, 16000, 0.001) < 1e-30


# ---------------------------------------------------------------- cross-validation


def test_folds_are_leave_one_out_per_label_at_low_shots_and_never_empty_a_label():
    labels = np.array([0] * 3 + [1] * 3 + [2] * 7 + [3])
    folds = FS.stratified_folds(labels, max_folds=5)
    assert folds[labels == 3].tolist() == [-1]  # a label's only example is never held out
    for fold in range(5):
        held = folds == fold
        for label in range(3):
            assert held[labels == label].sum() <= (2 if label == 2 else 1)
            assert (~held & (labels == label)).any()  # its label keeps an example to learn from
    assert sorted(folds[labels == 0]) == [0, 1, 2]


@pytest.mark.parametrize("method, settings", [("tip", {"alpha": 3.0}), ("gda", {"alpha": 3.0}),
                                              ("clap", {"strength": 0.01})])
def test_out_of_fold_logits_never_see_their_own_example(world, method, settings):
    """Relabelling an example changes every head fitted on it, so it must not change the example's own
    out-of-fold row; and each row is what a head fitted without its fold gives."""
    examples, labels = world.draw(3)
    held, logits = FS.out_of_fold_logits(examples, labels, world.random_text, SOFTMAX, method, settings)
    assert held.tolist() == list(range(len(labels)))
    folds = FS.stratified_folds(labels)
    for i in (0, 7):
        relabelled = labels.copy()
        relabelled[i] = (labels[i] + 1) % LABELS
        _, again = FS.out_of_fold_logits(examples, relabelled, world.random_text, SOFTMAX, method, settings, folds)
        np.testing.assert_array_equal(again[i], logits[i])
        train = folds != folds[i]
        head = FS.fit(method, examples[train], labels[train], world.random_text, SOFTMAX, settings)
        np.testing.assert_allclose(head.logits(examples[i:i + 1])[0], logits[i], rtol=1e-5, atol=1e-5)
        full = FS.fit(method, examples, relabelled, world.random_text, SOFTMAX, settings)
        assert not np.allclose(full.logits(examples[i:i + 1])[0],
                               FS.fit(method, examples, labels, world.random_text, SOFTMAX, settings)
                               .logits(examples[i:i + 1])[0])


def test_fits_and_choices_are_deterministic(world):
    examples, labels = world.draw(4)
    for method in ("tip", "gda", "clap"):
        a, b = (FS.fit(method, examples, labels, world.random_text, SIGMOID) for _ in range(2))
        np.testing.assert_array_equal(a.weights, b.weights)
        np.testing.assert_array_equal(a.bias, b.bias)
    first, second = (FS.choose(examples, labels, world.random_text, SOFTMAX) for _ in range(2))
    assert (first.method, first.settings, first.table) == (second.method, second.settings, second.table)
    np.testing.assert_array_equal(first.head.logits(examples), second.head.logits(examples))


# ---------------------------------------------------------------- calibration


def _overconfident(world, scale: float):
    images, labels = world.draw(40)
    return FS.zero_shot_logits(images, world.centroids, Scoring(scale)), labels


@pytest.mark.parametrize("scale, direction", [(200.0, 1), (3.0, -1)], ids=["overconfident", "underconfident"])
def test_temperature_lowers_nll_and_ece_and_keeps_every_argmax(world, scale, direction):
    logits, labels = _overconfident(world, scale)
    temperature = FS.fit_temperature(logits, labels)
    assert np.sign(np.log(temperature)) == direction
    assert FS.negative_log_likelihood(logits, labels, temperature) < FS.negative_log_likelihood(logits, labels)
    before, after = FS.softmax(logits), FS.softmax(logits, temperature)
    right = logits.argmax(axis=1) == labels
    assert FS.expected_calibration_error(after.max(axis=1), right) < FS.expected_calibration_error(
        before.max(axis=1), right)
    np.testing.assert_array_equal(after.argmax(axis=1), logits.argmax(axis=1))
    # without the prior, the NLL's minimum (a little either way is worse); the prior only pulls it towards 1
    likeliest = FS.fit_temperature(logits, labels, prior_width=None)
    for nearby in (likeliest * 0.95, likeliest * 1.05):
        assert FS.negative_log_likelihood(logits, labels, nearby) > FS.negative_log_likelihood(
            logits, labels, likeliest)
    assert 0 < np.log(temperature) / np.log(likeliest) < 1


def test_temperature_without_examples_at_the_bound_and_when_every_example_is_right():
    assert FS.fit_temperature(np.zeros((0, 3)), np.zeros(0, np.int64)) == 1.0
    separable = np.array([[10.0, 0.0], [0.0, 10.0]])
    # maximum likelihood alone runs to the lower bound: every score 1.0
    assert FS.fit_temperature(separable, np.array([0, 1]), bounds=(0.5, 2.0), prior_width=None) == pytest.approx(
        0.5, rel=1e-3)
    # the prior on log T keeps a few right examples from doing that
    assert 0.5 < FS.fit_temperature(separable, np.array([0, 1])) <= 1.0


def test_reliability_bins_and_ece_by_hand():
    confidence = np.array([0.05, 0.4, 0.55, 0.6, 0.95, 1.0])
    correct = np.array([False, True, False, True, True, True])
    bins = FS.reliability_bins(confidence, correct, bins=5)
    np.testing.assert_allclose(bins.lower, [0, 0.2, 0.4, 0.6, 0.8])
    np.testing.assert_allclose(bins.upper, [0.2, 0.4, 0.6, 0.8, 1.0])
    assert bins.count.tolist() == [1, 1, 2, 0, 2]  # (lower, upper]: 0.4 and 0.6 close their bins
    assert np.isnan(bins.confidence[3]) and np.isnan(bins.accuracy[3])
    np.testing.assert_allclose(bins.confidence[[0, 1, 2, 4]], [0.05, 0.4, 0.575, 0.975])
    np.testing.assert_allclose(bins.accuracy[[0, 1, 2, 4]], [0.0, 1.0, 0.5, 1.0])
    assert FS.expected_calibration_error(confidence, correct, bins=5) == pytest.approx(
        (0.05 + 0.6 + 2 * 0.075 + 2 * 0.025) / 6)
    assert FS.expected_calibration_error(np.zeros(0), np.zeros(0, bool)) == 0.0


# ---------------------------------------------------------------- thresholds and precision


def _label_scores(rng, n):
    """Three labels: label 0's positives score around 0.3 (its best cut is low), label 1's negatives around 0.7
    (its best cut is high), label 2 has no positive at all."""
    truth = np.zeros((n, 3), bool)
    truth[:, 0] = rng.random(n) < 0.4
    truth[:, 1] = rng.random(n) < 0.4
    centre = np.where(truth, [0.3, 0.9, 0.0], [0.05, 0.7, 0.05])
    return np.clip(centre + 0.05 * rng.normal(size=(n, 3)), 0.001, 0.999), truth


def test_label_thresholds_raise_f1_where_labels_need_different_cuts():
    rng = np.random.default_rng(3)
    scores, truth = _label_scores(rng, 60)
    thresholds = FS.fit_label_thresholds(scores, truth)
    assert 0.1 < thresholds[0] < 0.3 and 0.7 < thresholds[1] < 0.9 and thresholds[2] == 0.5
    fresh, fresh_truth = _label_scores(rng, 2000)
    single = FS.micro_f1(fresh >= 0.5, fresh_truth)
    per_label = FS.micro_f1(fresh >= thresholds, fresh_truth)
    assert per_label > single + 0.2
    assert np.all(FS.f1_per_label(fresh >= thresholds, fresh_truth)[:2] > 0.9)


def test_label_thresholds_keep_the_default_where_it_is_already_right():
    rng = np.random.default_rng(4)
    truth = rng.random((80, 4)) < 0.3
    scores = np.clip(np.where(truth, 0.9, 0.1) + 0.1 * rng.normal(size=truth.shape), 0.001, 0.999)
    np.testing.assert_array_equal(FS.fit_label_thresholds(scores, truth), 0.5)


def test_f1_helpers_by_hand():
    predicted = np.array([[1, 0], [1, 0], [0, 0]], bool)
    truth = np.array([[1, 0], [0, 0], [1, 0]], bool)
    np.testing.assert_allclose(FS.f1_per_label(predicted, truth), [0.5, 1.0])  # label 1: nothing to find
    assert FS.micro_f1(predicted, truth) == pytest.approx(0.5)


def test_score_for_precision():
    rng = np.random.default_rng(5)
    scores = rng.random(200)
    correct = rng.random(200) < scores  # higher scores are right more often
    for target in (0.8, 0.9, 0.95):
        threshold = FS.score_for_precision(scores, correct, target)
        assert threshold is not None
        assert correct[scores >= threshold].mean() >= target
        lower = scores[scores < threshold]  # no smaller example score reaches the target
        assert all(correct[scores >= s].mean() < target for s in lower)
    assert FS.score_for_precision(scores, np.zeros(200, bool), 0.5) is None
    assert FS.score_for_precision(np.array([0.9, 0.9, 0.2]), np.array([True, False, True]), 0.6) == 0.2


# ---------------------------------------------------------------- review


def test_review_priority_puts_disagreements_first_then_the_least_sure():
    zero_shot = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0], [0.9, 0.05, 0.05], [0.5, 0.3, 0.2]])
    adapted = np.array([[0.98, 0.01, 0.01], [0.7, 0.3, 0.0], [0.52, 0.48, 0.0], [0.95, 0.03, 0.02],
                        [0.45, 0.1, 0.45]])
    priority, reason = FS.review_priority(zero_shot, adapted)
    assert np.argsort(priority, kind="stable").tolist() == [1, 4, 2, 3, 0]  # 1 disagrees; then by margin
    assert reason.tolist() == ["margin", "disagree", "margin", "margin", "confidence"]
    np.testing.assert_allclose(priority, [0.97, 0.4 - 1, 0.04, 0.92, 0.0])


def test_threshold_priority_names_the_label_nearest_its_threshold():
    scores = np.array([[0.9, 0.55, 0.1], [0.2, 0.3, 0.98]])
    priority, label = FS.threshold_priority(scores, np.array([0.5, 0.5, 0.9]))
    np.testing.assert_allclose(priority, [0.05, 0.08])
    assert label.tolist() == [1, 2]
