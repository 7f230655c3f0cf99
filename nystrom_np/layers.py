"""The building blocks of the encoder: dense layers, LayerNorm, GELU, the conv skip.

Shapes: B batch, N tokens, H heads, D head size, C = H*D hidden size, K conv taps.

Weights arrive already transposed to (in, out) (see ``model.from_state_dict``), so a dense
layer is ``x @ w + b`` with no transpose at run time.
"""

import math

from .backend import erf, get_xp


def linear(x, w, b):
    """Dense layer ``x w + b``: (..., in) @ (in, out) -> (..., out)."""
    return x @ w + b


def layer_norm(x, g, b, eps):
    """LayerNorm over the last axis, with the biased variance (as PyTorch)."""
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return g * (x - mean) / (var + eps) ** 0.5 + b


def gelu_new(x):
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    The activation of the Nystromformer checkpoint (``hidden_act = "gelu_new"``).
    """
    xp = get_xp(x)
    return 0.5 * x * (1 + xp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def gelu(x):
    """Exact GELU: x * Phi(x) = 0.5 x (1 + erf(x / sqrt(2))). BERT's ``hidden_act = "gelu"``."""
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def relu(x):
    """max(x, 0)."""
    return x * (x > 0)


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


def depthwise_conv(v, w, block=64):
    """Per-head 1-D cross-correlation along the tokens, zero padded, K taps, no bias.

    ``out[b, h, n] = sum_t w[h, t] * v[b, h, n + t - K // 2]``, the same taps for every
    channel d: transformers' ``Conv2d(H, H, (K, 1), groups=H, padding=(K // 2, 0))``.

    It runs as one batched matmul instead of K shifted adds. Cut the padded tokens into
    blocks of ``block`` outputs; each block needs ``block + K - 1`` inputs, and because the
    taps do not depend on n, one banded (Toeplitz) matrix ``T[h]`` of shape
    ``(block, block + K - 1)`` with ``T[h, i, i + t] = w[h, t]`` maps every block's inputs
    to its outputs. Memory stays O(N * (block + K)), never N x N.

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
    window = xp.arange(n_blocks)[:, None] * block + xp.arange(block + k - 1)  # (nb, block+K-1)
    blocks = v_pad[:, :, window]  # (B, H, nb, block+K-1, D)
    # Toeplitz band: T[h, i, j] = w[h, j - i] where 0 <= j - i < K, else 0.
    lag = xp.arange(block + k - 1)[None, :] - xp.arange(block)[:, None]  # (block, block+K-1)
    band = (lag >= 0) & (lag < k)
    toeplitz = w[:, xp.clip(lag, 0, k - 1)] * band  # (H, block, block+K-1)
    # (H, 1, block, block+K-1) @ (B, H, nb, block+K-1, D) -> (B, H, nb, block, D)
    out = toeplitz[:, None] @ blocks
    return out.reshape(*v.shape[:2], n_blocks * block, -1)[:, :, :n]  # (B, H, N, D)
