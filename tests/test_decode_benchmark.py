"""`benchmarks/decode_latency.py`: the quick sweep writes its files, and decode memory is flat for SARA only.

Checks computed figures (tensor sizes, shapes, statuses), never wall-clock times.
"""

import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "decode_latency.py"
ENV = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
# 10^6 tokens: a KV cache of 0.5 GB for the quick model, over --memory-limit-gb 2 with
# the runtime estimate, while the SARA state stays 4 KiB
CONTEXTS = (32, 256, 1_000_000)
COLUMNS = [
    "model", "context", "attention", "max_length", "status", "median_ms", "p90_ms", "mean_ms", "min_ms", "steps",
    "first_call_s", "traces", "state_shape", "state_bytes", "peak_rss_mb", "ru_maxrss_mb",
    "rss_before_state_mb", "logits_finite", "loadavg_1m", "worker_s",
]


def _run(args, timeout=600):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def test_bad_arguments_are_refused(tmp_path):
    proc = _run(["--steps", "0", "--out-dir", str(tmp_path / "a")], timeout=120)
    assert proc.returncode != 0 and "`--steps` must be >= 1. Received: 0" in proc.stderr
    proc = _run(["--hidden", "100", "--heads", "8", "--out-dir", str(tmp_path / "b")], timeout=120)
    assert proc.returncode != 0 and "Received: hidden=100, heads=8" in proc.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_worker_killed_for_memory_is_reported():
    sys.path.insert(0, str(ROOT))
    from benchmarks.decode_latency import _exit_text

    assert _exit_text(-signal.SIGKILL) == "error: worker killed by SIGKILL: out of memory? (the kernel's OOM killer)"
    assert _exit_text(1) == "error: worker exited with status 1"


@pytest.mark.slow
def test_quick_sweep(tmp_path):
    import keras_hub  # noqa: F401  (make test installs it: missing must fail, not skip)

    proc = _run(["--quick", "--contexts", *map(str, CONTEXTS), "--memory-limit-gb", "2", "--out-dir", str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| context | softmax ms/token (p50 / p90) | SARA ms/token (p50 / p90) |" in proc.stdout
    assert "[6/6] sara context=1,000,000:" in proc.stdout  # progress lines
    for name in ("decode_latency.csv", "decode_latency.json", "decode_latency.md", "decode_latency.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # atomic writes leave no temporaries

    with open(tmp_path / "decode_latency.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = {(r["model"], int(r["context"])): r for r in reader}
    assert set(rows) == {(m, n) for m in ("softmax", "sara") for n in CONTEXTS}

    big = rows["softmax", CONTEXTS[-1]]
    assert big["status"].startswith("skipped: too big for RAM") and big["median_ms"] == "", big
    ran = {k: r for k, r in rows.items() if k != ("softmax", CONTEXTS[-1])}
    for (model, n), r in ran.items():
        assert r["status"] == "ok", r
        assert r["traces"] == "1" and r["steps"] == "8" and r["logits_finite"] == "True", r
        for key in ("median_ms", "p90_ms", "peak_rss_mb", "ru_maxrss_mb"):
            assert math.isfinite(float(r[key])) and float(r[key]) > 0, (key, r)
        assert float(r["median_ms"]) <= float(r["p90_ms"]), r
    assert {rows["sara", n]["attention"] for n in CONTEXTS} == {"SARALlamaAttention"}
    assert {rows["softmax", n]["attention"] for n in CONTEXTS[:2]} == {"LlamaAttention"}

    # quick model: 2 layers, 2 key/value heads of dim 16; 8 timed steps
    for n in CONTEXTS:
        assert rows["softmax", n]["state_shape"] == f"1x2x2x{n + 8}x2x16"
        assert int(rows["softmax", n]["state_bytes"]) == 4 * 2 * 2 * (n + 8) * 2 * 16
    sara_bytes = {int(rows["sara", n]["state_bytes"]) for n in CONTEXTS}
    assert len(sara_bytes) == 1 and {rows["sara", n]["state_shape"] for n in CONTEXTS} == {"1x2x2x16x17"}
    softmax_bytes = [int(rows["softmax", n]["state_bytes"]) for n in CONTEXTS]
    assert softmax_bytes == sorted(softmax_bytes) and softmax_bytes[0] < softmax_bytes[1] < softmax_bytes[2]
    assert softmax_bytes[1] > sara_bytes.pop()

    payload = json.loads((tmp_path / "decode_latency.json").read_text())
    targets = payload["derived"]["targets"]
    assert targets["sara_state_bytes_max_over_min"] == {"value": 1.0, "target": "== 1", "met": True}
    assert targets["softmax_cache_bytes_max_over_min"]["value"] == pytest.approx(264 / 40)  # ran points only
    assert targets["softmax_cache_bytes_max_over_min"]["met"] is True
    assert targets["sara_latency_4096_over_64"]["met"] is None  # neither context in the quick sweep
    assert payload["config"]["jit_compile"] is False and payload["config"]["steps"] == 8
    machine = payload["machine"]
    assert machine["tensorflow"] and machine["keras_hub"] and len(machine["loadavg_start"]) == 3
    assert payload["command"].startswith("python benchmarks/decode_latency.py --quick")
    md = (tmp_path / "decode_latency.md").read_text()
    assert "skipped (RAM)" in md and "sara_state_bytes_max_over_min: 1.000 (target == 1: met)" in md
