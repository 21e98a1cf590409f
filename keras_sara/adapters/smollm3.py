"""Adapter for keras-hub's `SmolLM3Attention`.

The Llama-family math with SmolLM3's own spelling: `Dense` projections
`q_proj`, `k_proj`, `v_proj` reshaped to heads, an `o_proj` EinsumDense,
grouped key/value heads, and RoPE from `rotary_embedding` (cos and sin for
the tensor's positions, applied with `apply_rotary_pos_single`). Layers whose
`use_rope` is False (SmolLM3's NoPE layers) have no rotation, on the linear
path either. The cache arrives as the `self_attention_cache` and
`self_attention_cache_update_index` keyword arguments, stacked
`(B, 2, S, K, h)` as the original's; SARA's holds the keys before RoPE.
"""

from __future__ import annotations

from keras import ops

from keras_sara.adapters.base import AdaptedAttention, AttentionAdapter


class SARASmolLM3AttentionMixin(AdaptedAttention):
    """`call` of a SARA `SmolLM3Attention`: same arguments, same cache layout."""

    def _sara_feature_shape(self):
        return (None, None, self.num_attention_heads, self.head_dim)

    def _sara_rope(self, x, start_index):
        from keras_hub.src.models.smollm3.smollm3_utils import apply_rotary_pos_single

        cos, sin = self.rotary_embedding(x, start_index=start_index)  # (B, T, h)
        return apply_rotary_pos_single(x, cos, sin, expansion_axis=2)

    def call(self, hidden_states, training=False, attention_mask=None, **kwargs):
        cache = kwargs.get("self_attention_cache", None)
        cache_update_index = kwargs.get("self_attention_cache_update_index", None)
        self.sara_check_cache(cache)
        start = cache_update_index if cache_update_index is not None else 0
        shape = ops.shape(hidden_states)

        def heads(t, num):  # (B, T, num * h) -> (B, T, num, h)
            return ops.reshape(t, (shape[0], shape[1], num, self.head_dim))

        query = heads(self.q_proj(hidden_states), self.num_attention_heads)
        if cache is not None and cache_update_index is None:
            key, value = cache[:, 0, ...], cache[:, 1, ...]
        else:
            key = heads(self.k_proj(hidden_states), self.num_key_value_heads)
            value = heads(self.v_proj(hidden_states), self.num_key_value_heads)
            if cache is not None:
                at = [0, cache_update_index, 0, 0]
                key = ops.slice_update(cache[:, 0, ...], at, key)
                value = ops.slice_update(cache[:, 1, ...], at, value)
                cache = ops.stack((key, value), axis=1)
        key_start = 0 if cache is not None else start
        rotate_query = rotate_key = None
        if self.use_rope:
            rotate_query = lambda t: self._sara_rope(t, start)  # noqa: E731
            rotate_key = lambda t: self._sara_rope(t, key_start)  # noqa: E731
        out = self.sara_attention(
            query, key, value, attention_mask, rotate_query=rotate_query, rotate_key=rotate_key,
            self_attention=cache is None,
        )
        out = self.o_proj(out)
        out = self.sara_blend(
            out, lambda: super(SARASmolLM3AttentionMixin, self).call(
                hidden_states, training=training, attention_mask=attention_mask),
            training,
        )
        return (out, cache) if cache is not None else out


SMOLLM3_ADAPTER = AttentionAdapter(
    mixin=SARASmolLM3AttentionMixin,
    projections=("q_proj", "k_proj", "v_proj", "o_proj"),
    rotary=True,
)
