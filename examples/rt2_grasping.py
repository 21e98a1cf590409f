"""SARA-RT on an RT-2-style image policy (ViT over a frame history), closed-loop in pybullet.

The paper's second result at a size a 2-core CPU can train: only the ViT
image encoder's attention is converted, and the question is whether a
policy that sees H = 3 frames, SARA-converted, keeps its teacher's success.
On pybullet's `KukaDiverseObjectEnv` (random objects in a tray, the
environment's own grasp-success reward), the camera's RGB frames:

1. **Data.** The scripted expert's demonstrations and DART-style perturbed
   states (`grasping/collect.py --images`, cached), 64x64 RGB frames plus the
   gripper state, with the expert's action at every frame.
2. **Teachers.** One softmax image policy per history length H
   (`grasping/image_policy.py`: keras-hub `ViTBackbone` per frame, instruction
   and gripper tokens, a Transformer fuser, tanh vector actions),
   behaviour-cloned (mean squared error).
3. **Convert + up-train.** `keras_sara.convert(teacher, layers=vit_attention,
   blend=0.0)` (the ViT's attention only, as in the paper; `--convert
   vit+fuser` converts the fuser too), plain `model.fit` steered by
   `keras_sara.callbacks.UpTraining`, then `keras_sara.finalize` ("sara").
   The converted model before up-training is scored offline only.
4. **Export.** Teacher and SARA policies as verified float32 `.tflite`
   files (`keras_sara.export.export_tflite`), with their LiteRT latency.
5. **Closed loop.** For each H: teacher and SARA, each in Keras and as a
   `.tflite` file run by `tflite.runner.PolicyRunner` inside the control loop,
   on the same fixed seeds (those of `pct_grasping.py`, so its expert and
   random figures are on the same scenes), two simulator processes;
   Wilson intervals and paired differences.

Every stage's product is kept under `--out-dir`, so an interrupted run
resumes; another setting in the same `--out-dir` is refused unless `--fresh`
(start over) or, when only up-training settings changed (`--uptrain-fraction`,
`--uptrain-lr`, `--blend-fraction`, `--distill`, `--convert`),
`--fresh-uptraining` (keep the teachers and their episodes, redo every SARA
policy). `--distill w` up-trains on `(1 - w) * expert + w * teacher` actions;
`examples/rt2_uptraining_sweep.py` scores such settings on held-out frames.
Writes `results.json`, `results.md` and `success.png` there.

Run:
    python examples/rt2_grasping.py --quick     # a few minutes: tiny data, a few episodes
    python examples/rt2_grasping.py             # the full run (300 episodes per policy)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRASPING = os.path.join(ROOT, "examples", "grasping")
for _path in (ROOT, GRASPING, os.path.join(ROOT, "examples")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np  # noqa: E402

import closed_loop  # noqa: E402
from closed_loop import EVAL_FIRST_SEED, write_json  # noqa: E402
from pct_grasping import _errors, changed_settings, load_demonstrations, prepare_out_dir, split_frames  # noqa: E402

from keras_sara.utils import atomic_write  # noqa: E402

OUT_DIR = os.path.join(ROOT, "examples", "results", "rt2_grasping")
CONVERT = ("vit", "vit+fuser")
KINDS = ("teacher", "sara", "teacher_tflite", "sara_tflite")
#: Settings that only change the SARA policies: `--fresh-uptraining` redoes those and keeps the teachers.
UPTRAIN_KEYS = ("uptrain_fraction", "uptrain_lr", "blend_fraction", "distill", "convert")

FULL = dict(
    demos=200,
    perturbed_episodes=600,
    noise=0.3,
    collect_points=64,  # the point cloud is not used; kept small
    camera=64,  # image side in pixels (the policy's input)
    teacher_epochs=15,
    batch_size=32,
    lr=1e-3,
    uptrain_fraction=0.5,  # chosen on held-out frames by examples/rt2_uptraining_sweep.py
    uptrain_lr=3e-4,
    blend_fraction=0.5,
    distill=0.5,  # up-training target: (1 - distill) * expert action + distill * teacher action
    episodes=300,
    workers=2,
    validation_fraction=0.1,
    convert="vit",
)
QUICK = dict(FULL, demos=4, perturbed_episodes=8, teacher_epochs=2, episodes=2, uptrain_fraction=0.5)


def log(message: str) -> None:
    closed_loop.log("rt2_grasping", message)


def policy_names(histories) -> list:
    return [f"{kind.split('_')[0]}_h{h}{'_tflite' if kind.endswith('tflite') else ''}"
            for h in histories for kind in KINDS]


# ---------------------------------------------------------------------- data


def make_dataset(data, hist, index, batch_size, seed, shuffle, targets=None):
    import keras
    from image_policy import INSTRUCTION, batch_inputs, tokenize

    ids = tokenize(INSTRUCTION)
    targets = data["actions"] if targets is None else targets

    class FrameBatches(keras.utils.PyDataset):
        """Batches of (policy inputs with the frame history, target actions: the expert's by default)."""

        def __init__(self):
            super().__init__()
            self.rng = np.random.default_rng(seed)
            self.order = np.array(index)
            if shuffle:
                self.rng.shuffle(self.order)

        def __len__(self):
            return int(np.ceil(len(self.order) / batch_size))

        def on_epoch_end(self):
            if shuffle:
                self.rng.shuffle(self.order)

        def __getitem__(self, i):
            rows = self.order[i * batch_size:(i + 1) * batch_size]
            return batch_inputs(data["image"], data["gripper"], rows, hist, ids), targets[rows]

    return FrameBatches()


def frames_at(data, hist, index) -> dict:
    from image_policy import INSTRUCTION, batch_inputs, tokenize

    return batch_inputs(data["image"], data["gripper"], np.asarray(index), hist, tokenize(INSTRUCTION))


# ---------------------------------------------------------------- training


def _history(h):
    return {k: [float(v) for v in vs] for k, vs in h.history.items()}


def train_teacher(cfg, history, train, val):
    import keras
    from image_policy import build_image_policy

    teacher = build_image_policy(history=history, image_size=cfg["camera"], name=f"teacher_h{history}")
    steps = cfg["teacher_epochs"] * len(train)
    teacher.compile(keras.optimizers.AdamW(keras.optimizers.schedules.CosineDecay(cfg["lr"], steps),
                                           weight_decay=1e-4), "mse")
    log(f"teacher H={history}: {teacher.count_params():,} parameters, {cfg['teacher_epochs']} epochs of "
        f"{len(train)} batches")
    fit = teacher.fit(train, validation_data=val, epochs=cfg["teacher_epochs"], verbose=2)
    return teacher, {"steps": steps, "history": _history(fit)}


def attention_to_convert(cfg):
    """The `layers=` selector of `keras_sara.convert` for `--convert`."""
    from image_policy import fuser_attention, vit_attention

    return vit_attention if cfg["convert"] == "vit" else fuser_attention


def distillation_targets(teacher, data, hist, train_index, weight, batch=256) -> np.ndarray:
    """Up-training targets: `(1 - weight) * expert + weight * teacher` action on the training frames.

    Mean squared error against this mix equals, up to a constant, the
    weighted sum of the errors against the expert and against the teacher,
    so `weight` is a distillation weight: the student is pulled towards the
    function its teacher computes, not only towards the labels.
    """
    targets = np.array(data["actions"], np.float32)
    index = np.asarray(train_index)
    predicted = np.concatenate([
        np.asarray(teacher.predict_on_batch(frames_at(data, hist, index[i:i + batch])))
        for i in range(0, len(index), batch)])
    targets[index] = (1.0 - weight) * targets[index] + weight * predicted
    log(f"distillation: targets = {1 - weight:g} x expert + {weight:g} x {teacher.name} on {len(index)} frames "
        f"(teacher vs expert MSE there {float(np.mean((predicted - data['actions'][index]) ** 2)):.4f})")
    return targets


def uptrain(cfg, teacher, train, val, probe, steps):
    import keras

    import keras_sara

    keras.utils.set_random_seed(1)
    student, report = keras_sara.convert(teacher, layers=attention_to_convert(cfg), blend=0.0, probe=probe)
    student.compile(keras.optimizers.Adam(cfg["uptrain_lr"]), "mse")
    blend_steps = max(1, int(round(cfg["blend_fraction"] * steps)))
    callback = keras_sara.callbacks.UpTraining(schedule="linear", blend_steps=blend_steps, probe=probe, verbose=1)
    epochs = max(1, int(np.ceil(steps / len(train))))
    log(f"up-training {teacher.name}: {len(report.converted)} attention layers converted, {steps} steps "
        f"({epochs} epochs), blend softmax -> linear over {blend_steps} steps")
    fit = student.fit(train, validation_data=val, epochs=epochs, steps_per_epoch=min(steps, len(train)),
                      callbacks=[callback], verbose=2)
    sara = keras_sara.finalize(student, probe=probe)
    return sara, {"steps": int(student.optimizer.iterations.numpy()), "blend_steps": blend_steps,
                  "history": _history(fit), "fidelity": callback.fidelity_history,
                  "converted_layers": [c.path for c in report.converted],
                  "kept_softmax": [s.path for s in report.skipped]}


def keras_latency_ms(model, inputs, runs=30) -> float:
    """p50 of `predict_on_batch` at batch 1 (the compiled call the closed loop uses)."""
    one = {k: v[:1] for k, v in inputs.items()}
    model.predict_on_batch(one)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model.predict_on_batch(one)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def export_policy(model, path, probe_frames, val_frames, val_actions, quick) -> dict:
    from keras_sara.export import export_tflite
    from tflite.runner import PolicyRunner

    names = [t.name for t in model.inputs]
    probe = [[probe_frames[n][i:i + 1] for n in names] for i in range(min(4, len(probe_frames[names[0]])))]
    report = export_tflite(model, path, probe=probe, benchmark_runs=5 if quick else 30, num_threads=1)
    runner = PolicyRunner(path, num_threads=1)
    count = len(val_actions)
    predicted = np.concatenate([runner(*[val_frames[n][i:i + 1] for n in names]) for i in range(count)])
    keras_actions = np.asarray(model.predict(val_frames, batch_size=64, verbose=0))
    return {"file": os.path.relpath(path, ROOT), "size_kb": report.size_bytes / 1024,
            "flex_ops": list(report.flex_ops), "softmax_ops": int(report.op_histogram.get("SOFTMAX", 0)),
            "latency_p50_ms": report.latency_p50_ms, "latency_p90_ms": report.latency_p90_ms,
            "action_vs_keras": _errors(predicted, keras_actions), "action_vs_expert": _errors(predicted, val_actions)}


# -------------------------------------------------------------- closed loop


class ImagePolicy:
    """A Keras model or a `.tflite` file as a closed-loop policy over the camera's frame history."""

    def __init__(self, history, model=None, tflite_path=None, input_names=None):
        from image_policy import FrameHistory

        self.frames = FrameHistory(history)
        self.model = model
        self.runner = None
        if tflite_path is not None:
            from tflite.runner import PolicyRunner

            self.runner, self.input_names = PolicyRunner(tflite_path, num_threads=1), input_names

    def reset(self, env):
        self.frames.reset()

    def __call__(self, env, obs):
        from image_policy import image_inputs

        inputs = image_inputs(self.frames.push(obs["image"]), obs["gripper"])
        if self.runner is not None:
            return np.asarray(self.runner(*[inputs[n] for n in self.input_names]))[0]
        return np.asarray(self.model.predict_on_batch(inputs))[0]


def _load_policy(name, out_dir):
    import keras

    from image_policy import policy_layers

    import keras_sara  # noqa: F401  (registers the SARA layers for loading)
    from expert import RandomPolicy, ScriptedExpert

    if name == "random":
        return RandomPolicy()
    if name == "expert":
        return ScriptedExpert()
    policy_layers()  # registers the policy's layers for loading
    base = name.removesuffix("_tflite")
    history = int(base.rsplit("_h", 1)[1])
    model = keras.saving.load_model(os.path.join(out_dir, f"{base}.keras"))
    if name.endswith("_tflite"):
        return ImagePolicy(history, tflite_path=os.path.join(out_dir, f"{base}.tflite"),
                           input_names=[t.name for t in model.inputs])
    return ImagePolicy(history, model=model)


# ------------------------------------------------------------------ report


def pairs_for(histories) -> list:
    pairs = []
    for h in histories:
        pairs += [(f"sara_h{h}", f"teacher_h{h}"), (f"sara_h{h}_tflite", f"sara_h{h}"),
                  (f"teacher_h{h}_tflite", f"teacher_h{h}")]
    if 1 in histories and 3 in histories:
        pairs += [("sara_h3", "teacher_h1"), ("teacher_h3", "teacher_h1")]
    pairs += [(f"teacher_h{h}", "expert") for h in histories]
    return pairs


def markdown(results) -> str:
    s = results["closed_loop"]
    cfg = results["config"]
    lines = [
        f"Closed-loop grasp success over {cfg['episodes']} episodes (seeds {EVAL_FIRST_SEED}.."
        f"{EVAL_FIRST_SEED + cfg['episodes'] - 1}, the same for every policy), 95% Wilson intervals; "
        f"latency: one policy step at batch 1 ({cfg['camera']}x{cfg['camera']} frames), p50 ms, Keras "
        "`predict_on_batch` (TensorFlow) and LiteRT (1 thread):",
        "",
        "| H | policy | runtime | success | 95% interval | latency ms | offline action MSE |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for name, p in s["policies"].items():
        base = name.removesuffix("_tflite")
        h = base.rsplit("_h", 1)[1] if "_h" in base else "-"
        runtime = "LiteRT" if name.endswith("_tflite") else "Keras"
        lat = results["latency_ms"].get(name)
        mse = results["offline"].get(base, {}).get("mse") if runtime == "Keras" else \
            results["export"].get(base, {}).get("action_vs_expert", {}).get("mse")
        lines.append(f"| {h} | {base.split('_h')[0]} | {runtime} | {p['success']:.1%} | {p['low']:.1%} - "
                     f"{p['high']:.1%} | {'-' if lat is None else f'{lat:.1f}'} | "
                     f"{'-' if mse is None else f'{mse:.4f}'} |")
    lines += ["", "Paired differences (same seeds), 95% intervals; agreement = share of seeds with the same outcome:",
              ""] + closed_loop.paired_rows(s["paired"])
    lines += ["", "Offline action MSE against the expert on held-out frames (converted = SARA before up-training):",
              "", "| model | action MSE |", "|---|---:|"]
    for name, e in results["offline"].items():
        lines.append(f"| {name} | {e['mse']:.4f} |")
    return "\n".join(lines) + "\n"


def write_plot(path, results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = results["closed_loop"]["policies"]
    names = list(table)
    rates = np.array([table[n]["success"] for n in names])
    err = np.array([[table[n]["success"] - table[n]["low"], table[n]["high"] - table[n]["success"]] for n in names]).T
    colors = ["#1f77b4" if n.startswith("teacher") else "#2ca02c" if n.startswith("sara") else "#999999"
              for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names)), 3.8))
    bars = ax.bar(range(len(names)), rates, yerr=err, capsize=4, color=colors)
    for bar, name in zip(bars, names):
        if name.endswith("_tflite"):
            bar.set_hatch("//")
    for i, name in enumerate(names):
        ax.text(i, table[name]["high"] + 0.02, f"{rates[i]:.1%}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), [n.replace("_tflite", "\n.tflite") for n in names], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("grasp success")
    ax.set_title(f"Image policies, KukaDiverseObjectEnv, {results['config']['episodes']} episodes each "
                 "(same seeds), 95% CI", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


# -------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny data and few episodes (a few minutes)")
    for key, value in FULL.items():
        kwargs = dict(choices=CONVERT) if key == "convert" else {}
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None,
                            help=f"default {value} ({QUICK[key]} with --quick)", **kwargs)
    parser.add_argument("--histories", type=int, nargs="+", default=[1, 3], help="frame histories H to train")
    parser.add_argument("--policies", nargs="+", default=None,
                        help="policies to run closed-loop (default: teacher and SARA, Keras and .tflite, for "
                             "every H); `expert` and `random` are accepted too")
    parser.add_argument("--out-dir", default=None, help=f"default {os.path.relpath(OUT_DIR, ROOT)}[_quick]")
    parser.add_argument("--fresh", action="store_true", help="delete --out-dir's models and episodes first")
    parser.add_argument("--fresh-uptraining", action="store_true",
                        help="keep --out-dir's teachers (models, files, episodes) and redo every SARA policy: "
                             f"for a change of {', '.join('--' + k.replace('_', '-') for k in UPTRAIN_KEYS)} only")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key in FULL:
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    for key in ("collect_points", "teacher_epochs", "batch_size", "episodes", "workers"):
        if cfg[key] < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1. Received: {cfg[key]}")
    if cfg["camera"] < 16 or cfg["camera"] % 16:
        parser.error(f"--camera must be a multiple of 16 (ViT patches of 8, pooled 2x2). Received: {cfg['camera']}")
    if cfg["demos"] < 0 or cfg["perturbed_episodes"] < 0 or cfg["demos"] + cfg["perturbed_episodes"] < 2:
        parser.error("--demos and --perturbed-episodes must be >= 0 and give at least 2 episodes. "
                     f"Received: {cfg['demos']} and {cfg['perturbed_episodes']}")
    for key in ("uptrain_fraction", "blend_fraction", "validation_fraction"):
        if not 0 < cfg[key] <= 1:
            parser.error(f"--{key.replace('_', '-')} must be in (0, 1]. Received: {cfg[key]}")
    if not 0 <= cfg["distill"] <= 1:
        parser.error(f"--distill must be in [0, 1]. Received: {cfg['distill']}")
    if not args.histories or min(args.histories) < 1 or len(set(args.histories)) != len(args.histories):
        parser.error(f"--histories must be distinct integers >= 1. Received: {args.histories}")
    cfg["histories"] = sorted(args.histories)
    known = set(policy_names(cfg["histories"])) | {"expert", "random"}
    policies = args.policies or policy_names(cfg["histories"])
    unknown = [p for p in policies if p not in known]
    if unknown:
        parser.error(f"--policies: unknown {unknown}; choose from {sorted(known)}")
    out_dir = args.out_dir or (OUT_DIR + ("_quick" if args.quick else ""))
    return args, cfg, policies, os.path.abspath(out_dir)


def drop_uptraining(out_dir, cfg) -> None:
    """`--fresh-uptraining`: delete the converted and SARA policies of `out_dir`, keep the teachers.

    Refused (nothing deleted) when a setting other than `UPTRAIN_KEYS` changed:
    the teachers would not be the ones the new settings train.
    """
    config_path = os.path.join(out_dir, "run_config.json")
    if not os.path.exists(config_path):
        return
    changed = changed_settings(out_dir, cfg)
    others = [k for k in changed if k not in UPTRAIN_KEYS]
    if others:
        raise SystemExit(f"--fresh-uptraining keeps the teachers, but {', '.join(others)} changed too, which "
                         "changes them: pass --fresh to start over, or choose another --out-dir.")
    sara = ("converted_", "sara_")
    removed = []
    for folder in (out_dir, os.path.join(out_dir, "episodes")):
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if name.startswith(sara) and name.endswith((".keras", ".tflite", ".json")):
                os.unlink(os.path.join(folder, name))
                removed.append(name)
    for name in ("training.json", "export.json"):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            with open(path) as f:
                kept = {k: v for k, v in json.load(f).items() if not k.startswith(sara)}
            write_json(path, kept)
    write_json(config_path, cfg)
    log(f"--fresh-uptraining: removed {len(removed)} SARA files ({', '.join(changed) or 'no setting'} changed); "
        "the teachers are kept")


def main(argv=None):
    args, cfg, policies, out_dir = parse_args(argv)
    if args.fresh_uptraining and not args.fresh:
        drop_uptraining(out_dir, cfg)
    prepare_out_dir(out_dir, cfg, args.fresh)
    start = time.perf_counter()
    timings = {}

    from image_policy import history_index, policy_layers

    policy_layers()  # so that saved policies load in a resumed run
    data, data_info = load_demonstrations(cfg, images=True, log=log)
    timings["data_s"] = time.perf_counter() - start
    train_index, val_index = split_frames(data, cfg["validation_fraction"])
    log(f"{len(data['actions'])} frames: {len(train_index)} for training, {len(val_index)} held out")

    import keras

    import keras_sara

    training_path = os.path.join(out_dir, "training.json")
    training = json.load(open(training_path)) if os.path.exists(training_path) else {}
    export_path = os.path.join(out_dir, "export.json")
    export = json.load(open(export_path)) if os.path.exists(export_path) else {}
    offline, latency = {}, {}
    for h in cfg["histories"]:
        hist = history_index(data["episode"], data["step"], h)
        train = make_dataset(data, hist, train_index, cfg["batch_size"], seed=h, shuffle=True)
        val = make_dataset(data, hist, val_index, cfg["batch_size"], seed=0, shuffle=False)
        val_frames, val_actions = frames_at(data, hist, val_index), data["actions"][val_index]
        probe = {k: v[:16] for k, v in val_frames.items()}
        paths = {k: os.path.join(out_dir, f"{k}_h{h}.keras") for k in ("teacher", "converted", "sara")}

        t = time.perf_counter()
        if os.path.exists(paths["teacher"]):
            teacher = keras.saving.load_model(paths["teacher"])
            log(f"teacher H={h}: loaded")
        else:
            teacher, training[f"teacher_h{h}"] = train_teacher(cfg, h, train, val)
            atomic_write(paths["teacher"], teacher.save)
            write_json(training_path, training)
        timings[f"teacher_h{h}_s"] = time.perf_counter() - t

        if not os.path.exists(paths["converted"]):
            converted, _ = keras_sara.convert(teacher, layers=attention_to_convert(cfg), probe=probe)
            atomic_write(paths["converted"], converted.save)
        converted = keras.saving.load_model(paths["converted"])

        t = time.perf_counter()
        if os.path.exists(paths["sara"]):
            sara = keras.saving.load_model(paths["sara"])
            log(f"SARA H={h}: loaded")
        else:
            steps = max(1, int(round(cfg["uptrain_fraction"] * training[f"teacher_h{h}"]["steps"])))
            uptrain_data = train
            if cfg["distill"] > 0:
                targets = distillation_targets(teacher, data, hist, train_index, cfg["distill"])
                uptrain_data = make_dataset(data, hist, train_index, cfg["batch_size"], seed=h, shuffle=True,
                                            targets=targets)
            sara, training[f"sara_h{h}"] = uptrain(cfg, teacher, uptrain_data, val, probe, steps)
            atomic_write(paths["sara"], sara.save)
            write_json(training_path, training)
        timings[f"uptrain_h{h}_s"] = time.perf_counter() - t

        for name, model in ((f"teacher_h{h}", teacher), (f"converted_h{h}", converted), (f"sara_h{h}", sara)):
            offline[name] = _errors(model.predict(val_frames, batch_size=64, verbose=0), val_actions)
            latency[name] = keras_latency_ms(model, val_frames, runs=5 if args.quick else 30)
        for name, model in ((f"teacher_h{h}", teacher), (f"sara_h{h}", sara)):
            path = os.path.join(out_dir, f"{name}.tflite")
            if name not in export or not os.path.exists(path):
                log(f"export {name}")
                train_frames = frames_at(data, hist, train_index[:4])
                export[name] = export_policy(model, path, train_frames, val_frames, val_actions, args.quick)
                write_json(export_path, export)
            latency[f"{name}_tflite"] = export[name]["latency_p50_ms"]
    offline["zero action"] = _errors(np.zeros_like(data["actions"][val_index]), data["actions"][val_index])
    log("offline action MSE on held-out frames: " + ", ".join(f"{k} {v['mse']:.4f}" for k, v in offline.items()))

    t = time.perf_counter()
    episodes = closed_loop.evaluate(policies, cfg["episodes"], cfg["workers"], out_dir, _load_policy,
                                    dict(num_points=cfg["collect_points"], camera=cfg["camera"]), tag="rt2_grasping")
    timings["closed_loop_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start

    results = {
        "command": "python examples/rt2_grasping.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "config": cfg,
        "data": data_info,
        "frames": {"train": int(len(train_index)), "held_out": int(len(val_index))},
        "training": training,
        "offline": offline,
        "latency_ms": latency,
        "export": export,
        "closed_loop": closed_loop.summarise(episodes, pairs_for(cfg["histories"])),
        "timings": timings,
        "load_average": os.getloadavg(),
    }
    write_json(os.path.join(out_dir, "results.json"), results)
    table = markdown(results)
    atomic_write(os.path.join(out_dir, "results.md"), lambda tmp: open(tmp, "w").write(table))
    write_plot(os.path.join(out_dir, "success.png"), results)
    print(table)
    log(f"done in {timings['total_s'] / 60:.1f} min; results in {os.path.relpath(out_dir, ROOT)}")


if __name__ == "__main__":
    main()
