"""The PCT grasping experiment (examples/pct_grasping.py) and its policy inputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "grasping"))

import policy as grasp_policy  # noqa: E402


def _observation(n=32, valid=32, seed=0):
    rng = np.random.default_rng(seed)
    points = np.zeros((n, 3), np.float32)
    points[:valid] = rng.normal([0.6, 0.0, -0.15], 0.05, (valid, 3))
    mask = np.arange(n) < valid
    gripper = np.array([0.55, 0.0, 0.3, 0.0, 1.0, 0.1], np.float32)
    return {"points": points, "mask": mask, "gripper": gripper}


def test_policy_inputs_are_gripper_relative_and_batched():
    obs = _observation()
    inputs = grasp_policy.policy_inputs(obs)
    assert inputs["points"].shape == (1, 32, 3) and inputs["mask"].shape == (1, 32)
    expected = (obs["points"] - obs["gripper"][:3]) * grasp_policy.POINT_SCALE
    np.testing.assert_allclose(inputs["points"][0], expected, rtol=1e-6)
    np.testing.assert_array_equal(inputs["extra"][0], obs["gripper"])


def test_padded_nan_points_are_cleared_and_do_not_change_the_action():
    obs = _observation(valid=20)
    with_nan = dict(obs, points=obs["points"].copy())
    with_nan["points"][20:] = np.nan  # padding may hold anything
    a, b = grasp_policy.policy_inputs(obs), grasp_policy.policy_inputs(with_nan)
    np.testing.assert_array_equal(a["points"], b["points"])
    assert np.all(b["points"][0, 20:] == 0)
    model = grasp_policy.build_policy("sara", 32)
    np.testing.assert_array_equal(np.asarray(model(a)), np.asarray(model(b)))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda o: o["points"].__setitem__((3, 0), np.nan), "non-finite point"),
        (lambda o: o["mask"].__setitem__(slice(None), False), "no valid point"),
        (lambda o: o.__setitem__("mask", o["mask"][:10]), "`mask` must have shape"),
        (lambda o: o.__setitem__("points", o["points"][:, :2]), "`points` must have shape"),
        (lambda o: o.__setitem__("gripper", o["gripper"][:3]), "`gripper` must have shape"),
        (lambda o: o["gripper"].__setitem__(0, np.inf), "`gripper` must be finite"),
    ],
)
def test_bad_observations_raise_clear_errors(change, message):
    obs = _observation()
    change(obs)
    with pytest.raises(ValueError, match=message):
        grasp_policy.policy_inputs(obs)


def test_subsample_prefers_valid_points_and_pads_short_clouds():
    sys.path.insert(0, str(ROOT / "examples"))
    import pct_grasping

    rng = np.random.default_rng(0)
    points = rng.normal(size=(2, 50, 3)).astype("float32")
    mask = np.zeros((2, 50), bool)
    mask[0, :40] = True  # 40 valid: subsample 16 of them
    mask[1, :5] = True  # 5 valid: keep all 5, pad 11
    out, out_mask = pct_grasping.subsample(points, mask, 16, rng)
    assert out.shape == (2, 16, 3) and out_mask[0].all() and out_mask[1].sum() == 5
    assert all(any(np.array_equal(p, q) for q in points[0, :40]) for p in out[0])
    assert np.all(out[1][~out_mask[1]] == 0)
    assert sorted(map(tuple, out[1][out_mask[1]])) == sorted(map(tuple, points[1, :5]))


QUICK_ARGS = ["--quick", "--demos", "2", "--perturbed-episodes", "2", "--teacher-epochs", "1", "--episodes", "2"]


def _run(args, out_dir):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "pct_grasping.py"), *args, "--out-dir", str(out_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "KERAS_BACKEND": "tensorflow"},
    )
    return proc


@pytest.mark.slow
def test_quick_run_end_to_end_and_resume(tmp_path):
    out = tmp_path / "run"
    proc = _run(QUICK_ARGS, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    table = results["closed_loop"]["policies"]
    assert set(table) == {"random", "expert", "teacher", "converted", "sara", "sara_tflite"}
    for row in table.values():
        assert row["episodes"] == 2 and 0.0 <= row["success"] <= 1.0 and row["low"] <= row["success"] <= row["high"]
    # the same seeds for every policy
    seeds = {name: [e["seed"] for e in json.loads((out / "episodes" / f"{name}.json").read_text())]
             for name in table}
    assert all(s == seeds["teacher"] for s in seeds.values())
    # the SARA files: verified against Keras, builtins only, no softmax left
    export = results["export"]
    assert set(export) == {"float32", "float16", "dynamic", "int8"}
    assert export["float32"]["relative_error_vs_keras"] < 1e-4
    assert all(e["flex_ops"] == [] and e["softmax_ops"] == 0 for e in export.values())
    assert export["float32"]["action_vs_keras"]["mae"] < 1e-4
    assert (out / "success.png").stat().st_size > 0 and "| sara_tflite |" in (out / "results.md").read_text()
    assert results["training"]["uptrain"]["steps"] > 0

    # a second run with the same settings loads every stage instead of redoing it
    again = _run(QUICK_ARGS, out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "teacher: loaded" in again.stderr and "SARA policy: loaded" in again.stderr
    assert "LiteRT files: loaded" in again.stderr
    assert "over 1 episodes" not in again.stderr  # no episode replayed
    assert json.loads((out / "results.json").read_text())["closed_loop"] == results["closed_loop"]

    # other settings in the same directory are refused unless --fresh
    other = _run([*QUICK_ARGS[:-1], "3"], out)
    assert other.returncode != 0 and "episodes differ" in other.stderr and "--fresh" in other.stderr
