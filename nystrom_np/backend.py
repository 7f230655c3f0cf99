"""Array-module choice: NumPy on the CPU, CuPy on a GPU, one code path for both.

Every function of the package asks its inputs which module they belong to
(``get_xp(x)``) and calls ``xp.`` functions only. CuPy is imported lazily, the first
time a GPU is asked for, never when the package is imported.
"""

import functools

import numpy as np

DEVICES = ("cpu", "gpu")


def get_xp(*arrays):
    """The array module (``numpy`` or ``cupy``) the given arrays live in."""
    for a in arrays:
        module = type(a).__module__
        if module.startswith("cupy"):
            import cupy

            return cupy
    return np


def cupy_or_raise():
    """Import CuPy and check that it can compute on a GPU, or raise a RuntimeError that says
    what is missing: CuPy itself, a GPU (or its driver), or the CUDA libraries CuPy loads."""
    try:
        import cupy
    except ImportError:
        raise RuntimeError(
            "device='gpu' needs CuPy, which is not installed. Install the wheel that "
            "matches the CUDA version `nvidia-smi` shows: `pip install 'cupy-cuda12x[ctk]'` "
            "(CUDA 12) or `pip install 'cupy-cuda13x[ctk]'` (CUDA 13)."
        ) from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CuPy raises its own CUDARuntimeError, or fails to load the driver
        raise RuntimeError(
            f"CuPy is installed but cannot reach a GPU ({type(e).__name__}: {e}). "
            "Check the NVIDIA driver (`nvidia-smi`) and that the CuPy wheel matches its CUDA."
        ) from None
    if count == 0:
        raise RuntimeError("CuPy is installed but no GPU is visible (getDeviceCount() == 0).")
    _check_cuda_libraries(cupy)
    return cupy


@functools.cache  # once per process; a failure is not cached, so it is checked again
def _check_cuda_libraries(cupy):
    """Run one tiny kernel, matrix product and SVD: CuPy loads NVRTC, cuBLAS and cuSOLVER
    lazily, so a wheel installed without them fails only at the first real computation."""
    try:
        a = cupy.arange(4, dtype=cupy.float32).reshape(2, 2) + 1  # an element-wise kernel
        float((a @ a).sum() + cupy.linalg.svd(a)[1].sum())
    except Exception as e:  # ImportError, CUDARuntimeError, CompileException, ...
        raise RuntimeError(
            f"CuPy sees a GPU but cannot compute on it ({type(e).__name__}: {e}). Its CUDA "
            "libraries are probably missing: install them with the wheel, `pip install "
            "'cupy-cuda12x[ctk]'` (or 'cupy-cuda13x[ctk]'), or install the CUDA Toolkit."
        ) from None


def to_device(tree, device: str):
    """Copy every array of a nested dict/list/tuple to ``device`` ("cpu" or "gpu")."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}.")
    if device == "gpu":
        cupy = cupy_or_raise()
        return map_arrays(cupy.asarray, tree)
    return map_arrays(to_numpy, tree)


def to_numpy(x):
    """A NumPy array of ``x`` (a copy from the GPU for CuPy arrays, ``x`` itself otherwise)."""
    if get_xp(x) is not np:
        return x.get()
    return np.asarray(x)


def map_arrays(fn, tree):
    """Apply ``fn`` to every array leaf of a nested dict/list/tuple; other leaves are kept."""
    if isinstance(tree, dict):
        return {k: map_arrays(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_arrays(fn, v) for v in tree)
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        return fn(tree)
    return tree


def erf(x):
    """The error function on either backend (NumPy has none of its own)."""
    if get_xp(x) is np:
        from scipy.special import erf as _erf
    else:
        from cupyx.scipy.special import erf as _erf
    return _erf(x)
