"""Finding, reading and validating checkpoints: safetensors, torch zip pickles, the hub cache.

Files (as on the hub and as transformers writes them):

- ``model.safetensors``: an 8-byte little-endian header length, a JSON header (name ->
  dtype, shape, byte range), then raw bytes. Read with the ``safetensors`` library.
- ``pytorch_model.bin`` (PyTorch >= 1.6): a zip holding ``<prefix>/data.pkl``, a pickle of
  an OrderedDict name -> tensor, and ``<prefix>/data/<key>``, the raw little-endian bytes of
  each storage. A tensor is ``torch._utils._rebuild_tensor_v2(storage, offset, size,
  stride, ...)`` and a storage is the persistent id ``('storage', torch.FloatStorage, key,
  location, numel)``; tied tensors share one storage. We read it **without torch**: the
  unpickler below knows only those globals, so a pickle cannot run code through us.
- ``config.json``: the hyper-parameters (``Config.from_json``).

A source is a directory, a weights file (plus a config), or a hub id such as
``uw-madison/nystromformer-512``, found in the Hugging Face cache
(``<cache>/models--org--name/snapshots/<commit>/``, ``refs/<revision>`` naming the commit)
or downloaded into that cache with ``huggingface_hub`` when the hub answers.

Every problem with a file is a ``CheckpointError`` (a ``ValueError``) naming the file and
what is wrong; nothing is built from a file that failed a check.
"""

import collections
import contextlib
import importlib.util
import io
import json
import mmap
import os
import pickle
import pickletools
import re
import shlex
import shutil
import struct
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote

import numpy as np

from .config import Config

REPO_ID = "uw-madison/nystromformer-512"  # the released checkpoint, the default everywhere
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference
# Endings of a weights file: a source that ends so and does not exist is a missing file.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_TIED = {  # a key save_pretrained leaves out -> the key it is tied to (without prefix)
    "cls.predictions.decoder.weight": "embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")  # rebuilt by the model


class CheckpointError(ValueError):
    """A weights file is missing, unsafe, corrupted, or does not hold a checkpoint."""


# ------------------------------------------------------------------------ safetensors


# safetensors' dtype names and the NumPy dtype of their (little-endian) bytes.
SAFETENSORS_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
}


SAFETENSORS_HEADER_LIMIT = 16 << 20  # bytes of JSON: room for ~100,000 tensors


def read_safetensors(path, *, mmap=True, config=None) -> dict:
    """Read a ``.safetensors`` file into a dict name -> NumPy array.

    The safetensors library checks the file first (a well-formed header whose byte ranges
    cover the data exactly). With ``mmap`` the arrays are then read-only views of a memory
    map of the file, as with ``read_torch_bin``: nothing is copied, so a model built from
    them holds the weights once. ``mmap=False`` copies each tensor out with the library.
    With a ``config``, the header is checked against the model first (``check_layout``) and
    only the tensors the model reads are returned.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with open(path, "rb") as f:
            header_size = struct.unpack("<Q", f.read(8).ljust(8, b"\0"))[0]
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if header_size > SAFETENSORS_HEADER_LIMIT:  # before the library parses it into memory
        raise CheckpointError(
            f"{path}: the safetensors header claims {header_size} bytes; at most "
            f"{SAFETENSORS_HEADER_LIMIT} allowed (200 tensors take 30 kB)"
        )
    try:
        with safe_open(path, framework="numpy") as f:
            names = list(f.keys())
            if config is not None:
                header = _safetensors_header(path)
                layout = {n: (tuple(header[n]["shape"]), _st_dtype(path, n, header))
                          for n in names}  # fmt: skip
                names = check_layout(layout, config, path)
            if not mmap:
                return {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from None
    except TypeError as e:  # e.g. "data type 'bfloat16' not understood"
        raise CheckpointError(f"{path} holds a dtype NumPy has no type for ({e}).") from None
    return _map_safetensors(path, names)


def _safetensors_header(path) -> dict:
    """The JSON header of a safetensors file the library has already checked."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))


def _st_dtype(path, name, header) -> np.dtype:
    kind = header[name]["dtype"]
    if kind not in SAFETENSORS_DTYPES:
        raise CheckpointError(
            f"{path}: tensor {name} is {kind}, which NumPy has no dtype for; "
            "re-save the checkpoint in float32."
        )
    return np.dtype(SAFETENSORS_DTYPES[kind])


def _map_safetensors(path, names) -> dict:
    """Views of a memory map of a safetensors file the library has already checked."""
    header = _safetensors_header(path)
    with open(path, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    start = 8 + struct.unpack("<Q", data[:8])[0]
    state = {}
    for name in names:
        dtype, info = _st_dtype(path, name, header), header[name]
        shape, (begin, _end) = tuple(info["shape"]), info["data_offsets"]
        count = int(np.prod(shape, dtype=np.int64))
        state[name] = np.frombuffer(data, dtype, count, offset=start + begin).reshape(shape)
    return state


# --------------------------------------------------------------- torch zip, without torch

# torch's storage classes, as torch.save names them, and the dtype of their bytes.
STORAGE_DTYPES = {
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "<i1",
    "ByteStorage": "<u1",
    "BoolStorage": "?",
}

# Budgets of a data.pkl, checked before any object is built. A state dict's pickle takes
# ~25 opcodes per tensor and nests ~6 deep (the real checkpoint's: 40 kB, 5,000 opcodes),
# so these leave room for 12,000 tensors (512 layers, Config's limit, need 8,200) while a
# hostile pickle is refused within a second: too big, too long to run, nested so deeply
# that hashing a key would overflow the C stack, or sharing objects so often that one key
# unfolds to millions.
PICKLE_LIMITS = {"bytes": 16 << 20, "opcodes": 300_000, "depth": 32, "objects": 4_000_000}

# The opcodes a state dict needs (torch.save writes protocol 2; 4 and 5 add framing).
# Everything else (INST, OBJ, NEWOBJ, EXT*, buffers, sets, lists, ...) is refused unrun.
PICKLE_OPCODES = frozenset("""
    PROTO FRAME STOP MARK GLOBAL STACK_GLOBAL BINPERSID REDUCE BUILD EMPTY_DICT SETITEM
    SETITEMS EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 NONE NEWTRUE NEWFALSE BININT BININT1
    BININT2 LONG1 SHORT_BINUNICODE BINUNICODE BINPUT LONG_BINPUT MEMOIZE BINGET LONG_BINGET
""".split())
_MUTATORS = {"SETITEM", "SETITEMS", "BUILD"}  # change the object below them on the stack


def check_pickle(data: bytes, where) -> None:
    """Refuse a pickle that is not shaped like a state dict, before anything is unpickled.

    Walks the opcodes (``pickletools``, which builds nothing) with the stack they would
    make, each item replaced by (nesting depth, objects it holds, shared ones counted each
    time they are reached), and checks them against ``PICKLE_LIMITS``. Hashing is what
    recurses in C: the dict keys' sizes count against the object budget as well.
    """
    limits = PICKLE_LIMITS
    if len(data) > limits["bytes"]:
        raise CheckpointError(f"{where} is {len(data)} bytes; at most {limits['bytes']} allowed")
    stack, memo, hashed, mark = [], {}, 0, pickletools.markobject
    try:
        for count, (op, arg, _) in enumerate(pickletools.genops(data)):
            if count == limits["opcodes"]:
                raise CheckpointError(
                    f"{where} runs past {limits['opcodes']} opcodes: too long to be a state dict"
                )
            if op.name not in PICKLE_OPCODES:
                raise CheckpointError(
                    f"{where} uses the pickle opcode {op.name}, which a state dict does not "
                    "need; nothing of it was run"
                )
            if op.name in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
                if stack[-1] is None:  # as in C: nothing above a MARK to memoize
                    raise IndexError("a memo of a MARK")
                memo[len(memo) if arg is None else arg] = stack[-1]
                continue
            if op.name in ("BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
                continue
            if not op.stack_before:  # a constant, a global or a MARK: the common case, fast
                stack += [None if x is mark else (0, 1) for x in op.stack_after]
                continue
            items = _pop(stack, op.stack_before)
            target, children = (items[0], items[1:]) if op.name in _MUTATORS else (None, items)
            depth = 1 + max((d for d, _ in children), default=-1)
            size = 1 + sum(n for _, n in children)
            if target is not None:
                depth, size = max(depth, target[0]), target[1] + size - 1
            if op.name in ("SETITEM", "SETITEMS"):
                hashed += sum(n for _, n in children[::2])
            if depth > limits["depth"] or max(size, hashed) > limits["objects"]:
                raise CheckpointError(
                    f"{where} nests deeper than {limits['depth']} or holds more than "
                    f"{limits['objects']} objects: not a state dict (nothing of it was run)"
                )
            stack += [None if x is mark else (depth, size) for x in op.stack_after]
    except CheckpointError:
        raise
    except (IndexError, KeyError, ValueError) as e:  # stack or memo underflow, bad opcode
        raise CheckpointError(f"{where} is not a valid state-dict pickle ({e})") from None


def _pop(stack, before) -> list:
    """Take an opcode's arguments off the simulated stack (``None`` marks a MARK)."""
    items = []
    if pickletools.markobject in before:
        mark = len(stack) - 1 - stack[::-1].index(None)  # ValueError: no MARK
        items = stack[mark + 1 :]
        del stack[mark:]
        before = before[: before.index(pickletools.markobject)]
    if before:
        if len(stack) < len(before) or None in stack[-len(before) :]:
            raise IndexError("an opcode takes more items than the stack holds")
        items = stack[-len(before) :] + items
        del stack[-len(before) :]
    return items


class _StorageType(str):
    """The name of a storage class that the pickle asked for (immutable: no attributes)."""

    __slots__ = ()


class _Storage(NamedTuple):
    """A storage the pickle names: read from the zip only once the tensors are checked."""

    key: str
    dtype: np.dtype
    numel: int


class _Tensor(NamedTuple):
    """A tensor record: a strided view of a storage, bounds-checked, nothing read yet."""

    storage: _Storage
    offset: int
    shape: tuple
    stride: tuple


class _StateDict(collections.OrderedDict):
    """What the pickle's ``collections.OrderedDict`` gives: an empty dict, filled item by
    item. It takes no arguments (a copy of another dict, repeated, would be work without
    bound) and ignores BUILD's state (torch's ``_metadata``, of no use to us)."""

    def __init__(self):
        super().__init__()

    def __setstate__(self, state):
        pass


class _RebuildTensor:
    """``torch._utils._rebuild_tensor_v2``: checks a tensor record, reads nothing.

    A slotted instance, not a function: BUILD on it fails (no ``__dict__`` to write into).
    """

    __slots__ = ("path",)

    def __init__(self, path):
        self.path = path

    def __call__(self, storage, offset, size, stride, *_grad_hooks_metadata):
        if (
            not isinstance(storage, _Storage)
            or not isinstance(size, tuple)
            or not isinstance(stride, tuple)
            or len(size) != len(stride)
            or len(size) > 8  # before the loops below, which a huge tuple would slow
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                       for i in (offset, *size, *stride))
        ):  # fmt: skip
            raise CheckpointError(f"{self.path}: malformed tensor record")
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if 0 not in size and last >= storage.numel:
            raise CheckpointError(
                f"{self.path}: a tensor of shape {size} at offset {offset} reaches element "
                f"{last} of a storage of {storage.numel}"
            )
        return _Tensor(storage, offset, size, stride)


class _StateDictUnpickler(pickle.Unpickler):
    """An unpickler that can build an OrderedDict of tensor records and nothing else.

    ``find_class`` is the only way a pickle reaches Python objects; it hands out
    ``_StateDict``, ``_RebuildTensor`` and storage-type names, and refuses any other global
    before it is imported, so no code of the file's choosing ever runs. Everything it can
    reach is immutable or ignores BUILD. Run only on a pickle ``check_pickle`` passed.
    """

    def __init__(self, file, path, byteorder="<"):
        super().__init__(file)
        self.path = path
        self.byteorder = byteorder  # of the storages' bytes: "<" (all files we know) or ">"
        self.storages = {}  # key -> _Storage, shared by every tensor that views it

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return _StateDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _RebuildTensor(self.path)
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) == ("torch", "BFloat16Storage"):
            raise CheckpointError(
                f"{self.path} holds bfloat16 tensors, which NumPy has no dtype for. Re-save "
                "them as float32 with torch: torch.save({k: v.float() for k, v in "
                "torch.load(SRC, weights_only=True).items()}, DST)"
            )
        raise CheckpointError(
            f"refusing to load {self.path}: the pickle asks for global "
            f"'{module[:80]}.{name[:80]}'. A state-dict checkpoint needs only "
            "collections.OrderedDict, torch._utils._rebuild_tensor_v2 and torch.*Storage, so "
            "this file holds something else (a pickled object, or code); nothing of it was run."
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.path}: unexpected persistent id {str(pid)[:80]}")
        _, kind, key, _location, numel = pid  # the location ('cpu', 'cuda:0') does not matter
        if not isinstance(kind, _StorageType) or not isinstance(key, str):
            raise CheckpointError(f"{self.path}: malformed storage id {str(pid)[:80]}")
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise CheckpointError(f"{self.path}: storage {key} has a bad size {numel!r}")
        dtype = np.dtype(STORAGE_DTYPES[kind]).newbyteorder(self.byteorder)
        storage = self.storages.setdefault(key, _Storage(key, dtype, numel))
        if storage.dtype != dtype or storage.numel != numel:
            raise CheckpointError(
                f"{self.path}: storage {key} is used both as {storage.numel} x {storage.dtype} "
                f"and as {numel} x {dtype}"
            )
        return storage


# Bounds of a zip's central directory, checked from its end record before zipfile reads the
# directory: zipfile builds an object of ~350 bytes for every entry the directory's bytes
# hold (whatever count the record declares), so a 50 MB file of a million empty entries
# would cost 400 MB and seconds. A checkpoint has one entry per storage and six records:
# torch writes 306 entries in 18 kB for 300 tensors, and the largest model Config allows
# (512 layers, ~8,200 tensors) takes under 3 MB even with 255-character archive names.
ZIP_LIMITS = {"entries": 100_000, "directory": 8 << 20}
_END_RECORD = struct.Struct("<4s4H2LH")  # signature, disks, entries (here, all), size, ...
_ZIP64_LOCATOR = struct.Struct("<4sLQL")  # signature, disk, offset of the zip64 record, disks
_ZIP64_RECORD = struct.Struct("<4sQ2H2L4Q")  # ..., entries (here, all), size, offset


def check_zip_directory(file, path) -> None:
    """Refuse a zip whose end record declares a central directory past ``ZIP_LIMITS``.

    Reads only the file's end: the end-of-central-directory record, found as zipfile finds
    it (the last 22 bytes, else the last signature in the 64 kB a comment may take), and the
    zip64 record torch writes before it, which zipfile reads in its place (right before the
    zip64 locator, or where the locator points: Python versions differ, so both are checked).
    """
    size = file.seek(0, os.SEEK_END)
    file.seek(max(0, size - _END_RECORD.size - (1 << 16)))  # zipfile's window, to the byte
    tail = file.read()
    if tail[-22:-18] == b"PK\x05\x06" and tail[-2:] == b"\0\0":
        end = len(tail) - 22
    else:
        end = tail.rfind(b"PK\x05\x06")
    if end < 0 or end + 22 > len(tail):
        return  # not a zip: zipfile says so
    _, _, _, here, total, directory, _, _ = _END_RECORD.unpack_from(tail, end)
    end += size - len(tail)  # from here on, offsets in the file
    claims = [(max(here, total), directory)]
    locator = _read_at(file, end - _ZIP64_LOCATOR.size, _ZIP64_LOCATOR.size, end)
    if locator[:4] == b"PK\x06\x07":
        before = end - _ZIP64_LOCATOR.size - _ZIP64_RECORD.size
        places = {_ZIP64_LOCATOR.unpack(locator)[2], before}
        records = [_read_at(file, at, _ZIP64_RECORD.size, end) for at in sorted(places)]
        zip64 = [_ZIP64_RECORD.unpack(r) for r in records if r[:4] == b"PK\x06\x06"]
        if len(zip64) == len(records):  # the classic record's fields are unused (or 0xFF..)
            claims = []
        claims += [(max(r[6], r[7]), r[8]) for r in zip64]
    for entries, directory in claims:
        if entries > ZIP_LIMITS["entries"]:
            raise CheckpointError(
                f"{path}: its zip directory declares {entries} entries; at most "
                f"{ZIP_LIMITS['entries']} allowed (a checkpoint has one per storage, plus six)"
            )
        if directory > end:
            raise CheckpointError(
                f"{path}: its zip directory claims {directory} bytes, more than the file holds "
                f"before its end record ({end} of {size} bytes; truncated or corrupted?)"
            )
        if directory > ZIP_LIMITS["directory"]:
            raise CheckpointError(
                f"{path}: its zip directory is {directory} bytes; at most "
                f"{ZIP_LIMITS['directory']} allowed (a checkpoint's takes ~60 bytes a storage)"
            )


def _read_at(file, offset, count, end) -> bytes:
    """``count`` bytes of ``file`` at ``offset``; none unless they lie between 0 and ``end``."""
    if not 0 <= offset <= end - count:
        return b""
    file.seek(offset)
    return file.read(count)


def read_torch_bin(path, *, check_crc=True, config=None) -> dict:
    """Read a zip-format ``torch.save`` state dict into a dict name -> NumPy array, no torch.

    The arrays are read-only views of a memory map of the file (no copy is made); tensors
    that share a storage in the file share memory here too. ``check_crc`` verifies each
    storage's zip checksum, so corrupted bytes are an error instead of wrong weights. With a
    ``config``, the records are checked against the model (``check_layout``) before any
    storage is read, and only the tensors the model reads are returned.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            check_zip_directory(f, path)  # before zipfile reads what the directory declares
        archive = zipfile.ZipFile(path)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(
            f"{path} is not a readable zip-format torch file (truncated or corrupted?): {e}"
        ) from None
    with archive, open(path, "rb") as f:
        pickles = [n for n in archive.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
        if len(pickles) != 1:
            raise CheckpointError(
                f"{path} is a zip but not a torch checkpoint: expected one <name>/data.pkl, "
                f"found {len(pickles)}"
            )
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = _read_member(archive, prefix + "byteorder", path, default=b"little")
        if byteorder not in (b"little", b"big"):
            raise CheckpointError(f"{path}: unknown byteorder record {byteorder[:20]!r}")
        if archive.getinfo(pickles[0]).file_size > PICKLE_LIMITS["bytes"]:  # before inflating
            raise CheckpointError(
                f"{path}: {pickles[0]} is over {PICKLE_LIMITS['bytes']} bytes; a state dict's "
                "pickle is a few hundred bytes per tensor"
            )
        pickled = _read_member(archive, pickles[0], path)
        check_pickle(pickled, f"{path}: {pickles[0]}")
        order = ">" if byteorder == b"big" else "<"
        try:
            state = _StateDictUnpickler(io.BytesIO(pickled), path, order).load()
        except CheckpointError:
            raise
        except Exception as e:  # any failure inside the pickle: a damaged or foreign file
            raise CheckpointError(
                f"{path}: {pickles[0]} is not a valid state-dict pickle "
                f"({type(e).__name__}: {str(e)[:200]})"
            ) from None
        records = _check_state(state, path)
        if config is not None:
            layout = {n: (r.shape, r.storage.dtype) for n, r in records.items()}
            records = {n: records[n] for n in check_layout(layout, config, path)}
        return _read_records(records, archive, f, prefix, path, check_crc)


def _read_records(records, archive, file, prefix, path, check_crc) -> dict:
    """The arrays of checked tensor records: views of the file's storages."""
    data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    needs = collections.Counter()  # storage key -> elements its tensors hold
    for r in records.values():
        needs[r.storage.key] += int(np.prod(r.shape, dtype=np.int64))

    def read_storage(storage):
        key, dtype, numel = storage
        name = f"{prefix}data/{key}"
        try:
            info = archive.getinfo(name)
        except KeyError:
            raise CheckpointError(f"{path}: storage {name} is missing") from None
        if info.file_size != numel * dtype.itemsize:
            raise CheckpointError(
                f"{path}: storage {name} holds {info.file_size} bytes, the pickle expects "
                f"{numel} x {dtype} = {numel * dtype.itemsize} bytes"
            )
        if info.compress_type != zipfile.ZIP_STORED:  # torch never compresses; others may
            if numel > needs[key]:  # inflating costs memory: only what the tensors hold
                raise CheckpointError(
                    f"{path}: the compressed storage {name} would inflate to {numel} elements, "
                    f"but the tensors that use it hold only {needs[key]}"
                )
            return np.frombuffer(_read_member(archive, name, path), dtype, numel)
        if numel == 0:
            return np.empty(0, dtype)
        start = _data_offset(data, info, path)
        stored = memoryview(data)[start : start + info.file_size]
        if check_crc and zlib.crc32(stored) != info.CRC:
            raise CheckpointError(f"{path}: storage {name} is corrupted (CRC mismatch)")
        return np.frombuffer(data, dtype, numel, offset=start)

    storages, state = {}, {}
    for name, (storage, offset, shape, stride) in records.items():
        if storage.key not in storages:
            storages[storage.key] = read_storage(storage)
        array = storages[storage.key]
        state[name] = np.lib.stride_tricks.as_strided(
            array[offset:], shape, [s * array.itemsize for s in stride], writeable=False
        )
    return state


def _read_member(archive, name, path, default=None) -> bytes:
    """The bytes of one zip member, with zip errors turned into a CheckpointError."""
    try:
        return archive.read(name)
    except KeyError:
        if default is not None:
            return default
        raise CheckpointError(f"{path}: {name} is missing from the zip") from None
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError) as e:
        raise CheckpointError(f"{path}: {name} cannot be read (corrupted?): {e}") from None


def _data_offset(data, info, path) -> int:
    """Where a stored (uncompressed) member's bytes start: after its local file header."""
    header = data[info.header_offset : info.header_offset + 30]
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path}: the zip entry {info.filename} is damaged")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > len(data):
        raise CheckpointError(f"{path}: {info.filename} runs past the end of the file")
    return start


def _check_state(state, path) -> dict:
    """A flat dict of str -> tensor record, or a CheckpointError saying what the file holds."""
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path} holds a {type(state).__name__}, not a state dict of tensors"
        )
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, _Tensor):
            kind = "tensor record" if isinstance(value, _Tensor) else type(value).__name__
            raise CheckpointError(
                f"{path}: entry {_short_repr(name)} is a {kind}, not a tensor named by a "
                "string (a nested or non-state-dict checkpoint)"
            )
    return dict(state)


def _short_repr(value, width=60) -> str:
    text = repr(value) if isinstance(value, (str, int)) else f"of type {type(value).__name__}"
    return text if len(text) <= width else text[: width - 3] + "..."


# ------------------------------------------------------------------- checking a layout


def check_layout(layout, config, path) -> list:
    """The names of the tensors the model reads, once their declared shapes and dtypes fit.

    ``layout`` maps every name in the file to its declared (shape, dtype), read from the
    header or the pickle before any tensor data. Each tensor the model reads must have the
    shape ``weights.expected_shapes`` gives and a floating-point dtype (integer and bool
    weights are refused, as transformers refuses them); the tied decoder keys are read too,
    to check that they equal what they are tied to. Buffers, the pooler and the
    next-sentence head are skipped unread. All problems are reported together, as
    ``from_state_dict`` reports them.
    """
    from .weights import expected_shapes, weight_problem

    prefix = next(
        (p for p in (f"{config.model_type}.", "") if f"{p}embeddings.word_embeddings.weight"
         in layout), f"{config.model_type}.",
    )  # fmt: skip
    head = any(name.startswith("cls.predictions.") for name in layout)
    shapes = expected_shapes(config, prefix, head)
    for tied, source in _TIED.items():
        if head and tied in layout:
            shapes[tied] = shapes[prefix + source if source.startswith("embeddings.") else source]
    unused = tuple(prefix + b for b in _BUFFERS) + (f"{prefix}pooler.", "cls.seq_relationship.")
    wanted, problems = [], []
    for name, shape in shapes.items():
        if name not in layout:
            problems.append(f"missing {name} {shape}")
            continue
        if problem := weight_problem(name, *layout[name], shape):
            problems.append(problem)
        else:
            wanted.append(name)
    for name, (declared, _) in layout.items():
        if name not in shapes and not name.startswith(unused):
            problems.append(f"unexpected {name} {tuple(declared)}")
    if problems:
        shown = problems[:50] + [f"... and {len(problems) - 50} more"] * (len(problems) > 50)
        raise CheckpointError(
            f"{path}: the weights do not fit this {config.model_type} config "
            f"({len(problems)} problem(s)):\n  " + "\n  ".join(shown)
        )
    return wanted


# ------------------------------------------------------------------------- any file


def read_weights(path, config=None) -> dict:
    """Read a weights file of any supported kind, told apart by its first bytes.

    With a ``config``, the declared shapes and dtypes are checked against it before any
    tensor is read, and only the tensors the model reads are returned (``check_layout``).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if not head:
        raise CheckpointError(f"{path} is empty")
    if head.startswith(b"PK\x03\x04"):
        return read_torch_bin(path, config=config)
    if head.startswith(b"\x80") and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise CheckpointError(_legacy_message(path))
    if len(head) >= 9 and 8 + struct.unpack("<Q", head[:8])[0] <= size and head[8:9] == b"{":
        return read_safetensors(path, config=config)
    raise CheckpointError(
        f"{path} is neither a safetensors file nor a zip-format torch file "
        f"(it starts with {head[:8]!r}; truncated, or not a checkpoint?)"
    )


def _legacy_message(path) -> str:
    new = path.with_name(path.stem + "-zip.bin")
    # Every path goes through json (a Python string literal) and the command through
    # shlex.quote: a file name such as model$(touch x).bin must not run when pasted.
    code = 'import torch; torch.save(torch.load({}, map_location="cpu", weights_only=True), {})'
    code = code.format(json.dumps(str(path)), json.dumps(str(new)))
    return (
        f"{path} is a legacy (non-zip, PyTorch < 1.6) torch file or a plain pickle, which "
        "nystrom_np does not read: unpickling it safely needs torch itself. Re-save it once "
        "in the zip format with torch:\n"
        f"    python -c {shlex.quote(code)}\n"
        "then load that file, or make a safetensors copy of its directory with\n"
        "    python -m nystrom_np convert SRC_DIR DST_DIR"
    )


# ------------------------------------------------------------------ finding a checkpoint


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, found as huggingface_hub finds it."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    xdg = env.get("XDG_CACHE_HOME") or "~/.cache"
    home = env.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return Path(home).expanduser() / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _in_dir(directory: Path):
    """(config.json or None, preferred weights file or None) of a directory."""
    config = directory / "config.json"
    weights = next((directory / n for n in WEIGHT_FILES if (directory / n).is_file()), None)
    return (config if config.is_file() else None), weights


def find_checkpoint(source, *, revision=None):
    """Locate a checkpoint's files: returns ``(config_path or None, weights_path)``.

    Parameters
    ----------
    source : a directory (``config.json`` + ``model.safetensors`` and/or
        ``pytorch_model.bin``; safetensors preferred), a weights file (its directory's
        ``config.json`` is used when present), or a hub id like ``uw-madison/nystromformer-512``
        (the local Hugging Face cache first, then a download with huggingface_hub)
    revision : for hub ids only: a branch, tag, ``refs/pr/N`` or commit (default ``main``)
    """
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"source must be a folder, weights file or hub id, got {type(source).__name__}."
        )
    if str(source) == "":  # Path("") is the current folder: never load that by accident
        raise ValueError("source is empty; give a folder (\".\" for this one), file or hub id.")
    path = Path(source).expanduser()
    if path.is_dir():
        _no_revision(revision, path)
        config, weights = _in_dir(path)
        if weights is None:
            present = sorted(p.name for p in path.iterdir())[:20]
            raise FileNotFoundError(
                f"{path} holds none of {list(WEIGHT_FILES)} (it holds {present})"
            )
        return config, weights
    if path.is_file():
        _no_revision(revision, path)
        config = path.parent / "config.json"
        return (config if config.is_file() else None), path
    repo_id = str(source)
    if not re.fullmatch(r"[\w][\w.-]*(/[\w][\w.-]*)?", repo_id) or ".." in repo_id:
        raise FileNotFoundError(f"no such file or directory: {path}")
    if path.suffix.lower() in WEIGHT_SUFFIXES:  # a file name, never asked of the hub
        raise FileNotFoundError(f"no such file: {path} (a name ending in {path.suffix} is "
                                "read as a weights file, not as a hub id)")
    revision = revision or "main"
    if ".." in revision or revision.startswith("/"):
        raise ValueError(f"revision {revision!r} is not a branch, tag, refs/pr/N or commit.")
    snapshot = _cached_snapshot(repo_id, revision)
    if snapshot is not None:
        config, weights = _in_dir(snapshot)
        if config is not None and weights is not None:
            return config, weights
    return _download(repo_id, revision, source_path=path)


def _no_revision(revision, path):
    if revision is not None:
        raise ValueError(f"revision={revision!r} applies to hub ids, not to the local {path}.")


def _cached_snapshot(repo_id, revision):
    """The cache's snapshot folder of ``repo_id`` at ``revision``, or None."""
    repo = hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / revision  # refs/main, refs/refs/pr/1 hold a commit hash
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


HUB_TIMEOUT = 3.0  # seconds the hub has to answer before we call it unreachable


def hub_endpoint() -> str:
    """The hub's address, as huggingface_hub reads it (``HF_ENDPOINT``)."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hub_reachable(timeout=HUB_TIMEOUT) -> bool:
    """Whether the hub answers an HTTP request (any status) within ``timeout`` seconds.

    Asked before any download, because huggingface_hub retries a host that does not answer
    for over a minute, printing each retry. A TCP connection alone proves nothing: a proxy
    or a stalled server accepts it and then never answers. The name lookup counts against
    ``timeout`` too (see ``_head``).
    """
    if _offline():
        return False
    status, _ = _head(hub_endpoint(), timeout)
    return status is not None


def _download(repo_id, revision, source_path):
    """Fetch config.json, one weights file and spiece.model into the cache, or explain how."""
    why = None
    if _offline():
        why = "HF_HUB_OFFLINE is set, so nothing was downloaded"
    elif importlib.util.find_spec("huggingface_hub") is None:
        why = "huggingface_hub is not installed, so nothing was downloaded"
    elif not hub_reachable():
        why = (
            f"the hub ({hub_endpoint()}) did not answer within {HUB_TIMEOUT:g} s (no network, "
            "a name lookup or a server that does not respond), so nothing was downloaded"
        )
    else:
        try:
            config = fetch_file(repo_id, "config.json", revision)
            for name in WEIGHT_FILES:
                try:
                    weights = fetch_file(repo_id, name, revision)
                except FileNotFoundError as e:  # no such file in the repo: try the next
                    why = f"download failed: {e}"
                    continue
                with contextlib.suppress(OSError):  # the tokenizer, where the repo has one
                    fetch_file(repo_id, "spiece.model", revision)
                return config, weights
        except Exception as e:  # an error status, a stall, a gated repo, a full disk, ...
            why = f"download failed: {type(e).__name__}: {str(e)[:300]}"
    name = shlex.quote(repo_id.split("/")[-1])  # every word of a command we print is quoted
    rev = "" if revision == "main" else f" --revision {shlex.quote(revision)}"
    url = f"https://huggingface.co/{repo_id}/resolve/{quote(revision, safe='')}"
    error = FileNotFoundError(
        f"cannot find the checkpoint {repo_id!r} (revision {revision!r}):\n"
        f"  - there is no local file or folder {source_path}\n"
        f"  - the Hugging Face cache {hub_cache_dir()} has no snapshot of it with config.json "
        "and weights (HF_HUB_CACHE or HF_HOME choose another cache)\n"
        f"  - {why}\n"
        "Get the files where the hub is reachable:\n"
        f"    huggingface-cli download {shlex.quote(repo_id)} config.json pytorch_model.bin "
        f"spiece.model{rev} --local-dir {name}\n"
        f"or  curl -L -O {url}/config.json -O {url}/pytorch_model.bin -O {url}/spiece.model"
        f"  (in a folder {name})\n"
        f"and load that folder: nystrom_np.load({repo_id.split('/')[-1]!r}). Copied into this "
        "machine's cache (huggingface-cli without --local-dir), the hub id works as it is."
    )
    error.reason = why  # the one line that says why, for callers that fall back
    raise error


def fetch_file(repo_id, filename, revision="main") -> Path:
    """One file of a hub repo, downloaded into the Hugging Face cache (once) with a progress bar.

    huggingface_hub retries a server that answers 5xx or stalls for about a minute, so the
    file's URL is asked first, with a HEAD of ``HUB_TIMEOUT`` seconds: only a server that
    answers it with a success gets the download.

    Raises
    ------
    FileNotFoundError : the hub answered 404 (the repo or revision has no such file)
    ConnectionError : any other error status, or no answer within ``HUB_TIMEOUT`` seconds
    ImportError : huggingface_hub is not installed
    """
    with warnings.catch_warnings():  # tqdm.auto's advice to install ipywidgets, in a kernel
        warnings.filterwarnings("ignore", message="IProgress not found")
        import huggingface_hub
        import huggingface_hub.file_download  # noqa: F401  (the import that warns)

    revision = revision or "main"
    cached = huggingface_hub.try_to_load_from_cache(
        repo_id, filename, cache_dir=hub_cache_dir(), revision=revision
    )
    if isinstance(cached, str):  # already there: no request, no message
        return Path(cached)
    url = f"{hub_endpoint()}/{repo_id}/resolve/{quote(revision, safe='')}/{filename}"
    status, size = _head(url)
    if status is None:
        raise ConnectionError(f"the hub did not answer {url} within {HUB_TIMEOUT:g} s")
    if status == 404:
        raise FileNotFoundError(f"the hub has no {url} (HTTP 404)")
    if status >= 400:
        raise ConnectionError(f"the hub answered HTTP {status} for {url}")
    loud = filename in WEIGHT_FILES  # hundreds of MB: say so, and show the progress
    if loud:
        print(f"downloading {repo_id}/{filename} into {hub_cache_dir()} (once) ...",
              file=sys.stderr, flush=True)  # fmt: skip
    start = time.perf_counter()
    blobs = hub_cache_dir() / ("models--" + repo_id.replace("/", "--")) / "blobs"
    # huggingface_hub reads HF_HUB_OFFLINE once, at its first import (perhaps while the book
    # looked in the cache offline); this download follows the environment as it is now.
    constants = huggingface_hub.constants
    offline_at_import, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, _offline()
    try:
        with _progress(filename, size, blobs, show=loud):
            path = Path(huggingface_hub.hf_hub_download(
                repo_id, filename, revision=revision, cache_dir=hub_cache_dir(),
                endpoint=hub_endpoint(), etag_timeout=HUB_TIMEOUT,
            ))  # fmt: skip
    except _entry_not_found() as e:
        raise FileNotFoundError(f"the hub has no {url} ({type(e).__name__})") from None
    finally:
        constants.HF_HUB_OFFLINE = offline_at_import
    if loud:
        took = time.perf_counter() - start
        print(f"downloaded {path.stat().st_size / 1e6:.0f} MB in {took:.0f} s: {path}",
              file=sys.stderr, flush=True)  # fmt: skip
    return path


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A 3xx is the hub's answer (the real hub sends big files to a CDN with a 302): take
    it as it is, rather than let urllib turn the HEAD into a GET of the CDN's copy."""

    def redirect_request(self, *args, **kwargs):
        return None


def _head(url, timeout=HUB_TIMEOUT):
    """(HTTP status, file size or None) of a HEAD of ``url``; status None: no answer.

    ``timeout`` bounds the whole request. urllib's own timeout bounds each socket operation
    but not the name lookup before them (``socket.getaddrinfo`` takes none), and a resolver
    that never answers (a dead DNS server, a captive network) would hang the book build. So
    the request runs in a daemon thread, left to finish on its own if it takes too long.
    """
    answers = []
    thread = threading.Thread(
        target=lambda: answers.append(_ask_head(url, timeout)), daemon=True, name="hub probe"
    )
    thread.start()
    thread.join(timeout)
    return answers[0] if answers else (None, None)


def _ask_head(url, timeout):
    """``_head``'s request itself, in the probe's thread."""
    try:
        answer = urllib.request.build_opener(_NoRedirect).open(
            urllib.request.Request(url, method="HEAD"), timeout=timeout
        )
        answer.close()
    except urllib.error.HTTPError as e:  # 3xx (not followed) and 4xx, 5xx
        answer = e
    except (OSError, ValueError):  # refused, timed out, no route, a malformed HF_ENDPOINT
        return None, None
    size = answer.headers.get("X-Linked-Size") or answer.headers.get("Content-Length")
    return answer.code, (int(size) if size and size.isdigit() else None)


@contextlib.contextmanager
def _progress(name, size, blobs, show=True):
    """A progress bar of a download where huggingface_hub draws none.

    huggingface_hub draws its bar only on a terminal; in a notebook kernel (a book build)
    stderr is not one. There a thread follows the size of the ``*.incomplete`` file that
    huggingface_hub writes into ``blobs`` and draws the bar (one line, redrawn each second).
    """
    if not show or size is None or sys.stderr.isatty():
        yield
        return
    from tqdm import tqdm  # huggingface_hub's own dependency

    done = threading.Event()

    def follow():
        with tqdm(total=size, desc=name, unit="B", unit_scale=True, file=sys.stderr,
                  mininterval=1.0, disable=False) as bar:  # fmt: skip
            while True:
                now = sum(p.stat().st_size for p in blobs.glob("*.incomplete") if p.is_file())
                bar.update(max(now, bar.n) - bar.n)
                if done.wait(1.0):
                    if finished:  # the file is complete (it was renamed: nothing to follow)
                        bar.update(size - bar.n)
                    return

    finished = []
    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
        finished.append(True)
    finally:
        done.set()
        thread.join()


def _entry_not_found():
    try:
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:  # huggingface_hub < 0.23
        from huggingface_hub.utils import EntryNotFoundError
    return EntryNotFoundError


# --------------------------------------------------------------------------- loading


def _resolve_config(config, config_path, weights):
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return Config.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return Config.from_json(config)
    if config is not None:
        raise TypeError(
            f"config must be a Config, a dict or a config.json path, got {type(config).__name__}."
        )
    if config_path is None:
        raise FileNotFoundError(
            f"no config.json next to {weights}; pass config= (a Config, or a config.json path)."
        )
    return Config.from_json(config_path)


def _warn_non_finite(state, path):
    """NaN or Inf in the weights give NaN outputs: say so once, at load time."""
    bad = [n for n, a in state.items() if a.dtype.kind == "f" and not np.isfinite(a).all()]
    if bad:
        warnings.warn(
            f"{path}: {len(bad)} tensor(s) hold NaN or Inf ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); the model's outputs will be NaN or Inf.",
            RuntimeWarning,
            stacklevel=3,
        )


def load(source, *, config=None, revision=None, dtype=np.float32, device="cpu"):
    """Load a checkpoint into a ``Model``, from a folder, a weights file or a hub id.

    Parameters
    ----------
    source : see ``find_checkpoint``
    config : a ``Config``, a config.json path or a dict; default: the checkpoint's config.json
    revision : hub ids only: branch, tag, ``refs/pr/N`` or commit
    dtype : the weights' dtype in the model (float32, or float64 for reference runs)
    device : ``"cpu"`` (NumPy) or ``"gpu"`` (CuPy)

    Returns
    -------
    Model
    """
    from .weights import from_state_dict

    config_path, weights = find_checkpoint(source, revision=revision)
    config = _resolve_config(config, config_path, weights)
    state = read_weights(weights, config)  # checked against the config before it is read
    _warn_non_finite(state, weights)
    try:
        model = from_state_dict(state, config, dtype=dtype)
    except ValueError as e:
        raise CheckpointError(f"{weights}: {e}") from None
    del state  # the model holds copies: release the file's memory map now
    return model if device == "cpu" else model.to(device)


# ------------------------------------------------------------------------ converting

# Files of a model folder besides config.json and weights that a converted copy keeps.
TOKENIZER_FILES = (
    "spiece.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
)
TOKENIZER_LIMIT = 64 << 20  # bytes; the real spiece.model is 0.8 MB, tokenizer.json 1.4 MB


def convert(src, dst, *, config=None, revision=None, force=False, log=print) -> Path:
    """Write a checkpoint as ``DST/model.safetensors`` + ``config.json``, verified exactly.

    The safetensors file has ``save_pretrained``'s layout: the tensors the model reads,
    each bit for bit in its own dtype; the tied ``cls.predictions.decoder.*``, the
    ``position_ids`` / ``token_type_ids`` buffers, a pooler and a next-sentence head are
    left out. The source's ``config.json`` and tokenizer files are copied.

    Nothing is written into DST until everything is: the files go into a new folder beside
    DST, are read back and compared with the source, and only then take DST's place (one
    rename). A failure at any step leaves DST as it was. DST must not exist or be empty;
    ``force`` lets a DST with files be replaced: its files of the same names are replaced,
    its other files kept (hard-linked into the new folder, symlinks kept as links, never
    followed).

    Parameters
    ----------
    src : a folder, weights file or hub id (see ``find_checkpoint``)
    dst : the output folder (created if needed)
    config : a ``Config`` or config.json path, if the source has none
    force : replace the files of a DST that holds some
    log : called with one line of text per step (``print`` by default)

    Returns
    -------
    the path of the new ``model.safetensors``
    """
    from .weights import from_state_dict

    config_path, weights = find_checkpoint(src, revision=revision)
    cfg = _resolve_config(config, config_path, weights)
    if str(dst) == "":
        raise ValueError("dst is empty; give the output folder.")
    dst = Path(os.path.abspath(dst))  # a real name and parent, even for "." or "x/.."
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        raise FileExistsError(f"{dst} exists and is not a folder; convert writes a folder.")
    present = sorted(p.name for p in dst.iterdir()) if dst.is_dir() else []
    if present and not force:
        shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        raise FileExistsError(
            f"{dst} exists and holds {len(present)} file(s) ({shown}); convert writes into a "
            "new or empty folder. Pass force=True (--force) to replace its model files."
        )

    state = read_weights(weights, cfg)  # checked against the config before it is read
    log(f"read   {weights}: {len(state)} tensors, {_megabytes(state.values())}")
    _warn_non_finite(state, weights)
    word = next(k for k in state if k.endswith("embeddings.word_embeddings.weight"))
    dtype = state[word].dtype
    try:  # refuse to convert what would not load; this also checks the tied pairs are equal
        model = from_state_dict(state, cfg, dtype=dtype)
    except ValueError as e:
        raise CheckpointError(f"{weights}: {e}") from None
    kept = {}
    for name, value in state.items():
        if name in _TIED:
            log(f"  drop {name}: tied to {_TIED[name]}")
        else:
            kept[name] = np.ascontiguousarray(value)

    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.convert-", dir=dst.parent))
    except OSError as e:
        raise OSError(f"cannot write beside {dst} (in {dst.parent}): {e.strerror or e}") from None
    try:
        _write_converted(work, kept, cfg, config_path if config is None else None, weights, log)
        _verify_converted(work, kept, model, cfg, dtype, weights)
        if present:
            _carry_over(dst, work)
        _swap_into_place(work, dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    out = dst / "model.safetensors"
    log(f"verified: {len(kept)} tensors bit-identical to {weights.name}, same model; in {dst}")
    return out


def _write_converted(work, kept, cfg, config_path, weights, log):
    """model.safetensors, config.json and the tokenizer files, into the new folder."""
    from safetensors.numpy import save_file

    save_file(kept, str(work / "model.safetensors"), metadata={"format": "pt"})  # "pt": as HF
    log(f"wrote  model.safetensors: {len(kept)} tensors, {_megabytes(kept.values())}")
    if config_path is not None:  # the original file: it has fields Config does not
        (work / "config.json").write_bytes(config_path.read_bytes())  # read_json sized it
    else:
        (work / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    log("wrote  config.json")
    for name in TOKENIZER_FILES:
        source = weights.parent / name
        if source.is_file():
            if source.stat().st_size > TOKENIZER_LIMIT:
                raise CheckpointError(
                    f"{source} is over {TOKENIZER_LIMIT} bytes; a tokenizer file is a few MB."
                )
            shutil.copyfile(source, work / name)
            log(f"copied {name}")


def _verify_converted(work, kept, model, cfg, dtype, weights):
    """The new file reads back as written and loads to the same model, or an error."""
    from .weights import from_state_dict

    out = work / "model.safetensors"
    back = read_safetensors(out)
    if set(back) != set(kept) or any(not _identical(back[n], kept[n]) for n in kept):
        raise CheckpointError(f"{out} does not read back as it was written")
    again = from_state_dict(back, Config.from_json(work / "config.json"), dtype=dtype)
    pairs = zip(_leaves(model.params), _leaves(again.params), strict=True)
    if again.config != cfg or not all(_identical(a, b) for a, b in pairs):
        raise CheckpointError(f"{out} does not load to the same model as {weights}")


def _carry_over(dst, work):
    """DST's files that convert does not write, hard-linked into the new folder (no copy);
    symlinks are recreated as links, never followed out of DST."""
    for entry in dst.iterdir():
        target = work / entry.name
        if target.exists() or target.is_symlink():
            continue  # replaced by the converted file of that name
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=os.link)
        else:
            os.link(entry, target)


def _swap_into_place(work, dst):
    """Rename the finished folder to DST; an old DST is renamed aside first, then removed."""
    if not dst.exists() or not any(dst.iterdir()):
        os.replace(work, dst)  # onto nothing, or onto an empty folder: one atomic rename
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.replace(dst, old)
    try:
        os.replace(work, dst)
    except BaseException:
        os.replace(old, dst)  # put the original back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _identical(a, b) -> bool:
    """Same dtype, shape and bytes (so NaNs and -0.0 count as equal only to themselves)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _leaves(tree):
    """The arrays of a nested dict/list, in a fixed order."""
    if isinstance(tree, dict):
        for key in sorted(tree):
            yield from _leaves(tree[key])
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _leaves(item)
    elif tree is not None:
        yield tree


def _megabytes(arrays) -> str:
    return f"{sum(a.nbytes for a in arrays) / 1e6:.1f} MB"
