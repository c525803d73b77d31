"""The metrics' own limits (chapter 10): FD against sample size, k-NN precision and recall.

* :func:`fd_curve` and :func:`fd_infinity`: the Frechet distance is biased upwards by a finite
  sample, by roughly a constant over N. Measuring it at several N and fitting ``a + b / N``
  extrapolates to N = infinity (Chong & Forsyth 2020, "FID-infinity").
* :func:`knn_radii` and :func:`precision_recall`: improved precision and recall (Kynkaanniemi
  et al. 2019). Each set's manifold is the union of balls around its points, each ball reaching
  the point's k-th nearest *other* point. Precision is the fraction of generated points inside
  the real manifold (are the samples realistic?); recall the fraction of real points inside
  the generated manifold (is all of the data covered?).
* :func:`digit_features`: three feature spaces for 8x8 digits, to ask whether a ranking of
  models survives a change of features.
"""

from __future__ import annotations

import numpy as np
import torch

from helpers.metrics import _as_float64, frechet_distance

__all__ = ["FEATURE_SPACES", "digit_features", "fd_curve", "fd_infinity", "knn_radii", "precision_recall"]


def _check_ns(ns, n_max: int) -> list[int]:
    ns = [int(n) for n in ns]
    if not ns or any(n < 2 or n > n_max for n in ns):
        raise ValueError(f"ns must be sizes between 2 and {n_max} (the rows of feats_a); got {ns}")
    return ns


def fd_curve(feats_a, feats_b, ns, draws: int = 5, seed: int = 0) -> list[tuple[int, float, float]]:
    """FD of ``n`` rows of ``feats_a`` (drawn without replacement) to all of ``feats_b``, per n.

    Returns ``[(n, mean FD over draws, std over draws), ...]``: the reference ``feats_b`` stays
    whole, as a benchmark's precomputed statistics do, and only the evaluated set shrinks.
    """
    a, b = _as_float64(feats_a, "feats_a"), _as_float64(feats_b, "feats_b")
    if not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive int; got {draws!r}")
    rng = np.random.default_rng(seed)
    rows = []
    for n in _check_ns(ns, len(a)):
        fds = [frechet_distance(a[rng.choice(len(a), n, replace=False)], b) for _ in range(draws)]
        rows.append((n, float(np.mean(fds)), float(np.std(fds))))
    return rows


def fd_infinity(ns, fds) -> tuple[float, float]:
    """Least-squares fit ``FD(N) = fd_inf + slope / N``; returns ``(fd_inf, slope)``.

    The bias of the plug-in estimate is, to first order, linear in 1/N (Chong & Forsyth 2020),
    so the intercept estimates the distance an infinite sample would give.
    """
    ns, fds = np.asarray(ns, dtype=np.float64), np.asarray(fds, dtype=np.float64)
    if ns.ndim != 1 or ns.shape != fds.shape or len(ns) < 2:
        raise ValueError(f"ns and fds must be 1-D of the same length >= 2; got {ns.shape} and {fds.shape}")
    if len(np.unique(ns)) < 2 or (ns <= 0).any():
        raise ValueError(f"ns must hold at least two different positive sizes; got {ns.tolist()}")
    design = np.stack([np.ones_like(ns), 1 / ns], axis=1)
    (fd_inf, slope), *_ = np.linalg.lstsq(design, fds, rcond=None)
    return float(fd_inf), float(slope)


def knn_radii(feats, k: int = 3) -> np.ndarray:
    """Distance from each row to its k-th nearest *other* row (the point itself is not counted)."""
    from helpers.provenance import nearest_neighbours

    x = torch.from_numpy(_as_float64(feats, "feats"))
    if not isinstance(k, int) or not 1 <= k < len(x):
        raise ValueError(f"k must be an int with 1 <= k < N = {len(x)}; got {k!r}")
    distances, _ = nearest_neighbours(x, x, k=k, exclude_self=True)  # (N, k), nearest first
    return distances[:, k - 1].numpy()


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
    """Fraction of ``points`` inside at least one ball (centre, radius)."""
    d = torch.cdist(torch.from_numpy(points), torch.from_numpy(centres)).numpy()
    return float((d <= radii[None, :]).any(axis=1).mean())


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall of ``fake`` against ``real`` features (Kynkaanniemi et al. 2019).

    ``precision``: fraction of fake points within the k-NN radius of some real point.
    ``recall``: fraction of real points within the k-NN radius of some fake point. The paper
    uses k = 3 and equal set sizes; both numbers depend on N, so compare at the same N.
    """
    r, f = _as_float64(real, "real"), _as_float64(fake, "fake")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"real and fake must have the same feature size; got {r.shape[1]} and {f.shape[1]}")
    precision = _coverage(f, r, knn_radii(r, k))
    recall = _coverage(r, f, knn_radii(f, k))
    return precision, recall


FEATURE_SPACES = ("classifier", "pixels", "random network")


@torch.no_grad()
def digit_features(images: torch.Tensor, space: str = "classifier", classifier=None, seed: int = 0) -> torch.Tensor:
    """Features ``(N, D)`` of digits ``(N, 1, S, S)`` in ``[-1, 1]`` in one of :data:`FEATURE_SPACES`.

    ``"classifier"``: the trained digit classifier's penultimate layer (what ``score_digits``
    uses). ``"pixels"``: the 64 pixel values at 8x8. ``"random network"``: the same architecture
    with random weights drawn from ``seed`` (random features keep some of a CNN's prior).
    """
    from helpers.metrics import DigitClassifier, digit_classifier

    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 1:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be digits (N, 1, S, S); got {shape}")
    x = images.detach().float().clamp(-1, 1).cpu()
    if space == "classifier":
        model = digit_classifier() if classifier is None else classifier
        return model.features(x.to(next(model.parameters()).device)).cpu()
    if space == "pixels":
        if x.shape[-1] != 8:
            x = torch.nn.functional.interpolate(x, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
        return x.flatten(1)
    if space == "random network":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = DigitClassifier().eval()
        return model.features(x)
    raise ValueError(f"space must be one of {FEATURE_SPACES}; got {space!r}")
