"""keras-hub attention adapters: tiny backbones built from their constructors, converted.

Each model is built with random weights (nothing downloaded). The checks:
no softmax attention left, projection weights identical to the teacher's,
`blend=0.0` reproducing the teacher, `.keras` reload exact; each adapter
against the naive reference of the same linear attention (grouped heads,
RoPE, padding, causal and prefix masks); up-training and finalize; bad input.
"""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_hub  # make test installs it: a missing keras-hub must fail, not skip

import keras_sara  # noqa: E402
from keras_sara.adapters import AdaptedAttention, AttentionAdapter  # noqa: E402
from keras_sara.ops import naive  # noqa: E402
from tests.backend_utils import backend, rel_err, to_numpy, value_and_grads  # noqa: E402

V = 64  # vocabulary
RNG = np.random.default_rng(0)


def _tokens(batch=2, length=7, pad_from=None):
    ids = np.random.default_rng(1).integers(1, V, (batch, length)).astype("int32")
    mask = np.ones((batch, length), "int32")
    if pad_from is not None:
        mask[1, pad_from:] = 0
    return {"token_ids": ids, "padding_mask": mask}


def gemma():
    return keras_hub.models.GemmaBackbone(
        vocabulary_size=V, num_layers=2, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=16, intermediate_dim=32, head_dim=8), _tokens(pad_from=5)


def llama():
    return keras_hub.models.LlamaBackbone(
        vocabulary_size=V, num_layers=2, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=16, intermediate_dim=32), _tokens(pad_from=5)


def mistral():
    return keras_hub.models.MistralBackbone(
        vocabulary_size=V, num_layers=2, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=16, intermediate_dim=32, sliding_window=512), _tokens(pad_from=5)


def qwen():
    return keras_hub.models.QwenBackbone(
        vocabulary_size=V, num_layers=2, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=16, intermediate_dim=32), _tokens(pad_from=5)


def paligemma():
    model = keras_hub.models.PaliGemmaBackbone(
        vocabulary_size=V, image_size=16, num_layers=2, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=16, intermediate_dim=32, head_dim=8, vit_patch_size=4, vit_num_heads=2,
        vit_hidden_dim=16, vit_num_layers=2, vit_intermediate_dim=32)
    inputs = _tokens(length=5)
    inputs["images"] = np.random.default_rng(2).random((2, 16, 16, 3)).astype("float32")
    response = np.zeros((2, 5), "int32")
    response[:, 3:] = 1  # prompt (bidirectional with the image) then response (causal)
    inputs["response_mask"] = response
    return model, inputs


def gpt2():
    return keras_hub.models.GPT2Backbone(
        vocabulary_size=V, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32,
        max_sequence_length=16), _tokens(pad_from=5)


BACKBONES = {"gemma": gemma, "llama": llama, "mistral": mistral, "qwen": qwen,
             "paligemma": paligemma, "gpt2": gpt2}


def _flat(outputs):
    return np.concatenate([np.asarray(to_numpy(t), np.float64).ravel() for t in keras.tree.flatten(outputs)])


def _keras_hub_attention(model):
    return [l for l in model._flatten_layers(include_self=False, recursive=True)
            if type(l).__name__.endswith("Attention") and "keras_hub" in (getattr(l, "_sara_base", None)
                                                                          or type(l)).__module__]


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_converts_with_no_softmax_left(name, tmp_path):
    teacher, inputs = BACKBONES[name]()
    before = [to_numpy(w).copy() for w in teacher.weights]
    teacher_out = _flat(teacher(inputs))
    student, report = keras_sara.convert(teacher, probe=inputs)

    attention = _keras_hub_attention(student)
    assert report.num_converted == len(attention) == len(_keras_hub_attention(teacher)) > 0
    assert all(isinstance(l, AdaptedAttention) for l in attention), [type(l).__name__ for l in attention]
    assert not report.skipped
    out = _flat(student(inputs))
    assert np.isfinite(out).all()
    assert report.relative_error == pytest.approx(rel_err(out, teacher_out), rel=1e-4)
    # every teacher variable copied one to one, under the same path; teacher untouched
    by_path = {w.path: to_numpy(w) for w in student.weights}
    for w, b in zip(teacher.weights, before):
        np.testing.assert_array_equal(by_path[w.path], to_numpy(w))
        np.testing.assert_array_equal(to_numpy(w), b)
    assert len(student.weights) == len(teacher.weights)  # ReLU, blend 1: no new variable

    path = str(tmp_path / f"{name}.keras")
    student.save(path)
    loaded = keras.models.load_model(path)
    assert sum(isinstance(l, AdaptedAttention) for l in loaded._flatten_layers()) == len(attention)
    np.testing.assert_array_equal(_flat(loaded(inputs)), out)


@pytest.mark.parametrize("name", ["gemma", "paligemma", "gpt2"])
def test_blend_zero_reproduces_teacher(name):
    teacher, inputs = BACKBONES[name]()
    student, report = keras_sara.convert(teacher, probe=inputs, blend=0.0)
    assert report.max_abs_error == 0.0
    np.testing.assert_array_equal(_flat(student(inputs)), _flat(teacher(inputs)))


def test_reload_in_a_fresh_process_needs_only_import(tmp_path):
    teacher, inputs = paligemma()
    student, _ = keras_sara.convert(teacher, probe=inputs)
    student.save(str(tmp_path / "p.keras"))
    np.savez(tmp_path / "inputs.npz", **inputs)
    np.save(tmp_path / "expected.npy", _flat(student(inputs)))
    script = textwrap.dedent(f"""
        import numpy as np, keras, keras_sara
        from keras_sara.adapters import AdaptedAttention
        model = keras.models.load_model({str(tmp_path / 'p.keras')!r})
        inputs = dict(np.load({str(tmp_path / 'inputs.npz')!r}))
        out = np.concatenate([np.asarray(keras.ops.convert_to_numpy(t), np.float64).ravel()
                              for t in keras.tree.flatten(model(inputs))])
        assert sum(isinstance(l, AdaptedAttention) for l in model._flatten_layers()) == 4
        np.testing.assert_array_equal(out, np.load({str(tmp_path / 'expected.npy')!r}))
        print("fresh-ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "KERAS_BACKEND": backend()})
    assert "fresh-ok" in run.stdout, run.stderr[-3000:]


# ------------------------------------------------------- against the naive reference


def _decoder_attention(model):
    return [l for l in _keras_hub_attention(model) if "Vit" not in type(l).__name__][0]


def _dense_masks(t):
    pad = np.ones((2, t), bool)
    pad[1, t - 2:] = False
    tri = np.tril(np.ones((t, t), bool))
    prefix = np.zeros((2, t), bool)
    prefix[:, :3] = True
    return {
        "causal_padding": pad[:, None, :] & tri[None],
        "prefix": (prefix & pad)[:, None, :] | ((pad & ~prefix)[:, None, :] & tri[None]),
        "not_prefix_causal": np.broadcast_to(tri & ~np.tril(np.ones((t, t), bool), -3), (2, t, t)).copy(),
    }


def _rope_reference(layer, x, mask, name):
    """The adapted layer's linear attention, recomputed from its own sublayers and the naive kernel."""
    fm = layer.feature_map
    if name == "gemma":
        q, k, v = layer.query_dense(x), layer.key_dense(x), layer.value_dense(x)
        fq, fk = fm(q, role="query"), fm(k, role="key")
        out = naive.naive_structured_linear_attention(
            fq, fk, v, mask, layer._apply_rope(fq, 0), layer._apply_rope(fk, 0), layer.eps)
        return layer.output_dense(out)
    q, k, v = layer._query_dense(x), layer._key_dense(x), layer._value_dense(x)
    fq, fk = fm(q, role="query"), fm(k, role="key")
    rope = layer.rotary_embedding_layer
    out = naive.naive_structured_linear_attention(
        fq, fk, v, mask, rope(fq, start_index=0), rope(fk, start_index=0), layer.eps)
    return layer._output_dense(out)


@pytest.mark.parametrize("name", ["gemma", "llama", "qwen"])
@pytest.mark.parametrize("mask_kind", ["causal_padding", "prefix", "not_prefix_causal"])
def test_rope_gqa_adapter_matches_naive_reference(name, mask_kind):
    teacher, _ = BACKBONES[name]()
    student, _ = keras_sara.convert(teacher, verify=False)
    layer = _decoder_attention(student)
    x = np.random.default_rng(3).standard_normal((2, 7, 16)).astype("float32")
    mask = _dense_masks(7)[mask_kind]
    cot = np.random.default_rng(4).standard_normal((2, 7, 16)).astype("float32")
    out, (grad,) = value_and_grads(lambda t: layer(t, attention_mask=mask), [x], cot)
    ref, (ref_grad,) = value_and_grads(lambda t: _rope_reference(layer, t, mask, name), [x], cot, jit=False)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(grad, ref_grad) < 1e-4


def test_prefix_causal_masks_take_the_linear_path(monkeypatch):
    """keras-hub's own masks run the linear kernel; a mask of another form runs the exact kernel matrix.

    The choice is `ops.cond` on the mask reader's `exact` flag: the flags are
    recorded on every backend; the branch counts too where a cond runs one
    branch only (JAX's `lax.cond` traces both).
    """
    from keras_sara.ops import structured

    calls = {"linear": 0, "quadratic": 0}
    exact_flags = []
    linear, quadratic = structured.structured_linear_attention, structured.masked_kernel_attention
    split = structured.split_prefix_causal_mask

    def count(kind, fn):
        def wrapped(*a, **k):
            calls[kind] += 1
            return fn(*a, **k)
        return wrapped

    def spy_split(mask):
        out = split(mask)
        exact_flags.append(bool(to_numpy(out[2])))
        return out

    monkeypatch.setattr(structured, "structured_linear_attention", count("linear", linear))
    monkeypatch.setattr(structured, "masked_kernel_attention", count("quadratic", quadratic))
    monkeypatch.setattr(structured, "split_prefix_causal_mask", spy_split)
    one_branch = backend() != "jax"
    teacher, inputs = paligemma()
    student, _ = keras_sara.convert(teacher, verify=False)
    layer = _decoder_attention(student)
    x = np.random.default_rng(3).standard_normal((2, 7, 16)).astype("float32")
    layer(x, attention_mask=_dense_masks(7)["prefix"])
    assert exact_flags == [True]
    if one_branch:
        assert calls == {"linear": 1, "quadratic": 0}
    layer(x, attention_mask=_dense_masks(7)["not_prefix_causal"])
    assert exact_flags == [True, False]
    if one_branch:
        assert calls == {"linear": 1, "quadratic": 1}
    calls.update(linear=0, quadratic=0)
    exact_flags.clear()
    student(inputs)  # the whole backbone: ViT (no mask) and decoder (PaliGemma's prefix-LM mask)
    assert exact_flags == [True, True]
    if one_branch:
        assert calls == {"linear": 4, "quadratic": 0}


def test_vit_adapter_matches_naive_reference():
    teacher, _ = paligemma()
    student, _ = keras_sara.convert(teacher, verify=False)
    layer = [l for l in _keras_hub_attention(student) if "Vit" in type(l).__name__][0]
    x = np.random.default_rng(5).standard_normal((2, 9, 16)).astype("float32")

    def reference(t):
        def heads(y):
            return keras.ops.reshape(y, (2, 9, 2, 8))
        fq = layer.feature_map(heads(layer.query_proj(t)), role="query")
        fk = layer.feature_map(heads(layer.key_proj(t)), role="key")
        out = naive.naive_structured_linear_attention(fq, fk, heads(layer.value_proj(t)), None, eps=layer.eps)
        return layer.out_proj(keras.ops.reshape(out, (2, 9, 16)))

    cot = np.random.default_rng(6).standard_normal((2, 9, 16)).astype("float32")
    out, (grad,) = value_and_grads(lambda t: layer(t)[0], [x], cot)
    ref, (ref_grad,) = value_and_grads(reference, [x], cot, jit=False)
    assert rel_err(out, ref) < 1e-5 and rel_err(grad, ref_grad) < 1e-4


def test_cached_mha_adapter_matches_naive_reference():
    teacher, _ = gpt2()
    student, _ = keras_sara.convert(teacher, verify=False)
    layer = _decoder_attention(student)
    x = np.random.default_rng(7).standard_normal((2, 7, 16)).astype("float32")
    mask = _dense_masks(7)["causal_padding"]
    fq = layer.feature_map(layer._query_dense(x), role="query")
    fk = layer.feature_map(layer._key_dense(x), role="key")
    ref = layer._output_dense(naive.naive_structured_linear_attention(fq, fk, layer._value_dense(x), mask))
    xt = keras.ops.convert_to_tensor(x)  # one tensor as query and value: self-attention
    assert rel_err(layer(xt, xt, attention_mask=mask), ref) < 1e-5


# ------------------------------------------------------------ up-training and finalize


def _with_head(backbone):
    inputs = {k: keras.Input(shape=(None,), dtype="int32", name=k) for k in ("token_ids", "padding_mask")}
    out = keras.layers.Dense(3, name="head")(backbone(inputs))
    return keras.Model(inputs, out)


def test_gpt2_uptrains_finalizes_and_reloads(tmp_path):
    backbone, inputs = gpt2()
    teacher = _with_head(backbone)
    student, _ = keras_sara.convert(teacher, blend=0.0, probe=inputs)
    student.compile(keras.optimizers.Adam(1e-3), "mse")
    target = np.random.default_rng(8).standard_normal((2, 7, 3)).astype("float32")
    up = keras_sara.callbacks.UpTraining(schedule="linear", blend_steps=2, distillation_weight=0.1,
                                         distillation_target="outputs", probe=inputs)
    before = to_numpy(student.get_layer("head").kernel).copy()
    history = student.fit(inputs, target, epochs=3, batch_size=2, verbose=0, callbacks=[up])
    assert np.isfinite(history.history["loss"]).all()
    fidelity = history.history["fidelity"]  # ||linear - softmax|| / ||softmax|| of the adapted layers
    assert len(fidelity) == 3 and all(np.isfinite(f) and f > 0 for f in fidelity)
    assert not np.array_equal(to_numpy(student.get_layer("head").kernel), before)
    blends = [float(to_numpy(l.blend_variable)) for l in _keras_hub_attention(student)]
    assert blends == [1.0, 1.0]
    final = keras_sara.finalize(student, probe=inputs)
    layers = _keras_hub_attention(final)
    assert all(isinstance(l, AdaptedAttention) and l.blend_variable is None for l in layers)
    np.testing.assert_allclose(_flat(final(inputs)), _flat(student(inputs)), rtol=1e-5, atol=1e-5)
    final.save(str(tmp_path / "final.keras"))
    loaded = keras.models.load_model(str(tmp_path / "final.keras"))
    assert all(l.blend_variable is None for l in _keras_hub_attention(loaded))
    np.testing.assert_array_equal(_flat(loaded(inputs)), _flat(final(inputs)))


def test_scores_distillation_on_adapted_layers_is_refused_clearly():
    backbone, inputs = gemma()
    student, _ = keras_sara.convert(backbone, blend=0.0, verify=False)
    layer = _keras_hub_attention(student)[0]
    with pytest.raises(ValueError, match=r"target.*\('outputs',\).*Received: target='scores'"):
        layer.configure_distillation("scores")


def test_whisper_key_without_bias_copies_one_to_one():
    teacher = keras_hub.models.WhisperBackbone(
        vocabulary_size=V, num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32,
        max_encoder_sequence_length=16, max_decoder_sequence_length=8)
    inputs = {
        "encoder_features": np.random.default_rng(9).standard_normal((2, 16, 80)).astype("float32"),
        "decoder_token_ids": np.random.default_rng(9).integers(1, V, (2, 8)).astype("int32"),
        "decoder_padding_mask": np.ones((2, 8), "int32"),
    }
    student, report = keras_sara.convert(teacher, probe=inputs)
    attention = _keras_hub_attention(student)
    assert report.num_converted == len(attention) == 3 and not report.skipped
    for layer in attention:
        assert layer._key_dense.bias is None and layer._query_dense.bias is not None
    assert np.isfinite(_flat(student(inputs))).all()


# ------------------------------------------------------------ options and bad input


def test_soft_cap_and_sliding_window_are_named_in_the_report():
    teacher = keras_hub.models.GemmaBackbone(
        vocabulary_size=V, num_layers=2, num_query_heads=2, num_key_value_heads=1, hidden_dim=16,
        intermediate_dim=32, head_dim=8, attention_logit_soft_cap=50.0, use_sliding_window_attention=True,
        sliding_window_size=4)
    _, report = keras_sara.convert(teacher, probe=_tokens())
    notes = " ".join(c.note for c in report.converted)
    assert "logit_soft_cap=50.0 not applied" in notes
    assert "sliding window of 4 not applied" in notes
    assert "logit_soft_cap=50.0" in str(report)


def test_rope_layers_refuse_a_non_elementwise_feature_map():
    teacher, inputs = llama()
    before = [to_numpy(w).copy() for w in teacher.weights]
    with pytest.raises(ValueError, match=r"LlamaAttention .*RoPE.*elementwise.*Received: feature_map='favor\+'"):
        keras_sara.convert(teacher, feature_map="favor+")
    for w, b in zip(teacher.weights, before):
        np.testing.assert_array_equal(to_numpy(w), b)
    assert all(not isinstance(l, AdaptedAttention) for l in teacher._flatten_layers())


class RelativeAttention(keras.layers.Layer):
    """An attention-like user layer with no adapter."""

    def build(self, shape):
        self.proj = keras.layers.Dense(shape[-1])
        self.proj.build(shape)

    def call(self, x):
        w = keras.ops.softmax(keras.ops.einsum("btd,bsd->bts", x, self.proj(x)), axis=-1)
        return keras.ops.einsum("bts,bsd->btd", w, x)


def test_unknown_attention_class_is_reported_with_how_to_add_an_adapter():
    x = keras.Input((5, 8))
    teacher = keras.Model(x, RelativeAttention(name="rel")(x))
    with pytest.warns(UserWarning, match="no SARA adapter for .*RelativeAttention"):
        _, report = keras_sara.convert(teacher)
    assert [(s.path, s.class_name) for s in report.skipped] == [("rel", "RelativeAttention")]
    assert "keras_sara.register_attention(RelativeAttention" in report.skipped[0].reason


def test_register_attention_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`cls` must be a keras.layers.Layer subclass.*Received: cls=<class 'int'>"):
        keras_sara.register_attention(int, AttentionAdapter(mixin=AdaptedAttention))
    with pytest.raises(ValueError, match="`adapter` must be .*AttentionAdapter.*Received: adapter of type dict"):
        keras_sara.register_attention(RelativeAttention, {"mixin": None})
    with pytest.raises(ValueError, match="`adapter.mixin` must subclass"):
        keras_sara.register_attention(RelativeAttention, AttentionAdapter(mixin=object))


class SeqAttention(keras.layers.Layer):
    """The docstring's user attention: one fused projection, softmax over tokens."""

    def build(self, shape):
        self.qkv = keras.layers.Dense(3 * shape[-1])
        self.qkv.build(shape)

    def call(self, x):
        q, k, v = keras.ops.split(self.qkv(x), 3, axis=-1)
        w = keras.ops.softmax(keras.ops.einsum("btd,bsd->bts", q, k), axis=-1)
        return keras.ops.einsum("bts,bsd->btd", w, v)


class SARASeqAttention(AdaptedAttention):
    def _sara_feature_shape(self):
        return (None, None, 1, self.qkv.kernel.shape[0])

    def call(self, x):
        q, k, v = (keras.ops.expand_dims(t, 2) for t in keras.ops.split(self.qkv(x), 3, axis=-1))
        out = keras.ops.squeeze(self.sara_attention(q, k, v), 2)
        return self.sara_blend(out, lambda: super(SARASeqAttention, self).call(x))


def test_a_registered_user_adapter_converts_like_the_built_in_ones(tmp_path):
    keras_sara.register_attention(SeqAttention, AttentionAdapter(SARASeqAttention, projections=("qkv",)),
                                  override=True)
    x = keras.Input((6, 8))
    teacher = keras.Model(x, keras.layers.Dense(2)(SeqAttention(name="seq")(x)))
    data = np.random.default_rng(10).standard_normal((2, 6, 8)).astype("float32")
    student, report = keras_sara.convert(teacher, probe=data, blend=0.0)
    assert report.num_converted == 1 and report.max_abs_error == 0.0
    assert isinstance(student.get_layer("seq"), AdaptedAttention)
    linear, _ = keras_sara.convert(teacher, probe=data)
    q, k, v = (np.split(to_numpy(teacher.get_layer("seq").qkv(data)), 3, axis=-1))
    fm = linear.get_layer("seq").feature_map
    ref = naive.naive_structured_linear_attention(fm(q[:, :, None], role="query"), fm(k[:, :, None], role="key"),
                                                  v[:, :, None])
    assert rel_err(linear.get_layer("seq")(data), to_numpy(ref)[:, :, 0]) < 1e-5


class GemmaBlock(keras.layers.Layer):
    """A user block holding keras-hub's Gemma attention (the clone_model route)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        from keras_hub.src.models.gemma.gemma_attention import CachedGemmaAttention

        self.attention = CachedGemmaAttention(head_dim=8, num_query_heads=2, num_key_value_heads=1, name="attn")

    def call(self, x):
        t = keras.ops.shape(x)[1]
        causal = keras.ops.expand_dims(keras.ops.tril(keras.ops.ones((t, t))), 0) > 0  # (1, T, T)
        return x + self.attention(x, attention_mask=causal)


def test_clone_function_adapts_keras_hub_attention_held_by_a_custom_block(tmp_path):
    x = keras.Input((6, 16))
    teacher = keras.Model(x, GemmaBlock(name="block")(x))
    student = keras.models.clone_model(teacher, clone_function=keras_sara.clone_function)
    student.set_weights(teacher.get_weights())  # ReLU, blend 1: the same variables
    assert isinstance(student.get_layer("block").attention, AdaptedAttention)
    data = np.random.default_rng(11).standard_normal((2, 6, 16)).astype("float32")
    converted, _ = keras_sara.convert(teacher, probe=data)
    np.testing.assert_allclose(to_numpy(student(data)), to_numpy(converted(data)), rtol=1e-6, atol=1e-6)
    student.save(str(tmp_path / "clone.keras"))
    loaded = keras.models.load_model(str(tmp_path / "clone.keras"), custom_objects={"GemmaBlock": GemmaBlock})
    assert isinstance(loaded.get_layer("block").attention, AdaptedAttention)
    np.testing.assert_allclose(to_numpy(loaded(data)), to_numpy(student(data)), rtol=1e-6, atol=1e-6)
