"""`build_pct_policy`: a Point Cloud Transformer robot policy (point cloud + robot state -> action)."""

from __future__ import annotations

from typing import Sequence

import keras
from keras import ops

from keras_sara.layers.point_cloud_block import ATTENTION_TYPES, NORMALIZATIONS, PointCloudSARABlock

# Added to masked-out features before the max pool: far below any feature,
# far above float32's lowest value so float16 compute cannot overflow to -inf.
_MASKED_MAX_FILL = -6.0e4


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}. Received: {name}={value!r}")
    return value


@keras.saving.register_keras_serializable(package="keras_sara")
class ClearPadding(keras.layers.Layer):
    """Zeroes the rows of padded points: `where(mask, inputs, 0)`.

    A select, not a product, so padding that holds NaN or inf comes out as
    zeros (0 * NaN is NaN) and cannot reach gradients either. The mask is
    kept as the output's Keras mask.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs, mask=None):
        if mask is None:
            return inputs
        keep = ops.expand_dims(ops.cast(mask, "bool"), -1)  # (B, N, 1)
        return ops.where(keep, inputs, ops.zeros_like(inputs))


@keras.saving.register_keras_serializable(package="keras_sara")
class MaskedMaxMeanPool(keras.layers.Layer):
    """Max and mean over the points of each cloud, padded points excluded.

    Inputs `(B, N, C)` and an optional boolean mask `(B, N)` (or the input's
    Keras mask); output `(B, 2 C)`, the max then the mean. A cloud with no
    valid point pools to zeros (finite, never -inf or NaN). Only
    elementwise ops, selects and reductions: TFLite builtins.

    Example:

    >>> import numpy as np
    >>> x = np.arange(12, dtype="float32").reshape(1, 4, 3)
    >>> MaskedMaxMeanPool()(x, mask=np.array([[True, True, False, False]])).shape
    (1, 6)
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs, mask=None):
        if mask is None:
            return ops.concatenate([ops.max(inputs, axis=1), ops.mean(inputs, axis=1)], axis=-1)
        keep = ops.expand_dims(ops.cast(mask, "bool"), -1)  # (B, N, 1)
        fill = ops.cast(_MASKED_MAX_FILL, inputs.dtype)
        pooled_max = ops.max(ops.where(keep, inputs, fill), axis=1)  # (B, C)
        any_valid = ops.any(keep, axis=1)  # (B, 1)
        pooled_max = ops.where(any_valid, pooled_max, ops.zeros_like(pooled_max))
        total = ops.sum(ops.where(keep, inputs, ops.zeros_like(inputs)), axis=1)  # (B, C)
        count = ops.sum(ops.cast(keep, inputs.dtype), axis=1)  # (B, 1)
        pooled_mean = total / ops.maximum(count, ops.cast(1.0, inputs.dtype))
        return ops.concatenate([pooled_max, pooled_mean], axis=-1)  # (B, 2C)

    def compute_mask(self, inputs, mask=None):
        return None  # one vector per cloud: nothing left to mask

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 2 * input_shape[-1])


def build_pct_policy(
    num_points,
    action_dim,
    point_dim: int = 3,
    extra_dim: int = 0,
    width: int = 128,
    num_blocks: int = 4,
    num_heads: int = 4,
    key_dim: int = 32,
    attention: str = "sara",
    feature_map="relu",
    dropout: float = 0.0,
    normalization: str = "batch",
    head_units: Sequence[int] = (256, 128),
    action_activation=None,
    use_mask: bool = True,
    name: str = "pct_policy",
) -> keras.Model:
    """A Point Cloud Transformer policy: point cloud and robot state in, action out.

    The architecture of PCT's encoder (Guo et al. 2021) with the naive
    per-point embedding, as a Functional model:

    1. per-point embedding: two LBR layers (Dense, BatchNormalization over
       the valid points, ReLU) from `point_dim` to `width` features;
    2. `num_blocks` `PointCloudSARABlock`s (offset attention, linear SARA
       attention or, with `attention="softmax"`, the softmax teacher);
    3. the block outputs concatenated per point (as in PCT) and pooled over
       the points, max and mean, padded points excluded;
    4. concatenated with the robot-state vector (`extra_dim` > 0, e.g. the
       gripper pose), then an MLP action head.

    PCT's neighbour embedding (sampling and grouping of k nearest
    neighbours) is not offered: a k-NN search needs pairwise distances
    between points, quadratic in their number, which is the cost SARA
    removes from the attention. Every op of this model is a TFLite builtin
    (no gather, no dynamic shapes), so `keras_sara.export.export_tflite`
    converts it without Flex ops.

    A softmax policy converts to SARA with every weight by
    `keras_sara.convert(policy)`; `build_pct_policy(..., attention="sara")`
    with the same other arguments and a parameter-free feature map
    (`"relu"`, `"elu+1"`) has the same variables, so `set_weights` also
    copies a teacher's weights one to one.

    With a mask, the softmax teacher's attention (Keras MHA) builds a dense
    (N, N) mask per head, which costs time of its own; for latency
    comparisons on full clouds build both policies with `use_mask=False`.

    Inputs (a dict): `"points"` `(B, N, point_dim)` float32; `"mask"`
    `(B, N)` bool, True for real points (with `use_mask=True`; padded rows
    may hold anything, NaN included, and never change the action); `"extra"`
    `(B, extra_dim)` float32 (with `extra_dim > 0`). Output: `(B, action_dim)`.

    Args:
        num_points: N, points per cloud (None for a variable number; fixed
            sizes export to TFLite most simply).
        action_dim: size of the action vector.
        point_dim: features per point (3 for xyz).
        extra_dim: size of the robot-state vector, 0 for none.
        width: per-point feature width of the embedding and the blocks.
        num_blocks, num_heads, key_dim, attention, feature_map, dropout,
            normalization: as in `PointCloudSARABlock`.
        head_units: hidden layer sizes of the action MLP.
        action_activation: activation of the action layer (None: linear;
            "tanh" for actions in [-1, 1]).
        use_mask: add the `"mask"` input for padded clouds.
        name: model name.

    Returns:
        An uncompiled `keras.Model`.

    Example:

    >>> policy = build_pct_policy(1024, action_dim=3, extra_dim=6, width=64,
    ...                           num_blocks=2, key_dim=16)
    >>> sorted(policy.input)
    ['extra', 'mask', 'points']
    >>> policy.output.shape
    (None, 3)

    References:
        Guo et al., "PCT: Point Cloud Transformer", https://arxiv.org/abs/2012.09688
        Leal, Choromanski et al., "SARA-RT", https://arxiv.org/abs/2312.01990
    """
    if num_points is not None:
        _check_int("num_points", num_points, 1)
    _check_int("action_dim", action_dim, 1)
    _check_int("point_dim", point_dim, 1)
    _check_int("extra_dim", extra_dim, 0)
    _check_int("width", width, 1)
    _check_int("num_blocks", num_blocks, 1)
    if attention not in ATTENTION_TYPES:
        raise ValueError(f"`attention` must be one of {ATTENTION_TYPES}. Received: attention={attention!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"`normalization` must be one of {NORMALIZATIONS}. Received: normalization={normalization!r}"
        )
    if isinstance(head_units, (int, str)) or not all(
        isinstance(u, int) and not isinstance(u, bool) and u > 0 for u in head_units
    ):
        raise ValueError(
            f"`head_units` must be a sequence of positive integers. Received: head_units={head_units!r}"
        )
    if not isinstance(use_mask, bool):
        raise ValueError(f"`use_mask` must be True or False. Received: use_mask={use_mask!r}")

    inputs = {"points": keras.Input((num_points, point_dim), name="points")}
    mask = None
    if use_mask:
        inputs["mask"] = mask = keras.Input((num_points,), dtype="bool", name="mask")
    if extra_dim:
        inputs["extra"] = keras.Input((extra_dim,), name="extra")

    x = inputs["points"]
    if mask is not None:
        # padded rows may hold anything: clear them with a select (0 * NaN is NaN)
        x = ClearPadding(name="clear_padding")(x, mask=mask)
    for i in range(2):  # naive per-point embedding, LBR x 2
        x = keras.layers.Dense(width, use_bias=False, name=f"embed_{i}")(x)  # (B, N, width)
        x = _norm(normalization, f"embed_{i}_norm")(x, **({"mask": mask} if normalization == "batch" else {}))
        x = keras.layers.ReLU(name=f"embed_{i}_relu")(x)

    features = []
    for i in range(num_blocks):
        x = PointCloudSARABlock(
            num_heads=num_heads,
            key_dim=key_dim,
            attention=attention,
            feature_map=feature_map,
            dropout=dropout,
            normalization=normalization,
            name=f"block_{i}",
        )(x, mask=mask)  # (B, N, width)
        features.append(x)
    x = features[0] if num_blocks == 1 else keras.layers.Concatenate(name="concat_blocks")(features)
    x = MaskedMaxMeanPool(name="pool")(x, mask=mask)  # (B, 2 * num_blocks * width)
    if extra_dim:
        x = keras.layers.Concatenate(name="concat_extra")([x, inputs["extra"]])
    for i, units in enumerate(head_units):
        x = keras.layers.Dense(units, activation="relu", name=f"head_{i}")(x)
    action = keras.layers.Dense(action_dim, activation=action_activation, name="action")(x)
    return keras.Model(inputs, action, name=name)


def _norm(normalization, name):
    if normalization == "batch":
        return keras.layers.BatchNormalization(name=name)
    return keras.layers.LayerNormalization(name=name)
