"""Tests of nystrom_lab.timing at tiny sizes: what is measured, never how fast.

No assertion here depends on a time. Peak memories do not depend on the machine's load
(tracemalloc counts the bytes NumPy allocates), so they are asserted, with margins for the
small arrays each method allocates besides its main ones.
"""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from nystrom_lab import timing
from nystrom_lab.approximations import blocked_attention
from nystrom_np import Config, nystrom_attention, softmax_attention

ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = Config(vocab_size=100, hidden_size=32, num_attention_heads=4,
                     intermediate_size=48, conv_kernel_size=5)  # fmt: skip


def peak_of(fn, *args, **kwargs):
    return timing.peak_memory(lambda: fn(*args, **kwargs))[0]


# ---------------------------------------------------------------------------- peak memory


def test_peak_memory_counts_a_known_allocation():
    peak, out = timing.peak_memory(lambda: np.ones(1_000_000))  # 8 000 000 bytes
    assert out.shape == (1_000_000,)
    assert 8_000_000 <= peak < 8_000_000 + 64 * 1024


def test_peak_memory_leaves_out_what_was_held_before_and_sees_freed_temporaries():
    held = np.ones(2_000_000)  # 16 MB allocated before the call: not counted

    def temporaries():
        big = np.ones(1_000_000)  # 8 MB, freed before the call returns
        del big
        return np.ones(10)

    peak, _ = timing.peak_memory(temporaries)
    assert 8_000_000 <= peak < 8_000_000 + 64 * 1024
    assert held.sum() == 2_000_000


def test_exact_attention_peak_grows_as_n_squared_and_nystrom_as_n():
    def qkv(n, d=16):
        return np.random.default_rng(0).standard_normal((3, 1, 1, n, d), dtype=np.float32)

    exact = [peak_of(softmax_attention, *qkv(n)) for n in (512, 1024)]
    # One float32 N x N score array (the softmax is in place) plus a few N x D arrays.
    assert 1024**2 * 4 <= exact[1] < 1.3 * 1024**2 * 4
    assert 3.5 < exact[1] / exact[0] < 4.2
    nystrom = [peak_of(nystrom_attention, *qkv(n), num_landmarks=16) for n in (1024, 2048)]
    assert 1.7 < nystrom[1] / nystrom[0] < 2.3
    assert nystrom[1] < exact[1] / 4  # at N = 2048 vs exact at 1024, still far below
    blocked = peak_of(blocked_attention, *qkv(1024), block=128)
    assert blocked < exact[1] / 8  # tiles of 128 x 128, never an N x N array


# -------------------------------------------------------------------- side-by-side timing


def test_compare_runs_each_candidate_warmup_plus_repeats_times():
    calls = {"a": 0, "b": 0}

    def make(name, size):
        def run():
            calls[name] += 1
            return np.zeros(size)

        return run

    result = timing.compare({"a": make("a", 1000), "b": make("b", 100_000)}, repeats=3)
    assert calls == {"a": 4, "b": 4}
    for name in ("a", "b"):
        r = result[name]
        assert len(r["times_ms"]) == 3
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]
    assert result["b"]["peak_mib"] * 2**20 >= 800_000 > result["a"]["peak_mib"] * 2**20


def test_compare_without_memory_and_bad_repeats():
    result = timing.compare({"x": lambda: 1}, repeats=1, memory=False)
    assert "peak_mib" not in result["x"] and len(result["x"]["times_ms"]) == 1
    with pytest.raises(ValueError, match="repeats"):
        timing.compare({"x": lambda: 1}, repeats=0)


def test_blas_threads_sets_and_restores_the_limit():
    pytest.importorskip("threadpoolctl")
    before = [b["threads"] for b in timing.blas_thread_counts()]
    with timing.blas_threads(1):
        assert all(b["threads"] == 1 for b in timing.blas_thread_counts())
    assert [b["threads"] for b in timing.blas_thread_counts()] == before


# ------------------------------------------------------------------------------- sweeps


def test_attention_methods_agree_with_exact_where_they_should():
    methods = timing.attention_methods(landmarks=(8,), proj_dim=8, num_features=8, window=9,
                                       block=16)
    assert list(methods) == ["exact", "nystrom-8", "blocked-16", "linformer-8",
                             "performer-8", "window-9"]
    q, k, v = timing.attention_inputs(40, batch=1, heads=2, head_size=8, dtype=np.float64)
    exact = methods["exact"](q, k, v)
    for name, fn in methods.items():
        out = fn(q, k, v)
        assert out.shape == (1, 2, 40, 8) and np.isfinite(out).all(), name
    np.testing.assert_allclose(methods["blocked-16"](q, k, v), exact, atol=1e-12)


def test_attention_sweep_rows_respect_caps_and_budgets():
    methods = timing.attention_methods(landmarks=(8, 32), proj_dim=8, num_features=8,
                                       window=24, block=16)
    rows = timing.attention_sweep([16, 32], methods, {"exact": 16}, repeats=1, heads=2,
                                  head_size=8, threads=1, progress=False)
    ran = {(r["method"], r["n"]) for r in rows}
    assert ("exact", 16) in ran and ("exact", 32) not in ran  # capped
    assert ("nystrom-32", 16) not in ran and ("nystrom-32", 32) in ran  # needs N >= M
    assert ("window-24", 16) not in ran and ("window-24", 32) in ran  # needs N >= W
    for r in rows:
        assert r["peak_mib"] > 0 and r["median_ms"] > 0
        assert (r["batch"], r["heads"], r["head_size"], r["dtype"]) == (1, 2, 8, "float32")


def test_model_sweep_runs_both_modes():
    rows = timing.model_sweep([32], num_layers=1, landmarks=8, repeats=1, threads=1,
                              progress=False, config=TINY_CONFIG, with_attention=True)
    assert sorted(r["method"] for r in rows) == [
        "exact", "exact:attention", "nystrom-8", "nystrom-8:attention"]
    assert all(r["n"] == 32 and r["layers"] == 1 and r["peak_mib"] > 0 for r in rows)


# ---------------------------------------------------------------------------- summaries


def synthetic_rows():
    """exact ~ N^2 / 1000 ms, fast ~ N / 4 ms: they cross at N = 250."""
    rows = []
    for n in (64, 128, 256, 512, 1024):
        rows.append({"method": "exact", "n": n, "median_ms": n**2 / 1000, "peak_mib": 4.0 * n})
        rows.append({"method": "fast", "n": n, "median_ms": n / 4, "peak_mib": 1.0 * n})
    return rows


def test_fit_slopes_ratio_and_pivot():
    rows = synthetic_rows()
    slopes = timing.fit_slopes(rows, min_length=128)
    assert slopes["exact"] == pytest.approx(2) and slopes["fast"] == pytest.approx(1)
    assert timing.fit_slopes(rows, min_length=1024) == {"exact": None, "fast": None}
    assert timing.ratio(rows, "exact", "fast", 512) == pytest.approx(512**2 / 1000 / 128)
    assert timing.ratio(rows, "exact", "fast", 512, "peak_mib") == pytest.approx(4)
    assert timing.ratio(rows, "exact", "fast", 4096) is None
    lengths, methods, values = timing.pivot(rows[:-1])  # fast at 1024 left out
    assert lengths == [64, 128, 256, 512, 1024] and methods == ["exact", "fast"]
    assert math.isnan(values[-1, 1]) and values[0, 0] == pytest.approx(64**2 / 1000)


def test_crossover_between_below_above():
    rows = synthetic_rows()
    n, where = timing.crossover(rows, "exact", "fast")
    assert where == "between" and n == pytest.approx(250)  # exact on log-log for power laws
    assert timing.crossover(rows, "exact", "fast", key="peak_mib") == (64.0, "below")
    assert timing.crossover(rows, "fast", "exact", key="peak_mib") == (1024.0, "above")
    assert timing.crossover(rows, "exact", "missing") == (None, "none")


def test_paper_ratios_match_reference():
    memory, time = timing.paper_ratios()[4096]
    assert memory == pytest.approx(2620 / 229) and time == pytest.approx(32.9 / 5.9)
    memory, time = timing.paper_ratios()[8192]
    assert round(memory, 1) == 22.7 and round(time, 1) == 12.6


def test_table_formats_missing_values():
    text = timing.table([{"a": 1.234, "b": None}], [("A", "a", "{:.1f}"), ("B", "b", "{}")])
    assert text.splitlines()[-1].split() == ["1.2", "-"]


# --------------------------------------------------------------------- benchmark script


def test_benchmark_script_smoke(capsys):
    path = ROOT / "benchmarks" / "attention_scaling.py"
    spec = importlib.util.spec_from_file_location("attention_scaling", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    result = script.main(["--tiny", "--device", "cpu", "--threads", "1", "--no-progress"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["benchmark"] == "attention_scaling" and printed["tiny"]
    cpu = result["devices"]["cpu"]
    assert {r["method"] for r in cpu["attention"]} >= {"exact", "nystrom-8", "blocked-32"}
    assert {r["method"] for r in cpu["model"]} == {
        "exact", "nystrom-16", "exact:attention", "nystrom-16:attention"}
    assert set(cpu["summary"]["ratios"]) == {"4096", "8192"}


# ---------------------------------------------------------------------------------- GPU


def test_gpu_sweep_and_memory():
    ok, why = timing.gpu_available()
    if not ok:
        pytest.skip(f"no GPU: {why}")
    import cupy

    peak, _ = timing.peak_memory(lambda: cupy.ones(1_000_000, dtype=cupy.float64), "gpu")
    assert 8_000_000 <= peak < 8_000_000 + 4 * 2**20
    rows = timing.attention_sweep([64], timing.attention_methods(landmarks=(8,), proj_dim=8,
                                  num_features=8, window=9, block=16), repeats=1, heads=2,
                                  head_size=8, device="gpu", progress=False)
    assert {r["device"] for r in rows} == {"gpu"} and all(r["peak_mib"] > 0 for r in rows)
