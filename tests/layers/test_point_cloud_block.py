"""PointCloudSARABlock: layer harness, offset-attention formula, masks, conversion (every backend)."""

import os
from unittest import mock

import keras
import numpy as np
import pytest
from keras.src.backend import get_keras_mask  # Keras masks have no public accessor

from keras_sara.conversion import convert
from keras_sara.layers.point_cloud_block import PointCloudSARABlock
from keras_sara.layers.sara_multi_head_attention import SARAMultiHeadAttention
from keras_sara.ops import kernels as la
from tests.backend_utils import to_numpy
from tests.layer_test_utils import run_layer_test

# Keras warns on every load of a custom layer that builds its sublayers lazily
pytestmark = pytest.mark.filterwarnings("ignore:`build\\(\\)` was called on layer:UserWarning")
B, N, C, HEADS, KEY_DIM = 2, 13, 16, 2, 8


def _x(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _mask():
    mask = np.ones((B, N), bool)
    mask[0, 9:] = False  # cloud 0 holds 9 real points, cloud 1 all 13
    return mask


def _block(attention="sara", x=None, mask=None, **kwargs):
    block = PointCloudSARABlock(num_heads=HEADS, key_dim=KEY_DIM, attention=attention, **kwargs)
    block(_x(B, N, C) if x is None else x, mask=mask)
    return block


def _randomise_norm(block):
    """Non-trivial batch-norm statistics and affine weights (fresh ones are identity)."""
    rng = np.random.default_rng(5)
    block.norm.set_weights([
        rng.uniform(0.5, 1.5, C).astype("float32"),  # gamma
        rng.normal(0, 0.1, C).astype("float32"),  # beta
        rng.normal(0, 0.2, C).astype("float32"),  # moving mean
        rng.uniform(0.5, 2.0, C).astype("float32"),  # moving variance
    ])


# ----------------------------------------------------------- shared layer test


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(attention="sara", feature_map="relu"),
        dict(attention="sara", feature_map="hedgehog", normalization="layer"),
        dict(attention="softmax"),
    ],
    ids=["sara-relu", "sara-hedgehog-layernorm", "softmax"],
)
def test_layer_harness(kwargs):
    # the mask is a second input, so the symbolic model and `fit` see it as data.
    # Softmax is invariant to the key bias, whose gradient is zero up to
    # rounding: the harness's "every weight trains" check would test noise,
    # so the softmax block's fit step is checked below instead.
    softmax = kwargs["attention"] == "softmax"
    run_layer_test(
        PointCloudSARABlock,
        dict(num_heads=HEADS, key_dim=KEY_DIM, **kwargs),
        (_x(B, N, C), _mask()),
        expected_output_shape=(B, N, C),
        run_fit=not softmax,
    )


def test_softmax_block_trains_every_weight_but_the_key_bias():
    points, mask = keras.Input((N, C)), keras.Input((N,), dtype="bool")
    block = PointCloudSARABlock(HEADS, KEY_DIM, attention="softmax")
    model = keras.Model([points, mask], block(points, mask=mask))
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss="mse")
    before = [to_numpy(w).copy() for w in block.trainable_weights]
    history = model.fit([_x(B, N, C), _mask()], _x(B, N, C, seed=1), batch_size=B, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    frozen = [w.path for w, b in zip(block.trainable_weights, before)
              if np.array_equal(to_numpy(w), b) and not w.path.endswith("attention/key/bias")]
    assert not frozen, frozen


def test_layer_harness_without_mask():
    run_layer_test(
        PointCloudSARABlock,
        dict(num_heads=HEADS, key_dim=KEY_DIM, dropout=0.1),
        (_x(B, N, C),),
        expected_output_shape=(B, N, C),
    )


# ----------------------------------------------------- the formula, by hand


def _np_relu_features(x, floor=1e-3):
    return np.maximum(x, floor)


def test_sara_block_equals_offset_attention_by_hand():
    block = _block("sara")
    _randomise_norm(block)
    x = _x(B, N, C, seed=3)
    mask = _mask()
    got = to_numpy(block(x, mask=mask))

    attn = block.attention_layer
    wq, bq, wk, bk, wv, bv, wo, bo = [to_numpy(w) for w in attn.weights[:8]]
    q = _np_relu_features(np.einsum("bnc,chk->bnhk", x, wq) + bq)  # (B, N, H, K)
    k = _np_relu_features(np.einsum("bnc,chk->bnhk", x, wk) + bk)  # (B, N, H, K)
    v = np.einsum("bnc,chk->bnhk", x, wv) + bv  # (B, N, H, K)
    k = k * mask[:, :, None, None]  # padded points are no keys
    v = v * mask[:, :, None, None]
    kernel = np.einsum("bthk,bshk->bhts", q, k)  # (B, H, N, N)
    weights = kernel / (kernel.sum(-1, keepdims=True) + attn.eps)
    heads = np.einsum("bhts,bshd->bthd", weights, v)  # (B, N, H, K)
    sa = np.einsum("bthd,hdc->btc", heads, wo) + bo  # (B, N, C)

    gamma, beta, mean, var = [to_numpy(w) for w in block.norm.weights]
    hidden = (x - sa) @ to_numpy(block.linear.kernel)  # linear, no bias
    hidden = (hidden - mean) / np.sqrt(var + block.norm.epsilon) * gamma + beta
    want = np.maximum(hidden, 0.0) + x  # LBR(F_in - SA(F_in)) + F_in
    want = want * mask[:, :, None]  # padded rows are zero
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------- masks


@pytest.mark.parametrize("attention", ["sara", "softmax"])
@pytest.mark.parametrize("training", [False, True])
def test_padding_content_never_reaches_real_points(attention, training):
    block = _block(attention)
    _randomise_norm(block)
    mask = _mask()
    x = _x(B, N, C, seed=4)
    zero_pad = np.where(mask[..., None], x, 0.0).astype("float32")
    noise_pad = np.where(mask[..., None], x, 1e3 * _x(B, N, C, seed=9)).astype("float32")
    nan_pad = np.where(mask[..., None], x, np.nan).astype("float32")
    outs = [to_numpy(block(p, mask=mask, training=training)) for p in (zero_pad, noise_pad, nan_pad)]
    for out in outs:
        assert np.all(np.isfinite(out))
        np.testing.assert_allclose(out[mask], outs[0][mask], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out[~mask], 0.0)


def test_batch_statistics_use_real_points_only():
    mask = _mask()
    x = _x(B, N, C, seed=4)
    stats = [_block("sara"), _block("sara")]
    stats[1].set_weights(stats[0].get_weights())
    for block, pad in zip(stats, (0.0, 50.0)):
        block(np.where(mask[..., None], x, pad).astype("float32"), mask=mask, training=True)
    means = [to_numpy(b.norm.moving_mean) for b in stats]
    variances = [to_numpy(b.norm.moving_variance) for b in stats]
    assert not np.allclose(means[0], 0.0)  # the statistics did move
    np.testing.assert_allclose(means[1], means[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(variances[1], variances[0], rtol=1e-5, atol=1e-6)


def test_keras_mask_equals_explicit_mask():
    block = _block("sara")
    x = _x(B, N, C, seed=6)
    mask = _mask()
    masked = keras.layers.Masking(mask_value=0.0)(np.where(mask[..., None], x, 0.0).astype("float32"))
    implicit = block(masked)
    np.testing.assert_allclose(to_numpy(implicit), to_numpy(block(x, mask=mask)), atol=1e-6)
    # the mask travels on to the next layer
    np.testing.assert_array_equal(to_numpy(get_keras_mask(implicit)), mask)


def test_sara_block_stays_linear_with_a_mask():
    block = _block("sara")
    x, mask = _x(B, N, C), _mask()
    with mock.patch.object(la, "linear_attention_projected", wraps=la.linear_attention_projected) as fused, \
            mock.patch.object(SARAMultiHeadAttention, "_kernel_matrix_attention", autospec=True,
                              side_effect=SARAMultiHeadAttention._kernel_matrix_attention) as quadratic:
        block(x, mask=mask)
    assert fused.call_count == 1 and quadratic.call_count == 0
    assert fused.call_args.args[4] is not None  # key padding passed through


# -------------------------------------------------------------- conversion


def _teacher_model():
    points = keras.Input((N, C), name="points")
    mask = keras.Input((N,), dtype="bool", name="mask")
    block = PointCloudSARABlock(HEADS, KEY_DIM, attention="softmax", name="block")
    y = block(points, mask=mask)
    model = keras.Model([points, mask], keras.layers.Dense(3)(y))
    _randomise_norm(block)
    return model


def test_softmax_block_converts_with_its_weights(tmp_path):
    teacher = _teacher_model()
    x, mask = _x(B, N, C, seed=2), _mask()
    want_teacher = to_numpy(teacher.predict([x, mask], verbose=0))
    student, report = convert(teacher, probe=[x, mask])
    assert report.num_converted == 1 and report.converted[0].path == "block/attention"
    block = student.get_layer("block")
    assert isinstance(block.attention_layer, SARAMultiHeadAttention)
    assert block.get_config()["attention"] == "sara"
    # every weight kept (attention projections, linear, batch-norm statistics, head)
    assert [w.path for w in student.weights] == [w.path for w in teacher.weights]
    for a, b in zip(student.get_weights(), teacher.get_weights()):
        np.testing.assert_array_equal(a, b)
    # the teacher is untouched
    assert type(teacher.get_layer("block").attention_layer) is keras.layers.MultiHeadAttention
    np.testing.assert_array_equal(to_numpy(teacher.predict([x, mask], verbose=0)), want_teacher)
    # the converted model computes exactly a SARA block holding the teacher's weights
    sara = keras.Model(
        teacher.inputs,
        keras.layers.Dense(3)(PointCloudSARABlock(HEADS, KEY_DIM, attention="sara")(*teacher.inputs[:1], mask=teacher.inputs[1])),
    )
    sara.set_weights(teacher.get_weights())
    got = to_numpy(student.predict([x, mask], verbose=0))
    np.testing.assert_allclose(got, to_numpy(sara.predict([x, mask], verbose=0)), rtol=1e-5, atol=1e-5)
    assert report.relative_error > 1e-3  # linear attention really runs
    # and stays SARA through save / load
    path = os.path.join(tmp_path, "student.keras")
    student.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.get_layer("block").attention_layer, SARAMultiHeadAttention)
    np.testing.assert_allclose(to_numpy(loaded.predict([x, mask], verbose=0)), got, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(attention="linear"), "`attention` must be one of .* Received: attention='linear'"),
        (dict(num_heads=0), "`num_heads` must be a positive integer. Received: num_heads=0"),
        (dict(num_heads=2.0), "`num_heads` must be a positive integer. Received: num_heads=2.0"),
        (dict(key_dim=-1), "`key_dim` must be a positive integer. Received: key_dim=-1"),
        (dict(dropout=1.0), r"`dropout` must be a float in \[0, 1\). Received: dropout=1.0"),
        (dict(normalization="group"), "`normalization` must be one of .* Received: normalization='group'"),
        (dict(feature_map="nope"), "nope"),
    ],
)
def test_bad_constructor_arguments_name_argument_and_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PointCloudSARABlock(**kwargs)


def test_bad_call_inputs_name_argument_and_value():
    block = PointCloudSARABlock(HEADS, KEY_DIM)
    with pytest.raises(ValueError, match=r"`inputs` must have shape \(batch, points, features\)"):
        block(_x(B, C))
    block = _block("sara")
    with pytest.raises(ValueError, match=r"`mask` must have shape \(batch, points\)"):
        block(_x(B, N, C), mask=np.ones((B, N + 1), bool))
