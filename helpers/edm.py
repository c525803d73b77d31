"""Diffusion in sigma: the probability-flow ODE and the samplers of Karras et al. (2022, "EDM").

The course's DDPM writes ``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps``. Divide by
``sqrt(alpha_bar_t)``: ``x_t / sqrt(alpha_bar_t) = x0 + sigma_t eps`` with

    sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)            (:func:`vp_sigmas`)

so in these coordinates the noisy sample is the data plus noise of standard deviation sigma, and
the probability-flow ODE is ``dx/dsigma = (x - D(x; sigma)) / sigma`` with the denoiser
``D(x; sigma) ~ E[x0 | x]``. This sigma is the one ``EulerDiscreteScheduler`` keeps in
``scheduler.sigmas``, and diffusers' Euler, Heun and ancestral samplers are EDM's steps on it:

* :func:`euler_step`    one call; ``EulerDiscreteScheduler`` (``use_karras_sigmas`` for the rho list);
* :func:`heun_step`     EDM Algorithm 1 without churn, two calls except onto sigma = 0;
  ``HeunDiscreteScheduler``;
* :func:`ancestral_step`  down to ``sigma_down`` by Euler, then fresh noise ``sigma_up``;
  ``EulerAncestralDiscreteScheduler``.

An epsilon-prediction network becomes a denoiser through the preconditioning of EDM's Table 1
for VP models (:func:`vp_preconditioning`, :func:`vp_denoiser`); EDM's own preconditioning,
which keeps the network's input and target at unit variance for every sigma, is
:func:`edm_preconditioning`. Karras' noise levels are :func:`karras_sigmas`.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = [
    "ancestral_step",
    "discrete_sigmas",
    "edm_preconditioning",
    "euler_step",
    "heun_step",
    "karras_sigmas",
    "sample",
    "sigma_to_t",
    "vp_denoiser",
    "vp_preconditioning",
    "vp_sigmas",
]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # D(x, sigma) -> estimate of x0


def _positive_1d(values, name: str) -> torch.Tensor:
    values = torch.as_tensor(values)
    if values.ndim != 1 or len(values) < 2:
        raise ValueError(f"{name} must be a 1-D tensor of at least two values; got shape {tuple(values.shape)}")
    return values


def vp_sigmas(alpha_bar: torch.Tensor) -> torch.Tensor:
    """``sqrt((1 - alpha_bar) / alpha_bar)``: the noise level of ``x_t / sqrt(alpha_bar_t)``, per t."""
    alpha_bar = _positive_1d(alpha_bar, "alpha_bar")
    if not bool(((alpha_bar > 0) & (alpha_bar <= 1)).all()):
        raise ValueError("alpha_bar must lie in (0, 1]")
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def sigma_to_t(sigma: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The (fractional) DDPM time of noise level ``sigma``: interpolation in log sigma, as diffusers does.

    Between two training steps ``t`` and ``t + 1`` the time is linear in ``log sigma``; outside
    the table it is clamped to ``[0, T - 1]``.
    """
    log_sigmas = vp_sigmas(alpha_bar).double().log()
    log_sigma = torch.as_tensor(sigma, dtype=torch.float64).clamp_min(1e-10).log()
    flat = log_sigma.reshape(-1)
    low = ((flat[None, :] - log_sigmas[:, None]) >= 0).cumsum(0).argmax(0).clamp(max=len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((lo - flat) / (lo - hi)).clamp(0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(log_sigma.shape).float()


def discrete_sigmas(alpha_bar: torch.Tensor, num_steps: int) -> torch.Tensor:
    """The noise levels at ``num_steps`` times spread evenly from ``T - 1`` down to 0 ("linspace" spacing).

    Linear interpolation of :func:`vp_sigmas` in t, as ``EulerDiscreteScheduler`` and
    ``EulerAncestralDiscreteScheduler`` do by default; no final zero.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int; got {num_steps!r}")
    table = vp_sigmas(alpha_bar).double()
    t = torch.linspace(0, len(table) - 1, num_steps, dtype=torch.float64).flip(0)
    low = t.floor().long().clamp(max=len(table) - 2)
    w = t - low
    return ((1 - w) * table[low] + w * table[low + 1]).float()


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM's noise levels (eq. 5): evenly spaced in ``sigma ** (1 / rho)`` from ``sigma_max`` to ``sigma_min``.

    ``rho = 7`` spends the steps near the data, where the ODE bends most; ``rho = 1`` is evenly
    spaced in sigma. No final zero (append it to sample).
    """
    if not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an int of at least 2; got {num_steps!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max; got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be positive; got {rho}")
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).float()


def edm_preconditioning(sigma, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM's ``(c_skip, c_out, c_in, c_noise)`` for data of root-mean-square ``sigma_data`` (Table 1).

    ``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)``. ``c_in`` gives the network an input of
    unit second moment, ``c_skip`` makes the target ``(x0 - c_skip x) / c_out`` as small as it
    can be and ``c_out`` scales that target to unit second moment, at every sigma.
    """
    if sigma_data <= 0:
        raise ValueError(f"sigma_data must be positive; got {sigma_data}")
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if bool((sigma <= 0).any()):
        raise ValueError("sigma must be positive")
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), 1 / total.sqrt(), sigma.log() / 4


def vp_preconditioning(sigma, alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out, c_in, c_noise)`` that make an epsilon-prediction DDPM network a denoiser.

    ``c_skip = 1``, ``c_out = -sigma``, ``c_in = 1 / sqrt(sigma^2 + 1)`` (back to the network's
    ``x_t``) and ``c_noise`` the DDPM time of sigma (:func:`sigma_to_t`): EDM's Table 1, VP column,
    with diffusers' interpolation between the trained times.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt(), sigma_to_t(sigma, alpha_bar)


def vp_denoiser(eps_model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], alpha_bar: torch.Tensor) -> Denoiser:
    """``D(x; sigma) = x - sigma * eps_model(x / sqrt(sigma^2 + 1), t(sigma))`` for a batch at one sigma."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        c_skip, c_out, c_in, c_noise = (c.to(x.dtype) for c in vp_preconditioning(sigma, alpha_bar))
        return c_skip * x + c_out * eps_model(c_in * x, c_noise)

    return denoise


def euler_step(denoiser: Denoiser, x: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One Euler step of ``dx/dsigma = (x - D(x; sigma)) / sigma`` from ``sigma`` to ``sigma_next``."""
    sigma, sigma_next = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
    d = (x - denoiser(x, sigma)) / sigma
    return x + (sigma_next - sigma) * d


def heun_step(denoiser: Denoiser, x: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """EDM Algorithm 1 (no churn): Euler, then the trapezoid rule with the slope at the end point.

    Two denoiser calls, except onto ``sigma_next = 0``, where the slope is undefined and the
    step stays Euler's.
    """
    sigma, sigma_next = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
    d = (x - denoiser(x, sigma)) / sigma
    x_euler = x + (sigma_next - sigma) * d
    if float(sigma_next) == 0:
        return x_euler
    d_next = (x_euler - denoiser(x_euler, sigma_next)) / sigma_next
    return x + (sigma_next - sigma) * (d + d_next) / 2


def ancestral_step(denoiser: Denoiser, x: torch.Tensor, sigma, sigma_next, noise: torch.Tensor) -> torch.Tensor:
    """Euler down to ``sigma_down``, then fresh noise of std ``sigma_up``, with ``sigma_down^2 + sigma_up^2 = sigma_next^2``.

    ``sigma_up = sigma_next * sqrt(1 - sigma_next^2 / sigma^2)``: the DDPM posterior's share of
    fresh noise written in sigma (DDIM with eta = 1).
    """
    sigma, sigma_next = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt()
    sigma_down = (sigma_next**2 - sigma_up**2).sqrt()
    d = (x - denoiser(x, sigma)) / sigma
    return x + (sigma_down - sigma) * d + sigma_up * noise


def sample(denoiser: Denoiser, sigmas: torch.Tensor, noise: torch.Tensor, method: str = "euler",
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Integrate from ``sigmas[0]`` to ``sigmas[-1]`` (append 0 to end at the data), starting at ``noise * sigmas[0]``.

    ``method`` is ``"euler"``, ``"heun"`` or ``"ancestral"`` (fresh noise drawn from ``generator``,
    one ``randn`` of the sample's shape per step, as diffusers draws it).
    """
    steps = {"euler": euler_step, "heun": heun_step, "ancestral": ancestral_step}
    if method not in steps:
        raise ValueError(f"method must be one of {sorted(steps)}; got {method!r}")
    sigmas = _positive_1d(sigmas, "sigmas")
    if bool((sigmas[1:] > sigmas[:-1]).any()):
        raise ValueError("sigmas must decrease")
    x = noise * sigmas[0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        if method == "ancestral":
            fresh = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = ancestral_step(denoiser, x, sigma, sigma_next, fresh)
        else:
            x = steps[method](denoiser, x, sigma, sigma_next)
    return x
