"""finalize(verify=True) at the backend's default (TF32) precision, with and without the library's full-float32 check."""
import contextlib
import keras
import keras_sara
from keras_sara import conversion
from keras_sara.layers import SARAMultiHeadAttention
from tests.test_callbacks import _student
from tests.conversion.test_conversion import custom

def blended(build):
    if build == "custom":
        model, _ = keras_sara.convert(custom(), blend=0.0, verify=False)
    else:
        model = _student()
    for layer in model._flatten_layers():
        if isinstance(layer, SARAMultiHeadAttention) and layer.blend_variable is not None:
            layer.set_blend(1.0)
    return model

print("backend", keras.backend.backend())
for label, ctx in (("library as committed", conversion.full_float32_matmuls), ("check without full_float32_matmuls", contextlib.nullcontext)):
    conversion.full_float32_matmuls = ctx
    for build in ("student", "custom"):
        try:
            keras_sara.finalize(blended(build))
            print(f"{label:36s} {build:8s} finalize(verify=True) passed")
        except RuntimeError as err:
            print(f"{label:36s} {build:8s} RuntimeError: {str(err)[:110]}")
