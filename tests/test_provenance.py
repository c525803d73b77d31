"""helpers.provenance: nearest-neighbour memorisation tests, invisible watermarks and C2PA manifests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binom

import helpers
from helpers import provenance as pv


def photo(side: int = 256, name: str = "astronaut") -> np.ndarray:
    return pv.to_uint8(helpers.load_photo(name, side))


# --- memorisation ---------------------------------------------------------------------------------

def test_a_copy_of_a_training_image_has_ratio_zero_and_its_index():
    train = torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    queries = torch.cat([train[[3, 11]], torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))])
    ratio = pv.nn_ratio(queries, train)
    assert ratio[:2].tolist() == [0.0, 0.0]
    assert (ratio[2:] > pv.MEMORISED_BELOW).all() and (ratio <= 1).all()
    _, idx = pv.nearest_neighbours(queries[:2], train, k=1)
    assert idx[:, 0].tolist() == [3, 11]


def test_nearest_neighbours_match_a_brute_force_search():
    g = torch.Generator().manual_seed(2)
    queries, train = torch.rand(7, 3, 4, 4, generator=g), torch.rand(30, 3, 4, 4, generator=g)
    d, idx = pv.nearest_neighbours(queries, train, k=3)
    for i in range(len(queries)):
        full = ((train - queries[i]) ** 2).flatten(1).sum(1).double().sqrt()
        order = full.argsort()[:3]
        assert idx[i].tolist() == order.tolist()
        torch.testing.assert_close(d[i], full[order], rtol=1e-6, atol=1e-9)


def test_exclude_self_gives_leave_one_out_distances():
    train = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    d, idx = pv.nearest_neighbours(train, train, k=1, exclude_self=True)
    assert (d[:, 0] > 0).all() and (idx[:, 0] != torch.arange(10)).all()
    assert (pv.nn_ratio(train, train, exclude_self=True) > 0).all()
    with_self, _ = pv.nearest_neighbours(train, train, k=1)
    assert (with_self == 0).all()


def test_memorisation_inputs_are_checked():
    x = torch.zeros(4, 1, 8, 8)
    with pytest.raises(ValueError, match="k must"):
        pv.nearest_neighbours(x, x[:2], k=3)
    with pytest.raises(ValueError, match="k must"):
        pv.nearest_neighbours(x[:2], x[:2], k=2, exclude_self=True)  # only one other image
    with pytest.raises(ValueError, match="same size"):
        pv.nn_ratio(x, torch.zeros(4, 1, 4, 4))
    with pytest.raises(ValueError, match="exclude_self"):
        pv.nn_ratio(x, x[:3], exclude_self=True)
    with pytest.raises(ValueError, match="queries"):
        pv.nn_ratio(np.zeros((4, 64)), x)


# --- watermarks -------------------------------------------------------------------------------------

def test_sdxl_bits_are_diffusers_48_bit_message():
    assert len(pv.SDXL_BITS) == 48
    assert int("".join(map(str, pv.SDXL_BITS)), 2) == 0b101100111110110010010000011110111011000110011110


@pytest.mark.parametrize("method", pv.WATERMARK_METHODS)
def test_an_unattacked_watermark_reads_back_exactly(method):
    image = photo(256)
    marked = pv.embed_watermark(image, pv.SDXL_BITS, method)
    assert marked.shape == image.shape and marked.dtype == np.uint8
    assert 0 < np.abs(marked.astype(int) - image).mean() < 3  # invisible, but there
    assert pv.bit_accuracy(pv.extract_watermark(marked, 48, method)) == 1.0


@pytest.mark.parametrize("method", pv.WATERMARK_METHODS)
def test_embed_is_what_the_library_encoder_does(method):
    """Reference equivalence: imwatermark's public WatermarkEncoder on the same 8-bit pixels (BGR)."""
    from imwatermark import WatermarkDecoder, WatermarkEncoder

    image = photo(256, "chelsea")
    encoder = WatermarkEncoder()
    encoder.set_watermark("bits", list(pv.SDXL_BITS))
    theirs = encoder.encode(np.ascontiguousarray(image[:, :, ::-1]), method)[:, :, ::-1]
    assert np.array_equal(pv.embed_watermark(image, pv.SDXL_BITS, method), theirs)
    read = WatermarkDecoder("bits", 48).decode(np.ascontiguousarray(theirs[:, :, ::-1]), method)
    assert np.array_equal(pv.extract_watermark(np.ascontiguousarray(theirs), 48, method), np.asarray(read, dtype=int))


def test_watermark_capacity_and_the_size_check():
    assert pv.watermark_capacity(256, 256) == 1024 and pv.watermark_capacity(32, 32) == 16
    with pytest.raises(ValueError, match="16 blocks"):
        pv.embed_watermark(photo(32))
    with pytest.raises(ValueError, match="image must be a uint8"):
        pv.embed_watermark(photo(64).astype(np.float32))
    with pytest.raises(ValueError, match="method must"):
        pv.embed_watermark(photo(64), method="rivaGan")
    with pytest.raises(ValueError, match="bits must"):
        pv.embed_watermark(photo(64), bits=[0, 2, 1])
    with pytest.raises(ValueError, match="n_bits"):
        pv.extract_watermark(photo(64), n_bits=0)


@pytest.mark.parametrize("attack", [
    lambda x: pv.jpeg(x, 50), lambda x: pv.rescale(x, 0.5), lambda x: pv.crop(x, 0.8),
    lambda x: pv.gaussian_noise(x, 5.0), lambda x: pv.decode_png(pv.png_bytes(x)),
])
def test_attacks_keep_shape_and_dtype(attack):
    image = photo(96)
    out = attack(image)
    assert out.shape == image.shape and out.dtype == np.uint8


def test_attacks_change_the_image_as_named():
    image = photo(128)
    assert np.array_equal(pv.decode_png(pv.png_bytes(image)), image)  # PNG is lossless
    assert 0 < np.abs(pv.jpeg(image, 30).astype(int) - image).mean() > np.abs(pv.jpeg(image, 90).astype(int) - image).mean()
    noisy = pv.gaussian_noise(image, 4.0, seed=1)
    assert np.array_equal(noisy, pv.gaussian_noise(image, 4.0, seed=1))
    assert 3.0 < (noisy.astype(float) - image).std() < 4.5  # clipping at 0 and 255 trims a little
    flat = np.full((64, 64, 3), 100, np.uint8)
    assert np.array_equal(pv.rescale(flat, 0.5), flat) and np.array_equal(pv.crop(flat, 0.5), flat)


def test_attack_arguments_are_checked():
    image = photo(64)
    for call, name in [(lambda: pv.jpeg(image, 0), "quality"), (lambda: pv.rescale(image, 1.5), "factor"),
                       (lambda: pv.crop(image, 0), "fraction"), (lambda: pv.gaussian_noise(image, -1), "std"),
                       (lambda: pv.jpeg(image.astype(np.int16), 50), "image")]:
        with pytest.raises(ValueError, match=name):
            call()


def test_p_value_is_the_binomial_tail():
    for n in (1, 8, 48):
        for k in range(n + 1):
            assert pv.watermark_p_value(k, n) == pytest.approx(binom.sf(k - 1, n, 0.5), rel=1e-9, abs=1e-300)
    assert pv.watermark_p_value(0, 48) == 1.0 and pv.watermark_p_value(48, 48) == 2.0**-48
    with pytest.raises(ValueError, match="n_match"):
        pv.watermark_p_value(49, 48)
    with pytest.raises(ValueError, match="n_bits"):
        pv.watermark_p_value(3, 4.0)


def test_bit_accuracy():
    assert pv.bit_accuracy([1, 0, 1, 1], [1, 0, 0, 1]) == 0.75
    assert pv.bit_accuracy(np.array(pv.SDXL_BITS, dtype=bool)) == 1.0
    with pytest.raises(ValueError, match="same length"):
        pv.bit_accuracy([1, 0], [1, 0, 1])


def test_to_uint8_rounds_like_diffusers_postprocess():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 3.0]).reshape(1, 3, 1, 2)
    out = pv.to_uint8(x)
    assert out.shape == (1, 1, 2, 3) and out.dtype == np.uint8
    expected = np.round(np.clip(x.numpy() / 2 + 0.5, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.array_equal(out, expected)
    with pytest.raises(ValueError, match="images must"):
        pv.to_uint8(torch.zeros(1, 1, 4, 4))


# --- C2PA -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def signed():
    credentials = pv.make_credentials()
    image = photo(64, "coffee")
    return credentials, image, pv.sign_png(pv.png_bytes(image), credentials, title="test.png")


def test_a_signed_png_reads_back_with_its_manifest(signed):
    credentials, image, data = signed
    assert np.array_equal(pv.decode_png(data), image)  # signing adds a chunk, not a pixel change
    report = pv.read_manifest(data)
    assert report["validation_state"] == "Valid"
    assert [s["code"] for s in report["validation_status"]] == ["signingCredential.untrusted"]
    manifest = report["manifests"][report["active_manifest"]]
    action = manifest["assertions"][0]["data"]["actions"][0]
    assert action["action"] == "c2pa.created" and action["digitalSourceType"] == pv.TRAINED_ALGORITHMIC_MEDIA
    assert manifest["title"] == "test.png"
    assert pv.read_manifest(data, trust_anchor_pem=credentials.ca_pem)["validation_state"] == "Trusted"


def test_edited_pixels_break_the_signature_and_reencoding_strips_it(signed):
    _, image, data = signed
    edited = image.copy()
    edited[10, 10] = 255 - edited[10, 10]
    tampered = pv.replace_pixels(data, edited)
    assert np.array_equal(pv.decode_png(tampered), edited)
    report = pv.read_manifest(tampered)
    assert report["validation_state"] == "Invalid"
    assert "assertion.dataHash.mismatch" in [s["code"] for s in report["validation_status"]]
    assert pv.read_manifest(pv.png_bytes(pv.decode_png(data))) is None  # re-encoded: no manifest
    assert pv.read_manifest(pv.png_bytes(image)) is None
    with pytest.raises(ValueError, match="size"):
        pv.replace_pixels(data, image[:32])


def test_c2pa_inputs_are_checked():
    with pytest.raises(ValueError, match="png must"):
        pv.sign_png(b"GIF89a", pv.make_credentials())
    with pytest.raises(ValueError, match="data must"):
        pv.read_manifest("not bytes")
    with pytest.raises(ValueError, match="data must"):
        pv.decode_png(None)


# --- the skewed data and the subset recipes these measurements train on ------------------------------

def test_colour_bias_skews_only_the_named_shape_and_keeps_everything_else():
    plain = helpers.make_shapes(3000, 16, seed=4)
    skewed = helpers.make_shapes(3000, 16, seed=4, colour_bias={"circle": ("red", 0.85)})
    for attr in ("shape", "position", "size"):
        assert torch.equal(getattr(plain, attr), getattr(skewed, attr))
    circles = skewed.shape == helpers.data.SHAPES.index("circle")
    assert torch.equal(plain.colour[~circles], skewed.colour[~circles])
    assert abs((skewed.colour[circles] == 0).float().mean().item() - 0.85) < 0.03
    others = skewed.colour[circles][skewed.colour[circles] != 0]
    assert set(others.tolist()) == set(range(1, len(helpers.data.COLOURS)))  # the rest share what is left
    assert torch.equal(helpers.make_shapes(50, 16, seed=4, colour_bias=None, omit_words=0.0).images,
                       helpers.make_shapes(50, 16, seed=4).images)


def test_omit_words_leaves_out_words_but_not_labels():
    full = helpers.make_shapes(2000, 16, seed=6)
    vague = helpers.make_shapes(2000, 16, seed=6, omit_words=0.5)
    assert torch.equal(full.images, vague.images) and torch.equal(full.colour, vague.colour)
    for a, b in zip(full.captions, vague.captions):
        assert set(b.split()) <= set(a.split()) and b.split()[0] == "a"
    assert abs(sum(a != b for a, b in zip(full.captions, vague.captions)) / 2000 - (1 - 0.5**3)) < 0.04
    assert "a circle" in vague.captions and "a large red circle" not in full.captions


def test_skew_arguments_are_checked():
    for kwargs, name in [({"colour_bias": {"oval": ("red", 0.5)}}, "colour_bias"),
                         ({"colour_bias": {"circle": ("pink", 0.5)}}, "colour_bias"),
                         ({"colour_bias": {"circle": ("red", 1.5)}}, "colour_bias"),
                         ({"omit_words": 1.0}, "omit_words")]:
        with pytest.raises(ValueError, match=name):
            helpers.make_shapes(10, 16, **kwargs)


def test_training_indices_name_the_digits_a_recipe_trains_on():
    from helpers import zoo

    assert torch.equal(zoo.training_indices("digits_unet"), torch.arange(1797))
    subset = zoo.training_indices("digits_unet_16")
    assert len(subset) == 16 == len(subset.unique()) and torch.equal(subset, zoo.training_indices("digits_unet_16"))
