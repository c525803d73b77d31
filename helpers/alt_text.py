"""Alt text for every figure the course shows: what it plots, read off the figure itself.

A screen reader reads an ``<img>``'s ``alt``; without one it reads the file name, a hash.
:func:`describe` writes a sentence from what a figure already states in words (its title,
each panel's title, axis labels and legend, how many images it shows), and
:func:`enable` makes every figure a notebook displays carry that sentence in its output's
metadata (``{"image/png": {"alt": ...}}``). The site's Sphinx extension
(``tools/sphinx_alt_text.py``) copies it into the page's ``<img alt>``. A chapter that
wants to say more sets it by hand: ``helpers.alt_text.set_alt(fig, "...")``.
"""

from __future__ import annotations

import re

from matplotlib.figure import Figure

__all__ = ["describe", "enable", "set_alt"]

_MAX_CHARS = 600


def set_alt(fig: Figure, text: str) -> Figure:
    """Give ``fig`` a hand-written description (used instead of the generated one)."""
    if not isinstance(fig, Figure):
        raise TypeError(f"fig must be a matplotlib Figure; got {type(fig).__name__}")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text must be a non-empty description of what the figure shows")
    fig._course_alt = text.strip()
    return fig


def _plain(text: str) -> str:
    """Matplotlib's mathtext as words a screen reader can say: '$\\bar\\alpha_t$' -> 'alpha_t'."""
    text = re.sub(r"(\\[A-Za-z]+)(?=\\)", r"\1 ", text)  # '\sqrt\beta_t' -> 'sqrt beta_t', '\log\mathrm' apart
    text = re.sub(r"\\(mathrm|mathbf|mathit|text|operatorname)\{([^}]*)\}", r"\2", text)
    text = re.sub(r"\\(bar|hat|tilde)\s*\{?\\?([A-Za-z]+)\}?", r"\2", text)
    text = re.sub(r"\\sqrt\{([^}]*)\}", r"sqrt(\1)", text)
    text = text.replace("\\varepsilon", "epsilon")
    text = text.replace("$", "").replace("\\", "").replace("{", "").replace("}", "")
    return re.sub(r"\s+", " ", text).strip()


def _panel(ax) -> tuple[str, bool]:
    """One panel in words, and whether it shows an image (rather than a plot)."""
    words = []
    title = " ".join(_plain(t.get_text()) for t in (ax.title, ax._left_title, ax._right_title) if t.get_text())
    if title:
        words.append(f"'{title}'")
    is_image = bool(ax.images) and not ax.lines and not ax.collections
    xlabel, ylabel = _plain(ax.get_xlabel()), _plain(ax.get_ylabel())
    if ylabel and xlabel:
        words.append(f"{ylabel} against {xlabel}")
    elif xlabel or ylabel:
        words.append(f"axis {xlabel or ylabel}")
    legend = ax.get_legend()
    if legend is not None:
        labels = [_plain(t.get_text()) for t in legend.get_texts() if t.get_text()]
        if labels:
            words.append("legend: " + ", ".join(labels))
    return ", ".join(words), is_image


def describe(fig: Figure) -> str:
    """A sentence that says what ``fig`` shows, from the words it carries."""
    if not isinstance(fig, Figure):
        raise TypeError(f"fig must be a matplotlib Figure; got {type(fig).__name__}")
    if getattr(fig, "_course_alt", None):
        return fig._course_alt
    axes = [ax for ax in fig.axes if ax.get_visible() and (ax.has_data() or ax.images)]
    panels = [_panel(ax) for ax in axes]
    n_images = sum(is_image for _, is_image in panels)
    n_plots = len(panels) - n_images
    suptitle = _plain(fig._suptitle.get_text()) if fig._suptitle is not None else ""
    kinds = []
    if n_plots:
        kinds.append("a plot" if n_plots == 1 else f"{n_plots} plots")
    if n_images:
        kinds.append("an image" if n_images == 1 else f"{n_images} images")
    sentence = "Figure: " + (" and ".join(kinds) or "an empty figure")
    if suptitle:
        sentence += f", '{suptitle}'"
    described = [text for text, _ in panels if text]
    if described:
        # Image grids repeat one kind of caption per image; say the first few, then how many.
        shown = described if len(described) <= 6 else described[:6] + [f"and {len(described) - 6} more"]
        sentence += ". " + "; ".join(shown)
    sentence += "."
    return sentence if len(sentence) <= _MAX_CHARS else sentence[: _MAX_CHARS - 1].rstrip() + "…"


def enable(shell=None) -> bool:
    """Attach :func:`describe`'s sentence to every figure ``shell`` (the running IPython) displays.

    Wraps the PNG formatter that IPython's inline backend registers for figures, so the figure
    formats a reader chose are kept. The backend registers it when it loads (which matplotlib
    does lazily, at the first figure, so it is loaded here) and again on ``%matplotlib``, so the
    wrapper is also checked before every cell. Returns False (and does nothing) outside IPython.
    """
    if shell is None:
        try:
            from IPython import get_ipython
        except ImportError:
            return False
        shell = get_ipython()
    if shell is None or not hasattr(shell, "display_formatter") or not hasattr(shell, "events"):
        return False

    def wrap(*_):
        formatter = shell.display_formatter.formatters.get("image/png")
        try:
            draw = formatter.lookup_by_type(Figure)
        except (AttributeError, KeyError):
            return  # no figure formatter yet (or PNG switched off): check again next cell
        if getattr(draw, "_course_alt", False):
            return

        def png_with_alt(fig):
            data = draw(fig)
            if isinstance(data, tuple):  # a formatter that already returns (data, metadata)
                data, metadata = data
                return data, {**(metadata or {}), "alt": describe(fig)}
            return data, {"alt": describe(fig)}

        png_with_alt._course_alt = True
        formatter.for_type(Figure, png_with_alt)

    import matplotlib.pyplot as plt

    if hasattr(plt, "_get_backend_mod"):
        plt._get_backend_mod()  # matplotlib loads its backend (and IPython's formatter) lazily, at the first figure
    wrap()
    if not getattr(shell, "_course_alt_hook", False):
        shell.events.register("pre_execute", wrap)
        shell._course_alt_hook = True
    return True
