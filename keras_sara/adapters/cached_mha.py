"""Adapter for keras-hub's `CachedMultiHeadAttention` (GPT-2, OPT, BART, Whisper, ... via `TransformerDecoder`).

A `keras.layers.MultiHeadAttention` subclass whose `call` takes `cache` and
`cache_update_index`, which `keras_hub.layers.TransformerDecoder` always
passes. It is adapted in place rather than replaced by
`SARAMultiHeadAttention`: the cache arguments keep working and subclasses
with their own projections (Whisper's key has no bias) keep them one to one.
The decoder hands over causality and padding as one dense mask, read here
as prefix-causal and computed linearly.
"""

from __future__ import annotations

from keras import ops

from keras_sara.adapters.base import AdaptedAttention, AttentionAdapter


class SARACachedMultiHeadAttentionMixin(AdaptedAttention):
    """`call` of a SARA `CachedMultiHeadAttention`: same arguments and returns."""

    _supported_distillation_targets = ("outputs",)

    def _sara_feature_shape(self):
        return (None, None, self._num_heads, self._key_dim)

    def _sara_state_dims(self):
        return (self._num_heads, self._key_dim, self._value_dim)

    def call(self, query, value, key=None, attention_mask=None, cache=None, cache_update_index=None,
             training=None, return_attention_scores=False):
        self.sara_check_cache(cache)
        if key is None:
            key = value
        q = self._query_dense(query)  # (B, T, H, h)
        if cache is not None and self.sara_decoding() is not None:  # cache = linear state
            start = 0 if cache_update_index is None else cache_update_index
            out, state = self.sara_state_attention(
                q, self._key_dense(key), self._value_dense(value), cache, start)
            return self._output_dense(out), state
        if cache is not None:
            if cache_update_index is None:
                k, v = cache[:, 0, ...], cache[:, 1, ...]
            else:
                at = [0, cache_update_index, 0, 0]
                k = ops.slice_update(cache[:, 0, ...], at, self._key_dense(key))
                v = ops.slice_update(cache[:, 1, ...], at, self._value_dense(value))
                cache = ops.stack((k, v), axis=1)
        else:
            if cache_update_index is not None:
                raise ValueError(
                    "`cache_update_index` should not be set if `cache` is `None`. "
                    f"Received: cache=None, cache_update_index={cache_update_index}"
                )
            k, v = self._key_dense(key), self._value_dense(value)
        # self-attention: T == S, so a dense mask may be read as prefix-causal
        same = query is value or (query.shape[1] is not None and query.shape[1] == value.shape[1])
        self_attention = cache is None and same
        out = self.sara_attention(q, k, v, attention_mask, self_attention=self_attention)
        out = self._output_dense(out)
        out = self.sara_blend(
            out, lambda: super(SARACachedMultiHeadAttentionMixin, self).call(
                query, value, key=key, attention_mask=attention_mask, training=training),
            training,
        )
        if return_attention_scores:
            raise ValueError(
                f"SARA {type(self).__name__} '{self.name}' does not return attention scores "
                "(the linear path never forms them). Received: return_attention_scores=True"
            )
        return (out, cache) if cache is not None else out


CACHED_MHA_ADAPTER = AttentionAdapter(
    mixin=SARACachedMultiHeadAttentionMixin,
    projections=("_query_dense", "_key_dense", "_value_dense", "_output_dense"),
)
