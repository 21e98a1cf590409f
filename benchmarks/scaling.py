"""Latency scaling of SARA linear attention against softmax attention and a floor.

Measures a compiled forward pass (batch 1, float32) on the Keras backend named
by KERAS_BACKEND (default tensorflow) for two Functional models with input
(1, N, 128):

- "attention": one self-attention layer, 4 heads, key_dim 32;
- "encoder": a 4-layer, 128-wide, 4-head pre-LayerNorm Transformer encoder
  (x + attn(LN(x)); x + MLP(LN(x)), MLP hidden `--mlp-ratio` * 128, gelu);

each with three attention variants:

- softmax: stock `keras.layers.MultiHeadAttention` (quadratic);
- sara:    `keras_sara.layers.SARAMultiHeadAttention`, ReLU features (linear);
- floor:   the same layer with all four projections but no token mixing
           (`_compute_attention` returns q + k + v): the cost no attention
           core can go below.

The forward pass is `model.predict_on_batch` (a tf.function on TensorFlow, a
jit on JAX, eager on PyTorch). Per point: warm-up calls, then the median and
p90 of timed calls; the three variants of a (model, tokens) point take turns
call by call, so drifting load from other processes hits them alike and
their ratios stay fair. Before the sweep, a fresh subprocess per variant
reports the peak RSS of one forward pass of the SARA and floor encoders at
`--memory-tokens` (VmHWM on Linux; see `peak_rss_bytes`).

Writes `scaling_<backend>.csv`, `.json` and `.png` under `--out-dir` and prints
a markdown table.

Usage:
    KERAS_BACKEND=tensorflow python benchmarks/scaling.py --quick   # ~2 min
    KERAS_BACKEND=tensorflow python benchmarks/scaling.py           # ~10 min
    KERAS_BACKEND=jax python benchmarks/scaling.py --tokens 256 512 --quick
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402
import keras  # noqa: E402

from keras_sara.layers import SARAMultiHeadAttention  # noqa: E402
from keras_sara.utils import atomic_write  # noqa: E402

# ----------------------------------------------------------------- constants

WIDTH = 128
NUM_HEADS = 4
KEY_DIM = 32
NUM_LAYERS = 4
# PCT-style point encoder: each block's feed-forward is one 128 -> 128 layer
# plus its projection back (PCT's LBR), not a ViT's 4x MLP. This is the encoder
# of DESIGN.md's LiteRT anchors; `--mlp-ratio 4` gives the ViT-style block.
MLP_RATIO = 1
BATCH = 1

MODELS = ("attention", "encoder")
VARIANTS = ("softmax", "sara", "floor")

DEFAULT_TOKENS = (512, 1024, 2048, 4096, 8192, 16384)
DEFAULT_MAX_SOFTMAX_TOKENS = 16384
DEFAULT_MEMORY_TOKENS = 65536
DEFAULT_MEMORY_LIMIT_GB = 16.0
DEFAULT_WARMUP = 2  # the first call traces/compiles
TARGET_SECONDS = 2.0  # timed seconds per point when --repeats is not given
MIN_REPEATS = 3
MAX_REPEATS = 200

QUICK_TOKENS = (512, 1024, 2048, 4096)
QUICK_MAX_SOFTMAX_TOKENS = 4096
QUICK_MEMORY_TOKENS = 16384
QUICK_WARMUP = 1
QUICK_REPEATS = 2

# Softmax keeps about this many (B, H, T, S) float32 tensors alive at once
# (logits, scaled logits, probabilities); see keras' TF dot_product_attention.
SOFTMAX_LIVE_MATRICES = 3
# Never start a softmax point estimated above this share of available RAM:
# the machine has no swap and is shared.
AVAILABLE_RAM_SHARE = 0.8

# Ratios the README reports against (TensorFlow backend).
TARGETS = {
    "encoder_softmax_over_sara_at_8192": (">=", 15.0),
    "encoder_sara_t16384_over_t2048": ("<=", 10.0),
    "encoder_sara_over_floor_max": ("<=", 1.2),
    "sara_encoder_peak_rss_gb": ("<=", 2.0),
}

PROBE_PREFIX = "SCALING_MEMORY_PROBE "


# -------------------------------------------------------------------- models


class FloorAttention(keras.layers.MultiHeadAttention):
    """MultiHeadAttention with its four projections but no token mixing.

    `_compute_attention` returns `query + key + value` (needs key_dim ==
    value_dim and T == S), so every projection stays live in the graph and
    nothing crosses tokens: the cost no attention core can undercut.
    `compute_calls` counts calls so the benchmark can prove MHA's `call`
    routes through this override.
    """

    compute_calls = 0

    def _compute_attention(
        self,
        query,
        key,
        value,
        attention_mask=None,
        training=None,
        return_attention_scores=False,
        use_causal_mask=False,
    ):
        type(self).compute_calls += 1
        return query + key + value, None  # (B, T, H, K)


def make_attention(variant: str) -> keras.layers.Layer:
    kwargs = dict(num_heads=NUM_HEADS, key_dim=KEY_DIM)
    if variant == "softmax":
        return keras.layers.MultiHeadAttention(**kwargs)
    if variant == "sara":
        return SARAMultiHeadAttention(feature_map="relu", **kwargs)
    if variant == "floor":
        return FloorAttention(value_dim=KEY_DIM, **kwargs)
    raise ValueError(f"`variant` must be one of {VARIANTS}. Received: variant={variant!r}")


def build_model(model: str, variant: str, tokens: int, mlp_ratio: int = MLP_RATIO) -> keras.Model:
    inputs = keras.Input(shape=(tokens, WIDTH), batch_size=BATCH)  # (1, N, 128)
    if model == "attention":
        outputs = make_attention(variant)(inputs, inputs)
    elif model == "encoder":
        x = inputs
        for _ in range(NUM_LAYERS):
            h = keras.layers.LayerNormalization(epsilon=1e-6)(x)
            x = x + make_attention(variant)(h, h)
            h = keras.layers.LayerNormalization(epsilon=1e-6)(x)
            h = keras.layers.Dense(mlp_ratio * WIDTH, activation="gelu")(h)
            x = x + keras.layers.Dense(WIDTH)(h)
        outputs = x
    else:
        raise ValueError(f"`model` must be one of {MODELS}. Received: model={model!r}")
    return keras.Model(inputs, outputs, name=f"{model}_{variant}_{tokens}")


def check_floor_routing() -> None:
    """Fail loudly if MultiHeadAttention.call bypasses `_compute_attention`."""
    before = FloorAttention.compute_calls
    layer = make_attention("floor")
    x = np.ones((1, 4, WIDTH), "float32")
    out = keras.ops.convert_to_numpy(layer(x, x))
    if FloorAttention.compute_calls == before:
        raise RuntimeError(
            "MultiHeadAttention.call did not route through FloorAttention._compute_attention; "
            "the floor variant would measure stock softmax attention."
        )
    # Projections of a constant input are the same for every token: no mixing to see,
    # but the output must have the model shape.
    if out.shape != (1, 4, WIDTH):
        raise RuntimeError(f"Floor attention returned shape {out.shape}, expected (1, 4, {WIDTH}).")


# ------------------------------------------------------------------- helpers


def forward_mode(jit_compile: str = "auto") -> str:
    name = keras.backend.backend()
    if jit_compile == "true":
        return {"tensorflow": "tf.function with XLA (predict_on_batch, --jit-compile true)",
                "jax": "jax.jit (predict_on_batch)",
                "torch": "torch.compile (predict_on_batch, --jit-compile true)"}.get(name, name)
    if jit_compile == "false":
        return {"tensorflow": "tf.function graph, no XLA (predict_on_batch)",
                "jax": "jax.jit (predict_on_batch; JAX always jits)",
                "torch": "eager PyTorch (predict_on_batch)"}.get(name, name)
    return {
        "tensorflow": "tf.function graph (predict_on_batch; Keras' 'auto' leaves XLA off on CPU)",
        "jax": "jax.jit (predict_on_batch)",
        "torch": "eager PyTorch (predict_on_batch; Keras does not torch.compile by default)",
    }.get(name, "predict_on_batch")


def backend_version() -> str:
    name = keras.backend.backend()
    try:
        if name == "tensorflow":
            import tensorflow as tf

            return tf.__version__
        if name == "jax":
            import jax

            return jax.__version__
        if name == "torch":
            import torch

            return torch.__version__
    except ImportError:
        pass
    return "unknown"


def available_ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def ru_maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def current_rss_bytes() -> int:
    rss = _proc_status_bytes("VmRSS")
    return rss if rss is not None else ru_maxrss_bytes()


def peak_rss_bytes() -> int:
    """This process's own peak RSS.

    On Linux `ru_maxrss` survives fork + exec: a child started by a large
    parent reports the parent's high-water mark (measured here: a child of a
    3 GB parent reported 2.9 GB). VmHWM belongs to the post-exec address
    space, so it is preferred; `ru_maxrss` is the fallback elsewhere.
    """
    hwm = _proc_status_bytes("VmHWM")
    return hwm if hwm is not None else ru_maxrss_bytes()


def softmax_peak_estimate_bytes(model: str, tokens: int, mlp_ratio: int) -> int:
    """Rough peak of a softmax forward: live (H, T, S) matrices plus activations."""
    matrices = SOFTMAX_LIVE_MATRICES * BATCH * NUM_HEADS * tokens * tokens * 4
    activations = 8 * BATCH * tokens * WIDTH * max(mlp_ratio, 1) * 4
    return matrices + activations + 512 * 2**20  # + runtime


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------- measuring


def skip_reason(model_name: str, variant: str, tokens: int, cfg: dict) -> str:
    """Why a point is not run ("" to run it): only softmax sizes are guarded."""
    if variant != "softmax":
        return ""
    if tokens > cfg["max_softmax_tokens"]:
        return f"tokens > --max-softmax-tokens={cfg['max_softmax_tokens']}"
    est = softmax_peak_estimate_bytes(model_name, tokens, cfg["mlp_ratio"])
    if est > cfg["memory_limit_gb"] * 1e9:
        return f"estimated peak {est / 1e9:.1f} GB > --memory-limit-gb={cfg['memory_limit_gb']:g}"
    avail = available_ram_bytes()
    if avail is not None and est > AVAILABLE_RAM_SHARE * avail:
        return (
            f"estimated peak {est / 1e9:.1f} GB > {AVAILABLE_RAM_SHARE:.0%} of "
            f"available RAM ({avail / 1e9:.1f} GB)"
        )
    return ""


def _error_text(e: Exception) -> str:
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return f"error: {type(e).__name__}: {first}"


def measure_group(model_name: str, tokens: int, variants, cfg: dict) -> list:
    """Time every variant of one (model, tokens) point, interleaved.

    The variants take turns call by call (round robin), so load from other
    processes on a shared machine hits them alike and the ratios between
    them stay fair even when absolute times drift.
    """
    rows = {
        v: {
            "model": model_name, "variant": v, "tokens": tokens, "median_ms": None,
            "p90_ms": None, "min_ms": None, "repeats": 0, "compile_s": None,
            "skipped": skip_reason(model_name, v, tokens, cfg),
        }
        for v in variants
    }
    x = np.random.default_rng(0).standard_normal((BATCH, tokens, WIDTH)).astype("float32")
    models, repeats, times = {}, {}, {}
    try:
        for v in variants:
            if rows[v]["skipped"]:
                continue
            try:
                model = build_model(model_name, v, tokens, cfg["mlp_ratio"])
                if cfg["jit_compile"] != "auto":
                    model.jit_compile = cfg["jit_compile"] == "true"
                t0 = time.perf_counter()
                model.predict_on_batch(x)  # traces / compiles
                rows[v]["compile_s"] = estimate = time.perf_counter() - t0
                for _ in range(max(cfg["warmup"] - 1, 0)):
                    t0 = time.perf_counter()
                    model.predict_on_batch(x)
                    estimate = time.perf_counter() - t0
            except Exception as e:  # an OOM at one size should not lose the run
                rows[v]["skipped"] = _error_text(e)
                continue
            models[v] = model
            times[v] = []
            repeats[v] = cfg["repeats"] or int(
                min(MAX_REPEATS, max(MIN_REPEATS, math.ceil(cfg["target_s"] / max(estimate, 1e-6))))
            )
        for r in range(max(repeats.values(), default=0)):
            for v in list(models):
                if r >= repeats[v]:
                    continue
                try:
                    t0 = time.perf_counter()
                    models[v].predict_on_batch(x)  # returns NumPy: the work is done
                    times[v].append(time.perf_counter() - t0)
                except Exception as e:
                    rows[v]["skipped"] = _error_text(e)
                    del models[v]
        for v in models:
            ms = np.asarray(times[v]) * 1e3
            rows[v].update(
                median_ms=float(np.median(ms)),
                p90_ms=float(np.percentile(ms, 90)),
                min_ms=float(np.min(ms)),
                repeats=len(ms),
            )
    finally:
        models.clear()
        keras.backend.clear_session()
        gc.collect()
    return [rows[v] for v in variants]


def run_memory_probe(variant: str, tokens: int, mlp_ratio: int, jit_compile: str = "auto") -> None:
    """Child process: build the encoder, one forward pass, print RSS figures."""
    model = build_model("encoder", variant, tokens, mlp_ratio)
    if jit_compile != "auto":
        model.jit_compile = jit_compile == "true"
    x = np.random.default_rng(0).standard_normal((BATCH, tokens, WIDTH)).astype("float32")
    gc.collect()
    before = current_rss_bytes()
    peak_before = peak_rss_bytes()
    t0 = time.perf_counter()
    model.predict_on_batch(x)
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    maxrss = ru_maxrss_bytes()
    print(
        PROBE_PREFIX
        + json.dumps(
            {
                "variant": variant,
                "tokens": tokens,
                "rss_before_forward_mb": before / 2**20,
                "peak_rss_before_forward_mb": peak_before / 2**20,
                "peak_rss_mb": peak / 2**20,
                "delta_mb": (peak - before) / 2**20,
                "ru_maxrss_mb": maxrss / 2**20,
                "peak_source": "VmHWM" if _proc_status_bytes("VmHWM") is not None else "ru_maxrss",
                "first_forward_s": seconds,
            }
        ),
        flush=True,
    )


def memory_check(
    variant: str, tokens: int, mlp_ratio: int, jit_compile: str = "auto", timeout_s: int = 900
) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_memory-probe",
        variant,
        "--memory-tokens",
        str(tokens),
        "--mlp-ratio",
        str(mlp_ratio),
        "--jit-compile",
        jit_compile,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return {"variant": variant, "tokens": tokens, "error": f"timed out after {timeout_s} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(PROBE_PREFIX):
            return json.loads(line[len(PROBE_PREFIX):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"variant": variant, "tokens": tokens, "error": f"exit {proc.returncode}: {' | '.join(tail)}"}


# ------------------------------------------------------------------ reporting


def lookup(rows, model, variant, tokens):
    for r in rows:
        if r["model"] == model and r["variant"] == variant and r["tokens"] == tokens:
            return r["median_ms"]
    return None


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def derive(rows, memory, tokens_list):
    out = {
        "encoder_softmax_over_sara_at_8192": ratio(
            lookup(rows, "encoder", "softmax", 8192), lookup(rows, "encoder", "sara", 8192)
        ),
        "encoder_sara_t16384_over_t2048": ratio(
            lookup(rows, "encoder", "sara", 16384), lookup(rows, "encoder", "sara", 2048)
        ),
        "attention_sara_t16384_over_t2048": ratio(
            lookup(rows, "attention", "sara", 16384), lookup(rows, "attention", "sara", 2048)
        ),
    }
    for model in MODELS:
        out[f"{model}_sara_over_floor"] = {
            str(n): ratio(lookup(rows, model, "sara", n), lookup(rows, model, "floor", n))
            for n in tokens_list
        }
        out[f"{model}_softmax_over_sara"] = {
            str(n): ratio(lookup(rows, model, "softmax", n), lookup(rows, model, "sara", n))
            for n in tokens_list
        }
    vals = [v for v in out["encoder_sara_over_floor"].values() if v is not None]
    out["encoder_sara_over_floor_max"] = max(vals) if vals else None
    sara_mem = memory.get("sara", {})
    out["sara_encoder_peak_rss_gb"] = (
        sara_mem["peak_rss_mb"] * 2**20 / 1e9 if "peak_rss_mb" in sara_mem else None
    )
    out["sara_encoder_forward_delta_gb"] = (
        sara_mem["delta_mb"] * 2**20 / 1e9 if "delta_mb" in sara_mem else None
    )
    targets = {}
    for key, (op, bound) in TARGETS.items():
        value = out.get(key)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        targets[key] = {"value": value, "target": f"{op} {bound:g}", "met": met}
    out["targets"] = targets
    return out


def fmt(v, spec=".1f", suffix=""):
    return "n/a" if v is None else f"{v:{spec}}{suffix}"


def markdown_tables(rows, tokens_list, models):
    lines = []
    for model in models:
        lines.append(f"\n**{model}** (median ms, batch 1, float32, backend {keras.backend.backend()})\n")
        lines.append("| tokens | softmax ms | sara ms | floor ms | softmax/sara | sara/floor |")
        lines.append("|---:|---:|---:|---:|---:|---:|")
        for n in tokens_list:
            cells = {}
            for variant in VARIANTS:
                r = next(
                    (r for r in rows if r["model"] == model and r["variant"] == variant and r["tokens"] == n),
                    None,
                )
                if r is None:
                    cells[variant] = "-"
                elif r["skipped"]:
                    cells[variant] = "skipped"
                else:
                    cells[variant] = f"{r['median_ms']:.1f}"
            s = lookup(rows, model, "softmax", n)
            a = lookup(rows, model, "sara", n)
            f_ = lookup(rows, model, "floor", n)
            lines.append(
                f"| {n} | {cells['softmax']} | {cells['sara']} | {cells['floor']} "
                f"| {fmt(ratio(s, a), '.1f', 'x')} | {fmt(ratio(a, f_), '.2f', 'x')} |"
            )
    return "\n".join(lines)


def derived_text(derived, memory):
    lines = ["\nDerived ratios (targets are for the TensorFlow backend):"]
    for key, t in derived["targets"].items():
        met = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        lines.append(f"- {key}: {fmt(t['value'], '.2f')} (target {t['target']}: {met})")
    attn = derived["attention_sara_t16384_over_t2048"]
    lines.append(f"- attention_sara_t16384_over_t2048: {fmt(attn, '.2f')}")
    for variant, m in memory.items():
        if "error" in m:
            lines.append(f"- peak memory, {variant} encoder at {m['tokens']} tokens: {m['error']}")
        else:
            lines.append(
                f"- peak memory, {variant} encoder at {m['tokens']} tokens: peak RSS "
                f"{m['peak_rss_mb']:.0f} MB, RSS before forward {m['rss_before_forward_mb']:.0f} MB, "
                f"delta {m['delta_mb']:.0f} MB (first forward incl. tracing {m['first_forward_s']:.1f} s)"
            )
    return "\n".join(lines)


CSV_COLUMNS = (
    "backend", "model", "variant", "tokens", "median_ms", "p90_ms", "min_ms",
    "repeats", "compile_s", "skipped",
)


def write_csv(path, rows, backend):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(",".join(CSV_COLUMNS) + "\n")
            for r in rows:
                vals = []
                for c in CSV_COLUMNS:
                    v = backend if c == "backend" else r.get(c)
                    if v is None:
                        v = ""
                    elif isinstance(v, float):
                        v = f"{v:.4f}"
                    v = str(v)
                    if "," in v or '"' in v:
                        v = '"' + v.replace('"', '""') + '"'
                    vals.append(v)
                f.write(",".join(vals) + "\n")

    atomic_write(path, write)


def write_json(path, payload):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")

    atomic_write(path, write)


def write_plot(path, rows, models, backend):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"softmax": ("tab:red", "o"), "sara": ("tab:blue", "s"), "floor": ("tab:gray", "^")}
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        for variant in VARIANTS:
            pts = sorted(
                (r["tokens"], r["median_ms"])
                for r in rows
                if r["model"] == model and r["variant"] == variant and r["median_ms"] is not None
            )
            if not pts:
                continue
            color, marker = styles[variant]
            ax.plot(*zip(*pts), color=color, marker=marker, label=variant)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ticks = sorted({r["tokens"] for r in rows if r["model"] == model})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("tokens")
        ax.set_ylabel("median forward latency (ms)")
        title = "1 attention layer" if model == "attention" else f"{NUM_LAYERS}-layer encoder"
        ax.set_title(f"{title}, width {WIDTH}, {NUM_HEADS} heads")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Forward latency vs tokens (batch 1, float32, {backend})")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


# ---------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", help=f"token counts (default {DEFAULT_TOKENS})")
    p.add_argument("--max-softmax-tokens", type=int, help="largest token count for softmax")
    p.add_argument("--memory-limit-gb", type=float, default=DEFAULT_MEMORY_LIMIT_GB,
                   help="skip a softmax size whose estimated peak exceeds this")
    p.add_argument("--memory-tokens", type=int,
                   help=f"tokens of the peak-memory check (default {DEFAULT_MEMORY_TOKENS}; 0 skips it)")
    p.add_argument("--mlp-ratio", type=int, default=MLP_RATIO, help="encoder MLP hidden size / width")
    p.add_argument("--repeats", type=int,
                   help=f"timed calls per point (default: ~{TARGET_SECONDS:g} s, >= {MIN_REPEATS})")
    p.add_argument("--warmup", type=int,
                   help=f"untimed calls per point, the first compiles (default {DEFAULT_WARMUP})")
    p.add_argument("--jit-compile", choices=("auto", "true", "false"), default="auto",
                   help="model.jit_compile: 'auto' is Keras' default (XLA off on CPU for TF, "
                        "jit on JAX, eager on torch); 'true' forces XLA on TF")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--quick", action="store_true",
                   help=f"tokens {QUICK_TOKENS}, softmax <= {QUICK_MAX_SOFTMAX_TOKENS}, "
                        f"memory check at {QUICK_MEMORY_TOKENS}, {QUICK_REPEATS} repeats (~2 min)")
    p.add_argument("--out-dir", default=os.path.join("benchmarks", "results"))
    p.add_argument("--_memory-probe", dest="memory_probe", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("repeats", "warmup", "max_softmax_tokens", "memory_tokens"):
        v = getattr(args, name)
        if v is not None and v < (1 if name == "repeats" else 0):
            bound = ">= 1" if name == "repeats" else ">= 0"
            p.error(f"`--{name.replace('_', '-')}` must be {bound}. Received: {v}")
    if args.tokens and min(args.tokens) < 1:
        p.error(f"`--tokens` must be positive. Received: {args.tokens}")
    if args.mlp_ratio < 1:
        p.error(f"`--mlp-ratio` must be >= 1. Received: {args.mlp_ratio}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.memory_probe:
        run_memory_probe(args.memory_probe, args.memory_tokens, args.mlp_ratio, args.jit_compile)
        return

    backend = keras.backend.backend()
    keras.config.set_floatx("float32")
    if backend == "tensorflow":
        import tensorflow as tf

        # Every point is a new model, hence a new tf.function: retracing is expected.
        tf.get_logger().setLevel("ERROR")
    cfg = {
        "tokens": sorted(set(args.tokens or (QUICK_TOKENS if args.quick else DEFAULT_TOKENS))),
        "max_softmax_tokens": args.max_softmax_tokens
        if args.max_softmax_tokens is not None
        else (QUICK_MAX_SOFTMAX_TOKENS if args.quick else DEFAULT_MAX_SOFTMAX_TOKENS),
        "memory_tokens": args.memory_tokens
        if args.memory_tokens is not None
        else (QUICK_MEMORY_TOKENS if args.quick else DEFAULT_MEMORY_TOKENS),
        "memory_limit_gb": args.memory_limit_gb,
        "mlp_ratio": args.mlp_ratio,
        "repeats": args.repeats if args.repeats is not None else (QUICK_REPEATS if args.quick else None),
        "warmup": args.warmup
        if args.warmup is not None
        else (QUICK_WARMUP if args.quick else DEFAULT_WARMUP),
        "target_s": TARGET_SECONDS,
        "jit_compile": args.jit_compile,
        "quick": args.quick,
    }
    check_floor_routing()

    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = os.getloadavg()
    log(
        f"backend={backend} ({backend_version()}), forward: "
        f"{forward_mode(cfg['jit_compile'])}, cpus={os.cpu_count()}"
    )
    # Before the sweep: the probe child should not start from a large parent.
    memory = {}
    if cfg["memory_tokens"] and "encoder" in args.models:
        for variant in ("sara", "floor"):
            log(f"peak memory: {variant} encoder at {cfg['memory_tokens']} tokens (subprocess) ...")
            memory[variant] = memory_check(
                variant, cfg["memory_tokens"], cfg["mlp_ratio"], cfg["jit_compile"]
            )
            m = memory[variant]
            log("  " + (m["error"] if "error" in m else
                        f"peak RSS {m['peak_rss_mb']:.0f} MB, before forward "
                        f"{m['rss_before_forward_mb']:.0f} MB, delta {m['delta_mb']:.0f} MB"))

    groups = [(m, n) for m in args.models for n in cfg["tokens"]]
    total = len(groups) * len(args.variants)
    rows = []
    for m, n in groups:
        t0 = time.perf_counter()
        group = measure_group(m, n, args.variants, cfg)
        elapsed = time.perf_counter() - t0
        for row in group:
            rows.append(row)
            head = f"[{len(rows)}/{total}] {m}/{row['variant']} N={n}:"
            if row["skipped"]:
                log(f"{head} skipped ({row['skipped']})")
            else:
                log(
                    f"{head} median {row['median_ms']:.1f} ms, p90 {row['p90_ms']:.1f} ms "
                    f"({row['repeats']} reps, first call {row['compile_s']:.1f} s; "
                    f"group {elapsed:.1f} s)"
                )

    derived = derive(rows, memory, cfg["tokens"])
    payload = {
        "benchmark": "keras_sara scaling",
        "config": {
            "batch": BATCH, "width": WIDTH, "num_heads": NUM_HEADS, "key_dim": KEY_DIM,
            "encoder_layers": NUM_LAYERS, "dtype": "float32", "models": args.models,
            "variants": args.variants, **cfg,
            "softmax_live_matrices_estimate": SOFTMAX_LIVE_MATRICES,
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "backend": backend,
            "backend_version": backend_version(),
            "keras": keras.__version__,
            "numpy": np.__version__,
            "forward": forward_mode(cfg["jit_compile"]),
            "torch_threads": _torch_threads(),
            "jit_compile": _jit_flag(cfg["jit_compile"]),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "date_utc": started.isoformat(timespec="seconds"),
            "duration_s": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
        },
        "command": f"KERAS_BACKEND={backend} " + shlex.join([sys.executable] + sys.argv),
        "rows": rows,
        "peak_memory": memory,
        "derived": derived,
    }
    out = args.out_dir
    paths = {ext: os.path.join(out, f"scaling_{backend}.{ext}") for ext in ("csv", "json", "png")}
    write_csv(paths["csv"], rows, backend)
    write_json(paths["json"], payload)
    write_plot(paths["png"], rows, args.models, backend)

    log(markdown_tables(rows, cfg["tokens"], args.models))
    log(derived_text(derived, memory))
    log(f"\nForward: {forward_mode(cfg['jit_compile'])}. Load average start/end: "
        f"{load_start[0]:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs.")
    log("Wrote " + ", ".join(paths.values()))


def _torch_threads():
    """torch's intra-op threads (it busy-waits badly when the cores are shared)."""
    if keras.backend.backend() != "torch":
        return None
    import torch

    return torch.get_num_threads()


def _jit_flag(jit_compile: str):
    """The `model.jit_compile` value the timed models ran with."""
    if jit_compile != "auto":
        return jit_compile == "true"
    try:
        flag = build_model("attention", "floor", 8).jit_compile
        keras.backend.clear_session()
        return flag
    except Exception:  # informational only
        return None


if __name__ == "__main__":
    main()
