"""The GPU path: the same functions on CuPy arrays give the NumPy path's numbers, and their
results stay on the device until ``to_numpy`` brings them back (issue 8).

On a machine with an NVIDIA GPU (CUDA 13 driver; for CUDA 12 use cupy-cuda12x and a
CUDA 12 build of torch, see README):

    pip install -r requirements.txt ".[test]" "cupy-cuda13x[ctk]" \
        && python -m pytest tests/test_gpu.py -v && python benchmarks/gpu.py

Without a usable GPU the tests that need one skip and say why (no CuPy, no device or
driver, missing CUDA libraries: ``backend.cupy_or_raise``'s message). Four tests need no
GPU and run everywhere: the benchmark's clear refusal where there is none, no module
importing CuPy, a CPU emulation of a device that fails on every host round trip inside
``forward``, and a check that the approximation cases below cover every function of
``nystrom_lab.approximations``.

Tolerances: float32 logits of the real config (``random_model(Config())``, N = 510) agree
to 1e-4 (the issue's bound; max |logit| is about 3); float64 results of small configs to
1e-9. ``pinv="exact"`` is compared in float64 only: the SVD pseudo-inverse of the
near-singular landmark matrix A of a random model is ill-conditioned, so in float32 the
rank cut-off and the amplified round-off differ between any two implementations (on the
CPU alone, float32 and float64 logits differ by about 0.5 at the real config).
"""

import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nystrom_np.model as model_module
from nystrom_lab import approximations
from nystrom_np import (
    Config,
    encode,
    exact_pinv,
    forward,
    get_xp,
    iterative_pinv,
    nystrom_attention,
    random_model,
    segment_means,
    softmax,
    softmax_attention,
    to_numpy,
    to_state_dict,
)
from nystrom_np.backend import cupy_or_raise, map_arrays

ROOT = Path(__file__).parents[1]


def _usable_cupy():
    """(cupy, None) where CuPy can compute on a GPU, else (None, the reason)."""
    try:
        return cupy_or_raise(), None
    except RuntimeError as e:
        return None, str(e)


CUPY, NO_GPU = _usable_cupy()

SMALL = Config(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=48, max_position_embeddings=64, conv_kernel_size=5,
               num_landmarks=4, segment_means_seq_len=16)  # fmt: skip
SMALL_BERT = Config.from_dict(dict(model_type="bert", vocab_size=100, hidden_size=32,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=48, max_position_embeddings=64))
# Every attention mode and option of forward; "hf" on SMALL runs transformers' landmark
# path (num_landmarks != segment_means_seq_len), so it needs N = 16 and no padding.
MODES = {
    "exact": dict(attention="exact"),
    "nystrom": dict(attention="nystrom", num_landmarks=5),
    "nystrom-global": dict(attention="nystrom", num_landmarks=5, pinv_init="global"),
    "nystrom-exact-pinv": dict(attention="nystrom", num_landmarks=5, pinv="exact"),
    "nystrom-12-iterations": dict(attention="nystrom", num_landmarks=5, pinv_iterations=12),
    "exact-masked-conv": dict(attention="exact", mask_conv_input=True),
}


@pytest.fixture(scope="module")
def cp():
    if CUPY is None:
        pytest.skip(f"no usable GPU: {NO_GPU}")
    return CUPY


def assert_on_device(cp, *arrays):
    for a in arrays:
        assert isinstance(a, cp.ndarray), f"a result came back as {type(a).__name__}"


def max_diff(gpu, cpu):
    out = to_numpy(gpu)
    assert isinstance(out, np.ndarray) and out.shape == cpu.shape and out.dtype == cpu.dtype
    return float(np.abs(out - cpu).max())


# ------------------------------------------------------------------ no GPU needed


def test_benchmark_without_a_gpu_says_so():
    """benchmarks/gpu.py refuses with one clear line, not a traceback, where no GPU is."""
    if CUPY is not None:
        pytest.skip("a GPU is present: this test is for machines without one")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert "needs a GPU" in run.stderr and "CuPy" in run.stderr, run.stderr


def test_no_module_imports_cupy():
    """Every module of the package imports without CuPy (``test_backend`` checks the package)."""
    code = ("import importlib, pkgutil, sys, nystrom_np\n"
            "for m in pkgutil.iter_modules(nystrom_np.__path__):\n"
            "    if m.name != '__main__': importlib.import_module('nystrom_np.' + m.name)\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('cupy', 'cupyx')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True)
    assert run.stdout.strip() == "[]"


class HostTrip(np.ndarray):
    """A NumPy array standing in for a device array: converting it to a Python number or
    list (what would copy a GPU array to the host and wait for the device) fails."""

    def _fail(self, *args):
        raise AssertionError("host round trip (int/float/bool/item/tolist) inside forward")

    __int__ = __float__ = __bool__ = __index__ = item = tolist = _fail


@pytest.mark.parametrize("mode", [
    "hf", "exact", "exact-masked-conv", "nystrom", "nystrom-exact-pinv",
])
def test_forward_makes_no_host_round_trip(monkeypatch, mode):
    """Past the input checks (``check_inputs`` at the public boundary, and
    ``check_landmarks``, which each Nystrom layer calls with the mask), nothing in
    ``forward`` turns an array into a Python value: on a GPU each such step would stall the
    device. Emulated on the CPU: weights and inputs are ``HostTrip`` arrays, which every
    NumPy operation keeps."""
    model = random_model(SMALL, seed=0, dtype=np.float64)
    device_model = type(model)(model.config,
                               map_arrays(lambda a: a.view(HostTrip), model.params))
    check_inputs = model_module.check_inputs

    def checked_then_on_device(*args):  # the checks may look at the values; nothing after
        return tuple(None if a is None else a.view(HostTrip) for a in check_inputs(*args))

    check_landmarks = model_module.check_landmarks

    def landmarks_checked(mask, *args):  # M against the lengths: reads the mask's row sums
        check_landmarks(None if mask is None else mask.view(np.ndarray), *args)

    monkeypatch.setattr(model_module, "check_inputs", checked_then_on_device)
    monkeypatch.setattr(model_module, "check_landmarks", landmarks_checked)
    ids = np.random.default_rng(0).integers(0, SMALL.vocab_size, (2, 16))
    mask = np.ones((2, 16), dtype=int)
    mask[1, 12:] = 0
    options = {"hf": {}, **MODES}[mode]
    logits = forward(device_model, ids, mask, **options)
    assert isinstance(logits, HostTrip)
    with pytest.raises(AssertionError, match="host round trip"):  # the emulation works
        float(logits.sum())


# ------------------------------------------------------------ model on the GPU


@pytest.fixture(scope="module")
def small(cp):
    """(CPU model, GPU model), float64, SMALL config."""
    model = random_model(SMALL, seed=1, dtype=np.float64)
    return model, model.to("gpu")


def test_model_moves_to_the_gpu_and_back(cp, small):
    model, gpu = small
    assert gpu.xp is cp and gpu.dtype == np.float64 and gpu.config == model.config
    leaves = []
    map_arrays(leaves.append, gpu.params)
    assert leaves and all(isinstance(a, cp.ndarray) for a in leaves)
    back = gpu.to("cpu")
    assert back.xp is np
    states = [to_state_dict(m) for m in (model, back, gpu)]  # gpu: to_numpy inside
    for name, value in states[0].items():
        assert all(np.array_equal(s[name], value) for s in states[1:]), name


def test_results_stay_on_the_device(cp, small):
    _, gpu = small
    ids = cp.asarray(np.arange(16).reshape(1, 16) % SMALL.vocab_size)  # N for "hf" on SMALL
    logits, hidden = forward(gpu, ids, attention="nystrom", num_landmarks=3,
                             output_hidden_states=True)
    assert_on_device(cp, logits, *hidden, *encode(gpu, ids))
    assert isinstance(to_numpy(logits), np.ndarray)


def test_real_config_float32_parity(cp):
    """The issue's bound: float32 logits of the real config at N = 510 within 1e-4."""
    model = random_model(Config(), seed=0)
    gpu = model.to("gpu")
    ids = np.random.default_rng(0).integers(5, Config().vocab_size, (1, 510))
    modes = {"hf": {}, "nystrom": dict(attention="nystrom"),
             "nystrom-global": dict(attention="nystrom", pinv_init="global")}
    diffs = {}
    for name, options in modes.items():
        logits = forward(gpu, cp.asarray(ids), **options)
        assert_on_device(cp, logits)
        diffs[name] = max_diff(logits, forward(model, ids, **options))
    assert max(diffs.values()) <= 1e-4, diffs


@pytest.mark.parametrize("mode", MODES)
def test_float64_parity_every_mode(cp, small, mode):
    """Padding, token types, every attention option: logits and hidden states to 1e-9."""
    model, gpu = small
    rng = np.random.default_rng(2)
    ids = rng.integers(0, SMALL.vocab_size, (3, 20))
    mask = np.ones((3, 20), dtype=int)
    mask[1, 15:], mask[2, 9:] = 0, 0
    types = rng.integers(0, 2, (3, 20))
    options = dict(MODES[mode], output_hidden_states=True)
    logits, hidden = forward(gpu, ids, mask, types, **options)
    ref_logits, ref_hidden = forward(model, ids, mask, types, **options)
    assert_on_device(cp, logits, *hidden)
    assert max_diff(logits, ref_logits) <= 1e-9
    assert max(max_diff(h, r) for h, r in zip(hidden, ref_hidden, strict=True)) <= 1e-9


def test_float64_parity_hf_landmark_path(cp, small):
    """transformers' landmark path (N = segment_means_seq_len, one pinv scale per batch)."""
    model, gpu = small
    ids = np.random.default_rng(3).integers(0, SMALL.vocab_size, (2, 16))
    assert max_diff(forward(gpu, ids), forward(model, ids)) <= 1e-9


def test_float64_parity_bert(cp):
    """A BERT config: no conv skip, the exact erf GELU (cupyx.scipy.special.erf)."""
    model = random_model(SMALL_BERT, seed=4, dtype=np.float64)
    gpu = model.to("gpu")
    ids = np.random.default_rng(4).integers(0, SMALL_BERT.vocab_size, (2, 10))
    assert max_diff(forward(gpu, ids), forward(model, ids)) <= 1e-9
    headless = random_model(SMALL_BERT, seed=4, dtype=np.float64, head=False)
    hidden = encode(headless.to("gpu"), ids)[-1]
    assert max_diff(hidden, encode(headless, ids)[-1]) <= 1e-9


def test_bad_input_on_the_gpu_raises_the_same_error(cp, small):
    _, gpu = small
    with pytest.raises(ValueError, match="input_ids must lie in"):
        forward(gpu, cp.asarray([[0, SMALL.vocab_size]]))
    with pytest.raises(ValueError, match="attention_mask must hold only 0/1"):
        forward(gpu, cp.asarray([[0, 1]]), cp.asarray([[1, 2]]))


# --------------------------------------------------------- attention functions


@pytest.fixture(scope="module")
def qkv():
    """Unscaled (B, H, N, D) q, k, v in float64 and a (B, N) mask with padding."""
    rng = np.random.default_rng(5)
    q, k, v = rng.standard_normal((3, 2, 3, 24, 8))
    mask = np.ones((2, 24), dtype=bool)
    mask[1, 17:] = False
    return q, k, v, mask


def _landmark_matrix(q, k):
    return softmax(segment_means(q, 6) @ segment_means(k, 6).swapaxes(-1, -2) / 8**0.5)


ATTENTION_CASES = {
    "softmax": lambda q, k, v, m: softmax(q),
    "softmax_attention": lambda q, k, v, m: softmax_attention(q, k, v, m),
    "segment_means": lambda q, k, v, m: segment_means(q, 5, m),
    "iterative_pinv-per_matrix": lambda q, k, v, m: iterative_pinv(_landmark_matrix(q, k)),
    "iterative_pinv-global": lambda q, k, v, m: iterative_pinv(_landmark_matrix(q, k),
                                                               init="global"),
    "exact_pinv": lambda q, k, v, m: exact_pinv(_landmark_matrix(q, k)),
    "nystrom_attention": lambda q, k, v, m: nystrom_attention(q, k, v, m, 5),
    "nystrom_attention-exact": lambda q, k, v, m: nystrom_attention(q, k, v, m, 5, "exact"),
    "nystrom_attention-global": lambda q, k, v, m: nystrom_attention(q, k, v, m, 5,
                                                                     pinv_init="global"),
    "nystrom_attention-hf": lambda q, k, v, m: nystrom_attention(q, k, v, m, 4,
                                                                 mask_landmarks=False),
}


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention_functions(cp, qkv, case):
    fn = ATTENTION_CASES[case]
    out = fn(*map(cp.asarray, qkv))
    assert_on_device(cp, out)
    assert max_diff(out, fn(*qkv)) <= 1e-9


# Each public function of nystrom_lab.approximations, called as fn(q, k, v, mask) on the
# device. Host helpers draw random projections / features or window starts with NumPy from
# a seed (the same numbers on both devices); the functions that use them run here.
A = approximations
HOST_HELPERS = {"linformer_projections", "performer_features", "window_starts"}
APPROXIMATION_CASES = {
    "linformer_attention": lambda q, k, v, m: A.linformer_attention(q, k, v, m, proj_dim=6),
    "performer_attention": lambda q, k, v, m: A.performer_attention(q, k, v, m, 16, seed=1),
    "positive_features": lambda q, k, v, m: A.positive_features(
        q, get_xp(q).asarray(A.performer_features(16, 8)), axis=-1),
    "window_attention": lambda q, k, v, m: A.window_attention(q, k, v, m, width=7, block=5),
    "blocked_attention": lambda q, k, v, m: A.blocked_attention(q, k, v, m, block=5),
    "exact_matrix": lambda q, k, v, m: A.exact_matrix(q, k, m),
    "attention_matrix": lambda q, k, v, m: A.attention_matrix(A.blocked_attention, q, k, m, 7),
    "nystrom_matrix": lambda q, k, v, m: A.nystrom_matrix(q, k, m, num_landmarks=5),
    "linformer_matrix": lambda q, k, v, m: A.linformer_matrix(q, k, m, proj_dim=6),
    "performer_matrix": lambda q, k, v, m: A.performer_matrix(q, k, m, num_features=16),
    "window_matrix": lambda q, k, v, m: A.window_matrix(q, k, m, width=7),
    "svd_matrix": lambda q, k, v, m: A.svd_matrix(q, k, m, rank=5),
    "svd_attention": lambda q, k, v, m: A.svd_attention(q, k, v, m, rank=5),
    "relative_error": lambda q, k, v, m: A.relative_error(
        A.nystrom_matrix(q, k, m, num_landmarks=5), A.exact_matrix(q, k, m), m),
}


def test_approximation_cases_cover_the_module():
    """Runs without a GPU: a function added to approximations needs a case above."""
    public = {name for name, f in inspect.getmembers(A, inspect.isfunction)
              if f.__module__ == A.__name__ and not name.startswith("_")}
    missing = public - HOST_HELPERS - set(APPROXIMATION_CASES)
    assert not missing, f"add GPU cases to tests/test_gpu.py for {sorted(missing)}"
    assert set(APPROXIMATION_CASES) <= public, "a case names a function that is gone"


@pytest.mark.parametrize("case", APPROXIMATION_CASES)
def test_approximations(cp, qkv, case):
    fn = APPROXIMATION_CASES[case]
    out = fn(*map(cp.asarray, qkv))
    assert_on_device(cp, out)
    # The SVD floor truncates at rank M: an implementation-dependent basis, same subspace.
    assert max_diff(out, fn(*qkv)) <= (1e-8 if case.startswith("svd") else 1e-9)


# ------------------------------------------------------------------- fill_mask


@pytest.fixture(scope="module")
def tokenizer(cp, tmp_path_factory):
    pytest.importorskip("sentencepiece")
    from albert_spiece import build_spiece

    from nystrom_np.tokenizer import Tokenizer

    return Tokenizer(build_spiece(tmp_path_factory.mktemp("spiece") / "spiece.model"))


def test_fill_mask_on_the_gpu(cp, tokenizer):
    from nystrom_np.pipeline import fill_mask

    model = random_model(Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64), seed=1, dtype=np.float64)
    texts = ["Paris is the [MASK] of France.", "The [MASK] of [MASK] is Paris.",
             "The capital of Spain is [MASK]", "The capital of Italy is [MASK]"]
    for options in ({}, dict(attention="nystrom", num_landmarks=4)):
        on_gpu = fill_mask(texts, model=model.to("gpu"), tokenizer=tokenizer, **options)
        on_cpu = fill_mask(texts, model=model, tokenizer=tokenizer, **options)
        flat = [(g, c) for gs, cs in zip(on_gpu, on_cpu, strict=True)
                for g, c in zip(_predictions(gs), _predictions(cs), strict=True)]
        assert flat and all(type(g["score"]) is float for g, _ in flat)
        assert [(g["token"], g["sequence"]) for g, _ in flat] == [
            (c["token"], c["sequence"]) for _, c in flat]
        assert max(abs(g["score"] - c["score"]) for g, c in flat) <= 1e-9


def _predictions(result):
    """A text's predictions as one flat list (one mask: a list; several: a list per mask)."""
    return [p for group in result for p in (group if isinstance(group, list) else [group])]
