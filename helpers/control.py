"""Controlling a trained text-to-image model: ControlNet on edge maps, LoRA, and new concepts (chapter 8).

* :func:`canny_edges` -- Canny edge maps of images, the control signal of a "canny" ControlNet.
* :func:`edge_agreement` -- precision, recall and F1 of two edge maps with a pixel tolerance.
* :func:`controlnet_from_unet` -- ``diffusers.ControlNetModel.from_unet`` plus the one setting it
  forgets to copy, so the copy's encoder computes exactly what the U-Net's does.
* :func:`controlnet_objective` -- the diffusion loss of a trainable ControlNet beside a frozen
  U-Net (Zhang et al. 2023): the same target as the base model, the control as an extra input.
* :func:`recolour` -- redraw shapes in a new colour from their masks (a concept to teach a LoRA).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from helpers.core import append_dims
from helpers.diffusion import diffusion_loss, q_sample

__all__ = ["canny_edges", "controlnet_from_unet", "controlnet_objective", "edge_agreement", "recolour"]


def canny_edges(images: torch.Tensor, sigma: float = 1.0, low: float | None = None,
                high: float | None = None) -> torch.Tensor:
    """Canny edges (``skimage.feature.canny``) of ``(N, C, H, W)`` images in ``[-1, 1]``.

    Colour images are reduced to their luminance (ITU-R 601 weights) first. ``sigma`` is the
    width of the Gaussian smoothing; ``low``/``high`` are the hysteresis thresholds on the
    gradient magnitude (skimage's defaults when None). Returns ``(N, 1, H, W)`` in ``{0, 1}``
    (float32): 1 on an edge.
    """
    from skimage.feature import canny

    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor (N, 1 or 3, H, W); got {shape}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive; got {sigma}")
    x = (images.detach().float().cpu().clamp(-1, 1) + 1) / 2  # [0, 1]
    if x.shape[1] == 3:
        x = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]  # (N, 1, H, W) luminance
    edges = [canny(image[0].numpy(), sigma=sigma, low_threshold=low, high_threshold=high) for image in x]
    return torch.from_numpy(np.stack(edges)[:, None].astype(np.float32))


def _dilate(edges: torch.Tensor, tolerance: int) -> torch.Tensor:
    return F.max_pool2d(edges, 2 * tolerance + 1, stride=1, padding=tolerance) if tolerance else edges


def edge_agreement(edges: torch.Tensor, target: torch.Tensor, tolerance: int = 1) -> dict[str, torch.Tensor]:
    """How well edge maps ``edges`` follow ``target`` (both ``(N, 1, H, W)`` in ``{0, 1}``), per image.

    ``precision``: the fraction of ``edges`` pixels within ``tolerance`` pixels (Chebyshev
    distance) of a target edge; ``recall``: the fraction of target pixels within ``tolerance`` of
    an edge in ``edges``; ``f1``: their harmonic mean (0 when either map is empty).
    """
    if edges.shape != target.shape or edges.ndim != 4 or edges.shape[1] != 1:
        raise ValueError(f"edges and target must both be (N, 1, H, W); got {tuple(edges.shape)} and {tuple(target.shape)}")
    if not isinstance(tolerance, int) or tolerance < 0:
        raise ValueError(f"tolerance must be a non-negative int; got {tolerance!r}")
    edges, target = (edges > 0.5).float(), (target > 0.5).float()
    near_target, near_edges = _dilate(target, tolerance), _dilate(edges, tolerance)
    precision = (edges * near_target).sum((1, 2, 3)) / edges.sum((1, 2, 3)).clamp(min=1)
    recall = (target * near_edges).sum((1, 2, 3)) / target.sum((1, 2, 3)).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return {"precision": precision, "recall": recall, "f1": f1}


def controlnet_from_unet(unet, conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 64),
                         conditioning_channels: int = 3):
    """A ``ControlNetModel`` copied from ``unet`` (its encoder and middle block, with zero convolutions out).

    The conditioning embedding halves the control image ``len(conditioning_embedding_out_channels) - 1``
    times: SD's default ``(16, 32, 96, 256)`` maps 512 px to the 64 x 64 latent (f = 8); the
    course's f = 4 VAE needs one halving fewer, ``(16, 32, 64)``: 32 px -> 8 x 8.

    ``ControlNetModel.from_unet`` (diffusers 0.42) does not pass ``addition_embed_type_num_heads``,
    so a U-Net with ``addition_embed_type="text"`` gets a copy whose text pooling splits into 64
    heads instead of the U-Net's: same weights, different function. We set it back.
    """
    from diffusers import ControlNetModel

    if len(conditioning_embedding_out_channels) < 1:
        raise ValueError("conditioning_embedding_out_channels must name at least one width")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
                                           conditioning_channels=conditioning_channels)
    heads = unet.config.get("addition_embed_type_num_heads")
    if getattr(controlnet, "add_embedding", None) is not None and heads is not None:
        pool = controlnet.add_embedding.pool
        pool.num_heads, pool.dim_per_head = heads, pool.positional_embedding.shape[-1] // heads
        controlnet.register_to_config(addition_embed_type_num_heads=heads)
    return controlnet


def controlnet_objective(unet, alpha_bar: torch.Tensor, prediction_type: str = "epsilon",
                         text_dropout: float = 0.0, null_states: torch.Tensor | None = None) -> Callable:
    """The diffusion loss ``loss(controlnet, (x0, states, control))`` for ``helpers.training.train``.

    The frozen ``unet`` predicts as always; the trainable ControlNet reads the same noisy ``xt``,
    ``t`` and text ``states`` plus the ``control`` image and adds its residuals to the U-Net's
    skip connections and middle block. The target is the base model's (eps, x0 or v). With
    ``text_dropout`` the prompt is replaced by ``null_states`` for that fraction of examples, as
    ControlNet's authors do (50 %), so the control alone must carry the layout.
    """
    if not 0 <= text_dropout < 1:
        raise ValueError(f"text_dropout must lie in [0, 1); got {text_dropout}")
    if text_dropout and null_states is None:
        raise ValueError("text_dropout needs null_states (the empty prompt's text states)")
    unet.requires_grad_(False)

    def loss(controlnet, batch) -> torch.Tensor:
        x0, states, control = batch
        if text_dropout:
            drop = torch.rand(len(x0), device=x0.device) < text_dropout
            states = torch.where(append_dims(drop, states.ndim), null_states.to(states).expand_as(states), states)
        ab = alpha_bar.to(x0.device)
        t = torch.randint(0, len(ab), (len(x0),), device=x0.device)
        eps = torch.randn_like(x0)
        xt = q_sample(x0, t, eps, ab)
        down, mid = controlnet(xt, t, encoder_hidden_states=states, controlnet_cond=control, return_dict=False)
        out = unet(xt, t, encoder_hidden_states=states, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid).sample
        return diffusion_loss(out, x0, eps, append_dims(ab[t], x0.ndim), prediction_type)

    return loss


def recolour(masks: torch.Tensor, rgb: tuple[float, float, float],
             background: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> torch.Tensor:
    """Shapes images in ``[-1, 1]`` drawn from ``masks`` ``(N, 1, H, W)`` in colour ``rgb`` (values in [0, 1])."""
    if masks.ndim != 4 or masks.shape[1] != 1:
        raise ValueError(f"masks must be (N, 1, H, W); got {tuple(masks.shape)}")
    if len(rgb) != 3 or not all(0 <= v <= 1 for v in rgb):
        raise ValueError(f"rgb must be three values in [0, 1]; got {rgb}")
    colour = torch.tensor(rgb, dtype=torch.float32)[None, :, None, None]
    back = torch.tensor(background, dtype=torch.float32)[None, :, None, None]
    return (masks * colour + (1 - masks) * back) * 2 - 1
