"""The PaliGemma grasping policy (examples/grasping/vla_policy.py): builders, action tokens, decoding, frame cache."""

import os
import sys

import keras
import numpy as np
import pytest

import keras_sara
from keras_sara import decoding
from tests.backend_utils import backend, to_numpy

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "grasping"))
import vla_policy as V  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`compile\\(\\)` was not called:UserWarning")
B, H, S = 2, 3, 64


def _observation(seed=0, batch=B, history=H):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, history, S, S, 3)).astype("uint8")
    gripper = rng.uniform(V.GRIPPER_LOW, V.GRIPPER_HIGH, (batch, 6)).astype("float32")
    return images, gripper


def _greedy_by_recomputation(policy, images, gripper):
    """Action tokens (and their logits) by full forward passes over the growing sequence: no cache, no state."""
    prompt = V.vla_inputs(images, gripper)["token_ids"]
    chosen = np.zeros((len(prompt), 0), np.int32)
    seen = []
    for _ in range(V.ACTION_DIM):
        ids = np.concatenate([prompt, chosen], axis=1)
        response = np.concatenate([np.zeros_like(prompt), np.ones_like(chosen)], axis=1)
        logits = to_numpy(policy({"images": images, "token_ids": ids, "padding_mask": np.ones_like(ids),
                                  "response_mask": response}))[:, -1]
        seen.append(logits)
        low, high = V.ActionTokenizer().token_range
        chosen = np.concatenate([chosen, (np.argmax(logits[:, low:high], -1) + low)[:, None].astype(np.int32)], 1)
    return chosen, np.stack(seen, axis=1)


def _check_decode(policy, images, gripper, **kwargs):
    tokens, logits = V.decode_action_tokens(policy, V.vla_inputs(images, gripper), return_logits=True, **kwargs)
    want_tokens, want_logits = _greedy_by_recomputation(policy, images, gripper)
    np.testing.assert_array_equal(tokens, want_tokens)
    scale = np.max(np.abs(want_logits))
    assert np.max(np.abs(logits - want_logits)) <= 1e-4 * scale, "step logits differ from the forward pass"
    return tokens


@pytest.fixture(scope="module")
def teacher():
    return V.build_vla_policy(history=H, interface="tokens")


@pytest.fixture(scope="module")
def sara_decoder(teacher):
    student, report = keras_sara.convert(teacher, layers=V.decoder_attention, verify=False)
    assert report.num_converted == V.VLA_CONFIG["vit_num_layers"] + V.VLA_CONFIG["num_layers"]
    return keras_sara.finalize(student, verify=False)


# ------------------------------------------------------------ action tokens


def test_action_round_trip_continuous_bins_tokens_continuous():
    tok = V.ActionTokenizer()
    actions = np.concatenate([np.random.default_rng(0).uniform(-1, 1, (500, 3)),
                              [[-1.0, 1.0, 0.0], [1.0, -1.0, 1e-9]]]).astype(np.float32)
    tokens = tok.encode(actions)
    assert tokens.dtype == np.int32 and tokens.min() >= V.ACTION_BASE and tokens.max() < V.VOCABULARY_SIZE
    back = tok.decode(tokens)
    assert np.max(np.abs(back - actions)) <= 1.0 / V.ACTION_BINS + 1e-6
    np.testing.assert_array_equal(tok.encode(back), tokens)  # bin centres map to their own bin
    assert tok.to_bins([[-1.0, 1.0, 0.0]]).tolist() == [[0, V.ACTION_BINS - 1, V.ACTION_BINS // 2]]


@pytest.mark.parametrize("tokens, match", [
    (np.array([[V.ACTION_BASE, V.ACTION_BASE + 1]]), "truncated"),
    (np.array([[V.ACTION_BASE, V.SEP, V.ACTION_BASE]]), "outside the action tokens"),
    (np.array([[V.ACTION_BASE, V.VOCABULARY_SIZE, V.ACTION_BASE]]), "outside the action tokens"),
    (np.array([[0.5, 0.5, 0.5]]), "integers"),
])
def test_invalid_or_truncated_decodes_are_errors(tokens, match):
    with pytest.raises(V.InvalidActionTokens, match=match):
        V.ActionTokenizer().decode(tokens)


def test_bad_actions_and_gripper_are_named():
    with pytest.raises(ValueError, match=r"`actions` must lie in \[-1, 1\]"):
        V.ActionTokenizer().encode([[0.0, 1.5, 0.0]])
    with pytest.raises(ValueError, match="`actions` must hold finite values"):
        V.ActionTokenizer().encode([[0.0, np.nan, 0.0]])
    with pytest.raises(ValueError, match="`gripper` must hold finite values with last axis 6"):
        V.prompt_tokens(np.zeros((1, 5)))
    with pytest.raises(ValueError, match="`interface` must be one of"):
        V.build_vla_policy(interface="text")


def test_prompt_layout():
    images, gripper = _observation()
    inputs = V.vla_inputs(images, gripper, actions=np.zeros((B, 3)))
    ids = inputs["token_ids"]
    words = len(V.instruction_tokens())
    assert ids.shape == (B, 1 + words + 6 + 1 + 3)
    assert np.all(ids[:, 0] == V.BOS) and np.all(ids[:, words + 7] == V.SEP)
    grip = ids[:, 1 + words: 7 + words]
    assert np.all((grip >= V.GRIPPER_BASE) & (grip < V.ACTION_BASE))
    assert inputs["response_mask"][:, -3:].all() and not inputs["response_mask"][:, :-3].any()
    target, weight = V.token_targets(inputs)
    np.testing.assert_array_equal(target[weight > 0].reshape(B, 3), ids[:, -3:])  # the action tokens only


# ------------------------------------------------------------ builders


def test_both_interfaces_build_and_reload(tmp_path, teacher):
    images, gripper = _observation()
    inputs = V.vla_inputs(images, gripper)
    logits = to_numpy(teacher(inputs))
    assert logits.shape == (B, inputs["token_ids"].shape[1], V.VOCABULARY_SIZE)
    vector = V.build_vla_policy(history=H, interface="vector")
    actions = to_numpy(vector(inputs))
    assert actions.shape == (B, 3) and np.all(np.abs(actions) <= 1)
    for model, out in ((teacher, logits), (vector, actions)):
        path = str(tmp_path / f"{model.name}.keras")
        model.save(path)
        np.testing.assert_allclose(to_numpy(keras.models.load_model(path)(inputs)), out, atol=1e-5)


# ------------------------------------------------------------ decoding


def test_teacher_kv_cache_decode_equals_recomputation(teacher):
    _check_decode(teacher, *_observation(1))


def test_sara_decoder_decodes_on_the_state_and_equals_recomputation(sara_decoder):
    assert decoding.state_decoding_reason(sara_decoder) is None  # the constant-size state path
    for seed in (2, 3):
        tokens = _check_decode(sara_decoder, *_observation(seed))
        V.ActionTokenizer().decode(tokens)  # valid action tokens


def test_vit_only_conversion_keeps_the_kv_cache_and_decodes_the_same_way(teacher):
    student, report = keras_sara.convert(teacher, layers=V.vit_attention, verify=False)
    assert report.num_converted == V.VLA_CONFIG["vit_num_layers"]
    assert decoding.state_decoding_reason(student) is not None  # decoder left softmax: KV cache
    _check_decode(student, *_observation(4))


def test_non_finite_logits_are_an_error_not_an_action(teacher):
    logits = np.zeros((1, V.VOCABULARY_SIZE), np.float32)
    logits[0, V.ACTION_BASE + 3] = np.nan
    with pytest.raises(V.InvalidActionTokens, match="non-finite logits"):
        V._constrained_argmax(logits, V.ActionTokenizer())


# ------------------------------------------------------------ frame cache


def test_frame_token_cache_equals_recomputation_and_gives_equal_actions(sara_decoder):
    rng = np.random.default_rng(5)
    episode = rng.integers(0, 256, (5, S, S, 3)).astype("uint8")
    gripper = rng.uniform(V.GRIPPER_LOW, V.GRIPPER_HIGH, (1, 6)).astype("float32")
    encoder = sara_decoder.backbone.vit_encoder
    cache, frames = V.FrameTokenCache(encoder), V.FrameHistory(H)
    cache.reset(), frames.reset()
    for frame in episode:
        cached = cache.push(frame)
        stacked = frames.push(frame)
        np.testing.assert_allclose(cached, to_numpy(encoder(stacked)), rtol=1e-5, atol=1e-5)
        inputs = V.vla_inputs(stacked, gripper)
        np.testing.assert_array_equal(V.decode_action_tokens(sara_decoder, inputs, image_embeddings=cached),
                                      V.decode_action_tokens(sara_decoder, inputs))


def test_history_frames_repeat_the_first_frame_at_the_start():
    images = np.arange(5)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    hist = V.history_frames(images.astype(np.uint8), episode=[0, 0, 0, 1, 1], step=[0, 1, 2, 0, 1], history=3)
    assert hist[:, :, 0, 0, 0].tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 2], [3, 3, 3], [3, 3, 4]]


def test_vector_policy_from_cached_frame_tokens_equals_its_forward_pass():
    vector = V.build_vla_policy(history=H, interface="vector")
    student, _ = keras_sara.convert(vector, layers=V.decoder_attention, verify=False)
    for model in (vector, keras_sara.finalize(student, verify=False)):
        images, gripper = _observation(6)
        inputs = V.vla_inputs(images, gripper)
        cached = to_numpy(model.get_layer("backbone").vit_encoder(images))
        np.testing.assert_allclose(V.vector_actions(model, inputs, image_embeddings=cached),
                                   to_numpy(model(inputs)), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(backend() != "tensorflow", reason="LiteRT export runs on the TensorFlow backend")
def test_vector_policy_litert_files_in_the_loop_match_keras(tmp_path):
    """Tower + decoder files, the tower run on the new frame only, against the Keras policy over an episode."""
    vector = V.build_vla_policy(history=H, interface="vector")
    student, _ = keras_sara.convert(vector, layers=V.decoder_attention, verify=False)
    sara = keras_sara.finalize(student, verify=False)
    rng = np.random.default_rng(7)
    episode = rng.integers(0, 256, (5, S, S, 3)).astype("uint8")
    gripper = rng.uniform(V.GRIPPER_LOW, V.GRIPPER_HIGH, (5, 6)).astype("float32")
    for name, model in (("teacher", vector), ("sara", sara)):
        reports = V.export_vector_policy(model, str(tmp_path / name), episode, gripper)
        assert not reports["tower"].flex_ops and not reports["decoder"].flex_ops
        assert "SOFTMAX" not in reports["decoder"].op_histogram or name == "teacher"
        lite, frames = V.LiteRTVectorPolicy(str(tmp_path / name), H), V.FrameHistory(H)
        lite.reset(), frames.reset()
        for frame, g in zip(episode, gripper):
            want = to_numpy(model(V.vla_inputs(frames.push(frame), g[None])))[0]
            np.testing.assert_allclose(lite.act(frame, g), want, atol=1e-5)
