"""Loading checkpoints: safetensors, torch zip without torch, the hub cache, conversion.

Every file is made here by the real libraries (torch.save, save_pretrained, safetensors)
or, where torch may be missing, by ``_checkpoint_files`` (the same bytes torch writes).
Tests that need torch/transformers skip without them; the safety and corruption tests
need neither.
"""

import collections
import json
import os
import pickle
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from _checkpoint_files import (
    SMALL,
    TIED,
    old_layout,
    op_global,
    op_int,
    op_state_dict,
    op_str,
    op_tensor,
    write_torch_zip,
    write_zip,
)
from safetensors.numpy import save_file

from nystrom_np import checkpoint, forward, random_model, to_state_dict
from nystrom_np.checkpoint import (
    CheckpointError,
    convert,
    find_checkpoint,
    hub_cache_dir,
    load,
    read_safetensors,
    read_torch_bin,
    read_weights,
)
from nystrom_np.config import Config

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4  # max |logits - transformers' logits|, float32, small config


@pytest.fixture(autouse=True)
def hermetic_hub(tmp_path, monkeypatch):
    """No test reads the user's hub cache or touches the network unless it says so."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def same_model(a, b):
    """Whether two models have bit-identical weights."""
    sa, sb = to_state_dict(a), to_state_dict(b)
    return sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)


def write_config(directory, **overrides):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**SMALL, **overrides}))
    return directory / "config.json"


# --------------------------------------------------------------- files made without torch


@pytest.fixture(scope="session")
def small(tmp_path_factory):
    """Random small models saved in both layouts, without torch."""
    root = tmp_path_factory.mktemp("small")
    config = Config.from_dict(SMALL)
    models = [random_model(config, seed=s) for s in (0, 1)]
    states = [to_state_dict(m) for m in models]

    old, new, both = root / "old", root / "new", root / "both"
    for d in (old, new, both):
        write_config(d)
    write_torch_zip(old / "pytorch_model.bin", old_layout(states[0]), tied=TIED)
    save_file(states[0], str(new / "model.safetensors"), metadata={"format": "pt"})
    save_file(states[0], str(both / "model.safetensors"), metadata={"format": "pt"})
    write_torch_zip(both / "pytorch_model.bin", old_layout(states[1]), tied=TIED)
    return SimpleNamespace(
        config=config, models=models, states=states, old=old, new=new, both=both
    )


def test_old_layout_bin_reads_without_torch_with_shared_storages(small):
    state = read_torch_bin(small.old / "pytorch_model.bin")
    assert set(state) == set(old_layout(small.states[0]))
    for name, value in old_layout(small.states[0]).items():
        assert state[name].dtype == value.dtype and np.array_equal(state[name], value), name
    assert np.shares_memory(
        state["cls.predictions.decoder.weight"],
        state["nystromformer.embeddings.word_embeddings.weight"],
    )
    assert state["nystromformer.embeddings.position_ids"].tolist() == [list(range(2, 72))]


def test_no_torch_needed(small):
    """Reading a .bin and loading a model work with torch made unimportable."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from nystrom_np.checkpoint import load\n"
        f"load({str(small.old)!r})\n"
        "assert sys.modules['torch'] is None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_offsets_strides_and_dtypes_of_torch_records(tmp_path):
    base = np.arange(12, dtype=np.float32)
    items = [
        ("whole", op_tensor("0", "FloatStorage", 12, 0, (12,), (1,))),
        ("window", op_tensor("0", "FloatStorage", 12, 2, (2, 3), (3, 1))),  # elements 2..7
        ("transposed", op_tensor("0", "FloatStorage", 12, 0, (4, 3), (1, 4))),
        ("empty", op_tensor("0", "FloatStorage", 12, 12, (0, 5), (5, 1))),
        ("ids", op_tensor("1", "LongStorage", 3, 0, (1, 3), (3, 1))),
        ("half", op_tensor("2", "HalfStorage", 2, 1, (1,), (1,))),
    ]
    storages = {
        "0": base,
        "1": np.array([5, -6, 7], dtype=np.int64),
        "2": np.array([0.5, -2.0], dtype=np.float16),
    }
    path = write_zip(tmp_path / "records.bin", op_state_dict(items), storages)
    state = read_weights(path)
    assert np.array_equal(state["whole"], base)
    assert np.array_equal(state["window"], base[2:8].reshape(2, 3))
    assert np.array_equal(state["transposed"], base.reshape(3, 4).T)
    assert state["empty"].shape == (0, 5)
    assert state["ids"].dtype == np.int64 and state["ids"].tolist() == [[5, -6, 7]]
    assert state["half"].dtype == np.float16 and state["half"].tolist() == [-2.0]
    assert np.shares_memory(state["window"], state["whole"])
    assert not state["whole"].flags.writeable  # views of a read-only memory map


def test_big_endian_storages_and_other_prefixes(tmp_path):
    items = [
        ("w", op_tensor("0", "FloatStorage", 3, 0, (3,), (1,))),
        ("v", op_tensor("0", "FloatStorage", 3, 1, (2,), (1,))),  # the same storage again
        ("i", op_tensor("1", "LongStorage", 2, 0, (2,), (1,))),
    ]
    storages = {"0": np.array([1.5, -2.0, 3.25], np.float32), "1": np.array([7, -1])}
    path = write_zip(tmp_path / "be.bin", op_state_dict(items), storages, "pytorch_model", "big")
    state = read_torch_bin(path)
    assert state["w"].tolist() == [1.5, -2.0, 3.25] and state["v"].tolist() == [-2.0, 3.25]
    assert state["i"].tolist() == [7, -1]


def test_safetensors_are_memory_mapped_views(small):
    path = small.new / "model.safetensors"
    mapped, copied = read_safetensors(path), read_safetensors(path, mmap=False)
    assert list(mapped) == list(copied) and set(mapped) == set(small.states[0])
    for name, value in copied.items():
        assert mapped[name].dtype == value.dtype and np.array_equal(mapped[name], value)
    word = mapped["nystromformer.embeddings.word_embeddings.weight"]
    assert not word.flags.writeable and not word.flags.owndata  # no copy was made
    assert copied["nystromformer.embeddings.word_embeddings.weight"].flags.writeable


def test_safetensors_without_a_numpy_dtype_is_refused(tmp_path):
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}})
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(4))
    for mmap in (True, False):
        with pytest.raises(ValueError, match="BF16|bfloat16"):
            read_safetensors(path, mmap=mmap)


def test_safetensors_preferred_when_both_files_exist(small):
    assert find_checkpoint(small.both)[1].name == "model.safetensors"
    assert same_model(load(small.both), small.models[0])  # the .bin there holds seed 1
    assert same_model(load(small.both / "pytorch_model.bin"), small.models[1])


def test_both_layouts_load_to_the_same_model(small):
    old, new = load(small.old), load(small.new)
    assert same_model(old, new) and same_model(new, small.models[0])
    assert load(small.old, dtype=np.float64).dtype == np.float64


def test_single_file_with_a_config_given_or_found(small, tmp_path):
    alone = tmp_path / "alone.safetensors"
    shutil.copyfile(small.new / "model.safetensors", alone)
    with pytest.raises(FileNotFoundError, match="pass config="):
        load(alone)
    assert same_model(load(alone, config=small.config), small.models[0])
    assert same_model(load(alone, config=small.new / "config.json"), small.models[0])
    assert same_model(load(small.old / "pytorch_model.bin"), small.models[0])  # sibling config


def test_key_problems_are_reported_together(small, tmp_path):
    state = dict(small.states[0])
    del state["nystromformer.encoder.layer.1.output.dense.bias"]
    state["nystromformer.encoder.layer.0.extra.weight"] = np.zeros((3, 4), np.float32)
    state["cls.predictions.bias"] = np.zeros(99, np.float32)
    write_config(tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as error:
        load(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "model.safetensors") in message
    assert "nystromformer.encoder.layer.1.output.dense.bias (32,)" in message
    assert "nystromformer.encoder.layer.0.extra.weight (3, 4)" in message
    assert "cls.predictions.bias has shape (99,), expected (100,)" in message


def test_wrong_config_for_the_weights(small, tmp_path):
    write_config(tmp_path, hidden_size=64)
    shutil.copyfile(small.new / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="word_embeddings.weight has shape"):
        load(tmp_path)


# -------------------------------------------------------------------- unsafe pickles


class Payload:
    """Pickles to a call of ``func(*args)`` at load time: what a malicious file does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker):
    """Pickled objects that create ``marker`` when unpickled by a plain ``pickle.load``."""
    code = f"open({str(marker)!r}, 'w').write('pwned')"
    return {
        "os.system": Payload(os.system, f"touch '{marker}'"),
        "builtins.exec": Payload(exec, code),
        "builtins.eval": Payload(eval, code),
    }


def payload_opcodes(obj):
    """The opcodes that push ``obj`` (no PROTO, no STOP), to splice into a pickle."""
    return pickle.dumps(obj, protocol=2)[2:-1]


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "builtins.eval"])
def test_payloads_are_live(tmp_path, kind):
    """Control: under plain pickle each payload creates its marker, so the test below
    would see it if read_torch_bin ran the payload."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(payloads(marker)[kind], protocol=2))
    assert marker.exists()


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "builtins.eval"])
@pytest.mark.parametrize("where", ["whole pickle", "after a valid tensor"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, kind, where):
    marker = tmp_path / "pwned"
    payload = payloads(marker)[kind]
    if where == "whole pickle":
        data = pickle.dumps({"w": payload}, protocol=2)
    else:
        tensor = op_tensor("0", "FloatStorage", 3, 0, (3,), (1,))
        data = op_state_dict([("ok", tensor), ("evil", payload_opcodes(payload))])
    path = write_zip(tmp_path / "pytorch_model.bin", data, {"0": np.ones(3, np.float32)})
    write_config(tmp_path)
    module, name = kind.split(".")
    module = {"os": os.system.__module__, "builtins": "__builtin__"}[module]  # as pickled
    with pytest.raises(ValueError, match=f"asks for global '{module}.{name}'"):
        load(tmp_path)
    with pytest.raises(ValueError, match="nothing of it was run"):
        read_torch_bin(path)
    assert not marker.exists()


def test_torch_named_but_unneeded_globals_are_refused(tmp_path):
    for module, name in [("torch", "load"), ("torch._utils", "_rebuild_parameter")]:
        data = b"\x80\x02" + op_global(module, name) + b")R."
        path = write_zip(tmp_path / "x.bin", data, {})
        with pytest.raises(ValueError, match=f"'{module}.{name}'"):
            read_torch_bin(path)


def test_build_on_an_allowed_global_is_refused(tmp_path):
    """BUILD could set attributes on what find_class returned; ours cannot be changed."""
    slots = b"}" + op_str("__defaults__") + b"(" + op_int(1) + b"ts"  # {"__defaults__": (1,)}
    state = b"N" + slots + b"\x86"  # (None, slots): BUILD calls setattr for each
    data = b"\x80\x02" + op_global("torch._utils", "_rebuild_tensor_v2") + state + b"b."
    with pytest.raises(ValueError, match="not a valid state-dict pickle"):
        read_torch_bin(write_zip(tmp_path / "x.bin", data, {}))


def test_plain_pickle_file_is_refused_unread(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(pickle.dumps(payloads(marker)["os.system"], protocol=2))
    with pytest.raises(ValueError, match="legacy"):
        read_weights(path)
    assert not marker.exists()


def test_bfloat16_is_refused_with_a_way_out(tmp_path):
    data = op_state_dict([("w", op_tensor("0", "BFloat16Storage", 2, 0, (2,), (1,)))])
    path = write_zip(tmp_path / "x.bin", data, {"0": np.zeros(2, np.uint16)})
    with pytest.raises(ValueError, match="bfloat16.*float32"):
        read_torch_bin(path)


# ---------------------------------------------------------------- damaged files


def cuts(size):
    return sorted({0, 1, 8, 20, size // 10, size // 2, size - 100, size - 1})


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.safetensors"])
def test_truncated_files_give_a_clear_error(small, tmp_path, name):
    source = small.old if name == "pytorch_model.bin" else small.new
    data = (source / name).read_bytes()
    write_config(tmp_path)
    for cut in cuts(len(data)):
        (tmp_path / name).write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as error:
            load(tmp_path)
        assert str(tmp_path / name) in str(error.value), cut


def test_corrupted_bytes_are_caught(small, tmp_path):
    data = bytearray((small.old / "pytorch_model.bin").read_bytes())
    with zipfile.ZipFile(small.old / "pytorch_model.bin") as z:
        info = z.getinfo("archive/data/3")
    data[info.header_offset + 100] ^= 0xFF  # one byte inside a storage
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="CRC mismatch"):
        read_torch_bin(path)
    assert read_torch_bin(path, check_crc=False)  # the structure itself is intact


def test_storage_size_and_bounds_are_checked(tmp_path):
    short = op_state_dict([("w", op_tensor("0", "FloatStorage", 10, 0, (10,), (1,)))])
    path = write_zip(tmp_path / "short.bin", short, {"0": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match="holds 32 bytes, the pickle expects 10"):
        read_torch_bin(path)
    far = op_state_dict([("w", op_tensor("0", "FloatStorage", 4, 2, (2, 2), (2, 1)))])
    path = write_zip(tmp_path / "far.bin", far, {"0": np.ones(4, np.float32)})
    with pytest.raises(ValueError, match="reaches element 5 of a storage of 4"):
        read_torch_bin(path)
    missing = op_state_dict([("w", op_tensor("7", "FloatStorage", 1, 0, (1,), (1,)))])
    with pytest.raises(ValueError, match="archive/data/7 is missing"):
        read_torch_bin(write_zip(tmp_path / "missing.bin", missing, {}))


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "is empty"),
        (b"hello, not a checkpoint\n" * 10, "neither a safetensors file nor"),
        (b"PK\x03\x04 garbage", "not a readable zip"),
    ],
)
def test_non_checkpoint_files(tmp_path, content, match):
    path = tmp_path / "weights.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        read_weights(path)


def test_zip_that_is_not_a_state_dict(tmp_path):
    np.savez(tmp_path / "arrays.npz", a=np.ones(3))
    with pytest.raises(ValueError, match="not a torch checkpoint"):
        read_weights(tmp_path / "arrays.npz")
    nested = b"\x80\x02" + op_global("collections", "OrderedDict") + b")R(" + op_str("a")
    nested += op_int(3) + b"u."
    with pytest.raises(ValueError, match="is a int, not a tensor"):
        read_torch_bin(write_zip(tmp_path / "x.bin", nested, {}))
    with pytest.raises(ValueError, match="not a valid state-dict pickle"):
        read_torch_bin(write_zip(tmp_path / "y.bin", b"\x80\x02garbage", {}))


# ------------------------------------------------------------------- the hub cache


def fake_cache(root, repo_id, snapshots, refs):
    """A hub cache as huggingface_hub lays it out: blobs, symlinked snapshots, refs."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    for commit, files in snapshots.items():
        for name, source in files.items():
            blob = repo / "blobs" / f"{commit[:8]}-{name}"
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, blob)
            link = repo / "snapshots" / commit / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    for ref, commit in refs.items():
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return repo


MAIN, PR = "a" * 40, "b" * 40


@pytest.fixture
def cache(small, tmp_path, monkeypatch):
    root = tmp_path / "hub"
    fake_cache(
        root,
        "uw-madison/nystromformer-512",
        {
            MAIN: {n: small.old / n for n in ("config.json", "pytorch_model.bin")},
            PR: {
                "config.json": small.new / "config.json",
                "model.safetensors": small.both / "model.safetensors",
            },
        },
        {"main": MAIN, "refs/pr/1": PR},
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    return root


def test_hub_id_from_the_cache(small, cache):
    config, weights = find_checkpoint("uw-madison/nystromformer-512")
    assert weights == cache / f"models--uw-madison--nystromformer-512/snapshots/{MAIN}" / (
        "pytorch_model.bin"
    )
    assert same_model(load("uw-madison/nystromformer-512"), small.models[0])
    pr = find_checkpoint("uw-madison/nystromformer-512", revision="refs/pr/1")[1]
    assert pr.parent.name == PR and pr.name == "model.safetensors"
    by_commit = find_checkpoint("uw-madison/nystromformer-512", revision=PR)[1]
    assert by_commit == pr


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert hub_cache_dir() == Path("~/.cache/huggingface/hub").expanduser()


def test_offline_and_not_cached_says_where_it_looked_and_what_to_run(cache, monkeypatch):
    hub = pytest.importorskip("huggingface_hub", reason="checks that no download is tried")

    def no_network(*args, **kwargs):
        raise AssertionError("HF_HUB_OFFLINE=1, yet a download was tried")

    monkeypatch.setattr(hub, "hf_hub_download", no_network)
    with pytest.raises(FileNotFoundError) as error:
        load("uw-madison/nystromformer-1024", revision="refs/pr/1")
    message = str(error.value)
    assert str(cache) in message and "HF_HUB_OFFLINE" in message
    assert (
        "huggingface-cli download uw-madison/nystromformer-1024 config.json pytorch_model.bin "
        "spiece.model --revision refs/pr/1 --local-dir nystromformer-1024" in message
    )


def test_download_tries_safetensors_then_the_bin(small, tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub", reason="the download path uses it")
    from huggingface_hub.errors import EntryNotFoundError

    calls = []

    def fake_download(repo_id, filename, *, revision, cache_dir, endpoint, etag_timeout):
        assert etag_timeout <= 5  # a stalled hub is given up on in seconds, not minutes
        calls.append((repo_id, filename, revision, Path(cache_dir)))
        if filename == "model.safetensors":
            raise EntryNotFoundError("404: model.safetensors is not in this repo")
        return str(small.old / filename)

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(checkpoint, "hub_reachable", lambda: True)
    monkeypatch.setattr(checkpoint, "_head", lambda url: (200, None))  # every file answers
    model = load("uw-madison/nystromformer-512", revision="v1.0")
    assert same_model(model, small.models[0])
    cache_dir = hub_cache_dir()
    assert calls == [  # the tokenizer comes along with the weights
        ("uw-madison/nystromformer-512", name, "v1.0", cache_dir)
        for name in ("config.json", "model.safetensors", "pytorch_model.bin", "spiece.model")
    ]


def test_unreachable_hub_is_not_retried(monkeypatch):
    """No network: one quick probe, no download attempt, and the error says so."""
    hub = pytest.importorskip("huggingface_hub", reason="checks that no download is tried")

    def no_download(*args, **kwargs):
        raise AssertionError("hf_hub_download called although the hub is unreachable")

    def refuse(address, *args, **kwargs):
        raise OSError("network is unreachable (test)")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "hf_hub_download", no_download)
    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(FileNotFoundError, match="did not answer within 3 s"):
        load("uw-madison/nystromformer-512")


def test_without_huggingface_hub(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(FileNotFoundError, match="huggingface_hub is not installed"):
        load("uw-madison/nystromformer-512")


def test_local_paths_win_and_bad_sources(small, tmp_path, monkeypatch):
    monkeypatch.chdir(small.old.parent)
    assert find_checkpoint("old")[1] == Path("old/pytorch_model.bin")  # a folder, not a hub id
    with pytest.raises(ValueError, match="applies to hub ids"):
        find_checkpoint(small.old, revision="main")
    with pytest.raises(FileNotFoundError, match="holds none of"):
        find_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        find_checkpoint(tmp_path / "missing" / "model.safetensors")
    # A missing weights file named alone is not asked of the hub (nor met with its help).
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(checkpoint, "hub_reachable", lambda *a: pytest.fail("asked the hub"))
    with pytest.raises(FileNotFoundError, match=r"no such file: nofile.bin \(a name ending"):
        find_checkpoint("nofile.bin")


# ------------------------------------------------------------------------- converting


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "nystrom_np", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_cli_convert_round_trip(small, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "converted"
    shutil.copytree(small.old, src)
    (src / "spiece.model").write_bytes(b"fake tokenizer")
    result = run_cli("convert", src, dst)
    assert result.returncode == 0, result.stderr
    assert "verified" in result.stdout and "drop cls.predictions.decoder.weight" in result.stdout
    assert sorted(p.name for p in dst.iterdir()) == [
        "config.json",
        "model.safetensors",
        "spiece.model",
    ]
    assert read_safetensors(dst / "model.safetensors").keys() == small.states[0].keys()
    assert same_model(load(dst), load(small.old))
    assert json.loads((dst / "config.json").read_text()) == SMALL

    again = run_cli("convert", src, dst)
    assert again.returncode == 1 and "exists" in again.stderr and "--force" in again.stderr
    assert run_cli("convert", src, dst, "--force").returncode == 0


def test_convert_writes_nothing_for_a_bad_source(small, tmp_path):
    state = dict(small.states[0])
    del state["cls.predictions.bias"]
    write_config(tmp_path / "bad")
    save_file(state, str(tmp_path / "bad" / "model.safetensors"))
    result = run_cli("convert", tmp_path / "bad", tmp_path / "out")
    assert result.returncode == 1 and "missing cls.predictions.bias" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    assert run_cli("convert").returncode == 2  # argparse usage error
    assert "convert" in run_cli("--help").stdout


def test_convert_logs_and_returns_the_path(small, tmp_path):
    lines = []
    out = convert(small.new, tmp_path, log=lines.append)
    assert out == tmp_path / "model.safetensors" and lines[-1].startswith("verified")


# ------------------------------------------------------- real torch / transformers files


@pytest.fixture(scope="session")
def hf(tmp_path_factory):
    """A transformers model saved by torch (old layout), save_pretrained, and legacy torch."""
    torch = pytest.importorskip("torch", reason="making real torch files needs torch")
    transformers = pytest.importorskip("transformers", reason="the reference model")
    root = tmp_path_factory.mktemp("hf")
    hf_config = {k: v for k, v in SMALL.items() if k != "model_type"}

    def make(seed):
        torch.manual_seed(seed)
        config = transformers.NystromformerConfig(**hf_config)
        model = transformers.NystromformerForMaskedLM(config).eval()
        with torch.no_grad():  # no zero bias or unit LayerNorm gain: every weight matters
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        return model

    model, other = make(0), make(1)
    old, new, both, legacy = (root / n for n in ("old", "new", "both", "legacy"))

    def save_old_layout(m, directory):
        """As transformers 4.13 saved it: position_ids first, decoder tied by storage."""
        directory.mkdir(exist_ok=True)
        state = collections.OrderedDict()
        n = m.config.max_position_embeddings
        state["nystromformer.embeddings.position_ids"] = torch.arange(n).expand((1, -1)) + 2
        state.update(m.state_dict())
        torch.save(state, directory / "pytorch_model.bin")
        m.config.to_json_file(directory / "config.json")
        return state

    old_state = save_old_layout(model, old)
    model.save_pretrained(new)
    model.save_pretrained(both)
    save_old_layout(other, both)
    legacy.mkdir()
    torch.save(old_state, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    model.config.to_json_file(legacy / "config.json")

    rng = np.random.default_rng(0)
    ids = rng.integers(0, SMALL["vocab_size"], size=(2, 11))
    mask = np.ones((2, 11), dtype=np.int64)
    mask[1, 7:] = 0
    types = rng.integers(0, 2, size=(2, 11))
    with torch.no_grad():
        logits = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            token_type_ids=torch.from_numpy(types),
        ).logits.numpy()
    return SimpleNamespace(
        torch=torch, transformers=transformers, model=model, old=old, new=new, both=both,
        legacy=legacy, ids=ids, mask=mask, types=types, logits=logits,
    )  # fmt: skip


def max_error(hf, model):
    logits = forward(model, hf.ids, hf.mask, hf.types)
    return float(np.abs(logits - hf.logits).max())


@pytest.mark.parametrize(
    "source", ["old", "new", "both", "old/pytorch_model.bin", "new/model.safetensors"]
)
def test_loaded_files_match_transformers_logits(hf, source):
    model = load(Path(hf.old.parent) / source)
    assert model.dtype == np.float32
    assert max_error(hf, model) <= TOLERANCE


def test_parity_check_can_fail(hf):
    """Control: other weights of the same config miss the reference logits by far."""
    assert max_error(hf, load(hf.both / "pytorch_model.bin")) > 100 * TOLERANCE


def test_torch_old_layout_has_tied_storages_and_position_ids(hf):
    state = read_torch_bin(hf.old / "pytorch_model.bin")
    torch_state = hf.torch.load(hf.old / "pytorch_model.bin", weights_only=True)
    assert list(state) == list(torch_state)  # same names, same order
    for name, tensor in torch_state.items():
        assert state[name].dtype == tensor.numpy().dtype
        assert np.array_equal(state[name], tensor.numpy()), name
    assert np.shares_memory(
        state["cls.predictions.decoder.weight"],
        state["nystromformer.embeddings.word_embeddings.weight"],
    )
    assert np.shares_memory(state["cls.predictions.decoder.bias"], state["cls.predictions.bias"])
    assert state["nystromformer.embeddings.position_ids"].dtype == np.int64
    assert same_model(load(hf.old), load(hf.new))


def test_hand_made_zip_is_what_torch_reads(hf, small):
    """The torch-free writer of these tests produces files torch reads the same way."""
    torch_state = hf.torch.load(small.old / "pytorch_model.bin", weights_only=True)
    ours = old_layout(small.states[0])
    assert list(torch_state) == list(ours)
    for name, tensor in torch_state.items():
        assert np.array_equal(tensor.numpy(), ours[name]), name
    weight, decoder = (
        torch_state[k] for k in ("nystromformer.embeddings.word_embeddings.weight",
                                 "cls.predictions.decoder.weight")
    )  # fmt: skip
    assert weight.untyped_storage().data_ptr() == decoder.untyped_storage().data_ptr()


def test_legacy_torch_file_gets_a_working_recipe(hf, tmp_path):
    legacy = hf.legacy / "pytorch_model.bin"
    with pytest.raises(ValueError, match="legacy") as error:
        load(hf.legacy)
    command = next(line for line in str(error.value).splitlines() if "python -c" in line)
    python, flag, code = shlex.split(command)  # as a shell reads the pasted line
    assert (python, flag) == ("python", "-c")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    resaved = legacy.with_name("pytorch_model-zip.bin")
    assert max_error(hf, load(resaved)) <= TOLERANCE


def test_real_bfloat16_torch_file_is_refused(hf, tmp_path):
    hf.torch.save({"w": hf.torch.ones(3, dtype=hf.torch.bfloat16)}, tmp_path / "bf16.bin")
    with pytest.raises(ValueError, match="bfloat16"):
        read_weights(tmp_path / "bf16.bin")


def test_converted_checkpoint_loads_in_transformers(hf, tmp_path):
    result = run_cli("convert", hf.old, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert max_error(hf, load(tmp_path / "out")) <= TOLERANCE
    reloaded, info = hf.transformers.NystromformerForMaskedLM.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with hf.torch.no_grad():
        logits = reloaded.eval()(
            input_ids=hf.torch.from_numpy(hf.ids),
            attention_mask=hf.torch.from_numpy(hf.mask),
            token_type_ids=hf.torch.from_numpy(hf.types),
        ).logits.numpy()
    assert np.array_equal(logits, hf.logits)


def test_load_benchmark_runs_small(hf):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "load.py"),
            "--small",
            "--repeats",
            "1",
            "--methods",
            "read_safetensors,read_torch_bin,torch.load",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(record["methods"]) == {"read_safetensors", "read_torch_bin", "torch.load"}
    for row in record["methods"].values():
        assert row["total_s"] > 0 and row["rss_mb"] >= 0
