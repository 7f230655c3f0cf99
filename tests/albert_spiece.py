"""A stand-in for the checkpoint's ``spiece.model``, trained at test time.

The real file cannot be downloaded on the build machines, so the tests train a small
SentencePiece unigram model on ``tests/data/corpus.txt`` (text written for these tests)
with the ALBERT trainer options: ``<pad>`` 0 and ``<unk>`` 1, no ``<s>``/``</s>``,
``[CLS] [SEP] [MASK]`` as control symbols 2, 3, 4, a few user-defined symbols (quote,
brackets, dash, full stop, currency signs) and NFKC normalisation. The corpus is lower-cased
and stripped of accents first, as the tokenizer's input always is.

The corpus holds a few hundred pieces' worth of text, but the model's output layer has
30000 rows and transformers' fill-mask pipeline decodes whichever id scores best, so the
model is padded to ``VOCAB`` pieces: made-up syllable words (``▁ba``, ``ca``, ``▁da``,
...; every other one without the word-start mark) with a score so low that no
segmentation ever picks them. They are appended to the serialised protobuf (a repeated
field may be continued at the end of a message), so no protobuf library is needed.
"""

import io
import struct
import unicodedata
from pathlib import Path

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
VOCAB = 30000  # the checkpoint's vocab_size
TRAINED = 500  # pieces learnt from the corpus (it supports about 600)


def _varint(n: int) -> bytes:
    out = b""
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            return out + bytes([low])
        out += bytes([low | 0x80])


def _piece_record(piece: str, score: float, kind: int = 1) -> bytes:
    """ModelProto field 1 (pieces): {1: piece, 2: score (float), 3: type (1 = NORMAL)}."""
    raw = piece.encode()
    body = b"\x0a" + _varint(len(raw)) + raw + b"\x15" + struct.pack("<f", score)
    body += b"\x18" + _varint(kind)
    return b"\x0a" + _varint(len(body)) + body


def _syllable_word(i: int) -> str:
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    word = ""
    while True:
        word += consonants[i % 18] + vowels[(i // 18) % 5]
        i //= 90
        if not i:
            return word


def build_spiece(path, vocab_size: int = VOCAB, trained: int = TRAINED) -> Path:
    """Train the stand-in model and write it to ``path``; returns the path."""
    import sentencepiece as spm

    text = CORPUS.read_text(encoding="utf-8").lower()
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()),
        model_writer=model,
        model_type="unigram",
        vocab_size=trained,
        pad_id=0,
        unk_id=1,
        bos_id=-1,
        eos_id=-1,
        control_symbols=["[CLS]", "[SEP]", "[MASK]"],
        user_defined_symbols=["(", ")", '"', "-", ".", "–", "£", "€"],
        character_coverage=0.99995,
        num_threads=1,
        minloglevel=2,
    )
    proto = model.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    have = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
    extra, i = [], 0
    while len(have) + len(extra) < vocab_size:
        piece = ("▁" if i % 2 == 0 else "") + _syllable_word(i)
        i += 1
        if piece not in have:
            extra.append(_piece_record(piece, -1000.0))
    path = Path(path)
    path.write_bytes(proto + b"".join(extra))
    return path
