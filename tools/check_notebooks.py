"""Check that every chapter of the book reads as a notebook in JupyterLab.

Usage::

    python tools/check_notebooks.py [CHAPTER ...] [--no-execute] [--timeout SECONDS]

For every chapter of ``book/_toc.yml`` (or the CHAPTERs named, e.g. ``softmax_attention``):

1. It converts ``book/CHAPTER.md`` to a notebook with jupytext, as JupyterLab's jupytext
   extension does when the file is opened as a notebook.
2. It looks at every Markdown cell for constructs that JupyterLab with jupyterlab-myst
   cannot render: glue roles and directives (``{glue}``, ``{glue:text}``,
   ``{glue:figure}``, ``{paste}``...), which stay holes in JupyterLab because they read
   values that only myst-nb's build stores (numbers in prose must use ``{eval}``), and
   ``literalinclude`` and ``{cite}``, which need the build's files; ``{numref}``, because
   JupyterLab cannot number a figure or table that is a cell's output; and ``{ref}`` or
   ``{eq}`` without words of their own to a target that is not in the chapter's Markdown,
   because JupyterLab renders each notebook on its own (``{ref}`words <label>``` is fine:
   it shows its words).
3. Unless ``--no-execute``, it executes the notebook with nbclient in ``book/`` (as the
   build does), in order, and evaluates each Markdown cell's ``{eval}`` expressions right
   after the cells above it, where JupyterLab's "Run All" evaluates them: an expression
   that fails there would be an error in the page.

Prints every offender (chapter, cell, line, construct) and exits with 1 if there is any.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import jupytext
import nbformat
import yaml
from nbclient import NotebookClient

BOOK = Path(__file__).resolve().parent.parent / "book"

# Roles and directives that only a myst-nb build can fill in.
UNRENDERABLE = [
    (re.compile(r"\{glue(:[a-z]+)?\}"), "glue role or directive: use {eval} instead"),
    (re.compile(r"\{paste\}"), "paste role or directive: use {eval} instead"),
    (re.compile(r"```\{glue"), "glue directive: show the figure in the cell that makes it"),
    # Seen in JupyterLab 4.4 with jupyterlab-myst 2.7: a literalinclude is dropped without
    # a trace and a citation role stays raw text, because neither can read the build's files.
    (re.compile(r"\{literalinclude\}"), "literalinclude: show it with nystrom_lab.pages.source"),
    (re.compile(r"\{cite(:[a-z]+)?\}"), "citation role: link the bibliography page instead"),
    # jupyterlab-myst numbers figure and table directives of Markdown cells only; the book's
    # figures are cell outputs, so a number reference shows its bare label there.
    (re.compile(r"\{numref\}"), "numref: write {ref}`words <label>` instead"),
]
# A reference that takes its text from its target: the target must be in this notebook.
BARE_REFERENCE = re.compile(r"\{(ref|eq)\}`([^`<]+)`")
# Targets a Markdown cell defines: (label)= before a heading, $$ ... $$ (label) after an
# equation, and :name: or :label: options of a directive.
TARGET = re.compile(r"^\s*\((\S+)\)=\s*$|\$\$\s*\(([^()\s]+)\)\s*$|^\s*:(?:name|label):\s*(\S+)")
EVAL = re.compile(r"\{eval\}`([^`]+)`")
# Text that shows MyST rather than being MyST: ``double-backtick`` code spans and fenced
# code blocks (a chapter may show the syntax of an {eval} role as an example).
LITERAL_SPAN = re.compile(r"``.+?``")


def prose(source: str) -> str:
    """A Markdown cell's source without its literal code spans and code blocks.

    Fences are paired line by line: a fence that opens a directive (```` ```{name} ````) is
    kept with its body, a plain code block is dropped.
    """
    kept, fence = [], None  # fence: None outside, else (marker, keep its lines)
    for line in source.splitlines():
        stripped = line.strip()
        if fence is None and stripped.startswith("```"):
            marker = stripped[: len(stripped) - len(stripped.lstrip("`"))]
            fence = (marker, stripped[len(marker) :].startswith("{"))
            if fence[1]:
                kept.append(line)
        elif fence is not None and stripped == fence[0]:
            if fence[1]:
                kept.append(line)
            fence = None
        elif fence is None or fence[1]:
            kept.append(line)
    return LITERAL_SPAN.sub("", "\n".join(kept))


def chapters_of_toc(toc_path: Path) -> list[str]:
    toc = yaml.safe_load(toc_path.read_text(encoding="utf-8"))
    names = []

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                names.append(entry["file"])
            walk(entry.get("sections"))

    for part in toc.get("parts") or [{"chapters": toc.get("chapters")}]:
        walk(part.get("chapters"))
    return names


def markdown_offenders(name: str, notebook) -> list[str]:
    cells = [(index, prose(cell.source).splitlines())
             for index, cell in enumerate(notebook.cells) if cell.cell_type == "markdown"]
    targets = {label for _, lines in cells for line in lines
               for match in TARGET.finditer(line) for label in match.groups() if label}
    found = []
    for index, lines in cells:
        for line_number, line in enumerate(lines, start=1):
            whys = [why for pattern, why in UNRENDERABLE if pattern.search(line)]
            whys += [f"{{{role}}}`{label}` takes its text from a target outside this "
                     "chapter's Markdown, which JupyterLab cannot see: say it in words "
                     "({ref}`words <label>` for a section, figure or table)"
                     for role, label in BARE_REFERENCE.findall(line)
                     if label.strip() not in targets]
            found += [f"{name}: cell {index}, line {line_number}: {why}: {line.strip()[:90]}"
                      for why in whys]
    return found


def with_eval_checks(notebook):
    """A copy of the notebook with a code cell after each Markdown cell that holds {eval}
    expressions; the cell evaluates them in place, so a failing one raises."""
    checked = nbformat.v4.new_notebook(metadata=notebook.metadata)
    count = 0
    for cell in notebook.cells:
        checked.cells.append(cell)
        if cell.cell_type == "markdown":
            expressions = EVAL.findall(prose(cell.source))
            if expressions:
                count += len(expressions)
                source = ["# check_notebooks: the {eval} expressions of the cell above"]
                source += [f"_ = repr({expression})" for expression in expressions]
                checked.cells.append(nbformat.v4.new_code_cell("\n".join(source)))
    return checked, count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chapters", nargs="*")
    parser.add_argument("--no-execute", action="store_true")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args(argv)
    names = args.chapters or chapters_of_toc(BOOK / "_toc.yml")
    offenders = []
    for name in names:
        notebook = jupytext.read(BOOK / f"{name}.md")  # as JupyterLab's jupytext opens it
        offenders += markdown_offenders(name, notebook)
        if args.no_execute:
            continue
        checked, count = with_eval_checks(notebook)
        start = time.perf_counter()
        try:
            NotebookClient(checked, timeout=args.timeout, kernel_name="python3",
                           resources={"metadata": {"path": str(BOOK)}}).execute()
        except Exception as error:  # a cell or an {eval} expression failed
            offenders.append(f"{name}: does not execute as a notebook: "
                             f"{type(error).__name__}: {str(error).strip()[-600:]}")
            continue
        print(f"{name}: executed as .ipynb in {time.perf_counter() - start:.0f} s; "
              f"{count} {{eval}} expressions evaluated", flush=True)
    for line in offenders:
        print("OFFENDER", line)
    print(f"{len(names)} chapters checked, {len(offenders)} offenders")
    return 1 if offenders else 0


if __name__ == "__main__":
    sys.exit(main())
