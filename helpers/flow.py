"""Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023; Esser et al. 2024, SD3).

Time convention of the course: **noise at t = 1, data at t = 0**, as in diffusers
(``FlowMatchEulerDiscreteScheduler``) and SD3. The straight path and its velocity are

    x_t = (1 - t) x0 + t * noise,        v = d x_t / d t = noise - x0.

Some papers flip the time (Lipman et al. 2023 and the ``flow_matching`` library put the data
at t = 1 and the noise at t = 0, so their velocity is ``x0 - noise``); translate with
``t -> 1 - t`` and ``v -> -v``. diffusers feeds the network ``t * 1000`` (``timestep_scale``)
and calls the continuous time ``sigma``.

Sampling integrates ``dx/dt = v(x, t)`` from t = 1 down to t = 0 with Euler steps on the
sigma list of ``FlowMatchEulerDiscreteScheduler.set_timesteps`` (:func:`flow_sigmas`),
optionally shifted towards the noisy end (SD3's ``shift``:
``sigma' = shift * sigma / (1 + (shift - 1) * sigma)``).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from helpers.core import append_dims
from helpers.diffusion import classifier_free_guidance, denoise

__all__ = [
    "PREDICTIONS",
    "T_SAMPLINGS",
    "convert",
    "flow_euler_sample",
    "flow_interpolate",
    "flow_objective",
    "flow_sigmas",
    "flow_time",
    "flow_velocity",
    "MODE_SCALE_RANGE",
    "logit_normal_density",
    "mode_density",
    "mode_sample",
    "sample_logit_normal",
    "shift_sigmas",
]

T_SAMPLINGS = ("uniform", "logit_normal")


def _time_like(t, x: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor on ``x``'s device/dtype, broadcastable against ``x`` (scalar or (B,))."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 1:
        if len(t) != len(x):
            raise ValueError(f"t has {len(t)} entries but the batch has {len(x)} samples")
        t = append_dims(t, x.ndim)  # (B, 1, ..., 1)
    elif t.ndim != 0:
        raise ValueError(f"t must be a float or a (B,) tensor; got shape {tuple(t.shape)}")
    return t


def flow_interpolate(x0: torch.Tensor, noise: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """The straight (rectified-flow) path ``x_t = (1 - t) x0 + t * noise``, t in [0, 1].

    ``t`` is a float or a ``(B,)`` tensor, one time per example. Equal to
    ``FlowMatchEulerDiscreteScheduler.scale_noise(x0, t * 1000, noise)`` at the scheduler's sigmas.
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 and noise must have the same shape; got {tuple(x0.shape)} and {tuple(noise.shape)}")
    tt = _time_like(t, x0)
    if tt.numel() and (tt.min() < 0 or tt.max() > 1):
        raise ValueError(f"t must lie in [0, 1] (noise at 1, data at 0); got values in "
                         f"[{float(tt.min()):.3g}, {float(tt.max()):.3g}]")
    return (1 - tt) * x0 + tt * noise


def flow_velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity target ``v = d x_t / d t = noise - x0`` of the straight path (constant in t)."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 and noise must have the same shape; got {tuple(x0.shape)} and {tuple(noise.shape)}")
    return noise - x0


PREDICTIONS = ("epsilon", "sample", "v_prediction", "flow", "score")


def convert(output: torch.Tensor, source: str, target: str, xt: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """Turn one prediction into another, exactly, on any Gaussian path ``x_t = alpha x0 + sigma eps``.

    DDPM's path has ``alpha = sqrt(alpha_bar_t)``, ``sigma = sqrt(1 - alpha_bar_t)``; rectified
    flow's ``alpha = 1 - t``, ``sigma = t``. A network's output names a point of the pair
    ``(x0, eps)`` that, with ``x_t``, fixes the other; the kinds are

    * ``"epsilon"``: eps;   ``"sample"``: x0;   ``"score"``: ``-eps / sigma`` (of ``q(x_t | x0)``,
      and, averaged over x0 given x_t, of ``p_t``);
    * ``"v_prediction"``: ``alpha * eps - sigma * x0`` (diffusers' v, Salimans & Ho);
    * ``"flow"``: ``eps - x0``, the velocity of the straight path through the same x0 and eps: what
      a rectified-flow model predicts, and ``d x_flow / d t_flow`` in :func:`flow_time`'s coordinates.

    ``alpha`` and ``sigma`` are floats or tensors broadcastable against ``xt``.
    """
    for name, kind in (("source", source), ("target", target)):
        if kind not in PREDICTIONS:
            raise ValueError(f"{name} must be one of {PREDICTIONS}; got {kind!r}")
    if output.shape != xt.shape:
        raise ValueError(f"output and xt must have the same shape; got {tuple(output.shape)} and {tuple(xt.shape)}")
    alpha, sigma = (torch.as_tensor(c, dtype=xt.dtype, device=xt.device) for c in (alpha, sigma))
    if bool((sigma <= 0).any()) or bool((alpha < 0).any()):
        raise ValueError("need sigma > 0 and alpha >= 0 (a noisy point of the path)")
    if source == "epsilon":
        eps = output
        x0 = (xt - sigma * eps) / alpha
    elif source == "score":
        eps = -sigma * output
        x0 = (xt - sigma * eps) / alpha
    elif source == "sample":
        x0 = output
        eps = (xt - alpha * x0) / sigma
    elif source == "v_prediction":  # [x_t; v] = [[alpha, sigma], [-sigma, alpha]] [x0; eps]
        norm = alpha**2 + sigma**2
        x0, eps = (alpha * xt - sigma * output) / norm, (sigma * xt + alpha * output) / norm
    else:  # flow: x_t = (alpha + sigma) x0 + sigma u
        x0 = (xt - sigma * output) / (alpha + sigma)
        eps = x0 + output
    return {"epsilon": lambda: eps, "sample": lambda: x0, "score": lambda: -eps / sigma,
            "v_prediction": lambda: alpha * eps - sigma * x0, "flow": lambda: eps - x0}[target]()


def flow_time(xt: torch.Tensor, alpha, sigma) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t / (alpha + sigma), sigma / (alpha + sigma))``: a point of any Gaussian path as a point of the straight one.

    ``x_t / (alpha + sigma) = (1 - s) x0 + s eps`` with ``s = sigma / (alpha + sigma)``: the same
    x0 and eps on rectified flow's path at time s. So a DDPM model can be sampled with a flow
    sampler, through :func:`convert` to ``"flow"``; Euler in these coordinates is DDIM.
    """
    alpha, sigma = (torch.as_tensor(c, dtype=xt.dtype, device=xt.device) for c in (alpha, sigma))
    return xt / (alpha + sigma), sigma / (alpha + sigma)


def shift_sigmas(sigmas, shift: float):
    """SD3's time shift ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)`` (Esser et al. 2024, eq. 23).

    ``shift > 1`` spends more of the steps at high noise; 0 and 1 are fixed points.
    """
    if not shift > 0:
        raise ValueError(f"shift must be positive; got {shift!r}")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


# --- where training spends its times: SD3's samplers of t (Esser et al. 2024, sec. 3.1) ----------

MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))  # f_mode is decreasing (invertible) exactly for s in this range


def _check_count(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int (how many times to draw); got {n!r}")
    return int(n)


def _check_logit_normal(m, s) -> None:
    if not math.isfinite(m):
        raise ValueError(f"m (the location of logit t) must be a finite number; got {m!r}")
    if not (s > 0 and math.isfinite(s)):
        raise ValueError(f"s (the scale of logit t) must be positive; got {s!r}")


def _check_mode_scale(s) -> None:
    lo, hi = MODE_SCALE_RANGE
    if not lo <= s <= hi:
        raise ValueError(f"s (the mode sampler's scale) must lie in [-1, 2/(pi - 2)] = [{lo}, {hi:.4f}], "
                         f"where f_mode is invertible; got {s!r}")


def _unit_interval(t, name: str = "t") -> torch.Tensor:
    t = torch.as_tensor(t)
    t = t.to(torch.promote_types(t.dtype, torch.float32))
    if t.numel() and (bool(torch.isnan(t).any()) or t.min() < 0 or t.max() > 1):
        raise ValueError(f"{name} must lie in [0, 1]; got values in [{float(t.min()):.3g}, {float(t.max()):.3g}]")
    return t


def sample_logit_normal(n: int, m: float = 0.0, s: float = 1.0, generator: torch.Generator | None = None,
                        device: str | torch.device | None = None) -> torch.Tensor:
    """``n`` times ``t = sigmoid(m + s * z)``, ``z ~ N(0, 1)``: SD3's logit-normal sampler, ``(n,)`` float32.

    ``m = 0, s = 1`` is what :func:`flow_objective` draws for ``t_sampling="logit_normal"`` (the
    same random numbers: it calls this function). Its density is :func:`logit_normal_density`.
    """
    n = _check_count(n)
    _check_logit_normal(m, s)
    return torch.sigmoid(m + s * torch.randn(n, generator=generator, device=device))


def logit_normal_density(t, m: float = 0.0, s: float = 1.0) -> torch.Tensor:
    """``p(t) = 1 / (s sqrt(2 pi)) * 1 / (t (1 - t)) * exp(-(logit(t) - m)^2 / (2 s^2))`` on [0, 1].

    The density of :func:`sample_logit_normal` (Esser et al. 2024, sec. 3.1): a normal density
    in ``logit(t) = log(t / (1 - t))`` times ``d logit(t) / dt = 1 / (t (1 - t))``. It is 0 at
    ``t = 0`` and ``t = 1`` (the limit).
    """
    _check_logit_normal(m, s)
    t = _unit_interval(t)
    inside = (t > 0) & (t < 1)
    tc = torch.where(inside, t, torch.full_like(t, 0.5))  # keep the log finite at the ends
    logit = torch.log(tc) - torch.log1p(-tc)
    p = torch.exp(-((logit - m) ** 2) / (2 * s**2)) / (s * math.sqrt(2 * math.pi) * tc * (1 - tc))
    return torch.where(inside, p, torch.zeros_like(p))


def _f_mode(u: torch.Tensor, s: float) -> torch.Tensor:
    return 1 - u - s * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)


def mode_sample(n: int, s: float, generator: torch.Generator | None = None,
                device: str | torch.device | None = None) -> torch.Tensor:
    """``n`` times ``t = f_mode(u; s) = 1 - u - s (cos^2(pi u / 2) - 1 + u)``, ``u ~ U(0, 1)``, ``(n,)`` float32.

    SD3's "mode" sampler (Esser et al. 2024, sec. 3.1): ``s = 0`` is uniform; ``s > 0`` piles the
    times up in the middle and ``s < 0`` at the ends, while the density stays positive at both
    ends (heavier tails than the logit-normal's, which vanishes there). ``s`` must lie in
    ``[-1, 2 / (pi - 2)]``, where ``f_mode`` is decreasing. Its density is :func:`mode_density`.
    The same numbers as diffusers' ``compute_density_for_timestep_sampling("mode", ...)``.
    """
    n = _check_count(n)
    _check_mode_scale(s)
    return _f_mode(torch.rand(n, generator=generator, device=device), s)


def mode_density(t, s: float) -> torch.Tensor:
    """The density of :func:`mode_sample`: ``p(t) = 1 / |f_mode'(u)|`` at ``u = f_mode^{-1}(t)``.

    ``f_mode'(u) = -1 - s + s (pi / 2) sin(pi u)``; the inverse is found by bisection (``f_mode``
    is decreasing for the allowed ``s``), in float64. At ``s = 2 / (pi - 2)`` the density is
    infinite at ``t = 1/2``.
    """
    _check_mode_scale(s)
    t = _unit_interval(t).to(torch.float64)
    lo, hi = torch.zeros_like(t), torch.ones_like(t)
    for _ in range(60):  # f_mode(lo) >= t >= f_mode(hi); halve [lo, hi] to float64 resolution
        mid = (lo + hi) / 2
        right = _f_mode(mid, s) > t
        lo, hi = torch.where(right, mid, lo), torch.where(right, hi, mid)
    u = (lo + hi) / 2
    return 1 / (1 + s - s * (math.pi / 2) * torch.sin(math.pi * u))


def flow_sigmas(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The ``num_steps + 1`` sigmas (times) an Euler sampler visits, from 1 down to a final 0.

    Reproduces ``FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift=shift)
    .set_timesteps(num_steps).sigmas`` exactly, float32 rounding included: the training grid
    ``k / T`` (k = T..1) is shifted, its ends ``sigma_max = 1`` and ``sigma_min`` are linearly
    spaced into ``num_steps`` values, those are shifted (again), and a terminal 0 is appended.
    The scheduler's ``timesteps`` (what the network is given) are ``sigmas[:-1] * T``.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int; got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be positive; got {shift!r}")
    T = num_train_timesteps
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"num_train_timesteps must be a positive int; got {T!r}")
    train = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()) / T  # (T,) float32, 1 .. 1/T
    train = shift_sigmas(train, shift)
    sigma_max, sigma_min = train[0].item(), train[-1].item()
    sigmas = np.linspace(sigma_max * T, sigma_min * T, num_steps) / T  # float64, as diffusers
    sigmas = torch.from_numpy(shift_sigmas(sigmas, float(shift))).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])  # (num_steps + 1,)


def flow_objective(
    t_sampling: str = "uniform",
    timestep_scale: float = 1000.0,
    cond_dropout: float = 0.0,
    null_cond: dict[str, torch.Tensor] | None = None,
    forward: Callable | None = None,
    **cond_keys,
) -> Callable:
    """The conditional flow-matching loss as a function ``loss(model, batch)`` for :func:`helpers.training.train`.

    For each example: draw t (``"uniform"`` on [0, 1], or ``"logit_normal"``: ``sigmoid(N(0, 1))``,
    SD3's choice, which favours the middle times) and noise ~ N(0, I), form
    ``x_t = (1 - t) x0 + t noise`` and regress the network's output on ``v = noise - x0``:
    ``|| v_theta(x_t, t) - (noise - x0) ||^2`` (Lipman et al. 2023, eq. 23, in our time convention).

    The network is called ``forward(model, xt, t * timestep_scale, **cond)``; the default
    ``forward`` is :func:`helpers.diffusion.denoise` (``model(x, t, **cond)``, ``.sample``
    unwrapped), so ``UNet2DModel`` and ``DiTTransformer2DModel`` work as they are; models with
    other signatures (``SD3Transformer2DModel``) pass their own. ``batch``, ``cond_keys``
    (position of an extra -> keyword), ``cond_dropout`` and ``null_cond`` work as in
    :func:`helpers.training.diffusion_objective`.
    """
    if t_sampling not in T_SAMPLINGS:
        raise ValueError(f"t_sampling must be one of {T_SAMPLINGS}; got {t_sampling!r}")
    if not timestep_scale > 0:
        raise ValueError(f"timestep_scale must be positive; got {timestep_scale!r}")
    from helpers.training import conditioned_batches  # training imports diffusion; keep flow light

    split = conditioned_batches(cond_dropout, null_cond, **cond_keys)
    if forward is not None and not callable(forward):
        raise ValueError(f"forward must be callable as forward(model, xt, timestep, **cond); got {forward!r}")
    forward = denoise if forward is None else forward

    def loss(model, batch) -> torch.Tensor:
        x0, cond = split(batch)
        if t_sampling == "uniform":
            t = torch.rand(len(x0), device=x0.device)
        else:
            t = sample_logit_normal(len(x0), device=x0.device)  # sigmoid(N(0, 1)): the same draws as before
        noise = torch.randn_like(x0)
        xt = flow_interpolate(x0, noise, t)
        out = forward(model, xt, t * timestep_scale, **cond)
        out = out.sample if hasattr(out, "sample") else out
        return torch.nn.functional.mse_loss(out, flow_velocity(x0, noise))

    return loss


@torch.no_grad()
def flow_euler_sample(
    model,
    noise: torch.Tensor,
    num_steps: int,
    timestep_scale: float = 1000.0,
    shift: float = 1.0,
    forward: Callable | None = None,
    guidance_scale: float | None = None,
    null_cond: dict[str, torch.Tensor] | None = None,
    callback: Callable | None = None,
    **cond,
) -> torch.Tensor:
    """Integrate ``dx/dt = v_theta(x, t)`` from ``noise`` (t = 1) to a sample (t = 0) with Euler steps.

    ``x <- x + (sigma_next - sigma) * v_theta(x, sigma * timestep_scale)`` over :func:`flow_sigmas`
    (``num_steps``, ``shift``): the same images as a loop over
    ``FlowMatchEulerDiscreteScheduler(shift=shift).step`` (``tests/test_flow.py``). With
    ``guidance_scale`` the velocity is :func:`helpers.diffusion.classifier_free_guidance` of the
    unconditional (``null_cond``, one null value per keyword, broadcast to the batch) and the
    conditional predictions. ``callback(i, sigma, x)`` sees the state before each step (for
    trajectories).
    """
    if not isinstance(noise, torch.Tensor):
        raise ValueError(f"noise must be a tensor (the starting point at t = 1); got {type(noise).__name__}")
    if not timestep_scale > 0:
        raise ValueError(f"timestep_scale must be positive; got {timestep_scale!r}")
    if guidance_scale is not None and set(null_cond or {}) != set(cond):
        raise ValueError(f"guidance_scale needs null_cond with a null value for each of {sorted(cond)}; "
                         f"got {sorted(null_cond or {})}")
    if forward is not None and not callable(forward):
        raise ValueError(f"forward must be callable as forward(model, x, timestep, **cond); got {forward!r}")
    forward = denoise if forward is None else forward
    sigmas = flow_sigmas(num_steps, shift).to(noise.device)  # (num_steps + 1,) float32, 1 -> 0
    uncond = {}
    if guidance_scale is not None:
        for name, value in cond.items():
            null = torch.as_tensor(null_cond[name], device=value.device, dtype=value.dtype)
            uncond[name] = null.expand_as(value) if null.ndim <= value.ndim else null
    x = noise
    for i in range(num_steps):
        if callback is not None:
            callback(i, sigmas[i].item(), x)
        t = (sigmas[i] * timestep_scale).expand(len(x))  # (B,): what the network is given
        v = _output(forward(model, x, t, **cond))
        if guidance_scale is not None:
            v = classifier_free_guidance(_output(forward(model, x, t, **uncond)), v, guidance_scale)
        x = x + (sigmas[i + 1] - sigmas[i]) * v  # Euler: dt < 0, towards the data
    if callback is not None:
        callback(num_steps, 0.0, x)
    return x


def _output(out):
    return out.sample if hasattr(out, "sample") else out
