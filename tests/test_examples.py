"""Every example runs end to end at its smallest settings (TensorFlow backend)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script, *args, timeout=600):
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_quickstart_runs():
    out = _run("examples/quickstart.py", "--tokens", "256", "--repeats", "1", "--layers", "1")
    assert "weights copied one to one: True" in out
    assert "blend=0 0.00e+00" in out
    assert "outputs equal: True" in out
