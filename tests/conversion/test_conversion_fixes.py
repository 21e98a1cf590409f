"""keras_sara.convert on models it used to get wrong (every backend).

Adapted preprocessing state, token-id probes, keras-hub's (B, 1, S) padding
masks, layers written without configs (the keras.io examples), nested
Functional decoders under `clone_function`, and the report's list of layers
that ran the quadratic path.
"""

import re
from unittest import mock

import keras
import numpy as np
import pytest
from keras import layers, ops

import keras_sara
from keras_sara.conversion import _make_probe, convert
from keras_sara.layers import SARAMultiHeadAttention
from tests.backend_utils import to_numpy, value_and_grads
from tests.keras_io_models import TokenAndPositionEmbedding

pytestmark = pytest.mark.filterwarnings("ignore:`build\\(\\)` was called on layer:UserWarning")
MHA = keras.layers.MultiHeadAttention


def _x(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _predict(model, x):
    return [to_numpy(t) for t in keras.tree.flatten(model(x, training=False))]


def _manual_drift(student, teacher, probe):
    """The report's two numbers, computed here from the two models' outputs."""
    a = np.concatenate([t.astype(np.float64).ravel() for t in _predict(student, probe)])
    b = np.concatenate([t.astype(np.float64).ravel() for t in _predict(teacher, probe)])
    return float(np.max(np.abs(a - b))), float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _sara_layers(model):
    return [l for l in model._flatten_layers(include_self=False) if isinstance(l, SARAMultiHeadAttention)]


def _mha_layers(model):
    return [l for l in model._flatten_layers(include_self=False) if isinstance(l, MHA)]


def _fails(*args, **kwargs):
    raise AssertionError("the quadratic kernel-matrix path ran")


# ------------------------------------------ 1. adapted preprocessing state


def _normalized_vit(data):
    inputs = keras.Input((8, 6))
    norm = layers.Normalization(axis=-1, name="norm")
    norm.adapt(data)
    h = layers.Dense(16, name="embed")(norm(inputs))
    a = MHA(2, 8, name="mha")(h, h)
    y = layers.LayerNormalization(name="ln")(h + a)
    model = keras.Model(inputs, layers.Dense(3, name="head")(y))
    model(data[:2])
    return model


def test_adapted_normalization_keeps_its_statistics(tmp_path):
    data = (5.0 + 3.0 * _x(32, 8, 6)).astype("float32")  # far from mean 0 / variance 1
    teacher = _normalized_vit(data)
    x = data[:4]

    exact, _ = convert(teacher, blend=0.0, probe=x)
    np.testing.assert_allclose(_predict(exact, x)[0], _predict(teacher, x)[0], atol=1e-5)

    student, report = convert(teacher, probe=x)
    max_abs, rel = _manual_drift(student, teacher, x)
    assert report.max_abs_error == pytest.approx(max_abs, rel=1e-6)
    assert report.relative_error == pytest.approx(rel, rel=1e-6)
    # Reference: the teacher's own layers around a SARA layer loaded with its MHA.
    get = teacher.get_layer
    h = get("embed")(get("norm")(x))
    sara = SARAMultiHeadAttention(2, 8)
    sara(h, h)
    sara.load_mha_weights(get("mha"))
    reference = to_numpy(get("head")(get("ln")(h + sara(h, h))))
    np.testing.assert_allclose(_predict(student, x)[0], reference, atol=1e-5)

    path = str(tmp_path / "student.keras")
    student.save(path)
    np.testing.assert_allclose(_predict(keras.models.load_model(path), x)[0], _predict(student, x)[0], atol=1e-6)


# ------------------------------------------------- 2. token-id probes


def _tiny_bert():
    import keras_hub

    return keras_hub.models.BertBackbone(
        vocabulary_size=100, num_layers=1, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=16,
    )


def test_default_probe_uses_valid_token_ids_and_an_open_padding_mask():
    teacher = _tiny_bert()
    probe = _make_probe(teacher, None)
    tokens, segments, padding = probe["token_ids"], probe["segment_ids"], probe["padding_mask"]
    assert tokens.min() >= 1 and tokens.max() < 100 and len(np.unique(tokens)) > 10
    np.testing.assert_array_equal(segments, 1)  # the segment embedding has 2 rows
    np.testing.assert_array_equal(padding, 1)

    student, report = convert(teacher)
    max_abs, rel = _manual_drift(student, teacher, probe)
    assert rel > 1e-5  # far above float32 rounding; zero ids and a zero padding mask read 0.0
    assert report.max_abs_error == pytest.approx(max_abs, rel=1e-6)
    assert report.relative_error == pytest.approx(rel, rel=1e-6)


def test_probe_falls_back_to_the_smallest_embedding_then_to_100():
    ids = keras.Input((5,), dtype="int32", name="ids")
    doubled = layers.Lambda(lambda t: t * 1)(ids)  # the Embedding does not read the input itself
    small = keras.Model(ids, layers.Embedding(7, 4)(doubled))
    assert set(np.unique(_make_probe(small, None))) <= set(range(1, 7))

    no_embedding = keras.Model(ids, layers.Lambda(lambda t: ops.cast(t, "float32"))(ids))
    probe = _make_probe(no_embedding, None)
    assert probe.min() >= 1 and probe.max() < 100 and probe.max() > 7


# --------------------------------------------- 3. (B, 1, S) padding masks


@pytest.mark.parametrize("blend", [1.0, 0.5])
@pytest.mark.parametrize("mask_dtype", ["bool", "int32"])
def test_key_only_attention_mask_takes_the_exact_linear_path(blend, mask_dtype):
    b, t, s, e = 2, 5, 7, 8
    query, value = _x(b, t, e, seed=1), _x(b, s, e, seed=2)
    keep = np.random.default_rng(3).random((b, 1, s)) > 0.4
    keep[:, :, 0] = True  # every row keeps a key
    mask = keep.astype(mask_dtype)
    layer = SARAMultiHeadAttention(2, 4, blend=blend)
    layer(query, value)

    def key_only(q, v):
        return layer(q, v, attention_mask=mask)

    def broadcast(q, v):  # the same mask as (B, T, S): the kernel-matrix path
        return layer(q, v, attention_mask=np.broadcast_to(mask, (b, t, s)))

    cotangent = _x(b, t, e, seed=4)
    with mock.patch.object(SARAMultiHeadAttention, "_kernel_matrix_attention", _fails):
        out, grads = value_and_grads(key_only, [query, value], cotangent)
    assert not layer._warned_quadratic
    spy = mock.patch.object(
        SARAMultiHeadAttention, "_kernel_matrix_attention", autospec=True,
        side_effect=SARAMultiHeadAttention._kernel_matrix_attention,
    )
    with spy as called, pytest.warns(UserWarning, match="quadratic cost"):
        ref_out, ref_grads = value_and_grads(broadcast, [query, value], cotangent)
    assert called.called and layer._warned_quadratic
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    for g, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, ref, atol=1e-5)


def test_converted_bert_runs_linear_with_its_padding_mask():
    teacher = _tiny_bert()
    probe = _make_probe(teacher, None)
    probe["padding_mask"][:, 10:] = 0  # real padding
    with mock.patch.object(SARAMultiHeadAttention, "_kernel_matrix_attention", _fails):
        student, report = convert(teacher, probe=probe)
    assert report.num_converted == 1 and report.quadratic_layers == []
    assert not any(l._warned_quadratic for l in _sara_layers(student))
    # Padded keys are ignored: changing their tokens moves no unpadded output.
    other = dict(probe, token_ids=probe["token_ids"].copy())
    other["token_ids"][:, 10:] = 1 + (other["token_ids"][:, 10:] % 98)
    a = to_numpy(student(probe)["sequence_output"])[:, :10]
    c = to_numpy(student(other)["sequence_output"])[:, :10]
    np.testing.assert_allclose(a, c, atol=1e-5)


# ---------------------- 4. layers without configs (keras.io text classification)


class TransformerBlock(layers.Layer):
    """keras.io "Text classification with Transformer", as published."""

    def __init__(self, embed_dim, num_heads, ff_dim, rate=0.1):
        super().__init__()
        self.att = layers.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim)
        self.ffn = keras.Sequential(
            [layers.Dense(ff_dim, activation="relu"), layers.Dense(embed_dim)]
        )
        self.layernorm1 = layers.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = layers.LayerNormalization(epsilon=1e-6)
        self.dropout1 = layers.Dropout(rate)
        self.dropout2 = layers.Dropout(rate)

    def call(self, inputs):
        attn_output = self.att(inputs, inputs)
        attn_output = self.dropout1(attn_output)
        out1 = self.layernorm1(inputs + attn_output)
        ffn_output = self.ffn(out1)
        ffn_output = self.dropout2(ffn_output)
        return self.layernorm2(out1 + ffn_output)


MAXLEN, VOCAB, EMBED, NUM_HEADS, FF_DIM = 20, 200, 16, 2, 32


def _keras_io_text_classifier():
    inputs = layers.Input(shape=(MAXLEN,))
    embedding_layer = TokenAndPositionEmbedding(MAXLEN, VOCAB, EMBED)
    x = embedding_layer(inputs)
    transformer_block = TransformerBlock(EMBED, NUM_HEADS, FF_DIM)
    x = transformer_block(x)
    x = layers.GlobalAveragePooling1D()(x)
    x = layers.Dropout(0.1)(x)
    x = layers.Dense(20, activation="relu")(x)
    x = layers.Dropout(0.1)(x)
    outputs = layers.Dense(2, activation="softmax")(x)
    return keras.Model(inputs=inputs, outputs=outputs)


def _tokens(n, seed=0):
    return np.random.default_rng(seed).integers(1, VOCAB, size=(n, MAXLEN)).astype("float32")


def test_keras_io_text_classifier_converts_without_configs():
    teacher = _keras_io_text_classifier()
    x = _tokens(4)
    before = _predict(teacher, x)[0]
    weights = [w.copy() for w in teacher.get_weights()]

    student, report = convert(teacher)
    assert report.num_converted == 1
    # Keras numbers auto-named layers per session (multi_head_attention_15 after other tests).
    assert re.fullmatch(r"transformer_block(_\d+)?/multi_head_attention(_\d+)?", report.converted[0].path)
    assert any("TransformerBlock" in n and "super().__init__(**kwargs)" in n for n in report.notes)
    assert "TokenAndPositionEmbedding" in str(report)
    for a, b in zip(weights, teacher.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert all(type(l) is MHA for l in _mha_layers(teacher))
    np.testing.assert_allclose(_predict(teacher, x)[0], before, atol=1e-6)
    # Names restored: the student's variables sit under the teacher's layer names
    # (unnamed sublayers get fresh numbers, as in any Keras copy).
    assert [v.path.split("/")[0] for v in student.weights] == [v.path.split("/")[0] for v in teacher.weights]
    roots = {re.sub(r"_\d+$", "", v.path.split("/")[0]) for v in student.weights}  # Keras numbers repeats
    assert {"token_and_position_embedding", "transformer_block"} <= roots

    exact, _ = convert(teacher, blend=0.0, verify=False)
    np.testing.assert_allclose(_predict(exact, x)[0], before, atol=1e-5)
    for layer in _sara_layers(exact):
        layer.set_blend(1.0)
    final = keras_sara.finalize(exact)  # copies a converted no-config layer; checks outputs
    assert _sara_layers(final) and all(l.blend_variable is None for l in _sara_layers(final))

    student.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy")
    start = [w.copy() for w in student.get_weights()]
    history = student.fit(x, np.array([0, 1, 0, 1]), batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert any(not np.array_equal(a, b) for a, b in zip(start, student.get_weights()))


class HoldsALayer(layers.Layer):
    """Takes a layer object in `__init__` and has no get_config: cannot be copied."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.att = MHA(2, 4)

    def call(self, x):
        return self.att(self.inner(x), x)


def test_a_model_that_cannot_be_copied_gets_the_fix_in_the_error():
    inputs = keras.Input((4, 8))
    teacher = keras.Model(inputs, HoldsALayer(layers.Dense(8))(inputs))
    with pytest.raises(ValueError, match=r"Could not copy.*super\(\)\.__init__\(\*\*kwargs\).*get_config"):
        convert(teacher)


# -------------------------------- 5. nested Functional decoder, clone_function


def _seq2seq():
    """keras.io English-to-Spanish layout: the decoder is its own keras.Model."""
    t, e = 6, 16
    enc_in = keras.Input((t, e), name="encoder_inputs")
    enc = layers.LayerNormalization()(enc_in + MHA(2, 8, name="enc_self")(enc_in, enc_in))
    dec_in, dec_ctx = keras.Input((t, e), name="decoder_inputs"), keras.Input((t, e), name="context")
    h = layers.LayerNormalization()(dec_in + MHA(2, 8, name="dec_self")(dec_in, dec_in, use_causal_mask=True))
    h = layers.LayerNormalization()(h + MHA(2, 8, name="dec_cross")(h, dec_ctx))
    decoder = keras.Model([dec_in, dec_ctx], layers.Dense(e)(h), name="decoder")
    outer_dec = keras.Input((t, e), name="target")
    return keras.Model([enc_in, outer_dec], decoder([outer_dec, enc]))


def test_clone_function_converts_a_nested_functional_decoder():
    teacher = _seq2seq()
    x = [_x(2, 6, 16, seed=1), _x(2, 6, 16, seed=2)]
    teacher(x)
    student = keras.models.clone_model(teacher, clone_function=keras_sara.clone_function)
    assert len(_mha_layers(teacher)) == 3
    assert len(_sara_layers(student)) == len(_mha_layers(teacher))
    student.set_weights(teacher.get_weights())  # the one line still copies every weight
    reference, _ = convert(teacher, verify=False)
    np.testing.assert_allclose(_predict(student, x)[0], _predict(reference, x)[0], atol=1e-5)


# ------------------------------------------- 6. quadratic layers in the report


@keras.saving.register_keras_serializable(package="sara_fix_tests")
class DenseCausalBlock(layers.Layer):
    """Self-attention that passes causality as a dense (B, T, T) mask, or as the flag."""

    def __init__(self, dense_mask=True, **kwargs):
        super().__init__(**kwargs)
        self.dense_mask = dense_mask
        self.mha = MHA(2, 8, name="mha")

    def call(self, x):
        if not self.dense_mask:
            return self.mha(x, x, use_causal_mask=True)
        t = ops.shape(x)[1]
        causal = ops.tril(ops.ones((t, t), "bool"))[None]  # (1, T, T)
        mask = ops.broadcast_to(causal, (ops.shape(x)[0], t, t))  # (B, T, T)
        return self.mha(x, x, attention_mask=mask)

    def get_config(self):
        return {**super().get_config(), "dense_mask": self.dense_mask}


@pytest.mark.parametrize("dense_mask", [True, False])
def test_report_names_the_layers_that_ran_the_quadratic_path(dense_mask):
    inputs = keras.Input((6, 16))
    teacher = keras.Model(inputs, DenseCausalBlock(dense_mask, name="block")(inputs))
    teacher(_x(2, 6, 16))
    with pytest.warns(UserWarning) if dense_mask else mock.patch.object(
        SARAMultiHeadAttention, "_kernel_matrix_attention", _fails
    ):
        student, report = convert(teacher)
    # Both spellings of causality give the same outputs.
    causal, _ = convert(keras.Model(inputs, DenseCausalBlock(False, name="block")(inputs)), verify=False)
    causal.set_weights(student.get_weights())
    np.testing.assert_allclose(_predict(student, _x(2, 6, 16))[0], _predict(causal, _x(2, 6, 16))[0], atol=1e-5)
    if dense_mask:
        assert report.quadratic_layers == ["block/mha"]
        assert "quadratic path (dense attention_mask): block/mha" in str(report)
        assert any("use_causal_mask=True" in n and "key_mask/value_mask" in n for n in report.notes)
        assert report.to_dict()["quadratic_layers"] == ["block/mha"]
    else:
        assert report.quadratic_layers == []
        assert "quadratic" not in str(report)
