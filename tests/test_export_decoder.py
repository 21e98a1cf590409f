"""LiteRT export of a converted decoder's one-token step, run by the robot runner (TensorFlow backend).

The streamed LiteRT step against the Keras step over 1,000 tokens, builtin
ops only, and what the runner says about a state of the wrong shape.
"""

import keras
import numpy as np
import pytest

import keras_sara
from keras_sara import decoding
from tests import tiny_causal_lms as tiny
from tests.tiny_causal_lms import V, gemma, llama
from tflite.runner import PolicyRunner

TOKENS = 1000


def gpt2():
    return tiny.gpt2(max_sequence_length=TOKENS)


@pytest.mark.parametrize("make", [gpt2, gemma, llama], ids=["gpt2", "gemma", "llama"])
def test_streamed_litert_step_matches_keras_over_1000_tokens(make, tmp_path):
    keras.utils.set_random_seed(0)
    student, _ = keras_sara.convert(make(), verify=False)
    path = str(tmp_path / "step.tflite")
    report = decoding.export_decoder_step(student, path, benchmark_runs=0)
    assert report.flex_ops == [] and "SOFTMAX" not in report.op_histogram
    runner = PolicyRunner(path)
    state_shape = decoding.state_shape(student, 1)
    assert runner.input_shapes == [(1, 1), state_shape, (1,)]
    assert runner.output_shapes == [(1, V), state_shape]

    tokens = np.random.default_rng(1).integers(1, V, (1, TOKENS)).astype("int32")
    expected, keras_state = decoding.decode_tokens(decoding.make_decoder_step_model(student), tokens)
    state, got = np.zeros(state_shape, "float32"), []
    for t in range(TOKENS):
        logits, state = runner(tokens[:, t : t + 1], state, np.array([t], "int32"))
        got.append(logits)
    got = np.stack(got, axis=1)
    per_token = np.linalg.norm(got - expected, axis=-1) / np.linalg.norm(expected, axis=-1)
    assert per_token.max() < 1e-4, per_token.max()
    assert np.linalg.norm(state - keras_state) / np.linalg.norm(keras_state) < 1e-4
    # the Keras step itself is the student's forward pass (first 64 tokens)
    full = np.asarray(student.predict_on_batch({"token_ids": tokens[:, :64], "padding_mask": np.ones((1, 64))}))
    np.testing.assert_allclose(expected[:, :64], full, atol=2e-5, rtol=1e-4)

    with pytest.raises(ValueError, match=r"Input 'input_1' must have shape \(1, 2, 2, \d+, \d+\).*Received: shape"):
        runner(tokens[:, :1], np.zeros(state_shape[:-1], "float32"), np.array([0], "int32"))


def test_export_refuses_a_student_that_still_blends(tmp_path):
    keras.utils.set_random_seed(0)
    student, _ = keras_sara.convert(llama(), verify=False, blend=0.5)
    path = tmp_path / "step.tflite"
    with pytest.raises(ValueError, match="still blends in softmax"):
        decoding.export_decoder_step(student, str(path))
    assert not path.exists()
