"""build_pct_policy: builds, trains, saves, converts softmax -> SARA, exports (every backend; export on TF)."""

import os

import keras
import numpy as np
import pytest

from keras_sara.conversion import convert
from keras_sara.layers.point_cloud_block import PointCloudSARABlock
from keras_sara.layers.sara_multi_head_attention import SARAMultiHeadAttention
from keras_sara.models import MaskedMaxMeanPool, build_pct_policy
from tests.backend_utils import backend, rel_err, to_numpy

pytestmark = pytest.mark.filterwarnings("ignore:`build\\(\\)` was called on layer:UserWarning")
B, N, EXTRA, ACTIONS = 3, 24, 6, 3
SMALL = dict(width=16, num_blocks=2, num_heads=2, key_dim=8, head_units=(32,))


def _policy(attention="sara", **kwargs):
    return build_pct_policy(N, action_dim=ACTIONS, extra_dim=EXTRA, attention=attention, **{**SMALL, **kwargs})


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((B, N), bool)
    mask[0, 15:] = False  # cloud 0: 15 real points
    mask[1, 5:] = False  # cloud 1: 5 real points, cloud 2: all 24
    points = np.where(mask[..., None], rng.normal(size=(B, N, 3)), 0.0).astype("float32")
    extra = rng.normal(size=(B, EXTRA)).astype("float32")
    return {"points": points, "mask": mask, "extra": extra}


def _predict(model, batch):
    return to_numpy(model.predict(batch, verbose=0))


def test_builds_with_named_inputs_and_identical_layouts():
    sara, soft = _policy("sara"), _policy("softmax")
    assert sorted(sara.input) == ["extra", "mask", "points"]
    assert tuple(sara.output.shape) == (None, ACTIONS)
    blocks = [l for l in sara.layers if isinstance(l, PointCloudSARABlock)]
    assert len(blocks) == SMALL["num_blocks"]
    assert all(isinstance(b.attention_layer, SARAMultiHeadAttention) for b in blocks)
    # same variables in the same order: a teacher's weights copy one to one
    assert [tuple(w.shape) for w in sara.weights] == [tuple(w.shape) for w in soft.weights]
    out = _predict(sara, _batch())
    assert out.shape == (B, ACTIONS) and np.all(np.isfinite(out))
    # no mask, no robot state
    plain = build_pct_policy(N, action_dim=2, use_mask=False, **SMALL)
    assert sorted(plain.input) == ["points"]
    assert _predict(plain, {"points": _batch()["points"]}).shape == (B, 2)


def test_padding_never_changes_the_action_and_empty_clouds_are_finite():
    model = _policy("sara")
    batch = _batch()
    want = _predict(model, batch)
    for fill in (1e3, np.nan, np.inf):
        noisy = dict(batch, points=np.where(batch["mask"][..., None], batch["points"], fill).astype("float32"))
        np.testing.assert_allclose(_predict(model, noisy), want, rtol=1e-5, atol=1e-5)
    empty = dict(batch, mask=np.zeros((B, N), bool))
    assert np.all(np.isfinite(_predict(model, empty)))


@pytest.mark.parametrize("attention", ["sara", "softmax"])
def test_trains_one_step_with_nan_padding(attention):
    model = _policy(attention)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    batch = _batch()
    batch["points"] = np.where(batch["mask"][..., None], batch["points"], np.nan).astype("float32")
    before = [to_numpy(w).copy() for w in model.trainable_weights]
    history = model.fit(batch, np.zeros((B, ACTIONS), "float32"), batch_size=B, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = [to_numpy(w) for w in model.trainable_weights]
    assert all(np.all(np.isfinite(w)) for w in after)
    # softmax is invariant to the key bias, which gets no gradient: the rest must move
    frozen = [w.path for w, a, b in zip(model.trainable_weights, before, after)
              if np.array_equal(a, b) and not w.path.endswith("attention/key/bias")]
    assert not frozen, frozen


def test_saves_and_loads(tmp_path):
    model = _policy("sara", feature_map="elu+1")
    batch = _batch(1)
    want = _predict(model, batch)
    path = os.path.join(tmp_path, "policy.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(_predict(loaded, batch), want, rtol=1e-6, atol=1e-6)
    assert all(
        isinstance(l.attention_layer, SARAMultiHeadAttention)
        for l in loaded.layers if isinstance(l, PointCloudSARABlock)
    )


def test_softmax_policy_converts_to_sara_with_its_weights(tmp_path):
    teacher = _policy("softmax")
    batch = _batch(2)
    # non-trivial batch-norm statistics, so that copying them matters
    teacher.compile("adam", "mse")
    teacher.fit(batch, np.ones((B, ACTIONS), "float32"), batch_size=B, epochs=1, verbose=0)
    student, report = convert(teacher, probe=batch)
    assert report.num_converted == SMALL["num_blocks"], str(report)
    assert [c.path for c in report.converted] == [f"block_{i}/attention" for i in range(SMALL["num_blocks"])]
    for a, b in zip(student.get_weights(), teacher.get_weights()):
        np.testing.assert_array_equal(a, b)
    # exactly the SARA policy built directly, holding the teacher's weights
    direct = _policy("sara")
    direct.set_weights(teacher.get_weights())
    got = _predict(student, batch)
    np.testing.assert_allclose(got, _predict(direct, batch), rtol=1e-5, atol=1e-5)
    assert rel_err(got, _predict(teacher, batch)) > 1e-4  # linear attention really runs
    path = os.path.join(tmp_path, "student.keras")
    student.save(path)
    loaded = keras.models.load_model(path)
    blocks = [l for l in loaded.layers if isinstance(l, PointCloudSARABlock)]
    assert all(isinstance(b.attention_layer, SARAMultiHeadAttention) for b in blocks)
    np.testing.assert_allclose(_predict(loaded, batch), got, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(backend() != "tensorflow", reason="export runs on the TensorFlow backend")
def test_exports_to_tflite_builtins_only(tmp_path):
    from keras_sara.export import export_tflite

    model = _policy("sara")
    batch = _batch(3)
    # export_tflite takes batches as lists in `model.inputs` order
    probe = [[batch[t.name][:1] for t in model.inputs]]
    report = export_tflite(model, os.path.join(tmp_path, "policy.tflite"), probe=probe, benchmark_runs=1)
    assert report.flex_free, report.op_histogram
    assert not any("GATHER" in op for op in report.op_histogram), report.op_histogram


def test_masked_max_mean_pool_matches_numpy():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(B, N, 5)).astype("float32")
    mask = _batch()["mask"]
    mask[1] = False  # an empty cloud pools to zeros
    got = to_numpy(MaskedMaxMeanPool()(x, mask=mask))
    for b in range(B):
        valid = x[b][mask[b]]
        want = np.zeros(10) if len(valid) == 0 else np.concatenate([valid.max(0), valid.mean(0)])
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_points=0), "`num_points` must be an integer >= 1. Received: num_points=0"),
        (dict(action_dim=0), "`action_dim` must be an integer >= 1. Received: action_dim=0"),
        (dict(extra_dim=-1), "`extra_dim` must be an integer >= 0. Received: extra_dim=-1"),
        (dict(num_blocks=0), "`num_blocks` must be an integer >= 1. Received: num_blocks=0"),
        (dict(attention="flash"), "`attention` must be one of .* Received: attention='flash'"),
        (dict(normalization="group"), "`normalization` must be one of .* Received: normalization='group'"),
        (dict(head_units=64), "`head_units` must be a sequence of positive integers. Received: head_units=64"),
        (dict(use_mask=1), "`use_mask` must be True or False. Received: use_mask=1"),
    ],
)
def test_bad_arguments_name_argument_and_value(kwargs, match):
    args = dict(num_points=N, action_dim=ACTIONS, **SMALL)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        build_pct_policy(**args)
