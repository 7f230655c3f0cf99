"""nystrom_np: a from-scratch NumPy (and CuPy) reference of the Nystromformer masked LM."""

from .backend import get_xp, to_device, to_numpy
from .checkpoint import CheckpointError, convert, find_checkpoint, load
from .config import Config
from .model import (
    encode,
    exact_pinv,
    forward,
    iterative_pinv,
    mlm_head,
    nystrom_attention,
    segment_means,
    softmax,
    softmax_attention,
)
from .weights import Model, from_state_dict, random_model, to_state_dict

__all__ = [
    "CheckpointError",
    "Config",
    "Model",
    "convert",
    "encode",
    "exact_pinv",
    "find_checkpoint",
    "forward",
    "from_state_dict",
    "get_xp",
    "iterative_pinv",
    "load",
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
