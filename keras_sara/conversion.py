"""Model surgery: turn the softmax attention of a trained Keras model into SARA.

Two entry points:

- `clone_function` / `make_clone_function(...)`, for
  `keras.models.clone_model(model, clone_function=...)`: every
  `keras.layers.MultiHeadAttention` (subclasses included) becomes a
  `SARAMultiHeadAttention`; other layers are cloned as Keras clones them.
  Like every `clone_model` call it copies no weights; with a parameter-free
  feature map (`"relu"`, `"elu+1"`) and `blend=1` the variables are the same,
  in the same order, so one line copies them:
  `student.set_weights(teacher.get_weights())`.
- `convert(model, ...)`: one call that also reaches attention held inside
  custom layers (RT-1's and keras-hub's pattern) and inside subclassed models,
  copies every weight, leaves the original untouched, and returns a
  `ConversionReport` (what changed, parameter counts, how far the outputs
  moved on a probe batch before any up-training).

How a converted model stays converted through `model.save` / `load_model`
-------------------------------------------------------------------------

A Functional or Sequential model is rebuilt from the configs of its layers,
so there the SARA layer is simply a node of a new graph (made with
`keras.models.clone_model`). A custom layer or a subclassed model is rebuilt
by its own `__init__`, which creates a plain `MultiHeadAttention` again: an
in-place swap alone would silently revert on reload. So the layer that Keras
deserialises from its config (the top of such a subtree) gets, after the
swap, a class created here: a dynamic subclass of the user's class that

1. adds a `"sara_conversion"` entry to `get_config()`: the base class's
   identity (module, class name, registered name) and, for each swapped
   attention, where it lives (child-layer positions, then the attribute,
   list item or dict key that holds it) and the SARA layer's config;
2. in `from_config`, pops that entry, lets the base class construct itself
   as usual, then puts SARA layers back at the same places: the layer
   tracker's entry is replaced in place (weight order and saved-weight paths
   are unchanged), and a layer that was built is rebuilt under the same name
   scope, so variable paths stay those of the teacher. Attention that the
   holder creates in its `build` (keras-hub's `TransformerEncoder` does) is
   swapped right after that build, before any weight is loaded.

Every dynamic class serialises under the one registered name
`"keras_sara>SARAConverted"`, which `import keras_sara` maps to a resolver
that reads the base class from the config and recreates the subclass, so a
fresh process needs no `custom_objects` beyond what the base model needed.
The saved configs do not depend on the backend.

Not converted, and reported as skipped with the reason: attention that is a
node of a Functional graph which a custom `__init__` builds (a Functional
subclass with its own `get_config`; convert
`keras.Model(model.inputs, model.outputs)` instead), and attention that no
attribute, list or dict of its holder refers to.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import warnings
from typing import Any, Callable, Sequence

import keras
import numpy as np
from keras.src.models.functional import Functional  # no public alias
from keras.src.models.sequential import Sequential

from keras_sara import adapters as adapters_lib
from keras_sara import decoding
from keras_sara import feature_maps as fm_lib
from keras_sara.adapters import AdaptedAttention
from keras_sara.layers.sara_state import SARALayer
from keras_sara.layers.sara_multi_head_attention import SARAMultiHeadAttention
from keras_sara.utils import full_float32_matmuls

__all__ = [
    "ConversionReport",
    "ConvertedLayer",
    "SkippedLayer",
    "clone_function",
    "check_probe",
    "convert",
    "finalize",
    "make_clone_function",
    "REGISTERED_NAME",
]

#: The name every converted custom layer or model serialises under.
REGISTERED_NAME = "keras_sara>SARAConverted"
_CONFIG_KEY = "sara_conversion"
_ADAPT_KEY = "sara_adapt"  # a swap record of an attention adapted in place: its SARA options
_SARA_KWARGS = ("eps", "causal_schedule", "chunk_size", "blend")
# Base-class modules that may be imported while loading (as Keras allows).
_IMPORTABLE_PACKAGES = ("keras", "keras_hub", "keras_cv", "keras_nlp", "keras_sara")
# Layer internals that hold sublayers but are not the user's attributes.
_INTERNAL_ATTRS = frozenset(
    {
        "_layers", "_tracker", "_modules", "_torch_params", "_operations",
        "_inbound_nodes", "_outbound_nodes", "_nodes", "_nodes_by_depth",
        "_operations_by_depth", "_inputs_struct", "_outputs_struct",
        "_sara_swaps", "_sara_after_build", "_build_shapes_dict",
        # TensorFlow's trackable bookkeeping (TF backend only)
        "_self_unconditional_checkpoint_dependencies", "_self_unconditional_dependency_names",
        "_self_unconditional_deferred_dependencies", "_self_saveable_object_factories",
        "_self_name_based_restores", "_self_extra_variables",
    }
)
_MHA = keras.layers.MultiHeadAttention
_MHA_PROJECTIONS = ("_query_dense", "_key_dense", "_value_dense", "_output_dense", "_gate_dense")


# --------------------------------------------------------------------- report


@dataclasses.dataclass
class ConvertedLayer:
    """One attention layer that `convert` replaced."""

    path: str
    before: str
    after: str
    feature_map: str
    note: str = ""


@dataclasses.dataclass
class SkippedLayer:
    """One attention layer that `convert` left as it was, and why."""

    path: str
    class_name: str
    reason: str


@dataclasses.dataclass
class ConversionReport:
    """What `convert` changed, and how far the outputs moved.

    Attributes:
        model_name: name of the converted model.
        converted: list of `ConvertedLayer` (path, class before and after,
            feature map).
        skipped: list of `SkippedLayer` (path, class, reason).
        params_before, params_after: parameter counts (all weights).
        max_abs_error, relative_error: on the probe batch, before any
            up-training: `max |student - teacher|` and
            `||student - teacher|| / ||teacher||` over all outputs. None when
            not measured (`verify=False`, or no probe could be built).
        probe_shapes: shapes of the probe inputs used.
        quadratic_layers: paths of the SARA layers that the probe batch
            called with a dense `attention_mask` (or `sliding_window`), so
            they ran the exact but quadratic (T, S) kernel-matrix path.
        notes: free-text remarks (for example why no probe was run).

    Example:

    >>> student, report = convert(teacher)            # doctest: +SKIP
    >>> print(report)                                  # doctest: +SKIP
    >>> report.to_dict()["converted"][0]["path"]       # doctest: +SKIP
    'block/mha'
    """

    model_name: str
    converted: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    max_abs_error: float | None = None
    relative_error: float | None = None
    probe_shapes: list = dataclasses.field(default_factory=list)
    quadratic_layers: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)

    @property
    def num_converted(self) -> int:
        return len(self.converted)

    def to_dict(self) -> dict:
        """The report as plain Python data (JSON-serialisable)."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [
            f"SARA conversion of '{self.model_name}': {len(self.converted)} "
            f"attention layer(s) converted, {len(self.skipped)} skipped"
        ]
        if self.converted:
            lines.append("")
            lines += _table(
                ("path", "before", "after", "feature map"),
                [(c.path, c.before, c.after, c.feature_map + (f" ({c.note})" if c.note else ""))
                 for c in self.converted],
            )
        if self.skipped:
            lines += ["", "skipped:"]
            lines += _table(
                ("path", "class", "reason"),
                [(s.path, s.class_name, s.reason) for s in self.skipped],
            )
        delta = self.params_after - self.params_before
        lines += ["", f"parameters: {self.params_before:,} -> {self.params_after:,} ({delta:+,})"]
        if self.max_abs_error is not None:
            shapes = ", ".join(str(tuple(s)) for s in self.probe_shapes)
            lines.append(
                f"outputs on probe {shapes}, before up-training: max abs error "
                f"{self.max_abs_error:.3e}, relative error {self.relative_error:.3e}"
            )
        if self.quadratic_layers:
            lines.append(f"quadratic path (dense attention_mask): {', '.join(self.quadratic_layers)}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _table(header, rows):
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [header, ["-" * w for w in widths], *rows]
    return [fmt.format(*line).rstrip() for line in lines]


# ------------------------------------------------------- SARA from an MHA


def _feature_map_config(feature_map):
    """Validate `feature_map` once; return what each new layer gets (no sharing)."""
    fm = fm_lib.get(feature_map)  # raises the feature-map error for bad input
    if isinstance(feature_map, str):
        return feature_map
    config = fm_lib.serialize(fm)
    config.pop("build_config", None)
    return config


def _feature_map_label(feature_map) -> str:
    if isinstance(feature_map, str):
        return feature_map
    return str(feature_map.get("class_name", feature_map)) if isinstance(feature_map, dict) else type(feature_map).__name__


def _check_sara_kwargs(sara_kwargs: dict) -> None:
    unknown = sorted(set(sara_kwargs) - set(_SARA_KWARGS))
    if unknown:
        raise ValueError(
            f"Unknown SARA arguments {unknown}: `sara_kwargs` may hold {list(_SARA_KWARGS)}. "
            f"Received: sara_kwargs={sara_kwargs!r}"
        )


def _sara_config(mha, feature_map, sara_kwargs) -> dict:
    """SARA config from the MHA-compatible part of `mha`'s configuration.

    Calls MultiHeadAttention's own `get_config` on the instance, so a user
    subclass's extra constructor arguments never reach SARA's constructor.
    """
    config = _MHA.get_config(mha)
    config["flash_attention"] = getattr(mha, "_flash_attention", None)
    config.update(feature_map=feature_map, **sara_kwargs)
    return config


def _new_sara(mha, feature_map, sara_kwargs) -> SARAMultiHeadAttention:
    return SARAMultiHeadAttention.from_config(_sara_config(mha, feature_map, sara_kwargs))


def _build_like(new, old) -> None:
    """Build `new` on `old`'s input shapes, under `old`'s name scope (same variable paths)."""
    if not old.built or new.built:
        return
    build_config = old.get_build_config()
    if not build_config:
        raise ValueError(
            f"Cannot rebuild layer '{old.name}': it is built but recorded no "
            "input shapes. Call the model once on real inputs before converting."
        )
    scopes = (old.path or old.name).split("/")[:-1]
    if not scopes:
        new.build_from_config(build_config)
        return
    # An absolute parent path, whatever scope is open now (we may be inside
    # the holder's build).
    with keras.name_scope(scopes[-1], override_parent="/".join(scopes[:-1])):
        new.build_from_config(build_config)


def _copy_attention_weights(sara, mha) -> list[str]:
    """Copy the projections of `mha` into `sara`; return names of weights left behind."""
    same_layout = len(sara.weights) >= len(mha.weights) and [
        tuple(w.shape) for w in sara.weights[: len(mha.weights)]
    ] == [tuple(w.shape) for w in mha.weights]
    if same_layout and type(mha) is _MHA:
        sara.load_mha_weights(mha)
        return []
    # A subclass may own extra variables (a learned temperature, say): copy
    # the projections one sublayer at a time and report the rest.
    copied = set()
    for attr in _MHA_PROJECTIONS:
        src, dst = getattr(mha, attr, None), getattr(sara, attr, None)
        if src is None or dst is None:
            continue
        dst.set_weights(src.get_weights())
        copied.update(id(v) for v in src.weights)
    return [v.path or v.name for v in mha.weights if id(v) not in copied]


def _same_projection_weights(sara, mha) -> bool:
    if isinstance(sara, AdaptedAttention):
        # adapted in place: every teacher variable, and each projection by name
        adapter = adapters_lib.adapter_for(sara)
        pairs = [(getattr(mha, a), getattr(sara, a)) for a in adapter.projections]
        pairs.append((mha, sara))
        for src, dst in pairs:
            theirs, ours = src.get_weights(), dst.get_weights()[: len(src.weights)]
            if len(ours) != len(theirs) or any(
                a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(theirs, ours)
            ):
                return False
        return True
    for attr in _MHA_PROJECTIONS:
        src, dst = getattr(mha, attr, None), getattr(sara, attr, None)
        if (src is None) != (dst is None):
            return False
        if src is None:
            continue
        for a, b in zip(src.get_weights(), dst.get_weights()):
            if a.shape != b.shape or not np.array_equal(a, b):
                return False
    return True


# ------------------------------------------------------ layer-tree helpers


def _children(layer) -> list:
    return list(getattr(layer, "_layers", ()))


def _is_graph_model(layer) -> bool:
    """Functional/Sequential whose config is its graph (rebuilt layer by layer)."""
    if isinstance(layer, Sequential):
        return type(layer).get_config is Sequential.get_config
    if isinstance(layer, Functional):
        return type(layer).get_config is Functional.get_config
    return False


def _is_graph_node(parent, child) -> bool:
    return isinstance(parent, Functional) and any(op is child for op in getattr(parent, "_operations", ()))


def _internal(name: str) -> bool:
    return name in _INTERNAL_ATTRS or name.startswith("__")


def _find_refs(parent, child) -> list:
    """Where `parent` holds `child`: [["attr", name]] or [["attr", name], ["item", i or key]]."""
    items = [(k, v) for k, v in vars(parent).items() if not _internal(k)]
    # torch.nn.Module keeps sublayers in `_modules`, not in the instance dict
    items += [(k, v) for k, v in (vars(parent).get("_modules") or {}).items() if not _internal(k)]
    refs = []
    for name, value in items:
        if value is child:
            refs.append([["attr", name]])
        elif isinstance(value, (list, tuple)):
            refs += [[["attr", name], ["item", i]] for i, v in enumerate(value) if v is child]
        elif isinstance(value, dict):
            refs += [[["attr", name], ["item", k]] for k, v in value.items() if v is child and isinstance(k, str)]
    return sorted(refs, key=lambda r: [str(s[1]) for s in r])


def _set_ref(parent, ref, new) -> None:
    (_, name), *rest = ref
    if not rest:
        setattr(parent, name, new)
        return
    container, key = getattr(parent, name), rest[0][1]
    if isinstance(container, tuple):
        setattr(parent, name, container[:key] + (new,) + container[key + 1:])
    else:
        container[key] = new  # TrackedList/TrackedDict: tracking already done


def _get_ref(parent, ref):
    (_, name), *rest = ref
    value = getattr(parent, name)
    return value[rest[0][1]] if rest else value


def _replace_child(parent, old, new, refs) -> None:
    """Swap `old` for `new` at `refs` and in the layer tracker, keeping its position."""
    tracker = parent._tracker
    if tracker.is_in_store("layers", old) and not tracker.is_in_store("layers", new):
        tracker.replace_tracked_value("layers", old, new)
    for ref in refs:
        _set_ref(parent, ref, new)


def _refresh_torch_params(root) -> None:
    """torch backend: rebuild the parameter dicts that still list swapped-out layers.

    Each built Keras layer on torch keeps a `torch.nn.ParameterDict` of its
    variables (and those of its sublayers); after a swap the dicts of the
    holder and its ancestors (and of helper models such as Sequential's inner
    Functional) would still hold the old attention's variables.
    """
    if keras.backend.backend() != "torch":
        return
    seen = set()
    for layer in root._flatten_layers(include_self=True, recursive=True):
        for module in layer.modules():
            if id(module) in seen or not isinstance(module, keras.layers.Layer):
                continue
            seen.add(id(module))
            if "_torch_params" in vars(module) or "_torch_params" in (vars(module).get("_modules") or {}):
                module._track_variables()


# -------------------------------------------------- the persistent subclass

_DYNAMIC_CLASSES: dict = {}


def _class_identity(cls) -> dict:
    return {
        "module": cls.__module__,
        "class_name": cls.__name__,
        "registered_name": keras.saving.get_registered_name(cls),
    }


def _resolve_class(identity: dict):
    """Find the user's base class from its identity, as Keras finds classes."""
    cls = keras.saving.get_registered_object(identity["registered_name"])
    if cls is None:
        cls = keras.saving.get_registered_object(identity["class_name"])
    if isinstance(cls, _InitShim):  # `_copy_model`'s stand-in; the subclass applies it
        cls = cls.cls
    module = identity.get("module") or ""
    if cls is None and module.split(".")[0] in _IMPORTABLE_PACKAGES:
        try:
            cls = getattr(importlib.import_module(module), identity["class_name"], None)
        except ImportError:
            cls = None
    if not isinstance(cls, type):
        raise TypeError(
            f"Could not locate class '{identity['class_name']}' (module "
            f"'{module}', registered name '{identity['registered_name']}'), the "
            "base of a SARA-converted layer. Import the module that defines it, "
            "register it with `keras.saving.register_keras_serializable`, or pass "
            "it in `custom_objects` to `keras.models.load_model`."
        )
    return cls


def _converted_class(base):
    """The dynamic subclass of `base` that re-applies SARA swaps in `from_config`."""
    base = getattr(base, "_sara_base", None) or base
    cls = _DYNAMIC_CLASSES.get(base)
    if cls is not None:
        return cls

    def get_config(self):
        config = super(cls, self).get_config()
        config[_CONFIG_KEY] = self._sara_conversion_config()
        return config

    # Keep Keras' automatic config for layers that never wrote get_config.
    if getattr(base.get_config, "_is_default", False):
        get_config._is_default = True

    def from_config(klass, config, *args, **kwargs):
        config = dict(config)
        spec = config.pop(_CONFIG_KEY, None) or {"swaps": []}
        if _needs_init_shim(base):  # as `_copy_model` copies it (finalize copies a student)
            obj = _shim_from_config(klass, config)
        else:
            obj = super(cls, klass).from_config(config, *args, **kwargs)
        if type(obj) is not cls:  # a base from_config that ignores `cls`
            obj.__class__ = cls
        for swap in spec["swaps"]:
            _restore_swap(obj, swap["parent"], swap["refs"], swap["layer"])
        return obj

    def sara_conversion_config(self):
        swaps = []
        for parent_index, refs, pending_config in vars(self).get("_sara_swaps", ()):
            if pending_config is None:
                layer = _get_ref(_descend(self, parent_index), refs[0])
                if isinstance(layer, AdaptedAttention):  # re-classed in place on reload
                    layer_config = {_ADAPT_KEY: layer.sara_options()}
                else:
                    layer_config = keras.saving.serialize_keras_object(layer)
                    layer_config.pop("build_config", None)
            else:
                layer_config = pending_config
            swaps.append({"parent": list(parent_index), "refs": refs, "layer": layer_config})
        return {"base": _class_identity(base), "swaps": swaps}

    namespace = {
        "__module__": __name__,
        "__doc__": f"`{base.__name__}` with SARA attention (made by keras_sara.convert).",
        "_sara_base": base,
        "get_config": get_config,
        "from_config": classmethod(from_config),
        "_sara_conversion_config": sara_conversion_config,
    }
    if decoding.is_causal_lm(base):  # generate() on a constant-size state
        namespace["generate_step"] = decoding.generate_step
    cls = type(f"SARA{base.__name__}", (base,), namespace)
    keras.saving.register_keras_serializable(package="keras_sara", name="SARAConverted")(cls)
    # ... but the registered name resolves to the resolver, for any base class.
    keras.saving.get_custom_objects()[REGISTERED_NAME] = _ConvertedLayerResolver
    _DYNAMIC_CLASSES[base] = cls
    return cls


class _ConvertedLayerResolver:
    """Resolver for `"keras_sara>SARAConverted"`: rebuilds the dynamic subclass.

    Keras finds this class by the registered name in a saved config; its
    `from_config` reads the user's base class from the config and hands over
    to that base's SARA subclass. Not a layer itself.
    """

    @classmethod
    def from_config(cls, config, *args, **kwargs):
        spec = config.get(_CONFIG_KEY)
        if not isinstance(spec, dict) or "base" not in spec:
            raise ValueError(
                f"A '{REGISTERED_NAME}' config must hold a '{_CONFIG_KEY}' entry "
                f"with the base class. Received: config keys={sorted(config)}"
            )
        return _converted_class(_resolve_class(spec["base"])).from_config(config, *args, **kwargs)

    def get_config(self):  # required by the registry; never called
        return {}


keras.saving.get_custom_objects()[REGISTERED_NAME] = _ConvertedLayerResolver


def _descend(root, parent_index):
    layer = root
    for i in parent_index:
        layer = _children(layer)[i]
    return layer


def _record_swap(root, parent_index, refs, pending_config=None) -> int:
    if "_sara_swaps" not in vars(root):
        object.__setattr__(root, "_sara_swaps", [])
    entry = [list(parent_index), [[list(step) for step in r] for r in refs], pending_config]
    for i, known in enumerate(root._sara_swaps):
        if known[:2] == entry[:2]:  # swapped again (finalize): one record per place
            root._sara_swaps[i] = entry
            return i
    root._sara_swaps.append(entry)
    return len(root._sara_swaps) - 1


def _restore_swap(root, parent_index, refs, layer_config) -> None:
    """Put a SARA layer back where `refs` point, now or right after the holder builds.

    Some layers create their attention in `build` (keras-hub's
    TransformerEncoder does), so right after `from_config` the attribute may
    not exist yet: then the holder's `build` is wrapped to finish the swap.
    """
    record = _record_swap(root, parent_index, refs, layer_config)

    def attempt():
        chain = [root]
        for i in parent_index:
            children = _children(chain[-1])
            if i >= len(children):
                return _after_build(chain[-1], attempt, parent_index)
            chain.append(children[i])
        parent = chain[-1]
        try:
            old = _get_ref(parent, refs[0])
        except (AttributeError, IndexError, KeyError):
            return _after_build(parent, attempt, parent_index)
        if _ADAPT_KEY in layer_config:
            adapters_lib.adapt_in_place(old, layer_config[_ADAPT_KEY])
            root._sara_swaps[record][2] = None
            _refresh_torch_params(root)
            return
        new = keras.saving.deserialize_keras_object(layer_config)
        _build_like(new, old)
        _replace_child(parent, old, new, refs)
        root._sara_swaps[record][2] = None
        _refresh_torch_params(root)

    attempt()


def _after_build(layer, fn, where) -> None:
    """Run `fn` once `layer` has built (its build creates what `fn` needs)."""
    if layer.built:
        raise RuntimeError(
            f"Cannot restore a SARA layer under child {where} of this model: layer "
            f"'{layer.name}' is built but does not hold the converted attention."
        )
    pending = vars(layer).get("_sara_after_build")
    if pending is None:
        pending = []
        object.__setattr__(layer, "_sara_after_build", pending)
        inner = layer.build  # Keras' own per-instance build wrapper

        @functools.wraps(inner)
        def build(*args, **kwargs):
            result = inner(*args, **kwargs)
            todo = list(pending)
            pending.clear()
            for f in todo:
                f()
            return result

        object.__setattr__(layer, "build", build)
    pending.append(fn)


def _make_persistent(root) -> None:
    """Give `root` its dynamic subclass so its swaps survive save/load."""
    cls = _converted_class(type(root))
    if type(root) is not cls:
        root.__class__ = cls


# ---------------------------------------------------------- clone_function


def make_clone_function(feature_map="relu", **sara_kwargs) -> Callable:
    """A `clone_function` for `keras.models.clone_model` that puts in SARA attention.

    The returned function maps every `keras.layers.MultiHeadAttention`
    (subclasses included; an existing SARA layer is cloned as is) to a new
    `SARAMultiHeadAttention` with the same MHA configuration, and a custom
    layer that holds attention as an attribute to a clone whose attention is
    SARA (and stays SARA through save/load). Other layers are cloned as Keras
    clones them, `layer.__class__.from_config(layer.get_config())`. A nested
    Functional or Sequential model that holds attention is cloned recursively
    with this same function, with or without `recursive=True`.

    `clone_model` copies no weights. With a parameter-free feature map
    (`"relu"`, `"elu+1"`) and `blend=1` the clone has the teacher's variables
    in the same order, so one line copies them all:
    `student.set_weights(teacher.get_weights())`. Otherwise use
    `keras_sara.convert`, which copies the attention projections and leaves
    the new feature-map or blend weights at their initial values.

    Args:
        feature_map: the SARA feature map: a name (`"relu"`, the paper's;
            `"elu+1"`, `"favor+"`, `"hedgehog"`, `"sara"`), a config dict or a
            `keras_sara.feature_maps.FeatureMap` (each layer gets its own copy).
        **sara_kwargs: other `SARAMultiHeadAttention` arguments: `eps`,
            `causal_schedule`, `chunk_size`, `blend`.

    Returns:
        A callable `layer -> layer`.

    Example:

    >>> import keras, numpy as np, keras_sara
    >>> x = keras.Input((6, 8))
    >>> teacher = keras.Model(x, keras.layers.MultiHeadAttention(2, 4)(x, x))
    >>> student = keras.models.clone_model(
    ...     teacher, clone_function=keras_sara.make_clone_function("relu"))
    >>> student.set_weights(teacher.get_weights())   # the one line
    >>> type(student.layers[1]).__name__
    'SARAMultiHeadAttention'
    """
    fm = _feature_map_config(feature_map)
    _check_sara_kwargs(sara_kwargs)

    def clone_function(layer):
        if adapters_lib.adapter_for(layer) is not None and not isinstance(layer, SARALayer):
            return adapters_lib.adapt_in_place(layer.__class__.from_config(layer.get_config()),
                                               _adapter_options(fm, sara_kwargs))
        if isinstance(layer, _MHA) and not isinstance(layer, SARAMultiHeadAttention):
            return _new_sara(layer, fm, sara_kwargs)
        if _is_graph_model(layer) and _attention_layers(layer):
            # A nested Functional/Sequential model (a keras.io seq2seq decoder):
            # `clone_model` without recursive=True would copy it whole, softmax and all.
            return keras.models.clone_model(layer, clone_function=clone_function, recursive=True)
        swaps = []
        if not _is_graph_model(layer):
            _collect_clone_swaps(layer, [], fm, sara_kwargs, swaps)
        config = layer.get_config()
        if not swaps:
            return layer.__class__.from_config(config)
        if getattr(type(layer), "_sara_base", None) is not None:  # converted before
            swaps = layer._sara_conversion_config()["swaps"] + swaps
        config[_CONFIG_KEY] = {"base": _class_identity(type(layer)), "swaps": swaps}
        return _converted_class(type(layer)).from_config(config)

    return clone_function


def _adapter_options(fm, sara_kwargs) -> dict:
    """SARA options of an adapted layer (adapters always use the chunked causal schedule)."""
    return {"feature_map": fm, **{k: v for k, v in sara_kwargs.items() if k != "causal_schedule"}}


def _collect_clone_swaps(layer, index, fm, sara_kwargs, swaps) -> None:
    for i, child in enumerate(_children(layer)):
        if isinstance(child, SARALayer):
            continue
        if _is_attention(child):
            refs = _find_refs(layer, child)
            if refs and not _is_graph_node(layer, child):
                if adapters_lib.adapter_for(child) is not None:
                    config = {_ADAPT_KEY: _adapter_options(fm, sara_kwargs)}  # re-classed in place
                else:
                    config = keras.saving.serialize_keras_object(_new_sara(child, fm, sara_kwargs))
                swaps.append({"parent": list(index), "refs": refs, "layer": config})
        elif not _is_graph_model(child):
            _collect_clone_swaps(child, index + [i], fm, sara_kwargs, swaps)


#: `make_clone_function()` with the defaults (ReLU features, linear only):
#: `keras.models.clone_model(model, clone_function=keras_sara.clone_function)`.
clone_function = make_clone_function()


# ------------------------------------------------------------------ convert


class _Context:
    """State of one `convert` call."""

    def __init__(self, feature_map, sara_kwargs, selected_ids, finalize=False):
        self.finalize = finalize  # SARA(blend < 1) -> linear-only SARA, not MHA -> SARA
        self.feature_map = feature_map
        self.sara_kwargs = sara_kwargs
        self.selected_ids = selected_ids
        self.converted: list[ConvertedLayer] = []
        self.skipped: list[SkippedLayer] = []
        self.pairs: list = []  # (teacher mha, student sara)
        self.skipped_ids: list = []

    def skip(self, path, layer, reason):
        self.skipped.append(SkippedLayer(path, type(layer).__name__, reason))
        self.skipped_ids.append(id(layer))

    def final_skips(self) -> list:
        """Skips of layers not converted elsewhere (a layer shared by two sub-models is reached twice)."""
        done = {id(orig) for orig, _ in self.pairs}
        return [s for s, i in zip(self.skipped, self.skipped_ids) if i not in done]


def _is_attention(layer) -> bool:
    """An attention layer `convert` knows: MHA, a class with an adapter, or SARA already."""
    if isinstance(layer, SARALayer) or adapters_lib.adapter_for(layer) is not None:
        return True
    # an MHA subclass that overrides a registered adapter's `call` (Moonshine's) is not plain MHA
    return isinstance(layer, _MHA) and adapters_lib.overridden_base(type(layer)) is None


def _attention_layers(layer, path="", unknown=False):
    """(path, layer) of every attention layer under `layer` (not descending into one).

    With `unknown=True` also attention-like layers that nothing converts (a
    class named `...Attention` with no adapter and no attention inside).
    """
    found = []
    for child in _children(layer):
        child_path = f"{path}/{child.name}" if path else child.name
        if _is_attention(child):
            found.append((child_path, child))
            continue
        inner = _attention_layers(child, child_path, unknown)
        if not inner and unknown and adapters_lib.looks_like_attention(child):
            found.append((child_path, child))
        found += inner
    return found


def _no_adapter_reason(layer) -> str:
    cls = type(layer)
    base = adapters_lib.overridden_base(cls)
    why = f" (it overrides the `call` of {base.__name__}, whose adapter would not match it)" if base else ""
    return (
        f"no SARA adapter for {cls.__module__}.{cls.__qualname__}{why}: register one with "
        f"keras_sara.register_attention({cls.__name__}, keras_sara.adapters.AttentionAdapter(...)) "
        "(see its docstring)"
    )


def _select(attention, layers) -> set:
    """ids of the teacher's attention layers that `layers` selects."""
    if layers is None:
        return {id(l) for _, l in attention}
    if callable(layers):
        return {id(l) for p, l in attention if layers(l, p)}
    if isinstance(layers, (str, bytes)) or not isinstance(layers, (list, tuple, set, frozenset)) or not all(
        isinstance(e, str) for e in layers
    ):
        hint = f" (wrap one name in a list: layers=[{layers!r}])" if isinstance(layers, str) else ""
        raise ValueError(
            "`layers` must be None, a list of layer names or paths (such as "
            "'block_3/mha'), or a callable (layer, path) -> bool. "
            f"Received: layers={layers!r}{hint}"
        )

    def matches(entry, path):
        return path == entry or path.endswith("/" + entry.strip("/"))

    unknown = [e for e in layers if not any(matches(e, p) for p, _ in attention)]
    if unknown:
        available = ", ".join(repr(p) for p, _ in attention) or "none"
        raise ValueError(
            f"`layers` names no attention layer for {unknown}. Attention layers "
            f"in this model (by path): {available}. Received: layers={list(layers)!r}"
        )
    return {id(l) for p, l in attention if any(matches(e, p) for e in layers)}


def _convert_layer(orig, copy, path, ctx):
    """Return the converted version of `copy` (a new layer, or `copy` changed in place)."""
    if _is_attention(orig):
        return _convert_attention(orig, copy, path, ctx)
    if _is_graph_model(copy):
        return _convert_graph_model(orig, copy, path, ctx)
    if _convert_subtree(orig, copy, path, [], copy, ctx):
        _make_persistent(copy)
    return copy


def _convert_attention(orig, copy, path, ctx):
    if id(orig) not in ctx.selected_ids:
        return copy
    if isinstance(copy, AdaptedAttention) or (
        not isinstance(orig, SARALayer) and adapters_lib.adapter_for(orig) is not None
    ):
        return _adapt(orig, copy, path, ctx)
    if ctx.finalize:
        return _linear_only(orig, copy, path, ctx)
    try:
        sara = _new_sara(copy, ctx.feature_map, ctx.sara_kwargs)
        _build_like(sara, copy)
    except (TypeError, ValueError) as e:  # an MHA subclass built in a way MHA is not (XLNet's)
        if type(orig) is _MHA:
            raise
        ctx.skip(path, orig, f"could not rebuild as SARAMultiHeadAttention ({str(e).splitlines()[0]}); "
                             "add an adapter with keras_sara.register_attention")
        return copy
    left = _copy_attention_weights(sara, copy)
    note = ""
    if type(orig) is not _MHA:  # a user subclass: its attention code and extra weights go
        note = "its own attention code replaced"
        if left:
            note += f"; {len(left)} extra weight(s) dropped: {left}"
    ctx.converted.append(
        ConvertedLayer(path, type(orig).__name__, type(sara).__name__, _feature_map_label(ctx.feature_map), note)
    )
    ctx.pairs.append((orig, sara))
    return sara


def _adapt(orig, copy, path, ctx):
    """Make the copy's attention SARA in place (its own class, variables and call kept)."""
    if ctx.finalize:
        blend = float(keras.ops.convert_to_numpy(orig.blend_variable))
        copy.set_linear_only()
        _refresh_torch_params(copy)
        note = f"softmax branch removed (blend was {blend:g})"
        ctx.converted.append(ConvertedLayer(path, type(orig).__name__, type(copy).__name__,
                                            _feature_map_label(copy.feature_map), note))
        ctx.pairs.append((orig, copy))
        return copy
    if isinstance(copy, AdaptedAttention):
        return copy  # shared with a holder visited before: converted once
    adapter = adapters_lib.adapter_for(orig)
    options = _adapter_options(ctx.feature_map, ctx.sara_kwargs)
    before = type(orig).__name__
    adapters_lib.adapt_in_place(copy, options)
    _refresh_torch_params(copy)
    notes = ["adapted in place"] + list(adapter.notes(orig))
    if ctx.sara_kwargs.get("causal_schedule") not in (None, "chunked"):
        notes.append("causal_schedule ignored: adapted layers always use the chunked schedule")
    ctx.converted.append(ConvertedLayer(path, before, type(copy).__name__, _feature_map_label(ctx.feature_map),
                                        "; ".join(notes)))
    ctx.pairs.append((orig, copy))
    return copy


def _linear_only(orig, copy, path, ctx):
    """A linear-only SARA layer with `copy`'s weights (its blend state dropped)."""
    config = copy.get_config()
    config["blend"] = 1.0
    new = SARAMultiHeadAttention.from_config(config)
    _build_like(new, copy)
    kept = copy.weights[: len(new.weights)]
    if [tuple(w.shape) for w in kept] != [tuple(w.shape) for w in new.weights]:
        raise RuntimeError(f"Weight layout of '{path}' changed when finalizing: please report this bug.")
    for dst, src in zip(new.weights, kept):
        dst.assign(src)
    blend = float(keras.ops.convert_to_numpy(orig.blend_variable))
    ctx.converted.append(ConvertedLayer(
        path, type(orig).__name__, type(new).__name__, _feature_map_label(copy.feature_map),
        f"softmax branch removed (blend was {blend:g})",
    ))
    ctx.pairs.append((orig, new))
    return new


def _has_selected(layer, ctx) -> bool:
    if _is_attention(layer):
        return id(layer) in ctx.selected_ids
    return any(_has_selected(c, ctx) for c in _children(layer))


def _convert_graph_model(orig, copy, path, ctx):
    """Convert a Functional/Sequential model: in place where possible, else a new graph."""
    if not _has_selected(orig, ctx):
        return copy
    replaced = {}
    for o, c, p in _paired_children(orig, copy, path):
        if _has_selected(o, ctx):
            new = _convert_layer(o, c, p, ctx)  # custom layers change in place
            if new is not c:
                replaced[id(c)] = new
    if not replaced:
        return copy
    # A node changed class (MHA -> SARA, or a rebuilt sub-model): rebuild the
    # graph, reusing every other layer of the copy as it is.
    return keras.models.clone_model(copy, clone_function=lambda layer: replaced.get(id(layer), layer))


def _paired_children(orig, copy, path):
    a, b = _children(orig), _children(copy)
    if len(a) != len(b) or any(type(x) is not type(y) for x, y in zip(a, b)):
        raise ValueError(
            f"Layer '{path or orig.name}' ({type(orig).__name__}) was rebuilt from its "
            "config with different sublayers, so its weights cannot be copied. Its "
            "`get_config()` must return every constructor argument."
        )
    return [(o, c, f"{path}/{o.name}" if path else o.name) for o, c in zip(a, b)]


def _convert_subtree(orig, copy, path, index, root, ctx) -> bool:
    """Swap attention under an init-rebuilt layer; record swaps on `root`. True if any."""
    changed = False
    for i, (o, c, p) in enumerate(_paired_children(orig, copy, path)):
        if _is_attention(o) or _is_graph_model(c):
            if not _has_selected(o, ctx):
                continue
            if _is_graph_node(copy, c):
                for ap, al in ([(p, o)] if _is_attention(o) else _attention_layers(o, p)):
                    ctx.skip(ap, al, (
                        f"a node of the functional graph that {type(orig).__name__}.__init__ "
                        "builds (convert keras.Model(model.inputs, model.outputs) instead)"))
                continue
            refs = _find_refs(copy, c)
            if not refs:
                for ap, al in ([(p, o)] if _is_attention(o) else _attention_layers(o, p)):
                    ctx.skip(ap, al, f"not held in an attribute of {type(orig).__name__}")
                continue
            new = _convert_layer(o, c, p, ctx)
            if new is c and not isinstance(new, AdaptedAttention):
                continue
            _replace_child(copy, c, new, refs)
            _record_swap(root, index, refs)
            changed = True
        else:
            changed |= _convert_subtree(o, c, p, index + [i], root, ctx)
    return changed


# `from_config` of Layer (Operation) and Model: `cls(**config)`, the config included.
_DEFAULT_FROM_CONFIGS = (keras.layers.Layer.from_config.__func__, keras.Model.from_config.__func__)


def _needs_init_shim(cls) -> bool:
    """A user class that Keras cannot rebuild from its own config: no **kwargs in `__init__`.

    Keras' automatic `get_config` records the constructor arguments plus
    `trainable` and `dtype`, which such an `__init__` rejects (the keras.io
    examples' layers are written this way).
    """
    if not (isinstance(cls, type) and issubclass(cls, keras.layers.Layer)):
        return False
    if getattr(cls.from_config, "__func__", None) not in _DEFAULT_FROM_CONFIGS:
        return False  # the class rebuilds itself
    params = inspect.signature(cls.__init__).parameters.values()
    return not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _shim_from_config(cls, config):
    """`cls` built from the arguments its `__init__` accepts, then given the rest of `config`."""
    params = inspect.signature(cls.__init__).parameters
    obj = cls(**{k: v for k, v in config.items() if k in params and k != "self"})
    # Before any build: the name is the variables' name scope.
    if "name" in config and "name" not in params:
        obj.name = config["name"]
    if "trainable" in config and "trainable" not in params:
        obj.trainable = config["trainable"]
    if config.get("dtype") is not None and "dtype" not in params:
        dtype = config["dtype"]
        obj.dtype_policy = keras.dtype_policies.deserialize(dtype) if isinstance(dtype, dict) else dtype
    return obj


class _InitShim:
    """Stands in for a class in `custom_objects` while `convert` copies a model."""

    def __init__(self, cls):
        self.cls = cls

    def from_config(self, config):
        return _shim_from_config(self.cls, config)


def _record_shim_names(layer, config, shimmed) -> None:
    """Write each shimmed layer's name into its config (Keras' automatic config drops it)."""
    inner = config.get("config") if isinstance(config, dict) else None
    if not isinstance(inner, dict):
        return
    if (getattr(type(layer), "_sara_base", None) or type(layer)) in shimmed:
        inner.setdefault("name", layer.name)
    if not _is_graph_model(layer):
        return  # a custom layer's sublayers come from its __init__, not from its config
    entries = inner.get("layers") or []
    if isinstance(layer, Sequential):  # its config lists `_layers`, the InputLayer included
        pairs = zip(layer._flatten_layers(include_self=False, recursive=False), entries)
    else:
        by_name = {op.name: op for op in layer.operations}
        pairs = [(by_name.get(e.get("name")), e) for e in entries if isinstance(e, dict)]
    for sub, entry in pairs:
        if sub is not None:
            _record_shim_names(sub, entry, shimmed)


def _custom_objects(model) -> dict:
    """Classes in `model`'s tree, so an unregistered user class can be copied."""
    objects = {}
    for layer in model._flatten_layers(include_self=True, recursive=True):
        cls = type(layer)
        cls = getattr(cls, "_sara_base", None) or cls  # the resolver finds the base by name
        if cls.__module__.split(".")[0] == "keras":
            continue
        obj = _InitShim(cls) if _needs_init_shim(cls) else cls
        objects.setdefault(cls.__name__, obj)
        objects.setdefault(keras.saving.get_registered_name(cls), obj)
    return objects


def _copy_model(model, shimmed=None):
    """An independent copy of `model` with the same weights.

    `shimmed`, a list, receives the names of the classes copied through
    `_shim_from_config` (their `__init__` takes no **kwargs).
    """
    objects = _custom_objects(model)
    shims = {o.cls for o in objects.values() if isinstance(o, _InitShim)}
    try:
        config = keras.saving.serialize_keras_object(model)
        _record_shim_names(model, config, shims)
        with warnings.catch_warnings():
            # Keras warns when it marks a custom layer built before its sublayers
            # are (as in every load_model of such a layer); the copy is then
            # called and checked weight by weight below.
            warnings.filterwarnings("ignore", message=r"`build\(\)` was called on layer")
            copy = keras.saving.deserialize_keras_object(config, custom_objects=objects)
    except Exception as e:  # a user class whose config does not round-trip
        raise ValueError(
            f"Could not copy `model` '{model.name}' ({type(model).__name__}) from its "
            "config, which `convert` needs to leave the original untouched. Every "
            "custom layer and a subclassed model must be rebuildable from "
            "`get_config()`: accept `**kwargs` in `__init__` and pass them to "
            "`super().__init__(**kwargs)`, and implement `get_config()` returning "
            "every constructor argument (`{**super().get_config(), ...}`). "
            f"Error: {e}"
        ) from e
    if shimmed is not None:
        shimmed.extend(sorted({cls.__name__ for cls in shims}))
    teacher_weights = model.get_weights()
    if len(copy.weights) != len(teacher_weights):
        raise ValueError(
            f"The copy of `model` '{model.name}' has {len(copy.weights)} weights, the "
            f"model {len(teacher_weights)}: some layer is built lazily in a way its "
            "build config does not record. Call the model once before converting."
        )
    copy.set_weights(teacher_weights)
    _finalize_states(copy)
    return copy


def _finalize_states(model) -> None:
    """Rebuild the state that preprocessing layers derive from their weights.

    `set_weights` only assigns variables; Keras' loader then calls
    `finalize_state()` (an adapted `Normalization` turns its mean and variance
    variables into the constants it normalises with). Layers without weights
    are left alone, as Keras' own h5 loader does: `Discretization` keeps its
    state in its config and would recompute it from an empty summary.
    """
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if layer.built and layer.weights and callable(getattr(layer, "finalize_state", None)):
            layer.finalize_state()


def _count_params(model) -> int:
    return int(sum(np.prod(w.shape) for w in model.weights))


def _make_probe(model, probe):
    if probe is not None:
        return probe
    rng = np.random.default_rng(0)
    # All-zero token ids would be padding everywhere (BERT's drift read 0.0).
    model_vocab = min(_embedding_sizes(model, include_self=False), default=_DEFAULT_VOCAB)

    def make(shape, dtype, tensor=None):
        shape = tuple(2 if i == 0 and d is None else (8 if d is None else d) for i, d in enumerate(shape))
        dtype = str(dtype)
        if "float" in dtype:
            return rng.standard_normal(shape).astype(dtype)
        if "bool" in dtype or "mask" in str(getattr(tensor, "name", "")):
            return np.ones(shape, dtype)  # padding_mask and the like: nothing masked
        vocab = _input_vocabulary(model, tensor) or model_vocab
        if vocab < 2:
            return np.zeros(shape, dtype)
        return rng.integers(1, vocab, size=shape).astype(dtype)  # valid ids, none the usual pad 0

    if isinstance(model, Functional):  # its `input` keeps the structure (list, dict)
        return keras.tree.map_structure(lambda t: make(t.shape, t.dtype, t), model.input)
    build_config = model.get_build_config() or {}
    if "input_shape" in build_config:
        return make(tuple(build_config["input_shape"]), "float32")
    return None


_DEFAULT_VOCAB = 100  # token ids for a model without any Embedding layer


def _embedding_sizes(layer, include_self=True) -> list:
    """`input_dim` of every Embedding under `layer` (keras-hub's ReversibleEmbedding is one)."""
    return [
        sub.input_dim
        for sub in layer._flatten_layers(include_self=include_self, recursive=True)
        if isinstance(sub, keras.layers.Embedding)
    ]


def _input_vocabulary(model, tensor):
    """Smallest Embedding size among the layers that read `tensor` directly, or None."""
    if tensor is None:
        return None
    readers = [
        op for op in model.operations
        if any(any(x is tensor for x in node.input_tensors) for node in getattr(op, "_inbound_nodes", ()))
    ]
    sizes = [size for op in readers if isinstance(op, keras.layers.Layer) for size in _embedding_sizes(op)]
    return min(sizes, default=None)


def check_probe(model, probe, name: str = "probe") -> None:
    """Refuse a probe batch that does not fit `model`'s inputs, naming `name` and both shapes.

    For Functional and Sequential models the number of inputs and every
    known axis but the batch are compared with `model.inputs`; subclassed
    models, whose inputs are not declared, are called and any error is
    re-raised naming `name`. Values must be finite. Used by `convert`,
    `finalize` and `keras_sara.callbacks.UpTraining` before any work.

    Raises:
        ValueError: `probe` has the wrong structure, shape or non-finite values.
    """
    got = keras.tree.flatten(probe)
    inputs = None
    if isinstance(model, (Functional, Sequential)):
        try:
            structure = model.input
        except (AttributeError, ValueError):  # a Sequential built without an Input
            structure = None
        if isinstance(structure, dict) and isinstance(probe, dict):
            missing = [k for k in structure if k not in probe]
            if missing:
                raise ValueError(
                    f"`{name}` must have a value for every model input {list(structure)}. "
                    f"Received: {name} with keys {list(probe)} (missing {missing})"
                )
            got = [probe[k] for k in structure]  # extra keys: as the model, ignored
            inputs = [structure[k] for k in structure]
        elif structure is not None:
            inputs = keras.tree.flatten(structure)
            names = [getattr(t, "name", None) for t in inputs]
            if isinstance(probe, dict) and all(n in probe for n in names):
                # a dict for a list of named Inputs: Keras matches it by name, so do we
                got = [probe[n] for n in names]
    got_shapes = [tuple(np.shape(x)) for x in got]
    if inputs:
        want = [tuple(t.shape) for t in inputs]
        want_text = ", ".join(str(w) for w in want)
        ok = len(got_shapes) == len(want) and all(
            len(g) == len(w) and all(wd is None or gd == wd for gd, wd in list(zip(g, w))[1:])
            for g, w in zip(got_shapes, want)
        )
        if not ok:
            raise ValueError(
                f"`{name}` must match the model's input(s) {want_text} (None: any size; the batch "
                f"axis may differ): {len(want)} array(s). Received: {name} with shape(s) "
                f"{', '.join(str(g) for g in got_shapes) or 'none'}"
            )
    for i, x in enumerate(got):
        try:
            arr = np.asarray(keras.ops.convert_to_numpy(x))
        except Exception:  # not array-like: the model call below names it
            continue
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            where = f" (input {i})" if len(got) > 1 else ""
            raise ValueError(
                f"`{name}` must hold finite values{where}: it has {int(np.sum(~np.isfinite(arr)))} "
                f"NaN or infinite value(s) of {arr.size}. Received: {name} of shape {arr.shape}"
            )
    if not inputs:
        try:
            model(probe, training=False)
        except Exception as err:
            raise ValueError(
                f"`{name}` must be a batch that model '{model.name}' accepts. Received: {name} "
                f"with shape(s) {', '.join(str(g) for g in got_shapes)}; calling the model "
                f"failed with {type(err).__name__}: {err}"
            ) from err


def _outputs(model, probe):
    out = model(probe, training=False)
    return [np.asarray(keras.ops.convert_to_numpy(t), np.float64) for t in keras.tree.flatten(out)]


def convert(
    model,
    feature_map="relu",
    layers: Sequence[str] | Callable[[Any, str], bool] | None = None,
    verify: bool = True,
    probe=None,
    **sara_kwargs,
):
    """Convert a trained Keras model's softmax attention to SARA linear attention.

    Every selected `keras.layers.MultiHeadAttention` (subclasses included)
    becomes a `SARAMultiHeadAttention` holding the same query, key, value
    (and gate) and output weights: the starting point of SARA-RT
    up-training. Works on Functional and Sequential models, nested
    Functional sub-models, attention held as an attribute of a custom layer
    (RT-1's and keras-hub's pattern, keras-hub backbones included) and
    subclassed `keras.Model`s. The original model is not modified: the
    converted model is a copy with every weight copied. It stays converted
    through `model.save(...)` and `keras.models.load_model(...)` with only
    `import keras_sara` (see this module's docstring for how).

    Args:
        model: a built `keras.Model`.
        feature_map: the SARA feature map: a name (`"relu"`, the paper's and
            the default; `"elu+1"`, `"favor+"`, `"hedgehog"`, `"sara"`), a
            config dict or a `keras_sara.feature_maps.FeatureMap` (each layer
            gets its own copy). Learnable maps start at their initial values.
        layers: which attention layers to convert. None (all), a list of
            names or paths (a path joins layer names from the model down, for
            example `"vit_encoder/transformer_block_1/mha"`; an entry matches
            a layer whose path equals it or ends with `"/" + entry`, so a bare
            name matches every layer of that name), or a callable
            `(layer, path) -> bool`, called with each attention layer of the
            original model and its path.
        verify: check that the projection weights were copied exactly, and
            measure how far the outputs moved on a probe batch.
        probe: inputs for that measurement. By default a batch of 2 built
            from the model's input shapes (unknown sizes become 8; float
            inputs random normal; integer inputs random token ids in
            `[1, V)`, V the smallest `Embedding` size among the layers that
            read the input, else in the model, else 100; bool inputs and
            integer inputs whose name contains "mask" all ones).
        **sara_kwargs: other `SARAMultiHeadAttention` arguments: `eps`,
            `causal_schedule`, `chunk_size`, `blend` (`blend=0.0` gives a
            model that still computes softmax, for a blend schedule).

    Returns:
        `(converted_model, report)`: the new model and a `ConversionReport`
        (`print(report)` shows a table; `report.to_dict()` gives the data).

    Raises:
        ValueError: `model` is not a built Keras model, `layers` is malformed
            or names no attention layer (the message lists those that
            exist), or a custom layer cannot be copied from its config.

    Example:

    >>> import keras, numpy as np, keras_sara
    >>> x = keras.Input((16, 32))
    >>> y = keras.layers.MultiHeadAttention(4, 8, name="mha")(x, x)
    >>> teacher = keras.Model(x, keras.layers.Dense(10)(y))
    >>> student, report = keras_sara.convert(teacher, layers=["mha"])
    >>> report.num_converted
    1
    >>> print(report)                        # doctest: +SKIP
    >>> student.compile("adamw", "mse")      # then up-train with fit
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            "`model` must be a keras.Model (Functional, Sequential or subclassed). "
            f"Received: model of type {type(model).__module__}.{type(model).__qualname__}"
        )
    if not model.built:
        raise ValueError(
            f"`model` must be built: call it once on a batch (or call "
            f"`model.build(input_shape)`) so its weights exist. Received: model "
            f"'{model.name}' with built=False"
        )
    fm = _feature_map_config(feature_map)
    _check_sara_kwargs(sara_kwargs)
    if not isinstance(verify, bool):
        raise ValueError(f"`verify` must be True or False. Received: verify={verify!r}")
    if verify and probe is not None:
        check_probe(model, probe)

    attention = list({id(l): (p, l) for p, l in reversed(_attention_layers(model, unknown=True))}.values())[::-1]
    selected = _select(attention, layers)
    ctx = _Context(fm, sara_kwargs, set())
    for path, layer in attention:
        if isinstance(layer, SARALayer):
            ctx.skip(path, layer, "already a SARA layer")
        elif not _is_attention(layer):
            ctx.skip(path, layer, _no_adapter_reason(layer))
            warnings.warn(f"convert: layer '{path}' left as it is: {_no_adapter_reason(layer)}.",
                          UserWarning, stacklevel=2)
        elif id(layer) not in selected:
            ctx.skip(path, layer, "not selected by `layers`")
        else:
            ctx.selected_ids.add(id(layer))
    report = ConversionReport(model_name=model.name, params_before=_count_params(model))

    shimmed = []
    copy = _copy_model(model, shimmed)
    if shimmed:
        report.notes.append(
            f"{', '.join(shimmed)}: `__init__` takes no **kwargs, so the copy was built "
            "from the constructor arguments alone (name, trainable and dtype set after). "
            "The student works in this process, but `keras.models.load_model` cannot "
            "rebuild it from a `.keras` file; to make it reloadable, accept `**kwargs` "
            "in `__init__`, pass them to `super().__init__(**kwargs)` and implement "
            "`get_config()` returning every constructor argument"
        )
    student = _convert_layer(model, copy, "", ctx)
    _refresh_torch_params(student)
    report.converted, report.skipped = ctx.converted, ctx.final_skips()
    report.params_after = _count_params(student)
    if not attention:
        report.notes.append("the model has no attention layer: nothing was converted")
        warnings.warn(
            f"convert: model '{model.name}' has no attention layer (keras.layers.MultiHeadAttention "
            "or a class with a SARA adapter), so nothing was converted; the returned model is a plain copy.",
            UserWarning,
            stacklevel=2,
        )
    elif not ctx.converted:
        report.notes.append("no attention layer was converted (see skipped)")
        warnings.warn(
            f"convert: no attention layer of model '{model.name}' was converted "
            f"({len(ctx.skipped)} skipped); the returned model is a plain copy.",
            UserWarning,
            stacklevel=2,
        )
    if verify and ctx.converted:
        bad = [c.path for c, (t, s) in zip(ctx.converted, ctx.pairs) if not _same_projection_weights(s, t)]
        if bad:
            raise RuntimeError(f"Projection weights were not copied exactly for {bad}: please report this bug.")
    if verify:
        _measure(model, student, probe, report)
    return student, report


def _measure(teacher, student, probe, report) -> None:
    probe = _make_probe(teacher, probe)
    if probe is None:
        report.notes.append("no probe batch: pass `probe=` to measure how far the outputs moved")
        return
    report.probe_shapes = [list(np.shape(x)) for x in keras.tree.flatten(probe)]
    a, b = _outputs(student, probe), _outputs(teacher, probe)
    diff = np.concatenate([(x - y).ravel() for x, y in zip(a, b)])
    ref = np.concatenate([y.ravel() for y in b])
    report.max_abs_error = float(np.max(np.abs(diff))) if diff.size else 0.0
    report.relative_error = float(np.linalg.norm(diff) / max(np.linalg.norm(ref), np.finfo(np.float64).tiny))
    # Any SARA layer class sets `_warned_quadratic` when a call took the (T, S) path.
    report.quadratic_layers = [
        layer.path or layer.name
        for layer in student._flatten_layers(include_self=False, recursive=True)
        if getattr(layer, "_warned_quadratic", False)
    ]
    if report.quadratic_layers:
        report.notes.append(
            f"{len(report.quadratic_layers)} layer(s) ({', '.join(report.quadratic_layers)}) "
            "received a dense attention_mask and ran the exact quadratic path; pass "
            "causality as use_causal_mask=True and padding as key_mask/value_mask (or "
            "Keras masks) to stay linear"
        )


def finalize(model, verify: bool = True, probe=None):
    """Make every blendable SARA layer linear-only, for inference and export.

    A model converted with `blend < 1` (for a blend schedule or attention
    distillation) still computes softmax attention beside the linear one,
    even once the blend factor reaches 1. `finalize` returns a copy whose
    SARA layers are rebuilt with `blend=1.0`: same weights (the blend state
    is dropped), no softmax in the graph, linear cost, the fused fast path.
    The original model is left untouched; layers that are already
    linear-only are kept as they are.

    Args:
        model: a built `keras.Model` holding SARA layers.
        verify: compare outputs before and after on a probe batch; a model
            whose blend factors are all 1 must not move (relative error at
            most 1e-4, else RuntimeError).
        probe: inputs for that comparison (default: built from the model's
            input shapes, as in `convert`).

    Returns:
        The linear-only model.

    Raises:
        ValueError: `model` was never converted (it holds softmax attention
            and no SARA layer: run `convert` first), or `probe` does not fit
            it. Softmax layers left by a partial conversion give a warning.

    Example:

    >>> student, _ = keras_sara.convert(teacher, blend=0.0)     # doctest: +SKIP
    >>> student.fit(..., callbacks=[keras_sara.callbacks.UpTraining(
    ...     schedule="cosine", blend_steps=500)])              # doctest: +SKIP
    >>> robot_policy = keras_sara.finalize(student)            # doctest: +SKIP
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            "`model` must be a keras.Model. "
            f"Received: model of type {type(model).__module__}.{type(model).__qualname__}"
        )
    if not model.built:
        raise ValueError(f"`model` must be built. Received: model '{model.name}' with built=False")
    attention = _attention_layers(model)
    softmax = [p for p, l in attention if not isinstance(l, SARALayer)]
    if softmax and len(softmax) == len(attention):
        raise ValueError(
            f"`model` must be converted before `finalize`: '{model.name}' holds no SARA layer, "
            f"only softmax attention ({', '.join(softmax)}), which finalize would leave in the "
            "graph. Run `student, report = keras_sara.convert(model)` (and up-train) first. "
            f"Received: model '{model.name}' with {len(softmax)} softmax attention layer(s)"
        )
    if softmax:
        warnings.warn(
            f"finalize: {', '.join(softmax)} stay softmax attention (not converted, e.g. by "
            "`convert(layers=...)`), so the model is not linear-only.",
            UserWarning,
            stacklevel=2,
        )
    if verify and probe is not None:
        check_probe(model, probe)
    blendable = [
        (p, l) for p, l in attention
        if isinstance(l, SARALayer) and l.blend_variable is not None
    ]
    if not blendable:
        return model
    blends = {p: float(keras.ops.convert_to_numpy(l.blend_variable)) for p, l in blendable}
    unfinished = {p: b for p, b in blends.items() if b < 1.0}
    if unfinished:
        warnings.warn(
            f"finalize: blend factor below 1 for {unfinished}; the linear-only model "
            "drops their softmax share, so its outputs differ from the blended model's. "
            "Run the blend schedule to its end (UpTraining(blend_steps=...)) first.",
            UserWarning,
            stacklevel=2,
        )
    ctx = _Context(None, {}, {id(l) for _, l in blendable}, finalize=True)
    copy = _copy_model(model)
    final = _convert_layer(model, copy, "", ctx)
    _refresh_torch_params(final)
    if verify and not unfinished:
        sample = _make_probe(model, probe)
        if sample is not None:
            # Both sides in full float32: TF32 matmuls (JAX and TensorFlow on
            # recent NVIDIA GPUs) alone move outputs by ~5e-4 (measured on an H100).
            with full_float32_matmuls():
                a, b = _outputs(final, sample), _outputs(model, sample)
            num = sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b))
            den = sum(float(np.sum(y**2)) for y in b)
            rel = (num / max(den, 1e-300)) ** 0.5
            if rel > 1e-4:
                raise RuntimeError(
                    f"finalize changed the outputs of '{model.name}' (relative error {rel:.2e}) "
                    "although every blend factor is 1: please report this bug."
                )
    return final
