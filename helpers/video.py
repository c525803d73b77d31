"""Video diffusion: spacetime patches, temporal attention, a tiny video U-Net and clip metrics.

A clip is a tensor ``(B, F, C, H, W)``: F frames of images in ``[-1, 1]`` (what
:func:`helpers.data.make_clips` returns). diffusers' video U-Net wants the channels first,
``(B, C, F, H, W)``; :func:`to_unet` and :func:`from_unet` swap the two axes.

* :func:`temporal_attention` is self-attention over the frame axis at each spatial position
  (the "temporal" half of factorised space-time attention, as in ``TransformerTemporalModel``).
* :func:`spacetime_tokens` and :func:`attention_pairs` are the cost arithmetic of Sora-style
  spacetime patches and of full vs factorised attention.
* :func:`frame_change`, :func:`centroids` and :func:`colour_spread` measure temporal
  consistency and motion of clips of one coloured shape on a black background.
* :func:`video_unet` builds a tiny ``UNet3DConditionModel``; :func:`inflate_unet` builds one
  from a trained image ``UNet2DConditionModel`` (its spatial weights copied, its temporal
  layers starting as the identity); :func:`sample_clips` samples it with a diffusers
  scheduler and classifier-free guidance.
"""

from __future__ import annotations

import math

import torch

from helpers.diffusion import classifier_free_guidance

__all__ = [
    "attention_pairs",
    "centroids",
    "colour_spread",
    "frame_change",
    "from_frame_tokens",
    "from_unet",
    "inflate_unet",
    "sample_clips",
    "spacetime_tokens",
    "temporal_attention",
    "to_frame_tokens",
    "to_unet",
    "video_unet",
]


def _check_clips(x: torch.Tensor, name: str = "videos") -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 5:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be clips (B, F, C, H, W); got {shape}")


def to_unet(videos: torch.Tensor) -> torch.Tensor:
    """``(B, F, C, H, W)`` -> ``(B, C, F, H, W)``, the layout of ``UNet3DConditionModel``."""
    _check_clips(videos)
    return videos.permute(0, 2, 1, 3, 4)


def from_unet(sample: torch.Tensor) -> torch.Tensor:
    """``(B, C, F, H, W)`` -> ``(B, F, C, H, W)``."""
    _check_clips(sample, "sample")
    return sample.permute(0, 2, 1, 3, 4)


# --- temporal attention ---------------------------------------------------------------------


def to_frame_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, F, C, H, W)`` -> ``(B*H*W, F, C)``: one sequence of F tokens per pixel position."""
    _check_clips(x, "x")
    B, F, C, H, W = x.shape
    return x.permute(0, 3, 4, 1, 2).reshape(B * H * W, F, C)  # (B, H, W, F, C) -> (BHW, F, C)


def from_frame_tokens(tokens: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`to_frame_tokens`: ``(B*H*W, F, C)`` -> ``(B, F, C, H, W)``."""
    if tokens.ndim != 3 or tokens.shape[0] != batch * height * width:
        raise ValueError(f"tokens must be (B*H*W, F, C) = ({batch * height * width}, F, C); got {tuple(tokens.shape)}")
    _, F, C = tokens.shape
    return tokens.reshape(batch, height, width, F, C).permute(0, 3, 4, 1, 2)


def temporal_attention(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    w_out: torch.Tensor,
    b_out: torch.Tensor | None = None,
    heads: int = 1,
) -> torch.Tensor:
    """Multi-head self-attention over the frame axis, separately at every pixel position.

    ``x`` is ``(B, F, C, H, W)``; the weights are ``nn.Linear``-style ``(out, in)`` matrices
    (``w_q, w_k, w_v``: ``(D, C)``, ``w_out``: ``(C, D)``). Each position's F tokens attend to
    each other, ``softmax(Q K^T / sqrt(d)) V`` per head (Vaswani et al. 2017, eq. 1) with
    ``d = D / heads``, and never to another position: the temporal layer of factorised
    space-time attention (Ho et al. 2022, *Video Diffusion Models*). Returns ``(B, F, C, H, W)``.
    """
    _check_clips(x, "x")
    B, F, C, H, W = x.shape
    D = w_q.shape[0]
    if w_q.shape != (D, C) or w_k.shape != (D, C) or w_v.shape != (D, C) or w_out.shape != (C, D):
        raise ValueError(f"need w_q, w_k, w_v of shape (D, {C}) and w_out of shape ({C}, D); got "
                         f"{tuple(w_q.shape)}, {tuple(w_k.shape)}, {tuple(w_v.shape)}, {tuple(w_out.shape)}")
    if not isinstance(heads, int) or heads < 1 or D % heads:
        raise ValueError(f"heads must be a positive int dividing D={D}; got {heads!r}")
    tokens = to_frame_tokens(x)  # (BHW, F, C)
    d = D // heads
    q, k, v = (  # (BHW, heads, F, d)
        (tokens @ w.T).reshape(-1, F, heads, d).transpose(1, 2) for w in (w_q, w_k, w_v)
    )
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # (BHW, heads, F, F)
    out = (weights @ v).transpose(1, 2).reshape(-1, F, D) @ w_out.T  # (BHW, F, C)
    if b_out is not None:
        out = out + b_out
    return from_frame_tokens(out, B, H, W)


# --- cost arithmetic ------------------------------------------------------------------------


def spacetime_tokens(frames: int, height: int, width: int, patch: tuple[int, int, int] = (1, 2, 2)) -> int:
    """Number of spacetime patches ``(F / pt) * (H / ph) * (W / pw)`` of a (latent) clip.

    ``patch = (pt, ph, pw)``; each size must divide the clip's: Sora-style models cut the
    latent video into such boxes and treat each as one transformer token.
    """
    dims, names = (frames, height, width), ("frames", "height", "width")
    if len(patch) != 3 or any(not isinstance(p, int) or p < 1 for p in patch):
        raise ValueError(f"patch must be three positive ints (pt, ph, pw); got {patch!r}")
    for size, p, name in zip(dims, patch, names):
        if not isinstance(size, int) or size < 1 or size % p:
            raise ValueError(f"{name}={size!r} must be a positive int divisible by its patch size {p}")
    return (frames // patch[0]) * (height // patch[1]) * (width // patch[2])


def attention_pairs(frames: int, positions: int) -> dict[str, int]:
    """Query-key pairs one attention layer scores, for ``frames`` x ``positions`` tokens.

    * ``full``: every token with every token, ``(F S)^2``;
    * ``spatial``: within each frame, ``F S^2``; ``temporal``: within each position, ``S F^2``;
    * ``factorised``: a spatial layer then a temporal layer, ``F S^2 + S F^2``.
    """
    if not isinstance(frames, int) or not isinstance(positions, int) or frames < 1 or positions < 1:
        raise ValueError(f"frames and positions must be positive ints; got {frames!r}, {positions!r}")
    spatial, temporal = frames * positions**2, positions * frames**2
    return {"full": (frames * positions) ** 2, "spatial": spatial, "temporal": temporal,
            "factorised": spatial + temporal}


# --- temporal consistency metrics -----------------------------------------------------------


def frame_change(videos: torch.Tensor) -> torch.Tensor:
    """Mean absolute change between consecutive frames, one value per clip: ``mean |x_{f+1} - x_f|``.

    ``videos`` is ``(B, F, C, H, W)``; the mean runs over the F - 1 pairs and all values. A
    static clip scores 0; flicker and motion both raise it.
    """
    _check_clips(videos)
    if videos.shape[1] < 2:
        raise ValueError(f"videos need at least 2 frames; got {videos.shape[1]}")
    return (videos[:, 1:] - videos[:, :-1]).abs().flatten(1).mean(1)


def _foreground(videos: torch.Tensor, threshold: float) -> torch.Tensor:
    # A pixel belongs to the shape when its brightest channel rises above the threshold
    # (the background is black, -1; every course colour has a channel >= 0.8 in [0, 1]).
    return (videos.amax(2) > threshold).float()  # (B, F, H, W)


def centroids(videos: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """The centre of mass (x, y) in pixels of each frame's foreground, ``(B, F, 2)``.

    Foreground: pixels whose brightest channel exceeds ``threshold`` (videos in ``[-1, 1]`` on
    a black background). A frame with no foreground gives NaN.
    """
    _check_clips(videos)
    mask = _foreground(videos, threshold)
    H, W = mask.shape[-2:]
    ys = torch.arange(H, dtype=mask.dtype, device=mask.device) + 0.5
    xs = torch.arange(W, dtype=mask.dtype, device=mask.device) + 0.5
    area = mask.sum((-1, -2))
    cx = (mask * xs).sum((-1, -2)) / area
    cy = (mask * ys[:, None]).sum((-1, -2)) / area
    return torch.stack([cx, cy], -1)


def colour_spread(videos: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """How much the shape's colour varies across frames, one value per clip.

    The mean RGB of each frame's foreground (in ``[-1, 1]``), then the standard deviation of
    that colour over frames, averaged over the three channels: 0 for a shape that keeps its
    colour. Frames with no foreground are skipped.
    """
    _check_clips(videos)
    mask = _foreground(videos, threshold)[:, :, None]  # (B, F, 1, H, W)
    area = mask.sum((-1, -2))  # (B, F, 1)
    colour = (videos * mask).sum((-1, -2)) / area.clamp(min=1)  # (B, F, C)
    seen = (area > 0).float()  # (B, F, 1)
    n = seen.sum(1).clamp(min=2)  # (B, 1)
    mean = (colour * seen).sum(1) / n
    var = ((colour - mean[:, None]) ** 2 * seen).sum(1) / (n - 1)  # unbiased, over the frames seen
    return var.sqrt().mean(-1)


# --- the model and its sampler --------------------------------------------------------------


def video_unet(
    in_channels: int = 4,
    size: int = 8,
    widths: tuple[int, ...] = (16, 32),
    cross_attention_dim: int = 64,
    heads: int = 4,
    norm_num_groups: int = 8,
):
    """A tiny ``diffusers.UNet3DConditionModel`` (ModelScope text-to-video's U-Net, in miniature).

    Input ``(B, C, F, H, W)``. Every resnet has a temporal convolution over frames, the top has
    a temporal transformer (``transformer_in``), and the middle block attends to the text
    (``encoder_hidden_states``, here the tiny CLIP's 64-d states) and over frames. The plain
    ``DownBlock3D``/``UpBlock3D`` levels keep a CPU step cheap; add ``CrossAttn...Block3D``
    levels on a GPU. (``heads`` is diffusers' ``attention_head_dim``, which this class reads
    as the number of heads.)
    """
    from diffusers import UNet3DConditionModel

    if len(widths) < 2 or any(w % norm_num_groups for w in widths):
        raise ValueError(f"widths must have >= 2 entries, each a multiple of norm_num_groups={norm_num_groups}; got {widths}")
    if size % 2 ** (len(widths) - 1):
        raise ValueError(f"size={size} must be divisible by 2**(len(widths)-1)={2 ** (len(widths) - 1)}")
    return UNet3DConditionModel(
        sample_size=size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=tuple(widths),
        down_block_types=("DownBlock3D",) * len(widths),
        up_block_types=("UpBlock3D",) * len(widths),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=heads,
        norm_num_groups=norm_num_groups,
    )


def inflate_unet(unet2d):
    """A ``UNet3DConditionModel`` whose spatial layers are a trained ``UNet2DConditionModel``'s.

    The recipe of Make-A-Video, Video LDM and AnimateDiff: keep the image model, add temporal
    layers. The 3-D U-Net is built with the image U-Net's widths and blocks; every weight they
    share is copied (1x1 convolution projections reshaped to the linear ones), and the output
    of every new temporal layer starts at zero (diffusers already zeroes the last temporal
    convolution; we zero the temporal transformers' ``proj_out``), so each temporal block is
    the identity and the untrained video U-Net denoises every frame on its own, as the image
    model does. What is *not* carried over: an ``addition_embed_type`` (e.g. the pooled text
    added to the time embedding), which the 3-D class lacks. Returns ``(unet3d, copied)``,
    ``copied`` being the names of the weights taken from the image model.
    """
    from diffusers import UNet3DConditionModel

    c = unet2d.config
    kinds = {"DownBlock2D": "DownBlock3D", "CrossAttnDownBlock2D": "CrossAttnDownBlock3D",
             "UpBlock2D": "UpBlock3D", "CrossAttnUpBlock2D": "CrossAttnUpBlock3D"}
    if any(b not in kinds for b in (*c.down_block_types, *c.up_block_types)):
        raise ValueError(f"unet2d must use only {sorted(kinds)} blocks; got {c.down_block_types}, {c.up_block_types}")
    if not isinstance(c.layers_per_block, int) or c.num_attention_heads is not None:
        raise ValueError("unet2d must have one int layers_per_block and set heads via attention_head_dim")
    # diffusers' naming knot: the 2-D U-Net reads ``attention_head_dim`` as the number of heads
    # of its spatial transformers, the 3-D one as their head size. Same heads = width / heads2d.
    widths = [w for w, b in zip(c.block_out_channels, c.down_block_types) if "CrossAttn" in b]
    head_dims = {w // c.attention_head_dim for w in widths + [c.block_out_channels[-1]]}
    if not isinstance(c.attention_head_dim, int) or len(head_dims) != 1:
        raise ValueError(f"unet2d's attention levels must share one head size; got widths {widths} "
                         f"with attention_head_dim={c.attention_head_dim}")
    head_dim = head_dims.pop()
    unet3d = UNet3DConditionModel(
        sample_size=c.sample_size, in_channels=c.in_channels, out_channels=c.out_channels,
        block_out_channels=tuple(c.block_out_channels),
        down_block_types=tuple(kinds[b] for b in c.down_block_types),
        up_block_types=tuple(kinds[b] for b in c.up_block_types),
        layers_per_block=c.layers_per_block, cross_attention_dim=c.cross_attention_dim,
        attention_head_dim=head_dim, norm_num_groups=c.norm_num_groups, norm_eps=c.norm_eps,
    )
    target = unet3d.state_dict()
    copied = {k: v.reshape(target[k].shape) for k, v in unet2d.state_dict().items()
              if k in target and v.numel() == target[k].numel()}
    unet3d.load_state_dict(copied, strict=False)
    for module in unet3d.modules():
        if type(module).__name__ == "TransformerTemporalModel":
            torch.nn.init.zeros_(module.proj_out.weight)
            torch.nn.init.zeros_(module.proj_out.bias)
    return unet3d, sorted(copied)


@torch.no_grad()
def sample_clips(
    unet,
    scheduler,
    states: torch.Tensor,
    null_states: torch.Tensor | None = None,
    frames: int = 8,
    guidance_scale: float = 1.0,
    num_inference_steps: int = 20,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample ``len(states)`` clips ``(B, C, F, H, W)`` from a video U-Net with a diffusers scheduler.

    ``states`` are the per-clip text states ``(B, L, D)``; with ``guidance_scale != 1`` the
    null states ``(L, D)`` give the unconditional half of classifier-free guidance (batched, as
    diffusers' pipelines do). The initial noise is drawn on the CPU from ``generator``.
    """
    if states.ndim != 3:
        raise ValueError(f"states must be (B, L, D); got {tuple(states.shape)}")
    if guidance_scale != 1 and null_states is None:
        raise ValueError("guidance_scale != 1 needs null_states")
    device = states.device
    B, size = len(states), unet.config.sample_size
    x = torch.randn((B, unet.config.in_channels, frames, size, size), generator=generator).to(device)
    x = x * scheduler.init_noise_sigma
    scheduler.set_timesteps(num_inference_steps, device=device)
    guided = guidance_scale != 1
    cond = torch.cat([null_states.expand_as(states), states]) if guided else states
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
        out = unet(x_in, t, encoder_hidden_states=cond).sample
        if guided:
            uncond, text = out.chunk(2)
            out = classifier_free_guidance(uncond, text, guidance_scale)
        x = scheduler.step(out, t, x).prev_sample
    return x
