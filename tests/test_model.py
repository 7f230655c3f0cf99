"""The model end to end: properties, attention modes, weights handling, bad input."""

import json

import numpy as np
import pytest
from cases import LANDMARK, SMALL

from nystrom_np import Config, encode, forward, from_state_dict, random_model, to_state_dict


@pytest.fixture(scope="module")
def small():
    return random_model(Config.from_dict(SMALL), seed=0)


@pytest.fixture(scope="module")
def small64(small):
    return small.astype(np.float64)


def batch(model, b=2, n=20, seed=0):
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, (b, n))


# ------------------------------------------------------------------------ properties


@pytest.mark.parametrize("attention", ["exact", "nystrom"])
def test_padding_leaves_real_tokens_alone_with_masked_conv_input(small64, attention):
    """A sequence alone, or padded inside a batch: its real tokens' outputs are the same.

    Holds for exact attention and for the paper's Nystrom (landmarks from real tokens,
    per-matrix init), once the padded values are kept out of the conv skip.
    """
    ids = batch(small64, 2, 24)
    mask = np.ones((2, 24), dtype=np.int64)
    mask[1, 17:] = 0
    options = dict(attention=attention, mask_conv_input=True)
    if attention == "nystrom":
        options["num_landmarks"] = 5
    alone = encode(small64, ids[1:, :17], **options)[-1]
    padded = encode(small64, ids, mask, **options)[-1]
    np.testing.assert_allclose(padded[1, :17], alone[0], atol=1e-12)


def test_padding_leaks_through_the_conv_skip_as_transformers_does(small64):
    """Without masking V first, the first layer's padded values reach the last K // 2 real
    tokens through the conv (and later layers spread them further through attention)."""
    ids = batch(small64, 1, 24)
    mask = np.ones((1, 24), dtype=np.int64)
    mask[0, 17:] = 0
    alone = encode(small64, ids[:, :17], attention="exact")[1]
    padded = encode(small64, ids, mask, attention="exact")[1]
    leak = np.abs(padded[0, :17] - alone[0]).max(axis=-1)  # after the first layer
    reach = SMALL["conv_kernel_size"] // 2
    assert leak[-reach:].min() > 1e-6
    assert leak[:-reach].max() < 1e-12


def test_hf_mode_runs_exact_attention_when_landmarks_equal_segment_length(small):
    """The released checkpoint's rule: num_landmarks == segment_means_seq_len -> exact."""
    ids = batch(small, 2, 33)
    np.testing.assert_array_equal(forward(small, ids), forward(small, ids, attention="exact"))


def test_nystrom_mode_with_all_tokens_as_landmarks_and_exact_pinv_is_exact(small64):
    ids = batch(small64, 2, 12)
    got = forward(small64, ids, attention="nystrom", num_landmarks=12, pinv="exact")
    np.testing.assert_allclose(got, forward(small64, ids, attention="exact"), atol=1e-8)


def test_nystrom_mode_handles_any_length(small):
    """N not a multiple of M, and N far from segment_means_seq_len."""
    for n in (7, 23, 37):
        logits = forward(small, batch(small, 2, n), attention="nystrom", num_landmarks=4)
        assert logits.shape == (2, n, SMALL["vocab_size"])
        assert np.isfinite(logits).all()


def test_dtype_follows_the_weights(small, small64):
    ids = batch(small, 1, 9)
    for model, dtype in ((small, np.float32), (small64, np.float64)):
        for attention in ("exact", "nystrom"):
            logits, hidden = forward(model, ids, attention=attention, num_landmarks=3
                                     if attention == "nystrom" else None,
                                     output_hidden_states=True)
            assert logits.dtype == dtype
            assert all(h.dtype == dtype for h in hidden)


def test_hidden_states_one_per_layer_plus_embeddings(small):
    logits, hidden = forward(small, batch(small), output_hidden_states=True)
    assert len(hidden) == SMALL["num_hidden_layers"] + 1
    assert all(h.shape == (2, 20, SMALL["hidden_size"]) for h in hidden)
    assert logits.shape == (2, 20, SMALL["vocab_size"])


def test_float32_and_float64_agree(small, small64):
    ids = batch(small)
    np.testing.assert_allclose(forward(small, ids), forward(small64, ids), atol=1e-5)


def test_outputs_are_finite_with_fully_padded_rows(small):
    ids = batch(small, 2, 10)
    mask = np.zeros((2, 10), dtype=np.int64)
    mask[0] = 1
    assert np.isfinite(forward(small, ids, mask)).all()


def test_bert_config_runs_without_conv_and_from_position_zero():
    config = Config.from_dict({**SMALL, "model_type": "bert", "conv_kernel_size": None})
    assert config.position_offset == 0 and config.layer_norm_eps == 1e-12
    model = random_model(config)
    assert all(layer["conv"] is None for layer in model.params["layers"])
    assert forward(model, batch(model, 1, config.max_position_embeddings)).shape[1] == 40


# -------------------------------------------------------------- building from weights


def test_state_dict_round_trip(small):
    again = from_state_dict(to_state_dict(small), small.config)
    ids = batch(small)
    np.testing.assert_array_equal(forward(again, ids), forward(small, ids))


def test_old_layout_with_tied_decoder_and_position_ids_loads_the_same(small):
    state = to_state_dict(small)
    old = dict(state)
    word = state["nystromformer.embeddings.word_embeddings.weight"]
    old["cls.predictions.decoder.weight"] = word
    old["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
    old["nystromformer.embeddings.position_ids"] = np.arange(2, 42)[None]
    ids = batch(small)
    np.testing.assert_array_equal(forward(from_state_dict(old, small.config), ids),
                                  forward(small, ids))


def test_untied_decoder_is_refused(small):
    state = to_state_dict(small)
    state["cls.predictions.decoder.weight"] = np.zeros((50, 16), dtype=np.float32)
    with pytest.raises(ValueError, match="untied"):
        from_state_dict(state, small.config)


def test_all_key_problems_are_reported_at_once(small):
    state = to_state_dict(small)
    del state["nystromformer.encoder.layer.1.output.dense.bias"]
    state["nystromformer.encoder.layer.0.intermediate.dense.weight"] = np.zeros((3, 3))
    state["nystromformer.extra.weight"] = np.zeros(4)
    with pytest.raises(ValueError) as error:
        from_state_dict(state, small.config)
    message = str(error.value)
    assert "3 problem(s)" in message
    assert "missing nystromformer.encoder.layer.1.output.dense.bias (16,)" in message
    assert "intermediate.dense.weight has shape (3, 3), expected (24, 16)" in message
    assert "unexpected nystromformer.extra.weight (4,)" in message


def test_weights_are_copied_and_transposed_once(small):
    state = to_state_dict(small)
    model = from_state_dict(state, small.config)
    w = state["nystromformer.encoder.layer.0.intermediate.dense.weight"]
    np.testing.assert_array_equal(model.params["layers"][0]["intermediate"]["w"], w.T)
    w[...] = 0  # the model holds its own copy
    assert model.params["layers"][0]["intermediate"]["w"].any()


def test_bare_bert_encoder_without_head():
    config = Config.from_dict({**SMALL, "model_type": "bert", "conv_kernel_size": None})
    state = {k.removeprefix("bert."): v for k, v in
             to_state_dict(random_model(config, head=False)).items()}
    state["pooler.dense.weight"] = np.zeros((16, 16), dtype=np.float32)
    model = from_state_dict(state, config)
    assert not model.has_head
    assert len(encode(model, batch(model))) == 3
    with pytest.raises(ValueError, match="no MLM head"):
        forward(model, batch(model))


def test_config_from_json_fills_defaults(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nystromformer",
                                                      "num_hidden_layers": 3, "foo": 1}))
    config = Config.from_json(tmp_path)
    assert config.num_hidden_layers == 3
    assert config.conv_kernel_size == 65 and config.layer_norm_eps == 1e-5
    assert Config.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("values, match", [
    ({"hidden_size": 30, "num_attention_heads": 4}, "multiple"),
    ({"hidden_act": "swish"}, "hidden_act"),
    ({"conv_kernel_size": 4}, "odd"),
    ({"model_type": "gpt2"}, "model_type"),
])
def test_bad_config_values(values, match):
    with pytest.raises(ValueError, match=match):
        Config.from_dict(values)


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Config.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Config.from_json(tmp_path)


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize("ids, error, match", [
    (np.zeros((1, 5), dtype=np.float32), TypeError, "integer"),
    (np.zeros((1, 5), dtype=bool), TypeError, "integer"),
    (np.array([[1, 2, 50]]), ValueError, r"\[0, 50\)"),
    (np.array([[-1, 2, 3]]), ValueError, "vocabulary"),
    (np.zeros((1, 41), dtype=np.int64), ValueError, "at most 40"),
    (np.zeros((1, 0), dtype=np.int64), ValueError, "empty"),
    (np.zeros((0, 4), dtype=np.int64), ValueError, "empty"),
    (np.zeros(5, dtype=np.int64), ValueError, "2-D"),
])
def test_bad_input_ids(small, ids, error, match):
    with pytest.raises(error, match=match):
        forward(small, ids)


def test_real_config_allows_510_tokens_not_511():
    config = Config.from_dict({**SMALL, "max_position_embeddings": 510})
    model = random_model(config)
    assert forward(model, np.zeros((1, 510), dtype=np.int64)).shape == (1, 510, 50)
    with pytest.raises(ValueError, match="at most 510"):
        forward(model, np.zeros((1, 511), dtype=np.int64))


@pytest.mark.parametrize("mask, match", [
    (np.ones((2, 19), dtype=np.int64), "shape"),
    (np.full((2, 20), 2), "0/1"),
    (np.full((2, 20), 0.5), "0/1"),
])
def test_bad_attention_mask(small, mask, match):
    with pytest.raises(ValueError, match=match):
        forward(small, batch(small), mask)


@pytest.mark.parametrize("types, error, match", [
    (np.zeros((2, 19), dtype=np.int64), ValueError, "shape"),
    (np.full((2, 20), 2), ValueError, r"\[0, 2\)"),
    (np.zeros((2, 20), dtype=np.float64), TypeError, "integer"),
])
def test_bad_token_types(small, types, error, match):
    with pytest.raises(error, match=match):
        forward(small, batch(small), None, types)


@pytest.mark.parametrize("options, match", [
    (dict(attention="linear"), "attention must be"),
    (dict(attention="nystrom", num_landmarks=0), "num_landmarks"),
    (dict(attention="nystrom", num_landmarks=21), "num_landmarks"),
    (dict(attention="nystrom", num_landmarks=2.5), "num_landmarks"),
    (dict(attention="nystrom", pinv="svd"), "pinv"),
    (dict(attention="nystrom", pinv_init="paper"), "pinv_init"),
    (dict(attention="nystrom", pinv_iterations=-1), "pinv_iterations"),
    (dict(attention="hf", num_landmarks=4), "options of attention='nystrom' only"),
    (dict(attention="exact", pinv_iterations=3), "options of attention='nystrom' only"),
])
def test_bad_attention_options(small, options, match):
    with pytest.raises(ValueError, match=match):
        forward(small, batch(small), **options)


def test_nystrom_needs_enough_real_tokens_in_every_row(small):
    mask = np.ones((2, 20), dtype=np.int64)
    mask[1, 3:] = 0
    with pytest.raises(ValueError, match="shortest sequence"):
        forward(small, batch(small), mask, attention="nystrom", num_landmarks=4)


def test_hf_landmark_path_only_at_its_segment_length():
    model = random_model(Config.from_dict(LANDMARK))
    assert forward(model, batch(model, 2, 16)).shape == (2, 16, 50)
    with pytest.raises(ValueError, match="only works for N = segment_means_seq_len = 16"):
        forward(model, batch(model, 2, 12))


def test_hf_landmark_path_refuses_the_flag_that_crashes_transformers():
    model = random_model(Config.from_dict({**LANDMARK, "inv_coeff_init_option": True}))
    with pytest.raises(ValueError, match="inv_coeff_init_option"):
        forward(model, batch(model, 1, 16))
