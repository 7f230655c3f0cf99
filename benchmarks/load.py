"""Load time and peak memory of a checkpoint: nystrom_np's readers next to torch.load.

A random model of the real config (``uw-madison/nystromformer-512``: 437 MB in float32) is
saved to a temporary folder as ``model.safetensors`` and as a ``pytorch_model.bin`` with
the tied decoder (what ``torch.save(model.state_dict())`` writes). Each method then loads
it from a warm page cache into a ready model, in a fresh process of its own; methods
alternate, and each figure is the median over ``--repeats`` rounds:

- ``read_safetensors``: ``checkpoint.read_safetensors`` + ``model.from_state_dict``;
  ``read_safetensors(copy)`` the same with ``mmap=False`` (the library copies each tensor);
- ``read_torch_bin``: ``checkpoint.read_torch_bin`` (no torch) + ``from_state_dict``;
- ``torch.load``: ``NystromformerForMaskedLM(config)`` + ``torch.load(weights_only=True)``
  + ``load_state_dict``; ``torch.load(mmap)`` the same with ``mmap=True`` (needs torch and
  transformers; skipped without them).

Memory: peak resident set over the process's resident set just before loading (Linux
``VmHWM``, reset through ``/proc/self/clear_refs``), which counts pages of memory-mapped
files that were touched; and, for the NumPy methods, the peak of ``tracemalloc`` (memory
NumPy allocated: the arrays themselves, no file pages).

Usage: ``python benchmarks/load.py [--repeats 3] [--small]``. Prints a table, then one
JSON line.
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from functools import partial
from pathlib import Path

import numpy as np
from _common import has_torch, proc_status, reset_peak_rss

from nystrom_np.checkpoint import read_safetensors, read_torch_bin
from nystrom_np.config import Config
from nystrom_np.weights import from_state_dict, random_model, to_state_dict

METHODS = (
    "read_safetensors",
    "read_safetensors(copy)",
    "read_torch_bin",
    "torch.load",
    "torch.load(mmap)",
)
SMALL = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=128, max_position_embeddings=126, conv_kernel_size=5)  # fmt: skip


# ------------------------------------------------------------------- in the worker process


def load_numpy(method, folder):
    config = Config.from_json(folder)
    if method.startswith("read_safetensors"):
        name = "model.safetensors"
        read = partial(read_safetensors, mmap=method == "read_safetensors")
    else:
        name, read = "pytorch_model.bin", read_torch_bin
    reset_peak_rss()
    rss0 = proc_status("VmRSS")
    tracemalloc.start()
    t0 = time.perf_counter()
    state = read(folder / name)
    t1 = time.perf_counter()
    model = from_state_dict(state, config)
    del state
    t2 = time.perf_counter()
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert model.dtype == np.float32
    return t1 - t0, t2 - t1, proc_status("VmHWM") - rss0, traced


def load_torch(method, folder):
    import torch
    import transformers

    config = transformers.NystromformerConfig.from_json_file(folder / "config.json")
    model_class = transformers.NystromformerForMaskedLM  # import it before the clock starts
    reset_peak_rss()
    rss0 = proc_status("VmRSS")
    t0 = time.perf_counter()
    model = model_class(config)
    t1 = time.perf_counter()
    state = torch.load(
        folder / "pytorch_model.bin", map_location="cpu", weights_only=True,
        mmap=method == "torch.load(mmap)",
    )  # fmt: skip
    t2 = time.perf_counter()
    model.load_state_dict(state)
    del state
    t3 = time.perf_counter()
    return t2 - t1, (t1 - t0) + (t3 - t2), proc_status("VmHWM") - rss0, None


def worker(method, folder):
    load_fn = load_numpy if method.startswith("read_") else load_torch
    read, build, rss, traced = load_fn(method, Path(folder))
    print(json.dumps(dict(read_s=read, build_s=build, rss_mb=rss / 1e6,
                          traced_mb=None if traced is None else traced / 1e6)))  # fmt: skip


# --------------------------------------------------------------------- in the main process


def save_files(folder: Path, config: Config, with_torch: bool) -> float:
    """Write config.json, model.safetensors and (with torch) pytorch_model.bin; return MB."""
    from safetensors.numpy import save_file

    state = to_state_dict(random_model(config, seed=0))
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if with_torch:
        import torch

        tensors = {k: torch.from_numpy(v) for k, v in state.items()}
        tensors["cls.predictions.decoder.weight"] = tensors[
            "nystromformer.embeddings.word_embeddings.weight"
        ]  # tied: one storage, as torch.save(model.state_dict()) writes it
        tensors["cls.predictions.decoder.bias"] = tensors["cls.predictions.bias"]
        torch.save(tensors, folder / "pytorch_model.bin")
    for path in folder.iterdir():  # warm the page cache for every method alike
        path.read_bytes()
    return sum(v.nbytes for v in state.values()) / 1e6


def run_worker(method, folder) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--worker", method, str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="a tiny config: a smoke test")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)

    config = Config.from_dict(SMALL) if args.small else Config()
    with_torch = has_torch()
    methods = [m for m in args.methods.split(",") if with_torch or m.startswith("read_safe")]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    runs = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        megabytes = save_files(folder, config, with_torch)
        for r in range(args.repeats):
            order = methods[r % len(methods) :] + methods[: r % len(methods)]  # rotate
            for method in order:
                runs[method].append(run_worker(method, folder))

    def median(method, key):
        values = [run[key] for run in runs[method]]
        return None if values[0] is None else statistics.median(values)

    table = {
        m: {k: median(m, k) for k in ("read_s", "build_s", "rss_mb", "traced_mb")} for m in methods
    }
    for row in table.values():
        row["total_s"] = row["read_s"] + row["build_s"]

    print(
        f"Loading a random {'small' if args.small else 'real-config'} model "
        f"({megabytes:.1f} MB float32) into a ready model; warm page cache, fresh process "
        f"per run, median of {args.repeats}; {platform.processor() or platform.machine()}, "
        f"numpy {np.__version__}{'' if with_torch else '; torch missing: its rows skipped'}"
    )
    print(f"{'method':<24}{'read s':>9}{'build s':>9}{'total s':>9}"
          f"{'peak RSS +MB':>14}{'numpy peak MB':>15}")  # fmt: skip
    for method, row in table.items():
        traced = "-" if row["traced_mb"] is None else f"{row['traced_mb']:.0f}"
        print(f"{method:<24}{row['read_s']:>9.3f}{row['build_s']:>9.3f}{row['total_s']:>9.3f}"
              f"{row['rss_mb']:>14.0f}{traced:>15}")  # fmt: skip
    print("build: from_state_dict (copy, transpose, cast); for torch, constructing the "
          "transformers model + load_state_dict.")  # fmt: skip
    print(json.dumps(dict(benchmark="load", size_mb=megabytes, repeats=args.repeats,
                          small=args.small, methods=table)))  # fmt: skip


if __name__ == "__main__":
    main()
