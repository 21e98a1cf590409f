"""Adapter for the Llama family's attention in keras-hub: Llama, Mistral, Qwen, Qwen 3 and kin.

These classes share one structure: `_query_dense`, `_key_dense`,
`_value_dense` and `_output_dense` EinsumDense projections (Qwen's with
biases), grouped key/value heads, an optional RMSNorm of queries and keys
(`_query_dense_layer_norm`, Qwen 3), `rotary_embedding_layer(x,
start_index=...)` and `call(hidden_states, attention_mask, cache,
cache_update_index, training)`. Grouped heads keep one linear state per
key/value head (no `repeat`); RoPE rotates the feature-mapped queries and
keys of the numerator. Sliding windows (Mistral, Qwen) are not applied on
the linear path: a report note says so.
"""

from __future__ import annotations

from keras import ops

from keras_sara.adapters.base import AdaptedAttention, AttentionAdapter


class SARALlamaAttentionMixin(AdaptedAttention):
    """`call` of a SARA Llama-family attention: same arguments, same cache layout."""

    def _sara_feature_shape(self):
        return tuple(self._query_dense.compute_output_shape((None, None, self._query_dense.kernel.shape[0])))

    def _norm(self, name, x):
        norm = getattr(self, name, None)
        return x if norm is None else norm(x)

    def call(self, hidden_states, attention_mask=None, cache=None, cache_update_index=None, training=None):
        self.sara_check_cache(cache)
        start = cache_update_index if cache_update_index is not None else 0
        query = self._norm("_query_dense_layer_norm", self._query_dense(hidden_states))  # (B, T, N, h)
        if cache is not None and cache_update_index is None:
            key, value = cache[:, 0, ...], cache[:, 1, ...]
        else:
            key = self._norm("_key_dense_layer_norm", self._key_dense(hidden_states))  # (B, T, K, h)
            value = self._value_dense(hidden_states)
            if cache is not None:
                # SARA's cache holds the keys before RoPE (the feature map comes first).
                at = [0, cache_update_index, 0, 0]
                key = ops.slice_update(cache[:, 0, ...], at, key)
                value = ops.slice_update(cache[:, 1, ...], at, value)
                cache = ops.stack((key, value), axis=1)
        key_start = 0 if cache is not None else start
        rope = self.rotary_embedding_layer
        out = self.sara_attention(
            query, key, value, attention_mask,
            rotate_query=lambda t: rope(t, start_index=start),
            rotate_key=lambda t: rope(t, start_index=key_start),
            self_attention=cache is None,
        )
        out = self._dropout_layer(out, training=training)
        out = self._output_dense(out)
        out = self.sara_blend(
            out, lambda: super(SARALlamaAttentionMixin, self).call(
                hidden_states, attention_mask=attention_mask, training=training),
            training,
        )
        return (out, cache) if cache is not None else out


def llama_notes(layer) -> list:
    window = None
    if getattr(layer, "use_sliding_window_attention", False):
        window = getattr(layer, "sliding_window_size", None)
    elif getattr(layer, "_sliding_window", None) is not None:
        window = layer._sliding_window
    if window is None:
        return []
    return [f"sliding window of {window} not applied: the linear state spans the whole context"]


LLAMA_ADAPTER = AttentionAdapter(
    mixin=SARALlamaAttentionMixin,
    projections=("_query_dense", "_key_dense", "_value_dense", "_output_dense"),
    notes=llama_notes,
    rotary=True,
)
