"""nystrom_np: a from-scratch NumPy (and CuPy) reference of the Nystromformer masked LM."""

from .attention import (
    exact_pinv,
    iterative_pinv,
    nystrom_attention,
    segment_means,
    softmax,
    softmax_attention,
)
from .backend import get_xp, to_device, to_numpy
from .config import Config
from .model import Model, encode, forward, from_state_dict, mlm_head, random_model, to_state_dict

__all__ = [
    "Config",
    "Model",
    "encode",
    "exact_pinv",
    "forward",
    "from_state_dict",
    "get_xp",
    "iterative_pinv",
    "mlm_head",
    "nystrom_attention",
    "random_model",
    "segment_means",
    "softmax",
    "softmax_attention",
    "to_device",
    "to_numpy",
    "to_state_dict",
]
