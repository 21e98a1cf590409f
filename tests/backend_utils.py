"""Backend-agnostic test helpers: numpy conversion, errors and gradients.

`value_and_grads` is the one place that knows how each backend differentiates,
so every gradient test runs unchanged on TensorFlow, JAX and PyTorch.
"""

import keras
import numpy as np


def backend() -> str:
    """Name of the active Keras backend: "tensorflow", "jax" or "torch"."""
    return keras.backend.backend()


def to_numpy(x) -> np.ndarray:
    """Any backend tensor (or array-like) as a numpy array."""
    if isinstance(x, np.ndarray):
        return x
    return keras.ops.convert_to_numpy(x)


def rel_err(a, b) -> float:
    """||a - b|| / max(||b||, tiny), in float64."""
    a = np.asarray(to_numpy(a), dtype=np.float64)
    b = np.asarray(to_numpy(b), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"Shapes differ: {a.shape} vs {b.shape}")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), np.finfo(np.float64).tiny))


def value_and_grads(fn, inputs, cotangent, jit: bool = True):
    """Output of `fn(*inputs)` and the gradients of `sum(fn(*inputs) * cotangent)`.

    Args:
        fn: takes backend tensors (one per input) and returns one tensor.
        inputs: list of numpy float arrays, the points to differentiate at.
        cotangent: numpy array shaped like the output.
        jit: JAX only. Compile value and gradients as one program (eager JAX
            compiles every op for every new shape, which costs more). Pass
            False for a Python loop over time: XLA compiles it very slowly
            once unrolled.

    Returns:
        `(output, [d/d input_i, ...])`, all numpy. An input that the output
        does not depend on gets a zero gradient.
    """
    name = backend()
    if name == "tensorflow":
        import tensorflow as tf

        xs = [tf.constant(x) for x in inputs]
        with tf.GradientTape() as tape:
            tape.watch(xs)
            out = fn(*xs)
            loss = tf.reduce_sum(out * tf.cast(cotangent, out.dtype))
        grads = tape.gradient(loss, xs, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    elif name == "jax":
        import jax
        import jax.numpy as jnp

        def run(*xs):
            out, vjp = jax.vjp(fn, *xs)
            return out, vjp(jnp.asarray(cotangent, dtype=out.dtype))

        if jit:
            # Each program runs once: XLA's optimisation passes would cost more
            # than they save (they double the compile time, most of a test here).
            options = {
                "xla_backend_optimization_level": 0,
                "xla_llvm_disable_expensive_passes": True,
            }
            run = jax.jit(run, compiler_options=options)
        out, grads = run(*[jnp.asarray(x) for x in inputs])
    elif name == "torch":
        import torch

        # On Keras' device (a GPU when there is one): Keras moves CPU inputs
        # there, and the cotangent must meet the output on the same device.
        xs = [keras.ops.convert_to_tensor(x).detach().requires_grad_(True) for x in inputs]
        out = fn(*xs)
        loss = (out * torch.as_tensor(cotangent, dtype=out.dtype, device=out.device)).sum()
        grads = torch.autograd.grad(loss, xs, allow_unused=True, materialize_grads=True)
        out = out.detach()
    else:
        raise ValueError(f"Unsupported backend. Received: backend={name!r}")
    return to_numpy(out), [to_numpy(g) for g in grads]
