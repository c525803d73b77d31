"""Judging generated digits: a frozen digit classifier, the Frechet distance and one score card.

FID (Heusel et al. 2017) fits a Gaussian to the Inception-v3 features of real and of generated
images and reports the Frechet distance between the two Gaussians. Our images are 8x8 digits,
so the features come from a small CNN trained here, on the real digits, in a few seconds
(:func:`digit_classifier`); the recipe is the same, the number is not comparable with
published FIDs. The classifier also says *which* digit each sample is, so a score card
(:class:`DigitScores`) reports sharpness (confidence) and mode coverage (classes hit) too.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "DigitClassifier",
    "DigitScores",
    "ShapesJudge",
    "ShapesScores",
    "digit_classifier",
    "frechet_distance",
    "score_digits",
    "score_shapes",
    "shapes_judge",
]

# Bump when anything that changes the trained weights changes without showing up in RECIPE
# (e.g. the augmentation code): the disk-cache file name hashes both.
RECIPE_VERSION = 1
RECIPE = dict(
    width=16, feature_dim=64,  # architecture
    steps=1000, batch_size=128, lr=2e-3, max_shift=1, train_fraction=0.8,  # training
)  # fmt: skip


class DigitClassifier(nn.Module):
    """A small CNN for 8x8 digits in ``[-1, 1]``: ``features`` (N, D) and ``forward`` logits (N, 10).

    Any square single-channel input is first resized to 8x8 (bilinear, antialiased), so samples
    of a 16x16 model are judged by the same network.
    """

    def __init__(self, width: int = 16, feature_dim: int = 64):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, 10)
        self.test_accuracy = float("nan")  # held-out accuracy, set by digit_classifier

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate layer, ``(N, feature_dim)``: the space in which FD is measured."""
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[-1] != x.shape[-2]:
            raise ValueError(f"x must be square single-channel images (N, 1, S, S); got shape {tuple(x.shape)}")
        if x.shape[-1] != 8:
            x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
        return self.fc(self.conv(x))  # (N, 1, 8, 8) -> (N, 2w, 4, 4) -> (N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, 10) logits

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The predicted digit of each image, ``(N,)`` int64."""
        return self(x).argmax(dim=1)


def _random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    # Translate each image by up to max_shift pixels, filling with background (-1).
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)  # (N, 1, h + 2s, w + 2s)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n, 1), generator=generator)
    rows = dy + torch.arange(h)  # (N, h)
    cols = dx + torch.arange(w)  # (N, w)
    return padded[torch.arange(n)[:, None, None], 0, rows[:, :, None], cols[:, None, :]][:, None]


def _split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(round(fraction * n))
    return perm[:k], perm[k:]


def _train(seed: int) -> tuple[dict, float]:
    """Train on a seeded 80 % of the digits with Adam and 1-pixel shifts; CPU, deterministic."""
    from helpers.data import load_digits

    images, labels = load_digits(8)
    train_idx, test_idx = _split(len(images), RECIPE["train_fraction"], seed)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = DigitClassifier(RECIPE["width"], RECIPE["feature_dim"])
    threads = torch.get_num_threads()
    # One thread: batches this small run no faster on more, far slower on a busy machine,
    # and the weights then do not depend on the machine's core count.
    torch.set_num_threads(1)
    try:
        _fit(model, images[train_idx], labels[train_idx], g)
        model.eval()
        with torch.no_grad():
            accuracy = (model(images[test_idx]).argmax(1) == labels[test_idx]).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    return model.state_dict(), accuracy


def _fit(model: DigitClassifier, x_train: torch.Tensor, y_train: torch.Tensor, g: torch.Generator) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=RECIPE["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=RECIPE["steps"])
    for _ in range(RECIPE["steps"]):
        batch = torch.randint(0, len(x_train), (RECIPE["batch_size"],), generator=g)
        x = _random_shift(x_train[batch], RECIPE["max_shift"], g)
        loss = F.cross_entropy(model(x), y_train[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _recipe_hash(seed: int) -> str:
    recipe = dict(RECIPE, seed=seed, version=RECIPE_VERSION)
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def _cached_weights(name: str, recipe_hash: str, train) -> dict:
    """``train()``'s ``{"state_dict", "test_accuracy"}``, kept in the zoo's cache folder under ``name-hash``."""
    from helpers.zoo import cache_dir, cache_lock  # one cache folder for every trained artefact

    path = os.path.join(cache_dir(), f"{name}-{recipe_hash}.pt")
    with cache_lock(f"{name}-{recipe_hash}"):  # processes side by side train it once
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):  # missing or unreadable: retrain
            state, accuracy = train()
            saved = {"state_dict": state, "test_accuracy": accuracy}
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.{os.getpid()}.tmp"
                torch.save(saved, tmp)
                os.replace(tmp, path)  # atomic: a half-written file is never read
            except OSError:
                pass  # a read-only cache only costs a retrain next time
            return saved


@functools.lru_cache(maxsize=None)
def _load_or_train(seed: int, device: str) -> DigitClassifier:
    saved = _cached_weights("digit_classifier", _recipe_hash(seed), lambda: _train(seed))
    model = DigitClassifier(RECIPE["width"], RECIPE["feature_dim"])
    model.load_state_dict(saved["state_dict"])
    model.test_accuracy = float(saved["test_accuracy"])
    return model.to(device).eval().requires_grad_(False)


def digit_classifier(seed: int = 0, device: str | torch.device | None = None) -> DigitClassifier:
    """The course's frozen digit classifier: trained once, then cached in memory and on disk.

    Trained on a seeded 80 % split of the 1,797 real digits (Adam, cosine learning rate, random
    1-pixel shifts so it does not hinge on exact positions); ``classifier.test_accuracy`` is
    its accuracy on the other 20 %. 5-10 s on two CPU cores, deterministic on CPU. The
    weights are stored in ``$COURSE_CACHE`` (default ``~/.cache/diffusion-course``) under a
    name that hashes the recipe and the seed, so a changed recipe retrains. Returned in eval
    mode with ``requires_grad`` off. ``device=None`` means CPU: the network is tiny, and CPU
    scores are the same on every machine.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int; got {seed!r}")
    from helpers.core import get_device

    device = torch.device("cpu") if device is None else get_device(device)
    return _load_or_train(seed, str(device))


def _as_float64(feats, name: str) -> np.ndarray:
    if isinstance(feats, torch.Tensor):
        feats = feats.detach().cpu().numpy()
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, D) of features; got shape {feats.shape}")
    if feats.shape[0] < 2:
        raise ValueError(f"{name} needs N >= 2 rows to estimate a covariance; got {feats.shape[0]}")
    if not np.isfinite(feats).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return feats


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (the FID formula).

    ``FD = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` (Heusel et al. 2017, eq. 6;
    Dowson & Landau 1982). ``feats_a`` (N_a, D) and ``feats_b`` (N_b, D) are tensors or arrays;
    the sums run in float64. ``S_a S_b`` is not symmetric, so instead of ``sqrtm`` of it we use
    that it has the same eigenvalues as ``R = S_a^(1/2) S_b S_a^(1/2)``, which is symmetric PSD:
    ``Tr (S_a S_b)^(1/2) = sum sqrt(eig(R))`` with two ``eigh`` calls, never complex.

    The estimate is biased upwards by finite N (roughly by a constant over N): compare only
    numbers computed with the same N.
    """
    a, b = _as_float64(feats_a, "feats_a"), _as_float64(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_a and feats_b must have the same feature dim D; got {a.shape[1]} and {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False, ddof=1), np.cov(b, rowvar=False, ddof=1)
    cov_a, cov_b = np.atleast_2d(cov_a), np.atleast_2d(cov_b)  # D = 1 gives a scalar
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S_a^(1/2), symmetric
    r = sqrt_a @ cov_b @ sqrt_a
    eig_r = np.linalg.eigvalsh((r + r.T) / 2)  # symmetrise away round-off
    tr_sqrt = np.sqrt(np.clip(eig_r, 0, None)).sum()
    fd = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt
    return float(max(fd, 0.0))  # round-off can leave -1e-13 for identical sets


@dataclass
class DigitScores:
    """One score card for a batch of generated digits (see :func:`score_digits`)."""

    fd: float  # Frechet distance, samples vs the reference half of the real digits
    fd_floor: float  # the same for real digits of the same N: what a perfect model would get
    confidence: float  # mean max softmax probability: low for blurry or ambiguous samples
    coverage: int  # classes 0..9 predicted at least once
    class_counts: list[int]  # how many samples were classified as each digit
    n: int  # number of samples

    @property
    def ratio(self) -> float:
        """``fd / fd_floor``: about 1 means indistinguishable from real digits by these features."""
        return self.fd / self.fd_floor if self.fd_floor > 0 else float("inf")

    def summary(self) -> str:
        """One line, e.g. ``FD 31.2 (real-vs-real floor 6.39, ratio 4.9x) | confidence 0.97 | ...``."""
        return (
            f"FD {_fmt(self.fd)} (real-vs-real floor {_fmt(self.fd_floor)}, ratio {_fmt_ratio(self.ratio)}x)"
            f" | confidence {self.confidence:.2f} | classes {self.coverage}/10 | n={self.n}"
        )

    def __str__(self) -> str:
        return self.summary()


def _fmt(value: float) -> str:
    # 3 significant digits without scientific notation: 0.0412, 6.39, 524, 1,137
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def _fmt_ratio(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:,.0f}"  # 1.0, 4.9, 178


# classifier -> {image size: (held-out features, reference features, {n: floor})}, default reference
_REFERENCE_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FLOOR_DRAWS = 5  # floors averaged over this many random real subsets, to steady them


@torch.no_grad()
def _reference(classifier: DigitClassifier, reference: torch.Tensor | None, size: int):
    cached = _REFERENCE_CACHE.setdefault(classifier, {})
    if reference is None and size in cached:
        return cached[size]
    from helpers.data import load_digits

    images = load_digits(size)[0] if reference is None else reference
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or len(images) < 8:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"reference must be a tensor of images (M, 1, S, S) with M >= 8; got {shape}")
    device = next(classifier.parameters()).device
    feats = classifier.features(images.float().clamp(-1, 1).to(device)).cpu().double()  # (M, D)
    held_out, ref = _split(len(feats), 0.5, seed=0)
    entry = (feats[held_out], feats[ref], {})
    if reference is None:
        cached[size] = entry
    return entry


def score_digits(
    samples: torch.Tensor,
    classifier: DigitClassifier | None = None,
    reference: torch.Tensor | None = None,
) -> DigitScores:
    """Score generated digits ``(N, 1, S, S)`` in ``[-1, 1]`` (clamped) with a frozen classifier.

    The real digits (``reference``, default all 1,797 at the samples' size, so that a 16x16
    model meets 16x16 digits and both go through the same resize to 8x8) are split by a fixed
    seeded permutation into two halves: the *reference half* (899) and the *held-out half* (898).

    * ``fd``: :func:`frechet_distance` of the samples' features to the reference half's.
    * ``fd_floor``: the same distance for ``min(N, 898)`` real digits of the held-out half
      (averaged over 5 random subsets). FD is biased upwards by small N, so the floor is
      measured at the samples' N: a model as good as the data scores ``ratio`` about 1 at any
      N up to 898. Above that the samples' FD enjoys a smaller bias than the floor, and the
      ratio is mildly flattering; N of 900 to 1,000 is the fair choice.
    * ``confidence``: mean max softmax probability; ``coverage``/``class_counts``: predicted
      classes (a mode-collapsed model hits few).

    Caveats: the classifier and the diffusion model both saw these digits, so a model that
    memorises its training set scores near the floor too. Scoring real digits of the reference
    half gives an FD *below* the floor: they are the reference.
    """
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or len(samples) < 2:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ValueError(f"samples must be a tensor of images (N, 1, S, S) with N >= 2; got {shape}")
    classifier = digit_classifier() if classifier is None else classifier
    held_out, ref, floors = _reference(classifier, reference, samples.shape[-1])
    device = next(classifier.parameters()).device
    with torch.no_grad():
        feats = classifier.features(samples.detach().float().clamp(-1, 1).to(device))  # (N, D)
        probs = classifier.head(feats).softmax(dim=1).cpu()  # (N, 10)
    n = len(samples)
    m = min(n, len(held_out))
    if m not in floors:
        g = torch.Generator().manual_seed(m)
        draws = [held_out[torch.randperm(len(held_out), generator=g)[:m]] for _ in range(_FLOOR_DRAWS)]
        floors[m] = float(np.mean([frechet_distance(d, ref) for d in draws]))
    counts = torch.bincount(probs.argmax(dim=1), minlength=10)
    return DigitScores(
        fd=frechet_distance(feats.cpu(), ref),
        fd_floor=floors[m],
        confidence=probs.max(dim=1).values.mean().item(),
        coverage=int((counts > 0).sum()),
        class_counts=counts.tolist(),
        n=n,
    )


# --- judging generated shapes: did the prompt's colour, shape, position and size come out? ------

SHAPES_RECIPE = dict(width=32, feature_dim=128, steps=600, batch_size=128, lr=2e-3, n_train=6000, n_test=1000,
                     seed=11, version=1)  # fmt: skip
ATTRIBUTES = ("colour", "shape", "position", "size")


class ShapesJudge(nn.Module):
    """A small CNN that reads a 32x32 shapes image: four heads (colour, shape, position, size).

    Trained on procedural shapes (:func:`shapes_judge`), so it knows exactly what each caption
    asks for; its penultimate features give a Frechet distance to real shapes.
    """

    def __init__(self, width: int = 32, feature_dim: int = 128):
        super().__init__()
        from helpers.data import COLOURS, POSITIONS, SHAPES, SIZES

        self.conv = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 32 -> 16
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16 -> 8
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8 -> 4
        )  # fmt: skip
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, feature_dim), nn.ReLU())
        sizes = {"colour": len(COLOURS), "shape": len(SHAPES), "position": len(POSITIONS), "size": len(SIZES)}
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, n) for k, n in sizes.items()})
        self.test_accuracy: dict[str, float] = {}  # held-out accuracy per attribute, set by shapes_judge

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1:] != (3, 32, 32):
            raise ValueError(f"x must be shapes images (N, 3, 32, 32); got shape {tuple(x.shape)}")
        return self.fc(self.conv(x))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(x)
        return {k: head(feats) for k, head in self.heads.items()}  # logits per attribute

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v.argmax(1) for k, v in self(x).items()}


def _train_judge() -> tuple[dict, dict]:
    from helpers.data import make_shapes

    r = SHAPES_RECIPE
    train, test = make_shapes(r["n_train"], 32, seed=r["seed"]), make_shapes(r["n_test"], 32, seed=r["seed"] + 1)
    g = torch.Generator().manual_seed(r["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(r["seed"])
        model = ShapesJudge(r["width"], r["feature_dim"])
    opt = torch.optim.Adam(model.parameters(), lr=r["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=r["steps"])
    for _ in range(r["steps"]):
        idx = torch.randint(0, len(train), (r["batch_size"],), generator=g)
        logits = model(train.images[idx])
        loss = sum(F.cross_entropy(logits[k], getattr(train, k)[idx]) for k in ATTRIBUTES)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    predicted = model.predict(test.images)
    accuracy = {k: (predicted[k] == getattr(test, k)).float().mean().item() for k in ATTRIBUTES}
    return model.state_dict(), accuracy


@functools.lru_cache(maxsize=None)
def shapes_judge() -> ShapesJudge:
    """The frozen shapes judge, trained once (about 25 s on 2 CPU cores) and cached on disk.

    ``judge.test_accuracy`` holds its accuracy per attribute on 1,000 held-out shapes.
    """
    recipe_hash = hashlib.sha256(json.dumps(SHAPES_RECIPE, sort_keys=True).encode()).hexdigest()[:12]
    saved = _cached_weights("shapes_judge", recipe_hash, _train_judge)
    model = ShapesJudge(SHAPES_RECIPE["width"], SHAPES_RECIPE["feature_dim"])
    model.load_state_dict(saved["state_dict"])
    model.test_accuracy = dict(saved["test_accuracy"])
    return model.eval().requires_grad_(False)


@dataclass
class ShapesScores:
    """How well generated shapes follow their prompts (see :func:`score_shapes`)."""

    accuracy: dict[str, float]  # per attribute: fraction of samples the judge reads as asked
    colour_and_shape: float  # both right: the course's prompt-adherence target
    all_four: float  # colour, shape, position and size all right
    fd: float  # Frechet distance of the judge's features, samples vs real shapes
    diversity: float  # mean per-pixel std across samples of the same prompt (0: identical copies)
    n: int

    def summary(self) -> str:
        acc = " ".join(f"{k} {v:.2f}" for k, v in self.accuracy.items())
        return (f"colour+shape {self.colour_and_shape:.2f} | all four {self.all_four:.2f} | {acc} | "
                f"FD {_fmt(self.fd)} | diversity {self.diversity:.3f} | n={self.n}")

    def __str__(self) -> str:
        return self.summary()


_SHAPES_REFERENCE: dict = {}


@torch.no_grad()
def score_shapes(samples: torch.Tensor, captions: list[str], judge: ShapesJudge | None = None) -> ShapesScores:
    """Score generated shapes ``(N, 3, 32, 32)`` in ``[-1, 1]`` against the captions they were asked for.

    The judge reads each attribute; ``fd`` compares its features with 1,000 real shapes
    (seed 99); ``diversity`` averages, over prompts asked more than once, the per-pixel
    standard deviation of their samples.
    """
    from helpers.data import caption_attributes, make_shapes

    if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or len(samples) != len(captions):
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ValueError(f"samples must be (N, 3, 32, 32) with one caption each; got {shape} and {len(captions)} captions")
    judge = shapes_judge() if judge is None else judge
    x = samples.detach().float().clamp(-1, 1).cpu()
    wanted = caption_attributes(captions)
    got = judge.predict(x)
    right = {k: got[k] == wanted[k] for k in ATTRIBUTES}
    if "real" not in _SHAPES_REFERENCE:
        _SHAPES_REFERENCE["real"] = judge.features(make_shapes(1000, 32, seed=99).images).double()
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(captions):
        groups.setdefault(c, []).append(i)
    spreads = [x[idx].std(0).mean().item() for idx in groups.values() if len(idx) > 1]
    return ShapesScores(
        accuracy={k: v.float().mean().item() for k, v in right.items()},
        colour_and_shape=(right["colour"] & right["shape"]).float().mean().item(),
        all_four=torch.stack([right[k] for k in ATTRIBUTES]).all(0).float().mean().item(),
        fd=frechet_distance(judge.features(x).double(), _SHAPES_REFERENCE["real"]),
        diversity=float(np.mean(spreads)) if spreads else float("nan"),
        n=len(x),
    )
