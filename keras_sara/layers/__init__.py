"""Drop-in linear-attention layers."""

from keras_sara.layers.point_cloud_block import PointCloudSARABlock
from keras_sara.layers.sara_multi_head_attention import SARAMultiHeadAttention, split_heads_layout

__all__ = ["PointCloudSARABlock", "SARAMultiHeadAttention", "split_heads_layout"]
