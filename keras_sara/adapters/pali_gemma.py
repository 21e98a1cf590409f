"""Adapter for keras-hub's `PaliGemmaVitAttention`, the SigLIP-style ViT of PaliGemma.

Bidirectional attention over image patches, no RoPE: the paper's RT-2 move
(convert the vision tower's attention) on the open VLM of that family.
`Dense` projections of width `hidden_dim`, split into `num_heads` heads.
The original takes an additive float `attention_mask` (PaliGemma's ViT
passes none); SARA reads it as a key mask (0 = visible, large negative =
masked) when it has shape `(B, 1, S)` and refuses any other.
"""

from __future__ import annotations

from keras import ops

from keras_sara.adapters.base import AdaptedAttention, AttentionAdapter


class SARAPaliGemmaVitAttentionMixin(AdaptedAttention):
    """`call` of a SARA `PaliGemmaVitAttention`: returns `(output, scores or None)` like the original."""

    def _sara_feature_shape(self):
        return (None, None, self.num_heads, self.head_dim)

    def call(self, x, attention_mask=None, return_attention_scores=None, training=False):
        shape = ops.shape(x)

        def heads(t):  # (B, T, D) -> (B, T, H, h)
            return ops.reshape(t, (shape[0], -1, self.num_heads, self.head_dim))

        mask = None
        if attention_mask is not None:
            if len(attention_mask.shape) != 3 or attention_mask.shape[1] != 1:
                raise ValueError(
                    f"SARA {type(self).__name__} '{self.name}' takes an additive `attention_mask` "
                    "of shape (batch, 1, keys) only (a key mask). Received: attention_mask.shape="
                    f"{tuple(attention_mask.shape)}"
                )
            mask = ops.greater(attention_mask, -1.0)  # additive: 0 visible, -inf / -1e9 masked
        q, k, v = heads(self.query_proj(x)), heads(self.key_proj(x)), heads(self.value_proj(x))
        out = self.sara_attention(q, k, v, mask)  # (B, T, H, h)
        out = self.out_proj(ops.reshape(out, (shape[0], -1, self.hidden_dim)))
        out = self.sara_blend(
            out, lambda: super(SARAPaliGemmaVitAttentionMixin, self).call(
                x, attention_mask=attention_mask, training=training),
            training,
        )
        return out, None


PALI_GEMMA_VIT_ADAPTER = AttentionAdapter(
    mixin=SARAPaliGemmaVitAttentionMixin,
    projections=("query_proj", "key_proj", "value_proj", "out_proj"),
)
