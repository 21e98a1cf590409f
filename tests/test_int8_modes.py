"""`benchmarks/int8_modes.py`: every export variant is verified, timed and reported; bad arguments are refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.backend_utils import backend

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "int8_modes.py"
ENV = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}

pytestmark = pytest.mark.skipif(backend() != "tensorflow", reason="export runs on the TensorFlow backend")


def _run(args, timeout=900):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def test_bad_arguments_are_refused(tmp_path):
    for args, message in ((["--threads", "0"], "`--threads` must be positive integers. Received: [0]"),
                          (["--seconds", "0"], "`--seconds` must be positive. Received: 0.0"),
                          (["--probes", "0"], "`--probes` must be >= 1. Received: 0"),
                          (["--rounds", "0"], "`--rounds` must be >= 1. Received: 0"),
                          (["--variants", "split int4"], "argument --variants: invalid choice: 'split int4'")):
        proc = _run([*args, "--out-dir", str(tmp_path / "out")], timeout=300)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_small_run_reports_every_variant(tmp_path):
    from keras_sara.export import DEFAULT_INT8_FLOAT_OPS

    # --no-full-int8: full integer export is covered by tests/test_export.py (int8_float_ops=())
    proc = _run(["--tokens", "64", "--threads", "1", "--seconds", "0.2", "--no-full-int8", "--out-dir", str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((tmp_path / "int8_modes.json").read_text())
    rows = {r["variant"]: r for r in payload["rows"]}
    assert set(rows) == {"split float32", "split float16", "split dynamic", "split int8", "split int8_elementwise",
                         "unfolded float32", "unfolded int8", "flat float32", "flat int8"}
    assert all(r["p50_ms"] > 0 and r["runs"] >= 3 for r in rows.values())
    assert rows["split float32"]["rel_error"] <= 1e-4 and rows["flat float32"]["rel_error"] <= 1e-4
    selective = rows["split int8"]["float_ops"]
    assert "BATCH_MATMUL" in selective and "FULLY_CONNECTED" not in selective
    assert set(selective) <= set(DEFAULT_INT8_FLOAT_OPS)
    assert "MUL" not in rows["split int8_elementwise"]["float_ops"]
    # LayerNorm scale and shift folded away: fewer operators than the unfolded export
    assert rows["split float32"]["ops"] < rows["unfolded float32"]["ops"]
    assert rows["unfolded float32"]["rel_error"] <= 1e-4
    # the per-head layout has more operators than the flat one (a projection per head)
    assert rows["split float32"]["ops"] > rows["flat float32"]["ops"]
    assert payload["speedup_over_split_float32"]["1"]["split float32"] == 1.0
    table = (tmp_path / "int8_modes.md").read_text()
    assert "| variant |" in table and "| split int8 |" in table and "| unfolded int8 |" in table
    assert "split int8_full" not in table


def test_rounds_report_each_rounds_speedup(tmp_path):
    proc = _run(["--tokens", "32", "--threads", "1", "--seconds", "0.1", "--no-full-int8", "--variants", "split int8",
                 "--rounds", "3", "--mlp-ratio", "2", "--out-dir", str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((tmp_path / "int8_modes.json").read_text())
    assert payload["config"]["variants"] == ["split float32", "split int8"]  # the baseline is always timed
    assert payload["config"]["mlp_ratio"] == 2
    rows = {r["variant"]: r for r in payload["rows"]}
    assert set(rows) == {"split float32", "split int8"}
    for r in rows.values():
        assert len(r["round_p50_ms"]) == 3 and r["p50_ms"] == sorted(r["round_p50_ms"])[1]
    per_round = payload["speedup_per_round"]["1"]["split int8"]
    base, int8 = rows["split float32"]["round_p50_ms"], rows["split int8"]["round_p50_ms"]
    assert per_round == pytest.approx([b / v for b, v in zip(base, int8)])
    assert (tmp_path / "int8_rounds.png").stat().st_size > 0
    table = (tmp_path / "int8_modes.md").read_text()
    assert "MLP ratio 2" in table and "x per round 1t" in table
    assert f"{min(per_round):.2f}-{max(per_round):.2f}" in table
