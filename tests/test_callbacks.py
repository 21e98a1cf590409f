"""keras_sara.callbacks.UpTraining and keras_sara.finalize (every backend)."""

import math

import keras
import numpy as np
import pytest

import keras_sara
from keras_sara.callbacks import UpTraining, schedule_value
from keras_sara.layers import SARAMultiHeadAttention
from tests.backend_utils import backend, rel_err, to_numpy

pytestmark = pytest.mark.filterwarnings("ignore:`build\\(\\)` was called on layer:UserWarning")
T, E, HEADS, KEY_DIM, CLASSES = 6, 16, 2, 8, 3


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, T, E)).astype("float32"), rng.integers(0, CLASSES, n)


def _teacher(seed=1):
    keras.utils.set_random_seed(seed)
    x = keras.Input((T, E))
    h = keras.layers.MultiHeadAttention(HEADS, KEY_DIM, name="mha")(x, x)
    h = keras.layers.LayerNormalization(name="norm")(x + h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(x, keras.layers.Dense(CLASSES, name="head")(h))


def _student(blend=0.0, optimizer=None, seed=1):
    student, _ = keras_sara.convert(_teacher(seed), blend=blend, verify=False)
    student.compile(optimizer or keras.optimizers.AdamW(1e-2), "sparse_categorical_crossentropy")
    return student


class _Record(keras.callbacks.Callback):
    """Reads variables after every batch (syncing the JAX state first)."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.values = fn, []

    def on_train_batch_end(self, batch, logs=None):
        if backend() == "jax":
            self.model.jax_state_sync()
        self.values.append(self.fn(self.model))


def _blend(model):
    return float(to_numpy(model.get_layer("mha").blend_variable))


# ------------------------------------------------------------- schedules


def test_schedule_values():
    assert schedule_value("hard", 0, 10, 0.0, 1.0) == 1.0
    assert [schedule_value("constant", s, 4, 0.2, 1.0) for s in (0, 3, 4, 9)] == [0.2, 0.2, 1.0, 1.0]
    assert [schedule_value("linear", s, 4, 0.0, 1.0) for s in (0, 1, 2, 4)] == [0.0, 0.25, 0.5, 1.0]
    cos = [schedule_value("cosine", s, 4, 0.0, 1.0) for s in (0, 1, 2, 3, 4)]
    assert cos == pytest.approx([0.0, (1 - math.cos(math.pi / 4)) / 2, 0.5, (1 - math.cos(3 * math.pi / 4)) / 2, 1.0])
    # a decay (distillation weight) runs the other way
    assert schedule_value("linear", 1, 4, 2.0, 0.0) == pytest.approx(1.5)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_blend_variable_follows_schedule_inside_fit(schedule):
    x, y = _data(32)
    student = _student()
    cb = UpTraining(schedule=schedule, blend_steps=5, initial_blend=0.1, verbose=0)
    rec = _Record(_blend)
    student.fit(x, y, batch_size=4, epochs=1, callbacks=[cb, rec], verbose=0)
    # value set before step s is used by step s and read back after it
    assert rec.values == pytest.approx([cb.blend_at(s) for s in range(8)], abs=1e-7)
    assert rec.values[-1] == 1.0 and rec.values[0] < 1.0


def test_compiled_step_uses_the_scheduled_blend():
    """With a zero learning rate, each step's loss is the loss at that step's blend."""
    x, y = _data(8)
    student = _student(optimizer=keras.optimizers.SGD(0.0))
    cb = UpTraining(schedule="linear", blend_steps=4, verbose=0)
    hist = student.fit(x, y, batch_size=8, epochs=5, callbacks=[cb], verbose=0)  # one step per epoch
    loss = keras.losses.SparseCategoricalCrossentropy()
    expected = []
    for step in range(5):
        student.get_layer("mha").set_blend(cb.blend_at(step))
        expected.append(float(to_numpy(loss(y, student(x, training=True)))))
    assert hist.history["loss"] == pytest.approx(expected, rel=1e-5)
    assert len(set(np.round(expected, 5))) == 5  # the blend changes the loss at every step
    assert hist.history["blend"] == pytest.approx([cb.blend_at(s) for s in range(5)])


def test_hard_swap_default_on_a_linear_only_model_trains():
    x, y = _data(16)
    student = _student(blend=1.0)
    before = student.get_weights()
    hist = student.fit(x, y, batch_size=8, epochs=1, callbacks=[UpTraining(verbose=0)], verbose=0)
    assert np.isfinite(hist.history["loss"][0])
    assert any(not np.array_equal(a, b) for a, b in zip(before, student.get_weights()))


# ----------------------------------------------------------- distillation


def _numpy_attention_pair(layer, x):
    """Softmax and ReLU-linear attention weights of `layer` on `x`, in numpy (the naive reference)."""
    wq, bq, wk, bk, wv, bv = (to_numpy(w) for w in layer.weights[:6])
    q = np.einsum("bte,ehk->bthk", x, wq) + bq
    k = np.einsum("bte,ehk->bthk", x, wk) + bk
    logits = np.einsum("bthk,bshk->bhts", q, k) / math.sqrt(KEY_DIM)
    soft = np.exp(logits - logits.max(-1, keepdims=True))
    soft /= soft.sum(-1, keepdims=True)
    fq, fk = np.maximum(q, 1e-3), np.maximum(k, 1e-3)  # the "relu" feature map
    kern = np.einsum("bthk,bshk->bhts", fq, fk)
    lin = kern / (kern.sum(-1, keepdims=True) + layer.eps)
    v = np.einsum("bte,ehk->bthk", x, wv) + bv
    return soft, lin, np.einsum("bhts,bshv->bthv", soft, v), np.einsum("bhts,bshv->bthv", lin, v)


@pytest.mark.parametrize("target", ["scores", "outputs"])
def test_distillation_loss_matches_naive_reference(target):
    x, _ = _data(2)
    layer = SARAMultiHeadAttention(HEADS, KEY_DIM, blend=0.0)
    layer(x, x)
    layer.configure_distillation(target)
    layer.distillation_weight_variable.assign(2.5)
    layer(x, x, training=True)
    (got,) = [float(to_numpy(l)) for l in layer.losses]
    soft, lin, soft_out, lin_out = _numpy_attention_pair(layer, x)
    if target == "scores":
        want = np.mean(np.sum(soft * (np.log(soft) - np.log(lin)), axis=-1))
    else:
        want = np.sum((lin_out - soft_out) ** 2) / np.sum(soft_out**2)
    assert got == pytest.approx(2.5 * want, rel=1e-4)
    layer(x, x, training=False)
    assert not layer.losses  # inference adds no loss


def test_distillation_loss_enters_fit_and_improves_fidelity():
    x, y = _data(32)

    def first_loss(weight):
        student = _student(optimizer=keras.optimizers.SGD(0.0))
        cb = UpTraining(distillation_weight=weight, verbose=0)
        return student.fit(x, y, batch_size=32, epochs=1, callbacks=[cb], verbose=0).history["loss"][0]

    base, one, two = first_loss(0.0), first_loss(1.0), first_loss(2.0)
    assert one > base
    assert two - base == pytest.approx(2 * (one - base), rel=1e-4)

    def fidelity(weight):
        student = _student(optimizer=keras.optimizers.Adam(1e-2))
        cb = UpTraining(distillation_weight=weight, attention_only_steps=1000, probe=x[:8], verbose=0)
        hist = student.fit(x, y, batch_size=8, epochs=6, callbacks=[cb], verbose=0)
        return [h["mean"] for h in cb.fidelity_history], hist

    fid, hist = fidelity(1.0)
    control, _ = fidelity(0.0)  # the same run with the task loss only
    assert control[0] == pytest.approx(fid[0])
    assert fid[-1] < 0.9 * fid[0] and fid[-1] < control[-1], (fid, control)
    assert hist.history["fidelity"] == pytest.approx(fid[1:])
    assert hist.history["fidelity/mha"] == pytest.approx(fid[1:])


def test_fidelity_matches_naive_reference():
    x, y = _data(4)
    student = _student(blend=1.0)
    cb = UpTraining(probe=x, verbose=0)
    cb.set_model(student)
    cb.on_train_begin()
    _, _, soft_out, lin_out = _numpy_attention_pair(student.get_layer("mha"), x)
    assert cb.fidelity_history[0]["mha"] == pytest.approx(rel_err(lin_out, soft_out), rel=1e-4)


# ------------------------------------------------------------------ stages


def test_attention_only_stage_freezes_the_rest_exactly():
    x, y = _data(32)
    student = _student(blend=1.0, optimizer=keras.optimizers.AdamW(1e-2, weight_decay=0.1))

    def snapshot(model):
        return {w.path: to_numpy(w).copy() for w in model.trainable_weights}

    start = snapshot(student)
    rec = _Record(snapshot)
    student.fit(x, y, batch_size=4, epochs=1, callbacks=[UpTraining(attention_only_steps=3, verbose=0), rec],
                verbose=0)
    attention = {w.path for w in student.get_layer("mha").trainable_weights}
    for step, values in enumerate(rec.values):
        for path, value in values.items():
            moved = not np.array_equal(value, start[path])
            if path in attention:
                assert moved, (step, path)
            elif step < 3:
                assert not moved, (step, path)
    others = [p for p in start if p not in attention]
    assert all(not np.array_equal(rec.values[-1][p], start[p]) for p in others)


# ------------------------------------------------------------------ resume


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise RuntimeError("interrupted")


def test_backup_and_restore_resumes_schedule_exactly(tmp_path):
    x, y = _data(16)

    def callback():
        return UpTraining(schedule="cosine", blend_steps=10, distillation_weight=0.5, distillation_steps=12,
                          distillation_schedule="linear", attention_only_steps=3, verbose=0)

    reference = _student()
    reference.fit(x, y, batch_size=4, epochs=4, shuffle=False, callbacks=[callback()], verbose=0)

    backup = str(tmp_path / "backup")
    interrupted = _student()
    with pytest.raises(RuntimeError, match="interrupted"):
        interrupted.fit(x, y, batch_size=4, epochs=4, shuffle=False, verbose=0,
                        callbacks=[callback(), keras.callbacks.BackupAndRestore(backup), _Interrupt()])
    resumed = _student(seed=7)  # a fresh process would start from other weights
    cb = callback()
    resumed.fit(x, y, batch_size=4, epochs=4, shuffle=False, verbose=0,
                callbacks=[cb, keras.callbacks.BackupAndRestore(backup)])
    assert cb.step == 16
    for a, b in zip(reference.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert _blend(resumed) == 1.0


# --------------------------------------------------------------- finalize


def test_finalize_drops_softmax_keeps_outputs_and_reloads(tmp_path):
    x, y = _data(16)
    student = _student()
    student.fit(x, y, batch_size=8, epochs=1, verbose=0,
                callbacks=[UpTraining(schedule="linear", blend_steps=1, distillation_weight=1.0, verbose=0)])
    final = keras_sara.finalize(student)
    layer = final.get_layer("mha")
    assert isinstance(layer, SARAMultiHeadAttention) and layer.blend_variable is None
    assert len(final.weights) == len(student.weights) - 2  # blend and distillation weight
    assert rel_err(final.predict(x, verbose=0), student.predict(x, verbose=0)) < 1e-5
    assert student.get_layer("mha").blend_variable is not None  # the original is untouched
    path = str(tmp_path / "final.keras")
    final.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_layer("mha").blend_variable is None
    assert rel_err(loaded.predict(x, verbose=0), final.predict(x, verbose=0)) < 1e-6


def test_finalize_reaches_attention_in_custom_layers(tmp_path):
    from tests.conversion.test_conversion import custom

    teacher = custom()
    student, _ = keras_sara.convert(teacher, blend=0.0, verify=False)
    for layer in student._flatten_layers():
        if isinstance(layer, SARAMultiHeadAttention):
            layer.set_blend(1.0)
    final = keras_sara.finalize(student)
    sara = [l for l in final._flatten_layers() if isinstance(l, SARAMultiHeadAttention)]
    assert sara and all(l.blend_variable is None for l in sara)
    x = np.random.default_rng(0).normal(size=(2,) + tuple(teacher.input_shape[1:])).astype("float32")
    path = str(tmp_path / "custom.keras")
    final.save(path)
    loaded = keras.models.load_model(path)
    reloaded = [l for l in loaded._flatten_layers() if isinstance(l, SARAMultiHeadAttention)]
    assert len(reloaded) == len(sara) and all(l.blend_variable is None for l in reloaded)
    assert rel_err(loaded.predict(x, verbose=0), student.predict(x, verbose=0)) < 1e-5


def test_finalize_warns_when_the_blend_did_not_finish():
    student = _student()
    with pytest.warns(UserWarning, match="blend factor below 1"):
        keras_sara.finalize(student)


# -------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(schedule="exponential"), "schedule='exponential'"),
        (dict(schedule="linear"), "blend_steps=0"),
        (dict(schedule="linear", blend_steps=-1), "blend_steps=-1"),
        (dict(initial_blend=1.5), "initial_blend=1.5"),
        (dict(distillation_weight=-1.0), "distillation_weight=-1.0"),
        (dict(distillation_weight=1.0, distillation_steps=0), "distillation_steps=0"),
        (dict(distillation_schedule="hard"), "distillation_schedule='hard'"),
        (dict(distillation_target="logits"), "distillation_target='logits'"),
        (dict(attention_only_steps=2.5), "attention_only_steps=2.5"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(".", r"\.")):
        UpTraining(**kwargs)


def test_bad_models():
    x, y = _data(8)
    linear_only = _student(blend=1.0)
    with pytest.raises(ValueError, match=r"blend=0\.0"):
        linear_only.fit(x, y, epochs=1, verbose=0, callbacks=[UpTraining(schedule="cosine", blend_steps=3)])
    teacher = _teacher()
    teacher.compile("adam", "sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="no SARA attention layer"):
        teacher.fit(x, y, epochs=1, verbose=0, callbacks=[UpTraining()])
    with pytest.raises(ValueError, match="Attention layers in this model"):
        _student().fit(x, y, epochs=1, verbose=0, callbacks=[UpTraining(layers=["nope"])])
    with pytest.raises(ValueError, match="`model` must be a keras.Model"):
        keras_sara.finalize("model.keras")
    with pytest.raises(ValueError, match="target='kl'"):
        SARAMultiHeadAttention(HEADS, KEY_DIM, blend=0.0).configure_distillation("kl")
    with pytest.raises(ValueError, match="linear-only"):
        SARAMultiHeadAttention(HEADS, KEY_DIM).configure_distillation("scores")
