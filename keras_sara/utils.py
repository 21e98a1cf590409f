"""Small helpers shared by the library, its examples and its benchmarks."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Callable


def atomic_write(path: str, write: Callable[[str], object]) -> None:
    """Create `path` atomically: `write(tmp)` fills a temporary file beside it, then `os.replace`.

    The temporary file keeps `path`'s extension (`model.save` checks it) and
    gets the usual permissions; on any error it is removed and `path` is left
    as it was.

    Example:

    >>> atomic_write("results.json", lambda tmp: open(tmp, "w").write("{}"))  # doctest: +SKIP
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def full_float32_matmuls():
    """Run float32 matrix products in full float32 inside the block, on any backend.

    On Ampere and newer NVIDIA GPUs, JAX's default precision and TensorFlow
    compute float32 `dot`/`einsum` in TF32 (a 10-bit mantissa), so two
    mathematically equal graphs can differ by about 1e-3 relative. The
    library's own checks (`finalize(verify=True)`) compare two computations
    of the same function against a float32 tolerance and run inside this
    block. Leaves every setting as it found it; on CPUs it changes nothing
    that matters.

    Example:

    >>> with full_float32_matmuls():
    ...     y = keras.ops.matmul(a, b)  # doctest: +SKIP
    """
    import keras

    name = keras.backend.backend()
    if name == "jax":
        import jax

        with jax.default_matmul_precision("highest"):
            yield
    elif name == "torch":
        import torch

        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    elif name == "tensorflow":
        import tensorflow as tf  # already imported by Keras on this backend

        saved = tf.config.experimental.tensor_float_32_execution_enabled()
        tf.config.experimental.enable_tensor_float_32_execution(False)
        try:
            yield
        finally:
            tf.config.experimental.enable_tensor_float_32_execution(saved)
    else:
        yield
