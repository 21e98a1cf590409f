"""Drop-in linear-attention layers."""

from keras_sara.layers.point_cloud_block import PointCloudSARABlock
from keras_sara.layers.sara_multi_head_attention import SARAMultiHeadAttention

__all__ = ["PointCloudSARABlock", "SARAMultiHeadAttention"]
