"""SARA-RT on a PaliGemma policy (RT-2's architecture family), closed-loop in pybullet.

The paper's RT-2 result on keras-hub's PaliGemma, built by constructor at a
size a 2-core CPU trains (`grasping/vla_policy.py`), on the same scenes and
data as `rt2_grasping.py`:

1. **Data.** The scripted expert's demonstrations and DART-style perturbed
   states with 64x64 camera frames (`pct_grasping.load_demonstrations`,
   cached and shared with `rt2_grasping.py`).
2. **Teachers.** One softmax PaliGemma policy per action interface
   (`tokens`: RT-2's action tokens, next-token cross-entropy on the three
   action tokens; `vector`: a tanh head, mean squared error) and history H,
   behaviour-cloned on the expert's actions.
3. **Convert + up-train.** `keras_sara.convert(teacher, layers=vit_attention,
   blend=0.0)` (the ViT, as in the paper: "sara-vit") and
   `layers=decoder_attention` (ViT and Gemma decoder: "sara-vitdec"), each
   up-trained with `keras_sara.callbacks.UpTraining` on a fraction of the
   teacher's steps, then `keras_sara.finalize`.
4. **Closed loop.** Every policy on the same fixed seeds as the other grasping
   tables, two simulator processes. Each control step encodes only the new
   frame (`FrameTokenCache`); token policies decode greedily, constrained to
   action tokens, on the KV cache (teacher, sara-vit) or the constant-size
   SARA state (sara-vitdec); an invalid decode is an error, never an action.
   The vector policies also play as LiteRT files (`export_vector_policy`: a
   one-frame vision tower and the decoder with its head, float32, verified),
   run by `tflite.runner.PolicyRunner` with the older frames' tokens cached.
   LiteRT files of the token policies (a decoder step on the state) are not
   built yet.

Every stage's product is kept under `--out-dir`, so an interrupted run resumes
(another setting there is refused unless `--fresh`). Writes `results.json`,
`results.md` and `success.png` there.

Run:
    python examples/vla_grasping.py --quick     # minutes: tiny data, H = 3, two episodes per policy
    python examples/vla_grasping.py             # the full run (300 episodes per policy; hours on 2 cores)
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
from pct_grasping import _errors, load_demonstrations, prepare_out_dir, split_frames  # noqa: E402

from keras_sara.utils import atomic_write  # noqa: E402

OUT_DIR = os.path.join(ROOT, "examples", "results", "vla_grasping")
INTERFACES = ("tokens", "vector")
CONVERSIONS = {"sara-vit": "vit_attention", "sara-vitdec": "decoder_attention"}

FULL = dict(
    demos=200, perturbed_episodes=600, noise=0.3, collect_points=64, camera=64,  # the data of rt2_grasping.py
    teacher_epochs=15, batch_size=32, lr=1e-3,
    uptrain_fraction=0.5, uptrain_lr=3e-4, blend_fraction=0.5,
    episodes=300, workers=2, validation_fraction=0.1,
)
QUICK = dict(FULL, demos=4, perturbed_episodes=8, teacher_epochs=2, episodes=2, uptrain_fraction=0.5)


def log(message: str) -> None:
    closed_loop.log("vla_grasping", message)


def policy_names(interfaces, histories, kinds=("teacher", *CONVERSIONS)) -> list:
    """Keras policies of every interface and H, and the LiteRT files of the vector ones (`_tflite`)."""
    names = [f"{kind}_{i}_h{h}" for i in interfaces for h in histories for kind in kinds]
    return names + [f"{n}_tflite" for n in names if "_vector_" in n]


def _parse_name(name):
    kind, interface, h = name.removesuffix("_tflite").rsplit("_", 2)
    return kind, interface, int(h[1:])


# ---------------------------------------------------------------------- data


class Batches:
    """Batches of (policy inputs, targets[, weights]) over frame histories, as a `tf.data` pipeline.

    keras-hub's `CausalLM.fit` takes arrays or `tf.data` only (no `PyDataset`);
    the histories are gathered per batch, so the (frames, H, 64, 64, 3)
    array is never built. `len()` is the number of batches of an epoch.
    """

    def __init__(self, data, index, history, interface, batch_size, seed, shuffle):
        from vla_policy import history_index

        self.data, self.interface, self.batch_size, self.shuffle = data, interface, batch_size, shuffle
        self.hist = history_index(data["episode"], data["step"], history)
        self.order, self.rng = np.array(index), np.random.default_rng(seed)

    def __len__(self):
        return int(np.ceil(len(self.order) / self.batch_size))

    def batch(self, rows):
        from vla_policy import token_targets, vla_inputs

        images, gripper, actions = self.data["image"][self.hist[rows]], self.data["gripper"][rows], self.data["actions"][rows]
        if self.interface == "vector":
            return vla_inputs(images, gripper), actions
        inputs = vla_inputs(images, gripper, actions=actions)
        return (inputs, *token_targets(inputs))

    def _batches(self):
        if self.shuffle:
            self.rng.shuffle(self.order)
        for i in range(len(self)):
            yield self.batch(self.order[i * self.batch_size:(i + 1) * self.batch_size])

    def dataset(self):
        import tensorflow as tf

        first = self.batch(self.order[: self.batch_size])
        signature = tf.nest.map_structure(
            lambda a: tf.TensorSpec((None,) + a.shape[1:], tf.as_dtype(a.dtype)), first)
        return tf.data.Dataset.from_generator(self._batches, output_signature=signature).prefetch(1)


def make_dataset(data, index, history, interface, batch_size, seed, shuffle):
    return Batches(data, index, history, interface, batch_size, seed, shuffle)


# ---------------------------------------------------------------- training


def _history(fit):
    return {k: [float(v) for v in vs] for k, vs in fit.history.items()}


def compile_policy(model, interface, lr, steps=None):
    import keras

    schedule = keras.optimizers.schedules.CosineDecay(lr, steps) if steps else lr
    optimizer = keras.optimizers.AdamW(schedule, weight_decay=1e-4)
    if interface == "tokens":
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      weighted_metrics=[])
    else:
        model.compile(optimizer=optimizer, loss="mse")


def train_teacher(cfg, interface, history, train, val):
    from vla_policy import build_vla_policy

    teacher = build_vla_policy(history=history, interface=interface, image_size=cfg["camera"],
                               name=f"teacher_{interface}_h{history}")
    steps = cfg["teacher_epochs"] * len(train)
    compile_policy(teacher, interface, cfg["lr"], steps)
    log(f"teacher {interface} H={history}: {teacher.count_params():,} parameters, {cfg['teacher_epochs']} "
        f"epochs of {len(train)} batches")
    fit = teacher.fit(train.dataset(), validation_data=val.dataset(), epochs=cfg["teacher_epochs"], verbose=2)
    return teacher, {"steps": steps, "history": _history(fit)}


def uptrain(cfg, teacher, kind, interface, train, val, probe, steps):
    import keras

    import keras_sara
    import vla_policy

    keras.utils.set_random_seed(1)
    layers = getattr(vla_policy, CONVERSIONS[kind])
    student, report = keras_sara.convert(teacher, layers=layers, blend=0.0, probe=probe)
    compile_policy(student, interface, cfg["uptrain_lr"])
    blend_steps = max(1, int(round(cfg["blend_fraction"] * steps)))
    callback = keras_sara.callbacks.UpTraining(schedule="linear", blend_steps=blend_steps, probe=probe, verbose=1)
    epochs = max(1, int(np.ceil(steps / len(train))))
    log(f"up-training {teacher.name} -> {kind}: {len(report.converted)} attention layers converted, {steps} "
        f"steps, blend softmax -> linear over {blend_steps} steps")
    fit = student.fit(train.dataset().repeat(), validation_data=val.dataset(), epochs=epochs,
                      steps_per_epoch=min(steps, len(train)), callbacks=[callback], verbose=2)
    sara = keras_sara.finalize(student, probe=probe)
    return sara, {"steps": int(keras.ops.convert_to_numpy(student.optimizer.iterations)),
                  "blend_steps": blend_steps, "history": _history(fit), "fidelity": callback.fidelity_history,
                  "converted_layers": [c.path for c in report.converted]}


def predict_actions(model, interface, inputs, batch=64) -> np.ndarray:
    from vla_policy import ActionTokenizer, decode_action_tokens, vector_actions

    out = []
    for i in range(0, len(inputs["token_ids"]), batch):
        part = {k: v[i:i + batch] for k, v in inputs.items()}
        if interface == "tokens":
            out.append(ActionTokenizer().decode(decode_action_tokens(model, part)))
        else:
            out.append(vector_actions(model, part))
    return np.concatenate(out)


# -------------------------------------------------------------- closed loop


class VLAPolicy:
    """A PaliGemma policy in the control loop: one new frame through the ViT per step, the rest cached."""

    def __init__(self, model, interface):
        from vla_policy import FrameTokenCache

        self.model, self.interface = model, interface
        self.cache = FrameTokenCache(model.get_layer("backbone").vit_encoder)

    def reset(self, env):
        self.cache.reset()

    def __call__(self, env, obs):
        from vla_policy import ActionTokenizer, decode_action_tokens, vector_actions, vla_inputs

        embeddings = self.cache.push(obs["image"])
        inputs = vla_inputs(None, obs["gripper"][None])  # the frames are in `embeddings`
        if self.interface == "tokens":  # raises InvalidActionTokens rather than act on a bad decode
            return ActionTokenizer().decode(decode_action_tokens(self.model, inputs, image_embeddings=embeddings))[0]
        return vector_actions(self.model, inputs, image_embeddings=embeddings)[0]


def _load_policy(name, out_dir):
    import keras

    import keras_sara  # noqa: F401  (registers the SARA layers for loading)
    from expert import RandomPolicy, ScriptedExpert
    from vla_policy import vla_classes

    if name == "random":
        return RandomPolicy()
    if name == "expert":
        return ScriptedExpert()
    _, interface, history = _parse_name(name)
    if name.endswith("_tflite"):
        from vla_policy import LiteRTVectorPolicy

        return LiteRTVectorPolicy(os.path.join(out_dir, name.removesuffix("_tflite")), history)
    vla_classes()
    return VLAPolicy(keras.saving.load_model(os.path.join(out_dir, f"{name}.keras")), interface)


# ------------------------------------------------------------------ report


def pairs_for(interfaces, histories) -> list:
    pairs = []
    for i in interfaces:
        for h in histories:
            pairs += [(f"{kind}_{i}_h{h}", f"teacher_{i}_h{h}") for kind in CONVERSIONS]
            if i == "vector":
                pairs += [(f"{kind}_{i}_h{h}_tflite", f"{kind}_{i}_h{h}") for kind in ("teacher", *CONVERSIONS)]
        if 1 in histories and 3 in histories:
            pairs += [(f"teacher_{i}_h3", f"teacher_{i}_h1"), (f"sara-vitdec_{i}_h3", f"teacher_{i}_h1")]
    return pairs


def markdown(results) -> str:
    s, cfg = results["closed_loop"], results["config"]
    lines = [
        f"Closed-loop grasp success over {cfg['episodes']} episodes (seeds {EVAL_FIRST_SEED}.."
        f"{EVAL_FIRST_SEED + cfg['episodes'] - 1}), 95% Wilson intervals; offline: action MSE against the "
        "expert on held-out frames:",
        "",
        "| interface | H | policy | runtime | success | 95% interval | offline action MSE |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    for name, p in s["policies"].items():
        kind, interface, h = _parse_name(name)
        mse = results["offline"].get(name, {}).get("mse")
        runtime = "LiteRT (tower + decoder)" if name.endswith("_tflite") else "Keras"
        lines.append(f"| {interface} | {h} | {kind} | {runtime} | {p['success']:.1%} | {p['low']:.1%} - "
                     f"{p['high']:.1%} | {'-' if mse is None else f'{mse:.4f}'} |")
    if results.get("export"):
        lines += ["", "LiteRT files (float32, verified against Keras), p50 ms at batch 1, 1 thread:", "",
                  "| policy | tower (one frame) | decoder (H frames' tokens + prompt) |", "|---|---:|---:|"]
        for name, e in results["export"].items():
            lines.append(f"| {name} | {e['tower_p50_ms']:.2f} | {e['decoder_p50_ms']:.2f} |")
    lines += ["", "Paired differences (same seeds), 95% intervals:", ""] + closed_loop.paired_rows(s["paired"])
    return "\n".join(lines) + "\n"


def write_plot(path, results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = results["closed_loop"]["policies"]
    names = list(table)
    rates = np.array([table[n]["success"] for n in names])
    err = np.array([[table[n]["success"] - table[n]["low"], table[n]["high"] - table[n]["success"]] for n in names]).T
    colors = ["#1f77b4" if n.startswith("teacher") else "#2ca02c" if "vitdec" in n else "#98df8a" for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names)), 4))
    ax.bar(range(len(names)), rates, yerr=err, capsize=4, color=colors)
    ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("grasp success")
    ax.set_title(f"PaliGemma policies, KukaDiverseObjectEnv, {results['config']['episodes']} episodes each, 95% CI",
                 fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


# -------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny data, H = 3, two episodes per policy")
    for key, value in FULL.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None,
                            help=f"default {value} ({QUICK[key]} with --quick)")
    parser.add_argument("--histories", type=int, nargs="+", default=None, help="frame histories H (default 1 3; "
                        "3 with --quick)")
    parser.add_argument("--interfaces", nargs="+", choices=INTERFACES, default=list(INTERFACES))
    parser.add_argument("--out-dir", default=None, help=f"default {os.path.relpath(OUT_DIR, ROOT)}[_quick]")
    parser.add_argument("--fresh", action="store_true", help="delete --out-dir's models and episodes first")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key in FULL:
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    for key in ("teacher_epochs", "batch_size", "episodes", "workers"):
        if cfg[key] < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1. Received: {cfg[key]}")
    if cfg["camera"] % 8:
        parser.error(f"--camera must be a multiple of 8 (the ViT's patch). Received: {cfg['camera']}")
    for key in ("uptrain_fraction", "blend_fraction", "validation_fraction"):
        if not 0 < cfg[key] <= 1:
            parser.error(f"--{key.replace('_', '-')} must be in (0, 1]. Received: {cfg[key]}")
    histories = args.histories or ([3] if args.quick else [1, 3])
    if min(histories) < 1 or len(set(histories)) != len(histories):
        parser.error(f"--histories must be distinct integers >= 1. Received: {histories}")
    cfg["histories"], cfg["interfaces"] = sorted(histories), list(dict.fromkeys(args.interfaces))
    out_dir = args.out_dir or (OUT_DIR + ("_quick" if args.quick else ""))
    return args, cfg, os.path.abspath(out_dir)


def main(argv=None):
    args, cfg, out_dir = parse_args(argv)
    prepare_out_dir(out_dir, cfg, args.fresh)
    start = time.perf_counter()
    timings = {}
    from vla_policy import history_index, vla_classes, vla_inputs

    import keras

    vla_classes()  # so that saved policies load in a resumed run
    data, data_info = load_demonstrations(cfg, images=True, log=log)
    timings["data_s"] = time.perf_counter() - start
    train_index, val_index = split_frames(data, cfg["validation_fraction"])
    log(f"{len(data['actions'])} frames: {len(train_index)} for training, {len(val_index)} held out")

    training_path = os.path.join(out_dir, "training.json")
    training = json.load(open(training_path)) if os.path.exists(training_path) else {}
    offline = {}
    val_actions = data["actions"][val_index]
    for interface in cfg["interfaces"]:
        for h in cfg["histories"]:
            train = make_dataset(data, train_index, h, interface, cfg["batch_size"], seed=h, shuffle=True)
            val = make_dataset(data, val_index, h, interface, cfg["batch_size"], seed=0, shuffle=False)
            hist = history_index(data["episode"], data["step"], h)
            val_inputs = vla_inputs(data["image"][hist[val_index]], data["gripper"][val_index])
            probe = {k: v[:8] for k, v in val.batch(val_index[:8])[0].items()}
            def load_or_make(name, make):
                """The policy saved as `name` in --out-dir, or `make()`'s (model, record), saved and recorded."""
                path, t = os.path.join(out_dir, f"{name}.keras"), time.perf_counter()
                if os.path.exists(path):
                    model = keras.saving.load_model(path)
                    log(f"{name}: loaded")
                else:
                    model, training[name] = make()
                    atomic_write(path, model.save)
                    write_json(training_path, training)
                timings[f"{name}_s"] = time.perf_counter() - t
                offline[name] = _errors(predict_actions(model, interface, val_inputs), val_actions)
                return model

            name = f"teacher_{interface}_h{h}"
            teacher = load_or_make(name, lambda: train_teacher(cfg, interface, h, train, val))
            for kind in CONVERSIONS:
                load_or_make(f"{kind}_{interface}_h{h}", lambda: uptrain(
                    cfg, teacher, kind, interface, train, val, probe,
                    max(1, int(round(cfg["uptrain_fraction"] * training[name]["steps"])))))
    export_path = os.path.join(out_dir, "export.json")
    export = json.load(open(export_path)) if os.path.exists(export_path) else {}
    if "vector" in cfg["interfaces"]:
        from vla_policy import export_vector_policy

        probe_rows = val_index[:max(cfg["histories"]) + 2]
        for h in cfg["histories"]:
            for kind in ("teacher", *CONVERSIONS):
                name = f"{kind}_vector_h{h}"
                prefix = os.path.join(out_dir, name)
                if name in export and all(os.path.exists(f"{prefix}_{p}.tflite") for p in ("tower", "decoder")):
                    continue
                log(f"export {name} (tower + decoder)")
                reports = export_vector_policy(keras.saving.load_model(prefix + ".keras"), prefix,
                                               data["image"][probe_rows], data["gripper"][probe_rows])
                export[name] = {f"{part}_{k}": v for part, r in reports.items() for k, v in (
                    ("p50_ms", r.latency_p50_ms), ("relative_error", r.relative_error),
                    ("size_kb", r.size_bytes / 1024), ("softmax_ops", int(r.op_histogram.get("SOFTMAX", 0))))}
                write_json(export_path, export)
    offline["zero action"] = _errors(np.zeros_like(val_actions), val_actions)
    log("offline action MSE on held-out frames: " + ", ".join(f"{k} {v['mse']:.4f}" for k, v in offline.items()))

    t = time.perf_counter()
    policies = policy_names(cfg["interfaces"], cfg["histories"])
    episodes = closed_loop.evaluate(policies, cfg["episodes"], cfg["workers"], out_dir, _load_policy,
                                    dict(num_points=cfg["collect_points"], camera=cfg["camera"]), tag="vla_grasping")
    timings["closed_loop_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start
    results = {
        "command": "python examples/vla_grasping.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "config": cfg,
        "data": data_info,
        "frames": {"train": int(len(train_index)), "held_out": int(len(val_index))},
        "training": training,
        "offline": offline,
        "export": export,
        "closed_loop": closed_loop.summarise(episodes, pairs_for(cfg["interfaces"], cfg["histories"])),
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
