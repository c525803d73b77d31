"""The course's data: real digits, real photographs and procedural shapes with captions.

Everything here ships with a package (scikit-learn's digits, scikit-image's photographs) or
is generated, seeded, on the spot -- nothing downloads. Images come back as float32 tensors
``(N, C, H, W)`` scaled to ``[-1, 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "COLOURS",
    "PHOTOS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "Shapes",
    "all_captions",
    "caption_attributes",
    "load_digits",
    "load_photo",
    "make_shapes",
]


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def load_digits(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 handwritten digits of scikit-learn (UCI), as ``(images, labels)``.

    ``images`` is ``(1797, 1, size, size)`` in ``[-1, 1]`` (the originals are 8x8 with values
    0..16; other sizes are bilinear resizes), ``labels`` is ``(1797,)`` int64 in 0..9.
    """
    if not isinstance(size, int) or size < 4:
        raise ValueError(f"size must be an int >= 4; got {size!r}")
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    images = _resize(images, size).clamp(0, 1) * 2 - 1
    return images, torch.tensor(bunch.target, dtype=torch.int64)


# The photographs bundled inside scikit-image (no download needed).
PHOTOS = (
    "astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text",
)  # fmt: skip


def load_photo(name: str = "chelsea", size: int | None = None) -> torch.Tensor:
    """A photograph from ``skimage.data`` as a ``(3, H, W)`` tensor in ``[-1, 1]``.

    Grey images are repeated over three channels. With ``size``, the centre square is cropped
    and resized to ``size x size``.
    """
    if name not in PHOTOS:
        raise ValueError(f"name must be one of {PHOTOS}; got {name!r}")
    import skimage.data

    array = getattr(skimage.data, name)()
    image = torch.tensor(np.asarray(array), dtype=torch.float32) / 255.0
    if image.ndim == 2:
        image = image[..., None].expand(*image.shape, 3)
    image = image[..., :3].permute(2, 0, 1).contiguous()  # (3, H, W)
    if size is not None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int or None; got {size!r}")
        h, w = image.shape[-2:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        image = _resize(image[None, :, top : top + side, left : left + side], size)[0]
    return image.clamp(0, 1) * 2 - 1


# --- procedural shapes -------------------------------------------------------------------

COLOURS = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.80, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.15, 0.80),
    "cyan": (0.10, 0.85, 0.90),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {  # centre (x, y) as a fraction of the image side
    "left": (0.27, 0.50),
    "right": (0.73, 0.50),
    "top": (0.50, 0.27),
    "bottom": (0.50, 0.73),
    "centre": (0.50, 0.50),
}
SIZES = {"small": 0.12, "large": 0.21}  # radius as a fraction of the image side


@dataclass
class Shapes:
    """A batch of procedural shapes images with everything later chapters condition on."""

    images: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    masks: torch.Tensor  # (N, 1, H, W) in {0, 1}: the shape's pixels
    edges: torch.Tensor  # (N, 1, H, W) in {0, 1}: the shape's outline
    captions: list[str]  # e.g. "a large red circle on the left"
    colour: torch.Tensor  # (N,) index into COLOURS
    shape: torch.Tensor  # (N,) index into SHAPES
    position: torch.Tensor  # (N,) index into POSITIONS
    size: torch.Tensor  # (N,) index into SIZES

    def __len__(self) -> int:
        return len(self.images)


def _caption(colour: str, shape: str, position: str, size: str) -> str:
    where = "in the centre" if position == "centre" else (
        f"on the {position}" if position in ("left", "right") else f"at the {position}"
    )
    return f"a {size} {colour} {shape} {where}"


def all_captions() -> list[str]:
    """The 180 distinct captions of :func:`make_shapes`, in a fixed order."""
    return [_caption(c, s, p, z) for c in COLOURS for s in SHAPES for p in POSITIONS for z in SIZES]


def caption_attributes(captions: list[str]) -> dict[str, torch.Tensor]:
    """Parse captions back into attribute indices: ``{"colour", "shape", "position", "size"}`` -> ``(N,)``.

    Each caption must be one :func:`make_shapes` writes, e.g. ``"a large red circle on the left"``.
    """
    index = {_caption(c, s, p, z): (ci, si, pi, zi)
             for ci, c in enumerate(COLOURS) for si, s in enumerate(SHAPES)
             for pi, p in enumerate(POSITIONS) for zi, z in enumerate(SIZES)}
    unknown = [c for c in captions if c not in index]
    if unknown:
        raise ValueError(f"captions must be shapes captions like 'a large red circle on the left'; got {unknown[:3]}")
    rows = torch.tensor([index[c] for c in captions], dtype=torch.int64).reshape(-1, 4)
    return dict(zip(("colour", "shape", "position", "size"), rows.T))


def _shape_mask(shape: str, cx: float, cy: float, r: float, side: int) -> np.ndarray:
    # Sample each pixel at its centre; coordinates in pixels.
    y, x = np.mgrid[0:side, 0:side] + 0.5
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    if shape == "square":
        half = 0.85 * r  # same area scale as the circle, roughly
        return (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    top, base = cy - r, cy + 0.8 * r  # an upright triangle, apex at the top
    return (y >= top) & (y <= base) & (np.abs(x - cx) <= r * (y - top) / (base - top))


def _outline(mask: np.ndarray) -> np.ndarray:
    # A pixel of the shape with a 4-neighbour outside it.
    padded = np.pad(mask, 1, constant_values=False)
    interior = (
        padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    )
    return mask & ~interior


def make_shapes(
    n: int,
    size: int = 32,
    seed: int = 0,
    background: tuple[float, float, float] = (0.0, 0.0, 0.0),
    jitter: float = 0.04,
) -> Shapes:
    """``n`` images of one coloured shape each, with captions, labels, masks and edge maps.

    Colour x shape x position x size is drawn uniformly (6 x 3 x 5 x 2 = 180 combinations);
    the centre is jittered by up to ``jitter`` of the side. Seeded: the same arguments give
    the same images.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int; got {n!r}")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8; got {size!r}")
    rng = np.random.default_rng(seed)
    colour = rng.integers(len(COLOURS), size=n)
    shape = rng.integers(len(SHAPES), size=n)
    position = rng.integers(len(POSITIONS), size=n)
    size_idx = rng.integers(len(SIZES), size=n)
    offsets = rng.uniform(-jitter, jitter, size=(n, 2))

    colour_names, position_names, size_names = list(COLOURS), list(POSITIONS), list(SIZES)
    images = np.empty((n, 3, size, size), dtype=np.float32)
    masks = np.empty((n, 1, size, size), dtype=bool)
    edges = np.empty((n, 1, size, size), dtype=bool)
    captions = []
    for i in range(n):
        c, s = colour_names[colour[i]], SHAPES[shape[i]]
        p, z = position_names[position[i]], size_names[size_idx[i]]
        cx, cy = (np.array(POSITIONS[p]) + offsets[i]) * size
        mask = _shape_mask(s, cx, cy, SIZES[z] * size, size)
        rgb = np.where(mask[None], np.array(COLOURS[c])[:, None, None], np.array(background)[:, None, None])
        images[i], masks[i, 0], edges[i, 0] = rgb, mask, _outline(mask)
        captions.append(_caption(c, s, p, z))

    return Shapes(
        images=torch.from_numpy(images) * 2 - 1,
        masks=torch.from_numpy(masks).float(),
        edges=torch.from_numpy(edges).float(),
        captions=captions,
        colour=torch.from_numpy(colour),
        shape=torch.from_numpy(shape),
        position=torch.from_numpy(position),
        size=torch.from_numpy(size_idx),
    )
