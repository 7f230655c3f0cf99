"""nystrom_lab.predictions: an approximation in every layer, and the prediction-level measures.

Small random models (float64), so that "equal to exact attention" can be checked to 1e-10:
a method given the whole budget (an SVD of rank N, a window covering every key) must give
exact attention's hidden states, through the model's own forward.
"""

import numpy as np
import pytest

import nystrom_np.model as model_module
from nystrom_lab import predictions as pr
from nystrom_np import Config, encode, random_model

SMALL = Config(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=24, max_position_embeddings=40, conv_kernel_size=5,
               initializer_range=0.5)  # large weights: peaked attention and predictions


@pytest.fixture(scope="module")
def model():
    return random_model(SMALL, seed=0, dtype=np.float64)


@pytest.fixture
def ids():
    return np.random.default_rng(1).integers(5, 50, size=(3, 20))


@pytest.mark.parametrize("method, budget", [("svd", 20), ("window", 20)])
def test_a_method_with_the_whole_budget_is_exact_attention(model, ids, method, budget):
    exact = encode(model, ids, attention="exact")
    swapped = pr.encode_with(model, ids, method, budget)
    assert all(np.abs(a - b).max() < 1e-10 for a, b in zip(exact, swapped, strict=True))
    assert model_module.softmax_attention is pr.model_module.softmax_attention  # restored
    smaller = pr.encode_with(model, ids, method, 2 if method == "svd" else 3)
    assert np.abs(smaller[-1] - exact[-1]).max() > 1e-6  # and the check can fail


def test_the_swap_is_undone_after_an_error(model, ids):
    original = model_module.softmax_attention
    with pytest.raises(ValueError):
        pr.encode_with(model, ids, "window", 0)  # a width of 0 is refused by the method
    assert model_module.softmax_attention is original
    with pytest.raises(ValueError, match="unknown method"):
        pr.encode_with(model, ids, "magic", 4)


def test_nystrom_goes_through_the_models_own_mode(model, ids):
    ours = pr.encode_with(model, ids, "nystrom", 4)[-1]
    assert np.array_equal(ours, encode(model, ids, attention="nystrom", num_landmarks=4)[-1])


def test_pooling_ignores_padding_and_gives_unit_vectors(model, ids):
    mask = np.ones_like(ids)
    mask[0, 15:] = 0
    pooled = pr.embed(model, ids, mask)
    assert np.allclose(np.linalg.norm(pooled, axis=-1), 1)
    alone = pr.embed(model, ids[:1, :15])
    hidden = encode(model, ids[:1], mask[:1], attention="exact")[-1]
    assert np.allclose(pr.pool(hidden, mask[:1]), pr.pool(hidden[:, :15]))
    assert alone.shape == (1, SMALL.hidden_size)


def test_recall_counts_the_rank_of_each_querys_own_document():
    docs = np.eye(4)
    queries = np.array([[1, 0, 0, 0], [0.6, 0.8, 0, 0], [0, 0.6, 0.8, 0], [0, 0, 0.6, 0.8]])
    # queries 0, 1 and 3 rank their own document first; query 2 ranks doc 2 first too;
    # the second query's doc 1 (0.8) beats doc 0 (0.6): all four at rank 0
    assert pr.recall_at(queries, docs, ks=(1, 2)) == {1: 1.0, 2: 1.0}
    queries[2] = [0, 0.8, 0.6, 0]  # now doc 1 outranks doc 2 for query 2: rank 1
    assert pr.recall_at(queries, docs, ks=(1, 2)) == {1: 0.75, 2: 1.0}
    assert pr.recall_at(docs, docs) == {1: 1.0, 5: 1.0}


def test_pydoc_pairs_are_unique_headings_and_documents_of_n_tokens(tok):
    headings, docs = pr.pydoc_pairs(tok, 64)
    assert len(headings) == len(set(headings)) == len(docs) > 20
    assert docs.shape[1] == 64 and (docs[:, 0] == tok.cls_id).all()
    assert (docs[:, -1] == tok.sep_id).all()
    assert 'The "assert" statement' in headings
    ids, mask = pr.encode_queries(tok, headings[:3])
    assert ids.shape == mask.shape and (mask.sum(1) == [len(tok.piece_ids(h)) + 2
                                                        for h in headings[:3]]).all()


def test_masked_predictions_agree_with_themselves_and_diverge_with_few_landmarks(model, ids):
    masked, positions = ids.copy(), np.zeros(ids.shape, bool)
    positions[:, [3, 9, 14]] = True
    masked[positions] = 4
    same = pr.masked_predictions(model, masked, positions, ids, "exact")
    assert same["top1"] == same["top5"] == 1 and abs(same["kl"]) < 1e-12
    assert same["accuracy"] == same["exact_accuracy"]
    exact = pr.masked_log_probs(model, masked, positions)
    assert exact.shape == (9, SMALL.vocab_size)
    far = pr.masked_predictions(model, masked, positions, ids, "nystrom", 2, exact=exact)
    assert far["kl"] > 1e-8 and 0 <= far["top5"] <= 1 and 0 <= far["accuracy"] <= 1
