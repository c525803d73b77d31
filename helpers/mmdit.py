"""Stable Diffusion 3's MMDiT in miniature, and few-step generation by consistency distillation.

Two parts (chapter 7.2):

* **Joint attention** (Esser et al. 2024, SD3, sec. 5.1): image tokens and text tokens keep
  separate weights but attend in *one* softmax over the concatenated sequence
  ``[image; text]`` (:func:`joint_attention`, equal to diffusers' ``JointAttnProcessor2_0``).
  :func:`tiny_mmdit` builds a ``diffusers.SD3Transformer2DModel`` for the course's 4x8x8
  latents and 64-d text states; :func:`sd3_forward` adapts it to the course's
  ``forward(model, x, t, **cond)`` signature.
* **Consistency distillation** (Song et al. 2023): a student ``f(x_t, t)`` learns to jump from any
  point ``x_t`` of the teacher's probability-flow ODE trajectory straight to its end ``x_0``.
  Here the teacher is a DDPM eps-model and its ODE solver is deterministic DDIM
  (:func:`ddim_trajectories`). Two ways to train the student (chapter 7.4): regress the
  trajectory's end (:func:`consistency_regression_loss`), or bootstrap it from one teacher step
  and a slowly updated copy of the student (:func:`consistency_distillation_loss`, consistency
  distillation proper). It samples in 1-4 steps with :func:`consistency_sample`. Time
  convention as everywhere: integer DDPM t, larger is noisier; t = -1 means the clean data.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from helpers.core import append_dims
from helpers.diffusion import ddim_step, ddim_timesteps, denoise
from helpers.training import ema_update

__all__ = [
    "assemble_sd3_pipeline",
    "attention_cost",
    "consistency_distillation_loss",
    "consistency_regression_loss",
    "consistency_sample",
    "consistency_x0",
    "ddim_trajectories",
    "joint_attention",
    "sd3_forward",
    "tiny_mmdit",
]


# --- MMDiT: joint attention --------------------------------------------------------------------

def joint_attention(attn, x: torch.Tensor, c: torch.Tensor, return_weights: bool = False):
    """SD3's joint attention from scratch, with the weights of a diffusers ``Attention`` ``attn``.

    ``x`` (B, N, D) image tokens and ``c`` (B, M, D) text tokens are projected by *their own*
    q/k/v weights (``to_q``... for the image, ``add_q_proj``... for the text), concatenated
    along the sequence, and attend in one softmax: every token sees all N + M tokens. The result
    is split back and each part goes through its own output projection (``to_out`` and
    ``to_add_out``). Returns ``(x_out, c_out)``; ``c_out`` is None when ``attn.context_pre_only``
    (the last SD3 block, whose text output is never used). Equal to ``attn(x, c)`` with
    ``JointAttnProcessor2_0`` (no qk-norm). ``return_weights=True`` returns the attention
    weights ``(B, heads, N + M, N + M)`` instead (rows: queries, image tokens first).
    """
    if x.ndim != 3 or c.ndim != 3 or len(x) != len(c):
        raise ValueError(f"x and c must be (B, N, D) and (B, M, D); got {tuple(x.shape)} and {tuple(c.shape)}")
    if attn.norm_q is not None or attn.norm_added_q is not None:
        raise ValueError("attn uses qk-norm; joint_attention implements SD3.0's attention without it")
    B, N, _ = x.shape
    h = attn.heads

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(B, t.shape[1], h, -1).transpose(1, 2)  # (B, h, L, d)

    q = torch.cat([heads(attn.to_q(x)), heads(attn.add_q_proj(c))], dim=2)  # (B, h, N + M, d)
    k = torch.cat([heads(attn.to_k(x)), heads(attn.add_k_proj(c))], dim=2)
    v = torch.cat([heads(attn.to_v(x)), heads(attn.add_v_proj(c))], dim=2)
    weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)  # (B, h, N + M, N + M)
    if return_weights:
        return weights
    out = (weights @ v).transpose(1, 2).reshape(B, N + c.shape[1], -1)  # (B, N + M, h * d)
    x_out, c_out = out[:, :N], out[:, N:]
    x_out = attn.to_out[0](x_out)
    c_out = None if attn.context_pre_only else attn.to_add_out(c_out)
    return x_out, c_out


def attention_cost(n_image: int, n_text: int, joint: bool = True) -> dict[str, int]:
    """Token counts and attention-score entries of one attention layer, per head.

    Joint (MMDiT): ``N + M`` queries over ``N + M`` keys. Cross-attention (SD 1.x U-Net):
    ``N`` image self-attention scores plus ``N x M`` cross scores, and the text is never updated.
    """
    if n_image < 1 or n_text < 0:
        raise ValueError(f"need n_image >= 1 and n_text >= 0; got {n_image}, {n_text}")
    if joint:
        n = n_image + n_text
        return {"queries": n, "keys": n, "scores": n * n}
    return {"queries": n_image, "keys": n_image + n_text, "scores": n_image * n_image + n_image * n_text}


def tiny_mmdit(
    width: int = 96,
    heads: int = 6,
    layers: int = 4,
    patch_size: int = 2,
    in_channels: int = 4,
    size: int = 8,
    text_dim: int = 64,
    pooled_dim: int = 64,
):
    """A ``diffusers.SD3Transformer2DModel`` for 4 x ``size`` x ``size`` latents and ``text_dim``-d text.

    SD3-medium is the same class with ``width`` 1536 (24 heads of 64), 24 layers, patch 2,
    16 latent channels, 4096-d text (CLIP-L + CLIP-G + T5 states) and 2048-d pooled text.
    The text is projected to the image width (``caption_projection_dim = width``): joint
    attention concatenates the two token streams, so they must have one width.
    """
    from diffusers import SD3Transformer2DModel

    if width % heads:
        raise ValueError(f"width must be a multiple of heads; got width={width}, heads={heads}")
    if size % patch_size:
        raise ValueError(f"size={size} must be divisible by patch_size={patch_size}")
    return SD3Transformer2DModel(
        sample_size=size, patch_size=patch_size, in_channels=in_channels, out_channels=in_channels,
        num_layers=layers, attention_head_dim=width // heads, num_attention_heads=heads,
        joint_attention_dim=text_dim, caption_projection_dim=width, pooled_projection_dim=pooled_dim,
        pos_embed_max_size=size // patch_size,
    )


def sd3_forward(model, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor) -> torch.Tensor:
    """``SD3Transformer2DModel`` called as the course's ``forward(model, x, t, **cond)``: returns the velocity."""
    t = torch.as_tensor(t, device=x.device, dtype=x.dtype).expand(len(x))
    return model(x, encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections,
                 timestep=t).sample


# --- few steps: consistency distillation of a DDIM teacher ---------------------------------------

@torch.no_grad()
def ddim_trajectories(
    model, noise: torch.Tensor, alpha_bar: torch.Tensor, num_steps: int = 40, keep: list[int] | None = None,
    clip_x0: bool = True, **cond,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run the teacher's deterministic DDIM (eta = 0) over :func:`helpers.diffusion.ddim_timesteps` (``spacing="trailing"``) from ``noise`` at t = T - 1.

    Returns ``(x0, states)``: the samples, and the states ``x_t`` the trajectory passed at each
    timestep in ``keep`` (default: all visited). A 1-step ``num_steps`` is the teacher at 1 step.
    """
    timesteps = ddim_timesteps(num_steps, len(alpha_bar), spacing="trailing")
    keep = timesteps if keep is None else keep
    if not set(keep) <= set(timesteps):
        raise ValueError(f"keep must be timesteps the sampler visits ({timesteps[:4]}...); got {keep}")
    alpha_bar = alpha_bar.to(noise.device)
    x, states = noise, {}
    for i, t in enumerate(timesteps):
        if t in keep:
            states[t] = x
        prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        x = ddim_step(denoise(model, x, t, **cond), t, x, alpha_bar, prev_t, clip_x0=clip_x0)
    return x, states


def consistency_x0(model, xt: torch.Tensor, t: torch.Tensor | int, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The student's consistency function ``f(x_t, t) = sqrt(ab_t) x_t - sqrt(1 - ab_t) F(x_t, t)``.

    ``F`` is the network's output read as a v-prediction: well conditioned at every t (an eps
    prediction would divide by ``sqrt(ab_t)``, 1/158 at t = 999), and ``f(x, t) -> x`` as t -> 0,
    the boundary condition of a consistency model.
    """
    t = torch.as_tensor(t, device=xt.device).expand(len(xt))
    ab = append_dims(alpha_bar.to(xt.device)[t], xt.ndim)
    return ab.sqrt() * xt - (1 - ab).sqrt() * denoise(model, xt, t)


def consistency_regression_loss(alpha_bar: torch.Tensor, timesteps: list[int]) -> Callable:
    """``loss(model, batch)`` for :func:`helpers.training.train`: ``|| f(x_t, t) - x_0^teacher ||^2``.

    ``batch = (x0, states)`` with ``x0`` (B, C, H, W) the teacher's trajectory ends and
    ``states`` (B, K, C, H, W) its points at the K ``timesteps``; each example uses one random
    point. This is the consistency property (every point of a trajectory maps to its end)
    trained against the end itself, which a tiny teacher can afford to compute; consistency
    distillation proper bootstraps it from one ODE step and a target network instead.
    """
    steps = torch.as_tensor(timesteps)

    def loss(model, batch) -> torch.Tensor:
        x0, states = batch
        if states.ndim != x0.ndim + 1 or states.shape[1] != len(steps):
            raise ValueError(f"states must be (B, {len(steps)}, ...); got {tuple(states.shape)}")
        k = torch.randint(0, len(steps), (len(x0),), device=x0.device)
        xt = states[torch.arange(len(x0), device=x0.device), k]  # (B, C, H, W)
        return F.mse_loss(consistency_x0(model, xt, steps.to(x0.device)[k], alpha_bar), x0)

    return loss


def consistency_distillation_loss(
    teacher, target: torch.nn.Module, alpha_bar: torch.Tensor, num_steps: int, target_decay: float,
) -> Callable:
    """``loss(model, x0)`` for :func:`helpers.training.train`: consistency distillation (Song et al. 2023, Algorithm 2).

    The teacher's grid is :func:`helpers.diffusion.ddim_timesteps` (``num_steps``, trailing)
    followed by t = -1, the data. Each batch draws one adjacent pair ``t_{n+1} > t_n``, noises
    its clean ``x0`` to ``x_{t_{n+1}}``, takes one deterministic DDIM step of the teacher to
    ``x_{t_n}`` and returns ``|| f_theta(x_{t_{n+1}}) - f_target(x_{t_n}) ||^2`` with no gradient
    through the target. At the last pair the target is the boundary condition ``f(x, -1) = x``:
    the teacher's own ``x0`` estimate, the only place the data enters. After computing the loss
    the ``target`` network moves towards the student, ``target <- target_decay * target + (1 -
    target_decay) * model`` (from the weights before this step's update, one step behind the
    paper's order). One teacher call and one target call per example per step.

    ``loss(model, x0, pair=n)`` uses the pair ``n`` (0 the noisiest, ``num_steps - 1`` the
    boundary) instead of a random one. Given ``target`` as ``model`` (then the EMA moves nothing),
    it measures how far a network is from being consistent between two points of the grid.
    """
    if not 0.0 <= target_decay < 1.0:
        raise ValueError(f"target_decay must be in [0, 1); got {target_decay}")
    grid = ddim_timesteps(num_steps, len(alpha_bar), spacing="trailing") + [-1]
    target.requires_grad_(False)

    def f(net, x, t):
        return x if t < 0 else consistency_x0(net, x, t, alpha_bar)

    def loss(model, x0: torch.Tensor, pair: int | None = None) -> torch.Tensor:
        if not isinstance(x0, torch.Tensor):
            raise ValueError(f"x0 must be one tensor of clean images (B, C, H, W); got {type(x0).__name__}")
        if pair is not None and not (isinstance(pair, int) and 0 <= pair < len(grid) - 1):
            raise ValueError(f"pair must be an int in [0, {len(grid) - 2}] (num_steps pairs); got {pair!r}")
        n = int(torch.randint(0, len(grid) - 1, ())) if pair is None else pair
        t_hi, t_lo = grid[n], grid[n + 1]
        ab = alpha_bar.to(x0.device)
        x_hi = ab[t_hi].sqrt() * x0 + (1 - ab[t_hi]).sqrt() * torch.randn_like(x0)
        with torch.no_grad():
            x_lo = ddim_step(denoise(teacher, x_hi, t_hi), t_hi, x_hi, ab, t_lo)  # one teacher ODE step
            goal = f(target, x_lo, t_lo)
        value = F.mse_loss(f(model, x_hi, t_hi), goal)
        ema_update(target, model, target_decay)
        return value

    return loss


@torch.no_grad()
def consistency_sample(model, noise: torch.Tensor, alpha_bar: torch.Tensor, num_steps: int,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) on :func:`helpers.diffusion.ddim_timesteps` (``spacing="trailing"``).

    ``x0 = f(noise, T - 1)``; then for each later timestep t: re-noise ``x_t = sqrt(ab_t) x0 +
    sqrt(1 - ab_t) z`` with fresh z (from ``generator``) and jump again, ``x0 = f(x_t, t)``.
    One network call per step; the result is clamped to [-1, 1].
    """
    timesteps = ddim_timesteps(num_steps, len(alpha_bar), spacing="trailing")
    alpha_bar = alpha_bar.to(noise.device)
    x0 = consistency_x0(model, noise, timesteps[0], alpha_bar).clamp(-1, 1)
    for t in timesteps[1:]:
        z = torch.randn(noise.shape, generator=generator).to(noise.device)
        xt = alpha_bar[t].sqrt() * x0 + (1 - alpha_bar[t]).sqrt() * z
        x0 = consistency_x0(model, xt, t, alpha_bar).clamp(-1, 1)
    return x0


def assemble_sd3_pipeline(transformer, vae, clip, tokenizer, shift: float = 1.0):
    """A real ``StableDiffusion3Pipeline`` from the course's parts, without T5 (``text_encoder_3=None``).

    SD3 reads two CLIP text encoders (CLIP-L and CLIP-G) and T5. Here both CLIP slots hold the
    course's tiny CLIP text tower (as a ``CLIPTextModelWithProjection``); the pipeline
    concatenates their penultimate-layer token states (2 x 64 = 128 features per token) and
    their projected pooled outputs (2 x 64 = 128), and, with no T5, appends
    ``max_sequence_length`` all-zero tokens. The ``transformer`` must therefore have
    ``joint_attention_dim = pooled_projection_dim = 128``. The VAE gets ``shift_factor = 0``
    (SD3's VAE has one; the course's has none).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    encoder = CLIPTextModelWithProjection(clip.config.text_config)
    encoder.text_model.load_state_dict(clip.text_model.state_dict())
    encoder.text_projection.load_state_dict(clip.text_projection.state_dict())
    want = 2 * clip.config.projection_dim
    if transformer.config.joint_attention_dim != 2 * clip.config.text_config.hidden_size or \
            transformer.config.pooled_projection_dim != want:
        raise ValueError(f"transformer needs joint_attention_dim={2 * clip.config.text_config.hidden_size} and "
                         f"pooled_projection_dim={want} (two CLIP slots); got {transformer.config.joint_attention_dim} "
                         f"and {transformer.config.pooled_projection_dim}")
    if vae.config.shift_factor is None:
        vae.register_to_config(shift_factor=0.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=vae,
        text_encoder=encoder.eval(), tokenizer=tokenizer, text_encoder_2=encoder.eval(), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe
