"""Choose the RT-2 image policy's up-training settings on held-out frames, before any closed loop.

Up-trains SARA students of the softmax teachers that `examples/rt2_grasping.py`
saved (its `--out-dir`), once per setting of `--fractions` (up-training
steps as a fraction of the teacher's) x `--distill` (weight of the teacher's
action in the target), with everything else as `rt2_grasping.py` does it.
Scores each student on the held-out frames the teacher never saw: action MSE
against the expert (the task) and against the teacher (what "keeps the
teacher's success" needs). Closed-loop seeds are never touched, so choosing
by these figures does not tune on the test episodes.

Writes `uptraining_sweep.json` and `uptraining_sweep.md` under `--out-dir`.

Run (after `python examples/rt2_grasping.py` has trained the teachers):
    python examples/rt2_uptraining_sweep.py --histories 1 --fractions 0.25 0.5 --distill 0 0.5
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rt2_grasping as rt2  # noqa: E402  (sets up paths and the backend)
from closed_loop import write_json  # noqa: E402
from keras_sara.utils import atomic_write  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default=rt2.OUT_DIR, help="rt2_grasping.py's --out-dir (its teachers and config)")
    p.add_argument("--histories", type=int, nargs="+", default=[1])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--distill", type=float, nargs="+", default=[0.0, 0.5])
    args = p.parse_args(argv)
    import json

    import keras

    from image_policy import history_index, policy_layers

    cfg = json.load(open(os.path.join(args.out_dir, "run_config.json")))
    teacher_steps = {k: v["steps"] for k, v in json.load(open(os.path.join(args.out_dir, "training.json"))).items()
                     if k.startswith("teacher_")}
    policy_layers()
    data, _ = rt2.load_demonstrations(cfg, images=True, log=rt2.log)
    train_index, val_index = rt2.split_frames(data, cfg["validation_fraction"])
    rows = []
    for h in args.histories:
        hist = history_index(data["episode"], data["step"], h)
        teacher = keras.saving.load_model(os.path.join(args.out_dir, f"teacher_h{h}.keras"))
        val_frames, val_actions = rt2.frames_at(data, hist, val_index), data["actions"][val_index]
        val = rt2.make_dataset(data, hist, val_index, cfg["batch_size"], seed=0, shuffle=False)
        probe = {k: v[:16] for k, v in val_frames.items()}
        teacher_val = np.asarray(teacher.predict(val_frames, batch_size=64, verbose=0))
        rows.append({"history": h, "policy": "teacher", "mse_expert": float(np.mean((teacher_val - val_actions) ** 2)),
                     "mse_teacher": 0.0})
        for distill in args.distill:
            targets = (rt2.distillation_targets(teacher, data, hist, train_index, distill) if distill > 0 else None)
            for fraction in args.fractions:
                train = rt2.make_dataset(data, hist, train_index, cfg["batch_size"], seed=h, shuffle=True,
                                         targets=targets)
                steps = max(1, int(round(fraction * teacher_steps[f"teacher_h{h}"])))
                start = time.perf_counter()
                sara, info = rt2.uptrain(dict(cfg, distill=distill), teacher, train, val, probe, steps)
                predicted = np.asarray(sara.predict(val_frames, batch_size=64, verbose=0))
                row = {"history": h, "policy": "sara", "fraction": fraction, "distill": distill, "steps": info["steps"],
                       "mse_expert": float(np.mean((predicted - val_actions) ** 2)),
                       "mse_teacher": float(np.mean((predicted - teacher_val) ** 2)),
                       "seconds": time.perf_counter() - start}
                rt2.log(f"H={h} fraction {fraction} distill {distill}: held-out MSE vs expert "
                        f"{row['mse_expert']:.4f}, vs teacher {row['mse_teacher']:.4f} ({row['seconds']:.0f} s)")
                rows.append(row)
                keras.backend.clear_session()
    write_json(os.path.join(args.out_dir, "uptraining_sweep.json"),
               {"command": "python examples/rt2_uptraining_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv),
                "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows})
    lines = ["Up-training settings scored on held-out frames (action MSE; zero action "
             f"{float(np.mean(data['actions'][val_index] ** 2)):.4f}):", "",
             "| H | policy | steps (fraction) | distill | MSE vs expert | MSE vs teacher |", "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        what = f"{r['steps']} ({r['fraction']:g})" if r["policy"] == "sara" else ""
        lines.append(f"| {r['history']} | {r['policy']} | {what} | {r.get('distill', '')} | {r['mse_expert']:.4f} | "
                     f"{r['mse_teacher']:.4f} |")
    text = "\n".join(lines) + "\n"
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(os.path.join(args.out_dir, "uptraining_sweep.md"), write)
    print(text)


if __name__ == "__main__":
    main()
