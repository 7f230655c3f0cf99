"""The independent reference: transformers' PyTorch models on nystrom_np's weights.

Used by the parity tests and by ``make_fixtures.py``. Importing this module needs torch
and transformers; tests import it through ``pytest.importorskip``.
"""

import numpy as np
import torch
import transformers

from nystrom_np import to_state_dict

VERSIONS = {
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "numpy": np.__version__,
}


def hf_model(model):
    """transformers' model with the same weights: *ForMaskedLM, or BertModel without a head."""
    config = model.config
    values = config.to_dict()
    if config.model_type == "nystromformer":
        cfg = transformers.NystromformerConfig(**values)
        cls = transformers.NystromformerForMaskedLM
    else:
        cfg = transformers.BertConfig(**values, attn_implementation="eager")
        cls = transformers.BertForMaskedLM if model.has_head else transformers.BertModel
    torch_model = cls(cfg).eval()
    state = {k: torch.from_numpy(v) for k, v in to_state_dict(model).items()}
    if cls is transformers.BertModel:  # a bare encoder: no "bert." prefix, a pooler we ignore
        state = {k.removeprefix("bert."): v for k, v in state.items()}
    if model.dtype == np.float64:
        torch_model = torch_model.double()
    missing, unexpected = torch_model.load_state_dict(state, strict=False)
    allowed = ("decoder", "position_ids", "token_type_ids", "pooler")
    assert not unexpected, unexpected
    assert all(any(a in k for a in allowed) for k in missing), missing
    torch_model.tie_weights()
    return torch_model


def hf_outputs(torch_model, ids, mask=None, types=None):
    """(logits or None, list of hidden states) as NumPy arrays, in eval mode, no grad."""
    def tensor(x):
        return None if x is None else torch.from_numpy(np.asarray(x, dtype=np.int64))

    with torch.no_grad():
        out = torch_model(
            input_ids=tensor(ids),
            attention_mask=tensor(mask),
            token_type_ids=tensor(types),
            output_hidden_states=True,
        )
    logits = out.logits.numpy() if hasattr(out, "logits") else None
    return logits, [h.numpy() for h in out.hidden_states]
