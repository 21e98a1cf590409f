"""Generation with a constant-size state for converted keras-hub `CausalLM`s.

A softmax decoder carries a KV cache that keras-hub allocates up front as
`[batch, layers, 2, max_length, kv_heads, head_dim]` and reads whole at every
token. A SARA decoder needs, per layer and key/value head, only the sums

    Psi = sum_s R_s phi(k_s) v_s^T   (M x D)      Gamma = sum_s phi(k_s)   (M)

(R_s the key's RoPE rotation, identity without RoPE), whatever the context
length. Here they travel as one float32 tensor `[batch, layers, K, M, D + 1]`
(`Psi` in `[..., :D]`, `Gamma` in `[..., D]`) through keras-hub's own
`call_with_cache` and its sampler loop, in place of the KV cache.

How it plugs in. keras-hub's `generate_step` builds a KV cache of
`max_length` positions and lets the sampler overwrite slots; a linear state
cannot forget a token, so the state needs a different seed pass: the prompt
runs once ("prefix" phase) and only the tokens before the first decoding
step are summed into the state; each sampler step ("step" phase) then adds
exactly one token. `convert` installs `generate_step` below on the converted
`CausalLM` (the dynamic `SARA<CausalLM>` class), so `causal_lm.generate(...)`
works unchanged; the adapted attention layers read the phase from a context
this module sets on them while it traces. keras-hub's own `call_with_cache`
does the rest, so every family with an adapter runs through the same code.

PaliGemma's prefix (image tokens and each row's prompt) is bidirectional, as
in its training mask: the prefix pass absorbs all of it at once, and a row
whose prompt is longer than the batch's shortest skips the tokens it already
absorbed while the sampler walks over them.

Decoding needs a finalized student (blend 1: the softmax branch has no fixed
state), a token-local feature map, and every attention layer of the decoder
adapted; a `CausalLM` whose decoder was not (fully) converted, PaliGemma with
only its vision tower converted for example, keeps keras-hub's KV cache.
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np
from keras import ops

from keras_sara.adapters.base import AdaptedAttention, looks_like_attention
from keras_sara.streaming import STREAMABLE_FEATURE_MAPS


class DecodingContext:
    """What the adapted attention layers read while a decoder runs on its state.

    Attributes:
        absorbed: `(B,)` int32, per row the number of leading tokens the
            prefix pass sums into the state (its steps skip them).
        bidirectional_prefix: whether those tokens see each other in both
            directions (PaliGemma) or causally (Gemma, Llama, GPT-2).
        phase: "prefix" or "step".
    """

    def __init__(self, absorbed, bidirectional_prefix=False, phase="prefix"):
        self.absorbed = absorbed
        self.bidirectional_prefix = bidirectional_prefix
        self.phase = phase


def decoder_attention_layers(causal_lm) -> list:
    """The attention layers of a keras-hub `CausalLM`'s decoder blocks, in order."""
    found = []
    for block in causal_lm.backbone.transformer_layers:
        for layer in block._flatten_layers(include_self=False):
            if isinstance(layer, AdaptedAttention) or looks_like_attention(layer):
                found.append(layer)
    return found


def _supports_state(layer) -> bool:
    return (
        isinstance(layer, AdaptedAttention)
        and type(layer)._sara_state_dims is not AdaptedAttention._sara_state_dims
    )


def state_decoding_reason(causal_lm):
    """Why `causal_lm` cannot decode on a constant-size state, or None when it can."""
    layers = decoder_attention_layers(causal_lm)
    if not layers:
        return "its decoder has no attention layer"
    softmax = [l.name for l in layers if not isinstance(l, AdaptedAttention)]
    if softmax:
        return f"attention layers {softmax} of its decoder are softmax (not converted)"
    unsupported = sorted({type(l).__name__ for l in layers if not _supports_state(l)})
    if unsupported:
        return f"the adapters of {unsupported} have no state decoding yet"
    return None


def check_state_decoding(causal_lm) -> list:
    """The decoder's adapted attention layers; a ValueError if they cannot decode on a state."""
    reason = state_decoding_reason(causal_lm)
    if reason is not None:
        raise ValueError(f"{type(causal_lm).__name__} '{causal_lm.name}' cannot decode on a SARA state: {reason}.")
    layers = decoder_attention_layers(causal_lm)
    blending = [l.name for l in layers if l.blend_variable is not None]
    if blending:
        raise ValueError(
            f"{type(causal_lm).__name__} '{causal_lm.name}' still blends in softmax attention in "
            f"{blending} (converted with blend < 1): softmax has no constant-size state to decode "
            "with. Up-train to blend 1 and decode with `keras_sara.finalize(causal_lm)`. "
            f"Received: blend={[l.blend for l in layers if l.blend_variable is not None]}"
        )
    for l in layers:
        fm = l.feature_map
        if not getattr(fm, "token_local", isinstance(fm, STREAMABLE_FEATURE_MAPS)):
            raise ValueError(
                f"Attention '{l.name}' uses the feature map {type(l.feature_map).__name__}, whose key "
                "features depend on the whole sequence, so a one-token step cannot reproduce them. "
                f"Convert with a token-local map ({', '.join(c.__name__ for c in STREAMABLE_FEATURE_MAPS)}). "
                f"Received: feature_map={type(l.feature_map).__name__}"
            )
    shapes = {l.sara_state_shape() for l in layers}
    if len(shapes) != 1:
        raise ValueError(
            f"{type(causal_lm).__name__} '{causal_lm.name}': its decoder layers have different state "
            f"shapes {sorted(shapes)}, which keras-hub's stacked cache cannot carry."
        )
    return layers


def state_shape(causal_lm, batch_size: int = 1) -> tuple:
    """Shape `(batch, layers, K, M, D + 1)` of the decoding state of a converted `CausalLM`.

    Example:
    >>> import keras_hub, keras_sara
    >>> backbone = keras_hub.models.GPT2Backbone(vocabulary_size=50, num_layers=2, num_heads=2,
    ...     hidden_dim=8, intermediate_dim=16, max_sequence_length=32)
    >>> lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    >>> student, _ = keras_sara.convert(lm, verify=False)
    >>> keras_sara.decoding.state_shape(student, batch_size=3)
    (3, 2, 2, 4, 5)
    """
    layers = check_state_decoding(causal_lm)
    return (batch_size, len(layers)) + layers[0].sara_state_shape()


def initial_state(causal_lm, batch_size: int = 1):
    """An empty decoding state: zeros of `state_shape(causal_lm, batch_size)`, float32."""
    return ops.zeros(state_shape(causal_lm, batch_size), dtype="float32")


@contextlib.contextmanager
def decoding(layers, context: DecodingContext):
    """Set `context` on the attention `layers` for the duration of the block."""
    for layer in layers:
        object.__setattr__(layer, "_sara_decoding", context)
    try:
        yield context
    finally:
        for layer in layers:
            vars(layer).pop("_sara_decoding", None)


def _is_pali_gemma(causal_lm) -> bool:
    return hasattr(causal_lm.backbone, "vit_encoder") and hasattr(causal_lm.backbone, "image_sequence_length")


def _stop_padding_mask(token_ids, padding_mask, stop_token_ids):
    """The output mask keras-hub's generate expects: False after the first new stop token of a row."""
    from keras_hub.src.utils.tensor_utils import any_equal  # only keras-hub models get here

    if stop_token_ids is None:
        return ops.ones_like(token_ids, dtype="bool")
    stops = ops.cast(any_equal(token_ids, stop_token_ids, ops.logical_not(padding_mask)), "int32")
    return ops.equal(ops.cumsum(stops, axis=-1) - stops, 0)  # no stop token strictly before


def generate_step(self, inputs, stop_token_ids=None):
    """`CausalLM.generate_step` on a constant-size linear state (installed on converted models).

    Same inputs and outputs as keras-hub's: a dict with `"token_ids"` and
    `"padding_mask"` (and `"images"` for PaliGemma). The prompt is absorbed
    into the state in one pass, then keras-hub's sampler decodes one token per
    step through the model's own `call_with_cache`, the state in place of
    the KV cache. Falls back to keras-hub's KV-cache `generate_step` when the
    decoder was not converted.
    """
    if state_decoding_reason(self) is not None:
        return type(self)._sara_base.generate_step(self, inputs, stop_token_ids=stop_token_ids)
    layers = check_state_decoding(self)
    token_ids, padding_mask = inputs["token_ids"], inputs["padding_mask"]
    limit = max_positions(self)
    if limit is not None and token_ids.shape[1] is not None and token_ids.shape[1] > limit:
        raise ValueError(
            f"`max_length` must be at most {limit}: {type(self).__name__} '{self.name}' has learned "
            f"position embeddings for {limit} positions. Received: max_length={token_ids.shape[1]}"
        )
    batch = ops.shape(token_ids)[0]
    row_lengths = ops.sum(ops.cast(padding_mask, "int32"), axis=-1)
    index = ops.min(row_lengths)  # the sampler's first step predicts this position
    state = ops.zeros((batch, len(layers)) + layers[0].sara_state_shape(), dtype="float32")
    outputs = {}
    if _is_pali_gemma(self):
        images = inputs["images"]
        if len(ops.shape(images)) == 3:
            images = ops.expand_dims(images, axis=0)
        outputs["images"] = images
        offset = self.backbone.image_sequence_length
        # the image and every row's whole prompt, bidirectional as in training
        context = DecodingContext(row_lengths + offset, bidirectional_prefix=True)
        prefix_kwargs = {"img_embeddings": self.backbone.vit_encoder(images)}
    else:
        offset = 0
        context = DecodingContext(ops.zeros_like(row_lengths) + index - 1)
        prefix_kwargs = {}

    with decoding(layers, context):
        context.phase = "prefix"
        _, hidden_states, state = self.call_with_cache(token_ids, state, 0, **prefix_kwargs)
        context.phase = "step"

        def next(prompt, cache, index):
            position = index - 1
            token = ops.slice(prompt, [0, position], [ops.shape(prompt)[0], 1])
            logits, hidden, cache = self.call_with_cache(token, cache, position + offset)
            return ops.squeeze(logits, axis=1), ops.squeeze(hidden, axis=1), cache

        token_ids = self.sampler(
            next=next,
            prompt=token_ids,
            cache=state,
            index=index,
            mask=padding_mask,
            stop_token_ids=stop_token_ids,
            hidden_states=hidden_states,
            model=self,
        )
    outputs.update(token_ids=token_ids, padding_mask=_stop_padding_mask(token_ids, padding_mask, stop_token_ids))
    return outputs


def is_causal_lm(cls) -> bool:
    """Whether `cls` looks like a keras-hub `CausalLM` (its generate loop runs `call_with_cache`)."""
    return all(hasattr(cls, a) for a in ("call_with_cache", "generate_step", "make_generate_function"))


def max_positions(causal_lm):
    """The longest sequence the decoder can place (learned position embeddings), or None."""
    limit = getattr(causal_lm.backbone, "max_sequence_length", None)
    return int(limit) if limit else None


def _check_position(causal_lm, position, what="position") -> None:
    limit = max_positions(causal_lm)
    if limit is None:
        return
    try:
        value = int(ops.convert_to_numpy(position))
    except Exception:  # symbolic: checked where it is concrete
        return
    if not 0 <= value < limit:
        raise ValueError(
            f"`{what}` must be in [0, {limit}): {type(causal_lm).__name__} '{causal_lm.name}' has "
            f"learned position embeddings for {limit} positions (max_sequence_length). "
            f"Received: {what}={value}"
        )


class DecoderStep(keras.layers.Layer):
    """One decoding step of a converted keras-hub `CausalLM`, as a Keras layer.

    Call arguments:
        token_ids: `(B, 1)` int32, the token at `position`.
        state: `(B, layers, K, M, D + 1)` float32, the state of the tokens
            before it (`initial_state` for none).
        position: `(B,)` int32, the token's index in the sequence (the same
            for every row; row 0's is used). For PaliGemma count the image
            tokens: the first text token is at `image_sequence_length`.

    Returns:
        `(logits (B, vocabulary), new state)`.
    """

    def __init__(self, causal_lm, **kwargs):
        super().__init__(**kwargs)
        self.causal_lm = causal_lm
        self._attention = check_state_decoding(causal_lm)

    def call(self, token_ids, state, position):
        context = DecodingContext(ops.zeros_like(position), phase="step")
        with decoding(self._attention, context):
            logits, _, state = self.causal_lm.call_with_cache(
                ops.cast(token_ids, "int32"), state, ops.cast(position[0], "int32"))
        return logits[:, -1, :], state

    def compute_output_spec(self, token_ids, state, position):
        vocab = self.causal_lm.backbone.vocabulary_size
        return (keras.KerasTensor((token_ids.shape[0], vocab), dtype=self.causal_lm.compute_dtype),
                keras.KerasTensor(state.shape, dtype="float32"))


def make_decoder_step_model(causal_lm, name=None):
    """A Functional model `[token_ids (B, 1), state, position (B,)] -> [logits, state]`.

    The one-token step of a converted (finalized) keras-hub `CausalLM` with
    its linear state as an explicit input and output: what
    `export_decoder_step` writes to LiteRT, and a way to decode token by
    token in Keras with memory that does not grow with the context.

    Example:
    >>> import numpy as np, keras_hub, keras_sara
    >>> backbone = keras_hub.models.GPT2Backbone(vocabulary_size=50, num_layers=1, num_heads=2,
    ...     hidden_dim=8, intermediate_dim=16, max_sequence_length=32)
    >>> student, _ = keras_sara.convert(
    ...     keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None), verify=False)
    >>> step = keras_sara.decoding.make_decoder_step_model(student)
    >>> state = np.zeros(keras_sara.decoding.state_shape(student), "float32")
    >>> logits, state = step([np.array([[7]]), state, np.array([0])])
    >>> tuple(logits.shape), tuple(state.shape)
    ((1, 50), (1, 1, 2, 4, 5))
    """
    shape = state_shape(causal_lm, 1)[1:]
    token_ids = keras.Input((1,), dtype="int32", name="token_ids")
    state = keras.Input(shape, dtype="float32", name="state")
    position = keras.Input((), dtype="int32", name="position")
    logits, new_state = DecoderStep(causal_lm, name="decoder_step")(token_ids, state, position)
    return keras.Model([token_ids, state, position], [logits, new_state],
                       name=name or f"{causal_lm.name}_step")


def decode_tokens(step_model, tokens, state=None, start=0):
    """Run `step_model` over `tokens (B, T)` from position `start`: `(logits (B, T, V), state)`.

    Each call is one step; the state carries the history, so memory stays
    constant whatever `T`. Logits at t predict token t + 1.
    """
    tokens = np.asarray(tokens, dtype="int32")
    batch = tokens.shape[0]
    if state is None:
        state = np.zeros((batch,) + tuple(step_model.inputs[1].shape[1:]), "float32")
    expected = (batch,) + tuple(step_model.inputs[1].shape[1:])
    if tuple(np.shape(state)) != expected:
        raise ValueError(f"`state` must have shape {expected} for this step model. Received: shape {tuple(np.shape(state))}")
    causal_lm = step_model.get_layer("decoder_step").causal_lm
    _check_position(causal_lm, start + tokens.shape[1] - 1, "start + len(tokens) - 1")
    out = []
    state = np.asarray(state, "float32")
    for t in range(tokens.shape[1]):  # compiled once by predict_on_batch
        logits, state = step_model.predict_on_batch(
            [tokens[:, t : t + 1], state, np.full((batch,), start + t, "int32")])
        out.append(np.asarray(logits))
    return np.stack(out, axis=1), state


def export_decoder_step(causal_lm, path, probe_tokens: int = 8, tolerance: float = 1e-4, num_threads: int = 2,
                        **export_kwargs):
    """Write the one-token step of a converted `CausalLM` as a verified LiteRT file.

    Inputs `input_0` token_ids `(1, 1)` int32, `input_1` state
    `state_shape(causal_lm)`, `input_2` position `(1,)` int32; outputs
    `output_0` logits `(1, V)`, `output_1` the new state. Builtin ops only.
    The file is written only once LiteRT matches Keras on `probe_tokens`
    consecutive steps (relative error below `tolerance`). TensorFlow backend
    only: on JAX or PyTorch, save the student (`.keras`) and export it from
    a process with `KERAS_BACKEND=tensorflow`.

    Returns:
        the `keras_sara.export.ExportReport`.
    """
    from keras_sara import export as export_lib

    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "export_decoder_step runs on the TensorFlow backend: save the converted model with "
            "`student.save('student.keras')` and export it from a process started with "
            f"KERAS_BACKEND=tensorflow. Received: backend={keras.backend.backend()!r}"
        )
    step_model = make_decoder_step_model(causal_lm)
    vocab = causal_lm.backbone.vocabulary_size
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, vocab, (1, probe_tokens)).astype("int32")
    start = getattr(causal_lm.backbone, "image_sequence_length", 0) if _is_pali_gemma(causal_lm) else 0
    probes, state = [], np.zeros(state_shape(causal_lm, 1), "float32")
    for t in range(probe_tokens):
        position = np.array([start + t], "int32")
        probes.append([tokens[:, t : t + 1], state, position])
        _, state = step_model([tokens[:, t : t + 1], state, position])
        state = ops.convert_to_numpy(state)
    export_kwargs.setdefault("split_heads", False)
    export_kwargs.setdefault("fold_layernorm", False)
    return export_lib.export_tflite(
        step_model, path, input_shapes=[(1, 1), state.shape, (1,)], probe=probes,
        tolerance=tolerance, num_threads=num_threads, **export_kwargs)
