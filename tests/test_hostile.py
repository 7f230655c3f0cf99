"""Hostile files and bad input: each kind ends in a clear error, nothing crashes.

Each test generates variants of one kind of attack or mistake (hypothesis), not one
example: a config value of the wrong type or range, a pickle nested or shared without
bound, a zip directory of millions of entries, a storage that inflates past what the model
holds, weights of the wrong dtype, a convert that fails at any step, a file name built to
run a command when pasted, a name lookup that never returns. A refused file must be
refused before the work it asks for: the tests bound the memory (tracemalloc) and,
generously, the time of a refusal.
"""

import json
import math
import os
import shlex
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path

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
from _hub_server import wait_until
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from nystrom_np import from_state_dict, random_model, to_state_dict
from nystrom_np.checkpoint import (
    HUB_TIMEOUT,
    PICKLE_LIMITS,
    ZIP_LIMITS,
    CheckpointError,
    check_pickle,
    convert,
    fetch_file,
    hub_reachable,
    load,
    read_torch_bin,
    read_weights,
)
from nystrom_np.config import ACTIVATIONS, INT_RANGES, OPTIONAL, Config

REPO = Path(__file__).resolve().parents[1]
FAST = 5.0  # seconds: "refused quickly" (under 1 s here), generous for a loaded machine
EXAMPLES = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
OD = op_global("collections", "OrderedDict")


@pytest.fixture(autouse=True)
def hermetic_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def state():
    return to_state_dict(random_model(Config.from_dict(SMALL), seed=0))


def checkpoint_dir(directory, state, kind="bin", config=None):
    """A folder with config.json and the state as a torch zip (old layout) or safetensors."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config or SMALL))
    if kind == "bin":  # the old layout when the state has it all, else the state as it is
        full = "cls.predictions.bias" in state and state["cls.predictions.bias"].dtype.kind == "f"
        layout = old_layout(state) if full else state
        write_torch_zip(directory / "pytorch_model.bin", layout, tied=TIED if full else None)
    else:
        save_file(state, str(directory / "model.safetensors"))
    return directory


def refused(call, match, *, kind=(ValueError, TypeError), peak=None):
    """``call()`` raises ``kind`` matching ``match``, quickly, and (if ``peak`` is given)
    within ``peak`` bytes of newly allocated memory. Returns the message.

    Memory is traced (tracemalloc) in a second call, untimed: tracing slows Python code
    several times over."""
    start = time.perf_counter()
    with pytest.raises(kind, match=match) as error:
        call()
    seconds = time.perf_counter() - start
    assert seconds < FAST, f"refused after {seconds:.1f} s"
    if peak is not None:
        tracemalloc.start()
        try:
            with pytest.raises(kind, match=match):
                call()
            used = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert used < peak, f"refusing took {used / 1e6:.1f} MB"
    return str(error.value)


# ------------------------------------------------------------------------- config.json

BAD_VALUES = st.one_of(
    st.sampled_from([0, -1, 10**9, 10**40, True, False, None, 12.0, float("nan"), "12"]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@EXAMPLES
@given(field=st.sampled_from(sorted(INT_RANGES)), value=BAD_VALUES)
def test_bad_integer_fields_are_refused_by_name(field, value):
    low, high = INT_RANGES[field]
    ok = (
        isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    ) or (value is None and field in OPTIONAL)
    if ok:
        return  # a valid value drawn by chance; others are checked elsewhere
    refused(lambda: Config.from_dict({field: value}), field)


@EXAMPLES
@given(
    field=st.sampled_from(["layer_norm_eps", "initializer_range"]),
    value=st.one_of(
        st.floats(max_value=0), st.sampled_from([math.nan, math.inf, "1e-5", None, [1e-5]])
    ),
)
def test_bad_float_fields_are_refused_by_name(field, value):
    if field == "initializer_range" and value == 0:
        return  # zero is a valid initializer_range
    refused(lambda: Config.from_dict({field: value}), field)


@EXAMPLES
@given(field=st.sampled_from(["hidden_act", "model_type"]), value=BAD_VALUES)
def test_bad_string_fields_are_refused_by_name(field, value):
    if value in ACTIVATIONS or value in ("nystromformer", "bert"):
        return  # a valid value drawn by chance
    refused(lambda: Config.from_dict({field: value}), field)
    kind = ValueError if isinstance(value, str) else TypeError  # an unknown name; not a str
    refused(lambda: Config(**{field: value}), field, kind=kind)


def test_an_absurd_config_is_an_error_in_milliseconds_with_a_short_message(tmp_path):
    # 10**4000 prints as 4,001 digits; 10**5000 does not print at all (Python's 4,300 limit)
    for layers in (10**5, 10**6, 10**30, 10**4000, 10**5000):
        message = refused(lambda n=layers: Config.from_dict({"num_hidden_layers": n}), "layers")
        assert len(message) < 200


@pytest.mark.parametrize(
    "content, match",
    [
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nests JSON too deeply|not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"hidden_size": 1' + b"0" * 5000 + b"}", "not valid JSON"),
        (b'{"num_hidden_layers": 12', "not valid JSON"),
        (b'{"layer_norm_eps": NaN}', "layer_norm_eps"),
    ],
)
def test_broken_config_json_names_the_file(tmp_path, state, content, match):
    folder = checkpoint_dir(tmp_path / "ckpt", state)
    (folder / "config.json").write_bytes(content)
    message = refused(lambda: load(folder), match)
    assert str(folder / "config.json") in message


def test_huge_config_and_tokenizer_files_are_refused_unread(tmp_path, state, spiece_path):
    from nystrom_np.tokenizer import Tokenizer

    folder = checkpoint_dir(tmp_path / "ckpt", state)
    for name in ("config.json", "spiece.model"):
        with open(folder / name, "wb") as f:
            f.truncate(4 << 30)  # a sparse 4 GB file: reading it whole would take 4 GB
    refused(lambda: load(folder), "config.json is over", peak=50 << 20)
    refused(lambda: Tokenizer(folder / "spiece.model"), "over", peak=50 << 20)


def test_a_huge_safetensors_header_is_refused_unparsed(tmp_path):
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 1 << 30) + b'{"w": ' + b"[" * 1000)
        f.truncate(8 + (1 << 30))  # sparse: the header would be 1 GB of JSON
    refused(lambda: read_weights(path), "header claims", peak=4 << 20)


# ------------------------------------------------------------------ the zip's directory

SIGNATURES = {"end": b"PK\x05\x06", "zip64": b"PK\x06\x06", "locator": b"PK\x06\x07"}


def end_records(entries, size, offset, at, zip64):
    """The records that end a zip whose central directory holds ``entries`` entries in
    ``size`` bytes from ``offset``, written at ``at``. With ``zip64``, the zip64 record and
    locator come first (as torch writes them) and the classic record's fields say 'see
    there' (0xFFFF...), as the format asks of a value that does not fit."""
    if not zip64:
        count, size = min(entries, 0xFFFF), min(size, 0xFFFFFFFF)
        return struct.pack("<4s4H2LH", SIGNATURES["end"], 0, 0, count, count, size, offset, 0)
    record = struct.pack("<4sQ2H2L4Q", SIGNATURES["zip64"], 44, 45, 45, 0, 0, entries,
                         entries, size, offset)  # fmt: skip
    locator = struct.pack("<4sLQL", SIGNATURES["locator"], 0, at, 1)
    classic = struct.pack("<4s4H2LH", SIGNATURES["end"], 0, 0, *[0xFFFF] * 2, *[2**32 - 1] * 2, 0)
    return record + locator + classic


def with_end(path, *, entries=None, size=None, zip64=False):
    """Rewrite the end of a zip zipfile wrote (no comment), declaring ``entries`` entries
    and a directory of ``size`` bytes (default: what it holds)."""
    data = path.read_bytes()
    _, _, _, _, count, true_size, offset, _ = struct.unpack("<4s4H2LH", data[-22:])
    entries, size = count if entries is None else entries, true_size if size is None else size
    path.write_bytes(data[:-22] + end_records(entries, size, offset, len(data) - 22, zip64))
    return path


def directory_of(path, entries, name_length):
    """A zip of one empty file and a central directory of ``entries`` real entries, all
    pointing at it, each named by ``name_length`` letters (and 46 bytes of record)."""
    local = struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", 20, 0, *[0] * 7, 1, 0) + b"a"
    record = struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 0, 20, 0, *[0] * 7,
                         name_length, *[0] * 6)  # fmt: skip
    directory = (record + b"a" * name_length) * entries
    ends = end_records(entries, len(directory), len(local), len(local) + len(directory),
                       zip64=entries > 0xFFFF)  # fmt: skip
    path.write_bytes(local + directory + ends)
    return path


@EXAMPLES
@given(
    claim=st.sampled_from(["entries", "size"]),
    zip64=st.booleans(),
    excess=st.integers(1, 2**40),
)
def test_a_zip_end_record_that_claims_too_much_is_refused_from_the_end(
    tmp_path, claim, zip64, excess
):
    """A small, valid torch zip whose end record declares millions of entries (a zip64
    count: the classic one stops at 65,535), or a directory larger than the file."""
    tensor = op_tensor("0", "FloatStorage", 3, 0, (3,), (1,))

    def torch_zip():
        return zip_of(tmp_path, op_state_dict([("w", tensor)]), {"0": np.ones(3, np.float32)})

    path = with_end(torch_zip(), zip64=zip64)  # the truth, told either way, reads
    assert read_torch_bin(path)["w"].tolist() == [1, 1, 1]
    path = torch_zip()
    if claim == "entries":
        with_end(path, entries=ZIP_LIMITS["entries"] + excess, zip64=True)
        match = rf"declares {ZIP_LIMITS['entries'] + excess} entries; at most"
    else:
        with_end(path, size=(1 << 20) + excess, zip64=zip64)  # the file is 1 kB
        match = "more than the file holds before its end record"
    message = refused(lambda: read_torch_bin(path), match, peak=(1 << 20))
    assert str(path) in message


@pytest.mark.parametrize(
    "entries, name_length",
    [(200_000, 1), (1_000_000, 1), (50_000, 200)],  # 9, 47, 12 MB: past the count or size
)
def test_a_zip_directory_of_many_entries_is_refused_before_zipfile_reads_it(
    tmp_path, entries, name_length
):
    """zipfile would build an object per entry: 8 times the file in memory, and seconds."""
    path = directory_of(tmp_path / "entries.bin", entries, name_length)
    size = path.stat().st_size
    message = refused(lambda: read_weights(path), r"zip directory (declares|is \d+ bytes)",
                      peak=size // 4)  # fmt: skip
    assert str(path) in message


# ------------------------------------------------------------------------------ pickles


def zip_of(tmp_path, pickle_bytes, storages=None):
    return write_zip(tmp_path / "hostile.bin", pickle_bytes, storages or {})


def key_nested(depth):
    """A state dict whose one key is a tuple nested ``depth`` deep (TUPLE1 on TUPLE1 ...)."""
    return b"\x80\x02" + OD + b")R" + op_int(1) + b"\x85" * depth + op_int(0) + b"s."


def shared_tuples(levels):
    """A key of ``levels`` nested tuples, each holding the one below three times (BINPUT,
    BINGET twice, TUPLE3): a few bytes that unfold to 3 ** levels objects when hashed."""
    body = op_int(1) + b"q\x00h\x00h\x00\x87" * levels
    return b"\x80\x02" + OD + b")R" + body + op_int(0) + b"s."


def build_loop(items, repeats):
    """A dict of ``items`` entries, then BUILD with it as the state ``repeats`` times: each
    BUILD would copy the whole dict."""
    state = b"".join(op_str(f"k{i}") + op_int(i) for i in range(items))
    return (
        b"\x80\x02" + OD + b")Rq\x00}q\x01(" + state + b"u" + b"h\x00h\x01b" * repeats + b"."
    )


def copy_loop(items, repeats):
    """OrderedDict(d) over and over: each call copies d."""
    state = b"".join(op_str(f"k{i}") + op_int(i) for i in range(items))
    return b"\x80\x02" + OD + b")R}q\x01(" + state + b"u" + (OD + b"h\x01\x85R") * repeats + b"."


@EXAMPLES
@given(depth=st.integers(PICKLE_LIMITS["depth"] + 1, 200_000))
def test_deeply_nested_keys_are_refused_before_they_are_built(tmp_path, depth):
    path = zip_of(tmp_path, key_nested(depth))
    peak = 20 * path.stat().st_size + (4 << 20)  # a small multiple of the file
    refused(lambda: read_torch_bin(path), "nests deeper", peak=peak)


def test_a_million_deep_key_does_not_crash_the_cli(tmp_path, state, spiece_path):
    """The issue's 1 MB file: a segfault, without the depth check (torch.load too)."""
    folder = checkpoint_dir(tmp_path / "ckpt", state)
    zip_of(folder, key_nested(1_000_000)).replace(folder / "pytorch_model.bin")
    run = cli("fill-mask", "a [MASK]", "--checkpoint", folder, "--tokenizer", spiece_path)
    assert run.returncode == 1 and "nests deeper" in run.stderr, run.stderr
    run = cli("convert", folder, tmp_path / "out")
    assert run.returncode == 1 and "nests deeper" in run.stderr, run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "bomb, expected",
    [
        ("shared", "more than 4000000 objects"),  # a key of 3**20 = 3.5 billion objects
        ("long", "runs past 300000 opcodes"),  # 4 million NONEs: 4 MB, one opcode each
        ("build", None),  # 50,000 BUILDs with a 10,000-item state: 500 million copies
        ("copy", "not a valid state-dict pickle"),  # 50,000 OrderedDict(d), |d| = 10,000
        ("build-longer", "runs past 300000 opcodes"),  # 200,000 BUILDs
    ],
)
def test_work_without_bound_is_refused_or_done_quickly(tmp_path, bomb, expected):
    """Each would take minutes or gigabytes if run as written. Here the walk of the opcodes
    stops at a budget, and each opcode that runs does O(1) work (BUILD's state is ignored,
    OrderedDict takes no argument, so the copies fail at the first), so each is refused at
    once, or read (as the empty dict it holds)."""
    data = {
        "shared": lambda: shared_tuples(20),
        "long": lambda: b"\x80\x02" + b"N" * 4_000_000 + b".",
        "build": lambda: build_loop(10_000, 50_000),
        "copy": lambda: copy_loop(10_000, 50_000),
        "build-longer": lambda: build_loop(10_000, 200_000),
    }[bomb]()
    path = zip_of(tmp_path, data)
    if expected is not None:
        peak = 2 * path.stat().st_size + (8 << 20)  # the pickle, and a bounded stack
        peak = peak if bomb in ("shared", "long") else None  # the others: time is the point
        message = refused(lambda: read_torch_bin(path), expected, peak=peak)
        assert str(path) in message
    else:
        start = time.perf_counter()
        assert read_torch_bin(path) == {}
        assert time.perf_counter() - start < FAST


# Pieces a hostile pickle is made of, spliced into a valid state dict in any order;
# PAYLOAD stands for a whole call of os.system that creates the test's marker file.
PAYLOAD = b"<payload>"
SNIPPETS = [PAYLOAD,
    op_global("os", "system"), op_global("builtins", "eval"), op_global("torch", "load"),
    op_global("functools", "partial"), op_global("collections", "defaultdict"),
    op_global("numpy.core.multiarray", "_reconstruct"),
    op_global("torch._utils", "_rebuild_parameter"),
    OD, b")", b"(", b"t", b"\x85", b"R", b"b", b"s", b"u", b"0", b"2", b"1", b"N", b"}", b"]",
    b"a", b"e", b"i__builtin__\nexec\n", b"o", b"\x81", b"\x82\x01", b"\x93", b"\x97", b"\x98",
    b"h\x00", b"q\x00", b"\x94", op_str("x"), op_int(7), op_str("storage"),
    op_tensor("0", "FloatStorage", 3, 0, (3,), (1,)),
    op_tensor("0", "FloatStorage", 3, 0, (9,), (1,)),
    op_tensor("0", "FloatStorage", 3, 0, (3,), (0,)),
]  # fmt: skip


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(pieces=st.lists(st.sampled_from(SNIPPETS), max_size=12))
@example(pieces=[PAYLOAD])
def test_spliced_opcodes_load_or_are_refused_never_crash(tmp_path, pieces):
    marker = tmp_path / "pwned"
    payload = op_global("os", "system") + op_str(f"touch '{marker}'") + b"\x85R"  # (cmd,)
    tensor = op_tensor("0", "FloatStorage", 3, 0, (3,), (1,))
    spliced = b"".join(payload if piece == PAYLOAD else piece for piece in pieces)
    data = op_state_dict([("ok", tensor)])[:-2] + spliced + b"u."
    path = zip_of(tmp_path, data, {"0": np.ones(3, np.float32)})
    try:
        state = read_torch_bin(path)
    except CheckpointError as e:
        assert str(path) in str(e)
    else:  # what loads is a flat dict of read-only arrays, nothing else
        assert all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items())
    assert not marker.exists()


# Opcodes a state dict never needs, each with its argument (what follows is never read).
UNNEEDED = {
    "EMPTY_LIST": b"]", "LIST": b"(l", "EMPTY_SET": b"\x8f", "POP": b"0", "DUP": b"2",
    "INST": b"(i__builtin__\nexec\n", "OBJ": b"(" + OD + b"o", "NEWOBJ": OD + b")\x81",
    "EXT1": b"\x82\x01", "PERSID": b"Pstorage\n", "BINBYTES": b"B\x01\x00\x00\x00x",
    "NEXT_BUFFER": b"\x97", "BINFLOAT": b"G" + struct.pack(">d", 1.0),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(UNNEEDED))
def test_opcodes_a_state_dict_does_not_need_are_refused_by_name(tmp_path, name):
    """Refused by name as soon as the walk meets them, whatever they would do. find_class
    and the checks of the state would catch most of them later; the message shows that the
    allow-list, the first line, did."""
    tensor = op_tensor("0", "FloatStorage", 3, 0, (3,), (1,))
    data = op_state_dict([("ok", tensor)])[:-2] + UNNEEDED[name] + b"u."
    path = zip_of(tmp_path, data, {"0": np.ones(3, np.float32)})
    message = refused(lambda: read_torch_bin(path), f"uses the pickle opcode {name},")
    assert "nothing of it was run" in message


@EXAMPLES
@given(data=st.binary(max_size=300), flips=st.lists(st.integers(0, 10**6), max_size=5))
def test_random_and_damaged_pickles_are_refused_cleanly(tmp_path, data, flips):
    tensor = op_tensor("0", "FloatStorage", 3, 0, (3,), (1,))
    damaged = bytearray(op_state_dict([("w", tensor)]))
    for flip in flips:
        damaged[flip % len(damaged)] ^= 0x5A
    for pickled in (data, bytes(damaged)):
        path = zip_of(tmp_path, pickled, {"0": np.ones(3, np.float32)})
        try:
            read_torch_bin(path)
        except CheckpointError:
            pass


def test_check_pickle_accepts_what_torch_writes(hf_state_pickle):
    check_pickle(hf_state_pickle, "torch's own pickle")


@pytest.fixture(scope="module")
def hf_state_pickle(tmp_path_factory):
    torch = pytest.importorskip("torch", reason="a pickle torch.save wrote")
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    path = tmp_path_factory.mktemp("torch") / "t.bin"
    torch.save(module.state_dict(), path)  # with torch's _metadata, set by BUILD
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))


# ---------------------------------------------------------------- storages and dtypes


def deflated_zip(path, state, deflate, declared=None):
    """A torch zip of ``state`` whose storages named in ``deflate`` are compressed;
    ``declared`` overrides the element count the pickle gives a storage (name -> numel)."""
    declared = declared or {}
    items, storages = [], {}
    for i, (name, value) in enumerate(state.items()):
        numel = declared.get(name, value.size)
        storages[str(i)] = np.zeros(numel, value.dtype) if name in declared else value.ravel()
        stride = [s // value.itemsize for s in value.strides]
        kind = {"f": "FloatStorage", "i": "LongStorage"}[value.dtype.kind]
        items.append((name, op_tensor(str(i), kind, numel, 0, value.shape, stride)))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", op_state_dict(items))
        for i, (name, _) in enumerate(state.items()):
            method = zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED
            z.writestr(f"archive/data/{i}", storages[str(i)].tobytes(), compress_type=method)
    return path


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    name=st.sampled_from([
        "nystromformer.embeddings.position_ids",  # a buffer the model does not read
        "nystromformer.embeddings.word_embeddings.weight",  # a weight it does
    ]),
    megabytes=st.integers(20, 100),
)
def test_deflated_storages_are_not_inflated_past_what_the_model_holds(
    tmp_path, state, name, megabytes
):
    full = old_layout(state)
    folder = tmp_path / "bomb"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(SMALL))
    numel = megabytes * (1 << 20) // full[name].itemsize  # zeros: a 1000:1 deflate
    path = deflated_zip(folder / "pytorch_model.bin", full, {name}, {name: numel})
    if name.endswith("position_ids"):  # skipped unread, so the load succeeds, cheaply
        tracemalloc.start()
        load(folder)
        assert tracemalloc.get_traced_memory()[1] < 20 << 20
        tracemalloc.stop()
    else:
        refused(lambda: load(folder), "would inflate", peak=20 * path.stat().st_size + (4 << 20))


def test_an_inflating_pickle_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "pkl-bomb.bin"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02" + b"N" * (PICKLE_LIMITS["bytes"] + 1) + b".")
    refused(lambda: read_torch_bin(path), "data.pkl is over", peak=4 << 20)


@EXAMPLES
@given(
    dtype=st.sampled_from(["int64", "int32", "uint8", "bool"]),
    which=st.sampled_from([
        "nystromformer.embeddings.word_embeddings.weight",
        "nystromformer.encoder.layer.1.attention.self.conv.weight",
        "cls.predictions.bias",
    ]),
    kind=st.sampled_from(["bin", "safetensors"]),
)
def test_integer_and_bool_weights_are_refused(tmp_path, state, dtype, which, kind):
    bad = dict(state)
    bad[which] = (state[which] > 0).astype(dtype)
    folder = checkpoint_dir(tmp_path / f"{kind}-{dtype}", bad, kind)
    message = refused(lambda: load(folder), "floating point")
    assert which in message and np.dtype(dtype).name in message
    weights = folder / {"bin": "pytorch_model.bin", "safetensors": "model.safetensors"}[kind]
    config = Config.from_dict(SMALL)  # the reader refuses them before any tensor is read
    refused(lambda: read_weights(weights, config), f"{which} is {np.dtype(dtype).name}")


@EXAMPLES
@given(
    dtype=st.sampled_from(["int64", "int32", "int8", "uint8", "bool", "complex64", "object"]),
    which=st.sampled_from([
        "nystromformer.embeddings.word_embeddings.weight",
        "nystromformer.encoder.layer.0.attention.self.query.weight",
        "nystromformer.encoder.layer.1.attention.self.conv.weight",
        "nystromformer.encoder.layer.1.output.LayerNorm.bias",
        "cls.predictions.bias",
        "cls.predictions.decoder.weight",  # tied: checked against the word embeddings
    ]),
)
def test_from_state_dict_refuses_integer_and_bool_weights(state, dtype, which):
    """Called directly, with no file reader before it: no silent cast to float. The
    integer buffers the model does not read (position_ids, token_type_ids) stay accepted."""
    old = old_layout(state)  # with the int64 position_ids
    old["nystromformer.embeddings.token_type_ids"] = np.zeros((1, 70), np.int64)
    config = Config.from_dict(SMALL)
    from_state_dict(old, config)
    bad = dict(old)
    bad[which] = (old[which] > 0).astype(dtype)
    message = refused(lambda: from_state_dict(bad, config), "floating point", kind=ValueError)
    assert f"{which} is {np.dtype(dtype).name}: weights must be floating point" in message
    assert "position_ids" not in message and "token_type_ids" not in message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_a_warning_at_load(tmp_path, state, bad):
    broken = dict(state)
    broken["cls.predictions.bias"] = state["cls.predictions.bias"].copy()
    broken["cls.predictions.bias"][3] = bad
    folder = checkpoint_dir(tmp_path / "nan", broken, "safetensors")
    with pytest.warns(RuntimeWarning, match="cls.predictions.bias.*NaN or Inf"):
        load(folder)


def test_unexpected_huge_keys_are_reported_not_read(tmp_path, state):
    """A stride-0 16000 x 16000 tensor: 1 GB if materialised, 4 bytes in the file."""
    items = [(n, op_tensor(str(i), "FloatStorage", v.size, 0, v.shape,
                           [s // 4 for s in v.strides]))
             for i, (n, v) in enumerate(state.items())]  # fmt: skip
    items.append(("junk.weight", op_tensor("x", "FloatStorage", 1, 0, (16000, 16000), (0, 0))))
    storages = {str(i): v for i, v in enumerate(state.values())} | {"x": np.ones(1, np.float32)}
    folder = tmp_path / "stride0"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SMALL))
    write_zip(folder / "pytorch_model.bin", op_state_dict(items), storages)
    refused(lambda: load(folder), r"unexpected junk.weight \(16000, 16000\)", peak=20 << 20)
    refused(lambda: convert(folder, tmp_path / "out", log=lambda _: None), "junk.weight")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ convert


def snapshot(folder):
    """Every path under ``folder`` (links not followed) with its bytes or link target."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            key = str(path.relative_to(folder))
            if path.is_symlink():
                out[key] = ("link", os.readlink(path))
            elif path.is_file():
                out[key] = path.read_bytes()
            else:
                out[key] = "dir"
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory, state):
    folder = checkpoint_dir(tmp_path_factory.mktemp("src") / "model", state)
    (folder / "spiece.model").write_bytes(b"tokenizer bytes")
    return folder


def other_model(dst, outside):
    """DST holding another model's files, a config.json symlinked out of DST, and a
    sub-folder."""
    dst.mkdir(parents=True)
    (dst / "model.safetensors").write_bytes(b"another model's weights")
    (dst / "spiece.model").write_bytes(b"another tokenizer")
    (dst / "notes.txt").write_text("keep me")
    (dst / "sub").mkdir()
    (dst / "sub" / "a.txt").write_text("keep me too")
    outside.write_text('{"outside": true}')
    (dst / "config.json").symlink_to(outside)


STEPS = ["_write_converted", "_verify_converted", "_carry_over", "_swap_into_place"]


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(step=st.sampled_from(STEPS), force=st.booleans(), filled=st.booleans())
def test_convert_leaves_dst_as_it_was_after_any_failure(tmp_path, source, step, force, filled):
    from nystrom_np import checkpoint

    root = Path(tmp_path) / f"{step}-{force}-{filled}"
    dst, outside = root / "dst", root / "outside.json"
    if step == "_carry_over" and not (filled and force):
        return  # only a filled DST, replaced with --force, has files to carry over
    if filled:
        other_model(dst, outside)
    else:
        root.mkdir()
    before, outside_before = snapshot(root), outside.read_bytes() if filled else None

    original = getattr(checkpoint, step)

    def fail_after(*args, **kwargs):
        original(*args, **kwargs)
        raise OSError(f"disk full (injected after {step})")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint, step, fail_after)
        expected = "disk full" if force or not filled else "holds"
        kind = OSError if force or not filled else FileExistsError
        with pytest.raises(kind, match=expected):
            convert(source, dst, force=force, log=lambda _: None)
    if step == "_swap_into_place" and (force or not filled):
        return  # the swap itself succeeded: DST is the new model (checked below)
    assert snapshot(root) == before  # DST, and everything beside it, exactly as before
    if filled:
        assert outside.read_bytes() == outside_before


def test_convert_with_force_replaces_its_files_keeps_the_others(tmp_path, source):
    dst, outside = tmp_path / "dst", tmp_path / "outside.json"
    other_model(dst, outside)
    with pytest.raises(FileExistsError, match="holds 5 file"):
        convert(source, dst, log=lambda _: None)
    convert(source, dst, force=True, log=lambda _: None)
    assert outside.read_text() == '{"outside": true}'  # the symlink was not written through
    assert not (dst / "config.json").is_symlink()
    assert json.loads((dst / "config.json").read_text()) == SMALL
    assert (dst / "spiece.model").read_bytes() == b"tokenizer bytes"
    assert (dst / "notes.txt").read_text() == "keep me"
    assert (dst / "sub" / "a.txt").read_text() == "keep me too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "outside.json"]  # no leftovers
    load(dst)


def test_convert_in_place_adds_the_safetensors_copy(tmp_path, source):
    folder = tmp_path / "model"
    folder.mkdir()
    for p in source.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    convert(folder, folder, force=True, log=lambda _: None)
    original = (source / "pytorch_model.bin").read_bytes()
    assert (folder / "pytorch_model.bin").read_bytes() == original  # the source is kept
    assert find_weights(folder) == "model.safetensors"


def find_weights(folder):
    from nystrom_np.checkpoint import find_checkpoint

    return find_checkpoint(folder)[1].name


def test_convert_where_it_cannot_write_says_so(tmp_path, source):
    (tmp_path / "file").write_text("not a folder")
    targets = [tmp_path / "file" / "out"]  # a parent that is a file: any user, even root
    if os.geteuid() != 0:  # root writes into read-only folders
        (tmp_path / "ro").mkdir(mode=0o555)
        targets.append(tmp_path / "ro" / "out")
    for dst in targets:
        run = cli("convert", source, dst)
        assert run.returncode == 1 and "cannot write beside" in run.stderr, run.stderr
        assert "Traceback" not in run.stderr


def test_convert_refuses_a_file_or_symlink_as_dst(tmp_path, source):
    (tmp_path / "file").write_text("x")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for dst in ("file", "link"):
        with pytest.raises(FileExistsError, match="not a folder"):
            convert(source, tmp_path / dst, force=True, log=lambda _: None)
    assert list((tmp_path / "real").iterdir()) == []


# ---------------------------------------------------------- commands we print are safe

HOSTILE_NAMES = st.sampled_from([
    "model$(touch${IFS}PWNED).bin", "a'b.bin", 'a"b.bin', "x`touch PWNED`.bin", "sp ace.bin",
    "semi;touch PWNED.bin", "back\\slash.bin", "dollar$HOME.bin", "nl\nx.bin", "ünï.bin",
])  # fmt: skip


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(name=HOSTILE_NAMES)
def test_the_legacy_recipe_is_safe_to_paste(tmp_path, name):
    import pickle

    folder = tmp_path / f"case{abs(hash(name))}"
    folder.mkdir()
    path = folder / name
    path.write_bytes(pickle.dumps({"w": 1}, protocol=2))
    message = refused(lambda: read_weights(path), "legacy")
    line = next(x for x in message.splitlines() if "python -c" in x).strip()
    fake_bin = folder / "bin"
    fake_bin.mkdir()  # a `python` that only prints its arguments, one per line, NUL-ended
    (fake_bin / "python").write_text('#!/bin/sh\nprintf "%s\\0" "$@"\n')
    (fake_bin / "python").chmod(0o755)
    run = subprocess.run(["sh", "-c", line], cwd=folder, capture_output=True,
                         env={**os.environ, "PATH": f"{fake_bin}:/usr/bin:/bin"})  # fmt: skip
    flag, code = run.stdout.decode().split("\0")[:2]
    assert flag == "-c" and json.dumps(str(path)) in code
    assert not (folder / "PWNED").exists() and not Path("PWNED").exists()


def test_the_download_hint_quotes_a_hostile_revision(monkeypatch):
    revision = "main; touch PWNED"
    with pytest.raises(FileNotFoundError) as error:
        load("uw-madison/nystromformer-512", revision=revision)
    line = next(x for x in str(error.value).splitlines() if "huggingface-cli" in x)
    words = shlex.split(line)
    assert words[words.index("--revision") + 1] == revision


# ---------------------------------------------------------------------- a stalling hub


def test_a_hub_that_never_answers_is_given_up_on_in_seconds(monkeypatch):
    pytest.importorskip("huggingface_hub", reason="the download path uses it")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # accepts connections (the kernel's backlog), never answers
    stop = threading.Timer(30, server.close)  # a bound even if the test hangs
    stop.start()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    try:
        start = time.perf_counter()
        with pytest.raises(FileNotFoundError, match=r"did not answer within 3 s"):
            load("uw-madison/nystromformer-512")
        assert time.perf_counter() - start < 10

        def probes():  # the probe's own socket times out: nothing is left waiting on it
            return [t for t in threading.enumerate() if t.name == "hub probe"]

        assert wait_until(lambda: not probes(), 2 * HUB_TIMEOUT), probes()
    finally:
        stop.cancel()
        server.close()


def test_a_name_lookup_that_never_returns_is_given_up_on_in_seconds(monkeypatch):
    """urllib's timeout does not cover the name lookup (socket.getaddrinfo has none): a
    resolver that hangs must not hang the probe, the download, or a book build."""
    pytest.importorskip("huggingface_hub", reason="the download path uses it")
    release = threading.Event()  # set at the end: the lookups left behind return then
    lookups = []

    def hanging_lookup(host, *args, **kwargs):
        lookups.append(host)
        release.wait(60)  # far past HUB_TIMEOUT
        raise socket.gaierror(f"no answer for {host}")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.invalid")
    monkeypatch.setattr(socket, "getaddrinfo", hanging_lookup)
    try:
        start = time.perf_counter()
        assert hub_reachable(timeout=0.5) is False
        assert time.perf_counter() - start < 3
        start = time.perf_counter()
        with pytest.raises(FileNotFoundError, match=r"did not answer within 3 s"):
            load("uw-madison/nystromformer-512")
        with pytest.raises(ConnectionError, match="did not answer"):
            fetch_file("uw-madison/nystromformer-512", "config.json")
        assert time.perf_counter() - start < 4 * HUB_TIMEOUT  # two probes of 3 s
        assert len(lookups) == 3  # each probe was stuck in its lookup, and gave up on it
    finally:
        release.set()


# -------------------------------------------------------- tokenizer, fill_mask, the CLI


@EXAMPLES
@given(
    before=st.text(max_size=5),
    surrogate=st.integers(0xD800, 0xDFFF).map(chr),
    after=st.text(max_size=5),
)
def test_lone_surrogates_are_a_clear_error(tok, before, surrogate, after):
    refused(lambda: tok.encode(before + surrogate + after + " [MASK]"), "lone surrogate")


@EXAMPLES
@given(
    value=st.one_of(
        st.lists(st.integers(), max_size=2),
        st.dictionaries(st.sampled_from(["do_lower_case", "keep_accents", "remove_space"]),
                        st.one_of(st.text(max_size=5), st.integers(), st.lists(st.none()))),
        st.integers(), st.text(max_size=5),
    ),
)  # fmt: skip
def test_bad_tokenizer_config_names_the_file(tmp_path, spiece_path, value):
    from nystrom_np.tokenizer import Tokenizer

    folder = tmp_path / "tok"
    folder.mkdir(exist_ok=True)
    (folder / "spiece.model").write_bytes(spiece_path.read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps(value))
    if isinstance(value, dict) and all(isinstance(v, bool) for v in value.values()):
        return  # a valid file (or an empty one) drawn by chance
    message = refused(lambda: Tokenizer(folder), "tokenizer_config.json")
    assert str(folder) in message


@pytest.mark.parametrize("texts", [None, 42, b"a [MASK]", {"a [MASK]"}])
def test_fill_mask_refuses_what_is_not_text(tok, texts):
    from nystrom_np.pipeline import fill_mask

    model = random_model(Config.from_dict(SMALL), seed=0)
    refused(lambda: fill_mask(texts, model=model, tokenizer=tok), "str")


def test_load_refuses_an_empty_source_and_a_config_of_the_wrong_type(tmp_path, state):
    folder = checkpoint_dir(tmp_path / "ckpt", state)
    refused(lambda: load(""), "source is empty")
    refused(lambda: load(folder, config=42), "config must be a Config")


def cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "nystrom_np", *map(os.fsencode, args)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})},
    )  # fmt: skip


@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory, spiece_path):
    model = random_model(Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=37), seed=0)  # fmt: skip
    state = to_state_dict(model)
    state["cls.predictions.bias"] = np.full_like(state["cls.predictions.bias"], np.nan)
    folder = checkpoint_dir(tmp_path_factory.mktemp("nan") / "m", state, "safetensors",
                            model.config.to_dict())  # fmt: skip
    (folder / "spiece.model").write_bytes(spiece_path.read_bytes())
    return folder


def test_cli_json_is_strict_even_with_nan_scores(nan_checkpoint):
    run = cli("fill-mask", "a [MASK]", "--checkpoint", nan_checkpoint, "--json", "--top-k", "2")
    assert run.returncode == 0, run.stderr
    assert "NaN or Inf" in run.stderr and "Traceback" not in run.stderr

    def no_constants(name):
        raise AssertionError(f"bare {name} in --json output")

    result = json.loads(run.stdout, parse_constant=no_constants)
    assert [p["score"] for p in result] == [None, None]


@pytest.mark.parametrize(
    "args, message",
    [
        (["fill-mask", "a [MASK]", "--random-weights", "--seed", "-1"], "--seed"),
        (["fill-mask", b"caf\xe9 [MASK]", "--random-weights", "--tokenizer", "{spiece}"],
         "lone surrogate"),
        (["fill-mask", "a [MASK]", "--checkpoint", "{nan}/model.safetensors", "--top-k", "0"],
         "--top-k must be at least 1"),  # the weights file's folder gives the tokenizer
        (["convert", "{nan}", "{nan}"], "holds"),
    ],
)
def test_cli_errors_are_one_message_exit_1(nan_checkpoint, spiece_path, args, message):
    def fill(a):
        return a.format(nan=nan_checkpoint, spiece=spiece_path) if isinstance(a, str) else a

    run = cli(*map(fill, args))
    assert run.returncode == 1, run.stderr
    assert run.stderr.count("error: ") == 1 and "Traceback" not in run.stderr
    assert message in run.stderr.split("error: ")[1], run.stderr
    assert "\n\n" not in run.stderr.strip()  # one block: no blank line in it
