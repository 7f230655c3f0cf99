"""The download path against a local stand-in for the hub (``_hub_server``), no internet.

A full-size random checkpoint in the real file layout (``pytorch_model.bin`` as a zip torch
pickle with the tied decoder keys and ``position_ids``, 437 MB; ``config.json`` of the real
config; ``spiece.model`` from the test corpus) is served under the hub's URL scheme with
``HF_ENDPOINT`` pointing at it and a clean cache: what a first build of the book does where
the hub is reachable. The checkpoint is made once per session (about 10 s).
"""

import json
import time

import pytest
from _checkpoint_files import TIED, old_layout, write_torch_zip
from _hub_server import COMMIT, HubServer
from cases import same_weights

from nystrom_lab import sources
from nystrom_np import Config, load, random_model, to_state_dict
from nystrom_np.checkpoint import REPO_ID, fetch_file

pytest.importorskip("huggingface_hub", reason="the download path uses it")
FILES = ("config.json", "pytorch_model.bin", "spiece.model")


@pytest.fixture(scope="session")
def full_size(tmp_path_factory, spiece_path):
    """(folder with the three files, the model they hold): the real config, random weights."""
    folder = tmp_path_factory.mktemp("hub-files")
    model = random_model(Config(), seed=3)
    (folder / "config.json").write_text(json.dumps(Config().to_dict(), indent=2))
    write_torch_zip(folder / "pytorch_model.bin", old_layout(to_state_dict(model)), tied=TIED)
    (folder / "spiece.model").write_bytes(spiece_path.read_bytes())
    return folder, model


@pytest.fixture
def clean_hub_env(monkeypatch, tmp_path):
    """A clean Hugging Face cache, no checkpoint named, downloads allowed."""
    monkeypatch.delenv(sources.ENV_VAR, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    return tmp_path / "hf-home" / "hub"


def test_first_build_downloads_once_into_the_cache_and_loads_from_it(
    full_size, clean_hub_env, monkeypatch, capfd
):
    folder, model = full_size
    with HubServer({REPO_ID: {n: folder / n for n in FILES}}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        weights = sources.resolve_weights()  # what every chapter calls
        gets = [p for m, p in hub.requests if m == "GET"]
    assert weights.real, weights.note
    assert same_weights(weights.model, model)
    snapshot = clean_hub_env / "models--uw-madison--nystromformer-512" / "snapshots" / COMMIT
    for name in FILES:  # the standard cache layout: snapshot links to blobs
        assert (snapshot / name).read_bytes() == (folder / name).read_bytes(), name
    assert (clean_hub_env / "models--uw-madison--nystromformer-512/refs/main").read_text() == (
        COMMIT
    )
    assert weights.spiece == snapshot / "spiece.model"
    assert weights.source == str(snapshot / "pytorch_model.bin")
    assert sorted(p.rsplit("/", 1)[1] for p in gets) == sorted(FILES)  # each file once
    assert f"/cdn/x/resolve/main/{REPO_ID}/pytorch_model.bin" in gets  # after the 302
    err = capfd.readouterr().err
    assert f"downloading {REPO_ID}/pytorch_model.bin into {clean_hub_env}" in err
    assert "downloaded 437 MB in" in err
    assert "pytorch_model.bin: 100%" in err  # the bar, drawn here as in a notebook kernel

    # The server is gone: the cache alone serves load() and the next chapter.
    assert same_weights(load(REPO_ID), model)
    again = sources.resolve_weights()
    assert again.real and again.source == weights.source


def test_a_download_follows_the_environment_of_now_not_of_the_first_import(
    full_size, clean_hub_env, monkeypatch
):
    """huggingface_hub reads HF_HUB_OFFLINE once, when first imported: a book chapter that
    first looked in the cache offline (and imported it then) must still download later."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    folder, _ = full_size
    with HubServer({REPO_ID: {"config.json": folder / "config.json"}}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        path = fetch_file(REPO_ID, "config.json")
    assert path.read_bytes() == (folder / "config.json").read_bytes()
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True  # put back as it was


@pytest.mark.parametrize(
    "mode, says",
    [
        ("500", "answered HTTP 500"),
        ("404", "has no http"),
        ("stall", "did not answer http"),
    ],
)
def test_a_failing_hub_gives_a_clear_reason_and_the_fallback_in_seconds(
    clean_hub_env, monkeypatch, mode, says
):
    with HubServer({REPO_ID: {}}, mode=mode, lifetime=60) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        start = time.perf_counter()
        weights = sources.resolve_weights(fallback_config=Config(num_hidden_layers=1))
        took = time.perf_counter() - start
        with pytest.raises(FileNotFoundError, match=says) as error:
            load(REPO_ID)
    assert not weights.real and says in weights.reason
    assert took < 8  # a 3 s probe at most, never huggingface_hub's minute of retries
    assert "huggingface-cli download uw-madison/nystromformer-512" in str(error.value)
    assert not (clean_hub_env / "models--uw-madison--nystromformer-512" / "snapshots").exists()
