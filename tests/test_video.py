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
    assert unet2d.config.addition_embed_type == "text"  # the pooled text is carried over too
    unet3d, copied = video.inflate_unet(unet2d)
    unet3d.eval()
    assert set(copied) >= set(unet2d.state_dict())
    x, states, t = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 12, 64), torch.tensor([50, 900])
    with torch.no_grad():
        joint = unet3d(x, t, encoder_hidden_states=states).sample  # (B, C, F, H, W)
        per_frame = unet2d(x.transpose(1, 2).flatten(0, 1), t.repeat_interleave(3),
                           encoder_hidden_states=states.repeat_interleave(3, 0)).sample  # (B*F, C, H, W)
    torch.testing.assert_close(joint, per_frame.reshape(2, 3, 4, 8, 8).transpose(1, 2), atol=1e-5, rtol=1e-5)
    # The pooled text matters: other states change every frame's output, and a copy (an EMA) keeps it.
    import copy

    twin = copy.deepcopy(unet3d)
    with torch.no_grad():
        other = unet3d(x, t, encoder_hidden_states=states.flip(0)).sample
        torch.testing.assert_close(twin(x, t, encoder_hidden_states=states).sample, joint)
        twin.add_embedding.norm2.bias.add_(1.0)  # the copy's own embedding is the one it uses
        moved = twin(x, t, encoder_hidden_states=states).sample
    assert (other - joint).abs().amax() > 1e-3 and (moved - joint).abs().amax() > 1e-3
    with pytest.raises(ValueError, match="unet2d"):
        video.inflate_unet(models.digits_unet())


# --- motion metrics ---------------------------------------------------------------------------


def test_motion_recovers_the_direction_and_speed_of_real_clips(clips):
    m = video.motion(clips.videos)
    straight = clips.motion < 4
    asked = torch.nn.functional.normalize(clips.velocity[straight], dim=-1)
    assert ((m["direction"][straight] * asked).sum(-1) > 0.999).all()
    # A straight clip moves speed * size pixels per frame; rasterising the shape moves its centroid by
    # a fraction of a pixel around that.
    torch.testing.assert_close(m["speed"][straight], clips.velocity[straight].norm(dim=-1), atol=0.2, rtol=0)
    still = clips.motion == MOTIONS.index("colour")
    assert (m["speed"][still] < 1e-4).all() and (m["direction"][still].norm(dim=-1) < 1e-4).all()
    assert (m["max_step"] >= m["speed"] - 1e-6).all()
    torch.testing.assert_close(m["max_step"][straight], m["speed"][straight], atol=0.5, rtol=0)
    lost = clips.videos[:2].clone()
    lost[0, 3] = -1.0  # a frame with no shape
    assert torch.isnan(video.motion(lost)["speed"][0]) and not torch.isnan(video.motion(lost)["speed"][1])
    with pytest.raises(ValueError, match="videos"):
        video.motion(clips.videos[0])


def test_kept_appearance_passes_real_clips_and_fails_fading_shrinking_or_recoloured_ones(clips):
    kept = video.kept_appearance(clips.videos)
    changes = clips.motion == MOTIONS.index("colour")
    assert kept[~changes].all() and not kept[changes].any()
    i = int(torch.nonzero(~changes)[0])
    faded, shrunk, blank = (clips.videos[i:i + 1].clone() for _ in range(3))
    faded[0, 5] = torch.where(faded[0, 5] > -1, faded[0, 5] * 0.2 - 0.6, faded[0, 5])  # faded into the background
    shrunk[0, 6] = torch.where(clips.masks[i, 6].bool() & (torch.rand(32, 32, generator=torch.Generator().manual_seed(0)) < 0.6),
                               -1.0, shrunk[0, 6])  # 60 % of its pixels gone
    blank[0, 2] = -1.0
    for clip in (faded, shrunk, blank):
        assert not video.kept_appearance(clip).item()
    recoloured = clips.videos[i:i + 1].clone()
    recoloured[0, 4] = torch.where(clips.masks[i, 4].bool(), -recoloured[0, 4].flip(0), -1.0)  # another colour
    assert not video.kept_appearance(recoloured).item()
    with pytest.raises(ValueError, match="area_tolerance"):
        video.kept_appearance(clips.videos, area_tolerance=1.5)


def test_colour_names_read_the_colour_each_real_frame_was_drawn_in(clips):
    names = video.colour_names(clips.videos)
    assert names.shape == clips.videos.shape[:2]
    keeps = clips.motion != MOTIONS.index("colour")
    assert torch.equal(names[keeps], clips.colour[keeps, None].expand(-1, clips.videos.shape[1]))
    changes = ~keeps
    assert torch.equal(names[changes, 0], clips.colour[changes]) and torch.equal(names[changes, -1], clips.colour_end[changes])
    blank = clips.videos[:1].clone()
    blank[0, 1] = -1.0
    assert video.colour_names(blank)[0, 1] == -1


# --- the frame-conditional model ----------------------------------------------------------------


def test_frame_context_masks_the_first_frame_and_encodes_the_index():
    prev, like = torch.randn(3, 4, 8, 8), torch.zeros(3, 4, 8, 8)
    ctx = video.frame_context(prev, torch.tensor([0, 1, 7]), 8, like)
    assert ctx.shape == (3, 4 + video.CONTEXT_CHANNELS, 8, 8)
    assert (ctx[0, :4] == 0).all() and torch.equal(ctx[1:, :4], prev[1:])
    assert torch.equal(ctx[:, 4, 0, 0], torch.tensor([0.0, 1.0, 1.0]))
    torch.testing.assert_close(ctx[:, 5, 3, 3], torch.tensor([0.0, 1 / 7, 1.0]))
    assert torch.equal(video.frame_context(None, torch.tensor([0, 0, 0]), 8, like)[:, :5], torch.zeros(3, 5, 8, 8))
    with pytest.raises(ValueError, match="frame"):
        video.frame_context(prev, torch.tensor([0, 1, 8]), 8, like)
    with pytest.raises(ValueError, match="frame"):
        video.frame_context(prev, torch.tensor([0, 1]), 8, like)


def test_frame_pairs_pair_each_frame_with_the_one_before():
    latents, states = torch.randn(3, 5, 4, 8, 8), torch.randn(3, 12, 64)
    x0, st, ctx = video.frame_pairs(latents, states)
    assert x0.shape == (15, 4, 8, 8) and st.shape == (15, 12, 64) and ctx.shape == (15, 6, 8, 8)
    for n in range(3):
        for f in range(5):
            row = n * 5 + f
            assert torch.equal(x0[row], latents[n, f]) and torch.equal(st[row], states[n])
            assert torch.equal(ctx[row, :4], latents[n, f - 1] if f else torch.zeros(4, 8, 8))
            assert ctx[row, 4, 0, 0] == (f > 0)
    with pytest.raises(ValueError, match="states"):
        video.frame_pairs(latents, states[:2])


def _tiny_frame_unet():
    from helpers import models

    torch.manual_seed(0)
    unet2d = models.shapes_unet(widths=(16, 32), head_dim=8).eval()
    return unet2d, video.frame_unet(unet2d).eval()


def test_frame_unet_at_init_is_the_image_unet_whatever_the_context():
    unet2d, unet = _tiny_frame_unet()
    assert unet.config.in_channels == 4 + 4 + video.CONTEXT_CHANNELS and unet2d.config.in_channels == 4
    x, states, t = torch.randn(3, 4, 8, 8), torch.randn(3, 12, 64), torch.tensor([10, 400, 990])
    with torch.no_grad():
        plain = unet2d(x, t, encoder_hidden_states=states).sample
        for context in (torch.zeros(3, 6, 8, 8), 5 * torch.randn(3, 6, 8, 8)):
            out = unet(torch.cat([x, context], 1), t, encoder_hidden_states=states).sample
            torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)
    assert unet2d.conv_in.weight.shape[1] == 4  # the image model itself is untouched


def test_video_models_built_from_a_frozen_image_unet_train_all_their_weights():
    """A trainer's EMA copy has requires_grad off; a video model made from it must still train everywhere."""
    from helpers import models

    torch.manual_seed(0)
    frozen = models.shapes_unet(widths=(32, 64)).requires_grad_(False)
    for model in (video.frame_unet(frozen), video.frame_unet(frozen, context_frames=2), video.inflate_unet(frozen)[0]):
        assert all(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in frozen.parameters())  # the image model keeps its flags


def test_frame_objective_trains_the_context_channels_and_its_loss_falls():
    import helpers
    from helpers import training

    _, unet = _tiny_frame_unet()
    clips = make_clips(24, frames=4, size=32, seed=0)
    latents = torch.nn.functional.avg_pool2d(clips.videos.flatten(0, 1), 4).reshape(24, 4, 3, 8, 8)
    latents = torch.cat([latents, latents[:, :, :1]], 2)  # 4 channels: pooled pixels stand in for latents
    data = video.frame_pairs(latents, torch.zeros(24, 12, 64))
    objective = video.frame_objective(helpers.get_schedule("scaled_linear").alpha_bar, "v_prediction",
                                      torch.zeros(12, 64))
    before = unet.conv_in.weight[:, 4:].detach().clone()
    result = training.train(unet.train(), data, objective, steps=60, batch_size=16, lr=2e-3, warmup_steps=5,
                            ema_decay=None, progress=False)
    assert sum(result.losses[-10:]) / 10 < 0.7 * sum(result.losses[:5]) / 5
    assert (result.model.conv_in.weight[:, 4:] - before).abs().max() > 0  # the model learned to read the context
    with pytest.raises(ValueError, match="cond_dropout"):
        video.frame_objective(torch.ones(10), "epsilon", torch.zeros(12, 64), cond_dropout=1.0)


def test_sample_frames_keeps_the_given_first_frame_and_conditions_on_the_last():
    from diffusers import DDIMScheduler

    _, unet = _tiny_frame_unet()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type="v_prediction")
    states, null = torch.randn(2, 12, 64), torch.zeros(12, 64)
    first = torch.randn(2, 4, 8, 8)
    out = video.sample_frames(unet, scheduler, states, null, first=first, frames=3, guidance_scale=2.0,
                              num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 4, 8, 8) and torch.equal(out[:, 0], first)
    again = video.sample_frames(unet, scheduler, states, null, first=first, frames=3, guidance_scale=2.0,
                                num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    # Make the model depend on the context: then a different first frame changes every later frame.
    with torch.no_grad():
        unet.conv_in.weight[:, 4:8].normal_()
    a = video.sample_frames(unet, scheduler, states, first=first, frames=3, num_inference_steps=3,
                            generator=torch.Generator().manual_seed(0))
    b = video.sample_frames(unet, scheduler, states, first=first + 1, frames=3, num_inference_steps=3,
                            generator=torch.Generator().manual_seed(0))
    assert (a[:, 1] - b[:, 1]).abs().max() > 1e-3
    assert video.sample_frames(unet, scheduler, states, frames=2, num_inference_steps=2).shape == (2, 2, 4, 8, 8)
    with pytest.raises(ValueError, match="first"):
        video.sample_frames(unet, scheduler, states, first=first[:, :, :4], frames=3)
    with pytest.raises(ValueError, match="null_states"):
        video.sample_frames(unet, scheduler, states, guidance_scale=2.0)


def test_sample_frames_with_a_teacher_conditions_each_frame_on_the_real_one_before():
    from diffusers import DDIMScheduler

    _, unet = _tiny_frame_unet()
    with torch.no_grad():
        unet.conv_in.weight[:, 4:8].normal_()  # a model that reads the previous frame
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type="v_prediction")
    states = torch.randn(2, 12, 64)
    teacher = torch.randn(2, 4, 4, 8, 8)

    def forced(real):
        return video.sample_frames(unet, scheduler, states, frames=4, num_inference_steps=3, teacher=real,
                                   generator=torch.Generator().manual_seed(0))

    out = forced(teacher)
    assert torch.equal(out[:, 0], teacher[:, 0])
    # Frame f reads teacher frame f - 1 only: changing real frame 1 changes sampled frame 2 and nothing else.
    other = teacher.clone()
    other[:, 1] += 1
    moved = (forced(other) - out).abs().amax((0, 2, 3, 4))
    assert moved[2] > 1e-3 and moved[[0, 1, 3]].max() == 0, moved
    # Frame 1 given real frame 0 is image-to-video's frame 1 from the same noise.
    free = video.sample_frames(unet, scheduler, states, first=teacher[:, 0], frames=4, num_inference_steps=3,
                               generator=torch.Generator().manual_seed(0))
    assert torch.equal(free[:, :2], out[:, :2]) and (free[:, 2:] - out[:, 2:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="teacher"):
        video.sample_frames(unet, scheduler, states, frames=4, teacher=teacher[:, :3])
    with pytest.raises(ValueError, match="first or teacher"):
        video.sample_frames(unet, scheduler, states, first=teacher[:, 0], frames=4, teacher=teacher)


def test_frame_context_of_several_previous_frames_masks_those_before_the_clip():
    like = torch.zeros(3, 4, 8, 8)
    prev = torch.randn(3, 2, 4, 8, 8)  # frames f - 1 and f - 2
    ctx = video.frame_context(prev, torch.tensor([0, 1, 5]), 8, like)
    assert ctx.shape == (3, 2 * 4 + 2 + 1, 8, 8)
    assert (ctx[0, :8] == 0).all()  # frame 0 sees nothing
    assert torch.equal(ctx[1, :4], prev[1, 0]) and (ctx[1, 4:8] == 0).all()  # frame 1 sees frame 0 only
    assert torch.equal(ctx[2, :8], prev[2].flatten(0, 1))  # frame 5 sees frames 4 and 3
    assert torch.equal(ctx[:, 8:10, 0, 0], torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]))
    torch.testing.assert_close(ctx[:, 10, 2, 2], torch.tensor([0.0, 1 / 7, 5 / 7]))
    assert torch.equal(video.frame_context(None, torch.tensor([0, 0, 0]), 8, like, context_frames=2)[:, :10],
                       torch.zeros(3, 10, 8, 8))
    # One previous frame as (B, 1, C, H, W) is the one-frame layout.
    one = torch.randn(3, 4, 8, 8)
    f = torch.tensor([0, 1, 5])
    assert torch.equal(video.frame_context(one[:, None], f, 8, like), video.frame_context(one, f, 8, like))
    with pytest.raises(ValueError, match="previous"):
        video.frame_context(prev, f, 8, like[:, :3])
    with pytest.raises(ValueError, match="context_frames"):
        video.frame_context(None, f, 8, like, context_frames=0)


def test_frame_pairs_with_two_context_frames_pair_each_frame_with_the_two_before():
    latents, states = torch.randn(2, 4, 4, 8, 8), torch.randn(2, 12, 64)
    x0, _, ctx = video.frame_pairs(latents, states, context_frames=2)
    assert ctx.shape == (8, 11, 8, 8)
    for n in range(2):
        for f in range(4):
            row = n * 4 + f
            for k in range(2):
                expected = latents[n, f - 1 - k] if f - 1 - k >= 0 else torch.zeros(4, 8, 8)
                assert torch.equal(ctx[row, 4 * k:4 * k + 4], expected)
                assert ctx[row, 8 + k, 0, 0] == (f > k)
    with pytest.raises(ValueError, match="context_frames"):
        video.frame_pairs(latents, states, context_frames=4)


def test_a_two_frame_model_starts_as_the_image_model_trains_and_reads_both_frames():
    from diffusers import DDIMScheduler

    import helpers
    from helpers import training

    unet2d, _ = _tiny_frame_unet()
    unet = video.frame_unet(unet2d, context_frames=2)
    assert unet.config.in_channels == 4 + 2 * 5 + 1 and video.context_frames_of(unet) == 2
    assert video.context_frames_of(video.frame_unet(unet2d)) == 1
    with pytest.raises(ValueError, match="input channels"):
        video.context_frames_of(unet2d)
    x, t, states = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 12, 64)
    with torch.no_grad():
        image = unet2d(x, t, encoder_hidden_states=states).sample
        framed = unet(torch.cat([x, torch.randn(2, 11, 8, 8)], 1), t, encoder_hidden_states=states).sample
    torch.testing.assert_close(framed, image)

    clips = make_clips(16, frames=4, size=32, seed=0)
    latents = torch.nn.functional.avg_pool2d(clips.videos.flatten(0, 1), 4).reshape(16, 4, 3, 8, 8)
    latents = torch.cat([latents, latents[:, :, :1]], 2)  # 4 channels: pooled pixels stand in for latents
    data = video.frame_pairs(latents, torch.zeros(16, 12, 64), context_frames=2)
    objective = video.frame_objective(helpers.get_schedule("scaled_linear").alpha_bar, "v_prediction",
                                      torch.zeros(12, 64))
    before = unet.conv_in.weight[:, 4:].detach().clone()
    result = training.train(unet, data, objective, steps=30, batch_size=16, lr=2e-3, warmup_steps=1,
                            ema_decay=None, progress=False, device="cpu")
    assert (result.model.conv_in.weight[:, 4:] - before).abs().max() > 0
    assert sum(result.losses[-10:]) / 10 < sum(result.losses[:5]) / 5

    # Sampling reads the two frames before each one: with a teacher, changing real frame 1
    # changes sampled frames 2 and 3 (which see it as f - 1 and f - 2) and nothing else.
    model = result.model.eval()
    with torch.no_grad():
        model.conv_in.weight[:, 4:12].normal_()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type="v_prediction")
    teacher = torch.randn(2, 5, 4, 8, 8)

    def forced(real):
        return video.sample_frames(model, scheduler, states, frames=5, num_inference_steps=2, teacher=real,
                                   generator=torch.Generator().manual_seed(0))

    other = teacher.clone()
    other[:, 1] += 1
    moved = (forced(other) - forced(teacher)).abs().amax((0, 2, 3, 4))
    assert moved[2] > 1e-3 and moved[3] > 1e-3 and moved[[0, 1, 4]].max() == 0, moved



def test_a_first_frame_model_reads_frame_0_in_every_later_frame():
    from diffusers import DDIMScheduler

    unet2d, _ = _tiny_frame_unet()
    unet = video.frame_unet(unet2d, first_frame=True).eval()
    assert unet.config.in_channels == 4 + 2 * 5 + 1
    assert video.context_frames_of(unet) == 1 and video.first_frame_of(unet)
    assert not video.first_frame_of(video.frame_unet(unet2d, context_frames=2))
    with pytest.raises(ValueError, match="first_frame"):
        video.frame_unet(unet2d, first_frame=1)
    x, t, states = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 12, 64)
    with torch.no_grad():  # starts as the image model, whatever the context
        torch.testing.assert_close(unet(torch.cat([x, torch.randn(2, 11, 8, 8)], 1), t, encoder_hidden_states=states).sample,
                                   unet2d(x, t, encoder_hidden_states=states).sample)

    # Training pairs: slot 1 is frame f - 1, slot 2 is frame 0 where it is not frame f - 1 already (f >= 2).
    latents = torch.randn(3, 5, 4, 8, 8)
    x0, _, ctx = video.frame_pairs(latents, torch.zeros(3, 12, 64), first_frame=True)
    frame = torch.arange(5).repeat(3)
    first = latents[:, :1].expand(-1, 5, -1, -1, -1).flatten(0, 1)
    later = frame >= 2
    assert ctx.shape == (15, 11, 8, 8)
    assert torch.equal(ctx[later, 4:8], first[later]) and ctx[~later, 4:8].abs().max() == 0
    assert torch.equal(ctx[later, 9], torch.ones(int(later.sum()), 8, 8)) and ctx[~later, 9].abs().max() == 0
    assert torch.equal(ctx[frame >= 1, :4], torch.roll(latents, 1, dims=1).flatten(0, 1)[frame >= 1])
    with pytest.raises(ValueError, match="first_frame"):
        video.frame_pairs(latents, torch.zeros(3, 12, 64), first_frame="yes")

    # Sampling: with a teacher, changing real frame 0 moves every sampled frame after it;
    # changing real frame 2 moves only frame 3, the one sampled from it.
    with torch.no_grad():
        unet.conv_in.weight[:, 4:].normal_()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type="v_prediction")
    teacher = torch.randn(2, 5, 4, 8, 8)

    def forced(real):
        return video.sample_frames(unet, scheduler, states, frames=5, num_inference_steps=2, teacher=real,
                                   generator=torch.Generator().manual_seed(0))

    def moved_by(f):
        other = teacher.clone()
        other[:, f] += 1
        return (forced(other) - forced(teacher)).abs().amax((0, 2, 3, 4))

    assert moved_by(0).min() > 1e-3
    two = moved_by(2)
    assert two[3] > 1e-3 and two[[0, 1, 2, 4]].max() == 0, two
    # Image-to-video keeps the given first frame and reads it in every frame.
    first_frame = torch.randn(2, 4, 8, 8)
    a = video.sample_frames(unet, scheduler, states, first=first_frame, frames=4, num_inference_steps=2,
                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(a[:, 0], first_frame) and a.shape == (2, 4, 4, 8, 8)

# --- chapter 9.2's exercise solutions: their code must run against these helpers --------------


def _solution_code(label: str) -> str:
    """The first ```python block of chapter 9.2's solution to exercise ``label``."""
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "chapters" / "09_video_motion.md").read_text()
    solution = page[page.index(f":::{{solution-start}} {label}"):]
    solution = solution[:solution.index(":::{solution-end}")]
    return solution[solution.index("```python\n") + len("```python\n"):].split("\n```", 1)[0]


def _solution_namespace():
    """What the page defines before its exercises, at test size (a tiny U-Net, pooled pixels as latents)."""
    import types

    unet2d, _ = _tiny_frame_unet()
    clips = make_clips(6, frames=4, size=32, seed=0)
    latents = torch.nn.functional.avg_pool2d(clips.videos.flatten(0, 1), 4).reshape(6, 4, 3, 8, 8)
    latents = torch.cat([latents, latents[:, :, :1]], 2)  # 4 channels
    text = types.SimpleNamespace(encode_prompts=lambda encoder, tokenizer, prompts: torch.zeros(len(prompts), 12, 64))
    return {"torch": torch, "video": video, "unet2d": unet2d, "device": torch.device("cpu"), "clips": clips,
            "latents": latents, "text": text, "text_encoder": None, "tokenizer": None}


def _frame_objective():
    import helpers

    return video.frame_objective(helpers.get_schedule("scaled_linear").alpha_bar, "v_prediction", torch.zeros(12, 64))


def test_the_without_anchor_solution_trains_and_samples_a_model_of_the_previous_frame_alone():
    from diffusers import DDIMScheduler

    ns = _solution_namespace()
    exec(_solution_code("ex-09b-anchor"), ns)
    model, (x0, states, context), latents = ns["model_plain"], ns["data_plain"], ns["latents"]
    N, F, C = latents.shape[:3]
    assert video.context_frames_of(model) == 1 and not video.first_frame_of(model)
    assert context.shape == (N * F, C + 2, 8, 8) and model.config.in_channels == 2 * C + 2
    frame = torch.arange(F).repeat(N)
    assert torch.equal(context[frame >= 1, :C], torch.roll(latents, 1, dims=1).flatten(0, 1)[frame >= 1])
    assert torch.isfinite(_frame_objective()(model, (x0, states, context)))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type="v_prediction")
    clip = video.sample_frames(model.eval(), scheduler, torch.zeros(2, 12, 64), first=latents[:2, 0], frames=3,
                               num_inference_steps=2)  # sample_frames needs no change
    assert clip.shape == (2, 3, C, 8, 8)


def test_the_index_solution_makes_the_model_blind_to_the_frame_index():
    import copy

    ns = _solution_namespace()
    exec(_solution_code("ex-09b-index"), ns)
    model = ns["model_no_index"].eval()
    with torch.no_grad():
        model.conv_in.weight.normal_()  # context weights as after training, so the index could matter
    ema = copy.deepcopy(model)  # the trainer's EMA copy keeps the hook
    assert video.first_frame_of(model)  # the page's model, with only the index removed
    x0, states, context = video.frame_pairs(ns["latents"][:2], torch.zeros(2, 12, 64), first_frame=True)
    moved = context.clone()
    moved[:, -1] = 0.5 + moved[:, -1]
    t = torch.full((len(x0),), 500)
    for m in (model, ema):
        with torch.no_grad():
            a = m(torch.cat([x0, context], 1), t, encoder_hidden_states=states).sample
            b = m(torch.cat([x0, moved], 1), t, encoder_hidden_states=states).sample
        assert torch.equal(a, b)
    plain = video.frame_unet(ns["unet2d"], first_frame=True).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.equal(plain(torch.cat([x0, context], 1), t, encoder_hidden_states=states).sample,
                               plain(torch.cat([x0, moved], 1), t, encoder_hidden_states=states).sample)
    assert torch.isfinite(_frame_objective()(model.train(), (x0, states, context)))


def test_the_four_times_solution_gives_the_model_two_previous_frames_and_frame_0():
    from diffusers import DDIMScheduler

    ns = _solution_namespace()
    exec(_solution_code("ex-09b-budget"), ns)
    model, (x0, states, context), latents = ns["model_k2"], ns["data_k2"], ns["latents"]
    N, F, C = latents.shape[:3]
    assert video.context_frames_of(model) == 2 and video.first_frame_of(model)
    assert context.shape == (N * F, 3 * (C + 1) + 1, 8, 8) and model.config.in_channels == C + 3 * (C + 1) + 1
    frame = torch.arange(F).repeat(N)
    frames = latents.flatten(0, 1)
    two_back = torch.roll(latents, 2, dims=1).flatten(0, 1)
    first = latents[:, :1].expand_as(latents).flatten(0, 1)
    assert torch.equal(context[frame >= 2, C:2 * C], two_back[frame >= 2])  # slot 2: frame f - 2
    assert torch.equal(context[frame > 2, 2 * C:3 * C], first[frame > 2])  # slot 3: frame 0, where not already seen
    masks = context[:, 3 * C:3 * C + 3, 0, 0]
    assert torch.equal(masks, torch.stack([frame >= 1, frame >= 2, frame > 2], 1).float())
    assert not torch.equal(frames, two_back)  # the test clips move, so the slots are not trivially equal
    assert torch.isfinite(_frame_objective()(model, (x0, states, context)))
    with torch.no_grad():
        model.conv_in.weight.normal_(std=0.3)  # context weights as after training, so the context matters
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type="v_prediction")
    teacher = latents[:2]
    moved = teacher.clone()
    moved[:, 1] += 1.0  # change real frame 1: frame 3 reads it only through the frame-before-previous slot
    kw = dict(frames=4, num_inference_steps=2)
    a = video.sample_frames(model.eval(), scheduler, torch.zeros(2, 12, 64), teacher=teacher,
                            generator=torch.Generator().manual_seed(0), **kw)
    b = video.sample_frames(model, scheduler, torch.zeros(2, 12, 64), teacher=moved,
                            generator=torch.Generator().manual_seed(0), **kw)
    assert not torch.allclose(a[:, 3], b[:, 3])  # sample_frames passes both previous frames
    assert torch.equal(a[:, 1], b[:, 1])  # frame 1 is made from frame 0 alone
