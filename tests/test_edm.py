"""helpers.edm: the sigma view of DDPM and EDM's samplers, equal to diffusers' Euler, Heun and ancestral schedulers."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import (DDPMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       HeunDiscreteScheduler)

import helpers
from helpers import edm

T = 1000
ALPHA_BAR = helpers.get_schedule("linear", T).alpha_bar
# beta_start and beta_end given explicitly: a config marks values left at their defaults, and
# from_config then gives the new class *its* defaults (HeunDiscreteScheduler's are SD's 0.00085, 0.012).
CONFIG = DDPMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                       prediction_type="epsilon").config


def eps_model(x, t):
    """A stand-in network whose output depends on the input and, strongly, on the (fractional) time."""
    t = torch.as_tensor(t, dtype=x.dtype)
    return torch.tanh(0.7 * x + torch.sin(t / 37.0)) * (1 + t / T)


def diffusers_loop(scheduler, steps, noise, generator=None):
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        x = scheduler.step(eps_model(scheduler.scale_model_input(x, t), t), t, x, **extra).prev_sample
    return x


def test_vp_sigmas_are_eulers_sigmas_and_sigma_to_t_inverts_them():
    scheduler = EulerDiscreteScheduler.from_config(CONFIG)
    sigmas = edm.vp_sigmas(ALPHA_BAR)
    assert torch.allclose(sigmas, torch.as_tensor(((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5), rtol=1e-5)
    t = torch.tensor([0.0, 10.0, 499.0, 998.0, 999.0])
    assert torch.allclose(edm.sigma_to_t(sigmas[t.long()], ALPHA_BAR), t, atol=1e-3)
    halfway = (sigmas[10].log() + sigmas[11].log()).div(2).exp()  # log-linear between training times
    assert abs(edm.sigma_to_t(halfway, ALPHA_BAR).item() - 10.5) < 1e-3


def test_from_config_drops_values_left_at_their_defaults():
    """Why CONFIG names its betas: the same schedule by default values reaches Heun as another schedule."""
    implicit = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear").config
    assert HeunDiscreteScheduler.from_config(implicit).config.beta_end == 0.012
    assert HeunDiscreteScheduler.from_config(CONFIG).config.beta_end == 0.02
    assert torch.allclose(HeunDiscreteScheduler.from_config(CONFIG).alphas_cumprod.float(), ALPHA_BAR, rtol=1e-5)


@pytest.mark.parametrize("steps", [5, 12])
def test_karras_sigmas_and_timesteps_equal_diffusers(steps):
    scheduler = EulerDiscreteScheduler.from_config(CONFIG, use_karras_sigmas=True, timestep_spacing="linspace")
    scheduler.set_timesteps(steps)
    table = edm.vp_sigmas(ALPHA_BAR)
    ours = edm.karras_sigmas(steps, table[0].item(), table[-1].item())
    assert torch.allclose(ours, scheduler.sigmas[:-1], rtol=1e-5)
    assert scheduler.sigmas[-1] == 0
    assert torch.allclose(edm.sigma_to_t(ours, ALPHA_BAR), scheduler.timesteps, atol=2e-3)
    assert torch.allclose(edm.discrete_sigmas(ALPHA_BAR, steps), _sigmas(steps), rtol=1e-5)


def _sigmas(steps):
    scheduler = EulerDiscreteScheduler.from_config(CONFIG, timestep_spacing="linspace")
    scheduler.set_timesteps(steps)
    return scheduler.sigmas[:-1]


def _with_zero(sigmas):
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@pytest.mark.parametrize("method, scheduler_class, karras", [
    ("euler", EulerDiscreteScheduler, True),
    ("euler", EulerDiscreteScheduler, False),
    ("heun", HeunDiscreteScheduler, True),
    ("ancestral", EulerAncestralDiscreteScheduler, False),
])
def test_samplers_by_hand_equal_diffusers(method, scheduler_class, karras):
    steps = 8
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    overrides = {"timestep_spacing": "linspace"} | ({"use_karras_sigmas": True} if karras else {})
    theirs = diffusers_loop(scheduler_class.from_config(CONFIG, **overrides), steps, noise,
                            torch.Generator().manual_seed(1))
    table = edm.vp_sigmas(ALPHA_BAR)
    sigmas = (edm.karras_sigmas(steps, table[0].item(), table[-1].item()) if karras
              else edm.discrete_sigmas(ALPHA_BAR, steps))
    ours = edm.sample(edm.vp_denoiser(eps_model, ALPHA_BAR), _with_zero(sigmas), noise, method,
                      torch.Generator().manual_seed(1))
    assert (ours - theirs).abs().max() < 2e-4 * theirs.abs().max()
    assert not torch.allclose(ours, noise * sigmas[0])  # it moved


def test_heun_is_second_order_and_euler_first():
    """On an ODE with a known solution (Gaussian data: D is linear), halving the step cuts Euler's error by about 2, Heun's by about 4."""
    s_data = 0.5  # x0 ~ N(0, s_data^2): D(x; sigma) = x * s_data^2 / (s_data^2 + sigma^2), and x(sigma) ∝ sqrt(s_data^2 + sigma^2)
    denoiser = lambda x, sigma: x * s_data**2 / (s_data**2 + sigma**2)  # noqa: E731
    x_start = torch.ones(1, dtype=torch.float64)
    exact = x_start * (s_data**2 + 0.1**2) ** 0.5 / (s_data**2 + 10.0**2) ** 0.5

    def error(method, n):
        sigmas = torch.linspace(10.0, 0.1, n + 1, dtype=torch.float64)
        x = x_start.clone()
        for a, b in zip(sigmas[:-1], sigmas[1:]):
            x = {"euler": edm.euler_step, "heun": edm.heun_step}[method](denoiser, x, a, b)
        return (x - exact).abs().item()

    assert 1.6 < error("euler", 20) / error("euler", 40) < 2.4
    assert 3.2 < error("heun", 20) / error("heun", 40) < 4.8


def test_edm_preconditioning_gives_unit_second_moments():
    g = torch.Generator().manual_seed(0)
    x0 = 0.3 + 0.4 * torch.randn(200_000, generator=g, dtype=torch.float64)  # not zero-mean: sigma_data is the RMS
    sigma_data = x0.pow(2).mean().sqrt().item()
    for sigma in (0.02, 0.5, 3.0, 80.0):
        c_skip, c_out, c_in, c_noise = edm.edm_preconditioning(sigma, sigma_data)
        x = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        assert abs((c_in * x).pow(2).mean().item() - 1) < 0.02
        assert abs(((x0 - c_skip * x) / c_out).pow(2).mean().item() - 1) < 0.02
        assert abs(c_noise.item() - torch.tensor(sigma).log().item() / 4) < 1e-6


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="num_steps"):
        edm.karras_sigmas(1, 0.1, 10.0)
    with pytest.raises(ValueError, match="sigma_min"):
        edm.karras_sigmas(5, 10.0, 0.1)
    with pytest.raises(ValueError, match="sigma_data"):
        edm.edm_preconditioning(1.0, 0.0)
    with pytest.raises(ValueError, match="method"):
        edm.sample(lambda x, s: x, torch.tensor([1.0, 0.0]), torch.zeros(1), "rk4")
    with pytest.raises(ValueError, match="sigmas must decrease"):
        edm.sample(lambda x, s: x, torch.tensor([0.5, 1.0]), torch.zeros(1))
    with pytest.raises(ValueError, match="alpha_bar"):
        edm.vp_sigmas(torch.tensor([1.5, 0.5]))
