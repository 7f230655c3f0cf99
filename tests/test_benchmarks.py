"""Smoke tests of benchmarks/ (tiny sizes, so the scripts keep working).

No test here times anything: the benchmarks measure, the tests only check that they run
and report what they promise (a table and one JSON line with every figure).
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from nystrom_np import Config

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


def test_tricks_script_restores_every_trick(capsys):
    import nystrom_np.model as model_module

    before = {name: getattr(model_module, name)
              for name in ("depthwise_conv", "ACTIVATION_ROWS", "softmax", "linear")}
    result = load_script("tricks").main(["--tiny", "--repeats", "1", "--clock", "cpu"])
    assert last_json_line(capsys) == json.loads(json.dumps(result))
    tricks = {(r["attention"], r["trick"]) for r in result["results"]}
    assert tricks == {("hf", "conv"), ("hf", "activation"), ("hf", "softmax"), ("hf", "bias"),
                      ("nystrom", "conv"), ("nystrom", "activation"), ("nystrom", "bias")}
    for row in result["results"]:
        assert row["trick_ms"] > 0 and row["plain_ms"] > 0 and row["trick_mib"] > 0
    assert all(getattr(model_module, name) is value for name, value in before.items())


def test_limit_script(capsys):
    result = load_script("limit").main(["--tiny", "--repeats", "1"])
    assert last_json_line(capsys)["benchmark"] == "limit"
    (row,) = result["results"]
    assert row["peak_gflops"] > 0 and row["limit_ms"] > 0
    assert 0 < row["share_of_limit"] and 0 < row["products_share"]
    if load_script("_common").has_torch():  # transformers' forward, same run, same limit
        assert row["torch"]["median_ms"] > 0
        assert row["torch_share_of_limit"] > 0 and row["products_vs_target"] > 0
    else:
        assert "torch" not in row


def test_long_script(capsys):
    result = load_script("long").main(["--tiny", "--repeats", "1", "--no-memory"])
    assert last_json_line(capsys)["benchmark"] == "long"
    names = [row["name"] for row in result["results"]]
    assert names[:2] == ["nystrom", "exact"] and names[-1] == "nystrom products"
    if load_script("_common").has_torch():  # transformers as it runs the 4096 model: exact
        assert names[2] == "transformers"
    assert result["results"][0]["time_vs_nystrom"] == 1
    assert result["flops"]["exact"]["attention"] > 0


def test_long_script_memory_and_landmark_path(capsys):
    """Peak memory of every side, and transformers' landmark path on its modified config."""
    needs_torch()
    result = load_script("long").main(["--tiny", "--repeats", "1", "--torch-landmark"])
    rows = {row["name"]: row for row in result["results"]}
    assert list(rows) == ["nystrom", "exact", "transformers", "transformers landmark",
                          "nystrom products"]  # fmt: skip
    for name in ("nystrom", "exact", "transformers", "transformers landmark"):
        assert rows[name]["peak_mb"] >= 0 and rows[name]["median_ms"] > 0
    assert "transformers runs nystromformer-4096 with exact attention" in capsys.readouterr().out


def test_fill_mask_script(capsys):
    needs_torch()
    pytest.importorskip("sentencepiece")
    result = load_script("fill_mask").main(["--tiny", "--repeats", "1"])
    assert last_json_line(capsys)["benchmark"] == "fill_mask"
    assert [row["text"] for row in result["results"]] == ["short", "long"]
    for row in result["results"]:
        assert row["same_top5"], row  # the same weights and tokenizer give the same tokens
        assert row["time_ratio"] > 0
        assert row["products_ms"] > 0 and row["products_vs_target"] > 0


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


@pytest.mark.parametrize("attention, length", [("exact", 12), ("nystrom", 12), ("nystrom", 13)])
def test_products_run_the_forward_shapes(attention, length):
    """The products-only stand-in of a forward runs for both modes; at N = 13 the 4
    landmarks' segments are uneven, which adds the segment means' (M, N) products."""
    common = load_script("_common")
    config = common.config_dict(tiny=True)
    run = common.products(config, 2, length, attention, num_landmarks=4)
    assert run() is None
