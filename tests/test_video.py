"""Tests of the moving-shapes clips (helpers.data.make_clips) and helpers.video."""

import pytest
import torch

from helpers import video
from helpers.data import COLOURS, MOTIONS, SIZES, make_clips


@pytest.fixture(scope="module")
def clips():
    return make_clips(60, frames=8, size=32, seed=3)


# --- the clips ------------------------------------------------------------------------------


def test_clips_are_deterministic_and_shaped(clips):
    again = make_clips(60, frames=8, size=32, seed=3)
    assert torch.equal(clips.videos, again.videos) and clips.captions == again.captions
    assert not torch.equal(clips.videos, make_clips(60, seed=4).videos)
    n, f = 60, 8
    assert clips.videos.shape == (n, f, 3, 32, 32) and clips.masks.shape == (n, f, 1, 32, 32)
    assert clips.centres.shape == (n, f, 2) and clips.rgb.shape == (n, f, 3) and clips.velocity.shape == (n, 2)
    assert clips.videos.min() >= -1 and clips.videos.max() <= 1
    assert len(clips.captions) == n and set(clips.motion.tolist()) == set(range(len(MOTIONS)))
    assert make_clips(3, frames=5, size=16).videos.shape == (3, 5, 3, 16, 16)


def test_captions_say_what_the_clip_does(clips):
    for caption, m in zip(clips.captions, clips.motion.tolist()):
        word = {"right": "to the right", "left": "to the left", "up": "to the top", "down": "to the bottom",
                "bouncing": "bouncing", "colour": "changing from"}[MOTIONS[m]]
        assert word in caption, (caption, MOTIONS[m])


def _mask_centroids(masks):
    return video.centroids(masks.expand(-1, -1, 3, -1, -1) * 2 - 1)


def test_moving_shapes_move_by_the_stated_velocity(clips):
    moving = clips.motion < 4  # right, left, up, down
    c = _mask_centroids(clips.masks)[moving]
    steps = c[:, 1:] - c[:, :-1]  # (n, F-1, 2) pixels per frame
    v = clips.velocity[moving][:, None]
    assert (v.norm(dim=-1) - 0.06 * 32).abs().max() < 1e-5  # speed * size pixels per frame
    # Pixelisation moves a centroid by under a pixel; on average the steps are the velocity.
    assert (steps - v).abs().max() < 1.0
    assert (steps - v).mean(1).abs().max() < 0.3


def test_bouncing_shapes_stay_inside_and_reflect(clips):
    bouncing = clips.motion == MOTIONS.index("bouncing")
    masks = clips.masks[bouncing]
    area = masks.sum((-1, -2, -3))
    assert (area > 0).all()
    assert (area.amax(1) - area.amin(1) <= 0.35 * area.amax(1)).all()  # never cut off by an edge
    for i in torch.nonzero(bouncing).flatten().tolist():
        r = SIZES[list(SIZES)[int(clips.size[i])]] * 32
        c = clips.centres[i]
        assert (c >= r + 1 - 1e-4).all() and (c <= 32 - r - 1 + 1e-4).all()
        speed = (c[1:] - c[:-1]).abs()
        # Away from the walls each coordinate moves by |v|; at a wall it folds back (shorter).
        assert (speed <= clips.velocity[i].abs() + 1e-4).all()
    assert any((torch.sign(clips.centres[i, 1:] - clips.centres[i, :-1]) < 0).any()
               and (torch.sign(clips.centres[i, 1:] - clips.centres[i, :-1]) > 0).any()
               for i in torch.nonzero(bouncing).flatten().tolist())


def test_colour_change_interpolates_and_the_shape_stays(clips):
    changing = torch.nonzero(clips.motion == MOTIONS.index("colour")).flatten().tolist()
    names = list(COLOURS)
    for i in changing:
        start, end = torch.tensor(COLOURS[names[clips.colour[i]]]), torch.tensor(COLOURS[names[clips.colour_end[i]]])
        blend = torch.linspace(0, 1, 8)[:, None]
        torch.testing.assert_close(clips.rgb[i], (1 - blend) * start + blend * end)
        inside = clips.masks[i, 3, 0].bool()
        torch.testing.assert_close((clips.videos[i, 3, :, inside].T + 1) / 2, clips.rgb[i, 3].expand(int(inside.sum()), 3))
        assert torch.equal(clips.masks[i, 0], clips.masks[i, -1])
    others = clips.motion != MOTIONS.index("colour")
    assert torch.equal(clips.colour[others], clips.colour_end[others])
    assert (clips.colour[changing] != clips.colour_end[changing]).all()


@pytest.mark.parametrize("kwargs, name", [
    ({"n": 0}, "n"), ({"n": 2, "frames": 1}, "frames"), ({"n": 2, "size": 4}, "size"),
    ({"n": 2, "speed": 0.5}, "speed"), ({"n": 2, "motions": ("spinning",)}, "motions"),
])
def test_clips_reject_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_clips(**kwargs)


# --- temporal attention -----------------------------------------------------------------------


def test_temporal_attention_equals_torch_sdpa():
    g = torch.Generator().manual_seed(0)
    B, F, C, H, W, D, heads = 2, 5, 8, 3, 4, 12, 3
    x = torch.randn(B, F, C, H, W, generator=g)
    w_q, w_k, w_v = (torch.randn(D, C, generator=g) / C**0.5 for _ in range(3))
    w_out, b_out = torch.randn(C, D, generator=g) / D**0.5, torch.randn(C, generator=g)
    ours = video.temporal_attention(x, w_q, w_k, w_v, w_out, b_out, heads)
    tokens = x.permute(0, 3, 4, 1, 2).reshape(B * H * W, F, C)  # written out again, independently
    q, k, v = ((tokens @ w.T).view(-1, F, heads, D // heads).transpose(1, 2) for w in (w_q, w_k, w_v))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, F, D) @ w_out.T + b_out
    ref = ref.reshape(B, H, W, F, C).permute(0, 3, 4, 1, 2)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_temporal_attention_equals_diffusers_temporal_attention_layer():
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel

    torch.manual_seed(0)
    model = TransformerTemporalModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=8).eval()
    attn = model.transformer_blocks[0].attn1  # the self-attention over frames
    x = torch.randn(2, 6, 16, 3, 3)
    with torch.no_grad():
        ref = attn(video.to_frame_tokens(x))
        ours = video.temporal_attention(x, attn.to_q.weight, attn.to_k.weight, attn.to_v.weight,
                                        attn.to_out[0].weight, attn.to_out[0].bias, heads=attn.heads)
    torch.testing.assert_close(ours, video.from_frame_tokens(ref, 2, 3, 3), atol=1e-5, rtol=1e-5)


def test_temporal_attention_keeps_positions_apart():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 6, 5, 5, generator=g)
    w = [torch.randn(6, 6, generator=g) for _ in range(4)]
    y = video.temporal_attention(x, *w)
    x2 = x.clone()
    x2[..., 2, 3] += 10  # change one pixel position in every frame
    y2 = video.temporal_attention(x2, *w)
    changed = (y2 - y).abs().amax((0, 1, 2)) > 1e-6  # (H, W)
    assert changed[2, 3] and changed.sum() == 1
    assert torch.equal(video.from_frame_tokens(video.to_frame_tokens(x), 1, 5, 5), x)


def test_temporal_attention_rejects_bad_shapes():
    x = torch.randn(1, 4, 6, 2, 2)
    w = torch.randn(6, 6)
    with pytest.raises(ValueError, match="x"):
        video.temporal_attention(x[0], w, w, w, w)
    with pytest.raises(ValueError, match="heads"):
        video.temporal_attention(x, w, w, w, w, heads=4)
    with pytest.raises(ValueError, match="w_q"):
        video.temporal_attention(x, torch.randn(6, 5), w, w, w)


# --- cost arithmetic and metrics ----------------------------------------------------------------


def test_spacetime_tokens_and_attention_pairs():
    assert video.spacetime_tokens(16, 32, 32, (2, 2, 2)) == 8 * 16 * 16
    assert video.spacetime_tokens(8, 8, 8) == 8 * 4 * 4
    with pytest.raises(ValueError, match="height"):
        video.spacetime_tokens(16, 30, 32, (2, 4, 4))
    pairs = video.attention_pairs(frames=8, positions=256)
    assert pairs["full"] == (8 * 256) ** 2 == 8 * pairs["spatial"]  # full = F times the spatial layer
    assert pairs["factorised"] == 8 * 256**2 + 256 * 8**2


def test_frame_change_is_zero_on_a_static_clip_and_matches_a_hand_computation():
    static = torch.rand(3, 1, 3, 4, 4).expand(3, 6, 3, 4, 4)
    assert torch.equal(video.frame_change(static), torch.zeros(3))
    clip = torch.zeros(1, 3, 1, 2, 2)
    clip[0, 1, 0, 0, 0] = 1.0  # one pixel switches on in frame 1 and off in frame 2
    # |f1 - f0| has one 1 in 4 values, |f2 - f1| too: mean over 2 pairs x 4 values = 2 / 8.
    assert video.frame_change(clip).item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="videos"):
        video.frame_change(torch.zeros(3, 4, 4))


def test_centroids_and_colour_spread_on_real_clips(clips):
    c = video.centroids(clips.videos)
    torch.testing.assert_close(c, _mask_centroids(clips.masks))  # every course colour passes the threshold
    spread = video.colour_spread(clips.videos)
    still_colour = clips.motion != MOTIONS.index("colour")
    assert spread[still_colour].abs().max() < 1e-5 and (spread[~still_colour] > 0.05).all()


# --- the model --------------------------------------------------------------------------------


def test_video_unet_forward_shape_and_sampler():
    from diffusers import DDIMScheduler

    torch.manual_seed(0)
    unet = video.video_unet(widths=(16, 32)).eval()
    x = torch.randn(2, 4, 8, 8, 8)  # (B, C, F, H, W)
    states = torch.randn(2, 12, 64)
    with torch.no_grad():
        out = unet(x, torch.tensor([10, 500]), encoder_hidden_states=states).sample
    assert out.shape == x.shape
    torch.testing.assert_close(video.to_unet(video.from_unet(x)), x)
    sample = video.sample_clips(unet, DDIMScheduler(), states, torch.zeros(12, 64), frames=4, guidance_scale=2.0,
                                num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert sample.shape == (2, 4, 4, 8, 8) and torch.isfinite(sample).all()
    with pytest.raises(ValueError, match="widths"):
        video.video_unet(widths=(16,))


def test_video_unet_loss_falls_on_clip_latents():
    import helpers
    from helpers import training

    clips = make_clips(32, frames=4, size=8, seed=0, speed=0.04)
    data = video.to_unet(clips.videos)  # (32, 3, 4, 8, 8): pixels stand in for latents here
    torch.manual_seed(0)
    unet = video.video_unet(in_channels=3, size=8, widths=(16, 16))
    objective = training.diffusion_objective(helpers.get_schedule("linear").alpha_bar, "epsilon",
                                             **{"0": "encoder_hidden_states"})
    states = torch.zeros(32, 2, 64)
    result = training.train(unet, (data, states), objective, steps=40, batch_size=8, lr=2e-3, warmup_steps=5,
                            ema_decay=None, progress=False)
    assert sum(result.losses[-10:]) / 10 < 0.7 * sum(result.losses[:5]) / 5


def test_inflated_unet_at_init_is_the_image_unet_frame_by_frame():
    from helpers import models

    torch.manual_seed(0)
    unet2d = models.shapes_unet(widths=(32, 64)).eval()
    with torch.no_grad():  # the 3-D class has no pooled-text embedding: switch it off in the 2-D one
        unet2d.add_embedding.norm2.weight.zero_()
        unet2d.add_embedding.norm2.bias.zero_()
    unet3d, copied = video.inflate_unet(unet2d)
    unet3d.eval()
    assert set(copied) >= {k for k in unet2d.state_dict() if not k.startswith("add_embedding")}
    x, states, t = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 12, 64), torch.tensor([50, 900])
    with torch.no_grad():
        joint = unet3d(x, t, encoder_hidden_states=states).sample  # (B, C, F, H, W)
        per_frame = unet2d(x.transpose(1, 2).flatten(0, 1), t.repeat_interleave(3),
                           encoder_hidden_states=states.repeat_interleave(3, 0)).sample  # (B*F, C, H, W)
    torch.testing.assert_close(joint, per_frame.reshape(2, 3, 4, 8, 8).transpose(1, 2), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unet2d"):
        video.inflate_unet(models.digits_unet())
