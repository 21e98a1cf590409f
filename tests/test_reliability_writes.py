"""Nothing left behind by a killed write (issue 21, item 1).

A SIGKILL runs no cleanup, so `atomic_write` names its temporaries with the
writer's host and pid and every later write to the folder removes those of
dead writers. The kill tests run the export in a child process that blocks
once the temporary file is complete, SIGKILL it there, and check the folder
before and after the next write.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from keras_sara import utils

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD = b"the previous policy, which must survive"

# Runs the export named by argv[2] on the backend argv[1], writing argv[3];
# prints READY once the full temporary file exists, then blocks until killed.
CHILD = textwrap.dedent(
    """
    import os, sys, time
    os.environ["KERAS_BACKEND"] = sys.argv[1]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import keras_sara
    from keras_sara import export as export_lib, streaming
    from keras_sara.layers import SARAMultiHeadAttention

    def block(where):
        print("READY", where, flush=True)
        time.sleep(600)

    original = export_lib.atomic_write
    def blocking_atomic_write(path, write):
        def write_then_block(tmp):
            write(tmp)
            block(tmp)
        original(path, write_then_block)

    export_lib.atomic_write = blocking_atomic_write
    if sys.argv[1] != "tensorflow":  # the worker wrote the temporary: block in this process's check of it
        export_lib._compare = lambda *args: block("compare")

    inputs = keras.Input((8, 16))
    causal = sys.argv[2] == "streaming"
    x = SARAMultiHeadAttention(2, 8)(inputs, inputs, use_causal_mask=causal)
    model = keras.Model(inputs, keras.layers.Dense(16)(x))
    if causal:
        streaming.export_streaming_tflite(model, sys.argv[3], probe_steps=(0, 3), benchmark_runs=0)
    else:
        export_lib.export_tflite(model, sys.argv[3], benchmark_runs=0)
    print("FINISHED", flush=True)
    """
)


def _start(backend, kind, path):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, backend, kind, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )


def _wait_ready(proc, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("READY"):
            return line.split(maxsplit=1)[1].strip()
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"the child never reached the write: {proc.stderr.read()[-3000:]}")


def _kill_mid_write_then_write_again(tmp_path, backend, kind):
    dest = tmp_path / "policy.tflite"
    dest.write_bytes(OLD)
    proc = _start(backend, kind, dest)
    try:
        _wait_ready(proc)
        left = [p for p in os.listdir(tmp_path) if p != "policy.tflite"]
        assert left and all(utils.TEMP_TAG in p for p in left), left  # the kill has something to leave
        assert any(os.path.getsize(tmp_path / p) > 1000 for p in left)  # a complete flatbuffer
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert dest.read_bytes() == OLD  # the destination is never partial: still the old file
    assert len(os.listdir(tmp_path)) == 2  # the orphan is still there, until ...

    # ... the next write to the folder, which removes it
    utils.atomic_write(str(tmp_path / "next.json"), lambda tmp: open(tmp, "w").write("{}"))
    assert sorted(os.listdir(tmp_path)) == ["next.json", "policy.tflite"]
    assert dest.read_bytes() == OLD


@pytest.mark.slow
def test_sigkill_during_export_tflite_leaves_nothing(tmp_path):
    _kill_mid_write_then_write_again(tmp_path, "tensorflow", "export")


@pytest.mark.slow
def test_sigkill_during_streaming_export_leaves_nothing(tmp_path):
    _kill_mid_write_then_write_again(tmp_path, "tensorflow", "streaming")


@pytest.mark.slow
def test_sigkill_during_jax_streaming_export_leaves_nothing(tmp_path):
    """JAX: the worker wrote the step file; the kill lands during this process's own check of it."""
    _kill_mid_write_then_write_again(tmp_path, "jax", "streaming")


# ----------------------------------------------------------- the cleanup rule


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_next_write_removes_only_dead_writers_temporaries(tmp_path):
    dead = _dead_pid()
    host = utils._HOST
    stale = tmp_path / f".a.tflite.{utils.TEMP_TAG}-{host}-{dead}-0123abcd.tflite"
    live = tmp_path / f".b.tflite.{utils.TEMP_TAG}-{host}-{os.getppid()}-0123abcd.tflite"
    other_host = tmp_path / f".c.tflite.{utils.TEMP_TAG}-{'0' * 8 if host != '0' * 8 else '1' * 8}-{dead}-01.tflite"
    not_ours = tmp_path / f".d.tflite.{dead}.tflite"
    stale_dir = tmp_path / f"keras_sara_export_{utils.TEMP_TAG}-{host}-{dead}-xyz_9"
    for p in (stale, live, other_host, not_ours):
        p.write_bytes(b"x")
    stale_dir.mkdir()
    (stale_dir / "model.keras").write_bytes(b"x")

    utils.atomic_write(str(tmp_path / "out.bin"), lambda tmp: open(tmp, "wb").write(b"new"))

    assert sorted(os.listdir(tmp_path)) == sorted(
        [live.name, other_host.name, not_ours.name, "out.bin"]
    )
    assert (tmp_path / "out.bin").read_bytes() == b"new"


def test_atomic_write_failure_keeps_destination_and_leaves_nothing(tmp_path):
    dest = tmp_path / "results.json"
    dest.write_bytes(OLD)

    def fail(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        utils.atomic_write(str(dest), fail)
    assert os.listdir(tmp_path) == ["results.json"]
    assert dest.read_bytes() == OLD


def test_temporary_keeps_extension_and_permissions(tmp_path):
    seen = {}

    def write(tmp):
        seen["tmp"] = tmp
        open(tmp, "w").close()

    utils.atomic_write(str(tmp_path / "m.keras"), write)
    name = os.path.basename(seen["tmp"])
    assert name.startswith(".m.keras.") and name.endswith(".keras") and f"-{os.getpid()}-" in name
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "m.keras").st_mode & 0o777 == 0o666 & ~umask


def test_work_directory_removes_a_killed_process_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(utils.tempfile, "gettempdir", lambda: str(tmp_path))
    dead = _dead_pid()
    stale = tmp_path / f"keras_sara_export_{utils.TEMP_TAG}-{utils._HOST}-{dead}-abc"
    stale.mkdir()
    with utils.work_directory("keras_sara_export_") as work:
        assert not stale.exists()
        assert os.path.dirname(work) == str(tmp_path) and f"-{os.getpid()}-" in work
        open(os.path.join(work, "model.keras"), "w").close()
    assert os.listdir(tmp_path) == []


def test_worker_exits_when_its_parent_is_killed(tmp_path):
    """A killed export must not leave its TensorFlow-backend worker running on to write the file."""
    pid_file = tmp_path / "worker.pid"
    parent = textwrap.dedent(
        f"""
        import os, subprocess, sys, time
        worker = (
            "import os, time; from keras_sara.utils import exit_with_parent; "
            "exit_with_parent({{}}); open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
        ).format(os.getpid())
        subprocess.run([sys.executable, "-c", worker])
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    deadline = time.monotonic() + 120
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    worker = int(pid_file.read_text())
    assert utils._pid_alive(worker)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while utils._pid_alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not utils._pid_alive(worker)
