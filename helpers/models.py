"""Small model factories: diffusers and transformers classes built from configs, random weights.

Each factory returns a real library model (so ``save_pretrained`` / ``from_pretrained`` and the
diffusers pipelines work) sized for two CPU cores; pass bigger widths on a GPU.
"""

from __future__ import annotations

from diffusers import UNet2DModel

__all__ = ["count_parameters", "digits_unet"]


def count_parameters(model, trainable_only: bool = False) -> int:
    """Number of parameters (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def digits_unet(
    size: int = 8,
    in_channels: int = 1,
    widths: tuple[int, ...] = (32, 64, 64),
    attention: bool = True,
    layers_per_block: int = 1,
) -> UNet2DModel:
    """A ``UNet2DModel`` for small images: one level per width, self-attention at the middle level.

    With the defaults (8x8 digits: 8 -> 4 -> 2 pixels) it has about 1.1 M parameters.
    """
    if len(widths) < 2 or any(w % 8 for w in widths):
        raise ValueError(f"widths must have >= 2 entries, each a multiple of 8; got {widths}")
    if size % 2 ** (len(widths) - 1):
        raise ValueError(f"size={size} must be divisible by 2**(len(widths)-1)={2 ** (len(widths) - 1)}")
    down = ["DownBlock2D"] * len(widths)
    if attention:
        down[len(widths) // 2] = "AttnDownBlock2D"
    up = [{"DownBlock2D": "UpBlock2D", "AttnDownBlock2D": "AttnUpBlock2D"}[b] for b in reversed(down)]
    return UNet2DModel(
        sample_size=size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=tuple(widths),
        layers_per_block=layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=8,
        attention_head_dim=16,
    )
