"""keras_sara.conversion: clone_function, convert, save/load, third-party models (every backend)."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_sara
from keras_sara.conversion import clone_function, convert, make_clone_function
from keras_sara.layers import SARAMultiHeadAttention
from tests.backend_utils import backend, to_numpy

# Keras warns on every load of a custom layer that builds its sublayers lazily
pytestmark = pytest.mark.filterwarnings("ignore:`build\\(\\)` was called on layer:UserWarning")
T, E, HEADS, KEY_DIM = 6, 16, 2, 8
MHA = keras.layers.MultiHeadAttention
PROJECTIONS = ("_query_dense", "_key_dense", "_value_dense", "_output_dense")


def _x(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


# ------------------------------------------------------------ user models


@keras.saving.register_keras_serializable(package="sara_tests")
class Block(keras.layers.Layer):
    """A transformer block holding its attention as an attribute (RT-1 / keras-hub)."""

    def __init__(self, units=E, heads=HEADS, **kwargs):
        super().__init__(**kwargs)
        self.units, self.heads = units, heads
        self.mha = MHA(num_heads=heads, key_dim=KEY_DIM, name="mha")
        self.norm = keras.layers.LayerNormalization()
        self.ffn = keras.layers.Dense(units)

    def call(self, x):
        x = self.norm(x + self.mha(x, x))
        return x + self.ffn(x)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "heads": self.heads}


@keras.saving.register_keras_serializable(package="sara_tests")
class LazyBlock(keras.layers.Layer):
    """Creates its attention in `build`, as keras-hub's TransformerEncoder does."""

    def __init__(self, units=E, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, shape):
        self.attention = MHA(num_heads=HEADS, key_dim=KEY_DIM, name="mha")
        self.attention.build(shape, shape)
        self.ffn = keras.layers.Dense(self.units)
        self.ffn.build(shape)

    def call(self, x):
        return x + self.ffn(self.attention(x, x))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="sara_tests")
class Encoder(keras.layers.Layer):
    """Two levels of custom layers, blocks in a list; no get_config (Keras' auto config)."""

    def __init__(self, depth=2, **kwargs):
        super().__init__(**kwargs)
        self.blocks = [Block(name=f"block_{i}") for i in range(depth)]

    def call(self, x):
        for block in self.blocks:
            x = block(x)
        return x


@keras.saving.register_keras_serializable(package="sara_tests")
class TinyTransformer(keras.Model):
    """A subclassed model."""

    def __init__(self, depth=2, **kwargs):
        super().__init__(**kwargs)
        self.depth = depth
        self.blocks = [Block(name=f"block_{i}") for i in range(depth)]
        self.head = keras.layers.Dense(3)

    def call(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def get_config(self):
        return {**super().get_config(), "depth": self.depth}


@keras.saving.register_keras_serializable(package="sara_tests")
class TemperatureAttention(MHA):
    """A user MHA subclass with its own constructor argument, variable and attention
    (like keras-io's vit_small_ds.py locality self-attention)."""

    def __init__(self, temperature=2.0, **kwargs):
        super().__init__(**kwargs)
        self.temperature = temperature
        self.tau = keras.Variable(temperature, name="tau", trainable=True)

    def _compute_attention(self, query, key, value, attention_mask=None, training=None,
                           return_attention_scores=False, use_causal_mask=False):
        query = keras.ops.multiply(query, 1.0 / self.tau)
        scores = keras.ops.einsum(self._dot_product_equation, key, query)
        scores = self._masked_softmax(scores, attention_mask)
        out = keras.ops.einsum(self._combine_equation, self._dropout_layer(scores, training=training), value)
        return out, scores

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


def functional():
    x = keras.Input((T, E), name="tokens")
    y = MHA(HEADS, KEY_DIM, name="mha")(x, x)
    return keras.Model(x, keras.layers.Dense(3, name="head")(y), name="functional")


def sequential():
    return keras.Sequential(
        [keras.Input((T, E)), LazyBlock(name="block"), keras.layers.Dense(3, name="head")], name="sequential"
    )


def nested():
    x = keras.Input((T, E))
    inner = keras.Model(x, MHA(HEADS, KEY_DIM, name="mha")(x, x), name="encoder")
    z = keras.Input((T, E))
    y = inner(keras.layers.Dense(E, name="embed")(z))
    return keras.Model(z, keras.layers.Dense(3, name="head")(y), name="nested")


def custom():
    x = keras.Input((T, E))
    y = Encoder(name="encoder")(x)
    return keras.Model(x, keras.layers.Dense(3, name="head")(y), name="custom")


def subclassed():
    model = TinyTransformer(name="tiny")
    model(_x(2, T, E))
    return model


def mha_subclass():
    x = keras.Input((T, E))
    y = TemperatureAttention(temperature=3.0, num_heads=HEADS, key_dim=KEY_DIM, name="lsa")(x, x)
    return keras.Model(x, keras.layers.Dense(3)(y), name="lsa_model")


CASES = {"functional": functional, "sequential": sequential, "nested": nested, "custom": custom,
         "subclassed": subclassed}
EXPECTED_PATHS = {
    "functional": ["mha"],
    "sequential": ["block/mha"],
    "nested": ["encoder/mha"],
    "custom": ["encoder/block_0/mha", "encoder/block_1/mha"],
    "subclassed": ["block_0/mha", "block_1/mha"],
}


def vit():
    import keras_hub  # make test installs it: missing must fail, not skip
    return keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )


# ---------------------------------------------------------------- helpers


def _attention(model):
    return [l for l in model._flatten_layers(include_self=False) if isinstance(l, MHA)]


def _sara(model):
    return [l for l in _attention(model) if isinstance(l, SARAMultiHeadAttention)]


def _predict(model, x):
    return to_numpy(model(x, training=False))


def _assert_same_projections(teacher, student):
    pairs = list(zip(_attention(teacher), _attention(student)))
    assert pairs
    for mha, sara in pairs:
        assert isinstance(sara, SARAMultiHeadAttention)
        for attr in PROJECTIONS:
            for a, b in zip(getattr(mha, attr).get_weights(), getattr(sara, attr).get_weights()):
                np.testing.assert_array_equal(a, b)


def _assert_torch_params_current(model):
    """torch: the module's parameters are exactly the model's variables (none left from the MHA)."""
    if backend() == "torch":
        values = {id(w.value) for w in model.weights}
        params = list(model.parameters())
        assert params and all(id(p) in values for p in params)


def _save_load(model, tmp_path, name="model"):
    path = str(tmp_path / f"{name}.keras")
    model.save(path)
    return keras.models.load_model(path)


def _close(a, b, tol=1e-5):
    assert np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b))), np.max(np.abs(a - b))


def _fit_one_step(model, x, y):
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    before = [w.copy() for w in model.get_weights()]
    history = model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


# ---------------------------------------------------------- clone_function


def test_clone_function_with_one_line_weight_copy():
    teacher = functional()
    x = _x(2, T, E)
    student = keras.models.clone_model(teacher, clone_function=keras_sara.conversion.clone_function)
    assert [type(l).__name__ for l in student.layers] == ["InputLayer", "SARAMultiHeadAttention", "Dense"]
    student.set_weights(teacher.get_weights())  # the documented one line
    _assert_same_projections(teacher, student)
    # the SARA layer is what runs: its output is the linear attention of the teacher's weights
    sara = SARAMultiHeadAttention(HEADS, KEY_DIM)
    sara(x, x)
    sara.set_weights(teacher.get_layer("mha").get_weights())
    want = to_numpy(teacher.get_layer("head")(sara(x, x)))
    np.testing.assert_allclose(_predict(student, x), want, atol=1e-5)


def test_clone_function_reaches_custom_layers_and_nested_models():
    teacher = custom()
    student = keras.models.clone_model(teacher, clone_function=clone_function, recursive=True)
    student.set_weights(teacher.get_weights())
    assert len(_sara(student)) == 2 and len(_attention(student)) == 2
    _assert_same_projections(teacher, student)
    nested_teacher = nested()
    nested_student = keras.models.clone_model(
        nested_teacher, clone_function=make_clone_function("elu+1", eps=1e-4), recursive=True
    )
    nested_student.set_weights(nested_teacher.get_weights())
    (sara,) = _sara(nested_student)
    assert sara.eps == 1e-4 and type(sara.feature_map).__name__ == "EluPlusOne"


def test_make_clone_function_rejects_bad_arguments():
    with pytest.raises(ValueError, match="feature_map"):
        make_clone_function("softmax")
    with pytest.raises(ValueError, match="sara_kwargs"):
        make_clone_function(num_heads=3)


# ---------------------------------------------------------------- convert


@pytest.mark.parametrize("case", sorted(CASES))
def test_convert_blend_zero_is_exact_and_teacher_untouched(case):
    teacher = CASES[case]()
    x = _x(2, T, E, seed=1)
    want = _predict(teacher, x)
    weights = [w.copy() for w in teacher.get_weights()]
    student, report = convert(teacher, blend=0.0)
    assert [c.path for c in report.converted] == EXPECTED_PATHS[case]
    assert all(c.after == "SARAMultiHeadAttention" for c in report.converted)
    assert len(_sara(student)) == len(EXPECTED_PATHS[case]) and not _sara(teacher)
    _assert_same_projections(teacher, student)
    _assert_torch_params_current(student)
    _close(_predict(student, x), want)
    assert report.max_abs_error <= 1e-5
    # the teacher is untouched
    np.testing.assert_array_equal(_predict(teacher, x), want)
    for a, b in zip(weights, teacher.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_convert_save_load_keeps_sara(case, tmp_path):
    teacher = CASES[case]()
    x = _x(2, T, E, seed=2)
    student, report = convert(teacher)
    out = _predict(student, x)
    assert report.relative_error > 1e-3  # linear attention really runs
    np.testing.assert_allclose(out, _predict(student, x))
    loaded = _save_load(student, tmp_path)
    assert len(_sara(loaded)) == len(EXPECTED_PATHS[case]) == len(_attention(loaded))
    _assert_torch_params_current(loaded)
    _close(_predict(loaded, x), out)
    # a second save/load of the loaded model stays converted too
    again = _save_load(loaded, tmp_path, "again")
    assert len(_sara(again)) == len(EXPECTED_PATHS[case])
    _close(_predict(again, x), out)


@pytest.mark.parametrize("case", ["custom", "subclassed"])
def test_convert_keeps_variable_paths_and_trains(case):
    teacher = CASES[case]()
    student, _ = convert(teacher, feature_map="hedgehog", verify=False)
    # a rebuilt subclassed model is built outside its own name scope (as after load_model)
    teacher_paths = [w.path.removeprefix("tiny/") for w in teacher.weights if "/mha/" in w.path]
    student_paths = [w.path for w in student.weights if "/mha/" in w.path]
    assert [p for p in student_paths if "/hedgehog/" not in p] == teacher_paths
    assert len(student.weights) > len(teacher.weights)
    if case == "subclassed":  # one fit step is slow to compile on JAX: train one case
        x = _x(4, T, E)
        _fit_one_step(student, x, np.zeros((4, T, 3), "float32"))


def test_layers_selects_by_path_name_and_predicate():
    teacher = custom()
    student, report = convert(teacher, layers=["encoder/block_1/mha"], verify=False)
    assert [c.path for c in report.converted] == ["encoder/block_1/mha"]
    assert {s.path: s.reason for s in report.skipped} == {"encoder/block_0/mha": "not selected by `layers`"}
    assert type(student.get_layer("encoder").blocks[1].mha) is SARAMultiHeadAttention
    assert type(student.get_layer("encoder").blocks[0].mha) is MHA
    _, report = convert(teacher, layers=["mha"], verify=False)  # a bare name matches every layer of that name
    assert report.num_converted == 2 and report.max_abs_error is None
    _, report = convert(teacher, layers=lambda layer, path: path.endswith("0/mha"), verify=False)
    assert [c.path for c in report.converted] == ["encoder/block_0/mha"]


def test_layers_errors_list_existing_attention():
    teacher = custom()
    with pytest.raises(ValueError, match=r"block_7/mha.*'encoder/block_0/mha', 'encoder/block_1/mha'"):
        convert(teacher, layers=["block_7/mha"])
    with pytest.raises(ValueError, match=r"layers=\['mha'\]"):
        convert(teacher, layers="mha")


def test_report_table_dict_params_and_probe():
    teacher = custom()
    student, report = convert(teacher, feature_map="hedgehog", probe=_x(3, T, E))
    text = str(report)
    for piece in ("2 attention layer(s) converted", "path", "before", "after", "feature map",
                  "encoder/block_1/mha", "MultiHeadAttention", "SARAMultiHeadAttention", "hedgehog",
                  "parameters:", "relative error"):
        assert piece in text, text
    data = report.to_dict()
    json.dumps(data)
    assert data["probe_shapes"] == [[3, T, E]]
    assert data["params_after"] > data["params_before"] == teacher.count_params()
    assert data["params_after"] == student.count_params()
    _, plain = convert(teacher)
    assert plain.params_after == plain.params_before


def test_attention_that_cannot_be_swapped_is_reported():
    class GraphBackbone(keras.Model):  # a Functional subclass that builds its graph in __init__
        def __init__(self, **kwargs):
            x = keras.Input((T, E))
            super().__init__(x, MHA(HEADS, KEY_DIM, name="mha")(x, x), **kwargs)

        def get_config(self):
            return {"name": self.name}

    with pytest.warns(UserWarning, match="no attention layer .* was converted"):
        _, report = convert(GraphBackbone(name="backbone"))
    (skipped,) = report.skipped
    assert skipped.path == "mha" and "GraphBackbone.__init__" in skipped.reason
    assert "keras.Model(model.inputs, model.outputs)" in str(report)


def test_bad_input():
    with pytest.raises(ValueError, match=r"`model` must be a keras.Model.*Received: model of type .*Dense"):
        convert(keras.layers.Dense(3))
    with pytest.raises(ValueError, match=r"model of type builtins.dict"):
        convert({"not": "a model"})
    with pytest.raises(ValueError, match=r"`model` must be built"):
        convert(TinyTransformer())
    x = keras.Input((4,))
    plain = keras.Model(x, keras.layers.Dense(2)(x))
    with pytest.warns(UserWarning, match="has no attention layer"):
        copy, report = convert(plain)
    assert report.num_converted == 0 and "nothing was converted" in str(report)
    assert copy is not plain and report.max_abs_error == 0.0
    with pytest.raises(ValueError, match="verify"):
        convert(plain, verify="yes")


def test_mha_subclass_converts_trains_and_reloads(tmp_path):
    teacher = mha_subclass()
    student, report = convert(teacher)
    (entry,) = report.converted
    assert entry.before == "TemperatureAttention" and "tau" in entry.note
    _assert_same_projections(teacher, student)
    x = _x(4, T, E, seed=3)
    _fit_one_step(student, x, np.zeros((4, T, 3), "float32"))
    loaded = _save_load(student, tmp_path)
    assert type(loaded.get_layer("lsa")) is SARAMultiHeadAttention
    _close(_predict(loaded, x), _predict(student, x))


VIT_PATHS = ["vit_encoder/transformer_block_1/mha", "vit_encoder/transformer_block_2/mha"]


@pytest.fixture(scope="module")
def vit_student(tmp_path_factory):
    """keras-hub ViTBackbone teacher; its SARA student after one fit step, saved."""
    keras.utils.set_random_seed(0)
    teacher = vit()
    student, report = convert(teacher)
    assert [c.path for c in report.converted] == VIT_PATHS
    x = _x(2, 32, 32, 3)
    _fit_one_step(student, x, np.zeros((2, 17, 32), "float32"))
    folder = tmp_path_factory.mktemp("vit")
    student.save(str(folder / "vit.keras"))
    out = _predict(student, x)
    np.savez(folder / "vit.npz", x=x, y=out)
    return teacher, student, folder


@pytest.mark.slow
def test_keras_hub_vit_converts_by_path(vit_student):
    teacher, student, _ = vit_student
    x = _x(2, 32, 32, 3, seed=1)
    partial, report = convert(teacher, layers=["transformer_block_2/mha"], blend=0.0)
    assert [c.path for c in report.converted] == VIT_PATHS[1:]
    assert [s.path for s in report.skipped] == VIT_PATHS[:1]
    assert len(_sara(partial)) == 1
    _close(_predict(partial, x), _predict(teacher, x))
    # the fully converted student: same variables, same paths, projections copied before fit
    assert [w.path for w in student.weights] == [w.path for w in teacher.weights]
    assert isinstance(student, type(teacher)) and len(_sara(student)) == 2


@pytest.mark.slow
def test_keras_hub_vit_reloads_as_sara(vit_student):
    teacher, _, folder = vit_student
    loaded = keras.models.load_model(str(folder / "vit.keras"))
    assert isinstance(loaded, type(teacher)) and len(_sara(loaded)) == 2 == len(_attention(loaded))
    _assert_torch_params_current(loaded)
    data = np.load(folder / "vit.npz")
    _close(_predict(loaded, data["x"]), data["y"])


_FRESH = textwrap.dedent(
    """
    import sys
    import numpy as np, keras
    import keras_sara  # the only import a user needs before load_model
    from keras_sara.layers import SARAMultiHeadAttention
    for name, path in zip(sys.argv[1::2], sys.argv[2::2]):
        model = keras.models.load_model(f"{path}/{name}.keras")
        data = np.load(f"{path}/{name}.npz")
        n = sum(isinstance(l, SARAMultiHeadAttention) for l in model._flatten_layers())
        out = keras.ops.convert_to_numpy(model(data["x"], training=False))
        print(name, type(model).__name__, n, float(np.max(np.abs(out - data["y"]))))
    """
)


@pytest.mark.slow
def test_reload_in_a_fresh_process_on_another_backend_with_only_import_keras_sara(vit_student, tmp_path):
    import keras_hub  # make test installs it: missing must fail, not skip
    # attention created in the holder's build (keras-hub TransformerEncoder), in a Functional model
    x = keras.Input((T, E))
    y = keras_hub.layers.TransformerEncoder(intermediate_dim=32, num_heads=2, name="encoder")(x)
    student, report = convert(keras.Model(x, y), verify=False)
    assert [c.path for c in report.converted] == ["encoder/self_attention_layer"]
    student.save(str(tmp_path / "hub_nested.keras"))
    data = _x(2, T, E)
    np.savez(tmp_path / "hub_nested.npz", x=data, y=_predict(student, data))
    args = ["hub_nested", str(tmp_path), "vit", str(vit_student[2])]
    # another backend than this one: the saved configs must not depend on it
    other = "torch" if backend() == "tensorflow" else "tensorflow"
    env = {**os.environ, "KERAS_BACKEND": other, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", _FRESH, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {l.split()[0]: l.split()[1:] for l in proc.stdout.splitlines() if l.split()[:1] in (["vit"], ["hub_nested"])}
    assert rows["hub_nested"][1] == "1" and float(rows["hub_nested"][2]) < 1e-5, proc.stdout
    assert rows["vit"][:2] == ["SARAViTBackbone", "2"] and float(rows["vit"][2]) < 1e-5, proc.stdout
