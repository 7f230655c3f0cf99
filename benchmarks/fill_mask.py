"""End-to-end fill-mask latency: ``nystrom_np.pipeline.fill_mask`` against transformers'
``pipeline("fill-mask")``, text in, top-5 predictions out.

Both sides hold the same weights and the same ``spiece.model``. By default these are
random weights of the real config and the stand-in SentencePiece model the tests train
(``tests/albert_spiece.py``; the real checkpoint cannot be downloaded on every machine);
``--checkpoint DIR`` uses a local checkpoint folder instead (``config.json``, weights,
``spiece.model``), e.g. the real ``uw-madison/nystromformer-512``. Texts: the model
card's "Paris is the [MASK] of France." and a long text of about 500 tokens with one mask.
Our ``fill_mask`` runs the MLM head at the masked position only; the pipeline runs it at
every position. Timing as ``_common.py`` describes (alternating, warm-up first, median,
same thread count). The table also says whether both sides gave the same five tokens,
and gives ``products``: the matrix products our ``fill_mask`` needs (encoder, and the
head at the one masked row), alone and back to back (``_common.products``), timed in the
same rounds: the latency it would have if tokenizing and element-wise work cost nothing.

Usage: ``python benchmarks/fill_mask.py [--threads 2] [--repeats 7] [--checkpoint DIR]``.
Prints a table, then one JSON line.
"""

import sys
import tempfile
from pathlib import Path

from _common import (
    ROOT,
    alternate,
    arguments,
    config_dict,
    has_torch,
    header,
    json_line,
    our_model,
    products,
    set_threads,
    torch_model,
)

from nystrom_lab.timing import table

SHORT = "Paris is the [MASK] of France."
LONG_TOKENS = 500  # the long text's length in tokens, [CLS] and [SEP] included


def long_text(tokenizer, n_tokens: int) -> str:
    """Words of the test corpus, with one [MASK] near the middle, about ``n_tokens`` long."""
    words = (ROOT / "tests" / "data" / "corpus.txt").read_text(encoding="utf-8").split()
    words = (words * (1 + 2 * n_tokens // max(len(words), 1)))[: 2 * n_tokens]
    lo, hi = 1, len(words)
    while lo < hi:  # the most words whose encoding fits in n_tokens
        mid = (lo + hi + 1) // 2
        text = _with_mask(words[:mid])
        if len(tokenizer.encode(text, max_length=10**6)["input_ids"]) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return _with_mask(words[:lo])


def _with_mask(words: list) -> str:
    half = len(words) // 2
    return " ".join(words[:half] + ["[MASK]"] + words[half + 1 :])


def load_pair(args):
    """(our model, our tokenizer, transformers' pipeline, where the weights came from)."""
    import transformers

    from nystrom_np.tokenizer import Tokenizer

    if args.checkpoint:
        from nystrom_np.checkpoint import load

        folder = Path(args.checkpoint)
        model, tokenizer = load(folder), Tokenizer(folder)
        spiece, source = folder / "spiece.model", str(folder)
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from albert_spiece import build_spiece

        spiece = build_spiece(Path(tempfile.mkdtemp()) / "spiece.model")
        tokenizer = Tokenizer(spiece)
        config = config_dict(args.tiny, vocab_size=len(tokenizer))
        model = our_model(config)
        source = "random weights, stand-in spiece.model (tests/albert_spiece.py)"
    hf_tokenizer = transformers.AlbertTokenizer(str(spiece))
    pipe = transformers.pipeline("fill-mask", model=torch_model(model), tokenizer=hf_tokenizer,
                                 device="cpu")
    return model, tokenizer, pipe, source


def main(argv=None) -> dict:
    parser = arguments(__doc__.splitlines()[0], repeats=7)
    parser.add_argument("--checkpoint", default=None, help="a local checkpoint folder")
    args = parser.parse_args(argv)
    if not has_torch():
        sys.exit("this benchmark compares with transformers: pip install torch transformers")
    from nystrom_np.pipeline import fill_mask

    model, tokenizer, pipe, source = load_pair(args)
    set_threads(args.threads)
    texts = {"short": SHORT, "long": long_text(tokenizer, 64 if args.tiny else LONG_TOKENS)}

    rows = []
    for name, text in texts.items():
        n = len(tokenizer.encode(text)["input_ids"])
        ours = fill_mask(text, model=model, tokenizer=tokenizer)
        theirs = pipe(text)
        same = [p["token"] for p in ours] == [p["token"] for p in theirs]
        times = alternate({
            "nystrom_np": lambda text=text: fill_mask(text, model=model, tokenizer=tokenizer),
            "transformers": lambda text=text: pipe(text),
            "products": products(model.config.to_dict(), 1, n, head_rows=1),
        }, args.repeats)
        row = {"text": name, "tokens": n, "same_top5": same,
               **times}
        row["ours_ms"] = row["nystrom_np"]["median_ms"]
        row["torch_ms"] = row["transformers"]["median_ms"]
        row["time_ratio"] = row["ours_ms"] / row["torch_ms"]
        row["products_ms"] = row["products"]["median_ms"]
        row["products_vs_target"] = row["products_ms"] / (0.5 * row["torch_ms"])
        rows.append(row)

    info = header(f"fill-mask, text in, top-5 out; {source}; median of {args.repeats} "
                  "alternating runs", args.threads)
    print(table(rows, [
        ("text", "text", "{}"),
        ("N", "tokens", "{}"),
        ("nystrom_np ms", "ours_ms", "{:.1f}"),
        ("pipeline ms", "torch_ms", "{:.1f}"),
        ("time ratio", "time_ratio", "{:.2f}"),
        ("same top-5", "same_top5", "{}"),
        ("products ms", "products_ms", "{:.1f}"),
        ("products/(0.5 pipeline)", "products_vs_target", "{:.2f}"),
    ]))
    print("time ratio = nystrom_np / transformers' pipeline (below 1: nystrom_np is faster); "
          "products: our fill_mask's matrix products alone (above 1 in the last column: they "
          "alone take longer than half the pipeline's time)")
    return json_line("fill_mask", info, args, rows, weights=source)


if __name__ == "__main__":
    main()
