"""A model's weights: the container ``forward`` takes, and building it from a checkpoint.

Weights are a nested dict whose names follow the checkpoint's (transformers' layout, see
``from_state_dict``); linear weights are transposed to (in, out), q/k/v fused, the conv
taps reshaped, everything cast and shape-checked once, here, never inside ``forward``.

Shapes: C hidden size, I intermediate size, V vocabulary, P position rows, T token types,
H heads, K conv taps.
"""

import dataclasses

import numpy as np

from .backend import get_xp, map_arrays, to_device, to_numpy
from .config import Config


@dataclasses.dataclass(frozen=True)
class Model:
    """A config and its weights (a nested dict of arrays on one device, in one dtype)."""

    config: Config
    params: dict

    @property
    def xp(self):
        """The array module of the weights: numpy, or cupy on a GPU."""
        return get_xp(self.params["embeddings"]["word"])

    @property
    def dtype(self):
        return self.params["embeddings"]["word"].dtype

    @property
    def has_head(self) -> bool:
        """Whether the model carries an MLM head (a sentence-embedding BERT has none)."""
        return self.params["head"] is not None

    def astype(self, dtype) -> "Model":
        """The same model with every weight cast to ``dtype`` (e.g. np.float64)."""
        dtype = np.dtype(dtype)
        if dtype.kind != "f":
            raise TypeError(f"weights must be floating point, got {dtype}.")
        return Model(self.config, map_arrays(lambda a: a.astype(dtype), self.params))

    def to(self, device: str) -> "Model":
        """The same model with its weights on ``device``: "cpu" (NumPy) or "gpu" (CuPy)."""
        return Model(self.config, to_device(self.params, device))


def expected_shapes(config: Config, prefix: str, head: bool) -> dict:
    """Checkpoint name -> shape of every weight the model needs (transformers' layout)."""
    c, i, h = config.hidden_size, config.intermediate_size, config.num_attention_heads
    v, t = config.vocab_size, config.type_vocab_size
    p = config.max_position_embeddings + config.position_offset
    e = f"{prefix}embeddings."
    shapes = {
        e + "word_embeddings.weight": (v, c),
        e + "position_embeddings.weight": (p, c),
        e + "token_type_embeddings.weight": (t, c),
        e + "LayerNorm.weight": (c,),
        e + "LayerNorm.bias": (c,),
    }
    dense = {
        "attention.self.query": (c, c),
        "attention.self.key": (c, c),
        "attention.self.value": (c, c),
        "attention.output.dense": (c, c),
        "intermediate.dense": (i, c),
        "output.dense": (c, i),
    }
    for n in range(config.num_hidden_layers):
        layer = f"{prefix}encoder.layer.{n}."
        for name, shape in dense.items():
            shapes[layer + name + ".weight"] = shape
            shapes[layer + name + ".bias"] = shape[:1]
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[layer + name + ".weight"] = (c,)
            shapes[layer + name + ".bias"] = (c,)
        if config.conv_kernel_size is not None:
            shapes[layer + "attention.self.conv.weight"] = (h, 1, config.conv_kernel_size, 1)
    if head:
        shapes.update({
            "cls.predictions.transform.dense.weight": (c, c),
            "cls.predictions.transform.dense.bias": (c,),
            "cls.predictions.transform.LayerNorm.weight": (c,),
            "cls.predictions.transform.LayerNorm.bias": (c,),
            "cls.predictions.bias": (v,),
        })
    return shapes


def weight_problem(name: str, shape, dtype, expected: tuple) -> str | None:
    """What is wrong with a weight of this declared shape and dtype, or None if nothing.

    The one wording of these checks, for ``from_state_dict`` and the file readers alike
    (``checkpoint.check_layout``). Integer and bool weights are refused, as transformers
    refuses them: cast to float, they would give a model of wrong weights without a word.
    """
    if tuple(shape) != tuple(expected):
        return f"{name} has shape {tuple(shape)}, expected {tuple(expected)}"
    try:
        dtype = np.dtype(dtype)
    except TypeError:  # e.g. a torch tensor's torch.float32
        return f"{name} has dtype {dtype}, not a NumPy dtype: pass NumPy (or CuPy) arrays"
    if dtype.kind != "f":
        return f"{name} is {dtype.name}: weights must be floating point (float16/32/64)"
    return None


def _prefix(config: Config, state) -> str:
    """``"nystromformer."`` / ``"bert."``, or ``""`` for a bare encoder (sentence-transformers)."""
    for prefix in (f"{config.model_type}.", ""):
        if f"{prefix}embeddings.word_embeddings.weight" in state:
            return prefix
    return f"{config.model_type}."


def _is_ignored(name: str, prefix: str) -> bool:
    """Keys a checkpoint may hold that the forward pass does not read."""
    return name in (
        f"{prefix}embeddings.position_ids",  # the 2..N+1 (or 0..N-1) buffer of old saves
        f"{prefix}embeddings.token_type_ids",  # an all-zero buffer
        "cls.predictions.decoder.weight",  # tied to the word embeddings (checked equal)
        "cls.predictions.decoder.bias",  # tied to cls.predictions.bias (checked equal)
    ) or name.startswith((f"{prefix}pooler.", "cls.seq_relationship."))


def from_state_dict(state: dict, config: Config, dtype=np.float32) -> Model:
    """Build a model from a state dict of arrays keyed by the checkpoint's names.

    Accepts both layouts of a Nystromformer checkpoint (the old ``pytorch_model.bin`` with
    the tied ``cls.predictions.decoder.*`` and ``position_ids``, and ``save_pretrained``'s
    safetensors without them), BERT masked-LM checkpoints (``bert.`` prefix) and bare BERT
    encoders without a head (no prefix, as sentence-transformers saves them). All missing,
    unexpected and mis-shaped keys, and integer or bool weights, are reported together in
    one ValueError (buffers the model does not read, such as the integer ``position_ids``,
    are skipped).

    The weights are copied: linear weights transposed to (in, out), q/k/v fused into one
    (C, 3C) product, the conv taps reshaped to (H, K), everything cast to ``dtype``.
    """
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise TypeError(f"dtype must be floating point, got {dtype}.")
    prefix = _prefix(config, state)
    head = any(name.startswith("cls.predictions.") for name in state)
    shapes = expected_shapes(config, prefix, head)
    problems = []
    for name, shape in shapes.items():
        if name not in state:
            problems.append(f"missing {name} {shape}")
        elif problem := weight_problem(name, state[name].shape, state[name].dtype, shape):
            problems.append(problem)
    for name in state:
        if name not in shapes and not _is_ignored(name, prefix):
            problems.append(f"unexpected {name} {tuple(state[name].shape)}")
    problems += _check_tied(state, prefix)
    if problems:
        raise ValueError(
            f"the weights do not fit this {config.model_type} config "
            f"({len(problems)} problem(s)):\n  " + "\n  ".join(problems)
        )

    def get(name, transpose=False):
        """A C-contiguous copy in ``dtype`` (the source can be freed), in one pass."""
        array = state[name].T if transpose else state[name]
        return np.array(array, dtype=dtype, order="C")

    def dense(name):
        return {"w": get(name + ".weight", transpose=True), "b": get(name + ".bias")}  # (in, out)

    def norm(name):
        return {"g": get(name + ".weight"), "b": get(name + ".bias")}

    e = f"{prefix}embeddings."
    params = {
        "embeddings": {
            "word": get(e + "word_embeddings.weight"),  # (V, C)
            "position": get(e + "position_embeddings.weight"),  # (P, C)
            "token_type": get(e + "token_type_embeddings.weight"),  # (T, C)
            "ln": norm(e + "LayerNorm"),
        },
        "layers": [],
        "head": None,
    }
    for n in range(config.num_hidden_layers):
        layer = f"{prefix}encoder.layer.{n}."
        q, k, v = (dense(layer + f"attention.self.{x}") for x in ("query", "key", "value"))
        params["layers"].append({
            "qkv": {  # fused: one (C, 3C) product gives q, k and v
                "w": np.concatenate([q["w"], k["w"], v["w"]], axis=1),  # (C, 3C)
                "b": np.concatenate([q["b"], k["b"], v["b"]]),  # (3C,)
            },
            "conv": (
                get(layer + "attention.self.conv.weight")[:, 0, :, 0]  # (H, 1, K, 1) -> (H, K)
                if config.conv_kernel_size is not None
                else None
            ),
            "attention_output": dense(layer + "attention.output.dense"),
            "attention_ln": norm(layer + "attention.output.LayerNorm"),
            "intermediate": dense(layer + "intermediate.dense"),
            "output": dense(layer + "output.dense"),
            "output_ln": norm(layer + "output.LayerNorm"),
        })
    if head:
        params["head"] = {
            "transform": dense("cls.predictions.transform.dense"),
            "transform_ln": norm("cls.predictions.transform.LayerNorm"),
            "bias": get("cls.predictions.bias"),  # (V,)
        }
    return Model(config, params)


def _check_tied(state, prefix) -> list:
    """The MLM decoder is tied to the word embeddings: a checkpoint that has both must agree."""
    problems = []
    pairs = (
        ("cls.predictions.decoder.weight", f"{prefix}embeddings.word_embeddings.weight"),
        ("cls.predictions.decoder.bias", "cls.predictions.bias"),
    )
    for tied, source in pairs:
        if tied in state and source in state:
            tied_array, expected = state[tied], tuple(state[source].shape)
            if problem := weight_problem(tied, tied_array.shape, tied_array.dtype, expected):
                problems.append(f"{problem}; it is tied to {source}")
            elif not np.array_equal(state[tied], state[source]):
                problems.append(f"{tied} differs from {source}: untied decoders are not supported")
    return problems


def to_state_dict(model: Model) -> dict:
    """NumPy arrays keyed by transformers' names (the ``save_pretrained`` layout).

    The inverse of ``from_state_dict``: no tied decoder keys, no ``position_ids`` buffer.
    """
    config, params = model.config, model.params
    prefix = f"{config.model_type}."
    c = config.hidden_size
    state = {}

    def put(name, value):
        state[name] = to_numpy(value)

    def dense(name, p):
        put(name + ".weight", p["w"].T.copy())
        put(name + ".bias", p["b"])

    def norm(name, p):
        put(name + ".weight", p["g"])
        put(name + ".bias", p["b"])

    emb = params["embeddings"]
    put(prefix + "embeddings.word_embeddings.weight", emb["word"])
    put(prefix + "embeddings.position_embeddings.weight", emb["position"])
    put(prefix + "embeddings.token_type_embeddings.weight", emb["token_type"])
    norm(prefix + "embeddings.LayerNorm", emb["ln"])
    for n, layer in enumerate(params["layers"]):
        name = f"{prefix}encoder.layer.{n}."
        w, b = layer["qkv"]["w"], layer["qkv"]["b"]
        for j, x in enumerate(("query", "key", "value")):
            part = slice(j * c, (j + 1) * c)
            dense(name + f"attention.self.{x}", {"w": w[:, part], "b": b[part]})
        if layer["conv"] is not None:
            put(name + "attention.self.conv.weight", layer["conv"][:, None, :, None])
        dense(name + "attention.output.dense", layer["attention_output"])
        norm(name + "attention.output.LayerNorm", layer["attention_ln"])
        dense(name + "intermediate.dense", layer["intermediate"])
        dense(name + "output.dense", layer["output"])
        norm(name + "output.LayerNorm", layer["output_ln"])
    if params["head"] is not None:
        dense("cls.predictions.transform.dense", params["head"]["transform"])
        norm("cls.predictions.transform.LayerNorm", params["head"]["transform_ln"])
        put("cls.predictions.bias", params["head"]["bias"])
    return state


def random_model(config: Config | None = None, seed=0, dtype=np.float32, head=True) -> Model:
    """A seeded random model of ``config`` (default: the real checkpoint's config).

    Weights and embeddings ~ N(0, initializer_range^2); biases too, and LayerNorm gains
    1 + N(0, initializer_range^2), so that no parameter is trivially 0 or 1 and parity tests
    exercise every one. The offline stand-in for the real checkpoint: its predictions
    are meaningless.
    """
    config = Config() if config is None else config
    rng = np.random.default_rng(seed)
    std = config.initializer_range
    state = {}
    for name, shape in expected_shapes(config, f"{config.model_type}.", head).items():
        values = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        if name.endswith("LayerNorm.weight"):
            values += 1
        state[name] = values
    return from_state_dict(state, config, dtype)
