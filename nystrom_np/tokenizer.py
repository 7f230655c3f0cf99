"""The checkpoint's tokenizer: ALBERT-style SentencePiece (``spiece.model``), uncased.

Shapes: B batch, N tokens (``[CLS]`` and ``[SEP]`` included).

References: ALBERT (Lan et al., ICLR 2020) and its SentencePiece vocabulary, which
``uw-madison/nystromformer-512`` reuses (its config names ``AlbertTokenizer``). We match
transformers' slow ``AlbertTokenizer`` (4.57) on purpose, rule by rule; every rule below was
found by experiment against it and is held by ``tests/test_tokenizer.py``. The unigram model itself
(pieces, scores, Viterbi segmentation, NFKC normalisation) is the ``sentencepiece``
library's; everything around it is written here.

Text -> ids, in order:

1. Special tokens (``<pad> <unk> [CLS] [SEP] [MASK]``) written in the text become their
   ids. Before they are looked for, every other character is lower-cased on its own, so
   ``<PAD>`` counts as ``<pad>`` but ``[mask]`` and ``[Mask]`` are plain text.
2. ``[MASK]`` eats the whitespace on its left (its ``lstrip``).
3. Each stretch of text between special tokens is normalised (``normalize``) and cut into
   pieces by the unigram model; a piece ending in "digit," is split before the comma.
4. Template ``[CLS] A [SEP]`` or ``[CLS] A [SEP] B [SEP]``, token types 0 for ``[CLS] A
   [SEP]`` and 1 for ``B [SEP]``; truncation ``longest_first``; padding on the right.

Ids -> text: ``decode``, as ``AlbertTokenizer.decode`` writes it.

transformers' fast ``AlbertTokenizerFast`` (what ``AutoTokenizer`` picks when a
``tokenizer.json`` is present) agrees with the slow one on ordinary text but not on every
edge: it has no digit-comma rule and treats whitespace around special tokens and after a
quote mark differently. We follow the slow one.

Special ids are read from the model file, never assumed. (The ALBERT layout is ``<pad>``
0, ``<unk>`` 1, ``[CLS]`` 2, ``[SEP]`` 3, ``[MASK]`` 4; ``config.pad_token_id`` = 1 is a
leftover of the checkpoint and is *not* the padding id.)
"""

import re
import shlex
import unicodedata
from pathlib import Path

import numpy as np

from .checkpoint import (
    REPO_ID,
    TOKENIZER_LIMIT,
    WEIGHT_FILES,
    fetch_file,
    find_checkpoint,
    hub_reachable,
)
from .config import read_json

SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
MODEL_FILE = "spiece.model"
MAX_LENGTH = 510  # max_position_embeddings of nystromformer-512, [CLS] and [SEP] included
# tokenizer_config.json keys we honour (AlbertTokenizer's init arguments), and their defaults
OPTIONS = {
    "do_lower_case": True,
    "remove_space": True,
    "keep_accents": False,
    "clean_up_tokenization_spaces": False,
}
# transformers' optional decode clean-up: a space before these is removed
_CLEAN_UP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


class Tokenizer:
    """ALBERT SentencePiece tokenizer: ``encode``, ``encode_batch``, ``decode``.

    Parameters
    ----------
    model_file : path of a ``spiece.model``, or of a directory holding one (its
        ``tokenizer_config.json`` and ``config.json`` are read when present)
    max_length : longest encoding allowed, special tokens included (default: the
        directory's ``config.json`` ``max_position_embeddings``, else 510)
    do_lower_case, remove_space, keep_accents, clean_up_tokenization_spaces :
        AlbertTokenizer's options (default: the directory's ``tokenizer_config.json``,
        else ALBERT uncased: lower-case, collapse spaces, strip accents, no clean-up)
    """

    def __init__(self, model_file, *, max_length=None, **options):
        try:
            import sentencepiece
        except ImportError:
            raise ImportError(
                "the tokenizer needs the sentencepiece library: `pip install sentencepiece`."
            ) from None
        path = Path(model_file).expanduser()
        directory = path if path.is_dir() else None
        if directory is not None:
            path = directory / MODEL_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no SentencePiece model at {path}")
        if path.stat().st_size > TOKENIZER_LIMIT:  # sentencepiece would read it whole
            raise ValueError(
                f"{path} is over {TOKENIZER_LIMIT} bytes; a spiece.model is a few MB at most."
            )
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise TypeError(f"unknown tokenizer options {sorted(unknown)}; known: {list(OPTIONS)}")
        saved, saved_max = _read_directory(directory) if directory else ({}, None)
        self.options = {**OPTIONS, **saved, **options}
        self.max_length = max_length or saved_max or MAX_LENGTH
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or (
            self.max_length < 2
        ):
            raise ValueError(
                f"max_length must be an integer >= 2 ([CLS] and [SEP]), got {self.max_length!r}."
            )

        self.path = path
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path} is not a SentencePiece model: {e}") from None
        self.ids = {}  # "pad" -> its id in this model, ...
        for name, piece in SPECIAL_TOKENS.items():
            i = self.sp.piece_to_id(piece)  # unknown pieces come back as the <unk> id
            if self.sp.id_to_piece(i) != piece:
                raise ValueError(
                    f"{path} has no piece {piece!r}: it is not an ALBERT-style spiece.model "
                    f"(needs {list(SPECIAL_TOKENS.values())})."
                )
            self.ids[name] = i
        self.pad_id, self.unk_id = self.ids["pad"], self.ids["unk"]
        self.cls_id, self.sep_id, self.mask_id = self.ids["cls"], self.ids["sep"], self.ids["mask"]
        self.mask_token = SPECIAL_TOKENS["mask"]
        self.special_ids = frozenset(self.ids.values())
        by_length = sorted(SPECIAL_TOKENS.values(), key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, by_length)) + ")")

    def __len__(self) -> int:
        """V, the number of pieces (ids run from 0 to V - 1)."""
        return self.sp.get_piece_size()

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab={len(self)}, max_length={self.max_length})"

    # ------------------------------------------------------------------ text -> pieces

    def normalize(self, text: str) -> str:
        """ALBERT's normalisation of one stretch of text (no special tokens in it)."""
        if self.options["remove_space"]:
            # strip both ends, collapse every run of (Unicode) whitespace to one space
            text = " ".join(text.split())
        # LaTeX-style quotes ``like this'' become plain double quotes
        text = text.replace("``", '"').replace("''", '"')
        if not self.options["keep_accents"]:
            # accents: decompose (NFKD: é -> e + U+0301) and drop the combining marks
            text = unicodedata.normalize("NFKD", text)
            text = "".join(c for c in text if not unicodedata.combining(c))
        if self.options["do_lower_case"]:
            text = text.lower()
        return text

    def split_special(self, text: str) -> list:
        """Text -> chunks: special-token strings (odd positions) and the text between them."""
        if self.options["do_lower_case"]:
            # Lower-case every character on its own, special tokens kept as written.
            # Character by character, as transformers does: a final capital sigma becomes
            # σ, not ς, and <PAD> becomes <pad>, a special token.
            parts = self._special_re.split(text)
            parts[::2] = ["".join(c.lower() for c in part) for part in parts[::2]]
            text = "".join(parts)
        parts = self._special_re.split(text)
        for i in range(1, len(parts), 2):
            if parts[i] == self.mask_token:
                # [MASK] takes the whitespace on its left. With ALBERT's normalisation the
                # ids do not show it (each stretch of text is stripped and segmented on its
                # own anyway); it is kept because it is the token's rule.
                parts[i - 1] = parts[i - 1].rstrip()
        return parts

    def pieces(self, text: str) -> list:
        """SentencePiece pieces of one stretch of text, after ``normalize``.

        ALBERT's digit-comma rule: a piece such as ``▁3,`` or ``00,`` (digit then comma)
        is cut before the comma; the digits are segmented again on their own, and a ``▁``
        the new segmentation adds where the old piece had none is dropped.
        """
        out = []
        for piece in self.sp.encode(self.normalize(text), out_type=str):
            if len(piece) > 1 and piece[-1] == "," and piece[-2].isdigit():
                digits = self.sp.encode(piece[:-1].replace("▁", ""), out_type=str)
                if not piece.startswith("▁") and digits[0].startswith("▁"):
                    digits = digits[1:] if digits[0] == "▁" else [digits[0][1:]] + digits[1:]
                out += digits + [","]
            else:
                out.append(piece)
        return out

    def tokenize(self, text: str) -> list:
        """The pieces of a text, special tokens included as written (no template)."""
        parts = self.split_special(text)
        out = []
        for i, part in enumerate(parts):
            out += [part] if i % 2 else self.pieces(part)
        return out

    def piece_ids(self, text: str) -> list:
        """Ids of a text without the template (unknown pieces get the ``<unk>`` id)."""
        return [self.sp.piece_to_id(p) for p in self.tokenize(text)]

    # ------------------------------------------------------------------- ids, template

    def encode(self, text: str, pair: str | None = None, *, truncation=False, max_length=None):
        """One text (or a pair) -> ``input_ids``, ``token_type_ids``, ``attention_mask``.

        Parameters
        ----------
        text : the text; ``[MASK]`` (exactly so written) marks a masked token
        pair : an optional second text: ``[CLS] text [SEP] pair [SEP]``
        truncation : cut to ``max_length`` as transformers' ``longest_first`` does (drop
            the last token of the longer text, of the pair on a tie, until it fits);
            False: a text that does not fit raises ValueError
        max_length : default ``self.max_length`` (510, the model's limit)

        Returns
        -------
        dict of three lists of ints, each of length N
        """
        max_length = self.max_length if max_length is None else int(max_length)
        _check_text(text, "text")
        a = self.piece_ids(text)
        b = None
        if pair is not None:
            _check_text(pair, "pair")
            b = self.piece_ids(pair)
        n_special = 2 if b is None else 3
        n = len(a) + (0 if b is None else len(b)) + n_special
        if n > max_length:
            if not truncation:
                raise ValueError(
                    f"the {'pair' if b else 'text'} is {n} tokens long ([CLS] and [SEP] "
                    f"included) but at most {max_length} fit (the model's position table); "
                    f"shorten it, or pass truncation=True to cut it."
                )
            if max_length < n_special:
                raise ValueError(
                    f"max_length={max_length} leaves no room for the {n_special} special tokens."
                )
            a, b = _truncate(a, b, max_length - n_special)
        ids = [self.cls_id] + a + [self.sep_id]
        types = [0] * len(ids)
        if b is not None:
            ids += b + [self.sep_id]
            types += [1] * (len(b) + 1)
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": [1] * len(ids)}

    def encode_batch(self, texts, pairs=None, *, truncation=False, max_length=None):
        """Texts (or pairs) -> (B, N) int64 arrays, padded on the right to the longest.

        Padding gets the ``<pad>`` id, token type 0 and attention mask 0.

        Returns
        -------
        dict ``input_ids``, ``token_type_ids``, ``attention_mask``: (B, N) int64 arrays
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of texts; use encode for one text.")
        texts = list(texts)
        pairs = [None] * len(texts) if pairs is None else list(pairs)
        if len(pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(pairs)} pairs; give one per text.")
        if not texts:
            raise ValueError("encode_batch needs at least one text.")
        rows = [
            self.encode(t, p, truncation=truncation, max_length=max_length)
            for t, p in zip(texts, pairs, strict=True)
        ]
        n = max(len(r["input_ids"]) for r in rows)
        fill = {"input_ids": self.pad_id, "token_type_ids": 0, "attention_mask": 0}
        return {
            key: np.array([r[key] + [value] * (n - len(r[key])) for r in rows], dtype=np.int64)
            for key, value in fill.items()
        }  # each (B, N)

    # ------------------------------------------------------------------- ids -> text

    def decode(self, ids, skip_special_tokens=False) -> str:
        """Ids -> text, as AlbertTokenizer.decode writes it.

        Runs of ordinary pieces are joined by SentencePiece (``▁`` becomes a space; the
        space that opens a run is dropped). Special tokens are written as themselves, glued
        to the run before them but preceded by one space when a run (or the start) comes
        before them; the ends are stripped. ``skip_special_tokens`` drops them all,
        ``<unk>`` and ``<pad>`` included.
        """
        ids = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
        bad = [i for i in ids if not 0 <= i < len(self)]
        if bad:
            raise ValueError(f"ids must lie in [0, {len(self)}) (the vocabulary), got {bad[:5]}.")
        out, run, after_special = "", [], False
        for i in ids:
            if i in self.special_ids:
                if skip_special_tokens:
                    continue
                out += ("" if after_special else " ") + self.sp.decode_pieces(run)
                out += self.sp.id_to_piece(i)
                run, after_special = [], True
            else:
                run.append(self.sp.id_to_piece(i))
                after_special = False
        text = (out + self.sp.decode_pieces(run)).strip()
        if self.options["clean_up_tokenization_spaces"]:
            for old, new in _CLEAN_UP:
                text = text.replace(old, new)
        return text


def _check_text(text, name):
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate: SentencePiece would fail on it
        raise ValueError(
            f"{name} holds U+{ord(text[e.start]):04X} at position {e.start}, a lone surrogate "
            "that is not a character (a command-line argument or file that is not UTF-8?); "
            "only valid Unicode text can be tokenized."
        ) from None


def _truncate(a, b, budget):
    """transformers' ``longest_first``: shorten the longer list (b on a tie) to fit budget."""
    a = list(a)
    b = None if b is None else list(b)
    while len(a) + (len(b) if b is not None else 0) > budget:
        if b is None or len(a) > len(b):
            a.pop()
        else:
            b.pop()
    return a, b


def _read_directory(directory: Path):
    """Options from ``tokenizer_config.json`` and the length limit from ``config.json``.

    Both are read under a size limit and checked: an option must be true or false (a
    string "false" would otherwise count as true), the length a positive integer.
    """
    options, max_length = {}, None
    tok_config = directory / "tokenizer_config.json"
    if tok_config.is_file():
        values = _json_object(tok_config)
        for key in OPTIONS:
            value = values.get(key)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{tok_config}: {key} must be true or false, got {value!r:.60}.")
            if value is not None:
                options[key] = value
    config = directory / "config.json"
    if config.is_file():
        max_length = _json_object(config).get("max_position_embeddings")
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2
        ):
            raise ValueError(
                f"{config}: max_position_embeddings must be an integer >= 2, "
                f"got {max_length!r:.60}."
            )
    return options, max_length


def _json_object(path):
    values = read_json(path)
    if not isinstance(values, dict):
        raise ValueError(f"{path} holds a JSON {type(values).__name__}, not an object {{...}}.")
    return values


def load_tokenizer(source=REPO_ID, *, revision=None) -> Tokenizer:
    """The tokenizer of a checkpoint: a ``spiece.model`` file, a directory, or a hub id.

    A hub id is resolved as ``nystrom_np.checkpoint.find_checkpoint`` resolves it (a local
    folder, the Hugging Face cache, then a download), and ``spiece.model`` is taken from
    the folder its weights are in (fetched into it with huggingface_hub when missing there
    and downloads are possible).
    """
    path = Path(source).expanduser()
    if path.is_file() and path.name in WEIGHT_FILES:  # a checkpoint's weights: its folder
        path = path.parent
    if path.exists():
        return Tokenizer(path)
    _, weights = find_checkpoint(source, revision=revision)
    directory = weights.parent
    if not (directory / MODEL_FILE).is_file() and hub_reachable():
        try:  # into the cache's snapshot, next to the weights
            fetch_file(str(source), MODEL_FILE, revision)
        except (OSError, ImportError):  # no file, no network: the message below says what to do
            pass
    if not (directory / MODEL_FILE).is_file():
        raise FileNotFoundError(
            f"the checkpoint {source!r} at {directory} has no {MODEL_FILE} (its tokenizer). "
            f"Get it where the hub is reachable, e.g.\n"
            f"    huggingface-cli download {shlex.quote(str(source))} {MODEL_FILE}\n"
            "(into the Hugging Face cache, next to the weights), or pass its path."
        )
    return Tokenizer(directory)
