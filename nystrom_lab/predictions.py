"""From attention error to prediction error: an approximation in every layer, and what a
user of the model sees.

Shapes: B texts, N tokens, C hidden size, V vocabulary, K masked positions, Q queries.

``encode_with`` runs the model's own forward (``nystrom_np.model.encode``) with one
attention method in every layer: exact, Nystrom (the model's ``attention="nystrom"``), or
one of the other approximations of ``nystrom_lab.study.ATTENTION`` (Linformer, Performer,
sliding window, truncated SVD), put in the place of the exact softmax attention for the
duration of the call (``swapped_attention``), so no layer code is copied. Everything else
(embeddings, the conv skip of a Nystromformer, the feed-forward layers, the LayerNorms)
runs unchanged.

What a user sees, against exact attention:

- a sentence-embedding model (all-MiniLM-L6-v2): ``embed`` (mean over real tokens, then
  unit length, as sentence-transformers pools it), the cosine of each text's embedding to
  its exact one, and retrieval (``recall_at``): each query should find its own document
  among all of them by cosine similarity. ``pydoc_pairs`` builds such a task from the
  Python Language Reference that ships with CPython: a topic's heading is the query, its
  body the document;
- a masked language model (the Nystromformer checkpoint): ``masked_predictions``, the
  agreement of the predicted words with exact attention's (top-1, overlap of the top-5),
  the KL divergence of the predicted distributions, and how often the masked word itself
  is predicted.

References: Reimers & Gurevych 2019 (Sentence-BERT, arXiv 1908.10084) for the pooling;
Xiong et al. 2021 (Nystromformer, arXiv 2102.03902).
"""

import contextlib
import re

import numpy as np

import nystrom_np.model as model_module
from nystrom_np.backend import to_numpy
from nystrom_np.model import encode, mlm_head

from .study import ATTENTION, SEEDED, _log_softmax

METHODS = ("exact", *ATTENTION)  # "exact", "nystrom", "linformer", ...


@contextlib.contextmanager
def swapped_attention(method, budget, seed=0, **options):
    """Within the block, the model's exact attention is ``method`` at ``budget``.

    Replaces ``nystrom_np.model.softmax_attention``, which every layer of ``encode(...,
    attention="exact")`` calls, and puts it back afterwards, also on an error.
    """
    if method not in ATTENTION:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(ATTENTION)}.")
    fn = ATTENTION[method]
    if method in SEEDED:
        options = {"seed": seed, **options}
    original = model_module.softmax_attention

    def attention(q, k, v, mask=None):
        return fn(q, k, v, mask, budget, **options)  # (B, H, N, D)

    model_module.softmax_attention = attention
    try:
        yield
    finally:
        model_module.softmax_attention = original


def encode_with(model, ids, method="exact", budget=None, mask=None, seed=0):
    """The L + 1 hidden states (B, N, C) with ``method`` attention in every layer.

    Parameters
    ----------
    model : Model
    ids : (B, N) integer array
    method : "exact", "nystrom" (the model's own, M = ``budget`` landmarks) or another
        method of ``study.ATTENTION`` (budget: its P, R, W or rank)
    budget : M (ignored for "exact")
    mask : (B, N) 0/1, 1 for real tokens; None: all real
    seed : of Linformer's projections and Performer's features
    """
    if method == "exact":
        return encode(model, ids, mask, attention="exact")
    if method == "nystrom":
        return encode(model, ids, mask, attention="nystrom", num_landmarks=int(budget))
    with swapped_attention(method, int(budget), seed):
        return encode(model, ids, mask, attention="exact")


def embed(model, ids, mask=None, method="exact", budget=None, seed=0):
    """Sentence embeddings (B, N) -> (B, C) with ``method`` attention (see ``pool``)."""
    return pool(encode_with(model, ids, method, budget, mask, seed)[-1], mask)


def pool(hidden, mask=None):
    """The mean of the last hidden states over real tokens, made unit length, (B, N, C) ->
    (B, C) NumPy: all-MiniLM-L6-v2's pooling."""
    hidden = to_numpy(hidden)
    weights = np.ones(hidden.shape[:2]) if mask is None else np.asarray(mask, hidden.dtype)
    pooled = (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdims=True)  # (B, C)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def recall_at(queries, documents, ks=(1, 5)):
    """Retrieval by cosine similarity: query i's relevant document is document i.

    Parameters
    ----------
    queries : (Q, C) unit vectors
    documents : (Q, C) unit vectors
    ks : cut-offs

    Returns
    -------
    dict k -> the fraction of queries whose document ranks among the k most similar
    """
    scores = queries @ documents.T  # (Q, C) @ (C, Q) -> (Q, Q)
    own = np.diag(scores)[:, None]  # (Q, 1)
    rank = (scores > own).sum(axis=1)  # 0: its own document is the most similar
    return {k: float((rank < k).mean()) for k in ks}


def pydoc_pairs(tokenizer, n_tokens):
    """Query / document pairs from the Python Language Reference (``pydoc_data.topics``).

    Each topic's heading (its first line, e.g. 'The "assert" statement') is a query; its
    body, cut to exactly ``n_tokens`` tokens (``[CLS]``, N - 2 pieces, ``[SEP]``), the
    document. Topics shorter than that, and repeated headings, are left out.

    Returns
    -------
    (headings: list of Q str, documents: (Q, N) int64 NumPy array)
    """
    from pydoc_data.topics import topics

    headings, rows, seen = [], [], set()
    for name in sorted(topics):
        heading, _, body = topics[name].partition("\n")
        body = re.sub(r"^[*=-]+\n", "", body.lstrip("\n"))  # the heading's underline
        pieces = tokenizer.piece_ids(" ".join(body.split()))
        if heading in seen or len(pieces) < n_tokens - 2:
            continue
        seen.add(heading)
        headings.append(heading)
        rows.append([tokenizer.cls_id, *pieces[: n_tokens - 2], tokenizer.sep_id])
    return headings, np.array(rows, dtype=np.int64)


def encode_queries(tokenizer, texts):
    """Texts -> (Q, N) ids padded with 0 on the right, and the (Q, N) 0/1 mask."""
    rows = [[tokenizer.cls_id, *tokenizer.piece_ids(t), tokenizer.sep_id] for t in texts]
    n = max(len(r) for r in rows)
    ids = np.array([r + [0] * (n - len(r)) for r in rows], dtype=np.int64)
    mask = np.array([[1] * len(r) + [0] * (n - len(r)) for r in rows], dtype=np.int64)
    return ids, mask


def masked_predictions(model, ids, positions, targets, method, budget=None, seed=0,
                       exact=None):
    """Masked-word predictions with ``method`` attention against exact attention.

    Parameters
    ----------
    model : Model with an MLM head
    ids : (B, N) ids with masks at ``positions``
    positions : (B, N) bool, True at the K masked tokens
    targets : (B, N) the original ids (the words that were masked)
    method, budget, seed : as for ``encode_with``
    exact : the exact run's (K, V) log-probabilities, to reuse (``masked_log_probs``)

    Returns
    -------
    dict of floats: ``top1`` (the same most likely word), ``top5`` (the mean overlap of the
    two top-5 lists, 0 to 1), ``kl`` (mean KL(exact || method), nats), ``accuracy`` (the
    masked word is the most likely one) and ``exact_accuracy`` (the same for exact attention)
    """
    log_exact = masked_log_probs(model, ids, positions) if exact is None else exact
    log_method = masked_log_probs(model, ids, positions, method, budget, seed)
    log_exact, log_method = log_exact.astype(np.float64), log_method.astype(np.float64)  # KL
    truth = np.asarray(targets)[np.asarray(positions)]  # (K,)
    best_exact, best = log_exact.argmax(-1), log_method.argmax(-1)  # (K,)
    top5_exact = np.argsort(-log_exact, axis=-1)[:, :5]  # (K, 5)
    top5 = np.argsort(-log_method, axis=-1)[:, :5]  # (K, 5)
    overlap = [len(set(a) & set(b)) / 5 for a, b in zip(top5_exact, top5, strict=True)]
    kl = (np.exp(log_exact) * (log_exact - log_method)).sum(-1)  # (K,)
    return {
        "top1": float((best == best_exact).mean()),
        "top5": float(np.mean(overlap)),
        "kl": float(kl.mean()),
        "accuracy": float((best == truth).mean()),
        "exact_accuracy": float((best_exact == truth).mean()),
    }


def masked_log_probs(model, ids, positions, method="exact", budget=None, seed=0):
    """(K, V) NumPy log-probabilities of the words at the masked ``positions``."""
    hidden = encode_with(model, ids, method, budget, seed=seed)[-1]  # (B, N, C)
    rows, cols = np.nonzero(np.asarray(positions))  # K positions, row-major
    xp = model.xp
    picked = hidden[xp.asarray(rows), xp.asarray(cols)]  # (K, C)
    return to_numpy(_log_softmax(mlm_head(model, picked)))  # (K, V)
