"""The forward process in closed form and one step at a time (DDPM, Ho et al. 2020).

Larger ``t`` is noisier; ``t`` is an integer in ``[0, T)`` indexing ``alpha_bar``.
Chapter 2 adds the reverse process, the parameterisations and the loss; chapter 4
classifier-free guidance; chapter 6 DDIM (:func:`ddim_timesteps`, :func:`ddim_step`,
:func:`ddim_sample`, :func:`ddim_invert`); later chapters add flow matching here.
"""

from __future__ import annotations

import torch

from helpers.core import append_dims

__all__ = [
    "ClassGuided",
    "PREDICTION_TYPES",
    "classifier_free_guidance",
    "ddim_invert",
    "ddim_sample",
    "ddim_step",
    "ddim_timesteps",
    "ddpm_sample",
    "ddpm_step",
    "denoise",
    "diffusion_loss",
    "eps_from_v",
    "eps_from_x0",
    "posterior_mean_variance",
    "predicted_x0",
    "q_sample",
    "q_step",
    "v_from_x0_eps",
    "x0_from_eps",
    "x0_from_v",
]


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


# --- parameterisations: what the network predicts -------------------------------------------
# xt = sqrt(ab) x0 + sqrt(1 - ab) eps, and v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022).
# Given xt and any one of (x0, eps, v), the others follow exactly.


def _coef(alpha_bar_t, ref: torch.Tensor) -> torch.Tensor:
    ab = _as_tensor_like(alpha_bar_t, ref)
    return append_dims(ab, ref.ndim) if ab.ndim == 1 else ab


def x0_from_eps(xt: torch.Tensor, eps: torch.Tensor, alpha_bar_t) -> torch.Tensor:
    """``x0 = (xt - sqrt(1 - ab) eps) / sqrt(ab)`` (DDPM eq. 15)."""
    ab = _coef(alpha_bar_t, xt)
    return (xt - (1 - ab).sqrt() * eps) / ab.sqrt()


def eps_from_x0(xt: torch.Tensor, x0: torch.Tensor, alpha_bar_t) -> torch.Tensor:
    """``eps = (xt - sqrt(ab) x0) / sqrt(1 - ab)``."""
    ab = _coef(alpha_bar_t, xt)
    return (xt - ab.sqrt() * x0) / (1 - ab).sqrt()


def v_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, alpha_bar_t) -> torch.Tensor:
    """The velocity target ``v = sqrt(ab) eps - sqrt(1 - ab) x0`` (Salimans & Ho 2022, sec. 4)."""
    ab = _coef(alpha_bar_t, x0)
    return ab.sqrt() * eps - (1 - ab).sqrt() * x0


def x0_from_v(xt: torch.Tensor, v: torch.Tensor, alpha_bar_t) -> torch.Tensor:
    """``x0 = sqrt(ab) xt - sqrt(1 - ab) v``."""
    ab = _coef(alpha_bar_t, xt)
    return ab.sqrt() * xt - (1 - ab).sqrt() * v


def eps_from_v(xt: torch.Tensor, v: torch.Tensor, alpha_bar_t) -> torch.Tensor:
    """``eps = sqrt(1 - ab) xt + sqrt(ab) v``."""
    ab = _coef(alpha_bar_t, xt)
    return (1 - ab).sqrt() * xt + ab.sqrt() * v


PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")  # diffusers' names for eps, x0, v


def predicted_x0(model_output: torch.Tensor, xt: torch.Tensor, alpha_bar_t, prediction_type: str = "epsilon"):
    """The network's estimate of x0, whatever it was trained to predict."""
    if prediction_type == "epsilon":
        return x0_from_eps(xt, model_output, alpha_bar_t)
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return x0_from_v(xt, model_output, alpha_bar_t)
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")


# --- the reverse process --------------------------------------------------------------------


def posterior_mean_variance(
    x0: torch.Tensor, xt: torch.Tensor, t: int, alpha_bar: torch.Tensor, prev_t: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``q(x_prev | x_t, x_0)`` (DDPM eqs. 6-7).

    ``prev_t`` defaults to ``t - 1``; a larger jump (respaced sampling) uses the effective
    ``beta = 1 - alpha_bar[t] / alpha_bar[prev_t]``. ``alpha_bar`` before step 0 is 1.
    """
    alpha_bar = _as_tensor_like(alpha_bar, xt)
    prev_t = t - 1 if prev_t is None else prev_t
    if not 0 <= t < len(alpha_bar) or not -1 <= prev_t < t:
        raise ValueError(f"need 0 <= t < {len(alpha_bar)} and -1 <= prev_t < t; got t={t}, prev_t={prev_t}")
    ab_t = alpha_bar[t]
    ab_prev = alpha_bar[prev_t] if prev_t >= 0 else torch.ones_like(ab_t)
    beta_t = 1 - ab_t / ab_prev
    mean = (ab_prev.sqrt() * beta_t / (1 - ab_t)) * x0 + ((1 - beta_t).sqrt() * (1 - ab_prev) / (1 - ab_t)) * xt
    variance = ((1 - ab_prev) / (1 - ab_t) * beta_t).clamp(min=1e-20)
    return mean, variance


def ddpm_step(
    model_output: torch.Tensor,
    t: int,
    xt: torch.Tensor,
    alpha_bar: torch.Tensor,
    noise: torch.Tensor | None = None,
    prev_t: int | None = None,
    prediction_type: str = "epsilon",
    clip_x0: bool = False,
) -> torch.Tensor:
    """One ancestral DDPM step ``x_t -> x_prev`` (DDPM Algorithm 2, "fixed small" variance).

    1. estimate x0 from the network's output;  2. optionally clip it to [-1, 1];
    3. take the posterior mean of ``q(x_prev | x_t, x0)``;  4. add ``sigma_t * noise`` unless
    ``t == 0``. Equal to ``DDPMScheduler.step`` given the same noise (``tests/test_diffusion.py``).
    """
    alpha_bar = _as_tensor_like(alpha_bar, xt)
    x0 = predicted_x0(model_output, xt, alpha_bar[t], prediction_type)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
    mean, variance = posterior_mean_variance(x0, xt, t, alpha_bar, prev_t)
    if t == 0:
        return mean
    if noise is None:
        raise ValueError("noise is required for t > 0 (pass torch.randn_like(xt), seeded)")
    return mean + variance.sqrt() * noise


def diffusion_loss(
    model_output: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, alpha_bar_t, prediction_type: str = "epsilon"
) -> torch.Tensor:
    """The simple loss (Ho et al. 2020, L_simple): mean squared error against the chosen target."""
    if prediction_type == "epsilon":
        target = eps
    elif prediction_type == "sample":
        target = x0
    elif prediction_type == "v_prediction":
        target = v_from_x0_eps(x0, eps, alpha_bar_t)
    else:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")
    return torch.nn.functional.mse_loss(model_output, target)


def denoise(model, x: torch.Tensor, t: torch.Tensor | int, **cond) -> torch.Tensor:
    """Call a denoiser with the course's one signature ``model(x, t, **cond)``.

    diffusers models return an output object; its ``.sample`` is unwrapped so that plain
    ``nn.Module`` denoisers and diffusers models swap freely.
    """
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(len(x))
    out = model(x, t, **cond)
    return out.sample if hasattr(out, "sample") else out


@torch.no_grad()
def ddpm_sample(
    model,
    shape: tuple[int, ...],
    alpha_bar: torch.Tensor,
    num_steps: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    prediction_type: str = "epsilon",
    clip_x0: bool = True,
    **cond,
) -> torch.Tensor:
    """Ancestral sampling from pure noise with :func:`ddpm_step` (DDPM Algorithm 2).

    ``num_steps`` < T visits evenly spaced timesteps (``T-1 - k*T/num_steps``, as diffusers'
    ``DDPMScheduler.set_timesteps`` does), each step jumping with the effective beta.
    Noise is drawn on the CPU from ``generator`` so results repeat across devices.
    """
    T = len(alpha_bar)
    num_steps = num_steps or T
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must lie in [1, {T}]; got {num_steps}")
    alpha_bar = alpha_bar.to(device)
    timesteps = (torch.arange(num_steps - 1, -1, -1) * (T // num_steps)).tolist()  # e.g. 990, 980, ..., 0
    x = torch.randn(shape, generator=generator).to(device)
    for i, t in enumerate(timesteps):
        prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        out = denoise(model, x, t, **cond)
        noise = torch.randn(shape, generator=generator).to(device) if t > 0 else None
        x = ddpm_step(out, t, x, alpha_bar, noise, prev_t, prediction_type, clip_x0)
    return x


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022) in diffusers' convention.

    ``eps_uncond + w * (eps_cond - eps_uncond)``: ``w = 0`` is unconditional, ``w = 1`` the
    plain conditional prediction, ``w > 1`` extrapolates past it. The paper writes
    ``(1 + w') eps_cond - w' eps_uncond``, the same thing with ``w = 1 + w'``.
    """
    if eps_uncond.shape != eps_cond.shape:
        raise ValueError(f"eps_uncond and eps_cond must have the same shape; got "
                         f"{tuple(eps_uncond.shape)} and {tuple(eps_cond.shape)}")
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


# --- DDIM (Song, Meng & Ermon 2021) ---------------------------------------------------------
# The same trained eps-network, a different reverse process: eq. 12 of the paper jumps between
# any two timesteps, with a noise level sigma chosen by eta (0: deterministic, 1: DDPM's).


class ClassGuided(torch.nn.Module):
    """A class-conditional denoiser with classifier-free guidance inside (chapter 4).

    ``ClassGuided(model, labels, w, null_label)(x, t)`` is
    ``eps(x, t, null) + w * (eps(x, t, labels) - eps(x, t, null))``, computed as one call on
    the doubled batch ``[null; labels]``, so the samplers (``ddpm_sample``, ``ddim_sample``) run it
    unchanged. At ``w = 0`` (the unconditional model) and ``w = 1`` (the conditional one) it makes
    one plain call, as diffusers' pipelines skip guidance at ``guidance_scale <= 1``.
    """

    def __init__(self, model, labels: torch.Tensor, w: float, null_label: int):
        super().__init__()
        labels = torch.as_tensor(labels)
        if labels.ndim != 1 or labels.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"labels must be a 1-D integer tensor of class labels; got {labels.dtype} {tuple(labels.shape)}")
        if not isinstance(null_label, int) or isinstance(null_label, bool):
            raise ValueError(f"null_label must be an int (the dropped-label class); got {null_label!r}")
        if not isinstance(w, (int, float)) or isinstance(w, bool):
            raise ValueError(f"w must be a number (the guidance scale); got {w!r}")
        self.model, self.labels, self.w, self.null_label = model, labels, float(w), null_label

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if len(x) != len(self.labels):
            raise ValueError(f"x has {len(x)} samples for {len(self.labels)} labels")
        labels = self.labels.to(x.device)
        null = torch.full_like(labels, self.null_label)
        if self.w in (0.0, 1.0):
            return denoise(self.model, x, t, class_labels=null if self.w == 0 else labels)
        t = torch.as_tensor(t, device=x.device)
        t_in = torch.cat([t, t]) if t.ndim == 1 else t
        eps_uncond, eps_cond = denoise(self.model, torch.cat([x, x]), t_in, class_labels=torch.cat([null, labels])).chunk(2)
        return classifier_free_guidance(eps_uncond, eps_cond, self.w)


def _check_int(value, name: str) -> int:
    try:
        if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype.is_floating_point):
            raise TypeError
        return int(value.__index__())  # ints and integer 0-d tensors, not floats
    except (TypeError, AttributeError, RuntimeError, ValueError):
        raise ValueError(f"{name} must be an integer; got {value!r}") from None


def ddim_timesteps(num_steps: int, T: int = 1000, spacing: str = "leading") -> list[int]:
    """The timesteps a ``num_steps``-step DDIM sampler visits, descending.

    ``spacing="leading"`` (diffusers' default): ``k * (T // num_steps)`` for
    ``k = num_steps - 1, ..., 0``; 10 steps of ``T = 1000`` visit 900, 800, ..., 0. Equal to
    ``DDIMScheduler.set_timesteps(num_steps).timesteps`` with ``steps_offset=0``. The first
    timestep is ``T - 1`` only when ``num_steps == T``: 5 steps start at 800, not 999, and one
    step is taken at t = 0, pure noise taken for an image.
    ``spacing="trailing"``: ``T - 1 - k * (T // num_steps)`` for ``k = 0, ..., num_steps - 1``,
    always from ``T - 1`` (1 step: [999]; 4 steps: [999, 749, 499, 249]); what few-step
    samplers need. Equal to ``timestep_spacing="trailing"`` when ``num_steps`` divides ``T``.
    """
    num_steps, T = _check_int(num_steps, "num_steps"), _check_int(T, "T")
    if T < 1:
        raise ValueError(f"T must be >= 1; got {T}")
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must lie in [1, T={T}]; got {num_steps}")
    if spacing == "trailing":
        return [T - 1 - k * (T // num_steps) for k in range(num_steps)]
    if spacing != "leading":
        raise ValueError(f"spacing must be 'leading' or 'trailing'; got {spacing!r}")
    return [k * (T // num_steps) for k in range(num_steps - 1, -1, -1)]


def ddim_step(
    model_output: torch.Tensor,
    t: int,
    xt: torch.Tensor,
    alpha_bar: torch.Tensor,
    prev_t: int,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    prediction_type: str = "epsilon",
    clip_x0: bool = False,
) -> torch.Tensor:
    """One DDIM step ``x_t -> x_prev`` (Song et al. 2021, eq. 12; sigma from eq. 16):

    ``x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_hat + sigma noise``,
    ``sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev)``.

    ``prev_t`` is any earlier timestep, ``-1`` for the clean end (``alpha_bar = 1``, diffusers'
    ``set_alpha_to_one=True``). ``eta = 0`` is deterministic DDIM; ``eta = 1`` makes sigma^2 the
    DDPM posterior variance, and the step equals :func:`ddpm_step` given the same noise and the
    same ``x0_hat``. With ``clip_x0`` only ``x0_hat`` is clipped, ``eps_hat`` stays the network's
    (diffusers' default ``use_clipped_model_output=False``). Equal to
    ``DDIMScheduler.step(model_output, t, xt, eta, variance_noise=noise)`` (``tests/test_ddim.py``).
    """
    alpha_bar = _as_tensor_like(alpha_bar, xt)
    t, prev_t = _check_int(t, "t"), _check_int(prev_t, "prev_t")
    if not 0 <= t < len(alpha_bar) or not -1 <= prev_t < t:
        raise ValueError(f"need 0 <= t < {len(alpha_bar)} and -1 <= prev_t < t; got t={t}, prev_t={prev_t}")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must lie in [0, 1] (0: DDIM, 1: DDPM's variance); got {eta!r}")
    ab_t = alpha_bar[t]
    ab_prev = alpha_bar[prev_t] if prev_t >= 0 else torch.ones_like(ab_t)
    x0 = predicted_x0(model_output, xt, ab_t, prediction_type)  # 1. x0_hat
    if prediction_type == "epsilon":  # 2. eps_hat, from the unclipped x0_hat
        eps = model_output
    elif prediction_type == "sample":
        eps = eps_from_x0(xt, model_output, ab_t)
    else:
        eps = eps_from_v(xt, model_output, ab_t)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
    sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).sqrt()  # 3. eq. 16
    x_prev = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).sqrt() * eps  # 4. eq. 12 without noise
    if eta > 0 and prev_t >= 0:  # at the clean end sigma = 0: no noise needed
        if noise is None:
            raise ValueError("noise is required when eta > 0 (pass torch.randn_like(xt), seeded)")
        if noise.shape != xt.shape:
            raise ValueError(f"noise must have xt's shape {tuple(xt.shape)}; got {tuple(noise.shape)}")
        x_prev = x_prev + sigma * noise
    return x_prev


@torch.no_grad()
def ddim_sample(
    model,
    shape: tuple[int, ...],
    alpha_bar: torch.Tensor,
    num_steps: int,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    prediction_type: str = "epsilon",
    clip_x0: bool = True,
    xT: torch.Tensor | None = None,
    **cond,
) -> torch.Tensor:
    """DDIM sampling: :func:`ddim_step` over :func:`ddim_timesteps` (Song et al. 2021, sec. 4.2).

    Starts from ``xT`` if given (e.g. the latent of :func:`ddim_invert`), else from noise drawn
    on the CPU from ``generator``; with ``eta > 0`` every step draws fresh noise from the same
    generator, in the order diffusers' ``DDIMScheduler.step(..., generator=...)`` does, so the
    two loops give the same images. ``num_steps = T`` and ``eta = 1`` is DDPM.
    """
    T = len(alpha_bar)
    timesteps = ddim_timesteps(num_steps, T)  # validates num_steps
    alpha_bar = alpha_bar.to(device)
    if xT is None:
        x = torch.randn(shape, generator=generator).to(device)
    elif tuple(xT.shape) != tuple(shape):
        raise ValueError(f"xT has shape {tuple(xT.shape)} but shape is {tuple(shape)}")
    else:
        x = xT.to(device)
    for i, t in enumerate(timesteps):
        prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        out = denoise(model, x, t, **cond)
        noise = torch.randn(shape, generator=generator).to(device) if eta > 0 else None
        x = ddim_step(out, t, x, alpha_bar, prev_t, eta, noise, prediction_type, clip_x0)
    return x


@torch.no_grad()
def ddim_invert(model, x0: torch.Tensor, alpha_bar: torch.Tensor, num_steps: int, **cond) -> torch.Tensor:
    """DDIM inversion: the deterministic DDIM update run forwards, from ``x0`` to its noise latent.

    Visits ``ddim_timesteps(num_steps)`` in ascending order, from the clean end (``alpha_bar =
    1``) to the sampler's first timestep, and returns the latent ``xT`` there, so that
    ``ddim_sample(..., num_steps, xT=xT, clip_x0=False)`` maps it back to (about) ``x0``. Each
    step ``s -> t`` solves eq. 12 (``eta = 0``) for the noisier point,
    ``x_t = sqrt(ab_t) (x_s - sqrt(1 - ab_s) eps) / sqrt(ab_s) + sqrt(1 - ab_t) eps``.
    The exact inverse needs ``eps_theta(x_t, t)`` at the unknown ``x_t``; like diffusers'
    ``DDIMInverseScheduler`` we use ``eps_theta(x_s, t)``, an error that shrinks with the step
    size. A predictor that returns the true noise makes the round trip exact at any step count.
    The model must predict eps (``prediction_type="epsilon"``).
    """
    alpha_bar = _as_tensor_like(alpha_bar, x0)
    ab_s = torch.ones_like(alpha_bar[0])  # the clean end
    x = x0
    for t in reversed(ddim_timesteps(num_steps, len(alpha_bar))):  # 0, T // n, ..., ascending
        eps = denoise(model, x, t, **cond)
        ab_t = alpha_bar[t]
        x0_hat = (x - (1 - ab_s).sqrt() * eps) / ab_s.sqrt()
        x = ab_t.sqrt() * x0_hat + (1 - ab_t).sqrt() * eps
        ab_s = ab_t
    return x
