"""The RT-2-style image policy (examples/grasping/image_policy.py) and its experiment (examples/rt2_grasping.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "grasping"))

import image_policy as ip  # noqa: E402

S = ip.IMAGE_SIZE


def _frame(value=0):
    return np.full((S, S, 3), value, np.uint8)


def _inputs(history, batch=2, seed=0, mask=None):
    rng = np.random.default_rng(seed)
    return {
        "images": rng.integers(0, 256, (batch, history, S, S, 3)).astype(np.uint8),
        "frame_mask": np.ones((batch, history), bool) if mask is None else np.asarray(mask, bool),
        "instruction": np.repeat(ip.tokenize(ip.INSTRUCTION)[None], batch, 0),
        "gripper": rng.normal(size=(batch, 6)).astype(np.float32),
    }


def test_tokenize_maps_words_and_pads():
    ids = ip.tokenize("Pick up the BANANA")
    assert ids.shape == (ip.MAX_WORDS,) and ids.dtype == np.int32
    assert list(ids[:4]) == [ip.VOCABULARY.index("pick"), ip.VOCABULARY.index("up"), ip.VOCABULARY.index("the"), 1]
    assert np.all(ids[4:] == 0)
    with pytest.raises(ValueError, match="instruction"):
        ip.tokenize("  ")
    with pytest.raises(ValueError, match="at most 8"):
        ip.tokenize("pick " * 9)


def test_short_histories_are_padded_at_the_front_and_masked():
    images, mask = ip.stack_history([_frame(1), _frame(2)], history=3)
    assert images.shape == (3, S, S, 3) and list(mask) == [False, True, True]
    assert np.all(images[0] == 0) and np.all(images[1] == 1) and np.all(images[2] == 2)
    images, mask = ip.stack_history([_frame(i) for i in range(5)], history=3)  # the last three, oldest first
    assert mask.all() and [int(f[0, 0, 0]) for f in images] == [2, 3, 4]
    frames = ip.FrameHistory(3)
    frames.reset()
    images, mask = frames.push(_frame(9))
    assert list(mask) == [False, False, True] and np.all(images[2] == 9)
    frames.reset()
    assert list(frames.push(_frame(1))[1]) == [False, False, True]


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((32, 32, 3), np.uint8), r"must be 64x64 pixels.*\(32, 32, 3\)"),
        (np.zeros((S, S, 4), np.uint8), r"drop an alpha channel.*\(64, 64, 4\)"),
        (np.zeros((S, S), np.uint8), r"one RGB frame.*\(64, 64\)"),
        (np.full((S, S, 3), 300.0), "0..255"),
        (np.full((S, S, 3), np.nan), "0..255"),
    ],
)
def test_bad_images_raise_clear_errors(image, message):
    with pytest.raises(ValueError, match=message):
        ip.FrameHistory(3).push(image)


def test_bad_history_and_gripper_raise():
    with pytest.raises(ValueError, match="history=0"):
        ip.stack_history([_frame()], history=0)
    with pytest.raises(ValueError, match="frames=\\[\\]"):
        ip.stack_history([], history=2)
    with pytest.raises(ValueError, match="gripper"):
        ip.image_inputs(ip.stack_history([_frame()], 1), np.zeros(5))
    with pytest.raises(ValueError, match="history"):
        ip.build_image_policy(history=0)
    with pytest.raises(ValueError, match="image_size=40"):
        ip.build_image_policy(history=1, image_size=40)


def test_history_index_follows_episodes():
    episode = np.array([0, 0, 0, 1, 1])
    step = np.array([0, 1, 2, 0, 1])
    np.testing.assert_array_equal(
        ip.history_index(episode, step, 3),
        [[-1, -1, 0], [-1, 0, 1], [0, 1, 2], [-1, -1, 3], [-1, 3, 4]],
    )
    with pytest.raises(ValueError, match="episode by episode"):
        ip.history_index(np.array([0, 1, 0]), np.array([0, 1, 2]), 2)
    hist = ip.history_index(episode, step, 2)
    images = np.stack([_frame(i + 1) for i in range(5)])
    batch = ip.batch_inputs(images, np.zeros((5, 6), np.float32), np.array([0, 4]), hist, ip.tokenize(ip.INSTRUCTION))
    assert batch["images"].shape == (2, 2, S, S, 3)
    assert batch["frame_mask"].tolist() == [[False, True], [True, True]]
    assert np.all(batch["images"][0, 0] == 0) and np.all(batch["images"][1, 0] == 4)


def test_masked_frames_do_not_change_the_action_teacher_and_converted():
    import keras_sara

    teacher = ip.build_image_policy(history=3)
    x = _inputs(3, mask=[[False, True, True], [False, False, True]])
    changed = dict(x, images=x["images"].copy())
    changed["images"][:, 0] = 7  # a padded frame, any pixels
    y = np.asarray(teacher.predict_on_batch(x))
    assert y.shape == (2, 3) and np.all(np.abs(y) <= 1)
    np.testing.assert_array_equal(y, np.asarray(teacher.predict_on_batch(changed)))
    # unmasking the frame does change it (the mask is what hides it)
    assert np.abs(np.asarray(teacher.predict_on_batch(dict(x, frame_mask=np.ones((2, 3), bool)))) - y).max() > 1e-4
    for select, count in ((ip.vit_attention, 3), (ip.fuser_attention, 5)):
        sara, report = keras_sara.convert(teacher, layers=select)
        assert len(report.converted) == count
        np.testing.assert_array_equal(np.asarray(sara.predict_on_batch(x)), np.asarray(sara.predict_on_batch(changed)))


def test_vit_only_conversion_keeps_fuser_softmax_and_every_weight(tmp_path):
    import keras

    import keras_sara

    teacher = ip.build_image_policy(history=1)
    sara, report = keras_sara.convert(teacher, layers=ip.vit_attention)
    assert all(c.path.startswith("vit/") for c in report.converted) and len(report.converted) == 3
    assert sorted(s.path for s in report.skipped) == ["fuser_0_attention", "fuser_1_attention"]
    assert sara.count_params() == teacher.count_params()
    path = tmp_path / "sara.keras"
    sara.save(path)
    x = _inputs(1)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(np.asarray(loaded.predict_on_batch(x)), np.asarray(sara.predict_on_batch(x)), atol=1e-6)


def _run(args, out_dir):
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "rt2_grasping.py"), *args, "--out-dir", str(out_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "KERAS_BACKEND": "tensorflow"},
    )


def test_bad_arguments_are_refused(tmp_path):
    proc = _run(["--quick", "--camera", "40"], tmp_path / "a")
    assert proc.returncode != 0 and "--camera must be a multiple of 16" in proc.stderr
    proc = _run(["--quick", "--policies", "teacher_h2"], tmp_path / "b")
    assert proc.returncode != 0 and "unknown ['teacher_h2']" in proc.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _rt2():
    sys.path.insert(0, str(ROOT / "examples"))
    import rt2_grasping

    return rt2_grasping


def test_distillation_targets_mix_expert_and_teacher_on_training_frames_only():
    rt2 = _rt2()
    rng = np.random.default_rng(0)
    n = 10
    data = {"image": rng.integers(0, 256, (n, 16, 16, 3)).astype(np.uint8),
            "gripper": rng.normal(size=(n, 6)).astype(np.float32),
            "actions": rng.uniform(-1, 1, (n, 3)).astype(np.float32),
            "episode": np.repeat([0, 1], 5), "step": np.tile(np.arange(5), 2)}
    hist = ip.history_index(data["episode"], data["step"], 2)
    teacher = ip.build_image_policy(2, image_size=16, seed=3)
    train_index = np.array([0, 2, 3, 7, 9])
    original = data["actions"].copy()
    targets = rt2.distillation_targets(teacher, data, hist, train_index, weight=0.25, batch=2)
    predicted = teacher.predict(rt2.frames_at(data, hist, train_index), verbose=0)
    expected = 0.75 * data["actions"][train_index] + 0.25 * predicted
    np.testing.assert_allclose(targets[train_index], expected, rtol=1e-5, atol=1e-6)
    held_out = np.setdiff1d(np.arange(n), train_index)
    np.testing.assert_array_equal(targets[held_out], data["actions"][held_out])  # held-out labels untouched
    assert not np.allclose(targets[train_index], data["actions"][train_index])
    np.testing.assert_array_equal(data["actions"], original)  # the expert's labels are not modified in place


def test_fresh_uptraining_drops_sara_files_and_keeps_teachers(tmp_path):
    rt2 = _rt2()
    cfg = dict(rt2.FULL, histories=[1])
    (tmp_path / "episodes").mkdir()
    names = ["teacher_h1.keras", "teacher_h1.tflite", "converted_h1.keras", "sara_h1.keras", "sara_h1.tflite"]
    episodes = ["teacher_h1.json", "teacher_h1.part0of2.json", "sara_h1.json", "sara_h1_tflite.part1of2.json"]
    for name in names:
        (tmp_path / name).write_text("x")
    for name in episodes:
        (tmp_path / "episodes" / name).write_text("[]")
    for name in ("training.json", "export.json"):
        (tmp_path / name).write_text(json.dumps({"teacher_h1": {"steps": 3}, "sara_h1": {"steps": 1}}))
    (tmp_path / "run_config.json").write_text(json.dumps(cfg))

    with pytest.raises(SystemExit, match="episodes changed too"):  # other settings: nothing deleted
        rt2.drop_uptraining(str(tmp_path), dict(cfg, episodes=5, distill=0.5))
    assert all((tmp_path / n).exists() for n in names)

    rt2.drop_uptraining(str(tmp_path), dict(cfg, distill=0.5, uptrain_fraction=0.5))
    assert sorted(p.name for p in tmp_path.glob("*.*") if p.suffix in (".keras", ".tflite")) == [
        "teacher_h1.keras", "teacher_h1.tflite"]
    assert sorted(p.name for p in (tmp_path / "episodes").iterdir()) == ["teacher_h1.json", "teacher_h1.part0of2.json"]
    for name in ("training.json", "export.json"):
        assert json.loads((tmp_path / name).read_text()) == {"teacher_h1": {"steps": 3}}
    assert json.loads((tmp_path / "run_config.json").read_text())["distill"] == 0.5
    rt2.prepare_out_dir(str(tmp_path), dict(cfg, distill=0.5, uptrain_fraction=0.5), fresh=False)  # now accepted


# H = 3 only, to keep the suite short: H = 1 takes the same code path (history_index, masks, export)
QUICK_ARGS = ["--quick", "--histories", "3", "--demos", "2", "--perturbed-episodes", "2", "--teacher-epochs", "1",
              "--episodes", "2"]


@pytest.mark.slow
def test_quick_run_end_to_end_and_resume(tmp_path):
    out = tmp_path / "run"
    proc = _run(QUICK_ARGS, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    table = results["closed_loop"]["policies"]
    assert list(table) == ["teacher_h3", "sara_h3", "teacher_h3_tflite", "sara_h3_tflite"]
    for row in table.values():
        assert row["episodes"] == 2 and row["low"] <= row["success"] <= row["high"]
    seeds = {n: [e["seed"] for e in json.loads((out / "episodes" / f"{n}.json").read_text())] for n in table}
    assert all(s == seeds["teacher_h3"] for s in seeds.values())
    for h in (3,):
        teacher, sara = results["export"][f"teacher_h{h}"], results["export"][f"sara_h{h}"]
        assert teacher["flex_ops"] == [] and sara["flex_ops"] == []
        assert teacher["action_vs_keras"]["mae"] < 1e-4 and sara["action_vs_keras"]["mae"] < 1e-4
        # the ViT's 3 softmaxes are gone from the SARA file, the fuser's 2 stay
        assert teacher["softmax_ops"] == 5 and sara["softmax_ops"] == 2
        assert results["training"][f"sara_h{h}"]["steps"] > 0
        assert len(results["training"][f"sara_h{h}"]["converted_layers"]) == 3
    assert (out / "success.png").stat().st_size > 0 and "| 3 | sara | LiteRT |" in (out / "results.md").read_text()

    again = _run(QUICK_ARGS, out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "teacher H=3: loaded" in again.stderr and "SARA H=3: loaded" in again.stderr
    assert "over 1 episodes" not in again.stderr  # no episode replayed
    assert json.loads((out / "results.json").read_text())["closed_loop"] == results["closed_loop"]

    other = _run([*QUICK_ARGS[:-1], "3"], out)  # --episodes 3
    assert other.returncode != 0 and "episodes differ" in other.stderr and "--fresh" in other.stderr

    # --fresh-uptraining (teachers kept, SARA redone) is checked without a third run, on
    # prepare_out_dir (test_fresh_uptraining_drops_sara_files_and_keeps_teachers) and on the
    # distillation targets (test_distillation_targets_mix_expert_and_teacher_on_training_frames_only)
