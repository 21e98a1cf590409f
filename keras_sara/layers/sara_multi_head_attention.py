"""`SARAMultiHeadAttention`: a drop-in, linear-time `keras.layers.MultiHeadAttention`."""

from __future__ import annotations

import contextlib
import threading
import warnings

import keras
import numpy as np
from keras import ops
from keras.src import backend as _kbackend  # Keras masks have no public accessor

from keras_sara import feature_maps as fm_lib
from keras_sara.layers.sara_state import DISTILLATION_TARGETS, BlendState, SARALayer
from keras_sara.ops import kernels as la


# Threads inside `split_heads_layout`, as thread id -> nesting depth. A plain dict rather than a
# ContextVar: torch.compile cannot trace `ContextVar.get` (one graph break per attention call),
# while an empty dict is a cheap, traceable check that short-circuits the thread lookup.
_SPLIT_HEADS_THREADS: dict = {}


def _split_heads_active() -> bool:
    return bool(_SPLIT_HEADS_THREADS) and threading.get_ident() in _SPLIT_HEADS_THREADS


@contextlib.contextmanager
def split_heads_layout():
    """Trace SARA layers in the per-head layout that LiteRT runs fastest.

    Inside this context, inference calls of `SARAMultiHeadAttention` that can
    fold the output projection (bidirectional, no masks, no scores, an
    elementwise feature map such as `"relu"`) project each head with its own
    slice of the query/key/value kernels and use
    `keras_sara.ops.linear_attention_split_heads`: the same outputs up to
    float32 rounding, with no transpose ops, H times fewer flops in `K^T V` and
    the output projection left a constant-weight matmul that int8 conversion
    quantises. `keras_sara.export.export_tflite` traces inside it; use it
    around your own `tf.lite` conversion to get the same graph. Training
    calls and every other case keep the default layout. The context holds for
    the thread that enters it (other threads keep the default layout) and
    nests.

    Example:
    >>> import numpy as np
    >>> layer = SARAMultiHeadAttention(num_heads=2, key_dim=4)
    >>> x = np.random.rand(1, 6, 8).astype("float32")
    >>> flat = np.asarray(layer(x, x))
    >>> with split_heads_layout():
    ...     per_head = np.asarray(layer(x, x))
    >>> bool(np.allclose(flat, per_head, atol=1e-5))
    True
    """
    thread = threading.get_ident()
    _SPLIT_HEADS_THREADS[thread] = _SPLIT_HEADS_THREADS.get(thread, 0) + 1
    try:
        yield
    finally:
        depth = _SPLIT_HEADS_THREADS.pop(thread) - 1
        if depth:
            _SPLIT_HEADS_THREADS[thread] = depth


@keras.saving.register_keras_serializable(package="keras_sara")
class SARAMultiHeadAttention(SARALayer, keras.layers.MultiHeadAttention):
    """Multi-head attention with SARA linear attention, a drop-in for Keras MHA.

    Same constructor, call signature and variables as
    `keras.layers.MultiHeadAttention`, so `layer.set_weights(mha.get_weights())`
    turns a trained softmax layer into a SARA layer (SARA-RT up-training
    starts from exactly that). Softmax `exp(q.k / sqrt(d))` is replaced by
    `phi(q).phi(k)` with a feature map `phi`, which lets the sums over keys be
    taken once: cost and memory grow linearly with the number of tokens.

    How each MultiHeadAttention call argument is handled:

    - self and cross attention (T != S), `key` distinct from `value`: as MHA.
    - key padding (`value_mask`, `key_mask`, Keras' implicit masks) and
      `use_causal_mask=True`: the linear path; no (T, S) tensor is built.
    - `query_mask` (or the query's Keras mask): rows of padded queries output
      zero attention (then the output projection's bias).
    - a dense `attention_mask` (B, T, S), or `sliding_window`: honoured
      exactly through the masked (T, S) kernel matrix, at quadratic cost; a
      warning says so once per layer. Express padding as `value_mask` /
      `key_mask` and causality as `use_causal_mask` to keep the linear path.
    - `return_attention_scores=True`: also returns the (B, H, T, S) attention
      matrix that the linear attention implies (quadratic; for visualisation).
    - `dropout`: during training, whole (key, head) value vectors are dropped
      and the rest rescaled, the linear-time analogue of MHA's attention
      dropout (each attention column is dropped for all queries alike).
    - `attention_axes`: supported without masks; with several attention axes
      the tokens of those axes form one sequence.
    - a row with every key masked outputs zero attention (not NaN).
    - mask values: as in `keras.layers.MultiHeadAttention` on every backend,
      a mask is cast to bool, so any nonzero value (0.3, 0.5, -1) means
      "attend" and only 0 (or False) masks; pass boolean masks to avoid the
      question. A mask whose shape does not fit the inputs (`query_mask` and
      `value_mask`/`key_mask` `(B, T)`/`(B, S)`, `attention_mask`
      `(B, T, S)`, size-1 axes broadcast) is refused with both shapes named.

    Args:
        num_heads, key_dim, value_dim, dropout, use_bias, output_shape,
            attention_axes, sliding_window, flash_attention,
            kernel_initializer, bias_initializer, kernel_regularizer,
            bias_regularizer, activity_regularizer, kernel_constraint,
            bias_constraint, use_gate, seed: exactly as in
            `keras.layers.MultiHeadAttention`.
        feature_map: the kernel feature map: a name (`"relu"`, the default
            and the paper's choice; `"elu+1"`, `"favor+"`, `"hedgehog"`,
            `"sara"`), a config dict, or a `keras_sara.feature_maps.FeatureMap`.
        eps: positive constant added to the attention normaliser.
        causal_schedule: how `use_causal_mask=True` is computed,
            `"chunked"` (default; lower memory) or `"parallel"` (one cumsum).
        chunk_size: chunk length of the chunked causal schedule.
        blend: mix of softmax and linear attention, `(1 - blend) * softmax +
            blend * linear`. 1 (default): linear only, no extra variable and no
            softmax in the graph. Below 1: the layer also computes softmax
            attention (quadratic) and holds the factor in a non-trainable
            variable (after all other weights) that `set_blend` or an
            up-training callback changes during `fit`; 0 reproduces
            `keras.layers.MultiHeadAttention`.

    Call arguments:
        As `keras.layers.MultiHeadAttention.call`: `query`, `value`, `key`,
        `query_mask`, `value_mask`, `key_mask`, `attention_mask`,
        `return_attention_scores`, `training`, `use_causal_mask`.

    Returns:
        `attention_output` of shape `(B, T, E)`, and with
        `return_attention_scores=True` also the `(B, H, T, S)` scores.

    Example:

    >>> import numpy as np, keras
    >>> mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8)
    >>> x = np.random.rand(1, 10, 16).astype("float32")
    >>> _ = mha(x, x)
    >>> sara = SARAMultiHeadAttention(num_heads=2, key_dim=8)
    >>> _ = sara(x, x)
    >>> sara.set_weights(mha.get_weights())   # same variables, same order
    >>> sara(x, x, use_causal_mask=True).shape
    (1, 10, 16)

    References:
        Leal, Choromanski et al., "SARA-RT: Scaling up Robotics Transformers
        with Self-Adaptive Robust Attention", ICRA 2024,
        https://arxiv.org/abs/2312.01990
    """

    def __init__(
        self,
        num_heads,
        key_dim,
        value_dim=None,
        dropout=0.0,
        use_bias=True,
        output_shape=None,
        attention_axes=None,
        sliding_window=None,
        flash_attention=None,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        use_gate=False,
        seed=None,
        feature_map="relu",
        eps=la.DEFAULT_EPS,
        causal_schedule="chunked",
        chunk_size=la.DEFAULT_CHUNK_SIZE,
        blend=1.0,
        **kwargs,
    ):
        super().__init__(
            num_heads=num_heads,
            key_dim=key_dim,
            value_dim=value_dim,
            dropout=dropout,
            use_bias=use_bias,
            output_shape=output_shape,
            attention_axes=attention_axes,
            sliding_window=sliding_window,
            flash_attention=flash_attention,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            use_gate=use_gate,
            seed=seed,
            **kwargs,
        )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"`dropout` must be a float in [0, 1). Received: dropout={dropout!r}")
        self.eps = la.validate_eps(eps)
        self.chunk_size = la.validate_chunk_size(chunk_size)
        if causal_schedule not in la.CAUSAL_SCHEDULES:
            raise ValueError(
                f"`causal_schedule` must be one of {la.CAUSAL_SCHEDULES}. "
                f"Received: causal_schedule={causal_schedule!r}"
            )
        self.causal_schedule = causal_schedule
        if isinstance(blend, bool) or not isinstance(blend, (int, float)) or not 0.0 <= blend <= 1.0:
            raise ValueError(
                "`blend` must be a float in [0, 1] (0 = softmax, 1 = linear). "
                f"Received: blend={blend!r}"
            )
        self.blend = float(blend)
        self.feature_map = fm_lib.get(feature_map)
        self._blend_state = BlendState(self.blend, name="blend_state") if self.blend < 1.0 else None
        self._warned_quadratic = False
        # Python state set by keras_sara.callbacks.UpTraining; read when a
        # step is traced, so changing it needs a new train function.
        self._distillation_target = None
        self._fidelity_records = None

    # ------------------------------------------------------------------ build

    def build(self, query_shape, value_shape, key_shape=None):
        for name, shape in (("query", query_shape), ("value", value_shape), ("key", key_shape)):
            if shape is not None and len(shape) < 3:
                raise ValueError(
                    f"`{name}` must have rank >= 3, (batch, tokens..., features). "
                    f"Received: {name}.shape={tuple(shape)}"
                )
        if len(value_shape) != len(query_shape):
            raise ValueError(
                "`query` and `value` must have the same rank. "
                f"Received: query.shape={tuple(query_shape)}, value.shape={tuple(value_shape)}"
            )
        super().build(query_shape, value_shape, key_shape)
        if not self.feature_map.built:  # a deserialised map arrives already built
            self.feature_map.build(self._query_dense.compute_output_shape(query_shape))
        # Tracked in __init__, so first in `_layers`; move after MHA's sublayers
        # so its weights come after MHA's in get_weights()/set_weights().
        for sub in (self.feature_map, self._blend_state):
            if sub is None:
                continue
            if sub in self._layers:
                self._layers.remove(sub)
            self._layers.append(sub)
        if self._blend_state is not None and not self._blend_state.built:
            self._blend_state.build()

    # ---------------------------------------------------------------- weights

    def load_mha_weights(self, mha):
        """Copy a built `keras.layers.MultiHeadAttention`'s weights into this layer.

        Query, key, value (and gate) and output projections are copied one to
        one; feature-map and blend weights keep their values. Both layers must
        be built on inputs of the same shapes.

        Example:
        >>> import numpy as np, keras
        >>> x = np.zeros((1, 4, 8), "float32")
        >>> mha = keras.layers.MultiHeadAttention(2, 4); _ = mha(x, x)
        >>> sara = SARAMultiHeadAttention(2, 4, feature_map="hedgehog", blend=0.0)
        >>> _ = sara(x, x)
        >>> sara.load_mha_weights(mha)
        """
        if not isinstance(mha, keras.layers.MultiHeadAttention):
            raise ValueError(
                "`mha` must be a keras.layers.MultiHeadAttention. "
                f"Received: mha={type(mha).__name__}"
            )
        if not (self.built and mha.built):
            raise ValueError(
                "Build both layers (call them once) before copying weights. "
                f"Received: built={self.built}, mha.built={mha.built}"
            )
        ours = self.weights[: len(mha.weights)]
        theirs = mha.get_weights()
        shapes = [tuple(w.shape) for w in ours], [tuple(w.shape) for w in theirs]
        if len(mha.weights) > len(self.weights) or shapes[0] != shapes[1]:
            raise ValueError(
                "`mha` does not have this layer's projection weights. "
                f"Received: mha weight shapes {shapes[1]}, expected {shapes[0]}"
            )
        for var, value in zip(ours, theirs):
            var.assign(value)

    # ------------------------------------------------------------------- call

    def call(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
    ):
        if key is None:
            key = value
        self._check_call_shapes(query, value, key, query_mask, value_mask, key_mask, attention_mask)
        if query_mask is None:
            query_mask = _kbackend.get_keras_mask(query)
        for x in (query, value, key):
            _kbackend.set_keras_mask(x, None)
        if key_mask is not None and key is value:
            key_mask = None  # as MHA: the key's mask is the value's
        if (
            attention_mask is not None
            and self._sliding_window is None
            and len(query.shape) == 3
            and self._attention_axes == (1,)
            and len(attention_mask.shape) == 3
            and attention_mask.shape[1] == 1
        ):
            # A (B, 1, S) mask (keras-hub's padding) masks the same keys for
            # every query: a key mask, which the linear path honours exactly.
            value_mask = _combine_masks(value_mask, attention_mask[:, 0, :])  # (B, S)
            attention_mask = None
        rank = len(query.shape)
        default_axes = self._attention_axes == tuple(range(1, rank - 1))
        dense = attention_mask is not None or self._sliding_window is not None
        if not default_axes and (
            dense or use_causal_mask or value_mask is not None or key_mask is not None
            or query_mask is not None
        ):
            raise ValueError(
                "Masks and `use_causal_mask` are supported with the default "
                "`attention_axes` (all axes between batch and features) only. "
                f"Received: attention_axes={self._attention_axes} for inputs of rank {rank}"
            )
        if self._blend_state is not None or dense:
            full_mask = self._compute_attention_mask(
                query,
                value,
                query_mask=query_mask,
                value_mask=value_mask,
                key_mask=key_mask,
                attention_mask=attention_mask,
                use_causal_mask=use_causal_mask,
            )
        else:
            full_mask = None

        if (
            _split_heads_active()
            and not training
            and self._fidelity_records is None
            and query_mask is None
            and value_mask is None
            and key_mask is None
            and self._can_split_heads(rank, dense, use_causal_mask, return_attention_scores)
        ):
            return self._split_heads_attention(query, key, value)

        if self._use_gate:
            gate = self._gate_dense(query)
        q = self._query_dense(query)  # (B, T, H, K)
        k = self._key_dense(key)  # (B, S, H, K)
        v = self._value_dense(value)  # (B, S, H, V)

        if self._fidelity_records is not None:  # only in eager probe calls
            self._fidelity_records.append(
                self._fidelity(query, value, q, k, v, query_mask, value_mask, key_mask,
                               attention_mask, use_causal_mask, full_mask)
            )

        if self._can_fuse_output(rank, dense, use_causal_mask, return_attention_scores):
            attention_output = self._fused_linear_attention(
                q, k, v, _combine_masks(value_mask, key_mask), query_mask, training
            )
            if query_mask is not None:
                _kbackend.set_keras_mask(attention_output, query_mask)
            return attention_output

        distill = self._distillation_target if (training and self._blend_state is not None) else None
        want_scores = return_attention_scores or distill == "scores"
        if dense:
            self._warn_quadratic(attention_mask is not None)
            linear_out, linear_scores = self._kernel_matrix_attention(
                q, k, v, full_mask, training, want_scores
            )
        else:
            key_padding = _combine_masks(value_mask, key_mask)
            linear_out, linear_scores = self._linear_attention(
                q, k, v, key_padding, query_mask, use_causal_mask, training, want_scores
            )

        if self._blend_state is not None:
            soft_out, soft_scores = self._softmax_attention(
                q, k, v, full_mask, training, want_scores
            )
            if distill is not None:
                self.add_loss(self._distillation_loss(
                    distill, soft_out, linear_out, soft_scores, linear_scores
                ))
            attention_output = self._mix(soft_out, linear_out)
            if return_attention_scores:
                attention_scores = self._mix(soft_scores, linear_scores)
        else:
            attention_output = linear_out
            attention_scores = linear_scores

        if self._use_gate:
            attention_output = ops.multiply(attention_output, gate)
        attention_output = self._output_dense(attention_output)
        if query_mask is not None:
            _kbackend.set_keras_mask(attention_output, query_mask)
        if return_attention_scores:
            return attention_output, attention_scores
        return attention_output

    def _check_call_shapes(self, query, value, key, query_mask, value_mask, key_mask, attention_mask):
        """Name the argument and the shapes before a backend's broadcast or reshape error can."""
        q, v, k = (_static_shape(x) for x in (query, value, key))
        if self.built:
            for name, shape, dense in (
                ("query", q, self._query_dense), ("value", v, self._value_dense), ("key", k, self._key_dense)
            ):
                kernel = getattr(dense, "kernel", None)
                if kernel is None:
                    continue
                want = int(kernel.shape[0])
                if shape and shape[-1] is not None and shape[-1] != want:
                    raise ValueError(
                        f"`{name}` must have {want} features (last axis): the layer was built for "
                        f"{name} features of size {want}. Received: {name}.shape={shape}. Call a new "
                        "layer for inputs of another feature size."
                    )
        if not q or not v:
            return
        for name, mask, ref, ref_name in (
            ("query_mask", query_mask, q, "query"),
            ("value_mask", value_mask, v, "value"),
            ("key_mask", key_mask, k, "key"),
        ):
            if mask is None:
                continue
            want = ref[:-1]  # (B, T...)
            got = _static_shape(mask)
            if got is not None and not _matches(got, want, broadcast=False):
                raise ValueError(
                    f"`{name}` must have the shape of `{ref_name}` without its feature axis, "
                    f"{_fmt(want)} (batch, {ref_name} tokens). Received: {name}.shape={_fmt(got)} "
                    f"for {ref_name}.shape={_fmt(ref)}"
                )
        if attention_mask is not None:
            want = (q[0],) + q[1:-1] + v[1:-1]  # (B, T..., S...)
            got = _static_shape(attention_mask)
            if got is not None and not _matches(got, want, broadcast=True):
                raise ValueError(
                    "`attention_mask` must have shape (batch, query tokens..., value tokens...) = "
                    f"{_fmt(want)} (an axis of size 1 broadcasts). Received: "
                    f"attention_mask.shape={_fmt(got)} for query.shape={_fmt(q)}, "
                    f"value.shape={_fmt(v)}"
                )

    def _compute_attention(
        self,
        query,
        key,
        value,
        attention_mask=None,
        training=None,
        return_attention_scores=False,
        use_causal_mask=False,
    ):
        """SARA attention on projected tensors (MHA's documented override hook).

        `call` does not go through here; this keeps code that calls the hook
        directly (keras-hub's cached attention, for example) on SARA.
        """
        if attention_mask is not None:
            self._warn_quadratic(True)
            out, scores = self._kernel_matrix_attention(
                query, key, value, attention_mask, training, return_attention_scores
            )
        else:
            out, scores = self._linear_attention(
                query, key, value, None, None, use_causal_mask, training, return_attention_scores
            )
        if self._blend_state is not None:
            soft_out, soft_scores = self._softmax_attention(
                query, key, value, attention_mask, training, return_attention_scores, use_causal_mask
            )
            out = self._mix(soft_out, out)
            if return_attention_scores:
                scores = self._mix(soft_scores, scores)
        return out, scores

    # ------------------------------------------------------------- internals

    def _can_fuse_output(self, rank, dense, causal, return_scores):
        """Whether the output projection can be folded into the linear attention."""
        return (
            rank == 3
            and not (dense or causal or return_scores)
            and self._blend_state is None
            and not self._use_gate
            and self._activity_regularizer is None
            and getattr(self._output_dense, "equation", None) == "abcd,cde->abe"
            and getattr(self._output_dense, "quantization_mode", None) is None
        )

    def _can_split_heads(self, rank, dense, causal, return_scores):
        """Whether `split_heads_layout` applies: fusable, per-head projections, elementwise map."""
        projections = (self._query_dense, self._key_dense, self._value_dense)
        return (
            self._can_fuse_output(rank, dense, causal, return_scores)
            and getattr(self.feature_map, "elementwise", False)
            and all(
                getattr(d, "equation", None) == "abc,cde->abde"
                and getattr(d, "quantization_mode", None) is None
                for d in projections
            )
        )

    def _split_heads_attention(self, query, key, value):
        """Inference in the per-head layout (see `split_heads_layout`)."""
        dtype = self.compute_dtype

        def project(dense, x, h):
            y = ops.matmul(ops.cast(x, dtype), ops.cast(dense.kernel[:, h, :], dtype))
            if dense.bias is not None:
                y = y + ops.cast(dense.bias[h], dtype)
            return y  # (B, T, K)

        def features(x, role):  # the map sees (B, T, 1, K): one head
            return ops.reshape(self.feature_map(ops.expand_dims(x, 2), role=role), ops.shape(x))

        heads = self._query_dense.kernel.shape[1]
        q_heads = [features(project(self._query_dense, query, h), "query") for h in range(heads)]
        k_heads = [features(project(self._key_dense, key, h), "key") for h in range(heads)]
        v_heads = [ops.cast(project(self._value_dense, value, h), "float32") for h in range(heads)]
        out = la.linear_attention_split_heads(
            q_heads, k_heads, v_heads, self._output_dense.kernel, self.eps
        )
        out = ops.cast(out, dtype)
        if self._output_dense.bias is not None:
            out = out + ops.cast(self._output_dense.bias, dtype)
        return out

    def _fused_linear_attention(self, q, k, v, key_padding, query_mask, training):
        """Bidirectional linear attention with the output projection folded in."""
        q_feat, k_feat = self._features(q, k)
        v_in = self._drop_values(v, training)
        out = la.linear_attention_projected(
            q_feat, k_feat, v_in, self._output_dense.kernel, key_padding, query_mask, self.eps
        )
        out = ops.cast(out, self.compute_dtype)
        if self._output_dense.bias is not None:
            out = out + ops.cast(self._output_dense.bias, self.compute_dtype)
        return out

    def _softmax_attention(self, q, k, v, mask, training, return_scores, use_causal_mask=False):
        """Keras MHA's own softmax attention (the teacher side of a blend)."""
        # Keras 3.15's fused path (ops.dot_product_attention) fails on JAX when
        # value_dim != key_dim; asking for the scores takes its einsum path,
        # which computes the same thing.
        want_scores = return_scores or self._value_dim != self._key_dim
        out, scores = keras.layers.MultiHeadAttention._compute_attention(
            self, q, k, v, mask, training, want_scores, use_causal_mask
        )
        return out, (scores if return_scores else None)

    def _distillation_loss(self, target, soft_out, linear_out, soft_scores, linear_scores):
        """Weighted distillation loss; the softmax side is the (gradient-free) teacher."""
        if target == "scores":
            p = ops.stop_gradient(ops.cast(soft_scores, "float32"))  # (B, H, T..., S...)
            q = ops.cast(linear_scores, "float32")
            key_axes = tuple(range(len(p.shape) - len(self._attention_axes), len(p.shape)))
            row_kl = ops.sum(
                p * (ops.log(ops.maximum(p, 1e-30)) - ops.log(ops.maximum(q, 1e-12))), axis=key_axes
            )
            # Rows of padded queries (linear weights all zero) teach nothing.
            valid = ops.cast(ops.sum(q, axis=key_axes) > 0.5, "float32")
            loss = ops.sum(row_kl * valid) / ops.maximum(ops.sum(valid), 1.0)
        else:
            t = ops.stop_gradient(ops.cast(soft_out, "float32"))
            s = ops.cast(linear_out, "float32")
            loss = ops.sum(ops.square(s - t)) / (ops.sum(ops.square(t)) + 1e-12)
        return ops.cast(self._blend_state.distillation_weight, "float32") * loss

    def _fidelity(self, query, value, q, k, v, query_mask, value_mask, key_mask,
                  attention_mask, causal, full_mask):
        """||linear - softmax|| / ||softmax|| of this call's attention outputs (a tensor)."""
        if full_mask is None:
            full_mask = self._compute_attention_mask(
                query, value, query_mask=query_mask, value_mask=value_mask,
                key_mask=key_mask, attention_mask=attention_mask, use_causal_mask=causal,
            )
        soft, _ = self._softmax_attention(q, k, v, full_mask, False, False)
        if attention_mask is not None or self._sliding_window is not None:
            linear, _ = self._kernel_matrix_attention(q, k, v, full_mask, False, False)
        else:
            linear, _ = self._linear_attention(
                q, k, v, _combine_masks(value_mask, key_mask), query_mask, causal, False, False
            )
        soft, linear = ops.cast(soft, "float32"), ops.cast(linear, "float32")
        if query_mask is not None:  # padded queries: softmax there is meaningless
            keep = ops.expand_dims(ops.expand_dims(ops.cast(query_mask, "float32"), -1), -1)
            soft, linear = soft * keep, linear * keep
        return ops.sqrt(ops.sum(ops.square(linear - soft)) / (ops.sum(ops.square(soft)) + 1e-30))

    def _features(self, q, k):
        q_feat = self.feature_map(q, role="query")
        k_feat = self.feature_map(k, role="key")
        return q_feat, k_feat

    def _drop_values(self, v, training):
        """Dropout of whole (key, head) value vectors: numerator only, E[out] kept."""
        if not training or self._dropout <= 0.0:
            return v
        shape = ops.shape(v)
        noise_shape = tuple(shape[:-1]) + (1,)
        return keras.random.dropout(
            v, self._dropout, noise_shape=noise_shape, seed=self._dropout_layer.seed_generator
        )

    def _linear_attention(
        self, q, k, v, key_padding, query_mask, causal, training, return_scores
    ):
        q_feat, k_feat = self._features(q, k)
        v_in = self._drop_values(v, training)
        rank = len(q.shape)
        if rank == 4:
            if causal:
                out = la.causal_linear_attention(
                    q_feat, k_feat, v_in, key_padding, self.eps, self.causal_schedule, self.chunk_size
                )
            else:
                out = la.linear_attention(q_feat, k_feat, v_in, key_padding, self.eps)
        else:
            out = self._multi_axis_linear(q_feat, k_feat, v_in)
        if query_mask is not None:
            keep = ops.cast(query_mask, "bool")[:, :, None, None]  # (B, T, 1, 1)
            out = ops.where(keep, out, ops.zeros_like(out))
        out = ops.cast(out, self.compute_dtype)
        scores = None
        if return_scores:
            if rank == 4:
                scores = la.linear_attention_weights(
                    q_feat, k_feat, key_padding, query_mask, causal, self.eps
                )
            else:
                scores = self._kernel_scores(q_feat, k_feat, None)
            scores = ops.cast(scores, self.compute_dtype)
        return out, scores

    def _multi_axis_linear(self, q_feat, k_feat, v):
        """Linear attention over several attention axes: fold the rest into batch."""
        rank = len(q_feat.shape)
        axes = tuple(self._attention_axes)
        others = tuple(i for i in range(1, rank - 2) if i not in axes)
        perm = (0,) + others + axes + (rank - 2, rank - 1)

        def fold(x):
            x = ops.transpose(x, perm)
            shape = ops.shape(x)
            lead = shape[0]
            for i in range(1, 1 + len(others)):
                lead = lead * shape[i]
            length = 1
            for i in range(1 + len(others), 1 + len(others) + len(axes)):
                length = length * shape[i]
            return ops.reshape(x, (lead, length, shape[-2], shape[-1])), shape

        qf, q_shape = fold(q_feat)
        kf, _ = fold(k_feat)
        vf, _ = fold(v)
        out = la.linear_attention(qf, kf, vf, None, self.eps)  # (B*, T*, H, V)
        out = ops.reshape(out, tuple(q_shape[:-1]) + (v.shape[-1],))
        inverse = [perm.index(i) for i in range(rank)]
        return ops.transpose(out, inverse)

    def _kernel_scores(self, q_feat, k_feat, mask):
        """Normalised (B, H, T..., S...) kernel matrix phi(q).phi(k), masked, float32."""
        scores = ops.einsum(
            self._dot_product_equation, ops.cast(k_feat, "float32"), ops.cast(q_feat, "float32")
        )
        if mask is not None:
            mask = ops.cast(mask, "bool")
            expand_axis = -len(self._attention_axes) * 2 - 1
            for _ in range(len(scores.shape) - len(mask.shape)):
                mask = ops.expand_dims(mask, axis=expand_axis)
            scores = ops.where(mask, scores, ops.zeros_like(scores))
        norm_axes = tuple(range(len(scores.shape) - len(self._attention_axes), len(scores.shape)))
        return scores / (ops.sum(scores, axis=norm_axes, keepdims=True) + self.eps)

    def _kernel_matrix_attention(self, q, k, v, mask, training, return_scores):
        """Exact linear attention under an arbitrary mask, through the (T, S) matrix."""
        q_feat, k_feat = self._features(q, k)
        v_in = self._drop_values(v, training)
        scores = self._kernel_scores(q_feat, k_feat, mask)
        out = ops.einsum(self._combine_equation, scores, ops.cast(v_in, "float32"))
        out = ops.cast(out, self.compute_dtype)
        return out, (ops.cast(scores, self.compute_dtype) if return_scores else None)

    def _warn_quadratic(self, from_attention_mask):
        if self._warned_quadratic:
            return
        self._warned_quadratic = True
        what = "a dense `attention_mask`" if from_attention_mask else "`sliding_window`"
        warnings.warn(
            f"SARAMultiHeadAttention '{self.name}' received {what}: it is honoured "
            "exactly through the (T, S) kernel matrix, at quadratic cost. For the "
            "linear path, pass padding as `value_mask`/`key_mask` (or Keras masks) "
            "and causality as `use_causal_mask=True` instead of a dense mask.",
            stacklevel=3,
        )

    # ----------------------------------------------------------------- config

    def get_config(self):
        # `blend` is the construction choice (linear-only or blendable); the
        # current factor of a blendable layer is its variable, saved as a weight.
        feature_map = fm_lib.serialize(self.feature_map)
        # Built in this layer's `build`, under its name scope, like MHA's own
        # sublayers: keeps variable paths identical after a reload.
        feature_map.pop("build_config", None)
        return {
            **super().get_config(),
            "flash_attention": self._flash_attention,
            "feature_map": feature_map,
            "eps": self.eps,
            "causal_schedule": self.causal_schedule,
            "chunk_size": self.chunk_size,
            "blend": self.blend,
        }


def _static_shape(x):
    """The shape as a tuple of ints and None (unknown), or None for a shapeless value."""
    shape = getattr(x, "shape", None)
    if shape is None:
        try:
            shape = np.shape(x)
        except Exception:  # not array-like: leave the error to the backend
            return None
    try:
        dims = tuple(shape)
    except (TypeError, ValueError):  # unknown rank (TensorFlow graph mode)
        return None
    # symbolic sizes (JAX shape polymorphism, torch.compile) count as unknown: comparing them may raise
    return tuple(int(d) if isinstance(d, (int, np.integer)) and not isinstance(d, bool) else None for d in dims)


def _matches(got, want, broadcast: bool) -> bool:
    if len(got) != len(want):
        return False
    for i, (g, w) in enumerate(zip(got, want)):
        if g is None or w is None or g == w:
            continue
        if g == 1 and (broadcast or i == 0):  # a batch of 1 broadcasts, as in MHA
            continue
        return False
    return True


def _fmt(shape) -> str:
    return "unknown" if shape is None else str(tuple(shape))


def _combine_masks(value_mask, key_mask):
    masks = [ops.cast(m, "bool") for m in (value_mask, key_mask) if m is not None]
    if not masks:
        return None
    out = masks[0]
    for m in masks[1:]:
        out = ops.logical_and(out, m)
    return out
