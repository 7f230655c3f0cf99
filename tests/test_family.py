"""The uw-madison family: nystromformer-1024, -2048 and -4096, by hub id and by folder.

Each checkpoint is made by transformers' ``save_pretrained`` from the published config of
that family member (REFERENCE.md: max_position_embeddings 1024 / 2048 / 4096,
num_landmarks = segment_means_seq_len = 64, conv kernel 65, gelu_new, V = 30000), with
narrow layers (C = 64, 4 heads, 2 layers, so that N = 4096 takes seconds on 2 cores) and
the real position table. Next to it: the test corpus's ``spiece.model`` and a
``tokenizer_config.json`` saying ``model_max_length`` 512, as the 4096 model's is reported
to. Parity with transformers: float32, the logits within 1e-4.
"""

import json
import shutil

import numpy as np
import pytest
from _hub_server import HubServer

from nystrom_np import forward, load
from nystrom_np.__main__ import main
from nystrom_np.pipeline import describe_attention, fill_mask
from nystrom_np.tokenizer import load_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

FAMILY = {"uw-madison/nystromformer-1024": 1024, "uw-madison/nystromformer-2048": 2048,
          "uw-madison/nystromformer-4096": 4096}  # fmt: skip
NARROW = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128)
COMMIT = "c" * 40


def published_config(max_positions):
    """The family's config.json values, narrowed (see the module docstring)."""
    return transformers.NystromformerConfig(
        vocab_size=30000, hidden_act="gelu_new", max_position_embeddings=max_positions,
        type_vocab_size=2, layer_norm_eps=1e-5, num_landmarks=64, segment_means_seq_len=64,
        conv_kernel_size=65, inv_coeff_init_option=False, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, **NARROW,
    )  # fmt: skip


@pytest.fixture(scope="module")
def family(tmp_path_factory, spiece_path):
    """hub id -> (folder written by save_pretrained, transformers' model), and a HF cache
    holding the same folders as snapshots of those hub ids."""
    root = tmp_path_factory.mktemp("family")
    cache = root / "hub-cache"
    made = {}
    for i, (repo, n) in enumerate(FAMILY.items()):
        torch.manual_seed(i)
        hf = transformers.NystromformerForMaskedLM(published_config(n)).eval()
        with torch.no_grad():  # peaked attention, as trained models have: not near-uniform
            for layer in hf.nystromformer.encoder.layer:
                layer.attention.self.query.weight *= 8
                layer.attention.self.key.weight *= 8
        folder = root / repo.split("/")[1]
        hf.save_pretrained(folder)
        shutil.copyfile(spiece_path, folder / "spiece.model")
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"model_max_length": 512, "do_lower_case": True, "keep_accents": False,
             "remove_space": True, "tokenizer_class": "AlbertTokenizer"}))  # fmt: skip
        repo_dir = cache / ("models--" + repo.replace("/", "--"))
        shutil.copytree(folder, repo_dir / "snapshots" / COMMIT)
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "main").write_text(COMMIT)
        made[repo] = (folder, hf)
    return made, cache


@pytest.fixture
def cached(family, monkeypatch):
    """The family in the Hugging Face cache, no network."""
    monkeypatch.setenv("HF_HUB_CACHE", str(family[1]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return family[0]


def long_text(tokens, mask_every=500):
    """A text of exactly ``tokens`` tokens between [CLS] and [SEP] (words that are one piece
    each in the test corpus's spiece.model), a [MASK] every ``mask_every``."""
    words = "the river of the town is the king of a town in the river".split()
    out = []
    for i in range(tokens):
        out.append("[MASK]" if i % mask_every == mask_every // 2 else words[i % len(words)])
    return " ".join(out)


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(input_ids=torch.from_numpy(ids)).logits.numpy()


# ------------------------------------------------------------------- loading, tokenizer


@pytest.mark.parametrize("repo", FAMILY)
def test_load_by_hub_id_and_by_folder_gives_the_same_model(cached, repo):
    folder, _ = cached[repo]
    by_id, by_folder = load(repo), load(folder)
    assert by_id.config == by_folder.config
    assert by_id.config.max_position_embeddings == FAMILY[repo]
    assert by_id.params["embeddings"]["position"].shape[0] == FAMILY[repo] + 2
    word = by_id.params["embeddings"]["word"]
    assert np.array_equal(word, by_folder.params["embeddings"]["word"])


def test_the_book_finds_the_long_models_in_the_cache_and_never_downloads(
    cached, family, monkeypatch, tmp_path
):
    from nystrom_lab.sources import LONG_REPO_IDS, cached_weights

    assert set(LONG_REPO_IDS) == set(FAMILY)
    for repo in FAMILY:
        found = cached_weights(repo)
        assert found.real and found.spiece is not None
        assert found.model.config.max_position_embeddings == FAMILY[repo]
    served = {repo: {p.name: p for p in folder.iterdir()}
              for repo, (folder, _) in family[0].items()}  # fmt: skip
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache, a hub that has them
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with HubServer(served) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        assert all(cached_weights(repo) is None for repo in FAMILY)
    assert hub.requests == []


@pytest.mark.parametrize("repo", FAMILY)
def test_the_tokenizer_limit_is_the_position_table_not_model_max_length(cached, repo):
    n = FAMILY[repo]
    for tokenizer in (load_tokenizer(repo), load_tokenizer(cached[repo][0])):
        assert tokenizer.max_length == n  # not tokenizer_config.json's 512
        assert len(tokenizer.encode(long_text(n - 2))["input_ids"]) == n
    with pytest.raises(ValueError, match=rf"at most {n} fit \(the model's position table\)"):
        load_tokenizer(repo).encode(long_text(n + 5))


# ---------------------------------------------------------------- parity, default mode


@pytest.mark.parametrize("repo, n", [(r, 1024) for r in FAMILY]
                         + [("uw-madison/nystromformer-4096", 4096)])  # fmt: skip
def test_default_mode_matches_transformers(family, repo, n):
    """transformers runs exact attention for these configs at every length; so do we."""
    folder, hf = family[0][repo]
    model = load(folder)
    ids = np.random.default_rng(n).integers(5, 30000, size=(1, n))
    ours = forward(model, ids)  # attention="hf"
    theirs = hf_logits(hf, ids)
    assert np.abs(ours - theirs).max() < 1e-4
    # the check can fail: Nystrom attention is a different function
    nystrom = forward(model, ids, attention="nystrom")
    assert np.abs(nystrom - theirs).max() > 1e-3  # ten times the tolerance


def test_the_default_says_which_attention_it_runs(family):
    config = load(family[0]["uw-madison/nystromformer-4096"][0]).config
    assert describe_attention(config).startswith("attention: exact softmax, O(N^2)")
    assert "num_landmarks == segment_means_seq_len" in describe_attention(config)
    assert "M = 64 landmarks" in describe_attention(config, "nystrom")


# ------------------------------------------------------------ long fill-mask, errors


def test_fill_mask_on_thousands_of_tokens_in_nystrom_mode(cached):
    repo = "uw-madison/nystromformer-4096"
    text = long_text(3000)
    tokenizer = load_tokenizer(repo)
    assert len(tokenizer.encode(text)["input_ids"]) == 3002
    by_id = fill_mask(text, model=repo, attention="nystrom")
    by_folder = fill_mask(text, model=str(cached[repo][0]), attention="nystrom")
    assert len(by_id) == text.count("[MASK]") == 6  # one list of 5 per mask
    for per_mask, again in zip(by_id, by_folder, strict=True):
        assert [p["token"] for p in per_mask] == [p["token"] for p in again]
        scores = [p["score"] for p in per_mask]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6


def test_past_the_position_table_is_a_clear_error(cached):
    repo = "uw-madison/nystromformer-1024"
    model = load(repo)
    with pytest.raises(ValueError, match="at most 1024"):
        fill_mask(long_text(1100), model=repo, attention="nystrom")
    with pytest.raises(ValueError, match=r"1030 tokens but the position table allows at most 1024"
                       ):  # fmt: skip
        forward(model, np.full((1, 1030), 7), attention="nystrom")


def test_cli_takes_the_family_by_hub_id_and_folder(cached, capsys):
    repo = "uw-madison/nystromformer-2048"
    text = long_text(1500, mask_every=1000)
    assert main(["fill-mask", "--checkpoint", repo, "--attention", "nystrom", "--json", text]) == 0
    captured = capsys.readouterr()
    assert "attention: Nystrom, M = 64 landmarks" in captured.err
    assert "at most 2048 tokens" in captured.err
    assert len(json.loads(captured.out)) == 5
    folder = str(cached[repo][0])
    assert main(["fill-mask", "--checkpoint", folder, "--json", "Paris is the [MASK]."]) == 0
    assert "attention: exact softmax, O(N^2)" in capsys.readouterr().err
    assert main(["fill-mask", "--checkpoint", folder, long_text(2100)]) == 1
    assert "at most 2048" in capsys.readouterr().err
    spiece = str(cached[repo][0] / "spiece.model")  # a bare tokenizer file: the model's limit
    assert main(["fill-mask", "--checkpoint", folder, "--tokenizer", spiece, "--json",
                 long_text(1500, mask_every=1000)]) == 0  # fmt: skip
