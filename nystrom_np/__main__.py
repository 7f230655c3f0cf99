"""Command line: ``python -m nystrom_np COMMAND ...``.

Commands
--------
convert SRC DST
    A checkpoint (folder, weights file or hub id) -> ``DST/model.safetensors`` +
    ``config.json`` (+ tokenizer files), read back and verified bit for bit.
fill-mask TEXT [TEXT ...]
    The most probable tokens for each ``[MASK]``, as a table (or ``--json``).

To add a command: one ``add_parser`` block in ``build_parser`` and one ``run_<command>``
function that takes the parsed arguments and returns an exit status.
"""

import argparse
import json
import math
import sys
import warnings

from .checkpoint import REPO_ID


def run_convert(args) -> int:
    from .checkpoint import convert

    convert(args.src, args.dst, config=args.config, revision=args.revision, force=args.force)
    return 0


FILL_MASK_HINT = (
    "fill-mask needs the checkpoint's weights, config.json and tokenizer (spiece.model), e.g.\n"
    "    huggingface-cli download uw-madison/nystromformer-512 config.json pytorch_model.bin "
    "spiece.model --local-dir nystromformer-512\n"
    "    python -m nystrom_np fill-mask --checkpoint nystromformer-512 "
    "\"Paris is the [MASK] of France.\"\n"
    "Without it, --random-weights --tokenizer PATH/spiece.model runs the same code on random "
    "weights (meaningless predictions)."
)
RANDOM_BANNER = (
    "!! RANDOM WEIGHTS: random_model(Config(), seed={seed}), not the pretrained checkpoint.\n"
    "!! The predictions below are MEANINGLESS: they exercise the code path, nothing more."
)


def run_fill_mask(args) -> int:
    from .checkpoint import load
    from .config import Config
    from .pipeline import describe_attention, encode_masked, fill_mask, format_table
    from .tokenizer import Tokenizer, load_tokenizer
    from .weights import random_model

    # Options first: a mistake in them should not wait for a model to load.
    if args.seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {args.seed}.")
    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}.")
    if args.landmarks is not None and args.attention != "nystrom":
        raise ValueError(f"--landmarks is an option of --attention nystrom only, not of "
                         f"--attention {args.attention}.")
    if args.landmarks is not None and args.landmarks < 1:
        raise ValueError(f"--landmarks must be at least 1, got {args.landmarks}.")
    try:  # the tokenizer first: it is small, and bad text then fails before the model loads
        if args.tokenizer:
            tokenizer = Tokenizer(args.tokenizer)
        else:
            tokenizer = load_tokenizer(args.checkpoint, revision=args.revision)
    except FileNotFoundError as e:
        if args.random_weights:
            print(
                "error: --random-weights replaces the weights, not the tokenizer, and no "
                f"spiece.model was found for {args.checkpoint!r} "
                f"({str(e).splitlines()[0].rstrip(':')}).\n"
                "Pass --tokenizer PATH/spiece.model; get the file where the hub is reachable:\n"
                "    huggingface-cli download uw-madison/nystromformer-512 spiece.model "
                "--local-dir .",
                file=sys.stderr,
            )
        else:
            print(f"error: {e}\n{FILL_MASK_HINT}", file=sys.stderr)
        return 1
    # The checkpoint's tokenizer knows its position table; a --tokenizer file alone does not
    # (the model checks the length once it is loaded).
    limit = sys.maxsize if args.tokenizer else tokenizer.max_length
    if args.top_k > len(tokenizer):
        raise ValueError(f"--top-k must be at most {len(tokenizer)}, the size of the "
                         f"vocabulary, got {args.top_k}.")
    for text in args.texts:
        encode_masked(tokenizer, text, limit)
    try:
        if args.random_weights:
            print(RANDOM_BANNER.format(seed=args.seed), file=sys.stderr)
            model = random_model(Config(), seed=args.seed).to(args.device)
        else:
            model = load(args.checkpoint, revision=args.revision, device=args.device)
    except FileNotFoundError as e:
        print(f"error: {e}\n{FILL_MASK_HINT}", file=sys.stderr)
        return 1
    texts = args.texts[0] if len(args.texts) == 1 else args.texts
    results = fill_mask(
        texts, args.top_k, model=model, tokenizer=tokenizer, attention=args.attention,
        num_landmarks=args.landmarks,
    )
    print(f"{describe_attention(model.config, args.attention, args.landmarks)}; "
          f"at most {model.config.max_position_embeddings} tokens", file=sys.stderr)
    if args.json:  # strict JSON: a NaN score (fill_mask has warned) is written null
        print(json.dumps(_finite(results), indent=2, ensure_ascii=False, allow_nan=False))
        return 0
    results = [results] if len(args.texts) == 1 else results
    print("\n\n".join(format_table(t, r) for t, r in zip(args.texts, results, strict=True)))
    if args.random_weights:
        print("(random weights: these predictions are meaningless)")
    return 0


def _finite(value):
    """``value`` with every NaN or infinite float replaced by None (JSON's null)."""
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return None if isinstance(value, float) and not math.isfinite(value) else value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nystrom_np",
        description="The Nystromformer masked language model in NumPy.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser(
        "convert",
        help="write a checkpoint as model.safetensors + config.json, verified",
        description="Convert a checkpoint (a folder with pytorch_model.bin or "
        "model.safetensors, a weights file, or a hub id: the local cache, else a download) to "
        "DST/model.safetensors + config.json, then read it back and check it bit for bit.",
    )
    convert.add_argument("src", help="folder, weights file or hub id (org/name)")
    convert.add_argument("dst", help="output folder (created if needed)")
    convert.add_argument("--config", help="config.json to use if SRC has none")
    convert.add_argument("--revision", help="hub ids: branch, tag, refs/pr/N or commit")
    convert.add_argument("--force", action="store_true", help="overwrite DST/model.safetensors")
    convert.set_defaults(run=run_convert)

    fill = commands.add_parser(
        "fill-mask",
        help="predict the [MASK] tokens of a text",
        description="The most probable tokens for each [MASK] of each TEXT, as transformers' "
        "fill-mask pipeline gives them. The mask is written exactly [MASK].",
    )
    fill.add_argument("texts", nargs="+", metavar="TEXT", help="text with one or more [MASK]")
    fill.add_argument(
        "--checkpoint", default=REPO_ID,
        help="checkpoint folder or hub id, e.g. uw-madison/nystromformer-4096 (default: "
        "%(default)s; hub ids: the local cache, else a download where the hub answers)",
    )
    fill.add_argument("--revision", help="hub ids: branch, tag, refs/pr/N or commit")
    fill.add_argument("--tokenizer", help="spiece.model to use (default: the checkpoint's)")
    fill.add_argument("--top-k", type=int, default=5, help="predictions per mask (%(default)s)")
    fill.add_argument(
        "--attention", choices=["hf", "exact", "nystrom"], default="hf",
        help="hf (default): what transformers runs, which for all four uw-madison "
        "checkpoints is exact O(N^2) softmax attention; exact: the same, whatever the config; "
        "nystrom: the paper's landmark method, as the models were trained (M = the config's "
        "num_landmarks, 64; O(N))",
    )
    fill.add_argument("--landmarks", type=int, help="landmarks M for --attention nystrom")
    fill.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="gpu needs CuPy")
    fill.add_argument("--json", action="store_true", help="print the pipeline's JSON structure")
    fill.add_argument(
        "--random-weights", action="store_true",
        help="a seeded random model of the real config instead of the checkpoint: "
        "meaningless predictions, for trying the code without the weights",
    )
    fill.add_argument("--seed", type=int, default=0, help="seed of --random-weights (%(default)s)")
    fill.set_defaults(run=run_fill_mask)

    return parser


def _show_warning(message, category, *_):
    print(f"warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning  # one line, not a source excerpt
        try:
            return args.run(args)
        # Bad input, bad files, a missing library, --device gpu without CuPy or a GPU: a
        # message, no traceback.
        except (ValueError, TypeError, OSError, RuntimeError, ImportError) as e:
            print(f"error: {e}", file=sys.stderr)
        except MemoryError:
            print("error: out of memory (the checkpoint or the input is too big for this "
                  "machine).", file=sys.stderr)  # fmt: skip
    return 1


if __name__ == "__main__":
    sys.exit(main())
