"""What each trick of the forward pass buys, measured against its plain form.

``nystrom_np/model.py`` writes the forward as its formulas except for three steps, and keeps
each trick only where this script shows that it pays at least 5 % of the forward's time or
peak memory at N = 510 or N = 4096:

- ``conv``: the conv skip as a banded (Toeplitz) product, block by block
  (``depthwise_conv``), against the plain sum of K shifted slices;
- ``activation``: GELU in blocks of ``ACTIVATION_ROWS`` rows, against all rows at once;
- ``softmax``: softmax written over the N x N scores in place (``softmax_attention``),
  against a new array; exact attention only, since ``nystrom`` mode has no N x N scores
  (on 2026-12-02 the in-place form of its N x M kernels paid 0.3 %, so they went back to
  the plain form and there is nothing left to measure there);
- ``bias``: the bias added in place to the product in ``linear``, against ``x @ w + b``
  (NumPy makes a second array for the sum: at the head, of V floats per token).

Each case runs the whole forward (random float32 weights of the real config, B = 1, logits
at every position) twice: as it is, and with one plain form swapped in. The two alternate
(``nystrom_lab.timing.compare``: warm-up first, rounds in rotating order, medians), and the
warm-up call of each is traced for its peak memory (``tracemalloc``: NumPy's allocations).
Each trick is measured in the checkpoint's own mode (exact attention) at N = 510 and, but
for ``softmax``, in ``nystrom`` mode (M = 64) at N = 4096.

The figure is the median of the wall time or (``--clock cpu``) of the process's CPU time,
which, with ``--threads 1``, does not grow while other processes share the cores.

Usage: ``python benchmarks/tricks.py [--threads 2] [--repeats 5] [--clock wall|cpu]
[--tiny]``. Prints a table, then one JSON line.
"""

import contextlib

import numpy as np
from _common import arguments, config_dict, header, input_ids, json_line, our_model, set_threads

import nystrom_np.model as model_module
from nystrom_lab.timing import compare, table


def conv_shifted(v, w):
    """The conv skip as its formula: the sum of K shifted slices of the padded v."""
    k, n = w.shape[-1], v.shape[2]
    padded = np.pad(v, ((0, 0), (0, 0), (k // 2, k // 2), (0, 0)))  # (B, H, N + K - 1, D)
    return sum(w[:, t, None, None] * padded[:, :, t : t + n] for t in range(k))


def softmax_new_array(x, axis=-1, out=None):
    """softmax as its formula, into new arrays whatever ``out`` says."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def linear_plain(x, w, b):
    """A dense layer as its formula."""
    return x @ w + b


PLAIN = {  # trick -> (module attribute, its plain replacement)
    "conv": ("depthwise_conv", conv_shifted),
    "activation": ("ACTIVATION_ROWS", 10**9),
    "softmax": ("softmax", softmax_new_array),
    "bias": ("linear", linear_plain),
}


@contextlib.contextmanager
def plain(trick):
    """Swap one trick of ``nystrom_np.model`` for its plain form while the block runs."""
    name, replacement = PLAIN[trick]
    original = getattr(model_module, name)
    setattr(model_module, name, replacement)
    try:
        yield
    finally:
        setattr(model_module, name, original)


def main(argv=None) -> dict:
    parser = arguments(__doc__.splitlines()[0], repeats=5)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time by the wall clock or by this process's CPU time")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    key = "median_cpu_ms" if args.clock == "cpu" else "median_ms"
    short, long = (16, 32) if args.tiny else (510, 4096)
    cases = [(short, "hf", trick) for trick in ("conv", "activation", "softmax", "bias")]
    cases += [(long, "nystrom", trick) for trick in ("conv", "activation", "bias")]
    rows, models = [], {}
    for n, attention, trick in cases:
        if n not in models:
            models.clear()  # one model at a time: the 4096-position one is large
            models[n] = our_model(config_dict(args.tiny, max_position_embeddings=max(n, 510)))
        model, options = models[n], {} if attention == "hf" else {"attention": "nystrom"}
        ids = input_ids(model.config.to_dict(), 1, n)

        def as_is(model=model, ids=ids, options=options):
            return model_module.forward(model, ids, **options)

        def plain_form(model=model, ids=ids, options=options, trick=trick):
            with plain(trick):
                return model_module.forward(model, ids, **options)

        timed = compare({"trick": as_is, "plain": plain_form}, args.repeats)
        t, p = timed["trick"], timed["plain"]
        rows.append({
            "length": n, "attention": attention, "trick": trick,
            "trick_ms": t[key], "plain_ms": p[key],
            "slower_pct": 100 * (p[key] / t[key] - 1),
            "trick_mib": t["peak_mib"], "plain_mib": p["peak_mib"],
            "more_memory_pct": 100 * (p["peak_mib"] / t["peak_mib"] - 1),
        })
    info = header(f"The forward with each trick and with its plain form, float32, B = 1, "
                  f"{'TINY config' if args.tiny else 'the real config'}; {args.clock} time, "
                  f"median of {args.repeats} alternating runs; peak = tracemalloc of one call",
                  args.threads)
    print(table(rows, [
        ("N", "length", "{}"),
        ("attention", "attention", "{}"),
        ("trick", "trick", "{}"),
        ("with trick ms", "trick_ms", "{:.0f}"),
        ("plain ms", "plain_ms", "{:.0f}"),
        ("plain slower", "slower_pct", "{:+.1f} %"),
        ("with trick MiB", "trick_mib", "{:.0f}"),
        ("plain MiB", "plain_mib", "{:.0f}"),
        ("plain memory", "more_memory_pct", "{:+.1f} %"),
    ]))
    return json_line("tricks", info, args, rows)


if __name__ == "__main__":
    main()
