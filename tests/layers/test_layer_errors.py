"""Errors that name the argument and the shapes, and the float-mask rule, on every backend (issue 21).

Before these checks a `query_mask` of the wrong length or a dense
`attention_mask` of the wrong shape reached TensorFlow's SelectV2 (or JAX's,
PyTorch's) broadcast error, and a layer called with another feature size an
EinsumDense reshape error.
"""

import keras
import numpy as np
import pytest

from keras_sara.layers import SARAMultiHeadAttention
from keras_sara.ops import check_feature_mapped, linear_attention
from tests.backend_utils import to_numpy

B, T, S, E = 2, 6, 5, 8


def _layer(**kwargs):
    layer = SARAMultiHeadAttention(num_heads=2, key_dim=4, **kwargs)
    layer(np.zeros((B, T, E), "float32"), np.zeros((B, S, E), "float32"))
    return layer


def _qv(feature=E):
    rng = np.random.default_rng(0)
    return rng.standard_normal((B, T, feature)).astype("float32"), rng.standard_normal((B, S, E)).astype("float32")


@pytest.mark.parametrize(
    "argument, mask, expected",
    [
        ("query_mask", np.ones((B, T + 1), bool), r"`query_mask` must have the shape of `query`.*\(2, 6\).*Received: query_mask.shape=\(2, 7\)"),
        ("value_mask", np.ones((B, S - 1), bool), r"`value_mask` must .*\(2, 5\).*Received: value_mask.shape=\(2, 4\)"),
        ("key_mask", np.ones((B, T), bool), r"`key_mask` must .*\(2, 5\).*Received: key_mask.shape=\(2, 6\)"),
        ("query_mask", np.ones((B, T, 1), bool), r"Received: query_mask.shape=\(2, 6, 1\)"),
    ],
    ids=["query_mask-length", "value_mask-length", "key_mask-length", "query_mask-rank"],
)
def test_padding_mask_of_wrong_shape_is_named(argument, mask, expected):
    layer = _layer()
    q, v = _qv()
    key = v + 1 if argument == "key_mask" else None  # a distinct key: MHA ignores key_mask otherwise
    with pytest.raises(ValueError, match=expected):
        layer(q, v, key=key, **{argument: mask})


@pytest.mark.parametrize(
    "shape",
    [(B, T, S + 1), (B, T - 1, S), (B, S, T), (B, T)],
    ids=["keys", "queries", "transposed", "rank"],
)
def test_dense_attention_mask_of_wrong_shape_is_named(shape):
    layer = _layer()
    q, v = _qv()
    with pytest.raises(ValueError, match=r"`attention_mask` must have shape .*\(2, 6, 5\).*Received: attention_mask.shape=" + str(shape).replace("(", r"\(").replace(")", r"\)")):
        layer(q, v, attention_mask=np.ones(shape, bool))


def test_broadcastable_attention_masks_still_accepted():
    layer = _layer()
    q, v = _qv()
    full = to_numpy(layer(q, v, attention_mask=np.ones((B, T, S), bool)))
    np.testing.assert_allclose(to_numpy(layer(q, v, attention_mask=np.ones((1, T, S), bool))), full, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(to_numpy(layer(q, v, attention_mask=np.ones((B, 1, S), bool))), full, rtol=1e-5, atol=1e-6)


def test_feature_size_mismatch_is_named():
    layer = _layer()
    q, v = _qv(feature=E + 4)
    with pytest.raises(ValueError, match=r"`query` must have 8 features .*Received: query.shape=\(2, 6, 12\)"):
        layer(q, v)
    q, _ = _qv()
    with pytest.raises(ValueError, match=r"`value` must have 8 features .*Received: value.shape=\(2, 5, 3\)"):
        layer(q, np.zeros((B, S, 3), "float32"))


@pytest.mark.parametrize("kind", ["value_mask", "attention_mask"])
def test_float_masks_follow_keras_nonzero_means_attend(kind):
    """As `keras.layers.MultiHeadAttention`, which casts masks to bool: 0.3 and 0.5 attend, 0 masks."""
    rng = np.random.default_rng(1)
    q, v = _qv()
    if kind == "value_mask":
        soft = np.array([[1.0, 0.3, 0.0, 0.5, 1.0], [0.0, 1.0, 0.2, 0.0, 1.0]], "float32")  # (B, S)
    else:
        soft = rng.choice(np.array([0.0, 0.3, 0.5, 1.0], "float32"), size=(B, T, S))
        soft[:, :, 0] = 0.7  # no all-masked row: MHA and SARA differ there by design
    binary = soft != 0

    sara = _layer()
    np.testing.assert_allclose(
        to_numpy(sara(q, v, **{kind: soft})), to_numpy(sara(q, v, **{kind: binary})), rtol=1e-6, atol=1e-6
    )
    mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
    np.testing.assert_allclose(  # Keras' own rule, on this backend
        to_numpy(mha(q, v, **{kind: soft})), to_numpy(mha(q, v, **{kind: binary})), rtol=1e-6, atol=1e-6
    )


def test_linear_attention_contract_check():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 4, 2, 3)).astype("float32")
    v = rng.standard_normal((1, 4, 2, 5)).astype("float32")
    with pytest.raises(ValueError, match=r"`q` must be feature-mapped \(non-negative\).*minimum -"):
        linear_attention(q, np.abs(q), v, check_inputs=True)
    with pytest.raises(ValueError, match=r"`k` must be feature-mapped"):
        linear_attention(np.abs(q), q, v, check_inputs=True)
    bad = np.abs(q)
    bad[0, 1, 0, 2] = np.nan
    with pytest.raises(ValueError, match=r"`k` must be finite"):
        linear_attention(np.abs(q), bad, v, check_inputs=True)
    with pytest.raises(ValueError, match="`check_inputs` must be True or False"):
        linear_attention(np.abs(q), np.abs(q), v, check_inputs="yes")
    unchecked = to_numpy(linear_attention(np.abs(q), np.abs(q), v))
    np.testing.assert_allclose(to_numpy(linear_attention(np.abs(q), np.abs(q), v, check_inputs=True)), unchecked)
    check_feature_mapped(np.abs(q), "q")  # passes
