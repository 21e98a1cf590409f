"""`PointCloudSARABlock`: a Point Cloud Transformer offset-attention block with SARA attention."""

from __future__ import annotations

import keras
from keras import ops

from keras_sara import feature_maps as fm_lib
from keras_sara.layers.sara_multi_head_attention import SARAMultiHeadAttention

ATTENTION_TYPES = ("sara", "softmax")
NORMALIZATIONS = ("batch", "layer")


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return value


@keras.saving.register_keras_serializable(package="keras_sara")
class PointCloudSARABlock(keras.layers.Layer):
    """Point Cloud Transformer offset-attention block whose attention is SARA.

    Computes PCT's offset attention (Guo et al. 2021) on per-point features
    `F_in` of shape `(B, N, C)`:

        F_out = LBR(F_in - SA(F_in)) + F_in,    LBR = ReLU(Norm(Linear(.)))

    where `SA` is multi-head self-attention over the points. With
    `attention="sara"` (the default) `SA` is a
    `keras_sara.layers.SARAMultiHeadAttention`: its cost grows linearly with
    the number of points. `attention="softmax"` builds the same block with
    `keras.layers.MultiHeadAttention` (the teacher), which
    `keras_sara.convert` turns into the SARA block with every weight kept
    (the attention is the attribute `attention_layer`).

    The width `C` is taken from the input; the attention outputs `C`
    features and the linear layer maps `C` to `C`. The linear layer has no
    bias: the normalisation's offset `beta` plays that role (and a bias in
    front of batch normalisation would get no gradient).

    Normalisation: `"batch"` (the default) is PCT's choice. In inference it
    is a fixed per-feature scale and shift, which export folds into the
    linear layer (cheapest on a robot CPU); in training its statistics are
    taken over the valid points only (padded points are masked out). The
    statistics are shared across the batch, so train with batches of
    several clouds. `"layer"` normalises each point on its own: no batch
    statistics and no train/inference difference, for tiny batches, at the
    cost of a few more ops per point when exported.

    Padded clouds: pass `mask` (B, N), True for real points, or let a Keras
    mask arrive with the input. Padded points are removed from the keys and
    values of the attention (for SARA that keeps the linear path: they are
    passed as `value_mask` / `query_mask`, never as a dense (N, N) mask)
    and from the batch-normalisation statistics, so they do not influence
    the outputs of real points in any way; their own output rows are zero
    (finite whatever they held, NaN included). The mask propagates to the
    output as a Keras mask.

    Args:
        num_heads: number of attention heads.
        key_dim: size of each head for queries, keys (and values).
        attention: `"sara"` (linear attention) or `"softmax"` (Keras MHA).
        feature_map: the SARA feature map, a name (`"relu"`, the paper's and
            the default; `"elu+1"`, `"favor+"`, `"hedgehog"`, `"sara"`), a
            config dict or a `keras_sara.feature_maps.FeatureMap`. Used only
            with `attention="sara"`.
        dropout: attention dropout rate, in [0, 1).
        normalization: `"batch"` (PCT's) or `"layer"`, the norm of the LBR.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).

    Call arguments:
        inputs: per-point features, `(B, N, C)`.
        mask: optional boolean `(B, N)`, False for padded points. Defaults
            to the input's Keras mask.
        training: Python bool, training mode (dropout, batch statistics).

    Returns:
        `(B, N, C)`, the block's output; rows of padded points are zero.

    Example:

    >>> import numpy as np
    >>> points = np.random.rand(2, 256, 64).astype("float32")
    >>> mask = np.ones((2, 256), bool); mask[1, 200:] = False   # cloud 2 has 200 points
    >>> block = PointCloudSARABlock(num_heads=4, key_dim=16)
    >>> block(points, mask=mask).shape
    (2, 256, 64)

    References:
        Guo et al., "PCT: Point Cloud Transformer", Computational Visual
        Media 2021, https://arxiv.org/abs/2012.09688
        Leal, Choromanski et al., "SARA-RT: Scaling up Robotics Transformers
        with Self-Adaptive Robust Attention", ICRA 2024,
        https://arxiv.org/abs/2312.01990
    """

    def __init__(
        self,
        num_heads=4,
        key_dim=32,
        attention="sara",
        feature_map="relu",
        dropout=0.0,
        normalization="batch",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = _positive_int("num_heads", num_heads)
        self.key_dim = _positive_int("key_dim", key_dim)
        if attention not in ATTENTION_TYPES:
            raise ValueError(
                f"`attention` must be one of {ATTENTION_TYPES} ('sara' for linear "
                f"attention, 'softmax' for the Keras MHA teacher). Received: attention={attention!r}"
            )
        self.attention = attention
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"`dropout` must be a float in [0, 1). Received: dropout={dropout!r}")
        self.dropout = float(dropout)
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"`normalization` must be one of {NORMALIZATIONS}. Received: normalization={normalization!r}"
            )
        self.normalization = normalization
        # Resolved now so a bad name fails here; kept as given for the config.
        fm_lib.get(feature_map)
        self.feature_map = feature_map if isinstance(feature_map, (str, dict)) else fm_lib.serialize(feature_map)
        self.supports_masking = True

        common = dict(num_heads=num_heads, key_dim=key_dim, dropout=self.dropout, dtype=self.dtype_policy)
        if attention == "sara":
            self.attention_layer = SARAMultiHeadAttention(
                feature_map=self.feature_map, name="attention", **common
            )
        else:
            self.attention_layer = keras.layers.MultiHeadAttention(name="attention", **common)
        self.linear = None
        self.norm = None

    def build(self, input_shape):
        if len(input_shape) != 3 or input_shape[-1] is None:
            raise ValueError(
                "`inputs` must have shape (batch, points, features) with a known "
                f"number of features. Received: inputs.shape={tuple(input_shape)}"
            )
        width = input_shape[-1]
        self.linear = keras.layers.Dense(width, use_bias=False, name="linear", dtype=self.dtype_policy)
        if self.normalization == "batch":
            self.norm = keras.layers.BatchNormalization(name="norm", dtype=self.dtype_policy)
        else:
            self.norm = keras.layers.LayerNormalization(name="norm", dtype=self.dtype_policy)
        self.attention_layer.build(input_shape, input_shape)
        self.linear.build(input_shape)
        self.norm.build(input_shape)

    def call(self, inputs, mask=None, training=None):
        if mask is not None:
            if len(mask.shape) != 2 or (
                mask.shape[1] is not None and inputs.shape[1] is not None and mask.shape[1] != inputs.shape[1]
            ):
                raise ValueError(
                    "`mask` must have shape (batch, points), True for real points. "
                    f"Received: mask.shape={tuple(mask.shape)} for inputs.shape={tuple(inputs.shape)}"
                )
            mask = ops.cast(mask, "bool")
            keep = ops.expand_dims(mask, -1)  # (B, N, 1)
            # Padded rows may hold anything (NaN included): clear them with a
            # select (0 * NaN would be NaN) so nothing but zeros flows on.
            inputs = ops.where(keep, inputs, ops.zeros_like(inputs))
        # query_mask as well as value_mask: the attention then reads only the
        # explicit masks, whether or not `inputs` carries a Keras mask.
        attended = self.attention_layer(
            inputs, inputs, query_mask=mask, value_mask=mask, training=training
        )  # (B, N, C)
        offset = inputs - attended  # (B, N, C): PCT's offset, F_in - SA(F_in)
        hidden = self.linear(offset)  # (B, N, C)
        if self.normalization == "batch":
            hidden = self.norm(hidden, training=training, mask=mask)  # statistics over real points
        else:
            hidden = self.norm(hidden)
        out = ops.relu(hidden) + inputs  # (B, N, C)
        if mask is not None:
            out = ops.where(keep, out, ops.zeros_like(out))
        return out

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        attention, feature_map = self.attention, self.feature_map
        if attention == "softmax" and isinstance(self.attention_layer, SARAMultiHeadAttention):
            # Converted by keras_sara.convert: describe what the block now
            # computes (the conversion also records the exact SARA layer).
            attention = "sara"
            feature_map = fm_lib.serialize(self.attention_layer.feature_map)
            feature_map.pop("build_config", None)
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "key_dim": self.key_dim,
            "attention": attention,
            "feature_map": feature_map,
            "dropout": self.dropout,
            "normalization": self.normalization,
        }
