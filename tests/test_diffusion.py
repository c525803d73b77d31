"""The reverse process: parameterisations, posterior, DDPM step and sampler, against diffusers."""

import pytest
import torch
from diffusers import DDPMScheduler

import helpers
from helpers import diffusion as D

AB = helpers.get_schedule("linear", dtype=torch.float64).alpha_bar


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_parameterisations_round_trip_exactly():
    """Given xt, any one of eps, x0 and v determines the other two."""
    x0, eps = _randn(5, 1, 4, 4, seed=1), _randn(5, 1, 4, 4, seed=2)
    ab = AB[torch.tensor([0, 10, 300, 700, 999])]
    xt = helpers.q_sample(x0, torch.tensor([0, 10, 300, 700, 999]), eps, AB)
    v = D.v_from_x0_eps(x0, eps, ab)
    torch.testing.assert_close(D.x0_from_eps(xt, eps, ab), x0, rtol=0, atol=1e-8)
    torch.testing.assert_close(D.eps_from_x0(xt, x0, ab), eps, rtol=0, atol=1e-9)
    torch.testing.assert_close(D.x0_from_v(xt, v, ab), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(D.eps_from_v(xt, v, ab), eps, rtol=0, atol=1e-12)
    # v is a rotation of (x0, eps): it has unit variance when both do.
    big_x0, big_eps = _randn(200000, seed=3), _randn(200000, seed=4)
    assert abs(D.v_from_x0_eps(big_x0, big_eps, AB[500]).var() - 1) < 0.02


def test_posterior_is_the_bayes_product_of_two_gaussians():
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): precision-weighted mean, summed precisions."""
    x0, xt = _randn(10, seed=5), _randn(10, seed=6)
    for t in (1, 50, 999):
        ab_prev, ab_t = AB[t - 1], AB[t]
        beta = 1 - ab_t / ab_prev
        # As a function of x_{t-1}: q(x_t|x_{t-1}) = N(x_t; sqrt(1-beta) x_{t-1}, beta)
        #   -> precision (1-beta)/beta, mean x_t/sqrt(1-beta); q(x_{t-1}|x_0) = N(sqrt(ab_prev) x0, 1-ab_prev).
        p1, m1 = (1 - beta) / beta, xt / (1 - beta).sqrt()
        p2, m2 = 1 / (1 - ab_prev), ab_prev.sqrt() * x0
        mean, var = D.posterior_mean_variance(x0, xt, t, AB)
        torch.testing.assert_close(var, 1 / (p1 + p2), rtol=1e-10, atol=0)
        torch.testing.assert_close(mean, (p1 * m1 + p2 * m2) / (p1 + p2), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_step_equals_diffusers_scheduler_step(prediction_type, clip):
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=clip)
    ab = helpers.get_schedule("linear").alpha_bar
    xt, out = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    for t in (999, 500, 1, 0):
        ref = sched.step(out, t, xt, generator=torch.Generator().manual_seed(t)).prev_sample
        noise = torch.randn(xt.shape, generator=torch.Generator().manual_seed(t))  # the scheduler's draw
        ours = D.ddpm_step(out, t, xt, ab, noise, prediction_type=prediction_type, clip_x0=clip)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_ddpm_sample_with_respacing_equals_the_diffusers_loop():
    """Our sampler and DDPMScheduler with set_timesteps(50) produce the same images."""
    ab = helpers.get_schedule("linear").alpha_bar
    model = lambda x, t: 0.1 * x + 0.01 * t.float().view(-1, 1, 1, 1) / 1000  # any deterministic denoiser
    ours = D.ddpm_sample(model, (2, 1, 4, 4), ab, num_steps=50, generator=torch.Generator().manual_seed(0))
    sched = DDPMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 4, 4, generator=g)
    for t in sched.timesteps:
        x = sched.step(model(x, t.expand(2)), int(t), x, generator=g).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_worked_reverse_step_of_the_notes():
    """x1 = [0.863, -0.396] made with eps = [0.5, -0.7]; the reverse mean with the true eps gives x0 back."""
    x0, eps = torch.tensor([0.8, -0.3], dtype=torch.float64), torch.tensor([0.5, -0.7], dtype=torch.float64)
    ab = torch.tensor([0.98], dtype=torch.float64)
    x1 = helpers.q_sample(x0, 0, eps, ab)
    torch.testing.assert_close(D.ddpm_step(eps, 0, x1, ab), x0)


def test_diffusion_loss_targets():
    x0, eps = _randn(4, 3, seed=7), _randn(4, 3, seed=8)
    ab = torch.full((4, 1), 0.3, dtype=torch.float64)
    assert D.diffusion_loss(eps, x0, eps, ab, "epsilon") == 0
    assert D.diffusion_loss(x0, x0, eps, ab, "sample") == 0
    assert D.diffusion_loss(D.v_from_x0_eps(x0, eps, ab), x0, eps, ab, "v_prediction") == 0
    torch.testing.assert_close(D.diffusion_loss(x0, x0, eps, ab, "epsilon"), ((x0 - eps) ** 2).mean())
    with pytest.raises(ValueError, match="prediction_type"):
        D.diffusion_loss(x0, x0, eps, ab, "score")


def test_reverse_step_errors_name_the_argument():
    ab = helpers.get_schedule("linear", T=10).alpha_bar
    with pytest.raises(ValueError, match="noise"):
        D.ddpm_step(torch.zeros(2), 5, torch.zeros(2), ab)
    with pytest.raises(ValueError, match="prev_t"):
        D.posterior_mean_variance(torch.zeros(2), torch.zeros(2), 5, ab, prev_t=7)
    with pytest.raises(ValueError, match="num_steps"):
        D.ddpm_sample(lambda x, t: x, (1, 2), ab, num_steps=11)


def test_classifier_free_guidance_matches_the_notes_table_and_both_conventions():
    """The notes' vectors: w=0 is uncond, w=1 cond, w=7.5 and 15 extrapolate; w_diffusers = 1 + w_paper."""
    uncond, cond = torch.tensor([0.20, -0.10, 0.05]), torch.tensor([0.05, -0.35, 0.20])
    assert torch.equal(D.classifier_free_guidance(uncond, cond, 0.0), uncond)
    torch.testing.assert_close(D.classifier_free_guidance(uncond, cond, 1.0), cond)
    torch.testing.assert_close(D.classifier_free_guidance(uncond, cond, 7.5), torch.tensor([-0.925, -1.975, 1.175]))
    torch.testing.assert_close(D.classifier_free_guidance(uncond, cond, 15.0), torch.tensor([-2.05, -3.85, 2.3]))
    w_paper = 6.5
    torch.testing.assert_close(D.classifier_free_guidance(uncond, cond, 1 + w_paper),
                               (1 + w_paper) * cond - w_paper * uncond)
    with pytest.raises(ValueError, match="same shape"):
        D.classifier_free_guidance(uncond, cond[:2], 2.0)


def test_class_guided_is_cfg_on_the_doubled_batch_and_one_call_at_w_0_and_1():
    """ClassGuided equals the two-call CFG formula, and at w = 0, 1 the plain unconditional/conditional call."""
    torch.manual_seed(0)
    model = helpers.models.digits_unet(widths=(16, 32), attention=False, num_class_embeds=11).eval()
    x, t, labels = torch.randn(6, 1, 8, 8), torch.full((6,), 400), torch.tensor([0, 1, 2, 3, 4, 5])
    null = torch.full_like(labels, 10)
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    with torch.no_grad():
        eps_u, eps_c = D.denoise(model, x, t, class_labels=null), D.denoise(model, x, t, class_labels=labels)
        calls.clear()
        guided = D.ClassGuided(model, labels, 3.0, null_label=10)(x, t)
        assert calls == [12], "one call on the doubled batch"
        torch.testing.assert_close(guided, eps_u + 3.0 * (eps_c - eps_u), atol=1e-5, rtol=1e-5)
        calls.clear()
        torch.testing.assert_close(D.ClassGuided(model, labels, 0, null_label=10)(x, t), eps_u)
        torch.testing.assert_close(D.ClassGuided(model, labels, 1.0, null_label=10)(x, t), eps_c)
        assert calls == [6, 6], "w = 0 and w = 1 need no guidance: one plain call each"
    with pytest.raises(ValueError, match="labels"):
        D.ClassGuided(model, labels.float(), 2.0, null_label=10)
    with pytest.raises(ValueError, match="null_label"):
        D.ClassGuided(model, labels, 2.0, null_label=10.0)
    with pytest.raises(ValueError, match="x has 5 samples"):
        D.ClassGuided(model, labels, 2.0, null_label=10)(x[:5], t[:5])
