"""Softmax attention and its Nystrom approximation.

Shapes: B batch, H heads, N tokens, M landmarks, D head size.
A key mask is a (B, N) boolean array, True for real tokens and False for padding.

References: Xiong et al., "Nystromformer: A Nystrom-Based Algorithm for Approximating
Self-Attention", AAAI 2021 (arXiv 2102.03902), section 3 and eq. (15); the iterative
pseudo-inverse of Razavi et al. 2014, as the paper uses it.

Every function here takes q and k *unscaled* and gives each a factor D^(-1/4), so that
q k^T carries the 1/sqrt(D) of scaled dot-product attention. Splitting the factor between
the two sides is what transformers does; it matters for the landmark path, whose segment
means are taken of the scaled q and k, and it keeps float32 round-off equal to its.
"""

import math

from .backend import get_xp


def softmax(x, axis=-1, out=None):
    """exp(x) / sum(exp(x)) along ``axis``, shifted by the maximum for stability.

    ``out`` is where the result goes (a new array by default); ``out=x`` works in place,
    which the attention functions do on their own score arrays, the largest of the model.
    """
    xp = get_xp(x)
    e = xp.subtract(x, x.max(axis=axis, keepdims=True), out=out)
    xp.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


def scale_qk(q, k):
    """q / D^(1/4), k / D^(1/4): together the 1/sqrt(D) of the scores."""
    scale = math.sqrt(math.sqrt(q.shape[-1]))
    return q / scale, k / scale


def mask_bias(mask, dtype):
    """Additive key mask: 0 for real keys, the most negative finite float for padding.

    (B, N) bool -> (B, 1, 1, N), broadcasting over heads and queries. A finite value (not
    -inf) keeps a row of only padded keys finite, as transformers does.
    """
    xp = get_xp(mask)
    return xp.where(mask, 0, xp.finfo(dtype).min).astype(dtype)[:, None, None, :]


def softmax_attention(q, k, v, mask=None):
    """Exact attention softmax(q k^T / sqrt(D) + mask) v, with its N x N score matrix.

    Parameters
    ----------
    q, k, v : (B, H, N, D)
    mask : (B, N) bool or None; False keys get no weight

    Returns
    -------
    (B, H, N, D)
    """
    q, k = scale_qk(q, k)
    scores = q @ k.swapaxes(-1, -2)  # (B, H, N, D) @ (B, H, D, N) -> (B, H, N, N)
    if mask is not None:
        scores += mask_bias(mask, scores.dtype)
    weights = softmax(scores, out=scores)  # in place: one N x N array per head, not three
    return weights @ v  # (B, H, N, N) @ (B, H, N, D) -> (B, H, N, D)


def segment_means(x, num_segments, mask=None):
    """Landmarks: means of ``num_segments`` contiguous segments of the real tokens.

    Token n of a row with L real tokens falls in segment floor(rank(n) * M / L), where
    rank counts real tokens only. So padded tokens are left out, and N (or L) need not be
    a multiple of M: segments then differ in length by at most one token. With no padding
    and M dividing N these are the paper's equal segments of N / M tokens.

    Parameters
    ----------
    x : (B, H, N, D)
    num_segments : M, at most the number of real tokens of every row
    mask : (B, N) bool or None (None: every token is real)

    Returns
    -------
    (B, H, M, D)
    """
    xp = get_xp(x)
    b, h, n, d = x.shape
    if mask is None and n % num_segments == 0:
        # Equal segments of N / M tokens: a reshape and a mean (transformers' own way), far
        # cheaper than the (M, N) weight matrix below, which handles every other case.
        return x.reshape(b, h, num_segments, n // num_segments, d).mean(axis=-2)
    if mask is None:
        mask = xp.ones((b, n), dtype=bool)
    lengths = mask.sum(axis=-1, keepdims=True)  # (B, 1)
    rank = xp.cumsum(mask, axis=-1) - 1  # (B, N): index of each token among the real ones
    segment = rank * num_segments // xp.maximum(lengths, 1)  # (B, N)
    member = (segment[:, :, None] == xp.arange(num_segments)) & mask[:, :, None]  # (B, N, M)
    weights = member / xp.maximum(member.sum(axis=1, keepdims=True), 1)  # (B, N, M)
    weights = weights.astype(x.dtype).swapaxes(-1, -2)[:, None]  # (B, N, M) -> (B, 1, M, N)
    return weights @ x  # (B, 1, M, N) @ (B, H, N, D) -> (B, H, M, D)


def iterative_pinv(a, iterations=6, init="per_matrix"):
    """Moore-Penrose pseudo-inverse by the third-order iteration of Razavi et al. 2014.

    ``Z <- 1/4 Z (13 I - A Z (15 I - A Z (7 I - A Z)))``, from ``Z0 = A^T / c``.

    Parameters
    ----------
    a : (..., M, M)
    iterations : number of steps; the paper uses 6
    init : how c is chosen
        ``"per_matrix"``: c = ||A||_1 ||A||_inf for each matrix (the paper's bound, which
        makes the iteration converge); every sample is independent of the others.
        ``"global"``: c = the largest column sum over the whole (..., M, M) stack, one
        scalar for the batch, as transformers does; a sample's result then depends on the
        other samples of its batch.

    Returns
    -------
    (..., M, M)
    """
    xp = get_xp(a)
    if init == "per_matrix":
        norm_1 = xp.abs(a).sum(axis=-2).max(axis=-1)  # (...,): largest column sum
        norm_inf = xp.abs(a).sum(axis=-1).max(axis=-1)  # (...,): largest row sum
        c = (norm_1 * norm_inf)[..., None, None]
    elif init == "global":
        c = a.sum(axis=-2).max()
    else:
        raise ValueError(f"init must be 'per_matrix' or 'global', got {init!r}.")
    eye = xp.eye(a.shape[-1], dtype=a.dtype)
    z = a.swapaxes(-1, -2) / c
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def exact_pinv(a, rtol=None):
    """Moore-Penrose pseudo-inverse from the SVD: V diag(1/s) U^T over the kept s.

    Singular values below ``rtol * s_max`` count as zero (default: M times the machine
    epsilon of the dtype, NumPy's ``pinv(rtol=None)``).

    Parameters
    ----------
    a : (..., M, M)

    Returns
    -------
    (..., M, M)
    """
    xp = get_xp(a)
    if rtol is None:
        rtol = a.shape[-1] * xp.finfo(a.dtype).eps
    u, s, vh = xp.linalg.svd(a)  # (..., M, M), (..., M), (..., M, M)
    keep = s > rtol * s.max(axis=-1, keepdims=True)
    s_inv = xp.where(keep, 1 / xp.where(keep, s, 1), 0)  # (..., M)
    return (vh.swapaxes(-1, -2) * s_inv[..., None, :]) @ u.swapaxes(-1, -2)  # (..., M, M)


def nystrom_attention(
    q,
    k,
    v,
    mask=None,
    num_landmarks=64,
    pinv="iterative",
    iterations=6,
    init="per_matrix",
    mask_landmarks=True,
    check_lengths=True,
):
    """Nystrom attention, eq. (15): softmax(Q K~^T) Z softmax(Q~ K^T) V, Z ~ pinv(A).

    Q~ and K~ are M landmarks (segment means of the scaled q and k). The three kernels are
    F = softmax(Q K~^T) (N x M), A = softmax(Q~ K~^T) (M x M) and Bk = softmax(Q~ K^T)
    (M x N); the output is F Z (Bk V), multiplied in that order so that no N x N array is
    ever formed: O(N M D + N M^2 + M^3) time and O(N M) memory. Only Bk is masked: a
    padded key gets no weight, and padded queries' rows are computed but meaningless.

    Parameters
    ----------
    q, k, v : (B, H, N, D)
    mask : (B, N) bool or None
    num_landmarks : M, from 1 to the shortest row's number of real tokens
    pinv : ``"iterative"`` (see ``iterative_pinv``) or ``"exact"`` (SVD, ``exact_pinv``)
    iterations, init : passed to ``iterative_pinv``
    mask_landmarks : True (the paper's method) leaves padded tokens out of the segment
        means; False averages over every token, padding included, as transformers does
    check_lengths : check M against every row's number of real tokens. That reads the
        mask's row sums back to the host; ``model.encode`` checks once per batch and turns
        it off, so that a GPU is not stopped in every layer.

    Returns
    -------
    (B, H, N, D)
    """
    n = q.shape[-2]
    if not 1 <= num_landmarks <= n:
        raise ValueError(f"num_landmarks must be between 1 and N = {n}, got {num_landmarks}.")
    if mask_landmarks and check_lengths:
        check_landmarks(mask, num_landmarks)
    if pinv not in ("iterative", "exact"):
        raise ValueError(f"pinv must be 'iterative' or 'exact', got {pinv!r}.")

    q, k = scale_qk(q, k)
    segment_mask = mask if mask_landmarks else None
    q_land = segment_means(q, num_landmarks, segment_mask)  # (B, H, M, D)
    k_land = segment_means(k, num_landmarks, segment_mask)  # (B, H, M, D)

    # Bk V first, so that the (M, N) scores and the scaled k are freed before F is made:
    # the peak then holds one (N, M)-sized kernel, not three.
    bk = q_land @ k.swapaxes(-1, -2)  # (B, H, M, D) @ (B, H, D, N) -> (B, H, M, N)
    if mask is not None:
        bk += mask_bias(mask, bk.dtype)
    bv = softmax(bk, out=bk) @ v  # (B, H, M, N) @ (B, H, N, D) -> (B, H, M, D)
    del bk, k
    a = softmax(q_land @ k_land.swapaxes(-1, -2))  # (B,H,M,D) @ (B,H,D,M) -> (B, H, M, M)
    z = iterative_pinv(a, iterations, init) if pinv == "iterative" else exact_pinv(a)
    f = q @ k_land.swapaxes(-1, -2)  # (B, H, N, D) @ (B, H, D, M) -> (B, H, N, M)
    del q
    f = softmax(f, out=f)  # in place: the scores are ours
    return (f @ z) @ bv  # (B, H, N, M) @ (B, H, M, M) @ (B, H, M, D) -> (B, H, N, D)


def check_landmarks(mask, num_landmarks):
    """Raise unless every row of ``mask`` (B, N) has at least M real tokens to average."""
    if mask is None:
        return
    shortest = int(mask.sum(axis=-1).min())
    if num_landmarks > shortest:
        raise ValueError(
            f"num_landmarks must be between 1 and the number of real tokens of the "
            f"shortest sequence ({shortest}), got {num_landmarks}."
        )
