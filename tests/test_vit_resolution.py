"""`benchmarks/vit_resolution.py` runs end to end at its smallest settings and writes its files."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIZES = (32, 64)  # 4 and 16 tokens at patch 16
TOKENS = (4, 16)


@pytest.mark.slow
def test_vit_resolution_quick(tmp_path):
    import keras_hub  # noqa: F401  (make test installs it: missing must fail, not skip)
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "vit_resolution.py"), "--quick", "--layers", "1",
         "--sizes", *map(str, SIZES), "--out-dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| image | tokens | softmax keras |" in proc.stdout  # the table goes to stdout
    for name in ("resolution.csv", "resolution.json", "resolution.png", "resolution.md"):
        assert (tmp_path / name).stat().st_size > 0, name

    with open(tmp_path / "resolution.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    seen = {(r["runtime"], r["attention"], int(r["image_size"]), int(r["tokens"])) for r in rows}
    assert seen == {
        (runtime, attention, size, n)
        for runtime in ("keras", "tflite") for attention in ("softmax", "sara")
        for size, n in zip(SIZES, TOKENS)
    }
    for r in rows:
        assert r["status"] == "ok" and r["memory_status"] == "ok", r
        for key in ("p50_ms", "p90_ms", "mean_ms", "peak_mb", "baseline_mb"):
            value = float(r[key])
            assert math.isfinite(value) and value > 0, (key, r)
        assert r["peak_source"] == "VmHWM", r  # Linux: the per-process high-water mark, reset
        if r["runtime"] == "tflite":
            assert float(r["rel_error"]) < 1e-4 and int(r["file_bytes"]) > 0, r

    payload = json.loads((tmp_path / "resolution.json").read_text())
    derived = payload["derived"]
    for section in ("latency_growth", "memory_growth"):
        for key in ("keras_softmax", "keras_sara", "tflite_softmax", "tflite_sara"):
            g = derived[section][key]
            assert g["token_ratio"] == TOKENS[-1] / TOKENS[0], (section, key)
            assert math.isfinite(g["slope_overall"]) and g["ratio_max_over_min"] > 0, (section, key)
            assert g["verdict"] != "not measured" and math.isfinite(g["slope_large"]), (section, key)
    for runtime in ("keras", "tflite"):
        assert all(derived["speedup_softmax_over_sara"][runtime][str(n)] > 0 for n in TOKENS)
        assert all(derived["memory_softmax_over_sara"][runtime][str(n)] > 0 for n in TOKENS)
    assert len(derived["summary"]) == 4 and derived["op_notes"] == []
    # SARA files hold no softmax; softmax files do
    assert "SOFTMAX" not in derived["op_histograms"]["sara"]
    assert derived["op_histograms"]["softmax"]["SOFTMAX"] > 0
    assert payload["config"]["vit_config"]["num_layers"] == 1 and payload["command"]
    assert len(payload["machine"]["loadavg_start"]) == 3
    assert set(payload["machine"]["loadavg_after_each_size"]) == {str(s) for s in SIZES}
