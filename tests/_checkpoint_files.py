"""Checkpoint files made without torch, for tests that must run where torch is missing.

``write_torch_zip`` writes the zip layout ``torch.save`` uses (``archive/data.pkl`` +
``archive/data/<key>``) with a hand-assembled protocol-2 pickle, the same opcodes torch
emits; ``test_hand_made_zip_is_what_torch_reads`` checks it against ``torch.load``.
"""

import struct
import zipfile

import numpy as np

STORAGE_NAMES = {
    np.dtype("float32"): "FloatStorage",
    np.dtype("float64"): "DoubleStorage",
    np.dtype("float16"): "HalfStorage",
    np.dtype("int64"): "LongStorage",
    np.dtype("int32"): "IntStorage",
    np.dtype("uint8"): "ByteStorage",
    np.dtype("bool"): "BoolStorage",
}

SMALL = dict(  # a config small enough for tests that take seconds
    model_type="nystromformer",
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=37,
    max_position_embeddings=70,
    conv_kernel_size=5,
)

TIED = {
    "cls.predictions.decoder.weight": "nystromformer.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}


# ----------------------------------------------------------------------- pickle opcodes


def op_global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def op_str(s):
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def op_int(i):
    return b"J" + struct.pack("<i", i)


def op_tuple(items):
    return b"(" + b"".join(op_int(i) for i in items) + b"t"


def op_tensor(key, kind, numel, offset, shape, stride):
    """``_rebuild_tensor_v2(storage, offset, shape, stride, False, OrderedDict())``."""
    storage = (
        b"(" + op_str("storage") + op_global("torch", kind) + op_str(key) + op_str("cpu")
        + op_int(numel) + b"tQ"  # TUPLE, BINPERSID
    )  # fmt: skip
    return (
        op_global("torch._utils", "_rebuild_tensor_v2")
        + b"(" + storage + op_int(offset) + op_tuple(shape) + op_tuple(stride)
        + b"\x89" + op_global("collections", "OrderedDict") + b")R"  # False, OrderedDict()
        + b"tR"  # TUPLE, REDUCE
    )  # fmt: skip


def op_state_dict(items):
    """An OrderedDict of (name, value opcodes) pairs, then STOP."""
    body = b"".join(op_str(name) + value for name, value in items)
    return b"\x80\x02" + op_global("collections", "OrderedDict") + b")R(" + body + b"u."


# ------------------------------------------------------------------------------ files


def write_zip(path, pickle_bytes, storages, prefix="archive", byteorder="little"):
    """A torch-style zip: ``prefix/data.pkl`` and ``prefix/data/<key>`` for each storage."""
    order = "<" if byteorder == "little" else ">"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", pickle_bytes)
        z.writestr(f"{prefix}/byteorder", byteorder)
        for key, data in storages.items():
            ordered = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder(order))
            z.writestr(f"{prefix}/data/{key}", ordered.tobytes())
        z.writestr(f"{prefix}/version", "3\n")
    return path


def write_torch_zip(path, state, tied=None):
    """Write ``state`` (name -> array) as torch.save would, without torch.

    ``tied`` maps a name to another name whose storage it shares (as the old checkpoint's
    decoder shares the word embeddings).
    """
    tied = tied or {}
    storages, keys, items = {}, {}, []
    for name, value in state.items():
        if name in tied:
            continue
        keys[name] = str(len(storages))
        storages[keys[name]] = value
    for name, value in state.items():
        value = np.asarray(value)
        key = keys[tied.get(name, name)]
        stride = [s // value.itemsize for s in np.ascontiguousarray(value).strides]
        kind = STORAGE_NAMES[value.dtype]
        items.append((name, op_tensor(key, kind, value.size, 0, value.shape, stride)))
    return write_zip(path, op_state_dict(items), storages)


def old_layout(state, prefix="nystromformer."):
    """transformers 4.13's ``pytorch_model.bin`` layout: tied decoder keys, position_ids."""
    n = state[prefix + "embeddings.position_embeddings.weight"].shape[0] - 2
    old = {prefix + "embeddings.position_ids": np.arange(2, n + 2, dtype=np.int64)[None]}
    old.update(state)
    old["cls.predictions.decoder.weight"] = state[prefix + "embeddings.word_embeddings.weight"]
    old["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
    return old
