"""Figures' alt text: described from their own words, carried by a real kernel, read by the site."""

from __future__ import annotations

import base64
import hashlib
import importlib.util

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nbformat  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import ROOT  # noqa: E402
from helpers import alt_text, plot  # noqa: E402


def _extension():
    spec = importlib.util.spec_from_file_location("sphinx_alt_text", ROOT / "tools" / "sphinx_alt_text.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_plot_is_described_by_its_title_axes_and_legend():
    fig, (left, right) = plt.subplots(1, 2)
    left.plot([0, 1], [1, 0], label="linear")
    left.plot([0, 1], [1, 0.5], label="cosine")
    left.set(title=r"$\bar\alpha_t$ against t", xlabel="t", ylabel=r"$\bar\alpha_t$")
    left.legend()
    right.imshow(torch.zeros(4, 4))
    right.set_axis_off()
    fig.suptitle("two schedules")
    text = alt_text.describe(fig)
    plt.close(fig)
    assert text.startswith("Figure: a plot and an image, 'two schedules'."), text
    assert "alpha_t against t" in text and "legend: linear, cosine" in text
    assert "$" not in text and "\\" not in text, "TeX is read out as words"
    assert alt_text._plain(r"$\sqrt\beta_t$ and $\lambda = \log\mathrm{SNR}$") == "sqrt beta_t and lambda = log SNR"


def test_an_image_grid_counts_its_images_and_a_hand_written_text_wins():
    fig = plot.image_grid(torch.zeros(12, 1, 8, 8), nrow=6, titles=[f"t = {i}" for i in range(12)], suptitle="noise")
    text = alt_text.describe(fig)
    assert text.startswith("Figure: 12 images, 'noise'.") and "'t = 0'" in text and "and 6 more" in text, text
    alt_text.set_alt(fig, "twelve blank squares")
    assert alt_text.describe(fig) == "twelve blank squares"
    with pytest.raises(ValueError, match="text"):
        alt_text.set_alt(fig, "  ")
    with pytest.raises(TypeError, match="fig"):
        alt_text.describe("not a figure")
    plt.close(fig)


def test_a_kernel_attaches_the_description_and_the_site_extension_finds_it():
    """Executed in a real kernel as papermill does: the output carries alt text keyed by its image's bytes."""
    import nbclient

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import helpers\nimport matplotlib.pyplot as plt"),
        nbformat.v4.new_code_cell("fig, ax = plt.subplots()\nax.plot([1, 2], [3, 1], label='loss')\n"
                                  "ax.set(xlabel='step', ylabel='loss')\nax.legend()\nplt.show()"),
    ]
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=120).execute()
    (output,) = [o for o in nb.cells[1].outputs if o.output_type == "display_data"]
    assert output.metadata["image/png"]["alt"] == "Figure: a plot. loss against step, legend: loss."
    found = _extension().descriptions(nbformat.from_dict(nb))
    digest = hashlib.sha256(base64.b64decode(output.data["image/png"])).hexdigest()
    assert found == {digest: output.metadata["image/png"]["alt"]}
