"""The one-code-path promise: nothing imports CuPy at import time, and no function hands
one of its array arguments to ``numpy.`` where the backend's ``xp`` belongs."""

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cases import leaves

from nystrom_np import Config, random_model
from nystrom_np.backend import get_xp, to_device, to_numpy

ROOT = Path(__file__).parents[1]
# numpy names that take a dtype or a Python scalar, never an array: fine on any backend.
DTYPE_HELPERS = {"dtype", "float16", "float32", "float64", "int32", "int64", "integer",
                 "floating", "issubdtype", "finfo", "iinfo"}
# Modules that are host-side by nature (files, tokenizer, command line, figures), and the
# measurement layer, which runs the methods on any backend but hands NumPy results back.
HOST_MODULES = {"checkpoint.py", "tokenizer.py", "__main__.py", "sources.py", "pretrained.py",
                "plotting.py", "study.py", "timing.py", "predictions.py"}
# Functions whose array arguments are host arrays by definition: state dicts read from
# files, token ids straight from the tokenizer, and the copy back to the host.
HOST_FUNCTIONS = {"from_state_dict", "_check_tied", "to_numpy", "_top_k"}
# Parameters that hold sizes, seeds or dtypes, never arrays.
SCALAR_PARAMS = {"n", "width", "proj_dim", "seed", "block", "num_features", "num_landmarks",
                 "num_segments", "iterations", "pinv_iterations", "dtype", "rank"}


def modules():
    """The model's modules and the lab's: both run on either backend."""
    return sorted([*(ROOT / "nystrom_np").glob("*.py"), *(ROOT / "nystrom_lab").glob("*.py")])


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.name)
def test_no_top_level_cupy_import(path):
    tree = ast.parse(path.read_text())
    for node in tree.body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        assert not any(n.split(".")[0] in ("cupy", "cupyx") for n in names), (
            f"{path.name} imports CuPy at module level"
        )


def test_importing_the_package_does_not_import_cupy():
    code = "import sys, nystrom_np; print('cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("path", [p for p in modules() if p.name not in HOST_MODULES],
                         ids=lambda p: p.name)
def test_no_numpy_call_on_an_array_argument(path):
    """Inside a function, ``np.f(arg)`` with ``arg`` a parameter would pull a GPU array to
    the host (or fail); such calls must go through ``xp``."""
    offenders = []
    tree = ast.parse(path.read_text())
    host = {id(node) for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef) and f.name in HOST_FUNCTIONS
            for node in ast.walk(f)}
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef) or id(func) in host:
            continue
        params = {a.arg for a in func.args.args + func.args.kwonlyargs} - SCALAR_PARAMS
        for call in ast.walk(func):
            if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                    and isinstance(call.func.value, ast.Name) and call.func.value.id == "np"
                    and call.func.attr not in DTYPE_HELPERS):
                if array_names(call) & params:
                    offenders.append(f"line {call.lineno}: np.{call.func.attr}")
    assert not offenders, f"{path.name}: " + ", ".join(offenders)


def array_names(call):
    """Names passed to a call, except under .shape / .ndim / .dtype / .size (scalars)."""
    names, stack = set(), list(call.args) + [kw.value for kw in call.keywords]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Attribute) and node.attr in ("shape", "ndim", "dtype", "size"):
            continue
        if isinstance(node, ast.Name):
            names.add(node.id)
        stack.extend(ast.iter_child_nodes(node))
    return names


def test_cpu_round_trip_and_get_xp():
    model = random_model(Config.from_dict(dict(vocab_size=20, hidden_size=8,
                                               num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=8, max_position_embeddings=8,
                                               conv_kernel_size=3)))
    assert model.xp is np and get_xp(np.zeros(2), 3.0) is np
    same = model.to("cpu")
    assert same.config == model.config
    assert all(np.array_equal(a, b) for a, b in zip(
        *(leaves(m.params) for m in (model, same)), strict=True))
    assert isinstance(to_numpy(np.ones(3)), np.ndarray)


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="device"):
        to_device({"w": np.zeros(2)}, "tpu")


def test_gpu_request_without_a_usable_cupy_says_why():
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
        pytest.skip("a GPU is present; this test is about machines without one")
    except Exception:
        pass
    with pytest.raises(RuntimeError, match="CuPy|GPU"):
        to_device({"w": np.zeros(2)}, "gpu")
