"""SARA-RT up-training on real images: a ViT on Fashion-MNIST, softmax -> linear.

1. Trains (or loads from a cache) a small Vision Transformer teacher built with
   plain `keras.layers.MultiHeadAttention`: 4x4 patches (49 tokens), a learned
   position embedding, pre-LayerNorm encoder blocks, width 64, 4 heads.
2. For each up-training method in `METHODS` and each budget (a fraction of the
   teacher's training steps), converts a fresh copy of the teacher with
   `keras_sara.convert`, up-trains it with `model.fit` steered by
   `keras_sara.callbacks.UpTraining`, makes it purely linear with
   `keras_sara.finalize` where it was converted with a softmax branch
   (`blend=0.0`), and measures test accuracy. Budget 0 is the converted
   model with no up-training at all.

The paper's recipe is the `hard` method: swap the kernel, keep every weight,
continue with the task loss. The other methods add a softmax-to-linear blend
schedule, attention distillation (each layer's own softmax attention is the
teacher) and a learnable Hedgehog feature map.

Data: Debian's `dataset-fashion-mnist` package (idx gz files under
/usr/share/datasets/fashion-mnist); nothing is downloaded.

Writes `results.json`, `results.md` and `accuracy_vs_steps.png` under
`--out-dir`, and the trained teacher as a `.keras` file keyed by its settings
(a re-run with the same settings skips training).

Run:
    KERAS_BACKEND=tensorflow python examples/uptrain_vit.py --quick        # ~1-2 min
    KERAS_BACKEND=tensorflow python examples/uptrain_vit.py                # the full study
    KERAS_BACKEND=tensorflow python examples/uptrain_vit.py --methods hard blend --budgets 0.05
"""

import argparse
import gzip
import json
import math
import os
import sys
import time
import warnings

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sara  # noqa: E402
from keras_sara.utils import atomic_write  # noqa: E402

DATA_DIR = "/usr/share/datasets/fashion-mnist"
OUT_DIR = os.path.join("examples", "results", "uptrain_vit")

# teacher: a small ViT
PATCH = 4  # 28x28 -> 7x7 = 49 patch tokens
WIDTH = 64
HEADS = 4  # key_dim = WIDTH // HEADS = 16
MLP_RATIO = 2
LAYERS = 4
TEACHER_EPOCHS = 4
TEACHER_LR = 1e-3
BATCH = 128

# up-training study
BUDGETS = (0.01, 0.02, 0.05, 0.10)  # fractions of the teacher's training steps
LR = 3e-4
PROBE = 64  # test images on which UpTraining logs per-layer fidelity (linear vs softmax rel. error)
SEED = 0

# `--quick`: the smallest settings, for a smoke test (about a minute on 2 cores)
QUICK = {
    "train_size": 2000,
    "test_size": 1000,
    "teacher_epochs": 1,
    "layers": 2,
    "budgets": (0.10, 0.25),  # 2 and 4 steps: a blend schedule can reach 1
    "methods": ("hard", "blend+distill"),
}

# Up-training methods: `convert` arguments and `UpTraining` arguments.


class Share(float):
    """A share of the run's up-training steps (a step count that scales with the budget)."""


HALF, QUARTER = Share(0.5), Share(0.25)
METHODS = {
    "hard": {  # the paper: hard swap, task loss only
        "convert": {"feature_map": "relu"},
        "callback": {},
    },
    "blend": {
        "convert": {"feature_map": "relu", "blend": 0.0},
        "callback": {"schedule": "cosine", "blend_steps": HALF},
    },
    "distill": {
        "convert": {"feature_map": "relu", "blend": 0.0},
        "callback": {"schedule": "hard", "distillation_weight": 1.0},
    },
    "blend+distill": {
        "convert": {"feature_map": "relu", "blend": 0.0},
        "callback": {"schedule": "cosine", "blend_steps": HALF, "distillation_weight": 1.0},
    },
    "hedgehog+distill": {
        "convert": {"feature_map": "hedgehog", "blend": 0.0},
        "callback": {"schedule": "cosine", "blend_steps": HALF, "distillation_weight": 1.0},
    },
    # variants tried after the first study (not in the default --methods)
    "blend+distill-decay": {  # distillation fades out with the blend
        "convert": {"feature_map": "relu", "blend": 0.0},
        "callback": {"schedule": "cosine", "blend_steps": HALF, "distillation_weight": 1.0,
                     "distillation_steps": HALF, "distillation_schedule": "linear"},
    },
    "blend+stage": {  # attention-only for the first quarter
        "convert": {"feature_map": "relu", "blend": 0.0},
        "callback": {"schedule": "cosine", "blend_steps": HALF, "attention_only_steps": QUARTER},
    },
    "hedgehog+distill-decay": {
        "convert": {"feature_map": "hedgehog", "blend": 0.0},
        "callback": {"schedule": "cosine", "blend_steps": HALF, "distillation_weight": 1.0,
                     "distillation_steps": HALF, "distillation_schedule": "linear"},
    },
    "hedgehog+distill-decay+kd": {
        "convert": {"feature_map": "hedgehog", "blend": 0.0},
        "callback": {"schedule": "cosine", "blend_steps": HALF, "distillation_weight": 1.0,
                     "distillation_steps": HALF, "distillation_schedule": "linear"},
        "targets": "teacher",
    },
    "hard+kd": {
        "convert": {"feature_map": "relu"},
        "callback": {},
        "targets": "teacher",
    },
    "blend+kd": {  # the task loss replaced by the teacher's predictions as soft targets
        "convert": {"feature_map": "relu", "blend": 0.0},
        "callback": {"schedule": "cosine", "blend_steps": HALF},
        "targets": "teacher",
    },
}
DEFAULT_METHODS = ("hard", "blend", "distill", "blend+distill", "hedgehog+distill")


# ----------------------------------------------------------------------- data


def _read_idx(path, magic, ndim):
    """One idx file (big-endian header: magic, then one uint32 per dimension)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path} is not an idx file of the expected kind: magic {found:#010x}, expected {magic:#010x}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(shape):
        raise ValueError(f"{path}: header says {shape} ({math.prod(shape)} values), file holds {data.size}")
    return data.reshape(shape)


def load_fashion_mnist(data_dir=DATA_DIR):
    """(x_train, y_train), (x_test, y_test): float32 (N, 28, 28, 1) in [0, 1], int32 labels."""
    splits = []
    for split in ("train", "t10k"):
        images = os.path.join(data_dir, f"{split}-images-idx3-ubyte.gz")
        labels = os.path.join(data_dir, f"{split}-labels-idx1-ubyte.gz")
        missing = [p for p in (images, labels) if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST not found: missing {missing}. Install Debian's package "
                "(`apt-get install dataset-fashion-mnist`) or pass `--data-dir`; "
                "this example never downloads data."
            )
        x = _read_idx(images, 0x00000803, 3).astype("float32")[..., None] / 255.0  # (N, 28, 28, 1)
        y = _read_idx(labels, 0x00000801, 1).astype("int32")
        if len(x) != len(y):
            raise ValueError(f"{images} holds {len(x)} images but {labels} {len(y)} labels")
        splits.append((x, y))
    return splits[0], splits[1]


# -------------------------------------------------------------------- teacher


@keras.saving.register_keras_serializable(package="uptrain_vit")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned (tokens, width) embedding to a (batch, tokens, width) input."""

    def build(self, input_shape):
        self.embedding = self.add_weight(
            shape=tuple(input_shape[-2:]),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="embedding",
        )

    def call(self, x):
        return x + keras.ops.cast(self.embedding, x.dtype)


def build_vit(layers=LAYERS, width=WIDTH, heads=HEADS, patch=PATCH, mlp_ratio=MLP_RATIO, classes=10):
    """A pre-LayerNorm ViT classifier with stock `keras.layers.MultiHeadAttention`."""
    inputs = keras.Input((28, 28, 1), name="image")
    x = keras.layers.Conv2D(width, patch, strides=patch, name="patch_embed")(inputs)  # (B, 7, 7, W)
    tokens = (28 // patch) ** 2
    x = keras.layers.Reshape((tokens, width), name="patches")(x)  # (B, 49, W)
    x = PositionEmbedding(name="position_embedding")(x)
    for i in range(layers):
        h = keras.layers.LayerNormalization(epsilon=1e-6, name=f"block_{i}_ln_attn")(x)
        h = keras.layers.MultiHeadAttention(heads, width // heads, name=f"block_{i}_mha")(h, h)
        x = keras.layers.Add(name=f"block_{i}_attn_residual")([x, h])
        h = keras.layers.LayerNormalization(epsilon=1e-6, name=f"block_{i}_ln_mlp")(x)
        h = keras.layers.Dense(mlp_ratio * width, activation="gelu", name=f"block_{i}_mlp_in")(h)
        h = keras.layers.Dense(width, name=f"block_{i}_mlp_out")(h)
        x = keras.layers.Add(name=f"block_{i}_mlp_residual")([x, h])
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)  # (B, W)
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="ln_head")(x)
    outputs = keras.layers.Dense(classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="vit")


def compile_classifier(model, lr):
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def accuracy(model, x, y):
    logits = model.predict(x, batch_size=256, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == y))


def steps_per_epoch(n):
    return math.ceil(n / BATCH)


def teacher_paths(out_dir, cfg):
    key = (
        f"teacher_n{cfg['train_size']}_e{cfg['teacher_epochs']}_l{cfg['layers']}_w{WIDTH}"
        f"_h{HEADS}_p{PATCH}_lr{TEACHER_LR:g}_s{cfg['seed']}"
    )
    return os.path.join(out_dir, key + ".keras"), os.path.join(out_dir, key + ".json")


def get_teacher(x_train, y_train, cfg):
    """The trained teacher (from the cache when its settings match) and its training info."""
    model_path, info_path = teacher_paths(cfg["out_dir"], cfg)
    if os.path.exists(model_path) and os.path.exists(info_path):
        log(f"teacher: loading {model_path}")
        with open(info_path) as f:
            return keras.models.load_model(model_path), json.load(f)

    keras.utils.set_random_seed(cfg["seed"])
    teacher = build_vit(layers=cfg["layers"])
    compile_classifier(teacher, TEACHER_LR)
    n_steps = cfg["teacher_epochs"] * steps_per_epoch(len(x_train))
    log(
        f"teacher: training a {cfg['layers']}-block ViT ({teacher.count_params():,} parameters) "
        f"on {len(x_train):,} images for {cfg['teacher_epochs']} epoch(s) = {n_steps} steps"
    )
    start = time.perf_counter()
    teacher.fit(x_train, y_train, batch_size=BATCH, epochs=cfg["teacher_epochs"], shuffle=True, verbose=2)
    seconds = time.perf_counter() - start
    info = {
        "steps": n_steps,
        "epochs": cfg["teacher_epochs"],
        "train_size": len(x_train),
        "train_seconds": round(seconds, 2),
        "seconds_per_epoch": round(seconds / cfg["teacher_epochs"], 2),
        "parameters": teacher.count_params(),
    }
    atomic_write(model_path, teacher.save)
    atomic_write(info_path, lambda tmp: _dump_json(tmp, info))
    log(f"teacher: trained in {seconds:.1f} s ({info['seconds_per_epoch']:.1f} s/epoch), saved {model_path}")
    return teacher, info


# ------------------------------------------------------------------ up-training


def training_order(n, steps, seed):
    """Indices of exactly `steps` full batches: seeded permutations, concatenated as needed.

    Seeded by `seed` alone, so every method sees the same images in the same
    order at a given budget (and a longer budget extends a shorter one).
    """
    rng = np.random.default_rng(seed)
    need = steps * BATCH
    order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(need / n))])
    return order[:need]


def run_method(name, teacher, data, fraction, steps, cfg):
    """Converts the teacher, up-trains for `steps` steps; returns the result row and the model."""
    (x_train, y_train), (x_test, y_test) = data
    spec = METHODS[name]
    keras.utils.set_random_seed(cfg["seed"])
    student, report = keras_sara.convert(teacher, **spec["convert"])
    callback, seconds = None, 0.0
    if steps > 0:
        kwargs = {
            k: (max(1, int(steps * v)) if isinstance(v, Share) else v) for k, v in spec["callback"].items()
        }
        callback = keras_sara.callbacks.UpTraining(probe=x_test[:PROBE], verbose=0, **kwargs)
        order = training_order(len(x_train), steps, cfg["seed"])
        start = time.perf_counter()
        if spec.get("targets") == "teacher":
            # Output distillation: the teacher's predicted class probabilities are the targets
            # (labels are still needed nowhere else; the cost of the teacher pass is counted).
            targets = keras.ops.convert_to_numpy(
                keras.ops.softmax(teacher.predict(x_train[order], batch_size=256, verbose=0))
            )
            student.compile(
                optimizer=keras.optimizers.AdamW(learning_rate=cfg["lr"]),
                loss=keras.losses.CategoricalCrossentropy(from_logits=True),
            )
        else:
            targets = y_train[order]
            compile_classifier(student, cfg["lr"])
        student.fit(
            x_train[order], targets, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
            callbacks=[callback],
        )
        seconds = time.perf_counter() - start
    if "blend" in spec["convert"]:  # drop the softmax branch: measure a purely linear model
        with warnings.catch_warnings():
            if steps == 0:  # dropping the softmax share unblended is the point of budget 0
                warnings.filterwarnings("ignore", message="finalize: blend factor below 1")
            student = keras_sara.finalize(student)
    history = [_plain(h) for h in getattr(callback, "fidelity_history", None) or []]
    acc = accuracy(student, x_test, y_test)
    row = {
        "method": name,
        "fraction": fraction,
        "steps": steps,
        "accuracy": acc,
        "percent_of_teacher": round(100 * acc / cfg["teacher_accuracy"], 2),
        "wall_seconds": round(seconds, 2),
        "converted_layers": report.num_converted,
        "final_fidelity": history[-1].get("mean") if history else None,
        "fidelity_history": history,
    }
    return row, student


def export_and_time(teacher, student, method, x_test, out_dir):
    """Exports teacher and up-trained student to LiteRT (verified), compares size, error, latency."""
    rows = {}
    for name, model in (("teacher", teacher), (f"student ({method})", student)):
        path = os.path.join(out_dir, "teacher.tflite" if name == "teacher" else "student.tflite")
        report = keras_sara.export.export_tflite(
            model, path, probe=x_test[:8], input_shapes=[(1, 28, 28, 1)], benchmark_runs=50
        )
        rows[name] = {
            "path": path,
            "size_bytes": report.size_bytes,
            "relative_error_vs_keras": report.relative_error,
            "latency_p50_ms": report.latency_p50_ms,
            "latency_p90_ms": report.latency_p90_ms,
            "softmax_ops": report.op_histogram.get("SOFTMAX", 0),
            "flex_free": report.flex_free,
        }
        log(
            f"LiteRT {name}: {report.size_bytes / 1e6:.2f} MB, relative error vs Keras "
            f"{report.relative_error:.1e}, SOFTMAX ops {rows[name]['softmax_ops']}, "
            f"p50 {report.latency_p50_ms:.2f} ms (batch 1, 49 tokens)"
        )
    return rows


# --------------------------------------------------------------------- output


def log(msg):
    print(msg, flush=True)


def _plain(value):
    """Numpy / tensor scalars to floats, recursively, for JSON."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _write_text(path, text):
    with open(path, "w") as f:
        f.write(text)


def _dump_json(path, payload):
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def cell(row, teacher_acc):
    return f"{row['accuracy']:.4f} ({100 * row['accuracy'] / teacher_acc:.1f}%)"


def markdown(results, budgets, methods, command):
    teacher_acc = results["teacher"]["test_accuracy"]
    header = ["method", "0 steps"] + [
        f"{b:g} ({results['budget_steps'][str(b)]} steps)" for b in budgets
    ]
    lines = [
        "# SARA-RT up-training of a ViT on Fashion-MNIST",
        "",
        f"Teacher ({results['config']['layers']}-block ViT, softmax attention): test accuracy "
        f"{teacher_acc:.4f} after {results['teacher']['steps']} steps. Cells: test accuracy of "
        "the linear-attention model (% of the teacher's) after up-training for a fraction of the "
        "teacher's steps.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for m in methods:
        rows = {r["fraction"]: r for r in results["runs"] if r["method"] == m}
        cells = [cell(rows[f], teacher_acc) if f in rows else "" for f in (0.0, *budgets)]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


def write_plot(path, results, methods):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher_acc = results["teacher"]["test_accuracy"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        pts = sorted((r["steps"], r["accuracy"]) for r in results["runs"] if r["method"] == m)
        ax.plot(*zip(*pts), marker="o", label=m)
    ax.axhline(teacher_acc, color="black", linestyle="-", linewidth=1, label=f"teacher ({teacher_acc:.3f})")
    ax.axhline(0.99 * teacher_acc, color="gray", linestyle="--", linewidth=1, label="99% of teacher")
    ax.set_xlabel(f"up-training steps (teacher: {results['teacher']['steps']} steps)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("SARA-RT up-training, ViT on Fashion-MNIST (linear attention)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


# ----------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"smallest settings for a smoke test: {QUICK}")
    p.add_argument("--teacher-epochs", type=int, help=f"default {TEACHER_EPOCHS}")
    p.add_argument("--budgets", type=float, nargs="+", help=f"fractions of the teacher's steps (default {BUDGETS})")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), help=f"default: {' '.join(DEFAULT_METHODS)}")
    p.add_argument("--lr", type=float, default=LR, help="up-training learning rate (AdamW)")
    p.add_argument("--train-size", type=int, help="training images (default all 60,000)")
    p.add_argument("--test-size", type=int, help="test images (default all 10,000)")
    p.add_argument("--layers", type=int, help=f"encoder blocks of the ViT (default {LAYERS})")
    p.add_argument("--out-dir", default=OUT_DIR)
    p.add_argument("--data-dir", default=DATA_DIR)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--teacher-only", action="store_true", help="train (or load) the teacher and stop")
    p.add_argument("--no-export", dest="export", action="store_false",
                   help="skip the LiteRT export of the teacher and the best student")
    args = p.parse_args(argv)
    quick = QUICK if args.quick else {}
    defaults = {"teacher_epochs": TEACHER_EPOCHS, "budgets": BUDGETS, "methods": DEFAULT_METHODS,
                "train_size": None, "test_size": None, "layers": LAYERS}
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick.get(name, default))
    for name in ("teacher_epochs", "layers"):
        if getattr(args, name) < 1:
            p.error(f"`--{name.replace('_', '-')}` must be >= 1. Received: {getattr(args, name)}")
    for name in ("train_size", "test_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"`--{name.replace('_', '-')}` must be >= 1. Received: {v}")
    if not all(0 < b for b in args.budgets):
        p.error(f"`--budgets` must be positive fractions of the teacher's steps. Received: {args.budgets}")
    if args.lr <= 0:
        p.error(f"`--lr` must be positive. Received: {args.lr}")
    args.budgets = tuple(sorted(set(args.budgets)))
    args.methods = tuple(dict.fromkeys(args.methods))
    return args


def main(argv=None):
    args = parse_args(argv)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")  # every run is a new model: retracing is expected
    log(f"Keras {keras.__version__}, backend {backend}, keras-sara {keras_sara.__version__}")
    keras.utils.set_random_seed(args.seed)

    (x_train, y_train), (x_test, y_test) = load_fashion_mnist(args.data_dir)
    x_train, y_train = x_train[: args.train_size], y_train[: args.train_size]
    x_test, y_test = x_test[: args.test_size], y_test[: args.test_size]
    log(f"data: Fashion-MNIST, {len(x_train):,} train and {len(x_test):,} test images")
    cfg = {
        "train_size": len(x_train),
        "test_size": len(x_test),
        "teacher_epochs": args.teacher_epochs,
        "layers": args.layers,
        "width": WIDTH,
        "heads": HEADS,
        "patch": PATCH,
        "teacher_lr": TEACHER_LR,
        "lr": args.lr,
        "batch_size": BATCH,
        "budgets": list(args.budgets),
        "methods": list(args.methods),
        "seed": args.seed,
        "out_dir": args.out_dir,
        "quick": args.quick,
    }

    teacher, info = get_teacher(x_train, y_train, cfg)
    teacher_acc = accuracy(teacher, x_test, y_test)
    log(f"teacher: test accuracy {teacher_acc:.4f}, {info['steps']} training steps")
    results = {
        "config": {k: v for k, v in cfg.items() if k != "out_dir"},
        "backend": backend,
        "teacher": {**info, "test_accuracy": teacher_acc},
        "budget_steps": {},
        "runs": [],
    }
    command = "python examples/uptrain_vit.py " + " ".join(sys.argv[1:] if argv is None else argv)
    json_path = os.path.join(args.out_dir, "results.json")
    if args.teacher_only:
        atomic_write(json_path, lambda tmp: _dump_json(tmp, results))
        return results

    data = ((x_train, y_train), (x_test, y_test))
    cfg["teacher_accuracy"] = teacher_acc
    budget_steps = {b: max(1, round(b * info["steps"])) for b in args.budgets}
    results["budget_steps"] = {str(b): s for b, s in budget_steps.items()}
    plan = [(m, 0.0, 0) for m in args.methods] + [
        (m, b, budget_steps[b]) for b in args.budgets for m in args.methods
    ]
    untrained = {}  # budget 0 depends only on how the teacher was converted
    best = (-1.0, None, None)  # the most accurate student at the largest budget
    for i, (method, fraction, steps) in enumerate(plan, 1):
        key = json.dumps(METHODS[method]["convert"], sort_keys=True)
        if steps == 0 and key in untrained:
            row = {**untrained[key], "method": method}
        else:
            row, student = run_method(method, teacher, data, fraction, steps, cfg)
            if steps == max(budget_steps.values()) and row["accuracy"] > best[0]:
                best = (row["accuracy"], method, student)
        if steps == 0:
            untrained[key] = row
        results["runs"].append(row)
        fid = "" if row["final_fidelity"] is None else f", attention rel. error {row['final_fidelity']:.3f}"
        log(
            f"[{i}/{len(plan)}] {method:<16} budget {fraction:<5g} {steps:>5} steps: "
            f"accuracy {row['accuracy']:.4f} ({row['percent_of_teacher']:.1f}% of teacher){fid}, "
            f"{row['wall_seconds']:.1f} s"
        )
        # after every run, so an interrupted study keeps what it measured
        atomic_write(json_path, lambda tmp: _dump_json(tmp, results))

    if args.export and best[2] is not None:
        results["export"] = export_and_time(teacher, best[2], best[1], x_test, args.out_dir)
        atomic_write(json_path, lambda tmp: _dump_json(tmp, results))
    md = markdown(results, args.budgets, args.methods, command)
    atomic_write(os.path.join(args.out_dir, "results.md"), lambda tmp: _write_text(tmp, md))
    write_plot(os.path.join(args.out_dir, "accuracy_vs_steps.png"), results, args.methods)
    log("")
    log(md)
    log(f"wrote results.json, results.md and accuracy_vs_steps.png to {args.out_dir}")
    return results


if __name__ == "__main__":
    main()
