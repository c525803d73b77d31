"""Unit tests of helpers: invariants, and equality with diffusers where it does the same job."""

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from diffusers import DDPMScheduler

import helpers
from helpers import plot
from helpers.data import COLOURS, POSITIONS, SHAPES, SIZES

# Our schedule name -> (diffusers beta_schedule, the beta range passed to both).
DIFFUSERS_NAMES = {
    "linear": ("linear", dict(beta_start=1e-4, beta_end=0.02)),
    "scaled_linear": ("scaled_linear", dict(beta_start=0.00085, beta_end=0.012)),
    "cosine": ("squaredcos_cap_v2", {}),
}


# --- core ----------------------------------------------------------------------------------

def test_get_device_auto_is_a_real_device_and_bad_names_are_explained():
    assert helpers.get_device("auto").type in ("cpu", "cuda", "mps")
    assert helpers.get_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device"):
        helpers.get_device("gpu please")


def test_seed_everything_makes_draws_repeat():
    g = helpers.seed_everything(3)
    a, b = torch.randn(4), torch.randn(4, generator=g)
    g = helpers.seed_everything(3)
    assert torch.equal(a, torch.randn(4)) and torch.equal(b, torch.randn(4, generator=g))
    with pytest.raises(ValueError, match="seed"):
        helpers.seed_everything(-1)


def test_append_dims_broadcasts_a_per_sample_coefficient():
    c = torch.arange(3.0)
    assert helpers.append_dims(c, 4).shape == (3, 1, 1, 1)
    x = torch.ones(3, 2, 5, 5)
    assert torch.equal((helpers.append_dims(c, 4) * x)[:, 0, 0, 0], c)
    with pytest.raises(ValueError, match="ndim"):
        helpers.append_dims(torch.ones(2, 2), 1)


# --- schedules -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(DIFFUSERS_NAMES))
@pytest.mark.parametrize("T", [10, 1000])
def test_schedules_equal_diffusers_ddpm_scheduler(name, T):
    """Bit-for-bit the betas and alphas_cumprod that DDPMScheduler builds."""
    diffusers_name, betas_range = DIFFUSERS_NAMES[name]
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=diffusers_name, **betas_range)
    ours = helpers.get_schedule(name, T, **betas_range)
    torch.testing.assert_close(ours.betas, ref.betas, rtol=0, atol=0)
    torch.testing.assert_close(ours.alpha_bar, ref.alphas_cumprod, rtol=0, atol=0)
    torch.testing.assert_close(ours.alphas, ref.alphas, rtol=0, atol=0)


def test_cosine_alpha_bar_is_the_closed_form_ratio_where_the_cap_does_not_bite():
    """Nichol & Dhariwal define alpha_bar(t) = f(t)/f(0); the betas must multiply back to it."""
    T, s = 1000, 0.008
    ab = helpers.get_schedule("cosine", T, dtype=torch.float64).alpha_bar
    u = torch.arange(1, T + 1, dtype=torch.float64) / T
    f = torch.cos((u + s) / (1 + s) * torch.pi / 2) ** 2
    f0 = torch.cos(torch.tensor(s / (1 + s) * torch.pi / 2, dtype=torch.float64)) ** 2
    torch.testing.assert_close(ab[:-1], (f / f0)[:-1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(helpers.SCHEDULES))
def test_schedule_invariants(name):
    """alpha_bar starts near 1, falls strictly, stays in (0, 1); SNR falls through 1 once."""
    s = helpers.get_schedule(name, dtype=torch.float64)
    assert 0.99 < s.alpha_bar[0] < 1
    assert torch.all(s.alpha_bar[1:] < s.alpha_bar[:-1])
    assert torch.all((s.alpha_bar > 0) & (s.alpha_bar < 1))
    torch.testing.assert_close(s.alpha_bar, torch.exp(torch.cumsum(torch.log1p(-s.betas), 0)))
    crossings = ((s.snr[:-1] >= 1) & (s.snr[1:] < 1)).sum()
    assert crossings == 1


def test_first_step_below_matches_a_direct_search_and_explains_failure():
    ab = helpers.get_schedule("linear").alpha_bar
    t = helpers.first_step_below(ab, 0.01)
    assert ab[t] < 0.01 <= ab[t - 1]
    assert helpers.first_step_below(torch.tensor([0.5, 0.2, 0.1]), 0.6) == 0
    with pytest.raises(ValueError, match="threshold"):
        helpers.first_step_below(ab, 1e-9)


def test_schedule_functions_reject_bad_arguments_by_name():
    with pytest.raises(ValueError, match="T"):
        helpers.linear_betas(0)
    with pytest.raises(ValueError, match="beta_start"):
        helpers.linear_betas(10, beta_start=-1.0)
    with pytest.raises(ValueError, match="name"):
        helpers.get_schedule("sigmoid")
    with pytest.raises(ValueError, match="betas"):
        helpers.alpha_bar_from_betas(torch.ones(2, 2) * 0.1)


# --- forward process -----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(DIFFUSERS_NAMES))
def test_q_sample_equals_ddpm_scheduler_add_noise(name):
    diffusers_name, betas_range = DIFFUSERS_NAMES[name]
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=diffusers_name, **betas_range)
    ours = helpers.get_schedule(name, **betas_range)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    torch.testing.assert_close(helpers.q_sample(x0, t, eps, ours.alpha_bar), ref.add_noise(x0, eps, t))


def test_q_sample_reproduces_the_worked_example_of_the_notes():
    """x0 = [0.8, -0.3], beta = 0.02, eps = [0.5, -0.7] gives [0.863, -0.396] (one step)."""
    x0, eps = torch.tensor([0.8, -0.3]), torch.tensor([0.5, -0.7])
    x1 = helpers.q_step(x0, 0.02, eps)
    torch.testing.assert_close(x1, torch.tensor([0.8627, -0.3960]), atol=1e-4, rtol=0)
    # One step from x0 is the closed form with alpha_bar = 1 - beta.
    torch.testing.assert_close(helpers.q_sample(x0, 0, eps, torch.tensor([0.98])), x1)


def test_q_step_composed_has_the_closed_form_distribution():
    """Chaining the one-step form t times gives N(sqrt(ab) x0, (1 - ab) I) (DDPM eq. 4)."""
    s = helpers.get_schedule("linear", T=200, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x0 = torch.full((20000,), 0.7, dtype=torch.float64)
    x = x0.clone()
    for t in range(150):
        x = helpers.q_step(x, s.betas[t], torch.randn(x.shape, generator=g, dtype=torch.float64))
    ab = s.alpha_bar[149]
    assert abs(x.mean() - ab.sqrt() * 0.7) < 4 * (1 - ab).sqrt() / 20000**0.5
    assert abs(x.var() - (1 - ab)) < 0.03


def test_forward_process_preserves_unit_variance():
    """Variance preserving: if Var(x0) = 1 then Var(xt) = ab + (1 - ab) = 1 at every t."""
    s = helpers.get_schedule("cosine")
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(100000, generator=g) * 1.0 + 0.0
    for t in (0, 100, 500, 900, 999):
        xt = helpers.q_sample(x0, t, torch.randn(x0.shape, generator=g), s.alpha_bar)
        assert abs(xt.var() - 1) < 0.02, (t, xt.var())


def test_q_sample_rejects_mismatched_inputs_by_name():
    ab = helpers.get_schedule("linear", T=10).alpha_bar
    with pytest.raises(ValueError, match="eps"):
        helpers.q_sample(torch.zeros(2, 3), 0, torch.zeros(3, 2), ab)
    with pytest.raises(ValueError, match="t must lie"):
        helpers.q_sample(torch.zeros(2, 3), 10, torch.zeros(2, 3), ab)
    with pytest.raises(ValueError, match="t must hold integer"):
        helpers.q_sample(torch.zeros(2, 3), torch.tensor([0.5, 1.0]), torch.zeros(2, 3), ab)


# --- data ----------------------------------------------------------------------------------

def test_digits_are_the_real_digits_in_range():
    x, y = helpers.load_digits()
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    assert x.min() == -1 and x.max() == 1
    assert set(y.tolist()) == set(range(10))
    assert helpers.load_digits(16)[0].shape == (1797, 1, 16, 16)


def test_shapes_are_seeded_labelled_and_consistent():
    a, b = helpers.make_shapes(64, 32, seed=5), helpers.make_shapes(64, 32, seed=5)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, helpers.make_shapes(64, 32, seed=6).images)
    assert a.images.shape == (64, 3, 32, 32) and a.images.min() >= -1 and a.images.max() <= 1
    assert torch.all(a.edges <= a.masks)  # outlines lie on the shape
    assert torch.all(a.masks.sum((1, 2, 3)) > 0)
    for i in range(64):
        colour = list(COLOURS)[a.colour[i]]
        assert colour in a.captions[i] and SHAPES[a.shape[i]] in a.captions[i]
        assert list(SIZES)[a.size[i]] in a.captions[i] and list(POSITIONS)[a.position[i]] in a.captions[i]
        # Inside the mask every pixel has the caption's colour; outside it is background.
        rgb = (torch.tensor(COLOURS[colour]) * 2 - 1)[:, None]
        inside = a.images[i][:, a.masks[i, 0] > 0]
        torch.testing.assert_close(inside, rgb.expand_as(inside))
        assert torch.all(a.images[i][:, a.masks[i, 0] == 0] == -1)


def test_shapes_positions_and_sizes_are_where_the_caption_says():
    s = helpers.make_shapes(200, 32, seed=0)
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    area = s.masks.sum((1, 2, 3))
    cx = (s.masks[:, 0] * xs).sum((1, 2)) / area
    left, right = s.position == list(POSITIONS).index("left"), s.position == list(POSITIONS).index("right")
    assert cx[left].max() < 16 < cx[right].min()
    small, large = s.size == 0, s.size == 1
    assert area[small].max() < area[large].min()


def test_photos_load_offline_in_range():
    for name in ("chelsea", "camera", "astronaut"):
        p = helpers.load_photo(name, size=32)
        assert p.shape == (3, 32, 32) and p.min() >= -1 and p.max() <= 1
    with pytest.raises(ValueError, match="name"):
        helpers.load_photo("lena")


# --- plot ----------------------------------------------------------------------------------

def test_image_grid_has_one_axis_per_image():
    fig = plot.image_grid(torch.zeros(5, 1, 8, 8), nrow=3)
    assert len([ax for ax in fig.axes if ax.images]) == 5
    with pytest.raises(ValueError, match="images"):
        plot.image_grid(torch.zeros(5, 2, 8, 8))


def test_timestep_player_is_a_self_contained_animation():
    s = helpers.get_schedule("linear")
    html = plot.timestep_player(torch.zeros(3, 8, 8), s.alpha_bar, [0, 500, 999])
    assert "<script" in html and html.count("data:image/png;base64") == 3
    assert "http://" not in html and "https://" not in html  # plays offline
    assert 'class="fa' not in html  # every icon replaced by a glyph that needs no web font
    assert '<img alt="An animation of 3 frames, from &#x27;t = 0' in html  # a screen reader says what plays


def test_timestep_slider_spans_every_step():
    """The live-notebook slider covers t = 0 .. T-1 and draws a frame when moved."""
    s = helpers.get_schedule("cosine", T=50)
    shown = plot.timestep_slider(torch.zeros(1, 8, 8), s.alpha_bar)
    slider = shown.widget.children[0]
    assert (slider.min, slider.max) == (0, 49)
    slider.value = 25  # moving it re-runs the drawing function without error


def test_unevenness_is_zero_for_linspace_and_scale_free():
    from helpers.schedules import unevenness

    assert unevenness(torch.linspace(1e-4, 0.02, 1000)) < 1e-6
    squares = torch.linspace(0.0, 1.0, 101) ** 2  # max |t^2 - t| on [0, 1] is 1/4, at t = 1/2
    assert abs(unevenness(squares) - 0.25) < 1e-6
    assert abs(unevenness(1e-6 * squares) - 0.25) < 1e-6  # small numbers do not look even
    for bad in (torch.ones(5), torch.zeros(1), torch.zeros(2, 2)):
        with pytest.raises(ValueError, match="x must"):
            unevenness(bad)
