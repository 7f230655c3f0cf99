"""Long inputs: the whole nystromformer-4096 model at N = 4096, exact against Nystrom.

The config of ``uw-madison/nystromformer-4096`` (12 layers, C = 768, V = 30000, 4096
positions, num_landmarks = segment_means_seq_len = 64), random float32 weights, one
sequence of N = 4096 tokens, masked-LM logits at every position. Side by side in one run
(alternating, warm-up first, median of ``--repeats`` rounds, the same thread count), with
the peak memory of each in a fresh process:

- ``nystrom``: nystrom_np, ``attention="nystrom"``, M = 64 landmarks, 6 iterations of the
  pseudo-inverse: the method the model was trained with, O(N);
- ``exact``: nystrom_np, ``attention="exact"`` (= the default ``"hf"`` for this config):
  softmax attention with its N x N scores;
- ``transformers``: transformers' ``NystromformerForMaskedLM`` on the same config, which is
  what it runs for this checkpoint: exact attention (num_landmarks = segment_means_seq_len);
- with ``--torch-landmark``, also transformers' own landmark path, which runs only when the
  config says ``segment_means_seq_len = N`` (a modified config: 4096);
- ``nystrom products``: the matrix products of the ``nystrom`` forward alone, same shapes,
  back to back (``_common.products``): its time if element-wise work cost nothing.

The MLM head and the feed-forward layers cost the same in every mode, so the whole-model
ratio is smaller than the attention-only one; the table gives the FLOP counts of both
modes to show how much of the gap attention can explain.

Usage: ``python benchmarks/long.py [--threads 2] [--repeats 3] [--length 4096]
[--landmarks 64] [--torch-landmark] [--no-memory]``. Prints a table, then one JSON line.
"""

from _common import (
    alternate,
    arguments,
    build,
    config_dict,
    forward_flops,
    has_torch,
    header,
    json_line,
    measure_memory,
    products,
    set_threads,
)

from nystrom_lab.timing import table


def main(argv=None) -> dict:
    parser = arguments(__doc__.splitlines()[0], repeats=3)
    parser.add_argument("--length", type=int, default=None, help="N (default 4096)")
    parser.add_argument("--landmarks", type=int, default=None, help="M (default 64)")
    parser.add_argument("--torch-landmark", action="store_true",
                        help="also time transformers' landmark path (config modified so that "
                        "segment_means_seq_len = N)")
    args = parser.parse_args(argv)
    n = args.length or (32 if args.tiny else 4096)
    m = args.landmarks or (4 if args.tiny else 64)
    # nystromformer-4096's config: num_landmarks = segment_means_seq_len, so exact by default
    positions = n if args.tiny else max(n, 4096)
    config = config_dict(args.tiny, max_position_embeddings=positions,
                         segment_means_seq_len=m, num_landmarks=m)
    torch = has_torch()
    base = dict(config=config, batch=1, length=n, threads=args.threads)
    specs = {
        "nystrom": {**base, "side": "nystrom_np", "options": {"attention": "nystrom"}},
        "exact": {**base, "side": "nystrom_np", "options": {"attention": "exact"}},
    }
    if torch:
        specs["transformers"] = {**base, "side": "transformers"}  # exact, as for the hub model
        if args.torch_landmark:  # its landmark path reshapes by segment_means_seq_len = N
            landmark_config = {**config, "segment_means_seq_len": n}
            specs["transformers landmark"] = {**base, "config": landmark_config,
                                              "side": "transformers"}
    else:
        print("transformers is not installed: timing nystrom_np's two modes only")

    calls = {}
    for name, spec in specs.items():
        calls[name], _ = build(spec)  # each call holds its model
    calls["nystrom products"] = products(config, 1, n, "nystrom", m)
    set_threads(args.threads)
    times = alternate(calls, args.repeats)
    del calls
    rows = []
    for name in times:
        row = {"name": name, **times[name]}
        if name in specs and not args.no_memory:
            row["memory"] = measure_memory(specs[name])
            row["peak_mb"] = row["memory"]["peak_mb"]
        rows.append(row)
    nystrom_ms = rows[0]["median_ms"]
    for row in rows:
        row["time_vs_nystrom"] = row["median_ms"] / nystrom_ms
    flops = {
        mode: forward_flops(config, 1, n, mode, m) for mode in ("nystrom", "exact")
    }

    info = header(f"Full model (masked-LM logits at every position), float32, B = 1, N = {n}, "
                  f"M = {m}, "
                  f"{'TINY config' if args.tiny else 'config of uw-madison/nystromformer-4096'}; "
                  f"median of {args.repeats} alternating runs", args.threads)
    print(table(rows, [
        ("", "name", "{}"),
        ("median ms", "median_ms", "{:.0f}"),
        ("min ms", "min_ms", "{:.0f}"),
        ("max ms", "max_ms", "{:.0f}"),
        ("time / nystrom", "time_vs_nystrom", "{:.2f}"),
        ("peak MB", "peak_mb", "{:.0f}"),
    ]))
    total = {mode: sum(f.values()) / 1e9 for mode, f in flops.items()}
    attention = {mode: f["attention"] / 1e9 for mode, f in flops.items()}
    print(f"FLOP of the whole model: nystrom {total['nystrom']:.0f} G, exact "
          f"{total['exact']:.0f} G (ratio {total['exact'] / total['nystrom']:.2f}); of "
          f"attention alone: {attention['nystrom']:.1f} G and {attention['exact']:.1f} G")
    products_ms = times["nystrom products"]["median_ms"]
    print(f"nystrom products: the nystrom forward's matrix products alone take {products_ms:.0f} "
          f"ms; the rest of it (element-wise work) {nystrom_ms - products_ms:.0f} ms")
    if "transformers" in times:
        torch_ms = times["transformers"]["median_ms"]
        print(f"transformers runs nystromformer-4096 with exact attention: {torch_ms:.0f} ms; "
              f"nystrom_np's nystrom mode is {torch_ms / nystrom_ms:.2f}x faster than that")
    if "transformers landmark" in times:
        room = times["transformers landmark"]["median_ms"] - products_ms
        print(f"to be faster than transformers' landmark path, that rest would have to take "
              f"under {room:.0f} ms")
    print("peak MB: the forward's peak resident memory above the loaded model, in a fresh "
          "process each")
    return json_line("long", info, args, rows, length=n, landmarks=m, flops=flops)


if __name__ == "__main__":
    main()
