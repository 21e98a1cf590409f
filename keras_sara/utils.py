"""Small helpers shared by the library, its examples and its benchmarks."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import socket
import tempfile
from typing import Callable, Iterator

# Every temporary file or folder the library writes carries this tag, the
# writer's host and its pid, so that the next write can tell a temporary left
# by a killed process (SIGKILL runs no cleanup) from one still being written.
TEMP_TAG = "keras-sara-tmp"
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
# .NAME.keras-sara-tmp-HOST-PID-RANDOM.EXT (files) / PREFIXkeras-sara-tmp-HOST-PID-RANDOM (folders)
_TEMP_RE = re.compile(rf"{TEMP_TAG}-(?P<host>[0-9a-f]{{8}})-(?P<pid>\d+)-")


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: never call it stale
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    try:  # a killed process nobody has reaped yet is a zombie: dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _is_stale(entry: str) -> bool:
    """A temporary of ours whose writer, on this host, has died."""
    match = _TEMP_RE.search(entry)
    if match is None or match.group("host") != _HOST:  # a shared folder: other hosts' pids mean nothing here
        return False
    pid = int(match.group("pid"))
    return pid != os.getpid() and not _pid_alive(pid)


def remove_stale_temporaries(folder: str) -> list:
    """Remove the temporaries that killed writers left in `folder`; return their paths.

    Only names carrying `TEMP_TAG`, this host and the pid of a process that no
    longer exists are touched; a live writer's temporary is never removed.
    Called by every `atomic_write` and `work_directory`, so a folder holds at
    most the temporaries of writers still running.
    """
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        if TEMP_TAG not in entry or not _is_stale(entry):
            continue
        full = os.path.join(folder, entry)
        with contextlib.suppress(OSError):
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            else:
                os.unlink(full)
            removed.append(full)
    return removed


def temporary_name(path: str) -> str:
    """A fresh temporary path beside `path`, in the pattern `remove_stale_temporaries` knows.

    It keeps `path`'s extension (`model.save` and `np.savez` check or add
    it). The caller creates the file and moves it over `path` (or removes it);
    if the process is killed first, the next write to the folder removes it.
    """
    folder, name = os.path.split(os.path.abspath(path))
    ext = os.path.splitext(name)[1]
    return os.path.join(
        folder, f".{name}.{TEMP_TAG}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{ext}"
    )


def atomic_write(path: str, write: Callable[[str], object]) -> None:
    """Create `path` atomically: `write(tmp)` fills a temporary file beside it, then `os.replace`.

    The temporary file keeps `path`'s extension (`model.save` checks it) and
    gets the usual permissions. On any error it is removed and `path` is left
    as it was; if the process is killed (SIGKILL, power loss) the destination
    is still either the old file or the new one, and the orphaned temporary
    (named with the writer's pid, see `temporary_name`) is removed by the
    next write to the same folder.

    Example:

    >>> atomic_write("results.json", lambda tmp: open(tmp, "w").write("{}"))  # doctest: +SKIP
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(folder)
    tmp = temporary_name(path)
    # Created before `write` so a callback that only appends or reopens finds it.
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # umask applies
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def work_directory(prefix: str = "keras_sara_") -> Iterator[str]:
    """A temporary folder (in `tempfile.gettempdir()`) removed on exit, or by the next one after a kill.

    Like `tempfile.TemporaryDirectory`, but named with `TEMP_TAG` and the
    pid, so a folder that a killed process left behind (a saved `.keras`
    copy can be large) is removed the next time any `work_directory` opens.
    """
    root = tempfile.gettempdir()
    remove_stale_temporaries(root)
    path = tempfile.mkdtemp(prefix=f"{prefix}{TEMP_TAG}-{_HOST}-{os.getpid()}-", dir=root)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def exit_with_parent(parent_pid: int, poll_s: float = 0.2) -> None:
    """In a worker process: exit as soon as `parent_pid` is gone (a killed caller must not leave a worker writing).

    Starts a daemon thread; on the parent's death it exits the process at
    once (its temporaries are then the parent's folder's stale ones).
    """
    import threading
    import time

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="keras_sara_exit_with_parent").start()


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
