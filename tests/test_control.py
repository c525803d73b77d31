"""Tests of helpers.control: Canny edges, edge agreement, the ControlNet copy and its loss, recolouring; LoRA maths."""

import pytest
import torch

from helpers import control, get_schedule, models, training
from helpers.data import make_shapes


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return models.shapes_unet().eval()  # random weights: the properties below hold for any weights


# --- Canny edges and their agreement ---------------------------------------------------------------


def test_canny_finds_the_drawn_outline():
    shapes = make_shapes(40, 32, seed=1)
    edges = control.canny_edges(shapes.images, sigma=1.0)
    assert edges.shape == (40, 1, 32, 32) and edges.dtype == torch.float32
    assert set(edges.unique().tolist()) <= {0.0, 1.0}
    # Within a pixel of make_shapes' own outline, nearly everywhere (Canny sits on the boundary).
    f1 = control.edge_agreement(edges, shapes.edges, tolerance=1)["f1"]
    assert f1.mean() > 0.9, f1
    assert control.canny_edges(torch.zeros(2, 3, 16, 16)).sum() == 0  # a flat image has no edges


def test_canny_rejects_bad_input():
    with pytest.raises(ValueError, match="images"):
        control.canny_edges(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="sigma"):
        control.canny_edges(torch.zeros(1, 3, 8, 8), sigma=0)


def test_edge_agreement_tolerance():
    target = torch.zeros(1, 1, 16, 16)
    target[0, 0, 4:12, 8] = 1  # a vertical line
    shifted = torch.roll(target, 1, dims=-1)  # one pixel to the right
    assert control.edge_agreement(target, target, tolerance=0)["f1"].item() == 1.0
    assert control.edge_agreement(shifted, target, tolerance=0)["f1"].item() == 0.0
    assert control.edge_agreement(shifted, target, tolerance=1)["f1"].item() == 1.0
    far = torch.roll(target, 5, dims=-1)
    assert control.edge_agreement(far, target, tolerance=1)["f1"].item() == 0.0
    assert control.edge_agreement(torch.zeros_like(target), target)["f1"].item() == 0.0  # empty: 0, not NaN
    with pytest.raises(ValueError, match="tolerance"):
        control.edge_agreement(target, target, tolerance=-1)
    with pytest.raises(ValueError, match="edges and target"):
        control.edge_agreement(target, target[:, :, :8])


# --- ControlNet ------------------------------------------------------------------------------------


def test_untrained_controlnet_is_an_exact_noop(unet):
    controlnet = control.controlnet_from_unet(unet, conditioning_embedding_out_channels=(16, 32, 64)).eval()
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 990])
    states, cond = torch.randn(3, 12, 64), torch.rand(3, 3, 32, 32)  # a 32-px control for an 8x8 latent
    with torch.no_grad():
        down, mid = controlnet(x, t, encoder_hidden_states=states, controlnet_cond=cond, return_dict=False)
        plain = unet(x, t, encoder_hidden_states=states).sample
        steered = unet(x, t, encoder_hidden_states=states, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid).sample
    assert all(not r.any() for r in [*down, mid])  # the zero convolutions output exactly zero
    assert torch.equal(plain, steered)  # so the U-Net's output is bit-for-bit unchanged


def test_controlnet_copy_computes_what_the_unet_computes(unet):
    controlnet = control.controlnet_from_unet(unet)
    states = torch.randn(2, 12, 64)
    with torch.no_grad():  # the text pooling: same weights *and* same heads as the U-Net
        torch.testing.assert_close(controlnet.add_embedding(states), unet.add_embedding(states))
    assert controlnet.config.addition_embed_type_num_heads == unet.config.addition_embed_type_num_heads
    for a, b in zip(controlnet.down_blocks.parameters(), unet.down_blocks.parameters()):
        assert torch.equal(a, b)


def test_controlnet_objective_trains_only_the_controlnet(unet):
    torch.manual_seed(0)
    x0 = torch.randn(8, 4, 8, 8)
    states = torch.randn(8, 12, 64)
    # The control determines x0 (its mean), so the ControlNet has something to learn from.
    cond = x0.mean(1, keepdim=True).repeat_interleave(4, -1).repeat_interleave(4, -2).expand(-1, 3, -1, -1).sigmoid()
    controlnet = control.controlnet_from_unet(unet)
    objective = control.controlnet_objective(unet, get_schedule("scaled_linear").alpha_bar, "v_prediction",
                                             text_dropout=0.5, null_states=torch.zeros(12, 64))
    unet_before = {k: v.clone() for k, v in unet.state_dict().items()}

    def mean_loss(model):
        torch.manual_seed(1)
        with torch.no_grad():
            return sum(objective(model, (x0, states, cond)).item() for _ in range(8)) / 8

    before = mean_loss(controlnet)
    result = training.train(controlnet, (x0, states, cond), objective, steps=25, batch_size=8, lr=2e-3,
                            ema_decay=None, warmup_steps=5, progress=False)
    assert mean_loss(result.model.eval()) < before
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in unet_before.items())  # the U-Net is frozen
    with pytest.raises(ValueError, match="null_states"):
        control.controlnet_objective(unet, get_schedule("scaled_linear").alpha_bar, text_dropout=0.5)


# --- recolouring and LoRA ---------------------------------------------------------------------------


def test_recolour_paints_the_mask():
    shapes = make_shapes(5, 32, seed=2)
    images = control.recolour(shapes.masks, (1.0, 0.5, 0.0))
    inside = shapes.masks.bool().expand(-1, 3, -1, -1)
    expected = torch.tensor([1.0, 0.0, -1.0])[None, :, None, None].expand_as(images)  # (1, 0.5, 0) in [-1, 1]
    assert torch.equal(images[inside], expected[inside]) and (images[~inside] == -1).all()
    with pytest.raises(ValueError, match="rgb"):
        control.recolour(shapes.masks, (2.0, 0.0, 0.0))


def test_lora_layer_is_the_low_rank_update(unet):
    from peft import LoraConfig

    adapted = models.shapes_unet()
    adapted.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_k", "to_out.0"]))
    layers = [m for m in adapted.modules() if hasattr(m, "lora_A")]
    # Trainable parameters are exactly r (d_in + d_out) per adapted layer.
    assert models.count_parameters(adapted, trainable_only=True) == sum(4 * (m.in_features + m.out_features) for m in layers)
    layer = layers[-1]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # B starts at zero; make the update visible
        x = torch.randn(3, layer.in_features)
        W, A, B = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
        bias = 0 if layer.base_layer.bias is None else layer.base_layer.bias
        torch.testing.assert_close(layer(x), x @ (W + (8 / 4) * B @ A).T + bias)
