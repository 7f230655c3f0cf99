"""Small parity cases: a config, a batch, a dtype and attention options each.

Shared by ``make_fixtures.py`` (which runs transformers on them and saves the outputs)
and the parity tests. Weights are large enough (std 0.2) that attention is far from
uniform, so a wrong mask, scale or landmark would show.
"""

import numpy as np

from nystrom_np import Config, random_model
from nystrom_np.backend import map_arrays

SMALL = dict(
    vocab_size=50,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=24,
    max_position_embeddings=40,
    conv_kernel_size=5,
    num_landmarks=8,
    segment_means_seq_len=8,
    initializer_range=0.2,
)
LANDMARK = {**SMALL, "num_landmarks": 4, "segment_means_seq_len": 16}
BERT = {**SMALL, "model_type": "bert", "hidden_act": "gelu", "layer_norm_eps": 1e-12,
        "conv_kernel_size": None}

# name: (config values, batch, tokens, pad, token types, dtype, head)
CASES = {
    "exact_padded_types": (SMALL, 3, 19, True, True, "float32", True),
    "exact_conv9_padded": ({**SMALL, "conv_kernel_size": 9}, 2, 30, True, False, "float32", True),
    "exact_no_conv": ({**SMALL, "conv_kernel_size": None}, 2, 12, False, True, "float32", True),
    "landmark": (LANDMARK, 3, 16, False, False, "float32", True),
    "landmark_padded": (LANDMARK, 3, 16, True, True, "float32", True),
    "exact_padded_float64": (SMALL, 3, 19, True, True, "float64", True),
    "landmark_padded_float64": (LANDMARK, 3, 16, True, True, "float64", True),
    "bert_mlm_padded": (BERT, 2, 15, True, True, "float32", True),
    "bert_mlm_float64": (BERT, 2, 15, True, True, "float64", True),
    "bert_base_float64": (BERT, 2, 11, True, False, "float64", False),
}


def build(name, seed=0):
    """(model, ids, mask, types) of a case; mask and types may be None."""
    values, b, n, pad, types, dtype, head = CASES[name]
    config = Config.from_dict(values)
    model = random_model(config, seed=seed, dtype=np.dtype(dtype), head=head)
    rng = np.random.default_rng(seed + 1)
    ids = rng.integers(0, config.vocab_size, (b, n))
    mask = None
    if pad:  # every row but the first loses a different number of tokens at its end
        mask = np.ones((b, n), dtype=np.int64)
        for row in range(1, b):
            mask[row, n - 3 * row :] = 0
    token_types = rng.integers(0, config.type_vocab_size, (b, n)) if types else None
    return model, ids, mask, token_types


def leaves(tree):
    """The arrays of a nested dict/list of weights, in a fixed order."""
    found = []
    map_arrays(found.append, tree)
    return found


def same_weights(a, b):
    """Whether two models hold equal weights, array by array."""
    x, y = leaves(a.params), leaves(b.params)
    return len(x) == len(y) and all(np.array_equal(u, v) for u, v in zip(x, y, strict=True))
