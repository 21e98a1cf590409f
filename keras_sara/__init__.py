"""keras-sara: SARA-RT linear attention for Keras 3 robot policies.

    import keras_sara
    attn = keras_sara.layers.SARAMultiHeadAttention(num_heads=4, key_dim=32)

Importing the package registers every layer and feature map for
`keras.saving`, so `.keras` files that use them load with no extra argument.
"""

from keras_sara import feature_maps, layers, ops
from keras_sara.layers import SARAMultiHeadAttention

__version__ = "0.1.0"

__all__ = ["SARAMultiHeadAttention", "feature_maps", "layers", "ops", "__version__"]
