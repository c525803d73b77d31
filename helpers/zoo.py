"""Train once, load after: named recipes whose trained models are cached on disk.

A recipe builds a model, trains it with :func:`helpers.training.train` and is identified by a
hash of everything that shapes the result (config, data, training settings, ``version``). The
first :func:`load` trains and ``save_pretrained``s into ``cache_dir()/<name>-<hash>/``; later
calls ``from_pretrained`` it in a second. A changed recipe has a new hash, so it retrains.

The cache lives in ``$COURSE_CACHE`` if set, else ``~/.cache/diffusion-course``; the README's
build and test commands point it into ``_build/`` so a clean run retrains every recipe.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

__all__ = ["RECIPES", "Recipe", "build", "cache_dir", "history", "load"]


def cache_dir() -> Path:
    """Where trained recipes are kept: ``$COURSE_CACHE`` or ``~/.cache/diffusion-course``."""
    return Path(os.environ.get("COURSE_CACHE") or Path.home() / ".cache" / "diffusion-course")


@dataclass(frozen=True)
class Recipe:
    """How to make one trained model. Every field enters the hash, so any change retrains."""

    name: str
    model: str  # a factory in helpers.models
    model_kwargs: dict
    data: str  # "digits"
    schedule: str
    prediction_type: str
    train_kwargs: dict  # passed to helpers.training.train (a step budget: deterministic)
    version: int = 1
    notes: str = field(default="", compare=False)

    def key(self) -> str:
        blob = json.dumps({k: v for k, v in asdict(self).items() if k != "notes"}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


RECIPES: dict[str, Recipe] = {
    "digits_unet": Recipe(
        name="digits_unet",
        model="digits_unet",
        model_kwargs={"size": 8, "widths": [32, 64, 64], "attention": True},
        data="digits",
        schedule="linear",
        prediction_type="epsilon",
        train_kwargs={"steps": 1200, "batch_size": 128, "lr": 2e-3, "ema_decay": 0.999, "seed": 0,
                      "snapshot_every": 200},
        notes="DDPM on the 8x8 digits; about 90 s on 2 CPU cores (chapters 2 and 3).",
    ),
}


def build(name: str):
    """A fresh, untrained model with recipe ``name``'s architecture (e.g. to load a snapshot into)."""
    from helpers import models

    if name not in RECIPES:
        raise ValueError(f"name must be one of {sorted(RECIPES)}; got {name!r}")
    recipe = RECIPES[name]
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in recipe.model_kwargs.items()}  # JSON lists
    return getattr(models, recipe.model)(**kwargs)


def _train(recipe: Recipe, progress: bool):
    import helpers
    from helpers import training

    if recipe.data != "digits":
        raise ValueError(f"recipe {recipe.name}: unknown data {recipe.data!r}")
    x0, _ = helpers.load_digits(recipe.model_kwargs.get("size", 8))
    helpers.seed_everything(recipe.train_kwargs.get("seed", 0))  # the initial weights are part of the recipe
    model = build(recipe.name)
    alpha_bar = helpers.get_schedule(recipe.schedule).alpha_bar
    objective = training.diffusion_objective(alpha_bar, recipe.prediction_type)
    result = training.train(model, x0, objective, progress=progress, **recipe.train_kwargs)
    return result.ema if result.ema is not None else result.model, result


def _folder(name: str) -> Path:
    if name not in RECIPES:
        raise ValueError(f"name must be one of {sorted(RECIPES)}; got {name!r}")
    return cache_dir() / f"{name}-{RECIPES[name].key()}"


def history(name: str) -> tuple[dict, list[tuple[int, float, dict]]]:
    """The training record of a recipe loaded before: ``(info, snapshots)``.

    ``info`` has the recipe, ``losses`` (one per step), ``steps`` and ``train_seconds``;
    ``snapshots`` are ``(step, seconds, EMA state_dict)`` taken every ``snapshot_every`` steps.
    """
    folder = _folder(name)
    if not (folder / "recipe.json").exists():
        raise FileNotFoundError(f"recipe {name!r} has not been trained yet: call zoo.load({name!r}) first")
    snapshots = torch.load(folder / "snapshots.pt") if (folder / "snapshots.pt").exists() else []
    return json.loads((folder / "recipe.json").read_text()), snapshots


def load(name: str, device: torch.device | str = "cpu", progress: bool = True, retrain: bool = False):
    """The trained model of recipe ``name``: from the cache, or trained now and cached.

    Returns the model in eval mode on ``device``. ``retrain=True`` ignores the cache.
    """
    folder = _folder(name)
    recipe = RECIPES[name]
    model_class = type(build(name))
    if (folder / "recipe.json").exists() and not retrain:
        model = model_class.from_pretrained(folder)
        print(f"zoo: loaded {name} from {folder}")
    else:
        start = time.perf_counter()
        model, result = _train(recipe, progress)
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        if result.snapshots:
            torch.save(result.snapshots, folder / "snapshots.pt")
        info = asdict(recipe) | {"key": recipe.key(), "train_seconds": round(result.seconds, 1),
                                 "steps": result.steps, "losses": result.losses}
        (folder / "recipe.json").write_text(json.dumps(info, indent=1))  # written last: marks completion
        print(f"zoo: trained {name} in {time.perf_counter() - start:.0f} s -> {folder}")
    return model.to(device).eval().requires_grad_(False)
