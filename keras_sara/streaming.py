"""Streaming inference for causal SARA models: one token in, one token out, explicit state.

A causal SARA model (every `SARAMultiHeadAttention` called with
`use_causal_mask=True`) is a recurrent network in disguise: the output at
token t depends on the past only through each attention layer's prefix sums

    Psi_t   = sum_{j<=t} phi(k_j) v_j^T     (B, H, M, D)
    Gamma_t = sum_{j<=t} phi(k_j)           (B, H, M)

whose size does not depend on t. `make_step_model` rebuilds such a model as a
single-step Keras model that takes one token and these states and returns
the token's output and the updated states, so a control loop pays the same
per step whatever the history length. `export_streaming_tflite` exports that
step as a verified, builtins-only LiteRT file.

    import keras_sara.streaming as streaming

    step = streaming.make_step_model(decoder)           # decoder: (B, T, E) -> (B, T, E')
    state = streaming.initial_state(step, batch_size=1)  # zeros: the empty history
    for x_t in tokens:                                   # x_t: (1, 1, E)
        y_t, *state = step([x_t, *state])

    report = streaming.export_streaming_tflite(decoder, "policy_step.tflite")

A language model written the keras.io way (token ids into a
`TokenAndPositionEmbedding`, attention inside a custom `TransformerBlock`)
streams the same way once converted, one token id per step; its step counts
positions in its state:

    student, _ = keras_sara.convert(mini_gpt)           # ids (B, T) -> logits (B, T, V)
    step = streaming.make_step_model(student)
    logits, state = streaming.stream(step, ids)         # == student(ids), causal

What can be streamed (anything else raises a ValueError that names the layer
and the reason):

- a Functional model with one input, `(B, T, E)` or `(B, T)` token ids, and
  one output `(B, T, E')`;
- `SARAMultiHeadAttention` self-attention called with `use_causal_mask=True`
  (query, value and key the same tensor, no other mask, default
  `attention_axes`), linear-only (`blend=1.0`; run `keras_sara.finalize`
  after a blend schedule) and with a token-local feature map: `relu`,
  `elu+1` or `sara`. `favor+` and `hedgehog` subtract a key stabiliser taken
  over the whole sequence (a max over all keys, future ones included; see
  `feature_maps._stabiliser`), which a step cannot know;
- between attention layers, layers that act on each token alone: `Dense`,
  `EinsumDense` that does not contract the token axis, `LayerNormalization`
  and `RMSNormalization` over features, activations, inference-time dropout
  and noise, merges (`Add`, `Multiply`, `Concatenate` on features, ...),
  `Rescaling`, and elementwise `keras.ops` (the `x + y` of a residual).
  Pass your own token-local layer classes as `per_token_layers`, and give
  your own `FeatureMap` subclass `token_local = True` if phi of a token
  depends on that token alone;
- `Embedding` of token ids, and position embeddings: a layer whose output
  is `token_embedding(x) + position_embedding(arange(T))` for two of its own
  `Embedding` sublayers (checked numerically on a probe, as for keras.io's
  `TokenAndPositionEmbedding`), or any layer that defines
  `call_at_position(inputs, position)` (its output for one token at a
  position; also checked on a probe). The step then takes and returns a
  `position` counter; positions past the position embedding's `input_dim`
  are refused by `stream` and give NaN from the step itself;
- custom layers (transformer blocks) holding causal SARA self-attention:
  their own `call` runs on the token, each SARA layer inside doing one step
  on its own state. A probe checks that, run token by token, the layer
  reproduces its output on a whole sequence (so nothing else in it mixes
  tokens).

The step model shares the weights of the model it came from. It is a
deployment view, not a model to save: rebuild it with `make_step_model`
after loading the full model.

The streamed outputs equal the full-sequence causal model's up to float32
rounding (tests: relative error below 1e-4 over 1,000 steps; the keras.io
miniGPT within 1e-5 over 80 tokens).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import io
import json
import os
import sys
from typing import Iterable, Optional, Sequence

import keras
import numpy as np
from keras import ops

from keras_sara import export as export_lib
from keras_sara import feature_maps as fm_lib
from keras_sara.layers import SARAMultiHeadAttention
from keras_sara.ops import kernels as la
from keras_sara.utils import temporary_name, work_directory

#: Feature maps whose features of a token depend on that token alone.
STREAMABLE_FEATURE_MAPS = (fm_lib.ReLU, fm_lib.EluPlusOne, fm_lib.SARAFeatureMap)

# Name of the step model's token input (its states are `<layer>_psi`, `<layer>_gamma`).
TOKEN_INPUT_NAME = "x_t"
# Name of the step model's position counter (models that add position embeddings).
POSITION_INPUT_NAME = "position"
# The method a layer may define to say what it computes for one token at a position.
POSITION_METHOD = "call_at_position"
# Attribute set on step models, so `initial_state` and the exporter recognise them.
_STEP_MARKER = "_keras_sara_streaming_states"
# Attribute set on step models: position limit, position layers, token-id vocabulary.
_STEP_INFO = "_keras_sara_streaming_info"
# Tokens in the probe that checks a custom block one token at a time (at most).
_BLOCK_PROBE_LENGTH = 6

# Token-local Keras layers (on a (B, T, E) input, or (B, T) token ids, inference mode). Normalisations,
# EinsumDense, Softmax and Concatenate are checked further in `_token_local_reason`.
_PER_TOKEN_LAYERS = (
    keras.layers.InputLayer,
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Embedding,
    keras.layers.LayerNormalization,
    keras.layers.RMSNormalization,
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.Softmax,
    keras.layers.Dropout,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
    keras.layers.Identity,
    keras.layers.Add,
    keras.layers.Subtract,
    keras.layers.Multiply,
    keras.layers.Average,
    keras.layers.Maximum,
    keras.layers.Minimum,
    keras.layers.Concatenate,
    keras.layers.Rescaling,
)

# Elementwise `keras.ops` that a Functional model records as operations
# (`x + y`, `ops.gelu(x)`, ...); broadcasting against a constant with a token
# axis is caught afterwards by the token-axis check.
_ELEMENTWISE_OPS = frozenset({
    "Abs", "Add", "Cast", "Clip", "Divide", "Exp", "Expm1", "Log", "Log1p", "Maximum",
    "Minimum", "Multiply", "Negative", "Power", "Sqrt", "Square", "Subtract", "Tanh",
    "TrueDivide", "Elu", "Gelu", "HardSigmoid", "HardSilu", "LeakyRelu", "Relu",
    "Relu6", "Selu", "Sigmoid", "Silu", "Softplus", "Softsign",
})


# --------------------------------------------------------------- the step


def _check_streamable_attention(layer) -> None:
    """Raise a ValueError unless `layer` can run as a recurrent step."""
    fm = layer.feature_map
    token_local = getattr(fm, "token_local", None)
    if token_local is None:
        token_local = type(fm) in STREAMABLE_FEATURE_MAPS
    if not token_local:
        allowed = ", ".join(repr(n) for n in ("relu", "elu+1", "sara"))
        raise ValueError(
            f"SARAMultiHeadAttention '{layer.name}' uses the feature map "
            f"{type(fm).__name__}, which cannot be streamed: its key features are "
            "stabilised by a maximum over the whole sequence (future keys included), "
            "which a one-token step cannot know. Use a token-local map "
            f"({allowed}), or for your own FeatureMap subclass set the class "
            "attribute `token_local = True` if phi(x) of a token depends on that "
            f"token alone. Received: feature_map={type(fm).__name__}"
        )
    if layer.blend_variable is not None:
        raise ValueError(
            f"SARAMultiHeadAttention '{layer.name}' was built with blend < 1, so it also "
            "computes softmax attention, which has no fixed-size state. Run "
            "`keras_sara.finalize(model)` (after up-training) to make it linear-only, "
            f"then stream the result. Received: blend={layer.blend}"
        )
    if not layer.built:
        raise ValueError(
            f"SARAMultiHeadAttention '{layer.name}' must be built (called once) before "
            "streaming. Received: built=False"
        )
    query_rank = len(layer._query_dense.equation.split(",")[0])
    if query_rank != 3 or tuple(layer._attention_axes) != (1,):
        raise ValueError(
            f"SARAMultiHeadAttention '{layer.name}' must attend over one token axis, "
            f"inputs (batch, tokens, features). Received: query of rank {query_rank}, "
            f"attention_axes={tuple(layer._attention_axes)}"
        )


def state_shapes(layer) -> tuple:
    """Per-example state shapes `((H, M, D), (H, M))` of a SARA layer's step.

    `H` heads, `M = feature_map.feature_dim(key_dim)` features, `D` value_dim.
    """
    _check_streamable_attention(layer)
    heads = layer._num_heads
    features = layer.feature_map.feature_dim(layer._key_dim)
    return (heads, features, layer._value_dim), (heads, features)


def sara_attention_step(layer, query_t, state: Sequence):
    """One causal self-attention step of a `SARAMultiHeadAttention`, O(H * M * D).

    Projects the new token, maps its query and key features with the layer's
    feature map, adds the key and value to the state with
    `keras_sara.ops.kernels.causal_linear_attention_step` and applies the
    output projection (and the gate, if any): exactly what
    `layer(x, x, use_causal_mask=True)` computes for the last token of `x`
    when `state` holds the prefix sums of the tokens before it.

    Args:
        layer: a built, linear-only `SARAMultiHeadAttention` with a
            token-local feature map (see the module docstring).
        query_t: the new token, `(B, 1, E)` or `(B, E)`.
        state: `(psi, gamma)`: `(B, H, M, D)` and `(B, H, M)` float32 (zeros
            for an empty history; `state_shapes(layer)` gives the sizes).

    Returns:
        `(out_t, (psi, gamma))`: the attention output shaped like `query_t`
        but with the layer's output size, and the new state.
    """
    _check_streamable_attention(layer)
    if len(query_t.shape) not in (2, 3) or (len(query_t.shape) == 3 and query_t.shape[1] != 1):
        raise ValueError(
            "`query_t` must be one token, (batch, 1, features) or (batch, features). "
            f"Received: query_t.shape={tuple(query_t.shape)}"
        )
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise ValueError(
            "`state` must be a pair (psi, gamma). "
            f"Received: state of type {type(state).__name__}"
        )
    flat = len(query_t.shape) == 2
    x = ops.expand_dims(query_t, 1) if flat else query_t  # (B, 1, E)
    q = layer._query_dense(x)  # (B, 1, H, K)
    k = layer._key_dense(x)  # (B, 1, H, K)
    v = layer._value_dense(x)  # (B, 1, H, D)
    q_feat = ops.squeeze(layer.feature_map(q, role="query"), axis=1)  # (B, H, M)
    k_feat = ops.squeeze(layer.feature_map(k, role="key"), axis=1)  # (B, H, M)
    out, new_state = la.causal_linear_attention_step(
        q_feat, k_feat, ops.squeeze(v, axis=1), tuple(state), eps=layer.eps
    )
    out = ops.expand_dims(ops.cast(out, layer.compute_dtype), 1)  # (B, 1, H, D)
    if layer._use_gate:
        out = ops.multiply(out, layer._gate_dense(x))
    out = layer._output_dense(out)  # (B, 1, E')
    if flat:
        out = ops.squeeze(out, axis=1)  # (B, E')
    return out, new_state


class SARAStep(keras.layers.Layer):
    """A `SARAMultiHeadAttention` as a recurrent step layer (shares its weights).

    Call arguments:
        x_t: `(B, 1, E)`, the new token.
        psi: `(B, H, M, D)` float32 state.
        gamma: `(B, H, M)` float32 state.

    Returns:
        `[y_t, psi, gamma]`: `(B, 1, E')` and the new state.
    """

    def __init__(self, attention, **kwargs):
        kwargs.setdefault("name", f"{attention.name}_step")
        super().__init__(dtype=attention.dtype_policy, **kwargs)
        _check_streamable_attention(attention)
        self.attention = attention
        # The state stays float32 under mixed precision; the attention layer
        # casts the token itself.
        self._convert_input_args = False
        self.built = True

    def call(self, x_t, psi, gamma):
        y_t, (psi, gamma) = sara_attention_step(self.attention, x_t, (psi, gamma))
        return [y_t, psi, gamma]

    def compute_output_spec(self, x_t, psi, gamma):
        projected = self.attention._output_dense.compute_output_shape(
            tuple(x_t.shape[:2]) + (self.attention._num_heads, self.attention._value_dim)
        )
        y_shape = tuple(x_t.shape[:2]) + tuple(projected[2:])  # (B, 1, E')
        return [
            keras.KerasTensor(y_shape, dtype=self.attention.compute_dtype),
            keras.KerasTensor(psi.shape, dtype="float32"),
            keras.KerasTensor(gamma.shape, dtype="float32"),
        ]


# ------------------------------------------------------- model rebuilding


def _positive_axes(axis, rank: int) -> list:
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    return [int(a) % rank for a in axes]


def _einsum_is_per_token(equation: str) -> bool:
    """True when an EinsumDense equation keeps the batch and token axes untouched."""
    try:
        lhs, out = equation.replace(" ", "").split("->")
        inp, kernel = lhs.split(",")
    except ValueError:
        return False
    if "." in inp or len(inp) < 3:
        return False
    batch, token = inp[0], inp[1]
    return out[:2] == batch + token and token not in kernel and batch not in kernel


def _token_local_reason(op, per_token_layers: tuple) -> Optional[str]:
    """None if `op` acts on each token alone, else why it does not (or may not)."""
    if per_token_layers and isinstance(op, per_token_layers):
        return None
    if isinstance(op, keras.layers.MultiHeadAttention):  # SARA was handled before
        return (
            "softmax attention mixes every token with every other and has no fixed-size "
            "state; convert it with `keras_sara.convert(model)` (and use it causally)"
        )
    if isinstance(op, keras.Model):
        return (
            "nested models are not walked; build the decoder as one flat Functional "
            "model"
        )
    if isinstance(op, _PER_TOKEN_LAYERS):
        if isinstance(op, (keras.layers.LayerNormalization, keras.layers.RMSNormalization)):
            if any(a in (0, 1) for a in _positive_axes(op.axis, 3)):
                return f"it normalises over the batch or token axis (axis={op.axis})"
        if isinstance(op, keras.layers.EinsumDense) and not _einsum_is_per_token(op.equation):
            return f"its equation {op.equation!r} touches the batch or token axis"
        if isinstance(op, (keras.layers.Softmax, keras.layers.Concatenate)):
            if any(a in (0, 1) for a in _positive_axes(op.axis, 3)):
                return f"it works along the batch or token axis (axis={op.axis})"
        return None
    if type(op).__module__.startswith("keras.src.ops.") and type(op).__name__ in _ELEMENTWISE_OPS:
        return None
    return (
        "it is not known to act on each token alone (it may mix tokens, e.g. pooling, "
        "convolution, reshapes, position embeddings); if it does act per token, pass "
        "its class in `per_token_layers`; if it depends on the token's position, define "
        f"`{POSITION_METHOD}(self, inputs, position)` on it (see `make_step_model`)"
    )


def _self_attention_problems(args: dict) -> list:
    """Why a SARA call with bound arguments `args` is not causal self-attention ([] if it is)."""
    query, value, key = args.get("query"), args.get("value"), args.get("key")
    problems = []
    if not args.get("use_causal_mask", False):
        problems.append(
            "it is called without use_causal_mask=True (bidirectional attention sees "
            "future tokens, so it cannot be computed one token at a time)"
        )
    if value is not query or (key is not None and key is not query):
        problems.append(
            "its query, value and key are not the same tensor (cross-attention is not "
            "streamed)"
        )
    for name in ("query_mask", "value_mask", "key_mask", "attention_mask"):
        if args.get(name) is not None:
            problems.append(f"it receives `{name}` (every streamed token is a real token)")
    if args.get("return_attention_scores", False):
        problems.append("it is called with return_attention_scores=True")
    return problems


def _not_self_attention(layer, problems: list, where: str = ""):
    return _NotStreamable(
        f"SARAMultiHeadAttention '{layer.name}'{where} cannot be streamed: "
        + "; ".join(problems)
        + ". Streaming needs causal self-attention, layer(x, x, use_causal_mask=True)."
    )


def _sara_call_arguments(layer, node) -> dict:
    """The SARA call's bound arguments, after checking it is causal self-attention."""
    bound = inspect.signature(layer.call).bind(*node.arguments.args, **node.arguments.kwargs)
    args = bound.arguments
    problems = _self_attention_problems(args)
    if problems:
        raise _not_self_attention(layer, problems)
    return args


# ------------------------------------- custom blocks and position embeddings


class _NotStreamable(ValueError):
    """A streaming refusal raised from inside a layer's call (not wrapped again)."""


def _sublayers(layer, recursive: bool = True) -> list:
    if not isinstance(layer, keras.layers.Layer):  # a keras.ops operation (`x + y`)
        return []
    # Keras has no public listing of a layer's sublayers (only `Model.layers`).
    return list(layer._flatten_layers(include_self=False, recursive=recursive))


def _sara_sublayers(layer) -> list:
    return [l for l in _sublayers(layer) if isinstance(l, SARAMultiHeadAttention)]


def _per_token_rel_err(got, want) -> float:
    """Largest ||got_t - want_t|| / ||want_t|| over the tokens t of (B, T, ...) arrays."""
    got = np.asarray(got, np.float64).reshape(got.shape[0], got.shape[1], -1)
    want = np.asarray(want, np.float64).reshape(want.shape[0], want.shape[1], -1)
    norm = np.maximum(np.linalg.norm(want, axis=-1), np.finfo(np.float64).tiny)
    return float(np.max(np.linalg.norm(got - want, axis=-1) / norm))


def _probe_tolerance(layer) -> float:
    # A layer that mixes tokens misses by O(1); float16 rounding alone stays below 3e-2.
    return 1e-4 if keras.backend.standardize_dtype(layer.compute_dtype) == "float32" else 3e-2


def _probe_input(spec, length: int, vocab: Optional[int], rng) -> np.ndarray:
    """Random (2, length, ...) input like `spec`: token ids below `vocab` or normal floats."""
    shape = (2, length) + tuple(spec.shape[2:])
    dtype = keras.backend.standardize_dtype(spec.dtype)
    if len(spec.shape) == 2 or np.dtype(dtype).kind in "biu":
        return rng.integers(0, vocab or 2, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


class _BlockSession:
    """The (psi, gamma) of each SARA layer of a block during one one-token call.

    `states` maps `id(layer)` to its state; None discovers the layers (eager,
    zero states) and records the order they are called in.
    """

    def __init__(self, block, states: Optional[dict] = None):
        self.block = block
        self.states = states
        self.new_states = {}
        self.order = []
        # The refusal as raised: Keras's traceback filter re-raises it with the
        # call's arguments appended, which would bury the reason.
        self.error = None

    def refuse(self, message: str):
        self.error = _NotStreamable(message)
        return self.error


def _stepping_call(layer, session: _BlockSession):
    """A replacement for `layer.call` that runs one causal step on the session's state."""
    signature = inspect.signature(layer.call)
    where = f" (in layer '{session.block.name}')"

    def call(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs).arguments
        problems = _self_attention_problems(arguments)
        if problems:
            raise session.refuse(str(_not_self_attention(layer, problems, where)))
        if id(layer) in session.new_states:
            raise session.refuse(
                f"SARAMultiHeadAttention '{layer.name}'{where} is called more than once in "
                "one call of the layer; each call would need its own state. Use one "
                "attention layer per call. Received: a second call"
            )
        query = arguments["query"]
        if session.states is None:
            state = la.initial_state(query.shape[0], *state_shapes(layer)[0])
        elif id(layer) in session.states:
            state = session.states[id(layer)]
        else:
            raise session.refuse(
                f"SARAMultiHeadAttention '{layer.name}'{where} was not called when the "
                "step was built, so it has no state input: the layer's call must run the "
                "same attention layers for every token. Received: an unexpected call"
            )
        out, new_state = sara_attention_step(layer, query, state)
        session.new_states[id(layer)] = new_state
        session.order.append(layer)
        return out

    return call


@contextlib.contextmanager
def _stepping_attention(block, session: _BlockSession):
    """Within the context, every SARA layer inside `block` runs one step on `session`.

    The instance attribute shadows the class's `call` (Keras's `__call__` looks
    `self.call` up on each call), so the block's own `call` runs unchanged.
    """
    missing = object()
    saved = []
    try:
        for layer in _sara_sublayers(block):
            saved.append((layer, vars(layer).get("call", missing)))
            # object.__setattr__: neither Keras nor torch should track a function.
            object.__setattr__(layer, "call", _stepping_call(layer, session))
        yield session
    finally:
        for layer, old in reversed(saved):
            if old is missing:
                vars(layer).pop("call", None)
            else:
                object.__setattr__(layer, "call", old)


def _block_problem(op) -> Optional[str]:
    """Why a layer holding SARA attention cannot run as a block step (None if it can)."""
    softmax = [
        l.name for l in _sublayers(op)
        if isinstance(l, keras.layers.MultiHeadAttention) and not isinstance(l, SARAMultiHeadAttention)
    ]
    if softmax:
        return (
            f"it holds softmax attention {softmax}, which mixes every token with every "
            "other and has no fixed-size state; convert it with `keras_sara.convert(model)`"
        )
    return None


def _probe_block(op, spec, call_kwargs: dict, vocab: Optional[int]) -> list:
    """Check that `op` run one token at a time reproduces its causal output; its SARA layers.

    The block's own `call` runs on each token of a short random probe, its SARA
    layers stepping their state; the outputs must equal one call on the whole
    probe. Returns the SARA layers in the order the block calls them.
    """
    length = _BLOCK_PROBE_LENGTH if spec.shape[1] is None else min(spec.shape[1], _BLOCK_PROBE_LENGTH)
    x = _probe_input(spec, length, vocab, np.random.default_rng(0))
    label = f"Layer '{op.name}' ({type(op).__name__})"
    session = None
    try:
        full = ops.convert_to_numpy(op(x, **call_kwargs))
        states, order, outs = None, None, []
        for t in range(length):
            session = _BlockSession(op, states)
            with _stepping_attention(op, session):
                y_t = op(ops.convert_to_tensor(x[:, t : t + 1]), **call_kwargs)
            called = [id(l) for l in session.order]
            if order is None:
                order = list(session.order)
            elif called != [id(l) for l in order]:
                raise _NotStreamable(
                    f"{label} cannot be streamed: it calls its attention layers in a "
                    "different order from one token to the next. Received: "
                    f"{[l.name for l in session.order]} after {[l.name for l in order]}"
                )
            states = session.new_states
            outs.append(ops.convert_to_numpy(y_t))
    except _NotStreamable as err:
        raise (getattr(session, "error", None) or err) from None
    except Exception as err:  # a layer that only runs at its full length, say
        raise ValueError(
            f"{label} cannot be streamed: calling it on one token, shape "
            f"{(2, 1) + tuple(spec.shape[2:])}, failed with {type(err).__name__}: {err}"
        ) from err
    if not order:
        raise ValueError(
            f"{label} holds SARAMultiHeadAttention layers but calls none of them on a "
            "probe, so it has nothing to stream. Received: layers "
            f"{[l.name for l in _sara_sublayers(op)]}"
        )
    streamed = np.concatenate(outs, axis=1)
    err = _per_token_rel_err(streamed, full) if streamed.shape == full.shape else float("inf")
    if not err <= _probe_tolerance(op):  # NaN fails too
        raise ValueError(
            f"{label} cannot be streamed: run one token at a time, its attention layers "
            f"{[l.name for l in order]} stepping their state, it does not reproduce its "
            f"causal output on a {length}-token probe (largest per-token relative error "
            f"{err:.2e}). Something in its `call` mixes tokens other than causal SARA "
            "attention (pooling, convolution, position embeddings, a mask built from the "
            "length). Move that part out of the layer. Received: "
            f"output shapes {streamed.shape} (streamed) and {full.shape} (whole probe)"
        )
    return order


def _token_and_position_embeddings(op, spec) -> tuple:
    """`((token, position), None)` if `op(x) == token(x) + position(arange(T))`, else `(None, why)`.

    Checked numerically on random token ids, with random weights put in the
    layer's own Embedding sublayers for the probe (restored afterwards), so
    that a position embedding which happens to be constant cannot pass.
    """
    embeddings = [l for l in _sublayers(op, recursive=False) if isinstance(l, keras.layers.Embedding)]
    if len(embeddings) < 2:
        return None, None
    if len(spec.shape) != 2:
        return None, f"its input has shape {tuple(spec.shape)}, not (batch, tokens) token ids"
    vocab = min(e.input_dim for e in embeddings)
    length = spec.shape[1] or min(_BLOCK_PROBE_LENGTH, max(e.input_dim for e in embeddings))
    rng = np.random.default_rng(0)
    ids = _probe_input(spec, length, vocab, rng)
    positions = np.arange(length, dtype="int32")
    saved = [ops.convert_to_numpy(e.embeddings) for e in embeddings]
    best = float("inf")
    try:
        for e in embeddings:
            e.embeddings.assign(rng.standard_normal(e.embeddings.shape).astype(e.embeddings.dtype))
        try:
            got = ops.convert_to_numpy(op(ids))
        except Exception as err:
            return None, f"calling it on {length} token ids failed with {type(err).__name__}: {err}"
        rtol = 1e-5 if keras.backend.standardize_dtype(op.compute_dtype) == "float32" else 1e-2
        for token in embeddings:
            for position in embeddings:
                if position is token or position.input_dim < length:
                    continue
                want = ops.convert_to_numpy(token(ids) + position(positions)[None])
                if want.shape != got.shape:
                    continue
                diff = float(np.max(np.abs(got.astype(np.float64) - want)))
                if diff <= rtol * max(1.0, float(np.max(np.abs(want)))):
                    return (token, position), None
                best = min(best, diff)
    finally:
        for e, value in zip(embeddings, saved):
            e.embeddings.assign(value)
    return None, (
        f"it holds Embedding layers {[e.name for e in embeddings]}, but on a probe its "
        "output is not token_embedding(x) + position_embedding(arange(tokens)) for any "
        f"two of them (max abs difference {best:.3e})"
    )


def _check_position_method(op, spec, vocab: Optional[int]) -> None:
    """Check `op.call_at_position` against `op` on a short random probe."""
    length = spec.shape[1] or _BLOCK_PROBE_LENGTH
    x = _probe_input(spec, length, vocab, np.random.default_rng(0))
    label = f"Layer '{op.name}' ({type(op).__name__})"
    try:
        full = ops.convert_to_numpy(op(x))
        outs = [
            ops.convert_to_numpy(
                op.call_at_position(ops.convert_to_tensor(x[:, t : t + 1]),
                                    ops.full((x.shape[0], 1), t, dtype="int32"))
            )
            for t in range(length)
        ]
    except Exception as err:
        raise ValueError(
            f"{label} cannot be streamed: calling it, or its `{POSITION_METHOD}` on one "
            f"token, failed with {type(err).__name__}: {err}"
        ) from err
    streamed = np.concatenate(outs, axis=1) if outs[0].ndim >= 2 else None
    if streamed is None or streamed.shape != full.shape:
        raise ValueError(
            f"{label} cannot be streamed: `{POSITION_METHOD}(inputs, position)` must return "
            "the layer's output for that one token, (batch, 1, ...). Received: shape "
            f"{outs[0].shape} where the layer gives {full.shape[:1] + (1,) + full.shape[2:]}"
        )
    err = _per_token_rel_err(streamed, full)
    if not err <= _probe_tolerance(op):
        raise ValueError(
            f"{label} cannot be streamed: its `{POSITION_METHOD}` does not match the layer "
            f"on a {length}-token probe (largest per-token relative error {err:.2e}). "
            f"`{POSITION_METHOD}(inputs, position)` must give the layer's output for the "
            "token `inputs` at index `position` of the sequence (counted from 0)."
        )


class _PositionStep(keras.layers.Layer):
    """A position-dependent layer for one token at a given position.

    Either `token(x_t) + position(p)` (a recognised token-and-position
    embedding, with its limit `position.input_dim`) or the layer's own
    `call_at_position(x_t, p)`.
    """

    def __init__(self, layer, embeddings: Optional[tuple] = None, **kwargs):
        kwargs.setdefault("name", f"{layer.name}_step")
        super().__init__(dtype=layer.dtype_policy, **kwargs)
        self.layer = layer
        self._use_embeddings = embeddings is not None
        if embeddings is not None:
            self.token_embedding, self.position_embedding = embeddings
        self._convert_input_args = False
        self.built = True

    def call(self, x_t, position):
        if not self._use_embeddings:
            return self.layer.call_at_position(x_t, position)
        limit = self.position_embedding.input_dim
        inside = ops.logical_and(ops.greater_equal(position, 0), ops.less(position, limit))  # (B, 1)
        # Backends disagree past the table (TensorFlow raises, JAX clamps): clamp the
        # lookup and make the output NaN, so no backend streams a plausible wrong token.
        y = self.token_embedding(x_t) + self.position_embedding(ops.clip(position, 0, limit - 1))
        return ops.where(ops.expand_dims(inside, -1), y, ops.full_like(y, float("nan")))  # (B, 1, E)


class _BlockStep(keras.layers.Layer):
    """A layer holding SARA attention (a custom block) on one token with explicit states.

    Runs the block's own `call`; each of its SARA layers (in `attention_ids`
    order) takes its `(psi, gamma)` from `states` and returns the new one.
    """

    def __init__(self, block, attention_ids: Sequence[int], call_kwargs: dict, **kwargs):
        kwargs.setdefault("name", f"{block.name}_step")
        super().__init__(dtype=block.dtype_policy, **kwargs)
        self.block = block
        self._attention_ids = tuple(attention_ids)
        self._call_kwargs = dict(call_kwargs)
        # The states stay float32 under mixed precision; the block casts the token.
        self._convert_input_args = False
        self.built = True

    def call(self, x_t, states):
        pairs = {i: (states[2 * k], states[2 * k + 1]) for k, i in enumerate(self._attention_ids)}
        session = _BlockSession(self.block, pairs)
        try:
            with _stepping_attention(self.block, session):
                y_t = self.block(x_t, **self._call_kwargs)
        except _NotStreamable as err:
            raise (session.error or err) from None
        if set(session.new_states) != set(self._attention_ids):
            raise _NotStreamable(
                f"Layer '{self.block.name}' did not call the same attention layers as when "
                "the step was built: its call must run the same attention layers for "
                f"every token. Received: {len(session.new_states)} of "
                f"{len(self._attention_ids)} called"
            )
        return [y_t] + [t for i in self._attention_ids for t in session.new_states[i]]


def _graph(model):
    """The Functional graph of a Functional or (built) Sequential model, else None."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    return model if hasattr(model, "_nodes_by_depth") else None


def _walk(model):
    """The model's operation nodes in execution order (as Functional runs them)."""
    model = _graph(model)
    nodes = []
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.operation is not None and not node.is_input:
                nodes.append(node)
    return nodes


def _check_model(model) -> None:
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"`model` must be a keras.Model. Received: model of type {type(model).__name__}"
        )
    if _graph(model) is None:
        raise ValueError(
            f"`model` must be a Functional or Sequential model (its layer graph is "
            f"rebuilt as a step). Received: model '{model.name}' of type "
            f"{type(model).__name__} (a subclassed model): rebuild it with the "
            "Functional API"
        )
    inputs, outputs = model.inputs, model.outputs
    if len(inputs) != 1 or len(inputs[0].shape) not in (2, 3):
        raise ValueError(
            "`model` must have one input of shape (batch, tokens, features) or (batch, "
            f"tokens) token ids. Received: inputs with shapes {[tuple(t.shape) for t in inputs]}"
        )
    if len(outputs) != 1 or len(outputs[0].shape) != 3:
        raise ValueError(
            "`model` must have one output of shape (batch, tokens, features). "
            f"Received: outputs with shapes {[tuple(t.shape) for t in outputs]}"
        )
    if len(inputs[0].shape) == 3 and inputs[0].shape[2] is None:
        raise ValueError(
            "`model`'s input must have a known feature size. "
            f"Received: input shape {tuple(inputs[0].shape)}"
        )


def _single_tensor_input(op, node, model):
    """The one tensor a block or position layer is called on, and its other (keyword) arguments."""
    args = node.arguments
    if len(args.keras_tensors) != 1 or not args.args or args.args[0] is not args.keras_tensors[0]:
        raise ValueError(
            f"Layer '{op.name}' ({type(op).__name__}) must be called on one tensor to be "
            f"streamed. Received: {len(args.keras_tensors)} tensor arguments in model "
            f"'{model.name}'"
        )
    kwargs = {k: v for k, v in args.kwargs.items() if k != "training"}
    return args.keras_tensors[0], kwargs


def _unique(name: str, used: set) -> str:
    out, n = name, 1
    while out in used:
        n += 1
        out = f"{name}_{n}"
    used.add(out)
    return out


def make_step_model(model, per_token_layers: Iterable = (), name: Optional[str] = None):
    """Rebuild a causal SARA model as a one-token step with explicit state.

    Walks the Functional graph of `model` in execution order:

    - every `SARAMultiHeadAttention` (causal self-attention) becomes a
      `SARAStep` with its own state input and output;
    - a layer that holds SARA attention (a custom transformer block) runs its
      own `call` on the token, each SARA layer inside it doing one step on its
      own state. It is first checked on a short random probe: run token by
      token, it must reproduce its output on the whole probe (else a
      ValueError names it: something in it mixes tokens);
    - a layer whose output depends on the token's position: either a
      token-and-position embedding, recognised numerically (its output on a
      probe equals `token_embedding(x) + position_embedding(arange(T))` for two
      of its own `Embedding` sublayers; the keras.io
      `TokenAndPositionEmbedding`), or a layer that defines
      `call_at_position(inputs, position)`, its output for the one token
      `inputs` at index `position` (`(B, 1)` int32, from 0), also checked on a
      probe;
    - every other layer is reused as is on the single token (it must act on
      each token alone; see the module docstring).

    The step model shares `model`'s weights: train or load weights into either
    and both see them.

    Signature of the returned model (all float32 unless the model's dtype
    policy says otherwise for `x_t`/`y_t`; states are always float32):

        inputs:  [x_t, psi_1, gamma_1, ..., psi_L, gamma_L(, position)]
        outputs: [y_t, psi_1', gamma_1', ..., psi_L', gamma_L'(, position + 1)]

    - `x_t`: the new token, `(B, 1, E)` (the model input's feature size E),
      or `(B, 1)` token ids for a model with a `(B, T)` token-id input (its
      dtype);
    - `psi_l`: `(B, H_l, M_l, D_l)` and `gamma_l`: `(B, H_l, M_l)`, the state
      of the l-th SARA layer in execution order (`M_l` = feature size of its
      feature map, `D_l` = value_dim): prefix sums over all tokens fed so
      far. An empty history is all zeros (`initial_state`);
    - `position`: only for a model with a position-dependent layer: `(B, 1)`
      int32, the index of `x_t` in its sequence. The step counts it itself
      (it returns `position + 1`), so it is a state like the others, zero
      for an empty history. Past a position embedding's `input_dim` the
      step's output is NaN on every backend (the table has no row there);
      `stream` refuses such tokens with a ValueError first;
    - `y_t`: `(B, 1, E')`, the model's output for this token, and the new
      states to feed back with the next token.

    Inputs are named `x_t`, `<attention layer>_psi`, `<attention layer>_gamma`
    and `position`.

    Args:
        model: a built Functional/Sequential causal SARA model with one
            `(B, T, E)` or `(B, T)` (token ids) input and one `(B, T, E')`
            output.
        per_token_layers: extra layer classes to treat as token-local.
        name: name of the step model (default `<model.name>_step`).

    Returns:
        A `keras.Model` (batch size free).

    Raises:
        ValueError: a layer that cannot be streamed (non-causal or cross
            SARA attention, softmax attention, a feature map stabilised over
            the sequence, a layer that mixes tokens, a position-dependent
            layer that is neither recognised nor defines `call_at_position`),
            named with the reason.

    Example:

    >>> student, _ = keras_sara.convert(mini_gpt)   # ids (B, T) -> logits  # doctest: +SKIP
    >>> step = make_step_model(student)                         # doctest: +SKIP
    >>> state = initial_state(step, batch_size=1)              # doctest: +SKIP
    >>> logits_t, *state = step([ids[:, :1], *state])          # doctest: +SKIP
    >>> logits, state = stream(step, ids)   # the whole sequence  # doctest: +SKIP
    """
    _check_model(model)
    per_token_layers = tuple(per_token_layers)
    for cls in per_token_layers:
        if not (isinstance(cls, type) and issubclass(cls, keras.layers.Layer)):
            raise ValueError(
                "`per_token_layers` must hold keras.layers.Layer subclasses. "
                f"Received: {cls!r}"
            )
    nodes = _walk(model)
    embedding_sizes = [op.input_dim for op in (n.operation for n in nodes)
                       if isinstance(op, keras.layers.Embedding)]

    # First pass: validate every node, so a bad layer fails before any graph is built.
    plans = {}  # id(node) -> ("sara",) | ("block", layers, kwargs) | ("position", pair, kwargs)
    for node in nodes:
        op = node.operation
        if isinstance(op, SARAMultiHeadAttention):
            if len([n for n in nodes if n.operation is op]) > 1:
                raise ValueError(
                    f"SARAMultiHeadAttention '{op.name}' is called more than once in "
                    "the model; each call would need its own state. Use one layer per "
                    f"call. Received: {len([n for n in nodes if n.operation is op])} calls"
                )
            _sara_call_arguments(op, node)
            _check_streamable_attention(op)
            plans[id(node)] = ("sara",)
            continue
        own_sizes = [l.input_dim for l in _sublayers(op) if isinstance(l, keras.layers.Embedding)]
        if callable(getattr(op, POSITION_METHOD, None)):
            spec, kwargs = _single_tensor_input(op, node, model)
            _check_position_method(op, spec, min(own_sizes or embedding_sizes, default=None))
            plans[id(node)] = ("position", None, kwargs)
            continue
        problem = _block_problem(op)
        if problem is not None:
            raise ValueError(
                f"Layer '{op.name}' ({type(op).__name__}) cannot be streamed: {problem}. "
                f"Received: model '{model.name}'"
            )
        if _sara_sublayers(op):
            spec, kwargs = _single_tensor_input(op, node, model)
            plans[id(node)] = ("block", _probe_block(op, spec, kwargs, min(own_sizes, default=None)), kwargs)
            continue
        reason = _token_local_reason(op, per_token_layers)
        if reason is None:
            continue
        own = [l for l in _sublayers(op, recursive=False) if isinstance(l, keras.layers.Embedding)]
        pair, why = None, None
        if len(own) >= 2 and not isinstance(op, keras.Model):
            spec, kwargs = _single_tensor_input(op, node, model)
            pair, why = _token_and_position_embeddings(op, spec)
        if pair is not None:
            plans[id(node)] = ("position", pair, kwargs)
            continue
        if why is not None:
            reason = (
                f"{why}, so the position of a streamed token is unknown. To stream it, "
                f"define `{POSITION_METHOD}(self, inputs, position)` on it, returning its "
                "output for the one token `inputs` (batch, 1, ...) at index `position` "
                "((batch, 1) int32, counted from 0)"
            )
        raise ValueError(
            f"Layer '{op.name}' ({type(op).__name__}) cannot be streamed: {reason}. "
            f"Received: model '{model.name}'"
        )
    if not any(plan[0] in ("sara", "block") for plan in plans.values()):
        raise ValueError(
            f"`model` must hold at least one causal SARAMultiHeadAttention to stream. "
            f"Received: model '{model.name}' without one"
        )

    model_input = model.inputs[0]
    x_t = keras.Input(shape=(1,) + tuple(model_input.shape[2:]), name=TOKEN_INPUT_NAME,
                      dtype=model_input.dtype)
    used_names = {TOKEN_INPUT_NAME, POSITION_INPUT_NAME}
    state_inputs, attention_names = {}, []  # id(node) -> [psi_1, gamma_1, ...]
    for node in nodes:
        plan = plans.get(id(node))
        if plan is None or plan[0] == "position":
            continue
        attentions = [node.operation] if plan[0] == "sara" else plan[1]
        state_inputs[id(node)] = []
        for layer in attentions:
            psi_shape, gamma_shape = state_shapes(layer)
            psi_name = _unique(f"{layer.name}_psi", used_names)
            gamma_name = _unique(f"{layer.name}_gamma", used_names)
            state_inputs[id(node)] += [
                keras.Input(shape=psi_shape, name=psi_name, dtype="float32"),
                keras.Input(shape=gamma_shape, name=gamma_name, dtype="float32"),
            ]
            attention_names.append(layer.name)
    position_plans = [p for p in plans.values() if p[0] == "position"]
    position = (
        keras.Input(shape=(1,), name=POSITION_INPUT_NAME, dtype="int32") if position_plans else None
    )

    graph = _graph(model)
    tensors = {id(graph.inputs[0]): x_t}
    new_states = []
    for node in nodes:
        op = node.operation
        plan = plans.get(id(node), ("token",))
        args, kwargs = node.arguments.fill_in(tensors)
        if plan[0] == "sara":
            bound = inspect.signature(op.call).bind(*args, **kwargs)
            psi, gamma = state_inputs[id(node)]
            y, psi_new, gamma_new = SARAStep(op)(bound.arguments["query"], psi, gamma)
            outputs = [y]
            new_states += [psi_new, gamma_new]
        elif plan[0] == "block":
            block_step = _BlockStep(op, [id(l) for l in plan[1]], plan[2])
            y, *states = block_step(args[0], state_inputs[id(node)])
            outputs = [y]
            new_states += states
        elif plan[0] == "position":
            outputs = [_PositionStep(op, plan[1])(args[0], position)]
        else:
            kwargs.pop("training", None)
            outputs = keras.tree.flatten(op(*args, **kwargs))
        for out in outputs:
            # None: a layer that does not infer the length (EinsumDense with
            # output_shape=(None, F)); a broadcast constant has a fixed length.
            if len(out.shape) >= 2 and out.shape[1] not in (1, None):
                raise ValueError(
                    f"Layer '{op.name}' ({type(op).__name__}) does not keep one token "
                    f"per step: on a one-token input it gave shape "
                    f"{tuple(out.shape)}. It mixes tokens or broadcasts against a "
                    f"per-position constant. Received: model '{model.name}'"
                )
        for ref, out in zip(node.outputs, outputs):
            tensors[id(ref)] = out

    y_t = tensors[id(graph.outputs[0])]
    inputs = [x_t] + [t for node in nodes for t in state_inputs.get(id(node), [])]
    outputs = [y_t] + new_states
    if position is not None:
        inputs.append(position)
        outputs.append(position + 1)
    step = keras.Model(inputs, outputs, name=name or f"{model.name}_step")
    limits = [p[1][1].input_dim for p in position_plans if p[1] is not None]
    token_sizes = embedding_sizes + [p[1][0].input_dim for p in position_plans if p[1] is not None]
    setattr(step, _STEP_MARKER, attention_names)
    setattr(step, _STEP_INFO, dict(
        position_limit=min(limits, default=None),
        position_layers=[n.operation.name for n in nodes if plans.get(id(n), ("",))[0] == "position"],
        vocab_size=min(token_sizes, default=None) if len(model_input.shape) == 2 else None,
    ))
    return step


def is_step_model(model) -> bool:
    """Whether `model` was made by `make_step_model`."""
    return hasattr(model, _STEP_MARKER)


def initial_state(step_model, batch_size: int = 1) -> list:
    """Zero states (the empty history) for `step_model`, as float32 numpy arrays.

    Returns `[psi_1, gamma_1, ..., psi_L, gamma_L]` in the step model's input
    order, each with `batch_size` rows, and a zero int32 `position` last for
    a step that counts positions.
    """
    if not is_step_model(step_model):
        raise ValueError(
            "`step_model` must come from `make_step_model`. Received: "
            f"{getattr(step_model, 'name', type(step_model).__name__)!r}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an integer >= 1. Received: batch_size={batch_size!r}")
    return [
        np.zeros((int(batch_size),) + tuple(t.shape[1:]), keras.backend.standardize_dtype(t.dtype))
        for t in step_model.inputs[1:]
    ]


def _step_info(step_model) -> dict:
    return getattr(step_model, _STEP_INFO, None) or dict(
        position_limit=None, position_layers=[], vocab_size=None
    )


def _check_tokens(step_model, tokens, name: str = "tokens") -> np.ndarray:
    """`tokens` as an array of the step's token dtype, after checking its shape."""
    spec = step_model.inputs[0]
    token_shape = tuple(spec.shape[2:])
    dtype = keras.backend.standardize_dtype(spec.dtype)
    arr = np.asarray(tokens)
    if arr.ndim != 2 + len(token_shape) or tuple(arr.shape[2:]) != token_shape:
        want = "(batch, tokens) token ids" if not token_shape else (
            f"(batch, tokens, {', '.join(str(d) for d in token_shape)})"
        )
        raise ValueError(f"`{name}` must have shape {want}. Received: {name}.shape={arr.shape}")
    if arr.dtype.kind not in "biuf" or (np.dtype(dtype).kind in "iu" and arr.dtype.kind == "f"):
        raise ValueError(
            f"`{name}` must hold {'integer token ids' if np.dtype(dtype).kind in 'iu' else 'numbers'} "
            f"(the step's x_t is {dtype}). Received: dtype {arr.dtype}"
        )
    return arr.astype(dtype)


def _check_positions(step_model, start: int, length: int, name: str = "tokens") -> None:
    """Refuse tokens that would run past the step's position embedding."""
    info = _step_info(step_model)
    limit = info["position_limit"]
    if limit is not None and start + length > limit:
        raise ValueError(
            f"`{name}` runs past the last position the model can embed: layer(s) "
            f"{info['position_layers']} have a position embedding of input_dim={limit} "
            f"(positions 0 to {limit - 1}). Feed at most {max(limit - start, 0)} more "
            f"token(s) from position {start}, or rebuild the model with a longer "
            f"position embedding. Received: {name}.shape[1]={length} from position {start}"
        )


def stream(step_model, tokens, state: Optional[list] = None):
    """Feed a token sequence through a step model, one token per call.

    Each step runs through `step_model.predict_on_batch`, i.e. compiled
    (a `tf.function` on TensorFlow, `jax.jit` on JAX; eager on PyTorch).

    Args:
        step_model: from `make_step_model`.
        tokens: `(B, T, E)` array, or `(B, T)` integer token ids for a model
            with a token-id input.
        state: states to start from (default `initial_state`).

    Returns:
        `(outputs, state)`: `(B, T, E')` numpy outputs and the final states
        (a list of numpy arrays).

    Raises:
        ValueError: `tokens` of the wrong shape, or (a step that counts
            positions) running past its position embedding.

    Example:

    >>> step = make_step_model(student)            # ids (B, T) -> logits (B, T, V)  # doctest: +SKIP
    >>> logits, state = stream(step, ids[:, :10])  # doctest: +SKIP
    >>> more, state = stream(step, ids[:, 10:], state)  # resumes at position 10  # doctest: +SKIP
    """
    tokens = _check_tokens(step_model, tokens)
    if state is None:
        state = initial_state(step_model, tokens.shape[0])
    names = [t.name for t in step_model.inputs]
    if POSITION_INPUT_NAME in names:
        positions = np.asarray(state[names.index(POSITION_INPUT_NAME) - 1])
        _check_positions(step_model, int(positions.max(initial=0)), tokens.shape[1])
    outputs = []
    for t in range(tokens.shape[1]):
        y_t, *state = step_model.predict_on_batch([tokens[:, t : t + 1], *state])
        outputs.append(y_t)
    return np.concatenate(outputs, axis=1), [np.asarray(s) for s in state]


# ------------------------------------------------------------------ export

# Probe states are taken after these many streamed tokens (0 = the empty history).
DEFAULT_PROBE_STEPS = (0, 1, 7, 31)
STREAMING_QUANTIZE_MODES = (None, "float16", "dynamic")


def _collect_step_batches(step_model, sequences: np.ndarray, at_steps) -> list:
    """`[x_t, *state_before_t]` batches from streaming `sequences` (B, T, E) through the step."""
    state = initial_state(step_model, sequences.shape[0])
    batches = []
    for t in range(max(at_steps) + 1):
        x_t = sequences[:, t : t + 1]
        if t in at_steps:
            batches.append([x_t] + [np.asarray(s) for s in state])
        if t < max(at_steps):
            state = step_model.predict_on_batch([x_t, *state])[1:]
    return batches


def export_streaming_tflite(
    model,
    path,
    quantize: Optional[str] = None,
    probe_tokens=None,
    batch_size: int = 1,
    probe_steps: Sequence[int] = DEFAULT_PROBE_STEPS,
    per_token_layers: Iterable = (),
    **export_kwargs,
):
    """Export a causal SARA model's one-token step as a verified LiteRT file.

    Builds the step with `make_step_model` (or takes a step model as is) and
    exports it with `keras_sara.export.export_tflite` at batch `batch_size`:
    builtin ops only, verified against the Keras step before an atomic write.
    The verification probes are realistic states: token sequences are
    streamed through the Keras step and the (token, state) pairs after
    `probe_steps` tokens are compared. On JAX and PyTorch the model is
    converted in a TensorFlow-backend process and the file is checked
    against this backend's Keras step before it is moved into place.

    The file's `serve` signature (names as in `PolicyRunner.input_names`):

        input_0:                 x_t      (B, 1, E)        float32 (or (B, 1) token ids)
        input_1, input_2:        psi_1    (B, H, M, D), gamma_1 (B, H, M)   float32
        ... two inputs per SARA layer, in the model's execution order
        last input:              position (B, 1)           int32 (models with positions only)
        output_0:                y_t      (B, 1, E')       float32
        output_1, output_2, ...: the new states, in the input order

    A robot control loop with only the LiteRT runtime:

        policy = PolicyRunner("step.tflite")
        state = [np.zeros(s, np.float32) for s in policy.input_shapes[1:]]
        while True:
            y_t, *state = policy(x_t, *state)

    Args:
        model: a causal SARA model (see `make_step_model`), or a step model
            (TensorFlow backend only).
        path: the `.tflite` file to write.
        quantize: None (float32), "float16" or "dynamic" (int8 weights):
            both keep the state and its arithmetic in float32. "int8" is
            refused: it would quantise the state and the normaliser, whose
            range grows with the history, and LiteRT's integer DIV fails
            outright when a normaliser rounds to zero (measured on this stack).
        probe_tokens: token sequences `(N, T, E)` (or `(N, T)` token ids)
            with `N >= batch_size` and `T > max(probe_steps)`, streamed to
            make the verification probes (use realistic, held-out inputs).
            Default: random normal (random ids below the token embedding's
            `input_dim` for a token-id model).
        batch_size: the exported batch size.
        probe_steps: history lengths at which probes are taken. The default
            is cut to the positions a position embedding has (its last one
            included); given steps past it are refused.
        per_token_layers: as in `make_step_model`.
        **export_kwargs: passed on to `export_tflite` (`tolerance`,
            `num_threads`, `benchmark_runs`, `verify`, `builtins_only`).

    Returns:
        The `ExportReport` of the step file.

    Raises:
        ValueError: a bad argument or a model that cannot be streamed
            (nothing is written).
        RuntimeError: the file does not match the Keras step (nothing is
            written).
    """
    for key in ("input_shapes", "probe", "representative_data", "int8_io"):
        if key in export_kwargs:
            raise ValueError(
                f"`{key}` is set by export_streaming_tflite (the step's shapes and probes; "
                f"no int8). Received: {key}={export_kwargs[key]!r}"
            )
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an integer >= 1. Received: batch_size={batch_size!r}")
    if (
        isinstance(probe_steps, (str, bytes))
        or not isinstance(probe_steps, Sequence)
        or not probe_steps
        or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in probe_steps)
    ):
        raise ValueError(
            "`probe_steps` must be a non-empty sequence of integers >= 0 (history lengths). "
            f"Received: probe_steps={probe_steps!r}"
        )
    quantize = export_lib._check_quantize(quantize)
    if quantize not in STREAMING_QUANTIZE_MODES:
        raise ValueError(
            f"`quantize` must be one of {STREAMING_QUANTIZE_MODES} for a streaming step. "
            "Full int8 would quantise the recurrent state and the attention normaliser, "
            "whose ranges grow with the history; LiteRT's integer DIV then fails when a "
            "normaliser rounds to zero. Use 'dynamic' (int8 weights, float32 state). "
            f"Received: quantize={quantize!r}"
        )
    other_backend = keras.backend.backend() != "tensorflow"
    if other_backend and is_step_model(model):
        raise ValueError(
            "On the JAX and PyTorch backends, pass the causal model itself, not its step "
            "model: it is saved to .keras and its step is rebuilt and converted in a "
            f"TensorFlow-backend process. Received: step model '{model.name}'"
        )
    path = export_lib._check_path(path)
    step = model if is_step_model(model) else make_step_model(model, per_token_layers)
    token_shape = tuple(step.inputs[0].shape[2:])  # () for token ids
    info = _step_info(step)
    batch_size = int(batch_size)
    shapes = [(batch_size,) + tuple(t.shape[1:]) for t in step.inputs]

    steps = sorted({int(s) for s in probe_steps})
    limit = info["position_limit"]
    if limit is not None and steps[-1] >= limit:
        if tuple(probe_steps) != DEFAULT_PROBE_STEPS:
            raise ValueError(
                f"`probe_steps` must be below the model's position limit: layer(s) "
                f"{info['position_layers']} embed positions 0 to {limit - 1} "
                f"(input_dim={limit}). Received: probe_steps={probe_steps!r}"
            )
        steps = sorted({s for s in steps if s < limit} | {limit - 1})
    if probe_tokens is None:
        rng = np.random.default_rng(0)
        if token_shape:
            probe_tokens = rng.standard_normal((batch_size, steps[-1] + 1) + token_shape)
        elif info["vocab_size"] is not None:
            probe_tokens = rng.integers(0, info["vocab_size"], (batch_size, steps[-1] + 1))
        else:
            raise ValueError(
                "`probe_tokens` must be given for this model: it takes token ids, and no "
                "Embedding tells the vocabulary size to draw probe ids from. Pass held-out "
                "sequences of token ids, shape (N, T). Received: probe_tokens=None"
            )
    arr = np.asarray(probe_tokens)
    dims = ", ".join(str(d) for d in token_shape)
    if (
        arr.dtype.kind not in "biuf" or arr.ndim != 2 + len(token_shape)
        or tuple(arr.shape[2:]) != token_shape or arr.shape[0] < batch_size
        or arr.shape[1] <= steps[-1]
    ):
        raise ValueError(
            f"`probe_tokens` must be token sequences of shape (N, T{', ' + dims if dims else ''}) "
            f"with N >= batch_size ({batch_size}) and T > max(probe_steps) ({steps[-1]}). "
            f"Received: probe_tokens of shape {arr.shape}, dtype {arr.dtype}"
        )
    arr = _check_tokens(step, arr, "probe_tokens")
    probes = []
    for start in range(0, arr.shape[0] - batch_size + 1, batch_size):
        probes += _collect_step_batches(step, arr[start : start + batch_size], set(steps))
    if other_backend:
        return _export_in_subprocess(
            model, step, path, quantize, shapes, probes, tuple(per_token_layers), export_kwargs
        )
    return export_lib.export_tflite(
        step, path, quantize=quantize, input_shapes=shapes, probe=probes, **export_kwargs
    )


# ------------------------------------------- other backends: a subprocess


def _class_path(cls) -> str:
    if cls.__module__ == "__main__":
        raise ValueError(
            f"`per_token_layers` class {cls.__name__} is defined in the __main__ script, "
            "which the TensorFlow-backend export process cannot import: move it to a "
            f"module. Received: {cls!r}"
        )
    return f"{cls.__module__}:{cls.__qualname__}"


def _load_class(path: str):
    module, qualname = path.split(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _export_in_subprocess(model, step, path, quantize, shapes, probes, per_token_layers, export_kwargs):
    """Convert in a TensorFlow-backend process, then verify here against this backend's step.

    The worker rebuilds the step from the saved `.keras` model, converts and
    verifies it (against TensorFlow Keras) and writes a temporary file beside
    `path`; this process then compares that file with its own Keras step on
    the same probes and moves it into place only if it passes.
    """
    modules = export_lib._custom_layer_modules(model)
    classes = [_class_path(c) for c in per_token_layers]
    verify = export_kwargs.get("verify", True)
    references = [[np.asarray(y) for y in step.predict_on_batch(b)] for b in probes] if verify else []
    tmp = temporary_name(path)  # a kill before the move leaves it to the next write's cleanup
    with work_directory("keras_sara_streaming_") as work:
        model.save(os.path.join(work, "model.keras"))
        store = {}
        export_lib._save_batches(store, "probe", probes)
        np.savez(os.path.join(work, "data.npz"), **store)
        job = dict(
            model_path=os.path.join(work, "model.keras"),
            path=tmp,
            quantize=quantize,
            input_shapes=[list(s) for s in shapes],
            per_token_layers=classes,
            modules=modules,
            export_kwargs=export_kwargs,
            sys_path=[os.path.abspath(p) for p in sys.path if p and os.path.isdir(p)],
        )
        try:
            with open(os.path.join(work, "job.json"), "w") as f:
                json.dump(job, f)
        except TypeError as err:
            raise ValueError(
                "Export arguments must be plain values (numbers, strings, booleans) to reach "
                f"the TensorFlow-backend export process. Received: {export_kwargs!r}"
            ) from err
        proc = export_lib.run_tensorflow_worker("keras_sara.streaming", work)
        result_path = os.path.join(work, "result.json")
        if not os.path.exists(result_path):
            tail = (proc.stderr or proc.stdout or "")[-3000:]
            raise RuntimeError(
                f"The TensorFlow-backend streaming export process failed (exit code "
                f"{proc.returncode}); nothing was written to {path!r}. Its output ended with:\n{tail}"
            )
        with open(result_path) as f:
            result = json.load(f)
    if not result["ok"]:
        raise {"ValueError": ValueError}.get(result["type"], RuntimeError)(result["message"])
    report = export_lib.ExportReport.from_dict(result["report"])
    try:
        if verify:
            with open(tmp, "rb") as f:
                runner = export_lib._Runner(f.read(), report.num_threads)
            errors = export_lib._compare(runner, probes, references)
            if not errors["relative_error"] <= report.tolerance:  # NaN fails too
                raise RuntimeError(
                    f"The LiteRT step does not match the {keras.backend.backend()} Keras step: "
                    f"relative error {errors['relative_error']:.3e} > tolerance "
                    f"{report.tolerance:.1e} (max abs error {errors['max_abs_error']:.3e}). "
                    f"Nothing was written to {path!r}."
                )
            report = dataclasses.replace(report, **errors)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dataclasses.replace(report, path=path, source_backend=keras.backend.backend())


def _worker_main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of the TensorFlow-backend streaming export process (private)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    work = argv[0]
    try:
        with open(os.path.join(work, "job.json")) as f:
            job = json.load(f)
        for p in job["sys_path"]:
            if p not in sys.path:
                sys.path.append(p)
        importlib.import_module("keras_sara")  # registers SARA layers for loading
        for module in job["modules"]:
            importlib.import_module(module)
        classes = [_load_class(c) for c in job["per_token_layers"]]
        model = keras.saving.load_model(job["model_path"], compile=False)
        data = np.load(os.path.join(work, "data.npz"))
        step = make_step_model(model, classes)
        with contextlib.redirect_stdout(io.StringIO()):
            report = export_lib.export_tflite(
                step,
                job["path"],
                quantize=job["quantize"],
                input_shapes=[tuple(s) for s in job["input_shapes"]],
                probe=export_lib._load_batches(data, "probe"),
                **job["export_kwargs"],
            )
        result = {"ok": True, "report": report.to_dict()}
    except Exception as err:  # reported to the parent, which re-raises it
        result = {"ok": False, "type": type(err).__name__, "message": str(err)}
    with open(os.path.join(work, "result.json"), "w") as f:
        json.dump(result, f)


__all__ = [
    "SARAStep",
    "STREAMABLE_FEATURE_MAPS",
    "export_streaming_tflite",
    "initial_state",
    "is_step_model",
    "make_step_model",
    "sara_attention_step",
    "state_shapes",
    "stream",
]
