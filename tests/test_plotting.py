"""The book's figure helpers: hardware description and power-law fits."""

import os

import numpy as np
import pytest

from nystrom_lab import plotting


def test_fit_power_law_recovers_slope_and_prefactor():
    x = np.array([128, 256, 512, 1024, 2048])
    slope, c = plotting.fit_power_law(x, 3e-9 * x**2.0)
    assert slope == pytest.approx(2.0, abs=1e-12)
    assert c == pytest.approx(3e-9, rel=1e-9)


def test_fit_power_law_with_noise_is_close():
    rng = np.random.default_rng(0)
    x = np.geomspace(100, 10000, 20)
    y = 5 * x**1.5 * np.exp(rng.normal(0, 0.01, x.size))
    slope, _ = plotting.fit_power_law(x, y)
    assert slope == pytest.approx(1.5, abs=0.02)


@pytest.mark.parametrize(
    "x, y", [([1, 2], [1, 0]), ([1, -2], [1, 2]), ([1], [1]), ([1, 2, 3], [1, 2])]
)
def test_fit_power_law_rejects_bad_input(x, y):
    with pytest.raises(ValueError):
        plotting.fit_power_law(x, y)


def test_hardware_names_cores_and_numpy():
    text = plotting.hardware()
    assert f"{os.cpu_count()} logical core" in text
    assert f"NumPy {np.__version__}" in text
    assert plotting.cpu_name() in text


def test_hardware_reports_the_gpu_or_its_absence():
    text = plotting.hardware(gpu=True)
    name = plotting.gpu_name()
    assert (f"GPU: {name}" in text) if name else text.endswith(", no GPU")


def test_log_ticks_labels_exactly_the_values():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.loglog([128, 4096], [1, 2])
    plotting.log_ticks(ax, [128, 512, 4096])
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["128", "512", "4096"]
    assert ax.xaxis.get_minor_locator().tick_values(128, 4096) == []
    plt.close(fig)
