"""The Nystromformer masked language model, one forward pass read top to bottom.

Shapes: B batch, N tokens, C = H * D hidden size, H heads, D head size, I intermediate
size, M landmarks, K conv taps, V vocabulary. A mask is (B, N) bool, True for real tokens.

Reading order: the building blocks; exact softmax attention; Nystrom attention (landmarks,
the iterative pseudo-inverse, eq. (15)); the conv skip; one encoder layer; the model
(embeddings, layers, MLM head); last, the input checks, kept out of the way of the math.

References: Xiong et al., "Nystromformer: A Nystrom-Based Algorithm for Approximating
Self-Attention", AAAI 2021 (arXiv 2102.03902), section 3 and eq. (15); the pseudo-inverse
iteration of Razavi et al. 2014, as the paper uses it. Where we follow transformers'
``NystromformerForMaskedLM`` (4.57, eval mode) on purpose: positions count from 2; q and k
each carry D^(-1/4); the conv skip reads the unmasked values; ``attention="hf"`` is its rule
for choosing a path. A BERT config runs the same code with no conv skip, positions from 0
and the erf GELU. Weights come transposed to (in, out), q/k/v fused and cast, from
``weights.from_state_dict``.
"""

import math

import numpy as np

from .backend import erf, get_xp

# ---------------------------------------------------------------------- building blocks


def linear(x, w, b):
    """Dense layer ``x w + b``: (..., in) @ (in, out) -> (..., out)."""
    y = x @ w
    y += b  # in place: ``x @ w + b`` holds the logits twice, +74 % peak memory (tricks.py)
    return y


def layer_norm(x, g, b, eps):
    """``g (x - mean) / sqrt(var + eps) + b`` over the last axis, biased variance (PyTorch's)."""
    xp = get_xp(x)
    centred = x - x.mean(axis=-1, keepdims=True)
    return centred / xp.sqrt((centred * centred).mean(axis=-1, keepdims=True) + eps) * g + b


def gelu_new(x):
    """GELU, tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (the checkpoint's)."""
    inner = math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)  # x*x*x: float32 x**3 is slow
    return 0.5 * x * (1 + get_xp(x).tanh(inner))


def gelu(x):
    """GELU, exact: 0.5 x (1 + erf(x / sqrt(2))) (BERT's ``hidden_act = "gelu"``)."""
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def relu(x):
    """max(x, 0)."""
    return x * (x > 0)


ACTIVATIONS = {"gelu_new": gelu_new, "gelu": gelu, "relu": relu}


def softmax(x, axis=-1, out=None):
    """exp(x - max) / sum(exp(x - max)) along ``axis``; the shift keeps exp finite.

    ``out=x`` overwrites x: attention does so with its own scores, the largest arrays.
    """
    xp = get_xp(x)
    e = xp.subtract(x, x.max(axis=axis, keepdims=True), out=out)
    xp.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


# --------------------------------------------------------------------- exact attention


def scale_qk(q, k):
    """q / D^(1/4) and k / D^(1/4): together the 1/sqrt(D) of the scores, as transformers."""
    scale = math.sqrt(math.sqrt(q.shape[-1]))
    return q / scale, k / scale


def mask_bias(mask, dtype):
    """What the scores add: 0 for real keys, the most negative finite float for padding.

    (B, N) bool -> (B, 1, 1, N). Finite, not -inf, so a row of padding alone stays finite.
    """
    xp = get_xp(mask)
    return xp.where(mask, 0, xp.finfo(dtype).min).astype(dtype)[:, None, None, :]


def softmax_attention(q, k, v, mask=None):
    """Exact attention, softmax(q k^T / sqrt(D) + mask) v, through its N x N scores.

    q, k, v : (B, H, N, D); mask : (B, N) bool or None. Returns (B, H, N, D).
    """
    q, k = scale_qk(q, k)
    scores = q @ k.swapaxes(-1, -2)  # (B, H, N, D) @ (B, H, D, N) -> (B, H, N, N)
    if mask is not None:
        scores += mask_bias(mask, scores.dtype)
    # In place: a new N x N array makes the forward 16 % slower at N = 510 (tricks.py).
    weights = softmax(scores, out=scores)
    return weights @ v  # (B, H, N, N) @ (B, H, N, D) -> (B, H, N, D)


# ------------------------------------------------------------------- Nystrom attention


def segment_means(x, num_segments, mask=None):
    """Landmarks: the means of M contiguous segments of the real tokens (the paper's choice).

    A real token of rank r among the L real tokens of its row falls in segment
    floor(r M / L): padding is left out, and N need not be a multiple of M (segments then
    differ by one token at most). x (B, H, N, D), mask (B, N) or None -> (B, H, M, D).
    """
    xp = get_xp(x)
    b, h, n, d = x.shape
    if mask is None and n % num_segments == 0:  # the paper's equal segments, as transformers
        return x.reshape(b, h, num_segments, n // num_segments, d).mean(axis=-2)
    if mask is None:
        mask = xp.ones((b, n), dtype=bool)
    rank = xp.cumsum(mask, axis=-1) - 1  # (B, N): place of each token among the real ones
    segment = rank * num_segments // mask.sum(axis=-1, keepdims=True)  # (B, N)
    member = (segment[:, :, None] == xp.arange(num_segments)) & mask[:, :, None]  # (B, N, M)
    weights = (member / member.sum(axis=1, keepdims=True)).astype(x.dtype)  # column means
    return weights.swapaxes(-1, -2)[:, None] @ x  # (B, 1, M, N) @ (B, H, N, D) -> (B, H, M, D)


def iterative_pinv(a, iterations=6, init="per_matrix"):
    """Moore-Penrose pseudo-inverse by the iteration of Razavi et al. 2014, as the paper's.

    ``Z <- 1/4 Z (13 I - A Z (15 I - A Z (7 I - A Z)))`` from ``Z0 = A^T / c``, where
    ``init="per_matrix"`` takes c = ||A||_1 ||A||_inf of each matrix (the paper's bound,
    under which the iteration converges), and ``"global"`` the largest column sum over the
    whole stack: one scalar for the batch, so a sample depends on the others (transformers'
    choice and the default of the authors' code). a (..., M, M) -> (..., M, M).
    """
    xp = get_xp(a)
    if init == "per_matrix":
        c = xp.abs(a).sum(axis=-2).max(axis=-1) * xp.abs(a).sum(axis=-1).max(axis=-1)
        c = c[..., None, None]  # (..., 1, 1)
    elif init == "global":
        c = a.sum(axis=-2).max()
    else:
        raise ValueError(f"init must be 'per_matrix' or 'global', got {init!r}.")
    eye = xp.eye(a.shape[-1], dtype=a.dtype)
    z = a.swapaxes(-1, -2) / c
    for _ in range(iterations):
        az = a @ z  # (..., M, M)
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def exact_pinv(a, rtol=None):
    """Moore-Penrose pseudo-inverse from the SVD, V diag(1/s) U^T over the kept s.

    Singular values below ``rtol * s_max`` count as zero (default: M times the dtype's
    epsilon, as NumPy's ``pinv``). a (..., M, M) -> (..., M, M).
    """
    xp = get_xp(a)
    rtol = a.shape[-1] * xp.finfo(a.dtype).eps if rtol is None else rtol
    u, s, vh = xp.linalg.svd(a)  # (..., M, M), (..., M), (..., M, M)
    keep = s > rtol * s.max(axis=-1, keepdims=True)
    s_inv = xp.where(keep, 1 / xp.where(keep, s, 1), 0)  # (..., M)
    return (vh.swapaxes(-1, -2) * s_inv[..., None, :]) @ u.swapaxes(-1, -2)  # (..., M, M)


def nystrom_attention(q, k, v, mask=None, num_landmarks=64, pinv="iterative",
                      pinv_iterations=6, pinv_init="per_matrix", mask_landmarks=True):
    """Nystrom attention, eq. (15): softmax(Q K~^T) Z softmax(Q~ K^T) V, with Z ~ A^+.

    The landmarks Q~, K~ are M segment means of the scaled q and k. F = softmax(Q K~^T)
    (N x M), A = softmax(Q~ K~^T) (M x M), R = softmax(Q~ K^T) (M x N): no N x N array,
    O(N M D + N M^2 + M^3) time, O(N M) memory. Only R is masked: padded keys get no
    weight, padded queries get rows that mean nothing.

    Parameters
    ----------
    q, k, v : (B, H, N, D), q and k unscaled
    mask : (B, N) bool or None
    num_landmarks : M, from 1 to the number of real tokens of the shortest row
    pinv : "iterative" (``iterative_pinv`` with ``pinv_iterations``, ``pinv_init``) or
        "exact" (``exact_pinv``, the SVD)
    mask_landmarks : leave padding out of the segment means; False averages it in, as
        transformers and the authors' code do

    Returns
    -------
    (B, H, N, D)
    """
    segment_mask = mask if mask_landmarks else None
    check_landmarks(segment_mask, num_landmarks, q.shape[-2], pinv)
    q, k = scale_qk(q, k)
    q_land = segment_means(q, num_landmarks, segment_mask)  # (B, H, M, D)
    k_land = segment_means(k, num_landmarks, segment_mask)  # (B, H, M, D)
    f = softmax(q @ k_land.swapaxes(-1, -2))  # (B, H, N, D) @ (B, H, D, M) -> (B, H, N, M)
    a = softmax(q_land @ k_land.swapaxes(-1, -2))  # (B, H, M, D) @ (B, H, D, M) -> (B,H,M,M)
    r = q_land @ k.swapaxes(-1, -2)  # (B, H, M, D) @ (B, H, D, N) -> (B, H, M, N)
    r = softmax(r if mask is None else r + mask_bias(mask, r.dtype))
    z = iterative_pinv(a, pinv_iterations, pinv_init) if pinv == "iterative" else exact_pinv(a)
    # (F Z)(R V), the order transformers multiplies in, so that float32 round-off matches;
    # F (Z (R V)) would cost O(M^2 D + N M D) and save the N M^2 term.
    return f @ z @ (r @ v)  # (B, H, N, M) @ (B, H, M, M) @ (B, H, M, D) -> (B, H, N, D)


# ---------------------------------------------------------------------------- conv skip

CONV_BLOCK = 16  # outputs per block of the conv skip: faster than 32 or 64 on our CPU


def depthwise_conv(v, w):
    """The conv skip: per head, a 1-D cross-correlation of v along the tokens.

    ``out[b, h, n] = sum_t w[h, t] v[b, h, n + t - K // 2]``: zero padding, the same K taps
    for every channel d, no bias, no flip (transformers' ``Conv2d(H, H, (K, 1), groups=H)``).
    v (B, H, N, D), w (H, K) -> (B, H, N, D).
    """
    xp = get_xp(v)
    b, h, n, d = v.shape
    k, block = w.shape[-1], CONV_BLOCK
    # A banded (Toeplitz) product, block by block: the outputs i < 16 of a block read its
    # padded inputs j < 16 + K - 1 through T[h, i, j] = w[h, j - i]. The plain sum of K
    # shifted slices makes the forward 6 % slower at N = 510, 11 % at 4096 (tricks.py).
    blocks = -(-n // block)
    v_pad = xp.pad(v, ((0, 0), (0, 0), (k // 2, blocks * block - n + k // 2), (0, 0)))
    windows = xp.lib.stride_tricks.sliding_window_view(v_pad, block + k - 1, axis=2)
    windows = windows[:, :, ::block].swapaxes(-1, -2)  # (B, H, blocks, block + K - 1, D)
    lag = xp.arange(block + k - 1) - xp.arange(block)[:, None]  # (block, block + K - 1): j - i
    band = xp.where((lag >= 0) & (lag < k), w[:, lag.clip(0, k - 1)], 0)  # (H, block, ...)
    out = band[:, None] @ windows  # (H, 1, block, block+K-1) @ (B, H, blocks, block+K-1, D)
    return out.reshape(b, h, blocks * block, d)[:, :, :n]  # (B, H, blocks, block, D) -> (B,H,N,D)


# ------------------------------------------------------------------------ encoder layer

ACTIVATION_ROWS = 64  # rows per block of the activation on the CPU (64 x 3072 floats: 768 KiB)


def encoder_layer(x, mask, layer, config, attention, mask_conv_input=False, **nystrom):
    """One post-LN layer: a = LN(x + Attention(x)), then LN(a + FFN(a)). (B, N, C) -> same.

    ``attention`` is "exact" or "nystrom", with ``nystrom`` its options; ``mask_conv_input``
    zeroes padded values before the conv skip as the authors' code does (transformers does
    not, so padding leaks up to K // 2 tokens inward).
    """
    xp, (b, n, c), h = get_xp(x), x.shape, config.num_attention_heads
    qkv = linear(x, **layer["qkv"]).reshape(b, n, 3, h, c // h)  # (B, N, 3C) -> (B,N,3,H,D)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # (B, N, 3, H, D) -> 3 x (B, H, N, D)
    if attention == "exact":
        context = softmax_attention(q, k, v, mask)  # (B, H, N, D)
    else:
        context = nystrom_attention(q, k, v, mask, **nystrom)  # (B, H, N, D)
    if layer["conv"] is not None:  # BERT has no conv skip
        conv_input = v * mask[:, None, :, None] if mask_conv_input and mask is not None else v
        context = context + depthwise_conv(conv_input, layer["conv"])
    context = context.transpose(0, 2, 1, 3).reshape(b, n, c)  # (B, H, N, D) -> (B, N, C)
    a = layer_norm(x + linear(context, **layer["attention_output"]), **layer["attention_ln"],
                   eps=config.layer_norm_eps)
    hidden = linear(a, **layer["intermediate"]).reshape(b * n, -1)  # (B*N, I)
    # The activation in blocks of rows, whose temporaries stay in the CPU's cache: all
    # rows at once make the forward 8 % slower at N = 510, 4 % at 4096 (tricks.py).
    rows = ACTIVATION_ROWS if xp is np else b * n
    for i in range(0, b * n, rows):
        hidden[i : i + rows] = ACTIVATIONS[config.hidden_act](hidden[i : i + rows])
    fed = linear(hidden, **layer["output"]).reshape(b, n, c)  # (B*N, I) -> (B, N, C)
    return layer_norm(a + fed, **layer["output_ln"], eps=config.layer_norm_eps)


# -------------------------------------------------------------------------------- model


def forward(model, input_ids, attention_mask=None, token_type_ids=None, *,
            output_hidden_states=False, **options):
    """Masked-LM logits of a batch, as transformers' ``NystromformerForMaskedLM``.

    Parameters
    ----------
    model : Model (see ``weights``)
    input_ids : (B, N) integers below V (NumPy, or CuPy for a model on the GPU)
    attention_mask : (B, N) of 0/1 or bool, 1 for real tokens; None: all real
    token_type_ids : (B, N) integers below ``type_vocab_size``; None: all 0
    attention : "hf" (default, transformers' rule: ``hf_rule``), "exact" or "nystrom"
    num_landmarks, pinv, pinv_iterations, pinv_init : for "nystrom" (``nystrom_attention``);
        defaults: the config's M, "iterative", 6, "per_matrix"
    mask_conv_input : zero padded values before the conv skip (see ``encoder_layer``)
    output_hidden_states : also return the L + 1 hidden states of ``encode``

    Returns
    -------
    logits (B, N, V), or (logits, hidden_states)
    """
    hidden = encode(model, input_ids, attention_mask, token_type_ids, **options)
    logits = mlm_head(model, hidden[-1])
    return (logits, hidden) if output_hidden_states else logits


def encode(model, input_ids, attention_mask=None, token_type_ids=None, *,
           mask_conv_input=False, **options):
    """The base model: L + 1 hidden states (B, N, C), after the embeddings and each layer.

    Takes what ``forward`` takes; the last state is transformers' ``last_hidden_state``.
    """
    config, emb = model.config, model.params["embeddings"]
    ids, mask, types = check_inputs(model, input_ids, attention_mask, token_type_ids)
    options = attention_options(config, ids.shape[1], **options)
    positions = config.position_offset + get_xp(ids).arange(ids.shape[1])  # (N,)
    x = emb["word"][ids] + emb["token_type"][types] + emb["position"][positions]  # (B, N, C)
    hidden = [layer_norm(x, **emb["ln"], eps=config.layer_norm_eps)]
    for layer in model.params["layers"]:
        hidden.append(encoder_layer(hidden[-1], mask, layer, config,
                                    mask_conv_input=mask_conv_input, **options))
    return hidden


def mlm_head(model, x):
    """Masked-LM logits LN(act(x Wt + bt)) E^T + bias, (..., C) -> (..., V); E is tied.

    Give it only the rows you need (the [MASK] positions, say): the V-wide product is a
    large share of a forward pass.
    """
    head, config = model.params["head"], model.config
    if head is None:
        raise ValueError("this model has no MLM head (it was loaded without cls.* weights).")
    t = ACTIVATIONS[config.hidden_act](linear(x, **head["transform"]))  # (..., C)
    t = layer_norm(t, **head["transform_ln"], eps=config.layer_norm_eps)
    return linear(t, model.params["embeddings"]["word"].T, head["bias"])  # (..,C) @ (C,V)


# ------------------------------------------------------------------------- input checks


def check_inputs(model, input_ids, attention_mask, token_type_ids):
    """Check a batch at the public boundary and put it on the model's device.

    Returns (B, N) integer ids, a (B, N) bool mask or None, and (B, N) token types.
    """
    xp, config = model.xp, model.config
    ids = _integers(xp, input_ids, "input_ids", config.vocab_size, "the vocabulary")
    n_max = model.params["embeddings"]["position"].shape[0] - config.position_offset
    if ids.shape[1] > n_max:
        raise ValueError(f"input has {ids.shape[1]} tokens but the position table allows at "
                         f"most {n_max} (max_position_embeddings); truncate it.")
    types = xp.zeros_like(ids) if token_type_ids is None else _integers(
        xp, token_type_ids, "token_type_ids", config.type_vocab_size, "type_vocab_size", ids)
    if attention_mask is None:
        return ids, None, types
    mask = _array(xp, attention_mask, "attention_mask", ids)
    if mask.dtype != bool and (mask.dtype.kind not in "iuf" or not bool(
            ((mask == 0) | (mask == 1)).all())):
        raise ValueError("attention_mask must hold only 0/1 (or True/False).")
    return ids, mask == 1, types


def _array(xp, values, name, ids=None):
    try:
        array = xp.asarray(values)
    except ValueError:  # ragged lists
        raise ValueError(f"{name} must be a rectangular array: rows of equal length.") from None
    if ids is not None and array.shape != ids.shape:
        raise ValueError(f"{name} has shape {array.shape}, input_ids {ids.shape}; they must "
                         "match.")
    return array


def _integers(xp, values, name, high, what, ids=None):
    array = _array(xp, values, name, ids)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {array.dtype}.")
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"{name} must be a non-empty 2-D (batch, tokens) array, got shape "
                         f"{array.shape}; for one sequence pass ids[None].")
    if int(array.min()) < 0 or int(array.max()) >= high:
        raise ValueError(f"{name} must lie in [0, {high}) ({what}), got values from "
                         f"{int(array.min())} to {int(array.max())}.")
    return array


def check_landmarks(mask, num_landmarks, n, pinv="iterative"):
    """Raise unless 1 <= M <= N, pinv is known and every row of ``mask`` has M real tokens."""
    if not 1 <= num_landmarks <= n or pinv not in ("iterative", "exact"):
        raise ValueError(f"need num_landmarks from 1 to N = {n} and pinv 'iterative' or "
                         f"'exact', got {num_landmarks} and {pinv!r}.")
    shortest = None if mask is None else int(mask.sum(axis=-1).min())
    if shortest is not None and num_landmarks > shortest:
        raise ValueError(f"num_landmarks must be between 1 and the number of real tokens of "
                         f"the shortest sequence ({shortest}), got {num_landmarks}.")


def attention_options(config, n, attention="hf", num_landmarks=None, pinv="iterative",
                      pinv_iterations=6, pinv_init=None):
    """Check ``forward``'s attention options and fill in their defaults, names unchanged."""
    if attention not in ("hf", "exact", "nystrom"):
        raise ValueError(f"attention must be 'hf', 'exact' or 'nystrom', got {attention!r}.")
    if attention != "nystrom":
        if (num_landmarks, pinv, pinv_iterations, pinv_init) != (None, "iterative", 6, None):
            raise ValueError(f"num_landmarks, pinv, pinv_iterations and pinv_init are options "
                             f"of attention='nystrom' only; attention={attention!r} takes none.")
        return hf_rule(config, n) if attention == "hf" else {"attention": "exact"}
    m, it = config.num_landmarks if num_landmarks is None else num_landmarks, pinv_iterations
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 1 <= m <= n:
        raise ValueError(f"num_landmarks must be an integer from 1 to N = {n}, got {m!r}.")
    if isinstance(it, bool) or not isinstance(it, (int, np.integer)) or it < 0:
        raise ValueError(f"pinv_iterations must be a non-negative integer, got {it!r}.")
    if pinv not in ("iterative", "exact") or pinv_init not in (None, "per_matrix", "global"):
        raise ValueError(f"pinv must be 'iterative' or 'exact' and pinv_init 'per_matrix' or "
                         f"'global', got pinv={pinv!r}, pinv_init={pinv_init!r}.")
    return dict(attention="nystrom", num_landmarks=int(m), pinv=pinv, pinv_iterations=int(it),
                pinv_init=pinv_init or "per_matrix", mask_landmarks=True)


def hf_rule(config, n):
    """``attention="hf"``: the path transformers takes for this config (skip on first read).

    Exact attention when ``num_landmarks == segment_means_seq_len`` (the released
    checkpoints, at every length); otherwise its landmark path, which works only at
    N = ``segment_means_seq_len``, averages padding into the landmarks and starts the
    pseudo-inverse from one scale for the whole batch.
    """
    if config.model_type == "bert" or config.num_landmarks == config.segment_means_seq_len:
        return {"attention": "exact"}
    if config.inv_coeff_init_option:
        raise ValueError("inv_coeff_init_option = true crashes transformers' landmark path; "
                         "use attention='nystrom' with pinv_init='per_matrix' for the paper's.")
    if config.segment_means_seq_len % config.num_landmarks or n != config.segment_means_seq_len:
        raise ValueError(
            f"transformers' landmark path only works for N = segment_means_seq_len = "
            f"{config.segment_means_seq_len} tokens, a multiple of num_landmarks = "
            f"{config.num_landmarks} (otherwise it crashes or mixes rows of different samples); "
            f"got N = {n}. Pad to that length, or use attention='nystrom', which takes any N.")
    return dict(attention="nystrom", num_landmarks=config.num_landmarks, pinv="iterative",
                pinv_iterations=6, pinv_init="global", mask_landmarks=False)
