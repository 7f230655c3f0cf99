"""The Nystromformer masked language model: embeddings, post-LN encoder layers, MLM head.

Shapes: B batch, N tokens, H heads, D head size, C = H*D hidden size, I intermediate size,
V vocabulary, K conv taps, M landmarks, L layers.

The forward pass follows transformers' ``NystromformerForMaskedLM`` (4.57) in eval mode:
positions start at 2, q and k each carry D^(-1/4), a depthwise
conv of the (unmasked) values is added to the attention output in every mode, post-LN
layers, a tied MLM decoder. A BERT config runs the same code without the conv skip, with
positions from 0 and the exact erf GELU.

Weights are a nested dict whose names follow the checkpoint's (see ``from_state_dict``);
they are transposed to (in, out), cast and shape-checked once, when the model is built.
"""

import numpy as np

from .attention import check_landmarks, nystrom_attention, softmax_attention
from .layers import ACTIVATIONS, depthwise_conv, embed, layer_norm, linear

ATTENTION_MODES = ("hf", "exact", "nystrom")



# ----------------------------------------------------------------------------- forward


def encoder_layer(
    x,
    mask,
    qkv,
    conv,
    attention_output,
    attention_ln,
    intermediate,
    output,
    output_ln,
    *,
    config,
    mask_conv_input=False,
    **attention,
):
    """One post-LN encoder layer: x -> LN(a + FFN(a)), a = LN(x + Attention(x)).

    Parameters
    ----------
    x : (B, N, C)
    mask : (B, N) bool or None
    qkv, conv, ... : the layer's weights (see ``from_state_dict``)
    mask_conv_input : zero the padded values before the conv skip (the authors' original
        code does; transformers does not, so padding leaks up to K // 2 tokens inward)
    attention : options for ``attend``

    Returns
    -------
    (B, N, C)
    """
    b, n, c = x.shape
    q, k, v = split_qkv(x, qkv, config.num_attention_heads)  # 3 x (B, H, N, D)

    context = attend(q, k, v, mask, **attention)  # (B, H, N, D)
    if conv is not None:
        conv_input = v * mask[:, None, :, None] if mask_conv_input and mask is not None else v
        context += depthwise_conv(conv_input, conv)
    context = context.transpose(0, 2, 1, 3).reshape(b, n, c)  # (B, H, N, D) -> (B, N, C)

    eps, act = config.layer_norm_eps, ACTIVATIONS[config.hidden_act]
    # The residual sums are added in place into the fresh outputs of ``linear``.
    attended = linear(context, **attention_output)
    attended += x
    a = layer_norm(attended, **attention_ln, eps=eps)
    hidden = linear(a, **intermediate)  # (B, N, I), the widest array of the layer
    fed = linear(act(hidden, out=hidden), **output)  # the activation in place
    fed += a
    return layer_norm(fed, **output_ln, eps=eps)


def split_qkv(x, qkv, heads):
    """q, k and v of every head from one fused product: (B, N, C) -> 3 x (B, H, N, D)."""
    b, n, c = x.shape
    fused = linear(x, **qkv).reshape(b, n, 3, heads, c // heads)  # (B, N, 3C) -> (B,N,3,H,D)
    return fused.transpose(2, 0, 3, 1, 4)  # (B, N, 3, H, D) -> (3, B, H, N, D)


def attend(q, k, v, mask, mode, num_landmarks, pinv, iterations, init, mask_landmarks):
    """Exact or Nystrom attention, as ``resolve_attention`` decided for this input."""
    if mode == "exact":
        return softmax_attention(q, k, v, mask)
    # encode has checked num_landmarks against the real lengths, once for every layer.
    return nystrom_attention(
        q, k, v, mask, num_landmarks, pinv, iterations, init, mask_landmarks, check_lengths=False
    )


def encode(
    model,
    input_ids,
    attention_mask=None,
    token_type_ids=None,
    *,
    attention="hf",
    num_landmarks=None,
    pinv="iterative",
    pinv_iterations=6,
    pinv_init=None,
    mask_conv_input=False,
):
    """The base model: hidden states after the embeddings and after every layer.

    Parameters
    ----------
    model : Model
    input_ids : (B, N) integer array (NumPy, or CuPy for a model on the GPU)
    attention_mask : (B, N) of 0/1 or bool, 1 for real tokens; None: all real
    token_type_ids : (B, N) integers below ``type_vocab_size``; None: all 0
    attention : ``"hf"`` transformers' rule: exact softmax when the config's
        ``num_landmarks == segment_means_seq_len`` (so for the released checkpoint, at
        every length), else its landmark path (N must equal ``segment_means_seq_len``,
        landmarks average padding too, one pseudo-inverse scale for the whole batch);
        ``"exact"`` softmax attention; ``"nystrom"`` the paper's method for any N
    num_landmarks : M for ``"nystrom"`` (default: the config's)
    pinv : ``"iterative"`` or ``"exact"`` (SVD), for ``"nystrom"``
    pinv_iterations : iterations of the iterative pseudo-inverse, for ``"nystrom"``
    pinv_init : ``"per_matrix"`` (default, the paper's) or ``"global"`` (transformers')
    mask_conv_input : zero padded values before the conv skip (see ``encoder_layer``)

    Returns
    -------
    list of L + 1 arrays (B, N, C); the last is transformers' ``last_hidden_state``
    """
    config, params = model.config, model.params
    ids, mask, types = check_inputs(model, input_ids, attention_mask, token_type_ids)
    options = resolve_attention(
        config, ids.shape[1], attention, num_landmarks, pinv, pinv_iterations, pinv_init
    )
    if options["mask_landmarks"]:
        check_landmarks(mask, options["num_landmarks"])

    emb = params["embeddings"]
    x = embed(ids, types, emb["word"], emb["position"], emb["token_type"], config.position_offset)
    x = layer_norm(x, **emb["ln"], eps=config.layer_norm_eps)  # (B, N, C)
    hidden = [x]
    for layer in params["layers"]:
        x = encoder_layer(
            x, mask, **layer, config=config, mask_conv_input=mask_conv_input, **options
        )
        hidden.append(x)
    return hidden


def mlm_head(model, x):
    """Masked-LM logits: LN(act(x Wt + bt)) E_word^T + bias, (..., C) -> (..., V).

    Apply it to the rows you need only (e.g. the [MASK] positions): the V-wide projection is
    a large share of a forward pass.
    """
    head = model.params["head"]
    if head is None:
        raise ValueError("this model has no MLM head (it was loaded without cls.* weights).")
    act = ACTIVATIONS[model.config.hidden_act]
    t = act(linear(x, **head["transform"]))
    t = layer_norm(t, **head["transform_ln"], eps=model.config.layer_norm_eps)
    return linear(t, model.params["embeddings"]["word"].T, head["bias"])  # (..., C) @ (C, V)


def forward(
    model,
    input_ids,
    attention_mask=None,
    token_type_ids=None,
    *,
    output_hidden_states=False,
    **options,
):
    """Masked-LM logits of a batch, as transformers' ``NystromformerForMaskedLM``.

    Parameters
    ----------
    model, input_ids, attention_mask, token_type_ids, options : as for ``encode``
    output_hidden_states : also return the L + 1 hidden states

    Returns
    -------
    logits (B, N, V), or (logits, hidden_states) with ``output_hidden_states``
    """
    if not model.has_head:
        raise ValueError("this model has no MLM head; use encode() for its hidden states.")
    hidden = encode(model, input_ids, attention_mask, token_type_ids, **options)
    logits = mlm_head(model, hidden[-1])
    return (logits, hidden) if output_hidden_states else logits


# ------------------------------------------------------------------- input validation


def check_inputs(model, input_ids, attention_mask, token_type_ids):
    """Validate a batch at the public boundary and put it on the model's device.

    Returns (ids, mask, types): (B, N) integer ids, (B, N) bool mask or None, (B, N) types.
    """
    xp, config = model.xp, model.config
    ids = _as_integer_array(xp, input_ids, "input_ids")
    if ids.ndim != 2:
        raise ValueError(
            f"input_ids must be 2-D (batch, tokens), got shape {ids.shape}; "
            "for one sequence pass ids[None]."
        )
    b, n = ids.shape
    if b == 0 or n == 0:
        raise ValueError(f"input_ids is empty (shape {ids.shape}); give at least one token.")
    n_max = model.params["embeddings"]["position"].shape[0] - config.position_offset
    if n > n_max:
        raise ValueError(
            f"input has {n} tokens but the position table allows at most {n_max} "
            f"(max_position_embeddings = {config.max_position_embeddings}); truncate it."
        )
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= config.vocab_size:
        raise ValueError(
            f"input_ids must lie in [0, {config.vocab_size}) (the vocabulary), "
            f"got values from {lo} to {hi}."
        )

    mask = None
    if attention_mask is not None:
        mask = xp.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(
                f"attention_mask has shape {mask.shape}, input_ids {ids.shape}; they must match."
            )
        if mask.dtype != bool:
            if mask.dtype.kind not in "iuf" or not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("attention_mask must hold only 0/1 (or True/False).")
            mask = mask == 1

    if token_type_ids is None:
        types = xp.zeros_like(ids)
    else:
        types = _as_integer_array(xp, token_type_ids, "token_type_ids")
        if types.shape != ids.shape:
            raise ValueError(
                f"token_type_ids has shape {types.shape}, input_ids {ids.shape}; they must match."
            )
        if int(types.min()) < 0 or int(types.max()) >= config.type_vocab_size:
            raise ValueError(
                f"token_type_ids must lie in [0, {config.type_vocab_size}) "
                f"(type_vocab_size), got values from {int(types.min())} to {int(types.max())}."
            )
    return ids, mask, types


def _as_integer_array(xp, values, name):
    array = xp.asarray(values)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {array.dtype}.")
    return array


def resolve_attention(config, n, mode, num_landmarks, pinv, iterations, init):
    """Turn the user's attention options into what ``attend`` runs, or raise why not."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {mode!r}.")
    if mode == "hf":
        if num_landmarks is not None or pinv != "iterative" or init is not None:
            raise ValueError(
                "attention='hf' follows the config exactly; num_landmarks, pinv and pinv_init "
                "are for attention='nystrom'."
            )
        if config.model_type == "bert" or config.num_landmarks == config.segment_means_seq_len:
            mode = "exact"
        else:
            _check_hf_landmark_path(config, n)
            return dict(
                mode="nystrom",
                num_landmarks=config.num_landmarks,
                pinv="iterative",
                iterations=6,
                init="global",
                mask_landmarks=False,
            )
    if mode == "exact":
        return dict(mode="exact", num_landmarks=None, pinv=None, iterations=None, init=None,
                    mask_landmarks=None)
    m = config.num_landmarks if num_landmarks is None else num_landmarks
    if not isinstance(m, (int, np.integer)) or isinstance(m, bool) or not 1 <= m <= n:
        raise ValueError(f"num_landmarks must be an integer from 1 to N = {n}, got {m!r}.")
    if pinv not in ("iterative", "exact"):
        raise ValueError(f"pinv must be 'iterative' or 'exact', got {pinv!r}.")
    if not isinstance(iterations, (int, np.integer)) or iterations < 0:
        raise ValueError(f"pinv_iterations must be a non-negative integer, got {iterations!r}.")
    init = "per_matrix" if init is None else init
    if init not in ("per_matrix", "global"):
        raise ValueError(f"pinv_init must be 'per_matrix' or 'global', got {init!r}.")
    return dict(
        mode="nystrom", num_landmarks=int(m), pinv=pinv, iterations=int(iterations), init=init,
        mask_landmarks=True,
    )


def _check_hf_landmark_path(config, n):
    """Raise where transformers' landmark path would crash or silently scramble rows."""
    if config.inv_coeff_init_option:
        raise ValueError(
            "inv_coeff_init_option = true crashes transformers' landmark path; "
            "use attention='nystrom' with pinv_init='per_matrix' for the paper's init."
        )
    if config.segment_means_seq_len % config.num_landmarks:
        raise ValueError(
            f"transformers' landmark path needs num_landmarks ({config.num_landmarks}) to "
            f"divide segment_means_seq_len ({config.segment_means_seq_len}); "
            "use attention='nystrom'."
        )
    if n != config.segment_means_seq_len:
        raise ValueError(
            f"transformers' landmark path only works for N = segment_means_seq_len = "
            f"{config.segment_means_seq_len} tokens (other lengths crash or mix rows of "
            f"different samples); got N = {n}. Pad to that length, or use "
            "attention='nystrom', which handles any N."
        )
