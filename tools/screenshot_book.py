"""Screenshot every page of the built book with headless Chromium: full-page PNGs.

Usage (after ``jupyter-book build book``)::

    python tools/screenshot_book.py OUT_DIR [--html _build/html] [--width 1280]
                                    [--tile 2200] [PAGE ...]

Writes OUT_DIR/<page>.png for every ``*.html`` page of the build that has content (the
search page, the index and redirects are skipped), or only for the PAGEs named (e.g.
``softmax_attention``). Needs a Chromium or Chrome binary (Debian: ``apt-get install
chromium``); set ``CHROMIUM`` to its path if it is not ``chromium``/``chromium-browser``/
``google-chrome`` on PATH. No network is used: the pages are opened as files, so the
screenshots also show whether the book renders offline (math included).

The page height is measured first (one headless run that prints the document's height),
then the page is shot at that height, so each PNG holds the whole page.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SKIP = {"search", "genindex", "index"}


def chromium() -> str:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    sys.exit("no chromium found: apt-get install chromium, or set CHROMIUM")


def run(binary, args, timeout=120):
    with tempfile.TemporaryDirectory() as profile:
        command = [binary, "--headless=new", "--no-sandbox", "--disable-gpu",
                   "--hide-scrollbars", f"--user-data-dir={profile}",
                   "--virtual-time-budget=15000", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def shoot(binary, html: Path, png: Path, width: int, height: int):
    run(binary, [f"--window-size={width},{height}", f"--screenshot={png}", html.as_uri()])


def measure_height(binary, html: Path, width: int) -> int:
    """Copy the page next to itself with a script that writes its height into the DOM."""
    script = ("<script>window.addEventListener('load',()=>{setTimeout(()=>{"
              "const h=Math.max(document.body.scrollHeight,"
              "document.documentElement.scrollHeight);"
              "document.body.setAttribute('data-height',h);},3000);});</script>")
    probe = html.with_name(f".probe-{html.name}")
    probe.write_text(html.read_text(encoding="utf-8").replace("</body>", script + "</body>"),
                     encoding="utf-8")
    try:
        result = run(binary, [f"--window-size={width},1000", "--dump-dom", probe.as_uri()])
    finally:
        probe.unlink()
    match = re.search(r'data-height="(\d+)"', result.stdout)
    return int(match.group(1)) if match else 4000


def tile(png: Path, size: int):
    """Cut ``png`` into horizontal strips ``size`` pixels tall, next to it."""
    from PIL import Image

    with Image.open(png) as image:
        width, height = image.size
        for i, top in enumerate(range(0, height, size)):
            image.crop((0, top, width, min(height, top + size))).save(
                png.with_name(f"{png.stem}-{i:02d}.png"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the PNGs")
    parser.add_argument("pages", nargs="*", help="page names (default: every page)")
    parser.add_argument("--html", type=Path, default=Path("_build/html"))
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--max-height", type=int, default=30000,
                        help="cap on the screenshot height in pixels")
    parser.add_argument("--tile", type=int, default=0, metavar="PIXELS",
                        help="also cut each PNG into tiles this tall (<page>-00.png, ...), "
                        "small enough for an image viewer; needs Pillow")
    args = parser.parse_intermixed_args(argv)
    binary = chromium()
    pages = sorted(p for p in args.html.glob("*.html")
                   if p.stem not in SKIP and not p.name.startswith("."))
    if args.pages:
        pages = [p for p in pages if p.stem in args.pages]
    if not pages:
        sys.exit(f"no pages found under {args.html}")
    args.out.mkdir(parents=True, exist_ok=True)
    for html in pages:
        height = min(measure_height(binary, html.resolve(), args.width), args.max_height)
        png = args.out / f"{html.stem}.png"
        shoot(binary, html.resolve(), png.resolve(), args.width, height + 50)
        print(f"{png}: {args.width} x {height + 50}")
        if args.tile:
            tile(png, args.tile)


if __name__ == "__main__":
    main()
