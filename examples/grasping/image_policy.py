"""An RT-2-style image policy for the grasping task: ViT over a frame history, instruction, vector actions.

The shape of RT-2's policy at a size a 2-core CPU can train:

- **Images.** The last `history` RGB camera frames of `env.GraspingEnv`
  (`image_size` pixels square, uint8), oldest first, the current frame last.
  Each frame goes through the same ViT image encoder (keras-hub's
  `ViTBackbone`, patch 8, no class token), whose patch tokens are pooled 2x2
  (64 -> 16 tokens per frame at 64 px) and tagged with a learned embedding of
  the frame's age.
- **Instruction.** Token ids of a text instruction (`tokenize`, a fixed
  vocabulary, 0 is padding), embedded and mean-pooled into one token.
- **Proprioception.** The gripper state (`GRIPPER_DIM` numbers), one token.
- **Fuser.** A small Transformer over [instruction, gripper, frame tokens];
  the tokens of frames missing at the start of an episode are masked out as
  keys and values (`value_mask`, which SARA layers honour at linear cost).
- **Head.** Continuous "vector" actions `(dx, dy, dangle)` in [-1, 1] (tanh),
  not RT-2's discretised tokens: the paper's SARA RT-2 variant used vector
  actions too.

SARA conversion follows the paper: only the ViT encoder's attention
(`vit_attention` selects it for `keras_sara.convert(..., layers=...)`); the
fuser's attention can be converted too (`fuser_attention`).

Histories shorter than `history` (the first steps of an episode) are padded
with zero frames and masked (`FrameHistory`, `stack_history`).

    from image_policy import FrameHistory, build_image_policy, image_inputs
    teacher = build_image_policy(history=3)
    frames = FrameHistory(history=3)
    frames.reset()
    inputs = image_inputs(frames.push(obs["image"]), obs["gripper"])
    action = teacher.predict_on_batch(inputs)[0]
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from env import ACTION_DIM, GRIPPER_DIM  # noqa: E402

IMAGE_SIZE = 64
#: The one instruction of the grasping task (the scripted expert's goal).
INSTRUCTION = "pick up the object nearest the gripper"
#: Instruction vocabulary; id 0 is padding, 1 is an unknown word.
VOCABULARY = ("<pad>", "<unk>", "pick", "up", "grasp", "the", "object", "nearest", "to", "gripper",
              "left", "right", "wall", "any", "a")
MAX_WORDS = 8
#: Architecture of the image policy.
VIT_CONFIG = dict(patch_size=8, num_layers=3, num_heads=4, hidden_dim=64, mlp_dim=128)
FUSER_CONFIG = dict(num_layers=2, num_heads=4, key_dim=16, mlp_dim=128)
HEAD_UNITS = 128
PACKAGE = "keras_sara_examples"


def tokenize(instruction: str, max_words: int = MAX_WORDS) -> np.ndarray:
    """Instruction text -> `(max_words,)` int32 ids (lower-cased words, unknown -> 1, padded with 0)."""
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"`instruction` must be a non-empty string. Received: instruction={instruction!r}")
    words = instruction.lower().split()
    if len(words) > max_words:
        raise ValueError(f"`instruction` has {len(words)} words; at most {max_words} fit. "
                         f"Received: instruction={instruction!r}")
    ids = [VOCABULARY.index(w) if w in VOCABULARY else 1 for w in words]
    return np.array(ids + [0] * (max_words - len(ids)), np.int32)


def policy_layers() -> dict:
    """The policy's custom layers, registered with Keras for loading (defined on first call).

    Call it before `keras.saving.load_model` of a saved image policy in a
    new process (`build_image_policy` calls it).
    """
    global _LAYERS
    if _LAYERS is not None:
        return _LAYERS
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable(package=PACKAGE)
    class FoldFrames(keras.layers.Layer):
        """`(batch, history, ...)` -> `(batch * history, ...)`: one ViT call per frame."""

        def call(self, x):
            return ops.reshape(x, (-1,) + tuple(x.shape[2:]))

        def compute_output_shape(self, shape):
            return (None,) + tuple(shape[2:])

    @keras.saving.register_keras_serializable(package=PACKAGE)
    class FrameTokens(keras.layers.Layer):
        """`(batch * history, tokens, dim)` -> `(batch, history * tokens, dim)` plus a learned age embedding."""

        def __init__(self, history, **kwargs):
            super().__init__(**kwargs)
            self.history = int(history)

        def build(self, shape):
            self.age = self.add_weight(shape=(self.history, 1, shape[-1]), initializer="zeros", name="age")

        def call(self, x):
            tokens, dim = x.shape[1], x.shape[2]
            x = ops.reshape(x, (-1, self.history, tokens, dim)) + self.age
            return ops.reshape(x, (-1, self.history * tokens, dim))

        def compute_output_shape(self, shape):
            return (None, self.history * shape[1], shape[2])

        def get_config(self):
            return {**super().get_config(), "history": self.history}

    @keras.saving.register_keras_serializable(package=PACKAGE)
    class TokenMask(keras.layers.Layer):
        """Valid-token mask `(batch, n)` from the frame mask: `prefix` always-valid tokens, then frames."""

        def __init__(self, tokens_per_frame, prefix, **kwargs):
            super().__init__(**kwargs)
            self.tokens_per_frame, self.prefix = int(tokens_per_frame), int(prefix)

        def call(self, frame_mask):
            valid = ops.repeat(ops.cast(frame_mask, "int32"), self.tokens_per_frame, axis=1)
            valid = ops.concatenate([ops.ones_like(valid[:, : self.prefix]), valid], axis=1)
            return ops.cast(valid, "bool")

        def compute_output_shape(self, shape):
            return (shape[0], self.prefix + shape[1] * self.tokens_per_frame)

        def compute_output_spec(self, frame_mask):
            return keras.KerasTensor(self.compute_output_shape(frame_mask.shape), dtype="bool")

        def get_config(self):
            return {**super().get_config(), "tokens_per_frame": self.tokens_per_frame, "prefix": self.prefix}

    @keras.saving.register_keras_serializable(package=PACKAGE)
    class MaskedMeanTokens(keras.layers.Layer):
        """Mean of the instruction's word embeddings over non-padding ids -> `(batch, 1, dim)`."""

        def call(self, embedded, ids):
            keep = ops.cast(ops.not_equal(ids, 0), embedded.dtype)[..., None]
            total = ops.sum(embedded * keep, axis=1, keepdims=True)
            return total / ops.maximum(ops.sum(keep, axis=1, keepdims=True), 1.0)

        def compute_output_shape(self, embedded_shape, ids_shape):
            return (embedded_shape[0], 1, embedded_shape[2])

    _LAYERS = dict(FoldFrames=FoldFrames, FrameTokens=FrameTokens, TokenMask=TokenMask,
                   MaskedMeanTokens=MaskedMeanTokens)
    return _LAYERS


_LAYERS = None


def build_image_policy(history: int = 3, image_size: int = IMAGE_SIZE, name=None, seed=0):
    """The softmax image policy (the teacher): inputs `images`, `frame_mask`, `instruction`, `gripper`.

    Args:
        history: frames the policy sees, H (>= 1); the current frame last.
        image_size: square image side in pixels (a multiple of 16).
        name: model name (default `image_policy_h{history}`).
        seed: weight initialisation seed.

    Returns:
        A functional `keras.Model` mapping
        `images (B, H, S, S, 3) uint8`, `frame_mask (B, H) bool`,
        `instruction (B, MAX_WORDS) int32`, `gripper (B, 6) float32`
        to actions `(B, 3)` in [-1, 1].
    """
    import keras
    import keras_hub

    for arg, value, low in (("history", history, 1), ("image_size", image_size, 16)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"`{arg}` must be an integer >= {low}. Received: {arg}={value!r}")
    patch = VIT_CONFIG["patch_size"]
    if image_size % (2 * patch):
        raise ValueError(f"`image_size` must be a multiple of {2 * patch}. Received: image_size={image_size}")
    L = policy_layers()
    keras.utils.set_random_seed(seed)
    dim = VIT_CONFIG["hidden_dim"]
    grid = image_size // patch
    tokens_per_frame = (grid // 2) ** 2

    images = keras.Input((history, image_size, image_size, 3), dtype="uint8", name="images")
    frame_mask = keras.Input((history,), dtype="bool", name="frame_mask")
    instruction = keras.Input((MAX_WORDS,), dtype="int32", name="instruction")
    gripper = keras.Input((GRIPPER_DIM,), dtype="float32", name="gripper")

    x = L["FoldFrames"](name="fold_frames")(images)
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(x)
    vit = keras_hub.models.ViTBackbone(image_shape=(image_size, image_size, 3), use_class_token=False,
                                       name="vit", **VIT_CONFIG)
    x = vit(x)  # (B*H, grid*grid, dim)
    x = keras.layers.Reshape((grid, grid, dim), name="patch_grid")(x)
    x = keras.layers.AveragePooling2D(2, name="pool_patches")(x)
    x = keras.layers.Reshape((tokens_per_frame, dim), name="frame_patches")(x)
    frames = L["FrameTokens"](history, name="frame_tokens")(x)  # (B, H*T, dim)

    words = keras.layers.Embedding(len(VOCABULARY), dim, name="word_embedding")(instruction)
    task = L["MaskedMeanTokens"](name="instruction_token")(words, instruction)
    proprio = keras.layers.Reshape((1, dim), name="gripper_token")(
        keras.layers.Dense(dim, name="gripper_embedding")(gripper))
    tokens = keras.layers.Concatenate(axis=1, name="tokens")([task, proprio, frames])
    mask = L["TokenMask"](tokens_per_frame, prefix=2, name="token_mask")(frame_mask)

    for i in range(FUSER_CONFIG["num_layers"]):
        h = keras.layers.LayerNormalization(epsilon=1e-6, name=f"fuser_{i}_norm_1")(tokens)
        h = keras.layers.MultiHeadAttention(FUSER_CONFIG["num_heads"], FUSER_CONFIG["key_dim"],
                                            name=f"fuser_{i}_attention")(h, h, value_mask=mask)
        tokens = keras.layers.Add(name=f"fuser_{i}_add_1")([tokens, h])
        h = keras.layers.LayerNormalization(epsilon=1e-6, name=f"fuser_{i}_norm_2")(tokens)
        h = keras.layers.Dense(FUSER_CONFIG["mlp_dim"], activation="gelu", name=f"fuser_{i}_mlp_1")(h)
        h = keras.layers.Dense(dim, name=f"fuser_{i}_mlp_2")(h)
        tokens = keras.layers.Add(name=f"fuser_{i}_add_2")([tokens, h])
    tokens = keras.layers.LayerNormalization(epsilon=1e-6, name="fuser_norm")(tokens)
    summary = keras.layers.Flatten(name="summary")(keras.layers.Cropping1D((0, tokens.shape[1] - 2))(tokens))
    h = keras.layers.Dense(HEAD_UNITS, activation="relu", name="head_1")(summary)
    actions = keras.layers.Dense(ACTION_DIM, activation="tanh", name="actions")(h)
    return keras.Model([images, frame_mask, instruction, gripper], actions, name=name or f"image_policy_h{history}")


def vit_attention(layer, path) -> bool:
    """`keras_sara.convert(..., layers=vit_attention)`: the ViT encoder's attention only (the paper's choice)."""
    return path.split("/")[0] == "vit"


def fuser_attention(layer, path) -> bool:
    """The ViT's and the fuser's attention."""
    return vit_attention(layer, path) or path.split("/")[0].startswith("fuser_")


def check_image(image, image_size=IMAGE_SIZE, name="image") -> np.ndarray:
    """One RGB frame `(S, S, 3)` uint8, or a clear ValueError naming `name` and what it received."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(
            f"`{name}` must be one RGB frame of shape ({image_size}, {image_size}, 3) (height, width, "
            f"channels); drop an alpha channel with image[..., :3]. Received: {name} with shape {arr.shape}"
        )
    if arr.shape[:2] != (image_size, image_size):
        raise ValueError(
            f"`{name}` must be {image_size}x{image_size} pixels (the policy's image size; make the "
            f"environment's camera that size or resize the frame). Received: {name} with shape {arr.shape}"
        )
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 255:
            raise ValueError(f"`{name}` must hold pixel values in 0..255 (uint8). Received: dtype {arr.dtype}, "
                             f"range {arr.min() if arr.size else None}..{arr.max() if arr.size else None}")
        arr = arr.astype(np.uint8)
    return arr


def stack_history(frames, history, image_size=IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The last `history` frames, oldest first, zero-padded at the front: `(images (H,S,S,3), mask (H,))`.

    `frames` is a sequence of RGB frames, oldest first (any length >= 1);
    fewer than `history` give padding rows with mask False.
    """
    if isinstance(history, bool) or not isinstance(history, int) or history < 1:
        raise ValueError(f"`history` must be an integer >= 1. Received: history={history!r}")
    frames = list(frames)
    if not frames:
        raise ValueError("`frames` must hold at least the current frame. Received: frames=[]")
    recent = [check_image(f, image_size, name=f"frames[{i}]") for i, f in enumerate(frames)][-history:]
    images = np.zeros((history, image_size, image_size, 3), np.uint8)
    mask = np.zeros((history,), bool)
    images[history - len(recent):] = recent
    mask[history - len(recent):] = True
    return images, mask


class FrameHistory:
    """The last `history` camera frames of an episode, for a control loop.

        frames = FrameHistory(3)
        frames.reset()                      # at every episode start
        images, mask = frames.push(obs["image"])
    """

    def __init__(self, history, image_size=IMAGE_SIZE):
        stack_history([np.zeros((image_size, image_size, 3), np.uint8)], history, image_size)  # checks both
        self.history, self.image_size, self.frames = history, image_size, []

    def reset(self):
        self.frames = []

    def push(self, image):
        self.frames = (self.frames + [check_image(image, self.image_size)])[-self.history:]
        return stack_history(self.frames, self.history, self.image_size)


def image_inputs(history_and_mask, gripper, instruction=INSTRUCTION) -> dict:
    """One observation -> the policy's batched input dict (batch 1)."""
    images, mask = history_and_mask
    gripper = np.asarray(gripper, np.float32).reshape(-1)
    if gripper.shape != (GRIPPER_DIM,) or not np.all(np.isfinite(gripper)):
        raise ValueError(f"`gripper` must hold {GRIPPER_DIM} finite numbers. Received: gripper={gripper!r}")
    return {"images": images[None], "frame_mask": mask[None], "instruction": tokenize(instruction)[None],
            "gripper": gripper[None]}


def history_index(episode, step, history) -> np.ndarray:
    """For frames stored episode by episode in step order: `(F, history)` indices of each frame's history.

    Row i holds the frames of i's episode at steps `step[i] - history + 1 .. step[i]`
    (oldest first); -1 where the episode had not started (to be padded and masked).
    """
    episode, step = np.asarray(episode), np.asarray(step)
    index = np.arange(len(step))[:, None] - np.arange(history - 1, -1, -1)[None, :]
    valid = (step[:, None] - np.arange(history - 1, -1, -1)[None, :]) >= 0
    safe = np.clip(index, 0, None)
    if np.any(valid & (episode[safe] != episode[:, None])):
        raise ValueError("frames must be stored episode by episode, in step order, with no step missing")
    return np.where(valid, index, -1)


def batch_inputs(images, gripper, rows, hist, instruction_ids) -> dict:
    """Training inputs for frame indices `rows`, from `history_index` output `hist`."""
    h = hist[rows]  # (B, H)
    mask = h >= 0
    stacked = images[np.clip(h, 0, None)]  # (B, H, S, S, 3)
    stacked[~mask] = 0
    return {"images": stacked, "frame_mask": mask, "instruction": np.repeat(instruction_ids[None], len(rows), 0),
            "gripper": gripper[rows].astype(np.float32)}
