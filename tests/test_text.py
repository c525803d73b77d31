"""The text side (tokenizer, tiny CLIP), condition dropout, the shapes judge and the miniature SD."""

import dataclasses

import pytest
import torch
from transformers import CLIPModel

import helpers
from helpers import data, text, training, zoo


def test_tokenizer_brackets_pads_and_maps_unknown_words():
    tok = text.shapes_tokenizer()
    ids = tok("a large Red circle, on the left", padding="max_length", max_length=tok.model_max_length).input_ids
    words = tok.convert_ids_to_tokens(ids)
    assert words[:9] == ["<bos>", "a", "large", "red", "circle", "on", "the", "left", "<eos>"]
    assert words[9:] == ["<pad>"] * (text.MAX_LENGTH - 9)
    assert tok("").input_ids == [text.VOCAB["<bos>"], text.VOCAB["<eos>"]]  # the null prompt
    assert tok("a zebra").input_ids[2] == text.VOCAB["<unk>"]
    for caption in data.all_captions():  # every caption fits, with no unknown word
        ids = tok(caption).input_ids
        assert len(ids) <= text.MAX_LENGTH and text.VOCAB["<unk>"] not in ids


def test_all_captions_parse_back_to_their_attributes():
    captions = data.all_captions()
    assert len(set(captions)) == 180
    shapes = helpers.make_shapes(50, 32, seed=5)
    parsed = data.caption_attributes(shapes.captions)
    for key in ("colour", "shape", "position", "size"):
        assert torch.equal(parsed[key], getattr(shapes, key))
    with pytest.raises(ValueError, match="captions"):
        data.caption_attributes(["a red circle"])


def test_clip_pools_at_eos_and_its_loss_matches_transformers_when_captions_differ():
    helpers.seed_everything(0)
    clip = text.tiny_clip().eval()
    tok = text.shapes_tokenizer()
    captions = data.all_captions()[:8]  # distinct
    ids = tok(captions, padding="max_length", max_length=text.MAX_LENGTH, return_tensors="pt").input_ids
    images = helpers.make_shapes(8, 32, seed=1).images
    with torch.no_grad():
        states = clip.text_model(ids).last_hidden_state
        pooled = clip.text_model(ids).pooler_output
        eos_at = (ids == text.VOCAB["<eos>"]).int().argmax(1)
        torch.testing.assert_close(pooled, states[torch.arange(8), eos_at])
        ours = text.clip_loss(clip, (images, ids))
        theirs = CLIPModel.forward(clip, input_ids=ids, pixel_values=images, return_loss=True).loss
    torch.testing.assert_close(ours, theirs)


def test_clip_loss_treats_repeated_captions_as_positives():
    """With every caption equal, each row's target is uniform, so the loss is exactly log B."""
    helpers.seed_everything(0)
    clip = text.tiny_clip().eval()
    tok = text.shapes_tokenizer()
    ids = tok(["a large red circle on the left"] * 6, padding="max_length", max_length=text.MAX_LENGTH,
              return_tensors="pt").input_ids
    images = helpers.make_shapes(6, 32, seed=1).images
    with torch.no_grad():
        logits = clip(input_ids=ids, pixel_values=images).logits_per_image
        expected = 0.5 * (-(logits.log_softmax(1)).mean(1).mean() - (logits.T.log_softmax(1)).mean(1).mean())
        torch.testing.assert_close(text.clip_loss(clip, (images, ids)), expected)


def test_condition_dropout_replaces_exactly_the_dropped_rows():
    seen = {}

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, class_labels):
            seen["labels"] = class_labels.clone()
            return x * self.w

    alpha_bar = helpers.get_schedule("linear").alpha_bar
    labels = torch.arange(10).repeat(100)
    x0 = torch.zeros(1000, 1, 2, 2)
    objective = training.diffusion_objective(alpha_bar, cond_dropout=0.3, null_cond={"class_labels": torch.tensor(10)},
                                             **{"0": "class_labels"})
    torch.manual_seed(0)
    objective(Recorder(), (x0, labels))
    dropped = seen["labels"] == 10
    assert 0.25 < dropped.float().mean() < 0.35
    assert torch.equal(seen["labels"][~dropped], labels[~dropped])
    with pytest.raises(ValueError, match="null_cond"):
        training.diffusion_objective(alpha_bar, cond_dropout=0.1, **{"0": "class_labels"})
    with pytest.raises(ValueError, match="cond_dropout"):
        training.diffusion_objective(alpha_bar, cond_dropout=1.0)


def test_shapes_judge_reads_real_shapes_and_catches_wrong_captions():
    judge = helpers.metrics.shapes_judge()
    assert min(judge.test_accuracy.values()) > 0.95, judge.test_accuracy
    real = helpers.make_shapes(200, 32, seed=7)
    right = helpers.metrics.score_shapes(real.images, real.captions, judge)
    assert right.colour_and_shape > 0.95 and right.all_four > 0.9
    wrong = helpers.metrics.score_shapes(real.images, real.captions[1:] + real.captions[:1], judge)
    assert wrong.colour_and_shape < 0.3
    copies = helpers.metrics.score_shapes(real.images[:1].expand(4, -1, -1, -1), [real.captions[0]] * 4, judge)
    assert copies.diversity == 0.0
    with pytest.raises(ValueError, match="one caption each"):
        helpers.metrics.score_shapes(real.images, real.captions[:3], judge)


def test_model_factories_check_their_arguments():
    unet = helpers.models.shapes_unet()
    out = unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), encoder_hidden_states=torch.randn(2, 12, 64)).sample
    assert out.shape == (2, 4, 8, 8)
    vae = helpers.models.shapes_vae()
    assert vae.encode(torch.randn(1, 3, 32, 32)).latent_dist.mean.shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="widths"):
        helpers.models.shapes_unet(widths=(30, 64))
    with pytest.raises(ValueError, match="size"):
        helpers.models.shapes_unet(size=6, widths=(32, 64, 64))


def test_tile_places_every_image():
    images = torch.arange(6, dtype=torch.float32).reshape(6, 1, 1, 1).expand(6, 1, 2, 2)
    tiled = helpers.plot.tile(images, ncol=3, pad=1)
    assert tiled.shape == (1, 2 * 3 + 1, 3 * 3 + 1)
    assert tiled[0, 1, 1] == 0 and tiled[0, 1, 4] == 1 and tiled[0, 4, 7] == 5 and tiled[0, 0, 0] == 1.0


def test_miniature_stable_diffusion_trains_saves_reloads_and_generates(tmp_path, monkeypatch):
    """The whole latent-diffusion recipe chain on a few steps: a real StableDiffusionPipeline comes back."""
    from diffusers import StableDiffusionPipeline

    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    for name, n in [("tiny_clip", 200), ("shapes_vae", 200), ("shapes_sd", 200)]:
        r = zoo.RECIPES[name]
        small = {**r.data_kwargs, "n": n} | ({"photo_patches": 40} if "photo_patches" in r.data_kwargs else {})
        monkeypatch.setitem(zoo.RECIPES, name, dataclasses.replace(
            r, data_kwargs=small, train_kwargs={**r.train_kwargs, "steps": 3, "batch_size": 8}))
        if "finish" in small:
            monkeypatch.setitem(zoo.RECIPES, name, dataclasses.replace(zoo.RECIPES[name], data_kwargs=small | {"finish": {"steps": 2}}))
    pipe = zoo.load("shapes_sd", progress=False)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.vae.config.scaling_factor != 0.18215  # computed from data, not SD's default
    kwargs = dict(guidance_scale=3.0, num_inference_steps=3, output_type="pt")
    first = pipe(["a large red circle on the left"], negative_prompt=["a blue square"],
                 generator=torch.Generator().manual_seed(0), **kwargs).images
    assert first.shape == (1, 3, 32, 32) and 0 <= first.min() and first.max() <= 1
    again = zoo.load("shapes_sd", progress=False)  # from the cache this time
    second = again(["a large red circle on the left"], negative_prompt=["a blue square"],
                   generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(first, second)
    # The call that trained returns what the cache gives later: the same weights and flags (a
    # trainer's EMA U-Net has requires_grad off, and a video model fine-tuned from it stalled).
    for a, b in ((pipe.unet, again.unet), (pipe.vae, again.vae), (pipe.text_encoder, again.text_encoder)):
        assert [(k, p.requires_grad) for k, p in a.named_parameters()] == [(k, p.requires_grad) for k, p in b.named_parameters()]
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
        assert a.training == b.training


def test_retrieve_returns_one_candidate_per_image():
    helpers.seed_everything(0)
    clip, tok = text.tiny_clip().eval(), text.shapes_tokenizer()
    images = helpers.make_shapes(5, 32, seed=2).images
    assert text.retrieve(clip, tok, images, ["a large red circle on the left"]) == ["a large red circle on the left"] * 5
    candidates = data.all_captions()[:7]
    assert all(c in candidates for c in text.retrieve(clip, tok, images, candidates))
    img, txt = text.clip_embeddings(clip, tok, images, candidates)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(5))
    assert txt.shape == (7, img.shape[1])


def test_add_words_gives_new_words_their_own_tokens_and_leaves_old_prompts_unchanged():
    torch.manual_seed(0)
    encoder = text.tiny_clip().text_model.eval()
    old = text.shapes_tokenizer()
    still = data.all_captions()[:40] + [""]
    before = text.encode_prompts(encoder, old, still)
    moving = "a red circle moving to the right"
    old_ids = old(moving).input_ids
    tokenizer, encoder = text.add_words(encoder, seed=0)
    assert len(tokenizer) == len(text.VOCAB) + len(text.VIDEO_WORDS)
    assert encoder.get_input_embeddings().weight.shape[0] == len(tokenizer)
    torch.testing.assert_close(text.encode_prompts(encoder, tokenizer, still), before, atol=0, rtol=0)
    ids = tokenizer(moving).input_ids
    assert text.VOCAB["<unk>"] in old_ids and text.VOCAB["<unk>"] not in ids
    assert tokenizer.convert_ids_to_tokens(ids)[4:6] == ["moving", "to"]
    assert all(tokenizer(w).input_ids[1] == len(text.VOCAB) + i for i, w in enumerate(text.VIDEO_WORDS))
    # Captions that differ only in the motion word now encode differently.
    a, b = text.encode_prompts(encoder, tokenizer, ["a red circle bouncing", "a red circle moving"])
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="vocabulary"):
        text.add_words(encoder)  # already grown
    with pytest.raises(ValueError, match="extra_words"):
        text.shapes_tokenizer(extra_words=("red",))
    with pytest.raises(ValueError, match="extra_words"):
        text.shapes_tokenizer(extra_words=("moving", "moving"))
