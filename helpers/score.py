"""The score, Tweedie's formula and the variational bound's weights (section 2.2).

For the course's forward process ``x_t = sqrt(ab) x0 + sqrt(1 - ab) eps`` (``ab = alpha_bar[t]``):

* the **score** of the noisy marginal is ``grad log p_t(x_t) = -E[eps | x_t] / sqrt(1 - ab)``,
  so an eps-network estimates it: ``score ~ -eps_theta / sqrt(1 - ab)``
  (``helpers.flow.convert(eps, "epsilon", "score", ...)`` converts it, on any Gaussian path);
* **Tweedie's formula** gives the posterior mean of the data,
  ``E[x0 | x_t] = (x_t + (1 - ab) grad log p_t(x_t)) / sqrt(ab)``, the network's ``x0_hat``.

When the data are a Gaussian mixture ``sum_k w_k N(mu_k, Sigma_k)``, every ``p_t`` is one too,
``sum_k w_k N(sqrt(ab) mu_k, ab Sigma_k + (1 - ab) I)``, so its log-density, score and posterior
mean are closed form (:func:`mixture_log_prob`, :func:`mixture_score`,
:func:`mixture_posterior_mean`): the exact answers a trained network is measured against.

:func:`elbo_weights` is the factor that turns each KL term of the DDPM bound into a squared
eps-error (Ho et al. 2020, eq. 12).

Shapes: points ``x`` are ``(B, d)``; a mixture is ``means (K, d)``, ``covs (K, d, d)`` (symmetric
positive definite) and ``weights (K,)`` (positive, summing to 1). ``alpha_bar_t`` is a number in
``[0, 1]``, a 0-d tensor or a ``(B,)`` tensor (one noise level per point).
"""

from __future__ import annotations

import math

import torch

from helpers.core import append_dims

__all__ = [
    "elbo_weights",
    "mixture_log_prob",
    "mixture_marginal",
    "mixture_posterior_mean",
    "mixture_sample",
    "mixture_score",
]


# --- checks: clear errors that name the argument ------------------------------------------------


def _check_gaussians(means, covs, ref: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``means (K, d)`` and ``covs (K, d, d)`` as tensors (on ``ref``'s device and dtype if given), checked."""
    means, covs = torch.as_tensor(means), torch.as_tensor(covs)
    dtype = ref.dtype if ref is not None else torch.promote_types(means.dtype, torch.float32)
    device = ref.device if ref is not None else means.device
    means, covs = means.to(device=device, dtype=dtype), covs.to(device=device, dtype=dtype)
    if means.ndim != 2:
        raise ValueError(f"means must have shape (K, d); got {tuple(means.shape)}")
    K, d = means.shape
    if covs.shape != (K, d, d):
        raise ValueError(f"covs must have shape (K, d, d) = {(K, d, d)} to match means; got {tuple(covs.shape)}")
    if not torch.allclose(covs, covs.transpose(1, 2), atol=1e-6, rtol=1e-6):
        raise ValueError("covs must be symmetric")
    if torch.linalg.cholesky_ex(covs).info.any():
        raise ValueError("covs must be positive definite (every component a proper Gaussian)")
    if ref is not None and (ref.ndim != 2 or ref.shape[1] != d):
        raise ValueError(f"x must have shape (B, {d}) for a mixture in {d} dimensions; got {tuple(ref.shape)}")
    return means, covs


def _check_mixture(means, covs, weights, ref: torch.Tensor | None = None):
    """The mixture's three tensors, checked: shapes agree, covariances proper, weights a distribution."""
    means, covs = _check_gaussians(means, covs, ref)
    weights = torch.as_tensor(weights).to(device=means.device, dtype=means.dtype)
    K = len(means)
    if weights.shape != (K,):
        raise ValueError(f"weights must have shape (K,) = ({K},) to match means; got {tuple(weights.shape)}")
    if (weights <= 0).any() or abs(weights.sum().item() - 1) > 1e-5:
        raise ValueError(f"weights must be positive and sum to 1; got {weights.tolist()}")
    return means, covs, weights


def _check_alpha_bar(alpha_bar_t, x: torch.Tensor) -> torch.Tensor:
    """``alpha_bar_t`` as a ``(B, 1)`` or ``()`` tensor on ``x``'s device and dtype."""
    ab = torch.as_tensor(alpha_bar_t, dtype=x.dtype, device=x.device)
    if ab.ndim > 1 or (ab.ndim == 1 and len(ab) != len(x)):
        raise ValueError(f"alpha_bar_t must be a number or a ({len(x)},) tensor, one per point; got shape {tuple(ab.shape)}")
    if ((ab < 0) | (ab > 1)).any() or ab.isnan().any():
        raise ValueError(f"alpha_bar_t must lie in [0, 1]; got values in [{ab.min().item()}, {ab.max().item()}]")
    return ab[:, None] if ab.ndim == 1 else ab


# --- the noisy marginal of a Gaussian mixture ------------------------------------------------------


def mixture_marginal(means, covs, alpha_bar_t) -> tuple[torch.Tensor, torch.Tensor]:
    """The components of ``p_t``: means ``sqrt(ab) mu_k`` and covariances ``ab Sigma_k + (1 - ab) I``.

    ``alpha_bar_t`` is a number (returns ``(K, d)``, ``(K, d, d)``) or a ``(B,)`` tensor (returns
    ``(B, K, d)``, ``(B, K, d, d)``).
    """
    means, covs = _check_gaussians(means, covs)
    ab = torch.as_tensor(alpha_bar_t, dtype=means.dtype, device=means.device)
    if ab.ndim > 1 or ((ab < 0) | (ab > 1)).any():
        raise ValueError(f"alpha_bar_t must be a number or a (B,) tensor in [0, 1]; got {alpha_bar_t!r}")
    eye = torch.eye(means.shape[1], dtype=means.dtype, device=means.device)
    if ab.ndim == 1:
        ab = ab[:, None, None]  # (B, 1, 1) against (K, d)
        return ab.sqrt() * means, ab[..., None] * covs + (1 - ab[..., None]) * eye  # (B, K, d), (B, K, d, d)
    return ab.sqrt() * means, ab * covs + (1 - ab) * eye  # (K, d), (K, d, d)


def _components(x, means, covs, weights, alpha_bar_t):
    """Per-component pieces at ``x``: ``log w_k N(x; m_k, C_k)`` and ``C_k^{-1} (x - m_k)``."""
    means, covs, weights = _check_mixture(means, covs, weights, ref=x)
    ab = _check_alpha_bar(alpha_bar_t, x)  # () or (B, 1)
    d = x.shape[1]
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    ab3 = ab[..., None, None] if ab.ndim else ab  # (B, 1, 1, 1) or ()
    m = ab.sqrt()[..., None] * means if ab.ndim else ab.sqrt() * means  # (B, K, d) or (K, d)
    C = ab3 * covs + (1 - ab3) * eye  # (B, K, d, d) or (K, d, d): one factorisation per component if ab is shared
    L = torch.linalg.cholesky(C)
    precision = torch.cholesky_inverse(L)  # C_k^{-1}
    log_det = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)  # (B, K) or (K,)
    diff = x[:, None, :] - m  # (B, K, d)
    prec_diff = (precision @ diff[..., None]).squeeze(-1)  # (B, K, d)
    maha = (diff * prec_diff).sum(-1)  # (B, K): (x - m_k)^T C_k^{-1} (x - m_k)
    log_comp = weights.log() - 0.5 * maha - 0.5 * log_det - 0.5 * d * math.log(2 * math.pi)
    return log_comp, prec_diff, means, covs, ab


def mixture_log_prob(x: torch.Tensor, means, covs, weights, alpha_bar_t=1.0) -> torch.Tensor:
    """``log p_t(x)`` of the noised mixture, ``(B,)``; ``alpha_bar_t = 1`` is the data's own density."""
    log_comp, *_ = _components(x, means, covs, weights, alpha_bar_t)
    return torch.logsumexp(log_comp, dim=1)


def mixture_score(x: torch.Tensor, means, covs, weights, alpha_bar_t) -> torch.Tensor:
    """The exact score ``grad_x log p_t(x)`` of the noised mixture, ``(B, d)``.

    ``grad log sum_k w_k N(x; m_k, C_k) = -sum_k r_k(x) C_k^{-1} (x - m_k)`` with the
    responsibilities ``r_k(x) = w_k N(x; m_k, C_k) / p_t(x)``.
    """
    log_comp, prec_diff, *_ = _components(x, means, covs, weights, alpha_bar_t)
    r = torch.softmax(log_comp, dim=1)  # (B, K) responsibilities
    return -(r[..., None] * prec_diff).sum(1)  # (B, d)


def mixture_posterior_mean(x: torch.Tensor, means, covs, weights, alpha_bar_t) -> torch.Tensor:
    """The exact posterior mean ``E[x0 | x_t = x]`` under the mixture prior, ``(B, d)``.

    Computed by Gaussian conditioning within each component, not through the score:
    ``E[x0 | x_t, k] = mu_k + sqrt(ab) Sigma_k C_k^{-1} (x_t - sqrt(ab) mu_k)``, averaged with the
    responsibilities ``r_k(x_t)``. Tweedie's formula says it equals
    ``(x + (1 - ab) mixture_score(x)) / sqrt(ab)`` (``tests/test_score.py``).
    """
    log_comp, prec_diff, means, covs, ab = _components(x, means, covs, weights, alpha_bar_t)
    r = torch.softmax(log_comp, dim=1)  # (B, K)
    scale = ab.sqrt()[..., None] if ab.ndim else ab.sqrt()  # (B, 1, 1) or ()
    cond = means + scale * torch.einsum("kij,bkj->bki", covs, prec_diff)  # (B, K, d)
    return (r[..., None] * cond).sum(1)  # (B, d)


def mixture_sample(n: int, means, covs, weights, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` draws from the mixture, ``(n, d)``: a component by its weight, then its Gaussian."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int; got {n!r}")
    means, covs, weights = _check_mixture(means, covs, weights)
    k = torch.multinomial(weights.cpu(), n, replacement=True, generator=generator)  # (n,)
    z = torch.randn(n, means.shape[1], generator=generator, dtype=means.dtype)  # (n, d)
    L = torch.linalg.cholesky(covs).cpu()
    return (means.cpu()[k] + (L[k] @ z[..., None]).squeeze(-1)).to(means.device)


# --- the bound's weights ----------------------------------------------------------------------


def elbo_weights(alpha_bar: torch.Tensor, sigma2: torch.Tensor | None = None) -> torch.Tensor:
    """The weight ``w_t`` with ``KL(q(x_{t-1}|x_t,x0) || p_theta(x_{t-1}|x_t)) = w_t ||eps - eps_theta||^2 + c_t``.

    ``w_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t))`` for the reverse variance
    ``sigma_t^2`` (default: the posterior's own, ``beta_tilde_t``, for which ``c_t = 0``), with the
    squared error summed over dimensions (Ho et al. 2020, eq. 12). Returns ``(T,)``, indexed like
    ``alpha_bar``; entry 0 is 0, because the step that makes ``x_0`` is undone by the decoder
    ``L_0``, not by a KL.
    """
    alpha_bar = torch.as_tensor(alpha_bar)
    if alpha_bar.ndim != 1 or len(alpha_bar) < 2:
        raise ValueError(f"alpha_bar must be a (T,) tensor with T >= 2; got shape {tuple(alpha_bar.shape)}")
    if (alpha_bar <= 0).any() or (alpha_bar >= 1).any() or (alpha_bar[1:] >= alpha_bar[:-1]).any():
        raise ValueError("alpha_bar must decrease strictly inside (0, 1)")
    ab_prev = torch.cat([torch.ones_like(alpha_bar[:1]), alpha_bar[:-1]])
    alphas = alpha_bar / ab_prev
    betas = 1 - alphas
    beta_tilde = (1 - ab_prev) / (1 - alpha_bar) * betas  # 0 at t = 0
    if sigma2 is None:
        sigma2 = beta_tilde
    sigma2 = torch.as_tensor(sigma2, dtype=alpha_bar.dtype)
    if sigma2.shape != alpha_bar.shape or (sigma2[1:] <= 0).any():
        raise ValueError(f"sigma2 must be a positive ({len(alpha_bar)},) tensor like alpha_bar; got shape {tuple(sigma2.shape)}")
    w = betas**2 / (2 * sigma2 * alphas * (1 - alpha_bar))
    w[0] = 0.0
    return w
