"""The model's hyper-parameters, read from a Hugging Face ``config.json``.

One frozen dataclass serves both model families the package runs:

- ``nystromformer``: the defaults are transformers' ``NystromformerConfig`` defaults, which
  are also the values of ``uw-madison/nystromformer-512`` (its hub ``config.json``);
- ``bert``: a plain BERT encoder (transformers' ``BertConfig`` defaults where a field is
  missing). A BERT is a Nystromformer without the conv skip, with positions from 0 and
  the exact erf GELU, so the same ``forward`` runs it.
"""

import dataclasses
import json
import math
import numbers
from pathlib import Path

# The activations the forward pass implements (``hidden_act``).
ACTIVATIONS = ("gelu_new", "gelu", "relu")

# The range each integer field may take. The upper bounds are far above any published model
# and keep an absurd config (10**6 layers) an error in microseconds, before anything is built.
INT_RANGES = {
    "vocab_size": (1, 2**24),
    "hidden_size": (1, 2**16),
    "num_hidden_layers": (1, 512),
    "num_attention_heads": (1, 2**12),
    "intermediate_size": (1, 2**18),
    "max_position_embeddings": (1, 2**20),
    "type_vocab_size": (1, 2**10),
    "num_landmarks": (1, 2**16),
    "segment_means_seq_len": (1, 2**20),
    "conv_kernel_size": (1, 2**12),  # or None
    "pad_token_id": (0, 2**24),  # or None
    "bos_token_id": (0, 2**24),  # or None
    "eos_token_id": (0, 2**24),  # or None
}
OPTIONAL = ("conv_kernel_size", "pad_token_id", "bos_token_id", "eos_token_id")  # may be None
JSON_LIMIT = 1 << 20  # bytes: a config.json holds a few dozen numbers (the real one: 0.7 kB)

# Where a family's defaults differ from the dataclass's (which are the Nystromformer's):
# transformers' BertConfig defaults, for fields a BERT config.json leaves out.
_FAMILY_DEFAULTS = {
    "nystromformer": {},
    "bert": dict(
        vocab_size=30522,
        hidden_act="gelu",
        max_position_embeddings=512,
        layer_norm_eps=1e-12,
        conv_kernel_size=None,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    ),
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyper-parameters of a Nystromformer (or BERT) masked language model."""

    model_type: str = "nystromformer"  # "nystromformer" or "bert"
    vocab_size: int = 30000  # V, rows of the word-embedding table (tied to the MLM decoder)
    hidden_size: int = 768  # C = H * D
    num_hidden_layers: int = 12  # encoder layers
    num_attention_heads: int = 12  # H
    intermediate_size: int = 3072  # width of the feed-forward layer
    hidden_act: str = "gelu_new"  # "gelu_new" (tanh form), "gelu" (exact erf) or "relu"
    max_position_embeddings: int = 510  # longest input N; the table has N + offset rows
    type_vocab_size: int = 2  # token types (segment A / B)
    layer_norm_eps: float = 1e-5  # epsilon of every LayerNorm (biased variance)
    num_landmarks: int = 64  # M, landmarks of Nystrom attention
    segment_means_seq_len: int = 64  # the only N transformers' landmark path accepts
    conv_kernel_size: int | None = 65  # K, taps of the depthwise conv skip; None: no skip
    inv_coeff_init_option: bool = False  # transformers' flag for the pinv init (crashes there)
    initializer_range: float = 0.02  # std of the random weights of `random_model`
    pad_token_id: int | None = 1  # a leftover in the real config: not the tokenizer's pad
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2

    def __post_init__(self):
        for name, (low, high) in INT_RANGES.items():
            _check_int(name, getattr(self, name), low, high)
        _check_real("layer_norm_eps", self.layer_norm_eps, zero_allowed=False)
        _check_real("initializer_range", self.initializer_range, zero_allowed=True)
        if not isinstance(self.inv_coeff_init_option, bool):
            value = _show(self.inv_coeff_init_option)
            raise TypeError(f"inv_coeff_init_option must be true or false, got {value}.")
        for name in ("model_type", "hidden_act"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string, got {_show(getattr(self, name))}.")
        if self.model_type not in _FAMILY_DEFAULTS:
            raise ValueError(
                f"model_type {_show(self.model_type)} is not supported; "
                f"use one of {sorted(_FAMILY_DEFAULTS)}."
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}."
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act {_show(self.hidden_act)} is not supported; "
                f"use one of {tuple(ACTIVATIONS)}."
            )
        if self.model_type == "bert" and self.conv_kernel_size is not None:
            raise ValueError("a bert config has no conv skip: conv_kernel_size must be None.")
        if self.conv_kernel_size is not None and self.conv_kernel_size % 2 == 0:
            raise ValueError(
                f"conv_kernel_size must be odd (the skip pads K // 2 on each side), "
                f"got {self.conv_kernel_size}."
            )

    @property
    def head_size(self) -> int:
        """D, channels per head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def position_offset(self) -> int:
        """First position id: transformers' Nystromformer counts positions from 2."""
        return 2 if self.model_type == "nystromformer" else 0

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        """Build from a config.json dict; unknown keys are ignored, missing ones defaulted."""
        if not isinstance(values, dict):
            raise TypeError(f"a config must be a JSON object (a dict), got {_show(values)}.")
        model_type = values.get("model_type", "nystromformer")
        if not isinstance(model_type, str) or model_type not in _FAMILY_DEFAULTS:
            raise ValueError(
                f"config.json has model_type {_show(model_type)}; nystrom_np runs "
                f"{sorted(_FAMILY_DEFAULTS)} models."
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in values.items() if k in fields}
        return cls(**{**_FAMILY_DEFAULTS[model_type], **known, "model_type": model_type})

    @classmethod
    def from_json(cls, path) -> "Config":
        """Read a ``config.json`` file (or a directory holding one)."""
        if not isinstance(path, (str, Path)) or str(path) == "":
            raise TypeError(f"a config path must be a non-empty str or Path, got {_show(path)}.")
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        values = read_json(path)
        try:
            return cls.from_dict(values)
        except (ValueError, TypeError) as e:  # name the file: the caller may not know which
            raise type(e)(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        """The fields as a config.json dict (what ``from_dict`` reads back)."""
        return dataclasses.asdict(self)


def _check_int(name, value, low, high):
    """An int field within [low, high] (or None, for the fields in OPTIONAL)."""
    if value is None and name in OPTIONAL:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {_show(value)}.")
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {_show(value)}.")


def _check_real(name, value, zero_allowed):
    """A float field: a finite number, > 0 (or >= 0 where zero is allowed)."""
    bound = ">= 0" if zero_allowed else "> 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number {bound}, got {_show(value)}.")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_allowed):
        raise ValueError(f"{name} must be a finite number {bound}, got {_show(value)}.")


def _show(value, width=40) -> str:
    """A short repr for error messages: a huge or hostile value must not flood them."""
    try:
        text = repr(value)
    except ValueError:  # an int of over 4300 digits
        return f"an integer of {value.bit_length()} bits"
    return f"{text[:width]}... ({type(value).__name__})" if len(text) > width else text


def read_json(path, limit=JSON_LIMIT):
    """The JSON value of a small file, or a ValueError naming the file and what is wrong.

    At most ``limit`` bytes are read (a huge or endless file is refused unread); the text
    must be UTF-8 and nested at most as deeply as Python's parser allows.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {path.name} at {path}") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise ValueError(f"{path} is over {limit} bytes; a {path.name} is a few kB at most.")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}); JSON must be.") from None
    except RecursionError:
        raise ValueError(f"{path} nests JSON too deeply to be a {path.name}.") from None
    except ValueError as e:  # JSONDecodeError, or an integer of over 4300 digits
        raise ValueError(f"{path} is not valid JSON: {str(e)[:200]}") from None
