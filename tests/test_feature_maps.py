"""Feature maps: lookup, serialisation, shapes, maths (table-driven, every backend)."""

import keras
import numpy as np
import pytest

from keras_sara import feature_maps
from keras_sara.layers import SARAMultiHeadAttention
from tests.backend_utils import rel_err, to_numpy

# name -> (class, learnable, feature size for d=8)
TABLE = {
    "relu": (feature_maps.ReLU, False, 8),
    "elu+1": (feature_maps.EluPlusOne, False, 8),
    "favor+": (feature_maps.FavorPlus, False, 8),
    "hedgehog": (feature_maps.Hedgehog, True, 16),
    "sara": (feature_maps.SARAFeatureMap, True, 8),
}
B, T, H, D = 2, 9, 3, 8


def _x(scale=1.0, seed=0):
    return (scale * np.random.default_rng(seed).normal(size=(B, T, H, D))).astype("float32")


@pytest.mark.parametrize("name", sorted(TABLE))
def test_get_serialize_deserialize_round_trip(name):
    cls, learnable, m = TABLE[name]
    fm = feature_maps.get(name)
    assert type(fm) is cls and fm.learnable == learnable
    assert feature_maps.get(name.upper()) is not fm and type(feature_maps.get(name.upper())) is cls
    assert feature_maps.get(fm) is fm
    config = feature_maps.serialize(fm)
    again = feature_maps.deserialize(config)
    assert type(again) is cls and again.get_config() == fm.get_config()
    assert type(feature_maps.get(config)) is cls
    assert fm.feature_dim(D) == m


@pytest.mark.parametrize("name", sorted(TABLE))
@pytest.mark.parametrize("role", ["query", "key"])
def test_shapes_positivity_and_finiteness(name, role):
    _, learnable, m = TABLE[name]
    fm = feature_maps.get(name)
    for scale in (1.0, 30.0):  # large inputs must not overflow the exp maps
        y = to_numpy(fm(_x(scale), role=role))
        assert y.shape == (B, T, H, m) and y.dtype == np.float32
        assert np.all(np.isfinite(y)) and np.all(y >= 0)
    assert (len(fm.trainable_weights) > 0) == learnable


def test_default_is_relu_and_errors_name_the_value():
    assert isinstance(feature_maps.get(None), feature_maps.ReLU)
    assert isinstance(feature_maps.get("performer"), feature_maps.FavorPlus)
    with pytest.raises(ValueError, match="feature_map='tanh'"):
        feature_maps.get("tanh")
    with pytest.raises(ValueError, match="subclass"):
        feature_maps.get(lambda x: x)
    with pytest.raises(ValueError, match="feature_map=3"):
        feature_maps.get(3)
    with pytest.raises(ValueError, match="num_features=0"):
        feature_maps.FavorPlus(num_features=0)
    with pytest.raises(ValueError, match="seed='a'"):
        feature_maps.FavorPlus(seed="a")
    with pytest.raises(ValueError, match="activation='tanh'"):
        feature_maps.SARAFeatureMap(activation="tanh")
    with pytest.raises(ValueError, match="stabilizer=-1"):
        feature_maps.ReLU(stabilizer=-1)
    with pytest.raises(ValueError, match="role='value'"):
        feature_maps.get("relu")(_x(), role="value")


def test_relu_and_elu_formulas():
    x = _x()
    np.testing.assert_allclose(to_numpy(feature_maps.ReLU(stabilizer=1e-3)(x)), np.maximum(x, 1e-3), rtol=1e-6)
    # the same as Performer's relu(x) + c of the input shifted by c
    np.testing.assert_allclose(to_numpy(feature_maps.ReLU(stabilizer=1e-3)(x)), np.maximum(x - 1e-3, 0) + 1e-3, rtol=1e-6, atol=1e-7)
    elu = np.where(x > 0, x, np.expm1(x)) + 1
    np.testing.assert_allclose(to_numpy(feature_maps.EluPlusOne()(x)), elu, rtol=1e-5, atol=1e-6)


def test_learnable_maps_start_at_their_fixed_form():
    x = _x()
    sara = feature_maps.SARAFeatureMap()
    for role in ("query", "key"):
        np.testing.assert_allclose(to_numpy(sara(x, role=role)), to_numpy(feature_maps.ReLU()(x)), rtol=1e-6)
    hh = to_numpy(feature_maps.Hedgehog()(x, role="query"))  # identity W, zero b
    z = np.concatenate([x, -x], -1)
    want = np.exp(z - z.max(-1, keepdims=True))  # query stabiliser: own-row max
    np.testing.assert_allclose(hh, want, rtol=1e-5)


def _attention_weights(qf, kf):
    kernel = np.einsum("bthm,bshm->bhts", qf.astype("float64"), kf.astype("float64"))
    return kernel / kernel.sum(-1, keepdims=True)


@pytest.mark.parametrize("name", ["hedgehog", "favor+"])
def test_exp_stabilisers_cancel_in_the_attention_ratio(name):
    """Subtracting per-query and per-sequence key maxima must not change attention."""
    fm = feature_maps.get(name)
    q, k = _x(0.5, seed=1), _x(0.5, seed=2)
    got = _attention_weights(to_numpy(fm(q, role="query")), to_numpy(fm(k, role="key")))
    if name == "hedgehog":
        phi = lambda x: np.exp(np.concatenate([x, -x], -1).astype("float64"))
    else:
        w = to_numpy(fm.projection).astype("float64")
        xs = lambda x: x.astype("float64") * D**-0.25
        phi = lambda x: np.exp(xs(x) @ w.T - 0.5 * (xs(x) ** 2).sum(-1, keepdims=True))
    want = _attention_weights(phi(q), phi(k))
    assert rel_err(got, want) < 1e-5


def test_favor_plus_estimates_softmax_attention():
    fm = feature_maps.FavorPlus(num_features=512, seed=3)
    q, k = _x(0.5, seed=4), _x(0.5, seed=5)
    got = _attention_weights(to_numpy(fm(q, role="query")), to_numpy(fm(k, role="key")))
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D)
    soft = np.exp(logits - logits.max(-1, keepdims=True))
    soft /= soft.sum(-1, keepdims=True)
    assert rel_err(got, soft) < 0.1  # a Monte Carlo estimate with 512 features
    relu_w = _attention_weights(np.maximum(q, 1e-3), np.maximum(k, 1e-3))
    assert rel_err(got, soft) < rel_err(relu_w, soft)  # and far better than an unrelated kernel


def test_favor_plus_projection_is_seeded_orthogonal_and_redraws_only_in_training():
    a, b, c = (feature_maps.FavorPlus(seed=s) for s in (7, 7, 8))
    for fm in (a, b, c):
        fm(_x(), role="query")
    np.testing.assert_array_equal(to_numpy(a.projection), to_numpy(b.projection))
    assert not np.allclose(to_numpy(a.projection), to_numpy(c.projection))
    w = to_numpy(a.projection).astype("float64")
    gram = (w / np.linalg.norm(w, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    np.testing.assert_allclose(gram, np.eye(D), atol=1e-5)
    r = feature_maps.FavorPlus(seed=7, redraw=True)
    r(_x(), role="query")
    before = to_numpy(r.projection).copy()
    r(_x(), role="query", training=False)
    np.testing.assert_array_equal(to_numpy(r.projection), before)
    r(_x(), role="query", training=True)
    assert not np.allclose(to_numpy(r.projection), before)


@keras.saving.register_keras_serializable(package="keras_sara_tests")
class Squared(feature_maps.FeatureMap):
    """A user-defined feature map: phi(x) = x^2 + 1e-3."""

    def call(self, inputs, role="query"):
        return inputs * inputs + 1e-3


def test_user_subclass_works_in_the_layer_and_reloads(tmp_path):
    x = np.random.default_rng(0).normal(size=(2, 6, 8)).astype("float32")
    inp = keras.Input((6, 8))
    layer = SARAMultiHeadAttention(num_heads=2, key_dim=4, feature_map=Squared())
    model = keras.Model(inp, layer(inp, inp))
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.layers[-1].feature_map, Squared)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
