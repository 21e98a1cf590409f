"""SARA-RT on a point-cloud grasping policy, closed-loop in pybullet.

The paper's first robot result, end to end on pybullet's `KukaDiverseObjectEnv`
(random objects in a tray, the environment's own grasp-success reward):

1. **Data.** A scripted expert that reads the simulator's state collects
   demonstrations (`grasping/collect.py`, cached); the observation is the
   depth camera's point cloud (back-projected, cropped to the tray) plus the
   gripper state. Clouds are stored with `--collect-points` points and
   subsampled to `--num-points` afresh every epoch (augmentation).
2. **Teacher.** A softmax Point Cloud Transformer policy
   (`grasping/policy.py`, built by `keras_sara.models.build_pct_policy`) is
   behaviour-cloned on the expert's actions (mean squared error).
3. **Convert.** `keras_sara.convert(teacher)`: linear SARA attention, every
   weight kept ("converted", before any up-training).
4. **Up-train.** `keras_sara.convert(teacher, blend=0.0)` then plain
   `model.fit` steered by `keras_sara.callbacks.UpTraining` (a softmax ->
   linear blend schedule), on a fraction of the teacher's steps, then
   `keras_sara.finalize` ("sara").
5. **Export.** `keras_sara.export.export_tflite` writes the SARA policy as a
   verified float32 `.tflite` file; float16, dynamic-range and int8 variants
   are exported too and their action error on held-out frames is reported.
6. **Closed loop.** Every policy plays the same episodes (the same fixed
   seeds, so the same objects in the same places), two simulator processes
   in parallel: random actions, the scripted expert, the teacher, the
   converted model, the up-trained SARA model and the SARA `.tflite` file run
   by `tflite.runner.PolicyRunner` (ai-edge-litert) inside the control loop.
   Success rates with 95% Wilson intervals, and paired differences (same
   seeds) with 95% intervals.

Every stage's product is kept under `--out-dir` (models, per-policy episode
results), so an interrupted run picks up where it stopped; a run with other
settings refuses an existing `--out-dir` unless given `--fresh`.
Writes `results.json`, `results.md` and `success.png` there.

Run:
    python examples/pct_grasping.py --quick     # a few minutes: tiny data, a few episodes
    python examples/pct_grasping.py             # the full run (300 episodes per policy)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRASPING = os.path.join(ROOT, "examples", "grasping")
for _path in (ROOT, GRASPING):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np  # noqa: E402

import closed_loop  # noqa: E402
from closed_loop import EVAL_FIRST_SEED, write_json  # noqa: E402

from keras_sara.utils import atomic_write  # noqa: E402

OUT_DIR = os.path.join(ROOT, "examples", "results", "pct_grasping")
#: Seeds of the demonstration shards (one collection process each) and of the
#: evaluation episodes: disjoint, so no policy is evaluated on a training scene.
DEMO_FIRST_SEEDS = (0, 10_000)
POLICIES = ("random", "expert", "teacher", "converted", "sara", "sara_tflite")
PRECISIONS = ("float32", "float16", "dynamic", "int8")

FULL = dict(
    demos=200,  # successful expert episodes
    perturbed_episodes=600,  # episodes of expert labels on noise-perturbed states
    noise=0.3,
    collect_points=1024,
    num_points=256,
    camera=128,
    teacher_epochs=15,
    batch_size=32,
    lr=1e-3,
    uptrain_fraction=0.25,  # up-training steps, as a fraction of the teacher's
    uptrain_lr=3e-4,
    blend_fraction=0.5,  # of the up-training steps, spent blending softmax -> linear
    episodes=300,
    workers=2,
    validation_fraction=0.1,
)
QUICK = dict(FULL, demos=4, perturbed_episodes=8, teacher_epochs=3, episodes=4, uptrain_fraction=0.5)


def log(message: str) -> None:
    closed_loop.log("pct_grasping", message)


# ---------------------------------------------------------------------- data


PERTURBED_FIRST_SEEDS = (20_000, 30_000)


def _collect_shard(job):
    from collect import load_or_collect, load_or_collect_perturbed

    kind, count, num_points, camera, first_seed, noise, images = job
    if kind == "demos":
        return load_or_collect(count, num_points, camera, first_seed, progress=False, images=images)
    return load_or_collect_perturbed(count, num_points, camera, first_seed, noise, progress=False, images=images)


def _split(total, parts):
    return [total // parts + (i < total % parts) for i in range(parts)]


def load_demonstrations(cfg, images=False, log=log) -> tuple[dict, list]:
    """Expert demonstrations and perturbed-state frames, collected in parallel shards (cached).

    With `images=True` the frames also hold the camera's RGB `image`
    (cache files of their own, `img_*.npz`).

    Returns the frames of both sources concatenated, with `source` (0 for
    successful demonstrations, 1 for perturbed episodes) and `episode`
    numbered across both, and a description of each shard.
    """
    shards = max(1, min(cfg["workers"], len(DEMO_FIRST_SEEDS)))
    jobs = [("demos", k, cfg["collect_points"], cfg["camera"], DEMO_FIRST_SEEDS[i], 0.0, images)
            for i, k in enumerate(_split(cfg["demos"], shards)) if k > 0]
    jobs += [("perturbed", k, cfg["collect_points"], cfg["camera"], PERTURBED_FIRST_SEEDS[i], cfg["noise"], images)
             for i, k in enumerate(_split(cfg["perturbed_episodes"], shards)) if k > 0]
    log(f"data: {cfg['demos']} demonstrations and {cfg['perturbed_episodes']} perturbed episodes in "
        f"{len(jobs)} shard(s) (cached under examples/results/grasping/cache)")
    if shards > 1:
        with multiprocessing.get_context("spawn").Pool(shards) as pool:
            results = pool.map(_collect_shard, jobs)
    else:
        results = [_collect_shard(job) for job in jobs]
    parts, info = [], []
    offset = 0
    for job, (data, path, loaded) in zip(jobs, results):
        data = dict(data)
        episodes = int(data["episode"].max()) + 1 if len(data["episode"]) else 0
        data["episode"] = data["episode"] + offset
        data["source"] = np.full(len(data["actions"]), int(job[0] == "perturbed"), np.int32)
        offset += episodes
        parts.append(data)
        entry = dict(kind=job[0], path=os.path.relpath(path, ROOT), loaded=loaded, episodes=episodes,
                     frames=len(data["actions"]))
        if job[0] == "demos":
            entry.update(episodes_played=len(data["tried_seeds"]),
                         expert_success=float(np.mean(data["tried_success"])))
        info.append(entry)
    keys = ("points", "mask", "gripper", "actions", "episode", "step", "num_visible", "source") + (
        ("image",) if images else ())
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}, info


def split_frames(data, fraction) -> tuple[np.ndarray, np.ndarray]:
    """Frame indices (train, held out): the last `fraction` of each source's episodes is held out."""
    held = np.zeros(len(data["episode"]), bool)
    for source in np.unique(data["source"]):
        in_source = data["source"] == source
        episodes = np.unique(data["episode"][in_source])
        count = max(1, int(round(fraction * len(episodes)))) if len(episodes) > 1 else 0
        held |= in_source & np.isin(data["episode"], episodes[len(episodes) - count:])
    return np.flatnonzero(~held), np.flatnonzero(held)


def subsample(points, mask, num_points, rng):
    """Per frame, `num_points` of its valid points drawn at random (valid points first).

    Frames with fewer valid points keep all of them and are padded (mask
    False, points zero), like `grasping.env.resample` does on the robot.
    """
    keys = rng.random(mask.shape) + (~mask) * 2.0  # valid points sort first
    order = np.argsort(keys, axis=1)[:, :num_points]
    picked = np.take_along_axis(points, order[..., None], axis=1)
    picked_mask = np.take_along_axis(mask, order, axis=1)
    return np.where(picked_mask[..., None], picked, 0.0).astype(np.float32), picked_mask


def make_dataset(data, index, num_points, batch_size, seed, shuffle):
    import keras
    from policy import policy_inputs

    class CloudBatches(keras.utils.PyDataset):
        """Batches of (policy inputs, expert actions); clouds subsampled afresh each epoch."""

        def __init__(self):
            super().__init__()
            self.rng = np.random.default_rng(seed)
            self.order = np.array(index)

        def __len__(self):
            return int(np.ceil(len(self.order) / batch_size))

        def on_epoch_end(self):
            if shuffle:
                self.rng.shuffle(self.order)

        def __getitem__(self, i):
            rows = self.order[i * batch_size:(i + 1) * batch_size]
            rng = self.rng if shuffle else np.random.default_rng(seed + i)
            points, mask = subsample(data["points"][rows], data["mask"][rows], num_points, rng)
            return policy_inputs(points, mask, data["gripper"][rows]), data["actions"][rows]

    dataset = CloudBatches()
    if shuffle:
        dataset.rng.shuffle(dataset.order)
    return dataset


def fixed_frames(data, index, num_points, seed=123) -> tuple[dict, np.ndarray]:
    """Held-out frames with one fixed subsample: inputs dict and expert actions."""
    from policy import policy_inputs

    points, mask = subsample(data["points"][index], data["mask"][index], num_points,
                             np.random.default_rng(seed))
    return policy_inputs(points, mask, data["gripper"][index]), data["actions"][index]


# ---------------------------------------------------------------- training


def train_teacher(cfg, train, val, out_dir):
    import keras
    from policy import build_policy

    keras.utils.set_random_seed(0)
    teacher = build_policy("softmax", cfg["num_points"])
    steps = cfg["teacher_epochs"] * len(train)
    teacher.compile(keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(cfg["lr"], steps)), "mse")
    log(f"teacher: {teacher.count_params():,} parameters, {cfg['teacher_epochs']} epochs of {len(train)} batches")
    history = teacher.fit(train, validation_data=val, epochs=cfg["teacher_epochs"], verbose=2)
    return teacher, {k: [float(v) for v in vs] for k, vs in history.history.items()}


def uptrain(cfg, teacher, train, val, probe, steps):
    import keras

    import keras_sara

    keras.utils.set_random_seed(1)
    student, report = keras_sara.convert(teacher, blend=0.0, probe=probe)
    student.compile(keras.optimizers.Adam(cfg["uptrain_lr"]), "mse")
    blend_steps = max(1, int(round(cfg["blend_fraction"] * steps)))
    callback = keras_sara.callbacks.UpTraining(schedule="linear", blend_steps=blend_steps, probe=probe, verbose=1)
    epochs = max(1, int(np.ceil(steps / len(train))))
    log(f"up-training: {steps} steps ({epochs} epochs), blend softmax -> linear over {blend_steps} steps")
    history = student.fit(train, validation_data=val, epochs=epochs, steps_per_epoch=min(steps, len(train)),
                          callbacks=[callback], verbose=2)
    sara = keras_sara.finalize(student, probe=probe)
    return sara, {
        "steps": int(student.optimizer.iterations.numpy()),
        "blend_steps": blend_steps,
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "fidelity": callback.fidelity_history,
        "converted_layers": [c.path for c in report.converted],
    }


def action_errors(model, frames, actions) -> dict:
    predicted = np.asarray(model.predict(frames, batch_size=64, verbose=0))
    return _errors(predicted, actions)


def _errors(predicted, actions) -> dict:
    diff = np.asarray(predicted) - actions
    return {"mse": float(np.mean(diff ** 2)), "mae": float(np.mean(np.abs(diff)))}


def export_variants(sara, train_frames, val_frames, val_actions, out_dir, quick) -> dict:
    """Export the SARA policy at every precision; action error on held-out frames."""
    from keras_sara.export import export_tflite
    from tflite.runner import PolicyRunner

    names = [t.name for t in sara.inputs]
    val_list = [val_frames[n] for n in names]
    keras_actions = np.asarray(sara.predict(val_frames, batch_size=64, verbose=0))
    probe = [[x[i:i + 1] for x in val_list] for i in range(min(4, len(val_list[0])))]
    calibration = [train_frames[n][:64] for n in names]  # one array per input, first axis = examples
    rows = {}
    for precision in PRECISIONS:
        path = os.path.join(out_dir, f"sara_{precision}.tflite")
        log(f"export SARA policy: {precision}")
        kwargs = dict(quantize=None if precision == "float32" else precision, probe=probe,
                      benchmark_runs=5 if quick else 30, num_threads=1)
        if precision == "int8":
            kwargs["representative_data"] = calibration
        if precision in ("dynamic", "int8"):
            kwargs["tolerance"] = 1.0  # judged below, in action space
        report = export_tflite(sara, path, **kwargs)
        runner = PolicyRunner(path, num_threads=1)
        predicted = np.concatenate([runner(*[x[i:i + 1] for x in val_list]) for i in range(len(val_list[0]))])
        rows[precision] = {
            "file": os.path.relpath(path, ROOT),
            "size_kb": report.size_bytes / 1024,
            "flex_ops": list(report.flex_ops),
            "softmax_ops": int(report.op_histogram.get("SOFTMAX", 0)),
            "float_ops": dict(report.float_ops),
            "latency_p50_ms": report.latency_p50_ms,
            "relative_error_vs_keras": report.relative_error,
            "action_vs_keras": _errors(predicted, keras_actions),
            "action_vs_expert": _errors(predicted, val_actions),
        }
    return rows


# -------------------------------------------------------------- closed loop


class KerasPolicy:
    def __init__(self, model):
        self.model = model

    def __call__(self, env, obs):
        from policy import policy_inputs

        return np.asarray(self.model(policy_inputs(obs), training=False))[0]


class TflitePolicy:
    def __init__(self, path, input_names):
        from tflite.runner import PolicyRunner

        self.runner = PolicyRunner(path, num_threads=1)
        self.input_names = input_names

    def __call__(self, env, obs):
        from policy import policy_inputs

        inputs = policy_inputs(obs)
        return np.asarray(self.runner(*[inputs[n] for n in self.input_names]))[0]


def _load_policy(name, out_dir):
    import keras

    import keras_sara  # noqa: F401  (registers the SARA layers for loading)
    from expert import RandomPolicy, ScriptedExpert

    if name == "random":
        return RandomPolicy()
    if name == "expert":
        return ScriptedExpert()
    if name == "sara_tflite":
        names = [t.name for t in keras.saving.load_model(os.path.join(out_dir, "sara.keras")).inputs]
        return TflitePolicy(os.path.join(out_dir, "sara_float32.tflite"), names)
    return KerasPolicy(keras.saving.load_model(os.path.join(out_dir, f"{name}.keras")))


def evaluate(policy_names, cfg, out_dir) -> dict:
    """Episodes of every policy on the same fixed evaluation seeds, `workers` simulators in parallel."""
    return closed_loop.evaluate(policy_names, cfg["episodes"], cfg["workers"], out_dir, _load_policy,
                                dict(num_points=cfg["num_points"], camera=cfg["camera"]), tag="pct_grasping")


# ------------------------------------------------------------------ report


PAIRS = (("sara", "teacher"), ("converted", "teacher"), ("sara_tflite", "sara"),
         ("teacher", "random"), ("sara", "random"), ("expert", "teacher"))


def markdown(results) -> str:
    s = results["closed_loop"]
    lines = [
        f"Closed-loop grasp success over {results['config']['episodes']} episodes (seeds "
        f"{EVAL_FIRST_SEED}..{EVAL_FIRST_SEED + results['config']['episodes'] - 1}, the same for every policy), "
        "95% Wilson intervals:",
        "",
        "| policy | success | 95% interval | mean steps |",
        "|---|---:|---:|---:|",
    ]
    for name in POLICIES:
        if name in s["policies"]:
            p = s["policies"][name]
            lines.append(f"| {name} | {p['success']:.1%} | {p['low']:.1%} - {p['high']:.1%} | {p['mean_steps']:.1f} |")
    lines += ["", "Paired differences (same seeds), 95% intervals; agreement = share of seeds with the same outcome:",
              ""] + closed_loop.paired_rows(s["paired"])
    lines += ["", "Offline action error on held-out demonstration frames (MSE against the expert):", "",
              "| model | action MSE |", "|---|---:|"]
    for name, e in results["offline"].items():
        lines.append(f"| {name} | {e['mse']:.4f} |")
    lines += ["", "The SARA policy as LiteRT files (1 thread, batch 1, "
              f"{results['config']['num_points']} points):", "",
              "| precision | size KB | p50 ms | action error vs Keras (MAE) | action MSE vs expert | float ops |",
              "|---|---:|---:|---:|---:|---|"]
    for precision, e in results["export"].items():
        float_ops = ", ".join(f"{k} {v}" for k, v in sorted(e["float_ops"].items())) or "-"
        lines.append(f"| {precision} | {e['size_kb']:.0f} | {e['latency_p50_ms']:.2f} | "
                     f"{e['action_vs_keras']['mae']:.2e} | {e['action_vs_expert']['mse']:.4f} | {float_ops} |")
    return "\n".join(lines) + "\n"


def write_plot(path, results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = results["closed_loop"]["policies"]
    names = [n for n in POLICIES if n in table]
    rates = np.array([table[n]["success"] for n in names])
    err = np.array([[table[n]["success"] - table[n]["low"], table[n]["high"] - table[n]["success"]] for n in names]).T
    fig, ax = plt.subplots(figsize=(7, 3.6))
    colors = ["#999999", "#555555", "#1f77b4", "#ff7f0e", "#2ca02c", "#98df8a"][: len(names)]
    ax.bar(names, rates, yerr=err, capsize=4, color=colors)
    for i, (name, r) in enumerate(zip(names, rates)):
        ax.text(i, table[name]["high"] + 0.02, f"{r:.1%}", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, 1)
    ax.set_ylabel("grasp success")
    ax.set_title(f"KukaDiverseObjectEnv, {results['config']['episodes']} episodes per policy (same seeds), 95% CI")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


# -------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny data and few episodes (a few minutes)")
    for key, value in FULL.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None,
                            help=f"default {value} ({QUICK[key]} with --quick)")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--out-dir", default=None, help=f"default {os.path.relpath(OUT_DIR, ROOT)}[_quick]")
    parser.add_argument("--fresh", action="store_true", help="delete --out-dir's models and episodes first")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key in FULL:
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    for key in ("collect_points", "num_points", "camera", "teacher_epochs", "batch_size",
                "episodes", "workers"):
        if cfg[key] < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1. Received: {cfg[key]}")
    if cfg["demos"] < 0 or cfg["perturbed_episodes"] < 0 or cfg["demos"] + cfg["perturbed_episodes"] < 2:
        parser.error("--demos and --perturbed-episodes must be >= 0 and give at least 2 episodes. "
                     f"Received: {cfg['demos']} and {cfg['perturbed_episodes']}")
    if cfg["num_points"] > cfg["collect_points"]:
        parser.error(f"--num-points ({cfg['num_points']}) must be <= --collect-points ({cfg['collect_points']})")
    for key in ("uptrain_fraction", "blend_fraction", "validation_fraction"):
        if not 0 < cfg[key] <= 1:
            parser.error(f"--{key.replace('_', '-')} must be in (0, 1]. Received: {cfg[key]}")
    out_dir = args.out_dir or (OUT_DIR + ("_quick" if args.quick else ""))
    return args, cfg, os.path.abspath(out_dir)


def changed_settings(out_dir, cfg) -> list:
    """The settings of `out_dir`'s earlier run (its run_config.json) that differ from `cfg`; [] if none ran."""
    config_path = os.path.join(out_dir, "run_config.json")
    if not os.path.exists(config_path):
        return []
    with open(config_path) as f:
        previous = json.load(f)
    return sorted(k for k in set(previous) | set(cfg) if previous.get(k) != cfg.get(k))


def prepare_out_dir(out_dir, cfg, fresh) -> None:
    config_path = os.path.join(out_dir, "run_config.json")
    if fresh and os.path.isdir(out_dir):
        for name in os.listdir(out_dir):
            if name.endswith((".keras", ".tflite")) or name in ("episodes", "run_config.json", "training.json", "export.json"):
                target = os.path.join(out_dir, name)
                shutil.rmtree(target) if os.path.isdir(target) else os.unlink(target)
    changed = changed_settings(out_dir, cfg)
    if changed:
        raise SystemExit(
            f"--out-dir {out_dir} holds a run with other settings ({', '.join(changed)} differ): "
            "pass --fresh to start over there, or choose another --out-dir."
        )
    os.makedirs(os.path.join(out_dir, "episodes"), exist_ok=True)
    write_json(config_path, cfg)


def main(argv=None):
    args, cfg, out_dir = parse_args(argv)
    prepare_out_dir(out_dir, cfg, args.fresh)
    start = time.perf_counter()
    timings = {}

    data, data_info = load_demonstrations(cfg)
    timings["data_s"] = time.perf_counter() - start
    train_index, val_index = split_frames(data, cfg["validation_fraction"])
    log(f"{len(data['actions'])} frames: {len(train_index)} for training, {len(val_index)} held out "
        "(the last episodes of each source)")
    train = make_dataset(data, train_index, cfg["num_points"], cfg["batch_size"], seed=0, shuffle=True)
    val = make_dataset(data, val_index, cfg["num_points"], cfg["batch_size"], seed=1, shuffle=False)
    val_frames, val_actions = fixed_frames(data, val_index, cfg["num_points"])
    train_frames, _ = fixed_frames(data, train_index[:256], cfg["num_points"], seed=7)
    probe = {k: v[:16] for k, v in val_frames.items()}

    import keras

    import keras_sara

    training_path = os.path.join(out_dir, "training.json")
    training = json.load(open(training_path)) if os.path.exists(training_path) else {}
    paths = {name: os.path.join(out_dir, f"{name}.keras") for name in ("teacher", "converted", "sara")}

    t = time.perf_counter()
    if os.path.exists(paths["teacher"]):
        teacher = keras.saving.load_model(paths["teacher"])
        log("teacher: loaded")
    else:
        teacher, training["teacher"] = train_teacher(cfg, train, val, out_dir)
        training["teacher_steps"] = cfg["teacher_epochs"] * len(train)
        atomic_write(paths["teacher"], teacher.save)
        write_json(training_path, training)
    timings["teacher_s"] = time.perf_counter() - t

    if not os.path.exists(paths["converted"]):
        converted, _ = keras_sara.convert(teacher, probe=probe)
        atomic_write(paths["converted"], converted.save)
    converted = keras.saving.load_model(paths["converted"])

    t = time.perf_counter()
    if os.path.exists(paths["sara"]):
        sara = keras.saving.load_model(paths["sara"])
        log("SARA policy: loaded")
    else:
        steps = max(1, int(round(cfg["uptrain_fraction"] * training["teacher_steps"])))
        sara, training["uptrain"] = uptrain(cfg, teacher, train, val, probe, steps)
        atomic_write(paths["sara"], sara.save)
        write_json(training_path, training)
    timings["uptrain_s"] = time.perf_counter() - t

    offline = {name: action_errors(model, val_frames, val_actions)
               for name, model in (("teacher", teacher), ("converted", converted), ("sara", sara))}
    offline["zero action"] = _errors(np.zeros_like(val_actions), val_actions)
    log("offline action MSE on held-out frames: " + ", ".join(f"{k} {v['mse']:.4f}" for k, v in offline.items()))

    t = time.perf_counter()
    export_path = os.path.join(out_dir, "export.json")
    if os.path.exists(export_path) and all(
            os.path.exists(os.path.join(out_dir, f"sara_{p}.tflite")) for p in PRECISIONS):
        with open(export_path) as f:
            export = json.load(f)
        log("LiteRT files: loaded")
    else:
        export = export_variants(sara, train_frames, val_frames, val_actions, out_dir, args.quick)
        write_json(export_path, export)
    timings["export_s"] = time.perf_counter() - t

    t = time.perf_counter()
    episodes = evaluate(args.policies, cfg, out_dir)
    timings["closed_loop_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start

    results = {
        "command": "python examples/pct_grasping.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "config": cfg,
        "data": data_info,
        "frames": {"train": int(len(train_index)), "held_out": int(len(val_index))},
        "training": training,
        "offline": offline,
        "export": export,
        "closed_loop": closed_loop.summarise(episodes, PAIRS),
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
