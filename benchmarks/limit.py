"""How close nystrom_np's forward pass comes to the machine's matrix-multiply limit.

A forward is a chain of matrix products plus element-wise work, so its floor is its
FLOP count divided by the rate at which this machine multiplies float32 matrices. Measured
side by side in one run (alternating, warm-up first, median of ``--repeats`` rounds):

- ``forward``: nystrom_np's masked-LM logits at every position (the real config's random
  weights, exact attention as the checkpoint runs it);
- ``peak``: a 2048 x 2048 x 2048 float32 product with NumPy's BLAS, which gives the rate;
  the **limit** is the forward's nominal FLOP count (``_common.forward_flops``) at that
  rate, and ``limit / forward`` the share of the limit the forward reaches;
- ``products``: the forward's own matrix products alone, same shapes and same batching,
  back to back with nothing in between (``_common.products``); ``products / forward`` is
  the share of the forward's time spent in matrix products (the rest is element-wise work
  and overhead);
- ``torch`` (when torch and transformers are installed): transformers' forward on the same
  weights, with its share of the same limit. It shows what a time target relative to
  torch asks of NumPy: ``0.8 torch`` is 0.8 x torch's time, and ``products / 0.8 torch``
  above 1 means that NumPy's matrix products alone already take longer than that target,
  so no element-wise work, however fast, could meet it.

Usage: ``python benchmarks/limit.py [--threads 2] [--repeats 7] [--cases 1x510]``.
Prints a table, then one JSON line.
"""

import numpy as np
from _common import (
    alternate,
    arguments,
    config_dict,
    forward_flops,
    has_torch,
    header,
    input_ids,
    json_line,
    our_forward,
    our_model,
    parse_cases,
    products,
    set_threads,
    torch_forward,
    torch_model,
)

from nystrom_lab.timing import table

CASES = "1x510"
TINY_CASES = "1x16"
PEAK_SIZE = 2048


def main(argv=None) -> dict:
    parser = arguments(__doc__.splitlines()[0], repeats=7)
    parser.add_argument("--cases", default=None, help=f"BxN list (default {CASES})")
    args = parser.parse_args(argv)
    config = config_dict(args.tiny)
    cases = parse_cases(args.cases or (TINY_CASES if args.tiny else CASES))
    model = our_model(config)
    hf = torch_model(model) if has_torch() else None
    if hf is None:
        print("transformers is not installed: no torch column")
    set_threads(args.threads)
    peak_size = 256 if args.tiny else PEAK_SIZE
    a, b = (np.random.default_rng(1).standard_normal((peak_size,) * 2, dtype=np.float32)
            for _ in range(2))

    rows = []
    for batch, length in cases:
        ids = input_ids(config, batch, length)
        candidates = {
            "forward": our_forward(model, ids, {}),
            "peak": lambda: a @ b,
            "products": products(config, batch, length),
        }
        if hf is not None:
            candidates["torch"] = torch_forward(hf, ids)
        times = alternate(candidates, args.repeats)
        flops = forward_flops(config, batch, length)
        row = {"batch": batch, "length": length, "flops": flops, "gflop": sum(flops.values()) /
               1e9, **times}
        rate = 2 * peak_size**3 / (row["peak"]["median_ms"] / 1e3)  # FLOP/s
        row["peak_gflops"] = rate / 1e9
        row["limit_ms"] = sum(flops.values()) / rate * 1e3
        row["forward_gflops"] = row["gflop"] / (row["forward"]["median_ms"] / 1e3)
        row["share_of_limit"] = row["limit_ms"] / row["forward"]["median_ms"]
        row["products_share"] = row["products"]["median_ms"] / row["forward"]["median_ms"]
        if hf is not None:
            torch_ms = row["torch"]["median_ms"]
            row["torch_share_of_limit"] = row["limit_ms"] / torch_ms
            row["products_vs_target"] = row["products"]["median_ms"] / (0.8 * torch_ms)
        rows.append(row)

    info = header(f"Forward pass against the matmul limit, float32, "
                  f"{'TINY config' if args.tiny else 'the real config'}, exact attention, "
                  f"logits at every position; median of {args.repeats} alternating runs",
                  args.threads)
    columns = [
        ("B", "batch", "{}"),
        ("N", "length", "{}"),
        ("GFLOP", "gflop", "{:.1f}"),
        ("peak GFLOP/s", "peak_gflops", "{:.0f}"),
        ("limit ms", "limit_ms", "{:.0f}"),
        ("forward ms", "forward_ms", "{:.0f}"),
        ("forward GFLOP/s", "forward_gflops", "{:.0f}"),
        ("limit/forward", "share_of_limit", "{:.0%}"),
        ("products ms", "products_ms", "{:.0f}"),
        ("products/forward", "products_share", "{:.0%}"),
    ]
    if hf is not None:
        columns += [
            ("torch ms", "torch_ms", "{:.0f}"),
            ("limit/torch", "torch_share_of_limit", "{:.0%}"),
            ("products/(0.8 torch)", "products_vs_target", "{:.2f}"),
        ]
    print(table([{**r, "forward_ms": r["forward"]["median_ms"],
                  "products_ms": r["products"]["median_ms"],
                  "torch_ms": r.get("torch", {}).get("median_ms")} for r in rows], columns))
    print(f"peak: the rate of a {peak_size}^3 float32 product; limit = FLOP / peak rate; "
          "products: the forward's matrix products alone; torch: transformers' forward on the "
          "same weights")
    return json_line("limit", info, args, rows, peak_size=peak_size)


if __name__ == "__main__":
    main()
