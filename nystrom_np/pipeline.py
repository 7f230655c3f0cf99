"""Fill-mask: the model card's example, ``fill_mask("Paris is the [MASK] of France.")``.

Shapes: B texts of one length, N tokens, C hidden size, K masked positions, V vocabulary.

Matches transformers' ``pipeline("fill-mask")`` (4.57) in what it returns: for each
``[MASK]`` the ``top_k`` most probable tokens as ``{"score", "token", "token_str",
"sequence"}``, sorted by score; ``score`` is the softmax over the whole vocabulary,
``token_str`` the decoded token, ``sequence`` the text decoded with the token in the mask's
place (special tokens skipped when the text has one mask; kept, ``[CLS]`` and the other
masks included, when it has several, as transformers writes it).

Two choices of ours:

- The MLM head runs at the masked positions only: its V-wide projection would otherwise be
  about a fifth of the whole forward pass.
- Texts are never padded: the depthwise conv skip reads padded values into real tokens
  (``layers.depthwise_conv``), so a padded batch would not give the pipeline's numbers. Texts
  of equal length share a batch; others run apart, as the pipeline runs each text.

One departure: a list of texts always gives a list (one entry per text). transformers
unwraps a list of one text into that text's result.
"""

import functools
import os
import re
import sys
import warnings

import numpy as np

from .backend import to_numpy
from .checkpoint import REPO_ID
from .model import encode, hf_rule, mlm_head, softmax

# Forms people write for a mask that this tokenizer reads as plain text.
_MASK_LOOKALIKE = re.compile(r"\[mask\]|<mask>", re.IGNORECASE)


@functools.lru_cache(maxsize=2)
def default_model(source=REPO_ID):
    """A checkpoint (hub id or folder), loaded once (``nystrom_np.checkpoint.load``)."""
    from .checkpoint import load

    return load(source)


@functools.lru_cache(maxsize=2)
def default_tokenizer(source=REPO_ID):
    """A checkpoint's tokenizer (its ``spiece.model``), loaded once; its length limit is
    the checkpoint's ``max_position_embeddings``."""
    from .tokenizer import load_tokenizer

    return load_tokenizer(source)


def describe_attention(config, attention="hf", num_landmarks=None) -> str:
    """One plain sentence: which attention ``attention=`` runs for this config, and its cost."""
    if attention == "exact" or (
        attention == "hf" and hf_rule(config, config.segment_means_seq_len)["attention"] == "exact"
    ):
        why = (
            " (transformers' rule: num_landmarks == segment_means_seq_len, true for every "
            "uw-madison checkpoint)"
            if attention == "hf" and config.model_type == "nystromformer" else ""
        )
        return f"attention: exact softmax, O(N^2) in time and memory{why}"
    if attention == "hf":
        return (
            f"attention: transformers' landmark path, M = {config.num_landmarks}, only at "
            f"N = {config.segment_means_seq_len}"
        )
    m = config.num_landmarks if num_landmarks is None else num_landmarks
    return (
        f"attention: Nystrom, M = {m} landmarks, 6 pseudo-inverse iterations, O(N) "
        "(the paper's method, as the uw-madison models were trained)"
    )


def fill_mask(
    text_or_texts,
    top_k=5,
    *,
    model=None,
    tokenizer=None,
    attention="hf",
    num_landmarks=None,
    batch_size=8,
):
    """The ``top_k`` most probable tokens for each ``[MASK]`` of a text (or of each text).

    Parameters
    ----------
    text_or_texts : a str, or a list of str; each holds at least one ``[MASK]``
    top_k : predictions per mask, 1 to V
    model : a ``Model`` with an MLM head, on any device, or a checkpoint to load: a hub id
        (``uw-madison/nystromformer-1024``, ``-2048``, ``-4096``, ...) or a folder (default:
        ``uw-madison/nystromformer-512``; hub ids come from the Hugging Face cache, else are
        downloaded where the hub answers)
    tokenizer : a ``Tokenizer`` (default: that checkpoint's ``spiece.model``, or the 512
        checkpoint's for a ``Model``)
    attention, num_landmarks : as for ``nystrom_np.model.encode``. The default ``"hf"`` runs
        what transformers runs: exact O(N^2) softmax attention for all four uw-madison
        checkpoints. ``"nystrom"`` runs them as they were trained: M = 64 landmarks (the
        config's), O(N), any length up to the position table (``describe_attention``)
    batch_size : texts of equal length run together, at most this many at a time

    Returns
    -------
    For one text: a list of ``top_k`` dicts ``{"score": float, "token": int, "token_str":
    str, "sequence": str}`` by falling score if it has one mask, else one such list per
    mask. For a list of texts: a list of those, one per text.
    """
    single = isinstance(text_or_texts, str)
    if not single and not isinstance(text_or_texts, (list, tuple)):
        raise TypeError(
            f"fill_mask takes a str or a list of str, got {type(text_or_texts).__name__}."
        )
    texts = [text_or_texts] if single else list(text_or_texts)
    if not texts:
        raise ValueError("fill_mask needs at least one text.")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts must be str, got {type(text).__name__} at position {i}.")
    source = REPO_ID if model is None else model
    if isinstance(source, (str, os.PathLike)):
        model = default_model(os.fspath(source))
        tokenizer = default_tokenizer(os.fspath(source)) if tokenizer is None else tokenizer
    tokenizer = default_tokenizer() if tokenizer is None else tokenizer
    vocab = model.config.vocab_size
    if len(tokenizer) != vocab:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} pieces but the model's vocabulary has {vocab}: "
            "they do not belong together."
        )
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
        raise TypeError(f"top_k must be an integer, got {top_k!r}.")
    if not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must lie in [1, {vocab}] (the vocabulary), got {top_k}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or (
        batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")

    ids = [encode_masked(tokenizer, text, model.config.max_position_embeddings) for text in texts]
    groups = {}  # length N -> indices of the texts that long
    for i, row in enumerate(ids):
        groups.setdefault(len(row), []).append(i)
    results = [None] * len(texts)
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            batch = members[start : start + batch_size]
            scores, tokens = _top_k(
                model, np.array([ids[i] for i in batch]), tokenizer.mask_id, top_k,
                attention=attention, num_landmarks=num_landmarks,
            )  # (K, top_k) each, masks in reading order
            if not np.isfinite(scores).all():
                warnings.warn(
                    "the model's scores hold NaN or Inf (NaN or Inf in its weights, or an "
                    "overflow): these predictions are meaningless.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            k = 0
            for i in batch:
                n_masks = ids[i].count(tokenizer.mask_id)
                results[i] = _describe(
                    tokenizer, ids[i], scores[k : k + n_masks], tokens[k : k + n_masks]
                )
                k += n_masks
    return results[0] if single else results


def encode_masked(tokenizer, text, max_length):
    """``[CLS] text [SEP]`` ids of a text with at least one ``[MASK]``, or a ValueError.

    The mask is written exactly ``[MASK]``. Other spellings (``[mask]``, ``<mask>``) are
    plain text to the tokenizer, as to transformers: the error names the one it saw.
    """
    row = tokenizer.encode(text, max_length=sys.maxsize)["input_ids"]  # checked below
    if len(row) > max_length:
        raise ValueError(
            f"{_short(text)} is {len(row)} tokens long ([CLS] and [SEP] included) but the "
            f"model takes at most {max_length}: shorten it."
        )
    if tokenizer.mask_id not in row:
        hint = ""
        lookalike = _MASK_LOOKALIKE.search(text)
        if lookalike:
            hint = (
                f" ({lookalike.group()!r} is read as plain text: the mask token is written "
                f"exactly {tokenizer.mask_token}, upper case, in square brackets)"
            )
        raise ValueError(f"no {tokenizer.mask_token} token in {_short(text)}{hint}.")
    return row


def _top_k(model, input_ids, mask_id, top_k, **options):
    """Probabilities and ids of the ``top_k`` tokens at each masked position.

    Returns (K, top_k) float and (K, top_k) int64 NumPy arrays, masks in reading order.
    """
    hidden = encode(model, input_ids, **options)[-1]  # (B, N, C)
    rows, cols = np.nonzero(input_ids == mask_id)  # K masked positions, row-major order
    xp = model.xp
    logits = mlm_head(model, hidden[xp.asarray(rows), xp.asarray(cols)])  # (K, C) -> (K, V)
    probs = softmax(logits, axis=-1)  # (K, V)
    best = xp.argsort(-probs, axis=-1)[:, :top_k]  # (K, top_k), most probable first
    return to_numpy(xp.take_along_axis(probs, best, axis=-1)), to_numpy(best)


def _describe(tokenizer, row, scores, tokens):
    """The pipeline's dicts for one text: a list per mask (just the list for one mask)."""
    masks = [j for j, i in enumerate(row) if i == tokenizer.mask_id]
    per_mask = []
    for position, mask_scores, mask_tokens in zip(masks, scores, tokens, strict=True):
        predictions = []
        for score, token in zip(mask_scores, mask_tokens, strict=True):
            filled = list(row)
            filled[position] = int(token)
            filled = [i for i in filled if i != tokenizer.pad_id]  # as the pipeline does
            predictions.append(
                {
                    "score": float(score),
                    "token": int(token),
                    "token_str": tokenizer.decode([int(token)]),
                    # one mask: a clean sentence; several: keep [CLS], [SEP] and the other
                    # masks visible, as transformers writes it
                    "sequence": tokenizer.decode(filled, skip_special_tokens=len(masks) == 1),
                }
            )
        per_mask.append(predictions)
    return per_mask[0] if len(per_mask) == 1 else per_mask


def format_table(text, result) -> str:
    """A readable table of one text's ``fill_mask`` result: score, token, sequence."""
    per_mask = result if isinstance(result[0], list) else [result]
    lines = [text]
    for m, predictions in enumerate(per_mask):
        if len(per_mask) > 1:
            lines.append(f"  [MASK] {m + 1} of {len(per_mask)}")
        width = max(5, *(len(p["token_str"]) for p in predictions))
        lines.append(f"  {'score':>6}  {'token':<{width}}  sequence")
        for p in predictions:
            lines.append(f"  {p['score']:6.4f}  {p['token_str']:<{width}}  {p['sequence']}")
    return "\n".join(lines)


def _short(text, width=60):
    return repr(text if len(text) <= width else text[: width - 3] + "...")
