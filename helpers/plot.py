"""Figures: image grids, schedule curves, and timestep players for the site and for Jupyter.

A *player* is a ``matplotlib.animation`` rendered with ``to_jshtml()``: plain HTML and
JavaScript that plays in the static website with no kernel. In a live notebook the
ipywidgets slider (:func:`timestep_slider`) does the same job interactively.
"""

from __future__ import annotations

import re
from html import escape
from typing import Callable, Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib import animation

__all__ = [
    "clip_player",
    "frames_figure",
    "image_grid",
    "tile",
    "plot_schedules",
    "player",
    "timestep_player",
    "timestep_slider",
    "to_display",
]


def to_display(images: torch.Tensor) -> torch.Tensor:
    """Map ``(N, C, H, W)`` or ``(C, H, W)`` images in ``[-1, 1]`` to ``(N, H, W, C)`` in [0, 1]."""
    images = torch.as_tensor(images).detach().float().cpu()
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"images must be (N, C, H, W) or (C, H, W) with C in (1, 3); got {tuple(images.shape)}"
        )
    return ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)


def _show(ax, image: torch.Tensor) -> None:
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(image, interpolation="nearest")
    ax.set_axis_off()


def image_grid(
    images: torch.Tensor,
    nrow: int | None = None,
    titles: Sequence[str] | None = None,
    scale: float = 1.2,
    suptitle: str | None = None,
):
    """Show a batch of images in ``[-1, 1]`` as a grid; returns the matplotlib figure."""
    shown = to_display(images)
    n = len(shown)
    ncol = nrow or min(n, 8)
    nrows = -(-n // ncol)
    if titles is not None and len(titles) != n:
        raise ValueError(f"titles has {len(titles)} entries for {n} images")
    fig, axes = plt.subplots(nrows, ncol, figsize=(scale * ncol, scale * nrows + (0.3 if suptitle else 0)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            _show(ax, shown[i])
            if titles is not None:
                ax.set_title(titles[i], fontsize=8)
        else:
            ax.set_axis_off()
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def tile(images: torch.Tensor, ncol: int | None = None, pad: int = 1) -> torch.Tensor:
    """Tile a batch ``(N, C, H, W)`` into one image ``(C, H', W')`` (rows of ``ncol``), e.g. a player frame."""
    if images.ndim != 4:
        raise ValueError(f"images must be a batch (N, C, H, W); got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    ncol = ncol or n
    nrows = -(-n // ncol)
    out = torch.full((c, nrows * (h + pad) + pad, ncol * (w + pad) + pad), 1.0)  # white borders
    for i, image in enumerate(images):
        r, k = divmod(i, ncol)
        out[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = image
    return out


def plot_schedules(alpha_bars: dict[str, torch.Tensor], markers: dict[str, int] | None = None):
    """alpha-bar (left) and SNR in dB (right) against t for several schedules.

    ``markers`` optionally maps a schedule name to one step to mark on both curves.
    """
    fig, (ax_ab, ax_snr) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, ab in alpha_bars.items():
        ab = torch.as_tensor(ab).double().cpu()
        t = torch.arange(len(ab))
        snr_db = 10 * torch.log10(ab / (1 - ab))
        (line,) = ax_ab.plot(t, ab, label=name)
        ax_snr.plot(t, snr_db, label=name, color=line.get_color())
        if markers and name in markers:
            m = markers[name]
            ax_ab.plot(m, ab[m], "o", color=line.get_color())
            ax_snr.plot(m, snr_db[m], "o", color=line.get_color())
    ax_ab.set(xlabel="t", ylabel=r"$\bar\alpha_t$", title="signal fraction", ylim=(0, 1.02))
    ax_snr.axhline(0, color="grey", lw=0.8, ls="--")
    ax_snr.set(xlabel="t", ylabel="SNR (dB)", title=r"SNR $=\bar\alpha_t / (1-\bar\alpha_t)$")
    for ax in (ax_ab, ax_snr):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def player(frames: torch.Tensor, titles: Sequence[str] | None = None, interval: int = 400, scale: float = 2.5) -> str:
    """A static-site player: ``frames`` ``(F, C, H, W)`` in [-1, 1] as a JavaScript animation.

    Returns the HTML string of ``FuncAnimation.to_jshtml()``; display it with
    ``IPython.display.HTML``. Works offline and without a kernel.
    """
    shown = to_display(frames)
    if titles is not None and len(titles) != len(shown):
        raise ValueError(f"titles has {len(titles)} entries for {len(shown)} frames")
    fig, ax = plt.subplots(figsize=(scale, scale + 0.3))
    _show(ax, shown[0])
    image = ax.images[0]
    title = ax.set_title(titles[0] if titles else "", fontsize=9)

    def update(i: int):
        image.set_data(shown[i][..., 0] if shown.shape[-1] == 1 else shown[i])
        title.set_text(titles[i] if titles else "")
        return image, title

    anim = animation.FuncAnimation(fig, update, frames=len(shown), interval=interval, blit=False)
    html = anim.to_jshtml(default_mode="once")
    plt.close(fig)
    alt = f"An animation of {len(shown)} frames" + (f", from '{titles[0]}' to '{titles[-1]}'" if titles else "")
    return _offline(html, alt)


# matplotlib's player links Font Awesome from a CDN for its button icons; the course's pages
# must load nothing from the internet, so the link goes and the icons become plain glyphs.
_GLYPHS = {
    "fast-backward": "\u23EE", "step-backward": "\u23EA", "pause": "\u23F8",
    "play": "\u25B6", "step-forward": "\u23E9", "fast-forward": "\u23ED",
    "minus": "\u2212", "plus": "+",
}  # fmt: skip


def _offline(html: str, alt: str = "An animation") -> str:
    """No CDN links (plain glyphs for the buttons), and the frame's ``<img>`` says what it plays."""
    html = html.replace("<img id=", f'<img alt="{escape(alt, quote=True)}" id=', 1)
    html = re.sub(r'<link rel="stylesheet"\s+href="https?://[^"]*font-awesome[^"]*">', "", html)
    html = html.replace('<i class="fa fa-play fa-flip-horizontal"></i>', "\u25C0")
    return re.sub(
        r'<i class="fa fa-([a-z-]+)"></i>', lambda m: _GLYPHS.get(m.group(1), m.group(1)), html
    )


def timestep_player(
    x0: torch.Tensor,
    alpha_bar: torch.Tensor,
    timesteps: Sequence[int],
    generator: torch.Generator | None = None,
    **kwargs,
) -> str:
    """A player of ``x_t`` for each ``t`` in ``timesteps``, with one fixed noise draw.

    ``x0`` is one image ``(C, H, W)``; the same ``eps`` is used at every t, so the frames show
    the closed form sliding from image to noise.
    """
    from helpers.diffusion import q_sample

    x0 = torch.as_tensor(x0)
    if x0.ndim != 3:
        raise ValueError(f"x0 must be one image (C, H, W); got shape {tuple(x0.shape)}")
    eps = torch.randn(x0.shape, generator=generator)
    ts = torch.as_tensor(list(timesteps))
    frames = q_sample(x0.expand(len(ts), *x0.shape), ts, eps.expand(len(ts), *x0.shape), alpha_bar)
    ab = torch.as_tensor(alpha_bar)[ts]
    titles = [f"t = {t}   alpha_bar = {a:.3f}" for t, a in zip(ts.tolist(), ab.tolist())]
    return player(frames, titles, **kwargs)


def timestep_slider(x0: torch.Tensor, alpha_bar: torch.Tensor, seed: int = 0) -> Callable:
    """An ipywidgets slider over t for live notebooks (needs a running kernel)."""
    import ipywidgets as widgets
    from IPython.display import display

    from helpers.diffusion import q_sample

    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    T = len(alpha_bar)

    def show(t: int = 0):
        xt = q_sample(x0[None], t, eps[None], alpha_bar)
        fig = image_grid(xt, scale=3, suptitle=f"t = {t}, alpha_bar = {float(alpha_bar[t]):.3f}")
        display(fig)
        plt.close(fig)

    return widgets.interact(show, t=widgets.IntSlider(min=0, max=T - 1, step=1, value=0, continuous_update=False))


def frames_figure(rows: dict[str, torch.Tensor], title: str = ""):
    """A static figure of clips, one row of frames per clip: ``rows`` maps a label to ``(F, 3, H, W)``."""
    if not rows or any(v.ndim != 4 for v in rows.values()):
        raise ValueError("rows must map labels to clips (F, C, H, W)")
    n_frames = max(v.shape[0] for v in rows.values())
    fig, axes = plt.subplots(len(rows), n_frames, figsize=(1.1 * n_frames, 1.15 * len(rows) + 0.4), squeeze=False)
    for r, (label, frames) in enumerate(rows.items()):
        for f, ax in enumerate(axes[r]):
            if f < len(frames):
                ax.imshow(to_display(frames[f])[0], interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if f == 0:
                ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
            if r == 0:
                ax.set_title(f"frame {f}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def clip_player(videos: torch.Tensor, title: str, ncol: int | None = None, interval: int = 250) -> str:
    """Clips ``(N, F, 3, H, W)`` tiled side by side (rows of ``ncol``) and played frame by frame.

    Returns the HTML of :func:`player`; display it with ``IPython.display.HTML``.
    """
    if videos.ndim != 5:
        raise ValueError(f"videos must be clips (N, F, C, H, W); got {tuple(videos.shape)}")
    ncol = ncol or len(videos)
    frames = torch.stack([tile(videos[:, f], ncol=ncol) for f in range(videos.shape[1])])
    rows = -(-len(videos) // ncol)
    return player(frames, [f"{title}: frame {f}" for f in range(len(frames))], interval=interval,
                  scale=1.2 * (ncol * rows) ** 0.5 + 1.5)
