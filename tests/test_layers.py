"""The building blocks against their plain formulas.

Two steps of the forward are not written as their formula, for speed (each says why, with
its figure from benchmarks/tricks.py): the conv skip is a banded product and the
activation runs in blocks of rows. These tests hold them, and every other block, to the
formula, and check that no function writes into its inputs or into the model's weights.
"""

import math

import numpy as np
import pytest
from cases import leaves

from nystrom_np import Config, forward, random_model
from nystrom_np.model import (
    depthwise_conv,
    encoder_layer,
    gelu,
    gelu_new,
    layer_norm,
    linear,
    nystrom_attention,
    softmax,
    softmax_attention,
)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def gelu_new_plain(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize("shape", [(3, 5, 7), (7,)])
def test_gelu_new_equals_its_formula_and_keeps_its_input(rng, shape):
    x = rng.standard_normal(shape) * 4
    before = x.copy()
    np.testing.assert_allclose(gelu_new(x), gelu_new_plain(x), rtol=1e-14, atol=1e-15)
    np.testing.assert_array_equal(x, before)
    assert gelu_new(x.astype(np.float32)).dtype == np.float32


def test_layer_norm_equals_its_formula_and_keeps_its_input(rng):
    x = rng.standard_normal((2, 6, 16)) * 3 + 1
    g, b = rng.standard_normal(16), rng.standard_normal(16)
    before = x.copy()
    plain = g * (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) + b
    np.testing.assert_allclose(layer_norm(x, g, b, 1e-5), plain, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(x, before)
    x32 = x.astype(np.float32)
    assert layer_norm(x32, g.astype(np.float32), b.astype(np.float32), 1e-5).dtype == np.float32


def test_linear_is_x_w_plus_b(rng):
    x = rng.standard_normal((3, 4, 5))
    w, b = rng.standard_normal((5, 6)), rng.standard_normal(6)
    np.testing.assert_allclose(linear(x, w, b), np.einsum("bni,io->bno", x, w) + b, atol=1e-13)
    np.testing.assert_allclose(linear(x[0, 0], w, b), x[0, 0] @ w + b, atol=1e-13)  # 1-D
    x_view = x.transpose(1, 0, 2)  # not contiguous
    np.testing.assert_allclose(linear(x_view, w, b), x_view @ w + b, atol=1e-13)


def test_softmax_in_place_equals_a_new_array(rng):
    x = rng.standard_normal((2, 3, 4, 5)) * 10
    expected = np.exp(x - x.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    before = x.copy()
    np.testing.assert_allclose(softmax(x), expected, rtol=1e-14)
    np.testing.assert_array_equal(x, before)  # a new array by default
    out = softmax(x, out=x)
    assert out is x
    np.testing.assert_allclose(x, expected, rtol=1e-14)


def test_attention_keeps_its_inputs(rng):
    q, k, v = (rng.standard_normal((2, 3, 12, 4)) for _ in range(3))
    mask = np.ones((2, 12), bool)
    mask[1, 9:] = False
    copies = [a.copy() for a in (q, k, v)]
    softmax_attention(q, k, v, mask)
    nystrom_attention(q, k, v, mask, num_landmarks=3)
    depthwise_conv(v, rng.standard_normal((3, 5)))
    for a, before in zip((q, k, v), copies, strict=True):
        np.testing.assert_array_equal(a, before)


def test_gelu_is_the_exact_erf_form(rng):
    from scipy.special import erf

    x = rng.standard_normal(50) * 3
    np.testing.assert_allclose(gelu(x), 0.5 * x * (1 + erf(x / math.sqrt(2))), rtol=1e-14)


def test_forward_does_not_write_into_the_model(rng):
    config = Config.from_dict(dict(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=24,
                                   max_position_embeddings=20, conv_kernel_size=3))
    model = random_model(config, seed=3)
    before = [a.copy() for a in leaves(model.params)]
    forward(model, rng.integers(0, 50, (2, 9)), attention="nystrom", num_landmarks=3)
    forward(model, rng.integers(0, 50, (2, 9)))
    for a, b in zip(leaves(model.params), before, strict=True):
        np.testing.assert_array_equal(a, b)


def conv_reference(v, w):
    """out[b, h, n] = sum_t w[h, t] v[b, h, n + t - K // 2], with K shifted adds."""
    k = w.shape[1]
    n = v.shape[2]
    padded = np.pad(v, ((0, 0), (0, 0), (k // 2, k // 2), (0, 0)))
    return sum(w[None, :, t, None, None] * padded[:, :, t : t + n] for t in range(k))


@pytest.mark.parametrize("n, k", [(1, 3), (7, 5), (16, 1), (17, 3), (64, 65), (130, 65),
                                  (33, 9), (5, 65)])
def test_depthwise_conv_matches_shifted_adds(n, k):
    """Lengths below, at and past whole blocks of 16 outputs; K from 1 to longer than N."""
    rng = np.random.default_rng(n + k)
    v = rng.standard_normal((2, 3, n, 4))
    w = rng.standard_normal((3, k))
    np.testing.assert_allclose(depthwise_conv(v, w), conv_reference(v, w), atol=1e-12)


@pytest.mark.parametrize("mask_row", [None, 70])
def test_encoder_layer_equals_its_plain_formulas(rng, mask_row):
    """One layer against a reference written from the formulas with whole arrays: the conv
    as K shifted adds, GELU on all 2 x 75 = 150 rows at once (the layer takes them in
    blocks of 64), separate q, k and v products."""
    config = Config.from_dict(dict(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=24,
                                   max_position_embeddings=80, conv_kernel_size=5))
    layer = random_model(config, seed=4, dtype=np.float64).params["layers"][0]
    x = rng.standard_normal((2, 75, 16))
    mask = None
    if mask_row is not None:
        mask = np.ones((2, 75), bool)
        mask[1, mask_row:] = False

    def heads(t):  # (B, N, C) -> (B, H, N, D)
        return t.reshape(2, 75, 2, 8).transpose(0, 2, 1, 3)

    def norm(t, p):
        centred = t - t.mean(-1, keepdims=True)
        return centred / np.sqrt(t.var(-1, keepdims=True) + 1e-5) * p["g"] + p["b"]

    w, b = layer["qkv"]["w"], layer["qkv"]["b"]
    q, k, v = (heads(x @ w[:, i * 16 : (i + 1) * 16] + b[i * 16 : (i + 1) * 16])
               for i in range(3))
    scores = q @ k.swapaxes(-1, -2) / np.sqrt(8)
    if mask is not None:
        scores = np.where(mask[:, None, None, :], scores, -np.inf)
    context = softmax(scores) @ v + conv_reference(v, layer["conv"])
    context = context.transpose(0, 2, 1, 3).reshape(2, 75, 16)
    a = norm(x + context @ layer["attention_output"]["w"] + layer["attention_output"]["b"],
             layer["attention_ln"])
    hidden = gelu_new_plain(a @ layer["intermediate"]["w"] + layer["intermediate"]["b"])
    want = norm(a + hidden @ layer["output"]["w"] + layer["output"]["b"], layer["output_ln"])
    got = encoder_layer(x, mask, layer, config, attention="exact")
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
