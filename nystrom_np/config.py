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
from pathlib import Path

# The activations the forward pass implements (``hidden_act``).
ACTIVATIONS = ("gelu_new", "gelu", "relu")

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
        if self.model_type not in _FAMILY_DEFAULTS:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported; "
                f"use one of {sorted(_FAMILY_DEFAULTS)}."
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}."
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not supported; "
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
        model_type = values.get("model_type", "nystromformer")
        if model_type not in _FAMILY_DEFAULTS:
            raise ValueError(
                f"config.json has model_type {model_type!r}; nystrom_np runs "
                f"{sorted(_FAMILY_DEFAULTS)} models."
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in values.items() if k in fields}
        return cls(**{**_FAMILY_DEFAULTS[model_type], **known, "model_type": model_type})

    @classmethod
    def from_json(cls, path) -> "Config":
        """Read a ``config.json`` file (or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path} does not hold a JSON object.")
        return cls.from_dict(values)

    def to_dict(self) -> dict:
        """The fields as a config.json dict (what ``from_dict`` reads back)."""
        return dataclasses.asdict(self)
