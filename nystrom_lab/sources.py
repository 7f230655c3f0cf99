"""Where the book's inputs come from: which weights a chapter runs on, and synthetic q, k.

Shapes: B batch, H heads, N tokens, D head size.

Weights. ``resolve_weights`` gives a chapter the real ``uw-madison/nystromformer-512``
checkpoint when it can find it, and otherwise a seeded random model of the same config,
with a note (``show_note``) that says which one the chapter ran on and what that means.
The real checkpoint is looked for, in order, at

1. a path passed by the caller,
2. the environment variable ``NYSTROM_NP_CHECKPOINT`` (a folder or a weights file),
3. the Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME`` / ``~/.cache/huggingface``),
4. the hub itself (``HF_ENDPOINT``, by default huggingface.co) when it answers: the files
   are downloaded once into that cache, with a progress bar, and found there next time.

``cached_weights`` gives one of the longer siblings (``LONG_REPO_IDS``) when the Hugging
Face cache holds it; those are never downloaded for the book.

Finding and reading the files is ``nystrom_np.checkpoint``'s job; this module only decides
what to do when that fails. A path the user named (1, 2) that cannot be loaded is an error:
a book silently built on random weights after a typo would mislead. A checkpoint that is
simply not there (3, 4) is the normal offline case and gives the random fallback.

Synthetic attention inputs. ``smooth_qk`` makes q and k that vary smoothly along the
sequence, so that their softmax attention matrix has the low-rank structure that the
Nystrom method exploits (independent Gaussian q and k make the landmark matrix
ill-conditioned, a poor stand-in for real activations: see the pseudo-inverse chapter).
"""

import contextlib
import dataclasses
import os
from pathlib import Path

import numpy as np

from nystrom_np import checkpoint
from nystrom_np.config import Config
from nystrom_np.weights import Model, random_model

REPO_ID = checkpoint.REPO_ID
LONG_REPO_IDS = ("uw-madison/nystromformer-4096", "uw-madison/nystromformer-2048",
                 "uw-madison/nystromformer-1024")  # the longer siblings, longest first
ENV_VAR = "NYSTROM_NP_CHECKPOINT"
RANDOM_SEED = 0


@dataclasses.dataclass(frozen=True)
class Weights:
    """The model a chapter runs on, and what the reader should know about it."""

    model: Model
    real: bool  # True: weights read from a checkpoint; False: the seeded random stand-in
    source: str  # the weights file, or "random_model(Config(), seed=0)"
    note: str  # one paragraph for the reader: what ran, and what that means for the results
    spiece: Path | None = None  # the SentencePiece tokenizer file next to real weights
    reason: str = ""  # why the random fallback was used (empty for real weights)


def resolve_weights(
    path=None, *, dtype=np.float32, device="cpu", download=True, fallback_config=None
) -> Weights:
    """The real checkpoint if it can be found, else a seeded random model of its config.

    Parameters
    ----------
    path : a checkpoint folder or weights file to use; None looks at ``NYSTROM_NP_CHECKPOINT``,
        then the Hugging Face cache, then the hub
    dtype : the weights' dtype (float32, or float64 for reference runs)
    device : ``"cpu"`` (NumPy) or ``"gpu"`` (CuPy)
    download : allow a download from the hub when huggingface_hub and a network are there
    fallback_config : config of the random stand-in (default ``Config()``, the real one's)

    Returns
    -------
    Weights

    Raises
    ------
    FileNotFoundError, ValueError
        when ``path`` or ``NYSTROM_NP_CHECKPOINT`` names weights that cannot be loaded, or
        when the checkpoint is found (in the cache, or downloaded) but fails its checks
    """
    named = path if path is not None else os.environ.get(ENV_VAR, "").strip() or None
    if named is not None:
        origin = "the path given" if path is not None else f"${ENV_VAR}"
        try:
            return _load(named, dtype, device)
        except (OSError, ValueError) as e:
            kind = FileNotFoundError if isinstance(e, OSError) else ValueError
            raise kind(f"{origin} = {str(named)!r} cannot be loaded: {e}") from e

    online = download and checkpoint.hub_reachable()
    try:
        with _hub_offline(not online):
            return _load(REPO_ID, dtype, device)
    except FileNotFoundError as e:  # not there: the normal offline case
        if online:
            reason = getattr(e, "reason", None) or _first_line(e)
            why = ("it is not in the Hugging Face cache and the download failed "
                   f"({reason.removeprefix('download failed: ')})")
        elif download:
            why = "it is not in the Hugging Face cache and huggingface.co is unreachable"
        else:
            why = "it is not in the Hugging Face cache and downloads were not allowed"
        return _fallback(f"{REPO_ID} was not found: {why}", fallback_config, dtype, device)
    except ValueError as e:  # found but broken: say so rather than quietly run on random weights
        raise ValueError(f"{REPO_ID} was found but cannot be loaded: {e}") from e


def cached_weights(repo_id, *, dtype=np.float32, device="cpu") -> Weights | None:
    """``repo_id`` from the Hugging Face cache, or None when the cache does not hold it.

    Never downloads: the book fetches only the 512 model by default, not the long siblings
    (437 MB each). A cached checkpoint that fails its checks raises, as in ``resolve_weights``.
    """
    with _hub_offline(True):
        try:
            return _load(repo_id, dtype, device)
        except FileNotFoundError:
            return None


def _load(source, dtype, device) -> Weights:
    """Load ``source`` (found once) with the checkpoint module; find its tokenizer file too."""
    config_path, weights_file = checkpoint.find_checkpoint(source)
    model = checkpoint.load(weights_file, config=config_path, dtype=dtype, device=device)
    spiece = weights_file.parent / "spiece.model"
    if not spiece.is_file():
        spiece = _fetch_spiece() if str(source) == REPO_ID else None
    where = f"`{weights_file}`"
    if str(source) == REPO_ID:
        where = f"the Hugging Face checkpoint `{REPO_ID}` ({where})"
    tokenizer = (
        f"its tokenizer is `{spiece}`"
        if spiece is not None
        else "no `spiece.model` was found next to it, so text examples cannot be tokenized"
    )
    c = model.config
    note = (
        f"This chapter ran on the weights loaded from {where}: "
        f"{c.num_hidden_layers} layers, {c.num_attention_heads} heads, hidden size "
        f"{c.hidden_size}, {np.dtype(model.dtype).name}; {tokenizer}. Attention patterns, "
        "predictions and approximation errors are those of the model these weights hold: "
        "of a trained model when they are a checkpoint uw-madison released."
    )
    return Weights(model, True, str(weights_file), note, spiece)


def _fallback(reason, config, dtype, device) -> Weights:
    """The offline stand-in: a seeded random model, by default of the real checkpoint's config."""
    config = Config() if config is None else config
    call = f"random_model(Config(), seed={RANDOM_SEED})"
    if config != Config():
        call = f"random_model(<a reduced Config>, seed={RANDOM_SEED})"
    model = random_model(config, seed=RANDOM_SEED, dtype=dtype)
    if device != "cpu":
        model = model.to(device)
    same = (
        "They have the real checkpoint's config and shapes, so the code path, array shapes, "
        "costs, timings and parity checks are those of the real model"
        if config == Config()
        else "Their config is reduced, so only the code path and parity checks carry over"
    )
    note = (
        f"This chapter ran on **random weights** (`{call}`, {np.dtype(model.dtype).name}), "
        f"because {reason}. {same}. But attention patterns, predicted words and the sizes "
        "of approximation errors on random weights are meaningless: do not read anything "
        f"into them. To use the pretrained `{REPO_ID}`, put its folder (`config.json`, "
        f"`pytorch_model.bin`, `spiece.model`) where `${ENV_VAR}` points, or into the "
        "Hugging Face cache, and rebuild: nothing else changes."
    )
    return Weights(model, False, call, note, None, reason)


def _first_line(error) -> str:
    text = f"{type(error).__name__}: {error}"
    return text.splitlines()[0][:200]


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """Set ``HF_HUB_OFFLINE=1`` for the duration (cache only, no network), then restore it."""
    if not offline:
        yield
        return
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = before


def _fetch_spiece():
    """``spiece.model`` of the hub checkpoint, fetched into its cache snapshot when online."""
    if not checkpoint.hub_reachable():
        return None
    try:
        return checkpoint.fetch_file(REPO_ID, "spiece.model")
    except (OSError, ImportError):  # a missing tokenizer is reported in the note, not raised
        return None


def show_note(weights: Weights):
    """A visible admonition for a chapter: which weights it ran on and what that means.

    Returns an ``IPython.display.Markdown`` holding a MyST ``{note}`` (real weights) or
    ``{warning}`` (random weights) block; make it the last expression of a cell. The book's
    ``_config.yml`` renders Markdown outputs as MyST (``nb_render_markdown_format: myst``).
    """
    from IPython.display import Markdown

    return Markdown(note_markdown(weights))


def admonition(kind, title, text):
    """A visible MyST admonition (``note``, ``warning``, ...) made by a code cell; it renders
    as one typed in the page (see ``show_note``)."""
    from IPython.display import Markdown

    return Markdown(_admonition_markdown(kind, title, text))


def _admonition_markdown(kind, title, text):
    """MyST for an admonition of style ``kind`` headed ``title``.

    Docutils' ``note`` and ``warning`` directives take no title: ``:::{note} Title`` makes
    "Title" the first words of the body. The generic ``admonition`` directive takes the
    title as its argument and the style as its class.
    """
    return f":::{{admonition}} {title}\n:class: {kind}\n{text}\n:::\n"


def note_markdown(weights: Weights) -> str:
    """The MyST Markdown of ``show_note``: an admonition with a title and the note."""
    kind, title = ("note", "Checkpoint weights") if weights.real else ("warning", "Random weights")
    return _admonition_markdown(kind, title, weights.note)


# --------------------------------------------------------------- synthetic attention inputs


def smooth_qk(n, d, *, batch=1, heads=1, width=8.0, shared=0.5, seed=0, dtype=np.float64):
    """Random q and k that vary smoothly along the tokens, like activations of a text model.

    Each channel is white noise convolved with a Gaussian of standard deviation ``width``
    tokens, then standardised, so q k^T / sqrt(D) has entries of order 1 and nearby tokens
    attend alike: the attention matrix is close to low rank. ``shared`` of the variance of
    k is q's own signal (0: q and k independent; 1: k = q), which makes tokens attend most
    to themselves and their neighbours, as many heads of a trained model do.

    Parameters
    ----------
    n, d : N tokens, D channels per head
    batch, heads : B, H
    width : smoothing length in tokens (0: no smoothing, independent Gaussian tokens)
    shared : fraction of the variance of k shared with q, in [0, 1]
    seed : seed of the NumPy generator
    dtype : of the result

    Returns
    -------
    q, k : (B, H, N, D) each, unscaled (the attention functions apply D^(-1/4) to each)
    """
    if not 0 <= shared <= 1:
        raise ValueError(f"shared must lie in [0, 1], got {shared}.")
    if width < 0:
        raise ValueError(f"width must be >= 0 tokens, got {width}.")
    rng = np.random.default_rng(seed)
    q = _smooth_noise(rng, (batch, heads, n, d), width)  # (B, H, N, D)
    k = np.sqrt(shared) * q + np.sqrt(1 - shared) * _smooth_noise(rng, q.shape, width)
    return q.astype(dtype), k.astype(dtype)


def _smooth_noise(rng, shape, width):
    """Standard normal noise smoothed along axis -2 by a Gaussian of std ``width``."""
    n = shape[-2]
    half = int(np.ceil(3 * width))
    x = rng.standard_normal((*shape[:-2], n + 2 * half, shape[-1]))  # (..., N + 2h, D)
    if half:
        taps = np.exp(-0.5 * (np.arange(-half, half + 1) / width) ** 2)  # (2h + 1,)
        windows = np.lib.stride_tricks.sliding_window_view(x, 2 * half + 1, axis=-2)
        x = windows @ (taps / np.linalg.norm(taps))  # (..., N, D, 2h+1) @ (2h+1,) -> (..., N, D)
    return (x - x.mean(axis=-2, keepdims=True)) / x.std(axis=-2, keepdims=True)
