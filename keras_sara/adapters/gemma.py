"""Adapter for keras-hub's `CachedGemmaAttention` (Gemma, Gemma 2, PaliGemma's decoder).

Grouped-query heads keep one linear state per key/value head. RoPE is
applied with the layer's own `_apply_rope` (Gemma's interleaved layout) to
the feature-mapped queries and keys of the numerator. Options with no
linear equivalent, recorded as report notes: `logit_soft_cap` (tanh capping
of the logits; the linear kernel has no logits, so it is not applied) and
sliding-window attention (the linear state spans the whole context). Both
stay in force in the softmax branch of a blend.
"""

from __future__ import annotations

from keras import ops

from keras_sara.adapters.base import AdaptedAttention, AttentionAdapter


class SARAGemmaAttentionMixin(AdaptedAttention):
    """`call` of a SARA `CachedGemmaAttention`: same arguments, same cache layout."""

    def _sara_feature_shape(self):
        return (None, None, self.num_query_heads, self.head_dim)

    def _sara_state_dims(self):
        return (self.num_key_value_heads, self.head_dim, self.head_dim)

    def call(self, x, attention_mask=None, cache=None, cache_update_index=0, training=False):
        self.sara_check_cache(cache)
        query = self.query_dense(x)  # (B, T, N, h)
        key = self.key_dense(x)  # (B, T, K, h)
        value = self.value_dense(x)
        if cache is not None and self.sara_decoding() is not None:  # cache = linear state
            out, state = self.sara_state_attention(
                query, key, value, cache, cache_update_index, rotate=self._apply_rope)
            return self.output_dense(out), state
        if cache is not None:
            # SARA's cache holds the key projections before RoPE (the feature
            # map comes first); its shape is the original's.
            start = [0, cache_update_index, 0, 0]
            key = ops.slice_update(cache[:, 0, ...], start, key)
            value = ops.slice_update(cache[:, 1, ...], start, value)
            cache = ops.stack((key, value), axis=1)
        key_start = 0 if cache is not None else cache_update_index
        value = self.dropout_layer(value, training=training) if self.dropout else value
        out = self.sara_attention(
            query, key, value, attention_mask,
            rotate_query=lambda t: self._apply_rope(t, cache_update_index),
            rotate_key=lambda t: self._apply_rope(t, key_start),
            self_attention=cache is None,
        )
        out = self.output_dense(out)
        out = self.sara_blend(
            out, lambda: super(SARAGemmaAttentionMixin, self).call(
                x, attention_mask=attention_mask, cache_update_index=cache_update_index, training=training),
            training,
        )
        return (out, cache) if cache is not None else out


def gemma_notes(layer) -> list:
    notes = []
    if getattr(layer, "logit_soft_cap", None) is not None:
        notes.append(
            f"logit_soft_cap={layer.logit_soft_cap} not applied on the linear path (no logits to cap)"
        )
    if getattr(layer, "use_sliding_window_attention", False):
        notes.append(
            f"sliding window of {layer.sliding_window_size} not applied: the linear state spans the whole context"
        )
    return notes


GEMMA_ADAPTER = AttentionAdapter(
    mixin=SARAGemmaAttentionMixin,
    projections=("query_dense", "key_dense", "value_dense", "output_dense"),
    notes=gemma_notes,
    rotary=True,
)
