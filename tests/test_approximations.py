"""Tests of nystrom_lab.approximations: limits, the Eckart-Young floor, masks, shapes, errors."""

import numpy as np
import pytest

from nystrom_lab import approximations as ap
from nystrom_np import nystrom_attention, softmax_attention

B, H, N, D = 2, 3, 48, 8
REAL = 37  # real tokens of the second sample; the first has no padding
TOL = {np.float32: 1e-6, np.float64: 1e-12}


def inputs(dtype=np.float64, scale=1.0, seed=0, dv=D):
    rng = np.random.default_rng(seed)
    q, k = (scale * rng.standard_normal((B, H, N, D)) for _ in range(2))
    v = rng.standard_normal((B, H, N, dv))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def padding_mask():
    mask = np.ones((B, N), dtype=bool)
    mask[1, REAL:] = False
    return mask


# budget-taking methods, called as fn(q, k, v, mask, budget)
METHODS = {
    "linformer": (ap.linformer_attention, 12),
    "performer": (ap.performer_attention, 64),
    "window": (ap.window_attention, 10),
    "blocked": (ap.blocked_attention, 7),
    "svd": (ap.svd_attention, 6),
    "nystrom": (nystrom_attention, 6),
}
MATRICES = {
    "linformer": (ap.linformer_attention, ap.linformer_matrix, 12),
    "performer": (ap.performer_attention, ap.performer_matrix, 64),
    "window": (ap.window_attention, ap.window_matrix, 10),
    "svd": (ap.svd_attention, ap.svd_matrix, 6),
    "nystrom": (nystrom_attention, ap.nystrom_matrix, 6),
}


# ---------------------------------------------------------------- limits: exact attention


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("block", [1, 7, 16, N, 100])
def test_blocked_attention_is_exact(dtype, block):
    q, k, v = inputs(dtype)
    mask = padding_mask()
    out = ap.blocked_attention(q, k, v, mask, block)
    assert out.dtype == dtype
    np.testing.assert_allclose(out, softmax_attention(q, k, v, mask), rtol=0, atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("block", [None, 5, N])
def test_window_of_full_width_is_exact(dtype, block):
    q, k, v = inputs(dtype)
    mask = padding_mask()
    out = ap.window_attention(q, k, v, mask, N, block=block)
    np.testing.assert_allclose(out, softmax_attention(q, k, v, mask), rtol=0, atol=TOL[dtype])


def test_linformer_with_identity_projections_is_exact():
    q, k, v = inputs()
    eye = np.eye(N)
    out = ap.linformer_attention(q, k, v, projections=(eye, eye))
    np.testing.assert_allclose(out, softmax_attention(q, k, v), rtol=0, atol=1e-12)


def test_svd_of_full_rank_is_exact():
    q, k, v = inputs()
    np.testing.assert_allclose(
        ap.svd_attention(q, k, v, None, N), softmax_attention(q, k, v), rtol=0, atol=1e-12
    )


def test_nystrom_matrix_with_every_landmark_and_exact_pinv_is_exact():
    q, k, _ = inputs(scale=0.5)
    approx = ap.nystrom_matrix(q, k, None, N, pinv="exact")
    np.testing.assert_allclose(approx, ap.exact_matrix(q, k), rtol=0, atol=1e-8)


def test_performer_error_falls_with_features_on_flat_attention():
    # Flat attention (small logits): the estimator's variance is small and falls as 1/R. A
    # biased feature draw (e.g. a QR without the sign fix) stalls at a floor instead (0.046
    # here from R = 4096 on).
    q, k, v = inputs(scale=0.3)
    exact = softmax_attention(q, k, v)
    errors = [
        float(ap.relative_error(ap.performer_attention(q, k, v, None, r, seed=1), exact).mean())
        for r in (16, 256, 4096, 16384)
    ]
    assert all(a > b for a, b in zip(errors[:-1], errors[1:], strict=True)), errors
    assert errors[-1] < 0.01, errors
    assert errors[0] / errors[-1] > 15, errors  # ~sqrt(16384 / 16) = 32 for an unbiased draw


def test_performer_features_are_orthogonal_blocks_with_gaussian_marginals():
    w = ap.performer_features(2000 * D, D, seed=0)  # (R, D)
    block = w[:D] / np.linalg.norm(w[:D], axis=1, keepdims=True)
    np.testing.assert_allclose(block @ block.T, np.eye(D), atol=1e-12)
    # every direction ~ N(0, I): mean 0, covariance I (to sampling error ~ 1/sqrt(R))
    np.testing.assert_allclose(w.mean(axis=0), 0, atol=0.05)
    np.testing.assert_allclose(np.cov(w.T), np.eye(D), atol=0.05)


def test_linformer_projections_are_seeded_gaussians_of_variance_one_over_p():
    e, f = ap.linformer_projections(400, 50, seed=3)
    assert e.shape == f.shape == (50, 400)
    assert abs(e.var() * 50 - 1) < 0.05 and abs(e.mean()) < 0.01
    np.testing.assert_array_equal(e, ap.linformer_projections(400, 50, seed=3)[0])
    assert not np.allclose(e, ap.linformer_projections(400, 50, seed=4)[0])


# ----------------------------------------------------------------- the Eckart-Young floor


@pytest.mark.parametrize("rank", [2, 4, 8, 16])
def test_svd_is_the_floor_for_every_low_rank_method(rank):
    q, k, _ = inputs(scale=1.0, seed=5)
    exact = ap.exact_matrix(q, k)
    floor = ap.relative_error(ap.svd_matrix(q, k, None, rank), exact)  # (B, H)
    assert np.linalg.matrix_rank(ap.svd_matrix(q, k, None, rank)[0, 0]) <= rank
    for approx in (
        ap.nystrom_matrix(q, k, None, rank),
        ap.nystrom_matrix(q, k, None, rank, pinv="exact"),
        ap.linformer_matrix(q, k, None, rank),
        ap.performer_matrix(q, k, None, rank),
    ):
        assert np.all(floor <= ap.relative_error(approx, exact) + 1e-12)


def test_svd_error_falls_with_rank_to_zero():
    q, k, _ = inputs()
    exact = ap.exact_matrix(q, k)
    errors = [float(ap.relative_error(ap.svd_matrix(q, k, None, m), exact).max())
              for m in (1, 4, 16, N)]
    assert all(a > b for a, b in zip(errors[:-1], errors[1:], strict=True)) and errors[-1] < 1e-12


# -------------------------------------------------------------- windows: the band itself


@pytest.mark.parametrize("width", [1, 2, 7, 10, N - 1])
def test_window_matrix_is_a_band_of_exactly_width_keys(width):
    q, k, v = inputs()
    p = ap.window_matrix(q, k, None, width, block=9)
    band = np.zeros((N, N), dtype=bool)
    for i in range(N):
        first = min(max(i - width // 2, 0), N - width)
        band[i, first : first + width] = True
    assert band.sum(axis=1).tolist() == [width] * N
    assert np.all(p[..., ~band] == 0)
    np.testing.assert_allclose(p.sum(axis=-1), 1, atol=1e-12)
    scores = np.where(band, ap.exact_matrix(q, k), 0)  # softmax restricted to the band
    np.testing.assert_allclose(p, scores / scores.sum(-1, keepdims=True), atol=1e-12)


# ---------------------------------------------------- matrices agree with their outputs


@pytest.mark.parametrize("name", sorted(MATRICES))
def test_matrix_times_v_is_the_output(name):
    attention, matrix, budget = MATRICES[name]
    q, k, v = inputs()
    mask = padding_mask()
    np.testing.assert_allclose(
        matrix(q, k, mask, budget) @ v, attention(q, k, v, mask, budget), rtol=0, atol=1e-10
    )


def test_exact_matrix_times_v_is_softmax_attention():
    q, k, v = inputs()
    mask = padding_mask()
    np.testing.assert_allclose(
        ap.exact_matrix(q, k, mask) @ v, softmax_attention(q, k, v, mask), atol=1e-12
    )


# -------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("name", sorted(METHODS))
def test_padded_tokens_do_not_change_real_rows(name):
    fn, budget = METHODS[name]
    q, k, v = inputs()
    mask = padding_mask()
    out = fn(q, k, v, mask, budget)
    rng = np.random.default_rng(9)
    k2, v2, q2 = k.copy(), v.copy(), q.copy()
    k2[1, :, REAL:] = 10 * rng.standard_normal(k2[1, :, REAL:].shape)
    v2[1, :, REAL:] = 100.0
    q2[1, :, REAL:] = 10 * rng.standard_normal(q2[1, :, REAL:].shape)
    out2 = fn(q2, k2, v2, mask, budget)
    np.testing.assert_allclose(out2[1, :, :REAL], out[1, :, :REAL], rtol=0, atol=1e-12)
    np.testing.assert_allclose(out2[0], out[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(MATRICES))
def test_padded_keys_get_no_weight(name):
    _, matrix, budget = MATRICES[name]
    q, k, _ = inputs()
    p = matrix(q, k, padding_mask(), budget)
    assert np.abs(p[1, :, :REAL, REAL:]).max() < 1e-12


# ---------------------------------------------------------------------- shapes, dtypes


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_shape_and_dtype_follow_the_inputs(name, dtype):
    fn, budget = METHODS[name]
    q, k, v = inputs(dtype, dv=5)  # values may be narrower than q and k
    out = fn(q, k, v, padding_mask(), budget)
    assert out.shape == (B, H, N, 5)
    assert out.dtype == dtype
    assert np.isfinite(out).all()


def test_float32_performer_survives_peaked_attention():
    q, k, v = inputs(np.float32, scale=4.0)  # logits up to ~100: exp would overflow unshifted
    out = ap.performer_attention(q, k, v, padding_mask(), 256)
    assert np.isfinite(out).all()


def test_seeds_make_random_methods_repeatable():
    q, k, v = inputs()
    for fn in (ap.linformer_attention, ap.performer_attention):
        np.testing.assert_array_equal(fn(q, k, v, None, 16, seed=2), fn(q, k, v, None, 16, seed=2))
        assert not np.allclose(fn(q, k, v, None, 16, seed=2), fn(q, k, v, None, 16, seed=3))


def test_relative_error_per_head_over_real_rows():
    q, k, v = inputs()
    mask = padding_mask()
    exact = softmax_attention(q, k, v, mask)
    approx = 1.1 * exact
    approx[1, :, REAL:] = 1e6  # padded query rows are not counted
    np.testing.assert_allclose(ap.relative_error(approx, exact, mask), np.full((B, H), 0.1))


# ------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "call",
    [
        lambda q, k, v, m: ap.window_attention(q, k, v, m, 0),
        lambda q, k, v, m: ap.window_attention(q, k, v, m, N + 1),
        lambda q, k, v, m: ap.window_attention(q, k, v, m, 4, block=0),
        lambda q, k, v, m: ap.blocked_attention(q, k, v, m, 0),
        lambda q, k, v, m: ap.svd_attention(q, k, v, m, 0),
        lambda q, k, v, m: ap.svd_attention(q, k, v, m, N + 1),
        lambda q, k, v, m: ap.linformer_attention(q, k, v, m),
        lambda q, k, v, m: ap.linformer_attention(q, k, v, m, 0),
        lambda q, k, v, m: ap.linformer_attention(q, k, v, m, projections=(np.eye(N - 1),) * 2),
        lambda q, k, v, m: ap.linformer_attention(q, k, v, m, 5, projections=(np.eye(N),) * 2),
        lambda q, k, v, m: ap.performer_attention(q, k, v, m, 0),
        lambda q, k, v, m: ap.performer_attention(q, k, v, m, features=np.ones((4, D + 1))),
        lambda q, k, v, m: ap.blocked_attention(q, k[..., :-1, :], v, m),
        lambda q, k, v, m: ap.blocked_attention(q, k, v[:, :, :-1], m),
        lambda q, k, v, m: ap.blocked_attention(q[0], k[0], v[0], m),
        lambda q, k, v, m: ap.blocked_attention(q, k, v, m[:, :-1]),
        lambda q, k, v, m: ap.blocked_attention(q, k, v, m.astype(int)),
        lambda q, k, v, m: ap.blocked_attention(q, k, v, m & False),
        lambda q, k, v, m: ap.relative_error(v, v[..., :-1]),
    ],
)
def test_bad_arguments_raise_value_error(call):
    q, k, v = inputs()
    with pytest.raises(ValueError):
        call(q, k, v, padding_mask())


# ---------------------------------------------------------------------------------- GPU


def _gpu():
    try:
        import cupy

        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:  # no CuPy, or no driver / device
        return None


@pytest.mark.skipif(_gpu() is None, reason="needs CuPy and a GPU")
@pytest.mark.parametrize("name", sorted(METHODS))
def test_gpu_matches_cpu(name):
    cupy = _gpu()
    fn, budget = METHODS[name]
    q, k, v = inputs()
    mask = padding_mask()
    out = fn(*(cupy.asarray(a) for a in (q, k, v, mask)), budget)
    assert isinstance(out, cupy.ndarray)
    np.testing.assert_allclose(out.get(), fn(q, k, v, mask, budget), rtol=0, atol=1e-10)
