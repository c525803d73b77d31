"""helpers.score: the mixture's exact score and posterior mean, Tweedie's formula, the bound's weights.

Each closed form is checked against something computed another way: the score against autograd
of a log-density built by torch.distributions, the posterior mean against importance sampling
and the one-Gaussian formula, the KL weight against torch.distributions' KL.
"""

import math

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal, Normal, Independent, kl_divergence

import helpers
from helpers import diffusion, flow, score

D64 = torch.float64


def mixture(K: int = 3, d: int = 2, seed: int = 0):
    """A random mixture with full, anisotropic covariances."""
    g = torch.Generator().manual_seed(seed)
    means = 2 * torch.randn(K, d, generator=g, dtype=D64)
    A = torch.randn(K, d, d, generator=g, dtype=D64) * 0.4
    covs = A @ A.transpose(1, 2) + 0.05 * torch.eye(d, dtype=D64)
    weights = torch.rand(K, generator=g, dtype=D64) + 0.2
    return means, covs, weights / weights.sum()


def torch_mixture(means, covs, weights, ab: float) -> MixtureSameFamily:
    """p_t built independently: x_t = sqrt(ab) x0 + sqrt(1 - ab) eps makes each component N(sqrt(ab) mu, ab S + (1 - ab) I)."""
    eye = torch.eye(means.shape[1], dtype=D64)
    return MixtureSameFamily(Categorical(probs=weights), MultivariateNormal(math.sqrt(ab) * means, ab * covs + (1 - ab) * eye))


@pytest.mark.parametrize("ab", [1.0, 0.9, 0.3, 0.01, 0.0])
def test_log_prob_equals_torch_distributions(ab):
    means, covs, weights = mixture()
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(1), dtype=D64) * 2
    torch.testing.assert_close(score.mixture_log_prob(x, means, covs, weights, ab), torch_mixture(means, covs, weights, ab).log_prob(x))


@pytest.mark.parametrize("ab", [1.0, 0.9, 0.3, 0.01, 0.0])
def test_score_equals_autograd_of_log_density(ab):
    means, covs, weights = mixture(K=4, d=2)
    x = (torch.randn(64, 2, generator=torch.Generator().manual_seed(2), dtype=D64) * 2).requires_grad_(True)
    (grad,) = torch.autograd.grad(torch_mixture(means, covs, weights, ab).log_prob(x).sum(), x)
    torch.testing.assert_close(score.mixture_score(x.detach(), means, covs, weights, ab), grad, rtol=1e-9, atol=1e-9)


def test_score_with_one_noise_level_per_point():
    means, covs, weights = mixture(K=3, d=3, seed=3)
    g = torch.Generator().manual_seed(4)
    x, ab = torch.randn(6, 3, generator=g, dtype=D64), torch.rand(6, generator=g, dtype=D64)
    batched = score.mixture_score(x, means, covs, weights, ab)
    mean = score.mixture_posterior_mean(x, means, covs, weights, ab)
    for i in range(6):
        torch.testing.assert_close(batched[i], score.mixture_score(x[i:i + 1], means, covs, weights, ab[i].item())[0])
        torch.testing.assert_close(mean[i], score.mixture_posterior_mean(x[i:i + 1], means, covs, weights, ab[i].item())[0])


@pytest.mark.parametrize("ab", [0.95, 0.5, 0.05])
def test_tweedie_posterior_mean_equals_score_formula(ab):
    """E[x0 | x_t] by Gaussian conditioning = (x_t + (1 - ab) score) / sqrt(ab): two routes, one number."""
    means, covs, weights = mixture(K=4, d=2, seed=5)
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(6), dtype=D64) * 2
    tweedie = (x + (1 - ab) * score.mixture_score(x, means, covs, weights, ab)) / math.sqrt(ab)
    torch.testing.assert_close(score.mixture_posterior_mean(x, means, covs, weights, ab), tweedie, rtol=1e-9, atol=1e-9)


def test_posterior_mean_of_one_gaussian_is_the_scalar_formula():
    """x0 ~ N(m, s^2) in 1-D: E[x0 | x_t] = m + sqrt(ab) s^2 / (ab s^2 + 1 - ab) (x_t - sqrt(ab) m)."""
    m, s, ab = 0.7, 0.4, 0.6
    x = torch.linspace(-3, 3, 13, dtype=D64)[:, None]
    expected = m + math.sqrt(ab) * s**2 / (ab * s**2 + 1 - ab) * (x - math.sqrt(ab) * m)
    got = score.mixture_posterior_mean(x, torch.tensor([[m]], dtype=D64), torch.tensor([[[s**2]]], dtype=D64), torch.ones(1, dtype=D64), ab)
    torch.testing.assert_close(got, expected)


def test_posterior_mean_equals_importance_sampling():
    """Self-normalised importance sampling: draws of x0 from the prior, weighted by q(x_t | x0)."""
    means, covs, weights = mixture(K=3, d=2, seed=7)
    g = torch.Generator().manual_seed(8)
    x0 = score.mixture_sample(400_000, means, covs, weights, generator=g)
    ab = 0.5
    xt = torch.tensor([[0.3, -0.2], [1.5, 1.0], [-2.0, 0.5]], dtype=D64)
    log_w = -((xt[:, None, :] - math.sqrt(ab) * x0[None]) ** 2).sum(-1) / (2 * (1 - ab))  # (3, N)
    w = torch.softmax(log_w, dim=1)
    estimate = w @ x0  # (3, 2)
    ess = 1 / (w**2).sum(1)
    assert (ess > 1000).all(), ess  # enough effective draws for the tolerance below
    torch.testing.assert_close(score.mixture_posterior_mean(xt, means, covs, weights, ab), estimate, atol=0.02, rtol=0)


def test_samples_have_the_mixture_moments():
    means, covs, weights = mixture(K=3, d=2, seed=9)
    x = score.mixture_sample(200_000, means, covs, weights, generator=torch.Generator().manual_seed(10))
    mean = weights @ means
    cov = (weights[:, None, None] * (covs + means[:, :, None] * means[:, None, :])).sum(0) - mean[:, None] * mean[None]
    torch.testing.assert_close(x.mean(0), mean, atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.05, rtol=0.02)


def test_eps_and_score_convert_exactly_and_the_best_eps_is_minus_scaled_score():
    """E[eps | x_t] = -sqrt(1 - ab) score: a Monte Carlo of eps given x_t's neighbourhood is too blunt,
    so check it exactly on one Gaussian, where E[eps | x_t] is linear in x_t."""
    g = torch.Generator().manual_seed(11)
    s = torch.randn(5, 2, generator=g, dtype=D64)
    x = torch.randn(5, 2, generator=g, dtype=D64)
    for ab in (0.9, 0.5, 0.1, 0.0, 0.99):
        c = (math.sqrt(ab), math.sqrt(1 - ab))
        torch.testing.assert_close(flow.convert(flow.convert(s, "score", "epsilon", x, *c), "epsilon", "score", x, *c), s)
    m, sd, a = 0.5, 0.8, 0.3
    xt = torch.linspace(-2, 2, 9, dtype=D64)[:, None]
    var_t = a * sd**2 + 1 - a
    eps_best = math.sqrt(1 - a) * (xt - math.sqrt(a) * m) / var_t  # Cov(eps, x_t) / Var(x_t) * (x_t - E x_t)
    exact = score.mixture_score(xt, torch.tensor([[m]], dtype=D64), torch.tensor([[[sd**2]]], dtype=D64), torch.ones(1, dtype=D64), a)
    torch.testing.assert_close(flow.convert(exact, "score", "epsilon", xt, math.sqrt(a), math.sqrt(1 - a)), eps_best)


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_kl_between_gaussians_is_weighted_eps_error(variance):
    """KL(q(x_{t-1}|x_t,x0) || N(mu_theta, sigma_t^2 I)) = w_t ||eps - eps_theta||^2 + c_t, for every t >= 1."""
    schedule = helpers.get_schedule("linear", 1000, dtype=D64)
    ab, betas = schedule.alpha_bar, schedule.betas
    ab_prev = torch.cat([torch.ones(1, dtype=D64), ab[:-1]])
    beta_tilde = (1 - ab_prev) / (1 - ab) * betas
    sigma2 = beta_tilde.clone() if variance == "beta_tilde" else betas.clone()
    w = score.elbo_weights(ab, None if variance == "beta_tilde" else sigma2)
    g = torch.Generator().manual_seed(12)
    for t in [1, 2, 10, 100, 500, 999]:
        x0, eps, eps_theta = (torch.randn(3, 16, generator=g, dtype=D64) for _ in range(3))
        xt = diffusion.q_sample(x0, t, eps, ab)
        mu_tilde, var = diffusion.posterior_mean_variance(x0, xt, t, ab)
        x0_theta = diffusion.x0_from_eps(xt, eps_theta, ab[t])
        mu_theta, _ = diffusion.posterior_mean_variance(x0_theta, xt, t, ab)  # the reverse mean from eps_theta
        kl = kl_divergence(Independent(Normal(mu_tilde, var.sqrt()), 1), Independent(Normal(mu_theta, sigma2[t].sqrt()), 1))
        r = beta_tilde[t] / sigma2[t]
        c = 0.5 * 16 * (r - 1 - r.log())  # 0 when sigma_t^2 = beta_tilde_t
        torch.testing.assert_close(kl, w[t] * ((eps - eps_theta) ** 2).sum(1) + c, rtol=1e-8, atol=1e-10)
    assert w[0] == 0


def test_bad_arguments_raise_errors_naming_them():
    means, covs, weights = mixture()
    x = torch.zeros(4, 2, dtype=D64)
    with pytest.raises(ValueError, match="means"):
        score.mixture_score(x, means[0], covs, weights, 0.5)
    with pytest.raises(ValueError, match="covs"):
        score.mixture_score(x, means, covs[:, :1], weights, 0.5)
    with pytest.raises(ValueError, match="covs must be positive definite"):
        score.mixture_score(x, means, -covs, weights, 0.5)
    with pytest.raises(ValueError, match="covs must be symmetric"):
        bad = covs.clone()
        bad[0, 0, 1] += 1.0
        score.mixture_score(x, means, bad, weights, 0.5)
    with pytest.raises(ValueError, match="weights"):
        score.mixture_score(x, means, covs, weights * 2, 0.5)
    with pytest.raises(ValueError, match="weights"):
        score.mixture_score(x, means, covs, weights[:2], 0.5)
    with pytest.raises(ValueError, match="x must have shape"):
        score.mixture_score(torch.zeros(4, 3, dtype=D64), means, covs, weights, 0.5)
    with pytest.raises(ValueError, match="alpha_bar_t"):
        score.mixture_posterior_mean(x, means, covs, weights, 1.5)
    with pytest.raises(ValueError, match="alpha_bar_t"):
        score.mixture_score(x, means, covs, weights, torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="n must be"):
        score.mixture_sample(0, means, covs, weights)
    with pytest.raises(ValueError, match="alpha_bar"):
        score.elbo_weights(torch.tensor([0.5, 0.9]))
    with pytest.raises(ValueError, match="sigma2"):
        score.elbo_weights(torch.tensor([0.9, 0.5]), torch.tensor([1.0]))
