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
  back to back with nothing in between; ``products / forward`` is the share of the
  forward's time spent in matrix products (the rest is element-wise work and overhead).

Usage: ``python benchmarks/limit.py [--threads 2] [--repeats 7] [--cases 1x510]``.
Prints a table, then one JSON line.
"""

import inspect

import numpy as np
from _common import (
    alternate,
    arguments,
    config_dict,
    forward_flops,
    header,
    input_ids,
    json_line,
    our_forward,
    our_model,
    parse_cases,
    set_threads,
)

from nystrom_np.layers import depthwise_conv
from nystrom_np.timing import table

CASES = "1x510"
TINY_CASES = "1x16"
PEAK_SIZE = 2048


def products(config: dict, batch: int, length: int):
    """A zero-argument callable running the forward's matrix products only, in order.

    The same shapes, layouts and batching as ``nystrom_np.model.forward`` in exact mode:
    the fused q/k/v product, the two batched attention products, the conv skip's banded
    (Toeplitz) product, the output, feed-forward and head products.
    """
    block = inspect.signature(depthwise_conv).parameters["block"].default  # the conv skip's
    rng = np.random.default_rng(0)
    b, n = batch, length
    c, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    h, k = config["num_attention_heads"], config.get("conv_kernel_size") or 0
    d = c // h
    f32 = np.float32

    def rand(*shape):
        return rng.standard_normal(shape, dtype=f32)

    x, w_qkv = rand(b * n, c), rand(c, 3 * c)
    w_out, w_in, w_back, word = rand(c, c), rand(c, i), rand(i, c), rand(v, c)
    mid = rand(b * n, i)
    q, kk, vv = rand(b, n, 3, h, d).transpose(2, 0, 3, 1, 4)  # as the fused product gives
    scores = rand(b, h, n, n)
    n_blocks = -(-n // block)
    toeplitz, blocks = rand(h, 1, block, block + k - 1), rand(b, h, n_blocks, block + k - 1, d)

    def run():
        for _ in range(config["num_hidden_layers"]):
            x @ w_qkv  # (B*N, C) @ (C, 3C)
            q @ kk.swapaxes(-1, -2)  # (B, H, N, D) @ (B, H, D, N)
            scores @ vv  # (B, H, N, N) @ (B, H, N, D)
            if k:
                toeplitz @ blocks  # (H, 1, blk, blk+K-1) @ (B, H, nb, blk+K-1, D)
            x @ w_out  # (B*N, C) @ (C, C)
            x @ w_in  # (B*N, C) @ (C, I)
            mid @ w_back  # (B*N, I) @ (I, C)
        x @ w_out  # the head's transform, (B*N, C) @ (C, C)
        x @ word.T  # the decoder, (B*N, C) @ (C, V)

    return run


def main(argv=None) -> dict:
    parser = arguments(__doc__.splitlines()[0], repeats=7)
    parser.add_argument("--cases", default=None, help=f"BxN list (default {CASES})")
    args = parser.parse_args(argv)
    config = config_dict(args.tiny)
    cases = parse_cases(args.cases or (TINY_CASES if args.tiny else CASES))
    model = our_model(config)
    set_threads(args.threads)
    peak_size = 256 if args.tiny else PEAK_SIZE
    a, b = (np.random.default_rng(1).standard_normal((peak_size,) * 2, dtype=np.float32)
            for _ in range(2))

    rows = []
    for batch, length in cases:
        candidates = {
            "forward": our_forward(model, input_ids(config, batch, length), {}),
            "peak": lambda: a @ b,
            "products": products(config, batch, length),
        }
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
        rows.append(row)

    info = header(f"Forward pass against the matmul limit, float32, "
                  f"{'TINY config' if args.tiny else 'the real config'}, exact attention, "
                  f"logits at every position; median of {args.repeats} alternating runs",
                  args.threads)
    print(table([{**r, "forward_ms": r["forward"]["median_ms"],
                  "products_ms": r["products"]["median_ms"]} for r in rows], [
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
    ]))
    print(f"peak: the best rate of a {peak_size}^3 float32 product; limit = FLOP / peak rate; "
          "products: the forward's matrix products alone")
    return json_line("limit", info, args, rows, peak_size=peak_size)


if __name__ == "__main__":
    main()
