"""Linear-attention kernels (keras.ops only) and their naive references."""

from keras_sara.ops.kernels import (
    CAUSAL_SCHEDULES,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_EPS,
    causal_linear_attention,
    causal_linear_attention_step,
    check_feature_mapped,
    initial_state,
    linear_attention,
    linear_attention_projected,
    linear_attention_split_heads,
    linear_attention_weights,
)
from keras_sara.ops import naive

__all__ = [
    "CAUSAL_SCHEDULES",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_EPS",
    "causal_linear_attention",
    "causal_linear_attention_step",
    "check_feature_mapped",
    "initial_state",
    "linear_attention",
    "linear_attention_projected",
    "linear_attention_split_heads",
    "linear_attention_weights",
    "naive",
]
