"""keras_sara.utils: full float32 matmuls on every backend, and finalize's use of them."""

import contextlib

import numpy as np
import pytest

import keras_sara
from keras_sara import conversion
from keras_sara.utils import full_float32_matmuls
from tests.backend_utils import backend
from tests.test_callbacks import _student


@contextlib.contextmanager
def _tf32_allowed():
    """TF32 matmuls allowed inside (a GPU user's default); yields a reader of the setting."""
    name = backend()
    if name == "jax":
        import jax

        with jax.default_matmul_precision("tensorfloat32"):
            yield lambda: jax.config.jax_default_matmul_precision
        return
    if name == "torch":
        import torch

        flags = (torch.backends.cuda.matmul, torch.backends.cudnn)

        def read():
            return tuple(f.allow_tf32 for f in flags)

        def write(values):
            for f, v in zip(flags, values):
                f.allow_tf32 = v

        allow = (True, True)
    else:
        import tensorflow as tf

        read = tf.config.experimental.tensor_float_32_execution_enabled
        write = tf.config.experimental.enable_tensor_float_32_execution
        allow = True
    saved = read()
    write(allow)
    try:
        yield read
    finally:
        write(saved)


# per backend: (TF32 allowed, full float32) as the reader returns them
_LOOSE_AND_FULL = {
    "jax": ("tensorfloat32", "highest"),
    "torch": ((True, True), (False, False)),
    "tensorflow": (True, False),
}


def test_full_float32_matmuls_turns_tf32_off_and_restores_it():
    loose, full = _LOOSE_AND_FULL[backend()]
    with _tf32_allowed() as read:
        assert read() == loose
        with full_float32_matmuls():
            assert read() == full
        assert read() == loose
        with pytest.raises(KeyError):  # restored after an error too
            with full_float32_matmuls():
                raise KeyError("boom")
        assert read() == loose


def test_finalize_verifies_in_full_float32(monkeypatch):
    """finalize compares the two models inside full_float32_matmuls (TF32 alone moved them 4e-4 on an H100)."""
    entered = []

    @contextlib.contextmanager
    def recording():
        entered.append(True)
        with full_float32_matmuls():
            yield

    monkeypatch.setattr(conversion, "full_float32_matmuls", recording)
    student = _student()
    for layer in student._flatten_layers():
        if hasattr(layer, "set_blend") and layer.blend_variable is not None:
            layer.set_blend(1.0)
    keras_sara.finalize(student, probe=np.ones((2,) + tuple(student.input_shape[1:]), "float32"))
    assert entered == [True]
    keras_sara.finalize(student, verify=False)
    assert entered == [True]  # no check, no context
