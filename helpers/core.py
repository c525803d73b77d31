"""Device, seeding and broadcasting: the three things every notebook needs first."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["append_dims", "get_device", "seed_everything"]


def get_device(device: str | torch.device | None = "auto") -> torch.device:
    """Return a torch device: ``"auto"`` (or None) picks CUDA, then MPS, then CPU.

    Any other value is passed to ``torch.device`` so a papermill parameter such as
    ``device="cuda:1"`` works unchanged; a device this machine does not have is a clear
    ``ValueError`` naming it, not an error from deep inside torch later.
    """
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; got {device!r}"
        ) from err
    if chosen.type == "cuda" and (not torch.cuda.is_available() or (chosen.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {str(chosen)!r} is not available here ({torch.cuda.device_count()} CUDA devices); "
                         "use 'cpu' or 'auto'")
    if chosen.type == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' is not available here; use 'cpu' or 'auto'")
    return chosen


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); return a CPU ``torch.Generator`` too.

    Passing the returned generator to sampling code makes a cell reproducible on its own,
    whatever ran before it.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int; got {seed!r}")
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dimensions to ``x`` until it has ``ndim`` dimensions.

    The one broadcasting helper of the course: a per-sample coefficient of shape ``(B,)``
    becomes ``(B, 1, 1, 1)`` so it multiplies an image batch ``(B, C, H, W)``.
    """
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    missing = ndim - x.ndim
    if missing < 0:
        raise ValueError(
            f"append_dims: x has {x.ndim} dims, more than the requested ndim={ndim}"
        )
    return x.reshape(*x.shape, *([1] * missing))
