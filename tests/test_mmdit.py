"""helpers.mmdit: joint attention against diffusers, the tiny SD3 pipeline, consistency distillation."""

import copy

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.models.attention import JointTransformerBlock

import helpers
from helpers import flow, mmdit, text, training
from helpers.diffusion import ddim_timesteps


@pytest.mark.parametrize("context_pre_only", [False, True])
def test_joint_attention_equals_diffusers_processor(context_pre_only):
    torch.manual_seed(0)
    block = JointTransformerBlock(dim=32, num_attention_heads=2, attention_head_dim=16,
                                  context_pre_only=context_pre_only)
    x, c = torch.randn(3, 16, 32), torch.randn(3, 5, 32)
    with torch.no_grad():
        ours = mmdit.joint_attention(block.attn, x, c)
        theirs = block.attn(hidden_states=x, encoder_hidden_states=c)  # JointAttnProcessor2_0
        weights = mmdit.joint_attention(block.attn, x, c, return_weights=True)
    if context_pre_only:  # diffusers returns the text part unprojected; the last SD3 block discards it
        assert ours[1] is None
    else:
        torch.testing.assert_close(ours[1], theirs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=1e-5)
    assert weights.shape == (3, 2, 21, 21)  # one softmax over all 16 + 5 tokens
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 2, 21))


def test_joint_attention_lets_text_read_the_image():
    # The property cross-attention lacks: the text stream's output depends on the image tokens.
    torch.manual_seed(0)
    block = JointTransformerBlock(dim=32, num_attention_heads=2, attention_head_dim=16, context_pre_only=False)
    x, c = torch.randn(1, 16, 32), torch.randn(1, 5, 32)
    with torch.no_grad():
        _, c_out = mmdit.joint_attention(block.attn, x, c)
        _, c_out2 = mmdit.joint_attention(block.attn, x + 1.0, c)
    assert (c_out - c_out2).abs().max() > 1e-3
    with pytest.raises(ValueError, match="x and c"):
        mmdit.joint_attention(block.attn, x[0], c)


def test_attention_cost_counts_scores():
    assert mmdit.attention_cost(16, 12) == {"queries": 28, "keys": 28, "scores": 28 * 28}
    assert mmdit.attention_cost(16, 12, joint=False) == {"queries": 16, "keys": 28, "scores": 16 * 16 + 16 * 12}
    with pytest.raises(ValueError, match="n_image"):
        mmdit.attention_cost(0, 3)


def test_tiny_mmdit_keeps_the_latent_shape():
    torch.manual_seed(0)
    model = mmdit.tiny_mmdit(width=32, heads=2, layers=2)
    x = torch.randn(2, 4, 8, 8)
    out = mmdit.sd3_forward(model, x, torch.tensor([10.0, 900.0]), torch.randn(2, 12, 64), torch.randn(2, 64))
    assert out.shape == x.shape
    assert model.config.caption_projection_dim == 32  # text projected to the image width
    with pytest.raises(ValueError, match="multiple of heads"):
        mmdit.tiny_mmdit(width=30, heads=4)
    with pytest.raises(ValueError, match="patch_size"):
        mmdit.tiny_mmdit(size=8, patch_size=3)


@pytest.mark.parametrize("n", [1, 2, 4, 10, 40])
def test_trailing_timesteps_equal_diffusers(n):
    scheduler = DDIMScheduler(timestep_spacing="trailing")
    scheduler.set_timesteps(n)
    assert ddim_timesteps(n, spacing="trailing") == scheduler.timesteps.tolist()
    assert ddim_timesteps(n, spacing="trailing")[0] == 999  # unlike the leading spacing, always from the noisy end


def test_trailing_timesteps_rejects_bad_counts():
    for bad in [0, 1001, 2.0]:
        with pytest.raises(ValueError, match="num_steps"):
            ddim_timesteps(bad, spacing="trailing")


class _Oracle(torch.nn.Module):
    """The exact prediction for a data set of one image x0: its eps, or v = sqrt(ab) eps - sqrt(1 - ab) x0.

    As an eps-prediction it is the teacher whose ODE ends at x0 from anywhere; as a v-prediction,
    read by consistency_x0, it is that ODE's exact consistency function.
    """

    def __init__(self, x0, alpha_bar, prediction: str = "v"):
        super().__init__()
        self.x0, self.alpha_bar, self.prediction = x0, alpha_bar, prediction

    def forward(self, x, t):
        ab = helpers.append_dims(self.alpha_bar[t], x.ndim)
        eps = (x - ab.sqrt() * self.x0) / (1 - ab).sqrt()
        return eps if self.prediction == "eps" else ab.sqrt() * eps - (1 - ab).sqrt() * self.x0


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_consistency_sample_with_the_exact_function_returns_the_data(num_steps):
    alpha_bar = helpers.get_schedule("linear").alpha_bar
    x0 = torch.rand(1, 1, 8, 8) * 1.6 - 0.8
    noise = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = mmdit.consistency_sample(_Oracle(x0, alpha_bar), noise, alpha_bar, num_steps,
                                   generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x0.expand_as(out), atol=1e-4, rtol=0)


def test_ddim_trajectories_one_step_is_one_ddim_step():
    alpha_bar = helpers.get_schedule("linear").alpha_bar
    torch.manual_seed(0)
    model = helpers.models.digits_unet(widths=(16, 16), attention=False).eval()
    noise = torch.randn(4, 1, 8, 8)
    x0, states = mmdit.ddim_trajectories(model, noise, alpha_bar, 1)
    with torch.no_grad():
        expected = helpers.diffusion.ddim_step(model(noise, 999).sample, 999, noise, alpha_bar, -1, clip_x0=True)
    torch.testing.assert_close(x0, expected)
    assert list(states) == [999] and torch.equal(states[999], noise)
    with pytest.raises(ValueError, match="keep"):
        mmdit.ddim_trajectories(model, noise, alpha_bar, 2, keep=[749])


def test_consistency_regression_loss_falls():
    alpha_bar = helpers.get_schedule("linear").alpha_bar
    grid = ddim_timesteps(4, spacing="trailing")
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(64, 1, 8, 8, generator=g) * 2 - 1
    states = torch.stack([alpha_bar[t].sqrt() * x0 + (1 - alpha_bar[t]).sqrt() * torch.randn(x0.shape, generator=g)
                          for t in grid], 1)  # (64, 4, 1, 8, 8)
    torch.manual_seed(0)
    model = helpers.models.digits_unet(widths=(16, 16), attention=False)
    loss_fn = mmdit.consistency_regression_loss(alpha_bar, grid)
    result = training.train(model, (x0, states), loss_fn, steps=60, batch_size=32, lr=3e-3, warmup_steps=5,
                            ema_decay=None, progress=False)
    assert sum(result.losses[-10:]) / 10 < 0.7 * sum(result.losses[:10]) / 10
    with pytest.raises(ValueError, match="states"):
        loss_fn(model, (x0[:4], states[:4, :2]))


def test_consistency_distillation_loss_is_zero_for_the_exact_consistency_function():
    # One training image: the teacher's ODE maps every x_t to it, so the true consistency function
    # (the v-oracle read by consistency_x0) has zero loss at every adjacent pair, the boundary included.
    alpha_bar = helpers.get_schedule("linear").alpha_bar.double()
    x0 = (torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.6 - 0.8)
    teacher, exact = _Oracle(x0, alpha_bar, "eps"), _Oracle(x0, alpha_bar)
    loss_fn = mmdit.consistency_distillation_loss(teacher, _Oracle(x0, alpha_bar), alpha_bar, 4, target_decay=0.9)
    torch.manual_seed(0)
    values = [loss_fn(exact, x0.expand(6, -1, -1, -1)).item() for _ in range(40)]  # 40 draws of the 4 + 1 pairs
    assert max(values) < 1e-20, max(values)
    # The consistency function of another data set (every x_t -> 0) is self-consistent too: only the
    # boundary pair, whose target is the teacher's x0 estimate, sees that it ends at the wrong image.
    wrong = _Oracle(torch.zeros_like(x0), alpha_bar)
    loss_fn = mmdit.consistency_distillation_loss(teacher, _Oracle(torch.zeros_like(x0), alpha_bar), alpha_bar, 4,
                                                  target_decay=0.9)
    values = torch.tensor([loss_fn(wrong, x0.expand(6, -1, -1, -1)).item() for _ in range(40)], dtype=x0.dtype)
    boundary = values > 1e-6
    assert 0 < boundary.sum() < len(values) and values[~boundary].max() < 1e-20
    torch.testing.assert_close(values[boundary], x0.pow(2).mean().expand(int(boundary.sum())))  # |0 - x0|^2
    # pair= picks the pair: the wrong function is consistent on the grid's pairs and off only at the boundary
    by_pair = [loss_fn(wrong, x0.expand(6, -1, -1, -1), pair=n).item() for n in range(4)]
    assert max(by_pair[:3]) < 1e-20 and by_pair[3] == pytest.approx(x0.pow(2).mean().item(), rel=1e-9), by_pair
    for bad in [-1, 4, 1.0]:
        with pytest.raises(ValueError, match="pair"):
            loss_fn(wrong, x0, pair=bad)


def test_consistency_distillation_loss_moves_only_the_student_and_pulls_the_target():
    alpha_bar = helpers.get_schedule("linear").alpha_bar
    torch.manual_seed(0)
    teacher = helpers.models.digits_unet(widths=(16, 16), attention=False).eval()
    student = helpers.models.digits_unet(widths=(16, 16), attention=False)
    target = helpers.models.digits_unet(widths=(16, 16), attention=False)
    before = [p.detach().clone() for p in target.parameters()]
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    loss_fn = mmdit.consistency_distillation_loss(teacher, target, alpha_bar, 10, target_decay=0.75)
    value = loss_fn(student, torch.rand(8, 1, 8, 8) * 2 - 1)
    value.backward()
    assert all(p.grad is None for p in target.parameters()) and all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    for p_target, p_before, p in zip(target.parameters(), before, student.parameters()):  # target <- 0.75 target + 0.25 student
        torch.testing.assert_close(p_target.detach(), 0.75 * p_before + 0.25 * p.detach())
    assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), teacher_before))
    for bad in [1.0, -0.1]:
        with pytest.raises(ValueError, match="target_decay"):
            mmdit.consistency_distillation_loss(teacher, target, alpha_bar, 10, target_decay=bad)
    with pytest.raises(ValueError, match="x0"):
        loss_fn(student, (torch.zeros(2, 1, 8, 8),))


def test_consistency_distillation_learns_the_data_through_the_boundary():
    # The teacher knows one image; the student starts knowing nothing (a fresh network). Only the
    # boundary pair ties the bootstrapped loss to data, so a one-step sample that lands near the
    # image proves the information climbed the whole grid, from t = -1 to t = 999.
    alpha_bar = helpers.get_schedule("linear").alpha_bar
    x0 = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    torch.manual_seed(0)
    student = helpers.models.digits_unet(widths=(16, 16), attention=False)
    loss_fn = mmdit.consistency_distillation_loss(_Oracle(x0, alpha_bar, "eps"), copy.deepcopy(student), alpha_bar, 2,
                                                  target_decay=0.5)
    noise = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    before = (mmdit.consistency_sample(student.eval(), noise, alpha_bar, 1) - x0).abs().mean()
    training.train(student.train(), x0.expand(64, -1, -1, -1), loss_fn, steps=150, batch_size=32, lr=3e-3, warmup_steps=5,
                   ema_decay=None, progress=False)
    after = (mmdit.consistency_sample(student.eval(), noise, alpha_bar, 1) - x0).abs().mean()
    assert after < 0.2 * before, (before, after)


def test_sd3_pipeline_equals_the_explicit_euler_loop():
    torch.manual_seed(0)
    clip, vae = text.tiny_clip(), helpers.models.shapes_vae()
    transformer = mmdit.tiny_mmdit(width=32, heads=2, layers=2, text_dim=128, pooled_dim=128)
    pipe = mmdit.assemble_sd3_pipeline(transformer, vae, clip, text.shapes_tokenizer())
    prompts = ["a large red circle on the left", "a small blue square at the top"]
    noise = torch.randn(2, 4, 8, 8)
    latents = pipe(prompts, guidance_scale=3.0, num_inference_steps=4, latents=noise, output_type="latent",
                   max_sequence_length=0).images
    with torch.no_grad():
        e, _, p, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=0)
        ne, _, npo, _ = pipe.encode_prompt([""], None, None, do_classifier_free_guidance=False, max_sequence_length=0)
    assert e.shape == (2, text.MAX_LENGTH, 128) and p.shape == (2, 128)
    ours = flow.flow_euler_sample(transformer, noise, 4, forward=mmdit.sd3_forward, guidance_scale=3.0,
                                  null_cond={"encoder_hidden_states": ne[0], "pooled_projections": npo[0]},
                                  encoder_hidden_states=e, pooled_projections=p)
    torch.testing.assert_close(latents, ours, atol=1e-5, rtol=1e-5)
    images = pipe(prompts[:1], num_inference_steps=2, output_type="pt", max_sequence_length=0).images
    assert images.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="joint_attention_dim"):
        mmdit.assemble_sd3_pipeline(mmdit.tiny_mmdit(width=32, heads=2, layers=1), vae, clip, text.shapes_tokenizer())


def test_ddim_timesteps_rejects_an_unknown_spacing():
    with pytest.raises(ValueError, match="spacing"):
        ddim_timesteps(4, spacing="linspace")
