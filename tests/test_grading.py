"""The assignments grade fairly: nbgrader, our config and tools/grade.py, end to end.

Each test builds a throw-away course in tmp_path from the repository's nbgrader_config.py,
solutions/ and tools/grade.py, submits notebooks to it as students would, runs the real
``nbgrader`` commands and reads the scores back from the gradebook. The same proofs run for
every assignment in ASSIGNMENTS; the submissions of one assignment share one
``nbgrader autograde`` run (kernels take seconds to start). Nothing is written to the
repository.
"""

from __future__ import annotations

import concurrent.futures
import copy
import csv
import dataclasses
import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbgrader.api import Gradebook
from traitlets.config.loader import PyFileConfigLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import integrity  # noqa: E402  (tools/integrity.py)

COURSE_ID = PyFileConfigLoader("nbgrader_config.py", path=str(ROOT)).load_config().CourseDirectory.course_id


# ------------------------------------------------------------------------------ the assignments
@dataclasses.dataclass(frozen=True)
class Assignment:
    """One assignment and the submissions that prove it grades fairly."""

    name: str
    # Plausible wrong answers: student -> ((answer cell, old, new), the test cells it must fail).
    # Only those: the tests of one function do not punish a student twice for a mistake made
    # elsewhere, except tests that are about several functions by design ("putting it together").
    mistakes: dict[str, tuple[tuple[str, str, str], set[str]]]
    gutted: tuple[str, str]  # (mistake, the failing test the student replaces with `pass`)
    deleted: tuple[str, str]  # (mistake, the failing test the student deletes)
    after_markdown: str  # a test cell that follows a markdown cell, deleted from a correct notebook
    loops: tuple[str, str]  # (answer cell given an infinite loop, the one test that calls it)

    @property
    def notebook(self) -> str:
        return f"{self.name}.ipynb"

    @property
    def source(self) -> Path:
        return ROOT / "solutions" / self.name / self.notebook

    @property
    def release(self) -> Path:
        return ROOT / "assignments" / self.name / self.notebook


SCHEDULE_MATH = Assignment(
    name="schedule_math",
    mistakes={
        "alpha_bar_off_by_one": (  # alpha_bar[0] = 1: forgets that step 0 already adds noise
            ("alpha_bar", "return torch.cumprod(1 - betas, dim=0)",
             "return torch.cat([torch.ones(1, dtype=betas.dtype), torch.cumprod(1 - betas, dim=0)[:-1]])"),
            {"test_alpha_bar", "test_linear_alpha_bar_first_step"}),
        "q_sample_no_sqrt": (  # mixes with variances instead of standard deviations
            ("q_sample", "alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * eps",
             "alpha_bar_t * x0 + (1 - alpha_bar_t) * eps"),
            {"test_q_sample"}),
        "linear_reversed": (  # ramps from beta_end down to beta_start
            ("linear_betas", "torch.linspace(beta_start, beta_end, T", "torch.linspace(beta_end, beta_start, T"),
            {"test_linear_betas", "test_linear_alpha_bar_first_step"}),
        "snr_inverted": (  # noise over signal
            ("snr", "return alpha_bar / (1 - alpha_bar)", "return (1 - alpha_bar) / alpha_bar"),
            {"test_snr"}),
        "cosine_uncapped": (  # forgets max_beta, so the last beta is 1
            ("cosine_betas", "return betas.clamp(max=max_beta)", "return betas"),
            {"test_cosine_betas"}),
        "first_step_not_strict": (  # <= instead of <
            ("first_step_below", "(values < threshold)", "(values <= threshold)"),
            {"test_first_step_below"}),
    },
    gutted=("snr_inverted", "test_snr"),
    deleted=("q_sample_no_sqrt", "test_q_sample"),
    after_markdown="test_linear_alpha_bar_first_step",
    loops=("q_sample", "test_q_sample"),
)

REVERSE_STEP = Assignment(
    name="reverse_step",
    mistakes={
        "posterior_alpha_bar_off_by_one": (  # alpha_bar of the step before where alpha_bar_t belongs
            ("posterior_mean_variance", "beta_t, alpha_bar_t = betas[t], alpha_bar[t]",
             "beta_t, alpha_bar_t = betas[t], alpha_bar[t - 1]"),
            {"test_posterior_mean_variance"}),
        "predict_x0_no_sqrt": (  # unmixes with variances instead of standard deviations
            ("predict_x0", "(xt - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()",
             "(xt - (1 - alpha_bar_t) * eps) / alpha_bar_t"),
            {"test_predict_x0", "test_round_trips"}),
        "v_sign_flipped": (  # sqrt(1 - ab) x0 - sqrt(ab) eps: the rotation the wrong way
            ("v_from", "alpha_bar_t.sqrt() * eps - (1 - alpha_bar_t).sqrt() * x0",
             "(1 - alpha_bar_t).sqrt() * x0 - alpha_bar_t.sqrt() * eps"),
            {"test_v_from", "test_round_trips"}),
        "ddpm_mean_beta_for_alpha_bar": (  # sqrt(beta_t) where sqrt(1 - alpha_bar_t) belongs
            ("ddpm_step", "beta_t / (1 - alpha_bar_t).sqrt() * eps_pred", "beta_t / beta_t.sqrt() * eps_pred"),
            {"test_ddpm_step"}),
        "ddpm_variance_as_std": (  # sigma_t^2 * z instead of sigma_t * z
            ("ddpm_step", "variance.sqrt() * z", "variance * z"),
            {"test_ddpm_step"}),
        "ddpm_noise_at_t0": (  # no special case for t = 0: alpha_bar[t - 1] wraps round to the last entry
            ("ddpm_step", "    if t == 0:\n        return mean  # the last step adds no noise\n", ""),
            {"test_ddpm_step"}),
        "ddpm_alpha_bar_off_by_one": (  # visible tests pass; only the comparison with diffusers sees it
            ("ddpm_step", "beta_t, alpha_bar_t = betas[t], alpha_bar[t]",
             "beta_t, alpha_bar_t = betas[t], alpha_bar[t - 1]"),
            {"test_ddpm_step"}),
        "loss_sum": (  # the sum of squared errors: grows with batch and image size
            ("simple_loss", "((eps_pred - eps) ** 2).mean()", "((eps_pred - eps) ** 2).sum()"),
            {"test_simple_loss"}),
    },
    gutted=("v_sign_flipped", "test_v_from"),
    deleted=("ddpm_variance_as_std", "test_ddpm_step"),
    after_markdown="test_round_trips",
    loops=("simple_loss", "test_simple_loss"),
)

CFG_ARITHMETIC = Assignment(
    name="cfg_arithmetic",
    mistakes={
        "guidance_sign_flipped": (  # steps away from the prompt: eps_u + w (eps_u - eps_c)
            ("cfg_combine", "w * (eps_cond - eps_uncond)", "w * (eps_uncond - eps_cond)"),
            {"test_cfg_combine"}),
        "guidance_from_the_cond_side": (  # starts at the conditional prediction and guides the unconditional one
            ("cfg_combine", "return eps_uncond + w * (eps_cond - eps_uncond)",
             "return eps_cond + w * (eps_uncond - eps_cond)"),
            {"test_cfg_combine"}),
        "paper_off_by_one": (  # the paper's w used as if it were diffusers' (w where 1 + w belongs)
            ("cfg_paper", "(1 + w_paper) * eps_cond - w_paper * eps_uncond",
             "w_paper * eps_cond - (w_paper - 1) * eps_uncond"),
            {"test_cfg_paper"}),
        "conversion_backwards": (  # w_diffusers = w_paper - 1
            ("paper_to_diffusers", "return 1 + w_paper", "return w_paper - 1"),
            {"test_paper_to_diffusers"}),
        "batched_halves_swapped": (  # the prompt's embeddings first, but the output split as if unconditional first
            ("batched_predictions", "torch.cat([emb_uncond, emb_cond])", "torch.cat([emb_cond, emb_uncond])"),
            {"test_batched_predictions", "test_batched_order"}),
        "batched_cond_first": (  # consistent, so the pair is right, but not diffusers' order
            ("batched_predictions",
             "torch.cat([emb_uncond, emb_cond])  # (2B, L, D): the empty prompt first, as diffusers does\n"
             "    eps = model(x_in, t, encoder_hidden_states=emb)  # (2B, C, H, W)\n"
             "    eps_uncond, eps_cond = eps.chunk(2)",
             "torch.cat([emb_cond, emb_uncond])\n"
             "    eps = model(x_in, t, encoder_hidden_states=emb)\n"
             "    eps_cond, eps_uncond = eps.chunk(2)"),
            {"test_batched_order"}),
        "budget_batching_is_free": (  # counts the calls as the evaluations: forgets the doubled batch
            ("evaluation_budget", "num_steps * calls_per_step, num_steps * evaluations_per_step",
             "num_steps * calls_per_step, num_steps * calls_per_step"),
            {"test_evaluation_budget"}),
        "negative_sign_flipped": (  # guides towards the negative prompt
            ("negative_prompt_guidance", "w * (eps_cond - eps_neg)", "w * (eps_neg - eps_cond)"),
            {"test_negative_prompt_guidance"}),
    },
    gutted=("guidance_sign_flipped", "test_cfg_combine"),
    deleted=("paper_off_by_one", "test_cfg_paper"),
    after_markdown="test_batched_order",
    loops=("evaluation_budget", "test_evaluation_budget"),
)

DDIM_RECONSTRUCTION = Assignment(
    name="ddim_reconstruction",
    mistakes={
        "timesteps_ascending": (  # cleanest first: the sampler would start at t = 0
            ("ddim_timesteps", "torch.arange(num_steps).flip(0) * k", "torch.arange(num_steps) * k"),
            {"test_ddim_timesteps"}),
        "timesteps_off_by_one": (  # k, 2k, ..., num_steps * k: starts at T, one past the last step
            ("ddim_timesteps", "torch.arange(num_steps).flip(0) * k", "torch.arange(1, num_steps + 1).flip(0) * k"),
            {"test_ddim_timesteps"}),
        "step_alpha_bar_of_t_minus_1": (  # DDPM's previous step where DDIM's t_prev belongs
            ("ddim_step", "alpha_bar[t_prev] if t_prev >= 0", "alpha_bar[t - 1] if t_prev >= 0"),
            {"test_ddim_step", "test_ddim_step_eta", "test_reconstruction_error"}),
        "step_final_alpha_wraps": (  # alpha_bar[-1] (the noisiest entry) where the clean image's 1 belongs
            ("ddim_step", "alpha_bar[t_prev] if t_prev >= 0 else torch.ones_like(alpha_bar_t)", "alpha_bar[t_prev]"),
            {"test_ddim_step", "test_ddim_step_eta", "test_reconstruction_error"}),
        "step_eta_ignored": (  # sigma is always 0: eta > 0 adds no noise
            ("ddim_step", "sigma = eta * (", "sigma = 0 * ("),
            {"test_ddim_step_eta"}),
        "invert_wrong_direction": (  # runs the sampling step (towards less noise) instead of its inverse
            ("ddim_invert_step",
             "x0_pred = (x_prev - (1 - alpha_bar_prev).sqrt() * eps_pred) / alpha_bar_prev.sqrt()\n"
             "    return alpha_bar_t.sqrt() * x0_pred + (1 - alpha_bar_t).sqrt() * eps_pred",
             "x0_pred = (x_prev - (1 - alpha_bar_t).sqrt() * eps_pred) / alpha_bar_t.sqrt()\n"
             "    return alpha_bar_prev.sqrt() * x0_pred + (1 - alpha_bar_prev).sqrt() * eps_pred"),
            {"test_ddim_invert_step", "test_reconstruction_error"}),
        "round_trip_asks_at_t_prev": (  # inversion asks the network at t_prev, which is -1 at the first step
            ("reconstruction_error", "eps_model(x, t), t_prev, t, alpha_bar)", "eps_model(x, t_prev), t_prev, t, alpha_bar)"),
            {"test_reconstruction_error"}),
    },
    gutted=("step_eta_ignored", "test_ddim_step_eta"),
    deleted=("timesteps_ascending", "test_ddim_timesteps"),
    after_markdown="test_ddim_step_eta",
    loops=("ddim_timesteps", "test_ddim_timesteps"),
)

SCORE_THEORY = Assignment(
    name="score_theory",
    mistakes={
        "marginal_noise_forgotten": (  # shrinks the covariance but adds no noise: C_k = ab Sigma_k
            ("noised_mixture", "ab * covs + (1 - ab) * eye", "ab * covs"),
            {"test_noised_mixture", "test_mixture_score", "test_score_far_away"}),  # the score uses the marginal
        "marginal_means_by_alpha_bar": (  # scales the means by alpha_bar instead of its square root
            ("noised_mixture", "ab.sqrt() * means", "ab * means"),
            {"test_noised_mixture", "test_mixture_score", "test_score_far_away"}),
        "score_mixture_weights": (  # averages the pulls with w_k where the responsibilities r_k(x) belong
            ("mixture_score", "r = torch.softmax(log_comp, dim=1)", "r = weights.expand(x.shape[0], -1)"),
            {"test_mixture_score", "test_score_far_away"}),
        "score_exp_then_divide": (  # right near the data, 0 / 0 far from it
            ("mixture_score", "r = torch.softmax(log_comp, dim=1)",
             "r = log_comp.exp() / log_comp.exp().sum(dim=1, keepdim=True)"),
            {"test_score_far_away"}),
        "tweedie_sqrt_variance": (  # the noise's standard deviation where its variance belongs
            ("tweedie_x0", "(xt + (1 - alpha_bar_t) * score)", "(xt + (1 - alpha_bar_t).sqrt() * score)"),
            {"test_tweedie"}),
        "tweedie_no_rescale": (  # forgets to divide by sqrt(alpha_bar): the posterior mean of x_t's signal part
            ("tweedie_x0", "return (xt + (1 - alpha_bar_t) * score) / alpha_bar_t.sqrt()",
             "return xt + (1 - alpha_bar_t) * score"),
            {"test_tweedie"}),
        "v_sign_flipped": (  # v = s x0 - a eps: the rotation the other way round
            ("convert", "return a * eps - s * x0", "return s * x0 - a * eps"),
            {"test_convert", "test_convert_diffusers"}),
        "score_sign_flipped": (  # the score points away from the data
            ("convert", "return -eps / s", "return eps / s"),
            {"test_convert"}),
        "heun_second_slope_only": (  # steps with the slope at the Euler point instead of the average
            ("heun_step", "(d + d_next) / 2", "d_next"),
            {"test_heun_step", "test_heun_diffusers"}),
        "heun_corrects_at_zero": (  # divides by sigma_next = 0 on the last step
            ("heun_step", "if sigma_next == 0:", "if sigma_next < 0:"),
            {"test_heun_step", "test_heun_diffusers"}),
    },
    gutted=("heun_second_slope_only", "test_heun_step"),
    deleted=("tweedie_no_rescale", "test_tweedie"),
    after_markdown="test_score_far_away",
    loops=("tweedie_x0", "test_tweedie"),
)

DIT_FLOW = Assignment(
    name="dit_flow",
    mistakes={
        "patches_column_major": (  # walks the patches column by column: not the order PatchEmbed's conv gives
            ("patchify", "x.permute(0, 2, 4, 3, 5, 1)", "x.permute(0, 4, 2, 3, 5, 1)"),
            {"test_patchify", "test_patchify_conv"}),
        "token_channels_first": (  # (channel, row, column) inside a token, as F.unfold gives: not what unpatchify inverts
            ("patchify", "x.permute(0, 2, 4, 3, 5, 1)", "x.permute(0, 2, 4, 1, 3, 5)"),
            {"test_patchify", "test_patchify_conv"}),
        "unpatchify_patches_transposed": (  # swaps a patch's rows and columns on the way back
            ("unpatchify", "x.permute(0, 5, 1, 3, 2, 4)", "x.permute(0, 5, 1, 4, 2, 3)"),
            {"test_unpatchify"}),
        "modulate_scale_not_one_plus": (  # x * scale + shift: an untrained modulation wipes the features out
            ("modulate", "x * (1 + scale) + shift", "x * scale + shift"),
            {"test_modulate", "test_adaln_zero_block"}),  # the block uses modulate by design
        "adaln_gate_forgotten": (  # no gate: the block is not the identity at initialisation
            ("adaln_zero_block", "return x + gate[:, None] * f(h)", "return x + f(h)"),
            {"test_adaln_zero_block"}),
        "time_flipped": (  # noise at t = 0 and data at t = 1: the other papers' convention, not diffusers'
            ("flow_interpolate", "return (1 - t) * x0 + t * noise", "return (1 - t) * noise + t * x0"),
            {"test_flow_interpolate"}),
        "velocity_sign_flipped": (  # x0 - noise: points from the noise to the data
            ("flow_velocity", "return noise - x0", "return x0 - noise"),
            {"test_flow_velocity"}),
        "euler_step_backwards": (  # (t - t_next): walks away from the data
            ("euler_step", "x_t + (t_next - t) * v", "x_t + (t - t_next) * v"),
            {"test_euler_step"}),
    },
    gutted=("velocity_sign_flipped", "test_flow_velocity"),
    deleted=("patches_column_major", "test_patchify"),
    after_markdown="test_patchify_conv",
    loops=("flow_velocity", "test_flow_velocity"),
)

LORA_CONTROLNET = Assignment(
    name="lora_controlnet",
    mistakes={
        "delta_transposed": (  # A^T B^T, the x @ W convention: (d_in, d_out) instead of the weight's (d_out, d_in)
            ("lora_delta", "(alpha / r) * (B @ A)", "(alpha / r) * (A.T @ B.T)"),
            {"test_lora_delta"}),
        "delta_scale_inverted": (  # r / alpha
            ("lora_delta", "(alpha / r) * (B @ A)", "(r / alpha) * (B @ A)"),
            {"test_lora_delta"}),
        "forward_scale_missing": (  # forgets alpha / r in the forward pass
            ("lora_forward", "(alpha / r) * ((x @ A.T) @ B.T)", "((x @ A.T) @ B.T)"),
            {"test_lora_forward"}),
        "merge_scale_missing": (  # merges B A without alpha / r: the merged model differs from the adapted one
            ("merge_lora", "W + (alpha / r) * (B @ A)", "W + B @ A"),
            {"test_merge_lora"}),
        "count_only_A": (  # counts A's r * d_in numbers and forgets B
            ("lora_param_count", "count = r * (d_in + d_out)", "count = r * d_in"),
            {"test_lora_param_count"}),
        "zero_conv_default_init": (  # PyTorch's random initialisation: the ControlNet changes the model from step 0
            ("zero_conv", "    torch.nn.init.zeros_(conv.weight)\n    torch.nn.init.zeros_(conv.bias)\n", ""),
            {"test_zero_conv", "test_zero_conv_gradients"}),
        "zero_conv_bias_left": (  # zero weight, random bias: adds a constant to every feature
            ("zero_conv", "    torch.nn.init.zeros_(conv.bias)\n", ""),
            {"test_zero_conv"}),
        "control_scales_features": (  # scale * (h + Z(c)): rescales the frozen features too
            ("add_control", "h + scale * conv(c)", "scale * (h + conv(c))"),
            {"test_add_control"}),
    },
    gutted=("delta_scale_inverted", "test_lora_delta"),
    deleted=("forward_scale_missing", "test_lora_forward"),
    after_markdown="test_zero_conv_gradients",
    loops=("lora_param_count", "test_lora_param_count"),
)

VIDEO_PATCHES = Assignment(
    name="video_patches",
    mistakes={
        "frames_not_divided": (  # cuts the frames into groups but counts every frame
            ("spacetime_patch_count", "return (frames // pt) * (height // ph) * (width // pw)",
             "return frames * (height // ph) * (width // pw)"),
            {"test_spacetime_patch_count"}),
        "factorised_forgets_temporal": (  # counts the spatial layer only
            ("attention_cost", "factorised = frames * positions ** 2 + positions * frames ** 2",
             "factorised = frames * positions ** 2"),
            {"test_attention_cost"}),
        "boxes_time_last": (  # orders the boxes (row, column, frame): not the Conv3d's order
            ("spacetime_patchify", "x.permute(0, 1, 4, 6, 2, 5, 7, 3)", "x.permute(0, 4, 6, 1, 2, 5, 7, 3)"),
            {"test_spacetime_patchify", "test_spacetime_patchify_conv3d"}),
        "frame_wraps_around": (  # torch.roll compares the last frame with the first
            ("frame_difference", "video[:, 1:] - video[:, :-1]", "video - video.roll(1, dims=1)"),
            {"test_frame_difference"}),
        "frame_squared": (  # the mean squared difference
            ("frame_difference", "diffs.abs().mean(", "(diffs ** 2).mean("),
            {"test_frame_difference"}),
        "frame_divides_by_F": (  # F differences in the denominator where there are F - 1
            ("frame_difference", "diffs.abs().mean(dim=(1, 2, 3, 4))",
             "diffs.abs().sum(dim=(1, 2, 3, 4)) / video[0].numel()"),
            {"test_frame_difference"}),
        "attention_over_space": (  # the pixels of each frame attend to each other: spatial, not temporal, attention
            ("temporal_attention",
             "tokens = x.permute(0, 3, 4, 1, 2).reshape(B * H * W, F_, C)",
             "tokens = x.permute(0, 1, 3, 4, 2).reshape(B * F_, H * W, C)"),
            {"test_temporal_attention", "test_temporal_attention_is_local"}),
        "attention_unscaled": (  # forgets 1 / sqrt(C)
            ("temporal_attention", " / math.sqrt(C)", ""),
            {"test_temporal_attention"}),
        "speed_from_displacement": (  # the net displacement per step, not the path: right for straight lines only
            ("centre_motion", "speed = (centre[:, 1:] - centre[:, :-1]).norm(dim=-1).mean(dim=1)",
             "speed = (centre[:, -1] - centre[:, 0]).norm(dim=-1) / (F_ - 1)"),
            {"test_centre_motion"}),
        "y_grows_upwards": (  # counts rows from the bottom, as in a plot
            ("centre_motion", "ys = torch.arange(H, dtype=video.dtype, device=video.device) + 0.5",
             "ys = torch.arange(H, dtype=video.dtype, device=video.device).flip(0) + 0.5"),
            {"test_centre_motion"}),
        "foreground_by_mean": (  # a pixel is the shape when its mean channel is bright: a red shape vanishes
            ("centre_motion", "video.amax(dim=2) > 0", "video.mean(dim=2) > 0"),
            {"test_centre_motion"}),
    },
    gutted=("frame_wraps_around", "test_frame_difference"),
    deleted=("frames_not_divided", "test_spacetime_patch_count"),
    after_markdown="test_temporal_attention_is_local",
    loops=("attention_cost", "test_attention_cost"),
)

UNET_PARTS = Assignment(
    name="unet_parts",
    mistakes={
        "embedding_shift_ignored": (  # 10000^(-i / half) whatever the shift: only UNet2DModel's convention comes out right
            ("timestep_embedding", "(exponent / (half - downscale_freq_shift)).exp()", "(exponent / half).exp()"),
            {"test_timestep_embedding"}),
        "embedding_flip_inverted": (  # sines first when flip_sin_to_cos asks for the cosines first
            ("timestep_embedding", "    if flip_sin_to_cos:\n", "    if not flip_sin_to_cos:\n"),
            {"test_timestep_embedding"}),
        "embedding_frequencies_over_dim": (  # spreads the frequencies over dim instead of dim / 2: half of them are lost
            ("timestep_embedding", "(exponent / (half - downscale_freq_shift)).exp()",
             "(exponent / (dim - downscale_freq_shift)).exp()"),
            {"test_timestep_embedding"}),
        "shift_after_norm": (  # norm2(h) + tau: the shift added after the norm, as scale_shift does it
            ("time_modulation", "return norm(h + tau)  # added before the norm", "return norm(h) + tau"),
            {"test_time_modulation_shift"}),
        "temb_without_silu": (  # time_emb_proj(temb): ResnetBlock2D applies its nonlinearity first
            ("time_modulation", "tau = proj(F.silu(temb))", "tau = proj(temb)"),
            {"test_time_modulation_shift", "test_time_modulation_scale_shift"}),
        "scale_not_one_plus": (  # norm2(h) * scale + shift: an untrained projection wipes the features out
            ("time_modulation", "norm(h) * (1 + scale) + shift", "norm(h) * scale + shift"),
            {"test_time_modulation_scale_shift"}),
        "scale_shift_halves_swapped": (  # the shift first: not how diffusers splits time_emb_proj's output
            ("time_modulation", "scale, shift = tau.chunk(2, dim=1)", "shift, scale = tau.chunk(2, dim=1)"),
            {"test_time_modulation_scale_shift"}),
        "conv_bias_forgotten": (  # counts the weight only
            ("conv2d_params", "return weights + (c_out if bias else 0)", "return weights"),
            {"test_conv2d_params", "test_resnet_block_params"}),  # the block's count uses conv2d_params by design
        "norm_per_group": (  # a scale and a shift per group instead of per channel
            ("group_norm_params", "return 2 * num_channels if affine else 0", "return 2 * num_groups if affine else 0"),
            {"test_group_norm_params", "test_resnet_block_params"}),
        "keys_from_the_query_width": (  # to_k and to_v read query_dim even in cross-attention
            ("attention_params", "kv_dim = query_dim if cross_attention_dim is None else cross_attention_dim",
             "kv_dim = query_dim"),
            {"test_attention_params"}),
        "out_bias_forgotten": (  # to_out without its bias
            ("attention_params", "count += inner * query_dim + (query_dim if out_bias else 0)", "count += inner * query_dim"),
            {"test_attention_params"}),
        "head_dim_is_channels": (  # every head gets all C channels: heads * C numbers per token
            ("attention_shapes", "tokens, head_dim = H * W, C // heads", "tokens, head_dim = H * W, C"),
            {"test_attention_shapes"}),
    },
    gutted=("scale_not_one_plus", "test_time_modulation_scale_shift"),
    deleted=("embedding_flip_inverted", "test_timestep_embedding"),
    after_markdown="test_timestep_conventions",
    loops=("attention_shapes", "test_attention_shapes"),
)

LATENTS = Assignment(
    name="latents",
    mistakes={
        "positions_divided_once": (  # H W / f: forgets that f shrinks both axes
            ("compression", "latent_positions = (height // f) * (width // f)", "latent_positions = height * width // f"),
            {"test_compression"}),
        "latent_has_image_channels": (  # counts 3 channels in the latent
            ("compression", "latent_positions * latent_channels, pixel_positions", "latent_positions * channels, pixel_positions"),
            {"test_compression"}),
        "megabytes_not_mebibytes": (  # divides by 10^6
            ("memory_saved_mib", "values * bytes_per_value / 2 ** 20", "values * bytes_per_value / 1e6"),
            {"test_memory_saved"}),
        "values_not_bytes": (  # forgets that a float32 value takes 4 bytes
            ("memory_saved_mib", "values * bytes_per_value / 2 ** 20", "values / 2 ** 20"),
            {"test_memory_saved"}),
        "pairs_not_squared": (  # counts positions, not query-key pairs
            ("attention_pairs", "return pixel_positions ** 2, latent_positions ** 2", "return pixel_positions, latent_positions"),
            {"test_attention_pairs"}),
        "scale_by_inverse_variance": (  # 1 / var: right only when the std is 1 already
            ("scaling_factor", "return 1.0 / latents.std().item()", "return 1.0 / latents.var().item()"),
            {"test_scaling_factor"}),
        "scale_by_rms": (  # the root mean square, about 0 instead of the mean: wrong for latents with a mean
            ("scaling_factor", "return 1.0 / latents.std().item()", "return 1.0 / latents.pow(2).mean().sqrt().item()"),
            {"test_scaling_factor"}),
        "moments_split_on_the_batch": (  # chunks the batch axis: half the images as means, half as log-variances
            ("split_moments", "mean, logvar = moments.chunk(2, dim=1)", "mean, logvar = moments.chunk(2, dim=0)"),
            {"test_split_moments"}),
        "logvar_unclamped": (  # diffusers clamps to [-30, 20]
            ("split_moments", "return mean, logvar.clamp(-30.0, 20.0)", "return mean, logvar"),
            {"test_split_moments"}),
        "sigma_is_the_variance": (  # exp(logvar) where exp(logvar / 2) belongs
            ("sample_latent", "mean + logvar.mul(0.5).exp() * eps", "mean + logvar.exp() * eps"),
            {"test_sample_latent", "test_reparameterisation_gradients"}),
        "kl_averaged": (  # the mean over the latent's values instead of their sum
            ("gaussian_kl", "0.5 * per_value.sum(dim=(1, 2, 3))", "0.5 * per_value.mean(dim=(1, 2, 3))"),
            {"test_gaussian_kl"}),
        "kl_summed_over_the_batch": (  # one number for the batch, not one per image
            ("gaussian_kl", "0.5 * per_value.sum(dim=(1, 2, 3))", "0.5 * per_value.sum()"),
            {"test_gaussian_kl"}),
        "kl_without_half": (  # forgets the 1/2
            ("gaussian_kl", "0.5 * per_value.sum(dim=(1, 2, 3))", "per_value.sum(dim=(1, 2, 3))"),
            {"test_gaussian_kl"}),
    },
    gutted=("scale_by_rms", "test_scaling_factor"),
    deleted=("kl_without_half", "test_gaussian_kl"),
    after_markdown="test_reparameterisation_gradients",
    loops=("scaling_factor", "test_scaling_factor"),
)

EVALUATION = Assignment(
    name="evaluation",
    mistakes={
        "fd_divides_by_n": (  # the biased covariance (numpy.cov(bias=True)): not what FID computes
            ("frechet_distance", "xa.T @ xa / (len(a) - 1), xb.T @ xb / (len(b) - 1)",
             "xa.T @ xa / len(a), xb.T @ xb / len(b)"),
            {"test_frechet_distance"}),
        "fd_trace_without_sqrt": (  # Tr(S_a S_b) where Tr (S_a S_b)^(1/2) belongs: a set is not at 0 from itself
            ("frechet_distance", "tr_sqrt = eig.clamp(min=0).sqrt().sum()", "tr_sqrt = (cov_a @ cov_b).trace()"),
            {"test_frechet_distance", "test_frechet_invariances"}),
        "fd_mean_not_squared": (  # |mu_a - mu_b| instead of its square: FD no longer scales as a squared length
            ("frechet_distance", "((mu_a - mu_b) ** 2).sum()", "(mu_a - mu_b).norm()"),
            {"test_frechet_distance", "test_frechet_invariances"}),
        "radius_counts_itself": (  # the point itself as its nearest neighbour: k = 1 gives radius 0
            ("knn_radii", "d.sort(dim=1).values[:, k]", "d.sort(dim=1).values[:, k - 1]"),
            {"test_knn_radii", "test_precision_recall"}),  # precision_recall uses knn_radii by design
        "precision_recall_swapped": (  # fakes in the real manifold is precision, not recall
            ("precision_recall", "return precision, recall", "return recall, precision"),
            {"test_precision_recall"}),
        "ratio_inverted": (  # second nearest over nearest: a copy gives infinity, not 0
            ("memorisation_ratio", "nearest[:, 0] / nearest[:, 1]", "nearest[:, 1] / nearest[:, 0]"),
            {"test_memorisation_ratio"}),
        "bits_count_errors": (  # the bit error rate instead of the accuracy
            ("bit_accuracy", "(decoded == embedded)", "(decoded != embedded)"),
            {"test_bit_accuracy"}),
        "p_value_strict_tail": (  # P(X > m) instead of P(X >= m): all bits right would have p = 0
            ("watermark_p_value", "range(n_match, n_bits + 1)", "range(n_match + 1, n_bits + 1)"),
            {"test_watermark_p_value"}),
    },
    gutted=("precision_recall_swapped", "test_precision_recall"),
    deleted=("fd_divides_by_n", "test_frechet_distance"),
    after_markdown="test_frechet_invariances",
    loops=("watermark_p_value", "test_watermark_p_value"),
)

ASSIGNMENTS = {a.name: a for a in (SCHEDULE_MATH, REVERSE_STEP, UNET_PARTS, CFG_ARITHMETIC, LATENTS, DDIM_RECONSTRUCTION,
                                   SCORE_THEORY, DIT_FLOW, LORA_CONTROLNET, VIDEO_PATCHES, EVALUATION)}
MISTAKES = [(a.name, student) for a in ASSIGNMENTS.values() for student in sorted(a.mistakes)]

# Habits the values alone do not show (see check_habits in each assignment's first cell): an
# input overwritten in place, a dtype ignored, gradients cut by torch.no_grad(), a count returned
# as a float. assignment -> {habit: ((answer cell, old, new), the tests it must fail)}. The habits
# of one assignment are planted together in one submission (kernels are slow to start); their
# tests are disjoint, so losing exactly the union proves each one is caught.
HABITS = {
    "schedule_math": {
        "in_place": (("q_sample", "return alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * eps",
                      "return x0.mul_(alpha_bar_t.sqrt()).add_((1 - alpha_bar_t).sqrt() * eps)"), {"test_q_sample"}),
        "dtype": (("linear_betas", "T, dtype=dtype)", "T, dtype=torch.float64)"), {"test_linear_betas"}),
        "no_grad": (("snr", "    return alpha_bar / (1 - alpha_bar)",
                     "    with torch.no_grad():\n        return alpha_bar / (1 - alpha_bar)"), {"test_snr"}),
    },
    "reverse_step": {
        "in_place": (("predict_eps", "return (xt - alpha_bar_t.sqrt() * x0) / (1 - alpha_bar_t).sqrt()",
                      "return xt.sub_(alpha_bar_t.sqrt() * x0).div_((1 - alpha_bar_t).sqrt())"),
                     {"test_predict_eps", "test_round_trips"}),  # the round trip reuses the x_t it overwrote
        "dtype": (("posterior_mean_variance", "if t > 0 else torch.ones_like(alpha_bar_t)", "if t > 0 else torch.tensor(1.0)"),
                  {"test_posterior_mean_variance"}),
        "no_grad": (("simple_loss", "    return ((eps_pred - eps) ** 2).mean()",
                     "    with torch.no_grad():\n        return ((eps_pred - eps) ** 2).mean()"), {"test_simple_loss"}),
    },
    "unet_parts": {
        "dtype": (("timestep_embedding", "torch.arange(half, dtype=torch.float32, device=timesteps.device)",
                   "torch.arange(half, device=timesteps.device)"), {"test_timestep_embedding"}),  # float64 frequencies
        "in_place": (("time_modulation", "        return norm(h + tau)  # added before the norm",
                      "        h += tau\n        return norm(h)"), {"test_time_modulation_shift"}),
        "no_grad": (("time_modulation", "    scale, shift = tau.chunk(2, dim=1)",
                     "    with torch.no_grad():  # only a modulation\n        scale, shift = tau.chunk(2, dim=1)"),
                    {"test_time_modulation_scale_shift"}),
        "float_count": (("attention_shapes", "tokens, head_dim = H * W, C // heads", "tokens, head_dim = H * W, C / heads"),
                        {"test_attention_shapes"}),  # the right values, as floats
    },
    "cfg_arithmetic": {
        "in_place": (("cfg_combine", "return eps_uncond + w * (eps_cond - eps_uncond)",
                      "eps_uncond += w * (eps_cond - eps_uncond)\n    return eps_uncond"), {"test_cfg_combine"}),
        "float_count": (("evaluation_budget", "evaluations_per_step = 2 if guided else 1", "evaluations_per_step = 2.0 if guided else 1.0"),
                        {"test_evaluation_budget"}),
    },
    "latents": {
        "float_count": (("compression", "latent_positions = (height // f) * (width // f)",
                         "latent_positions = (height / f) * (width / f)"), {"test_compression"}),  # the right values, as floats
        "tensor_not_float": (("scaling_factor", "return 1.0 / latents.std().item()", "return 1.0 / latents.std()"),
                             {"test_scaling_factor"}),  # a 0-d tensor where the text asks for a Python float
        "dtype": (("split_moments", "mean, logvar = moments.chunk(2, dim=1)", "mean, logvar = moments.double().chunk(2, dim=1)"),
                  {"test_split_moments"}),
        "in_place": (("sample_latent", "return mean + logvar.mul(0.5).exp() * eps", "return eps.mul_(logvar.mul(0.5).exp()).add_(mean)"),
                     {"test_sample_latent"}),
        "no_grad": (("gaussian_kl", "    return 0.5 * per_value.sum(dim=(1, 2, 3))",
                     "    with torch.no_grad():  # a loss term, not a model\n        return 0.5 * per_value.sum(dim=(1, 2, 3))"),
                    {"test_gaussian_kl"}),
    },
    "ddim_reconstruction": {
        "in_place": (("ddim_step", "x0_pred = (xt - (1 - alpha_bar_t).sqrt() * eps_pred) / alpha_bar_t.sqrt()",
                      "xt -= (1 - alpha_bar_t).sqrt() * eps_pred\n    x0_pred = xt / alpha_bar_t.sqrt()"),
                     {"test_ddim_step", "test_ddim_step_eta"}),
        "integer_steps": (("ddim_timesteps", "torch.arange(num_steps).flip(0) * k", "torch.arange(num_steps).flip(0) * float(k)"),
                          {"test_ddim_timesteps"}),  # the right values, as floats
    },
    "score_theory": {
        "in_place": (("tweedie_x0", "return (xt + (1 - alpha_bar_t) * score) / alpha_bar_t.sqrt()",
                      "return xt.add_((1 - alpha_bar_t) * score).div_(alpha_bar_t.sqrt())"), {"test_tweedie"}),
        "dtype": (("noised_mixture", "torch.eye(means.shape[1], dtype=covs.dtype, device=covs.device)",
                   "torch.eye(means.shape[1])"), {"test_noised_mixture", "test_mixture_score"}),  # the default float64
        "no_grad": (("heun_step", "    return x + (sigma_next - sigma) * (d + d_next) / 2",
                     "    with torch.no_grad():\n        return x + (sigma_next - sigma) * (d + d_next) / 2"),
                    {"test_heun_step"}),
    },
    "dit_flow": {
        "in_place": (("euler_step", "return x_t + (t_next - t) * v", "x_t += (t_next - t) * v\n    return x_t"), {"test_euler_step"}),
        "dtype": (("flow_interpolate", "t = torch.as_tensor(t, dtype=x0.dtype)", "t = torch.as_tensor(t, dtype=torch.float64)"),
                  {"test_flow_interpolate"}),
        "no_grad": (("adaln_zero_block", "    shift, scale, gate = ada(cond).chunk(3, dim=-1)",
                     "    with torch.no_grad():  # only a modulation\n        shift, scale, gate = ada(cond).chunk(3, dim=-1)"),
                    {"test_adaln_zero_block"}),
    },
    "lora_controlnet": {
        "in_place": (("merge_lora", "return W + (alpha / r) * (B @ A)", "return W.add_((alpha / r) * (B @ A))"), {"test_merge_lora"}),
        "no_grad": (("lora_forward", "    return x @ W.T + b",
                     "    with torch.no_grad():  # the frozen layer needs no gradients\n        return x @ W.T + b"),
                    {"test_lora_forward"}),
        "float_count": (("lora_param_count", "count = r * (d_in + d_out)", "count = float(r * (d_in + d_out))"),
                        {"test_lora_param_count"}),
    },
    "video_patches": {
        "dtype": (("frame_difference", "return diffs.abs().mean(dim=(1, 2, 3, 4))",
                   "return torch.tensor([d.abs().mean().item() for d in diffs])"), {"test_frame_difference"}),
        "no_grad": (("temporal_attention", "    out = weights @ tokens",
                     "    with torch.no_grad():\n        out = weights @ tokens"), {"test_temporal_attention"}),
        "float_count": (("attention_cost", "full = (frames * positions) ** 2", "full = math.pow(frames * positions, 2)"),
                        {"test_attention_cost"}),
    },
    "evaluation": {
        "in_place": (("frechet_distance", "xa, xb = a - mu_a, b - mu_b", "a -= mu_a\n    b -= mu_b\n    xa, xb = a, b"),
                     {"test_frechet_distance", "test_frechet_invariances"}),  # .double() of float64 is the input itself
        "dtype": (("memorisation_ratio", "d = torch.cdist(generated.flatten(1), train.flatten(1))",
                   "d = torch.cdist(generated.flatten(1).double(), train.flatten(1).double())"), {"test_memorisation_ratio"}),
        "tensor_not_float": (("precision_recall", ".double().mean().item()  # fakes", ".double().mean()  # fakes"),
                             {"test_precision_recall"}),  # a 0-d tensor where the text asks for a Python float
    },
}

# Answers that are somebody else's: the course's helpers, a library, a test's reference or the
# call the text forbids. assignment -> ({answer cell: new body}, the tests they must fail).
BORROWED = {
    "schedule_math": ({
        "snr": "from helpers.schedules import snr as course_snr\nreturn course_snr(alpha_bar)",
        "linear_betas": "from diffusers import DDPMScheduler\n"
                        "return DDPMScheduler(num_train_timesteps=T, beta_start=beta_start, beta_end=beta_end).betas.to(dtype)",
    }, {"test_snr", "test_linear_betas", "test_linear_alpha_bar_first_step"}),
    "reverse_step": ({
        "predict_x0": "from helpers.diffusion import x0_from_eps\nreturn x0_from_eps(xt, eps, alpha_bar_t)",
        "v_from": "import helpers.diffusion as course\nreturn course.v_from_x0_eps(x0, eps, alpha_bar_t)",
    }, {"test_predict_x0", "test_v_from", "test_round_trips"}),
    "unet_parts": ({
        "timestep_embedding": "from diffusers.models.embeddings import get_timestep_embedding\n"
                              "return get_timestep_embedding(timesteps, dim, flip_sin_to_cos=flip_sin_to_cos,\n"
                              "                              downscale_freq_shift=downscale_freq_shift, max_period=max_period)",
        "conv2d_params": "from helpers.models import count_parameters\n"
                         "return count_parameters(torch.nn.Conv2d(c_in, c_out, kernel_size, bias=bias))",
        "attention_params": "from diffusers.models.attention_processor import Attention\n"
                            "layer = Attention(query_dim, heads=heads, dim_head=dim_head, cross_attention_dim=cross_attention_dim,\n"
                            "                  bias=bias, out_bias=out_bias, norm_num_groups=norm_num_groups)\n"
                            "return sum(p.numel() for p in layer.parameters())",
    }, {"test_timestep_embedding", "test_timestep_conventions", "test_conv2d_params", "test_resnet_block_params",
        "test_attention_params"}),
    "cfg_arithmetic": ({
        "cfg_combine": "from helpers.diffusion import classifier_free_guidance\n"
                       "return classifier_free_guidance(eps_uncond, eps_cond, w)",
    }, {"test_cfg_combine"}),
    "latents": ({
        "attention_pairs": "from helpers.video import attention_pairs as pairs\n"
                           "positions = (height * width, (height // f) * (width // f))\n"
                           "return tuple(pairs(1, n)['full'] for n in positions)",
        "sample_latent": "from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution\n"
                         "dist = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))\n"
                         "return dist.mean + dist.std * eps",
        "gaussian_kl": "from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution\n"
                       "return DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1)).kl()",
    }, {"test_attention_pairs", "test_sample_latent", "test_reparameterisation_gradients", "test_gaussian_kl"}),
    "ddim_reconstruction": ({
        "ddim_timesteps": "from helpers.diffusion import ddim_timesteps as course\nreturn torch.tensor(course(num_steps, T))",
    }, {"test_ddim_timesteps"}),
    "score_theory": ({
        "mixture_score": "from helpers.score import mixture_score as course\nreturn course(x, means, covs, weights, alpha_bar_t)",
        "heun_step": "from helpers import edm\nreturn edm.heun_step(denoiser, x, sigma, sigma_next)",
    }, {"test_mixture_score", "test_score_far_away", "test_heun_step", "test_heun_diffusers"}),
    "dit_flow": ({
        "patchify": "B, C, H, W = x.shape\nif H % p or W % p:\n    raise ValueError(f'{H}x{W} is not a multiple of {p}')\n"
                    "return patchify_loop(x, p)  # the visible test's reference",
        "flow_interpolate": "from helpers import flow\nreturn flow.flow_interpolate(x0, noise, t)",
    }, {"test_patchify", "test_patchify_conv", "test_flow_interpolate"}),
    "lora_controlnet": ({
        "zero_conv": "from diffusers.models.controlnets.controlnet import zero_module\n"
                     "return zero_module(torch.nn.Conv2d(channels, channels, kernel_size=1))",
    }, {"test_zero_conv", "test_zero_conv_gradients"}),
    "video_patches": ({
        "temporal_attention": "B, F_, C, H, W = x.shape\ntokens = x.permute(0, 3, 4, 1, 2).reshape(B * H * W, F_, C)\n"
                              "out = F.scaled_dot_product_attention(tokens, tokens, tokens)  # forbidden by the text\n"
                              "return out.reshape(B, H, W, F_, C).permute(0, 3, 4, 1, 2)",
        "attention_cost": "from helpers.video import attention_pairs\npairs = attention_pairs(frames, positions)\n"
                          "return pairs['full'], pairs['factorised']",
        "centre_motion": "from helpers import video as course\nm = course.motion(video)\nreturn m['direction'], m['speed']",
    }, {"test_temporal_attention", "test_temporal_attention_is_local", "test_attention_cost", "test_centre_motion"}),
    "evaluation": ({
        "frechet_distance": "from helpers.metrics import frechet_distance as course_fd\nreturn course_fd(feats_a, feats_b)",
        "knn_radii": "return torch.tensor(radii_by_hand(feats, k))  # the visible test's reference",
    }, {"test_frechet_distance", "test_frechet_invariances", "test_knn_radii"}),
}

# A correct answer that makes torch print a warning while a test runs: it keeps its points.
WARNS = {
    "schedule_math": (("alpha_bar", "torch.cumprod(1 - betas, dim=0)", "torch.cumprod(1 - betas.T, dim=0)"), "test_alpha_bar"),
    "reverse_step": (("x0_from_v", "alpha_bar_t = torch.as_tensor(alpha_bar_t, dtype=xt.dtype)",
                      "alpha_bar_t = torch.tensor(alpha_bar_t, dtype=xt.dtype)"), "test_x0_from_v"),
}

# Cells that tamper with the grading kernel, added to the untouched release (every answer still
# `raise NotImplementedError()`): without the integrity check the first one scores full marks.
AST_ATTACK = """import ast

class Forgive(ast.NodeTransformer):
    def visit_Module(self, node):  # every later cell runs inside try/except: no test can fail
        handler = ast.ExceptHandler(type=None, name=None, body=[ast.Pass()])
        return ast.fix_missing_locations(ast.Module(body=[ast.Try(body=node.body, handlers=[handler], orelse=[],
                                                                  finalbody=[])], type_ignores=[]))

get_ipython().ast_transformers.append(Forgive())"""
TAMPERING = {
    "ast_transformer": AST_ATTACK,
    # IPython's input transformers, reached without naming get_ipython or importing sys or ast
    "input_transformer_via_torch_sys": """def forgive(lines):  # every later cell becomes try: ... except: pass
    body = ["    " + line if line.endswith("\\n") else "    " + line + "\\n" for line in lines]
    return ["try:\\n"] + body + ["    pass\\n", "except BaseException:\\n", "    pass\\n"]

torch.sys.modules["IPython"].get_ipython().input_transformers_post.append(forgive)""",
    "patched_assert_close": "torch.testing.assert_close = lambda *args, **kwargs: None\n"
                            "check_habits = lambda fn, *args, **kwargs: None",
    "always_equal": "def first_step_below(values, threshold):\n"
                    "    class Equal(int):\n        def __eq__(self, other):\n            return True\n"
                    "    return Equal(0)",
}


# nbgrader's own autograde steps, without the integrity check (appended to a course's config).
PLAIN_NBGRADER = ("c.Autograde.autograde_preprocessors = [Execute, IgnorePattern, ClearMetadataPreprocessor, "
                  "LimitOutput, SaveAutoGrades, AssignLatePenalties, CheckCellMetadata]")


# ------------------------------------------------------------------------------ helpers
def make_course(path: Path) -> Path:
    """A course directory like the repository's, minus everything grading does not need."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "nbgrader_config.py", path)
    shutil.copytree(ROOT / "solutions", path / "solutions")
    (path / "tools").mkdir()
    for tool in ("grade.py", "integrity.py"):
        shutil.copy(ROOT / "tools" / tool, path / "tools")
    return path


def env(course: Path) -> dict:
    """Offline, with this venv's scripts on PATH (nbgrader calls `alembic`), and a gradebook in tmp."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        "NBGRADER_DB_URL": f"sqlite:///{course / 'gradebook.db'}",
        "OMP_NUM_THREADS": "1",
    }


def run(course: Path, *args: str) -> subprocess.CompletedProcess:
    """Run a command in the course directory; stdout and stderr together in .stdout."""
    return subprocess.run(args, cwd=course, env=env(course), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def nbgrader(course: Path, *args: str) -> subprocess.CompletedProcess:
    return run(course, sys.executable, "-m", "nbgrader", *args)


def autograde(course: Path, *args: str) -> subprocess.CompletedProcess:
    """`nbgrader autograde`, again for the students it failed when a kernel lost the race for a TCP
    port to a kernel of another grading process (jupyter_client picks a free port, then the kernel
    binds it). Without --force, nbgrader skips the students already graded."""
    for _ in range(3):
        result = nbgrader(course, "autograde", *args)
        if result.returncode == 0 or "Address already in use" not in result.stdout:
            return result
    return result


def submit(course: Path, name: str, student: str, nb) -> None:
    folder = course / "submitted" / student / name
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, folder / ASSIGNMENTS[name].notebook)


def grade_id(cell) -> str | None:
    return cell.metadata.get("nbgrader", {}).get("grade_id")


def cell(nb, gid: str):
    return next(c for c in nb.cells if grade_id(c) == gid)


def source_nb(name: str):
    return nbformat.read(ASSIGNMENTS[name].source, as_version=4)


def edited(name: str, gid: str, old: str, new: str, nb=None):
    """The solution notebook with one answer cell edited (a plausible student mistake)."""
    nb = copy.deepcopy(nb or source_nb(name))
    answer = cell(nb, gid)
    assert old in answer.source, f"the solution of {gid} changed: update this test's edit"
    answer.source = answer.source.replace(old, new)
    return nb


def answered(nb, gid: str, body: str):
    """The notebook with one answer's solution replaced by another body (indented into the function)."""
    nb = copy.deepcopy(nb)
    answer = cell(nb, gid)
    indented = "".join(f"    {line}\n" for line in body.splitlines())
    answer.source, count = re.subn(r"[ \t]*### BEGIN SOLUTION\n.*?### END SOLUTION\n?", lambda _: indented,
                                   answer.source, flags=re.S)
    assert count == 1, f"{gid} has no solution block to replace"
    return nb


def tampered(name: str, code: str):
    """The untouched release with one cell of tampering added right after the set-up cell."""
    nb = nbformat.read(ASSIGNMENTS[name].release, as_version=4)
    nb.cells.insert(nb.cells.index(cell(nb, "imports")) + 1, nbformat.v4.new_code_cell(code))
    return nb


def as_graded(nb, name: str):
    """What grading reads: nbgrader has put the instructor's locked and test cells back."""
    source = {grade_id(c): c for c in source_nb(name).cells if grade_id(c)}
    nb = copy.deepcopy(nb)
    for c in nb.cells:
        meta = c.metadata.get("nbgrader", {})
        if meta and not meta.get("solution") and grade_id(c) in source:
            c.source = source[grade_id(c)].source
    return nb


def report(course: Path, name: str, student: str) -> dict:
    """The integrity check's findings for one graded submission."""
    return json.loads((course / "integrity" / name / f"{student}.json").read_text())


def scores(course: Path, name: str, student: str) -> tuple[float, float, dict[str, float]]:
    """(score, max_score, {test cell: score}) from the gradebook."""
    with Gradebook(env(course)["NBGRADER_DB_URL"], COURSE_ID) as gb:
        submission = gb.find_submission(name, student)
        nb = gb.find_notebook(name, name)
        grades = {g.name: gb.find_grade(g.name, nb.name, name, student).score for g in nb.grade_cells}
        return submission.score, submission.max_score, grades


def points(name: str) -> dict[str, float]:
    """Points of every graded test cell, from the source notebook."""
    return {grade_id(c): c.metadata.nbgrader["points"] for c in source_nb(name).cells
            if c.metadata.get("nbgrader", {}).get("grade")}


def lost(course: Path, name: str, student: str) -> set[str]:
    """The test cells on which this student lost points."""
    _, _, grades = scores(course, name, student)
    return {test for test, score in grades.items() if score < points(name)[test]}


def grade_everyone(course: Path, a: Assignment) -> Path:
    """Submit the solution, the release, every mistake and the cheats; one `nbgrader autograde` run."""
    generated = nbgrader(course, "generate_assignment", a.name, "--force")
    assert generated.returncode == 0, generated.stdout

    submit(course, a.name, "solution", source_nb(a.name))
    submit(course, a.name, "release", nbformat.read(a.release, as_version=4))
    for student, (edit, _) in a.mistakes.items():
        submit(course, a.name, student, edited(a.name, *edit))

    # A mistake, and the student "fixes" the failing test by gutting it.
    mistake, test = a.gutted
    nb = edited(a.name, *a.mistakes[mistake][0])
    cell(nb, test).source = "pass"
    submit(course, a.name, f"{mistake}_test_gutted", nb)

    # A mistake, and the student deletes the failing test.
    mistake, test = a.deleted
    nb = edited(a.name, *a.mistakes[mistake][0])
    nb.cells.remove(cell(nb, test))
    submit(course, a.name, f"{mistake}_test_deleted", nb)

    # A correct notebook without a test cell that follows a markdown cell.
    nb = source_nb(a.name)
    nb.cells.remove(cell(nb, a.after_markdown))
    submit(course, a.name, "test_after_markdown_deleted", nb)

    # Every habit, planted together (their tests are disjoint).
    nb = source_nb(a.name)
    for edit, _ in HABITS[a.name].values():
        nb = edited(a.name, *edit, nb=nb)
    submit(course, a.name, "habits", nb)

    # Answers that are not the student's own, and a correct answer that warns.
    bodies, _ = BORROWED[a.name]
    nb = source_nb(a.name)
    for gid, body in bodies.items():
        nb = answered(nb, gid, body)
    if a.name in WARNS:
        nb = edited(a.name, *WARNS[a.name][0], nb=nb)
    submit(course, a.name, "borrowed", nb)

    # The attack that scored full marks everywhere before the integrity check.
    submit(course, a.name, "ast_transformer", tampered(a.name, AST_ATTACK))

    result = autograde(course, a.name, "--create")
    assert result.returncode == 0, result.stdout

    # An infinite loop, graded alone with a short timeout (test_infinite_loop_costs_only_its_answer).
    submit(course, a.name, "loops", edited(a.name, a.loops[0], "### BEGIN SOLUTION", "while True:\n        pass"))
    result = autograde(course, a.name, "--student=loops", "--create", "--Execute.timeout=10")
    assert result.returncode == 0, result.stdout
    (course / "loops.log").write_text(result.stdout)
    return course


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """graded(name): the course in which every submission of that assignment was graded (once).
    All assignments are graded on first use, two at a time: each `nbgrader autograde` is one
    process whose kernels run one thread (env() sets OMP_NUM_THREADS=1), so two share the CI's two
    cores; autograde() retries the kernel-port race that two of them can run into."""
    courses: dict[str, Path] = {}

    def get(name: str) -> Path:
        if not courses:
            folders = {n: make_course(tmp_path_factory.mktemp(n)) for n in ASSIGNMENTS}
            with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
                futures = {n: pool.submit(grade_everyone, folders[n], a) for n, a in ASSIGNMENTS.items()}
                courses.update({n: f.result() for n, f in futures.items()})
        return courses[name]

    return get


names = pytest.mark.parametrize("name", list(ASSIGNMENTS))


# ------------------------------------------------------------------------------ the tests
@names
def test_solution_scores_full_marks(graded, name):
    """The instructor's own answers must pass every visible and hidden test, or the tests are wrong."""
    score, max_score, _ = scores(graded(name), name, "solution")
    assert max_score == sum(points(name).values()) > 0
    assert score == max_score


@names
def test_untouched_release_scores_zero(graded, name):
    """Submitting the release unchanged earns nothing: no test passes on `raise NotImplementedError()`."""
    score, max_score, grades = scores(graded(name), name, "release")
    assert max_score == sum(points(name).values())
    assert score == 0, grades


@pytest.mark.parametrize("name, student", MISTAKES)
def test_plausible_mistake_loses_the_points_of_its_tests(graded, name, student):
    """Each common mistake fails the tests aimed at its function (hidden tests included), and only those."""
    score, max_score, _ = scores(graded(name), name, student)
    expected = ASSIGNMENTS[name].mistakes[student][1]
    assert lost(graded(name), name, student) == expected
    assert score == max_score - sum(points(name)[test] for test in expected)


@names
def test_gutted_test_cell_is_restored(graded, name):
    """Replacing a test's body with `pass` does not help: grading runs the instructor's test cell."""
    mistake, _ = ASSIGNMENTS[name].gutted
    assert lost(graded(name), name, f"{mistake}_test_gutted") == ASSIGNMENTS[name].mistakes[mistake][1]


@names
def test_deleted_test_cell_is_restored_and_still_counts(graded, name):
    """Deleting a failing test does not shrink the maximum: the cell is put back, run and failed."""
    mistake, _ = ASSIGNMENTS[name].deleted
    expected = ASSIGNMENTS[name].mistakes[mistake][1]
    score, max_score, _ = scores(graded(name), name, f"{mistake}_test_deleted")
    assert max_score == sum(points(name).values())
    assert lost(graded(name), name, f"{mistake}_test_deleted") == expected
    assert score == max_score - sum(points(name)[test] for test in expected)


@names
def test_deleted_test_after_markdown_is_restored(graded, name):
    """nbgrader 0.9.6 crashes restoring a test whose previous source cell is locked markdown; ours avoid that."""
    nb = source_nb(name)
    test = cell(nb, ASSIGNMENTS[name].after_markdown)
    assert nb.cells[nb.cells.index(test) - 1].cell_type == "markdown", "pick a test that follows markdown"
    score, max_score, _ = scores(graded(name), name, "test_after_markdown_deleted")
    assert score == max_score == sum(points(name).values())


@names
def test_every_test_cell_can_be_restored(name):
    """The pitfall above, for every test cell: nbgrader puts a deleted test back after the source cell
    (a cell with nbgrader metadata) before it, and crashes unless that one is an answer or a test.
    Markdown right before a test therefore carries no nbgrader metadata."""
    source_cells = [c for c in source_nb(name).cells if "nbgrader" in c.metadata]
    for before, test in zip(source_cells, source_cells[1:]):
        if test.metadata.nbgrader.get("grade"):
            kind = before.metadata.nbgrader
            assert kind.get("grade") or kind.get("solution"), \
                f"{grade_id(test)} follows {grade_id(before)}: a deleted {grade_id(test)} could not be restored"


@names
def test_infinite_loop_costs_only_its_answer(graded, name):
    """A cell past the timeout is interrupted and fails; every other test still runs and earns its points."""
    course, (_, test) = graded(name), ASSIGNMENTS[name].loops
    assert "Timeout waiting for execute reply" in (course / "loops.log").read_text()
    score, max_score, _ = scores(course, name, "loops")
    assert lost(course, name, "loops") == {test}
    assert score == max_score - points(name)[test]


def test_grade_py_survives_a_crashing_student(tmp_path):
    """tools/grade.py grades everyone, reports the student whose kernel died, exports, then exits 1."""
    name = "schedule_math"  # grade.py does not depend on the assignment
    course = make_course(tmp_path / "course")
    with open(course / "nbgrader_config.py", "a") as f:  # the integrity check would not run os._exit at all
        f.write(f"\n{PLAIN_NBGRADER}\n")
    inbox = tmp_path / "inbox"  # --submitted: a folder outside the course
    for student, nb in [("good", source_nb(name)),
                        ("crashes", edited(name, "alpha_bar", "### BEGIN SOLUTION", "import os; os._exit(1)"))]:
        (inbox / student / name).mkdir(parents=True)
        nbformat.write(nb, inbox / student / name / f"{name}.ipynb")

    result = run(course, sys.executable, "tools/grade.py", name, "--submitted", str(inbox))
    assert result.returncode == 1, result.stdout
    table = dict(re.findall(r"^(good|crashes) +(.+)$", result.stdout, re.M))
    total = sum(points(name).values())
    assert table["good"] == f"{total:g} / {total:g}", result.stdout
    assert table["crashes"].startswith("FAILED: kernel died"), result.stdout

    assert scores(course, name, "good")[0] == total
    with open(course / "grades.csv", newline="") as f:
        rows = {row["student_id"]: row for row in csv.DictReader(f) if row["assignment"] == name}
    assert float(rows["good"]["score"]) == float(rows["good"]["max_score"]) == total, rows
    assert (course / "feedback" / "good" / name / f"{name}.html").exists()
    assert not (tmp_path / "course" / "assignments").exists(), "grade.py must not rewrite the release"


@names
def test_release_is_generated_from_solutions(graded, name):
    """assignments/ is exactly what `nbgrader generate_assignment` makes of solutions/: no drift."""
    a = ASSIGNMENTS[name]
    fresh = nbformat.read(graded(name) / "assignments" / name / a.notebook, as_version=4)
    committed = nbformat.read(a.release, as_version=4)
    assert fresh.metadata == committed.metadata
    assert [(c.cell_type, c.source, c.metadata) for c in fresh.cells] == \
        [(c.cell_type, c.source, c.metadata) for c in committed.cells]
    assert all(not c.get("outputs") for c in committed.cells), "commit the release without outputs"


def block(source: str, marker: str) -> list[str]:
    """The stripped, non-blank lines between ### BEGIN marker and ### END marker."""
    found = re.findall(rf"### BEGIN {marker}\n(.*?)### END {marker}", source, re.S)
    return [line.strip() for text in found for line in text.splitlines() if line.strip()]


@names
def test_release_contains_no_answers_or_hidden_tests(name):
    """Students must not find the answers or the hidden tests in the notebook they are given."""
    text = ASSIGNMENTS[name].release.read_text()
    for marker in ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"):
        assert marker not in text
    release = {grade_id(c): c.source for c in nbformat.read(ASSIGNMENTS[name].release, as_version=4).cells}
    checked = 0
    for source_cell in source_nb(name).cells:
        src = source_cell.source
        secret = block(src, "SOLUTION") + block(src, "HIDDEN TESTS")
        if not secret:
            continue
        outside = re.sub(r"### BEGIN (SOLUTION|HIDDEN TESTS)\n.*?### END \1", "", src, flags=re.S)
        public = {line.strip() for line in outside.splitlines()}  # e.g. `else:` may be in both
        released = {line.strip() for line in release[grade_id(source_cell)].splitlines()}
        for line in secret:
            if line not in public:
                assert line not in released, f"{grade_id(source_cell)} leaks: {line}"
                checked += 1
    assert checked > 50, "the check found almost no solution or hidden-test lines to look for"


# ------------------------------------------------------------------------------ integrity
@names
def test_honest_work_has_no_findings(graded, name):
    """The instructor's solution and the untouched release pass the integrity check untouched."""
    assert report(graded(name), name, "solution")["findings"] == []
    assert report(graded(name), name, "release")["findings"] == []


@names
def test_ast_transformer_attack_is_held_for_review(graded, name):
    """A cell that makes IPython wrap every later cell in try/except scores 0, and the report says why."""
    score, max_score, _ = scores(graded(name), name, "ast_transformer")
    assert max_score > 0 and score == 0
    found = report(graded(name), name, "ast_transformer")
    assert found["held_for_review"]
    assert any("get_ipython" in f["what"] and f["kind"] == "tampering" for f in found["findings"]), found


@names
def test_habits_are_graded(graded, name):
    """An input changed in place, a dtype ignored, gradients cut, a count as a float: each loses its tests."""
    planted = [tests for _, tests in HABITS[name].values()]
    expected = set().union(*planted)
    assert sum(map(len, planted)) == len(expected), "the habits' tests overlap: plant them in separate submissions"
    assert lost(graded(name), name, "habits") == expected
    assert report(graded(name), name, "habits")["findings"] == []  # honest mistakes, not misconduct


@names
def test_borrowed_answers_lose_their_tests_and_a_warning_costs_nothing(graded, name):
    """helpers, a library, a test's reference or a forbidden call: those answers' tests score 0 (and only
    those); a correct answer whose test prints a torch warning keeps its points."""
    course = graded(name)
    assert lost(course, name, "borrowed") == BORROWED[name][1]
    found = report(course, name, "borrowed")
    assert not found["held_for_review"] and found["findings"]
    assert {f["kind"] for f in found["findings"]} == {"delegation"}
    assert {f["cell"] for f in found["findings"]} == set(BORROWED[name][0])
    if name in WARNS:
        graded_nb = nbformat.read(course / "autograded" / "borrowed" / name / ASSIGNMENTS[name].notebook, as_version=4)
        text = "".join(o.get("text", "") for o in cell(graded_nb, WARNS[name][1]).outputs)
        assert "[stderr, not counted]" in text and "Warning" in text, "the warning was not emitted: pick another"


@pytest.fixture(scope="module")
def tampering_course(tmp_path_factory):
    """schedule_math graded twice: by the course's config, and by plain nbgrader (no integrity check)."""
    name, courses = "schedule_math", {}
    for config in ("course", "plain"):
        course = make_course(tmp_path_factory.mktemp(f"tampering-{config}"))
        if config == "plain":
            with open(course / "nbgrader_config.py", "a") as f:
                f.write(f"\n{PLAIN_NBGRADER}\n")
        assert nbgrader(course, "generate_assignment", name, "--force").returncode == 0
        for attack, code in TAMPERING.items():
            nb = tampered(name, code)
            if attack == "always_equal":  # an answer, not an added cell
                nb = nbformat.read(ASSIGNMENTS[name].release, as_version=4)
                cell(nb, "first_step_below").source = code
            submit(course, name, attack, nb)
        result = autograde(course, name, "--create")
        assert result.returncode == 0, result.stdout
        courses[config] = course
    return courses


@pytest.mark.parametrize("attack", list(TAMPERING))
def test_tampering_scores_zero_and_is_reported(tampering_course, attack):
    """Each attack on the grading kernel scores 0 and is held for review, with a reason in plain words."""
    name = "schedule_math"
    score, max_score, _ = scores(tampering_course["course"], name, attack)
    assert max_score > 0 and score == 0
    found = report(tampering_course["course"], name, attack)
    assert found["held_for_review"] and all(f["what"] for f in found["findings"])


@pytest.mark.parametrize("attack", ["ast_transformer", "input_transformer_via_torch_sys"])
def test_kernel_attacks_are_real(tampering_course, attack):
    """Without the integrity check, plain nbgrader gives these submissions (no answer at all) full marks:
    the tests above would fail if the check were removed."""
    score, max_score, _ = scores(tampering_course["plain"], "schedule_math", attack)
    assert score == max_score > 0


def release_as_graded(name: str):
    return as_graded(nbformat.read(ASSIGNMENTS[name].release, as_version=4), name)


@names
@pytest.mark.parametrize("attack", list(TAMPERING))
def test_every_attack_is_found_in_every_assignment(name, attack):
    """The integrity check itself (no kernel): each attack, added to each release, is tampering."""
    nb = release_as_graded(name)
    nb.cells.insert(1, nbformat.v4.new_code_cell(TAMPERING[attack]))
    findings = integrity.check_notebook(nb, source_nb(name))
    assert any(f.kind == "tampering" for f in findings), findings


@names
def test_instructor_notebooks_pass_the_check(name):
    """The solutions, and the releases as grading sees them, have no findings: honest work is never held."""
    assert integrity.check_notebook(source_nb(name), source_nb(name)) == []
    assert integrity.check_notebook(release_as_graded(name), source_nb(name)) == []


HONEST = {  # code an honest student might write: no finding
    "local names that shadow built-ins": "def g(input, sum=0):\n    max = input.max()\n    return input + sum + max",
    "a nested helper named like a test's": "def cosine_betas(T):\n    def f(u):\n        return u\n    return f(T)",
    "timing magics": "%timeit x = 1\n%time y = 2",
    "torch and numpy": "import numpy as np\nimport torch.nn.functional as F\nx = np.zeros(3)\ny = F.relu(torch.ones(2))",
    "in-place tensor methods": "conv = torch.nn.Conv2d(2, 2, 1)\nwith torch.no_grad():\n    conv.weight.zero_()",
    "subscript assignment": "x = torch.zeros(3)\nx[0] = 1.0",
}
CAUGHT = {  # (code, kind)
    "module attribute through an alias": ("t = torch.testing\nt.assert_close = print", "tampering"),
    "setattr": ("setattr(torch.testing, 'assert_close', print)", "tampering"),
    "a class built by type()": ("X = type('X', (int,), {'__eq__': lambda s, o: True})", "tampering"),
    "a private module": ("from torch import _C", "tampering"),
    "builtins through a dunder": ("b = __builtins__", "tampering"),
    "a module's namespace": ("vars(torch.testing)['assert_close'] = print", "tampering"),
    "a shell command": ("!touch gradebook.db", "tampering"),
    "rebinding the set-up's torch": ("import numpy as torch", "tampering"),
    "rebinding a built-in for everyone": ("isinstance = lambda *args: True", "tampering"),
    "exec of a string": ("exec('x = 1')", "tampering"),
    "a shell command inside an assignment": ("files = !ls", "tampering"),
    "top-level await around the kernel": ("await something()\nget_ipython().ast_transformers.clear()", "tampering"),
    "the course's helpers": ("def snr(a):\n    import helpers\n    return helpers.schedules.snr(a)", "delegation"),
    "diffusers": ("from diffusers import DDPMScheduler", "delegation"),
    "a test's reference inside an answer": ("def cosine_betas(T):\n    return f(T)", "delegation"),
}


@pytest.mark.parametrize("case", list(HONEST))
def test_honest_code_is_not_flagged(case):
    ctx = integrity.Context.from_source(source_nb("schedule_math"))
    assert integrity.check_cell("added", HONEST[case], ctx) == []


@pytest.mark.parametrize("case", list(CAUGHT))
def test_obfuscated_tampering_and_delegation_are_caught(case):
    code, kind = CAUGHT[case]
    ctx = integrity.Context.from_source(source_nb("schedule_math"))
    assert kind in {f.kind for f in integrity.check_cell("added", code, ctx)}


def test_feedback_hides_hidden_tests(graded):
    """Feedback shows no hidden test line, and a failed test shows its message, not a traceback."""
    name = "schedule_math"
    course = graded(name)
    result = nbgrader(course, "generate_feedback", name, "--student=release", "--force")
    assert result.returncode == 0, result.stdout
    page = (course / "feedback" / "release" / name / f"{name}.html").read_text()
    text = html.unescape(re.sub(r"<[^>]+>", "", page))  # what a reader sees: no tags, no escapes
    assert "hidden tests, not shown" in text
    visible = [line.strip() for line in cell(source_nb(name), "test_q_sample").source.splitlines()[:3]]
    assert all(line in text for line in visible), "the check cannot see the feedback's code"
    hidden = [line for c in source_nb(name).cells for line in block(c.source, "HIDDEN TESTS") if len(line) > 30]
    assert hidden and not any(line in text for line in hidden)
