"""`benchmarks/rt2_policy_latency.py`: the image policy's latency sweep runs end to end and refuses bad sizes."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "rt2_policy_latency.py"
ENV = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}


def _run(args, timeout=900):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def test_bad_arguments_are_refused(tmp_path):
    proc = _run(["--sizes", "40", "--out-dir", str(tmp_path / "a")], timeout=300)
    assert proc.returncode != 0 and "--sizes must be multiples of 16" in proc.stderr and "Received: 40" in proc.stderr
    proc = _run(["--threads", "0", "--out-dir", str(tmp_path / "b")], timeout=300)
    assert proc.returncode != 0 and "--threads must be at least 1. Received: 0" in proc.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_quick_sweep_writes_every_variant(tmp_path):
    import keras_hub  # noqa: F401  (make test installs it: missing must fail, not skip)
    proc = _run(["--quick", "--sizes", "32", "--out-dir", str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| image | ViT tokens / frame | teacher_h1 |" in proc.stdout
    for name in ("latency.csv", "latency.json", "latency.md", "latency.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / "latency.csv", newline="") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["teacher_h1", "sara_h1", "teacher_h3", "sara_h3", "sara_h3_fuser"]
    # 32 px, patch 8: 16 ViT tokens per frame, 4 pooled per frame in the fuser plus instruction and gripper
    assert {r["vit_tokens_per_frame"] for r in rows.values()} == {"16"}
    assert rows["teacher_h1"]["fuser_tokens"] == "6" and rows["teacher_h3"]["fuser_tokens"] == "14"
    # 3 ViT and 2 fuser softmaxes; SARA removes the ViT's, the fuser conversion all of them
    softmax = {v: int(r["softmax_ops"]) for v, r in rows.items()}
    assert softmax == {"teacher_h1": 5, "sara_h1": 2, "teacher_h3": 5, "sara_h3": 2, "sara_h3_fuser": 0}
    for r in rows.values():
        assert float(r["rel_error"]) < 1e-4, r  # verified against Keras before timing
        assert 0 < float(r["p50_ms"]) <= float(r["p90_ms"]) <= float(r["p99_ms"]) and math.isfinite(float(r["p99_ms"]))
    derived = json.loads((tmp_path / "latency.json").read_text())["derived"]
    ratio = derived["over_teacher_h1"]["32"]
    assert ratio["teacher_h1"] == 1.0
    assert ratio["sara_h3"] == pytest.approx(float(rows["sara_h3"]["p50_ms"]) / float(rows["teacher_h1"]["p50_ms"]),
                                             rel=1e-3)
