"""Feature maps phi for linear attention, selectable by name like Keras initializers.

A feature map turns per-head queries or keys `(B, ..., H, d)` into
non-negative features `(B, ..., H, m)` so that `phi(q).phi(k)` stands in for
`exp(q.k / sqrt(d))`. Every map here is a `keras.layers.Layer` (learnable maps
own weights), computes in float32 by default, and is serialisable.

| name        | class            | m          | parameters                       |
|-------------|------------------|------------|----------------------------------|
| `"relu"`    | `ReLU`           | d          | none (the SARA-RT paper's choice, floored at 1e-3) |
| `"elu+1"`   | `EluPlusOne`     | d          | none (Katharopoulos et al. 2020)  |
| `"favor+"`  | `FavorPlus`      | num_features | fixed random projection (Performer) |
| `"hedgehog"`| `Hedgehog`       | 2 d        | per-head W, b for q and for k     |
| `"sara"`    | `SARAFeatureMap` | d          | per-head G, v for q and for k     |

Example:

>>> import keras_sara
>>> fm = keras_sara.feature_maps.get("favor+")
>>> config = keras_sara.feature_maps.serialize(fm)
>>> type(keras_sara.feature_maps.deserialize(config)).__name__
'FavorPlus'

Write your own by subclassing `FeatureMap`, implementing `call(inputs,
role)` and `feature_dim(key_dim)`, and registering it with
`keras.saving.register_keras_serializable` so that models using it reload.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

_PACKAGE = "keras_sara"
ROLES = ("query", "key")


def _check_role(role):
    if role not in ROLES:
        raise ValueError(f"`role` must be one of {ROLES}. Received: role={role!r}")


def _sequence_axes(rank):
    """Axes between batch and heads: the token axes of (B, ..., H, F)."""
    return tuple(range(1, rank - 2))


def _stabiliser(z, role):
    """A constant to subtract from exponents before `exp`, chosen so it cancels.

    Queries: the max over each token's own features. It scales numerator and
    normaliser of that query's output alike, so it cancels exactly.
    Keys: one max per (batch, head) over all tokens and features, a constant
    for every key of the sum, so it also cancels (up to its effect on `eps`).
    Gradients do not flow through it (it is a stop-gradient constant).
    """
    # `ops.amax`, not `ops.max`: Keras' torch `max` inspects its result in a way torch.compile
    # cannot trace (a graph break per call); the values are the same.
    if role == "query":
        m = ops.amax(z, axis=-1, keepdims=True)
    else:
        axes = _sequence_axes(len(z.shape)) + (len(z.shape) - 1,)
        m = ops.amax(z, axis=axes, keepdims=True)
    return ops.stop_gradient(m)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FeatureMap(keras.layers.Layer):
    """Base class of the feature maps used by `SARAMultiHeadAttention`.

    Subclasses implement `call(inputs, role)`, where `inputs` has shape
    `(B, ..., H, d)` (batch, token axes, heads, key_dim) and `role` is
    `"query"` or `"key"`, and return `(B, ..., H, feature_dim(d))`
    non-negative features. Learnable maps create per-role weights in `build`.
    The default dtype is float32 whatever the global policy, because the
    attention sums accumulate in float32.

    Args:
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).
    """

    #: whether `build` creates weights
    learnable = False

    #: whether each output feature depends on its own input coordinate only
    #: (so the map can run on one head at a time, as LiteRT export does)
    elementwise = False

    #: default layer name (Keras would derive "re_lu" from "ReLU")
    default_name = None

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        if self.default_name:
            kwargs.setdefault("name", self.default_name)
        super().__init__(**kwargs)

    def feature_dim(self, key_dim: int) -> int:
        return key_dim

    def call(self, inputs, role="query"):
        raise NotImplementedError(f"{type(self).__name__} must implement `call(inputs, role)`.")

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.feature_dim(input_shape[-1]),)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ReLU(FeatureMap):
    """`phi(x) = max(x, stabilizer)`: ReLU features, the SARA-RT paper's choice.

    No parameters (so a SARA layer has exactly the weights of Keras MHA). A
    positive scale on x cancels in the attention ratio, so MHA's 1/sqrt(d)
    query scaling is harmless.

    `max(x, c) = relu(x - c) + c`: Performer's stabilised ReLU, `relu(x) + c`,
    of an input shifted by c. Behind a projection with a bias the shift is
    absorbed by the bias, so both define the same family of kernels; the
    single `max` is one elementwise pass instead of two, which matters
    because this map runs on every query and key.

    Args:
        stabilizer: small non-negative floor on every feature so that no query
            sees an all-zero normaliser (Performer uses 1e-3).

    Example:
    >>> import numpy as np
    >>> ReLU()(np.array([[[[-1.0, 2.0]]]])).shape
    (1, 1, 1, 2)

    References:
        Leal, Choromanski et al., SARA-RT, https://arxiv.org/abs/2312.01990
    """

    default_name = "relu"
    elementwise = True

    def __init__(self, stabilizer=1e-3, **kwargs):
        super().__init__(**kwargs)
        if isinstance(stabilizer, bool) or not isinstance(stabilizer, (int, float)) or stabilizer < 0:
            raise ValueError(
                f"`stabilizer` must be a non-negative float. Received: stabilizer={stabilizer!r}"
            )
        self.stabilizer = float(stabilizer)

    def call(self, inputs, role="query"):
        _check_role(role)
        return ops.maximum(inputs, self.stabilizer)

    def get_config(self):
        return {**super().get_config(), "stabilizer": self.stabilizer}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class EluPlusOne(FeatureMap):
    """`phi(x) = elu(x) + 1`, strictly positive (Katharopoulos et al. 2020).

    References:
        Katharopoulos et al., "Transformers are RNNs",
        https://arxiv.org/abs/2006.16236
    """

    default_name = "elu_plus_one"
    elementwise = True

    def call(self, inputs, role="query"):
        _check_role(role)
        return ops.elu(inputs) + 1.0


def orthogonal_gaussian(num_features: int, dim: int, seed: int) -> np.ndarray:
    """(num_features, dim) blocks of orthogonal rows with Gaussian-like norms.

    Rows inside each block of `dim` are exactly orthogonal; row norms follow
    the chi distribution of a Gaussian vector, so the matrix is a
    lower-variance drop-in for i.i.d. N(0, 1) rows (Performer, FAVOR+).
    """
    rng = np.random.default_rng(seed)
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        blocks.append(q.T)
    w = np.concatenate(blocks, axis=0)[:num_features]
    norms = np.linalg.norm(rng.standard_normal((num_features, dim)), axis=1)
    return (w * norms[:, None]).astype("float32")


def _orthogonal_gaussian_ops(num_features, dim, seed_generator):
    """`orthogonal_gaussian` drawn with keras.random (for redraws inside fit)."""
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        g = keras.random.normal((dim, dim), seed=seed_generator)
        q, _ = ops.qr(g)
        blocks.append(ops.transpose(q))
    w = ops.concatenate(blocks, axis=0)[:num_features]
    norms = ops.norm(keras.random.normal((num_features, dim), seed=seed_generator), axis=1)
    return w * ops.expand_dims(norms, 1)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FavorPlus(FeatureMap):
    """Positive orthogonal random features (FAVOR+), an unbiased softmax-kernel estimate.

    `phi(x) = exp(w.x' - |x'|^2 / 2 - c) / sqrt(m)` with `x' = x d^(-1/4)`,
    `m` orthogonal Gaussian rows `w` shared by queries and keys (they must be,
    for the estimate to hold), and a stabiliser `c` that cancels in the
    attention ratio. The projection is a non-trainable weight drawn from
    `seed`, so it is saved with the model and exported.

    Args:
        num_features: number of random features m; defaults to `key_dim`.
        seed: integer seed of the projection, kept in the config. A random
            seed is drawn (and then kept) if None.
        redraw: if True, draw a fresh projection at every training call
            (Performer's feature redrawing); inference uses the last one.

    References:
        Choromanski et al., "Rethinking Attention with Performers",
        https://arxiv.org/abs/2009.14794
    """

    default_name = "favor_plus"

    learnable = False

    def __init__(self, num_features=None, seed=None, redraw=False, **kwargs):
        super().__init__(**kwargs)
        if num_features is not None and (
            isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0
        ):
            raise ValueError(
                "`num_features` must be a positive integer or None. "
                f"Received: num_features={num_features!r}"
            )
        if seed is None:
            seed = int(np.random.randint(0, 2**31 - 1))
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an integer or None. Received: seed={seed!r}")
        self.num_features = num_features
        self.seed = seed
        self.redraw = bool(redraw)
        self.seed_generator = keras.random.SeedGenerator(seed) if self.redraw else None

    def feature_dim(self, key_dim):
        return self.num_features or key_dim

    def build(self, input_shape):
        dim = int(input_shape[-1])
        m = self.feature_dim(dim)
        w = orthogonal_gaussian(m, dim, self.seed)
        self.projection = self.add_weight(
            name="projection",
            shape=(m, dim),
            initializer=keras.initializers.Constant(w),
            trainable=False,
        )

    def call(self, inputs, role="query", training=None):
        _check_role(role)
        dim = inputs.shape[-1]
        # the variable's tensor, not the variable: torch.compile cannot trace an einsum over a Keras
        # variable (a graph break per call)
        w = ops.convert_to_tensor(self.projection)
        if self.redraw and training and role == "query":
            w = _orthogonal_gaussian_ops(w.shape[0], dim, self.seed_generator)
            self.projection.assign(w)
        x = inputs * (float(dim) ** -0.25)
        z = ops.einsum("...d,md->...m", x, w)  # (B, ..., H, m)
        z = z - 0.5 * ops.sum(x * x, axis=-1, keepdims=True)
        z = z - _stabiliser(z, role)
        return ops.exp(z) / math.sqrt(w.shape[0])

    def get_config(self):
        return {
            **super().get_config(),
            "num_features": self.num_features,
            "seed": self.seed,
            "redraw": self.redraw,
        }


class _PerHeadLinear:
    """Helpers for per-head (H, d, d) kernels initialised to the identity."""

    @staticmethod
    def identity_kernel(heads, dim):
        return np.tile(np.eye(dim, dtype="float32")[None], (heads, 1, 1))

    @staticmethod
    def add_weights(layer, input_shape, vector_name, vector_init):
        """Per role: `<role>_kernel` (H, d, d) = identity and `<role>_<vector_name>` (H, d)."""
        heads, dim = int(input_shape[-2]), int(input_shape[-1])
        eye = keras.initializers.Constant(_PerHeadLinear.identity_kernel(heads, dim))
        for role in ROLES:
            kernel = layer.add_weight(name=f"{role}_kernel", shape=(heads, dim, dim), initializer=eye)
            vector = layer.add_weight(name=f"{role}_{vector_name}", shape=(heads, dim), initializer=vector_init)
            setattr(layer, f"{role}_kernel", kernel)
            setattr(layer, f"{role}_{vector_name}", vector)

    @staticmethod
    def apply(x, kernel, bias=None):
        y = ops.einsum("...hd,hde->...he", x, kernel)  # (B, ..., H, e)
        return y if bias is None else y + bias


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Hedgehog(FeatureMap):
    """Learnable `[exp(Wx + b), exp(-Wx - b)]` per head, W = identity at init.

    Separate (W, b) for queries and for keys, trained by attention
    distillation (Hedgehog) or by the task loss during up-training. Features
    have size 2 d. Exponents are stabilised by a constant that cancels.

    References:
        Zhang et al., "The Hedgehog & the Porcupine", ICLR 2024,
        https://arxiv.org/abs/2402.04347
    """

    default_name = "hedgehog"

    learnable = True

    def feature_dim(self, key_dim):
        return 2 * key_dim

    def build(self, input_shape):
        _PerHeadLinear.add_weights(self, input_shape, "bias", "zeros")

    def call(self, inputs, role="query"):
        _check_role(role)
        z = _PerHeadLinear.apply(inputs, getattr(self, f"{role}_kernel"), getattr(self, f"{role}_bias"))
        z = ops.concatenate([z, -z], axis=-1)  # (B, ..., H, 2d)
        return ops.exp(z - _stabiliser(z, role))


_SARA_ACTIVATIONS = ("relu", "elu+1")


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SARAFeatureMap(FeatureMap):
    """The general learnable SARA map `phi(x) = v * f(G x)`.

    Per head, separate `G` (initialised to the identity) and `v` (initialised
    to ones) for queries and for keys, so at initialisation it equals the
    `relu` (or `elu+1`) map exactly and up-training starts from the paper's
    configuration.

    Args:
        activation: the elementwise `f`: `"relu"` (as the `relu` map,
            `max(x, stabilizer)`) or `"elu+1"`.
        stabilizer: the floor of the `"relu"` activation.

    References:
        Leal, Choromanski et al., SARA-RT, https://arxiv.org/abs/2312.01990
    """

    default_name = "sara_feature_map"

    learnable = True

    def __init__(self, activation="relu", stabilizer=1e-3, **kwargs):
        super().__init__(**kwargs)
        if activation not in _SARA_ACTIVATIONS:
            raise ValueError(
                f"`activation` must be one of {_SARA_ACTIVATIONS}. Received: activation={activation!r}"
            )
        if isinstance(stabilizer, bool) or not isinstance(stabilizer, (int, float)) or stabilizer < 0:
            raise ValueError(
                f"`stabilizer` must be a non-negative float. Received: stabilizer={stabilizer!r}"
            )
        self.activation = activation
        self.stabilizer = float(stabilizer)

    def build(self, input_shape):
        _PerHeadLinear.add_weights(self, input_shape, "scale", "ones")

    def call(self, inputs, role="query"):
        _check_role(role)
        z = _PerHeadLinear.apply(inputs, getattr(self, f"{role}_kernel"))
        f = ops.maximum(z, self.stabilizer) if self.activation == "relu" else ops.elu(z) + 1.0
        return getattr(self, f"{role}_scale") * f

    def get_config(self):
        return {**super().get_config(), "activation": self.activation, "stabilizer": self.stabilizer}


_BY_NAME = {
    "relu": ReLU,
    "elu+1": EluPlusOne,
    "favor+": FavorPlus,
    "hedgehog": Hedgehog,
    "sara": SARAFeatureMap,
}
_ALIASES = {"elu_plus_one": "elu+1", "favor_plus": "favor+", "favor": "favor+", "performer": "favor+"}
ALL_OBJECTS = {cls.__name__: cls for cls in (FeatureMap, *_BY_NAME.values())}


def names():
    """The names `get` accepts."""
    return tuple(_BY_NAME)


def serialize(feature_map: FeatureMap) -> dict:
    """Config dict of a feature map (what `get_config` of a layer stores)."""
    if not isinstance(feature_map, FeatureMap):
        raise ValueError(
            "`feature_map` must be a keras_sara.feature_maps.FeatureMap. "
            f"Received: feature_map={feature_map!r}"
        )
    return keras.saving.serialize_keras_object(feature_map)


def deserialize(config, custom_objects=None) -> FeatureMap:
    """Inverse of `serialize` (also accepts a registered name)."""
    if isinstance(config, str):
        return get(config)
    obj = keras.saving.deserialize_keras_object(
        config, custom_objects={**ALL_OBJECTS, **(custom_objects or {})}
    )
    if not isinstance(obj, FeatureMap):
        raise ValueError(
            f"The config does not describe a FeatureMap. Received: config={config!r}"
        )
    return obj


def get(identifier) -> FeatureMap:
    """Resolve a name, a config dict or an instance to a `FeatureMap`.

    Args:
        identifier: one of `names()` (case-insensitive, e.g. `"relu"`,
            `"favor+"`), a dict from `serialize`, a `FeatureMap` instance
            (returned as is), or None for the default `"relu"`.
    """
    if identifier is None:
        return ReLU()
    if isinstance(identifier, FeatureMap):
        return identifier
    if isinstance(identifier, str):
        key = identifier.strip().lower()
        key = _ALIASES.get(key, key)
        if key not in _BY_NAME:
            raise ValueError(
                f"Unknown feature map name. Expected one of {names()} (or a "
                f"FeatureMap instance). Received: feature_map={identifier!r}"
            )
        return _BY_NAME[key]()
    if isinstance(identifier, dict):
        return deserialize(identifier)
    hint = (
        " A plain function would be lost when the model is saved: subclass "
        "keras_sara.feature_maps.FeatureMap instead."
        if callable(identifier)
        else ""
    )
    raise ValueError(
        "`feature_map` must be a name, a config dict or a FeatureMap instance. "
        f"Received: feature_map={identifier!r}.{hint}"
    )
