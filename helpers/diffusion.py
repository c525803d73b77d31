"""The forward process in closed form and one step at a time (DDPM, Ho et al. 2020).

Larger ``t`` is noisier; ``t`` is an integer in ``[0, T)`` indexing ``alpha_bar``.
Later chapters add the reverse process, DDIM, guidance and flow matching here.
"""

from __future__ import annotations

import torch

from helpers.core import append_dims

__all__ = ["q_sample", "q_step"]


def _as_tensor_like(value, ref: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=ref.dtype, device=ref.device)


def q_sample(
    x0: torch.Tensor,
    t: torch.Tensor | int,
    eps: torch.Tensor,
    alpha_bar: torch.Tensor,
) -> torch.Tensor:
    """Sample ``q(x_t | x_0)`` in closed form (DDPM eq. 4):

    ``xt = sqrt(alpha_bar[t]) * x0 + sqrt(1 - alpha_bar[t]) * eps``.

    ``t`` is one integer for the whole batch or a ``(B,)`` tensor of integers, one per sample;
    ``alpha_bar`` is the schedule's ``(T,)`` tensor. Equal to ``DDPMScheduler.add_noise``.
    """
    if x0.shape != eps.shape:
        raise ValueError(f"x0 and eps must have the same shape; got {tuple(x0.shape)} and {tuple(eps.shape)}")
    alpha_bar = _as_tensor_like(alpha_bar, x0)
    t = torch.as_tensor(t, device=x0.device)
    if t.dtype.is_floating_point:
        raise ValueError(f"t must hold integer timesteps; got dtype {t.dtype}")
    if t.numel() and (t.min() < 0 or t.max() >= len(alpha_bar)):
        raise ValueError(f"t must lie in [0, {len(alpha_bar)}); got values in [{int(t.min())}, {int(t.max())}]")
    if t.ndim == 1 and len(t) != len(x0):
        raise ValueError(f"t has {len(t)} entries but the batch has {len(x0)} samples")
    ab = alpha_bar[t]  # () or (B,)
    if ab.ndim == 1:
        ab = append_dims(ab, x0.ndim)  # (B, 1, 1, 1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def q_step(x_prev: torch.Tensor, beta_t: float | torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """One forward step ``q(x_t | x_{t-1})`` (DDPM eq. 2):

    ``xt = sqrt(1 - beta_t) * x_prev + sqrt(beta_t) * eps``.
    """
    if x_prev.shape != eps.shape:
        raise ValueError(
            f"x_prev and eps must have the same shape; got {tuple(x_prev.shape)} and {tuple(eps.shape)}"
        )
    beta_t = _as_tensor_like(beta_t, x_prev)
    if torch.any((beta_t <= 0) | (beta_t > 1)):
        raise ValueError("beta_t must lie in (0, 1]")
    if beta_t.ndim == 1:
        beta_t = append_dims(beta_t, x_prev.ndim)
    return (1 - beta_t).sqrt() * x_prev + beta_t.sqrt() * eps
