"""Small model factories: diffusers and transformers classes built from configs, random weights.

Each factory returns a real library model (so ``save_pretrained`` / ``from_pretrained`` and the
diffusers pipelines work) sized for two CPU cores; pass bigger widths on a GPU.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel

__all__ = ["count_parameters", "digits_unet", "shapes_unet", "shapes_vae"]


def count_parameters(model, trainable_only: bool = False) -> int:
    """Number of parameters (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def digits_unet(
    size: int = 8,
    in_channels: int = 1,
    widths: tuple[int, ...] = (32, 64, 64),
    attention: bool = True,
    layers_per_block: int = 1,
    num_class_embeds: int | None = None,
) -> UNet2DModel:
    """A ``UNet2DModel`` for small images: one level per width, self-attention at the middle level.

    With the defaults (8x8 digits: 8 -> 4 -> 2 pixels) it has about 1.1 M parameters.
    ``num_class_embeds`` adds a learned class embedding to the time embedding (class
    conditioning; chapter 4 uses 11: the ten digits and a "null" class for guidance).
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
        num_class_embeds=num_class_embeds,
    )


def shapes_unet(
    in_channels: int = 4,
    size: int = 8,
    widths: tuple[int, ...] = (32, 64),
    cross_attention_dim: int = 64,
    layers_per_block: int = 1,
    head_dim: int = 16,
) -> UNet2DConditionModel:
    """Stable Diffusion's ``UNet2DConditionModel`` in miniature.

    The defaults denoise the 4 x 8 x 8 latents of :func:`shapes_vae` and read the tiny CLIP's
    64-dimensional text states (``helpers.text``), as SD's U-Net reads CLIP's 768. Like SD's
    (whose last level has none), it cross-attends to the text only below the top level: here
    at 4 x 4 and in the middle block, which halves the cost of a step on a CPU.
    """
    if len(widths) < 2 or any(w % 16 for w in widths):
        raise ValueError(f"widths must have >= 2 entries, each a multiple of 16; got {widths}")
    if size % 2 ** (len(widths) - 1):
        raise ValueError(f"size={size} must be divisible by 2**(len(widths)-1)={2 ** (len(widths) - 1)}")
    return UNet2DConditionModel(
        sample_size=size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=tuple(widths),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(widths) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(widths) - 1) + ("UpBlock2D",),
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=head_dim,
        norm_num_groups=16,
        addition_embed_type="text",  # the attention-pooled text is also added to the time embedding
        addition_embed_type_num_heads=4,
    )


def shapes_vae(
    widths: tuple[int, ...] = (16, 32, 32),
    latent_channels: int = 4,
    size: int = 32,
    layers_per_block: int = 1,
) -> AutoencoderKL:
    """Stable Diffusion's ``AutoencoderKL`` in miniature: ``len(widths) - 1`` halvings.

    With the defaults a 3 x 32 x 32 image becomes a 4 x 8 x 8 latent (12x fewer values; SD's
    3 x 512 x 512 -> 4 x 64 x 64 is 48x). It is fully convolutional, so a 128 x 128 photograph
    encodes to 4 x 32 x 32.
    """
    if any(w % 16 for w in widths):
        raise ValueError(f"widths must be multiples of 16; got {widths}")
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=tuple(widths),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=16,
        sample_size=size,
        mid_block_add_attention=False,  # purely convolutional: trains on crops, encodes any size
    )
