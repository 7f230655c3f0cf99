"""Properties of the attention functions, checked against their definitions."""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from nystrom_np import (
    exact_pinv,
    iterative_pinv,
    nystrom_attention,
    segment_means,
    softmax,
    softmax_attention,
)


def qkv(b, h, n, d, seed=0, dtype=np.float64, scale=1.0):
    rng = np.random.default_rng(seed)
    return tuple(scale * rng.standard_normal((b, h, n, d)).astype(dtype) for _ in range(3))


def reference_attention(q, k, v, mask=None):
    """Softmax attention written out with explicit loops over batch and head."""
    out = np.empty_like(v)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            s = q[b, h] @ k[b, h].T / np.sqrt(q.shape[-1])
            if mask is not None:
                s[:, ~mask[b]] = -np.inf
            p = np.exp(s - s.max(axis=-1, keepdims=True))
            out[b, h] = (p / p.sum(axis=-1, keepdims=True)) @ v[b, h]
    return out


def test_softmax_attention_matches_definition():
    q, k, v = qkv(2, 3, 11, 8)
    mask = np.ones((2, 11), dtype=bool)
    mask[1, 7:] = False
    np.testing.assert_allclose(
        softmax_attention(q, k, v, mask), reference_attention(q, k, v, mask), atol=1e-12
    )


def test_softmax_rows_sum_to_one_and_survive_large_logits():
    x = np.array([[1000.0, 1001.0, -1000.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    p = softmax(x)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(axis=-1), 1, rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    n=st.integers(1, 24),
    d=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_nystrom_with_every_token_a_landmark_is_exact(b, h, n, d, seed):
    """M = N, exact pseudo-inverse: each landmark is one token, F A^+ Bk = softmax."""
    q, k, v = qkv(b, h, n, d, seed)
    # Round-off grows with the condition number of A = softmax(q k^T / sqrt(D)).
    cond = np.linalg.cond(softmax(q @ k.swapaxes(-1, -2) / np.sqrt(d))).max()
    assume(cond < 1e8)
    got = nystrom_attention(q, k, v, num_landmarks=n, pinv="exact")
    np.testing.assert_allclose(got, softmax_attention(q, k, v), atol=1e-14 * cond + 1e-12)


def test_nystrom_exact_with_padding_when_landmarks_are_the_real_tokens():
    """Equal real lengths L, M = L: the real rows equal masked softmax attention."""
    q, k, v = qkv(2, 2, 12, 4, seed=3)
    mask = np.ones((2, 12), dtype=bool)
    mask[:, 9:] = False
    got = nystrom_attention(q, k, v, mask, num_landmarks=9, pinv="exact")
    want = softmax_attention(q, k, v, mask)
    np.testing.assert_allclose(got[:, :, :9], want[:, :, :9], atol=1e-8)


def test_nystrom_float32_stays_float32():
    q, k, v = qkv(1, 2, 40, 8, dtype=np.float32)
    for pinv in ("iterative", "exact"):
        assert nystrom_attention(q, k, v, num_landmarks=8, pinv=pinv).dtype == np.float32
    assert softmax_attention(q, k, v).dtype == np.float32


def relative_error(approx, exact):
    return np.linalg.norm(approx - exact) / np.linalg.norm(exact)


def test_nystrom_error_falls_as_landmarks_grow():
    """With the paper's 6 iterations; at M = N the exact inverse is exact."""
    q, k, v = qkv(1, 2, 128, 16, seed=1)
    exact = softmax_attention(q, k, v)
    errors = [
        relative_error(nystrom_attention(q, k, v, num_landmarks=m), exact)
        for m in (8, 32, 64, 128)
    ]
    assert errors == sorted(errors, reverse=True), errors
    full = nystrom_attention(q, k, v, num_landmarks=128, pinv="exact")
    assert relative_error(full, exact) < 1e-8


def test_nystrom_is_close_on_flat_attention():
    """Small logits (near-uniform attention): 16 landmarks of 128 tokens are within 2 %."""
    q, k, v = qkv(1, 2, 128, 16, seed=1, scale=0.1)
    exact = softmax_attention(q, k, v)
    assert relative_error(nystrom_attention(q, k, v, num_landmarks=16), exact) < 0.02


def test_per_matrix_init_keeps_samples_independent():
    """The paper's init: a sample's output is the same alone or in any batch."""
    q, k, v = qkv(3, 2, 32, 8, seed=2)
    q[2] *= 4  # a very different sample in the batch
    alone = nystrom_attention(q[:1], k[:1], v[:1], num_landmarks=8, pinv_init="per_matrix")
    batched = nystrom_attention(q, k, v, num_landmarks=8, pinv_init="per_matrix")
    np.testing.assert_allclose(batched[:1], alone, atol=1e-12)


def test_global_init_couples_samples():
    """transformers' init: one scale for the batch, so a sample depends on the others."""
    q, k, v = qkv(3, 2, 32, 8, seed=2)
    q[2] *= 4
    alone = nystrom_attention(q[:1], k[:1], v[:1], num_landmarks=8, pinv_init="global")
    batched = nystrom_attention(q, k, v, num_landmarks=8, pinv_init="global")
    assert np.abs(batched[:1] - alone).max() > 1e-6


def test_iterative_pinv_converges_to_the_pseudo_inverse():
    rng = np.random.default_rng(0)
    a = softmax(rng.standard_normal((2, 3, 10, 10)))
    want = np.linalg.pinv(a)
    np.testing.assert_allclose(iterative_pinv(a, iterations=40), want, atol=1e-8)
    np.testing.assert_allclose(exact_pinv(a), want, atol=1e-8)


def test_exact_pinv_of_a_singular_matrix():
    a = np.array([[1.0, 2.0], [2.0, 4.0]])
    np.testing.assert_allclose(exact_pinv(a), np.linalg.pinv(a), atol=1e-12)


def test_iterative_pinv_rejects_unknown_init():
    with pytest.raises(ValueError, match="init"):
        iterative_pinv(np.eye(3), init="paper")


def test_segment_means_uneven_segments():
    """N = 10, M = 3: segments of 4, 3, 3 tokens (floor(rank * M / N))."""
    x = np.arange(10, dtype=np.float64).reshape(1, 1, 10, 1)
    got = segment_means(x, 3)[0, 0, :, 0]
    np.testing.assert_allclose(got, [1.5, 5.0, 8.0])  # means of 0..3, 4..6, 7..9


def test_segment_means_leave_padding_out():
    x = np.arange(8, dtype=np.float64).reshape(1, 1, 8, 1)
    mask = np.array([[True, True, False, True, True, True, False, False]])  # real: 0 1 3 4 5
    got = segment_means(x, 2, mask)[0, 0, :, 0]
    # 5 real tokens, 2 segments: ranks 0,1,2 -> segment 0 (tokens 0,1,3), ranks 3,4 -> 1 (4,5)
    np.testing.assert_allclose(got, [np.mean([0, 1, 3]), np.mean([4, 5])])


def test_segment_means_equal_segments_match_reshape_mean():
    x = np.random.default_rng(0).standard_normal((2, 3, 12, 5))
    want = x.reshape(2, 3, 4, 3, 5).mean(axis=-2)
    np.testing.assert_allclose(segment_means(x, 4), want, atol=1e-12)


@pytest.mark.parametrize("m", [0, 13])
def test_nystrom_rejects_landmark_counts_outside_one_to_n(m):
    q, k, v = qkv(1, 1, 12, 4)
    with pytest.raises(ValueError, match="num_landmarks"):
        nystrom_attention(q, k, v, num_landmarks=m)


def test_nystrom_rejects_more_landmarks_than_real_tokens():
    q, k, v = qkv(2, 1, 12, 4)
    mask = np.ones((2, 12), dtype=bool)
    mask[1, 5:] = False
    with pytest.raises(ValueError, match="shortest sequence \\(5\\)"):
        nystrom_attention(q, k, v, mask, num_landmarks=6)


def test_nystrom_rejects_unknown_pinv():
    q, k, v = qkv(1, 1, 12, 4)
    with pytest.raises(ValueError, match="pinv"):
        nystrom_attention(q, k, v, num_landmarks=4, pinv="svd")
