"""Smoke tests of benchmarks/ (tiny sizes, so the scripts keep working), and of the speed
work in the package: the in-place and reshaped fast forms give the plain formulas' values
and never write into their inputs.

No test here times anything: the benchmarks measure, the tests only check that they run
and report what they promise (a table and one JSON line with every figure).
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from nystrom_np import Config, random_model
from nystrom_np.attention import nystrom_attention, softmax, softmax_attention
from nystrom_np.layers import depthwise_conv, gelu_new, layer_norm, linear

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(name):
    """Import benchmarks/<name>.py as a module (the scripts import ``_common`` beside them)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def last_json_line(capsys):
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert len(lines) > 3, out  # a table came first
    return json.loads(lines[-1])


def needs_torch():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")


# ----------------------------------------------------------------------- the scripts


def test_forward_script(capsys):
    needs_torch()
    result = load_script("forward").main(["--tiny", "--repeats", "1", "--cases", "1x8"])
    assert last_json_line(capsys) == json.loads(json.dumps(result))
    (row,) = result["results"]
    assert (row["batch"], row["length"]) == (1, 8)
    assert row["max_abs_logit_difference"] < 1e-5  # both sides computed the same logits
    assert row["time_ratio"] > 0 and math.isfinite(row["time_ratio"])
    for side in ("nystrom_np", "transformers"):
        memory = row[side]["memory"]
        assert memory["peak_mb"] >= 0 and memory["baseline_mb"] > 0
    assert row["nystrom_np"]["memory"]["tracemalloc_peak_mb"] > 0
    assert result["machine"]["threads"] >= 1 and "torch" in result["machine"]


def test_limit_script(capsys):
    result = load_script("limit").main(["--tiny", "--repeats", "1"])
    assert last_json_line(capsys)["benchmark"] == "limit"
    (row,) = result["results"]
    assert row["peak_gflops"] > 0 and row["limit_ms"] > 0
    assert 0 < row["share_of_limit"] and 0 < row["products_share"]


def test_long_script(capsys):
    result = load_script("long").main(["--tiny", "--repeats", "1", "--no-memory"])
    assert last_json_line(capsys)["benchmark"] == "long"
    names = [row["name"] for row in result["results"]]
    assert names[:2] == ["nystrom", "exact"]
    assert result["results"][0]["time_vs_nystrom"] == 1
    assert result["flops"]["exact"]["attention"] > 0


def test_fill_mask_script(capsys):
    needs_torch()
    pytest.importorskip("sentencepiece")
    result = load_script("fill_mask").main(["--tiny", "--repeats", "1"])
    assert last_json_line(capsys)["benchmark"] == "fill_mask"
    assert [row["text"] for row in result["results"]] == ["short", "long"]
    for row in result["results"]:
        assert row["same_top5"], row  # the same weights and tokenizer give the same tokens
        assert row["time_ratio"] > 0


def test_common_helpers():
    """The scripts' timing is ``timing.compare`` (warm-up, then rotating rounds), and their
    JSON line carries every figure under the same top-level keys."""
    common = load_script("_common")
    assert common.parse_cases("1x128,8X64") == [(1, 128), (8, 64)]
    calls = []
    times = common.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 2)
    assert calls == ["a", "b", "a", "b", "b", "a"]  # one warm-up each, then the order rotates
    for figures in times.values():
        assert len(figures["times_ms"]) == 2
        assert figures["min_ms"] <= figures["median_ms"] <= figures["max_ms"]
    info = common.machine(1)
    assert info["threads"] == 1 and info["usable_cpus"] >= 1 and info["cpu"]
    args = common.arguments("test", repeats=3).parse_args(["--tiny"])
    result = common.json_line("test", info, args, [{"x": 1}], extra=2)
    assert list(result) == ["benchmark", "machine", "repeats", "tiny", "extra", "results"]
    assert result["repeats"] == 3 and result["tiny"] and result["results"] == [{"x": 1}]


def test_flop_count_of_the_real_config():
    common = load_script("_common")
    flops = common.forward_flops(Config().to_dict(), 1, 510)
    # 12 layers x 510 tokens x 2 x (768 x 2304 + 768^2 + 2 x 768 x 3072), plus attention,
    # conv and head: the ~121 GFLOP of issue 5.
    assert sum(flops.values()) == pytest.approx(120.935e9, rel=1e-4)
    nystrom = common.forward_flops(Config().to_dict(), 1, 4096, "nystrom", 64)
    exact = common.forward_flops(Config().to_dict(), 1, 4096, "exact")
    assert nystrom["attention"] < exact["attention"] / 10
    assert nystrom["feed_forward"] == exact["feed_forward"]


# ------------------------------------------------- fast forms equal the plain formulas


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_gelu_new_equals_its_formula_and_keeps_its_input(rng):
    x = rng.standard_normal((3, 5, 7)) * 4
    before = x.copy()
    plain = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(gelu_new(x), plain, rtol=1e-14, atol=1e-15)
    np.testing.assert_array_equal(x, before)
    assert gelu_new(x.astype(np.float32)).dtype == np.float32


def test_layer_norm_equals_its_formula_and_keeps_its_input(rng):
    x = rng.standard_normal((2, 6, 16)) * 3 + 1
    g, b = rng.standard_normal(16), rng.standard_normal(16)
    before = x.copy()
    plain = g * (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) + b
    np.testing.assert_allclose(layer_norm(x, g, b, 1e-5), plain, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(x, before)
    x32 = x.astype(np.float32)
    assert layer_norm(x32, g.astype(np.float32), b.astype(np.float32), 1e-5).dtype == np.float32


def test_linear_folds_the_batch_into_one_product(rng):
    x = rng.standard_normal((3, 4, 5))
    w, b = rng.standard_normal((5, 6)), rng.standard_normal(6)
    np.testing.assert_allclose(linear(x, w, b), np.einsum("bni,io->bno", x, w) + b, atol=1e-13)
    np.testing.assert_allclose(linear(x[0, 0], w, b), x[0, 0] @ w + b, atol=1e-13)  # 1-D
    x_view = x.transpose(1, 0, 2)  # not contiguous
    np.testing.assert_allclose(linear(x_view, w, b), x_view @ w + b, atol=1e-13)


def test_softmax_in_place_equals_a_new_array(rng):
    x = rng.standard_normal((2, 3, 4, 5)) * 10
    expected = np.exp(x - x.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    before = x.copy()
    np.testing.assert_allclose(softmax(x), expected, rtol=1e-14)
    np.testing.assert_array_equal(x, before)  # a new array by default
    out = softmax(x, out=x)
    assert out is x
    np.testing.assert_allclose(x, expected, rtol=1e-14)


def test_attention_keeps_its_inputs(rng):
    q, k, v = (rng.standard_normal((2, 3, 12, 4)) for _ in range(3))
    mask = np.ones((2, 12), bool)
    mask[1, 9:] = False
    copies = [a.copy() for a in (q, k, v)]
    softmax_attention(q, k, v, mask)
    nystrom_attention(q, k, v, mask, num_landmarks=3)
    depthwise_conv(v, rng.standard_normal((3, 5)))
    for a, before in zip((q, k, v), copies, strict=True):
        np.testing.assert_array_equal(a, before)


def test_depthwise_conv_equals_shifted_sums(rng):
    """The banded matmul form against K shifted adds (the plain definition)."""
    v, w = rng.standard_normal((2, 3, 70, 4)), rng.standard_normal((3, 9))
    k = w.shape[1]
    padded = np.pad(v, ((0, 0), (0, 0), (k // 2, k // 2), (0, 0)))
    plain = sum(w[None, :, t, None, None] * padded[:, :, t : t + 70] for t in range(k))
    np.testing.assert_allclose(depthwise_conv(v, w), plain, atol=1e-12)


def test_forward_does_not_write_into_the_model(rng):
    from nystrom_np import forward

    config = Config.from_dict(dict(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=24,
                                   max_position_embeddings=20, conv_kernel_size=3))
    model = random_model(config, seed=3)
    before = [a.copy() for a in _leaves(model.params)]
    forward(model, rng.integers(0, 50, (2, 9)), attention="nystrom", num_landmarks=3)
    forward(model, rng.integers(0, 50, (2, 9)))
    for a, b in zip(_leaves(model.params), before, strict=True):
        np.testing.assert_array_equal(a, b)


def _leaves(tree):
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _leaves(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in _leaves(v)]
    return [] if tree is None else [tree]
