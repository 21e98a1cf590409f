"""The adapter mechanism: keras-hub (or your own) attention classes made SARA in place.

An attention class that is not a `keras.layers.MultiHeadAttention` (Gemma's,
Llama's, PaliGemma's ViT attention, ...) cannot be swapped for
`SARAMultiHeadAttention` without losing its own projections, RoPE and cache
logic. So `convert` keeps the layer and changes its class: the copy's layer
becomes an instance of a subclass made here, `SARA<Class>`, whose bases are
the adapter's mixin and the original class. Every variable is the layer's
own (same objects, names and paths, copied one to one from the teacher), the
original `__init__`, `build` and sublayers stay, and the original `call`
is still there as the softmax side of a blend (`super().call`).

An adapter is an `AttentionAdapter`: the mixin (which overrides `call`),
the names of the projection sublayers, and a function returning notes on
options that have no linear equivalent (logit soft-capping, sliding
windows). `register_attention(cls, adapter)` adds one; `adapter_for(layer)`
finds the most specific adapter in the layer's class hierarchy.

Persistence. The adapted class serialises as `{**base config, "sara": ...}`
under the registered name `"keras_sara>SARAAdapted"`; but inside a keras-hub
backbone the attention is created by its holder's `__init__`, so reloads go
through conversion's swap records, which store only the SARA options and
re-class the freshly built layer (`adapt_in_place`). No attention class needs
a working `get_config` (Llama's raises AttributeError in keras-hub 0.32).
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from typing import Callable

import keras
from keras import ops

from keras_sara import feature_maps as fm_lib
from keras_sara.layers.sara_state import BlendState, SARALayer, check_blend
from keras_sara.ops import kernels as la
from keras_sara.ops import structured

ADAPTED_NAME = "keras_sara>SARAAdapted"
_OPTION_KEYS = ("feature_map", "eps", "chunk_size", "blend")


@dataclasses.dataclass(frozen=True)
class AttentionAdapter:
    """How `convert` makes one attention class SARA.

    Attributes:
        mixin: a subclass of `AdaptedAttention` overriding `call` (and
            whatever else the class needs); it comes first in the MRO of
            the adapted class, so `super().call(...)` is the original.
        projections: attribute names of the projection sublayers whose
            weights must be copied exactly (checked by `convert`).
        notes: `layer -> list[str]`, options the linear path does not
            reproduce, recorded in the conversion report.
        rotary: whether the class applies RoPE (then the feature map must be
            elementwise, so rotating features is rotating per head dim).
    """

    mixin: type
    projections: tuple = ()
    notes: Callable = lambda layer: []
    rotary: bool = False


_ADAPTERS: dict = {}
_ADAPTED_CLASSES: dict = {}
# Functions that register built-in adapters lazily (keras-hub's, once it is
# imported: importing keras_sara must not import keras-hub). Each returns
# True once done.
_BUILTIN_HOOKS: list = []


def _ensure_builtins() -> None:
    for hook in list(_BUILTIN_HOOKS):
        if hook():
            _BUILTIN_HOOKS.remove(hook)


def register_attention(cls, adapter: AttentionAdapter, *, override: bool = False) -> None:
    """Register an adapter so `keras_sara.convert` converts `cls` layers.

    Args:
        cls: the attention layer class (a `keras.layers.Layer` subclass).
            Subclasses of `cls` use the adapter too unless they have their own.
        adapter: an `AttentionAdapter` whose `mixin` subclasses
            `keras_sara.adapters.AdaptedAttention` and overrides `call`.
        override: replace an adapter already registered for `cls`.

    Example:

    >>> import keras, keras_sara
    >>> from keras_sara.adapters import AdaptedAttention, AttentionAdapter
    >>> class MyAttention(keras.layers.Layer):          # your own layer
    ...     def __init__(self, heads=2, **kwargs):
    ...         super().__init__(**kwargs)
    ...         self.heads = heads
    ...     def build(self, shape):
    ...         self.qkv = keras.layers.Dense(3 * shape[-1]); self.qkv.build(shape)
    ...     def call(self, x):
    ...         q, k, v = keras.ops.split(self.qkv(x), 3, axis=-1)
    ...         w = keras.ops.softmax(keras.ops.einsum("btd,bsd->bts", q, k), axis=-1)
    ...         return keras.ops.einsum("bts,bsd->btd", w, v)
    >>> class SARAMine(AdaptedAttention):
    ...     def call(self, x):
    ...         q, k, v = keras.ops.split(self.qkv(x), 3, axis=-1)
    ...         def heads(t):                     # (B, T, D) -> (B, T, 1, D)
    ...             return keras.ops.expand_dims(t, 2)
    ...         out = self.sara_attention(heads(q), heads(k), heads(v))
    ...         out = keras.ops.squeeze(out, 2)
    ...         return self.sara_blend(out, lambda: super(SARAMine, self).call(x))
    >>> keras_sara.register_attention(
    ...     MyAttention, AttentionAdapter(SARAMine, projections=("qkv",)))
    """
    if not isinstance(cls, type) or not issubclass(cls, keras.layers.Layer):
        raise ValueError(
            "`cls` must be a keras.layers.Layer subclass (the attention class to "
            f"convert). Received: cls={cls!r}"
        )
    if not isinstance(adapter, AttentionAdapter):
        raise ValueError(
            "`adapter` must be a keras_sara.adapters.AttentionAdapter. "
            f"Received: adapter of type {type(adapter).__name__}"
        )
    if not (isinstance(adapter.mixin, type) and issubclass(adapter.mixin, AdaptedAttention)):
        raise ValueError(
            "`adapter.mixin` must subclass keras_sara.adapters.AdaptedAttention. "
            f"Received: mixin={adapter.mixin!r}"
        )
    if cls in _ADAPTERS and not override:
        raise ValueError(
            f"An adapter for {cls.__module__}.{cls.__qualname__} is already registered; pass "
            "override=True to replace it."
        )
    _ADAPTERS[cls] = adapter
    _ADAPTED_CLASSES.pop(cls, None)


def adapter_for(layer) -> AttentionAdapter | None:
    """The adapter for `layer`'s class (most specific registered base), or None."""
    return adapter_for_class(getattr(type(layer), "_sara_base", None) or type(layer))


def registered_classes() -> list:
    """Attention classes with an adapter, in registration order."""
    _ensure_builtins()
    return list(_ADAPTERS)


def looks_like_attention(layer) -> bool:
    """An attention-like layer by its class name (`...Attention...`, not a mask helper)."""
    name = type(layer).__name__
    return "Attention" in name and "Mask" not in name and not isinstance(layer, SARALayer)


def _base_identity(cls) -> dict:
    return {"module": cls.__module__, "class_name": cls.__name__}


def _resolve_base(identity: dict):
    try:
        cls = getattr(importlib.import_module(identity["module"]), identity["class_name"])
    except (ImportError, AttributeError, KeyError) as e:
        raise TypeError(
            f"Could not locate attention class {identity!r}, the base of a SARA-adapted layer: "
            "import the module that defines it before loading."
        ) from e
    return cls


def adapted_class(base):
    """The `SARA<base>` class: the adapter's mixin first, then `base`."""
    base = getattr(base, "_sara_base", None) or base
    cls = _ADAPTED_CLASSES.get(base)
    if cls is not None:
        return cls
    adapter = adapter_for_class(base)
    if adapter is None:
        raise ValueError(f"No SARA adapter is registered for {base.__module__}.{base.__qualname__}.")
    cls = type(
        f"SARA{base.__name__}",
        (adapter.mixin, base),
        {
            "__module__": __name__,
            "__doc__": f"`{base.__name__}` with SARA linear attention (made by keras_sara.convert).",
            "_sara_base": base,
            "_sara_adapter": adapter,
        },
    )
    keras.saving.register_keras_serializable(package="keras_sara", name="SARAAdapted")(cls)
    keras.saving.get_custom_objects()[ADAPTED_NAME] = _AdaptedResolver
    _ADAPTED_CLASSES[base] = cls
    return cls


def adapter_for_class(cls) -> AttentionAdapter | None:
    """The adapter of the most specific registered base of `cls`, or None."""
    _ensure_builtins()
    for klass in cls.__mro__:
        if klass in _ADAPTERS:
            # a subclass with its own `call` (T5Gemma's, Moonshine's) computes
            # something the base's adapter does not know: it needs its own
            return _ADAPTERS[klass] if getattr(cls, "call", None) is getattr(klass, "call", None) else None
    return None


def overridden_base(cls):
    """The registered base whose adapter `cls` cannot use because it overrides `call`, or None."""
    _ensure_builtins()
    for klass in cls.__mro__:
        if klass in _ADAPTERS:
            return None if getattr(cls, "call", None) is getattr(klass, "call", None) else klass
    return None


def check_options(options: dict, adapter: AttentionAdapter, where: str) -> dict:
    """Validate SARA options for an adapted layer; returns a clean copy."""
    unknown = sorted(set(options) - set(_OPTION_KEYS))
    if unknown:
        raise ValueError(f"Unknown SARA options {unknown} for {where}. Received: {options!r}")
    options = dict(options)
    fm = fm_lib.get(options.get("feature_map", "relu"))
    if adapter.rotary and not getattr(fm, "elementwise", False):
        raise ValueError(
            f"{where} applies rotary position embeddings (RoPE), which SARA rotates in "
            "feature space: that needs an elementwise feature map (\"relu\" or \"elu+1\"). "
            f"Received: feature_map={options.get('feature_map')!r}"
        )
    la.validate_eps(options.get("eps", la.DEFAULT_EPS))
    la.validate_chunk_size(options.get("chunk_size", la.DEFAULT_CHUNK_SIZE))
    check_blend("blend", options.get("blend", 1.0))
    return options


def adapt_in_place(layer, options: dict):
    """Make `layer` (an instance of a class with an adapter) SARA, keeping its variables."""
    cls = adapted_class(type(layer))
    if type(layer) is cls and "_sara_options" in vars(layer):
        return layer  # already adapted (a layer shared by two holders is reached twice)
    options = check_options(options, cls._sara_adapter, f"{type(layer).__name__} '{layer.name}'")
    if type(layer) is not cls:
        layer.__class__ = cls
    layer._sara_setup(options)
    return layer


class _AdaptedResolver:
    """Resolver for `"keras_sara>SARAAdapted"` (a layer that is a Functional graph node)."""

    @classmethod
    def from_config(cls, config, *args, **kwargs):
        spec = dict(config).get("sara") or {}
        base = _resolve_base(spec.get("base", {}))
        return adapted_class(base).from_config(config, *args, **kwargs)

    def get_config(self):  # required by the registry; never called
        return {}


keras.saving.get_custom_objects()[ADAPTED_NAME] = _AdaptedResolver


class AdaptedAttention(SARALayer):
    """Mixin of every adapted attention class: SARA state and the linear core.

    An adapter's mixin subclasses this and overrides `call`, projecting as
    the original does, then calling `sara_attention(q, k, v, ...)` for the
    attention itself and `sara_blend(out, teacher_fn)` to mix in the
    original's own softmax output while a blend schedule runs.
    """

    _supported_distillation_targets = ("outputs",)

    # ------------------------------------------------------------- set-up

    def _sara_setup(self, options: dict) -> None:
        # A built layer's tracker is locked against new state; we add sublayers.
        locked = getattr(self._tracker, "locked", False)
        self._tracker.unlock()
        try:
            self._sara_setup_unlocked(options)
        finally:
            if locked:
                self._tracker.lock()

    def _sara_setup_unlocked(self, options: dict) -> None:
        object.__setattr__(self, "_sara_options", dict(options))
        blend = float(options.get("blend", 1.0))
        self.eps = la.validate_eps(options.get("eps", la.DEFAULT_EPS))
        self.chunk_size = la.validate_chunk_size(options.get("chunk_size", la.DEFAULT_CHUNK_SIZE))
        self.blend = blend
        self._warned_quadratic = False
        self._distillation_target = None
        self._fidelity_records = None
        self.feature_map = fm_lib.get(options.get("feature_map", "relu"))
        self._blend_state = BlendState(blend, name="blend_state") if blend < 1.0 else None
        if self.built:
            self._sara_build_extras()

    def _sara_build_extras(self) -> None:
        """Build the feature map and blend state under this layer's name scope, after its own sublayers."""
        scope = self.path or self.name
        parts = scope.split("/")
        with keras.name_scope(parts[-1], override_parent="/".join(parts[:-1]) or None):
            if not self.feature_map.built:
                self.feature_map.build(self._sara_feature_shape())
            if self._blend_state is not None and not self._blend_state.built:
                self._blend_state.build()
        for sub in (self.feature_map, self._blend_state):
            if sub is not None and sub in self._layers:
                self._layers.remove(sub)
                self._layers.append(sub)

    def _sara_feature_shape(self):
        """`(None, None, heads, head_dim)` of the query projection: what the feature map sees."""
        raise NotImplementedError

    def build(self, *args, **kwargs):
        super().build(*args, **kwargs)
        self._sara_build_extras()

    def sara_options(self) -> dict:
        """The SARA options this layer was made with (feature map as a config)."""
        options = dict(self._sara_options)
        fm = fm_lib.serialize(self.feature_map)
        fm.pop("build_config", None)
        options["feature_map"] = fm
        options["blend"] = self.blend
        return options

    def set_linear_only(self) -> None:
        """Drop the softmax branch (blend state), as `keras_sara.finalize` does."""
        if self._blend_state is not None:
            self._tracker.untrack(self._blend_state)
            object.__setattr__(self, "_blend_state", None)
        self.blend = 1.0
        self._sara_options["blend"] = 1.0

    # -------------------------------------------------------------- config

    def get_config(self):
        config = super().get_config()
        config["sara"] = {"base": _base_identity(self._sara_base), "options": self.sara_options()}
        return config

    @classmethod
    def from_config(cls, config, *args, **kwargs):
        config = dict(config)
        spec = config.pop("sara", None) or {}
        obj = cls._sara_base.from_config(config, *args, **kwargs)
        return adapt_in_place(obj, spec.get("options", {}))

    # ---------------------------------------------------------- attention

    def sara_features(self, q, k):
        """Feature-mapped queries `(B, T, N, M)` and keys `(B, S, K, M)`."""
        return self.feature_map(q, role="query"), self.feature_map(k, role="key")

    def sara_attention(self, q, k, v, mask=None, rotate_query=None, rotate_key=None, self_attention=True):
        """SARA linear attention on projected (not yet rotated) heads.

        Args:
            q: query projections `(B, T, N, h)`.
            k, v: key and value projections `(B, S, K, h)`, N a multiple of K.
            mask: None, a boolean `(B, 1, S)` key mask, or a dense boolean
                `(B, T, S)` mask. With `self_attention` (T == S, no cache) a
                dense mask is read as prefix-causal (the masks keras-hub's
                blocks build) and computed linearly; a mask of any other form
                falls back to the exact kernel-matrix path.
            rotate_query, rotate_key: the layer's RoPE, applied to the
                feature-mapped queries and keys for the numerator.
            self_attention: whether keys are the queries' own tokens.

        Returns:
            `(B, T, N, h_v)` in the layer's compute dtype.
        """
        fq, fk = self.sara_features(q, k)
        q_rot = None if rotate_query is None else rotate_query(fq)
        k_rot = None if rotate_key is None else rotate_key(fk)
        eps, chunk = self.eps, self.chunk_size
        if mask is None:
            out = structured.structured_linear_attention(fq, fk, v, None, None, q_rot, k_rot, eps, chunk)
        else:
            mask = ops.cast(mask, "bool")
            if len(mask.shape) == 2:
                mask = ops.expand_dims(mask, 1)
            if mask.shape[1] == 1:  # key padding only
                out = structured.structured_linear_attention(
                    fq, fk, v, mask[:, 0, :], None, q_rot, k_rot, eps, chunk)
            elif self_attention:
                bidir, causal, exact = structured.split_prefix_causal_mask(mask)

                def linear():
                    return structured.structured_linear_attention(
                        fq, fk, v, bidir, causal, q_rot, k_rot, eps, chunk)

                def quadratic():
                    return structured.masked_kernel_attention(fq, fk, v, mask, q_rot, k_rot, eps)

                out = ops.cond(exact, linear, quadratic)
            else:
                self._warn_quadratic()
                out = structured.masked_kernel_attention(fq, fk, v, mask, q_rot, k_rot, eps)
        return ops.cast(out, self.compute_dtype)

    # ------------------------------------------------- constant-state decoding

    def sara_decoding(self):
        """The decoding context `keras_sara.decoding` set on this layer, or None.

        While a converted keras-hub `CausalLM` generates (or a decoder step
        is exported), the `cache` its blocks hand to this layer is not a KV
        cache but this layer's linear state `(B, K, M, D + 1)`: `Psi` in
        `[..., :D]` and `Gamma` in `[..., D]`, see `sara_state_attention`.
        """
        return vars(self).get("_sara_decoding")

    def sara_state_shape(self) -> tuple:
        """Per-example shape `(K, M, D + 1)` of this layer's decoding state."""
        heads, head_dim, value_dim = self._sara_state_dims()
        return (heads, self.feature_map.feature_dim(head_dim), value_dim + 1)

    def _sara_state_dims(self) -> tuple:
        """`(key/value heads, key head size, value head size)`."""
        raise NotImplementedError

    def sara_state_attention(self, q, k, v, state, position, rotate=None):
        """Causal linear attention that reads and returns a constant-size state.

        Two phases, set by the decoding context: "prefix" runs the whole
        prompt at once (`position` 0), attending causally (or, for a prefix-LM
        such as PaliGemma, bidirectionally over each row's first
        `context.absorbed[b]` tokens) and returning the state of those first
        `absorbed[b]` tokens; "step" runs one token at `position`, adds it to
        the state (rows whose token at `position` was already absorbed by the
        prefix are left as they are) and attends over the state.

        Args:
            q: query projections `(B, T, N, h)`; k, v: `(B, T, K, h)`.
            state: `(B, K, M, D + 1)` float32.
            position: index of the first token of `q` in the sequence.
            rotate: `(features, start_index) -> rotated`, the layer's RoPE.

        Returns:
            `(out (B, T, N, D), new state)`.
        """
        context = self.sara_decoding()
        fq, fk = self.sara_features(q, k)
        fq, fk, v = (ops.cast(x, "float32") for x in (fq, fk, v))
        q_rot = fq if rotate is None else ops.cast(rotate(fq, position), "float32")
        k_rot = fk if rotate is None else ops.cast(rotate(fk, position), "float32")
        absorbed = ops.cast(context.absorbed, "int32")  # (B,)
        length = ops.shape(q)[1]
        positions = ops.arange(length, dtype="int32") + ops.cast(position, "int32")  # (T,)
        if context.phase == "prefix":
            gate = ops.expand_dims(positions, 0) < ops.expand_dims(absorbed, 1)  # (B, T) absorbed
            causal = ops.ones_like(gate)
            bidir = gate if context.bidirectional_prefix else None
            out = structured.structured_linear_attention(
                fq, fk, v, bidir, causal, None if rotate is None else q_rot,
                None if rotate is None else k_rot, self.eps, self.chunk_size)
            g = ops.cast(ops.reshape(gate, (ops.shape(gate)[0], length, 1, 1)), "float32")
            psi = ops.einsum("btkm,btkd->bkmd", k_rot * g, v)
            gamma = ops.sum(fk * g, axis=1)  # (B, K, M)
        else:
            if q.shape[1] != 1:
                raise ValueError(
                    f"{type(self).__name__} '{self.name}': a decoding step takes one token. "
                    f"Received: {q.shape[1]} tokens")
            gate = ops.expand_dims(positions, 0) >= ops.expand_dims(absorbed, 1)  # (B, 1) new token
            g = ops.cast(ops.reshape(gate, (ops.shape(gate)[0], 1, 1, 1)), "float32")
            state = ops.cast(state, "float32")
            psi = state[..., :-1] + ops.einsum("btkm,btkd->bkmd", k_rot * g, v)
            gamma = state[..., -1] + ops.sum(fk * g, axis=1)
            heads_kv = k.shape[2]
            batch = ops.shape(q)[0]
            qg = ops.reshape(q_rot, (batch, 1, heads_kv, q.shape[2] // heads_kv, fq.shape[-1]))
            fg = ops.reshape(fq, (batch, 1, heads_kv, q.shape[2] // heads_kv, fq.shape[-1]))
            num = ops.einsum("btkgm,bkmd->btkgd", qg, psi)
            den = ops.einsum("btkgm,bkm->btkg", fg, gamma)
            out = num / (ops.expand_dims(den, -1) + self.eps)
            out = ops.reshape(out, (batch, 1, q.shape[2], v.shape[-1]))
        new_state = ops.concatenate([psi, ops.expand_dims(gamma, -1)], axis=-1)
        return ops.cast(out, self.compute_dtype), new_state

    def sara_blend(self, linear_out, teacher_fn, training=None):
        """Mix in the original layer's softmax output while a blend runs.

        `teacher_fn()` calls the original class's `call` (the teacher, same
        weights); it runs only when the layer was converted with blend < 1,
        or in an eager fidelity probe. Distillation (`"outputs"`) compares
        the layer outputs, after the output projection.
        """
        records = self._fidelity_records
        if self._blend_state is None and records is None:
            return linear_out
        soft_out = teacher_fn()
        if isinstance(soft_out, (tuple, list)):
            soft_out = soft_out[0]
        if records is not None:
            s, t = ops.cast(linear_out, "float32"), ops.cast(soft_out, "float32")
            records.append(ops.sqrt(ops.sum(ops.square(s - t)) / (ops.sum(ops.square(t)) + 1e-30)))
        if self._blend_state is None:
            return linear_out
        if training and self._distillation_target == "outputs":
            t = ops.stop_gradient(ops.cast(soft_out, "float32"))
            s = ops.cast(linear_out, "float32")
            loss = ops.sum(ops.square(s - t)) / (ops.sum(ops.square(t)) + 1e-12)
            self.add_loss(ops.cast(self._blend_state.distillation_weight, "float32") * loss)
        return self._mix(soft_out, linear_out)

    def sara_check_cache(self, cache):
        if cache is not None and self._blend_state is not None:
            raise ValueError(
                f"{type(self).__name__} '{self.name}' still blends in softmax attention "
                "(converted with blend < 1), whose KV cache holds rotated keys while SARA's "
                "holds the projections: decode with the finalized model "
                "(`keras_sara.finalize(student)`) instead. Received: cache of shape "
                f"{tuple(cache.shape)}"
            )

    def _warn_quadratic(self):
        if self._warned_quadratic:
            return
        self._warned_quadratic = True
        warnings.warn(
            f"{type(self).__name__} '{self.name}' received a dense attention mask between "
            "different query and key sequences: honoured exactly through the (T, S) kernel "
            "matrix, at quadratic cost.",
            stacklevel=3,
        )
