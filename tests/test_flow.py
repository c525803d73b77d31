"""Flow matching: the path, its velocity, the Euler sampler against diffusers, the loss."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import helpers
from helpers import flow, training


def test_interpolate_end_points_and_midpoint():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    torch.testing.assert_close(flow.flow_interpolate(x0, noise, 0.0), x0)  # data at t = 0
    torch.testing.assert_close(flow.flow_interpolate(x0, noise, 1.0), noise)  # noise at t = 1
    torch.testing.assert_close(flow.flow_interpolate(x0, noise, 0.5), (x0 + noise) / 2)
    t = torch.tensor([0.0, 0.25, 0.75, 1.0])  # one time per example broadcasts over C, H, W
    xt = flow.flow_interpolate(x0, noise, t)
    for i in range(4):
        torch.testing.assert_close(xt[i], (1 - t[i]) * x0[i] + t[i] * noise[i])


def test_interpolate_equals_scheduler_scale_noise():
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    t = sched.timesteps[3]
    ref = sched.scale_noise(x0, t[None], noise)
    torch.testing.assert_close(flow.flow_interpolate(x0, noise, float(sched.sigmas[3])), ref)


def test_velocity_is_the_time_derivative():
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(3, 2, 5, 5, generator=g, dtype=torch.float64), torch.randn(3, 2, 5, 5, generator=g,
                                                                                      dtype=torch.float64)
    h = 1e-4
    for t in (0.1, 0.5, 0.9):
        fd = (flow.flow_interpolate(x0, noise, t + h) - flow.flow_interpolate(x0, noise, t - h)) / (2 * h)
        torch.testing.assert_close(fd, flow.flow_velocity(x0, noise), atol=1e-8, rtol=1e-8)


def test_one_euler_step_with_an_oracle_lands_on_the_data_point():
    # For a single data point x0 the true velocity field is v(x, t) = (x - x0) / t: the straight line
    # through x and x0. One Euler step from t = 1 to t = 0 lands exactly on x0, whatever the noise.
    x0 = torch.tensor([[0.7, -1.2]])

    def oracle(x, t):  # t given as t * 1000
        return (x - x0) / (t[:, None] / 1000)

    noise = torch.randn(5, 2, generator=torch.Generator().manual_seed(3))
    out = flow.flow_euler_sample(oracle, noise, num_steps=1)
    torch.testing.assert_close(out, x0.expand(5, 2), atol=1e-6, rtol=0)
    out = flow.flow_euler_sample(oracle, noise, num_steps=7, shift=3.0)  # more steps stay on the line
    torch.testing.assert_close(out, x0.expand(5, 2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("num_steps", [1, 4, 28])
def test_sigmas_equal_the_scheduler(shift, num_steps):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(num_steps)
    sigmas = flow.flow_sigmas(num_steps, shift)
    assert torch.equal(sigmas, sched.sigmas)
    assert torch.equal(sigmas[:-1] * 1000, sched.timesteps)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_sample_equals_scheduler_loop(shift):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 16, 3, padding=1), torch.nn.SiLU(),
                              torch.nn.Conv2d(16, 1, 3, padding=1))

    def model(x, t):  # a small time-dependent velocity network
        return net(torch.cat([x, (t / 1000)[:, None, None, None].expand_as(x)], dim=1))

    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    ours = flow.flow_euler_sample(model, noise, num_steps=12, shift=shift)
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(12)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model(x, t.expand(len(x))), t, x).prev_sample
    assert (ours - x).abs().max().item() < 1e-5


def test_guidance_combines_cond_and_uncond():
    def model(x, t, class_labels):  # velocity depends on the label: v = x - label
        return x - class_labels[:, None].float()

    noise = torch.zeros(3, 2)
    labels = torch.tensor([1, 2, 3])
    out = flow.flow_euler_sample(model, noise, 1, guidance_scale=2.0, null_cond={"class_labels": torch.tensor(0)},
                                 class_labels=labels)
    # one step, dt = -1: x = 0 - v, v = v_u + 2 (v_c - v_u) = 0 + 2 * (-label) ;  so x = 2 * label
    torch.testing.assert_close(out, 2 * labels[:, None].float().expand(3, 2))
    with pytest.raises(ValueError, match="null_cond"):
        flow.flow_euler_sample(model, noise, 1, guidance_scale=2.0, class_labels=labels)


def test_objective_equals_hand_computation():
    x0 = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    labels = torch.arange(6)

    def model(x, t, class_labels):
        return 0.5 * x + t[:, None, None, None] / 1000 + class_labels[:, None, None, None]

    for sampling in flow.T_SAMPLINGS:
        torch.manual_seed(7)
        loss = flow.flow_objective(sampling, **{"0": "class_labels"})(model, (x0, labels))
        torch.manual_seed(7)
        u = torch.rand(6) if sampling == "uniform" else torch.sigmoid(torch.randn(6))
        noise = torch.randn_like(x0)
        xt = (1 - u[:, None, None, None]) * x0 + u[:, None, None, None] * noise
        expected = ((model(xt, u * 1000, labels) - (noise - x0)) ** 2).mean()
        torch.testing.assert_close(loss, expected)


def test_objective_custom_forward_and_dropout():
    seen = {}

    def forward(model, xt, timestep, **cond):
        seen.update(cond, timestep=timestep)
        return model(xt)

    x0, labels = torch.randn(64, 2), torch.arange(64) % 10
    loss = flow.flow_objective(timestep_scale=1.0, cond_dropout=0.5, null_cond={"y": torch.tensor(10)},
                               forward=forward, **{"0": "y"})
    loss(torch.nn.Identity(), (x0, labels))
    assert seen["timestep"].max() <= 1.0  # timestep_scale=1: the network sees t in [0, 1]
    dropped = seen["y"] == 10
    assert 10 < dropped.sum() < 54 and torch.equal(seen["y"][~dropped], labels[~dropped])


def test_loss_falls_when_training_a_tiny_model():
    # 2-D data: two points. A small MLP on (x, t) learns the velocity field; the loss must fall.
    data = torch.tensor([[1.0, 1.0], [-1.0, -1.0]]).repeat(256, 1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64), torch.nn.SiLU(),
                              torch.nn.Linear(64, 2))

    def forward(model, x, t):
        return model(torch.cat([x, t[:, None]], dim=1))

    result = training.train(net, data, flow.flow_objective(timestep_scale=1.0, forward=forward), steps=300,
                            batch_size=128, lr=3e-3, warmup_steps=10, ema_decay=None, progress=False)
    first, last = sum(result.losses[:20]) / 20, sum(result.losses[-20:]) / 20
    assert last < 0.6 * first, (first, last)
    samples = flow.flow_euler_sample(net, torch.randn(200, 2, generator=torch.Generator().manual_seed(1)), 20,
                                     timestep_scale=1.0, forward=forward)
    nearest = torch.cdist(samples, torch.tensor([[1.0, 1.0], [-1.0, -1.0]])).min(dim=1).values
    assert nearest.median() < 0.3


def test_bad_arguments_raise():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="t must lie"):
        flow.flow_interpolate(x, x, 1.5)
    with pytest.raises(ValueError, match="same shape"):
        flow.flow_velocity(x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="entries"):
        flow.flow_interpolate(x, x, torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="t_sampling"):
        flow.flow_objective("lognormal")
    with pytest.raises(ValueError, match="null_cond"):
        flow.flow_objective(cond_dropout=0.1, **{"0": "class_labels"})
    with pytest.raises(ValueError, match="forward"):
        flow.flow_objective(forward="denoise")
    with pytest.raises(ValueError, match="num_steps"):
        flow.flow_sigmas(0)
    with pytest.raises(ValueError, match="shift"):
        flow.flow_sigmas(4, shift=0.0)


# --- one family of Gaussian paths: conversions between predictions ---------------------------

def _pair(shape=(6, 2, 3)):
    g = torch.Generator().manual_seed(3)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("alpha, sigma", [(0.9 ** 0.5, 0.1 ** 0.5), (0.3, 0.7), (1e-3, 1.0)])
def test_every_prediction_converts_to_every_other_exactly(alpha, sigma):
    x0, eps = _pair()
    xt = alpha * x0 + sigma * eps
    truth = {"epsilon": eps, "sample": x0, "score": -eps / sigma, "v_prediction": alpha * eps - sigma * x0,
             "flow": eps - x0}
    for source in flow.PREDICTIONS:
        for target in flow.PREDICTIONS:
            got = flow.convert(truth[source], source, target, xt, alpha, sigma)
            torch.testing.assert_close(got, truth[target], rtol=1e-9, atol=1e-9 / alpha)


def test_conversions_agree_with_diffusion_helpers_and_the_score_of_q():
    from helpers import diffusion

    x0, eps = _pair()
    ab = torch.tensor(0.37, dtype=torch.float64)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    v = diffusion.v_from_x0_eps(x0, eps, ab)
    torch.testing.assert_close(flow.convert(v, "v_prediction", "sample", xt, ab.sqrt(), (1 - ab).sqrt()),
                               diffusion.x0_from_v(xt, v, ab))
    x = xt.clone().requires_grad_(True)  # the score of q(x_t | x0) by autograd
    log_q = torch.distributions.Normal(ab.sqrt() * x0, (1 - ab).sqrt()).log_prob(x).sum()
    (score,) = torch.autograd.grad(log_q, x)
    torch.testing.assert_close(flow.convert(eps, "epsilon", "score", xt, ab.sqrt(), (1 - ab).sqrt()), score)


def test_flow_time_maps_a_vp_point_onto_the_straight_path_and_euler_there_is_ddim():
    from helpers import diffusion

    x0, eps = _pair()
    alpha_bar = helpers.get_schedule("linear", dtype=torch.float64).alpha_bar
    t, t_prev = 700, 400
    a, s = alpha_bar[t].sqrt(), (1 - alpha_bar[t]).sqrt()
    xt = a * x0 + s * eps
    x_flow, time = flow.flow_time(xt, a, s)
    torch.testing.assert_close(x_flow, flow.flow_interpolate(x0, eps, float(time)))
    # One Euler step of the flow ODE with the converted velocity lands on DDIM's step.
    eps_hat = eps + 0.1 * x0  # any network output
    u = flow.convert(eps_hat, "epsilon", "flow", xt, a, s)
    a2, s2 = alpha_bar[t_prev].sqrt(), (1 - alpha_bar[t_prev]).sqrt()
    _, time_prev = flow.flow_time(xt, a2, s2)
    euler = (x_flow + (time_prev - time) * u) * (a2 + s2)
    torch.testing.assert_close(euler, diffusion.ddim_step(eps_hat, t, xt, alpha_bar, t_prev))


def test_convert_names_its_bad_arguments():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="source"):
        flow.convert(x, "noise", "sample", x, 0.5, 0.5)
    with pytest.raises(ValueError, match="target"):
        flow.convert(x, "epsilon", "x0", x, 0.5, 0.5)
    with pytest.raises(ValueError, match="same shape"):
        flow.convert(x, "epsilon", "sample", torch.zeros(3), 0.5, 0.5)
    with pytest.raises(ValueError, match="sigma > 0"):
        flow.convert(x, "epsilon", "sample", x, 1.0, 0.0)


# --- SD3's samplers of t: logit-normal and mode (Esser et al. 2024, sec. 3.1) -------------------

def _cdf_from_density(density, grid):
    """The CDF on ``grid`` by the trapezoid rule: what a density promises about its samples."""
    p = density(grid)
    return torch.cat([torch.zeros(1, dtype=p.dtype), torch.cumulative_trapezoid(p, grid)])


def _ks(samples, grid, cdf):
    """Kolmogorov-Smirnov distance between the samples' empirical CDF and ``cdf``, both on ``grid``."""
    empirical = torch.searchsorted(samples.double().sort().values, grid, right=True) / len(samples)
    return (empirical - cdf).abs().max().item()


@pytest.mark.parametrize("m, s", [(0.0, 1.0), (0.5, 0.6), (-1.0, 2.0)])
def test_logit_normal_sampler_equals_diffusers_and_its_density_is_a_transformed_normal(m, s):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    ours = flow.sample_logit_normal(1000, m, s, generator=torch.Generator().manual_seed(0))
    theirs = compute_density_for_timestep_sampling("logit_normal", 1000, logit_mean=m, logit_std=s,
                                                   generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, theirs)
    # The density is N(m, s^2) pushed through the sigmoid: torch's own change of variables.
    ref = torch.distributions.TransformedDistribution(torch.distributions.Normal(torch.tensor(m, dtype=torch.float64),
                                                                                 torch.tensor(s, dtype=torch.float64)),
                                                      [torch.distributions.transforms.SigmoidTransform()])
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    torch.testing.assert_close(flow.logit_normal_density(t, m, s), ref.log_prob(t).exp(), rtol=1e-10, atol=1e-12)
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    cdf = _cdf_from_density(lambda x: flow.logit_normal_density(x, m, s), grid)
    assert abs(cdf[-1].item() - 1) < 1e-6  # a density: it integrates to 1
    big = flow.sample_logit_normal(40_000, m, s, generator=torch.Generator().manual_seed(1))
    assert _ks(big, grid, cdf) < 1.63 / 40_000**0.5  # within the KS test's 1 % critical value


def test_flow_objective_draws_its_logit_normal_times_with_sample_logit_normal():
    torch.manual_seed(3)
    expected = torch.sigmoid(torch.randn(5))  # what flow_objective drew before the helper existed
    torch.manual_seed(3)
    torch.testing.assert_close(flow.sample_logit_normal(5), expected, rtol=0, atol=0)


@pytest.mark.parametrize("s", [-1.0, -0.5, 0.0, 1.29, 2 / (torch.pi - 2)])
def test_mode_sampler_equals_diffusers(s):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    ours = flow.mode_sample(1000, s, generator=torch.Generator().manual_seed(0))
    theirs = compute_density_for_timestep_sampling("mode", 1000, mode_scale=s, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, theirs)
    assert ours.min() >= 0 and ours.max() <= 1


@pytest.mark.parametrize("s", [-0.5, 0.5, 1.29])  # inside the range: at its ends the density is infinite somewhere
def test_mode_density_is_the_density_of_the_mode_sampler(s):
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    p = flow.mode_density(grid, s)
    torch.testing.assert_close(p, p.flip(0), rtol=1e-9, atol=1e-9)  # f_mode(1 - u) = 1 - f_mode(u): symmetric
    # Change of variables, directly: t = f(u) has density 1 / |f'(u)| at t, with f' by autograd.
    u = torch.rand(50, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    f = 1 - u - s * (torch.cos(torch.pi * u / 2) ** 2 - 1 + u)
    (df,) = torch.autograd.grad(f.sum(), u)
    torch.testing.assert_close(flow.mode_density(f.detach(), s), 1 / df.abs(), rtol=1e-8, atol=1e-10)
    cdf = _cdf_from_density(lambda x: flow.mode_density(x, s), grid)
    assert abs(cdf[-1].item() - 1) < 1e-6
    big = flow.mode_sample(40_000, s, generator=torch.Generator().manual_seed(1))
    assert _ks(big, grid, cdf) < 1.63 / 40_000**0.5


def test_mode_with_zero_scale_is_uniform():
    u = torch.rand(7, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(flow.mode_sample(7, 0.0, generator=torch.Generator().manual_seed(4)), 1 - u)
    torch.testing.assert_close(flow.mode_density(torch.linspace(0, 1, 11), 0.0), torch.ones(11, dtype=torch.float64))


def test_samplers_of_t_name_their_bad_arguments():
    with pytest.raises(ValueError, match="n must be a positive int"):
        flow.sample_logit_normal(0)
    with pytest.raises(ValueError, match="n must be a positive int"):
        flow.mode_sample(2.5, 1.0)
    with pytest.raises(ValueError, match="s \\(the scale of logit t\\)"):
        flow.sample_logit_normal(4, 0.0, 0.0)
    with pytest.raises(ValueError, match="m \\(the location"):
        flow.logit_normal_density(0.5, float("nan"))
    with pytest.raises(ValueError, match="t must lie in \\[0, 1\\]"):
        flow.logit_normal_density(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="mode sampler's scale"):
        flow.mode_sample(4, 2.0)  # f_mode is no longer monotone: not a distribution on [0, 1]
    with pytest.raises(ValueError, match="mode sampler's scale"):
        flow.mode_density(0.5, -1.5)
    with pytest.raises(ValueError, match="t must lie in \\[0, 1\\]"):
        flow.mode_density(-0.1, 1.0)


# --- SD3's shift: one map of t, a constant offset of the log-SNR ------------------------------

@pytest.mark.parametrize("shift", [0.5, 2.0, 3.0])
def test_shift_is_diffusers_map_and_moves_log_snr_by_a_constant(shift):
    # diffusers applies the same map to its training grid ...
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    grid = torch.from_numpy(__import__("numpy").linspace(1, 1000, 1000, dtype="float32")[::-1].copy()) / 1000
    torch.testing.assert_close(sched.sigmas, flow.shift_sigmas(grid, shift))
    # ... and to any sigmas it is given.
    sched.set_timesteps(sigmas=[0.9, 0.5, 0.1])
    torch.testing.assert_close(sched.sigmas[:-1], flow.shift_sigmas(torch.tensor([0.9, 0.5, 0.1]), shift))
    # On the straight path SNR = ((1 - t) / t)^2, so the shift divides it by shift^2 at every t.
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    log_snr = lambda x: 2 * torch.log((1 - x) / x)
    torch.testing.assert_close(log_snr(flow.shift_sigmas(t, shift)) - log_snr(t),
                               torch.full_like(t, -2 * __import__("math").log(shift)), rtol=0, atol=1e-12)
