"""Small helpers for the book's figures: the machine a figure was made on, power-law fits.

The book's captions state their setup from code, never by hand: ``hardware()`` names the
CPU (and the GPU when CuPy sees one), the core count and the library versions. Scaling
plots are log-log; ``fit_power_law`` fits the straight line they show.
"""

import os
import platform
from pathlib import Path

import numpy as np


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), or the best the OS tells."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def gpu_name() -> str | None:
    """The name of the GPU CuPy would use, or None when there is none (or no CuPy)."""
    try:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # no CuPy, no driver, no device: all mean "no GPU here"
        return None


def hardware(gpu=False) -> str:
    """One line for a caption: CPU model, cores, and NumPy's version (and the GPU if asked).

    Parameters
    ----------
    gpu : also name the GPU (or say there is none)
    """
    cores = os.cpu_count() or 0
    text = (
        f"{cpu_name()} ({platform.machine()}, {cores} logical core{'s' * (cores != 1)}), "
        f"Python {platform.python_version()}, NumPy {np.__version__}"
    )
    if gpu:
        name = gpu_name()
        text += f", GPU: {name}" if name else ", no GPU"
    return text


def fit_power_law(x, y):
    """Least-squares fit of log y = slope * log x + log c; returns ``(slope, c)``.

    Parameters
    ----------
    x, y : 1-D arrays of positive numbers, the same length (at least 2)

    Returns
    -------
    slope, c : floats, so that y ~ c * x ** slope
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size < 2:
        raise ValueError(
            f"x and y must be 1-D of the same length >= 2, got {x.shape} and {y.shape}."
        )
    if (x <= 0).any() or (y <= 0).any():
        raise ValueError("a power law is fitted on a log-log scale: x and y must be > 0.")
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return float(slope), float(np.exp(intercept))


def log_ticks(ax, values, axis="x"):
    """Label a log axis exactly at ``values`` (e.g. the measured N), with no minor labels."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(FixedLocator(list(values)))
    target.set_major_formatter(lambda v, _: f"{v:g}")
    target.set_minor_locator(NullLocator())
    target.set_minor_formatter(NullFormatter())
