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

Mixtral, Phi-3 and Qwen-MoE have the same `call` with some sublayers
spelled without the underscore (`query_dense`, `dropout_layer`, ...): their
mixins only rename. Phi-3's "su" RoPE multiplies cos and sin by a constant
(a softmax temperature); its mixin divides it out so the numerator's
rotation stays a rotation.
"""

from __future__ import annotations

from keras import ops

from keras_sara.adapters.base import AdaptedAttention, AttentionAdapter


class SARALlamaAttentionMixin(AdaptedAttention):
    """`call` of a SARA Llama-family attention: same arguments, same cache layout."""

    # Sublayer names: query, key, value, output projections and dropout.
    _sara_sublayers = ("_query_dense", "_key_dense", "_value_dense", "_output_dense", "_dropout_layer")

    def _sara_sublayer(self, index):
        return getattr(self, self._sara_sublayers[index])

    def _sara_feature_shape(self):
        query_dense = self._sara_sublayer(0)
        return tuple(query_dense.compute_output_shape((None, None, query_dense.kernel.shape[0])))

    def _sara_state_dims(self):
        query_dense, key_dense = self._sara_sublayer(0), self._sara_sublayer(1)
        key_shape = key_dense.compute_output_shape((None, None, key_dense.kernel.shape[0]))
        value_dense = self._sara_sublayer(2)
        value_shape = value_dense.compute_output_shape((None, None, value_dense.kernel.shape[0]))
        return (key_shape[-2], key_shape[-1], value_shape[-1])

    def _norm(self, name, x):
        norm = getattr(self, name, None)
        return x if norm is None else norm(x)

    def _sara_rope(self, x, start_index):
        return self.rotary_embedding_layer(x, start_index=start_index)

    def call(self, hidden_states, attention_mask=None, cache=None, cache_update_index=None, training=None):
        self.sara_check_cache(cache)
        query_dense, key_dense, value_dense, output_dense, dropout = (
            self._sara_sublayer(i) for i in range(5))
        start = cache_update_index if cache_update_index is not None else 0
        query = self._norm("_query_dense_layer_norm", query_dense(hidden_states))  # (B, T, N, h)
        if cache is not None and self.sara_decoding() is not None:  # cache = linear state
            key = self._norm("_key_dense_layer_norm", key_dense(hidden_states))
            out, state = self.sara_state_attention(
                query, key, value_dense(hidden_states), cache, start, rotate=self._sara_rope)
            return output_dense(out), state
        if cache is not None and cache_update_index is None:
            key, value = cache[:, 0, ...], cache[:, 1, ...]
        else:
            key = self._norm("_key_dense_layer_norm", key_dense(hidden_states))  # (B, T, K, h)
            value = value_dense(hidden_states)
            if cache is not None:
                # SARA's cache holds the keys before RoPE (the feature map comes first).
                at = [0, cache_update_index, 0, 0]
                key = ops.slice_update(cache[:, 0, ...], at, key)
                value = ops.slice_update(cache[:, 1, ...], at, value)
                cache = ops.stack((key, value), axis=1)
        key_start = 0 if cache is not None else start
        out = self.sara_attention(
            query, key, value, attention_mask,
            rotate_query=lambda t: self._sara_rope(t, start),
            rotate_key=lambda t: self._sara_rope(t, key_start),
            self_attention=cache is None,
        )
        out = dropout(out, training=training)
        out = output_dense(out)
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
    elif not hasattr(layer, "use_sliding_window_attention") and getattr(layer, "sliding_window_size", None):
        window = layer.sliding_window_size  # Qwen 3 (-MoE): on whenever a size is set
    if window is None:
        return []
    return [f"sliding window of {window} not applied: the linear state spans the whole context"]


LLAMA_ADAPTER = AttentionAdapter(
    mixin=SARALlamaAttentionMixin,
    projections=("_query_dense", "_key_dense", "_value_dense", "_output_dense"),
    notes=llama_notes,
    rotary=True,
)


class SARAMixtralAttentionMixin(SARALlamaAttentionMixin):
    """The Llama-family `call` for Mixtral's and Phi-3's sublayer names (no underscore)."""

    _sara_sublayers = ("query_dense", "key_dense", "value_dense", "output_dense", "dropout_layer")


class SARAQwenMoeAttentionMixin(SARALlamaAttentionMixin):
    """The Llama-family `call` for Qwen-MoE's sublayer names (public projections, private output)."""

    _sara_sublayers = ("query_dense", "key_dense", "value_dense", "_output_dense", "_dropout_layer")


class SARAPhi3AttentionMixin(SARAMixtralAttentionMixin):
    """Phi-3: Mixtral's names; "su" RoPE's cos/sin scale divided out of the rotated features."""

    def _sara_rope(self, x, start_index):
        out = self.rotary_embedding_layer(x, start_index=start_index)
        scale = getattr(self.rotary_embedding_layer, "embedding_scaling_factor", 1.0)
        return out if scale == 1.0 else out / scale


def phi3_notes(layer) -> list:
    if getattr(layer, "rope_scaling_type", None) != "su":
        return []
    return [
        "su-scaled RoPE: its cos/sin scale (a softmax temperature) is divided out on the linear path, and "
        "the short/long frequency factors are picked by the length of the tensor rotated (while decoding, "
        "the keys' factor by the cache length)"
    ]


def _renamed(mixin, notes=llama_notes):
    return AttentionAdapter(mixin=mixin, projections=mixin._sara_sublayers[:4], notes=notes, rotary=True)


MIXTRAL_ADAPTER = _renamed(SARAMixtralAttentionMixin)
QWEN_MOE_ADAPTER = _renamed(SARAQwenMoeAttentionMixin)
PHI3_ADAPTER = _renamed(SARAPhi3AttentionMixin, phi3_notes)
