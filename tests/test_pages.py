"""What a chapter shows: function sources and tables, as Markdown that renders in the book
and in JupyterLab."""

import functools
import importlib.util
import inspect
import math

import pytest

import nystrom_np.model
from nystrom_lab import study
from nystrom_lab.pages import number, source, table


def code_of(markdown):
    """The code inside the one fenced block of a ``source`` output."""
    text = markdown.data
    return text[text.index("```python\n") + len("```python\n") : text.rindex("\n```")]


@pytest.mark.parametrize("name", ["softmax", "softmax_attention", "nystrom_attention", "forward"])
def test_source_shows_the_function_as_python_has_it(name):
    shown = source("nystrom_np/model.py", name)
    assert code_of(shown) == inspect.getsource(getattr(nystrom_np.model, name)).rstrip("\n")
    first = inspect.getsourcelines(getattr(nystrom_np.model, name))[1]
    assert shown.data.startswith(f"`nystrom_np/model.py`, lines {first}–")


def test_source_shows_a_top_level_assignment():
    code = code_of(source("nystrom_lab/study.py", "ATTENTION"))
    assert code.startswith("ATTENTION = {") and code.endswith("}")
    assert all(f'"{method}"' in code for method in study.ATTENTION)


@pytest.mark.parametrize("name", ["soft", "max", "Softmax", "np"])
def test_source_refuses_a_name_the_file_does_not_define(name):
    with pytest.raises(ValueError, match=f"no top-level function, class or name '{name}'"):
        source("nystrom_np/model.py", name)


@pytest.mark.parametrize(("x", "shown"), [(1234.4, "1234"), (150.0, "150"), (12.345, "12.3"),
                                          (0.012345, "0.0123"), (math.nan, ""), (None, "")])
def test_number_fits_a_narrow_column(x, shown):
    assert number(x) == shown


def test_table_is_markdown_with_a_caption_and_a_target_when_named():
    plain = table(["method", "M"], [["exact", 1], ["Nyström", 64]]).data
    assert plain.splitlines() == ["| method | M |", "|---|---:|", "| exact | 1 |",
                                  "| Nyström | 64 |"]
    named = table(["a"], [[1]], name="tab-x", caption="A caption.").data
    assert named.splitlines() == ["(tab-x)=", "*A caption.*", "", "| a |", "|---|", "| 1 |"]



@functools.cache
def notebook_checker():
    """``tools/check_notebooks.py`` as a module, loaded once."""
    from nystrom_lab.pages import ROOT

    spec = importlib.util.spec_from_file_location("check_notebooks",
                                                  ROOT / "tools" / "check_notebooks.py")
    checker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checker)
    return checker


def markdown_offenders(text):
    """What ``tools/check_notebooks.py`` finds in a chapter whose Markdown is ``text``."""
    jupytext = pytest.importorskip("jupytext")
    pytest.importorskip("nbclient")
    notebook = jupytext.reads(text, fmt="md:myst")
    return notebook_checker().markdown_offenders("chapter", notebook)


CHAPTER = """\
(sec-here)=
# A chapter

$$ x = 1 $$ (eq-here)

```{figure} picture.png
:name: fig-here

A caption.
```

```{code-cell} ipython3
print(1)
```

"""


@pytest.mark.parametrize("line", [
    "See {numref}`fig-output`.",
    "As in section {ref}`sec-elsewhere`.",
    "From {eq}`eq-elsewhere`.",
])
def test_the_notebook_check_flags_references_jupyterlab_cannot_render(line):
    found = markdown_offenders(CHAPTER + line + "\n")
    assert len(found) == 1 and line in found[0]


@pytest.mark.parametrize("line", [
    "See {ref}`the figure above <fig-output>`.",
    "As in section {ref}`sec-here`, {eq}`eq-here` and {ref}`fig-here`.",
    "The syntax is ``{numref}`fig-output` ``, shown, not used.",
])
def test_the_notebook_check_passes_references_jupyterlab_renders(line):
    assert markdown_offenders(CHAPTER + line + "\n") == []
