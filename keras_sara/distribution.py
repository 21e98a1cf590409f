"""Sharding layouts for SARA models on `keras.distribution` (JAX backend).

`keras.distribution.DataParallel` needs nothing from this module: it
replicates every weight and splits the batch, and `UpTraining` runs under it
unchanged. For models whose attention and MLP weights should be split over
devices (tensor parallelism), `sara_layout_map` writes the
`keras.distribution.LayoutMap` that `keras.distribution.ModelParallel`
takes, and `model_parallel` builds mesh, map and distribution in one call.

The layout follows the usual Megatron split of a Transformer block:

- query, key, value (and gate) kernels, `(width, heads, key_dim)`: sharded
  on the heads axis, so each device computes whole heads;
- attention output kernel, `(heads, value_dim, width...)`: sharded on heads;
- per-head feature-map kernels (`"hedgehog"`, `"sara"`),
  `(heads, key_dim, key_dim)`: sharded on heads, beside their heads;
- `keras.layers.Dense` kernels `(..., units)`: sharded on the output axis;
- everything else (biases, norms, the blend state, FAVOR+'s shared
  projection, embeddings): replicated.

The model-axis size must divide `num_heads` of every attention layer. A
variable that is sharded on no axis is replicated, so the map may be given
to a model that has only some of these layers.
"""

from __future__ import annotations

from typing import Any, Sequence

import keras

__all__ = ["layout_of", "model_parallel", "sara_layout_map"]

# Sublayer names that keras.layers.MultiHeadAttention gives its projections
# (fixed in Keras; SARAMultiHeadAttention inherits them).
_HEAD_PROJECTIONS = ("query", "key", "value", "gate")
_OUTPUT_PROJECTION = "attention_output"
# Per-head feature-map weights: `<role>_kernel` of shape (heads, d, d).
_FEATURE_MAP_KERNELS = ("query_kernel", "key_kernel")
_DEFAULT_FEATURE_MAP_NAMES = ("hedgehog", "sara_feature_map")


def _check_mesh(device_mesh, model_axis):
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise ValueError(
            "`device_mesh` must be a keras.distribution.DeviceMesh, for example "
            "`keras.distribution.DeviceMesh((2, 4), ('batch', 'model'), "
            f"keras.distribution.list_devices())`. Received: device_mesh={device_mesh!r}"
        )
    if not isinstance(model_axis, str) or model_axis not in device_mesh.axis_names:
        raise ValueError(
            f"`model_axis` must name an axis of `device_mesh` (axis_names="
            f"{tuple(device_mesh.axis_names)}). Received: model_axis={model_axis!r}"
        )
    return int(device_mesh.shape[list(device_mesh.axis_names).index(model_axis)])


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False. Received: {name}={value!r}")
    return value


def sara_layout_map(
    device_mesh: Any,
    model_axis: str = "model",
    model: Any = None,
    *,
    dense: bool = True,
) -> Any:
    """A `keras.distribution.LayoutMap` that shards attention and MLP weights.

    Query, key, value (and gate) kernels `(width, heads, key_dim)` and the
    attention output kernel `(heads, value_dim, width)` of every
    `SARAMultiHeadAttention` and `keras.layers.MultiHeadAttention` are
    sharded on the heads axis over `model_axis`; so are per-head feature-map
    kernels. With `dense=True`, `keras.layers.Dense` kernels are sharded on
    their output axis. Biases, norms, the up-training blend state and all
    other variables are replicated. Pass the result to
    `keras.distribution.ModelParallel(layout_map=..., batch_dim_name=...)`.

    Two ways to find the variables:

    - `model=None`: regular-expression keys on the fixed sublayer names of
      Keras attention (`.../query/kernel`, `.../attention_output/kernel`),
      on the default feature-map names, and on Keras' default Dense names
      (`dense`, `dense_3`, ...). Usable before any model exists; a Dense
      layer with a custom name is then replicated.
    - `model` (built): exact keys for the paths of that model's variables,
      whatever the layers are called, with the shapes checked: a Dense
      layer whose output size the model axis does not divide (a 3-way
      classifier head on 4 devices) is replicated. `keras_sara.convert`
      keeps variable paths, so the map made from a softmax teacher fits its
      converted student: build the teacher, make the map, then convert (and
      compile) under `ModelParallel(...).scope()`.

    Variables take their layout when they are created, so the model that
    the distribution should shard must be created under it.

    Args:
        device_mesh: a `keras.distribution.DeviceMesh` with an axis named
            `model_axis`.
        model_axis: name of the mesh axis the weights are split over.
        model: None, or a built Keras model (or layer) to read variable
            paths and shapes from.
        dense: also shard `keras.layers.Dense` kernels (MLP blocks).

    Returns:
        A `keras.distribution.LayoutMap` on `device_mesh`.

    Example:

    >>> mesh = keras.distribution.DeviceMesh(                     # doctest: +SKIP
    ...     (2, 4), ("batch", "model"), keras.distribution.list_devices())
    >>> layout_map = keras_sara.distribution.sara_layout_map(mesh, model=teacher)
    >>> parallel = keras.distribution.ModelParallel(
    ...     layout_map=layout_map, batch_dim_name="batch")
    >>> with parallel.scope():                                      # doctest: +SKIP
    ...     student, _ = keras_sara.convert(teacher, blend=0.0)
    ...     student.compile(keras.optimizers.AdamW(3e-4), "mse")
    ...     student.fit(x, y, callbacks=[keras_sara.callbacks.UpTraining(
    ...         schedule="linear", blend_steps=500, distillation_weight=1.0)])
    """
    size = _check_mesh(device_mesh, model_axis)
    _check_bool("dense", dense)
    layout_map = keras.distribution.LayoutMap(device_mesh)
    if model is None:
        _regex_layouts(layout_map, model_axis, dense)
    else:
        _model_layouts(layout_map, model, model_axis, size, dense)
    return layout_map


def _regex_layouts(layout_map, axis, dense):
    # LayoutMap keys are full-match regexes and a path may match only one.
    projections = "|".join(_HEAD_PROJECTIONS)
    layout_map[rf".*/({projections})/kernel"] = (None, axis, None)  # (E, H, K)
    layout_map[rf".*/{_OUTPUT_PROJECTION}/kernel"] = (axis, None, None)  # (H, V, E)
    maps = "|".join(_DEFAULT_FEATURE_MAP_NAMES)
    kernels = "|".join(_FEATURE_MAP_KERNELS)
    layout_map[rf".*/({maps})/({kernels})"] = (axis, None, None)  # (H, K, K)
    if dense:
        # Keras names unnamed Dense layers `dense`, `dense_1`, ...
        layout_map[r"(.*/)?dense(_\d+)?/kernel"] = (None, axis)  # (in, out)


def _sharded(rank, index, axis):
    axes = [None] * rank
    axes[index] = axis
    return tuple(axes)


def _model_layouts(layout_map, model, axis, size, dense):
    if not isinstance(model, keras.layers.Layer):
        raise ValueError(
            "`model` must be None or a built Keras model or layer. "
            f"Received: model={type(model).__name__}"
        )
    if not model.built:
        raise ValueError(
            f"`model` must be built (call it once, or give it an Input) so that its "
            f"variable paths exist. Received: model '{model.name}' with built=False"
        )
    for layer in _walk(model):
        if isinstance(layer, keras.layers.MultiHeadAttention):
            heads = int(layer.num_heads)
            if heads % size:
                raise ValueError(
                    f"The '{axis}' axis of `device_mesh` has {size} devices, which must "
                    f"divide the number of heads of every attention layer; layer "
                    f"'{layer.name}' has num_heads={heads}. Use a mesh whose '{axis}' "
                    f"size divides {heads}. Received: model_axis={axis!r} of size {size}"
                )
            for name in _HEAD_PROJECTIONS:
                sub = getattr(layer, f"_{name}_dense", None)
                if sub is not None and sub.built:
                    layout_map[sub.kernel.path] = _sharded(len(sub.kernel.shape), -2, axis)
            out = layer._output_dense
            layout_map[out.kernel.path] = _sharded(len(out.kernel.shape), 0, axis)
            for variable in getattr(getattr(layer, "feature_map", None), "weights", ()):
                leaf = variable.path.rsplit("/", 1)[-1]
                if leaf in _FEATURE_MAP_KERNELS and variable.shape and variable.shape[0] == heads:
                    layout_map[variable.path] = _sharded(len(variable.shape), 0, axis)
        elif dense and isinstance(layer, keras.layers.Dense):
            kernel = getattr(layer, "kernel", None)
            # JAX cannot place a ragged split: such a kernel stays replicated.
            if kernel is not None and kernel.shape[-1] % size == 0:
                layout_map[kernel.path] = _sharded(len(kernel.shape), -1, axis)


def _walk(layer):
    """Every layer under `layer` (itself included), each once, parents first."""
    seen, stack, order = set(), [layer], []
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        order.append(current)
        stack.extend(reversed(list(current._flatten_layers(include_self=False, recursive=False))))
    return order


def model_parallel(
    model_size: int,
    *,
    model: Any = None,
    devices: Sequence[Any] | None = None,
    batch_axis: str = "batch",
    model_axis: str = "model",
    dense: bool = True,
) -> Any:
    """A `keras.distribution.ModelParallel` with `sara_layout_map` on a 2-D mesh.

    The devices form a `(len(devices) // model_size, model_size)` mesh with
    axes `(batch_axis, model_axis)`: weights are split `model_size` ways as
    `sara_layout_map` says, and each batch is split over the other axis.

    Args:
        model_size: devices per model replica (size of the model axis); must
            divide the number of devices.
        model: None, or a built model to read variable paths from (see
            `sara_layout_map`).
        devices: device strings (`"cpu:0"`, `"gpu:3"`); None for every device
            of `keras.distribution.list_devices()`, every host's included.
        batch_axis, model_axis: mesh axis names.
        dense: also shard `keras.layers.Dense` kernels.

    Returns:
        A `keras.distribution.ModelParallel`; use it with
        `keras.distribution.set_distribution(...)` or `with dist.scope():`.

    Example:

    >>> dist = keras_sara.distribution.model_parallel(4, model=teacher)  # doctest: +SKIP
    >>> with dist.scope():                                             # doctest: +SKIP
    ...     student, _ = keras_sara.convert(teacher, blend=0.0)
    """
    devices = list(keras.distribution.list_devices() if devices is None else devices)
    if isinstance(model_size, bool) or not isinstance(model_size, int) or model_size < 1:
        raise ValueError(f"`model_size` must be an integer >= 1. Received: model_size={model_size!r}")
    if not devices or len(devices) % model_size:
        raise ValueError(
            f"`model_size` must divide the number of devices ({len(devices)}). "
            f"Received: model_size={model_size}"
        )
    if batch_axis == model_axis:
        raise ValueError(
            "`batch_axis` and `model_axis` must differ. "
            f"Received: batch_axis={batch_axis!r}, model_axis={model_axis!r}"
        )
    mesh = keras.distribution.DeviceMesh(
        (len(devices) // model_size, model_size), (batch_axis, model_axis), devices
    )
    layout_map = sara_layout_map(mesh, model_axis, model, dense=dense)
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name=batch_axis)


def layout_of(variable) -> tuple | None:
    """Mesh axis names per dimension of a (JAX) variable's sharding, or None.

    A debugging aid: `layout_of(v)` is `(None, "model", None)` for a query
    kernel sharded by `sara_layout_map`, all None for a replicated one, and
    None where the backend keeps no sharding (TensorFlow, PyTorch).
    """
    value = getattr(variable, "value", variable)
    spec = getattr(getattr(value, "sharding", None), "spec", None)
    if spec is None:
        return None
    axes = tuple(spec) + (None,) * (len(value.shape) - len(tuple(spec)))
    return tuple(a if a is None or isinstance(a, str) else tuple(a) for a in axes)
