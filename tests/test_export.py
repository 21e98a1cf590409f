"""LiteRT export: verified files, no Flex ops, quantisation, other backends, the runner, the CLI.

Runs on the TensorFlow backend (the models trained on JAX and PyTorch are
built in subprocesses). Models are tiny (2 layers, 32 wide, 64 tokens) so
the whole file stays under a few minutes on 2 CPU cores.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from keras_sara.layers import SARAMultiHeadAttention
from tests.backend_utils import backend, rel_err

pytestmark = pytest.mark.skipif(
    backend() != "tensorflow", reason="export runs on the TensorFlow backend (other backends: subprocess tests)"
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS, WIDTH, HEADS, LAYERS = 64, 32, 2, 2
SHAPE = (1, TOKENS, WIDTH)


def encoder(attention="sara", name=None):
    """Pre-LayerNorm Transformer encoder, (None, TOKENS, WIDTH) -> same."""
    inputs = keras.Input((TOKENS, WIDTH))
    x = inputs
    for _ in range(LAYERS):
        h = keras.layers.LayerNormalization()(x)
        if attention == "sara":
            attn = SARAMultiHeadAttention(HEADS, WIDTH // HEADS)
        else:
            attn = keras.layers.MultiHeadAttention(HEADS, WIDTH // HEADS)
        x = x + attn(h, h)
        h = keras.layers.LayerNormalization()(x)
        x = x + keras.layers.Dense(WIDTH)(keras.layers.Dense(WIDTH, activation="gelu")(h))
    return keras.Model(inputs, x, name=name or f"{attention}_encoder")


def file_ops(path):
    """Op names of a .tflite file, read by the LiteRT runtime itself (no delegate)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(
        model_path=str(path),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    return [op["op_name"] for op in interpreter._get_ops_details()]


def run_file(path, x):
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path), num_threads=2).get_signature_runner("serve")
    return runner(input_0=x)["output_0"]


def subprocess_env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **extra)
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def run_python(code, *args, backend_name="tensorflow", timeout=300):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *[str(a) for a in args]],
        env=subprocess_env(KERAS_BACKEND=backend_name),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def sara_model():
    keras.utils.set_random_seed(1)
    return encoder("sara")


@pytest.fixture(scope="module")
def float32_export(sara_model, tmp_path_factory):
    from keras_sara.export import export_tflite

    path = tmp_path_factory.mktemp("float32") / "sara.tflite"
    return export_tflite(sara_model, path, benchmark_runs=5)


@pytest.fixture(scope="module")
def calibration():
    return np.random.default_rng(3).standard_normal((8,) + SHAPE[1:]).astype("float32")


@pytest.fixture(scope="module")
def int8_io_export(sara_model, calibration, tmp_path_factory):
    from keras_sara.export import export_tflite

    path = tmp_path_factory.mktemp("int8io") / "sara_int8_io.tflite"
    return export_tflite(
        sara_model, path, quantize="int8", representative_data=calibration, int8_io=True,
        benchmark_runs=0,
    )


# ------------------------------------------------------------------ float32


def test_float32_export_is_verified_builtins_only_and_linear(sara_model, float32_export):
    report = float32_export
    assert os.path.isfile(report.path) and os.path.getsize(report.path) == report.size_bytes
    assert report.verified and report.relative_error <= 1e-4
    assert report.input_shapes == [SHAPE] and report.output_shapes == [SHAPE]
    assert report.latency_p50_ms > 0 and report.latency_p90_ms >= report.latency_p50_ms

    ops = file_ops(report.path)
    assert not [op for op in ops if op.startswith("Flex") or op == "CUSTOM"], ops
    assert report.flex_free and report.flex_ops == []
    # The report's histogram is the file's.
    assert report.op_histogram == {op: ops.count(op) for op in set(ops)}
    # blend=1: the linear graph only; no softmax path in the file.
    assert "SOFTMAX" not in ops and "EXP" not in ops
    assert "BATCH_MATMUL" in ops

    # Fresh inputs, not the probes the export used.
    x = np.random.default_rng(7).standard_normal(SHAPE).astype("float32")
    assert rel_err(run_file(report.path, x), sara_model(x)) <= 1e-4

    as_dict = report.to_dict()
    assert as_dict["flex_free"] is True
    json.dumps(as_dict)
    text = str(report)
    assert "LiteRT export report" in text and "FULLY_CONNECTED" in text


def test_softmax_teacher_export_has_softmax(tmp_path, monkeypatch):
    import keras_sara.export as export

    def no_subprocess(*args, **kwargs):
        raise AssertionError("the TensorFlow backend converts in-process")

    monkeypatch.setattr(export.subprocess, "run", no_subprocess)
    report = export.export_tflite(encoder("mha"), tmp_path / "teacher.tflite", benchmark_runs=0)
    ops = file_ops(report.path)
    assert "SOFTMAX" in ops and report.flex_free
    assert report.relative_error <= 1e-4 and report.latency_p50_ms is None


# ---------------------------------------------------------- quantisation


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["float16", "dynamic", "int8"])
def test_quantized_exports_verify_and_report_errors(mode, sara_model, float32_export, calibration, tmp_path):
    from keras_sara.export import DEFAULT_TOLERANCES, export_tflite

    kwargs = {}
    if mode == "int8":
        # an iterable of batches, the third accepted form
        kwargs["representative_data"] = (x[None] for x in calibration)
    report = export_tflite(sara_model, tmp_path / f"{mode}.tflite", quantize=mode, benchmark_runs=3, **kwargs)
    assert report.quantize == mode and report.verified
    assert 0 < report.relative_error <= DEFAULT_TOLERANCES[mode]
    assert report.max_abs_error >= report.mean_abs_error > 0
    assert report.size_bytes < float32_export.size_bytes
    ops = file_ops(report.path)
    assert report.flex_free and not [op for op in ops if op.startswith("Flex")]
    assert report.input_dtypes == ["float32"] and report.output_dtypes == ["float32"]
    if mode == "float16":
        assert report.relative_error <= 1e-2 and "DEQUANTIZE" in ops
    if mode == "int8":
        assert "QUANTIZE" in ops
        # float_ops lists what stayed in float32: a strict subset of the ops.
        assert set(report.float_ops) < set(report.op_histogram)
        assert all(report.float_ops[k] <= report.op_histogram[k] for k in report.float_ops)
        assert report.num_probes == 4  # verified on calibration examples
    else:
        assert report.float_ops == {}


def test_int8_io_export_has_integer_interface(int8_io_export):
    report = int8_io_export
    assert report.input_dtypes == ["int8"] and report.output_dtypes == ["int8"]
    assert report.verified and report.relative_error <= 0.3


# ------------------------------------------------------- other backends


CROSS_BACKEND_SCRIPT = """
    import json, subprocess, sys
    import numpy as np, keras
    import keras_sara.export as export
    from keras_sara.layers import SARAMultiHeadAttention

    calls = []
    real_run = subprocess.run
    def counting_run(cmd, *args, **kwargs):
        calls.append(kwargs["env"]["KERAS_BACKEND"])
        return real_run(cmd, *args, **kwargs)
    export.subprocess.run = counting_run

    keras.utils.set_random_seed(0)
    inputs = keras.Input((64, 32))
    h = keras.layers.LayerNormalization()(inputs)
    x = inputs + SARAMultiHeadAttention(2, 16)(h, h)
    model = keras.Model(inputs, keras.layers.Dense(4)(x))
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((4, 64, 32)).astype("float32")
    before = model.get_weights()
    model.fit(xs, rng.standard_normal((4, 64, 4)).astype("float32"), batch_size=4, epochs=1, verbose=0)
    trained = any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    report = export.export_tflite(model, sys.argv[1], benchmark_runs=2)
    probe = rng.standard_normal((1, 64, 32)).astype("float32")
    np.save(sys.argv[1] + ".probe.npy", probe)
    np.save(sys.argv[1] + ".keras_out.npy", keras.ops.convert_to_numpy(model(probe)))
    print("REPORT " + json.dumps(dict(report.to_dict(), trained=trained, subprocess_calls=calls)))
"""


@pytest.mark.slow
@pytest.mark.parametrize("source", ["jax", "torch"])
def test_model_trained_on_other_backend_exports(source, tmp_path):
    path = tmp_path / f"{source}.tflite"
    proc = run_python(CROSS_BACKEND_SCRIPT, path, backend_name=source)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")][-1]
    report = json.loads(line[len("REPORT "):])
    assert report["trained"]
    # The conversion ran in exactly one TensorFlow-backend subprocess.
    assert report["subprocess_calls"] == ["tensorflow"]
    assert report["source_backend"] == source
    assert report["verified"] and report["relative_error"] <= 1e-4 and report["flex_free"]
    ops = file_ops(path)
    assert not [op for op in ops if op.startswith("Flex")] and "SOFTMAX" not in ops
    # The file reproduces the model as trained on its own backend.
    probe = np.load(str(path) + ".probe.npy")
    assert rel_err(run_file(path, probe), np.load(str(path) + ".keras_out.npy")) <= 1e-4
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


# -------------------------------------------------------------- the runner


RUNNER_SCRIPT = """
    import sys
    # Make any import of TensorFlow or Keras fail, before anything is imported.
    for name in ("tensorflow", "keras", "keras_sara", "tf_keras", "jax", "torch"):
        sys.modules[name] = None
    for name in ("tensorflow", "keras"):
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"{name} imported")
    import numpy as np
    from tflite.runner import PolicyRunner

    data = np.load(sys.argv[1])
    out = {}
    for key in ("float32", "int8_io"):
        runner = PolicyRunner(sys.argv[2 if key == "float32" else 3], num_threads=2)
        out[key] = runner(data["x"])
        out[key + "_named"] = runner(input_0=data["x"])
        stats = runner.latency(runs=3)
        assert stats["p50_ms"] > 0 and stats["p90_ms"] >= stats["p50_ms"], stats
    assert out["int8_io"].dtype == np.float32
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "keras_sara")
                    and sys.modules[m] is not None)
    assert not loaded, loaded
    np.savez(sys.argv[4], **out)
    print("RUNNER OK")
"""


def test_runner_needs_no_tensorflow_or_keras(sara_model, float32_export, int8_io_export, tmp_path):
    x = np.random.default_rng(11).standard_normal(SHAPE).astype("float32")
    np.savez(tmp_path / "in.npz", x=x)
    proc = run_python(
        RUNNER_SCRIPT, tmp_path / "in.npz", float32_export.path, int8_io_export.path,
        tmp_path / "out.npz", timeout=120,
    )
    assert proc.returncode == 0 and "RUNNER OK" in proc.stdout, proc.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")

    # float32: exactly what the interpreter gives, and Keras to 1e-4.
    expected = run_file(float32_export.path, x)
    np.testing.assert_array_equal(out["float32"], expected)
    np.testing.assert_array_equal(out["float32_named"], expected)
    assert rel_err(out["float32"], sara_model(x)) <= 1e-4

    # int8 inputs/outputs: the runner quantises and dequantises with the
    # file's own scales, the same arithmetic done here by hand.
    from ai_edge_litert.interpreter import Interpreter

    sig = Interpreter(model_path=int8_io_export.path).get_signature_runner("serve")
    in_scale, in_zero = sig.get_input_details()["input_0"]["quantization"]
    out_scale, out_zero = sig.get_output_details()["output_0"]["quantization"]
    q = np.clip(np.round(x / in_scale) + in_zero, -128, 127).astype(np.int8)
    by_hand = (sig(input_0=q)["output_0"].astype(np.float32) - out_zero) * out_scale
    np.testing.assert_allclose(out["int8_io"], by_hand, rtol=0, atol=1e-6)
    assert rel_err(out["int8_io"], sara_model(x)) <= 0.3


def test_runner_rejects_bad_inputs(float32_export, int8_io_export):
    from tflite.runner import PolicyRunner

    runner = PolicyRunner(float32_export.path)
    assert runner.input_names == ["input_0"] and runner.input_shapes == [SHAPE]
    x = np.zeros(SHAPE, "float64")  # float64 is accepted and cast
    assert runner(x).shape == SHAPE and runner(x).dtype == np.float32
    with pytest.raises(ValueError, match=r"add the batch axis"):
        runner(np.zeros(SHAPE[1:], "float32"))
    with pytest.raises(ValueError, match=r"must have shape \(1, 64, 32\)"):
        runner(np.zeros((1, 63, 32), "float32"))
    with pytest.raises(ValueError, match=r"takes 1 input"):
        runner(x, x)
    with pytest.raises(ValueError, match=r"real-valued"):
        runner(np.full(SHAPE, "a"))
    with pytest.raises(ValueError, match=r"named \['input_0'\]"):
        runner(obs=x)
    with pytest.raises(ValueError, match=r"existing .tflite file"):
        PolicyRunner("/nonexistent/policy.tflite")
    with pytest.raises(ValueError, match=r"num_threads"):
        PolicyRunner(float32_export.path, num_threads=0)
    quantised = PolicyRunner(int8_io_export.path)
    assert quantised.input_dtypes == [np.dtype("int8")] and quantised.output_dtypes == [np.dtype("float32")]


# ------------------------------------------------------------- bad input


@keras.saving.register_keras_serializable(package="keras_sara_tests")
class MatrixInverse(keras.layers.Layer):
    """Inverts the first 8x8 block: TensorFlow's MatrixInverse has no LiteRT builtin."""

    def call(self, x):
        return keras.ops.linalg.inv(x[:, :8, :8] + 8.0 * keras.ops.eye(8))


def two_input_model():
    a, b = keras.Input((8,)), keras.Input((4,))
    return keras.Model([a, b], keras.layers.Dense(2)(keras.layers.Concatenate()([a, b])))


def test_bad_arguments_fail_before_writing(sara_model, tmp_path):
    from keras_sara.export import export_tflite

    out = tmp_path / "policy.tflite"
    cases = [
        (dict(quantize="int4"), r"`quantize` must be one of .* Received: quantize='int4'"),
        (dict(quantize="int8"), r"`representative_data` must be given for quantize='int8'"),
        (
            dict(quantize="int8", representative_data=np.zeros((4, TOKENS, WIDTH + 1))),
            r"examples of shape \(64, 32\) .* Received: representative_data of shape \(4, 64, 33\)",
        ),
        (
            dict(quantize="int8", representative_data=np.zeros((TOKENS, WIDTH))),  # rank: no example axis
            r"Received: representative_data of shape \(64, 32\)",
        ),
        (
            dict(quantize="int8", representative_data=[np.zeros((2,) + SHAPE[1:])] * 3),
            r"batches must have the exported shape \(1, 64, 32\)",
        ),
        (dict(probe=np.zeros((2, 5, WIDTH))), r"`probe` must hold examples of shape \(64, 32\)"),
        (dict(input_shapes=(1, 128, WIDTH)), r"must keep the axes that model .* fixes"),
        (dict(tolerance=-1.0), r"`tolerance` must be a positive float"),
        (dict(num_threads=0), r"`num_threads` must be an integer >= 1"),
        (dict(int8_io=True), r"`int8_io=True` needs quantize='int8'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            export_tflite(sara_model, out, **kwargs)
    with pytest.raises(ValueError, match=r"list of 2 arrays \(one per model input\)"):
        export_tflite(two_input_model(), out, quantize="int8", representative_data=np.zeros((4, 8)))
    with pytest.raises(ValueError, match=r"must each be a list of 2 arrays"):
        export_tflite(two_input_model(), out, quantize="int8", representative_data=[np.zeros((4, 8))])
    two = two_input_model()
    names = [t.name for t in two.inputs]
    with pytest.raises(ValueError, match=r"`representative_data` keys must be the model's input names "
                                         + re.escape(str(names)) + r"\. Received: keys \['a'\] \(missing"):
        export_tflite(two, out, quantize="int8", representative_data={"a": np.zeros((4, 8))})
    bad_batch = {names[0]: np.zeros((1, 8)), names[1]: np.zeros((1, 4)), "extra": np.zeros((1, 4))}
    with pytest.raises(ValueError, match=r"`probe` keys must be the model's input names .* \(batch 0\)\. "
                                         r"Received: .*\(unexpected \['extra'\]\)"):
        export_tflite(two, out, probe=[bad_batch])
    assert os.listdir(tmp_path) == []


def test_unwritable_path_fails_before_conversion(sara_model, tmp_path, monkeypatch):
    import keras_sara.export as export

    def no_conversion(*args, **kwargs):
        raise AssertionError("conversion started")

    monkeypatch.setattr(export, "_convert", no_conversion)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(ValueError, match=r"must be in an existing directory; create"):
        export.export_tflite(sara_model, tmp_path / "missing" / "policy.tflite")
    with pytest.raises(ValueError, match=r"must be in a directory, but .* is a file"):
        export.export_tflite(sara_model, a_file / "policy.tflite")
    with pytest.raises(ValueError, match=r"must name a file, not a directory"):
        export.export_tflite(sara_model, tmp_path)
    with pytest.raises(ValueError, match=r"must be in a writable directory"):
        export.export_tflite(sara_model, "/proc/policy.tflite")  # not writable, even for root
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match=r"must be in a writable directory"):
            export.export_tflite(sara_model, locked / "policy.tflite")
        assert os.listdir(locked) == []
    assert sorted(os.listdir(tmp_path)) == ["a_file"] + (["locked"] if os.geteuid() != 0 else [])


def test_model_needing_flex_fails_with_the_op_named(tmp_path):
    from keras_sara.export import export_tflite

    inputs = keras.Input((16, 16))
    model = keras.Model(inputs, MatrixInverse()(inputs))
    with pytest.raises(ValueError, match=r"MatrixInverse .*Flex op.* builtins_only=False"):
        export_tflite(model, tmp_path / "flex.tflite")
    assert os.listdir(tmp_path) == []
    # Flex allowed: the file can still not be verified with ai-edge-litert.
    with pytest.raises(ValueError, match=r"FlexMatrixInverse.*verify=False"):
        export_tflite(model, tmp_path / "flex.tflite", builtins_only=False)
    assert os.listdir(tmp_path) == []


def test_failed_verification_writes_nothing(sara_model, tmp_path):
    from keras_sara.export import export_tflite

    with pytest.raises(RuntimeError, match=r"relative error .* > tolerance 1\.0e-12 .*Nothing was written"):
        export_tflite(sara_model, tmp_path / "f16.tflite", quantize="float16", tolerance=1e-12)
    assert os.listdir(tmp_path) == []


# -------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_exports_a_saved_model(sara_model, calibration, tmp_path):
    model_path = tmp_path / "policy.keras"
    sara_model.save(model_path)
    np.savez(tmp_path / "calib.npz", calibration)
    proc = subprocess.run(
        [
            sys.executable, "-m", "tflite.export", str(model_path), str(tmp_path / "policy.tflite"),
            "--quantize", "int8", "--calibration", str(tmp_path / "calib.npz"),
            "--runs", "2", "--json", str(tmp_path / "report.json"), "--no-split-heads",
            "--no-fold-layernorm",
        ],
        env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LiteRT export report" in proc.stdout and "int8" in proc.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["quantize"] == "int8" and report["verified"] and report["flex_free"]
    assert "CONCATENATION" not in report["op_histogram"]  # --no-split-heads: the flat layout
    assert report["folded_layernorms"] == []  # --no-fold-layernorm
    assert os.path.getsize(tmp_path / "policy.tflite") == report["size_bytes"]

    bad = subprocess.run(
        [sys.executable, "-m", "tflite.export", str(model_path), str(tmp_path / "x.tflite"),
         "--quantize", "int8"],
        env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 2 and "representative_data" in bad.stderr
    assert not (tmp_path / "x.tflite").exists()


def test_int8_calibration_of_a_multi_input_model(tmp_path):
    """Calibration batches reach each input by name (the file orders inputs its own way)."""
    from keras_sara.export import export_tflite

    inputs = [keras.Input((4, width), name=f"in_{i}") for i, width in enumerate((8, 16, 8, 16, 8))]
    mixed = [keras.layers.Dense(16)(x) for x in inputs]
    out = keras.layers.Dense(3)(keras.layers.Multiply()(mixed[:2]) + keras.layers.Add()(mixed[2:]))
    model = keras.Model(inputs, out)
    rng = np.random.default_rng(0)
    calibration = [rng.normal(size=(16, 4, w)).astype("float32") for w in (8, 16, 8, 16, 8)]
    report = export_tflite(model, str(tmp_path / "multi.tflite"), quantize="int8",
                           representative_data=calibration)
    assert report.verified and report.relative_error < 0.1, report.relative_error
    # the same examples as a dict keyed by input name, in another key order, and the default probes (the
    # first calibration batches) as dict batches: the same file and the same error
    by_name = {f"in_{i}": calibration[i] for i in reversed(range(5))}
    probes = [{f"in_{i}": calibration[i][j : j + 1] for i in range(5)} for j in range(report.num_probes)]
    report_dict = export_tflite(model, str(tmp_path / "multi_dict.tflite"), quantize="int8",
                                representative_data=by_name, probe=probes)
    assert report_dict.verified and report_dict.num_probes == report.num_probes
    assert (tmp_path / "multi_dict.tflite").read_bytes() == (tmp_path / "multi.tflite").read_bytes()
    assert report_dict.relative_error == pytest.approx(report.relative_error)


def test_split_heads_layout_is_the_default_and_can_be_turned_off(sara_model, float32_export, tmp_path):
    """Per-head SARA layout by default (one projection per head, heads concatenated before
    the output projection); `split_heads=False` exports the flat layout Keras runs."""
    from keras_sara.export import export_tflite

    flat = export_tflite(sara_model, str(tmp_path / "flat.tflite"), split_heads=False, benchmark_runs=0)
    split = float32_export.op_histogram
    assert flat.verified and float32_export.verified
    # per layer: q, k, v per head + output + 2 MLP (split) vs q, k, v + folded output + 2 MLP (flat)
    assert split["FULLY_CONNECTED"] == LAYERS * (3 * HEADS + 3), split
    assert flat.op_histogram["FULLY_CONNECTED"] == LAYERS * 6, flat.op_histogram
    assert split["CONCATENATION"] == LAYERS and "CONCATENATION" not in flat.op_histogram
    x = np.random.default_rng(8).standard_normal(SHAPE).astype("float32")
    assert rel_err(run_file(float32_export.path, x), run_file(flat.path, x)) <= 1e-5
    with pytest.raises(ValueError, match="split_heads='no'"):
        export_tflite(sara_model, str(tmp_path / "bad.tflite"), split_heads="no")
    assert not (tmp_path / "bad.tflite").exists()


def test_int8_keeps_the_attention_core_in_float_by_default(sara_model, calibration, tmp_path):
    """Selective int8: projections FULLY_CONNECTED int8, BATCH_MATMUL & co. float (see DEFAULT_INT8_FLOAT_OPS)."""
    from keras_sara.export import DEFAULT_INT8_FLOAT_OPS, export_tflite

    selective = export_tflite(sara_model, str(tmp_path / "sel.tflite"), quantize="int8",
                              representative_data=calibration, benchmark_runs=0)
    full = export_tflite(sara_model, str(tmp_path / "full.tflite"), quantize="int8",
                         representative_data=calibration, int8_float_ops=(), benchmark_runs=0)
    assert selective.float_ops.get("BATCH_MATMUL", 0) > 0 and set(selective.float_ops) <= set(DEFAULT_INT8_FLOAT_OPS)
    assert "FULLY_CONNECTED" not in selective.float_ops  # the projections and MLPs are int8
    assert "BATCH_MATMUL" not in full.float_ops
    assert selective.verified and full.verified
    for bad, match in ((dict(int8_float_ops="DIV"), "int8_float_ops='DIV'"),
                       (dict(int8_float_ops=["DIV"], int8_io=True), "int8_io=True"),):
        with pytest.raises(ValueError, match=match):
            export_tflite(sara_model, str(tmp_path / "bad.tflite"), quantize="int8",
                          representative_data=calibration, **bad)
    with pytest.raises(ValueError, match="quantize='int8' only"):
        export_tflite(sara_model, str(tmp_path / "bad.tflite"), int8_float_ops=["DIV"])
    assert not (tmp_path / "bad.tflite").exists()


def test_layernorm_fold_is_the_default_and_can_be_turned_off(tmp_path):
    """Each LayerNorm's scale and shift go into the projections that read it
    (`keras_sara.folding`): fewer full-size MUL/ADD ops, same file outputs, and
    verification is still against the unfolded Keras model."""
    from keras_sara.export import export_tflite

    keras.utils.set_random_seed(4)
    model = encoder("sara")
    rng = np.random.default_rng(4)
    layernorms = [l for l in model.layers if isinstance(l, keras.layers.LayerNormalization)]
    for ln in layernorms:  # a trained model's LayerNorms are not 1 and 0
        ln.gamma.assign(1.0 + 0.5 * rng.standard_normal(WIDTH).astype("float32"))
        ln.beta.assign(0.5 * rng.standard_normal(WIDTH).astype("float32"))
    folded = export_tflite(model, str(tmp_path / "folded.tflite"), benchmark_runs=0)
    plain = export_tflite(model, str(tmp_path / "plain.tflite"), fold_layernorm=False, benchmark_runs=0)
    assert folded.folded_layernorms == sorted(l.name for l in layernorms) and plain.folded_layernorms == []
    assert "4 folded into their projections" in str(folded)
    assert folded.verified and plain.verified and folded.relative_error <= 1e-5
    for op in ("MUL", "ADD"):  # scale (x inv) and shift (+ beta) of each LayerNorm are gone
        assert folded.op_histogram[op] <= plain.op_histogram[op] - len(layernorms), op
    x = rng.standard_normal(SHAPE).astype("float32")
    assert rel_err(run_file(folded.path, x), run_file(plain.path, x)) <= 1e-5
    with pytest.raises(ValueError, match="fold_layernorm=1"):
        export_tflite(model, str(tmp_path / "bad.tflite"), fold_layernorm=1)
    assert not (tmp_path / "bad.tflite").exists()
