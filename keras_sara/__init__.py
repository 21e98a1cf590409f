"""keras-sara: SARA-RT linear attention for Keras 3 robot policies.

    import keras_sara
    attn = keras_sara.layers.SARAMultiHeadAttention(num_heads=4, key_dim=32)
    student, report = keras_sara.convert(teacher)   # softmax attention -> SARA
    # keras-hub's Gemma, Llama-family, PaliGemma and GPT-2 attention included
    student.fit(..., callbacks=[keras_sara.callbacks.UpTraining()])  # up-training

Importing the package registers every layer and feature map, and the
converted layers and models that `convert` makes, for `keras.saving`, so
`.keras` files that use them load with no extra argument.
"""

from keras_sara import (
    adapters,
    callbacks, conversion, decoding, distribution, export, feature_maps, folding, layers, models, ops, streaming,
)
from keras_sara.adapters import register_attention
from keras_sara.conversion import ConversionReport, clone_function, convert, finalize, make_clone_function
from keras_sara.layers import SARAMultiHeadAttention

__version__ = "0.1.0"

__all__ = [
    "ConversionReport",
    "SARAMultiHeadAttention",
    "adapters",
    "callbacks",
    "clone_function",
    "conversion",
    "decoding",
    "distribution",
    "convert",
    "export",
    "feature_maps",
    "finalize",
    "folding",
    "layers",
    "make_clone_function",
    "models",
    "ops",
    "register_attention",
    "streaming",
    "__version__",
]
