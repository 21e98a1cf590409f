"""Every example runs end to end at its smallest settings (TensorFlow backend)."""

import json
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


@pytest.mark.slow
def test_uptrain_vit_quick(tmp_path):
    out = _run("examples/uptrain_vit.py", "--quick", "--out-dir", str(tmp_path))
    assert "teacher: test accuracy" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert 0.0 <= results["teacher"]["test_accuracy"] <= 1.0
    assert results["runs"], "no up-training run was recorded"
    for run in results["runs"]:
        assert 0.0 <= run["accuracy"] <= 1.0, run
    assert {run["method"] for run in results["runs"]} == {"hard", "blend+distill"}
    for method in ("hard", "blend+distill"):  # up-training recovers accuracy the swap lost
        acc = {r["steps"]: r["accuracy"] for r in results["runs"] if r["method"] == method}
        assert acc[max(acc)] > acc[0] + 0.05, (method, acc)
    exported = results["export"]
    student = next(v for k, v in exported.items() if k.startswith("student"))
    assert student["softmax_ops"] == 0 and exported["teacher"]["softmax_ops"] > 0
    assert student["flex_free"] and student["relative_error_vs_keras"] < 1e-4
    assert (tmp_path / "results.md").exists()
    assert (tmp_path / "accuracy_vs_steps.png").stat().st_size > 0
