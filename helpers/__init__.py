"""helpers: the shared code of *Diffusion Models in Practice*.

Every notebook of the course imports this package. It is ordinary, hand-written Python with
ordinary tests (``tests/``); chapters write each idea out once in a few visible lines, check it
against this package and against diffusers, and later chapters import it from here.

Notation and conventions (the same as the book's notation page)
---------------------------------------------------------------
* Images are tensors ``(B, C, H, W)`` scaled to ``[-1, 1]``.
* ``x0`` is clean data, ``eps`` standard Gaussian noise, ``xt`` the noisy sample at time ``t``.
* **Time runs towards noise: larger t is noisier.** DDPM time is an integer ``t`` in
  ``[0, T)``, 0-indexed exactly as ``diffusers.DDPMScheduler``: ``betas[t]`` is the variance
  added by the step that produces ``x_t`` (so ``x_0`` in the notes' 1-indexed notation is our
  clean ``x0`` and their ``x_1`` is our ``t = 0``). Flow matching uses ``t`` in ``[0, 1]`` with
  pure noise at ``t = 1``, as diffusers and Stable Diffusion 3 do.
* ``alpha = 1 - beta``; ``alpha_bar[t] = prod_{s <= t} alpha[s]``;
  ``xt = sqrt(alpha_bar[t]) * x0 + sqrt(1 - alpha_bar[t]) * eps``;
  ``snr[t] = alpha_bar[t] / (1 - alpha_bar[t])``.
* Modules: ``schedules``, ``diffusion`` (forward and reverse process, DDIM), ``data``, ``models``,
  ``training`` (one loop on accelerate), ``zoo`` (train once, load after), ``metrics``, ``plot``,
  ``text`` (tokenizer, tiny CLIP), ``flow`` (flow matching), ``mmdit`` (SD3 in miniature),
  ``control`` (ControlNet, LoRA, editing), ``video`` (clips, temporal attention), ``score``
  (Gaussian mixtures' exact score and Tweedie mean, the bound's weights), ``edm`` (sigma, EDM's
  preconditioning and samplers).
* Device: CUDA when present, else MPS, else CPU (:func:`get_device`); float32 by default.
"""

import diffusers as _diffusers
import huggingface_hub as _hub
import transformers as _transformers

# The libraries' loading and saving progress bars become ipywidgets in a notebook, which a
# static page cannot render (and whose fonts it would fetch); training shows its own text bar.
_diffusers.utils.logging.disable_progress_bar()
_transformers.utils.logging.disable_progress_bar()
_hub.utils.disable_progress_bars()

from helpers import alt_text, control, diffusion, edm, flow, mmdit, models, plot, score, text, training, video, zoo  # noqa: E402, F401  (helpers.training etc.)
from helpers.core import append_dims, get_device, seed_everything

alt_text.enable()  # in a notebook, every figure carries a description of itself (its page's alt text)
from helpers.data import (
    PHOTOS,
    Shapes,
    load_digits,
    load_photo,
    make_shapes,
)
from helpers.diffusion import q_sample, q_step
from helpers.metrics import (
    DigitClassifier,
    DigitScores,
    digit_classifier,
    frechet_distance,
    score_digits,
)
from helpers.schedules import (
    SCHEDULES,
    Schedule,
    alpha_bar_from_betas,
    cosine_betas,
    first_step_below,
    get_schedule,
    linear_betas,
    scaled_linear_betas,
    snr,
    snr_db,
)

__all__ = [
    "DigitClassifier",
    "DigitScores",
    "PHOTOS",
    "SCHEDULES",
    "Schedule",
    "Shapes",
    "alpha_bar_from_betas",
    "append_dims",
    "cosine_betas",
    "digit_classifier",
    "first_step_below",
    "frechet_distance",
    "get_device",
    "get_schedule",
    "linear_betas",
    "load_digits",
    "load_photo",
    "make_shapes",
    "q_sample",
    "q_step",
    "scaled_linear_betas",
    "score_digits",
    "seed_everything",
    "snr",
    "snr_db",
]
