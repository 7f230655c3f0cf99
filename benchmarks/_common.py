"""Shared helpers of the benchmarks: the machine, threads, alternating timing, peak memory.

Every benchmark compares nystrom_np with transformers' PyTorch model **in one run, side
by side**, so that both see the same machine in the same state:

- Threads: both libraries get the same count (``--threads``, default: the CPUs this
  process may use), set through ``threadpoolctl`` for NumPy's BLAS and
  ``torch.set_num_threads`` for PyTorch (its MKL and OpenMP). Both counts are printed.
- Timing: one warm-up call of each candidate, then ``repeats`` rounds; in each round every
  candidate runs once, in an order that rotates from round to round, and the figure
  reported is the median over the rounds (the spread is printed too). A short pause
  before each call lets the other library's BLAS threads stop spinning (OpenBLAS and
  OpenMP workers busy-wait for a while after a call), so neither pays for the other.
- Peak memory: each side runs in a fresh Python process of its own (``measure_memory``):
  it builds the model and the input, returns freed memory to the system, notes its
  resident set (``VmRSS``), resets the kernel's high-water mark (``/proc/self/clear_refs``),
  runs the forward twice, and reports the peak resident set (``VmHWM``) minus that
  baseline: the memory the forward itself needs (its output included), weights excluded,
  measured the same way for NumPy and PyTorch, whatever allocator each uses (PyTorch's
  CPU allocator does not report to Python). For NumPy, the peak of ``tracemalloc``
  (NumPy's own array allocations) is given as a cross-check.

The alternating timing is ``nystrom_lab.timing.compare`` (the book's runtime chapter uses it
too), called here with a pause and without its memory tracing; ``table`` and ``usable_cpus``
come from there as well. What stays here is the benchmarks' own: the thread setting shared
with PyTorch, the machine record, the two models side by side, the fresh-process memory
runs, the command line and the closing JSON line.

Usage of the scripts: see each one's docstring. Each prints a readable table, then one
line of JSON with every figure (``json.loads`` of the last line).
"""

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np

from nystrom_lab.timing import compare, machine_info, usable_cpus
from nystrom_np.model import CONV_BLOCK

ROOT = Path(__file__).resolve().parent.parent
# A small config for smoke tests (``--tiny``): every code path, in well under a second.
TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=64, conv_kernel_size=5,
            num_landmarks=4, segment_means_seq_len=4)  # fmt: skip
PAUSE_S = 0.2  # between timed calls, for idle BLAS / OpenMP threads to go to sleep


# ------------------------------------------------------------------------------ machine


def blas_info() -> list:
    """The BLAS / OpenMP libraries loaded in this process, with version and thread count."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        config = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return [{"library": config.get("name"), "version": config.get("version"),
                 "threads": None, "note": "pip install threadpoolctl to see thread counts"}]
    return [
        {"library": i["internal_api"], "version": i.get("version"), "threads": i["num_threads"],
         "loaded_by": _owner(i["filepath"]), "file": Path(i["filepath"]).name}
        for i in threadpool_info()
    ]


def _owner(path: str) -> str:
    """The package a shared library ships with: numpy.libs/... -> numpy, torch/lib/... -> torch."""
    for part in reversed(Path(path).parent.parts):
        name = part.removesuffix(".libs")
        if name not in ("lib", "lib64"):
            return name
    return "?"


def set_threads(n: int):
    """Give NumPy's BLAS and PyTorch (if imported) the same number of threads, ``n``.

    Call it after the libraries are loaded: it sets the ones it finds.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        print(
            "warning: threadpoolctl is not installed, so NumPy's BLAS keeps its own thread "
            "count (pip install threadpoolctl, or set OPENBLAS_NUM_THREADS).",
            file=sys.stderr,
        )
    else:
        threadpool_limits(limits=n)  # every BLAS / OpenMP library loaded so far
    if "torch" in sys.modules:  # never import torch just for this (it costs memory)
        sys.modules["torch"].set_num_threads(n)


def machine(threads: int) -> dict:
    """What the figures were measured on: ``timing.machine_info`` (CPU, cores, load, NumPy),
    the thread count asked for, each BLAS library's owner, and torch's side when loaded."""
    info = {**machine_info(), "threads": threads, "blas": blas_info()}
    if "torch" not in sys.modules or "transformers" not in sys.modules:
        return info  # this benchmark did not use them: do not load them to print a version
    import torch
    import transformers

    info.update(
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        torch_blas="MKL" if torch.backends.mkl.is_available() else "other",
        transformers=transformers.__version__,
    )
    return info


def describe_machine(info: dict) -> str:
    blas = ", ".join(
        f"{b.get('loaded_by', '?')}: {b['library']} {b['version'] or ''} "
        f"({b['threads']} threads)".replace("  ", " ")
        for b in info["blas"]
    )
    lines = [
        f"CPU: {info['cpu']}, {info['usable_cpus']} usable of {info['logical_cpus']} logical "
        f"CPUs; load average {info['load_average']}",
        f"NumPy {info['numpy']}; BLAS/OpenMP libraries: {blas}",
    ]
    if "torch" in info:
        lines.append(
            f"torch {info['torch']} ({info['torch_threads']} threads, {info['torch_blas']}); "
            f"transformers {info['transformers']}"
        )
    return "\n".join(lines)


def has_torch() -> bool:
    """Whether torch and transformers are installed (without importing them)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


# -------------------------------------------------------------------------------- timing


def alternate(candidates: dict, repeats: int) -> dict:
    """Time each candidate (a name -> zero-argument callable) side by side, interleaved.

    ``timing.compare`` as the benchmarks run it: one warm-up call each, then ``repeats``
    rounds in a rotating order, a pause of ``PAUSE_S`` before every timed call, no memory
    tracing (the scripts measure memory in fresh processes instead).

    Returns name -> {"median_ms", "min_ms", "max_ms", "times_ms", "median_cpu_ms",
    "cpu_times_ms"}.
    """
    return compare(candidates, repeats, memory=False, pause=PAUSE_S)


# ------------------------------------------------------------------- the two models


def config_dict(tiny: bool, **overrides) -> dict:
    """The real checkpoint's config (``Config()`` defaults), or ``TINY``, with overrides."""
    from nystrom_np import Config

    base = Config.from_dict(TINY).to_dict() if tiny else Config().to_dict()
    return {**base, **overrides}


def our_model(config: dict, seed: int = 0):
    """A random float32 nystrom_np model of ``config`` (seeded)."""
    from nystrom_np import Config, random_model

    return random_model(Config.from_dict(config), seed=seed)


def torch_model(model):
    """transformers' ``NystromformerForMaskedLM`` holding the weights of our ``model``."""
    import torch
    import transformers

    from nystrom_np import to_state_dict

    fields = {k: v for k, v in model.config.to_dict().items() if k != "model_type"}
    try:
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # other transformers releases: just let it initialise
        import contextlib

        no_init_weights = contextlib.nullcontext
    with no_init_weights():  # the weights are ours: skip transformers' random init
        hf = transformers.NystromformerForMaskedLM(transformers.NystromformerConfig(**fields))
    state = {k: torch.from_numpy(v) for k, v in to_state_dict(model).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or any("decoder" not in k and "position_ids" not in k for k in missing):
        raise RuntimeError(f"weights do not fit: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()  # the decoder is the word-embedding table, as in the checkpoint
    return hf.eval()


def input_ids(config: dict, batch: int, length: int, seed: int = 0) -> np.ndarray:
    """Random token ids (B, N), avoiding the five special ids."""
    rng = np.random.default_rng(seed)
    return rng.integers(5, config["vocab_size"], (batch, length))


def our_forward(model, ids, options: dict):
    """A zero-argument callable: nystrom_np's logits of ``ids``."""
    from nystrom_np import forward

    return lambda: forward(model, ids, **options)


def torch_forward(hf, ids):
    """A zero-argument callable: transformers' logits of ``ids`` (no autograd)."""
    import torch

    ids = torch.from_numpy(ids)

    def run():
        with torch.inference_mode():
            return hf(input_ids=ids).logits

    return run


def build(spec: dict):
    """The forward call that ``spec`` names (see ``measure_memory``), and its model."""
    model = our_model(spec["config"], spec.get("seed", 0))
    ids = input_ids(spec["config"], spec["batch"], spec["length"])
    if spec["side"] == "nystrom_np":
        return our_forward(model, ids, spec.get("options", {})), model
    hf = torch_model(model)
    del model  # only transformers' copy of the weights stays
    return torch_forward(hf, ids), hf


def forward_flops(config: dict, batch: int, length: int, attention: str = "exact",
                  num_landmarks: int | None = None, iterations: int = 6,
                  head_rows: int | None = None) -> dict:
    """Floating-point operations (2 per multiply-add) of a forward's matrix products, by part.

    The nominal count: what the equations need, not what an implementation happens to
    spend (the conv skip counts its K taps per output, element-wise work counts nothing).
    ``head_rows``: rows the MLM head runs on (default: all B * N).
    """
    b, n = batch, length
    c, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    h, layers = config["num_attention_heads"], config["num_hidden_layers"]
    d, k = c // h, config.get("conv_kernel_size") or 0
    rows = b * n
    if attention == "exact":
        per_head = 2 * n * n * d * 2  # q k^T and p v
    else:
        m = num_landmarks or config["num_landmarks"]
        # Segment means of q and k: a reshape and mean (N D adds each) when M divides N,
        # else an (M, N) @ (N, D) product each, as attention.segment_means computes them.
        means = 2 * n * d if n % m == 0 else 2 * 2 * m * n * d
        per_head = (
            means
            + 2 * n * m * d + 2 * m * m * d + 2 * m * n * d  # the three kernels' scores
            + iterations * 4 * 2 * m**3  # pseudo-inverse: four M x M products per step
            + 2 * n * m * m + 2 * m * n * d + 2 * n * m * d  # (F Z) (R V)
        )
    head_rows = rows if head_rows is None else head_rows
    return {
        "qkv": layers * 2 * rows * c * 3 * c,
        "attention": layers * b * h * per_head,
        "conv": layers * 2 * b * h * n * k * d,
        "attention_output": layers * 2 * rows * c * c,
        "feed_forward": layers * 2 * 2 * rows * c * i,
        "head": 2 * head_rows * c * c + 2 * head_rows * c * v,
    }


def products(config: dict, batch: int, length: int, attention: str = "exact",
             num_landmarks: int | None = None, iterations: int = 6,
             head_rows: int | None = None):
    """A zero-argument callable running a forward's matrix products only, in order.

    The same shapes, layouts and batching as ``nystrom_np.model.forward`` (the products
    ``forward_flops`` counts) on random float32 arrays, back to back with nothing in
    between: the fused q/k/v product, the attention products of ``attention`` (exact: q k^T
    and p v; nystrom: the three kernels' scores, four M x M products per pseudo-inverse
    step, (F Z) (R V), and the segment means' (M, N) products when M does not divide N),
    the conv skip's banded (Toeplitz) product, the output, feed-forward and head products
    (the head on ``head_rows`` rows, default all B * N, as ``forward_flops``). Its time is
    what the forward would take if element-wise work cost nothing.
    """
    block = CONV_BLOCK
    rng = np.random.default_rng(0)
    b, n = batch, length
    c, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    h, k = config["num_attention_heads"], config.get("conv_kernel_size") or 0
    d, m = c // h, num_landmarks or config["num_landmarks"]
    f32 = np.float32

    def rand(*shape):
        return rng.standard_normal(shape, dtype=f32)

    x, mid, word = rand(b * n, c), rand(b * n, i), rand(v, c)
    # Weights of their own for every layer, as the model has: a short input is limited
    # by reading them from memory, which one shared set (held in cache) would hide.
    layers = [dict(qkv=rand(c, 3 * c), out=rand(c, c), up=rand(c, i), down=rand(i, c))
              for _ in range(config["num_hidden_layers"])]
    q, kk, vv = rand(b, n, 3, h, d).transpose(2, 0, 3, 1, 4)  # as the fused product gives
    n_blocks = -(-n // block)
    toeplitz, blocks = rand(h, 1, block, block + k - 1), rand(b, h, n_blocks, block + k - 1, d)
    if attention == "exact":
        scores = rand(b, h, n, n)

        def attend():
            q @ kk.swapaxes(-1, -2)  # (B, H, N, D) @ (B, H, D, N)
            scores @ vv  # (B, H, N, N) @ (B, H, N, D)
    else:
        q, kk = q.copy(), kk.copy()  # scale_qk's scaled copies are contiguous
        land, kernel, bk = rand(b, h, m, d), rand(b, h, m, m), rand(b, h, m, n)
        f, segment_weights = rand(b, h, n, m), rand(b, 1, m, n)

        def attend():
            if n % m:  # uneven segments: the means are (M, N) products
                segment_weights @ q  # (B, 1, M, N) @ (B, H, N, D)
                segment_weights @ kk
            land @ kk.swapaxes(-1, -2)  # R's scores, (B, H, M, D) @ (B, H, D, N)
            bv = bk @ vv  # (B, H, M, N) @ (B, H, N, D)
            land @ land.swapaxes(-1, -2)  # A's scores, (B, H, M, D) @ (B, H, D, M)
            for _ in range(iterations):  # the pseudo-inverse: four M x M products a step
                for _ in range(4):
                    kernel @ kernel
            q @ land.swapaxes(-1, -2)  # F's scores, (B, H, N, D) @ (B, H, D, M)
            (f @ kernel) @ bv  # (B, H, N, M) @ (B, H, M, M) @ (B, H, M, D)

    def run():
        for w in layers:
            x @ w["qkv"]  # (B*N, C) @ (C, 3C)
            attend()
            if k:
                toeplitz @ blocks  # (H, 1, blk, blk+K-1) @ (B, H, nb, blk+K-1, D)
            x @ w["out"]  # (B*N, C) @ (C, C)
            x @ w["up"]  # (B*N, C) @ (C, I)
            mid @ w["down"]  # (B*N, I) @ (I, C)
        x[:head_rows] @ layers[0]["out"]  # the head's transform, (rows, C) @ (C, C)
        x[:head_rows] @ word.T  # the decoder, (rows, C) @ (C, V)

    return run


# --------------------------------------------------------------- memory, in a fresh process


def proc_status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (Linux), or 0 where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Restart ``VmHWM`` from the current resident set (Linux >= 4.0); False if impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def release_free_memory():
    """Hand memory that was freed back to the system (glibc ``malloc_trim``), if possible.

    Building transformers' model from our weights frees a NumPy copy of them; without
    this, the allocator could keep those pages and reuse them during the forward, which
    would then look smaller than it is.
    """
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def memory_worker(spec: dict) -> dict:
    """In a fresh process: the peak memory of the forward that ``spec`` describes."""
    run, _model = build(spec)
    set_threads(spec["threads"])
    release_free_memory()
    baseline = proc_status("VmRSS")
    exact = reset_peak_rss()
    for _ in range(2):  # the first call and a warm one: the peak over both
        out = run()
        del out
        gc.collect()
    result = {"peak_mb": (proc_status("VmHWM") - baseline) / 2**20, "baseline_mb":
              baseline / 2**20, "exact": exact}
    if spec["side"] == "nystrom_np":
        tracemalloc.start()
        out = run()
        del out
        result["tracemalloc_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return result


def measure_memory(spec: dict) -> dict:
    """Peak memory of one forward (see ``memory_worker``), measured in a fresh process.

    ``spec``: {"side": "nystrom_np" | "transformers", "config": dict, "batch": B,
    "length": N, "options": forward options (ours), "threads": n, "seed": s}.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run(
        [sys.executable, __file__, "--memory-worker", json.dumps(spec)],
        capture_output=True, text=True, env=env, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"memory worker failed for {spec['side']}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------ command line


def arguments(description: str, repeats: int) -> argparse.ArgumentParser:
    """The options every benchmark takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=usable_cpus(),
                        help="threads for both libraries (default: the usable CPUs)")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny config and short inputs: a smoke test, not a measurement")
    return parser


def parse_cases(text: str) -> list:
    """``"1x128,8x128"`` -> [(1, 128), (8, 128)]: the (B, N) of ``--cases``."""
    cases = []
    for item in text.split(","):
        b, n = item.lower().split("x")
        cases.append((int(b), int(n)))
    return cases


def header(title: str, threads: int) -> dict:
    """Print a benchmark's title and the machine it runs on; return the machine's record."""
    info = machine(threads)
    print(title)
    print(describe_machine(info))
    print()
    return info


def json_line(benchmark: str, info: dict, args, rows: list, **extra) -> dict:
    """Print the closing JSON line (every figure of the run) and return it as a dict."""
    result = {"benchmark": benchmark, "machine": info, "repeats": args.repeats,
              "tiny": args.tiny, **extra, "results": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--memory-worker":
    print(json.dumps(memory_worker(json.loads(sys.argv[2]))))
