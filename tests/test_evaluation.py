"""helpers.evaluation: FD against N and its extrapolation, k-NN precision and recall, feature spaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from helpers import evaluation, metrics


def gaussian(n, d=4, shift=0.0, scale=1.0, seed=0):
    return np.random.default_rng(seed).normal(shift, scale, size=(n, d))


def test_fd_curve_falls_like_one_over_n_for_one_distribution():
    a, b = gaussian(4000, seed=1), gaussian(20000, seed=2)
    ns = [50, 100, 200, 400, 800]
    rows = evaluation.fd_curve(a, b, ns, draws=20, seed=0)
    assert [r[0] for r in rows] == ns
    means = np.array([r[1] for r in rows])
    assert (np.diff(means) < 0).all(), means
    slope = np.polyfit(np.log(ns), np.log(means), 1)[0]
    assert -1.2 < slope < -0.8, slope  # the plug-in bias is ~ c / N
    fd_inf, b_fit = evaluation.fd_infinity(ns, means)
    assert abs(fd_inf) < 0.01 and b_fit > 0, (fd_inf, b_fit)  # same distribution: the intercept is ~0


def test_fd_infinity_recovers_the_distance_between_two_gaussians():
    # mean shift 0.5 in each of 4 dimensions: the Frechet distance is 4 * 0.25 = 1
    a, b = gaussian(4000, shift=0.5, seed=3), gaussian(40000, seed=4)
    ns = [100, 200, 400, 800, 1600]
    rows = evaluation.fd_curve(a, b, ns, draws=10)
    fd_inf, _ = evaluation.fd_infinity(ns, [r[1] for r in rows])
    assert rows[0][1] > fd_inf + 0.01  # the small sample is biased upwards
    assert abs(fd_inf - 1.0) < 0.08, fd_inf


def test_fd_infinity_is_exact_on_a_line_in_one_over_n():
    ns = np.array([10, 20, 50, 100])
    assert evaluation.fd_infinity(ns, 3.0 + 40.0 / ns) == pytest.approx((3.0, 40.0))


def test_knn_radii_do_not_count_the_point_itself():
    x = np.array([[0.0], [1.0], [3.0], [7.0]])
    assert evaluation.knn_radii(x, 1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert evaluation.knn_radii(x, 2).tolist() == [3.0, 2.0, 3.0, 6.0]


def test_knn_radii_match_a_brute_force_sort():
    x = gaussian(60, d=3, seed=5)
    d = cdist(x, x)
    expected = np.sort(d, axis=1)[:, 3]  # column 0 is the point itself
    np.testing.assert_allclose(evaluation.knn_radii(x, 3), expected, rtol=1e-9, atol=1e-9)


def test_precision_recall_on_hand_made_sets():
    real = gaussian(300, d=2, seed=6)
    assert evaluation.precision_recall(real, real) == (1.0, 1.0)
    far = real + 100.0
    assert evaluation.precision_recall(real, far) == (0.0, 0.0)
    collapsed = np.repeat(real[:1], 50, axis=0) + gaussian(50, d=2, seed=7) * 1e-3  # one real point, 50 times
    precision, recall = evaluation.precision_recall(real, collapsed)
    assert precision == 1.0 and recall < 0.1, (precision, recall)


def test_precision_and_recall_are_not_swapped():
    real = gaussian(400, d=2, seed=8)
    narrow = gaussian(400, d=2, scale=0.3, seed=9)  # realistic but covers only the middle
    precision, recall = evaluation.precision_recall(real, narrow)
    assert precision > 0.9 and recall < 0.6, (precision, recall)
    assert evaluation.precision_recall(narrow, real) == pytest.approx((recall, precision))


def test_digit_features_spaces_and_errors():
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    assert evaluation.digit_features(x, "pixels").shape == (5, 64)
    assert torch.equal(evaluation.digit_features(x, "pixels"), x.flatten(1))
    classifier = metrics.digit_classifier()
    assert torch.allclose(evaluation.digit_features(x, "classifier", classifier), classifier.features(x))
    r1, r2 = (evaluation.digit_features(x, "random network", seed=s) for s in (1, 1))
    assert torch.equal(r1, r2) and not torch.allclose(r1, evaluation.digit_features(x, "random network", seed=2))
    with pytest.raises(ValueError, match="space"):
        evaluation.digit_features(x, "inception")
    with pytest.raises(ValueError, match="images"):
        evaluation.digit_features(torch.zeros(5, 3, 8, 8))


@pytest.mark.parametrize("call, match", [
    (lambda: evaluation.fd_curve(gaussian(10), gaussian(10), [20]), "ns"),
    (lambda: evaluation.fd_curve(gaussian(10), gaussian(10), [5], draws=0), "draws"),
    (lambda: evaluation.fd_infinity([10, 10], [1.0, 2.0]), "different"),
    (lambda: evaluation.fd_infinity([10], [1.0]), "same length"),
    (lambda: evaluation.knn_radii(gaussian(5), 5), "k must"),
    (lambda: evaluation.precision_recall(gaussian(5, d=2), gaussian(5, d=3)), "feature size"),
    (lambda: evaluation.precision_recall(np.zeros(5), gaussian(5)), "real"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
