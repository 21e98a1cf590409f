"""Distributed up-training: keras_sara.distribution, DataParallel / ModelParallel (JAX), MirroredStrategy (TF).

The JAX tests need 8 devices; `make test-distributed` makes 8 host devices
with `XLA_FLAGS=--xla_force_host_platform_device_count=8`. The TensorFlow
test runs in a subprocess, because logical CPU devices must be configured
before TensorFlow initialises its devices. Layout-map tests run on any
backend: building a `LayoutMap` touches no device.
"""

import contextlib
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_sara
from keras_sara.callbacks import UpTraining
from keras_sara.distribution import layout_of, model_parallel, sara_layout_map
from tests.backend_utils import backend, to_numpy

pytestmark = pytest.mark.filterwarnings("ignore:`build\\(\\)` was called on layer:UserWarning")

T, E, HEADS, KEY_DIM, HIDDEN, CLASSES = 16, 16, 4, 4, 32, 3
N, BATCH = 32, 8  # 4 optimizer steps per epoch
RTOL, ATOL = 1e-4, 1e-5
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _num_devices() -> int:
    return len(keras.distribution.list_devices()) if backend() == "jax" else 0


needs_8_jax_devices = pytest.mark.skipif(
    backend() != "jax" or _num_devices() < 8,
    reason="needs the JAX backend with 8 devices: `make test-distributed` "
    "(XLA_FLAGS=--xla_force_host_platform_device_count=8)",
)


@pytest.fixture(autouse=True)
def _no_leaked_distribution():
    yield
    leaked = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    assert leaked is None, f"a test left a global distribution set: {leaked}"


def _teacher():
    """A 2-block softmax encoder (MHA + Dense MLP), named as a user would."""
    x = keras.Input((T, E))
    h = x
    for i in range(2):
        a = keras.layers.MultiHeadAttention(HEADS, KEY_DIM, name=f"mha_{i}")(h, h)
        h = keras.layers.LayerNormalization(name=f"norm1_{i}")(h + a)
        m = keras.layers.Dense(HIDDEN, activation="gelu", name=f"mlp_in_{i}")(h)
        m = keras.layers.Dense(E, name=f"mlp_out_{i}")(m)
        h = keras.layers.LayerNormalization(name=f"norm2_{i}")(h + m)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(x, keras.layers.Dense(CLASSES, name="head")(h))


def _mesh(shape=(2, 4), names=("batch", "model")):
    # Device names only: a LayoutMap and its checks touch no device.
    return keras.distribution.DeviceMesh(shape, names, [f"cpu:{i}" for i in range(int(np.prod(shape)))])


# ------------------------------------------------------ layout map (any backend)


def test_regex_layout_map_covers_attention_feature_maps_and_default_dense_names():
    layout_map = sara_layout_map(_mesh())
    expected = {
        "block_0/multi_head_attention/query/kernel": (None, "model", None),
        "multi_head_attention_2/key/kernel": (None, "model", None),
        "enc/attn/value/kernel": (None, "model", None),
        "enc/attn/gate/kernel": (None, "model", None),
        "enc/attn/attention_output/kernel": ("model", None, None),
        "enc/attn/hedgehog/query_kernel": ("model", None, None),
        "enc/attn/sara_feature_map/key_kernel": ("model", None, None),
        "dense/kernel": (None, "model"),
        "ffn/dense_12/kernel": (None, "model"),
    }
    for path, axes in expected.items():
        assert layout_map[path] is not None, path
        assert tuple(layout_map[path].axes) == axes, path
    replicated = [
        "enc/attn/query/bias", "enc/attn/attention_output/bias", "enc/attn/blend_state/blend",
        "enc/attn/blend_state/distillation_weight", "enc/attn/hedgehog/query_bias",
        "enc/attn/favor_plus/projection", "layer_normalization/gamma", "dense/bias",
        "my_mlp/kernel", "dense_layer/kernel",
    ]
    for path in replicated:
        assert layout_map[path] is None, path
    assert sara_layout_map(_mesh(), dense=False)["dense/kernel"] is None


def test_model_layout_map_uses_the_model_paths_and_skips_ragged_dense():
    teacher = _teacher()
    layout_map = sara_layout_map(_mesh(), model=teacher)
    for i in range(2):
        for name in ("query", "key", "value"):
            assert tuple(layout_map[f"mha_{i}/{name}/kernel"].axes) == (None, "model", None)
        assert tuple(layout_map[f"mha_{i}/attention_output/kernel"].axes) == ("model", None, None)
        assert tuple(layout_map[f"mlp_in_{i}/kernel"].axes) == (None, "model")
        assert tuple(layout_map[f"mlp_out_{i}/kernel"].axes) == (None, "model")
        assert layout_map[f"mha_{i}/query/bias"] is None
        assert layout_map[f"norm1_{i}/gamma"] is None
    # 3 classes do not split 4 ways: the head stays replicated
    assert layout_map["head/kernel"] is None
    # every key is a path of the model, and the converted student has the same paths
    paths = {v.path for v in teacher.weights}
    assert set(layout_map) <= paths and len(layout_map) == 12
    student, _ = keras_sara.convert(teacher, blend=0.0, verify=False)
    assert set(layout_map) <= {v.path for v in student.weights}
    # a per-head feature map's kernels follow their heads
    sara_map = sara_layout_map(_mesh(), model=keras_sara.convert(teacher, feature_map="hedgehog", verify=False)[0])
    assert tuple(sara_map["mha_0/hedgehog/query_kernel"].axes) == ("model", None, None)
    assert sara_map["mha_0/hedgehog/query_bias"] is None
    no_dense = sara_layout_map(_mesh(), model=teacher, dense=False)
    assert no_dense["mlp_in_0/kernel"] is None and no_dense["mha_0/query/kernel"] is not None


def test_layout_map_bad_inputs():
    with pytest.raises(ValueError, match=r"`device_mesh` must be a keras.distribution.DeviceMesh.*Received: device_mesh=\(2, 4\)"):
        sara_layout_map((2, 4))
    with pytest.raises(ValueError, match=r"`model_axis` must name an axis .*\('batch', 'model'\).*Received: model_axis='heads'"):
        sara_layout_map(_mesh(), model_axis="heads")
    with pytest.raises(ValueError, match=r"Received: model_axis=None"):
        sara_layout_map(_mesh(), model_axis=None)
    with pytest.raises(ValueError, match=r"`dense` must be True or False. Received: dense='yes'"):
        sara_layout_map(_mesh(), dense="yes")
    with pytest.raises(ValueError, match=r"`model` must be None or a built Keras model.*Received: model=str"):
        sara_layout_map(_mesh(), model="encoder")
    unbuilt = keras.Sequential([keras.layers.Dense(4)], name="unbuilt")
    with pytest.raises(ValueError, match=r"`model` must be built.*'unbuilt' with built=False"):
        sara_layout_map(_mesh(), model=unbuilt)
    # 4 heads do not split over 8 devices
    with pytest.raises(ValueError, match=r"8 devices.*'mha_0' has num_heads=4.*model_axis='model' of size 8"):
        sara_layout_map(_mesh((1, 8)), model=_teacher())
    # the other axis name works when asked for
    assert tuple(sara_layout_map(_mesh(), model_axis="batch")["x/query/kernel"].axes) == (None, "batch", None)


def test_model_parallel_builder_bad_inputs():
    devices = [f"cpu:{i}" for i in range(8)]
    with pytest.raises(ValueError, match=r"`model_size` must divide the number of devices \(8\). Received: model_size=3"):
        model_parallel(3, devices=devices)
    with pytest.raises(ValueError, match=r"`model_size` must be an integer >= 1. Received: model_size=0"):
        model_parallel(0, devices=devices)
    with pytest.raises(ValueError, match=r"`model_size` must be an integer >= 1. Received: model_size=True"):
        model_parallel(True, devices=devices)
    with pytest.raises(ValueError, match=r"must differ. Received: batch_axis='x', model_axis='x'"):
        model_parallel(4, devices=devices, batch_axis="x", model_axis="x")
    dist = model_parallel(4, devices=devices)
    assert isinstance(dist, keras.distribution.ModelParallel)
    assert dist.device_mesh.shape == (2, 4) and dist.batch_dim_name == "batch"


# ------------------------------------------------------------- JAX, 8 devices


class _Record(keras.callbacks.Callback):
    """Loss (running mean), blend and distillation weight after every batch."""

    def __init__(self):
        super().__init__()
        self.loss, self.blend, self.distill = [], [], []

    def on_train_batch_end(self, batch, logs=None):
        self.model.jax_state_sync()  # mid-epoch the JAX loop keeps state outside the variables
        self.loss.append(float(logs["loss"]))
        layer = self.model.get_layer("mha_1")
        self.blend.append(float(to_numpy(layer.blend_variable)))
        self.distill.append(float(to_numpy(layer.distillation_weight_variable)))


_CONFIGS = {
    "blend+distill": dict(schedule="linear", blend_steps=3, distillation_weight=0.5),
    "blend+distill+stage": dict(schedule="linear", blend_steps=3, distillation_weight=0.5, attention_only_steps=2),
}
_REFERENCE = {}  # config -> single-device run (shared by the tests of this module)


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, T, E)).astype("float32"), rng.integers(0, CLASSES, N)


def _optimizer():
    # SGD, not Adam: Adam divides by sqrt(v), which turns last-bit differences
    # in a near-zero gradient into differences of order lr, a property of the
    # optimizer that would hide the distributed-vs-single comparison.
    return keras.optimizers.SGD(0.02, momentum=0.5, weight_decay=0.01)


def _teacher_weights():
    keras.utils.set_random_seed(1)
    return _teacher().get_weights()


def _uptrain(config, make_distribution=None):
    """Convert the teacher and up-train it one epoch, single-device or distributed.

    `make_distribution(teacher)` returns the distribution that the student is
    converted, compiled and trained under (the layout may read the teacher).
    """
    x, y = _data()
    weights = _teacher_weights()
    keras.utils.set_random_seed(2)
    teacher = _teacher()
    teacher.set_weights(weights)
    distribution = make_distribution(teacher) if make_distribution is not None else None
    cb = UpTraining(**_CONFIGS[config], probe=x[:BATCH], verbose=0)
    rec = _Record()
    scope = distribution.scope() if distribution is not None else contextlib.nullcontext()
    with scope:
        student, _ = keras_sara.convert(teacher, blend=0.0, verify=False)
        student.compile(_optimizer(), "sparse_categorical_crossentropy")
        student.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[cb, rec])
    return {
        "model": student,
        "loss": np.array(rec.loss),
        "blend": rec.blend,
        "distill": rec.distill,
        "weights": [to_numpy(w) for w in student.weights],
        "fidelity": cb.fidelity_history[-1]["mean"],
        "callback": cb,
    }


def _reference(config):
    if config not in _REFERENCE:
        run = _uptrain(config)
        kernel = run["model"].get_layer("mha_0")._query_dense.kernel
        assert len(kernel.value.sharding.device_set) == 1  # a true single-device run
        _REFERENCE[config] = run
    return _REFERENCE[config]


def _assert_matches(run, ref):
    np.testing.assert_allclose(run["loss"], ref["loss"], rtol=RTOL, atol=ATOL)
    assert len(run["weights"]) == len(ref["weights"])
    for got, want, var in zip(run["weights"], ref["weights"], run["model"].weights):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=var.path)
    assert run["fidelity"] == pytest.approx(ref["fidelity"], rel=1e-4)
    # training moved the weights: the comparison is not between two untouched models
    start = dict(zip([v.path for v in _teacher().weights], _teacher_weights()))
    moved = [np.abs(w - start[v.path]).max() for w, v in zip(run["weights"], run["model"].weights) if v.path in start]
    assert max(moved) > 1e-3


def _assert_schedule_seen(run):
    cb = run["callback"]
    steps = range(N // BATCH)
    # value set before step s is used by step s and read back after it
    assert run["blend"] == pytest.approx([cb.blend_at(s) for s in steps], abs=1e-7)
    assert run["blend"] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0], abs=1e-7)
    assert run["distill"] == pytest.approx([0.25] * len(steps), abs=1e-7)  # 0.5 over 2 layers


@pytest.mark.slow
@needs_8_jax_devices
def test_data_parallel_uptraining_matches_single_device():
    ref = _reference("blend+distill")
    run = _uptrain("blend+distill", lambda teacher: keras.distribution.DataParallel())
    kernel = run["model"].get_layer("mha_0")._query_dense.kernel.value
    assert len(kernel.sharding.device_set) == 8  # replicated over all 8 devices
    assert all(a is None for a in kernel.sharding.spec)
    _assert_schedule_seen(run)
    _assert_matches(run, ref)


@pytest.mark.slow
@needs_8_jax_devices
def test_model_parallel_with_sara_layout_map_shards_and_matches_single_device():
    ref = _reference("blend+distill+stage")

    def parallel(teacher):
        mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), keras.distribution.list_devices())
        return keras.distribution.ModelParallel(
            layout_map=sara_layout_map(mesh, model=teacher), batch_dim_name="batch"
        )

    run = _uptrain("blend+distill+stage", parallel)
    model = run["model"]
    for i in range(2):
        layer = model.get_layer(f"mha_{i}")
        assert isinstance(layer, keras_sara.SARAMultiHeadAttention)
        for dense in (layer._query_dense, layer._key_dense, layer._value_dense):
            value = dense.kernel.value
            assert tuple(value.sharding.spec) == (None, "model", None), dense.kernel.path
            # each device holds 1 of the 4 heads
            assert {s.data.shape for s in value.addressable_shards} == {(E, 1, KEY_DIM)}
        out = layer._output_dense.kernel.value
        assert tuple(out.sharding.spec)[0] == "model"
        assert {s.data.shape for s in out.addressable_shards} == {(1, KEY_DIM, E)}
        assert layout_of(layer._query_dense.bias) == (None, None)
        assert layout_of(layer.blend_variable) == ()
        assert layout_of(model.get_layer(f"mlp_in_{i}").kernel) == (None, "model")
    # optimizer state follows its variable's layout
    opt_vars = [v for v in model.optimizer.variables if v.path.endswith("mha_0_query_kernel_momentum")]
    assert opt_vars and tuple(opt_vars[0].value.sharding.spec) == (None, "model", None)
    _assert_schedule_seen(run)
    _assert_matches(run, ref)


@needs_8_jax_devices
def test_regex_layout_map_shards_default_named_layers():
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), keras.distribution.list_devices())
    dist = keras.distribution.ModelParallel(layout_map=sara_layout_map(mesh), batch_dim_name="batch")
    with dist.scope():
        x = keras.Input((T, E))
        attention = keras_sara.SARAMultiHeadAttention(HEADS, KEY_DIM, feature_map="hedgehog", blend=0.0)
        dense = keras.layers.Dense(HIDDEN)  # default name: dense, dense_1, ...
        proj = keras.layers.Dense(E, name="proj")
        model = keras.Model(x, proj(dense(attention(x, x))))
    assert layout_of(attention._query_dense.kernel) == (None, "model", None)
    assert layout_of(attention._output_dense.kernel) == ("model", None, None)
    assert layout_of(attention.feature_map.key_kernel) == ("model", None, None)
    assert layout_of(attention.feature_map.key_bias) == (None, None)
    assert layout_of(dense.kernel) == (None, "model")
    assert layout_of(proj.kernel) == (None, None)  # a custom name: replicated
    out = model(np.ones((4, T, E), "float32"))
    assert out.shape == (4, T, E) and np.isfinite(to_numpy(out)).all()


# ------------------------------------------------- TensorFlow MirroredStrategy

_TF_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np
    import tests.test_distribution as td

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = {"replicas": strategy.num_replicas_in_sync}
    frozen_paths = [f"{n}_{i}/{w}" for i in range(2) for n, w in
                    (("norm1", "gamma"), ("mlp_in", "kernel"), ("mlp_out", "kernel"))] + ["head/kernel"]

    class PerReplica(td.keras.callbacks.Callback):
        # every replica's copy of the blend and of the stage-1-frozen weights
        def __init__(self):
            super().__init__()
            self.blend, self.frozen = [], []
        def on_train_batch_end(self, batch, logs=None):
            layer = self.model.get_layer("mha_1")
            self.blend.append([float(c.numpy()) for c in layer.blend_variable.value.values])
            by_path = {v.path: v for v in self.model.weights}
            self.frozen.append([[c.numpy().tolist() for c in by_path[p].value.values] for p in frozen_paths])

    for config in td._CONFIGS:
        ref = td._uptrain_tf(config, None, None)
        per_replica = PerReplica()
        run = td._uptrain_tf(config, strategy, per_replica)
        kernel = run["model"].get_layer("mha_0")._query_dense.kernel.value
        out[config] = {
            "mirrored": type(kernel).__name__,
            "devices": sorted({c.device for c in kernel.values}),
            "loss": run["loss"].tolist(), "ref_loss": ref["loss"].tolist(),
            "blend": run["blend"], "distill": run["distill"], "ref_blend": ref["blend"],
            "per_replica_blend": per_replica.blend,
            "frozen": per_replica.frozen,
            "start": [td._teacher_weights()[i].tolist() for i in td._weight_indices(frozen_paths)],
            "max_weight_diff": max(float(np.abs(a - b).max()) for a, b in zip(run["weights"], ref["weights"])),
            "weights_close": all(np.allclose(a, b, rtol=td.RTOL, atol=td.ATOL)
                                 for a, b in zip(run["weights"], ref["weights"])),
            "fidelity": run["fidelity"], "ref_fidelity": ref["fidelity"],
        }
    print("RESULT " + json.dumps(out))
    """
)


def _weight_indices(paths):
    order = [v.path for v in _teacher().weights]
    return [order.index(p) for p in paths]


def _uptrain_tf(config, strategy, extra_callback):
    """`_uptrain` on TensorFlow: build, convert and compile inside `strategy.scope()`."""
    x, y = _data()
    weights = _teacher_weights()
    keras.utils.set_random_seed(2)
    cb = UpTraining(**_CONFIGS[config], probe=x[:BATCH], verbose=0)
    rec = _RecordTF()
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        teacher = _teacher()
        teacher.set_weights(weights)
        student, _ = keras_sara.convert(teacher, blend=0.0, verify=False)
        student.compile(_optimizer(), "sparse_categorical_crossentropy")
    callbacks = [cb, rec] + ([extra_callback] if extra_callback is not None else [])
    student.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    return {
        "model": student,
        "loss": np.array(rec.loss),
        "blend": rec.blend,
        "distill": rec.distill,
        "weights": [to_numpy(w) for w in student.weights],
        "fidelity": cb.fidelity_history[-1]["mean"],
    }


class _RecordTF(_Record):
    def on_train_batch_end(self, batch, logs=None):
        self.loss.append(float(logs["loss"]))
        layer = self.model.get_layer("mha_1")
        self.blend.append(float(to_numpy(layer.blend_variable)))
        self.distill.append(float(to_numpy(layer.distillation_weight_variable)))


@pytest.mark.slow
@pytest.mark.skipif(backend() != "tensorflow", reason="tf.distribute.MirroredStrategy needs the TensorFlow backend")
def test_mirrored_strategy_uptraining_matches_single_device():
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "PYTHONPATH": REPO}
    proc = subprocess.run(
        [sys.executable, "-c", _TF_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["replicas"] == 2
    for config, params in _CONFIGS.items():
        res = out[config]
        assert res["mirrored"] == "MirroredVariable" and len(res["devices"]) == 2, res["devices"]
        np.testing.assert_allclose(res["loss"], res["ref_loss"], rtol=RTOL, atol=ATOL, err_msg=config)
        assert res["weights_close"], (config, res["max_weight_diff"])
        assert res["fidelity"] == pytest.approx(res["ref_fidelity"], rel=1e-4)
        assert res["blend"] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0], abs=1e-7)
        assert res["ref_blend"] == res["blend"] and res["distill"] == pytest.approx([0.25] * 4)
        # the callback's assignment reached both replicas' copies
        assert [b[0] for b in res["per_replica_blend"]] == [b[1] for b in res["per_replica_blend"]]
        assert [b[0] for b in res["per_replica_blend"]] == pytest.approx(res["blend"], abs=1e-7)
        start = [np.array(w) for w in res["start"]]
        stage = params.get("attention_only_steps", 0)
        for step, per_weight in enumerate(res["frozen"], start=1):
            for s, replicas in zip(start, per_weight):
                copies = [np.array(c) for c in replicas]
                np.testing.assert_array_equal(copies[0], copies[1])  # replicas agree
                if step <= stage:  # stage 1: only attention weights move, on every replica
                    np.testing.assert_array_equal(copies[0], s)
        last = [np.array(r[0]) for r in res["frozen"][-1]]
        assert max(np.abs(a - s).max() for a, s in zip(last, start)) > 1e-3
