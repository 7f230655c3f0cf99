"""The ALBERT tokenizer against transformers' AlbertTokenizer on the same spiece.model.

The model file is the stand-in of ``albert_spiece.py`` (trained here, padded to 30000
pieces). Parity: identical ids, token types and attention masks, and identical decoded
text, on a hand-picked corpus of hard cases and on random text (hypothesis).
"""

import json

import numpy as np
import pytest
from albert_spiece import CORPUS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nystrom_np.tokenizer import MAX_LENGTH, Tokenizer

sentencepiece = pytest.importorskip("sentencepiece")

TEXTS = [
    "Paris is the [MASK] of France.",
    "[MASK] is the capital of France.",  # mask first
    "The capital of France is [MASK]",  # mask last, no full stop
    "The [MASK] of [MASK] is Paris.",  # several masks
    "a [MASK][MASK] b",  # masks side by side
    "x[MASK]y",  # mask glued to words
    "[MASK]",
    "   [MASK]   ",
    "Café, naïve résumé; Zürich, São Paulo, Kraków, Ångström, Dvořák, Łódź.",
    "CRÈME BRÛLÉE and ΑΘΗΝΑΣ (a final capital sigma) and Москва",
    "1,000, 12,99 and 3, then 1,250,000, and 7,8,9, 00,1, a1,b ,3,",
    "2, 3, 5, 7, 11, 13 and 17 are prime; 9, 15 and 21 are not.",
    "$4,500, €1,200 and £300 – for the piano.",
    "``Quoted,'' he said, \"and 'single' too.\"",
    "Don't forget: it's the small things, isn't it?! ... -- (really) [name]",
    "tabs\t\tand   spaces\n\nand new\r\nlines\u00a0and\u2003odd\u3000spaces",
    "  leading and trailing  ",
    "",
    "   \n\t ",
    "東京 and 北京, ☃ snow, emoji 🙂, İstanbul, ß, ﬁ, ½, ２, ¨",
    "<PAD> <pad> [cls] [CLS] [SEP] [Mask] [mask] <mask> <UNK> <unk>",
    "name@example.org https://example.com/index.html 9:45 70% −5 °C",
    "The " * 600 + "[MASK] end",  # longer than the limit
]
PAIRS = [
    ("Paris is the [MASK] of France.", "It is a city."),
    ("", ""),
    ("Café au lait", "1,000, 2,000"),
    ("[MASK]", "[MASK] [MASK]"),
    ("one " * 400, "two " * 300),
]


@pytest.fixture(scope="session")
def hf_tok(spiece_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AlbertTokenizer(str(spiece_path))


def _hf(hf_tok, text, pair=None, **kwargs):
    kwargs = {"truncation": True, "max_length": MAX_LENGTH, **kwargs}
    return dict(hf_tok(text, pair, **kwargs))


# --------------------------------------------------------------------------- the model


def test_special_ids_read_from_the_model_file(tok, spiece_path):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spiece_path))
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert [sp.id_to_piece(i) for i in range(5)] == ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
    assert len(tok) == 30000


def test_special_ids_follow_the_file_not_the_albert_layout(tmp_path):
    # A model with other ids for the special pieces: the tokenizer must follow the file.
    import io

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.read_text(encoding="utf-8").lower().splitlines()),
        model_writer=model, model_type="unigram", vocab_size=300, unk_id=0, pad_id=5,
        bos_id=-1, eos_id=-1, control_symbols=["[MASK]", "[SEP]", "[CLS]"], minloglevel=2,
    )
    path = tmp_path / "other.model"
    path.write_bytes(model.getvalue())
    tok = Tokenizer(path)
    assert (tok.unk_id, tok.mask_id, tok.sep_id, tok.cls_id, tok.pad_id) == (0, 1, 2, 3, 5)
    assert tok.encode("a [MASK]")["input_ids"][0] == 3
    batch = tok.encode_batch(["a", "a b c d"])
    assert batch["input_ids"][0, -1] == 5


def test_a_model_without_albert_pieces_is_refused(tmp_path):
    import io

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.read_text(encoding="utf-8").splitlines()),
        model_writer=model, model_type="unigram", vocab_size=300, minloglevel=2,
    )
    path = tmp_path / "plain.model"
    path.write_bytes(model.getvalue())
    with pytest.raises(ValueError, match="no piece '<pad>'"):
        Tokenizer(path)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        Tokenizer(tmp_path)  # a directory without spiece.model
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer(tmp_path / "junk.model")


def test_digit_comma_pieces_exist_in_the_test_model(spiece_path):
    # The digit-comma rule is only exercised if the model has pieces like "3," and "00,".
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spiece_path))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    digit_comma = [p for p in pieces if len(p) > 1 and p[-1] == "," and p[-2].isdigit()]
    assert any(p.startswith("▁") for p in digit_comma)
    assert any(not p.startswith("▁") for p in digit_comma)


# ------------------------------------------------------------------ parity: encoding


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_albert_tokenizer(tok, hf_tok, text):
    assert tok.encode(text, truncation=True) == _hf(hf_tok, text)
    assert tok.tokenize(text) == hf_tok.tokenize(text)


@pytest.mark.parametrize("text, pair", PAIRS)
def test_pairs_match_albert_tokenizer(tok, hf_tok, text, pair):
    assert tok.encode(text, pair, truncation=True) == _hf(hf_tok, text, pair)


def test_longest_first_truncation_matches_on_every_split(tok, hf_tok):
    # Every pair of lengths up to 8 + 8 into 10 positions (7 for the texts).
    for a in range(9):
        for b in range(9):
            text, pair = " ".join(["the"] * a), " ".join(["city"] * b)
            ours = tok.encode(text, pair, truncation=True, max_length=10)
            assert ours == _hf(hf_tok, text, pair, max_length=10), (a, b)


def test_truncation_to_the_model_limit(tok, hf_tok):
    text = "Paris is the [MASK] of France. " * 100
    enc = tok.encode(text, truncation=True)
    assert len(enc["input_ids"]) == MAX_LENGTH == 510
    assert enc["input_ids"][-1] == tok.sep_id
    assert enc == _hf(hf_tok, text)


def test_too_long_without_truncation_is_an_error(tok):
    with pytest.raises(ValueError, match=r"tokens long .* at most 510 .* truncation=True"):
        tok.encode("word " * 600)
    with pytest.raises(ValueError, match="no room"):
        tok.encode("a b c", truncation=True, max_length=1)


def test_batch_padding_matches_albert_tokenizer(tok, hf_tok):
    texts = ["Paris is the [MASK] of France.", "", "Café, 1,000, ☃ [MASK] [MASK]"]
    ours = tok.encode_batch(texts)
    theirs = hf_tok(texts, padding=True, return_tensors="np")
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert ours[key].dtype == np.int64 and ours[key].shape == theirs[key].shape
        np.testing.assert_array_equal(ours[key], theirs[key])
    pairs = ["one", "two three four five six", ""]
    ours = tok.encode_batch(texts, pairs)
    theirs = hf_tok(texts, pairs, padding=True, return_tensors="np")
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        np.testing.assert_array_equal(ours[key], theirs[key])


def test_batch_input_errors(tok):
    with pytest.raises(TypeError, match="list of texts"):
        tok.encode_batch("one text")
    with pytest.raises(ValueError, match="pairs"):
        tok.encode_batch(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="at least one"):
        tok.encode_batch([])
    with pytest.raises(TypeError, match="must be a str"):
        tok.encode(3)


def test_directory_options_are_read(tmp_path, spiece_path, hf_tok):
    # A checkpoint folder: tokenizer_config.json options and config.json's length limit.
    (tmp_path / "spiece.model").write_bytes(spiece_path.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"keep_accents": True}))
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 1022}))
    tok = Tokenizer(tmp_path)
    assert tok.max_length == 1022 and tok.options["keep_accents"] is True
    assert tok.normalize("Café") == "café"
    assert len(tok.encode("word " * 600)["input_ids"]) > 510
    hf_keep = type(hf_tok)(str(spiece_path), keep_accents=True)
    for text in TEXTS[:-1]:
        assert tok.encode(text) == _hf(hf_keep, text), text
    with pytest.raises(TypeError, match="unknown tokenizer options"):
        Tokenizer(tmp_path, lowercase=False)


# ------------------------------------------------------------------ parity: decoding


@pytest.mark.parametrize("text", TEXTS[:-1])
def test_decode_matches_albert_tokenizer(tok, hf_tok, text):
    ids = tok.encode(text)["input_ids"]
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(
            ids, skip_special_tokens=skip
        )


def test_decode_of_arbitrary_ids_matches(tok, hf_tok):
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = rng.integers(0, len(tok), size=rng.integers(0, 12))
        ids[rng.random(ids.shape) < 0.3] = rng.integers(0, 8)  # specials and user symbols
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(
                ids.tolist(), skip_special_tokens=skip
            ), ids


def test_decode_clean_up_option_matches(spiece_path):
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AlbertTokenizer(str(spiece_path), clean_up_tokenization_spaces=True)
    tok = Tokenizer(spiece_path, clean_up_tokenization_spaces=True)
    text = "a . b , c ! d ? e ' f don 't I 'm it 's we 've you 're"
    ids = tok.encode(text)["input_ids"]
    assert tok.decode(ids) == hf_tok.decode(ids)
    assert "don't" not in Tokenizer(spiece_path).decode(ids)


def test_decode_rejects_out_of_range_ids(tok):
    with pytest.raises(ValueError, match=r"\[0, 30000\)"):
        tok.decode([5, 30000])


# ------------------------------------------------------------------ parity: random text

ALPHABET = (
    "aAbBzZ éÉèüÜßøØæÆñÑçÇ ıİΣσςΑΩжЖ 0123456789 ,,,.;:!?'\"`()[]<>-–—/%$€£ "
    " \t\n\r\u00a0\u2003\u3000 ¨´ﬁ½²２東☃🙂\u0301"
)
SPECIALS = ["[MASK]", "[CLS]", "[SEP]", "<pad>", "<unk>", "<PAD>", "[mask]", "<mask>", "``", "''"]
random_text = st.lists(
    st.one_of(st.text(alphabet=ALPHABET, max_size=12), st.sampled_from(SPECIALS)), max_size=8
).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=random_text, pair=st.one_of(st.none(), random_text))
def test_random_text_matches_albert_tokenizer(tok, hf_tok, text, pair):
    assert tok.encode(text, pair, truncation=True) == _hf(hf_tok, text, pair)
    ids = tok.encode(text, pair)["input_ids"]
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(
            ids, skip_special_tokens=skip
        )


# ------------------------------------------------------- the fast tokenizer (optional)

# Texts on which transformers' fast AlbertTokenizerFast agrees with the slow one. Where
# they differ we follow the slow one (the fast tokenizer lacks the digit-comma rule,
# turns a whitespace-only text into "▁", keeps a "▁" before special tokens written with
# spaces around them and after a quote mark that opens a word, and decodes <unk> and
# leading spaces differently).
FAST_TEXTS = [
    "Paris is the [MASK] of France.",
    "[MASK] is the capital of France.",
    "The [MASK] of [MASK] is Paris.",
    "Café, naïve résumé; Zürich, São Paulo.",
    "tabs\t\tand   spaces\n\nand new lines",
    "",
]


def test_fast_tokenizer_agrees_where_it_agrees_with_the_slow_one(tok, spiece_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf", reason="converting spiece.model needs protobuf")
    fast = transformers.AlbertTokenizerFast(vocab_file=str(spiece_path))
    for text in FAST_TEXTS:
        assert tok.encode(text) == dict(fast(text)), text
