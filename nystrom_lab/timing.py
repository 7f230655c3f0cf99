"""Runtime and peak memory of attention methods and of the model, measured side by side.

Shapes: B batch, H heads, N tokens, D head size, M landmarks, C = H*D hidden size, L layers.

How things are measured (the book's runtime chapter and ``benchmarks/attention_scaling.py``
call these functions; the side-by-side benchmarks against PyTorch time with ``compare`` too,
through ``benchmarks/_common.py``, and print with ``table``):

- **Side by side.** ``compare`` runs several candidates (name -> zero-argument callable) in
  one process: a warm-up call of each, then ``repeats`` rounds in which every candidate runs
  once, in an order that rotates from round to round, so that a busy neighbour on a shared
  machine slows all of them alike. The figure is the median over the rounds; the minimum
  and maximum come with it. Each call's wall time and the process's CPU time are both
  recorded: with one BLAS thread the CPU time is close to the wall time of an idle
  machine, and it does not count the waits while other processes hold the cores (it still
  feels their competition for caches and memory bandwidth). On a GPU only the wall time
  means anything.
- **Peak memory.** The warm-up call of each candidate is traced: on the CPU by Python's
  ``tracemalloc`` (NumPy reports its array buffers to it; memory allocated before the call,
  such as the inputs, does not count, the output does), on a GPU by the bytes CuPy's memory
  pool has to reserve during the call, emptied of cached blocks first. Neither sees a BLAS
  library's private work buffers, a few MB at most. Allocation sizes do not depend on the
  machine's load, so the peaks are exact and repeatable where the times are not.
- **Threads.** ``blas_threads(n)`` limits NumPy's BLAS (OpenBLAS, MKL) and OpenMP pools to
  ``n`` threads with ``threadpoolctl``; ``machine_info`` records what was in effect.
- **GPU.** CuPy kernels run asynchronously: every timed call ends with a device
  synchronisation, so a time covers the work and not just its launch.

``attention_methods`` names the methods, ``attention_sweep`` and ``model_sweep`` measure
them over N and return plain lists of dicts (one per method and N); ``fit_slopes``,
``crossover`` and ``ratio`` summarise those rows. ``PAPER_TABLE1`` holds the published
figures to set next to ours.

References: Xiong et al. 2021 (Nystromformer, arXiv 2102.03902), Table 1, which measured the
attention module alone, inference, one instance, on an NVIDIA GTX 1080Ti.
"""

import contextlib
import dataclasses
import gc
import math
import os
import platform
import statistics
import sys
import time
import tracemalloc

import numpy as np

from nystrom_np.backend import get_xp, to_device
from nystrom_np.model import nystrom_attention, softmax_attention

from .approximations import (
    blocked_attention,
    linformer_attention,
    linformer_projections,
    performer_attention,
    performer_features,
    window_attention,
)

# Paper Table 1: memory (MB) and time (ms) of the attention module for one input instance
# at n = 512 ... 8192, on a GTX 1080Ti (Xiong et al. 2021).
PAPER_TABLE1 = {
    "Transformer": {512: (54, 0.8), 1024: (186, 2.4), 2048: (685, 10.0), 4096: (2620, 32.9),
                    8192: (10233, 155.4)},
    "Linformer-256": {512: (41, 0.7), 1024: (81, 1.3), 2048: (165, 2.7), 4096: (366, 5.3),
                      8192: (635, 11.3)},
    "Longformer-257": {512: (32.2, 2.4), 1024: (65, 4.6), 2048: (130, 9.2), 4096: (263, 18.5),
                       8192: (455, 36.2)},
    "Nystromformer-64": {512: (35, 0.7), 1024: (63, 1.3), 2048: (118, 2.7), 4096: (229, 5.9),
                         8192: (450, 12.3)},
    "Nystromformer-32": {512: (26, 0.6), 1024: (49, 1.2), 2048: (96, 2.6), 4096: (193, 5.6),
                         8192: (383, 11.5)},
}  # fmt: skip

MIB = 2**20


# ------------------------------------------------------------------------ machine, threads


@contextlib.contextmanager
def blas_threads(n):
    """Limit NumPy's BLAS and OpenMP thread pools to ``n`` threads inside the block.

    ``n = None`` leaves them as they are. Without ``threadpoolctl`` the limit cannot be set:
    a warning says so and the block runs with the libraries' own thread counts.
    """
    if n is None:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        print(
            "warning: threadpoolctl is not installed, so BLAS keeps its own thread count "
            "(pip install threadpoolctl, or set OMP_NUM_THREADS / OPENBLAS_NUM_THREADS).",
            file=sys.stderr,
        )
        yield
        return
    with threadpool_limits(limits=n):
        yield


def blas_thread_counts() -> list:
    """The BLAS / OpenMP libraries loaded in this process and their current thread counts."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [
        {"library": i["internal_api"], "version": i.get("version"), "threads": i["num_threads"]}
        for i in threadpool_info()
    ]


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask on Linux, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_info(device="cpu") -> dict:
    """What a measurement ran on: CPU, usable cores, load, NumPy, BLAS threads (and GPU)."""
    from .plotting import cpu_name, gpu_name

    info = {
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg")
        else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": blas_thread_counts(),
    }
    if device == "gpu":
        import cupy

        info.update(gpu=gpu_name(), cupy=cupy.__version__)
    return info


def describe_threads(info: dict) -> str:
    """``"OpenBLAS 0.3.29 with 1 thread"``-style text for a caption, from ``machine_info``."""
    parts = []
    for b in info["blas"]:
        name = f"{b['library']} {b['version']}" if b["version"] else b["library"]
        parts.append(f"{name} with {b['threads']} thread{'s' * (b['threads'] != 1)}")
    return ", ".join(parts) if parts else "BLAS threads unknown (threadpoolctl missing)"


def gpu_available() -> tuple:
    """(True, GPU name) when CuPy is installed and sees a GPU, else (False, the reason)."""
    try:
        import cupy
    except ImportError:
        return False, "CuPy is not installed"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CuPy's CUDARuntimeError, or a driver that does not load
        return False, f"CuPy cannot reach a GPU ({type(e).__name__})"
    if count == 0:
        return False, "CuPy sees no GPU"
    from .plotting import gpu_name

    return True, gpu_name()


# ----------------------------------------------------------------------- timing, memory


def synchronize(device):
    """Wait for the GPU to finish its queued work (nothing to wait for on the CPU): CuPy's,
    and PyTorch's too where the caller has imported it (``benchmarks/gpu.py`` times both)."""
    if device == "gpu":
        import cupy

        cupy.cuda.Device().synchronize()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.synchronize()


def peak_memory(fn, device="cpu"):
    """Bytes allocated at the peak of one call of ``fn()``, beyond what was held before.

    CPU: the peak of ``tracemalloc`` over the call (NumPy reports its buffers to it).
    GPU: the growth of CuPy's default memory pool, emptied of cached blocks first; the pool
    keeps every block it obtained, so its size after the call is its high-water mark (a few
    percent above the bytes in use, from rounding and reuse).

    Returns
    -------
    (peak_bytes, result of fn())
    """
    gc.collect()
    if device == "gpu":
        import cupy

        pool = cupy.get_default_memory_pool()
        synchronize(device)
        pool.free_all_blocks()
        before = pool.total_bytes()
        out = fn()
        synchronize(device)
        return pool.total_bytes() - before, out
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    out = fn()
    peak = tracemalloc.get_traced_memory()[1] - before
    if not was_tracing:
        tracemalloc.stop()
    return peak, out


def time_call(fn, device="cpu"):
    """Wall time and process CPU time of one call of ``fn()``, in seconds.

    The wall time runs until the work is done (on a GPU, until it has synchronised). The CPU
    time is what this process's threads spent computing, user and system: with one BLAS
    thread it is close to the wall time on an idle machine, and unlike the wall time it does
    not grow while other processes hold the cores.

    Returns
    -------
    (wall_seconds, cpu_seconds)
    """
    synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def compare(candidates: dict, repeats=5, device="cpu", memory=True, pause=0.0) -> dict:
    """Time (and trace the memory of) several callables side by side, alternating.

    A warm-up call of each candidate first (traced for its peak memory when ``memory``),
    then ``repeats`` rounds of one call each, in an order rotated every round.

    Parameters
    ----------
    candidates : name -> zero-argument callable
    repeats : timed rounds, at least 1
    device : ``"cpu"`` or ``"gpu"`` (synchronise after every call)
    memory : trace the warm-up call with ``peak_memory``
    pause : seconds to sleep before each timed call (lets other BLAS threads go idle)

    Returns
    -------
    name -> {"median_ms", "min_ms", "max_ms", "times_ms": [...] (wall time),
    "median_cpu_ms", "cpu_times_ms": [...] (process CPU time, see ``time_call``),
    "peak_mib" (with memory)}
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}.")
    names = list(candidates)
    result = {name: {} for name in names}
    for name in names:
        if memory:
            peak, out = peak_memory(candidates[name], device)
            result[name]["peak_mib"] = peak / MIB
        else:
            out = candidates[name]()
            synchronize(device)
        del out
    times = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            if pause:
                time.sleep(pause)
            times[name].append(time_call(candidates[name], device))
    for name in names:
        ms = [1e3 * wall for wall, _ in times[name]]
        cpu_ms = [1e3 * cpu for _, cpu in times[name]]
        result[name].update(
            median_ms=statistics.median(ms), min_ms=min(ms), max_ms=max(ms), times_ms=ms,
            median_cpu_ms=statistics.median(cpu_ms), cpu_times_ms=cpu_ms,
        )
    return result


# ---------------------------------------------------------------------- attention methods


def attention_methods(
    landmarks=(32, 64, 128), proj_dim=256, num_features=256, window=257, block=256,
    others=True,
) -> dict:
    """The attention methods to time: name -> fn(q, k, v) on (B, H, N, D) inputs.

    ``exact`` (softmax attention with its N x N matrix), ``nystrom-M`` for each M, and with
    ``others``: ``blocked-T`` (exact, in T x T tiles), ``linformer-P``, ``performer-R``,
    ``window-W`` (the paper's Table 1 has Linformer-256 and Longformer-257). Nystrom runs as
    in the paper: 6 iterations of the iterative pseudo-inverse, no padding mask.
    """
    methods = {"exact": softmax_attention}
    for m in landmarks:
        methods[f"nystrom-{m}"] = _nystrom(m)
    if others:
        methods[f"blocked-{block}"] = lambda q, k, v: blocked_attention(q, k, v, block=block)
        methods[f"linformer-{proj_dim}"] = _linformer(proj_dim)
        methods[f"performer-{num_features}"] = _performer(num_features)
        methods[f"window-{window}"] = lambda q, k, v: window_attention(q, k, v, width=window)
    return methods


def _nystrom(m):
    return lambda q, k, v: nystrom_attention(q, k, v, num_landmarks=m)


def _linformer(proj_dim):
    """Linformer with its random (P, N) projections drawn once per N, outside the timing (a
    trained Linformer holds them as weights)."""
    cache = {}

    def run(q, k, v):
        n = q.shape[-2]
        if n not in cache:
            xp = get_xp(q)
            e, f = linformer_projections(n, min(proj_dim, n))
            cache.clear()  # one N at a time: keep only the current projections
            cache[n] = xp.asarray(e, dtype=q.dtype), xp.asarray(f, dtype=q.dtype)
        return linformer_attention(q, k, v, projections=cache[n])

    return run


def _performer(num_features):
    """Performer with its (R, D) random features drawn once per D, outside the timing."""
    cache = {}

    def run(q, k, v):
        d = q.shape[-1]
        if d not in cache:
            cache[d] = performer_features(num_features, d)
        return performer_attention(q, k, v, features=cache[d])

    return run


def attention_inputs(n, batch=1, heads=12, head_size=64, dtype=np.float32, seed=0,
                     device="cpu"):
    """Random unscaled q, k, v, each (B, H, N, D), standard normal, on ``device``.

    The values do not change the cost of any method here, only their sizes do.
    """
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((3, batch, heads, n, head_size), dtype=np.float32).astype(dtype)
    qkv = to_device(qkv, device)
    return qkv[0], qkv[1], qkv[2]


def _methods_at(methods, n, max_length):
    """The methods to run at length ``n``: those whose budget fits and under their cap."""
    chosen = {}
    for name, fn in methods.items():
        budget = name.rsplit("-", 1)[-1]
        if name.startswith(("nystrom-", "window-")) and int(budget) > n:  # need M, W <= N
            continue
        cap = (max_length or {}).get(name, (max_length or {}).get("*"))
        if cap is not None and n > cap:
            continue
        chosen[name] = fn
    return chosen


def attention_sweep(
    lengths, methods=None, max_length=None, repeats=3, batch=1, heads=12, head_size=64,
    dtype=np.float32, device="cpu", threads=None, progress=True, pause=0.0,
) -> list:
    """Median time and peak memory of each attention method at each N, side by side.

    At each N the methods that apply run alternately on the same random inputs (see
    ``compare``): one traced warm-up call each, then ``repeats`` timed rounds.

    Parameters
    ----------
    lengths : the N to measure
    methods : name -> fn(q, k, v) (default ``attention_methods()``)
    max_length : name -> largest N to run that method at (``"*"``: every other method);
        e.g. ``{"exact": 4096, "blocked-256": 4096}``. A Nystrom method also skips N < M.
    repeats : timed rounds per N
    batch, heads, head_size, dtype : B, H, D and the dtype of q, k, v
    device : ``"cpu"`` or ``"gpu"`` (CuPy)
    threads : BLAS threads on the CPU (None: leave as is)
    progress : show a tqdm progress bar (when tqdm is installed)
    pause : seconds of rest before each timed call

    Returns
    -------
    list of dicts, one per (method, N): {"method", "n", "median_ms", "min_ms", "max_ms",
    "times_ms", "median_cpu_ms", "cpu_times_ms", "peak_mib", "device", "batch", "heads",
    "head_size", "dtype"} (times in ms: wall and process CPU time, see ``time_call``)
    """
    methods = attention_methods() if methods is None else methods
    rows = []
    bar = progress_bar(lengths, progress, f"attention ({device})")
    with blas_threads(threads if device == "cpu" else None):
        for n in bar:
            q, k, v = attention_inputs(n, batch, heads, head_size, dtype, device=device)
            chosen = _methods_at(methods, n, max_length)
            calls = {name: _bind(fn, q, k, v) for name, fn in chosen.items()}
            measured = compare(calls, repeats, device, memory=True, pause=pause)
            for name, figures in measured.items():
                rows.append(dict(method=name, n=int(n), device=device, batch=batch, heads=heads,
                                 head_size=head_size, dtype=np.dtype(dtype).name, **figures))
            del q, k, v, calls
    return rows


def _bind(fn, *args, **kwargs):
    return lambda: fn(*args, **kwargs)


def progress_bar(items, show, description):
    """``items`` wrapped in a tqdm progress bar when asked (and tqdm is installed)."""
    if not show:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=description, leave=False)


# ---------------------------------------------------------------------------- the model


def model_sweep(
    lengths, num_layers=12, landmarks=64, repeats=2, batch=1, dtype=np.float32, device="cpu",
    threads=None, progress=True, seed=0, pause=0.0, config=None, with_attention=False,
) -> list:
    """The base model (``encode``) in ``exact`` vs ``nystrom`` attention, over N.

    A seeded **random** model of the checkpoint's config with ``num_layers`` layers and
    ``max_position_embeddings`` raised to 4096 (like the ``nystromformer-4096`` sibling
    checkpoint) or to the largest N: timing and memory depend on the shapes, not on the
    weights' values. The MLM head is left out (its N x V logits would cost more than
    attention); the conv skip runs in both modes, as in the model. Each mode gets one
    traced warm-up call and ``repeats`` timed rounds, alternating (see ``compare``).

    Parameters
    ----------
    lengths : the N to measure
    num_layers : L
    landmarks : M of the ``nystrom`` mode
    config : a ``Config`` to start from instead of the checkpoint's (e.g. a small one for
        tests); its layer count and position table are replaced as above
    with_attention : also time the attention module alone (``"exact:attention"``,
        ``"nystrom-M:attention"``, on random q, k, v of one layer's shapes) in the same
        alternating rounds, so that its share of the model's time is measured side by side
    other parameters : as ``attention_sweep``

    Returns
    -------
    list of dicts, one per (method, N): {"method": "exact" | "nystrom-M" (and the two
    ``":attention"`` ones), "n", "median_ms", ..., "peak_mib", "layers", "device"}
    """
    from nystrom_np.config import Config
    from nystrom_np.model import encode
    from nystrom_np.weights import random_model

    config = dataclasses.replace(
        Config() if config is None else config,
        num_hidden_layers=num_layers,
        max_position_embeddings=max(4096, max(lengths)),
    )
    model = random_model(config, seed=seed, dtype=dtype, head=False)
    if device == "gpu":
        model = model.to("gpu")
    xp = model.xp
    rng = np.random.default_rng(seed)
    rows = []
    with blas_threads(threads if device == "cpu" else None):
        for n in progress_bar(lengths, progress, f"model ({device})"):
            ids = xp.asarray(rng.integers(5, config.vocab_size, (batch, n)))
            calls = {
                "exact": _bind(encode, model, ids, attention="exact"),
                f"nystrom-{landmarks}": _bind(encode, model, ids, attention="nystrom",
                                              num_landmarks=landmarks),
            }
            if with_attention:
                q, k, v = attention_inputs(n, batch, config.num_attention_heads,
                                           config.head_size, dtype, seed, device)
                calls["exact:attention"] = _bind(softmax_attention, q, k, v)
                calls[f"nystrom-{landmarks}:attention"] = _bind(
                    nystrom_attention, q, k, v, num_landmarks=landmarks)
            measured = compare(calls, repeats, device, memory=True, pause=pause)
            for name, figures in measured.items():
                rows.append(dict(method=name, n=int(n), device=device, batch=batch,
                                 layers=num_layers, dtype=np.dtype(dtype).name, **figures))
    return rows


# ------------------------------------------------------------------------ summaries


def series(rows, method, key="median_ms"):
    """(N, values) of one method, sorted by N, as two float arrays."""
    pairs = sorted((r["n"], r[key]) for r in rows if r["method"] == method)
    if not pairs:
        return np.array([]), np.array([])
    n, values = zip(*pairs, strict=True)
    return np.array(n, dtype=float), np.array(values, dtype=float)


def fit_slopes(rows, key="median_ms", min_length=1024) -> dict:
    """method -> slope of log(key) against log(N) over N >= ``min_length`` (None if < 2 N)."""
    from .plotting import fit_power_law

    slopes = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        n, values = series(rows, method, key)
        big = n >= min_length
        slopes[method] = fit_power_law(n[big], values[big])[0] if big.sum() >= 2 else None
    return slopes


def ratio(rows, numerator, denominator, n, key="median_ms"):
    """``key`` of ``numerator`` over that of ``denominator`` at length ``n`` (None if absent)."""
    values = {r["method"]: r[key] for r in rows if r["n"] == n}
    if numerator not in values or denominator not in values:
        return None
    return values[numerator] / values[denominator]


def crossover(rows, slow="exact", fast="nystrom-64", key="median_ms"):
    """The N at which ``fast`` overtakes ``slow`` in ``rows``: ``crossover_point`` of the
    two methods' series at the N both were measured at, or (None, "none") without any."""
    n_slow, v_slow = series(rows, slow, key)
    n_fast, v_fast = series(rows, fast, key)
    common = np.intersect1d(n_slow, n_fast)
    if common.size == 0:
        return None, "none"
    return crossover_point(common, v_slow[np.isin(n_slow, common)],
                           v_fast[np.isin(n_fast, common)])


def crossover_point(n, slow, fast):
    """The N at which the costs ``fast`` overtake ``slow`` (arrays over increasing ``n``).

    Interpolated on log-log axes between the two N around the last sign change of
    log(slow / fast). Returns (N, where) with where ``"between"`` (N interpolated),
    ``"below"`` (``fast`` is ahead at every N: N is the smallest) or ``"above"`` (``fast`` is
    never ahead at the largest N: N is the largest).
    """
    n, log_r = np.asarray(n, dtype=float), np.log(np.asarray(slow) / np.asarray(fast))
    ahead = log_r > 0
    if ahead.all():
        return float(n[0]), "below"
    if not ahead[-1]:
        return float(n[-1]), "above"
    i = int(np.flatnonzero(~ahead)[-1])  # last N where fast is not ahead; fast leads after it
    x0, x1 = np.log(n[i]), np.log(n[i + 1])
    t = log_r[i] / (log_r[i] - log_r[i + 1])  # where the line through the two points hits 0
    return float(math.exp(x0 + t * (x1 - x0))), "between"


def paper_ratios(slow="Transformer", fast="Nystromformer-64") -> dict:
    """n -> (memory ratio, time ratio) of two rows of the paper's Table 1."""
    a, b = PAPER_TABLE1[slow], PAPER_TABLE1[fast]
    return {n: (a[n][0] / b[n][0], a[n][1] / b[n][1]) for n in a if n in b}


def pivot(rows, key="median_ms"):
    """The rows as a grid: (lengths, methods, values) with values[i, j] = ``key`` of method j at
    length i (NaN where it was not run); methods in their order of first appearance."""
    lengths = sorted({r["n"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    values = np.full((len(lengths), len(methods)), np.nan)
    for r in rows:
        values[lengths.index(r["n"]), methods.index(r["method"])] = r[key]
    return lengths, methods, values


def table(rows, columns) -> str:
    """A plain-text table of ``rows`` (dicts); ``columns`` is a list of (header, key, format)."""
    cells = [[h for h, _, _ in columns]]
    for row in rows:
        cells.append(["-" if row.get(key) is None else fmt.format(row[key])
                      for _, key, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

