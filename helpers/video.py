"""Video diffusion: spacetime patches, temporal attention, a tiny video U-Net and clip metrics.

A clip is a tensor ``(B, F, C, H, W)``: F frames of images in ``[-1, 1]`` (what
:func:`helpers.data.make_clips` returns). diffusers' video U-Net wants the channels first,
``(B, C, F, H, W)``; :func:`to_unet` and :func:`from_unet` swap the two axes.

* :func:`temporal_attention` is self-attention over the frame axis at each spatial position
  (the "temporal" half of factorised space-time attention, as in ``TransformerTemporalModel``).
* :func:`spacetime_tokens` and :func:`attention_pairs` are the cost arithmetic of Sora-style
  spacetime patches and of full vs factorised attention.
* :func:`frame_change`, :func:`centroids`, :func:`colour_spread`, :func:`motion` and
  :func:`kept_appearance` measure temporal consistency and motion of clips of one coloured
  shape on a black background.
* :func:`video_unet` builds a tiny ``UNet3DConditionModel``; :func:`inflate_unet` builds one
  from a trained image ``UNet2DConditionModel`` (its spatial weights copied, its temporal
  layers starting as the identity); :func:`sample_clips` samples it with a diffusers
  scheduler and classifier-free guidance.
* :func:`frame_unet`, :func:`frame_pairs`, :func:`frame_objective` and :func:`sample_frames`
  are a frame-conditional video model (MCVD's recipe, Voleti et al. 2022): an image U-Net that
  sees the previous frame as extra input channels, trained on (previous frame, frame) pairs
  with the previous frame masked out for first frames, and sampled frame after frame; given a
  first frame it animates it (image-to-video), given none it starts from the caption
  (text-to-video).
"""

from __future__ import annotations

import math

import torch

from helpers.core import append_dims
from helpers.diffusion import classifier_free_guidance, diffusion_loss, q_sample

__all__ = [
    "attention_pairs",
    "centroids",
    "colour_names",
    "colour_spread",
    "context_frames_of",
    "first_frame_of",
    "frame_change",
    "frame_context",
    "frame_objective",
    "frame_pairs",
    "frame_unet",
    "from_frame_tokens",
    "from_unet",
    "inflate_unet",
    "kept_appearance",
    "motion",
    "sample_clips",
    "sample_frames",
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


def _frame_colours(videos: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    # The mean colour of each frame's foreground (B, F, C), and its area in pixels (B, F, 1).
    mask = _foreground(videos, threshold)[:, :, None]  # (B, F, 1, H, W)
    area = mask.sum((-1, -2))
    return (videos * mask).sum((-1, -2)) / area.clamp(min=1), area


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
    colour, area = _frame_colours(videos, threshold)  # (B, F, C), (B, F, 1)
    seen = (area > 0).float()  # (B, F, 1)
    n = seen.sum(1).clamp(min=2)  # (B, 1)
    mean = (colour * seen).sum(1) / n
    var = ((colour - mean[:, None]) ** 2 * seen).sum(1) / (n - 1)  # unbiased, over the frames seen
    return var.sqrt().mean(-1)


def motion(videos: torch.Tensor, threshold: float = 0.0) -> dict[str, torch.Tensor]:
    """The motion of each clip's shape, from its centre-of-mass path (:func:`centroids`).

    * ``direction``: ``(B, 2)``, the unit vector from the first frame's centre to the last
      frame's (x right, y down; zero when the shape ends where it began);
    * ``speed``: ``(B,)``, the mean distance the centre moves per frame, in pixels;
    * ``max_step``: ``(B,)``, the largest distance it moves between two consecutive frames
      (a shape that jumps instead of moving has a large one).

    A clip in which some frame has no foreground gives NaN in all three: its shape was lost.
    """
    c = centroids(videos, threshold)  # (B, F, 2)
    if c.shape[1] < 2:
        raise ValueError(f"videos need at least 2 frames; got {c.shape[1]}")
    steps = (c[:, 1:] - c[:, :-1]).norm(dim=-1)  # (B, F - 1)
    return {"direction": torch.nn.functional.normalize(c[:, -1] - c[:, 0], dim=-1),
            "speed": steps.mean(1), "max_step": steps.amax(1)}


def colour_names(videos: torch.Tensor, palette: dict[str, tuple[float, float, float]] | None = None,
                 threshold: float = 0.0) -> torch.Tensor:
    """The colour each frame's shape is judged to have, ``(B, F)`` indices into ``palette``.

    The mean colour of the frame's foreground, named by the nearest palette colour (Euclidean,
    in RGB). ``palette`` maps names to RGB in ``[0, 1]``; by default the course's
    :data:`helpers.data.COLOURS`. A frame with no foreground gets -1.
    """
    from helpers.data import COLOURS

    _check_clips(videos)
    palette = COLOURS if palette is None else palette
    rgb = torch.tensor(list(palette.values()), dtype=videos.dtype, device=videos.device) * 2 - 1  # (K, 3)
    colour, area = _frame_colours(videos, threshold)  # (B, F, C), (B, F, 1)
    names = ((colour[:, :, None] - rgb) ** 2).sum(-1).argmin(-1)  # (B, F)
    return torch.where(area[..., 0] > 0, names, torch.full_like(names, -1))


def kept_appearance(videos: torch.Tensor, area_tolerance: float = 0.35,
                    palette: dict[str, tuple[float, float, float]] | None = None, threshold: float = 0.0) -> torch.Tensor:
    """Whether each clip's shape keeps its colour and size in every frame, ``(B,)`` bool.

    Kept means: every frame has a foreground (:func:`centroids`' mask) whose colour is named
    the same as frame 0's (:func:`colour_names`), and whose area is within ``area_tolerance``
    (a fraction) of the clip's median area. A shape that fades away, shrinks, grows or turns
    another colour fails; so does a clip that is meant to change colour.
    """
    _check_clips(videos)
    if not 0 < area_tolerance < 1:
        raise ValueError(f"area_tolerance must lie in (0, 1); got {area_tolerance!r}")
    names = colour_names(videos, palette, threshold)  # (B, F)
    area = _foreground(videos, threshold).sum((-1, -2))  # (B, F)
    median = area.median(1, keepdim=True).values
    size_ok = ((area - median).abs() <= area_tolerance * median) & (area > 0)
    return ((names == names[:, :1]) & (names >= 0) & size_ok).all(1)


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
    model does. The 3-D class has no ``addition_embed_type``; an image U-Net's ``"text"`` one
    (the pooled text added to the time embedding, as chapter 5's) is carried over as an
    ``add_embedding`` module and two hooks that add it to the 3-D U-Net's time embedding, so
    that the video U-Net reads everything the image U-Net reads. Returns ``(unet3d, copied)``,
    ``copied`` being the names of the weights taken from the image model.
    """
    from diffusers import UNet3DConditionModel

    c = unet2d.config
    kinds = {"DownBlock2D": "DownBlock3D", "CrossAttnDownBlock2D": "CrossAttnDownBlock3D",
             "UpBlock2D": "UpBlock3D", "CrossAttnUpBlock2D": "CrossAttnUpBlock3D"}
    if any(b not in kinds for b in (*c.down_block_types, *c.up_block_types)):
        raise ValueError(f"unet2d must use only {sorted(kinds)} blocks; got {c.down_block_types}, {c.up_block_types}")
    if c.addition_embed_type not in (None, "text"):
        raise ValueError(f"unet2d's addition_embed_type must be None or 'text'; got {c.addition_embed_type!r}")
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
    if c.addition_embed_type == "text":
        import copy

        unet3d.add_embedding = copy.deepcopy(unet2d.add_embedding)
        unet3d.register_forward_pre_hook(_pooled_text_pre_hook, with_kwargs=True)
        unet3d.time_embedding.register_forward_hook(_add_pooled_text_hook)
    target = unet3d.state_dict()
    copied = {k: v.reshape(target[k].shape) for k, v in unet2d.state_dict().items()
              if k in target and v.numel() == target[k].numel()}
    unet3d.load_state_dict(copied, strict=False)
    for module in unet3d.modules():
        if type(module).__name__ == "TransformerTemporalModel":
            torch.nn.init.zeros_(module.proj_out.weight)
            torch.nn.init.zeros_(module.proj_out.bias)
    return unet3d.requires_grad_(True), sorted(copied)  # all of it trainable, whatever unet2d's flags


def _pooled_text_pre_hook(unet3d, args, kwargs):
    # Before the 3-D U-Net runs: embed its text states as the image U-Net's TextTimeEmbedding does.
    states = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
    unet3d.time_embedding.pooled_text = unet3d.add_embedding(states)  # (B, time_embed_dim)


def _add_pooled_text_hook(time_embedding, inputs, output):
    # The time embedding of each clip, plus its pooled text: emb + aug_emb, as in UNet2DConditionModel.
    pooled, time_embedding.pooled_text = time_embedding.pooled_text, None
    return output + pooled.to(output.dtype)


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


# --- a frame-conditional video model (MCVD) ---------------------------------------------------

CONTEXT_CHANNELS = 2  # beyond one previous frame's channels: its "seen" mask and the frame index (K = 1;
# K frames add K masks and one index); a description of frame_context's layout, not a setting


def context_frames_of(unet) -> int:
    """How many previous frames a :func:`frame_unet` reads, from its channels (and its first frame, if it reads it)."""
    C, inputs = unet.config.out_channels, unet.config.in_channels
    slots, rest = divmod(inputs - C - 1, C + 1)
    k = slots - first_frame_of(unet)
    if k < 1 or rest:
        raise ValueError(f"a frame U-Net has C + K (C + 1) + 1 input channels for K >= 1 context frames; "
                         f"got {inputs} inputs for C = {C} outputs")
    return k


def first_frame_of(unet) -> bool:
    """Whether a :func:`frame_unet` also reads frame 0 (``frame_unet(..., first_frame=True)``)."""
    return bool(unet.config.get("first_frame", False))


def frame_context(previous: torch.Tensor | None, frame: torch.Tensor, frames: int, like: torch.Tensor,
                  context_frames: int = 1) -> torch.Tensor:
    """The extra input channels of :func:`frame_unet` for frames ``frame`` (``(B,)`` ints) of ``frames``.

    With one previous frame, ``(B, C + 2, H, W)``: the previous frame's latents ``previous``
    ``(B, C, H, W)``, zeroed for frame 0 (which has none; ``previous`` may then be ``None``); a
    mask channel, 1 where a previous frame is seen; and the constant ``frame / (frames - 1)``,
    so that the model knows how far into the clip it is. ``like`` gives the shape
    ``(B, C, H, W)``, dtype and device.

    With K previous frames (``previous`` ``(B, K, C, H, W)``, the latest first, or ``None`` and
    ``context_frames=K``), ``(B, K C + K + 1, H, W)``: the K frames, K masks (frame ``f - 1 - k``
    is seen where ``f > k``; unseen frames are zeroed) and the index. Two frames tell a velocity,
    which one frame cannot.
    """
    if frame.ndim != 1 or len(frame) != len(like) or frames < 2:
        raise ValueError(f"frame must be (B,) = ({len(like)},) frame indices and frames >= 2; "
                         f"got {tuple(frame.shape)}, frames={frames}")
    if bool(((frame < 0) | (frame >= frames)).any()):
        raise ValueError(f"frame indices must lie in [0, {frames}); got {frame.tolist()}")
    B, _, H, W = like.shape
    if previous is not None and previous.ndim == 4:
        previous = previous[:, None]  # one previous frame
    K = previous.shape[1] if previous is not None else context_frames
    if not isinstance(K, int) or K < 1:
        raise ValueError(f"context_frames must be an int >= 1; got {context_frames!r}")
    if previous is not None and previous.shape != (B, K, *like.shape[1:]):
        raise ValueError(f"previous must be (B, K, C, H, W) = {(B, K, *like.shape[1:])}; got {tuple(previous.shape)}")
    seen = torch.stack([(frame > k).to(like.dtype) for k in range(K)], 1)  # (B, K): frame f - 1 - k exists
    prev = (torch.zeros(B, K, *like.shape[1:], dtype=like.dtype, device=like.device) if previous is None
            else previous.to(like) * append_dims(seen, 5))
    position = append_dims(frame.to(like.dtype) / (frames - 1), 4)
    return torch.cat([prev.flatten(1, 2), seen[:, :, None, None].expand(B, K, H, W), position.expand(B, 1, H, W)], 1)


def frame_unet(unet2d, context_frames: int = 1, first_frame: bool = False):
    """An image ``UNet2DConditionModel`` that also reads :func:`frame_context`: MCVD's conditioning.

    A copy of ``unet2d`` whose input convolution takes ``2 C + 2`` channels: the noisy frame
    (C), the previous frame (C), the mask and the frame index; with ``context_frames=K``,
    ``C + K (C + 1) + 1``. With ``first_frame=True`` it also reads frame 0 in one more slot after
    the K previous frames, as SVD conditions every frame on the first (the slot's mask is on
    where frame 0 is not already among the K; recorded in the config, see :func:`first_frame_of`).
    The weights of the new input channels start at zero, so before
    training the model *is* the image model, whatever the context (as SD's inpainting and
    InstructPix2Pix start theirs). Every weight of the copy is trainable, whatever ``unet2d``'s
    ``requires_grad`` flags (a trainer's EMA copy has them off).
    """
    import copy

    if not isinstance(context_frames, int) or context_frames < 1:
        raise ValueError(f"context_frames must be an int >= 1; got {context_frames!r}")
    if not isinstance(first_frame, bool):
        raise ValueError(f"first_frame must be a bool; got {first_frame!r}")
    unet = copy.deepcopy(unet2d)
    old = unet.conv_in
    C = old.in_channels
    slots = context_frames + first_frame
    new = torch.nn.Conv2d(C + slots * (C + 1) + 1, old.out_channels, old.kernel_size, padding=old.padding,
                          dtype=old.weight.dtype, device=old.weight.device)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :C] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=new.in_channels, first_frame=first_frame)
    return unet.requires_grad_(True)  # a model to train, even when unet2d is frozen (an EMA copy, a loaded model)


def frame_pairs(latents: torch.Tensor, states: torch.Tensor, context_frames: int = 1,
                first_frame: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (frame, context, caption) of latent clips, as training data for :func:`frame_objective`.

    ``latents`` ``(N, F, C, H, W)``, ``states`` ``(N, L, D)``. Returns ``(frames, states,
    context)`` with ``N F`` rows: frame f of each clip, its clip's text states, and its
    :func:`frame_context` (frame f - 1; for f = 0 none, so the model also learns first frames
    from the caption alone; with ``context_frames=K``, frames f - 1 ... f - K, those before the
    clip masked out; with ``first_frame=True``, and frame 0, as :func:`frame_unet` reads them).
    """
    _check_clips(latents, "latents")
    N, F = latents.shape[:2]
    if states.ndim != 3 or len(states) != N:
        raise ValueError(f"states must be (N, L, D) with N={N}; got {tuple(states.shape)}")
    if not isinstance(context_frames, int) or not 1 <= context_frames < F:
        raise ValueError(f"context_frames must be an int in [1, {F}); got {context_frames!r}")
    if not isinstance(first_frame, bool):
        raise ValueError(f"first_frame must be a bool; got {first_frame!r}")
    frame = torch.arange(F, device=latents.device).repeat(N)  # (N*F,)
    x0 = latents.flatten(0, 1)
    # (N*F, K, C, H, W): frames f - 1, ..., f - K (those before the clip wrap around and are masked out)
    slots = [torch.roll(latents, k + 1, dims=1) for k in range(context_frames)]
    if first_frame:
        slots.append(latents[:, :1].expand_as(latents))  # masked where frame 0 is among the K (f <= K)
    previous = torch.stack(slots, 2).flatten(0, 1)
    return x0, states.repeat_interleave(F, 0), frame_context(previous, frame, F, x0)


def frame_objective(alpha_bar: torch.Tensor, prediction_type: str, null_states: torch.Tensor,
                    cond_dropout: float = 0.1, context_noise: float = 0.02):
    """The diffusion loss of a :func:`frame_unet`, ``loss(model, (frames, states, context))``.

    Chapter 2's loss on single frames, with the context concatenated to the noisy frame. The
    caption is replaced by ``null_states`` with probability ``cond_dropout`` (for
    classifier-free guidance over the text; the context stays), and the seen context frames get
    Gaussian noise of standard deviation ``context_noise``, so that the model tolerates the
    small errors of its own frames when it is sampled frame after frame.
    """
    if not 0 <= cond_dropout < 1 or context_noise < 0:
        raise ValueError(f"cond_dropout must lie in [0, 1) and context_noise be >= 0; got {cond_dropout}, {context_noise}")
    T = len(alpha_bar)

    def loss(model, batch) -> torch.Tensor:
        x0, states, context = batch
        ab = alpha_bar.to(x0.device)
        C = x0.shape[1]
        K, rest = divmod(context.shape[1] - 1, C + 1)  # K frames of C channels, K masks, the index
        if K < 1 or rest:
            raise ValueError(f"context must have K (C + 1) + 1 channels for C = {C}; got {context.shape[1]}")
        drop = torch.rand(len(x0), device=x0.device) < cond_dropout
        states = torch.where(append_dims(drop, 3), null_states.to(states).expand_as(states), states)
        k = K * C  # the channels of the seen frames
        seen = context[:, k:k + K].repeat_interleave(C, 1)  # each frame's mask over its C channels
        frames = context[:, :k] + context_noise * torch.randn_like(context[:, :k]) * seen
        context = torch.cat([frames, context[:, k:]], 1)
        t = torch.randint(0, T, (len(x0),), device=x0.device)
        eps = torch.randn_like(x0)
        out = model(torch.cat([q_sample(x0, t, eps, ab), context], 1), t, encoder_hidden_states=states).sample
        return diffusion_loss(out, x0, eps, append_dims(ab[t], 4), prediction_type)

    return loss


@torch.no_grad()
def sample_frames(
    unet,
    scheduler,
    states: torch.Tensor,
    null_states: torch.Tensor | None = None,
    first: torch.Tensor | None = None,
    frames: int = 8,
    guidance_scale: float = 1.0,
    num_inference_steps: int = 20,
    generator: torch.Generator | None = None,
    teacher: torch.Tensor | None = None,
) -> torch.Tensor:
    """Latent clips ``(B, F, C, H, W)`` from a :func:`frame_unet`, one frame after another.

    Each frame is a full reverse diffusion with ``scheduler`` (and classifier-free guidance
    over the text states, the context shared by both halves), conditioned on the frame
    sampled before it (on the K frames before it, for a ``frame_unet(..., context_frames=K)``; and
    on frame 0, for a ``frame_unet(..., first_frame=True)``).
    ``first`` ``(B, C, H, W)`` is the given first frame (image-to-video); without it, frame 0 is
    sampled from the caption too (text-to-video).

    ``teacher`` ``(B, frames, C, H, W)``: teacher forcing, to tell the error of one step from
    the errors that accumulate. Frame 0 is ``teacher[:, 0]`` and frame f is sampled given the
    *real* frame ``teacher[:, f - 1]`` instead of the sampled one (``first`` must then be
    ``None``). The noise drawn from ``generator`` is the same as without it.
    """
    if states.ndim != 3:
        raise ValueError(f"states must be (B, L, D); got {tuple(states.shape)}")
    if guidance_scale != 1 and null_states is None:
        raise ValueError("guidance_scale != 1 needs null_states")
    device, B = states.device, len(states)
    C, size = unet.config.out_channels, unet.config.sample_size
    if first is not None and first.shape != (B, C, size, size):
        raise ValueError(f"first must be (B, C, H, W) = {(B, C, size, size)}; got {tuple(first.shape)}")
    if teacher is not None:
        if first is not None:
            raise ValueError("pass first or teacher, not both: teacher[:, 0] is the first frame")
        if teacher.shape != (B, frames, C, size, size):
            raise ValueError(f"teacher must be (B, frames, C, H, W) = {(B, frames, C, size, size)}; got {tuple(teacher.shape)}")
        real = list(teacher.to(device).unbind(1))
        first = real[0]
    clip = [first.to(device)] if first is not None else []
    K, anchored = context_frames_of(unet), first_frame_of(unet)
    guided = guidance_scale != 1
    cond = torch.cat([null_states.expand_as(states), states]) if guided else states
    while len(clip) < frames:
        f = torch.full((B,), len(clip), device=device)
        like = torch.empty(B, C, size, size, device=device)
        source = real[:len(clip)] if teacher is not None else clip
        # frames f - 1, ..., f - K (and frame 0); those before the clip are zeros (frame_context masks them)
        slots = [source[-1 - k] if k < len(source) else torch.zeros_like(like) for k in range(K)]
        if anchored:
            slots.append(source[0] if source else torch.zeros_like(like))
        previous = torch.stack(slots, 1)
        context = frame_context(previous, f, frames, like)
        x = torch.randn((B, C, size, size), generator=generator).to(device) * scheduler.init_noise_sigma
        scheduler.set_timesteps(num_inference_steps, device=device)
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
            ctx = torch.cat([context, context]) if guided else context
            out = unet(torch.cat([x_in, ctx], 1), t, encoder_hidden_states=cond).sample
            if guided:
                uncond, text = out.chunk(2)
                out = classifier_free_guidance(uncond, text, guidance_scale)
            x = scheduler.step(out, t, x).prev_sample
        clip.append(x)
    return torch.stack(clip, 1)
