"""nystrom_np on a GPU (CuPy) next to transformers' PyTorch on the same GPU (CUDA).

Two measurements, each printed as a table; every figure is gathered in one JSON line at
the end (``json.loads`` of the last line):

1. **Forward.** Masked-LM logits of a seeded random model of the real config
   (``uw-madison/nystromformer-512``: 12 layers, C = 768, V = 30000), float32, N = 510,
   B = 1 and B = 32: ``nystrom_np.forward`` on CuPy arrays against transformers'
   ``NystromformerForMaskedLM`` with the same weights on CUDA, in ``torch.inference_mode``.
   Both run what transformers runs for this checkpoint: exact attention plus the conv skip.
   The largest difference of their logits is printed, to show both computed the same thing.
2. **Attention module.** ``softmax_attention`` (exact: an N x N score matrix per head)
   against ``nystrom_attention`` (M = 64 landmarks, 6 iterations of the iterative
   pseudo-inverse, no mask) on one instance, H = 12, D = 64, float32, N = 512 ... 65536:
   the setting of the paper's Table 1 (measured on a GTX 1080Ti). Where exact attention runs
   out of device memory its row says "OOM".

How:

- Time: the book's own harness, ``nystrom_lab.timing.compare`` with ``device="gpu"``: the
  wall time of each call from an idle device until CuPy's and PyTorch's queued work is done
  (``timing.synchronize``), so a figure covers the work and not only its launch. A warm-up
  call first (CuPy compiles its kernels on first use), then ``--repeats`` rounds in which
  the candidates alternate, in an order rotated every round; the median over the rounds is
  reported, with the minimum and maximum.
- Memory: the growth of a memory pool over one call (weights and inputs excluded, the
  output included). CuPy: ``timing.peak_memory(fn, "gpu")``, its default pool emptied of
  cached blocks first; PyTorch: ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``. Neither counts cuBLAS's own workspace.
- TF32 is off on both sides (float32 matrix products in full precision), as by default.

Targets (issue 8): forward within 1.2x of PyTorch's time, at B = 1 and at B = 32; Nystrom at
N = 8192 beating the paper's ratios over exact attention, 12.7x in time and 22.8x in memory.
Each is printed as PASS or MISS; missing a target is a result, not an error (exit status 0).

Usage: ``python benchmarks/gpu.py [--repeats 20] [--max-length 65536] [--landmarks 64]
[--batches 1,32] [--no-torch] [--tiny]`` (``--tiny``: a 2-layer model, to check in seconds
that the script runs). Where no GPU is usable it exits with status 2 and one line that says what
is missing (CuPy, a device, the driver, CUDA libraries). The PyTorch side needs torch's CUDA
build (on Linux the PyPI wheel of torch 2.13.0 is the CUDA 13.0 build) and transformers;
without them the forward comparison is skipped and the output says why.
"""

import argparse
import functools
import json
import os
import platform
import sys

import numpy as np

from nystrom_lab import timing
from nystrom_np import Config, forward, nystrom_attention, random_model, softmax_attention
from nystrom_np import to_state_dict as nystrom_state_dict
from nystrom_np.backend import cupy_or_raise

MIB = 2**20
N_FORWARD = 510  # the checkpoint's longest input
PAPER_N = 8192  # Table 1 of the paper at n = 8192: exact 155.4 ms / 10233 MB,
PAPER_RATIOS = {"time": 12.7, "memory": 22.8}  # Nystrom-64 12.3 ms / 450 MB
FORWARD_TARGET = 1.2  # nystrom_np's time over PyTorch's
# --tiny: a small config and short inputs, to check that the script runs, in seconds.
TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=64, conv_kernel_size=5)


def main(argv=None):
    args = parse_args(argv)
    try:
        cp = cupy_or_raise()
    except RuntimeError as e:
        print(f"benchmarks/gpu.py needs a GPU: {e}", file=sys.stderr)
        return 2
    torch, no_torch = (None, "--no-torch was given") if args.no_torch else cuda_torch()
    if os.environ.get("CUPY_TF32", "0") != "0":
        print("warning: CUPY_TF32 is set: CuPy's float32 products use TF32.", file=sys.stderr)
    if torch is not None:
        torch.backends.cuda.matmul.allow_tf32 = False  # the default, said explicitly

    info = machine(cp, torch)
    print(f"== nystrom_np on {info['gpu']} (CuPy {info['cupy']}, CUDA runtime "
          f"{info['cuda_runtime']}, driver {info['cuda_driver']}), float32")
    if torch is not None:
        print(f"   next to torch {info['torch']} (CUDA {info['torch_cuda']}), "
              f"transformers {info['transformers']}")
    else:
        print(f"   PyTorch side skipped: {no_torch}")

    config, n = (Config(**TINY), 64) if args.tiny else (Config(), N_FORWARD)
    forward_rows = forward_benchmark(cp, torch, config, n, args.batches, args.repeats)
    report_forward(forward_rows, args.repeats)
    attention_rows = attention_benchmark(cp, lengths(args.max_length), args.landmarks,
                                         args.repeats)
    report_attention(attention_rows, args.landmarks, args.repeats)
    targets = check_targets(forward_rows, attention_rows)
    report_targets(targets)
    print(json.dumps({"benchmark": "gpu", "machine": info, "repeats": args.repeats,
                      "forward": forward_rows, "attention": attention_rows,
                      "landmarks": args.landmarks, "targets": targets}))
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds (default 20)")
    parser.add_argument("--max-length", type=int, default=65536,
                        help="largest N of the attention sweep (512, 1024, ... up to it)")
    parser.add_argument("--landmarks", type=int, default=64, help="M of Nystrom attention")
    parser.add_argument("--batches", default="1,32", help="forward batch sizes (default 1,32)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch side")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke test: a 2-layer config, N = 64, attention up to N = 1024")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.tiny:
        args.max_length, args.landmarks = min(args.max_length, 1024), min(args.landmarks, 16)
    if args.repeats < 1 or args.max_length < 512 or min(args.batches) < 1:
        parser.error("--repeats and --batches must be positive, --max-length at least 512.")
    return args


def lengths(max_length):
    n, out = 512, []
    while n <= max_length:
        out.append(n)
        n *= 2
    return out


def cuda_torch():
    """(torch, None) when torch can run on the GPU and transformers is there, else
    (None, why not)."""
    try:
        import torch
    except ImportError:
        return None, "torch is not installed (pip install '.[test]')"
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
        return None, (
            f"torch {torch.__version__} ({build}) cannot use the GPU; install its CUDA build: "
            "on Linux, torch==2.13.0 from PyPI is the CUDA 13.0 build (for a CUDA 12 driver, "
            "a cu12x index of download.pytorch.org)"
        )
    try:
        import transformers  # noqa: F401
    except ImportError:
        return None, "transformers is not installed (pip install '.[test]')"
    return torch, None


def machine(cp, torch):
    device = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(device.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])

    def version(v):  # CUDA's 12040 -> "12.4"
        return f"{v // 1000}.{v % 1000 // 10}"

    info = {
        "gpu": name,
        "gpu_memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
        "cupy": cp.__version__,
        "cuda_runtime": version(cp.cuda.runtime.runtimeGetVersion()),
        "cuda_driver": version(cp.cuda.runtime.driverGetVersion()),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    if torch is not None:
        import transformers

        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                    transformers=transformers.__version__)
    return info


# ------------------------------------------------------------------------ time, memory


def torch_peak_mib(torch, fn):
    """Peak bytes torch allocated during fn() beyond those allocated before, in MiB."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak / MIB


# ------------------------------------------------------------------------------ forward


def hf_model(model, torch):
    """transformers' NystromformerForMaskedLM with ``model``'s weights, on the GPU, eval."""
    import contextlib

    import transformers

    try:
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # another transformers release: initialise, then overwrite
        no_init_weights = contextlib.nullcontext
    fields = {k: v for k, v in model.config.to_dict().items() if k != "model_type"}
    with no_init_weights():  # the weights are ours: skip the random initialisation
        hf = transformers.NystromformerForMaskedLM(transformers.NystromformerConfig(**fields))
    state = {k: torch.from_numpy(v) for k, v in nystrom_state_dict(model).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or any("decoder" not in k and "_ids" not in k for k in missing):
        raise RuntimeError(f"weights do not fit transformers' model: {missing}, {unexpected}")
    hf.tie_weights()  # the decoder shares the word embeddings and the bias
    return hf.eval().to("cuda")


def hf_logits(torch, hf, ids):
    with torch.inference_mode():
        return hf(input_ids=ids).logits


def forward_benchmark(cp, torch, config, n, batches, repeats):
    model = random_model(config, seed=0)  # float32
    gpu_model = model.to("gpu")
    hf = hf_model(model, torch) if torch is not None else None
    del model
    rows = []
    for b in batches:
        ids = np.random.default_rng(b).integers(5, config.vocab_size, (b, n))
        ours = functools.partial(forward, gpu_model, cp.asarray(ids))
        peak, logits = timing.peak_memory(ours, "gpu")
        row = {"batch": b, "n": n, "layers": config.num_hidden_layers,
               "hidden_size": config.hidden_size, "nystrom_np_peak_mib": peak / MIB}
        candidates = {"nystrom_np": ours}
        if hf is not None:
            theirs = functools.partial(hf_logits, torch, hf, torch.from_numpy(ids).to("cuda"))
            row["torch_peak_mib"] = torch_peak_mib(torch, theirs)
            reference = cp.from_dlpack(theirs().contiguous())  # zero-copy view on the device
            row["max_abs_logit_diff"] = float(cp.abs(logits - reference).max())
            del reference
            candidates["torch"] = theirs
        del logits
        for name, figures in timing.compare(candidates, repeats, "gpu", memory=False).items():
            row.update({f"{name}_{k}": v for k, v in figures.items()})
        if hf is not None:
            row["ratio"] = row["nystrom_np_median_ms"] / row["torch_median_ms"]
        rows.append(row)
    return rows


def report_forward(rows, repeats):
    r = rows[0]
    print(f"\nForward: {r['layers']} layers, C {r['hidden_size']}, random weights, N = "
          f"{r['n']}; median of {repeats} (min-max) ms; peak memory beyond weights and input")
    print(f"{'B':>4}  {'nystrom_np ms':>22}  {'torch ms':>22}  {'ratio':>6}  "
          f"{'np MiB':>8}  {'torch MiB':>9}  {'max|dlogit|':>11}")
    for r in rows:
        theirs = _ms(r, "torch") if "torch_median_ms" in r else "-"
        print(f"{r['batch']:>4}  {_ms(r, 'nystrom_np'):>22}  {theirs:>22}  "
              f"{_num(r.get('ratio'), '.2f'):>6}  {r['nystrom_np_peak_mib']:>8.0f}  "
              f"{_num(r.get('torch_peak_mib'), '.0f'):>9}  "
              f"{_num(r.get('max_abs_logit_diff'), '.1e'):>11}")


# -------------------------------------------------------------------- attention module


def attention_benchmark(cp, ns, landmarks, repeats, heads=12, head_size=64):
    methods = {
        "exact": softmax_attention,
        "nystrom": lambda q, k, v: nystrom_attention(q, k, v, num_landmarks=landmarks),
    }
    pool = cp.get_default_memory_pool()
    rows = []
    for n in ns:
        rng = cp.random.default_rng(n)
        q, k, v = rng.standard_normal((3, 1, heads, n, head_size), dtype=cp.float32)
        row = {"n": n}
        candidates = {}
        for name, fn in methods.items():
            try:
                peak, out = timing.peak_memory(functools.partial(fn, q, k, v), "gpu")
                del out
                row[f"{name}_peak_mib"] = peak / MIB
                candidates[name] = functools.partial(fn, q, k, v)
            except MemoryError:  # cupy.cuda.memory.OutOfMemoryError
                row[f"{name}_peak_mib"] = row[f"{name}_median_ms"] = "OOM"
            pool.free_all_blocks()
        try:
            for name, figures in timing.compare(candidates, repeats, "gpu", memory=False).items():
                row.update({f"{name}_{k}": v for k, v in figures.items()})
        except MemoryError:  # the alternation needs both outputs' memory at once at most
            for name in candidates:
                row[f"{name}_median_ms"] = "OOM"
        for what, unit in (("time", "median_ms"), ("memory", "peak_mib")):
            exact, nystrom = row.get(f"exact_{unit}"), row.get(f"nystrom_{unit}")
            if isinstance(exact, float) and isinstance(nystrom, float) and nystrom > 0:
                row[f"{what}_ratio"] = exact / nystrom
        rows.append(row)
        del q, k, v, candidates
        pool.free_all_blocks()
    return rows


def report_attention(rows, landmarks, repeats):
    print(f"\nAttention module: B = 1, H = 12, D = 64, float32, no mask; exact vs Nystrom "
          f"(M = {landmarks}, 6 pinv iterations); median of {repeats}; peak memory beyond the "
          "inputs")
    print(f"{'N':>6}  {'exact ms':>10}  {'exact MiB':>10}  {'nystrom ms':>10}  "
          f"{'nystrom MiB':>11}  {'time x':>7}  {'memory x':>8}")
    for r in rows:
        print(f"{r['n']:>6}  {_num(r.get('exact_median_ms'), '.3f'):>10}  "
              f"{_num(r.get('exact_peak_mib'), '.1f'):>10}  "
              f"{_num(r.get('nystrom_median_ms'), '.3f'):>10}  "
              f"{_num(r.get('nystrom_peak_mib'), '.1f'):>11}  "
              f"{_num(r.get('time_ratio'), '.1f'):>7}  {_num(r.get('memory_ratio'), '.1f'):>8}")


# ------------------------------------------------------------------------------ targets


def check_targets(forward_rows, attention_rows):
    targets = []
    for r in forward_rows:
        target = {"name": f"forward B={r['batch']}: nystrom_np / torch time <= {FORWARD_TARGET}"}
        if "ratio" in r:
            target.update(value=r["ratio"], passed=r["ratio"] <= FORWARD_TARGET)
        else:
            target.update(value=None, passed=None, why="PyTorch side skipped, see above")
        targets.append(target)
    at_n = next((r for r in attention_rows if r["n"] == PAPER_N), {})
    for what, paper in PAPER_RATIOS.items():
        target = {"name": f"Nystrom at N={PAPER_N}: exact / nystrom {what} > {paper} (paper)"}
        value = at_n.get(f"{what}_ratio")
        if value is None:
            target.update(value=None, passed=None,
                          why=f"no ratio at N = {PAPER_N}: beyond --max-length, or out of memory")
        else:
            target.update(value=value, passed=value > paper)
        targets.append(target)
    return targets


def report_targets(targets):
    print("\nTargets (issue 8)")
    for t in targets:
        verdict = {True: "PASS", False: "MISS", None: "NOT MEASURED"}[t["passed"]]
        value = "" if t["value"] is None else f": {t['value']:.2f}"
        why = f" ({t['why']})" if t.get("why") else ""
        print(f"  {verdict:<12} {t['name']}{value}{why}")


def _ms(row, name):
    return (f"{row[f'{name}_median_ms']:.2f} ({row[f'{name}_min_ms']:.2f}-"
            f"{row[f'{name}_max_ms']:.2f})")


def _num(value, spec):
    if value is None:
        return "-"
    return value if isinstance(value, str) else format(value, spec)


if __name__ == "__main__":
    sys.exit(main())
