"""Vague errors made clear and silent acceptances refused (issue 21, items 2 and 3).

Each case names the argument, the value or shape received and what is
expected. The layer's mask and feature-size errors run on every backend in
`tests/layers/test_layer_errors.py`; these need the TensorFlow backend
(export, the LiteRT runner) or are backend-independent.
"""

import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest

import keras_sara
from keras_sara import export as export_lib
from keras_sara.export import export_tflite
from tests.backend_utils import backend
from tflite.runner import PolicyRunner

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tensorflow_only = pytest.mark.skipif(backend() != "tensorflow", reason="LiteRT export runs on the TensorFlow backend")


def teacher(tokens=8, width=16):
    inputs = keras.Input((tokens, width))
    x = keras.layers.MultiHeadAttention(2, 8, name="mha")(inputs, inputs)
    return keras.Model(inputs, keras.layers.Dense(width)(x))


# ------------------------------------------------------------ probes


def test_convert_probe_of_wrong_shape_names_probe():
    with pytest.raises(ValueError, match=r"`probe` must match the model's input\(s\) \(None, 8, 16\).*Received: probe with shape\(s\) \(2, 8, 12\)"):
        keras_sara.convert(teacher(), probe=np.zeros((2, 8, 12), "float32"))
    with pytest.raises(ValueError, match=r"`probe` must match .*1 array\(s\). Received: probe with shape\(s\) \(2, 8, 16\), \(2, 8, 16\)"):
        keras_sara.convert(teacher(), probe=[np.zeros((2, 8, 16), "float32")] * 2)


def test_convert_probe_with_nan_is_refused():
    probe = np.zeros((2, 8, 16), "float32")
    probe[1, 3, 0] = np.nan
    with pytest.raises(ValueError, match=r"`probe` must hold finite values: it has 1 NaN"):
        keras_sara.convert(teacher(), probe=probe)


def test_convert_accepts_other_batch_and_a_subclassed_model_probe_is_called():
    keras_sara.convert(teacher(), probe=np.ones((3, 8, 16), "float32"))  # the batch axis may differ

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.mha = keras.layers.MultiHeadAttention(2, 8)

        def call(self, x):
            return self.mha(x, x)

    model = Sub()
    model(np.zeros((1, 8, 16), "float32"))
    with pytest.raises(ValueError, match=r"`probe` must be a batch that model .* accepts. Received: probe with shape\(s\) \(2, 8, 5\)"):
        keras_sara.convert(model, probe=np.zeros((2, 8, 5), "float32"))


def test_uptraining_probe_of_wrong_shape_names_probe():
    student, _ = keras_sara.convert(teacher(), blend=0.0)
    student.compile("adam", "mse")
    x = np.random.default_rng(0).standard_normal((4, 8, 16)).astype("float32")
    callback = keras_sara.callbacks.UpTraining(blend_steps=2, probe=x[:, :, :4])
    before = [w.copy() for w in student.get_weights()]
    with pytest.raises(ValueError, match=r"UpTraining: `probe` must match the model's input\(s\) \(None, 8, 16\).*Received: probe with shape\(s\) \(4, 8, 4\)"):
        student.fit(x, x, epochs=1, batch_size=2, verbose=0, callbacks=[callback])
    assert all(np.array_equal(a, b) for a, b in zip(before, student.get_weights()))  # no step was taken


# ----------------------------------------------------------- finalize


def test_finalize_refuses_a_model_that_was_never_converted():
    with pytest.raises(ValueError, match=r"`model` must be converted before `finalize`.*softmax attention \(mha\).*keras_sara.convert\(model\)"):
        keras_sara.finalize(teacher())


def test_finalize_warns_about_softmax_left_by_a_partial_conversion():
    inputs = keras.Input((8, 16))
    x = keras.layers.MultiHeadAttention(2, 8, name="keep")(inputs, inputs)
    x = keras.layers.MultiHeadAttention(2, 8, name="swap")(x, x)
    student, _ = keras_sara.convert(keras.Model(inputs, x), layers=["swap"])
    with pytest.warns(UserWarning, match="keep stay softmax attention"):
        keras_sara.finalize(student)


def test_finalize_of_a_converted_model_stays_silent():
    student, _ = keras_sara.convert(teacher())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keras_sara.finalize(student)


def test_a_dict_probe_for_a_list_of_named_inputs_is_matched_by_name():
    """Keras matches a dict to a list of named Inputs (rt2_grasping's probe): so must the probe check."""
    from keras_sara.conversion import check_probe

    zeta, alpha = keras.Input((3,), name="zeta"), keras.Input((5,), name="alpha")
    model = keras.Model([zeta, alpha], keras.layers.Concatenate()([zeta, alpha]))
    check_probe(model, {"zeta": np.zeros((2, 3)), "alpha": np.zeros((2, 5))})  # not sorted by key
    with pytest.raises(ValueError, match=r"Received: probe with shape\(s\) \(2, 4\), \(2, 5\)"):
        check_probe(model, {"zeta": np.zeros((2, 4)), "alpha": np.zeros((2, 5))})


# -------------------------------------------------------------- export


@tensorflow_only
def test_export_checks_probe_and_representative_data_for_nan_first(tmp_path, monkeypatch):
    model = teacher()
    bad = np.random.default_rng(0).standard_normal((4, 8, 16)).astype("float32")
    bad[2, 0, 5] = np.inf

    def no_conversion(*args, **kwargs):
        raise AssertionError("the model was converted before its inputs were checked")

    monkeypatch.setattr(export_lib, "_convert", no_conversion)
    with pytest.raises(ValueError, match=r"`probe` must hold finite values: 1 of its 512 values are NaN or infinite"):
        export_tflite(model, tmp_path / "m.tflite", probe=bad)
    with pytest.raises(ValueError, match=r"`representative_data` must hold finite values"):
        export_tflite(model, tmp_path / "m.tflite", quantize="int8", representative_data=bad)
    assert os.listdir(tmp_path) == []


@tensorflow_only
@pytest.mark.slow
def test_failed_int8_export_names_the_ops_to_keep_in_float_and_the_advice_holds(tmp_path):
    """keras.io miniGPT (causal SARA): the diagnosis measures each int8 op type, and its advice passes."""
    import ast

    from tests.test_streaming_custom_blocks import create_model, token_ids

    keras.utils.set_random_seed(7)
    student, _ = keras_sara.convert(create_model(maxlen=32), verify=False)
    calibration = token_ids(8, 32)
    first = export_tflite(student, tmp_path / "loose.tflite", quantize="int8", representative_data=calibration,
                          benchmark_runs=0, tolerance=1.0)
    tolerance = first.relative_error / 3
    with pytest.raises(RuntimeError, match="Per-op contribution") as info:
        export_tflite(student, tmp_path / "m.tflite", quantize="int8", representative_data=calibration,
                      benchmark_runs=0, tolerance=tolerance)
    text = str(info.value)
    assert "FULLY_CONNECTED" in text and "alone in int8" in text
    assert not (tmp_path / "m.tflite").exists()
    advice = ast.literal_eval(text.split("int8_float_ops=")[-1].rstrip("."))
    assert set(export_lib.DEFAULT_INT8_FLOAT_OPS) < set(advice)
    report = export_tflite(student, tmp_path / "m.tflite", quantize="int8", representative_data=calibration,
                           benchmark_runs=0, tolerance=tolerance, int8_float_ops=advice)
    assert report.relative_error <= tolerance


UNREGISTERED = textwrap.dedent(
    """
    import keras

    class Doubler(keras.layers.Layer):  # no register_keras_serializable
        def call(self, x):
            return 2 * x
    """
)

EXPORT_UNREGISTERED = textwrap.dedent(
    """
    import os, sys
    os.environ["KERAS_BACKEND"] = sys.argv[1]
    sys.path.insert(0, sys.argv[2])
    import keras
    from keras_sara import export as export_lib
    from unregistered_layers import Doubler

    def worker(*args):
        print("WORKER STARTED")
        raise SystemExit(3)

    export_lib.run_tensorflow_worker = worker
    inputs = keras.Input((4,))
    model = keras.Model(inputs, Doubler(name="doubler")(keras.layers.Dense(4)(inputs)))
    try:
        export_lib.export_tflite(model, os.path.join(sys.argv[2], "m.tflite"))
    except ValueError as err:
        print("REFUSED", err)
    """
)


@pytest.mark.parametrize("source_backend", ["jax", "torch"])
def test_unregistered_custom_layer_is_named_before_the_worker_starts(tmp_path, source_backend):
    (tmp_path / "unregistered_layers.py").write_text(UNREGISTERED)
    proc = subprocess.run(
        [sys.executable, "-c", EXPORT_UNREGISTERED, source_backend, str(tmp_path)],
        capture_output=True, text=True, cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=REPO_ROOT), timeout=300,
    )
    out = proc.stdout
    assert "REFUSED" in out, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "WORKER STARTED" not in out  # refused before the TensorFlow-backend worker
    assert "unregistered_layers.Doubler" in out and "register_keras_serializable" in out
    assert not (tmp_path / "m.tflite").exists()


# ------------------------------------------------- runner and command line


@pytest.fixture(scope="module")
def tiny_tflite(tmp_path_factory):
    if backend() != "tensorflow":
        pytest.skip("LiteRT export runs on the TensorFlow backend")
    path = tmp_path_factory.mktemp("tiny") / "tiny.tflite"
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    export_tflite(model, path, benchmark_runs=0)
    return path


def test_runner_on_empty_or_foreign_file_names_it(tmp_path):
    empty = tmp_path / "policy.tflite"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"policy.tflite' is empty \(0 bytes\), not a LiteRT model"):
        PolicyRunner(empty)
    foreign = tmp_path / "notes.tflite"
    foreign.write_bytes(b"PK\x03\x04 a zip archive, say a .keras file")
    with pytest.raises(ValueError, match=r"notes.tflite' \(\d+ bytes\) is not a LiteRT \(.tflite\) flatbuffer.*expected b'TFL3'"):
        PolicyRunner(foreign)


def test_runner_on_truncated_file_names_it(tiny_tflite, tmp_path):
    data = tiny_tflite.read_bytes()
    truncated = tmp_path / "cut.tflite"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.tflite' \(\d+ bytes\) is not a loadable LiteRT model.*truncated"):
        PolicyRunner(truncated)


def test_runner_refuses_non_finite_inputs_unless_allowed(tiny_tflite):
    x = np.ones((1, 4), "float32")
    x[0, 2] = np.nan
    with pytest.raises(ValueError, match=r"Input 'input_0' must hold finite values: 1 of its 4 values .*index \(0, 2\).*allow_non_finite=True"):
        PolicyRunner(tiny_tflite)(x)
    assert np.isnan(PolicyRunner(tiny_tflite, allow_non_finite=True)(x)).any()  # the caller's choice
    assert np.isfinite(PolicyRunner(tiny_tflite)(np.ones((1, 4), "float32"))).all()
    with pytest.raises(ValueError, match="`allow_non_finite` must be True or False. Received: allow_non_finite=1"):
        PolicyRunner(tiny_tflite, allow_non_finite=1)


def test_export_command_line_on_a_corrupt_keras_file(tmp_path):
    bad = tmp_path / "model.keras"
    bad.write_bytes(b"PK\x03\x04 truncated archive")
    proc = subprocess.run(
        [sys.executable, "-m", "tflite.export", str(bad), str(tmp_path / "out.tflite")],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"model '{bad}' exists (" in proc.stderr and "not a readable .keras archive" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["model.keras"]
