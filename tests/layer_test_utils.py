"""One shared layer test, applied to every public layer on every backend.

`run_layer_test` checks, for one layer configuration:
config round trip, symbolic call, eager call, `.keras` save and load with
equal outputs (and the same layer class), one `fit` step that changes the
trainable weights, and mixed precision (float16 compute, finite output close
to float32).
"""

import os
import tempfile

import keras
import numpy as np

from tests.backend_utils import rel_err, to_numpy


def _model(layer, input_shapes, call_kwargs, input_names):
    inputs = [keras.Input(shape=s[1:], batch_size=None, name=n) for s, n in zip(input_shapes, input_names)]
    out = layer(*inputs, **call_kwargs)
    return keras.Model(inputs, out)


def run_layer_test(
    layer_cls,
    init_kwargs,
    input_data,
    call_kwargs=None,
    expected_output_shape=None,
    run_fit=True,
    run_mixed_precision=True,
    mixed_precision_rtol=5e-2,
):
    """Run the shared checks on `layer_cls(**init_kwargs)` called on `input_data`.

    Args:
        layer_cls: the layer class.
        init_kwargs: constructor arguments.
        input_data: tuple of numpy arrays, the positional call inputs.
        call_kwargs: extra call arguments (e.g. `use_causal_mask=True`).
        expected_output_shape: checked on the eager and symbolic outputs.
    """
    call_kwargs = call_kwargs or {}
    input_shapes = [x.shape for x in input_data]
    names = [f"input_{i}" for i in range(len(input_data))]

    # 1. config round trip (before and after build)
    layer = layer_cls(**init_kwargs)
    config = layer.get_config()
    clone = layer_cls.from_config(config)
    assert clone.get_config() == config, "from_config(get_config()) changed the config"
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(revived) is layer_cls

    # 2. symbolic call
    model = _model(layer, input_shapes, call_kwargs, names)
    if expected_output_shape is not None:
        assert tuple(model.output.shape[1:]) == tuple(expected_output_shape[1:]), model.output.shape
    assert layer_cls.from_config(layer.get_config()).get_config() == layer.get_config()

    # 3. eager call
    eager = layer(*input_data, **call_kwargs)
    if expected_output_shape is not None:
        assert tuple(eager.shape) == tuple(expected_output_shape)
    assert np.all(np.isfinite(to_numpy(eager)))

    # 4. .keras save / load
    expected = to_numpy(model.predict(list(input_data), verbose=0))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
    loaded_layers = [l for l in loaded.layers if isinstance(l, layer_cls)]
    assert len(loaded_layers) == 1 and type(loaded_layers[0]) is layer_cls
    got = to_numpy(loaded.predict(list(input_data), verbose=0))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert [w.path for w in loaded_layers[0].weights] == [w.path for w in layer.weights]

    # 5. one fit step changes the trainable weights, loss finite
    if run_fit:
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss="mse")
        before = [to_numpy(w).copy() for w in layer.trainable_weights]
        target = np.random.default_rng(1).normal(size=expected.shape).astype("float32")
        history = model.fit(list(input_data), target, epochs=1, batch_size=len(input_data[0]), verbose=0)
        assert np.isfinite(history.history["loss"][0])
        after = [to_numpy(w) for w in layer.trainable_weights]
        changed = [not np.array_equal(a, b) for a, b in zip(before, after)]
        assert all(changed), f"weights that did not train: {[w.path for w, c in zip(layer.trainable_weights, changed) if not c]}"

    # 6. mixed precision: float16 compute, float32 variables
    if run_mixed_precision:
        ref = layer_cls(**init_kwargs)
        ref_out = ref(*input_data, **call_kwargs)
        mp = layer_cls(**{**init_kwargs, "dtype": "mixed_float16"})
        mp(*input_data, **call_kwargs)
        mp.set_weights(ref.get_weights())
        assert all(w.dtype == "float32" for w in mp.weights)
        out = mp(*input_data, **call_kwargs)
        assert keras.backend.standardize_dtype(out.dtype) == "float16"
        out = to_numpy(out).astype("float32")
        assert np.all(np.isfinite(out))
        assert rel_err(out, ref_out) < mixed_precision_rtol, rel_err(out, ref_out)
    return model
