"""Quickstart: turn a softmax-attention Keras model into a linear-attention one.

Builds a small token encoder with `keras.layers.MultiHeadAttention` (think of
the point-cloud or image-patch encoder of a robot policy), builds the same
encoder with `keras_sara.layers.SARAMultiHeadAttention`, copies every weight
across one to one, and shows:

1. the weights transfer unchanged (same variables, same order);
2. with `blend=0` the SARA layer reproduces softmax attention exactly, with
   `blend=1` (the default) it is linear attention: the starting point of
   SARA-RT up-training;
3. causal attention and padding masks stay on the linear path;
4. the speed-up at a long sequence, and a `.keras` round trip.

Run:
    KERAS_BACKEND=tensorflow python examples/quickstart.py --tokens 4096
"""

import argparse
import os
import tempfile
import time

import keras
import numpy as np

import keras_sara

TOKENS = 4096
WIDTH = 128
HEADS = 4
LAYERS = 2
REPEATS = 3


def build_encoder(attention_cls, tokens, width, heads, layers, **attention_kwargs):
    """A pre-LayerNorm Transformer encoder over `tokens` tokens of size `width`."""
    inputs = keras.Input((tokens, width))
    x = inputs
    for i in range(layers):
        h = keras.layers.LayerNormalization(name=f"ln_attn_{i}")(x)
        h = attention_cls(num_heads=heads, key_dim=width // heads, name=f"attention_{i}", **attention_kwargs)(h, h)
        x = x + h
        h = keras.layers.LayerNormalization(name=f"ln_mlp_{i}")(x)
        h = keras.layers.Dense(2 * width, activation="gelu", name=f"mlp_in_{i}")(h)
        x = x + keras.layers.Dense(width, name=f"mlp_out_{i}")(h)
    outputs = keras.layers.Dense(7, name="action")(keras.layers.GlobalAveragePooling1D()(x))
    return keras.Model(inputs, outputs)


def median_ms(model, x, repeats):
    model.predict_on_batch(x)  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict_on_batch(x)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=TOKENS, help="sequence length for the timing")
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--heads", type=int, default=HEADS)
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args(argv)
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}, keras-sara {keras_sara.__version__}")
    keras.utils.set_random_seed(0)  # the same random "trained" weights every run

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 64, args.width)).astype("float32")

    # 1. a trained softmax model (random weights here) and its SARA twin
    teacher = build_encoder(keras.layers.MultiHeadAttention, 64, args.width, args.heads, args.layers)
    student = build_encoder(keras_sara.layers.SARAMultiHeadAttention, 64, args.width, args.heads, args.layers)
    student.set_weights(teacher.get_weights())  # one to one: same variables, same order
    same = all(np.array_equal(a, b) for a, b in zip(student.get_weights(), teacher.get_weights()))
    print(f"[1] weights copied one to one: {same} ({len(teacher.weights)} arrays)")

    # 2. blend=0 is softmax attention, blend=1 (default) is SARA linear attention
    exact = build_encoder(
        keras_sara.layers.SARAMultiHeadAttention, 64, args.width, args.heads, args.layers, blend=0.0
    )
    for src, dst in zip(teacher.layers, exact.layers):  # keeps each layer's blend variable
        if isinstance(dst, keras_sara.layers.SARAMultiHeadAttention):
            dst.load_mha_weights(src)
        else:
            dst.set_weights(src.get_weights())
    y_teacher = teacher.predict(x, verbose=0)
    diff_exact = np.abs(exact.predict(x, verbose=0) - y_teacher).max()
    diff_linear = np.abs(student.predict(x, verbose=0) - y_teacher).max()
    print(f"[2] max |output - softmax output|: blend=0 {diff_exact:.2e}, linear {diff_linear:.2e}")
    print("    (the linear model starts close but not equal: up-training closes the gap)")

    # 3. causal attention and key padding stay linear
    layer = keras_sara.layers.SARAMultiHeadAttention(num_heads=args.heads, key_dim=args.width // args.heads)
    padding = np.ones((2, 64), bool)
    padding[1, 40:] = False  # the second sequence has 40 real tokens
    y = layer(x, x, use_causal_mask=True, value_mask=padding)
    print(f"[3] causal + padded attention output {tuple(y.shape)}, finite: {bool(np.isfinite(keras.ops.convert_to_numpy(y)).all())}")

    # 4. speed at a long sequence
    long_x = rng.normal(size=(1, args.tokens, args.width)).astype("float32")
    soft = build_encoder(keras.layers.MultiHeadAttention, args.tokens, args.width, args.heads, args.layers)
    sara = build_encoder(keras_sara.layers.SARAMultiHeadAttention, args.tokens, args.width, args.heads, args.layers)
    sara.set_weights(soft.get_weights())
    t_soft, t_sara = median_ms(soft, long_x, args.repeats), median_ms(sara, long_x, args.repeats)
    print(
        f"[4] {args.layers}-layer encoder at {args.tokens} tokens: softmax {t_soft:.1f} ms, "
        f"SARA {t_sara:.1f} ms ({t_soft / t_sara:.1f}x faster)"
    )

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sara_encoder.keras")
        student.save(path)
        reloaded = keras.models.load_model(path)  # importing keras_sara is all it needs
    kinds = sorted({type(l).__name__ for l in reloaded.layers if "Attention" in type(l).__name__})
    match = np.allclose(reloaded.predict(x, verbose=0), student.predict(x, verbose=0), atol=1e-6)
    print(f"    .keras round trip: layers {kinds}, outputs equal: {match}")


if __name__ == "__main__":
    main()
