"""nystrom_np's forward pass next to transformers' (PyTorch, CPU): time and peak memory.

Both sides hold the same random float32 weights of the real config
(``uw-madison/nystromformer-512``: 12 layers, C = 768, V = 30000) and compute the masked-LM
logits at every position, in the checkpoint's own mode (``attention="hf"``, which for this
config is exact softmax attention plus the conv skip). Cases: B = 1 with N = 128 and 510,
and B = 8 with N = 128. Timing and memory as ``_common.py`` describes: alternating runs,
warm-up first, median of ``--repeats`` rounds, the same thread count for both; peak memory
of each side in a fresh process. The largest difference between the two sides' logits is
printed too, to show that they computed the same thing.

Usage: ``python benchmarks/forward.py [--threads 2] [--repeats 7] [--cases 1x128,1x510,8x128]
[--no-memory]``. Prints a table, then one JSON line.
"""

import sys

import numpy as np
from _common import (
    alternate,
    arguments,
    build,
    config_dict,
    has_torch,
    header,
    json_line,
    measure_memory,
    parse_cases,
    set_threads,
)

from nystrom_lab.timing import table

CASES = "1x128,1x510,8x128"
TINY_CASES = "1x8,2x16"


def main(argv=None) -> dict:
    parser = arguments(__doc__.splitlines()[0], repeats=7)
    parser.add_argument("--cases", default=None, help=f"BxN list (default {CASES})")
    args = parser.parse_args(argv)
    if not has_torch():
        sys.exit("this benchmark compares with transformers: pip install torch transformers")
    config = config_dict(args.tiny)
    cases = parse_cases(args.cases or (TINY_CASES if args.tiny else CASES))

    rows = []
    for b, n in cases:
        spec = dict(config=config, batch=b, length=n, options={}, threads=args.threads)
        ours, model = build({**spec, "side": "nystrom_np"})
        theirs, hf = build({**spec, "side": "transformers"})
        set_threads(args.threads)
        difference = float(np.abs(ours() - theirs().numpy()).max())
        times = alternate({"nystrom_np": ours, "transformers": theirs}, args.repeats)
        del ours, theirs, model, hf
        row = {
            "batch": b,
            "length": n,
            "nystrom_np": times["nystrom_np"],
            "transformers": times["transformers"],
            "max_abs_logit_difference": difference,
        }
        row["time_ratio"] = row["nystrom_np"]["median_ms"] / row["transformers"]["median_ms"]
        if not args.no_memory:
            for side in ("nystrom_np", "transformers"):
                row[side]["memory"] = measure_memory({**spec, "side": side})
        rows.append(row)

    info = header(f"Forward pass, masked-LM logits at every position, float32, "
                  f"{'TINY config' if args.tiny else 'the real config'}; median of "
                  f"{args.repeats} alternating runs", args.threads)
    print(table([_flat(r) for r in rows], [
        ("B", "batch", "{}"),
        ("N", "length", "{}"),
        ("nystrom_np ms", "ours_ms", "{:.1f}"),
        ("(min-max)", "ours_range", "{}"),
        ("torch ms", "torch_ms", "{:.1f}"),
        ("(min-max)", "torch_range", "{}"),
        ("time ratio", "time_ratio", "{:.2f}"),
        ("nystrom_np peak MB", "ours_mb", "{:.0f}"),
        ("torch peak MB", "torch_mb", "{:.0f}"),
        ("memory ratio", "memory_ratio", "{:.2f}"),
        ("max |dlogits|", "max_abs_logit_difference", "{:.1e}"),
    ]))
    print("time ratio = nystrom_np / torch (below 1: nystrom_np is faster); peak MB: the "
          "forward's peak resident memory above the loaded model, each side in a fresh process")
    return json_line("forward", info, args, rows)


def _flat(row: dict) -> dict:
    ours, torch = row["nystrom_np"], row["transformers"]
    flat = {
        "batch": row["batch"],
        "length": row["length"],
        "ours_ms": ours["median_ms"],
        "ours_range": f"{ours['min_ms']:.0f}-{ours['max_ms']:.0f}",
        "torch_ms": torch["median_ms"],
        "torch_range": f"{torch['min_ms']:.0f}-{torch['max_ms']:.0f}",
        "time_ratio": row["time_ratio"],
        "max_abs_logit_difference": row["max_abs_logit_difference"],
    }
    if "memory" in ours:
        flat["ours_mb"] = ours["memory"]["peak_mb"]
        flat["torch_mb"] = torch["memory"]["peak_mb"]
        flat["memory_ratio"] = flat["ours_mb"] / max(flat["torch_mb"], 1e-9)
    return flat


if __name__ == "__main__":
    main()
