"""The building blocks of the encoder: dense layers, LayerNorm, GELU, the conv skip.

Shapes: B batch, N tokens, H heads, D head size, C = H*D hidden size, K conv taps.

Weights arrive already transposed to (in, out) (see ``model.from_state_dict``), so a dense
layer is ``x @ w + b`` with no transpose at run time.
"""

import math

import numpy as np

from .backend import erf, get_xp


def linear(x, w, b):
    """Dense layer ``x w + b``: (..., in) @ (in, out) -> (..., out).

    The leading axes are folded into one, so that a batch runs as one large matrix product
    (NumPy's matmul would otherwise call BLAS once per sample, on smaller matrices).
    """
    y = x.reshape(-1, x.shape[-1]) @ w  # (B*N, in) @ (in, out) -> (B*N, out)
    y += b  # in place: y is our own temporary
    return y.reshape(*x.shape[:-1], w.shape[-1])  # (B*N, out) -> (..., out)


def layer_norm(x, g, b, eps):
    """LayerNorm over the last axis, with the biased variance (as PyTorch).

    ``g (x - mean) / sqrt(var + eps) + b``, computed on one scratch array (x is unchanged).
    """
    xp = get_xp(x)
    y = x - x.mean(axis=-1, keepdims=True)  # centred; the one full-size temporary
    var = (y * y).mean(axis=-1, keepdims=True)  # biased variance, (..., 1)
    y /= xp.sqrt(var + eps)
    y *= g
    y += b
    return y


# Rows per block of ``gelu_new`` on the CPU: 32 rows of the checkpoint's I = 3072 floats
# are 384 KiB, which stay in a core's L2 cache through the formula's nine passes.
BLOCK_ROWS = 32


def gelu_new(x, out=None):
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    The activation of the Nystromformer checkpoint (``hidden_act = "gelu_new"``) and the
    widest element-wise step of the model ((B, N, I)). ``out`` is where the result goes (a
    new array by default); ``out=x`` works in place, as the model runs it on its own
    temporary. On the CPU the rows go through in blocks of ``BLOCK_ROWS`` with one small
    scratch array, so that the formula's passes run in cache rather than in memory: on a
    (4096, 3072) float32 array that took 15 ms instead of 41 ms on our CPU (a one-off
    measurement). A GPU takes all rows at once.
    """
    xp = get_xp(x)
    if out is None:
        out = xp.empty(x.shape, x.dtype)
    elif not out.flags.c_contiguous:
        raise ValueError("gelu_new needs a C-contiguous out array.")
    rows, out_rows = x.reshape(-1, x.shape[-1]), out.reshape(-1, x.shape[-1])  # (R, I)
    step = BLOCK_ROWS if xp is np else max(len(rows), 1)
    scratch = xp.empty((min(step, len(rows)), x.shape[-1]), x.dtype)
    for start in range(0, len(rows), step):
        block = rows[start : start + step]
        y = scratch[: len(block)]
        xp.multiply(block, block, out=y)
        y *= block  # x^3 as x * x * x: NumPy's float32 ``x**3`` (powf) was ~70x slower here
        y *= 0.044715
        y += block
        y *= math.sqrt(2 / math.pi)
        xp.tanh(y, out=y)
        y += 1
        y *= 0.5  # exact (a power of two), so x * (0.5 (1 + tanh)) rounds as 0.5 x (1 + tanh)
        xp.multiply(block, y, out=out_rows[start : start + step])
    return out


def gelu(x, out=None):
    """Exact GELU: x * Phi(x) = 0.5 x (1 + erf(x / sqrt(2))). BERT's ``hidden_act = "gelu"``.

    ``out`` as for ``gelu_new``.
    """
    return get_xp(x).multiply(x, 0.5 * (1 + erf(x / math.sqrt(2))), out=out)


def relu(x, out=None):
    """max(x, 0). ``out`` as for ``gelu_new``."""
    return get_xp(x).multiply(x, x > 0, out=out)


ACTIVATIONS = {"gelu_new": gelu_new, "gelu": gelu, "relu": relu}


def embed(ids, token_types, word, position, token_type, offset):
    """Sum of word, position and token-type embeddings (before the LayerNorm).

    Parameters
    ----------
    ids, token_types : (B, N) integer arrays
    word : (V, C), position : (P, C), token_type : (T, C) tables
    offset : first position id (2 for transformers' Nystromformer, 0 for BERT)

    Returns
    -------
    (B, N, C)
    """
    xp = get_xp(word)
    n = ids.shape[1]
    return word[ids] + token_type[token_types] + position[offset + xp.arange(n)]


def depthwise_conv(v, w, block=16):
    """Per-head 1-D cross-correlation along the tokens, zero padded, K taps, no bias.

    ``out[b, h, n] = sum_t w[h, t] * v[b, h, n + t - K // 2]``, the same taps for every
    channel d: transformers' ``Conv2d(H, H, (K, 1), groups=H, padding=(K // 2, 0))``.

    It runs as one batched matmul instead of K shifted adds. Cut the padded tokens into
    blocks of ``block`` outputs; each block needs ``block + K - 1`` inputs, and because the
    taps do not depend on n, one banded (Toeplitz) matrix ``T[h]`` of shape
    ``(block, block + K - 1)`` with ``T[h, i, i + t] = w[h, t]`` maps every block's inputs
    to its outputs. Memory stays O(N * (block + K)), never N x N. The blocks are a strided
    view of the padded input (no copy), and short blocks waste few multiplications on the
    band's zeros: 16 was fastest in a one-off measurement on our CPU, against 32 and 64.

    Parameters
    ----------
    v : (B, H, N, D)
    w : (H, K) taps, K odd

    Returns
    -------
    (B, H, N, D)
    """
    xp = get_xp(v)
    _, _, n, _ = v.shape
    heads, k = w.shape
    n_blocks = -(-n // block)
    # Zero padding: K // 2 before, K // 2 plus the round-up to whole blocks after.
    pad_after = k // 2 + n_blocks * block - n
    v_pad = xp.pad(v, ((0, 0), (0, 0), (k // 2, pad_after), (0, 0)))  # (B, H, nb*block+K-1, D)
    # Overlapping windows: block j reads padded tokens j*block ... j*block + block + K - 2.
    # A strided view of v_pad (block j starts block rows after block j - 1), not a copy.
    s_b, s_h, s_n, s_d = v_pad.strides
    shape = (*v.shape[:2], n_blocks, block + k - 1, v.shape[3])  # (B, H, nb, block+K-1, D)
    blocks = xp.lib.stride_tricks.as_strided(v_pad, shape, (s_b, s_h, block * s_n, s_n, s_d))
    # Toeplitz band: T[h, i, j] = w[h, j - i] where 0 <= j - i < K, else 0.
    lag = xp.arange(block + k - 1)[None, :] - xp.arange(block)[:, None]  # (block, block+K-1)
    band = (lag >= 0) & (lag < k)
    toeplitz = w[:, xp.clip(lag, 0, k - 1)] * band  # (H, block, block+K-1)
    # (H, 1, block, block+K-1) @ (B, H, nb, block+K-1, D) -> (B, H, nb, block, D)
    out = toeplitz[:, None] @ blocks
    return out.reshape(*v.shape[:2], n_blocks * block, -1)[:, :, :n]  # (B, H, N, D)
