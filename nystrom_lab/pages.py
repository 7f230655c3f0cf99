"""What a chapter shows besides figures: the source of a function, and tables of results.

Both come out as Markdown outputs of a code cell, which the built book renders as MyST
(``nb_render_markdown_format: myst`` in ``_config.yml``) and JupyterLab renders as it is,
so a chapter opened as a notebook shows them too (a ``literalinclude`` directive or a
table built in the prose would be blank there).
"""

import ast
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository: nystrom_np/, nystrom_lab/


def source(path, name):
    """The source of the function, class or assignment ``name`` in ``path`` (relative to the
    repository), as a Python code block under a line that says where it lives.

    Reads the file as it is now, so the page shows the code that ran, not a copy.
    """
    from IPython.display import Markdown

    file = ROOT / path
    text = file.read_text(encoding="utf-8")
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        elif isinstance(node, ast.Assign):
            names, first = [t.id for t in node.targets if isinstance(t, ast.Name)], node.lineno
        else:
            continue
        if name in names:
            code = "\n".join(text.splitlines()[first - 1 : node.end_lineno])
            where = f"`{path}`, lines {first}–{node.end_lineno}:"
            return Markdown(f"{where}\n\n```python\n{code}\n```")
    raise ValueError(f"{path} defines no top-level function, class or name {name!r}.")


def number(x) -> str:
    """Three significant figures at most and no exponent, to fit a narrow column; NaN is
    an empty cell (a run that was not made)."""
    if x is None or math.isnan(float(x)):
        return ""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def table(header, rows, *, name=None, caption=None):
    """A Markdown table: ``header`` a list of column titles, ``rows`` lists of cells.

    The first column is left-aligned, the others right-aligned (numbers). With ``name`` and
    ``caption``, the caption goes above the table in italics, under a target the prose links
    to with ``{ref}`words <name>```. Not a numbered MyST ``table``: JupyterLab renders each
    output on its own and would number every table of a chapter "Table 1".
    """
    from IPython.display import Markdown

    lines = ["| " + " | ".join(map(str, header)) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    body = "\n".join(lines)
    if name is None:
        return Markdown(body)
    return Markdown(f"({name})=\n*{caption}*\n\n{body}\n")
