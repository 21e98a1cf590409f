"""Per-token decode latency and memory: a SARA decoder's linear state against keras-hub's KV cache.

One keras-hub `LlamaCausalLM`, built from its constructor with random weights
(nothing downloaded; `--layers`, `--hidden`, ... set its size), decodes one
token at a time at each context length of `--contexts` (default 64, 512,
4,096 and 16,384 tokens already seen), two ways:

- softmax: the model as built, through its own `call_with_cache` and
  keras-hub's KV cache `[B, layers, 2, max_length, kv_heads, head_dim]`.
  keras-hub reads (and rewrites) the whole `max_length` cache at every step,
  so `max_length = context + --steps`, the least a run of that many steps
  needs.
- sara: `keras_sara.convert(teacher, verify=False)` of the same model (same
  seed, same weights), stepped by `keras_sara.decoding.make_decoder_step_model`
  with its state `[B, layers, K, M, D + 1]`, whose size does not depend on
  the context.

Both steps run under the same compilation, `tf.function(jit_compile=False)`
around one step (`--jit-compile true` for XLA), TensorFlow backend, CPU,
float32, batch `--batch`. Per point: `--warmup` untimed steps (the first
traces), then `--steps` consecutive timed steps at positions context,
context + 1, ..., each fed the cache or state the previous step returned and
timed until its logits are on the host. Median and p90 ms per token.

The cache and state hold random numbers, not the keys and values of a real
prefix: a step's cost does not depend on the values (SARA's state is drawn
positive so its normaliser stays finite; the results record that the logits
were finite). Softmax at 16,384 tokens could not absorb a real prefix on this
machine anyway: one full forward would need a (16,384 x 16,384) score matrix
per head.

Memory. Every (model, context) point runs in a fresh subprocess, which
records its peak RSS (`VmHWM`, and `ru_maxrss` beside it: the parent imports
nothing heavy so the two agree) and the bytes of the decode state or KV cache
tensor, the figure that does or does not grow with the context. A point
estimated too big for the available RAM is reported as skipped, and one that
runs out of memory anyway is reported as such; neither stops the sweep.

Writes `decode_latency.{csv,json,md,png}` under `--out-dir` (default
benchmarks/results/decode) with machine information, prints the table and
checks the targets of issue 18: SARA's per-token latency at 4,096 tokens of
context at most 1.2x that at 64, and its decode memory flat in the context
where the softmax decoder's grows.

Usage:
    python benchmarks/decode_latency.py --quick   # tiny model, short contexts, ~25 s
    python benchmarks/decode_latency.py           # the README table, ~1 min on 2 CPUs
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import time

# The parent process imports neither TensorFlow nor keras_sara before its
# workers finish: on Linux a child's ru_maxrss starts from its parent's peak.
os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402

# ----------------------------------------------------------------- constants

MODELS = ("softmax", "sara")
DEFAULT_CONTEXTS = (64, 512, 4096, 16384)
MODEL_SIZE = dict(vocab=4096, layers=4, heads=8, kv_heads=2, hidden=256, intermediate=512)
DEFAULT_STEPS = 128
DEFAULT_WARMUP = 8
DEFAULT_MEMORY_LIMIT_GB = 16.0

QUICK_CONTEXTS = (32, 256)
QUICK_MODEL_SIZE = dict(vocab=256, layers=2, heads=4, kv_heads=2, hidden=64, intermediate=128)
QUICK_STEPS = 8
QUICK_WARMUP = 2

SEED = 0
# keras-hub's step keeps about this many cache-sized tensors alive at once
# (the cache fed in, each layer's updated keys/values, their stack).
SOFTMAX_LIVE_CACHES = 4
RUNTIME_BYTES = 1 << 30  # TensorFlow, keras-hub and the model, before any cache
AVAILABLE_RAM_SHARE = 0.8  # no swap, shared machine: never start a point above this
WORKER_TIMEOUT_S = 1800

# (key, op, bound): what issue 18 asks of the benchmark
TARGETS = (
    ("sara_latency_4096_over_64", "<=", 1.2),
    ("sara_state_bytes_max_over_min", "==", 1.0),
    ("softmax_cache_bytes_max_over_min", ">", 1.0),
)

RESULT_PREFIX = "DECODE_LATENCY_RESULT "
CSV_COLUMNS = (
    "model", "context", "attention", "max_length", "status", "median_ms", "p90_ms", "mean_ms", "min_ms", "steps",
    "first_call_s", "traces", "state_shape", "state_bytes", "peak_rss_mb", "ru_maxrss_mb",
    "rss_before_state_mb", "logits_finite", "loadavg_1m", "worker_s",
)


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------- memory


def _proc_status_kib(field: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def available_ram_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def head_dim(size: dict) -> int:
    return size["hidden"] // size["heads"]


def cache_shape(size: dict, batch: int, max_length: int) -> tuple:
    """keras-hub's Llama KV cache (`LlamaCausalLM._build_cache`)."""
    return (batch, size["layers"], 2, max_length, size["kv_heads"], head_dim(size))


def skip_reason(model: str, context: int, cfg: dict) -> str:
    """Why a point is not started ("" to run it): a KV cache estimated too big for RAM."""
    if model != "softmax":
        return ""
    cache = 4 * int(np.prod(cache_shape(cfg["size"], cfg["batch"], context + cfg["steps"])))
    estimate = RUNTIME_BYTES + SOFTMAX_LIVE_CACHES * cache
    if estimate > cfg["memory_limit_gb"] * 1e9:
        return (f"skipped: too big for RAM (KV cache {cache / 1e9:.1f} GB, estimated peak "
                f"{estimate / 1e9:.1f} GB > --memory-limit-gb={cfg['memory_limit_gb']:g})")
    avail = available_ram_bytes()
    if avail is not None and estimate > AVAILABLE_RAM_SHARE * avail:
        return (f"skipped: too big for RAM (KV cache {cache / 1e9:.1f} GB, estimated peak "
                f"{estimate / 1e9:.1f} GB > {AVAILABLE_RAM_SHARE:.0%} of available {avail / 1e9:.1f} GB)")
    return ""


# ------------------------------------------------------------------- worker


def build_teacher(size: dict):
    import keras
    import keras_hub

    keras.utils.set_random_seed(SEED)  # the same weights in every worker
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=size["vocab"], num_layers=size["layers"], num_query_heads=size["heads"],
        num_key_value_heads=size["kv_heads"], hidden_dim=size["hidden"],
        intermediate_dim=size["intermediate"])
    return keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)


def build_step(model: str, cfg: dict, context: int):
    """(step function, initial cache or state, extra facts) for one point."""
    import tensorflow as tf

    import keras_sara

    size, batch = cfg["size"], cfg["batch"]
    rng = np.random.default_rng(SEED + context)
    teacher = build_teacher(size)
    if model == "softmax":
        # (B, layers, 2, max_length, kv_heads, head_dim); random keys and values
        state = rng.standard_normal(cache_shape(size, batch, context + cfg["steps"]), dtype=np.float32)

        def step(token_ids, cache, position):
            logits, _, cache = teacher.call_with_cache(token_ids, cache, position[0])
            return logits[:, -1, :], cache  # (B, V)

        facts = {"attention": type(teacher.backbone.transformer_layers[0]._self_attention_layer).__name__}
    else:
        student, report = keras_sara.convert(teacher, verify=False)
        reason = keras_sara.decoding.state_decoding_reason(student)
        if reason is not None:
            raise RuntimeError(f"the converted Llama cannot decode on a state: {reason}")
        step_model = keras_sara.decoding.make_decoder_step_model(student)
        # (B, layers, K, M, D + 1): Psi in [..., :D], Gamma in [..., D]; positive keeps the normaliser finite
        state = np.abs(rng.standard_normal(keras_sara.decoding.state_shape(student, batch), dtype=np.float32))

        def step(token_ids, state, position):
            return step_model([token_ids, state, position])

        facts = {"attention": "+".join(sorted({c.after for c in report.converted})),
                 "converted_layers": report.num_converted,
                 "feature_map": "+".join(sorted({c.feature_map for c in report.converted}))}
    return tf.function(step, jit_compile=cfg["jit_compile"]), state, facts


def measure_point(model: str, context: int, cfg: dict) -> dict:
    """Child process: time `--steps` decode steps of one model at one context."""
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    row = {"model": model, "context": context, "max_length": context + cfg["steps"] if model == "softmax" else None}
    try:
        fn, state, facts = build_step(model, cfg, context)
        row.update(facts)
        row["rss_before_state_mb"] = _proc_status_kib("VmRSS") / 1024
        state = tf.constant(state)
        row.update(state_shape=list(state.shape), state_bytes=int(state.shape.num_elements()) * 4)
        rng = np.random.default_rng(SEED)
        batch, n_warm, n_steps = cfg["batch"], cfg["warmup"], cfg["steps"]
        tokens = rng.integers(1, cfg["size"]["vocab"], (n_warm + n_steps, batch, 1)).astype("int32")
        # warm-up just before the context (the first call traces), timed steps from it
        positions = [max(context - n_warm + i, 0) for i in range(n_warm)] + [context + i for i in range(n_steps)]
        times = []
        for i, pos in enumerate(positions):
            position = tf.constant(np.full((batch,), pos, "int32"))
            start = time.perf_counter()
            logits, state = fn(tokens[i], state, position)
            logits = logits.numpy()  # the step is done once its logits are on the host
            elapsed = time.perf_counter() - start
            if i == 0:
                row["first_call_s"] = elapsed
            if i >= n_warm:
                times.append(elapsed * 1e3)
        ms = np.asarray(times)
        row.update(
            status="ok", median_ms=float(np.median(ms)), p90_ms=float(np.percentile(ms, 90)),
            mean_ms=float(ms.mean()), min_ms=float(ms.min()), steps=len(ms),
            traces=fn.experimental_get_tracing_count(), logits_finite=bool(np.isfinite(logits).all()),
        )
    except (MemoryError, tf.errors.ResourceExhaustedError) as e:
        row["status"] = f"error: out of memory ({type(e).__name__})"
    except Exception as e:  # one point failing should not lose the sweep
        first = str(e).splitlines()[0][:200] if str(e) else ""
        row["status"] = f"error: {type(e).__name__}: {first}"
    hwm = _proc_status_kib("VmHWM")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    maxrss = maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB on Linux
    row.update(peak_rss_mb=hwm / 1024 if hwm is not None else maxrss, ru_maxrss_mb=maxrss,
               loadavg_1m=os.getloadavg()[0])
    return row


def worker_info(cfg: dict) -> dict:
    """Versions, from a worker (the parent does not import them)."""
    import keras
    import keras_hub
    import tensorflow as tf

    return {"tensorflow": tf.__version__, "keras": keras.__version__, "keras_hub": keras_hub.__version__,
            "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads()}


def run_worker(spec: str, cfg: dict) -> None:
    model, context = spec.split(":")
    row = measure_point(model, int(context), cfg)
    row["versions"] = worker_info(cfg)
    print(RESULT_PREFIX + json.dumps(row), flush=True)


# ------------------------------------------------------------------- parent


def _exit_text(returncode: int) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = ": out of memory? (the kernel's OOM killer)" if -returncode == signal.SIGKILL else ""
        return f"error: worker killed by {name}{hint}"
    return f"error: worker exited with status {returncode}"


def worker_argv(cfg: dict, model: str, context: int) -> list:
    size = cfg["size"]
    return [sys.executable, os.path.abspath(__file__), "--_point", f"{model}:{context}",
            "--vocab", str(size["vocab"]), "--layers", str(size["layers"]), "--heads", str(size["heads"]),
            "--kv-heads", str(size["kv_heads"]), "--hidden", str(size["hidden"]),
            "--intermediate", str(size["intermediate"]), "--batch", str(cfg["batch"]),
            "--steps", str(cfg["steps"]), "--warmup", str(cfg["warmup"]),
            "--jit-compile", "true" if cfg["jit_compile"] else "false"]


def measure_isolated(model: str, context: int, cfg: dict) -> dict:
    """One point in a fresh subprocess; a worker that dies becomes a row that says why."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(worker_argv(cfg, model, context), cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"model": model, "context": context, "status": f"error: worker timed out after {WORKER_TIMEOUT_S} s",
                "worker_s": time.perf_counter() - start}
    row = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            row = json.loads(line[len(RESULT_PREFIX):])
    if row is None:
        row = {"model": model, "context": context, "status": _exit_text(proc.returncode)}
        log("  worker stderr tail:\n" + proc.stderr[-1500:])
    row["worker_s"] = time.perf_counter() - start
    return row


def lookup(rows, model, context, key="median_ms"):
    r = next((r for r in rows if r["model"] == model and r["context"] == context), None)
    return None if r is None or r.get("status") != "ok" else r.get(key)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _max_over_min(rows, model, key):
    vals = [r[key] for r in rows if r["model"] == model and r.get("status") == "ok" and r.get(key)]
    return max(vals) / min(vals) if len(vals) >= 2 else None


def derive(rows, cfg) -> dict:
    contexts = cfg["contexts"]
    out = {
        "sara_latency_4096_over_64": ratio(lookup(rows, "sara", 4096), lookup(rows, "sara", 64)),
        "sara_latency_max_over_min_context": ratio(lookup(rows, "sara", max(contexts)),
                                                   lookup(rows, "sara", min(contexts))),
        "softmax_latency_max_over_min_context": ratio(lookup(rows, "softmax", max(contexts)),
                                                      lookup(rows, "softmax", min(contexts))),
        "softmax_over_sara": {str(n): ratio(lookup(rows, "softmax", n), lookup(rows, "sara", n)) for n in contexts},
        "sara_state_bytes_max_over_min": _max_over_min(rows, "sara", "state_bytes"),
        "softmax_cache_bytes_max_over_min": _max_over_min(rows, "softmax", "state_bytes"),
        "sara_peak_rss_max_over_min": _max_over_min(rows, "sara", "peak_rss_mb"),
        "softmax_peak_rss_max_over_min": _max_over_min(rows, "softmax", "peak_rss_mb"),
    }
    targets = {}
    for key, op, bound in TARGETS:
        value = out[key]
        met = None if value is None else {"<=": value <= bound, ">": value > bound, "==": value == bound}[op]
        targets[key] = {"value": value, "target": f"{op} {bound:g}", "met": met}
    out["targets"] = targets
    return out


def _fmt(v, spec=".2f", suffix=""):
    return "n/a" if v is None else f"{v:{spec}}{suffix}"


def _mb(n):
    return None if n is None else n / 2**20


def markdown(rows, cfg, derived) -> str:
    size = cfg["size"]
    lines = [
        f"Llama decoder, {size['layers']} layers, hidden {size['hidden']}, {size['heads']} query / "
        f"{size['kv_heads']} key-value heads (head dim {head_dim(size)}), MLP {size['intermediate']}, "
        f"vocabulary {size['vocab']}; batch {cfg['batch']}, float32, TensorFlow CPU, "
        f"tf.function(jit_compile={cfg['jit_compile']}) per step; {cfg['steps']} timed steps from the context "
        f"(after {cfg['warmup']} warm-up); random cache/state contents. Decode memory: the KV cache "
        "(softmax, max_length = context + steps) or the state (SARA) tensor; peak RSS of the point's own process.",
        "",
        "| context | softmax ms/token (p50 / p90) | SARA ms/token (p50 / p90) | softmax / SARA "
        "| KV cache MB | SARA state MB | softmax peak RSS MB | SARA peak RSS MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def status_cell(model, n, key, spec):
        r = next((r for r in rows if r["model"] == model and r["context"] == n), None)
        if r is None:
            return "-"
        if r.get("status") != "ok":
            return "skipped (RAM)" if r.get("status", "").startswith("skipped") else "error"
        return _fmt(r.get(key), spec)

    def latency(model, n):
        p50, p90 = status_cell(model, n, "median_ms", ".2f"), status_cell(model, n, "p90_ms", ".2f")
        return p50 if p50 == p90 and not p50[0].isdigit() else f"{p50} / {p90}"

    for n in cfg["contexts"]:
        cache = next((r.get("state_bytes") for r in rows if r["model"] == "softmax" and r["context"] == n), None)
        state = next((r.get("state_bytes") for r in rows if r["model"] == "sara" and r["context"] == n), None)
        lines.append(
            f"| {n:,} | {latency('softmax', n)} | {latency('sara', n)} "
            f"| {_fmt(derived['softmax_over_sara'][str(n)], '.2f', 'x')} "
            f"| {_fmt(_mb(cache), '.3f')} | {_fmt(_mb(state), '.3f')} "
            f"| {status_cell('softmax', n, 'peak_rss_mb', '.0f')} | {status_cell('sara', n, 'peak_rss_mb', '.0f')} |"
        )
    lines += ["", "Targets (issue 18):"]
    for key, t in derived["targets"].items():
        met = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        lines.append(f"- {key}: {_fmt(t['value'], '.3f')} (target {t['target']}: {met})")
    for key in ("sara_latency_max_over_min_context", "softmax_latency_max_over_min_context",
                "sara_peak_rss_max_over_min", "softmax_peak_rss_max_over_min"):
        lines.append(f"- {key}: {_fmt(derived[key], '.3f')}")
    notes = [f"- {r['model']} at {r['context']:,}: {r['status']}" for r in rows if r.get("status") != "ok"]
    notes += [f"- {r['model']} at {r['context']:,}: logits not finite" for r in rows
              if r.get("status") == "ok" and not r.get("logits_finite")]
    notes += [f"- {r['model']} at {r['context']:,}: traced {r['traces']} times" for r in rows
              if r.get("status") == "ok" and r.get("traces") != 1]
    if notes:
        lines += ["", "Notes:"] + notes
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------- files


def write_text(path, text):
    from keras_sara.utils import atomic_write

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            f.write(text)

    atomic_write(path, write)


def csv_text(rows) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        cells = {}
        for k in CSV_COLUMNS:
            v = r.get(k)
            cells[k] = ("" if v is None else f"{v:.6g}" if isinstance(v, float)
                        else "x".join(map(str, v)) if isinstance(v, list) else v)
        writer.writerow(cells)
    return buf.getvalue()


def write_plot(path, rows, cfg):
    from keras_sara.utils import atomic_write
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"softmax": ("tab:red", "o", "softmax + KV cache"), "sara": ("tab:blue", "s", "SARA linear state")}
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.6))
    for model in MODELS:
        color, marker, label = styles[model]
        ok = sorted((r for r in rows if r["model"] == model and r.get("status") == "ok"), key=lambda r: r["context"])
        if not ok:
            continue
        x = [r["context"] for r in ok]
        ax_t.plot(x, [r["median_ms"] for r in ok], color=color, marker=marker, label=f"{label}, median")
        ax_t.plot(x, [r["p90_ms"] for r in ok], color=color, marker=marker, ls=":", alpha=0.6, label=f"{label}, p90")
        ax_m.plot(x, [r["state_bytes"] / 2**20 for r in ok], color=color, marker=marker,
                  label=f"{label}: {'cache' if model == 'softmax' else 'state'} tensor")
        ax_m.plot(x, [r["peak_rss_mb"] for r in ok], color=color, marker=marker, ls="--", alpha=0.6,
                  label=f"{label}: peak RSS of the process")
    ticks = list(cfg["contexts"])
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("context (tokens already seen)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_t.set_ylabel("ms per generated token")
    ax_t.set_title("Per-token decode latency")
    ax_t.set_ylim(bottom=0)
    ax_m.set_yscale("log")
    ax_m.set_ylabel("MB")
    ax_m.set_title("Decode memory")
    size = cfg["size"]
    fig.suptitle(f"Llama, {size['layers']} layers x {size['hidden']} wide, {size['heads']}/{size['kv_heads']} heads, "
                 f"batch {cfg['batch']}, TensorFlow CPU, tf.function(jit_compile={cfg['jit_compile']})")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


# --------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", help=f"context lengths (default {DEFAULT_CONTEXTS})")
    p.add_argument("--steps", type=int, help=f"timed decode steps per point (default {DEFAULT_STEPS})")
    p.add_argument("--warmup", type=int, help=f"untimed steps per point, the first traces (default {DEFAULT_WARMUP})")
    p.add_argument("--batch", type=int, default=1)
    for key, default in MODEL_SIZE.items():
        flag = "--" + key.replace("_", "-")
        p.add_argument(flag, type=int, dest=key, help=f"Llama {key.replace('_', ' ')} (default {default})")
    p.add_argument("--jit-compile", choices=("false", "true"), default="false",
                   help="tf.function(jit_compile=...) around each step (default false: no XLA)")
    p.add_argument("--memory-limit-gb", type=float, default=DEFAULT_MEMORY_LIMIT_GB,
                   help="skip a softmax point whose estimated peak exceeds this")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny model {QUICK_MODEL_SIZE}, contexts {QUICK_CONTEXTS}, {QUICK_STEPS} steps")
    p.add_argument("--out-dir", default=os.path.join("benchmarks", "results", "decode"))
    p.add_argument("--_point", dest="point", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("steps", "warmup", "batch", *MODEL_SIZE):
        v = getattr(args, name)
        low = 0 if name == "warmup" else 1
        if v is not None and v < low:
            p.error(f"`--{name.replace('_', '-')}` must be >= {low}. Received: {v}")
    if args.contexts and min(args.contexts) < 1:
        p.error(f"`--contexts` must be positive. Received: {args.contexts}")
    size = {k: getattr(args, k) if getattr(args, k) is not None else (QUICK_MODEL_SIZE if args.quick else MODEL_SIZE)[k]
            for k in MODEL_SIZE}
    if size["hidden"] % size["heads"] or size["heads"] % size["kv_heads"]:
        p.error("`--hidden` must be a multiple of `--heads` and `--heads` of `--kv-heads`. "
                f"Received: hidden={size['hidden']}, heads={size['heads']}, kv_heads={size['kv_heads']}")
    args.size = size
    return args


def make_cfg(args) -> dict:
    return {
        "contexts": sorted(set(args.contexts or (QUICK_CONTEXTS if args.quick else DEFAULT_CONTEXTS))),
        "steps": args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS),
        "warmup": args.warmup if args.warmup is not None else (QUICK_WARMUP if args.quick else DEFAULT_WARMUP),
        "batch": args.batch, "size": args.size, "jit_compile": args.jit_compile == "true",
        "memory_limit_gb": args.memory_limit_gb, "quick": args.quick,
    }


def main(argv=None):
    args = parse_args(argv)
    cfg = make_cfg(args)
    if args.point:
        run_worker(args.point, cfg)
        return

    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = os.getloadavg()
    ram_start = available_ram_bytes()
    command = "python " + shlex.join(["benchmarks/decode_latency.py"] + (sys.argv[1:] if argv is None else argv))
    log(f"decode latency: Llama {cfg['size']}, batch {cfg['batch']}, contexts {cfg['contexts']}, "
        f"{cfg['steps']} timed steps after {cfg['warmup']} warm-up, tf.function(jit_compile={cfg['jit_compile']}), "
        f"cpus={os.cpu_count()}, load {load_start[0]:.2f}")
    points = [(n, m) for n in cfg["contexts"] for m in MODELS]
    rows, versions = [], {}
    for i, (n, m) in enumerate(points, 1):
        head = f"[{i}/{len(points)}] {m} context={n:,}:"
        reason = skip_reason(m, n, cfg)
        if reason:
            row = {"model": m, "context": n, "max_length": n + cfg["steps"], "status": reason,
                   "state_shape": list(cache_shape(cfg["size"], cfg["batch"], n + cfg["steps"]))}
            row["state_bytes"] = 4 * int(np.prod(row["state_shape"]))  # what it would have held
            log(f"{head} {reason}")
            rows.append(row)
            continue
        log(f"{head} running (fresh subprocess) ...")
        row = measure_isolated(m, n, cfg)
        versions = row.pop("versions", None) or versions
        rows.append(row)
        if row.get("status") == "ok":
            log(f"{head} median {row['median_ms']:.2f} ms/token, p90 {row['p90_ms']:.2f} ms; "
                f"{'cache' if m == 'softmax' else 'state'} {row['state_bytes'] / 2**20:.3f} MB, "
                f"peak RSS {row['peak_rss_mb']:.0f} MB (first call {row['first_call_s']:.1f} s, "
                f"worker {row['worker_s']:.1f} s)")
        else:
            log(f"{head} {row['status']}")

    derived = derive(rows, cfg)
    table = markdown(rows, cfg, derived)
    payload = {
        "benchmark": "keras_sara decode latency",
        "config": {**cfg, "model": "keras_hub LlamaCausalLM, random weights (seed 0)", "dtype": "float32",
                   "backend": "tensorflow", "device": "CPU", "cache_state_contents": "random (cost does not "
                   "depend on values; SARA state drawn positive)", "timing": "per step, until logits on host",
                   "peak_rss": "VmHWM of the point's own subprocess (ru_maxrss beside it)"},
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "numpy": np.__version__, **versions,
            "ram_available_gb_start": None if ram_start is None else ram_start / 1e9,
            "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
            "date_utc": started.isoformat(timespec="seconds"),
            "duration_s": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
        },
        "command": command,
        "rows": rows,
        "derived": derived,
    }
    out = args.out_dir
    paths = {ext: os.path.join(out, f"decode_latency.{ext}") for ext in ("csv", "json", "md", "png")}
    write_text(paths["csv"], csv_text(rows))
    write_text(paths["json"], json.dumps(payload, indent=2) + "\n")
    write_text(paths["md"], table + f"\nCommand: `{command}` ({payload['machine']['duration_s']:.0f} s, "
               f"{os.cpu_count()} CPUs, load {load_start[0]:.2f} -> {os.getloadavg()[0]:.2f}).\n")
    write_plot(paths["png"], rows, cfg)
    log("\n" + table)
    log(f"Load average start/end: {load_start[0]:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; "
        f"{payload['machine']['duration_s']:.0f} s.")
    log("Wrote " + ", ".join(paths.values()))


if __name__ == "__main__":
    main()
