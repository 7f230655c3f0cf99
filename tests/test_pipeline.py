"""fill_mask against transformers' fill-mask pipeline, and its own promises.

Parity runs a seeded random model of the real config (12 layers, C = 768, V = 30000)
loaded into transformers' NystromformerForMaskedLM, with the stand-in spiece.model of
``albert_spiece.py`` on both sides. The head's bias is raised at a few real pieces so that
the top predictions carry probabilities near 0.1-0.5, not the ~1/V of a random model, and
a 1e-5 tolerance on the scores means something. The other tests use a small config.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nystrom_np import Model, forward, pipeline, random_model, to_state_dict
from nystrom_np.config import Config
from nystrom_np.model import softmax
from nystrom_np.pipeline import fill_mask

pytest.importorskip("sentencepiece")

SMALL = Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
BOOSTED = {"▁name": 13.0, "▁king": 12.6, "▁kingdom": 12.2, "▁river": 11.8, "▁town": 11.4}
TEXTS = [
    "Paris is the [MASK] of France.",
    "[MASK] is the capital of France.",  # mask first
    "The capital of France is [MASK]",  # mask last
    "The [MASK] of [MASK] is Paris.",  # two masks
    "Café au lait costs 1,000 [MASK] in Zürich!",
    "[MASK][MASK] [MASK]",  # nothing but masks
    "The capital of Spain is [MASK]",  # as long as TEXTS[2]: one batch of two
]


@pytest.fixture(scope="session")
def small_model():
    return random_model(SMALL, seed=1)


def _boost(model, tok, boosts):
    """The model with its MLM bias raised at the given pieces."""
    bias = model.params["head"]["bias"].copy()
    for piece, value in boosts.items():
        i = tok.sp.piece_to_id(piece)
        assert tok.sp.id_to_piece(i) == piece, f"the test model lacks {piece!r}"
        bias[i] += value
    return Model(model.config, {**model.params, "head": {**model.params["head"], "bias": bias}})


def _hf_pipeline(model, spiece_path):
    """transformers' fill-mask pipeline on our weights and the same spiece.model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    fields = {k: v for k, v in model.config.to_dict().items() if k != "model_type"}
    try:
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # pragma: no cover - older/newer transformers: just initialise
        import contextlib

        no_init_weights = contextlib.nullcontext
    with no_init_weights():  # the weights are ours: skip transformers' random init
        hf = transformers.NystromformerForMaskedLM(transformers.NystromformerConfig(**fields))
    state = {k: torch.from_numpy(np.array(v)) for k, v in to_state_dict(model).items()}
    hf.load_state_dict(state, strict=False)  # the decoder is tied to the embeddings
    hf.tie_weights()
    hf.eval()
    hf_tok = transformers.AlbertTokenizer(str(spiece_path))
    return transformers.pipeline("fill-mask", model=hf, tokenizer=hf_tok, device="cpu")


@pytest.fixture(scope="session")
def real_config_pair(tok, spiece_path):
    """(our model, transformers' pipeline): the real config, seeded random weights."""
    model = _boost(random_model(Config(), seed=0), tok, BOOSTED)
    return model, _hf_pipeline(model, spiece_path)


@pytest.fixture(scope="session")
def small_pair(tok, spiece_path, small_model):
    """(our model, transformers' pipeline): the small config, for many texts."""
    model = _boost(small_model, tok, {k: v / 2 for k, v in BOOSTED.items()})
    return model, _hf_pipeline(model, spiece_path)


def _assert_same(ours, theirs, atol=1e-5):
    """Same structure, tokens, strings; scores within atol (and 1e-4 relative)."""
    if isinstance(theirs, dict):
        assert ours.keys() == theirs.keys()
        assert (ours["token"], ours["token_str"], ours["sequence"]) == (
            theirs["token"], theirs["token_str"], theirs["sequence"]
        )
        assert isinstance(ours["score"], float)
        np.testing.assert_allclose(ours["score"], theirs["score"], rtol=1e-4, atol=atol)
        return
    assert isinstance(ours, list) and len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        _assert_same(a, b, atol)


# ---------------------------------------------------------------- parity, real config


def test_matches_transformers_pipeline(real_config_pair, tok):
    # One call for four texts (ours batches the two of equal length; transformers runs each
    # alone), compared text by text: tokens, strings, structure, scores within 1e-5.
    model, hf_pipe = real_config_pair
    texts = [TEXTS[0], TEXTS[3], TEXTS[2], TEXTS[6]]
    ours = fill_mask(texts, top_k=5, model=model, tokenizer=tok)
    for text, result in zip(texts, ours, strict=True):
        _assert_same(result, hf_pipe(text, top_k=5))


def test_boosted_pieces_lead_with_real_probabilities(real_config_pair, tok):
    # Guards the parity test itself: the top scores are large, so atol=1e-5 is tight.
    model, _ = real_config_pair
    top = fill_mask("Paris is the [MASK] of France.", top_k=5, model=model, tokenizer=tok)
    assert {p["token_str"] for p in top} == {"name", "king", "kingdom", "river", "town"}
    assert top[0]["score"] > 0.1 and sum(p["score"] for p in top) > 0.5
    assert top[0]["sequence"] == f"paris is the {top[0]['token_str']} of france."


EDGE_TEXTS = TEXTS + [
    "<pad> a [MASK] <PAD>",  # the pipeline drops <pad> ids from the sequence it writes
    "[CLS] a [MASK] [SEP] b",  # special tokens written in the text
    "snow ☃ and [MASK] <unk>",  # <unk> is skipped in a one-mask sequence, kept with several
    "snow ☃ and [MASK] [MASK]",
    "``quoted'' [MASK], 1,000,",
]


@pytest.mark.parametrize("top_k", [1, 7])
def test_matches_transformers_pipeline_on_many_texts(small_pair, tok, top_k):
    model, hf_pipe = small_pair
    ours = fill_mask(EDGE_TEXTS, top_k=top_k, model=model, tokenizer=tok)
    for text, result in zip(EDGE_TEXTS, ours, strict=True):
        _assert_same(result, hf_pipe(text, top_k=top_k))


def test_exact_attention_is_what_hf_mode_runs_here(small_pair, tok):
    model, _ = small_pair
    hf = fill_mask(TEXTS[3], top_k=3, model=model, tokenizer=tok)
    assert hf == fill_mask(TEXTS[3], top_k=3, model=model, tokenizer=tok, attention="exact")


# ----------------------------------------------------------- structure and promises


def test_output_structure(small_model, tok):
    one = fill_mask("Paris is the [MASK] of France.", top_k=4, model=small_model, tokenizer=tok)
    assert isinstance(one, list) and len(one) == 4
    assert all(set(p) == {"score", "token", "token_str", "sequence"} for p in one)
    scores = [p["score"] for p in one]
    assert scores == sorted(scores, reverse=True) and 0 < scores[-1] <= scores[0] < 1
    several = fill_mask("[MASK] of [MASK].", top_k=2, model=small_model, tokenizer=tok)
    assert len(several) == 2 and all(len(per_mask) == 2 for per_mask in several)
    assert all(p["sequence"].startswith("[CLS]") for per_mask in several for p in per_mask)
    batch = fill_mask(["a [MASK]", "[MASK] b [MASK]"], top_k=1, model=small_model, tokenizer=tok)
    assert isinstance(batch[0][0], dict) and isinstance(batch[1][0], list)
    # A list of one text stays a list (transformers would unwrap it).
    assert fill_mask(["a [MASK]"], top_k=1, model=small_model, tokenizer=tok) == [batch[0]]


def test_scores_are_the_softmax_of_the_full_forward(small_model, tok):
    text = "The [MASK] of [MASK] is Paris."
    ids = np.array([tok.encode(text)["input_ids"]])
    probs = softmax(forward(small_model, ids), axis=-1)[0]  # (N, V)
    masks = np.flatnonzero(ids[0] == tok.mask_id)
    result = fill_mask(text, top_k=5, model=small_model, tokenizer=tok)
    for position, predictions in zip(masks, result, strict=True):
        expected = np.argsort(-probs[position])[:5]
        assert [p["token"] for p in predictions] == expected.tolist()
        np.testing.assert_allclose(
            [p["score"] for p in predictions], probs[position, expected], rtol=1e-5
        )


def test_head_runs_only_at_the_masks(small_model, tok, monkeypatch):
    shapes = []
    real_head = pipeline.mlm_head

    def spy(model, x):
        shapes.append(x.shape)
        return real_head(model, x)

    monkeypatch.setattr(pipeline, "mlm_head", spy)
    fill_mask(["The [MASK] of [MASK] is Paris.", "x [MASK]"], model=small_model, tokenizer=tok)
    assert sorted(shapes) == [(1, 32), (2, 32)]  # K masked rows of width C, never (B, N, C)


def test_batching_does_not_change_the_answer(small_model, tok):
    texts = ["a [MASK] b", "the [MASK] of france", "a [MASK] c", "[MASK]", "a [MASK] d"]
    alone = [fill_mask(t, top_k=3, model=small_model, tokenizer=tok) for t in texts]
    together = fill_mask(texts, top_k=3, model=small_model, tokenizer=tok, batch_size=2)
    for a, b in zip(alone, together, strict=True):
        _assert_same(a, b, atol=1e-7)


def test_float64_model(small_model, tok):
    result = fill_mask("a [MASK]", top_k=2, model=small_model.astype(np.float64), tokenizer=tok)
    assert [p["token"] for p in result] == [
        p["token"] for p in fill_mask("a [MASK]", top_k=2, model=small_model, tokenizer=tok)
    ]


def test_nystrom_attention_runs(small_model, tok):
    text = "The king of the [MASK] was born in a small town by the river."
    result = fill_mask(
        text, top_k=2, model=small_model, tokenizer=tok, attention="nystrom", num_landmarks=4
    )
    assert len(result) == 2
    with pytest.raises(ValueError, match="num_landmarks"):
        fill_mask(text, model=small_model, tokenizer=tok, attention="nystrom", num_landmarks=999)


# -------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "text, message",
    [
        ("Paris is the capital of France.", r"no \[MASK\] token in 'Paris is the capital"),
        ("Paris is the [mask] of France.", r"'\[mask\]' is read as plain text"),
        ("Paris is the <mask> of France.", r"'<mask>' is read as plain text"),
        ("Paris is the [Mask] of France.", r"'\[Mask\]' is read as plain text"),
        ("", r"no \[MASK\] token in ''"),
        ("word " * 600 + "[MASK]", r"tokens long .* at most 510"),
    ],
)
def test_bad_text(small_model, tok, text, message):
    with pytest.raises(ValueError, match=message):
        fill_mask(text, model=small_model, tokenizer=tok)


def test_bad_arguments(small_model, tok, tmp_path):
    with pytest.raises(ValueError, match=r"top_k must lie in \[1, 30000\]"):
        fill_mask("a [MASK]", top_k=0, model=small_model, tokenizer=tok)
    with pytest.raises(TypeError, match="top_k must be an integer"):
        fill_mask("a [MASK]", top_k=2.5, model=small_model, tokenizer=tok)
    with pytest.raises(ValueError, match="at least one text"):
        fill_mask([], model=small_model, tokenizer=tok)
    with pytest.raises(TypeError, match="must be str"):
        fill_mask(["a [MASK]", 3], model=small_model, tokenizer=tok)
    other = random_model(Config(**{**SMALL.to_dict(), "vocab_size": 1000}), seed=0)
    with pytest.raises(ValueError, match="30000 pieces but the model's vocabulary has 1000"):
        fill_mask("a [MASK]", model=other, tokenizer=tok)


# ------------------------------------------------------- the default checkpoint


def write_checkpoint(directory, model, spiece_path):
    """A checkpoint folder as save_pretrained writes it, plus the tokenizer."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: np.ascontiguousarray(v) for k, v in to_state_dict(model).items()}
    state = {k: v for k, v in state.items() if not k.startswith("cls.predictions.decoder")}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(model.config.to_dict()))
    (directory / "spiece.model").write_bytes(spiece_path.read_bytes())
    return directory


def test_default_checkpoint_from_the_hub_cache(
    small_model, tok, spiece_path, tmp_path, monkeypatch
):
    repo = tmp_path / "hub" / "models--uw-madison--nystromformer-512"
    write_checkpoint(repo / "snapshots" / "abc123", small_model, spiece_path)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    pipeline.default_model.cache_clear()
    pipeline.default_tokenizer.cache_clear()
    try:
        result = fill_mask("Paris is the [MASK] of France.", top_k=3)
    finally:
        pipeline.default_model.cache_clear()
        pipeline.default_tokenizer.cache_clear()
    _assert_same(result, fill_mask(TEXTS[0], top_k=3, model=small_model, tokenizer=tok), 1e-7)


def test_no_checkpoint_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    pipeline.default_model.cache_clear()
    with pytest.raises(FileNotFoundError, match="uw-madison/nystromformer-512"):
        fill_mask("Paris is the [MASK] of France.")


# --------------------------------------------------------------------- command line


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory, small_model, spiece_path):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "small", small_model, spiece_path)


def cli(*args, cwd, env=None):
    """Run ``python -m nystrom_np fill-mask ARGS`` offline, with an empty hub cache."""
    root = Path(__file__).resolve().parent.parent
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cwd / "empty-cache"),
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "nystrom_np", "fill-mask", *map(str, args)],
        cwd=cwd, env=environment, capture_output=True, text=True, timeout=300,
    )


def test_cli_table(checkpoint_dir, tmp_path, small_model, tok):
    run = cli("Paris is the [MASK] of France.", "--checkpoint", checkpoint_dir, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "Paris is the [MASK] of France."
    assert lines[1].split() == ["score", "token", "sequence"]
    expected = fill_mask(TEXTS[0], model=small_model, tokenizer=tok)
    for line, p in zip(lines[2:], expected, strict=True):
        assert line.split()[:2] == [f"{p['score']:.4f}", p["token_str"]]
        assert line.endswith(p["sequence"])


def test_cli_json_and_options(checkpoint_dir, tmp_path, small_model, tok):
    texts = ["The [MASK] of [MASK] is Paris.", "a [MASK]"]
    run = cli(
        *texts, "--checkpoint", checkpoint_dir, "--json", "--top-k", "3",
        "--attention", "nystrom", "--landmarks", "2", cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    expected = fill_mask(
        texts, top_k=3, model=small_model, tokenizer=tok, attention="nystrom", num_landmarks=2
    )
    _assert_same(json.loads(run.stdout), expected, atol=1e-6)
    assert expected != fill_mask(texts, top_k=3, model=small_model, tokenizer=tok)


def test_cli_no_checkpoint(tmp_path):
    run = cli("Paris is the [MASK] of France.", cwd=tmp_path)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "cannot find the checkpoint 'uw-madison/nystromformer-512'" in run.stderr
    assert "huggingface-cli download uw-madison/nystromformer-512" in run.stderr
    assert "spiece.model" in run.stderr and "--random-weights" in run.stderr
    assert run.stdout == ""


def test_cli_random_weights(spiece_path, tmp_path):
    run = cli(
        "Paris is the [MASK] of France.", "--random-weights", "--tokenizer", spiece_path,
        "--json", "--top-k", "2", cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert "RANDOM WEIGHTS" in run.stderr and "MEANINGLESS" in run.stderr
    result = json.loads(run.stdout)  # stdout stays valid JSON
    assert len(result) == 2 and set(result[0]) == {"score", "token", "token_str", "sequence"}


def test_cli_random_weights_without_a_tokenizer(tmp_path):
    run = cli("Paris is the [MASK] of France.", "--random-weights", cwd=tmp_path)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "--tokenizer PATH/spiece.model" in run.stderr
    assert "huggingface-cli download uw-madison/nystromformer-512 spiece.model" in run.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["Paris is the capital of France."], r"no [MASK] token"),
        (["Paris is the [mask] of France."], r"'[mask]' is read as plain text"),
        (["Paris is the <mask> of France."], r"'<mask>' is read as plain text"),
        (["word " * 600 + "[MASK]"], "at most 510"),
        (["a [MASK]", "--top-k", "0"], "--top-k must be at least 1, got 0"),
        (["a [MASK]", "--top-k", "30001"], "--top-k must be at most 30000"),
        (["a [MASK]", "--landmarks", "4"], "--landmarks is an option of --attention nystrom"),
        (["a [MASK]", "--attention", "nystrom", "--landmarks", "0"], "--landmarks must be at"),
        (["a [MASK]", "--tokenizer", "missing.model"], "no SentencePiece model"),
    ],
)
def test_cli_bad_input(checkpoint_dir, tmp_path, args, message):
    run = cli(*args, "--checkpoint", checkpoint_dir, cwd=tmp_path)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert run.stderr.startswith("error: ") and message in run.stderr, run.stderr


def test_cli_gpu_without_a_gpu(checkpoint_dir, tmp_path):
    from nystrom_np.backend import cupy_or_raise

    try:
        cupy_or_raise()
        pytest.skip("a GPU is visible: this test is for machines without one")
    except RuntimeError:
        pass
    run = cli("a [MASK]", "--checkpoint", checkpoint_dir, "--device", "gpu", cwd=tmp_path)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "CuPy" in run.stderr
