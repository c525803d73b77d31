"""Tests of helpers.metrics: the frozen digit classifier, the Frechet distance and the score card.

The classifier trains once (a few seconds) into a temporary COURSE_CACHE, never into ~/.cache.
"""

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

import helpers
from helpers import metrics
from helpers.metrics import digit_classifier, frechet_distance, score_digits


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("course_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COURSE_CACHE", str(path))
        metrics._load_or_train.cache_clear()
        yield path
    metrics._load_or_train.cache_clear()  # later callers must not get a network from a deleted folder


@pytest.fixture(scope="module")
def classifier(cache_dir):
    return digit_classifier()


@pytest.fixture(scope="module")
def digits():
    return helpers.load_digits(8)


def held_out_real(images: torch.Tensor, n: int, seed: int = 1) -> torch.Tensor:
    """n real digits from the half that score_digits does not use as its reference."""
    held_out, _ = metrics._split(len(images), 0.5, seed=0)
    pick = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(seed))[:n]
    return images[held_out[pick]]


def blur(x: torch.Tensor) -> torch.Tensor:
    """Half-strength 3x3 binomial blur (background -1 outside the image)."""
    k = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16
    return 0.5 * x + 0.5 * F.conv2d(F.pad(x, (1, 1, 1, 1), value=-1.0), k[None, None])


# --- the classifier ------------------------------------------------------------------------

def test_classifier_is_accurate_frozen_and_cached_in_memory(classifier, digits):
    assert classifier.test_accuracy >= 0.95  # on the 20 % of digits it never trained on
    assert not classifier.training
    assert not any(p.requires_grad for p in classifier.parameters())
    assert digit_classifier() is classifier and digit_classifier(seed=0, device="cpu") is classifier
    images, _ = digits
    assert classifier(images[:5]).shape == (5, 10)
    assert classifier.features(images[:5]).shape == (5, 64)
    assert classifier.predict(helpers.load_digits(16)[0][:5]).shape == (5,)  # any square size
    with pytest.raises(ValueError, match="x must be"):
        classifier(torch.zeros(2, 3, 8, 8))


def test_disk_cache_gives_the_same_network_and_the_name_tracks_the_recipe(classifier, cache_dir, digits):
    files = list(cache_dir.glob("digit_classifier-*.pt"))
    assert len(files) == 1 and metrics._recipe_hash(0) in files[0].name
    metrics._load_or_train.cache_clear()
    loaded = digit_classifier()  # from disk this time
    assert loaded is not classifier and loaded.test_accuracy == classifier.test_accuracy
    images, _ = digits
    assert torch.equal(loaded(images), classifier(images))
    assert metrics._recipe_hash(0) != metrics._recipe_hash(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metrics, "RECIPE_VERSION", metrics.RECIPE_VERSION + 1)
        assert metrics._recipe_hash(0) != files[0].stem.split("-")[1]


def test_training_is_deterministic(classifier, tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))  # empty: forces a retrain
    metrics._load_or_train.cache_clear()
    retrained = digit_classifier()
    for (name, a), b in zip(classifier.state_dict().items(), retrained.state_dict().values()):
        assert torch.equal(a, b), name
    metrics._load_or_train.cache_clear()


# --- the Frechet distance ------------------------------------------------------------------

def gaussian_cloud(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)


def test_frechet_distance_is_zero_for_identical_sets_and_symmetric():
    a, b = gaussian_cloud(500, 8, 0), gaussian_cloud(300, 8, 1)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(torch.tensor(a), torch.tensor(b)) == pytest.approx(frechet_distance(a, b))


def exact_moments(mu: np.ndarray, sd: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n points whose sample mean is mu and sample covariance exactly diag(sd**2)."""
    z = np.random.default_rng(seed).normal(size=(n, len(mu)))
    q, _ = np.linalg.qr(z - z.mean(0))  # orthonormal columns, each orthogonal to the ones vector
    return mu + q * np.sqrt(n - 1) * sd


def test_frechet_distance_of_diagonal_gaussians_has_the_closed_form():
    """For commuting (here diagonal) covariances FD = sum (mu1 - mu2)^2 + (s1 - s2)^2."""
    mu1, sd1, mu2, sd2 = np.array([0.0, 1, -2]), np.array([1.0, 0.5, 2]), np.array([1.0, 1, 0]), np.array([2.0, 0.5, 1])
    a, b = exact_moments(mu1, sd1, 200, 0), exact_moments(mu2, sd2, 150, 1)
    expected = ((mu1 - mu2) ** 2 + (sd1 - sd2) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a[:, :1], b[:, :1]) == pytest.approx(1.0 + 1.0, rel=1e-9)  # one dimension


def test_frechet_distance_matches_scipy_sqrtm_and_ignores_a_shared_rotation():
    a, b = gaussian_cloud(400, 6, 2), gaussian_cloud(400, 6, 3)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    reference = (
        ((a.mean(0) - b.mean(0)) ** 2).sum()
        + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real)
    )
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-8)
    q, _ = np.linalg.qr(np.random.default_rng(4).normal(size=(6, 6)))
    assert frechet_distance(a @ q, b @ q) == pytest.approx(reference, rel=1e-8)


@pytest.mark.parametrize(
    "a, b, match",
    [
        (np.zeros(5), np.zeros((5, 2)), "feats_a must be a 2-D"),
        (np.zeros((5, 2)), np.zeros((1, 2)), "feats_b needs N >= 2"),
        (np.zeros((5, 2)), np.zeros((5, 3)), "same feature dim"),
        (np.full((5, 2), np.nan), np.zeros((5, 2)), "feats_a contains NaN"),
    ],
)
def test_frechet_distance_rejects_bad_shapes(a, b, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(a, b)


# --- the score card ------------------------------------------------------------------------

def test_real_digits_score_at_the_floor_and_noise_far_above(classifier, digits):
    images, _ = digits
    real = score_digits(held_out_real(images, 600), classifier)
    assert real.n == 600 and real.ratio < 1.5
    assert real.confidence > 0.9 and real.coverage == 10 and sum(real.class_counts) == 600
    noise = torch.rand(600, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noisy = score_digits(noise, classifier)
    assert noisy.fd_floor == real.fd_floor  # same N, same floor
    assert noisy.ratio > 10 and noisy.confidence < real.confidence - 0.05
    assert "classes 10/10 | n=600" in str(real)


def test_degradations_rank_between_real_and_noise(classifier, digits):
    images, _ = digits
    real = held_out_real(images, 600)
    noise = torch.rand(600, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fd = {name: score_digits(x, classifier).fd for name, x in [
        ("real", real), ("shifted", torch.roll(real, 1, dims=-1)), ("blurred", blur(real)), ("noise", noise),
    ]}  # fmt: skip
    assert fd["real"] < fd["shifted"] < fd["noise"]
    assert fd["real"] < fd["blurred"] < fd["noise"]


def test_a_collapsed_model_covers_one_class(classifier, digits):
    images, labels = digits
    one = images[labels == 1][:1]
    collapsed = score_digits(one.expand(200, -1, -1, -1), classifier)
    assert collapsed.coverage == 1 and collapsed.class_counts[1] == 200
    ones = score_digits(images[labels == 1], classifier)  # real 1s: a few may read as 7 or 4
    assert ones.class_counts[1] >= 0.9 * ones.n and ones.ratio > 10


def test_16x16_samples_meet_16x16_reference_digits(classifier):
    images16, _ = helpers.load_digits(16)
    scores = score_digits(held_out_real(images16, 600), classifier)
    assert scores.ratio < 1.5 and scores.confidence > 0.85 and scores.coverage == 10


def test_score_digits_rejects_non_images(classifier):
    with pytest.raises(ValueError, match="samples must be"):
        score_digits(torch.zeros(10, 64), classifier)
    with pytest.raises(ValueError, match="reference must be"):
        score_digits(torch.zeros(10, 1, 8, 8), classifier, reference=torch.zeros(3, 1, 8, 8))
