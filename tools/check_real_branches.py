"""Build the book as a user with the real checkpoints would, without them: a slower check.

A chapter takes one branch when it finds ``uw-madison/nystromformer-512`` and another
(random weights or a skip, with a visible note) when it does not, and CI can only take the
second. This script makes full-size checkpoints in the real file layout with random weights
and builds the book on them, warnings as errors, so that every branch a user with the real
checkpoints takes runs:

- ``nystromformer-512`` in a folder that ``$NYSTROM_NP_CHECKPOINT`` names: ``config.json``
  of the real config, ``pytorch_model.bin`` in the hub file's layout (``torch.save`` with
  tied decoder keys and ``position_ids``: ``nystrom_lab.study.write_checkpoint``), and
  ``spiece.model`` trained on the tests' corpus;
- ``nystromformer-4096`` as a snapshot in a Hugging Face cache of its own
  (``HF_HUB_CACHE``), for the prediction chapter's long documents;
- ``HF_HUB_OFFLINE=1``: nothing is fetched.

Then it reads the built pages and fails if one still shows a fallback: a "Skipped" note
(other than the GPU section's), a note that the chapter ran on random weights, or a failed
parity check. The numbers on the pages are those of random weights:
this checks that the code runs and that the prose stays true, not what the model predicts.

Needs the test extra (``pip install -e ".[test]"``: sentencepiece, torch, transformers).
Usage: ``python tools/check_real_branches.py [--out DIR]``; the book lands in
``DIR/_build/html`` (default: a new temporary folder, which is kept for looking at).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's SentencePiece model

from albert_spiece import build_spiece  # noqa: E402

from nystrom_lab.study import write_checkpoint  # noqa: E402
from nystrom_np import Config, random_model  # noqa: E402

COMMIT = "f" * 40  # the snapshot's revision in the made-up cache
FALLBACKS = (  # what a page shows when it did not find what it needs
    r"Skipped: (?!no GPU)[^.(]*",
    r"ran on random weights",
    r"Random weights: [^.]*",
    r"Parity: FAILED",
)


def hub_files(folder: Path, config: Config, spiece: Path, seed: int) -> Path:
    """The hub's files for ``config``, with seeded random weights."""
    write_checkpoint(random_model(config, seed=seed), folder, kind="bin")
    (folder / "spiece.model").write_bytes(spiece.read_bytes())
    return folder


def cache_snapshot(cache: Path, repo_id: str) -> Path:
    """The snapshot folder of ``repo_id`` in the cache layout, its ``refs/main`` pointing at it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return repo / "snapshots" / COMMIT


def fallbacks(html: Path) -> dict:
    """Page name -> the fallback notes it shows."""
    found = {}
    for page in sorted(html.glob("*.html")):
        page_html = re.sub(r"<pre.*?</pre>", "", page.read_text(encoding="utf-8"), flags=re.S)
        text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", page_html))  # prose, not code
        hits = [m.group(0).strip() for pattern in FALLBACKS for m in re.finditer(pattern, text)]
        if hits:
            found[page.name] = sorted(set(hits))
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path,
                        help="a new or empty folder (default: a temporary one)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="nystrom-real-branches-"))
    if out.exists() and any(out.iterdir()):
        parser.error(f"--out {out} is not empty; give a new or empty folder.")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    spiece = build_spiece(out / "spiece.model")
    folder = hub_files(out / "nystromformer-512", Config(), spiece, seed=0)
    cache = out / "hf-cache"
    long_config = Config(max_position_embeddings=4096)
    hub_files(cache_snapshot(cache, "uw-madison/nystromformer-4096"), long_config, spiece,
              seed=1)
    print(f"checkpoints written in {time.perf_counter() - started:.0f} s: {folder}, {cache}")

    env = {**os.environ, "NYSTROM_NP_CHECKPOINT": str(folder), "HF_HUB_CACHE": str(cache),
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    command = ["jupyter-book", "build", str(ROOT / "book"), "--path-output", str(out),
               "-W", "-n", "--keep-going"]  # fmt: skip
    print("+", " ".join(command), flush=True)
    built = subprocess.run(command, env=env, check=False)
    html = out / "_build" / "html"
    print(f"book built in {time.perf_counter() - started:.0f} s (rc {built.returncode}): {html}")
    if built.returncode != 0:
        return 1
    shown = fallbacks(html)
    for page, hits in shown.items():
        print(f"{page} still shows a fallback: {'; '.join(hits)}")
    if shown:
        return 1
    print("every page ran its real-weights branch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
