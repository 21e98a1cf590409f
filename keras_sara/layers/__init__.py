"""Drop-in linear-attention layers."""

from keras_sara.layers.sara_multi_head_attention import SARAMultiHeadAttention

__all__ = ["SARAMultiHeadAttention"]
