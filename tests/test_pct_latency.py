"""`benchmarks/pct_latency.py` runs end to end at its smallest settings and writes its files."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
POINTS = (64, 128)


@pytest.mark.slow
def test_pct_latency_quick(tmp_path):
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "pct_latency.py"), "--quick",
         "--points", *map(str, POINTS), "--out-dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| points | softmax keras |" in proc.stdout  # the table goes to stdout
    for name in ("latency.csv", "latency.json", "latency.png", "latency.md"):
        assert (tmp_path / name).stat().st_size > 0, name

    with open(tmp_path / "latency.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    seen = {(r["network"], r["runtime"], r["attention"], int(r["points"])) for r in rows}
    assert seen == {
        (network, runtime, attention, n)
        for network in ("encoder", "policy") for runtime in ("keras", "tflite")
        for attention in ("softmax", "sara") for n in POINTS
    }
    for r in rows:
        assert r["status"] == "ok", r
        for key in ("p50_ms", "p90_ms", "mean_ms"):
            value = float(r[key])
            assert math.isfinite(value) and value > 0, (key, r)
        assert r["p99_ms"] == ""  # too few runs for a p99
        if r["runtime"] == "tflite":
            assert float(r["rel_error"]) < 1e-4 and int(r["file_bytes"]) > 0, r

    payload = json.loads((tmp_path / "latency.json").read_text())
    derived = payload["derived"]
    assert set(derived["targets"]) == {
        "tflite_policy_softmax_over_sara_at_8192", "tflite_policy_sara_t8192_over_t1024",
    }
    speedups = derived["speedup_softmax_over_sara"]["tflite_policy"]
    assert all(speedups[str(n)] > 0 for n in POINTS)
    # SARA files hold no softmax; no point exported a gather or Flex op
    assert "SOFTMAX" not in derived["op_histograms"]["policy/sara"]
    assert derived["op_histograms"]["policy/softmax"]["SOFTMAX"] > 0
    assert derived["op_notes"] == [] and derived["op_histograms_vary_with_points"] == []
    assert len(payload["machine"]["loadavg_start"]) == 3 and payload["command"]
