"""DDIM: timesteps, step, sampler and inversion, against diffusers and against DDPM.

The reference for every claim is either diffusers (``DDIMScheduler``, ``DDIMInverseScheduler``)
run on the same inputs, or an identity of the maths (eta = 1 is DDPM; a predictor that returns
the true noise makes inversion exact). Comparisons run in float64 where diffusers allows it.
"""

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

import helpers
from helpers import diffusion as D

T = 1000
AB = helpers.get_schedule("linear", T, dtype=torch.float64).alpha_bar


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _ddim_scheduler_float64(**kwargs) -> DDIMScheduler:
    """A default DDIMScheduler (linear betas, leading spacing, alpha_bar(-1) = 1) computing in float64."""
    sched = DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", **kwargs)
    torch.testing.assert_close(sched.alphas_cumprod.double(), AB, rtol=1e-5, atol=0)  # the same schedule
    sched.alphas_cumprod = AB.clone()
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return sched


def _toy_eps_model(x, t):
    """Any smooth deterministic 'noise predictor' whose output depends on x and t."""
    return 0.3 * torch.tanh(x) + 0.2 * torch.cos(t.to(x.dtype).view(-1, *[1] * (x.ndim - 1)) / 100)


# --- timesteps -------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [1, 3, 5, 7, 10, 20, 50, 100, 333, 999, 1000])
def test_ddim_timesteps_equal_diffusers(num_steps):
    sched = DDIMScheduler(num_train_timesteps=T)
    sched.set_timesteps(num_steps)
    assert D.ddim_timesteps(num_steps, T) == sched.timesteps.tolist()


def test_leading_spacing_starts_below_T_unless_every_step_is_taken():
    """The first timestep is (n-1) * (T // n): 800 for 5 steps, 999 only for n = T."""
    assert D.ddim_timesteps(5)[:2] == [800, 600]
    assert D.ddim_timesteps(1000)[0] == 999
    assert D.ddim_timesteps(10, T=100) == list(range(90, -1, -10))


# --- one step --------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_step_equals_diffusers_scheduler_step(eta, prediction_type, clip):
    """Ten chained steps of a 10-step schedule, our step and DDIMScheduler.step on the same inputs."""
    sched = _ddim_scheduler_float64(prediction_type=prediction_type, clip_sample=clip)
    sched.set_timesteps(10)
    timesteps = D.ddim_timesteps(10, T)
    x_ours = x_ref = 1.5 * _randn(3, 1, 8, 8, seed=1)  # big enough that clipping binds
    for i, t in enumerate(timesteps):
        prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        out = _randn(3, 1, 8, 8, seed=100 + t)
        noise = _randn(3, 1, 8, 8, seed=200 + t)
        x_ref = sched.step(out, t, x_ref, eta=eta, variance_noise=noise).prev_sample
        x_ours = D.ddim_step(out, t, x_ours, AB, prev_t, eta, noise, prediction_type, clip)
        torch.testing.assert_close(x_ours, x_ref, rtol=1e-10, atol=1e-10)


def test_ddim_step_with_the_true_noise_lands_on_the_same_trajectory():
    """If eps_hat is the noise that made x_t, eta = 0 jumps to sqrt(ab') x0 + sqrt(1 - ab') eps exactly."""
    x0, eps = _randn(4, 16, seed=2), _randn(4, 16, seed=3)
    for t, prev_t in [(999, 0), (999, 998), (500, 123), (10, -1)]:
        xt = D.q_sample(x0, t, eps, AB)
        expected = x0 if prev_t < 0 else D.q_sample(x0, prev_t, eps, AB)
        torch.testing.assert_close(D.ddim_step(eps, t, xt, AB, prev_t), expected, rtol=0, atol=1e-10)


# --- eta = 1 is DDPM -------------------------------------------------------------------------


def test_eta_one_on_the_full_schedule_equals_the_ddpm_step():
    """At eta = 1, sigma^2 = beta_tilde and sqrt(1 - ab' - sigma^2) eps + sqrt(ab') x0 is the posterior mean.

    An identity of the maths, so it holds at every t to float64 rounding, given the same noise.
    """
    xt, out, noise = _randn(2, 1, 8, 8, seed=4), _randn(2, 1, 8, 8, seed=5), _randn(2, 1, 8, 8, seed=6)
    for t in range(T):
        ddim = D.ddim_step(out, t, xt, AB, t - 1, eta=1.0, noise=noise)
        ddpm = D.ddpm_step(out, t, xt, AB, noise if t > 0 else None)
        torch.testing.assert_close(ddim, ddpm, rtol=1e-9, atol=1e-9)


def test_eta_one_equals_respaced_ddpm_too():
    """The identity does not need the full schedule: any jump t -> prev_t matches DDPM's effective beta."""
    xt, out, noise = _randn(2, 1, 8, 8, seed=7), _randn(2, 1, 8, 8, seed=8), _randn(2, 1, 8, 8, seed=9)
    for t, prev_t in [(999, 949), (500, 300), (200, 0), (100, -1)]:
        ddim = D.ddim_step(out, t, xt, AB, prev_t, eta=1.0, noise=noise)
        ddpm = D.ddpm_step(out, t, xt, AB, noise, prev_t=prev_t)
        torch.testing.assert_close(ddim, ddpm, rtol=1e-9, atol=1e-9)


def test_with_clipping_eta_one_equals_ddpm_only_if_eps_is_rederived_from_the_clipped_x0():
    """DDPM's mean uses (clipped x0, x_t); DDIM's uses (clipped x0, the network's eps).

    They differ wherever clipping binds; they agree again when DDIM is given the eps that the
    clipped x0 implies (diffusers' ``use_clipped_model_output=True``).
    """
    xt, out, noise = 2 * _randn(2, 1, 8, 8, seed=10), _randn(2, 1, 8, 8, seed=11), _randn(2, 1, 8, 8, seed=12)
    t = 40  # near the data end, where x0_hat leaves [-1, 1]
    ddpm = D.ddpm_step(out, t, xt, AB, noise, clip_x0=True)
    ddim = D.ddim_step(out, t, xt, AB, t - 1, eta=1.0, noise=noise, clip_x0=True)
    assert (ddim - ddpm).abs().max() > 1e-3
    x0_clipped = D.x0_from_eps(xt, out, AB[t]).clamp(-1, 1)
    eps_clipped = D.eps_from_x0(xt, x0_clipped, AB[t])
    ddim_rederived = D.ddim_step(eps_clipped, t, xt, AB, t - 1, eta=1.0, noise=noise, clip_x0=True)
    torch.testing.assert_close(ddim_rederived, ddpm, rtol=1e-9, atol=1e-9)


def test_ddim_sampler_with_eta_one_and_every_step_is_the_ddpm_sampler():
    """Same generator, same draws: x_T, then one noise per step (DDIM's last draw is unused)."""
    ab = AB.float()
    ddim = D.ddim_sample(_toy_eps_model, (3, 1, 4, 4), ab, T, eta=1.0, generator=torch.Generator().manual_seed(0), clip_x0=False)
    ddpm = D.ddpm_sample(_toy_eps_model, (3, 1, 4, 4), ab, T, generator=torch.Generator().manual_seed(0), clip_x0=False)
    torch.testing.assert_close(ddim, ddpm, rtol=1e-4, atol=1e-4)


# --- the sampler -----------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_sample_equals_the_diffusers_loop(eta):
    ab = AB.float()
    ours = D.ddim_sample(_toy_eps_model, (2, 1, 4, 4), ab, 20, eta=eta, generator=torch.Generator().manual_seed(1))
    sched = DDIMScheduler(num_train_timesteps=T)  # clip_sample=True, like ddim_sample's default
    sched.set_timesteps(20)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 4, 4, generator=g)
    for t in sched.timesteps:
        x = sched.step(_toy_eps_model(x, t.expand(2)), t, x, eta=eta, generator=g).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_eta_zero_is_deterministic_given_the_latent():
    xT = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    a = D.ddim_sample(_toy_eps_model, xT.shape, AB.float(), 10, xT=xT, generator=torch.Generator().manual_seed(3))
    b = D.ddim_sample(_toy_eps_model, xT.shape, AB.float(), 10, xT=xT, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- inversion -------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [1, 5, 10, 20, 50, 100, 200, 500, 1000])
def test_inversion_round_trip_with_a_perfect_noise_predictor_is_exact(num_steps):
    """The notes' exercise: a known x0 (length 256), a predictor that returns the true noise.

    Inversion lands exactly on q_sample(x0, t_first, eps) and sampling comes back to x0 at any
    step count: with the true eps, eq. 12 moves along the exact trajectory, so there is no
    discretisation error to shrink.
    """
    x0 = torch.sin(torch.linspace(0, 6.28, 256, dtype=torch.float64)).view(1, 1, 16, 16)
    eps = _randn(1, 1, 16, 16, seed=13)
    perfect = lambda x, t: eps  # noqa: E731
    xT = D.ddim_invert(perfect, x0, AB, num_steps)
    t_first = D.ddim_timesteps(num_steps, T)[0]
    torch.testing.assert_close(xT, D.q_sample(x0, t_first, eps, AB), rtol=0, atol=1e-12)
    x0_back = D.ddim_sample(perfect, x0.shape, AB, num_steps, xT=xT, clip_x0=False)
    assert (x0_back - x0).pow(2).mean() < 1e-24, f"round trip MSE {(x0_back - x0).pow(2).mean():.1e}"


def test_ddim_invert_equals_diffusers_inverse_scheduler():
    sched = DDIMInverseScheduler(num_train_timesteps=T, clip_sample=False)
    sched.alphas_cumprod = AB.clone()
    sched.initial_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    sched.set_timesteps(25)
    x0 = 0.8 * torch.tanh(_randn(2, 1, 8, 8, seed=14))
    x = x0
    for t in sched.timesteps:
        x = sched.step(_toy_eps_model(x, t.expand(2)), t, x).prev_sample
    torch.testing.assert_close(D.ddim_invert(_toy_eps_model, x0, AB, 25), x, rtol=1e-10, atol=1e-10)


def test_inversion_with_an_x_dependent_model_is_approximate_and_improves_with_steps():
    """eps(x_s, t) stands in for eps(x_t, t): the round trip error shrinks as the steps shrink."""
    x0 = 0.8 * torch.tanh(_randn(2, 1, 8, 8, seed=15))
    errors = []
    for n in (10, 100, 1000):
        xT = D.ddim_invert(_toy_eps_model, x0, AB, n)
        back = D.ddim_sample(_toy_eps_model, x0.shape, AB, n, xT=xT, clip_x0=False)
        errors.append((back - x0).pow(2).mean().item())
    assert errors[0] > errors[1] > errors[2] and errors[0] > 1e-8, errors


# --- bad arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: D.ddim_timesteps(0), "num_steps"),
        (lambda: D.ddim_timesteps(1001), "num_steps"),
        (lambda: D.ddim_timesteps(2.5), "num_steps"),
        (lambda: D.ddim_timesteps(10, T=0), "T"),
        (lambda: D.ddim_step(torch.zeros(2), 1000, torch.zeros(2), AB, 10), "t"),
        (lambda: D.ddim_step(torch.zeros(2), 10, torch.zeros(2), AB, 10), "prev_t"),
        (lambda: D.ddim_step(torch.zeros(2), 10.0, torch.zeros(2), AB, 5), "t"),
        (lambda: D.ddim_step(torch.zeros(2), 10, torch.zeros(2), AB, 5, eta=-0.1), "eta"),
        (lambda: D.ddim_step(torch.zeros(2), 10, torch.zeros(2), AB, 5, eta=1.5), "eta"),
        (lambda: D.ddim_step(torch.zeros(2), 10, torch.zeros(2), AB, 5, eta=0.5), "noise"),
        (lambda: D.ddim_step(torch.zeros(2), 10, torch.zeros(2), AB, 5, eta=0.5, noise=torch.zeros(3)), "noise"),
        (lambda: D.ddim_step(torch.zeros(2), 10, torch.zeros(2), AB, 5, prediction_type="x0"), "prediction_type"),
        (lambda: D.ddim_sample(_toy_eps_model, (1, 1, 2, 2), AB, 0), "num_steps"),
        (lambda: D.ddim_sample(_toy_eps_model, (1, 1, 2, 2), AB, 5, xT=torch.zeros(1, 1, 3, 3)), "xT"),
        (lambda: D.ddim_invert(_toy_eps_model, torch.zeros(1, 1, 2, 2), AB, 5000), "num_steps"),
    ],
)
def test_bad_arguments_raise_a_value_error_naming_them(call, name):
    with pytest.raises(ValueError, match=name):
        call()
