"""Constant-state decoding of converted keras-hub CausalLMs (every backend).

`generate()` of a converted Gemma, Llama, GPT-2 and PaliGemma model against
decoding by full recomputation with the same student (greedy), the state
that replaces the KV cache (its shape does not depend on the length), the
one-token step model against the full forward pass, and the errors.
"""

import keras
import numpy as np
import pytest

import keras_sara
from keras_sara import decoding
from tests.backend_utils import to_numpy
from tests.tiny_causal_lms import V, gemma, gpt2, llama, paligemma

MODELS = {"gpt2": gpt2, "gemma": gemma, "llama": llama, "paligemma": paligemma}
LENGTH = 12
PROMPTS = (3, 5)  # rows of different prompt lengths


def _student(name, **kwargs):
    keras.utils.set_random_seed(0)
    teacher = MODELS[name]()
    student, report = keras_sara.convert(teacher, verify=False, **kwargs)
    return teacher, student, report


def _prompts(name):
    rng = np.random.default_rng(3)
    tokens = np.zeros((len(PROMPTS), LENGTH), "int32")
    mask = np.zeros((len(PROMPTS), LENGTH), bool)
    for row, n in enumerate(PROMPTS):
        tokens[row, :n] = rng.integers(1, V, n)
        mask[row, :n] = True
    inputs = {"token_ids": tokens, "padding_mask": mask}
    if name == "paligemma":
        inputs["images"] = rng.random((len(PROMPTS), 16, 16, 3)).astype("float32")
    return inputs


def _greedy_by_recomputation(lm, name, inputs):
    """Greedy decoding that reruns the full forward pass on the whole buffer for every new token.

    The buffer has a fixed length (one compiled program): with causal
    attention (and PaliGemma's generated tokens marked as the response) the
    logits at t do not depend on what follows t.
    """
    tokens = inputs["token_ids"].copy()
    for row, n in enumerate(PROMPTS):
        for t in range(n - 1, LENGTH - 1):
            feed = {"token_ids": tokens[row : row + 1], "padding_mask": np.ones((1, LENGTH), "int32")}
            if name == "paligemma":
                response = np.zeros((1, LENGTH), "int32")
                response[:, n:] = 1
                feed.update(images=inputs["images"][row : row + 1], response_mask=response)
            logits = np.asarray(lm.predict_on_batch(feed))[0]
            offset = logits.shape[0] - LENGTH  # PaliGemma's logits start with the image tokens
            tokens[row, t + 1] = int(np.argmax(logits[offset + t]))
    return tokens


def _spy_caches(lm):
    """Record the shape of every cache `call_with_cache` receives (at trace time on TF and JAX)."""
    shapes = []
    inner = lm.call_with_cache

    def call_with_cache(token_ids, cache, *args, **kwargs):
        shapes.append(tuple(cache.shape))
        return inner(token_ids, cache, *args, **kwargs)

    object.__setattr__(lm, "call_with_cache", call_with_cache)
    return shapes


@pytest.mark.parametrize("name", sorted(MODELS))
def test_generate_on_the_state_equals_greedy_recomputation(name):
    _, student, report = _student(name)
    assert report.num_converted > 0 and decoding.state_decoding_reason(student) is None
    shapes = _spy_caches(student)
    student.compile(sampler="greedy")
    inputs = _prompts(name)
    out = student.generate(inputs, max_length=LENGTH, stop_token_ids=None)
    generated = to_numpy(out["token_ids"])
    # the prompts are kept and the state, not a KV cache, was carried
    for row, n in enumerate(PROMPTS):
        np.testing.assert_array_equal(generated[row, :n], inputs["token_ids"][row, :n])
    assert shapes and set(shapes) == {decoding.state_shape(student, len(PROMPTS))}
    np.testing.assert_array_equal(generated, _greedy_by_recomputation(student, name, inputs))


def test_state_does_not_grow_with_the_length():
    _, student, _ = _student("llama")
    student.compile(sampler="greedy")
    shapes = _spy_caches(student)
    for length in (8, 24):
        tokens = np.ones((1, length), "int32")
        mask = np.zeros((1, length), bool)
        mask[:, :2] = True
        student.generate({"token_ids": tokens, "padding_mask": mask}, max_length=length, stop_token_ids=None)
    assert len(shapes) >= 4 and set(shapes) == {(1, 2, 2, 4, 5)}  # (B, layers, K, M, D + 1), any length


@pytest.mark.parametrize("name", ["gemma", "gpt2"])
def test_step_model_matches_the_full_forward_pass(name):
    _, student, _ = _student(name)
    step = decoding.make_decoder_step_model(student)
    tokens = np.random.default_rng(4).integers(1, V, (2, 20)).astype("int32")
    logits, state = decoding.decode_tokens(step, tokens)
    full = np.asarray(student.predict_on_batch({"token_ids": tokens, "padding_mask": np.ones_like(tokens)}))
    np.testing.assert_allclose(logits, full, atol=2e-5, rtol=1e-4)
    assert state.shape == decoding.state_shape(student, 2)
    # continuing from the returned state equals decoding the concatenation
    more = np.random.default_rng(5).integers(1, V, (2, 4)).astype("int32")
    tail, _ = decoding.decode_tokens(step, more, state=state, start=20)
    both, _ = decoding.decode_tokens(step, np.concatenate([tokens, more], 1))
    np.testing.assert_allclose(tail, both[:, 20:], atol=1e-5, rtol=1e-5)


def test_generate_refuses_a_student_that_still_blends():
    _, student, _ = _student("gemma", blend=0.5)
    with pytest.raises(ValueError, match=r"blend < 1.*keras_sara.finalize.*Received: blend=\[0.5, 0.5\]"):
        student.generate(_prompts("gemma"), max_length=LENGTH, stop_token_ids=None)
    with pytest.raises(ValueError, match="blend < 1"):
        decoding.make_decoder_step_model(student)
    final = keras_sara.finalize(student)  # linear only: decodes on the state again
    final.compile(sampler="greedy")
    shapes = _spy_caches(final)
    final.generate(_prompts("gemma"), max_length=LENGTH, stop_token_ids=None)
    assert set(shapes) == {decoding.state_shape(final, 2)}


def test_paligemma_with_only_its_vision_tower_converted_keeps_the_kv_cache():
    keras.utils.set_random_seed(0)
    teacher = paligemma()
    vit = [l.path for l in teacher._flatten_layers() if type(l).__name__ == "PaliGemmaVitAttention"]
    student, report = keras_sara.convert(teacher, layers=vit, verify=False)
    assert report.num_converted == len(vit) == 1
    assert "softmax" in decoding.state_decoding_reason(student)
    shapes = _spy_caches(student)
    student.compile(sampler="greedy")
    out = student.generate(_prompts("paligemma"), max_length=LENGTH, stop_token_ids=None)
    assert to_numpy(out["token_ids"]).shape == (2, LENGTH)
    assert shapes[0][3] == LENGTH + student.backbone.image_sequence_length  # keras-hub's KV cache
    with pytest.raises(ValueError, match=r"cannot decode on a SARA state: attention layers .* are softmax"):
        decoding.make_decoder_step_model(student)


def test_positions_beyond_learned_embeddings_are_refused():
    _, student, _ = _student("gpt2")  # max_sequence_length=32
    step = decoding.make_decoder_step_model(student)
    with pytest.raises(ValueError, match=r"`start \+ len\(tokens\) - 1` must be in \[0, 32\).*Received: .*=33"):
        decoding.decode_tokens(step, np.ones((1, 4), "int32"), start=30)
    with pytest.raises(ValueError, match=r"`max_length` must be at most 32.*Received: max_length=40"):
        student.generate({"token_ids": np.ones((1, 40), "int32"), "padding_mask": np.ones((1, 40), bool)},
                         max_length=40, stop_token_ids=None)
    with pytest.raises(ValueError, match=r"`state` must have shape \(1, 2, 2, 8, 9\).*Received: shape \(1, 2, 2, 8\)"):
        decoding.decode_tokens(step, np.ones((1, 4), "int32"), state=np.zeros((1, 2, 2, 8), "float32"))


def test_reloaded_student_still_decodes_on_the_state(tmp_path):
    _, student, _ = _student("llama")
    path = str(tmp_path / "student.keras")
    student.save(path)
    loaded = keras.models.load_model(path)
    assert decoding.state_decoding_reason(loaded) is None
    for lm in (student, loaded):
        lm.compile(sampler="greedy")
    inputs = _prompts("llama")
    a = student.generate(inputs, max_length=LENGTH, stop_token_ids=None)
    shapes = _spy_caches(loaded)
    b = loaded.generate(inputs, max_length=LENGTH, stop_token_ids=None)
    np.testing.assert_array_equal(to_numpy(a["token_ids"]), to_numpy(b["token_ids"]))
    assert set(shapes) == {decoding.state_shape(loaded, 2)}
