"""The pybullet grasping data pipeline (examples/grasping): real simulator, no gym."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "grasping"))

import env as grasp_env  # noqa: E402


def test_resample_pads_and_masks_short_clouds_and_subsamples_long_ones():
    rng = np.random.default_rng(0)
    short = rng.normal(size=(10, 3)).astype("float32")
    points, mask = grasp_env.resample(short, 16, rng)
    assert points.shape == (16, 3) and mask.shape == (16,)
    assert mask.sum() == 10 and np.all(points[~mask] == 0) and np.isfinite(points).all()
    long = rng.normal(size=(100, 3)).astype("float32")
    points, mask = grasp_env.resample(long, 16, rng)
    assert mask.all() and all(any(np.array_equal(p, q) for q in long) for p in points)
    points, mask = grasp_env.resample(np.zeros((0, 3), "float32"), 8, rng)
    assert not mask.any() and np.all(points == 0)


@pytest.mark.slow
def test_collect_one_demonstration_without_gym(tmp_path):
    code = (
        "import sys, runpy; sys.argv = ['collect.py', '--demos', '1', '--num-points', '256', "
        f"'--camera', '64', '--cache-dir', {str(tmp_path)!r}, '--no-progress', '--max-episodes', '6']; "
        f"runpy.run_path({str(ROOT / 'examples/grasping/collect.py')!r}, run_name='__main__'); "
        "print('gym loaded:', any(m == 'gym' or m.startswith('gym.') for m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "KERAS_BACKEND": "tensorflow"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "gym loaded: False" in proc.stdout
    (cache,) = list(tmp_path.glob("*.npz"))
    data = np.load(cache)
    assert data["points"].shape[1:] == (256, 3) and data["actions"].shape[1] == 3
    assert np.isfinite(data["points"]).all() and data["mask"].any()
    assert data["tried_success"].any()  # only successful episodes are recorded
    assert len(data["demo_seeds"]) == 1 and set(data["episode"]) == {0}
