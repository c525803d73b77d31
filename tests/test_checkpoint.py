"""The real-checkpoint path (chapter 5's ``model_id``) keeps the safety checker, offline.

A checkpoint folder is built here from the course's untrained parts plus a small
``StableDiffusionSafetyChecker``, saved with ``save_pretrained`` exactly as a Hub checkpoint is
laid out, and loaded back through ``helpers.zoo.load_checkpoint``: nothing is downloaded. Then
chapter 5 itself is executed with ``model_id`` set to the trained miniature SD saved that way,
so every ``model_id`` branch of the chapter runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPImageProcessor

from helpers import models, text, zoo


def add_safety_checker(pipe):
    """Register a small, untrained ``StableDiffusionSafetyChecker`` as a real checkpoint carries one."""
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    pipe.register_modules(safety_checker=StableDiffusionSafetyChecker(config).eval(),
                          feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                               crop_size={"height": 32, "width": 32}))
    pipe.register_to_config(requires_safety_checker=True)
    return pipe


def toy_pipeline(with_checker: bool):
    torch.manual_seed(0)
    pipe = zoo.assemble_pipeline(models.shapes_unet(widths=[32, 64]), models.shapes_vae(widths=[16, 32, 32]),
                                 text.tiny_clip().text_model, text.shapes_tokenizer(), "scaled_linear", "v_prediction")
    return add_safety_checker(pipe) if with_checker else pipe


def test_load_checkpoint_keeps_the_safety_checker_and_it_runs(tmp_path):
    toy_pipeline(with_checker=True).save_pretrained(tmp_path / "checkpoint")
    pipe = zoo.load_checkpoint(tmp_path / "checkpoint")
    assert isinstance(pipe.safety_checker, StableDiffusionSafetyChecker)
    out = pipe(["a red circle", "a blue square"], num_inference_steps=2, height=32, width=32,
               generator=torch.Generator().manual_seed(0), output_type="np")
    flags = out.nsfw_content_detected
    assert isinstance(flags, list) and len(flags) == 2 and all(isinstance(f, bool) for f in flags)
    # a flagged image comes back black: force the checker's threshold below every score
    pipe.safety_checker.concept_embeds_weights.data.fill_(-10.0)
    flagged = pipe(["a red circle"], num_inference_steps=2, height=32, width=32,
                   generator=torch.Generator().manual_seed(0), output_type="np")
    assert flagged.nsfw_content_detected == [True] and flagged.images.max() == 0


def test_load_checkpoint_refuses_a_checkpoint_without_a_checker(tmp_path):
    toy_pipeline(with_checker=False).save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="no safety checker.*allow_no_safety_checker"):
        zoo.load_checkpoint(tmp_path / "bare")
    assert zoo.load_checkpoint(tmp_path / "bare", allow_no_safety_checker=True).safety_checker is None


def test_load_checkpoint_names_a_bad_model_id():
    with pytest.raises(ValueError, match="model_id"):
        zoo.load_checkpoint("")


def test_chapter_5_runs_its_model_id_path_on_a_saved_checkpoint(tmp_path):
    """The trained miniature SD, saved as a Hub checkpoint is laid out (with a checker), as chapter 5's model_id."""
    import jupytext
    import nbformat
    import papermill

    checkpoint = tmp_path / "checkpoint"
    add_safety_checker(zoo.load("shapes_sd", progress=False)).save_pretrained(checkpoint)
    chapter = Path(__file__).resolve().parent.parent / "chapters" / "05_latent_diffusion.md"
    runnable, executed = tmp_path / "05.ipynb", tmp_path / "05_out.ipynb"
    jupytext.write(jupytext.read(chapter), runnable)
    papermill.execute_notebook(str(runnable), str(executed), cwd=str(chapter.parent), kernel_name="python3",
                               progress_bar=False, parameters={"model_id": str(checkpoint), "device": "cpu", "n_prompts": 4,
                                                               "guidance_scales": [1.0, 2.0], "num_inference_steps": 4})
    nb = nbformat.read(executed, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text_out = "\n".join(o.get("text", "") + "".join(o.get("data", {}).get("text/markdown", "")) for o in outputs)
    assert "chapter 5 checks passed" in text_out
    assert "StableDiffusionSafetyChecker" in text_out  # the page shows the checkpoint's checker, kept on
