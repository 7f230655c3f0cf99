"""Parity with transformers' PyTorch models, the independent reference.

Two lines of evidence:
- live: transformers (torch CPU) run here on the same weights, skipped when torch or
  transformers is missing;
- recorded: ``tests/fixtures/*.npz``, transformers' outputs saved by ``make_fixtures.py``
  (versions inside each file), checked on every machine.

Tolerances: max |difference| of logits and of every hidden state, 1e-5 for the small
float32 cases (values of order 1), 1e-4 on the real 768-wide, 12-layer config, 1e-9 in
float64.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from cases import CASES, build

from nystrom_np import Config, encode, forward, from_state_dict, random_model

FIXTURES = Path(__file__).parent / "fixtures"


def tolerance(dtype):
    return 1e-9 if dtype == np.float64 else 1e-5


def ours(model, ids, mask, types):
    """(logits or None, hidden states) from nystrom_np, in transformers' attention mode."""
    if model.has_head:
        return forward(model, ids, mask, types, output_hidden_states=True)
    return None, encode(model, ids, mask, types)


def assert_close(got, want, tol):
    logits, hidden = got
    want_logits, want_hidden = want
    assert len(hidden) == len(want_hidden)
    for layer, (h, w) in enumerate(zip(hidden, want_hidden, strict=True)):
        assert h.dtype == w.dtype
        err = np.abs(h - w).max()
        assert err <= tol, f"hidden state {layer}: max |diff| {err:.2e} > {tol:.0e}"
    if want_logits is not None:
        assert logits.shape == want_logits.shape
        err = np.abs(logits - want_logits).max()
        assert err <= tol, f"logits: max |diff| {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_recorded_parity(name):
    """nystrom_np on the recorded weights and inputs equals transformers' recorded outputs."""
    data = np.load(FIXTURES / f"{name}.npz")
    meta = json.loads(str(data["meta"]))
    config = Config.from_dict(meta["config"])
    state = {k.removeprefix("state/"): data[k] for k in data.files if k.startswith("state/")}
    dtype = data["hidden/0"].dtype
    model = from_state_dict(state, config, dtype=dtype)
    mask = data["mask"] if "mask" in data.files else None
    types = data["types"] if "types" in data.files else None
    hidden = [data[f"hidden/{i}"] for i in range(config.num_hidden_layers + 1)]
    logits = data["logits"] if "logits" in data.files else None
    assert_close(ours(model, data["ids"], mask, types), (logits, hidden), tolerance(dtype))


@pytest.mark.parametrize("name", sorted(CASES))
def test_live_parity(name):
    """The same cases against transformers run now, on this machine's versions."""
    ref = pytest.importorskip("hf_reference", reason="needs torch and transformers",
                             exc_type=ImportError)
    model, ids, mask, types = build(name)
    want = ref.hf_outputs(ref.hf_model(model), ids, mask, types)
    assert_close(ours(model, ids, mask, types), want, tolerance(model.dtype))


@pytest.fixture(scope="module")
def real_size_pair():
    """A seeded random model of the real config (12 x 768, V = 30000) and its torch twin."""
    ref = pytest.importorskip("hf_reference", reason="needs torch and transformers",
                             exc_type=ImportError)
    model = random_model(Config(), seed=0)
    return model, ref.hf_model(model), ref


@pytest.mark.parametrize("batch, n, pad", [(1, 510, False), (2, 37, True)])
def test_real_config_parity(real_size_pair, batch, n, pad):
    """The real config at the longest input (510) and at a short padded batch, float32."""
    model, torch_model, ref = real_size_pair
    rng = np.random.default_rng(n)
    ids = rng.integers(0, model.config.vocab_size, (batch, n))
    mask = np.ones((batch, n), dtype=np.int64)
    if pad:
        mask[1, n // 2 :] = 0
    want = ref.hf_outputs(torch_model, ids, mask)
    assert_close(ours(model, ids, mask, None), want, 1e-4)


def test_fixtures_record_their_versions():
    """Every fixture names the versions of the reference that produced it."""
    for path in sorted(FIXTURES.glob("*.npz")):
        meta = json.loads(str(np.load(path)["meta"]))
        assert {"torch", "transformers", "numpy"} <= set(meta["versions"]), path.name
