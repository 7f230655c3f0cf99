"""The building blocks against their plain formulas.

The layers run in place on scratch arrays and fold batches into single products, for
speed (see README, Speed); these tests hold each fast form to the formula it implements,
and check that no function writes into its inputs or into the model's weights.
"""

import math

import numpy as np
import pytest
from cases import leaves

from nystrom_np import Config, forward, random_model
from nystrom_np.attention import nystrom_attention, softmax, softmax_attention
from nystrom_np.layers import depthwise_conv, gelu, gelu_new, layer_norm, linear, relu


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def gelu_new_plain(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 45, 7), (7,)])
def test_gelu_new_equals_its_formula_and_keeps_its_input(rng, shape):
    """(2, 45, 7) has 90 rows: two whole blocks of BLOCK_ROWS and a partial one."""
    x = rng.standard_normal(shape) * 4
    before = x.copy()
    np.testing.assert_allclose(gelu_new(x), gelu_new_plain(x), rtol=1e-14, atol=1e-15)
    np.testing.assert_array_equal(x, before)
    assert gelu_new(x.astype(np.float32)).dtype == np.float32
    view = x.T  # not contiguous: read through a copy, the result is still right
    np.testing.assert_allclose(gelu_new(view), gelu_new_plain(view), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("act", [gelu_new, gelu, relu])
def test_activations_in_place_equal_a_new_array(rng, act):
    x = (rng.standard_normal((2, 45, 7)) * 4).astype(np.float32)
    expected = act(x)
    out = act(x, out=x)
    assert out is x
    np.testing.assert_array_equal(x, expected)  # bit for bit


def test_gelu_new_refuses_an_out_it_cannot_fill_through_a_view(rng):
    x = rng.standard_normal((4, 6))
    with pytest.raises(ValueError, match="C-contiguous"):
        gelu_new(x, out=np.empty((6, 4)).T)


def test_layer_norm_equals_its_formula_and_keeps_its_input(rng):
    x = rng.standard_normal((2, 6, 16)) * 3 + 1
    g, b = rng.standard_normal(16), rng.standard_normal(16)
    before = x.copy()
    plain = g * (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) + b
    np.testing.assert_allclose(layer_norm(x, g, b, 1e-5), plain, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(x, before)
    x32 = x.astype(np.float32)
    assert layer_norm(x32, g.astype(np.float32), b.astype(np.float32), 1e-5).dtype == np.float32


def test_linear_folds_the_batch_into_one_product(rng):
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


@pytest.mark.parametrize("n, k, block", [(1, 3, 64), (7, 5, 4), (64, 65, 64), (130, 65, 64),
                                         (33, 9, 8), (5, 65, 16)])
def test_depthwise_conv_matches_shifted_adds(n, k, block):
    rng = np.random.default_rng(n + k)
    v = rng.standard_normal((2, 3, n, 4))
    w = rng.standard_normal((3, k))
    np.testing.assert_allclose(depthwise_conv(v, w, block=block), conv_reference(v, w),
                               atol=1e-12)
