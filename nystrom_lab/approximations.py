"""Other efficient attentions, to set Nystrom attention against in the book.

Shapes: B batch, H heads, N tokens, D head size (Dv for the values, usually D), P projected
length (Linformer's k), R random features (Performer), W window width, T block size,
M rank.

Every function follows ``attention.softmax_attention(q, k, v, mask=None)``: q, k, v are
(B, H, N, D) and *unscaled* (each of q and k gets D^(-1/4), see ``nystrom_np.model.scale_qk``);
``mask`` is (B, N) bool, True for real tokens. The fifth argument is the method's budget,
so ``fn(q, k, v, mask, budget)`` runs any of them:

    method                 budget  what it is                            memory
    ---------------------  ------  ------------------------------------  -------------
    linformer_attention    P       keys and values projected to P rows   O(N P)
    performer_attention    R       positive orthogonal random features   O(N R)
    window_attention       W       each query sees W neighbouring keys   O(N W)
    blocked_attention      T       exact, T x T tiles, online softmax    O(T^2 + N D)
    svd_attention          M       best rank-M matrix (Eckart-Young)     O(N^2), on purpose
    nystrom_attention      M       M landmarks (module ``attention``)    O(N M)

Each of these is linear in v: its output is ``P @ v`` for an N x N matrix P that the method
never forms (but ``svd_attention``). ``attention_matrix`` recovers P by running the method
on one-hot values (v = I), and ``exact_matrix``, ``nystrom_matrix``, ``linformer_matrix``,
``performer_matrix``, ``window_matrix`` and ``svd_matrix`` are that for each method: (B, H,
N, N) arrays for measuring errors at small N. ``relative_error`` is the relative Frobenius
error over the real query rows.

Masks: a padded key gets no weight in every method, so changing the queries, keys or
values of padded tokens never changes the output of a real token. Rows of padded queries
are computed but meaningless; compare real rows only (``relative_error`` does).

Random projections and features are drawn with NumPy from a seed, then moved to the
inputs' device, so the same seed gives the same numbers on the CPU and on a GPU.

References: Wang et al. 2020 (Linformer, arXiv 2006.04768); Choromanski et al. 2021
(Performer, arXiv 2009.14794); Beltagy et al. 2020 (Longformer, arXiv 2004.05150);
Milakov & Gimelshein 2018 (online softmax, arXiv 1805.02867), Rabe & Staats 2021
(arXiv 2112.05682) and Dao et al. 2022 (FlashAttention, arXiv 2205.14135); Eckart & Young
1936 (Psychometrika 1, 211-218).
"""

import math

import numpy as np

from nystrom_np.backend import get_xp
from nystrom_np.model import mask_bias, nystrom_attention, scale_qk, softmax

# ------------------------------------------------------------------------------ Linformer


def linformer_projections(n, proj_dim, seed=0):
    """Linformer's E and F, (P, N) each, entries N(0, 1/P): a random Johnson-Lindenstrauss map.

    The real Linformer *learns* E and F (one pair per layer, shared by the heads); a random
    Gaussian pair is what its Theorem 1 analyses, and what a comparison without training can
    use. Returned as float64 NumPy arrays; ``linformer_attention`` casts and moves them.
    """
    if proj_dim < 1 or n < 1:
        raise ValueError(f"proj_dim and N must be at least 1, got {proj_dim} and {n}.")
    rng = np.random.default_rng(seed)
    e, f = rng.standard_normal((2, proj_dim, n)) / np.sqrt(proj_dim)  # 2 x (P, N)
    return e, f


def linformer_attention(q, k, v, mask=None, proj_dim=None, seed=0, projections=None):
    """Linformer, eq. (7) of Wang et al. 2020: softmax(Q (E K)^T / sqrt(D)) (F V).

    The N keys and values are projected to P rows, so the score matrix is N x P: O(N P)
    time and memory. Padded keys and values are zeroed *before* the projection, so they add
    nothing to the P mixed rows (the paper has no mask: it pads to a fixed N).

    Parameters
    ----------
    q, k, v : (B, H, N, D)
    mask : (B, N) bool or None
    proj_dim : P, for random projections (see ``linformer_projections``)
    seed : seed of the random projections
    projections : (E, F), each (P, N), used as given (e.g. identities: exact attention);
        P is then read from them

    Returns
    -------
    (B, H, N, Dv)
    """
    xp = get_xp(q)
    _check(q, k, v, mask)
    n = q.shape[-2]
    if projections is None:
        if proj_dim is None:
            raise ValueError("give proj_dim (random projections) or projections=(E, F).")
        projections = linformer_projections(n, proj_dim, seed)
    e, f = (xp.asarray(p, dtype=q.dtype) for p in projections)
    if e.ndim != 2 or e.shape != f.shape or e.shape[1] != n:
        raise ValueError(f"E and F must both be (P, N = {n}), got {e.shape} and {f.shape}.")
    if proj_dim is not None and proj_dim != e.shape[0]:
        raise ValueError(f"proj_dim = {proj_dim} but the projections have {e.shape[0]} rows.")
    if mask is not None:
        keep = mask[:, None, :, None].astype(q.dtype)  # (B, 1, N, 1)
        k, v = k * keep, v * keep
    q, k = scale_qk(q, k)
    k_proj = e @ k  # (P, N) @ (B, H, N, D) -> (B, H, P, D)
    v_proj = f @ v  # (P, N) @ (B, H, N, Dv) -> (B, H, P, Dv)
    return softmax(q @ k_proj.swapaxes(-1, -2)) @ v_proj  # (B, H, N, P) @ (B, H, P, Dv)


# ------------------------------------------------------------------------------ Performer


def performer_features(num_features, head_size, seed=0):
    """R orthogonal random directions w_r in R^D, (R, D): Performer's ORFs (section 2.4).

    Blocks of D directions are the rows of the Q of a QR of a Gaussian matrix (exactly
    orthogonal within a block, independent across blocks); each row is then given the norm
    of an independent Gaussian vector, so every w_r is still marginally N(0, I_D) and the
    estimate stays unbiased, with a lower variance than i.i.d. directions.
    """
    if num_features < 1 or head_size < 1:
        raise ValueError(
            f"num_features and D must be at least 1, got {num_features} and {head_size}."
        )
    rng = np.random.default_rng(seed)
    blocks = []
    for _ in range(-(-num_features // head_size)):  # ceil(R / D) blocks of D rows
        g_q, g_r = np.linalg.qr(rng.standard_normal((head_size, head_size)))
        # The signs of diag(R) make Q uniformly (Haar) distributed; without them the
        # directions are biased and the estimate with them (Mezzadri 2007).
        blocks.append((g_q * np.sign(np.diag(g_r))).T)  # rows orthonormal, (D, D)
    w = np.concatenate(blocks)[:num_features]  # (R, D)
    norms = np.linalg.norm(rng.standard_normal((num_features, head_size)), axis=1)  # (R,)
    return w * norms[:, None]


def positive_features(x, w, axis, keep=None):
    """phi(x) = exp(w x - |x|^2 / 2) / sqrt(R), shifted by its maximum over ``axis``.

    The positive random features of Lemma 1 (Choromanski et al. 2021): E[phi(x) . phi(y)]
    = exp(x . y), the softmax kernel. The shift exp(-max) is a constant per row (queries) or
    per head (keys), so it cancels in the normalised attention and only prevents overflow.
    Rows where ``keep`` is False get phi = 0 and do not set the shift.
    """
    xp = get_xp(x)
    logits = x @ w.T - (x * x).sum(axis=-1, keepdims=True) / 2  # (..., N, D) @ (D, R)
    if keep is not None:
        logits = xp.where(keep, logits, -xp.inf)
    return xp.exp(logits - logits.max(axis=axis, keepdims=True)) / math.sqrt(w.shape[0])


def performer_attention(q, k, v, mask=None, num_features=256, seed=0, features=None):
    """Performer FAVOR+ (Choromanski et al. 2021): D^-1 (phi(Q) (phi(K)^T V)).

    With positive orthogonal random features phi (``positive_features``,
    ``performer_features``), phi(q) . phi(k) is an unbiased estimate of exp(q . k / sqrt(D));
    multiplying phi(K)^T V first avoids the N x N matrix: O(N R D) time, O(N R) memory. The
    row sums D = phi(Q) (phi(K)^T 1) normalise the rows (section 2.2). Padded keys get
    phi = 0, so they carry no weight. The same R directions serve every head.

    Parameters
    ----------
    q, k, v : (B, H, N, D)
    mask : (B, N) bool or None
    num_features : R
    seed : seed of the random features
    features : (R, D) directions used as given instead (``num_features`` is then unused)

    Returns
    -------
    (B, H, N, Dv)
    """
    xp = get_xp(q)
    _check(q, k, v, mask)
    if features is None:
        features = performer_features(num_features, q.shape[-1], seed)
    w = xp.asarray(features, dtype=q.dtype)  # (R, D)
    if w.ndim != 2 or w.shape[1] != q.shape[-1]:
        raise ValueError(f"features must be (R, D = {q.shape[-1]}), got {w.shape}.")
    q, k = scale_qk(q, k)
    keep = None if mask is None else mask[:, None, :, None]  # (B, 1, N, 1)
    phi_q = positive_features(q, w, axis=-1)  # (B, H, N, R), a shift per query row
    phi_k = positive_features(k, w, axis=(-2, -1), keep=keep)  # (B, H, N, R), one per head
    kv = phi_k.swapaxes(-1, -2) @ v  # (B, H, R, N) @ (B, H, N, Dv) -> (B, H, R, Dv)
    rows = phi_q @ phi_k.sum(axis=-2)[..., None]  # (B, H, N, R) @ (B, H, R, 1) -> (B,H,N,1)
    # A row whose features all underflow has 0 / 0: give it 0 rather than NaN.
    return (phi_q @ kv) / xp.maximum(rows, xp.finfo(q.dtype).tiny)  # (B, H, N, Dv)


# ------------------------------------------------------------------------ sliding window


def window_starts(n, width):
    """First key of each query's window: i - W // 2, shifted inward at the edges, (N,).

    Every query sees exactly W consecutive keys (a fixed budget, like M landmarks), centred
    on itself away from the ends; W = N is exact attention.
    """
    return np.clip(np.arange(n) - width // 2, 0, n - width)


def window_attention(q, k, v, mask=None, width=128, block=None):
    """Sliding-window (local) attention: each query attends to W neighbouring keys only.

    The band of Longformer's sliding window (Beltagy et al. 2020, section 3.1), here with
    windows shifted inward at the sequence ends so that every query sees exactly W keys
    (see ``window_starts``). Computed in blocks of T queries, each against the T + W - 1
    keys its windows can reach: O(N W) time and O(T (T + W)) memory per step, never N x N.
    Padded keys inside a window get no weight.

    Parameters
    ----------
    q, k, v : (B, H, N, D)
    mask : (B, N) bool or None
    width : W, from 1 to N
    block : T, queries per block (default max(W, 64))

    Returns
    -------
    (B, H, N, Dv)
    """
    xp = get_xp(q)
    _check(q, k, v, mask)
    n = q.shape[-2]
    if not 1 <= width <= n:
        raise ValueError(f"width must be from 1 to N = {n}, got {width}.")
    block = max(width, 64) if block is None else block
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}.")
    starts = window_starts(n, width)
    starts_xp = xp.asarray(starts)
    q, k = scale_qk(q, k)
    out = []
    for i in range(0, n, block):
        i_end = min(i + block, n)
        lo, hi = int(starts[i]), int(starts[i_end - 1]) + width  # keys this block can reach
        scores = q[..., i:i_end, :] @ k[..., lo:hi, :].swapaxes(-1, -2)  # (B, H, T, <=T+W-1)
        first = starts_xp[i:i_end, None]  # (T, 1)
        keys = xp.arange(lo, hi)  # (T+W-1,)
        keep = (keys >= first) & (keys < first + width)  # (T, T+W-1): the band
        if mask is not None:
            keep = keep & mask[:, None, None, lo:hi]  # (B, 1, T, T+W-1)
        scores = xp.where(keep, scores, xp.finfo(scores.dtype).min)
        out.append(softmax(scores) @ v[..., lo:hi, :])  # (B, H, T, T+W-1) @ (.., T+W-1, Dv)
    return xp.concatenate(out, axis=-2)  # (B, H, N, Dv)


# ---------------------------------------------------------------- blocked exact attention


def blocked_attention(q, k, v, mask=None, block=128):
    """Exact softmax attention in T x T tiles with an online softmax: O(T^2 + N D) memory.

    Each block of T queries sweeps the keys T at a time, keeping a running maximum m, a
    running sum l (``total``) and an unnormalised output o (Milakov & Gimelshein 2018;
    Rabe & Staats 2021). A new tile of scores s gives ``m' = max(m, max s)``, ``p = exp(s - m')``,
    ``l = l exp(m - m') + sum p`` and ``o = o exp(m - m') + p V``; the output is o / l.
    This is the idea behind FlashAttention (Dao et al. 2022, Algorithm 1), which adds
    keeping the tiles in on-chip memory. The result equals ``softmax_attention`` up to
    round-off, with the same masking (most negative finite score for padded keys).

    Parameters
    ----------
    q, k, v : (B, H, N, D)
    mask : (B, N) bool or None
    block : T, queries and keys per tile (T >= N: one tile, plain exact attention)

    Returns
    -------
    (B, H, N, Dv)
    """
    xp = get_xp(q)
    _check(q, k, v, mask)
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}.")
    n = q.shape[-2]
    q, k = scale_qk(q, k)
    bias = None if mask is None else mask_bias(mask, q.dtype)  # (B, 1, 1, N)
    out = []
    for i in range(0, n, block):
        q_tile = q[..., i : i + block, :]  # (B, H, T, D)
        m = xp.full(q_tile.shape[:-1] + (1,), -xp.inf, dtype=q.dtype)  # (B, H, T, 1)
        total = xp.zeros_like(m)  # (B, H, T, 1)
        o = xp.zeros(q_tile.shape[:-1] + v.shape[-1:], dtype=q.dtype)  # (B, H, T, Dv)
        for j in range(0, n, block):
            s = q_tile @ k[..., j : j + block, :].swapaxes(-1, -2)  # (B, H, T, T)
            if bias is not None:
                s = s + bias[..., j : j + block]
            m_new = xp.maximum(m, s.max(axis=-1, keepdims=True))
            p = xp.exp(s - m_new)  # (B, H, T, T)
            rescale = xp.exp(m - m_new)  # (B, H, T, 1): 0 on the first tile
            total = total * rescale + p.sum(axis=-1, keepdims=True)
            o = o * rescale + p @ v[..., j : j + block, :]  # (B, H, T, T) @ (B, H, T, Dv)
            m = m_new
        out.append(o / total)
    return xp.concatenate(out, axis=-2)  # (B, H, N, Dv)


# --------------------------------------------------------- matrices, the SVD floor, errors


def exact_matrix(q, k, mask=None):
    """The softmax attention matrix softmax(q k^T / sqrt(D) + mask), (B, H, N, N)."""
    _check(q, k, None, mask)
    q, k = scale_qk(q, k)
    scores = q @ k.swapaxes(-1, -2)  # (B, H, N, D) @ (B, H, D, N) -> (B, H, N, N)
    if mask is not None:
        scores = scores + mask_bias(mask, scores.dtype)
    return softmax(scores)


def attention_matrix(attention, q, k, mask=None, *args, **kwargs):
    """The N x N matrix P of a method linear in v (output = P v): its output for v = I.

    Row n of the identity is the one-hot value of token n, so column n of the output is the
    weight every query gives token n. Costs one run of ``attention`` with Dv = N.

    Parameters
    ----------
    attention : a function called as ``attention(q, k, v, mask, *args, **kwargs)``
    q, k : (B, H, N, D)
    mask : (B, N) bool or None

    Returns
    -------
    (B, H, N, N)
    """
    xp = get_xp(q)
    b, h, n, _ = q.shape
    eye = xp.broadcast_to(xp.eye(n, dtype=q.dtype), (b, h, n, n))  # (B, H, N, N)
    return attention(q, k, eye, mask, *args, **kwargs)


def nystrom_matrix(q, k, mask=None, num_landmarks=64, **options):
    """Nystrom's F Z R (eq. 15), (B, H, N, N); options as ``nystrom_attention``."""
    return attention_matrix(nystrom_attention, q, k, mask, num_landmarks, **options)


def linformer_matrix(q, k, mask=None, proj_dim=None, **options):
    """Linformer's softmax(Q (E K)^T / sqrt(D)) F, (B, H, N, N); see ``linformer_attention``."""
    return attention_matrix(linformer_attention, q, k, mask, proj_dim, **options)


def performer_matrix(q, k, mask=None, num_features=256, **options):
    """Performer's row-normalised phi(Q) phi(K)^T, (B, H, N, N); see ``performer_attention``."""
    return attention_matrix(performer_attention, q, k, mask, num_features, **options)


def window_matrix(q, k, mask=None, width=128, **options):
    """The banded softmax of ``window_attention``, (B, H, N, N), zero outside the band."""
    return attention_matrix(window_attention, q, k, mask, width, **options)


def svd_matrix(q, k, mask=None, rank=64):
    """The best rank-M approximation of the softmax matrix: its truncated SVD.

    By the Eckart-Young theorem (1936) no matrix of rank at most M (Nystrom's F Z R with M
    landmarks, Linformer's with P = M, ...) is closer to P in Frobenius (or spectral) norm:
    the floor for every low-rank method's *matrix* error (not a floor for output errors).
    It forms the N x N matrix and takes its O(N^3) SVD by design: a yardstick, not a method.
    Rows of padded queries are zeroed first so that they take no part in the SVD; columns
    of padded keys are already zero and stay so.

    Parameters
    ----------
    q, k : (B, H, N, D)
    mask : (B, N) bool or None
    rank : M, from 1 to N

    Returns
    -------
    (B, H, N, N)
    """
    xp = get_xp(q)
    p = exact_matrix(q, k, mask)  # (B, H, N, N)
    n = p.shape[-1]
    if not 1 <= rank <= n:
        raise ValueError(f"rank must be from 1 to N = {n}, got {rank}.")
    if mask is not None:
        p = xp.where(mask[:, None, :, None], p, 0)
    u, s, vh = xp.linalg.svd(p)  # (B, H, N, N), (B, H, N), (B, H, N, N)
    return (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]  # (.., N, M) @ (.., M, N)


def svd_attention(q, k, v, mask=None, rank=64):
    """Attention through the best rank-M matrix, ``svd_matrix(q, k, mask, rank) @ v``."""
    _check(q, k, v, mask)
    return svd_matrix(q, k, mask, rank) @ v  # (B, H, N, N) @ (B, H, N, Dv) -> (B, H, N, Dv)


def relative_error(approx, exact, mask=None):
    """Relative Frobenius error ||approx - exact|| / ||exact|| per head, over real rows.

    Parameters
    ----------
    approx, exact : (B, H, N, X), outputs (X = Dv) or matrices (X = N)
    mask : (B, N) bool or None; rows of padded queries are left out

    Returns
    -------
    (B, H)
    """
    xp = get_xp(exact)
    if approx.shape != exact.shape:
        raise ValueError(f"shapes differ: {approx.shape} and {exact.shape}.")
    diff = approx - exact
    if mask is not None:
        rows = mask[:, None, :, None]  # (B, 1, N, 1)
        diff, exact = xp.where(rows, diff, 0), xp.where(rows, exact, 0)
    return xp.sqrt((diff**2).sum(axis=(-2, -1)) / (exact**2).sum(axis=(-2, -1)))


def _check(q, k, v, mask):
    """Raise ValueError unless q, k (and v) are (B, H, N, D)-compatible and mask is (B, N)."""
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must be (B, H, N, D) of one shape, got {q.shape}, {k.shape}.")
    if v is not None and (v.ndim != 4 or v.shape[:3] != q.shape[:3]):
        raise ValueError(f"v must be (B, H, N, Dv) with (B, H, N) = {q.shape[:3]}, got {v.shape}.")
    if mask is not None:
        if mask.shape != (q.shape[0], q.shape[2]) or mask.dtype != bool:
            raise ValueError(
                f"mask must be a (B, N) = {(q.shape[0], q.shape[2])} bool array, "
                f"got {mask.shape} {mask.dtype}."
            )
        if not bool(mask.any(axis=-1).all()):
            raise ValueError("every sequence needs at least one real (unmasked) token.")
