"""examples/vla_grasping.py --quick: the PaliGemma pipeline end to end (data, teachers, SARA, closed loop), resumed."""

import json
import os
import subprocess
import sys

import pytest

from tests.backend_utils import backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(backend() != "tensorflow", reason="the grasping examples run on TensorFlow")


def _run(out_dir, *extra):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "vla_grasping.py"), "--quick", "--interfaces", "tokens",
         "--out-dir", str(out_dir), *extra],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=1500,
    )


@pytest.mark.slow
def test_quick_pipeline_runs_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "vla"
    first = _run(out)
    assert first.returncode == 0, first.stderr[-4000:]
    results = json.load(open(out / "results.json"))
    names = ["teacher_tokens_h3", "sara-vit_tokens_h3", "sara-vitdec_tokens_h3"]
    assert list(results["closed_loop"]["policies"]) == names
    for name in names:
        episodes = json.load(open(out / "episodes" / f"{name}.json"))
        assert [e["seed"] for e in episodes] == [e["seed"] for e in json.load(open(out / "episodes" / f"{names[0]}.json"))]
        assert len(episodes) == results["config"]["episodes"]
        assert 0 <= results["offline"][name]["mse"] < 10
    assert results["training"]["sara-vitdec_tokens_h3"]["converted_layers"][-1].endswith("decoder_block_1/attention")
    assert (out / "results.md").exists() and (out / "success.png").exists()

    again = _run(out)  # every stage's product is on disk: nothing is trained again
    assert again.returncode == 0, again.stderr[-4000:]
    assert "teacher_tokens_h3: loaded" in again.stderr and "up-training" not in again.stderr
    refused = _run(out, "--lr", "0.5")
    assert refused.returncode != 0 and "other settings" in refused.stderr
