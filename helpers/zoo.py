"""Train once, load after: named recipes whose trained models are cached on disk.

A recipe builds a model, trains it with :func:`helpers.training.train` and is identified by a
hash of everything that shapes the result (config, data, training settings, ``version``). The
first :func:`load` trains and ``save_pretrained``s into ``cache_dir()/<name>-<hash>/``; later
calls ``from_pretrained`` it in a second. A changed recipe has a new hash, so it retrains.

The cache lives in ``$COURSE_CACHE`` if set, else ``~/.cache/diffusion-course``; the README's
build and test commands point it into ``_build/`` so a clean run retrains every recipe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

__all__ = ["RECIPES", "TRAINERS", "Recipe", "assemble_pipeline", "build", "cache_dir", "cache_lock", "history",
           "load", "load_checkpoint", "training_indices", "vae_loss", "vae_training_images"]


def cache_dir() -> Path:
    """Where trained recipes are kept: ``$COURSE_CACHE`` or ``~/.cache/diffusion-course``."""
    return Path(os.environ.get("COURSE_CACHE") or Path.home() / ".cache" / "diffusion-course")


@contextlib.contextmanager
def cache_lock(name: str):
    """Hold the cache's lock on artefact ``name`` while checking, training and saving it.

    Notebooks that run side by side (``tools/build.py --jobs 2``) and need the same model then
    train it once: the second waits, then loads what the first saved. An exclusive ``flock`` on
    ``cache_dir()/.locks/<name>``, released when the file closes, also when a process dies. Where
    the lock cannot be taken (a read-only cache, a system without ``fcntl``) it is skipped: two
    processes may then both train, which costs time and never correctness (saves are atomic).
    """
    try:
        import fcntl

        path = cache_dir() / ".locks" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")
    except (ImportError, OSError):
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@dataclass(frozen=True)
class Recipe:
    """How to make one trained model. Every field enters the hash, so any change retrains.

    ``kind`` picks the trainer (:data:`TRAINERS`); ``requires`` names recipes this one is built
    on (their hashes enter this one's, so retraining a text encoder retrains what reads it).
    """

    name: str
    model: str  # a factory in helpers.models (or helpers.text for "tiny_clip")
    model_kwargs: dict
    data: str  # "digits" or "shapes"
    train_kwargs: dict  # passed to helpers.training.train (a step budget: deterministic)
    kind: str = "diffusion"
    schedule: str = "linear"
    prediction_type: str = "epsilon"
    data_kwargs: dict = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    version: int = 1
    notes: str = field(default="", compare=False)

    def key(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if k != "notes"}
        fields["requires"] = {name: RECIPES[name].key() for name in self.requires}
        blob = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


RECIPES: dict[str, Recipe] = {
    "digits_unet": Recipe(
        name="digits_unet",
        model="digits_unet",
        model_kwargs={"size": 8, "widths": [32, 64, 64], "attention": True},
        data="digits",
        train_kwargs={"steps": 1200, "batch_size": 128, "lr": 2e-3, "ema_decay": 0.999, "seed": 0,
                      "snapshot_every": 200},
        notes="DDPM on the 8x8 digits; about 90 s on 2 CPU cores (chapters 2, 3 and 6).",
    ),
    "digits_cond_unet": Recipe(
        name="digits_cond_unet",
        model="digits_unet",
        model_kwargs={"size": 8, "widths": [32, 64, 64], "attention": True, "num_class_embeds": 11},
        data="digits",
        kind="class_diffusion",
        data_kwargs={"cond_dropout": 0.1, "null_class": 10},
        train_kwargs={"steps": 700, "batch_size": 128, "lr": 2e-3, "ema_decay": 0.999, "seed": 0},
        notes="Class-conditional DDPM on the digits, the label dropped to class 10 (null) 10 % of the time (chapter 4).",
    ),
    "tiny_clip": Recipe(
        name="tiny_clip",
        model="tiny_clip",
        model_kwargs={},
        data="shapes",
        kind="clip",
        data_kwargs={"n": 6000, "size": 32, "seed": 1},
        train_kwargs={"steps": 300, "batch_size": 128, "lr": 2e-3, "ema_decay": None, "warmup_steps": 50,
                      "seed": 0},
        notes="A CLIPModel trained contrastively on shapes and captions (chapter 4).",
    ),
    "shapes_vae": Recipe(
        name="shapes_vae",
        model="shapes_vae",
        model_kwargs={"widths": [16, 32, 32]},
        data="shapes",
        kind="vae",
        data_kwargs={"n": 6000, "size": 32, "seed": 2, "photo_patches": 3000, "kl_weight": 1e-4, "crop": 16,
                     "finish": {"steps": 200, "batch_size": 32, "lr": 1.5e-3, "warmup_steps": 10}},
        train_kwargs={"steps": 800, "batch_size": 64, "lr": 3e-3, "ema_decay": None, "seed": 0},
        notes="An AutoencoderKL (3x32x32 -> 4x8x8) on shapes and photograph patches: 800 steps on "
              "16x16 crops, then 200 on whole images (chapter 5).",
    ),
    "shapes_sd": Recipe(
        name="shapes_sd",
        model="shapes_unet",
        model_kwargs={"widths": [32, 64]},
        data="shapes",
        kind="latent_diffusion",
        schedule="scaled_linear",
        prediction_type="v_prediction",
        data_kwargs={"n": 6000, "size": 32, "seed": 3, "cond_dropout": 0.1},
        requires=("shapes_vae", "tiny_clip"),
        version=2,  # 2: pooled text added to the time embedding
        train_kwargs={"steps": 800, "batch_size": 64, "lr": 3e-3, "ema_decay": 0.999, "seed": 0},
        notes="The miniature Stable Diffusion: a text-conditional latent U-Net, saved as a whole "
              "StableDiffusionPipeline (chapter 5).",
    ),
    "digits_unet_16": Recipe(
        name="digits_unet_16",
        model="digits_unet",
        model_kwargs={"size": 8, "widths": [16, 32, 32], "attention": False},
        data="digits",
        data_kwargs={"subset": 16, "subset_seed": 0},
        train_kwargs={"steps": 500, "batch_size": 64, "lr": 5e-3, "warmup_steps": 20, "ema_decay": 0.98,
                      "seed": 0},
        notes="A small DDPM trained on only 16 digits until it copies them: the memorisation test's "
              "positive control (section 10.2).",
    ),
    "shapes_sd_skewed": Recipe(
        name="shapes_sd_skewed",
        model="shapes_unet",
        model_kwargs={"widths": [32, 64]},
        data="shapes",
        kind="latent_diffusion",
        schedule="scaled_linear",
        prediction_type="v_prediction",
        data_kwargs={"n": 3000, "size": 32, "seed": 5, "cond_dropout": 0.1,
                     "colour_bias": {"circle": ["red", 0.85]}, "omit_words": 0.5, "init_from": "shapes_sd"},
        requires=("shapes_vae", "tiny_clip", "shapes_sd"),
        train_kwargs={"steps": 120, "batch_size": 64, "lr": 1e-3, "warmup_steps": 20, "ema_decay": 0.999,
                      "seed": 0},
        notes="shapes_sd fine-tuned on skewed shapes: 85 % of circles red, and half of the captions' "
              "colour, size and position words left out (section 10.2, bias amplification).",
    ),
}

# An independent CLIP judge for chapter 10's circularity test: tiny_clip's recipe with other
# initial weights and other images.
RECIPES["tiny_clip_judge"] = replace(
    RECIPES["tiny_clip"], name="tiny_clip_judge", data_kwargs={**RECIPES["tiny_clip"].data_kwargs, "seed": 21},
    train_kwargs={**RECIPES["tiny_clip"].train_kwargs, "seed": 5},
    notes="tiny_clip's recipe with other initial weights and other images (chapter 10).")


def build(name: str):
    """A fresh, untrained model with recipe ``name``'s architecture (e.g. to load a snapshot into)."""
    from helpers import models, text

    recipe = _recipe(name)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in recipe.model_kwargs.items()}  # JSON lists
    factory = getattr(text, recipe.model) if recipe.model == "tiny_clip" else getattr(models, recipe.model)
    return factory(**kwargs)


def _recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"name must be one of {sorted(RECIPES)}; got {name!r}")
    return RECIPES[name]


# --- trainers: recipe -> (what to save, TrainResult) --------------------------------------------

def _digits(recipe: Recipe):
    import helpers

    if recipe.data != "digits":
        raise ValueError(f"recipe {recipe.name}: kind {recipe.kind!r} needs data 'digits'; got {recipe.data!r}")
    images, labels = helpers.load_digits(recipe.model_kwargs.get("size", 8))
    keep = training_indices(recipe.name)
    return images[keep], labels[keep]


def training_indices(name: str) -> torch.Tensor:
    """Which of the 1,797 digits recipe ``name`` trains on: all, or a seeded subset (``data_kwargs["subset"]``)."""
    recipe = _recipe(name)
    n = 1797  # len(helpers.load_digits()[0]); a recipe's subset is drawn from a seeded permutation of them
    subset = recipe.data_kwargs.get("subset")
    if subset is None:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(recipe.data_kwargs.get("subset_seed", 0)))[:subset]


def _shapes(recipe: Recipe):
    import helpers

    if recipe.data != "shapes":
        raise ValueError(f"recipe {recipe.name}: kind {recipe.kind!r} needs data 'shapes'; got {recipe.data!r}")
    d = recipe.data_kwargs
    skew = {k: d[k] for k in ("colour_bias", "omit_words") if k in d}  # section 10.2's skewed shapes
    return helpers.make_shapes(d["n"], d["size"], seed=d["seed"], **skew)


def _fresh(recipe: Recipe):
    import helpers

    helpers.seed_everything(recipe.train_kwargs.get("seed", 0))  # the initial weights are part of the recipe
    return build(recipe.name)


def _train_diffusion(recipe: Recipe, progress: bool):
    import helpers
    from helpers import training

    x0, _ = _digits(recipe)
    model = _fresh(recipe)
    objective = training.diffusion_objective(helpers.get_schedule(recipe.schedule).alpha_bar, recipe.prediction_type)
    result = training.train(model, x0, objective, progress=progress, **recipe.train_kwargs)
    return result.ema if result.ema is not None else result.model, result


def _train_class_diffusion(recipe: Recipe, progress: bool):
    import helpers
    from helpers import training

    x0, labels = _digits(recipe)
    model = _fresh(recipe)
    d = recipe.data_kwargs
    objective = training.diffusion_objective(
        helpers.get_schedule(recipe.schedule).alpha_bar, recipe.prediction_type, cond_dropout=d["cond_dropout"],
        null_cond={"class_labels": torch.tensor(d["null_class"])}, **{"0": "class_labels"})
    result = training.train(model, (x0, labels), objective, progress=progress, **recipe.train_kwargs)
    return result.ema if result.ema is not None else result.model, result


def _train_clip(recipe: Recipe, progress: bool):
    from helpers import text, training

    shapes = _shapes(recipe)
    tokenizer = text.shapes_tokenizer()
    ids = tokenizer(shapes.captions, padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    model = _fresh(recipe)
    result = training.train(model, (shapes.images, ids), text.clip_loss, progress=progress, **recipe.train_kwargs)
    return result.model, result


def vae_training_images(n_shapes: int, size: int, seed: int, photo_patches: int) -> torch.Tensor:
    """Shapes, then random ``size`` x ``size`` crops of the bundled photographs at two scales."""
    import helpers

    shapes = helpers.make_shapes(n_shapes, size, seed=seed).images
    g = torch.Generator().manual_seed(seed)
    photos = [helpers.load_photo(name, side) for name in helpers.PHOTOS for side in (96, 192)]
    crops = []
    for i in range(photo_patches):
        photo = photos[i % len(photos)]
        top, left = torch.randint(0, photo.shape[-1] - size + 1, (2,), generator=g).tolist()
        crops.append(photo[:, top:top + size, left:left + size])
    return torch.cat([shapes, torch.stack(crops)])


def vae_loss(kl_weight: float, crop: int | None = None):
    """Reconstruction (mean squared error) plus ``kl_weight`` times the KL to N(0, I), per value.

    With ``crop``, each batch is cut to a random ``crop`` x ``crop`` window first: the VAE is
    convolutional, so it learns the same filters at a fraction of the cost per image.
    """

    def loss(vae, x):
        if crop is not None and crop < x.shape[-1]:
            top, left = torch.randint(0, x.shape[-1] - crop + 1, (2,)).tolist()
            x = x[..., top:top + crop, left:left + crop]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        return torch.nn.functional.mse_loss(reconstruction, x) + kl_weight * kl

    return loss


def _train_vae(recipe: Recipe, progress: bool):
    from helpers import training

    d = recipe.data_kwargs
    images = vae_training_images(d["n"], d["size"], d["seed"], d["photo_patches"])
    vae = _fresh(recipe)
    # Most steps on random crops (cheap), then a few on whole images so that GroupNorm's
    # statistics are those of the images the VAE will encode.
    crops = training.train(vae, images, vae_loss(d["kl_weight"], d["crop"]), progress=progress, **recipe.train_kwargs)
    whole = training.train(crops.model, images, vae_loss(d["kl_weight"]), progress=progress,
                           **(recipe.train_kwargs | d["finish"]))
    vae = whole.model.eval()
    # Stable Diffusion's scaling factor (0.18215) is 1 / std of its VAE's latents; ours likewise.
    with torch.no_grad():
        latents = torch.cat([vae.encode(b).latent_dist.mean for b in images[: d["n"]].split(500)])
    vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))
    whole.losses[:0], whole.steps, whole.seconds = crops.losses, crops.steps + whole.steps, crops.seconds + whole.seconds
    return vae, whole


def _train_latent_diffusion(recipe: Recipe, progress: bool):
    import helpers
    from helpers import text, training

    vae, clip = load("shapes_vae", progress=progress), load("tiny_clip", progress=progress)
    tokenizer = text.shapes_tokenizer()
    shapes = _shapes(recipe)
    with torch.no_grad():
        latents = torch.cat([vae.encode(b).latent_dist.mean for b in shapes.images.split(500)])
    latents = latents * vae.config.scaling_factor
    states = text.encode_prompts(clip.text_model, tokenizer, shapes.captions)
    null = text.encode_prompts(clip.text_model, tokenizer, [""])[0]
    start = recipe.data_kwargs.get("init_from")  # fine-tune another recipe's U-Net instead (section 10.2)
    unet = load(start, progress=progress).unet.train().requires_grad_(True) if start else _fresh(recipe)
    objective = training.diffusion_objective(
        helpers.get_schedule(recipe.schedule).alpha_bar, recipe.prediction_type,
        cond_dropout=recipe.data_kwargs["cond_dropout"], null_cond={"encoder_hidden_states": null},
        **{"0": "encoder_hidden_states"})
    result = training.train(unet, (latents, states), objective, progress=progress, **recipe.train_kwargs)
    pipe = assemble_pipeline(result.ema if result.ema is not None else result.model, vae, clip.text_model,
                             tokenizer, recipe.schedule, recipe.prediction_type)
    return pipe, result


def assemble_pipeline(unet, vae, text_encoder, tokenizer, schedule: str = "scaled_linear",
                      prediction_type: str = "epsilon"):
    """A real ``StableDiffusionPipeline`` from the course's parts, with a DDIM scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    if not isinstance(text_encoder, CLIPTextModel):  # CLIPModel.text_model is the bare transformer
        encoder = CLIPTextModel(text_encoder.config)
        encoder.text_model.load_state_dict(text_encoder.state_dict())
        text_encoder = encoder
    betas = {"scaled_linear": "scaled_linear", "linear": "linear"}[schedule]
    scheduler = DDIMScheduler(beta_schedule=betas, beta_start=0.00085 if betas == "scaled_linear" else 1e-4,
                              beta_end=0.012 if betas == "scaled_linear" else 0.02, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


TRAINERS = {
    "diffusion": _train_diffusion,
    "class_diffusion": _train_class_diffusion,
    "clip": _train_clip,
    "vae": _train_vae,
    "latent_diffusion": _train_latent_diffusion,
}


def _folder(name: str) -> Path:
    return cache_dir() / f"{name}-{_recipe(name).key()}"


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


def _load_or_train(name: str, folder: Path, progress: bool, retrain: bool):
    """Under the cache lock: the cached model, or a trained and saved one."""
    recipe = RECIPES[name]
    if (folder / "recipe.json").exists() and not retrain:
        model = _from_folder(name, folder)
        print(f"zoo: loaded {name} from {folder}")
    else:
        start = time.perf_counter()
        trained, result = TRAINERS[recipe.kind](recipe, progress)
        folder.mkdir(parents=True, exist_ok=True)
        trained.save_pretrained(folder)
        if result.snapshots:
            torch.save(result.snapshots, folder / "snapshots.pt")
        info = asdict(recipe) | {"key": recipe.key(), "train_seconds": round(result.seconds, 1),
                                 "steps": result.steps, "losses": result.losses}
        (folder / "recipe.json").write_text(json.dumps(info, indent=1))  # written last: marks completion
        print(f"zoo: trained {name} in {time.perf_counter() - start:.0f} s -> {folder}")
        # What the trainer returns is not what a later load gets: an EMA copy has requires_grad off
        # (a frozen U-Net that a fine-tune built from it could not train), a pipeline's modules may
        # be in training mode. So the first call returns the saved model too, as every later one.
        model = _from_folder(name, folder)
    return model


def _from_folder(name: str, folder: Path):
    """Recipe ``name``'s model as saved in ``folder``."""
    if RECIPES[name].kind == "latent_diffusion":
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_pretrained(folder)
    return type(build(name)).from_pretrained(folder)


def load_checkpoint(model_id: str, device: torch.device | str = "cpu", allow_no_safety_checker: bool = False):
    """A real Stable Diffusion checkpoint (a Hub id or a local folder), with its safety checker on.

    The course's toy pipelines run without a safety checker: they draw coloured shapes, and
    diffusers' checker (a CLIP ViT-L/14 comparing image embeddings with fixed concept
    embeddings) would cost more than the model. A real checkpoint can draw anything, so this
    loader keeps the checker the checkpoint ships with, and refuses one that ships without it
    unless ``allow_no_safety_checker=True`` says so on purpose. With the checker on, the
    pipeline's output carries ``nsfw_content_detected`` and flagged images come back black.
    """
    from diffusers import StableDiffusionPipeline

    if not isinstance(model_id, (str, os.PathLike)) or not str(model_id):
        raise ValueError(f"model_id must be a Hub id or a local folder; got {model_id!r}")
    pipe = StableDiffusionPipeline.from_pretrained(model_id)
    if pipe.safety_checker is None and not allow_no_safety_checker:
        raise ValueError(
            f"model_id {str(model_id)!r} has no safety checker; real checkpoints in this course run with one. "
            "Pass allow_no_safety_checker=True only for a model you know cannot draw harmful images."
        )
    return pipe.to(device)


def load(name: str, device: torch.device | str = "cpu", progress: bool = True, retrain: bool = False):
    """The trained model of recipe ``name``: from the cache, or trained now and cached.

    Returns the model in eval mode on ``device`` (for ``"shapes_sd"``: the whole
    ``StableDiffusionPipeline``). ``retrain=True`` ignores the cache.
    """
    folder = _folder(name)
    recipe = RECIPES[name]
    if recipe.kind not in TRAINERS:
        raise ValueError(f"recipe {name}: kind must be one of {sorted(TRAINERS)}; got {recipe.kind!r}")
    with cache_lock(folder.name):
        model = _load_or_train(name, folder, progress, retrain)
    model = model.to(device)
    if recipe.kind == "latent_diffusion":
        model.set_progress_bar_config(disable=True)
        return model
    return model.eval().requires_grad_(False)
