"""Which weights a chapter runs on (nystrom_lab.sources), and the synthetic q, k it uses.

No network is used: the hub is made unreachable by replacing socket.create_connection,
the Hugging Face cache is a temporary folder, and checkpoints are written here with
to_state_dict + safetensors from a tiny random model.
"""

import json
import socket

import numpy as np
import pytest
from cases import SMALL, same_weights

from nystrom_lab import sources
from nystrom_np import Config, random_model, to_state_dict

TINY = Config.from_dict(SMALL)  # the parity tests' small config


@pytest.fixture
def loader():
    return pytest.importorskip("nystrom_np.checkpoint", reason="the checkpoint loader is absent")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No env var, an empty HF cache, and a hub that refuses every connection."""
    monkeypatch.delenv(sources.ENV_VAR, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    calls = []

    def refuse(address, *args, **kwargs):
        calls.append(address)
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return calls


def save_checkpoint(folder, model, spiece=False):
    """A save_pretrained-style folder: config.json + model.safetensors (+ spiece.model)."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_dict()))
    save_file(to_state_dict(model), str(folder / "model.safetensors"))
    if spiece:
        (folder / "spiece.model").write_bytes(b"not a real sentencepiece model")
    return folder


# ------------------------------------------------------------------------- random fallback


def test_offline_falls_back_to_the_seeded_random_model(loader, offline):
    w = sources.resolve_weights(fallback_config=TINY)
    assert not w.real
    assert w.spiece is None
    assert "unreachable" in w.reason and sources.REPO_ID in w.reason
    assert offline, "the hub should have been probed once"
    assert same_weights(w.model, random_model(TINY, seed=sources.RANDOM_SEED))
    assert "random weights" in w.note and "meaningless" in w.note


def test_offline_does_not_try_to_download(loader, offline, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    def no_download(*args, **kwargs):
        raise AssertionError("hf_hub_download called although the hub is unreachable")

    monkeypatch.setattr(hub, "hf_hub_download", no_download)
    assert not sources.resolve_weights(fallback_config=TINY).real


def test_download_false_never_probes_the_network(loader, offline):
    w = sources.resolve_weights(download=False, fallback_config=TINY)
    assert not w.real and "not allowed" in w.reason
    assert offline == []


def test_hf_hub_offline_is_respected_and_restored(offline, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not sources.resolve_weights(fallback_config=TINY).real
    assert offline == []
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_fallback_default_is_the_real_config_and_says_so(offline, monkeypatch):
    made = []

    def fake_random_model(config, seed, dtype):  # the full model takes seconds to draw
        made.append((config, seed))
        return random_model(TINY, seed=seed, dtype=dtype)

    monkeypatch.setattr(sources, "random_model", fake_random_model)
    w = sources.resolve_weights()
    assert made == [(Config(), sources.RANDOM_SEED)]
    assert "random_model(Config(), seed=0)" in w.note
    assert "timings" in w.note


# ------------------------------------------------------------------------- real checkpoints


def test_env_var_directory_is_loaded(loader, offline, monkeypatch, tmp_path):
    model = random_model(TINY, seed=3)
    folder = save_checkpoint(tmp_path / "ckpt", model, spiece=True)
    monkeypatch.setenv(sources.ENV_VAR, str(folder))
    w = sources.resolve_weights(fallback_config=TINY)
    assert w.real and w.reason == ""
    assert w.source == str(folder / "model.safetensors")
    assert w.spiece == folder / "spiece.model"
    assert w.model.config == TINY
    assert same_weights(w.model, model)
    assert str(folder / "model.safetensors") in w.note and "random weights" not in w.note
    assert offline == [], "a named checkpoint must not touch the network"


def test_env_var_weights_file_without_tokenizer(loader, offline, monkeypatch, tmp_path):
    folder = save_checkpoint(tmp_path / "ckpt", random_model(TINY, seed=4))
    monkeypatch.setenv(sources.ENV_VAR, str(folder / "model.safetensors"))
    w = sources.resolve_weights(dtype=np.float64)
    assert w.real and w.spiece is None
    assert w.model.dtype == np.float64
    assert "no `spiece.model`" in w.note


def test_explicit_path_wins_over_env_var(loader, offline, monkeypatch, tmp_path):
    a = save_checkpoint(tmp_path / "a", random_model(TINY, seed=5))
    b = save_checkpoint(tmp_path / "b", random_model(TINY, seed=6))
    monkeypatch.setenv(sources.ENV_VAR, str(a))
    w = sources.resolve_weights(b)
    assert w.source == str(b / "model.safetensors")
    assert same_weights(w.model, random_model(TINY, seed=6))


def test_a_named_checkpoint_that_fails_is_an_error(loader, offline, monkeypatch, tmp_path):
    monkeypatch.setenv(sources.ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=sources.ENV_VAR):
        sources.resolve_weights(fallback_config=TINY)
    bad = save_checkpoint(tmp_path / "bad", random_model(TINY, seed=7))
    config = TINY.to_dict() | {"hidden_size": 32}  # weights no longer fit the config
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="the path given"):
        sources.resolve_weights(bad, fallback_config=TINY)


def test_hub_cache_is_found_offline(loader, offline, monkeypatch, tmp_path):
    repo = tmp_path / "hf-cache" / ("models--" + sources.REPO_ID.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    snapshot = save_checkpoint(repo / "snapshots" / "0123abcd", random_model(TINY, seed=8), True)
    w = sources.resolve_weights(fallback_config=TINY)
    assert w.real
    assert w.source == str(snapshot / "model.safetensors")
    assert w.spiece == snapshot / "spiece.model"
    assert sources.REPO_ID in w.note


def test_a_broken_cached_checkpoint_is_an_error(loader, offline, tmp_path):
    repo = tmp_path / "hf-cache" / ("models--" + sources.REPO_ID.replace("/", "--"))
    snapshot = save_checkpoint(repo / "snapshots" / "main", random_model(TINY, seed=9))
    (snapshot / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ValueError, match="found but cannot be loaded"):
        sources.resolve_weights(fallback_config=TINY)


# ------------------------------------------------------------------------------- the note


def test_note_is_a_myst_admonition(loader, offline, tmp_path):
    random_w = sources.resolve_weights(fallback_config=TINY)
    text = sources.note_markdown(random_w)
    assert text.startswith(":::{admonition} Random weights\n:class: warning\n")
    assert text.endswith("\n:::\n")
    assert random_w.note in text
    real_w = sources.resolve_weights(save_checkpoint(tmp_path / "c", random_model(TINY)))
    real_note = sources.note_markdown(real_w)
    assert real_note.startswith(":::{admonition} Checkpoint weights\n:class: note\n")
    display = pytest.importorskip("IPython.display")
    shown = sources.show_note(real_w)
    assert isinstance(shown, display.Markdown) and shown.data == sources.note_markdown(real_w)


# ------------------------------------------------------------------------- synthetic q, k


def lag1_correlation(x):
    """Mean correlation of each channel with itself one token later; x (B, H, N, D)."""
    a, b = x[..., :-1, :], x[..., 1:, :]
    a, b = a - a.mean(axis=-2, keepdims=True), b - b.mean(axis=-2, keepdims=True)
    return float(((a * b).sum(-2) / np.sqrt((a * a).sum(-2) * (b * b).sum(-2))).mean())


def test_smooth_qk_shapes_scale_and_smoothness():
    q, k = sources.smooth_qk(300, 16, batch=2, heads=3, width=8, seed=1, dtype=np.float32)
    assert q.shape == k.shape == (2, 3, 300, 16)
    assert q.dtype == k.dtype == np.float32
    np.testing.assert_allclose(q.std(axis=-2), 1, rtol=1e-4)
    np.testing.assert_allclose(q.mean(axis=-2), 0, atol=1e-5)
    assert lag1_correlation(q) > 0.95 and lag1_correlation(k) > 0.95
    rough, _ = sources.smooth_qk(300, 16, batch=2, heads=3, width=0, seed=1)
    assert abs(lag1_correlation(rough)) < 0.05


def test_smooth_qk_sharing_and_seeds():
    q, k = sources.smooth_qk(64, 8, shared=1.0, seed=2)
    np.testing.assert_allclose(k, q)
    q0, k0 = sources.smooth_qk(64, 8, shared=0.0, seed=2)
    assert abs(np.corrcoef(q0.ravel(), k0.ravel())[0, 1]) < 0.2
    np.testing.assert_array_equal(sources.smooth_qk(64, 8, seed=2)[0], q0)
    assert not np.array_equal(sources.smooth_qk(64, 8, seed=3)[0], q0)


@pytest.mark.parametrize("kwargs", [dict(shared=1.5), dict(shared=-0.1), dict(width=-1)])
def test_smooth_qk_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        sources.smooth_qk(16, 4, **kwargs)
