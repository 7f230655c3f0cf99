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
or downloaded with ``huggingface_hub`` when it is installed.

Every problem with a file is a ``CheckpointError`` (a ``ValueError``) naming the file and
what is wrong; nothing is built from a file that failed a check.
"""

import collections
import io
import json
import mmap
import os
import pickle
import re
import shutil
import socket
import struct
import zipfile
import zlib
from pathlib import Path
from urllib.parse import quote, urlparse

import numpy as np

from .config import Config

REPO_ID = "uw-madison/nystromformer-512"  # the released checkpoint, the default everywhere
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference
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


def read_safetensors(path, *, mmap=True) -> dict:
    """Read a ``.safetensors`` file into a dict name -> NumPy array.

    The safetensors library checks the file first (a well-formed header whose byte ranges
    cover the data exactly). With ``mmap`` the arrays are then read-only views of a memory
    map of the file, as with ``read_torch_bin``: nothing is copied, so a model built from
    them holds the weights once. ``mmap=False`` copies each tensor out with the library.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(path, framework="numpy") as f:
            if not mmap:
                return {name: f.get_tensor(name) for name in f.keys()}
            names = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from None
    except TypeError as e:  # e.g. "data type 'bfloat16' not understood"
        raise CheckpointError(f"{path} holds a dtype NumPy has no type for ({e}).") from None
    return _map_safetensors(path, names)


def _map_safetensors(path, names) -> dict:
    """Views of a memory map of a safetensors file the library has already checked."""
    with open(path, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_size])
    start = 8 + header_size
    state = {}
    for name in names:
        info = header[name]
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name} is {info['dtype']}, which NumPy has no dtype for; "
                "re-save the checkpoint in float32."
            )
        dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
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


class _StorageType(str):
    """The name of a storage class that the pickle asked for (immutable: no attributes)."""

    __slots__ = ()


class _StateDictUnpickler(pickle.Unpickler):
    """An unpickler that can build an OrderedDict of tensors and nothing else.

    ``find_class`` is the only way a pickle reaches Python objects; it hands out
    ``OrderedDict``, our own ``_rebuild_tensor`` and storage-type names, and refuses any
    other global before it is imported, so no code of the file's choosing ever runs.
    """

    def __init__(self, file, path, read_storage, byteorder="<"):
        super().__init__(file)
        self.path = path
        self.read_storage = read_storage  # (key, dtype, numel) -> 1-D array
        self.byteorder = byteorder  # of the storages' bytes: "<" (all files we know) or ">"
        self.storages = {}  # key -> 1-D array, shared by every tensor that views it

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) == ("torch", "BFloat16Storage"):
            raise CheckpointError(
                f"{self.path} holds bfloat16 tensors, which NumPy has no dtype for. Re-save "
                "them as float32 with torch: torch.save({k: v.float() for k, v in "
                "torch.load(SRC, weights_only=True).items()}, DST)"
            )
        raise CheckpointError(
            f"refusing to load {self.path}: the pickle asks for global '{module}.{name}'. "
            "A state-dict checkpoint needs only collections.OrderedDict, "
            "torch._utils._rebuild_tensor_v2 and torch.*Storage, so this file holds "
            "something else (a pickled object, or code); nothing of it was run."
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.path}: unexpected persistent id {str(pid)[:80]}")
        _, kind, key, _location, numel = pid  # the location ('cpu', 'cuda:0') does not matter
        if not isinstance(kind, _StorageType) or not isinstance(key, str):
            raise CheckpointError(f"{self.path}: malformed storage id {str(pid)[:80]}")
        if not isinstance(numel, int) or numel < 0:
            raise CheckpointError(f"{self.path}: storage {key} has a bad size {numel!r}")
        dtype = np.dtype(STORAGE_DTYPES[kind]).newbyteorder(self.byteorder)
        if key not in self.storages:
            self.storages[key] = self.read_storage(key, dtype, numel)
        storage = self.storages[key]
        if storage.dtype != dtype or storage.size != numel:
            raise CheckpointError(
                f"{self.path}: storage {key} is used both as {storage.size} x {storage.dtype} "
                f"and as {numel} x {dtype}"
            )
        return storage

    def _rebuild_tensor(self, storage, offset, size, stride, *_grad_hooks_metadata):
        """``torch._utils._rebuild_tensor_v2``: a strided view of a storage, bounds-checked."""
        ints = (offset, *size, *stride)
        if (
            not isinstance(storage, np.ndarray)
            or not isinstance(size, tuple)
            or not isinstance(stride, tuple)
            or len(size) != len(stride)
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ints)
        ):
            raise CheckpointError(f"{self.path}: malformed tensor record")
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if 0 not in size and last >= storage.size:
            raise CheckpointError(
                f"{self.path}: a tensor of shape {size} at offset {offset} reaches element "
                f"{last} of a storage of {storage.size}"
            )
        item = storage.itemsize
        return np.lib.stride_tricks.as_strided(
            storage[offset:], shape=size, strides=[s * item for s in stride], writeable=False
        )


def read_torch_bin(path, *, check_crc=True) -> dict:
    """Read a zip-format ``torch.save`` state dict into a dict name -> NumPy array, no torch.

    The arrays are read-only views of a memory map of the file (no copy is made); tensors
    that share a storage in the file share memory here too. ``check_crc`` verifies each
    storage's zip checksum, so corrupted bytes are an error instead of wrong weights.
    """
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
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
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

        def read_storage(key, dtype, numel):
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
                raw = _read_member(archive, name, path)
                return np.frombuffer(raw, dtype, numel)
            if numel == 0:
                return np.empty(0, dtype)
            start = _data_offset(data, info, path)
            stored = memoryview(data)[start : start + info.file_size]
            if check_crc and zlib.crc32(stored) != info.CRC:
                raise CheckpointError(f"{path}: storage {name} is corrupted (CRC mismatch)")
            return np.frombuffer(data, dtype, numel, offset=start)

        pickled = _read_member(archive, pickles[0], path)
        order = ">" if byteorder == b"big" else "<"
        unpickler = _StateDictUnpickler(io.BytesIO(pickled), path, read_storage, order)
        try:
            state = unpickler.load()
        except CheckpointError:
            raise
        except Exception as e:  # any failure inside the pickle: a damaged or foreign file
            raise CheckpointError(
                f"{path}: {pickles[0]} is not a valid state-dict pickle ({type(e).__name__}: {e})"
            ) from None
    return _check_state(state, path)


def _read_member(archive, name, path, default=None) -> bytes:
    """The bytes of one zip member, with zip errors turned into a CheckpointError."""
    try:
        return archive.read(name)
    except KeyError:
        if default is not None:
            return default
        raise CheckpointError(f"{path}: {name} is missing from the zip") from None
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
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
    """A flat dict of str -> array, or a CheckpointError saying what the file holds instead."""
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path} holds a {type(state).__name__}, not a state dict of tensors"
        )
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, np.ndarray):
            raise CheckpointError(
                f"{path}: entry {str(name)[:60]!r} is a {type(value).__name__}, not a tensor "
                "(a nested or non-state-dict checkpoint)"
            )
    return dict(state)


# ------------------------------------------------------------------------- any file


def read_weights(path) -> dict:
    """Read a weights file of any supported kind, told apart by its first bytes."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not head:
        raise CheckpointError(f"{path} is empty")
    if head.startswith(b"PK\x03\x04"):
        return read_torch_bin(path)
    if head.startswith(b"\x80") and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise CheckpointError(_legacy_message(path))
    if len(head) >= 9 and 8 + struct.unpack("<Q", head[:8])[0] <= size and head[8:9] == b"{":
        return read_safetensors(path)
    raise CheckpointError(
        f"{path} is neither a safetensors file nor a zip-format torch file "
        f"(it starts with {head[:8]!r}; truncated, or not a checkpoint?)"
    )


def _legacy_message(path) -> str:
    new = path.with_name(path.stem + "-zip.bin")
    return (
        f"{path} is a legacy (non-zip, PyTorch < 1.6) torch file or a plain pickle, which "
        "nystrom_np does not read: unpickling it safely needs torch itself. Re-save it once "
        "in the zip format with torch:\n"
        f"    python -c \"import torch; torch.save(torch.load('{path}', map_location='cpu', "
        f"weights_only=True), '{new}')\"\n"
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


def hub_reachable(timeout=3.0) -> bool:
    """Whether the hub answers a TCP connection within ``timeout`` seconds.

    Asked before any download, because huggingface_hub retries an unreachable host for
    about half a minute, printing each retry.
    """
    if _offline():
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _download(repo_id, revision, source_path):
    """Fetch config.json and one weights file with huggingface_hub, or explain how to."""
    why = None
    if _offline():
        why = "HF_HUB_OFFLINE is set, so nothing was downloaded"
    else:
        try:
            import huggingface_hub
        except ImportError:
            why = "huggingface_hub is not installed, so nothing was downloaded"
    if why is None and not hub_reachable():
        why = "the hub did not answer within 3 s (no network?), so nothing was downloaded"
    if why is None:
        try:
            from huggingface_hub.errors import EntryNotFoundError
        except ImportError:  # huggingface_hub < 0.23
            from huggingface_hub.utils import EntryNotFoundError

        def fetch(filename):
            return Path(
                huggingface_hub.hf_hub_download(
                    repo_id, filename, revision=revision, cache_dir=hub_cache_dir()
                )
            )

        try:
            config = fetch("config.json")
            for name in WEIGHT_FILES:
                try:
                    return config, fetch(name)
                except EntryNotFoundError as e:  # no such file in the repo: try the next
                    why = f"download failed: {type(e).__name__}: {e}"
        except Exception as e:  # no network, unknown repo, gated repo, ...
            why = f"download failed: {type(e).__name__}: {str(e)[:300]}"
    name = repo_id.split("/")[-1]
    rev = "" if revision == "main" else f" --revision {revision}"
    url = f"https://huggingface.co/{repo_id}/resolve/{quote(revision, safe='')}"
    raise FileNotFoundError(
        f"cannot find the checkpoint {repo_id!r} (revision {revision!r}):\n"
        f"  - there is no local file or folder {source_path}\n"
        f"  - the Hugging Face cache {hub_cache_dir()} has no snapshot of it with config.json "
        "and weights (HF_HUB_CACHE or HF_HOME choose another cache)\n"
        f"  - {why}\n"
        "Get the files where the hub is reachable:\n"
        f"    huggingface-cli download {repo_id} config.json pytorch_model.bin spiece.model{rev} "
        f"--local-dir {name}\n"
        f"or  curl -L -O {url}/config.json -O {url}/pytorch_model.bin -O {url}/spiece.model"
        f"  (in a folder {name})\n"
        f"and load that folder: nystrom_np.load('{name}'). Copied into this machine's cache "
        "(huggingface-cli without --local-dir), the hub id works as it is."
    )


# --------------------------------------------------------------------------- loading


def _resolve_config(config, config_path, weights):
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return Config.from_dict(config)
    if config is not None:
        return Config.from_json(config)
    if config_path is None:
        raise FileNotFoundError(
            f"no config.json next to {weights}; pass config= (a Config, or a config.json path)."
        )
    return Config.from_json(config_path)


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
    state = read_weights(weights)
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


def convert(src, dst, *, config=None, revision=None, force=False, log=print) -> Path:
    """Write a checkpoint as ``DST/model.safetensors`` + ``config.json``, verified exactly.

    The safetensors file has ``save_pretrained``'s layout: the tied
    ``cls.predictions.decoder.*`` (safetensors refuses shared memory) and the
    ``position_ids`` / ``token_type_ids`` buffers are left out; every other tensor is
    written bit for bit in its own dtype. The source's ``config.json`` and tokenizer files
    are copied. The new file is read back and compared with the source before returning.

    Parameters
    ----------
    src : a folder, weights file or hub id (see ``find_checkpoint``)
    dst : the output folder (created if needed)
    config : a ``Config`` or config.json path, if the source has none
    force : overwrite an existing ``DST/model.safetensors``
    log : called with one line of text per step (``print`` by default)

    Returns
    -------
    the path of the new ``model.safetensors``
    """
    from safetensors.numpy import save_file

    from .weights import from_state_dict

    config_path, weights = find_checkpoint(src, revision=revision)
    cfg = _resolve_config(config, config_path, weights)
    dst = Path(dst)
    out = dst / "model.safetensors"
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass force=True (--force) to overwrite it.")

    state = read_weights(weights)
    log(f"read   {weights}: {len(state)} tensors, {_megabytes(state.values())}")
    word = next((k for k in state if k.endswith("embeddings.word_embeddings.weight")), None)
    dtype = state[word].dtype if word is not None and state[word].dtype.kind == "f" else "f4"
    try:  # refuse to convert what would not load; this also checks the tied pairs are equal
        model = from_state_dict(state, cfg, dtype=dtype)
    except ValueError as e:
        raise CheckpointError(f"{weights}: {e}") from None
    prefix = word[: -len("embeddings.word_embeddings.weight")]
    kept = {}
    for name, value in state.items():
        tied = _TIED.get(name)
        tied = prefix + tied if tied is not None and tied.startswith("embeddings.") else tied
        if tied is not None and tied in state:
            log(f"  drop {name}: tied to {tied}")
        elif name.startswith(prefix) and name[len(prefix) :] in _BUFFERS:
            log(f"  drop {name}: a buffer the model rebuilds")
        else:
            kept[name] = np.ascontiguousarray(value)

    dst.mkdir(parents=True, exist_ok=True)
    partial = dst / "model.safetensors.partial"
    save_file(kept, str(partial), metadata={"format": "pt"})  # "pt": what transformers expects
    os.replace(partial, out)
    log(f"wrote  {out}: {len(kept)} tensors, {_megabytes(kept.values())}")
    if config is None:  # keep the original file: it has fields Config does not (tokenizer_class)
        config_text = config_path.read_text()
    else:
        config_text = json.dumps(cfg.to_dict(), indent=2) + "\n"
    (dst / "config.json").write_text(config_text)
    log(f"wrote  {dst / 'config.json'}")
    for name in TOKENIZER_FILES:
        if (weights.parent / name).is_file() and weights.parent.resolve() != dst.resolve():
            shutil.copyfile(weights.parent / name, dst / name)
            log(f"copied {name}")

    back = read_safetensors(out)
    if set(back) != set(kept) or any(not _identical(back[n], kept[n]) for n in kept):
        raise CheckpointError(f"{out} does not read back as it was written")
    again = from_state_dict(back, cfg, dtype=dtype)
    pairs = zip(_leaves(model.params), _leaves(again.params), strict=True)
    if not all(_identical(a, b) for a, b in pairs):
        raise CheckpointError(f"{out} does not load to the same model as {weights}")
    log(f"verified: {len(kept)} tensors bit-identical to {weights.name}, same model")
    return out


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
