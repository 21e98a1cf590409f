"""An RT-2 policy on keras-hub's PaliGemma: camera frames, instruction and gripper in, actions out.

RT-2 is a vision-language model fine-tuned to emit actions; in Keras the open
model of that family is keras-hub's PaliGemma (a SigLIP-style ViT and a Gemma
decoder reading the image tokens and a text prompt). This module builds one
from keras-hub's own classes, by constructor (random init, a size a 2-core
CPU trains; nothing downloaded), for the grasping task of `env.GraspingEnv`:

- **Images.** The last `history` RGB frames (`image_size` px, uint8), oldest
  first. Each goes through the same `PaliGemmaVit` on its own
  (`FrameEncoder`), and the frames' tokens are concatenated into the
  decoder's prefix, oldest first: the decoder's RoPE positions tell the
  frames apart. PaliGemma's prefix has no per-image mask, so at the start
  of an episode the first frame stands in for the frames not seen yet
  (`FrameHistory`), rather than a black frame the policy never saw.
- **Prompt.** `[BOS] instruction words, 6 gripper-state tokens [SEP]`: each
  gripper number is discretised into `GRIPPER_BINS` bins over its range,
  with its own tokens per dimension (`prompt_tokens`).
- **Actions, two interfaces as in the paper.**
  - `"tokens"` (RT-2): each action dimension in [-1, 1] is discretised into
    `ACTION_BINS` bins, which are tokens of the vocabulary
    (`ActionTokenizer`); the decoder emits them greedily after `[SEP]`,
    constrained to action tokens (`decode_action_tokens`).
  - `"vector"` (the paper's SARA RT-2 variant): a tanh head on the decoder's
    state at `[SEP]`.

The token policy is a `PaliGemmaCausalLM` (`MultiFramePaliGemmaCausalLM`, whose
backbone takes `(B, H, S, S, 3)` frames), so `keras_sara.convert` reaches its
`PaliGemmaVitAttention` (`vit_attention`, the paper's choice) and its
`CachedGemmaAttention` (`decoder_attention`) through the keras-hub adapters,
and a converted, finalized decoder decodes on the constant-size SARA state
(`keras_sara.decoding`); the teacher decodes with keras-hub's KV cache.

    from vla_policy import ActionTokenizer, build_vla_policy, decode_action_tokens, vla_inputs
    policy = build_vla_policy(history=3, interface="tokens")
    inputs = vla_inputs(images, gripper)                 # images (1, 3, 64, 64, 3) uint8
    tokens = decode_action_tokens(policy, inputs)        # (1, 3) action tokens
    action = ActionTokenizer().decode(tokens)[0]          # (3,) in [-1, 1]
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from env import ACTION_DIM, CROP_HIGH, CROP_LOW, GRIPPER_DIM  # noqa: E402
from image_policy import INSTRUCTION, VOCABULARY, check_image, tokenize  # noqa: E402

IMAGE_SIZE = 64
INTERFACES = ("tokens", "vector")
#: PaliGemma at a size this CPU trains (keras-hub `PaliGemmaBackbone` arguments).
VLA_CONFIG = dict(
    vit_patch_size=8, vit_num_heads=4, vit_hidden_dim=64, vit_num_layers=3, vit_intermediate_dim=128,
    num_layers=2, num_query_heads=4, num_key_value_heads=1, hidden_dim=64, head_dim=16, intermediate_dim=128,
)
HEAD_UNITS = 128
ACTION_BINS = 256  # RT-2's bins per action dimension
GRIPPER_BINS = 32
#: Range of each gripper number (x, y, z in metres, sin and cos of the yaw, finger opening in rad).
GRIPPER_LOW = np.array([CROP_LOW[0], CROP_LOW[1], CROP_LOW[2], -1.0, -1.0, 0.0], np.float32)
GRIPPER_HIGH = np.array([CROP_HIGH[0], CROP_HIGH[1], CROP_HIGH[2], 1.0, 1.0, 0.4], np.float32)
PACKAGE = "keras_sara_examples"

# Vocabulary: the instruction words (image_policy's, 0 is padding), BOS and SEP, the gripper
# tokens (GRIPPER_BINS per dimension), then the action tokens (ACTION_BINS, shared by the dimensions).
BOS = len(VOCABULARY)
SEP = BOS + 1
GRIPPER_BASE = SEP + 1
ACTION_BASE = GRIPPER_BASE + GRIPPER_DIM * GRIPPER_BINS
VOCABULARY_SIZE = ACTION_BASE + ACTION_BINS


def _push_frame(frames: list, item, history: int) -> list:
    """The last `history` items after `item`; at an episode's start the first item fills the history."""
    return ((frames or [item] * history) + [item])[-history:]


class InvalidActionTokens(ValueError):
    """A decode that is not `ACTION_DIM` valid action tokens: the control loop must not act on it."""


class ActionTokenizer:
    """Continuous actions in [-1, 1] <-> bins <-> action tokens, RT-2 style.

    Bin `b` of `bins` covers `[-1 + 2b/bins, -1 + 2(b+1)/bins)`; it decodes to
    its centre, so a round trip moves an action by at most `1 / bins`.

        tok = ActionTokenizer()
        tokens = tok.encode(np.array([[0.3, -1.0, 0.99]]))   # (1, 3) ints in tok.token_range
        tok.decode(tokens)                                     # within 1/256 of the input
    """

    def __init__(self, bins: int = ACTION_BINS, base: int = ACTION_BASE, action_dim: int = ACTION_DIM):
        for arg, value in (("bins", bins), ("base", base), ("action_dim", action_dim)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (2 if arg == "bins" else 0):
                raise ValueError(f"`{arg}` must be a non-negative integer (bins >= 2). Received: {arg}={value!r}")
        self.bins, self.base, self.action_dim = int(bins), int(base), int(action_dim)
        self.token_range = (self.base, self.base + self.bins)  # [low, high)

    def to_bins(self, actions) -> np.ndarray:
        a = np.asarray(actions, np.float64)
        if a.shape[-1:] != (self.action_dim,) or not np.all(np.isfinite(a)):
            raise ValueError(f"`actions` must hold finite values with last axis {self.action_dim}. "
                             f"Received: actions of shape {a.shape}")
        if np.any(np.abs(a) > 1 + 1e-6):
            raise ValueError(f"`actions` must lie in [-1, 1]. Received: values from {a.min():.3g} to {a.max():.3g}")
        return np.clip(np.floor((a + 1.0) / 2.0 * self.bins), 0, self.bins - 1).astype(np.int64)

    def from_bins(self, bins) -> np.ndarray:
        return ((np.asarray(bins, np.float64) + 0.5) / self.bins * 2.0 - 1.0).astype(np.float32)

    def encode(self, actions) -> np.ndarray:
        """`(..., action_dim)` actions -> int32 action tokens."""
        return (self.to_bins(actions) + self.base).astype(np.int32)

    def decode(self, tokens) -> np.ndarray:
        """`(..., action_dim)` action tokens -> float32 actions; InvalidActionTokens for anything else."""
        t = np.asarray(tokens)
        if t.ndim == 0 or t.shape[-1] != self.action_dim:
            raise InvalidActionTokens(f"an action needs {self.action_dim} action tokens (one per dimension); "
                                      f"the decode gave shape {t.shape}: truncated or too long")
        if not np.issubdtype(t.dtype, np.integer):
            raise InvalidActionTokens(f"action tokens must be integers. Received: dtype {t.dtype}")
        bad = (t < self.token_range[0]) | (t >= self.token_range[1])
        if np.any(bad):
            raise InvalidActionTokens(
                f"the decode holds {int(bad.sum())} token(s) outside the action tokens "
                f"[{self.token_range[0]}, {self.token_range[1]}): {sorted(set(t[bad].tolist()))[:8]}")
        return self.from_bins(t - self.base)


def gripper_tokens(gripper) -> np.ndarray:
    """`(..., 6)` gripper states -> `(..., 6)` int32 tokens (each dimension its own `GRIPPER_BINS` tokens)."""
    g = np.asarray(gripper, np.float32)
    if g.shape[-1:] != (GRIPPER_DIM,) or not np.all(np.isfinite(g)):
        raise ValueError(f"`gripper` must hold finite values with last axis {GRIPPER_DIM}. Received: shape {g.shape}")
    frac = (g - GRIPPER_LOW) / (GRIPPER_HIGH - GRIPPER_LOW)
    bins = np.clip(np.floor(frac * GRIPPER_BINS), 0, GRIPPER_BINS - 1).astype(np.int32)
    return GRIPPER_BASE + np.arange(GRIPPER_DIM, dtype=np.int32) * GRIPPER_BINS + bins


def instruction_tokens(instruction: str = INSTRUCTION) -> np.ndarray:
    """The instruction's word ids (`image_policy.tokenize`), without its padding."""
    ids = tokenize(instruction)
    return ids[ids != 0]


def prompt_tokens(gripper, instruction: str = INSTRUCTION) -> np.ndarray:
    """`(B, 6)` gripper states -> `(B, P)` prompts `[BOS] words gripper [SEP]` (P = words + 8)."""
    g = gripper_tokens(np.atleast_2d(gripper))
    words = np.repeat(instruction_tokens(instruction)[None], len(g), axis=0)
    bos, sep = np.full((len(g), 1), BOS, np.int32), np.full((len(g), 1), SEP, np.int32)
    return np.concatenate([bos, words, g, sep], axis=1)


def vla_inputs(images, gripper, instruction: str = INSTRUCTION, actions=None) -> dict:
    """The policy's input dict for `(B, H, S, S, 3)` uint8 frames and `(B, 6)` gripper states.

    Without `actions`: the prompt only (for decoding and the vector head).
    With `(B, 3)` actions: the prompt followed by their action tokens
    (teacher forcing), with `response_mask` marking the action tokens.
    `images=None` leaves the frames out, for a caller that passes their
    cached ViT tokens (`decode_action_tokens`, `vector_actions`).
    """
    prompt = prompt_tokens(gripper, instruction)
    inputs = {}
    if images is not None:
        images = np.asarray(images)
        if images.ndim != 5 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"`images` must be uint8 frames (batch, history, size, size, 3). "
                             f"Received: images of shape {images.shape} and dtype {images.dtype}")
        if len(prompt) != len(images):
            raise ValueError(f"`gripper` must have one row per batch element ({len(images)}). "
                             f"Received: {len(prompt)}")
        inputs["images"] = images
    response = np.zeros_like(prompt)
    if actions is not None:
        action_tokens = ActionTokenizer().encode(actions)
        prompt = np.concatenate([prompt, action_tokens], axis=1)
        response = np.concatenate([response, np.ones_like(action_tokens)], axis=1)
    return {**inputs, "token_ids": prompt, "padding_mask": np.ones_like(prompt), "response_mask": response}


def token_targets(inputs) -> tuple[np.ndarray, np.ndarray]:
    """Next-token targets and weights for teacher-forced `vla_inputs(..., actions=...)`: the action tokens only."""
    ids, response = inputs["token_ids"], inputs["response_mask"]
    target = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1)
    weight = np.concatenate([response[:, 1:], np.zeros_like(response[:, :1])], axis=1).astype(np.float32)
    return target, weight


def vla_classes() -> dict:
    """The policy's classes, registered with Keras for loading (defined on first call)."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    import keras
    import keras_hub
    from keras import ops
    from keras_hub.src.layers.modeling.reversible_embedding import ReversibleEmbedding
    from keras_hub.src.models.gemma.rms_normalization import RMSNormalization
    from keras_hub.src.models.pali_gemma.pali_gemma_decoder_block import PaliGemmaDecoderBlock
    from keras_hub.src.models.pali_gemma.pali_gemma_vit import PaliGemmaVit

    @keras.saving.register_keras_serializable(package=PACKAGE)
    class FrameEncoder(keras.layers.Layer):
        """`(B, H, S, S, 3)` uint8 frames -> `(B, H * n, D)`: one `PaliGemmaVit` call per frame.

        `encode_frame` runs one frame `(B, S, S, 3)`: a deployed policy caches
        the tokens of older frames and encodes only the new one.
        """

        def __init__(self, history, vit: keras.Model, **kwargs):
            super().__init__(**kwargs)
            self.history, self.vit = int(history), vit
            self.tokens_per_frame = int(vit.image_sequence_length)
            self.image_sequence_length = self.history * self.tokens_per_frame

        def encode_frame(self, frame):
            x = ops.cast(frame, self.compute_dtype) / 127.5 - 1.0
            return self.vit(x)

        def call(self, images):
            size = images.shape[2]
            frames = ops.reshape(images, (-1, size, size, 3))
            tokens = self.encode_frame(frames)  # (B*H, n, D)
            return ops.reshape(tokens, (-1, self.image_sequence_length, tokens.shape[-1]))

        def compute_output_shape(self, shape):
            return (shape[0], self.image_sequence_length, self.vit.output_shape[-1])

        def get_config(self):
            return {**super().get_config(), "history": self.history,
                    "vit": keras.saving.serialize_keras_object(self.vit)}

        @classmethod
        def from_config(cls, config):
            config = dict(config)
            config["vit"] = keras.saving.deserialize_keras_object(config["vit"])
            return cls(**config)

    @keras.saving.register_keras_serializable(package=PACKAGE)
    class MultiFramePaliGemmaBackbone(keras_hub.models.PaliGemmaBackbone):
        """keras-hub's `PaliGemmaBackbone` reading `history` frames: `images` is `(B, H, S, S, 3)` uint8.

        The same layers (`PaliGemmaVit`, `PaliGemmaDecoderBlock`s, tied
        `ReversibleEmbedding`, final RMS norm) and attribute names as
        keras-hub's class, so `PaliGemmaCausalLM` and keras-sara's adapters
        and decoding use it unchanged; only the vision encoder is wrapped.
        """

        def __init__(self, history, vocabulary_size, image_size, num_layers, num_query_heads,
                     num_key_value_heads, hidden_dim, intermediate_dim, head_dim, vit_patch_size,
                     vit_num_heads, vit_hidden_dim, vit_num_layers, vit_intermediate_dim,
                     layer_norm_epsilon=1e-6, dtype=None, **kwargs):
            kwargs.pop("vit_pooling", None), kwargs.pop("vit_classifier_activation", None), kwargs.pop("vit_name", None)
            for key in ("query_head_dim_normalize", "use_post_ffw_norm", "use_post_attention_norm",
                        "attention_logit_soft_cap", "final_logit_soft_cap", "use_sliding_window_attention",
                        "sliding_window_size", "dropout"):
                kwargs.pop(key, None)  # keras-hub's defaults (get_config writes them)
            self.token_embedding = ReversibleEmbedding(
                input_dim=vocabulary_size, output_dim=hidden_dim, tie_weights=True,
                embeddings_initializer=keras.initializers.VarianceScaling(
                    scale=1.0, mode="fan_in", distribution="untruncated_normal"),
                dtype=dtype, name="token_embedding")
            vit = PaliGemmaVit(image_size=image_size, patch_size=vit_patch_size, num_heads=vit_num_heads,
                               hidden_dim=vit_hidden_dim, num_layers=vit_num_layers,
                               intermediate_dim=vit_intermediate_dim, num_classes=hidden_dim, dtype=dtype,
                               name="vit")
            self.vit_encoder = FrameEncoder(history, vit, dtype=dtype, name="frame_encoder")
            self.transformer_layers = [
                PaliGemmaDecoderBlock(hidden_dim=hidden_dim, intermediate_dim=intermediate_dim, head_dim=head_dim,
                                      num_query_heads=num_query_heads, num_key_value_heads=num_key_value_heads,
                                      dtype=dtype, name=f"decoder_block_{i}")
                for i in range(num_layers)
            ]
            self.layer_norm = RMSNormalization(epsilon=layer_norm_epsilon, dtype=dtype, name="final_normalization")

            images = keras.Input((history, image_size, image_size, 3), dtype="uint8", name="images")
            token_ids = keras.Input((None,), dtype="int32", name="token_ids")
            padding_mask = keras.Input((None,), dtype="int32", name="padding_mask")
            response_mask = keras.Input((None,), dtype="int32", name="response_mask")
            x = self.token_embedding(token_ids)
            x = x * ops.cast(ops.sqrt(hidden_dim), x.dtype)
            x = ops.concatenate((self.vit_encoder(images), x), axis=1)
            for block in self.transformer_layers:
                x = block(x, padding_mask=padding_mask, response_mask=response_mask)
            keras_hub.models.Backbone.__init__(
                self,
                inputs={"images": images, "token_ids": token_ids, "padding_mask": padding_mask,
                        "response_mask": response_mask},
                outputs=self.layer_norm(x), dtype=dtype, **kwargs)
            self.history = int(history)
            self.vocabulary_size, self.image_size, self.num_layers = vocabulary_size, image_size, num_layers
            self.num_query_heads, self.num_key_value_heads = num_query_heads, num_key_value_heads
            self.hidden_dim, self.intermediate_dim, self.head_dim = hidden_dim, intermediate_dim, head_dim
            self.vit_patch_size, self.vit_num_heads, self.vit_hidden_dim = vit_patch_size, vit_num_heads, vit_hidden_dim
            self.vit_num_layers, self.vit_intermediate_dim = vit_num_layers, vit_intermediate_dim
            self.vit_pooling = self.vit_classifier_activation = self.vit_name = None
            self.query_head_dim_normalize, self.use_post_ffw_norm, self.use_post_attention_norm = True, False, False
            self.attention_logit_soft_cap = self.final_logit_soft_cap = None
            self.use_sliding_window_attention, self.sliding_window_size = False, 4096
            self.layer_norm_epsilon, self.dropout = layer_norm_epsilon, 0
            self.image_sequence_length = self.vit_encoder.image_sequence_length

        def get_config(self):
            return {**super().get_config(), "history": self.history}

    @keras.saving.register_keras_serializable(package=PACKAGE)
    class MultiFramePaliGemmaCausalLM(keras_hub.models.PaliGemmaCausalLM):
        """`PaliGemmaCausalLM` over `MultiFramePaliGemmaBackbone` (no preprocessor: token ids in)."""

    @keras.saving.register_keras_serializable(package=PACKAGE)
    class LastToken(keras.layers.Layer):
        """`(B, T, D)` -> `(B, D)`: the decoder's state at the last prompt token (`[SEP]`)."""

        def call(self, states):
            return states[:, -1, :]

        def compute_output_shape(self, shape):
            return (shape[0], shape[2])

    _CLASSES = dict(FrameEncoder=FrameEncoder, MultiFramePaliGemmaBackbone=MultiFramePaliGemmaBackbone,
                    MultiFramePaliGemmaCausalLM=MultiFramePaliGemmaCausalLM, LastToken=LastToken)
    return _CLASSES


_CLASSES = None


def build_vla_policy(history: int = 1, interface: str = "tokens", image_size: int = IMAGE_SIZE, seed: int = 0,
                     name=None):
    """A PaliGemma grasping policy (softmax: the teacher), random init.

    Args:
        history: frames the policy sees, H >= 1 (the current frame last).
        interface: `"tokens"` (a `MultiFramePaliGemmaCausalLM` emitting
            action tokens) or `"vector"` (a functional model: the backbone,
            then a tanh head on the state at `[SEP]`, actions `(B, 3)`).
        image_size: frame side in pixels, a multiple of the ViT patch (8).
        seed: weight initialisation seed.

    Returns:
        The policy. Both take `vla_inputs(...)` dicts.
    """
    import keras

    for arg, value, low in (("history", history, 1), ("image_size", image_size, 8)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"`{arg}` must be an integer >= {low}. Received: {arg}={value!r}")
    if image_size % VLA_CONFIG["vit_patch_size"]:
        raise ValueError(f"`image_size` must be a multiple of {VLA_CONFIG['vit_patch_size']}. "
                         f"Received: image_size={image_size}")
    if interface not in INTERFACES:
        raise ValueError(f"`interface` must be one of {INTERFACES}. Received: interface={interface!r}")
    classes = vla_classes()
    keras.utils.set_random_seed(seed)
    backbone = classes["MultiFramePaliGemmaBackbone"](
        history=history, vocabulary_size=VOCABULARY_SIZE, image_size=image_size, name="backbone", **VLA_CONFIG)
    name = name or f"vla_{interface}_h{history}"
    if interface == "tokens":
        return classes["MultiFramePaliGemmaCausalLM"](backbone=backbone, preprocessor=None, name=name)
    inputs = backbone.input
    states = backbone(inputs)
    last = classes["LastToken"](name="sep_state")(states)
    h = keras.layers.Dense(HEAD_UNITS, activation="relu", name="head_1")(last)
    actions = keras.layers.Dense(ACTION_DIM, activation="tanh", name="actions")(h)
    return keras.Model(inputs, actions, name=name)


def vit_attention(layer, path) -> bool:
    """`keras_sara.convert(..., layers=vit_attention)`: the vision tower's attention (the paper's choice)."""
    return type(layer).__name__ == "PaliGemmaVitAttention"


def decoder_attention(layer, path) -> bool:
    """The vision tower's and the Gemma decoder's attention (beyond the paper)."""
    return vit_attention(layer, path) or type(layer).__name__ == "CachedGemmaAttention"


def _constrained_argmax(logits, tokenizer):
    """Greedy choice among the action tokens only; NaN or inf logits are an error, not a token."""
    from keras import ops

    low, high = tokenizer.token_range
    action_logits = ops.convert_to_numpy(logits)[:, low:high]
    if not np.all(np.isfinite(action_logits)):
        raise InvalidActionTokens("the decoder gave non-finite logits for the action tokens; no action decoded")
    return (np.argmax(action_logits, axis=-1) + low).astype(np.int32)


def decode_action_tokens(policy, inputs: dict, image_embeddings=None, tokenizer: ActionTokenizer | None = None,
                         return_logits: bool = False):
    """Greedy decode of `ACTION_DIM` action tokens after the prompt: `(B, ACTION_DIM)` int32.

    A converted, finalized decoder runs on the constant-size SARA state
    (`keras_sara.decoding`): the image and prompt are absorbed in one
    bidirectional prefix pass, then each action token is one step on the
    state. Otherwise (the teacher, or only the ViT converted) keras-hub's KV
    cache is used. Either way decoding is constrained to action tokens.

    Args:
        policy: a token policy from `build_vla_policy(interface="tokens")`,
            converted or not.
        inputs: `vla_inputs(images, gripper)` (prompt only).
        image_embeddings: optional `(B, H * n, D)` frame tokens (a cache of
            the older frames' ViT tokens, `FrameTokenCache`); computed from
            `inputs["images"]` when None.
        return_logits: also return the `(B, ACTION_DIM, vocabulary)` logits
            each token was chosen from.
    """
    import contextlib

    from keras import ops

    from keras_sara import decoding

    tokenizer = tokenizer or ActionTokenizer()
    prompt = ops.convert_to_tensor(inputs["token_ids"], "int32")
    batch, length = prompt.shape
    backbone = policy.backbone
    emb = backbone.vit_encoder(inputs["images"]) if image_embeddings is None else image_embeddings
    offset = int(emb.shape[1])
    context = None
    if decoding.state_decoding_reason(policy) is None:  # the SARA state: image and prompt absorbed at once
        layers = decoding.check_state_decoding(policy)
        cache = ops.zeros((batch, len(layers)) + layers[0].sara_state_shape(), dtype="float32")
        context = decoding.DecodingContext(ops.full((batch,), offset + length, "int32"), bidirectional_prefix=True)
        scope, prefix_kwargs = decoding.decoding(layers, context), {}
    else:  # keras-hub's KV cache
        cache = ops.zeros((batch, backbone.num_layers, 2, offset + length + tokenizer.action_dim,
                           backbone.num_key_value_heads, backbone.head_dim), dtype=policy.compute_dtype)
        # keras-hub reads padding_mask over the cache's text slots: the prompt, then the empty action slots
        mask = ops.concatenate([ops.ones_like(prompt), ops.zeros((batch, tokenizer.action_dim), "int32")], axis=1)
        scope, prefix_kwargs = contextlib.nullcontext(), {"padding_mask": mask}
    tokens, seen = [], []
    with scope:
        if context is not None:
            context.phase = "prefix"
        logits, _, cache = policy.call_with_cache(prompt, cache, 0, img_embeddings=emb, **prefix_kwargs)
        if context is not None:
            context.phase = "step"
        for k in range(tokenizer.action_dim):
            seen.append(ops.convert_to_numpy(logits[:, -1]))
            tokens.append(_constrained_argmax(logits[:, -1], tokenizer))
            if k + 1 < tokenizer.action_dim:
                logits, _, cache = policy.call_with_cache(tokens[-1][:, None], cache, offset + length + k)
    tokens = np.stack(tokens, axis=1)
    return (tokens, np.stack(seen, axis=1)) if return_logits else tokens


def vector_actions(policy, inputs: dict, image_embeddings=None) -> np.ndarray:
    """`(B, 3)` actions of a vector policy, optionally from cached frame tokens (equal to `policy(inputs)`)."""
    from keras import ops

    if image_embeddings is None:
        return ops.convert_to_numpy(policy(inputs))
    backbone = policy.get_layer("backbone")
    x = backbone.token_embedding(ops.convert_to_tensor(inputs["token_ids"], "int32"))
    x = x * ops.cast(ops.sqrt(backbone.hidden_dim), x.dtype)
    x = ops.concatenate((ops.convert_to_tensor(image_embeddings, x.dtype), x), axis=1)
    for block in backbone.transformer_layers:
        x = block(x, padding_mask=inputs["padding_mask"], response_mask=inputs["response_mask"])
    x = policy.get_layer("sep_state")(backbone.layer_norm(x))
    return ops.convert_to_numpy(policy.get_layer("actions")(policy.get_layer("head_1")(x)))


def vector_policy_parts(policy, instruction: str = INSTRUCTION):
    """The two LiteRT-exportable halves of a vector policy, batch 1: `(tower, decoder)` Keras models.

    `tower`: one uint8 frame `(1, S, S, 3)` -> its ViT tokens `(1, n, D)`
    (run once per control step). `decoder`: the history's tokens `(1, H * n,
    D)` and the prompt ids `(1, P)` -> the action `(1, 3)`. Together they equal
    `policy` (same layers and weights).
    """
    import keras
    from keras import ops

    backbone = policy.get_layer("backbone")
    size = backbone.image_size
    frame = keras.Input((size, size, 3), dtype="uint8", batch_size=1, name="frame")
    tower = keras.Model(frame, backbone.vit_encoder.encode_frame(frame), name=f"{policy.name}_tower")
    tokens = keras.Input((backbone.image_sequence_length, backbone.hidden_dim), batch_size=1, name="frame_tokens")
    prompt = keras.Input((prompt_tokens(np.zeros((1, GRIPPER_DIM)), instruction).shape[1],), dtype="int32",
                         batch_size=1, name="token_ids")
    x = backbone.token_embedding(prompt)
    x = x * ops.cast(ops.sqrt(backbone.hidden_dim), x.dtype)
    x = ops.concatenate((tokens, x), axis=1)
    for block in backbone.transformer_layers:
        x = block(x, padding_mask=ops.ones_like(prompt), response_mask=ops.zeros_like(prompt))
    x = policy.get_layer("sep_state")(backbone.layer_norm(x))
    actions = policy.get_layer("actions")(policy.get_layer("head_1")(x))
    return tower, keras.Model([tokens, prompt], actions, name=f"{policy.name}_decoder")


def export_vector_policy(policy, prefix: str, probe_frames, probe_gripper, num_threads: int = 1) -> dict:
    """Verified float32 LiteRT files `<prefix>_tower.tflite` and `<prefix>_decoder.tflite` of a vector policy.

    Args:
        probe_frames: `(K, S, S, 3)` uint8 frames to verify on (K >= H).
        probe_gripper: `(K, 6)` gripper states for the prompts.

    Returns:
        `{"tower": ExportReport, "decoder": ExportReport}`.
    """
    from keras import ops

    from keras_sara.export import export_tflite

    tower, decoder = vector_policy_parts(policy)
    history = policy.get_layer("backbone").history
    frames = [f[None] for f in np.asarray(probe_frames)]
    reports = {"tower": export_tflite(tower, f"{prefix}_tower.tflite", probe=[[f] for f in frames],
                                      benchmark_runs=10, num_threads=num_threads)}
    tokens = [ops.convert_to_numpy(tower(f)) for f in frames]
    probes = [[np.concatenate(tokens[i:i + history], axis=1), prompt_tokens(probe_gripper[i + history - 1:i + history])]
              for i in range(len(frames) - history + 1)]
    reports["decoder"] = export_tflite(decoder, f"{prefix}_decoder.tflite", probe=probes, benchmark_runs=10,
                                       num_threads=num_threads)
    return reports


class LiteRTVectorPolicy:
    """A vector policy's two LiteRT files in the control loop: the new frame through the tower, the rest cached.

    Needs only `ai_edge_litert` and numpy (`tflite.runner.PolicyRunner`).
    """

    def __init__(self, prefix: str, history: int, num_threads: int = 1, image_size: int = IMAGE_SIZE):
        from tflite.runner import PolicyRunner

        self.tower = PolicyRunner(f"{prefix}_tower.tflite", num_threads=num_threads)
        self.decoder = PolicyRunner(f"{prefix}_decoder.tflite", num_threads=num_threads)
        self.history, self.image_size, self.frames = history, image_size, []

    def reset(self, env=None):
        self.frames = []

    def act(self, image, gripper) -> np.ndarray:
        self.frames = _push_frame(self.frames, np.asarray(self.tower(check_image(image, self.image_size)[None])),
                                  self.history)
        return np.asarray(self.decoder(np.concatenate(self.frames, axis=1), prompt_tokens(np.asarray(gripper)[None])))[0]

    def __call__(self, env, obs):
        return self.act(obs["image"], obs["gripper"])


class FrameTokenCache:
    """The ViT tokens of an episode's last `history` frames: one ViT call per control step.

        cache = FrameTokenCache(policy.backbone.vit_encoder)
        cache.reset()
        embeddings = cache.push(obs["image"])    # (1, H * n, D), oldest frame first
    """

    def __init__(self, frame_encoder, image_size: int = IMAGE_SIZE):
        self.encoder, self.image_size = frame_encoder, image_size
        self.history = frame_encoder.history
        self.frames = []

    def reset(self):
        self.frames = []

    def push(self, image):
        from keras import ops

        frame = check_image(image, self.image_size)[None]
        self.frames = _push_frame(self.frames, ops.convert_to_numpy(self.encoder.encode_frame(frame)), self.history)
        return np.concatenate(self.frames, axis=1)  # (1, H * n, D)


class FrameHistory:
    """The last `history` frames of an episode, `(1, H, S, S, 3)` uint8; the first frame fills the start."""

    def __init__(self, history: int, image_size: int = IMAGE_SIZE):
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"`history` must be an integer >= 1. Received: history={history!r}")
        self.history, self.image_size, self.frames = history, image_size, []

    def reset(self):
        self.frames = []

    def push(self, image):
        self.frames = _push_frame(self.frames, check_image(image, self.image_size), self.history)
        return np.stack(self.frames)[None]


def history_index(episode, step, history) -> np.ndarray:
    """`(F, H)` indices of each frame's history, for frames stored episode by episode in step order.

    Row i holds the frames of i's episode at steps `step[i] - H + 1 .. step[i]`
    (oldest first), the episode's first frame standing in for steps before it.
    """
    episode, step = np.asarray(episode), np.asarray(step)
    back = np.arange(history - 1, -1, -1)[None, :]
    index = np.arange(len(step))[:, None] - np.minimum(back, step[:, None])
    if np.any(episode[index] != episode[:, None]) or np.any(step[index] != np.maximum(step[:, None] - back, 0)):
        raise ValueError("frames must be stored episode by episode, in step order, with no step missing")
    return index


def history_frames(images, episode, step, history) -> np.ndarray:
    """`(F, H, S, S, 3)` histories of frames stored episode by episode in step order (first frame repeated)."""
    return np.asarray(images)[history_index(episode, step, history)]
