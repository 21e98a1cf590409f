"""Layers of the keras.io Transformer examples exactly as published (no **kwargs, no get_config).

`TokenAndPositionEmbedding` is the same in "Text classification with
Transformer" and in the miniGPT text-generation example.
"""

from keras import layers, ops


class TokenAndPositionEmbedding(layers.Layer):
    """Token embedding plus a learned embedding of the position `arange(T)`."""

    def __init__(self, maxlen, vocab_size, embed_dim):
        super().__init__()
        self.token_emb = layers.Embedding(input_dim=vocab_size, output_dim=embed_dim)
        self.pos_emb = layers.Embedding(input_dim=maxlen, output_dim=embed_dim)

    def call(self, x):
        maxlen = ops.shape(x)[-1]
        positions = ops.arange(start=0, stop=maxlen, step=1)
        positions = self.pos_emb(positions)
        x = self.token_emb(x)
        return x + positions
