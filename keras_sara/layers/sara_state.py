"""What every SARA attention layer shares: feature map, blend state, distillation hooks.

`SARAMultiHeadAttention` and the layers that `keras_sara.adapters` makes
from keras-hub's attention classes all carry this state, so conversion,
`keras_sara.callbacks.UpTraining` and `keras_sara.finalize` treat them alike
(`isinstance(layer, SARALayer)`).
"""

from __future__ import annotations

import keras
from keras import ops

DISTILLATION_TARGETS = ("scores", "outputs")


class BlendState(keras.layers.Layer):
    """Up-training state of a blendable layer: blend factor and distillation weight.

    Both are non-trainable variables, not Python floats, because `fit`
    compiles its step once: a callback that ramps the blend or schedules the
    distillation weight must change values the compiled graph reads. A
    sublayer (not own variables of the attention layer) so that they come
    after every projection and feature-map weight in `get_weights()`.
    """

    def __init__(self, initial_value=1.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.initial_value = float(initial_value)

    def build(self, input_shape=None):
        self.value = self.add_weight(
            name="blend",
            shape=(),
            initializer=keras.initializers.Constant(self.initial_value),
            trainable=False,
        )
        self.distillation_weight = self.add_weight(
            name="distillation_weight",
            shape=(),
            initializer="zeros",
            trainable=False,
        )

    def get_config(self):
        return {**super().get_config(), "initial_value": self.initial_value}


def check_blend(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"`{name}` must be a float in [0, 1] (0 = softmax, 1 = linear). Received: {name}={value!r}"
        )
    return float(value)


class SARALayer:
    """Mixin of the blend and distillation interface; needs `self._blend_state`.

    Subclasses set `_blend_state` (a `BlendState`, or None for a linear-only
    layer), `_distillation_target`, `_fidelity_records` and
    `_supported_distillation_targets`.
    """

    _supported_distillation_targets = DISTILLATION_TARGETS

    @property
    def blend_variable(self):
        """The non-trainable blend variable, or None for a linear-only layer."""
        return None if self._blend_state is None else self._blend_state.value

    def set_blend(self, value):
        """Set the softmax-to-linear mix (works inside `fit`, e.g. from a callback)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"`value` must be a float in [0, 1]. Received: value={value!r}")
        if self._blend_state is None:
            if value != 1.0:
                raise ValueError(
                    "This layer was built linear-only (blend=1.0), so it has no "
                    "softmax path to blend with. Construct it with blend < 1 "
                    f"(for example blend=0.0) to schedule a blend. Received: value={value!r}"
                )
            return
        self._blend_state.value.assign(value)

    @property
    def distillation_weight_variable(self):
        """The non-trainable distillation-loss weight, or None for a linear-only layer."""
        return None if self._blend_state is None else self._blend_state.distillation_weight

    def configure_distillation(self, target):
        """Add an attention-distillation loss in training calls (Hedgehog-style).

        The teacher is this layer's own softmax attention (same projections,
        no gradient through it); the loss, times the distillation-weight
        variable, is added with `add_loss` whenever the layer is called with
        `training=True`. `keras_sara.callbacks.UpTraining` calls this and
        schedules the weight; a custom training loop may too. Takes effect
        in steps traced afterwards.

        Args:
            target: `"scores"`: KL divergence from the softmax attention
                weights to the linear ones, per query row, averaged (quadratic
                in tokens, like the softmax it distils); `"outputs"`:
                `||linear - softmax||^2 / ||softmax||^2` of the attention
                outputs before the output projection; None: no loss.
        """
        supported = tuple(self._supported_distillation_targets)
        if target not in (None,) + supported:
            raise ValueError(
                f"`target` must be one of {supported} or None for {type(self).__name__} "
                f"'{self.name}'. Received: target={target!r}"
            )
        if target is not None and self._blend_state is None:
            raise ValueError(
                f"{type(self).__name__} '{self.name}' was built linear-only (blend=1.0), "
                "so it has no softmax attention to distil from. Convert with "
                "`keras_sara.convert(model, blend=0.0)` (or construct with blend < 1) "
                f"and finalize with `keras_sara.finalize` after up-training. Received: target={target!r}"
            )
        self._distillation_target = target

    def _mix(self, softmax, linear):
        """`(1 - blend) * softmax + blend * linear`, in softmax's dtype."""
        a = ops.cast(self._blend_state.value, softmax.dtype)
        return (1.0 - a) * softmax + a * ops.cast(linear, softmax.dtype)
