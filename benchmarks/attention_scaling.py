"""Attention runtime and peak memory against N: exact vs Nystrom vs the other methods.

What is measured (functions of ``nystrom_lab.timing``):

1. The attention module alone, as the paper's Table 1 (Xiong et al. 2021): one instance
   (B = 1), H = 12 heads of D = 64 (the checkpoint's), float32, inference, on random q, k,
   v. Methods: exact softmax attention, Nystrom with M = 32, 64, 128 landmarks, and (unless
   ``--no-others``) blocked exact attention (online softmax, T = 256), Linformer (P = 256),
   Performer (R = 256) and a sliding window (W = 257). At each N the methods run side by
   side, alternating, on the same inputs: a warm-up call each (traced for peak memory:
   ``tracemalloc`` on the CPU, CuPy's pool on a GPU), then ``--repeats`` timed rounds;
   the figure is the median, of the wall time or (``--clock cpu``) of the process's CPU
   time, steadier on a shared machine. The quadratic methods (exact, blocked) stop at
   ``--max-quadratic``. The model runs time one layer's attention module alone in the
   same rounds, to give its share of the model's time.
2. The same on the GPU through CuPy, when CuPy sees one (else a line says it was skipped).
3. The base model (``encode``, no MLM head) in ``exact`` vs ``nystrom`` mode (M = 64) at
   long N: a **random** model of the checkpoint's config with ``max_position_embeddings``
   raised to 4096 like the ``nystromformer-4096`` sibling (timings depend on shapes, not on
   weight values), ``--model-layers`` layers.

Printed: a time table and a memory table (N x method), fitted log-log slopes (N >= 1024),
the N where Nystrom-64 overtakes exact attention, the exact / Nystrom-64 ratios at
N = 4096 and 8192 next to the paper's Table 1 ratios, the model table, then one JSON line
with every figure (``json.loads`` of the last line).

Usage: ``python benchmarks/attention_scaling.py [--threads 2] [--repeats 5]
[--lengths 256,512,...,16384] [--max-quadratic 8192] [--device cpu|gpu|all] [--clock wall|cpu]
[--no-model]``.
The full default run takes tens of minutes on a 2-core CPU (exact attention at N = 8192
holds a 3 GiB score array); ``--tiny`` is a smoke test of every code path in seconds.
"""

import argparse
import json
import sys

import numpy as np

from nystrom_lab import timing

LENGTHS = "256,512,1024,2048,4096,8192,16384"
MODEL_LENGTHS = "1024,2048,4096"
REFERENCE_N = (4096, 8192)  # where the paper's ratios are compared


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default=LENGTHS, help=f"N to measure (default {LENGTHS})")
    parser.add_argument("--max-quadratic", type=int, default=8192,
                        help="largest N for exact and blocked attention (default 8192)")
    parser.add_argument("--landmarks", default="32,64,128", help="Nystrom's M (default 32,64,128)")
    parser.add_argument("--heads", type=int, default=12, help="H (default 12)")
    parser.add_argument("--head-size", type=int, default=64, help="D (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--threads", type=int, default=timing.usable_cpus(),
                        help="BLAS threads on the CPU (default: the usable CPUs)")
    parser.add_argument("--device", choices=("cpu", "gpu", "all"), default="all",
                        help="cpu, gpu, or all: the CPU and the GPU when CuPy sees one "
                             "(default all)")
    parser.add_argument("--no-others", action="store_true",
                        help="only exact and Nystrom (skip blocked, Linformer, Performer, window)")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model runs")
    parser.add_argument("--model-lengths", default=MODEL_LENGTHS,
                        help=f"N for the model runs (default {MODEL_LENGTHS})")
    parser.add_argument("--model-layers", type=int, default=12, help="layers (default 12)")
    parser.add_argument("--model-repeats", type=int, default=2, help="timed rounds (default 2)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time for the tables and summaries: wall time, or the process's "
                             "CPU time (steadier on a shared machine; equals the wall time of "
                             "an idle one only with --threads 1). The JSON has both. "
                             "(default wall)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny sizes: a smoke test of every code path, not a measurement")
    return parser


def main(argv=None) -> dict:
    args = arguments().parse_args(argv)
    lengths = _ints(args.lengths)
    landmarks = _ints(args.landmarks)
    model_lengths = _ints(args.model_lengths)
    heads, head_size = args.heads, args.head_size
    repeats, model_repeats, layers = args.repeats, args.model_repeats, args.model_layers
    if args.tiny:
        lengths, landmarks, model_lengths = [64, 128], [8, 16], [64]
        heads, head_size, repeats, model_repeats, layers = 2, 16, 1, 1, 1
    devices = ["cpu"] if args.device in ("cpu", "all") else []
    gpu, gpu_why = timing.gpu_available()
    if args.device in ("gpu", "all"):
        if gpu:
            devices.append("gpu")
        elif args.device == "gpu":
            sys.exit(f"--device gpu: no GPU to run on ({gpu_why}).")
        else:
            print(f"GPU runs skipped: {gpu_why}.")

    methods = timing.attention_methods(
        landmarks, others=not args.no_others, **(_tiny_budgets() if args.tiny else {})
    )
    quadratic = [m for m in methods if m == "exact" or m.startswith("blocked-")]
    caps = {m: args.max_quadratic for m in quadratic}
    fast = f"nystrom-{64 if 64 in landmarks else landmarks[0]}"
    result = {"benchmark": "attention_scaling", "tiny": args.tiny, "repeats": repeats,
              "batch": 1, "heads": heads, "head_size": head_size, "dtype": "float32",
              "paper_table1": {k: {str(n): v for n, v in t.items()}
                               for k, t in timing.PAPER_TABLE1.items()},
              "devices": {}}
    for device in devices:
        threads = args.threads if device == "cpu" else None
        rows = timing.attention_sweep(
            lengths, methods, caps, repeats, heads=heads, head_size=head_size, device=device,
            threads=threads, progress=not args.no_progress,
        )
        with timing.blas_threads(threads):
            info = timing.machine_info(device)
        time_key = "median_cpu_ms" if args.clock == "cpu" and device == "cpu" else "median_ms"
        summary = summarise(rows, fast, min(lengths) if args.tiny else 1024, time_key)
        model_rows = []
        if not args.no_model:
            model_rows = timing.model_sweep(
                model_lengths, layers, 64 if not args.tiny else 16, model_repeats,
                device=device, threads=threads, progress=not args.no_progress,
                config=_tiny_config() if args.tiny else None, with_attention=True,
            )
        report(device, info, rows, summary, model_rows, repeats, heads, head_size, layers)
        result["devices"][device] = {"machine": info, "attention": rows, "summary": summary,
                                     "model": model_rows, "model_layers": layers}
    print(json.dumps(result))
    return result


def summarise(rows, fast, min_length=1024, time_key="median_ms") -> dict:
    """Slopes, crossovers and the ratios at the paper's N, as one dict."""
    n_cross, where = timing.crossover(rows, "exact", fast, time_key)
    n_cross_mem, where_mem = timing.crossover(rows, "exact", fast, key="peak_mib")
    ratios = {}
    for n in REFERENCE_N:
        paper_memory, paper_time = timing.paper_ratios().get(n, (None, None))
        ratios[str(n)] = {
            "time": timing.ratio(rows, "exact", fast, n, time_key),
            "memory": timing.ratio(rows, "exact", fast, n, "peak_mib"),
            "paper_time": paper_time if fast == "nystrom-64" else None,
            "paper_memory": paper_memory if fast == "nystrom-64" else None,
        }
    return {
        "fast": fast,
        "min_length": min_length,
        "time_key": time_key,
        "time_slopes": timing.fit_slopes(rows, time_key, min_length),
        "memory_slopes": timing.fit_slopes(rows, "peak_mib", min_length),
        "crossover_time": {"n": n_cross, "where": where},
        "crossover_memory": {"n": n_cross_mem, "where": where_mem},
        "ratios": ratios,
    }


def report(device, info, rows, summary, model_rows, repeats, heads, head_size, layers):
    fast, time_key = summary["fast"], summary["time_key"]
    clock = "CPU time" if time_key == "median_cpu_ms" else "wall time"
    what = info.get("gpu") if device == "gpu" else (
        f"{info['cpu']}, {timing.describe_threads(info)}; load average {info['load_average']}")
    print(f"\n== Attention module on the {device.upper()}: B = 1, H = {heads}, D = {head_size}, "
          f"float32, random q, k, v; {clock}, median of {repeats} alternating rounds")
    print(what)
    for key, label, fmt in ((time_key, f"{clock} (ms)", "{:.1f}"),
                            ("peak_mib", "peak memory (MiB)", "{:.1f}")):
        lengths, methods, values = timing.pivot(rows, key)
        grid = [{"n": n, **{m: None if np.isnan(v) else v
                            for m, v in zip(methods, values[i], strict=True)}}
                for i, n in enumerate(lengths)]
        print(f"\n{label}")
        print(timing.table(grid, [("N", "n", "{}")] + [(m, m, fmt) for m in methods]))
    slopes = summary["time_slopes"]
    mem_slopes = summary["memory_slopes"]
    print(f"\nlog-log slopes (N >= {summary['min_length']}), time / memory: " + ", ".join(
        f"{m} {_fmt(slopes[m])} / {_fmt(mem_slopes[m])}" for m in slopes))
    cross = summary["crossover_time"]
    print(f"{fast} is faster than exact attention {_where(cross)}; "
          f"leaner {_where(summary['crossover_memory'])}")
    for n, r in summary["ratios"].items():
        print(f"exact / {fast} at N = {n}: time {_fmt(r['time'], 'x')} "
              f"(paper {_fmt(r['paper_time'], 'x')}), memory {_fmt(r['memory'], 'x')} "
              f"(paper {_fmt(r['paper_memory'], 'x')})")
    if model_rows:
        print(f"\n== Base model (encode, {layers} layer{'s' * (layers != 1)}, random weights, "
              f"max_position_embeddings 4096) on the {device.upper()}")
        grid = []
        for n in sorted({r["n"] for r in model_rows}):
            at = {r["method"]: r for r in model_rows if r["n"] == n}
            nys_name = next(m for m in at if m.startswith("nystrom-") and ":" not in m)
            exact, nys = at["exact"], at[nys_name]
            row = {"n": n, "exact_ms": exact[time_key], "nys_ms": nys[time_key],
                   "time": exact[time_key] / nys[time_key],
                   "exact_mib": exact["peak_mib"], "nys_mib": nys["peak_mib"],
                   "memory": exact["peak_mib"] / nys["peak_mib"]}
            if "exact:attention" in at:  # one layer's attention module, same rounds
                attention = at["exact:attention"][time_key]
                row["share"] = 100 * layers * attention / exact[time_key]
                row["module"] = attention / at[f"{nys_name}:attention"][time_key]
            grid.append(row)
        print(timing.table(grid, [
            ("N", "n", "{}"), ("exact ms", "exact_ms", "{:.0f}"),
            ("nystrom ms", "nys_ms", "{:.0f}"), ("time ratio", "time", "{:.2f}"),
            ("exact MiB", "exact_mib", "{:.0f}"), ("nystrom MiB", "nys_mib", "{:.0f}"),
            ("memory ratio", "memory", "{:.2f}"),
            ("attention % of exact", "share", "{:.0f}"),
            ("module time ratio", "module", "{:.2f}"),
        ]))
        print("attention % of exact: the exact attention modules' time (one per layer, "
              "timed alone in the same rounds) as a share of the exact model's time; separate "
              "calls, so on a busy machine it is rough (it can even read above 100)")


def _where(cross) -> str:
    n, where = cross["n"], cross["where"]
    if where == "between":
        return f"from N ~ {n:.0f}"
    if where == "below":
        return f"at every N measured (from N = {n:.0f})"
    if where == "above":
        return f"at no N measured (up to N = {n:.0f})"
    return "(no common N)"


def _fmt(x, unit="") -> str:
    return "-" if x is None else f"{x:.2f}{unit}"


def _ints(text: str) -> list:
    return [int(x) for x in text.split(",") if x.strip()]


def _tiny_config():
    from nystrom_np import Config

    return Config(vocab_size=100, hidden_size=32, num_attention_heads=4, intermediate_size=48,
                  conv_kernel_size=5)


def _tiny_budgets() -> dict:
    return dict(proj_dim=16, num_features=16, window=17, block=32)


if __name__ == "__main__":
    main()
