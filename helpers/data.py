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
    "Clips",
    "MOTIONS",
    "PHOTOS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "Shapes",
    "all_captions",
    "caption_attributes",
    "load_digits",
    "load_photo",
    "make_clips",
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


def _vague_caption(colour: str, shape: str, position: str, size: str, omit) -> str:
    # _caption with the colour, size and position words left out where omit (3 bools) says so.
    where = _caption(colour, shape, position, size).split(f" {shape} ", 1)[1]
    words = ["a", None if omit[1] else size, None if omit[0] else colour, shape, None if omit[2] else where]
    return " ".join(w for w in words if w)


def _check_colour_bias(colour_bias) -> dict[int, tuple[int, float]]:
    # {"circle": ("red", 0.85)} -> {shape index: (colour index, probability)}
    if colour_bias is None:
        return {}
    if not isinstance(colour_bias, dict):
        raise ValueError(f"colour_bias must be a dict like {{'circle': ('red', 0.85)}}; got {colour_bias!r}")
    out = {}
    for s, value in colour_bias.items():
        if s not in SHAPES or not isinstance(value, (tuple, list)) or len(value) != 2 or value[0] not in COLOURS \
                or not 0 <= value[1] <= 1:
            raise ValueError(f"colour_bias must map a shape of {SHAPES} to (a colour of {tuple(COLOURS)}, a "
                             f"probability in [0, 1]); got {s!r}: {value!r}")
        out[SHAPES.index(s)] = (list(COLOURS).index(value[0]), float(value[1]))
    return out


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
    colour_bias: dict | None = None,
    omit_words: float = 0.0,
) -> Shapes:
    """``n`` images of one coloured shape each, with captions, labels, masks and edge maps.

    Colour x shape x position x size is drawn uniformly (6 x 3 x 5 x 2 = 180 combinations);
    the centre is jittered by up to ``jitter`` of the side. Seeded: the same arguments give
    the same images.

    Two options make a *skewed* data set (section 10.2), drawn after everything above, so that
    without them the images are exactly those of earlier versions:

    * ``colour_bias``, e.g. ``{"circle": ("red", 0.85)}``: a circle is red with probability 0.85
      and one of the other colours, uniformly, otherwise.
    * ``omit_words``: each caption leaves out its colour, its size and its position words, each
      independently with this probability ("a circle", "a red circle at the top"), as real alt
      text often leaves out what a prompt does not ask for. The labels keep the true attributes.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int; got {n!r}")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8; got {size!r}")
    bias = _check_colour_bias(colour_bias)
    if not 0 <= omit_words < 1:
        raise ValueError(f"omit_words must lie in [0, 1); got {omit_words!r}")
    rng = np.random.default_rng(seed)
    colour = rng.integers(len(COLOURS), size=n)
    shape = rng.integers(len(SHAPES), size=n)
    position = rng.integers(len(POSITIONS), size=n)
    size_idx = rng.integers(len(SIZES), size=n)
    offsets = rng.uniform(-jitter, jitter, size=(n, 2))
    if bias:
        favoured, other = rng.random(n), rng.integers(len(COLOURS) - 1, size=n)  # other: among the rest
        for s, (c, p) in bias.items():
            rest = [i for i in range(len(COLOURS)) if i != c]
            pick = shape == s
            colour[pick] = np.where(favoured[pick] < p, c, np.array(rest)[other[pick]])
    omit = rng.random((n, 3)) < omit_words if omit_words else np.zeros((n, 3), dtype=bool)  # colour, size, where

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
        captions.append(_caption(c, s, p, z) if not omit[i].any() else _vague_caption(c, s, p, z, omit[i]))

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


# --- moving-shapes clips (chapter 9) ---------------------------------------------------------

MOTIONS = ("right", "left", "up", "down", "bouncing", "colour")  # what a clip does
_DIRECTIONS = {"right": (1.0, 0.0), "left": (-1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # y grows downwards
_TOWARDS = {"right": "right", "left": "left", "up": "top", "down": "bottom"}  # words the tiny CLIP knows


@dataclass
class Clips:
    """A batch of moving-shapes clips: one shape per clip that moves, bounces or changes colour."""

    videos: torch.Tensor  # (N, F, 3, H, W) in [-1, 1]
    masks: torch.Tensor  # (N, F, 1, H, W) in {0, 1}: the shape's pixels in each frame
    captions: list[str]  # e.g. "a red circle moving to the right", "a blue square bouncing"
    colour: torch.Tensor  # (N,) index into COLOURS: the colour of the first frame
    colour_end: torch.Tensor  # (N,) index into COLOURS: the colour of the last frame
    shape: torch.Tensor  # (N,) index into SHAPES
    size: torch.Tensor  # (N,) index into SIZES
    motion: torch.Tensor  # (N,) index into MOTIONS
    centres: torch.Tensor  # (N, F, 2) the shape's centre (x, y) in pixels, per frame
    velocity: torch.Tensor  # (N, 2) pixels per frame at the start (zero for "colour" clips)
    rgb: torch.Tensor  # (N, F, 3) the shape's colour in [0, 1], per frame

    def __len__(self) -> int:
        return len(self.videos)


def _clip_caption(colour: str, shape: str, motion: str, colour_end: str) -> str:
    if motion == "bouncing":
        return f"a {colour} {shape} bouncing"
    if motion == "colour":
        return f"a {shape} changing from {colour} to {colour_end}"
    return f"a {colour} {shape} moving to the {_TOWARDS[motion]}"


def _bounce(p: float, v: float, lo: float, hi: float, frames: int) -> tuple[np.ndarray, float]:
    # Constant speed with elastic reflections at lo and hi (the centre stays in [lo, hi]).
    out = np.empty(frames)
    for f in range(frames):
        out[f] = p
        p += v
        while p < lo or p > hi:  # reflect, possibly twice for a fast shape in a narrow room
            p, v = (2 * lo - p, -v) if p < lo else (2 * hi - p, -v)
    return out, v


def make_clips(
    n: int,
    frames: int = 8,
    size: int = 32,
    seed: int = 0,
    speed: float = 0.06,
    motions: tuple[str, ...] = MOTIONS,
    background: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> Clips:
    """``n`` clips of ``frames`` frames, each one shape that moves, bounces or changes colour.

    Colour, shape, size and motion (from ``motions``) are drawn uniformly. A moving shape goes
    ``speed * size`` pixels per frame in a straight line and stays inside the frame; a bouncing
    one flies diagonally at ``1.5 * speed * size`` per frame and reflects off the walls; a
    colour-changing one stays put while its colour blends linearly from one colour to another.
    Drawn with the same masks as :func:`make_shapes`. Seeded: the same arguments give the same clips.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int; got {n!r}")
    if not isinstance(frames, int) or isinstance(frames, bool) or frames < 2:
        raise ValueError(f"frames must be an int >= 2; got {frames!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        raise ValueError(f"size must be an int >= 8; got {size!r}")
    if not 0 < speed or speed * (frames - 1) > 1 - 2 * max(SIZES.values()) - 0.05:
        raise ValueError(f"speed must be positive and small enough for a shape to cross the frame in "
                         f"{frames} frames (speed * (frames - 1) <= {1 - 2 * max(SIZES.values()) - 0.05:.2f}); got {speed!r}")
    if not motions or any(m not in MOTIONS for m in motions):
        raise ValueError(f"motions must be a non-empty subset of {MOTIONS}; got {motions!r}")
    rng = np.random.default_rng(seed)
    colour_names, size_names = list(COLOURS), list(SIZES)
    colour = rng.integers(len(COLOURS), size=n)
    colour_end = (colour + rng.integers(1, len(COLOURS), size=n)) % len(COLOURS)  # a different colour
    shape = rng.integers(len(SHAPES), size=n)
    size_idx = rng.integers(len(SIZES), size=n)
    motion = np.array([MOTIONS.index(m) for m in motions])[rng.integers(len(motions), size=n)]
    starts, signs = rng.uniform(0, 1, size=(n, 2)), rng.choice([-1.0, 1.0], size=(n, 2))

    videos = np.empty((n, frames, 3, size, size), dtype=np.float32)
    masks = np.empty((n, frames, 1, size, size), dtype=bool)
    centres = np.empty((n, frames, 2))
    velocity = np.zeros((n, 2))
    rgb = np.empty((n, frames, 3))
    captions = []
    for i in range(n):
        m, r = MOTIONS[motion[i]], SIZES[size_names[size_idx[i]]] * size
        lo, hi = r + 1, size - r - 1  # the centre's room: the whole shape stays in the frame
        c0, c1 = np.array(COLOURS[colour_names[colour[i]]]), np.array(COLOURS[colour_names[colour_end[i]]])
        if m in _DIRECTIONS:
            v = np.array(_DIRECTIONS[m]) * speed * size
            travel = np.abs(v) * (frames - 1)
            start = lo + travel * (v < 0) + starts[i] * (hi - lo - travel)  # room for the whole trip
            centres[i] = start + np.arange(frames)[:, None] * v
            velocity[i] = v
        elif m == "bouncing":
            v = signs[i] * 1.5 * speed * size / np.sqrt(2)
            start = lo + starts[i] * (hi - lo)
            centres[i, :, 0], _ = _bounce(start[0], v[0], lo, hi, frames)
            centres[i, :, 1], _ = _bounce(start[1], v[1], lo, hi, frames)
            velocity[i] = v
        else:
            centres[i] = lo + starts[i] * (hi - lo)
        blend = np.linspace(0, 1, frames)[:, None] if m == "colour" else np.zeros((frames, 1))
        rgb[i] = (1 - blend) * c0 + blend * (c1 if m == "colour" else c0)
        for f in range(frames):
            mask = _shape_mask(SHAPES[shape[i]], centres[i, f, 0], centres[i, f, 1], r, size)
            videos[i, f] = np.where(mask[None], rgb[i, f][:, None, None], np.array(background)[:, None, None])
            masks[i, f, 0] = mask
        if m != "colour":
            colour_end[i] = colour[i]
        captions.append(_clip_caption(colour_names[colour[i]], SHAPES[shape[i]], m, colour_names[colour_end[i]]))

    return Clips(
        videos=torch.from_numpy(videos) * 2 - 1,
        masks=torch.from_numpy(masks).float(),
        captions=captions,
        colour=torch.from_numpy(colour),
        colour_end=torch.from_numpy(colour_end),
        shape=torch.from_numpy(shape),
        size=torch.from_numpy(size_idx),
        motion=torch.from_numpy(motion),
        centres=torch.from_numpy(centres).float(),
        velocity=torch.from_numpy(velocity).float(),
        rgb=torch.from_numpy(rgb).float(),
    )
