"""The assignments grade fairly: nbgrader, our config and tools/grade.py, end to end.

Each test builds a throw-away course in tmp_path from the repository's nbgrader_config.py,
solutions/ and tools/grade.py, submits notebooks to it as students would, runs the real
``nbgrader`` commands and reads the scores back from the gradebook. The same proofs run for
every assignment in ASSIGNMENTS; the submissions of one assignment share one
``nbgrader autograde`` run (kernels take seconds to start). Nothing is written to the
repository.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
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
    },
    gutted=("frame_wraps_around", "test_frame_difference"),
    deleted=("frames_not_divided", "test_spacetime_patch_count"),
    after_markdown="test_temporal_attention_is_local",
    loops=("attention_cost", "test_attention_cost"),
)

ASSIGNMENTS = {a.name: a for a in (SCHEDULE_MATH, REVERSE_STEP, CFG_ARITHMETIC, DDIM_RECONSTRUCTION,
                                   DIT_FLOW, LORA_CONTROLNET, VIDEO_PATCHES)}
MISTAKES = [(a.name, student) for a in ASSIGNMENTS.values() for student in sorted(a.mistakes)]


# ------------------------------------------------------------------------------ helpers
def make_course(path: Path) -> Path:
    """A course directory like the repository's, minus everything grading does not need."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "nbgrader_config.py", path)
    shutil.copytree(ROOT / "solutions", path / "solutions")
    (path / "tools").mkdir()
    shutil.copy(ROOT / "tools" / "grade.py", path / "tools")
    return path


def env(course: Path) -> dict:
    """Offline, with this venv's scripts on PATH (nbgrader calls `alembic`), and a gradebook in tmp."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        "NBGRADER_DB_URL": f"sqlite:///{course / 'gradebook.db'}",
    }


def run(course: Path, *args: str) -> subprocess.CompletedProcess:
    """Run a command in the course directory; stdout and stderr together in .stdout."""
    return subprocess.run(args, cwd=course, env=env(course), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def nbgrader(course: Path, *args: str) -> subprocess.CompletedProcess:
    return run(course, sys.executable, "-m", "nbgrader", *args)


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

    result = nbgrader(course, "autograde", a.name, "--create")
    assert result.returncode == 0, result.stdout
    return course


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """graded(name): the course in which every submission of that assignment was graded (once)."""
    courses: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in courses:
            courses[name] = grade_everyone(make_course(tmp_path_factory.mktemp(name)), ASSIGNMENTS[name])
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
    course, (answer, test) = graded(name), ASSIGNMENTS[name].loops
    submit(course, name, "loops", edited(name, answer, "### BEGIN SOLUTION", "while True:\n        pass"))
    result = nbgrader(course, "autograde", name, "--student=loops", "--create", "--Execute.timeout=10")
    assert result.returncode == 0, result.stdout
    assert "Timeout waiting for execute reply" in result.stdout
    score, max_score, _ = scores(course, name, "loops")
    assert lost(course, name, "loops") == {test}
    assert score == max_score - points(name)[test]


def test_grade_py_survives_a_crashing_student(tmp_path):
    """tools/grade.py grades everyone, reports the student whose kernel died, exports, then exits 1."""
    name = "schedule_math"  # grade.py does not depend on the assignment
    course = make_course(tmp_path / "course")
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
