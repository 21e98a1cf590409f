"""Streaming the models people write: token ids, position embeddings, attention in custom blocks.

The model is the keras.io "Text generation with a miniature GPT" example as
published (layers without **kwargs or get_config), with the block's causal
attention written `self.att(inputs, inputs, use_causal_mask=True)`, converted
with `keras_sara.convert`. Tiny sizes (16 wide, 2 heads, 80 positions), so
each backend runs in seconds; the LiteRT test runs on TensorFlow.
"""

from unittest import mock

import keras
import numpy as np
import pytest
from keras import layers, ops

import keras_sara
from keras_sara import streaming
from keras_sara.layers import SARAMultiHeadAttention
from tests.backend_utils import backend, to_numpy
from tests.keras_io_models import TokenAndPositionEmbedding

pytestmark = [
    pytest.mark.filterwarnings("ignore:`build\\(\\)` was called on layer:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*received a dense `attention_mask`:UserWarning"),  # explicit_mask
]

MAXLEN, VOCAB, EMBED, NUM_HEADS, FF_DIM = 80, 40, 16, 2, 32
STREAMED = 72  # >= 64 tokens streamed, then the rest of the positions resumed
PARITY = 1e-5  # float32: the recurrent step against the chunked causal forward pass


# ------------------------------------------------ keras.io miniGPT, as published


class TransformerBlock(layers.Layer):
    """keras.io miniGPT's block (its mask written as `use_causal_mask=True`)."""

    def __init__(self, embed_dim, num_heads, ff_dim, rate=0.1):
        super().__init__()
        self.att = layers.MultiHeadAttention(num_heads, embed_dim)
        self.ffn = keras.Sequential(
            [
                layers.Dense(ff_dim, activation="relu"),
                layers.Dense(embed_dim),
            ]
        )
        self.layernorm1 = layers.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = layers.LayerNormalization(epsilon=1e-6)
        self.dropout1 = layers.Dropout(rate)
        self.dropout2 = layers.Dropout(rate)

    def call(self, inputs):
        attention_output = self.att(inputs, inputs, use_causal_mask=True)
        attention_output = self.dropout1(attention_output)
        out1 = self.layernorm1(inputs + attention_output)
        ffn_output = self.ffn(out1)
        ffn_output = self.dropout2(ffn_output)
        return self.layernorm2(out1 + ffn_output)


def create_model(maxlen=MAXLEN, blocks=1, block=TransformerBlock, embedding=TokenAndPositionEmbedding):
    """keras.io miniGPT's `create_model` (logits only, no compile)."""
    inputs = layers.Input(shape=(maxlen,), dtype="int32")
    embedding_layer = embedding(maxlen, VOCAB, EMBED)
    x = embedding_layer(inputs)
    for _ in range(blocks):
        x = block(EMBED, NUM_HEADS, FF_DIM)(x)
    outputs = layers.Dense(VOCAB)(x)
    return keras.Model(inputs=inputs, outputs=outputs)


def token_ids(batch, length=MAXLEN, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype("int32")


def convert(teacher):
    student, report = keras_sara.convert(teacher, verify=False)  # the tests check the outputs
    assert report.num_converted == len([l for l in student.layers if isinstance(l, TransformerBlock)])
    return student


@pytest.fixture(scope="module")
def mini_gpt():
    keras.utils.set_random_seed(7)
    return convert(create_model())


# ------------------------------------------------------------------- parity


def test_mini_gpt_streams_like_its_causal_forward_pass(mini_gpt):
    ids = token_ids(2, seed=1)
    full = to_numpy(mini_gpt(ids))  # (2, 80, VOCAB): one causal forward pass
    block = next(l for l in mini_gpt.layers if isinstance(l, TransformerBlock))
    seen, steps = [], []
    original_call, original_step = type(block).call, streaming.sara_attention_step

    def counting_call(self, inputs):
        seen.append(tuple(inputs.shape))
        return original_call(self, inputs)

    def counting_step(layer, *args):
        steps.append(layer.name)
        return original_step(layer, *args)

    with mock.patch.object(type(block), "call", counting_call), \
            mock.patch.object(streaming, "sara_attention_step", counting_step):
        step = streaming.make_step_model(mini_gpt)
    # The block's own call ran on one token, its attention doing the recurrent step:
    # once on the whole 6-token probe, on each of its tokens, then in the step's graph.
    assert seen[0] == (2, 6, EMBED) and len(seen) > 7
    assert all(shape[1:] == (1, EMBED) for shape in seen[1:])
    assert steps and set(steps) == {block.att.name}

    streamed, state = streaming.stream(step, ids[:, :STREAMED])
    assert streamed.shape == (2, STREAMED, VOCAB)
    np.testing.assert_allclose(streamed, full[:, :STREAMED], rtol=PARITY, atol=PARITY)
    np.testing.assert_array_equal(state[-1], np.full((2, 1), STREAMED))  # the position counter
    # Resuming from the returned state continues at position 72, up to the last one.
    rest, state = streaming.stream(step, ids[:, STREAMED:], state)
    np.testing.assert_allclose(rest, full[:, STREAMED:], rtol=PARITY, atol=PARITY)

    # The step shares the student's weights: a change to one shows in the other.
    head = mini_gpt.layers[-1]
    head.bias.assign(head.bias + 1.0)
    shifted, _ = streaming.stream(step, ids[:, :4])
    head.bias.assign(head.bias - 1.0)
    np.testing.assert_allclose(shifted - full[:, :4], 1.0, atol=1e-4)


def test_step_signature_counts_positions_and_orders_states_by_block():
    keras.utils.set_random_seed(8)
    student = convert(create_model(maxlen=12, blocks=2))
    step = streaming.make_step_model(student)
    attention = [l.att.name for l in student.layers if isinstance(l, TransformerBlock)]
    names = [t.name for t in step.inputs]
    assert names == ["x_t"] + [f"{n}_{s}" for n in attention for s in ("psi", "gamma")] + ["position"]
    # relu features: M = key_dim = EMBED; value_dim = EMBED (keras.io: key_dim=embed_dim)
    states = [(None, NUM_HEADS, EMBED, EMBED), (None, NUM_HEADS, EMBED)] * 2
    assert [tuple(t.shape) for t in step.inputs] == [(None, 1)] + states + [(None, 1)]
    assert [tuple(t.shape) for t in step.outputs] == [(None, 1, VOCAB)] + states + [(None, 1)]
    assert (step.inputs[0].dtype, step.inputs[-1].dtype) == ("int32", "int32")  # ids, position
    state = streaming.initial_state(step, batch_size=3)
    assert [s.dtype for s in state] == [np.float32] * 4 + [np.int32]
    assert not any(s.any() for s in state)

    ids = token_ids(3, 12, seed=2)
    streamed, state = streaming.stream(step, ids)
    np.testing.assert_allclose(streamed, to_numpy(student(ids)), rtol=PARITY, atol=PARITY)

    # One token past the position embedding: a clear error, nothing run.
    with pytest.raises(ValueError, match=r"`tokens` runs past .*'token_and_position_embedding(_\d+)?'.*"
                                         r"input_dim=12 .*tokens.shape\[1\]=1 from position 12"):
        streaming.stream(step, ids[:, :1], state)
    with pytest.raises(ValueError, match=r"tokens.shape\[1\]=13 from position 0"):
        streaming.stream(step, token_ids(1, 13))
    with pytest.raises(ValueError, match=r"`tokens` must hold integer token ids .*int32"):
        streaming.stream(step, ids.astype("float32"))
    with pytest.raises(ValueError, match=r"`tokens` must have shape \(batch, tokens\) token ids"):
        streaming.stream(step, ids[..., None])
    # Calling the step itself there gives NaN on every backend (no plausible wrong token).
    y_t, *_ = step.predict_on_batch([ids[:, :1], *state])
    assert np.isnan(y_t).all()


class TokenEmbeddingAndSinePosition(layers.Layer):
    """Sinusoidal positions, which no Embedding holds: streamable by `call_at_position`."""

    def __init__(self, maxlen, vocab_size, embed_dim):
        super().__init__()
        self.token_emb = layers.Embedding(input_dim=vocab_size, output_dim=embed_dim)
        self.frequencies = np.exp(-np.arange(embed_dim) / embed_dim).astype("float32")

    def _sine(self, positions):  # (..., T) -> (..., T, E)
        return ops.sin(ops.expand_dims(ops.cast(positions, "float32"), -1) * self.frequencies)

    def call(self, x):
        return self.token_emb(x) + self._sine(ops.arange(ops.shape(x)[-1]))

    def call_at_position(self, inputs, position):
        return self.token_emb(inputs) + self._sine(position)


def test_a_layer_can_define_its_one_token_call_at_a_position():
    keras.utils.set_random_seed(9)
    student = convert(create_model(maxlen=None, embedding=TokenEmbeddingAndSinePosition))
    step = streaming.make_step_model(student)
    ids = token_ids(2, 20, seed=3)
    streamed, state = streaming.stream(step, ids)
    np.testing.assert_allclose(streamed, to_numpy(student(ids)), rtol=PARITY, atol=PARITY)
    # No position table here, so no limit: positions run on.
    more, _ = streaming.stream(step, ids[:, :3], state)
    assert np.isfinite(more).all()


def test_token_ids_through_a_plain_embedding_in_a_flat_model():
    keras.utils.set_random_seed(10)
    inputs = keras.Input((None,), dtype="int32")
    x = layers.Embedding(VOCAB, EMBED)(inputs)
    x = x + SARAMultiHeadAttention(NUM_HEADS, 8)(x, x, use_causal_mask=True)
    model = keras.Model(inputs, layers.Dense(VOCAB)(x))
    step = streaming.make_step_model(model)
    assert [t.name for t in step.inputs][-1] != "position"  # nothing depends on positions
    ids = token_ids(2, 16, seed=4)
    streamed, _ = streaming.stream(step, ids)
    np.testing.assert_allclose(streamed, to_numpy(model(ids)), rtol=PARITY, atol=PARITY)


def test_a_nested_functional_block_runs_as_a_block():
    keras.utils.set_random_seed(12)
    inner_in = keras.Input((None, EMBED))
    h = layers.LayerNormalization()(inner_in)
    inner = keras.Model(inner_in, inner_in + SARAMultiHeadAttention(NUM_HEADS, 8)(h, h, use_causal_mask=True))
    inputs = keras.Input((None, EMBED))
    model = keras.Model(inputs, layers.Dense(3)(inner(layers.Dense(EMBED)(inputs))))
    step = streaming.make_step_model(model)
    x = np.random.default_rng(6).standard_normal((2, 10, EMBED)).astype("float32")
    streamed, _ = streaming.stream(step, x)
    np.testing.assert_allclose(streamed, to_numpy(model(x)), rtol=PARITY, atol=PARITY)


# -------------------------------------------------------------------- errors


class ScaledTokenAndPositionEmbedding(TokenAndPositionEmbedding):
    """Scales the token embedding by sqrt(embed_dim): not token + position, as it stands."""

    def call(self, x):
        positions = self.pos_emb(ops.arange(0, ops.shape(x)[-1], 1))
        return self.token_emb(x) * 4.0 + positions


class PoolingBlock(TransformerBlock):
    """Adds the mean over all tokens: mixes tokens outside the attention."""

    def call(self, inputs):
        return super().call(inputs) + ops.mean(inputs, axis=1, keepdims=True)


class BidirectionalBlock(TransformerBlock):
    def call(self, inputs):
        return self.layernorm1(inputs + self.att(inputs, inputs))


class ExplicitMaskBlock(TransformerBlock):
    """The causal mask passed as `attention_mask`, as keras.io's published block does.

    (keras.io builds it with `ops.tile` over a tensor of repeats, which the
    TensorFlow backend cannot trace symbolically; a broadcast makes the same mask.)
    """

    def call(self, inputs):
        seq_len = ops.shape(inputs)[1]
        causal_mask = ops.tril(ops.ones((seq_len, seq_len), "bool"))  # (T, T)
        causal_mask = ops.broadcast_to(causal_mask[None], (ops.shape(inputs)[0], seq_len, seq_len))
        attention_output = self.att(inputs, inputs, attention_mask=causal_mask)
        out1 = self.layernorm1(inputs + self.dropout1(attention_output))
        return self.layernorm2(out1 + self.dropout2(self.ffn(out1)))


UNSTREAMABLE = {
    "softmax_block": (lambda: create_model(maxlen=8),  # not converted
                      r"'transformer_block.*' \(TransformerBlock\) .*softmax attention.*keras_sara.convert"),
    "not_token_plus_position": (
        lambda: convert(create_model(maxlen=8, embedding=ScaledTokenAndPositionEmbedding)),
        r"'scaled_token_and_position_embedding(_\d+)?' \(ScaledTokenAndPositionEmbedding\) cannot be "
        r"streamed: it holds Embedding layers .*"
        r"not token_embedding\(x\) \+ position_embedding\(arange\(tokens\)\).*"
        r"define `call_at_position\(self, inputs, position\)`"),
    "pooling_in_block": (lambda: convert(create_model(maxlen=8, block=PoolingBlock)),
                         r"'pooling_block.*' \(.*PoolingBlock\) cannot be streamed: run one token at a "
                         r"time.*does not reproduce its causal output"),
    "bidirectional_in_block": (lambda: convert(create_model(maxlen=8, block=BidirectionalBlock)),
                               r"SARAMultiHeadAttention '.*' \(in layer 'bidirectional_block.*'\) cannot "
                               r"be streamed: it is called without use_causal_mask=True"),
    "explicit_mask": (lambda: convert(create_model(maxlen=8, block=ExplicitMaskBlock)),
                      r"\(in layer 'explicit_mask_block.*'\) cannot be streamed: it is called without "
                      r"use_causal_mask=True.*it receives `attention_mask`"),
}


@pytest.mark.parametrize("case", list(UNSTREAMABLE))
def test_unstreamable_custom_layers_fail_with_a_clear_error(case):
    build, message = UNSTREAMABLE[case]
    model = build()
    with pytest.raises(ValueError, match=message):
        streaming.make_step_model(model)


class WrongPositionMethod(TokenEmbeddingAndSinePosition):
    def call_at_position(self, inputs, position):
        return self.token_emb(inputs) + self._sine(ops.zeros_like(position))  # always position 0


def test_a_wrong_call_at_position_is_caught_on_the_probe():
    student = convert(create_model(maxlen=None, embedding=WrongPositionMethod))
    with pytest.raises(ValueError, match=r"'wrong_position_method.*' .*its `call_at_position` does not "
                                         r"match the layer"):
        streaming.make_step_model(student)


# ------------------------------------------------------------------- LiteRT


@pytest.mark.skipif(backend() != "tensorflow", reason="LiteRT conversion runs on the TensorFlow backend")
def test_mini_gpt_step_exports_to_a_verified_builtins_only_litert_file(mini_gpt, tmp_path):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from tflite.runner import PolicyRunner

    with pytest.raises(ValueError, match=r"`probe_steps` must be below .*input_dim=80.*probe_steps=\[0, 80\]"):
        streaming.export_streaming_tflite(mini_gpt, tmp_path / "bad.tflite", probe_steps=[0, 80])
    path = tmp_path / "mini_gpt_step.tflite"
    report = streaming.export_streaming_tflite(mini_gpt, path, benchmark_runs=0)
    assert report.verified and report.relative_error <= 1e-4 and report.num_probes == 4
    assert report.input_dtypes[0] == "int32" and report.input_dtypes[-1] == "int32"
    interpreter = Interpreter(
        model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    file_ops = [op["op_name"] for op in interpreter._get_ops_details()]
    assert report.flex_free and not [o for o in file_ops if o.startswith("Flex") or o == "CUSTOM"]

    runner = PolicyRunner(str(path), num_threads=1)
    ids = token_ids(1, seed=5)
    state = [np.zeros(s, d) for s, d in zip(runner.input_shapes[1:], runner.input_dtypes[1:])]
    litert = []
    for t in range(64):
        y_t, *state = runner(ids[:, t : t + 1], *state)
        litert.append(y_t)
    keras_step, _ = streaming.stream(streaming.make_step_model(mini_gpt), ids[:, :64])
    np.testing.assert_allclose(np.concatenate(litert, axis=1), keras_step, rtol=1e-4, atol=1e-4)
    assert int(state[-1][0, 0]) == 64


def test_default_probe_steps_stop_at_the_last_position(tmp_path):
    keras.utils.set_random_seed(11)
    student = convert(create_model(maxlen=20))
    if backend() == "tensorflow":
        with mock.patch.object(streaming.export_lib, "export_tflite") as export:
            streaming.export_streaming_tflite(student, tmp_path / "step.tflite")
        probes = export.call_args.kwargs["probe"]
    else:  # converted in a TensorFlow-backend process, from these probes
        with mock.patch.object(streaming, "_export_in_subprocess") as export:
            streaming.export_streaming_tflite(student, tmp_path / "step.tflite")
        probes = export.call_args.args[5]
    assert [int(p[-1][0, 0]) for p in probes] == [0, 1, 7, 19]  # 31 is past 20 positions
    assert all(p[0].dtype == np.int32 and p[0].shape == (1, 1) for p in probes)
