"""SARAMultiHeadAttention: drop-in behaviour, exactness, paths, errors (every backend)."""

import warnings
from unittest import mock

import keras
import numpy as np
import pytest

from keras_sara import feature_maps
from keras_sara.layers import SARAMultiHeadAttention
from keras_sara.ops import kernels as la
from keras_sara.ops import naive
from tests.backend_utils import backend, rel_err, to_numpy
from tests.graph_utils import has_square, intermediate_shapes
from tests.layer_test_utils import run_layer_test

FEATURE_MAPS = ["relu", "elu+1", "favor+", "hedgehog", "sara"]
B, T, S, E, HEADS, KEY_DIM = 2, 11, 7, 16, 2, 8


def _x(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _pair(seed=0, **kwargs):
    """A built Keras MHA and a built SARA layer holding the same weights."""
    x = _x(B, T, E, seed=seed)
    mha = keras.layers.MultiHeadAttention(num_heads=HEADS, key_dim=KEY_DIM, seed=1)
    mha(x, x)
    sara = SARAMultiHeadAttention(num_heads=HEADS, key_dim=KEY_DIM, seed=1, **kwargs)
    sara(x, x)
    n = len(mha.get_weights())
    sara.set_weights(mha.get_weights() + sara.get_weights()[n:])
    return mha, sara


def _reference(layer, query, value, key_mask=None, causal=False, attention_mask=None):
    """The layer's output recomputed with the naive quadratic reference."""
    q = layer.query_dense(query)
    k = layer.key_dense(value)
    v = layer.value_dense(value)
    qf = layer.feature_map(q, role="query")
    kf = layer.feature_map(k, role="key")
    if attention_mask is None:
        out = naive.naive_linear_attention(qf, kf, v, key_mask=key_mask, causal=causal, eps=layer.eps)
    else:
        kernel = np.einsum("bthm,bshm->bhts", to_numpy(qf), to_numpy(kf))  # (B, H, T, S)
        kernel = kernel * attention_mask[:, None].astype("float32")
        weights = kernel / (kernel.sum(-1, keepdims=True) + layer.eps)
        out = np.einsum("bhts,bshd->bthd", weights, to_numpy(v))
    return to_numpy(layer.output_dense(out))


# ----------------------------------------------------------- shared layer test


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_layer_harness_self_attention(feature_map):
    x = _x(B, T, E)
    run_layer_test(
        SARAMultiHeadAttention,
        dict(num_heads=HEADS, key_dim=KEY_DIM, feature_map=feature_map),
        (x, x),
        expected_output_shape=(B, T, E),
    )


@pytest.mark.parametrize("schedule", ["chunked", "parallel"])
def test_layer_harness_causal(schedule):
    x = _x(B, T, E)
    run_layer_test(
        SARAMultiHeadAttention,
        dict(num_heads=HEADS, key_dim=KEY_DIM, causal_schedule=schedule, chunk_size=4),
        (x, x),
        call_kwargs=dict(use_causal_mask=True),
        expected_output_shape=(B, T, E),
    )


def test_layer_harness_cross_attention_blend():
    run_layer_test(
        SARAMultiHeadAttention,
        dict(num_heads=HEADS, key_dim=KEY_DIM, value_dim=4, output_shape=12, blend=0.25),
        (_x(B, T, E), _x(B, S, 10, seed=1)),
        expected_output_shape=(B, T, 12),
    )


# ------------------------------------------------------- drop-in for Keras MHA


def test_weights_match_keras_mha_one_to_one():
    mha, sara = _pair()
    assert [w.shape for w in sara.weights] == [w.shape for w in mha.weights]
    assert [w.path.split("/", 1)[1] for w in sara.weights] == [w.path.split("/", 1)[1] for w in mha.weights]
    for a, b in zip(sara.get_weights(), mha.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("feature_map", ["hedgehog", "sara", "favor+"])
def test_feature_map_weights_come_after_mha_weights(feature_map):
    mha, sara = _pair(feature_map=feature_map)
    n = len(mha.weights)
    assert [w.shape for w in sara.weights[:n]] == [w.shape for w in mha.weights]
    fm_paths = [w.path for w in sara.feature_map.weights]
    assert [w.path for w in sara.weights[n:]] == fm_paths and fm_paths


def test_up_training_variables_come_last_and_are_not_trainable():
    _, sara = _pair(feature_map="hedgehog", blend=0.0)
    state = [sara.blend_variable, sara.distillation_weight_variable]
    assert sara.weights[-2:] == state
    assert all(w is not v for w in sara.trainable_weights for v in state)


CALLS = {
    "self": lambda q, v, m: dict(query=q, value=q),
    "cross": lambda q, v, m: dict(query=q, value=v),
    "cross_key": lambda q, v, m: dict(query=q, value=v, key=v[..., ::-1].copy()),
    "value_mask": lambda q, v, m: dict(query=q, value=v, value_mask=m),
    "causal": lambda q, v, m: dict(query=q, value=q, use_causal_mask=True),
    "attention_mask": lambda q, v, m: dict(
        query=q, value=v, attention_mask=np.random.default_rng(3).random((B, T, S)) > 0.3
    ),
}


@pytest.mark.parametrize("case", sorted(CALLS))
def test_blend_zero_reproduces_keras_mha(case):
    mha, sara = _pair(blend=0.0)
    q, v = _x(B, T, E, seed=1), _x(B, S, E, seed=2)
    mask = np.ones((B, S), bool)
    mask[0, 4:] = False
    kwargs = CALLS[case](q, v, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = to_numpy(sara(**kwargs))
    want = to_numpy(mha(**kwargs))
    assert np.max(np.abs(got - want)) <= 1e-6 * max(1.0, np.max(np.abs(want)))


def test_blend_zero_scores_match_keras_mha():
    mha, sara = _pair(blend=0.0)
    q = _x(B, T, E, seed=1)
    out_m, sc_m = mha(q, q, return_attention_scores=True)
    out_s, sc_s = sara(q, q, return_attention_scores=True)
    np.testing.assert_allclose(to_numpy(sc_s), to_numpy(sc_m), atol=1e-6)
    np.testing.assert_allclose(to_numpy(out_s), to_numpy(out_m), atol=1e-6)


def test_blend_mixes_softmax_and_linear_and_set_blend_reaches_compiled_model():
    mha, sara = _pair(blend=0.0)
    x = _x(B, T, E, seed=4)
    soft = to_numpy(mha(x, x))
    linear = SARAMultiHeadAttention(num_heads=HEADS, key_dim=KEY_DIM)
    linear(x, x)
    linear.set_weights(mha.get_weights())
    lin = to_numpy(linear(x, x))
    inp = keras.Input((T, E))
    model = keras.Model(inp, sara(inp, inp))
    np.testing.assert_allclose(model.predict(x, verbose=0), soft, atol=1e-5)
    sara.set_blend(0.3)
    # predict reuses its compiled function: the variable, not a Python float, carries the value
    np.testing.assert_allclose(model.predict(x, verbose=0), 0.7 * soft + 0.3 * lin, atol=1e-5)
    sara.set_blend(1.0)
    np.testing.assert_allclose(model.predict(x, verbose=0), lin, atol=1e-5)


# ---------------------------------------------------- exact against the naive


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_layer_matches_naive_reference(feature_map, masked, causal):
    _, sara = _pair(feature_map=feature_map, chunk_size=4)
    x = _x(B, T, E, seed=5)
    mask = None
    if masked:
        mask = np.ones((B, T), bool)
        mask[1, 6:] = False
    got = sara(x, x, value_mask=mask, use_causal_mask=causal)
    want = _reference(sara, x, x, key_mask=mask, causal=causal)
    assert rel_err(got, want) <= 1e-5


def test_dense_attention_mask_is_exact_and_warns_once():
    _, sara = _pair()
    q, v = _x(B, T, E, seed=1), _x(B, S, E, seed=2)
    mask = np.random.default_rng(0).random((B, T, S)) > 0.4
    with pytest.warns(UserWarning, match="quadratic cost"):
        got = sara(q, v, attention_mask=mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call must not warn again
        sara(q, v, attention_mask=mask)
    want = _reference(sara, q, v, attention_mask=mask)
    assert rel_err(got, want) <= 1e-5


def test_dense_causal_mask_equals_linear_causal_path():
    _, sara = _pair()
    x = _x(B, T, E, seed=6)
    tri = np.tril(np.ones((B, T, T), bool))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = sara(x, x, attention_mask=tri)
    assert rel_err(sara(x, x, use_causal_mask=True), dense) <= 1e-5


def test_padding_content_does_not_leak_and_masked_rows_are_finite():
    _, sara = _pair()
    x = _x(B, T, E, seed=7)
    mask = np.ones((B, T), bool)
    mask[0, 5:] = False
    mask[1, :] = False  # every key masked: documented zero attention
    y1 = to_numpy(sara(x, x, value_mask=mask))
    x2 = x.copy()
    x2[0, 5:] = 1e3 * _x(T - 5, E, seed=8)
    y2 = to_numpy(sara(x2, x2, query_mask=np.ones((B, T), bool), value_mask=mask))
    # queries change where x changed; outputs at unchanged, valid queries must not
    np.testing.assert_allclose(y2[0, :5], y1[0, :5], rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(y1))
    bias = to_numpy(sara.output_dense.bias)
    np.testing.assert_allclose(y1[1], np.broadcast_to(bias, y1[1].shape), atol=1e-6)


def test_keras_implicit_masks_take_the_linear_path_and_equal_explicit_masks():
    tokens = np.array([[3, 5, 2, 7, 0, 0], [4, 1, 1, 0, 0, 0]])
    emb = keras.layers.Embedding(10, E, mask_zero=True)
    sara = SARAMultiHeadAttention(num_heads=HEADS, key_dim=KEY_DIM)
    x = emb(tokens)
    with mock.patch.object(la, "linear_attention_projected", wraps=la.linear_attention_projected) as spy:
        implicit = to_numpy(sara(x, x))
    assert spy.call_count == 1
    assert spy.call_args.args[4] is not None  # a key padding mask was passed
    assert spy.call_args.args[5] is not None  # and the query mask
    valid = tokens != 0
    explicit = to_numpy(sara(x, x, query_mask=valid, value_mask=valid))
    np.testing.assert_allclose(implicit, explicit, atol=1e-6)


# ------------------------------------------------------- which path ran, proven


def test_paths_are_chosen_as_documented():
    _, sara = _pair()
    x = _x(B, T, E)
    with mock.patch.object(la, "linear_attention_projected", wraps=la.linear_attention_projected) as fused, mock.patch.object(
        la, "linear_attention", wraps=la.linear_attention
    ) as bi, mock.patch.object(
        la, "causal_linear_attention", wraps=la.causal_linear_attention
    ) as causal, mock.patch.object(
        SARAMultiHeadAttention, "_kernel_matrix_attention", autospec=True,
        side_effect=SARAMultiHeadAttention._kernel_matrix_attention,
    ) as quadratic:
        counts = lambda: (fused.call_count, bi.call_count, causal.call_count, quadratic.call_count)
        y_fused = sara(x, x)  # bidirectional, rank 3: output projection folded in
        assert counts() == (1, 0, 0, 0)
        y_plain, _ = sara(x, x, return_attention_scores=True)  # needs per-head outputs
        assert counts() == (1, 1, 0, 0)
        assert rel_err(y_fused, y_plain) <= 1e-5
        sara(x, x, use_causal_mask=True, value_mask=np.ones((B, T), bool))
        assert counts() == (1, 1, 1, 0)
        assert causal.call_args.args[5] == "chunked"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sara(x, x, attention_mask=np.ones((B, T, T), bool))
        assert counts() == (1, 1, 1, 1)


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_split_heads_layout_same_outputs_and_only_where_it_applies(feature_map):
    """`split_heads_layout` (the export layout): same outputs; per-head path only for
    elementwise maps in unmasked inference calls, the default path everywhere else."""
    from keras_sara.layers import split_heads_layout

    _, sara = _pair(feature_map=feature_map)
    x, y = _x(B, T, E), _x(B, S, E, seed=1)
    value_mask = np.ones((B, S), bool)
    value_mask[0, 3:] = False
    calls = [lambda: sara(x, y), lambda: sara(x, y, value_mask=value_mask), lambda: sara(x, y, training=True)]
    default = [to_numpy(c()) for c in calls]
    with mock.patch.object(la, "linear_attention_split_heads", wraps=la.linear_attention_split_heads) as split:
        with split_heads_layout():
            inside = [to_numpy(c()) for c in calls]
        outside = to_numpy(sara(x, y))
    elementwise = feature_map in ("relu", "elu+1")
    assert split.call_count == (1 if elementwise else 0)  # the masked and training calls never split
    for a, b in zip(inside, default):
        assert rel_err(a, b) <= 1e-5
    np.testing.assert_array_equal(outside, default[0])  # the context is reset on exit


def test_split_heads_layout_covers_mixed_precision_and_no_bias():
    from keras_sara.layers import split_heads_layout

    x = _x(B, T, E)
    for kwargs in (dict(use_bias=False), dict(dtype="mixed_float16")):
        sara = SARAMultiHeadAttention(num_heads=HEADS, key_dim=KEY_DIM, seed=1, **kwargs)
        flat = to_numpy(sara(x, x))
        with split_heads_layout():
            per_head = to_numpy(sara(x, x))
        assert per_head.dtype == flat.dtype
        tol = 1e-5 if "dtype" not in kwargs else 2e-2
        assert rel_err(per_head.astype("float32"), flat.astype("float32")) <= tol, kwargs


def test_split_heads_layout_nests_and_holds_for_its_thread_only():
    import threading

    from keras_sara.layers import sara_multi_head_attention as smha
    from keras_sara.layers import split_heads_layout

    seen = {}

    def other_thread():
        seen["active"] = smha._split_heads_active()

    assert not smha._split_heads_active()
    with split_heads_layout():
        with split_heads_layout():
            assert smha._split_heads_active()
        assert smha._split_heads_active()  # leaving the inner context keeps the outer one
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    assert seen["active"] is False  # another thread keeps the default layout
    assert not smha._split_heads_active()
    with pytest.raises(RuntimeError, match="boom"):
        with split_heads_layout():
            raise RuntimeError("boom")
    assert not smha._split_heads_active() and smha._SPLIT_HEADS_THREADS == {}


@pytest.mark.skipif(backend() != "torch", reason="torch.compile is the PyTorch backend's compiler")
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_torch_compile_sees_no_graph_break_in_keras_sara(feature_map):
    """torch.compile (dynamo) captures the layer's own code whole: no graph break points into keras_sara
    (a data-dependent `ops.repeat` and a ContextVar read each broke every call before)."""
    import os

    import torch

    import keras_sara

    _, sara = _pair(feature_map=feature_map)
    x = keras.ops.convert_to_tensor(_x(B, T, E))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda a: sara(a, a))(x)
    package = os.path.dirname(os.path.abspath(keras_sara.__file__)) + os.sep
    ours = [
        f"{r.reason} at {frame.filename}:{frame.lineno}"
        for r in explanation.break_reasons
        for frame in r.user_stack
        if os.path.abspath(frame.filename).startswith(package)
    ]
    assert not ours, ours
    torch._dynamo.reset()


@pytest.mark.parametrize("schedule", ["chunked", "parallel"])
def test_causal_path_builds_no_length_by_length_tensor(schedule):
    length = 97  # an odd size that no other axis has
    sara = SARAMultiHeadAttention(num_heads=HEADS, key_dim=KEY_DIM, causal_schedule=schedule, chunk_size=8)
    x = _x(1, length, E)
    sara(x, x)
    shapes = intermediate_shapes(lambda t: sara(t, t, use_causal_mask=True), x)
    assert shapes, "the tracer recorded nothing"
    assert not has_square(shapes, length), sorted(s for s in shapes if s.count(length) >= 2)
    # positive control: the dense-mask path does build (T, T) tensors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = intermediate_shapes(
            lambda t: sara(t, t, attention_mask=np.tril(np.ones((1, length, length), bool))), x
        )
    assert has_square(dense, length)


# ------------------------------------------------------------ other arguments


def test_return_attention_scores_are_the_implied_matrix():
    _, sara = _pair()
    q, v = _x(B, T, E, seed=1), _x(B, S, E, seed=2)
    out, scores = sara(q, v, return_attention_scores=True)
    scores = to_numpy(scores)
    assert scores.shape == (B, HEADS, T, S)
    np.testing.assert_allclose(scores.sum(-1), 1.0, atol=1e-4)
    mixed = np.einsum("bhts,bshd->bthd", scores, to_numpy(sara.value_dense(v)))
    assert rel_err(sara.output_dense(mixed), out) <= 1e-5


def test_dropout_is_active_in_training_only():
    sara = SARAMultiHeadAttention(num_heads=HEADS, key_dim=KEY_DIM, dropout=0.5, seed=3)
    x = _x(B, T, E)
    a, b = to_numpy(sara(x, x)), to_numpy(sara(x, x))
    np.testing.assert_array_equal(a, b)
    c = to_numpy(sara(x, x, training=True))
    assert np.all(np.isfinite(c)) and not np.allclose(a, c)


def test_attention_axes_single_axis_equals_per_slice_attention():
    x = _x(B, 3, 5, E)
    sara = SARAMultiHeadAttention(num_heads=HEADS, key_dim=KEY_DIM, attention_axes=(2,))
    got = to_numpy(sara(x, x))
    ref = SARAMultiHeadAttention(num_heads=HEADS, key_dim=KEY_DIM)
    ref(x[:, 0], x[:, 0])
    ref.set_weights(sara.get_weights())
    for i in range(3):
        assert rel_err(got[:, i], ref(x[:, i], x[:, i])) <= 1e-5


def test_default_axes_on_rank4_attend_over_all_token_axes():
    x = _x(B, 3, 5, E)
    sara = SARAMultiHeadAttention(num_heads=HEADS, key_dim=KEY_DIM)
    got = to_numpy(sara(x, x))
    flat = x.reshape(B, 15, E)
    ref = SARAMultiHeadAttention(num_heads=HEADS, key_dim=KEY_DIM)
    ref(flat, flat)
    ref.set_weights(sara.get_weights())
    assert rel_err(got.reshape(B, 15, E), ref(flat, flat)) <= 1e-5


def test_gate_works_like_mha():
    x = _x(B, T, E)
    mha = keras.layers.MultiHeadAttention(num_heads=HEADS, key_dim=KEY_DIM, use_gate=True)
    mha(x, x)
    sara = SARAMultiHeadAttention(num_heads=HEADS, key_dim=KEY_DIM, use_gate=True, blend=0.0)
    sara(x, x)
    sara.set_weights(mha.get_weights() + [np.array(0.0, "float32"), np.array(0.0, "float32")])
    np.testing.assert_allclose(to_numpy(sara(x, x)), to_numpy(mha(x, x)), atol=1e-6)


def test_config_has_every_mha_argument():
    cfg = SARAMultiHeadAttention(num_heads=2, key_dim=4).get_config()
    mha_cfg = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4).get_config()
    assert set(mha_cfg) <= set(cfg)
    for key in ("feature_map", "eps", "causal_schedule", "chunk_size", "blend"):
        assert key in cfg
    assert isinstance(feature_maps.deserialize(cfg["feature_map"]), feature_maps.ReLU)


def test_blendable_layer_save_load_keeps_blend_value(tmp_path):
    x = _x(B, T, E)
    inp = keras.Input((T, E))
    layer = SARAMultiHeadAttention(num_heads=HEADS, key_dim=KEY_DIM, blend=0.0)
    model = keras.Model(inp, layer(inp, inp))
    layer.set_blend(0.4)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    sara = [l for l in loaded.layers if isinstance(l, SARAMultiHeadAttention)][0]
    assert float(to_numpy(sara.blend_variable)) == pytest.approx(0.4)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(feature_map="softplus"), "feature_map='softplus'"),
        (dict(feature_map=lambda x: x), "subclass"),
        (dict(eps=0.0), "eps=0.0"),
        (dict(eps=-1e-3), "eps=-0.001"),
        (dict(chunk_size=0), "chunk_size=0"),
        (dict(chunk_size=-4), "chunk_size=-4"),
        (dict(causal_schedule="loop"), "causal_schedule='loop'"),
        (dict(blend=1.5), "blend=1.5"),
        (dict(num_heads=0), "num_heads=0"),
    ],
)
def test_bad_constructor_arguments_name_argument_and_value(kwargs, match):
    args = dict(num_heads=2, key_dim=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace("+", r"\+")):
        SARAMultiHeadAttention(**args)


def test_bad_call_inputs_name_argument_and_value():
    sara = SARAMultiHeadAttention(num_heads=2, key_dim=4)
    with pytest.raises(ValueError, match=r"query.shape=\(2, 16\)"):
        sara(_x(2, 16), _x(2, 16))
    sara = SARAMultiHeadAttention(num_heads=2, key_dim=4)
    with pytest.raises(ValueError, match="key_shape"):
        sara(_x(2, 5, 8), _x(2, 6, 8), key=_x(2, 7, 8))
    linear_only = SARAMultiHeadAttention(num_heads=2, key_dim=4)
    with pytest.raises(ValueError, match="value=0.5"):
        linear_only.set_blend(0.5)
    multi = SARAMultiHeadAttention(num_heads=2, key_dim=4, attention_axes=(2,))
    with pytest.raises(ValueError, match="attention_axes"):
        multi(_x(2, 3, 5, 8), _x(2, 3, 5, 8), use_causal_mask=True)


def test_load_mha_weights_keeps_feature_map_and_blend_weights():
    x = _x(B, T, E)
    mha = keras.layers.MultiHeadAttention(num_heads=HEADS, key_dim=KEY_DIM)
    mha(x, x)
    sara = SARAMultiHeadAttention(num_heads=HEADS, key_dim=KEY_DIM, feature_map="hedgehog", blend=0.0)
    sara(x, x)
    fm_before = [to_numpy(w).copy() for w in sara.feature_map.weights]
    sara.load_mha_weights(mha)
    for a, b in zip(sara.get_weights(), mha.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(sara.feature_map.weights, fm_before):
        np.testing.assert_array_equal(to_numpy(a), b)
    np.testing.assert_allclose(to_numpy(sara(x, x)), to_numpy(mha(x, x)), atol=1e-6)
    other = keras.layers.MultiHeadAttention(num_heads=HEADS, key_dim=4)
    other(x, x)
    with pytest.raises(ValueError, match="weight shapes"):
        sara.load_mha_weights(other)
    with pytest.raises(ValueError, match="Received: mha=Dense"):
        sara.load_mha_weights(keras.layers.Dense(3))
