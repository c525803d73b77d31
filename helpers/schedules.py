"""Noise schedules: betas, alpha, alpha-bar and the signal-to-noise ratio.

Conventions (see the package docstring): integer time ``t`` in ``[0, T)``, larger ``t``
noisier, ``alpha_bar[t] = prod_{s <= t} (1 - beta[s])`` -- the same indexing as
``diffusers.DDPMScheduler``, whose ``betas`` and ``alphas_cumprod`` these functions
reproduce exactly (``tests/test_schedules.py``).

=====================  ==========================  ======================================
our name               diffusers ``beta_schedule``  source
=====================  ==========================  ======================================
``"linear"``           ``"linear"``                Ho et al. 2020 (DDPM), 1e-4 .. 0.02
``"scaled_linear"``    ``"scaled_linear"``         Stable Diffusion: sqrt(beta) linear
``"cosine"``           ``"squaredcos_cap_v2"``     Nichol & Dhariwal 2021, eq. 17
=====================  ==========================  ======================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "SCHEDULES",
    "Schedule",
    "alpha_bar_from_betas",
    "cosine_betas",
    "unevenness",
    "first_step_below",
    "get_schedule",
    "linear_betas",
    "scaled_linear_betas",
    "snr",
    "snr_db",
]


def _check_T(T: int) -> None:
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise ValueError(f"T (the number of diffusion steps) must be a positive int; got {T!r}")


def _check_range(beta_start: float, beta_end: float) -> None:
    if not (0 < beta_start < 1 and 0 < beta_end < 1):
        raise ValueError(
            f"beta_start and beta_end must lie in (0, 1); got {beta_start!r}, {beta_end!r}"
        )


def linear_betas(
    T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, dtype=torch.float32
) -> torch.Tensor:
    """DDPM's linear schedule: ``T`` betas evenly spaced from ``beta_start`` to ``beta_end``."""
    _check_T(T)
    _check_range(beta_start, beta_end)
    return torch.linspace(beta_start, beta_end, T, dtype=dtype)


def scaled_linear_betas(
    T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012, dtype=torch.float32
) -> torch.Tensor:
    """Stable Diffusion's schedule: ``sqrt(beta)`` is linear, so ``beta`` is a parabola.

    (Some notes say "beta squared is linearly spaced"; it is the square *root* that is.)
    """
    _check_T(T)
    _check_range(beta_start, beta_end)
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=dtype) ** 2


def cosine_betas(
    T: int = 1000, s: float = 0.008, max_beta: float = 0.999, dtype=torch.float32
) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule (Improved DDPM, eq. 17).

    ``f(u) = cos((u + s) / (1 + s) * pi / 2) ** 2`` and
    ``beta[t] = min(1 - f((t + 1) / T) / f(t / T), max_beta)``, so that
    ``alpha_bar[t] = f((t + 1) / T) / f(0)`` wherever the cap does not bite.
    The cap (0.999) keeps the last step from destroying the signal with ``beta = 1``.
    """
    _check_T(T)
    if not 0 < max_beta <= 1:
        raise ValueError(f"max_beta must lie in (0, 1]; got {max_beta!r}")
    if s < 0:
        raise ValueError(f"s (the cosine offset) must be >= 0; got {s!r}")

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - f((t + 1) / T) / f(t / T), max_beta) for t in range(T)]
    return torch.tensor(betas, dtype=dtype)


SCHEDULES = {
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
    "cosine": cosine_betas,
}


def alpha_bar_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """``alpha_bar[t] = prod_{s <= t} (1 - beta[s])``: the signal fraction left at step t."""
    betas = torch.as_tensor(betas)
    if betas.ndim != 1:
        raise ValueError(f"betas must be 1-D (one value per step); got shape {tuple(betas.shape)}")
    if not torch.all((betas > 0) & (betas <= 1)):
        raise ValueError("betas must lie in (0, 1]")
    return torch.cumprod(1 - betas, dim=0)


def unevenness(x: torch.Tensor) -> float:
    """How far ``x`` is from evenly spaced values between its ends, as a fraction of its range.

    0 for ``linspace``; scale-free, so tiny sequences (``beta**2``) cannot look even by being small.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"x must be a 1-D tensor of at least 2 values; got {getattr(x, 'shape', type(x))}")
    x = x.double()
    if x[-1] == x[0]:
        raise ValueError("x must have different first and last values (its range is 0)")
    even = torch.linspace(x[0].item(), x[-1].item(), len(x), dtype=torch.float64)
    return ((x - even).abs().max() / (x[-1] - x[0]).abs()).item()


def snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``alpha_bar / (1 - alpha_bar)`` of ``xt`` (Kingma et al. 2021)."""
    alpha_bar = torch.as_tensor(alpha_bar)
    return alpha_bar / (1 - alpha_bar)


def snr_db(alpha_bar: torch.Tensor) -> torch.Tensor:
    """SNR in decibels, ``10 log10(SNR)``: 0 dB is where signal and noise variances are equal."""
    return 10 * torch.log10(snr(alpha_bar))


def first_step_below(values: torch.Tensor, threshold: float) -> int:
    """The smallest ``t`` with ``values[t] < threshold`` (0-indexed), e.g. where alpha-bar < 0.01.

    Raises ``ValueError`` if no value falls below the threshold.
    """
    values = torch.as_tensor(values)
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D; got shape {tuple(values.shape)}")
    below = torch.nonzero(values < threshold)
    if len(below) == 0:
        raise ValueError(
            f"no value falls below threshold={threshold}; the minimum is {values.min().item():.4g}"
        )
    return int(below[0])


@dataclass(frozen=True)
class Schedule:
    """A noise schedule and everything derived from it, indexed by ``t`` in ``[0, T)``."""

    name: str
    betas: torch.Tensor  # (T,)
    alphas: torch.Tensor  # (T,)  1 - betas
    alpha_bar: torch.Tensor  # (T,)  cumulative product of alphas

    @property
    def T(self) -> int:
        return len(self.betas)

    @property
    def snr(self) -> torch.Tensor:
        return snr(self.alpha_bar)

    def to(self, device: torch.device | str) -> "Schedule":
        """The same schedule with its tensors on ``device``."""
        return Schedule(
            self.name, self.betas.to(device), self.alphas.to(device), self.alpha_bar.to(device)
        )


def get_schedule(name: str = "linear", T: int = 1000, dtype=torch.float32, **kwargs) -> Schedule:
    """Build a :class:`Schedule` by name: ``"linear"``, ``"scaled_linear"`` or ``"cosine"``.

    Extra keyword arguments go to the betas function (e.g. ``beta_end=0.01``).
    """
    if name not in SCHEDULES:
        raise ValueError(f"name must be one of {sorted(SCHEDULES)}; got {name!r}")
    betas = SCHEDULES[name](T, dtype=dtype, **kwargs)
    return Schedule(name, betas, 1 - betas, alpha_bar_from_betas(betas))
