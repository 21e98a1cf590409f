"""Adapter for keras-hub's `CachedGemma3Attention` (Gemma 3's decoder, EmbeddingGemma).

Grouped-query heads keep one linear state per key/value head. Queries and
keys go through the layer's RMSNorm (`query_norm`, `key_norm`, when
`use_query_key_norm`) and then its own RoPE (`_apply_rope`: each layer's
wavelength and scaling factor, global and local layers differ), which SARA
applies to the feature-mapped queries and keys of the numerator. The cache
is the original's `(key_cache, value_cache)` tuple, holding the keys before
RoPE; `cache_update_mask` keeps the cached entries where it is False, as the
original does.

Options with no linear equivalent, recorded as report notes: sliding-window
attention on the local layers (the linear state spans the whole context),
`logit_soft_cap`, and dropout on the attention probabilities. They stay in
force in the softmax branch of a blend. The decoder block's mask makes each
image's tokens see one another; an image that does not start the sequence
makes the mask not prefix-causal, so SARA honours it exactly through the
(T, S) kernel matrix, at quadratic cost.
"""

from __future__ import annotations

from keras import ops

from keras_sara.adapters.base import AdaptedAttention, AttentionAdapter
from keras_sara.adapters.gemma import gemma_notes


class SARAGemma3AttentionMixin(AdaptedAttention):
    """`call` of a SARA `CachedGemma3Attention`: same arguments, same cache layout."""

    def _sara_feature_shape(self):
        return (None, None, self.num_query_heads, self.head_dim)

    def call(self, x, attention_mask=None, cache=None, cache_update_index=0, cache_update_mask=None,
             training=False):
        self.sara_check_cache(cache)
        query = self.query_dense(x)  # (B, T, N, h)
        key = self.key_dense(x)  # (B, T, K, h)
        value = self.value_dense(x)
        if self.use_query_key_norm:
            query, key = self.query_norm(query), self.key_norm(key)
        if cache is not None:
            key_cache, value_cache = cache
            start = [0, cache_update_index, 0, 0]
            if cache_update_mask is not None:
                keep_new = ops.expand_dims(ops.expand_dims(cache_update_mask, -1), -1)  # (B, T, 1, 1)
                key = ops.where(keep_new, key, ops.slice(key_cache, start, ops.shape(key)))
                value = ops.where(keep_new, value, ops.slice(value_cache, start, ops.shape(value)))
            key = ops.slice_update(key_cache, start, key)
            value = ops.slice_update(value_cache, start, value)
            cache = (key, value)
        key_start = 0 if cache is not None else cache_update_index
        # A query that sees no key comes out 0 on both linear paths, as the
        # original zeroes it.
        out = self.sara_attention(
            query, key, value, attention_mask,
            rotate_query=lambda t: self._apply_rope(t, cache_update_index),
            rotate_key=lambda t: self._apply_rope(t, key_start),
            self_attention=cache is None,
        )
        out = self.output_dense(out)
        out = self.sara_blend(
            out, lambda: super(SARAGemma3AttentionMixin, self).call(
                x, attention_mask=attention_mask, cache_update_index=cache_update_index, training=training),
            training,
        )
        return (out, cache) if cache is not None else out


def gemma3_notes(layer) -> list:
    notes = gemma_notes(layer)
    if getattr(layer, "dropout", 0):
        notes.append(f"dropout={layer.dropout} on the attention probabilities not applied (no probabilities)")
    return notes


GEMMA3_ADAPTER = AttentionAdapter(
    mixin=SARAGemma3AttentionMixin,
    projections=("query_dense", "key_dense", "value_dense", "output_dense"),
    notes=gemma3_notes,
    rotary=True,
)
