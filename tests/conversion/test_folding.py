"""`keras_sara.folding.fold_layernorm`: the folded copy against the model it came from.

The reference is the unfolded model itself (LayerNorm with scale and shift,
then the projection): outputs and input gradients must agree to float32
rounding, on every backend. Each test also checks what was folded and what was
skipped, so a fold that silently does nothing fails.
"""

import keras
import numpy as np
import pytest

from keras_sara.folding import fold_layernorm
from keras_sara.layers import SARAMultiHeadAttention
from tests.backend_utils import rel_err, to_numpy, value_and_grads

T, C = 12, 16


def _randomise(model, seed=0):
    """Nontrivial LayerNorm scale and shift (a fresh LayerNorm is 1 and 0)."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        if w.path.endswith("gamma"):
            w.assign(1.0 + 0.5 * rng.standard_normal(w.shape).astype("float32"))
        elif w.path.endswith("beta"):
            w.assign(0.5 * rng.standard_normal(w.shape).astype("float32"))
    return model


def _pre_ln_encoder(attention="sara", layers=2):
    inputs = keras.Input((T, C))
    x = inputs
    for _ in range(layers):
        h = keras.layers.LayerNormalization(epsilon=1e-6)(x)
        if attention == "sara":
            attn = SARAMultiHeadAttention(2, 8, feature_map="relu")
        else:
            attn = keras.layers.MultiHeadAttention(2, 8)
        x = x + attn(h, h)
        h = keras.layers.LayerNormalization(epsilon=1e-6)(x)
        h = keras.layers.Dense(2 * C, activation="gelu")(h)
        x = x + keras.layers.Dense(C)(h)
    return _randomise(keras.Model(inputs, x))


def _layernorms(model):
    return [l for l in model.layers if isinstance(l, keras.layers.LayerNormalization)]


def _assert_same_function(model, folded, num_inputs=1, seed=1):
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((2, T, C)).astype("float32") for _ in range(num_inputs)]
    cot = rng.standard_normal(to_numpy(model(xs if num_inputs > 1 else xs[0])).shape).astype("float32")

    def call(m):
        return lambda *a: m(list(a) if num_inputs > 1 else a[0], training=False)

    out_a, grads_a = value_and_grads(call(model), xs, cot)
    out_b, grads_b = value_and_grads(call(folded), xs, cot)
    assert rel_err(out_b, out_a) < 1e-5
    for ga, gb in zip(grads_a, grads_b):
        assert np.abs(ga).max() > 0
        assert rel_err(gb, ga) < 1e-4


@pytest.mark.parametrize("attention", ["sara", "softmax"])
def test_pre_ln_encoder_folds_every_layernorm(attention):
    model = _pre_ln_encoder(attention)
    before = [to_numpy(w).copy() for w in model.weights]
    folded, report = fold_layernorm(model)
    assert report.folded == sorted(l.name for l in _layernorms(model)) and len(report.folded) == 4
    assert report.skipped == {}
    for ln in _layernorms(folded):
        assert not ln.scale and not ln.center and ln.gamma is None and ln.beta is None
    _assert_same_function(model, folded)
    for w, b in zip(model.weights, before):  # the original keeps its weights
        np.testing.assert_array_equal(to_numpy(w), b)


def test_cross_attention_folds_only_the_projection_that_reads_the_layernorm():
    q_in, ctx_in = keras.Input((T, C)), keras.Input((T, C))
    h = keras.layers.LayerNormalization(name="ln_query")(q_in)
    attn = SARAMultiHeadAttention(2, 8, feature_map="elu+1", name="attn")
    model = _randomise(keras.Model([q_in, ctx_in], attn(h, ctx_in)))
    folded, report = fold_layernorm(model)
    assert report.folded == ["ln_query"]
    new = folded.get_layer("attn")
    for proj, changed in (("_query_dense", True), ("_key_dense", False), ("_value_dense", False)):
        same = np.array_equal(to_numpy(getattr(new, proj).kernel), to_numpy(getattr(attn, proj).kernel))
        assert same != changed, proj
    _assert_same_function(model, folded, num_inputs=2)


def test_layernorm_read_by_anything_else_is_left_with_the_reason():
    inputs = keras.Input((T, C))
    h = keras.layers.LayerNormalization(name="post_ln")(inputs)  # read by a residual add too
    x = h + keras.layers.Dense(C)(h)
    out = keras.layers.LayerNormalization(name="final_ln")(x)  # a model output
    model = _randomise(keras.Model(inputs, out))
    folded, report = fold_layernorm(model)
    assert folded is model and report.folded == []
    assert "not a projection" in report.skipped["post_ln"]
    assert "model output" in report.skipped["final_ln"]


def test_shift_needs_a_bias():
    inputs = keras.Input((T, C))
    h = keras.layers.LayerNormalization(name="ln")(inputs)
    model = _randomise(keras.Model(inputs, keras.layers.Dense(4, use_bias=False)(h)))
    _, report = fold_layernorm(model)
    assert report.folded == [] and "no bias" in report.skipped["ln"]
    # With a zero shift (or center=False) there is nothing to move into a bias.
    model.get_layer("ln").beta.assign(np.zeros(C, "float32"))
    folded, report = fold_layernorm(model)
    assert report.folded == ["ln"]
    _assert_same_function(model, folded)


def test_sequential_model_and_subclassed_model():
    seq = _randomise(keras.Sequential([
        keras.Input((T, C)), keras.layers.Dense(C), keras.layers.LayerNormalization(name="ln"),
        keras.layers.Dense(8),
    ]))
    folded, report = fold_layernorm(seq)
    assert report.folded == ["ln"]
    _assert_same_function(seq, folded)

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.ln = keras.layers.LayerNormalization()
            self.dense = keras.layers.Dense(4)

        def call(self, x):
            return self.dense(self.ln(x))

    sub = Sub()
    sub(np.zeros((1, T, C), "float32"))
    same, report = fold_layernorm(sub)
    assert same is sub and report.folded == [] and report.skipped == {}


def test_bad_model_is_refused():
    with pytest.raises(ValueError, match=r"`model` must be a keras.Model. Received: model of type list"):
        fold_layernorm([1, 2])

    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match=r"`model` must be built .* built=False"):
        fold_layernorm(Sub())
