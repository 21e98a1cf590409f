"""Streaming state: one-token steps of causal SARA models, their LiteRT export, the latency benchmark.

The step parts (layer step, step model, errors) run on every backend; the
LiteRT parts run on TensorFlow (other backends: one slow subprocess test).
Models are tiny (16 wide, 2 heads, 2 blocks) so the non-slow tests stay well
under a minute on 2 CPU cores.
"""

import csv
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from keras import ops

from keras_sara import streaming
from keras_sara.layers import SARAMultiHeadAttention
from keras_sara.ops import kernels as la
from tests.backend_utils import backend, rel_err, to_numpy

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, HEADS = 16, 2
PARITY = 1e-4  # issue 4: step-by-step parity with the full-sequence model

tensorflow_only = pytest.mark.skipif(
    backend() != "tensorflow",
    reason="LiteRT conversion runs on the TensorFlow backend (JAX: a slow subprocess test)",
)
# Eager PyTorch runs a Keras step in ~15 ms here (JAX/TF compile it): 1,000 steps are slow there.
slow_on_torch = pytest.mark.slow if backend() == "torch" else (lambda f: f)


def decoder(layers=2, feature_map="relu", width=WIDTH, tokens=None, batch_size=None, **attention_kwargs):
    """Pre-LayerNorm causal decoder: x + SARA(LN(x), causal); x + MLP(LN(x))."""
    inputs = keras.Input((tokens, width), batch_size=batch_size)
    x = inputs
    for _ in range(layers):
        h = keras.layers.LayerNormalization()(x)
        attn = SARAMultiHeadAttention(HEADS, width // HEADS, feature_map=feature_map, **attention_kwargs)
        x = x + attn(h, h, use_causal_mask=True)
        h = keras.layers.LayerNormalization()(x)
        x = x + keras.layers.Dense(width)(keras.layers.Dense(2 * width, activation="gelu")(h))
    return keras.Model(inputs, x)


def tokens(batch, length, width=WIDTH, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, length, width)).astype("float32")


def per_token_rel_err(got, want):
    """Largest ||got_t - want_t|| / ||want_t|| over tokens t (and batch rows)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)))


# --------------------------------------------------------------- layer step


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(feature_map="relu"),
        dict(feature_map="elu+1", value_dim=5),
        dict(feature_map="sara", use_gate=True),
        dict(feature_map="relu", output_shape=7, use_bias=False),
    ],
    ids=["relu", "elu+1-value_dim", "sara-gate", "output_shape"],
)
def test_layer_step_matches_causal_layer(kwargs):
    layer = SARAMultiHeadAttention(HEADS, 4, **kwargs)
    x = tokens(2, 19)
    full = to_numpy(layer(x, x, use_causal_mask=True))
    (psi_shape, gamma_shape) = streaming.state_shapes(layer)
    state = la.initial_state(2, *psi_shape)
    assert tuple(state[1].shape[1:]) == gamma_shape
    outs = []
    for t in range(x.shape[1]):
        x_t = x[:, t] if t % 2 else x[:, t : t + 1]  # both (B, E) and (B, 1, E)
        y_t, state = streaming.sara_attention_step(layer, ops.convert_to_tensor(x_t), state)
        y_t = to_numpy(y_t)
        assert y_t.ndim == x_t.ndim
        outs.append(y_t.reshape(2, 1, -1))
    assert rel_err(np.concatenate(outs, axis=1), full) <= 1e-5


# --------------------------------------------------------------- step model


@slow_on_torch
def test_step_model_matches_full_model_over_1000_steps():
    keras.utils.set_random_seed(1)
    model = decoder()
    x = tokens(1, 1000, seed=1)
    full = to_numpy(model(x))  # chunked causal schedule
    step = streaming.make_step_model(model)
    streamed, state = streaming.stream(step, x)
    err = per_token_rel_err(streamed, full)
    print(f"\nstep vs full over 1,000 steps: max per-token relative error {err:.2e}, "
          f"overall {rel_err(streamed, full):.2e}")
    assert err <= PARITY
    # Resuming from the returned state continues the same sequence.
    more = tokens(1, 5, seed=2)
    resumed, _ = streaming.stream(step, more, state)
    whole = to_numpy(model(np.concatenate([x, more], axis=1)))[:, -5:]
    assert per_token_rel_err(resumed, whole) <= PARITY


def test_step_model_signature_and_initial_state():
    model = decoder(layers=2, value_dim=3)
    step = streaming.make_step_model(model)
    assert streaming.is_step_model(step) and not streaming.is_step_model(model)
    names = [t.name for t in step.inputs]
    sara = [layer.name for layer in model.layers if isinstance(layer, SARAMultiHeadAttention)]
    assert names == ["x_t"] + [f"{n}_{s}" for n in sara for s in ("psi", "gamma")]
    # relu features: M = key_dim = 8; value_dim = 3
    assert [tuple(t.shape) for t in step.inputs] == [(None, 1, WIDTH)] + [(None, HEADS, 8, 3), (None, HEADS, 8)] * 2
    assert [tuple(t.shape) for t in step.outputs] == [(None, 1, WIDTH)] + [(None, HEADS, 8, 3), (None, HEADS, 8)] * 2
    state = streaming.initial_state(step, batch_size=3)
    assert [s.shape for s in state] == [(3, HEADS, 8, 3), (3, HEADS, 8)] * 2
    assert all(s.dtype == np.float32 and not s.any() for s in state)
    with pytest.raises(ValueError, match=r"`batch_size` must be an integer >= 1"):
        streaming.initial_state(step, 0)
    with pytest.raises(ValueError, match=r"must come from `make_step_model`"):
        streaming.initial_state(model)

    # The step shares the model's weights: a change to one shows in the other.
    x = tokens(3, 4)
    before, _ = streaming.stream(step, x)
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)][-1]
    dense.bias.assign(dense.bias + 1.0)
    after, _ = streaming.stream(step, x)
    np.testing.assert_allclose(after - before, 1.0, atol=1e-4)
    assert per_token_rel_err(after, to_numpy(model(x))) <= PARITY


def test_step_model_under_mixed_precision_keeps_a_float32_state():
    keras.config.set_dtype_policy("mixed_float16")  # conftest restores the policy
    keras.utils.set_random_seed(3)
    model = decoder()
    step = streaming.make_step_model(model)
    assert [t.dtype for t in step.inputs[1:]] == ["float32"] * 4
    assert [t.dtype for t in step.outputs[1:]] == ["float32"] * 4
    x = tokens(1, 32)
    streamed, state = streaming.stream(step, x)
    assert all(s.dtype == np.float32 for s in state)
    # float16 activations, summed in different orders: float16 rounding, not 1e-4
    assert per_token_rel_err(streamed, to_numpy(model(x))) <= 1e-2


class Scale(keras.layers.Layer):
    """A token-local custom layer that the streamer cannot know about."""

    def call(self, x):
        return 2.0 * x


def _variant_model(variant):
    inputs = keras.Input((None, WIDTH))
    x = keras.layers.Dense(WIDTH)(inputs)
    h = keras.layers.LayerNormalization(epsilon=1e-5)(x)
    if variant == "ops":  # residuals and activations written with keras.ops
        y = SARAMultiHeadAttention(HEADS, 8, feature_map="sara")(h, h, use_causal_mask=True)
        x = x + 0.5 * y
        x = ops.gelu(x) - ops.tanh(x)
    elif variant == "layers":  # merge layers, dropout, EinsumDense, RMSNorm, concat on features
        y = SARAMultiHeadAttention(HEADS, 8, dropout=0.1, use_gate=True)(h, h, use_causal_mask=True)
        x = keras.layers.Add()([x, keras.layers.Dropout(0.3)(y)])
        x = keras.layers.RMSNormalization()(x)
        z = keras.layers.EinsumDense("abc,cd->abd", output_shape=(None, 4))(x)
        x = keras.layers.Concatenate()([x, z, keras.layers.Activation("relu")(z)])
        x = keras.layers.Dense(WIDTH)(x)
    elif variant == "per_token_layers":
        y = SARAMultiHeadAttention(HEADS, 8, feature_map="elu+1")(h, h, use_causal_mask=True)
        x = Scale()(x + y)
    h = keras.layers.LayerNormalization()(x)
    x = x + SARAMultiHeadAttention(1, 6, value_dim=4)(h, h, use_causal_mask=True)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


@pytest.mark.parametrize("variant", ["ops", "layers", "per_token_layers"])
def test_step_model_matches_full_model_for_layer_mixes(variant):
    keras.utils.set_random_seed(2)
    model = _variant_model(variant)
    kwargs = {"per_token_layers": [Scale]} if variant == "per_token_layers" else {}
    step = streaming.make_step_model(model, **kwargs)
    x = tokens(2, 24, seed=3)
    streamed, _ = streaming.stream(step, x)
    assert streamed.shape == (2, 24, 3)
    assert per_token_rel_err(streamed, to_numpy(model(x))) <= PARITY


# -------------------------------------------------------------------- errors


def _block(attention, call_kwargs=None, before=None, length=None):
    inputs = keras.Input((length, WIDTH))
    x = inputs if before is None else before(inputs)
    h = keras.layers.LayerNormalization()(x)
    y = attention(h, h, **({"use_causal_mask": True} if call_kwargs is None else call_kwargs))
    if isinstance(y, (tuple, list)):  # return_attention_scores=True
        y = y[0]
    return keras.Model(inputs, x + y)


def _favor():
    return _block(SARAMultiHeadAttention(HEADS, 8, feature_map="favor+"))


def _shared_layer():
    inputs = keras.Input((None, WIDTH))
    attn = SARAMultiHeadAttention(HEADS, 8)
    x = inputs + attn(inputs, inputs, use_causal_mask=True)
    return keras.Model(inputs, x + attn(x, x, use_causal_mask=True))


def _cross():
    inputs = keras.Input((None, WIDTH))
    h = keras.layers.LayerNormalization()(inputs)
    return keras.Model(inputs, SARAMultiHeadAttention(HEADS, 8)(h, inputs, use_causal_mask=True))


def _pooled_output():
    inputs = keras.Input((None, WIDTH))
    y = SARAMultiHeadAttention(HEADS, 8)(inputs, inputs, use_causal_mask=True)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling1D()(y))


def _position_constant():
    inputs = keras.Input((12, WIDTH))
    x = inputs + np.ones((12, WIDTH), "float32")  # a per-position constant
    return keras.Model(inputs, x + SARAMultiHeadAttention(HEADS, 8)(x, x, use_causal_mask=True))


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.attn = SARAMultiHeadAttention(HEADS, 8)

    def call(self, x):
        return self.attn(x, x, use_causal_mask=True)


def _subclassed():
    model = Subclassed()
    model(tokens(1, 3))
    return model


UNSUPPORTED = {
    "bidirectional": (lambda: _block(SARAMultiHeadAttention(HEADS, 8), call_kwargs={}),
                      r"without use_causal_mask=True"),
    "softmax_mha": (lambda: _block(keras.layers.MultiHeadAttention(HEADS, 8)),
                    r"softmax attention .*keras_sara.convert"),
    "favor+": (_favor, r"FavorPlus, which cannot be streamed.*maximum over the whole sequence"),
    "hedgehog": (lambda: _block(SARAMultiHeadAttention(HEADS, 8, feature_map="hedgehog")),
                 r"Hedgehog, which cannot be streamed.*token_local = True"),
    "blend": (lambda: _block(SARAMultiHeadAttention(HEADS, 8, blend=0.5)), r"blend < 1.*finalize"),
    "scores": (lambda: _block(SARAMultiHeadAttention(HEADS, 8),
                              call_kwargs={"use_causal_mask": True, "return_attention_scores": True}),
               r"return_attention_scores=True"),
    "cross_attention": (_cross, r"not the same tensor \(cross-attention"),
    "shared_layer": (_shared_layer, r"called more than once"),
    "conv": (lambda: _block(SARAMultiHeadAttention(HEADS, 8),
                            before=keras.layers.Conv1D(WIDTH, 3, padding="causal")),
             r"'conv1d' \(Conv1D\) cannot be streamed: it is not known to act on each token"),
    "layer_norm_over_tokens": (lambda: _block(SARAMultiHeadAttention(HEADS, 8), length=12,
                                              before=keras.layers.LayerNormalization(axis=1)),
                               r"normalises over the batch or token axis"),
    "position_constant": (_position_constant, r"does not keep one token per step"),
    "pooled_output": (_pooled_output, r"one output of shape \(batch, tokens, features\)"),
    "no_attention": (lambda: keras.Sequential([keras.Input((None, WIDTH)), keras.layers.Dense(4)]),
                     r"at least one causal SARAMultiHeadAttention"),
    "subclassed": (_subclassed, r"Functional or Sequential.*subclassed"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_models_fail_with_a_clear_error(case):
    build, message = UNSUPPORTED[case]
    with pytest.raises(ValueError, match=message):
        streaming.make_step_model(build())


def test_per_token_layers_must_be_layer_classes():
    with pytest.raises(ValueError, match=r"`per_token_layers` must hold keras.layers.Layer subclasses"):
        streaming.make_step_model(decoder(layers=1), per_token_layers=[lambda x: x])


def test_custom_feature_map_can_declare_itself_token_local():
    from keras_sara import feature_maps

    class Softplus(feature_maps.FeatureMap):
        token_local = True

        def call(self, inputs, role="query"):
            return ops.softplus(inputs)

    model = _block(SARAMultiHeadAttention(HEADS, 8, feature_map=Softplus()))
    x = tokens(1, 9)
    streamed, _ = streaming.stream(streaming.make_step_model(model), x)
    assert per_token_rel_err(streamed, to_numpy(model(x))) <= PARITY


# ------------------------------------------------------------------- LiteRT


def file_ops(path):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(
        model_path=str(path),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    return [op["op_name"] for op in interpreter._get_ops_details()]


def run_litert_stream(path, x):
    """Feed (B, T, E) through a step file with the runtime-only runner; (B, T, E') outputs."""
    from tflite.runner import PolicyRunner

    runner = PolicyRunner(path, num_threads=1)
    state = [np.zeros(s, np.float32) for s in runner.input_shapes[1:]]
    outs = []
    for t in range(x.shape[1]):
        y_t, *state = runner(x[:, t : t + 1], *state)
        outs.append(y_t)
    return np.concatenate(outs, axis=1)


@pytest.fixture(scope="module")
def litert_decoder():
    keras.utils.set_random_seed(4)
    return decoder()


@pytest.fixture(scope="module")
def step_export(litert_decoder, tmp_path_factory):
    if backend() != "tensorflow":
        pytest.skip("LiteRT conversion runs on the TensorFlow backend")
    path = tmp_path_factory.mktemp("stream") / "step.tflite"
    return streaming.export_streaming_tflite(litert_decoder, path, benchmark_runs=0)


@tensorflow_only
def test_streaming_export_is_builtins_only_and_matches_over_200_steps(litert_decoder, step_export):
    report = step_export
    assert report.verified and report.relative_error <= 1e-4 and report.num_probes == 4
    sara_shapes = [(1, HEADS, 8, 8), (1, HEADS, 8)] * 2
    assert report.input_shapes == [(1, 1, WIDTH)] + sara_shapes
    assert report.output_shapes == [(1, 1, WIDTH)] + sara_shapes
    ops_in_file = file_ops(report.path)
    assert report.flex_free and not [o for o in ops_in_file if o.startswith("Flex") or o == "CUSTOM"]
    assert "SOFTMAX" not in ops_in_file and "CUMSUM" not in ops_in_file  # the recurrent form

    x = tokens(1, 200, seed=5)
    litert = run_litert_stream(report.path, x)
    keras_step, _ = streaming.stream(streaming.make_step_model(litert_decoder), x)
    full = to_numpy(litert_decoder(x))
    err_step, err_full = per_token_rel_err(litert, keras_step), per_token_rel_err(litert, full)
    print(f"\nLiteRT step over 200 steps: vs Keras step {err_step:.2e}, vs full model {err_full:.2e}")
    assert err_step <= PARITY and err_full <= PARITY


@tensorflow_only
@pytest.mark.slow
def test_streaming_export_matches_full_model_over_1000_steps(litert_decoder, step_export):
    x = tokens(1, 1000, seed=6)
    err = per_token_rel_err(run_litert_stream(step_export.path, x), to_numpy(litert_decoder(x)))
    print(f"\nLiteRT step vs full model over 1,000 steps: max per-token relative error {err:.2e}")
    assert err <= PARITY


@tensorflow_only
def test_streaming_export_bad_arguments_write_nothing(litert_decoder, tmp_path):
    path = tmp_path / "step.tflite"
    cases = [
        (dict(input_shapes=(1, 1, WIDTH)), r"`input_shapes` is set by export_streaming_tflite"),
        (dict(quantize="int4"), r"`quantize` must be one of"),
        (dict(quantize="int8"), r"`quantize` must be one of \(None, 'float16', 'dynamic'\) .*integer DIV"),
        (dict(representative_data=np.zeros((4, 40, WIDTH), "float32")),
         r"`representative_data` is set by export_streaming_tflite"),
        (dict(probe_tokens=np.zeros((4, 40, WIDTH + 1), "float32")),
         r"`probe_tokens` must be token sequences of shape \(N, T, 16\)"),
        (dict(probe_tokens=np.zeros((4, 31, WIDTH), "float32")), r"T > max\(probe_steps\) \(31\)"),
        (dict(batch_size=0), r"`batch_size` must be an integer >= 1"),
        (dict(probe_steps=[]), r"`probe_steps` must be a non-empty sequence"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            streaming.export_streaming_tflite(litert_decoder, path, **kwargs)
    with pytest.raises(ValueError, match=r"must be in an existing directory"):
        streaming.export_streaming_tflite(litert_decoder, tmp_path / "missing" / "step.tflite")
    with pytest.raises(ValueError, match=r"without use_causal_mask=True"):
        streaming.export_streaming_tflite(
            _block(SARAMultiHeadAttention(HEADS, 8), call_kwargs={}), path
        )
    assert os.listdir(tmp_path) == []


@tensorflow_only
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["float16", "dynamic"])
def test_quantised_streaming_exports_verify(mode, litert_decoder, tmp_path):
    report = streaming.export_streaming_tflite(
        litert_decoder, tmp_path / f"{mode}.tflite", quantize=mode, benchmark_runs=0, batch_size=2,
        probe_tokens=tokens(4, 40, seed=7),
    )
    assert report.verified and report.flex_free and report.num_probes == 8
    assert report.input_shapes[0] == (2, 1, WIDTH)
    x = tokens(2, 100, seed=8)
    full = to_numpy(litert_decoder(x))
    err = rel_err(run_litert_stream(report.path, x), full)
    print(f"\n{mode} step over 100 steps vs full model: relative error {err:.2e}")
    assert err <= {"float16": 1e-2, "dynamic": 0.2}[mode]


def subprocess_env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **extra)
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


@tensorflow_only
@pytest.mark.slow
def test_streaming_export_of_a_jax_model(tmp_path):
    code = textwrap.dedent(
        """
        import json, sys
        import keras, numpy as np
        from keras_sara import streaming
        from tests.test_streaming import decoder, tokens
        keras.utils.set_random_seed(5)
        model = decoder()
        report = streaming.export_streaming_tflite(model, sys.argv[1], benchmark_runs=0)
        x = tokens(1, 50, seed=9)
        np.save(sys.argv[2], keras.ops.convert_to_numpy(model(x)))
        print(json.dumps(report.to_dict()))
        """
    )
    path, ref = tmp_path / "jax_step.tflite", tmp_path / "ref.npy"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path), str(ref)], env=subprocess_env(KERAS_BACKEND="jax"),
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["source_backend"] == "jax" and report["verified"] and report["flex_free"]
    assert report["relative_error"] <= 1e-4
    assert sorted(os.listdir(tmp_path)) == ["jax_step.tflite", "ref.npy"]  # no temporary left
    assert per_token_rel_err(run_litert_stream(path, tokens(1, 50, seed=9)), np.load(ref)) <= PARITY


# ---------------------------------------------------------------- benchmark


@tensorflow_only
@pytest.mark.slow
def test_latency_benchmark_quick_writes_csv_json_and_png(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tflite.benchmark", "--quick", "--tokens", "256", "--precisions", "float32",
         "int8", "--out-dir", str(tmp_path)],
        env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    from tflite import benchmark

    with open(tmp_path / "latency.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == benchmark.CSV_COLUMNS
    encoder = [r for r in rows if r["benchmark"] == "encoder"]
    assert {int(r["tokens"]) for r in encoder} == {256}
    assert {r["precision"] for r in encoder} == {"float32", "int8"}
    assert {r["attention"] for r in encoder} == {"softmax", "sara"}
    assert {int(r["threads"]) for r in rows} == {1, 2}
    ok = [r for r in encoder if r["status"] == "ok"]
    assert ok and all(float(r["p50_ms"]) > 0 for r in ok)
    stream = [r for r in rows if r["benchmark"] == "stream"]
    assert {int(r["history"]) for r in stream} == {10, 100, 1000, 10000}
    assert all(r["status"] == "ok" and float(r["p99_ms"]) >= float(r["p50_ms"]) > 0 for r in stream)
    with open(tmp_path / "latency.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "latency.json") as f:
        payload = json.load(f)
    assert payload["derived"]["targets"]["stream_p50_ratio_history_10000_over_10"]["value"] > 0
    assert "| tokens |" in proc.stdout and "Streaming step" in proc.stdout
    assert sorted(os.listdir(tmp_path)) == ["latency.csv", "latency.json", "latency.png"]


@tensorflow_only
def test_latency_benchmark_derive_without_streaming_histories():
    # `--histories` with no value skips the streaming benchmark; deriving the figures must not fail on it
    from tflite import benchmark

    rows = [{"benchmark": "encoder", "attention": "sara", "precision": p, "tokens": 64, "threads": 1,
             "p50_ms": ms, "status": "ok"} for p, ms in (("float32", 3.0), ("int8", 2.0))]
    cfg = {"threads": [1], "tokens": [64], "precisions": ["float32", "int8"], "histories": []}
    derived = benchmark.derive(rows, cfg)
    assert derived["stream_p50_ratio_longest_over_shortest"] == {}
    assert derived["sara_int8_speedup_over_float32"] == {"64": 1.5}
    assert derived["targets"]["stream_p50_ratio_history_10000_over_10"]["met"] is None
