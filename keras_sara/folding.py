"""Fold LayerNormalization's scale and shift into the projections that read it.

A pre-LayerNorm Transformer computes `Dense(LN(x))` and `attention(LN(x))`.
LayerNorm is `gamma * n + beta` with `n` the normalised input, and every
projection that reads it is linear over the last axis, so

    W^T (gamma * n + beta) + b  =  (diag(gamma) W)^T n + (W^T beta + b).

`fold_layernorm(model)` returns a copy of a Functional (or Sequential) model
in which each LayerNorm whose every reader is such a projection computes `n`
only (`center=False, scale=False`) and its readers carry `gamma` and `beta` in
their kernels and biases. The outputs are the same up to float32 rounding.

Why: on LiteRT a LayerNorm with scale and shift over a `(tokens, width)`
tensor costs five full-size elementwise passes besides its two reductions;
without them, two. In an int8 file those passes stay in float32 (their int8
kernels are slower here) and are the largest cost after the int8 matmuls, so
`keras_sara.export.export_tflite` folds by default (`fold_layernorm=True`).
It is an inference rewrite: train the original model, export the folded copy.

What is folded: a `keras.layers.LayerNormalization` node of the model's own
graph (not inside a custom layer or a nested model) that normalises the last
axis in float32 and whose output goes only to

- `keras.layers.Dense` layers, and
- `keras.layers.MultiHeadAttention` layers (`SARAMultiHeadAttention`
  included) as query, key or value: the matching projection takes the fold,

each called once in the model and neither quantised nor LoRA-enabled. A shift
needs a bias to go to: with a nonzero `beta` every reading projection must
have one. Anything else (a LayerNorm feeding a residual add, as in
post-LayerNorm blocks, or a model output) is left as it is and listed, with
the reason, in the returned report.

Example:

>>> import keras
>>> from keras_sara.folding import fold_layernorm
>>> inputs = keras.Input((16, 8))
>>> h = keras.layers.LayerNormalization()(inputs)
>>> model = keras.Model(inputs, keras.layers.Dense(4)(h))
>>> folded, report = fold_layernorm(model)
>>> report.folded
['layer_normalization']
"""

from __future__ import annotations

import dataclasses
import inspect

import keras
import numpy as np

from keras.src.models.functional import Functional

__all__ = ["FoldReport", "fold_layernorm"]


@dataclasses.dataclass
class FoldReport:
    """What `fold_layernorm` did.

    Attributes:
        folded: names of the LayerNormalization layers now computing the
            plain normalisation (their scale and shift moved downstream).
        skipped: `{name: reason}` for each LayerNormalization left as it was.
    """

    folded: list
    skipped: dict


def _graph(model):
    """The Functional graph of `model` (a Sequential model's inner one)."""
    if isinstance(model, Functional):
        return model
    inner = getattr(model, "_functional", None)
    if isinstance(model, keras.Sequential) and isinstance(inner, Functional):
        return inner
    return None


def _nodes(graph) -> list:
    return [n for nodes in graph._nodes_by_depth.values() for n in nodes
            if n.operation is not None and not n.is_input]


def _is_last_axis(layer, rank: int) -> bool:
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return len(axes) == 1 and axes[0] in (-1, rank - 1)


def _mha_roles(layer, node, tensor) -> list:
    """Which of an attention layer's projections read `tensor`, or None if
    the tensor is also passed as anything but query, key or value."""
    bound = inspect.signature(layer.call).bind(*node.arguments.args, **node.arguments.kwargs)
    roles = []
    for name, value in bound.arguments.items():
        for t in keras.tree.flatten(value):
            if t is tensor:
                if name not in ("query", "value", "key"):
                    return None
                roles.append(name)
    key_given = bound.arguments.get("key") is not None
    projections = []
    if "query" in roles:
        projections.append("_query_dense")
    if "value" in roles:
        projections.append("_value_dense")
        if not key_given:  # key defaults to value
            projections.append("_key_dense")
    if "key" in roles:
        projections.append("_key_dense")
    return projections


def _projection_ok(proj) -> str:
    """'' when `proj` (a Dense or an attention projection) can take a fold."""
    if getattr(proj, "quantization_mode", None):
        return f"'{proj.name}' is quantised"
    if getattr(proj, "lora_enabled", False):
        return f"'{proj.name}' has LoRA enabled"
    if proj.kernel.dtype != "float32":
        return f"'{proj.name}' has {proj.kernel.dtype} weights"
    return ""


def _why_not(node, nodes, count, output_ids):
    """`(readers, reason)` for the LayerNorm `node`: its readers as
    `(layer, projection, projection attribute or None)`, and '' when it can
    be folded, else why not."""
    ln, out = node.operation, node.outputs[0]
    if count[id(ln)] != 1:
        return [], "the layer is called more than once"
    if ln.rms_scaling or not (ln.center or ln.scale):
        return [], "no scale or shift to fold (rms_scaling, or center=False and scale=False)"
    if not _is_last_axis(ln, len(out.shape)):
        return [], f"it normalises axis {ln.axis}, not the last one"
    if ln.compute_dtype != "float32" or ln.variable_dtype != "float32":
        return [], f"it computes in {ln.compute_dtype} (only float32 is folded)"
    if id(out) in output_ids:
        return [], "its output is a model output"
    readers = []
    for other in nodes:
        if not any(t is out for t in other.input_tensors):
            continue
        op = other.operation
        if count[id(op)] != 1:
            return [], f"its reader '{op.name}' is called more than once"
        if isinstance(op, keras.layers.MultiHeadAttention):
            roles = _mha_roles(op, other, out)
            if roles is None:
                return [], f"it is passed to '{op.name}' as a mask or other non-projected input"
            readers += [(op, getattr(op, r), r) for r in roles]
        elif isinstance(op, keras.layers.Dense):
            readers.append((op, op, None))
        else:
            return [], f"it is read by '{op.name}' ({type(op).__name__}), which is not a projection"
    if not readers:
        return [], "nothing reads it"
    beta_nonzero = ln.center and np.any(keras.ops.convert_to_numpy(ln.beta) != 0)
    for _, proj, _ in readers:
        reason = _projection_ok(proj)
        if not reason and beta_nonzero and proj.bias is None:
            reason = f"its shift is nonzero and '{proj.name}' has no bias to take it"
        if reason:
            return [], reason
    return readers, ""


def _plan(graph):
    """`{ln name: [(reader name, projection attribute or None)]}` and
    `{ln name: reason}` for the LayerNorms of `graph` left as they are."""
    nodes = _nodes(graph)
    count = {}
    for n in nodes:
        count[id(n.operation)] = count.get(id(n.operation), 0) + 1
    output_ids = {id(t) for t in graph.outputs}
    plan, skipped = {}, {}
    for node in nodes:
        if isinstance(node.operation, keras.layers.LayerNormalization):
            readers, reason = _why_not(node, nodes, count, output_ids)
            if reason:
                skipped[node.operation.name] = reason
            else:
                plan[node.operation.name] = [(op.name, attr) for op, _, attr in readers]
    return plan, skipped


def fold_layernorm(model):
    """A copy of `model` with LayerNorm scale and shift folded downstream.

    Args:
        model: a built Functional or Sequential `keras.Model`. Other models
            (subclassed) are returned as they are, with nothing folded.

    Returns:
        `(folded_model, FoldReport)`. Layers that take no part in a fold are
        shared with `model` (same objects and weights, called once more on
        the copy's inputs); the LayerNorms and the layers that read them are
        new. The weights and graph of `model` are not modified. When nothing
        can be folded, `folded_model` is `model` itself.

    Raises:
        ValueError: `model` is not a built `keras.Model`.

    Example:

    >>> folded, report = fold_layernorm(policy)          # doctest: +SKIP
    >>> report.folded, report.skipped                    # doctest: +SKIP
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"`model` must be a keras.Model. Received: model of type {type(model).__name__}"
        )
    if not model.built:
        raise ValueError(
            f"`model` must be built before folding. Received: model '{model.name}' with built=False"
        )
    graph = _graph(model)
    plan, skipped = _plan(graph) if graph is not None else ({}, {})
    if not plan:
        return model, FoldReport(folded=[], skipped=skipped)
    readers = {name for entries in plan.values() for name, _ in entries}

    def clone(op):
        if op.name in plan:
            return keras.layers.LayerNormalization(
                axis=op.axis, epsilon=op.epsilon, center=False, scale=False,
                dtype=op.dtype_policy, name=op.name,
            )
        if op.name in readers:
            return op.__class__.from_config(op.get_config())
        return op

    folded = keras.models.clone_model(graph, clone_function=clone)
    for name in readers:
        folded.get_layer(name).set_weights(graph.get_layer(name).get_weights())
    for ln_name, entries in plan.items():
        ln = graph.get_layer(ln_name)
        gamma = keras.ops.convert_to_numpy(ln.gamma) if ln.scale else None
        beta = keras.ops.convert_to_numpy(ln.beta) if ln.center else None
        for reader_name, attr in entries:
            reader = folded.get_layer(reader_name)
            _fold_into(reader if attr is None else getattr(reader, attr), gamma, beta)
    return folded, FoldReport(folded=sorted(plan), skipped=skipped)


def _fold_into(proj, gamma, beta) -> None:
    """W <- diag(gamma) W and b <- b + beta W, W's first axis the input's last."""
    kernel = keras.ops.convert_to_numpy(proj.kernel).astype(np.float64)
    if beta is not None and proj.bias is not None:
        shift = np.tensordot(beta.astype(np.float64), kernel, axes=([0], [0]))
        bias = keras.ops.convert_to_numpy(proj.bias).astype(np.float64)
        proj.bias.assign((bias + shift.reshape(bias.shape)).astype("float32"))
    if gamma is not None:
        scale = gamma.astype(np.float64).reshape((-1,) + (1,) * (kernel.ndim - 1))
        proj.kernel.assign((kernel * scale).astype("float32"))

