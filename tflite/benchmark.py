"""LiteRT latency of SARA against softmax attention, by tokens, precision and threads.

Two measurements, both on exported, verified, builtins-only `.tflite` files
run by `tflite.runner.PolicyRunner` (ai-edge-litert, XNNPACK, batch 1):

1. **Encoder forward.** The 4-layer, 128-wide, 4-head pre-LayerNorm encoder of
   `benchmarks/scaling.py` (PCT-style feed-forward, `--mlp-ratio 1`), with
   stock `keras.layers.MultiHeadAttention` ("softmax") or
   `SARAMultiHeadAttention` with ReLU features ("sara"), exported with
   `keras_sara.export.export_tflite` at each token count and precision:
   float32, float16 (float16 weights), dynamic (int8 weights, dynamic-range
   activations) and int8 (full integer where the ops allow, float fallback).
   int8 is calibrated on random-normal inputs (`--calibration-examples`):
   enough to time the integer kernels, not to judge accuracy; its
   `rel_error` (against Keras, on held-out random-normal probes) says how far
   off such a calibration is. Softmax points above `--max-softmax-tokens`
   (default 4096: at 8192 one softmax forward takes about a second and its
   (4, 8192, 8192) score tensors 1 GB each) are skipped and listed as such.
   The two attention variants of a (tokens, precision, threads) point are
   timed call by call in turn, so load from other processes hits both alike.

2. **Streaming step.** The same decoder with causal SARA attention, exported
   as a one-token recurrent step (`keras_sara.streaming.export_streaming_tflite`):
   per-step latency after a history of 10, 100, 1,000 and 10,000 tokens. The
   state has a fixed size, so the cost should not depend on the history; the
   history is really fed (every step run), and the streams of all histories
   are then timed in turn, step by step.

Writes `latency.csv`, `latency.json` and `latency.png` under `--out-dir`
(default `benchmarks/results/tflite`), each atomically, and prints markdown
tables. p99 needs about 100 timed runs to mean anything: `--quick` reports it
from fewer.

Usage:
    python -m tflite.benchmark --quick      # tokens 256 and 512, a few minutes
    python -m tflite.benchmark              # tokens 512 .. 8192 (run on a quiet machine)
    python -m tflite.benchmark --precisions float32 int8 --threads 2 --tokens 4096
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time

# Conversion needs TensorFlow: build the models there directly.
os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402
import keras  # noqa: E402

from benchmarks import scaling  # noqa: E402  (the encoder builder)
from keras_sara.utils import atomic_write, work_directory  # noqa: E402
from keras_sara import streaming  # noqa: E402
from keras_sara.export import export_tflite  # noqa: E402
from keras_sara.layers import SARAMultiHeadAttention  # noqa: E402
from tflite.runner import PolicyRunner  # noqa: E402

# ----------------------------------------------------------------- constants

ATTENTIONS = ("softmax", "sara")
PRECISIONS = ("float32", "float16", "dynamic", "int8")
DEFAULT_TOKENS = (512, 1024, 2048, 4096, 8192)
QUICK_TOKENS = (256, 512)
DEFAULT_THREADS = (1, 2)
DEFAULT_MAX_SOFTMAX_TOKENS = 4096
DEFAULT_HISTORIES = (10, 100, 1000, 10000)
DEFAULT_CALIBRATION_EXAMPLES = 8

# Timed runs per encoder point: about TARGET_SECONDS of each variant, within bounds.
TARGET_SECONDS = 2.0
MIN_RUNS, MAX_RUNS = 10, 200
WARMUP_RUNS = 2  # the first invocations pack weights for XNNPACK
STREAM_STEPS = 500  # timed steps per history
QUICK = dict(target_seconds=0.3, min_runs=5, max_runs=30, stream_steps=200)

# Verification tolerances (relative error against Keras). float32 and float16
# keep export_tflite's defaults; the quantised modes only need to be sane for
# a timing (random-normal calibration is not realistic): the error is
# reported in the `rel_error` column instead of dropping the point.
TOLERANCES = {"float32": None, "float16": None, "dynamic": 1.0, "int8": 1.0}

CSV_COLUMNS = (
    "benchmark", "attention", "precision", "threads", "tokens", "history",
    "p50_ms", "p90_ms", "p99_ms", "mean_ms", "runs", "file_bytes", "rel_error",
    "export_s", "status",
)

# What issue 4 asks of these numbers.
TARGETS = {
    "stream_p50_ratio_history_10000_over_10": ("<=", 1.2),
    "sara_int8_speedup_over_float32_at_4096": (">=", 1.5),
}


def log(msg: str) -> None:
    print(msg, flush=True)


# -------------------------------------------------------------------- models


def build_encoder(attention: str, tokens: int, mlp_ratio: int) -> keras.Model:
    """`benchmarks/scaling.py`'s 4-layer encoder, input (1, tokens, 128)."""
    return scaling.build_model("encoder", attention, tokens, mlp_ratio)


def build_causal_decoder(mlp_ratio: int) -> keras.Model:
    """The same blocks with causal SARA attention (for the streaming step)."""
    inputs = keras.Input(shape=(None, scaling.WIDTH), batch_size=scaling.BATCH)  # (1, T, 128)
    x = inputs
    for _ in range(scaling.NUM_LAYERS):
        h = keras.layers.LayerNormalization(epsilon=1e-6)(x)
        attn = SARAMultiHeadAttention(scaling.NUM_HEADS, scaling.KEY_DIM, feature_map="relu")
        x = x + attn(h, h, use_causal_mask=True)
        h = keras.layers.LayerNormalization(epsilon=1e-6)(x)
        h = keras.layers.Dense(mlp_ratio * scaling.WIDTH, activation="gelu")(h)
        x = x + keras.layers.Dense(scaling.WIDTH)(h)
    return keras.Model(inputs, x, name="causal_sara_decoder")


# ----------------------------------------------------------------- measuring


def percentiles(times_ms) -> dict:
    t = np.asarray(times_ms, dtype=np.float64)
    return {
        "p50_ms": float(np.percentile(t, 50)),
        "p90_ms": float(np.percentile(t, 90)),
        "p99_ms": float(np.percentile(t, 99)),
        "mean_ms": float(t.mean()),
        "runs": int(t.size),
    }


def _error_text(err: Exception) -> str:
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
    return f"error: {type(err).__name__}: {first}"


def export_point(attention, tokens, precision, cfg, work) -> dict:
    """Export one encoder file; a row with its path, size, error and export time."""
    row = {
        "benchmark": "encoder", "attention": attention, "precision": precision,
        "tokens": tokens, "history": None, "status": "ok",
    }
    if attention == "softmax" and tokens > cfg["max_softmax_tokens"]:
        row["status"] = f"skipped: tokens > --max-softmax-tokens={cfg['max_softmax_tokens']}"
        return row
    rng = np.random.default_rng(tokens)
    shape = (scaling.BATCH, tokens, scaling.WIDTH)
    probe = rng.standard_normal((2,) + shape[1:]).astype(np.float32)
    kwargs = {}
    if precision == "int8":
        n = cfg["calibration_examples"]
        kwargs["representative_data"] = rng.standard_normal((n,) + shape[1:]).astype(np.float32)
    path = os.path.join(work, f"encoder_{attention}_{tokens}_{precision}.tflite")
    start = time.perf_counter()
    try:
        keras.utils.set_random_seed(0)
        model = build_encoder(attention, tokens, cfg["mlp_ratio"])
        report = export_tflite(
            model, path,
            quantize=None if precision == "float32" else precision,
            probe=probe, tolerance=TOLERANCES[precision], benchmark_runs=0, **kwargs,
        )
        row.update(path=path, file_bytes=report.size_bytes, rel_error=report.relative_error)
    except Exception as err:  # a failed point is a row, not the end of the sweep
        row["status"] = _error_text(err)
    finally:
        keras.backend.clear_session()
    row["export_s"] = time.perf_counter() - start
    return row


def time_in_turn(runners: dict, inputs: list, cfg: dict) -> dict:
    """Latency of each runner, calls interleaved; `runs` from a time budget."""
    for runner in runners.values():
        for _ in range(WARMUP_RUNS):
            runner(*inputs)
    probe = {}
    for key, runner in runners.items():
        start = time.perf_counter()
        runner(*inputs)
        probe[key] = time.perf_counter() - start
    slowest = max(probe.values())
    runs = int(np.clip(cfg["target_seconds"] / max(slowest, 1e-6), cfg["min_runs"], cfg["max_runs"]))
    times = {key: [] for key in runners}
    for _ in range(runs):
        for key, runner in runners.items():
            start = time.perf_counter()
            runner(*inputs)
            times[key].append((time.perf_counter() - start) * 1e3)
    return {key: percentiles(t) for key, t in times.items()}


def encoder_rows(cfg: dict, work: str) -> list:
    """Per token count: export every (attention, precision) file, then time each attention's files in turn.

    Timing the precisions of an attention call by call in turn (not one
    after the other) keeps the ratios between them, int8 over float32 above
    all, from drifting with the load of a shared machine. The attentions are
    timed as separate groups so that the run count of SARA's group is not
    set by softmax's slowest file (full-int8 softmax takes seconds a call).
    """
    rows = []
    for i, tokens in enumerate(cfg["tokens"], 1):
        exported = {}
        for precision in cfg["precisions"]:
            for attention in cfg["attentions"]:
                row = export_point(attention, tokens, precision, cfg, work)
                exported[(attention, precision)] = row
                state = row["status"] if row["status"] != "ok" else (
                    f"exported in {row['export_s']:.1f} s, {row['file_bytes'] / 1e6:.2f} MB, "
                    f"rel error {row['rel_error']:.1e}"
                )
                log(f"[{i}/{len(cfg['tokens'])}] {attention} N={tokens} {precision}: {state}")
        ok = {key: r for key, r in exported.items() if r["status"] == "ok"}
        x = np.random.default_rng(1).standard_normal((scaling.BATCH, tokens, scaling.WIDTH)).astype(np.float32)
        for threads in cfg["threads"]:
            timings, failures = {}, {}
            for attention in cfg["attentions"]:
                group = {key: r for key, r in ok.items() if key[0] == attention}
                if not group:
                    continue
                try:
                    runners = {key: PolicyRunner(r["path"], num_threads=threads) for key, r in group.items()}
                    timings.update(time_in_turn(runners, [x], cfg))
                except Exception as err:  # keep the sweep going; the row says why
                    failures[attention] = _error_text(err)
                    log(f"    {attention} N={tokens} threads={threads}: {failures[attention]}")
                runners = None
            for (attention, precision), base in exported.items():
                row = {k: v for k, v in base.items() if k != "path"}
                row["threads"] = threads
                if attention in failures and (attention, precision) in ok:
                    row["status"] = failures[attention]
                row.update(timings.get((attention, precision), {}))
                rows.append(row)
                if (attention, precision) in timings:
                    log(f"    {attention} {precision} N={tokens} threads={threads}: "
                        f"p50 {row['p50_ms']:.2f} ms, p90 {row['p90_ms']:.2f} ms ({row['runs']} runs)")
        for r in ok.values():
            os.remove(r["path"])
    return rows


class StepRunner:
    """A streaming step through the LiteRT signature runner: `(x_t, state) -> (y_t, state)`.

    Times the interpreter (inputs in, invoke, outputs out) without
    `PolicyRunner`'s per-call input checks, which for a step with 2L + 1
    inputs cost about as much as the step itself; that overhead is measured
    separately (rows `stream_policy_runner`).
    """

    def __init__(self, path, num_threads):
        from ai_edge_litert.interpreter import Interpreter

        self._runner = Interpreter(model_path=path, num_threads=num_threads).get_signature_runner("serve")
        details = self._runner.get_input_details()
        self.input_names = sorted(details, key=lambda n: int(n.split("_")[1]))
        self.output_names = sorted(self._runner.get_output_details(), key=lambda n: int(n.split("_")[1]))
        self.shapes = [tuple(int(d) for d in details[n]["shape"]) for n in self.input_names]
        self.token_shape = self.shapes[0]

    def zero_state(self):
        return [np.zeros(s, np.float32) for s in self.shapes[1:]]

    def __call__(self, x_t, state):
        out = self._runner(**dict(zip(self.input_names, [x_t, *state])))
        return out[self.output_names[0]], [out[n] for n in self.output_names[1:]]


def stream_rows(cfg: dict, work: str) -> list:
    """Per-step latency of the exported causal SARA step after each history length."""
    rows = []
    histories = cfg["histories"]
    for precision in cfg["stream_precisions"]:
        base = {"benchmark": "stream", "attention": "sara", "precision": precision, "tokens": 1,
                "status": "ok"}
        path = os.path.join(work, f"stream_{precision}.tflite")
        start = time.perf_counter()
        try:
            keras.utils.set_random_seed(0)
            decoder = build_causal_decoder(cfg["mlp_ratio"])
            report = streaming.export_streaming_tflite(
                decoder, path, quantize=None if precision == "float32" else precision,
                tolerance=TOLERANCES[precision], benchmark_runs=0,
            )
            base.update(file_bytes=report.size_bytes, rel_error=report.relative_error)
        except Exception as err:
            base["status"] = _error_text(err)
        finally:
            keras.backend.clear_session()
        base["export_s"] = time.perf_counter() - start
        if base["status"] != "ok":
            log(f"stream {precision}: {base['status']}")
            rows += [dict(base, history=h, threads=t) for t in cfg["threads"] for h in histories]
            continue
        log(f"stream {precision}: step exported in {base['export_s']:.1f} s "
            f"({base['file_bytes'] / 1e6:.2f} MB, rel error {base['rel_error']:.1e}); "
            f"feeding {max(histories):,} tokens ...")

        # Feed the history for real: one stream, its state saved at each length.
        feeder = StepRunner(path, num_threads=max(cfg["threads"]))
        rng = np.random.default_rng(2)
        state = feeder.zero_state()
        saved = {}
        fed_start = time.perf_counter()
        for t in range(1, max(histories) + 1):
            _, state = feeder(rng.standard_normal(feeder.token_shape).astype(np.float32), state)
            if t in histories:
                saved[t] = [s.copy() for s in state]
        fed_s = time.perf_counter() - fed_start
        finite = all(np.all(np.isfinite(s)) for s in state)
        log(f"    fed {max(histories):,} steps in {fed_s:.1f} s "
            f"({fed_s / max(histories) * 1e3:.3f} ms/step incl. Python), state finite: {finite}")
        token_shape = feeder.token_shape  # (1, 1, E)
        del feeder

        tokens = rng.standard_normal((cfg["stream_steps"],) + token_shape).astype(np.float32)
        for threads in cfg["threads"]:
            runner = StepRunner(path, num_threads=threads)
            states = {h: [s.copy() for s in saved[h]] for h in histories}
            for h in histories:  # warm-up steps (not timed) continue every stream alike
                for _ in range(WARMUP_RUNS):
                    _, states[h] = runner(tokens[0], states[h])
            times = {h: [] for h in histories}
            for step in range(cfg["stream_steps"]):
                for h in histories:
                    start = time.perf_counter()
                    _, states[h] = runner(tokens[step], states[h])
                    times[h].append((time.perf_counter() - start) * 1e3)
            for h in histories:
                row = dict(base, history=h, threads=threads, **percentiles(times[h]))
                rows.append(row)
                log(f"    history {h:>6,} threads={threads}: p50 {row['p50_ms']:.3f} ms, "
                    f"p90 {row['p90_ms']:.3f} ms, p99 {row['p99_ms']:.3f} ms")
            # What tflite.runner.PolicyRunner's input checks add to a step (same file).
            policy = PolicyRunner(path, num_threads=threads)
            state = [s.copy() for s in saved[min(histories)]]
            policy_times = []
            for step in range(min(cfg["stream_steps"], 200)):
                start = time.perf_counter()
                _, *state = policy(tokens[step], *state)
                policy_times.append((time.perf_counter() - start) * 1e3)
            rows.append(dict(base, benchmark="stream_policy_runner", history=min(histories),
                             threads=threads, **percentiles(policy_times)))
            log(f"    through PolicyRunner, history {min(histories)} threads={threads}: "
                f"p50 {rows[-1]['p50_ms']:.3f} ms")
            del runner, policy
        os.remove(path)
    return rows


# ------------------------------------------------------------------- derived


def _lookup(rows, **match):
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()) and r.get("p50_ms") is not None:
            return r["p50_ms"]
    return None


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def derive(rows, cfg) -> dict:
    threads = max(cfg["threads"])
    out = {"threads": threads}
    out["softmax_over_sara_float32"] = {
        str(n): _ratio(
            _lookup(rows, benchmark="encoder", attention="softmax", precision="float32", tokens=n, threads=threads),
            _lookup(rows, benchmark="encoder", attention="sara", precision="float32", tokens=n, threads=threads),
        )
        for n in cfg["tokens"]
    }
    for precision in cfg["precisions"]:
        if precision == "float32":
            continue
        by_threads = {
            str(t): {
                str(n): _ratio(
                    _lookup(rows, benchmark="encoder", attention="sara", precision="float32", tokens=n, threads=t),
                    _lookup(rows, benchmark="encoder", attention="sara", precision=precision, tokens=n, threads=t),
                )
                for n in cfg["tokens"]
            }
            for t in cfg["threads"]
        }
        out[f"sara_{precision}_speedup_over_float32"] = by_threads[str(threads)]  # at the most threads
        out[f"sara_{precision}_speedup_over_float32_by_threads"] = by_threads
    hs = cfg["histories"]  # empty: the streaming benchmark was skipped
    out["stream_p50_ratio_longest_over_shortest"] = {
        str(t): _ratio(
            _lookup(rows, benchmark="stream", precision="float32", history=max(hs), threads=t),
            _lookup(rows, benchmark="stream", precision="float32", history=min(hs), threads=t),
        )
        for t in cfg["threads"]
    } if hs else {}
    values = {
        "stream_p50_ratio_history_10000_over_10": _ratio(
            _lookup(rows, benchmark="stream", precision="float32", history=10000, threads=threads),
            _lookup(rows, benchmark="stream", precision="float32", history=10, threads=threads),
        ),
        "sara_int8_speedup_over_float32_at_4096": out.get("sara_int8_speedup_over_float32", {}).get("4096"),
    }
    out["targets"] = {}
    for key, (op, bound) in TARGETS.items():
        v = values[key]
        met = None if v is None else (v <= bound if op == "<=" else v >= bound)
        out["targets"][key] = {"value": v, "target": f"{op} {bound:g}", "met": met,
                               "threads": threads}
    return out


# --------------------------------------------------------------------- output


def _cell(rows, **match):
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            if r.get("p50_ms") is not None:
                return f"{r['p50_ms']:.2f}"
            return "skipped" if r["status"].startswith("skipped") else "error"
    return "-"


def markdown(rows, cfg, derived) -> str:
    lines = []
    for threads in cfg["threads"] if cfg["encoder"] else ():
        lines.append(f"\n**Encoder forward, p50 ms** (4 layers, width {scaling.WIDTH}, "
                     f"{scaling.NUM_HEADS} heads, batch 1, LiteRT, {threads} thread"
                     f"{'s' if threads > 1 else ''})\n")
        cols = [(a, p) for p in cfg["precisions"] for a in cfg["attentions"]]
        lines.append("| tokens | " + " | ".join(f"{a} {p}" for a, p in cols) + " |")
        lines.append("|---:|" + "---:|" * len(cols))
        for n in cfg["tokens"]:
            cells = [_cell(rows, benchmark="encoder", attention=a, precision=p, tokens=n, threads=threads)
                     for a, p in cols]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    if cfg["histories"]:
        lines.append("\n**Streaming step (causal SARA decoder, same blocks), ms per step**\n")
        lines.append("| precision | threads | history | p50 | p90 | p99 |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            if not r["benchmark"].startswith("stream"):
                continue
            history = f"{r['history']:,}"
            if r["benchmark"] == "stream_policy_runner":
                history += " (through PolicyRunner)"
            if r.get("p50_ms") is None:
                lines.append(f"| {r['precision']} | {r['threads']} | {history} | {r['status']} | | |")
            else:
                lines.append(
                    f"| {r['precision']} | {r['threads']} | {history} | {r['p50_ms']:.3f} "
                    f"| {r['p90_ms']:.3f} | {r['p99_ms']:.3f} |"
                )
    lines.append("\nTargets (issue 4):")
    for key, t in derived["targets"].items():
        met = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        plural = "s" if t["threads"] > 1 else ""
        lines.append(f"- {key}: {value} (target {t['target']}, {t['threads']} thread{plural}: {met})")
    return "\n".join(lines)


def write_csv(path, rows):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(",".join(CSV_COLUMNS) + "\n")
            for r in rows:
                vals = []
                for c in CSV_COLUMNS:
                    v = r.get(c)
                    if v is None:
                        v = ""
                    elif isinstance(v, float):
                        v = f"{v:.6g}" if c == "rel_error" else f"{v:.4f}"
                    v = str(v)
                    if "," in v or '"' in v:
                        v = '"' + v.replace('"', '""') + '"'
                    vals.append(v)
                f.write(",".join(vals) + "\n")

    atomic_write(path, write)


def machine_info(started, **extra) -> dict:
    """What a results file says about the machine and the run: CPUs, versions, `extra`, date, duration."""
    import tensorflow as tf
    from importlib.metadata import version

    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "ai_edge_litert": version("ai-edge-litert"),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        **extra,
        "date_utc": started.isoformat(timespec="seconds"),
        "duration_s": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
    }


def write_json(path, payload):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")

    atomic_write(path, write)


def write_plot(path, rows, cfg):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = max(cfg["threads"])
    colors = {"float32": "tab:blue", "float16": "tab:green", "dynamic": "tab:orange", "int8": "tab:purple"}
    styles = {"sara": "-", "softmax": "--"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    ax = axes[0]
    for attention in cfg["attentions"]:
        for precision in cfg["precisions"]:
            pts = sorted(
                (r["tokens"], r["p50_ms"]) for r in rows
                if r["benchmark"] == "encoder" and r["attention"] == attention
                and r["precision"] == precision and r["threads"] == threads and r.get("p50_ms") is not None
            )
            if pts:
                ax.plot(*zip(*pts), styles[attention], marker="o", color=colors[precision],
                        label=f"{attention} {precision}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(cfg["tokens"], [str(t) for t in cfg["tokens"]])
    ax.minorticks_off()
    ax.set_xlabel("tokens")
    ax.set_ylabel("p50 latency (ms)")
    ax.set_title(f"4-layer encoder, LiteRT, batch 1, {threads} thread{'s' if threads > 1 else ''}")
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, ncol=2)

    ax = axes[1]
    for t in cfg["threads"]:
        for precision in cfg["stream_precisions"]:
            pts = sorted(
                (r["history"], r["p50_ms"]) for r in rows
                if r["benchmark"] == "stream" and r["threads"] == t
                and r["precision"] == precision and r.get("p50_ms") is not None
            )
            if pts:
                ax.plot(*zip(*pts), marker="s", label=f"{precision}, {t} thread{'s' if t > 1 else ''}")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("history (tokens already fed)")
    ax.set_ylabel("p50 latency per step (ms)")
    ax.set_title("Causal SARA decoder, streaming step")
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


# ---------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tflite.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", help=f"token counts (default {DEFAULT_TOKENS})")
    p.add_argument("--quick", action="store_true",
                   help=f"tokens {QUICK_TOKENS}, fewer timed runs and {QUICK['stream_steps']} "
                        "timed steps per history")
    p.add_argument("--attentions", nargs="+", choices=ATTENTIONS, default=list(ATTENTIONS))
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument("--threads", type=int, nargs="+", default=list(DEFAULT_THREADS))
    p.add_argument("--max-softmax-tokens", type=int, default=DEFAULT_MAX_SOFTMAX_TOKENS,
                   help="skip softmax points above this many tokens")
    p.add_argument("--calibration-examples", type=int, default=DEFAULT_CALIBRATION_EXAMPLES,
                   help="random-normal examples that calibrate int8")
    p.add_argument("--mlp-ratio", type=int, default=scaling.MLP_RATIO,
                   help="feed-forward hidden size / width")
    p.add_argument("--histories", type=int, nargs="*", default=list(DEFAULT_HISTORIES),
                   help="streaming histories (none: skip the streaming benchmark)")
    p.add_argument("--stream-precisions", nargs="+", choices=PRECISIONS[:3], default=["float32"])
    p.add_argument("--stream-steps", type=int, help=f"timed steps per history (default {STREAM_STEPS})")
    p.add_argument("--no-encoder", action="store_true", help="streaming benchmark only")
    p.add_argument("--seconds", type=float,
                   help=f"time budget per timed point, from which the run count follows "
                        f"(default {TARGET_SECONDS:g}; {QUICK['target_seconds']:g} with --quick)")
    p.add_argument("--out-dir", default=os.path.join(REPO_ROOT, "benchmarks", "results", "tflite"))
    args = p.parse_args(argv)
    check_args(p, args, lists=("threads", "histories", "tokens"),
               counts=("calibration_examples", "mlp_ratio", "max_softmax_tokens", "stream_steps"),
               positive=("seconds",))
    return args


def check_args(parser, args, lists=(), counts=(), positive=()) -> None:
    """`parser.error` naming the flag and value: list flags with a value < 1,
    integer flags < 1, float flags <= 0 (flags left at None are skipped)."""
    for name in lists:
        values = getattr(args, name)
        if values and min(values) < 1:
            parser.error(f"`--{name.replace('_', '-')}` must be positive integers. Received: {values}")
    for name in counts:
        v = getattr(args, name)
        if v is not None and v < 1:
            parser.error(f"`--{name.replace('_', '-')}` must be >= 1. Received: {v}")
    for name in positive:
        v = getattr(args, name)
        if v is not None and not v > 0:
            parser.error(f"`--{name.replace('_', '-')}` must be positive. Received: {v}")


def main(argv=None):
    args = parse_args(argv)
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    keras.config.set_floatx("float32")
    quick = QUICK if args.quick else {}
    cfg = {
        "tokens": sorted(set(args.tokens or (QUICK_TOKENS if args.quick else DEFAULT_TOKENS))),
        "attentions": list(args.attentions),
        "precisions": list(args.precisions),
        "threads": sorted(set(args.threads)),
        "max_softmax_tokens": args.max_softmax_tokens,
        "calibration_examples": args.calibration_examples,
        "calibration": "random normal (not realistic; int8 errors are upper bounds)",
        "mlp_ratio": args.mlp_ratio,
        "histories": sorted(set(args.histories)),
        "stream_precisions": list(args.stream_precisions),
        "stream_steps": args.stream_steps or quick.get("stream_steps", STREAM_STEPS),
        "target_seconds": args.seconds or quick.get("target_seconds", TARGET_SECONDS),
        "min_runs": quick.get("min_runs", MIN_RUNS),
        "max_runs": quick.get("max_runs", MAX_RUNS),
        "warmup_runs": WARMUP_RUNS,
        "tolerances": {k: v for k, v in TOLERANCES.items()},
        "quick": args.quick,
        "encoder": not args.no_encoder,
    }
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = os.getloadavg()
    log(f"LiteRT benchmark: tokens {cfg['tokens']}, precisions {cfg['precisions']}, "
        f"threads {cfg['threads']}, histories {cfg['histories']}, cpus={os.cpu_count()}")
    rows = []
    with work_directory("keras_sara_tflite_bench_") as work:
        if cfg["encoder"]:
            rows += encoder_rows(cfg, work)
        if cfg["histories"]:
            rows += stream_rows(cfg, work)
    derived = derive(rows, cfg)

    payload = {
        "benchmark": "keras_sara LiteRT latency",
        "config": {
            "batch": scaling.BATCH, "width": scaling.WIDTH, "num_heads": scaling.NUM_HEADS,
            "key_dim": scaling.KEY_DIM, "layers": scaling.NUM_LAYERS, **cfg,
        },
        "machine": machine_info(started, loadavg_start=load_start, loadavg_end=os.getloadavg()),
        "command": shlex.join(
            [sys.executable, "-m", "tflite.benchmark"] + (sys.argv[1:] if argv is None else list(argv))
        ),
        "rows": rows,
        "derived": derived,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    paths = {ext: os.path.join(args.out_dir, f"latency.{ext}") for ext in ("csv", "json", "png")}
    write_csv(paths["csv"], rows)
    write_json(paths["json"], payload)
    write_plot(paths["png"], rows, cfg)
    log(markdown(rows, cfg, derived))
    log(f"\nLoad average start/end: {load_start[0]:.2f} / {os.getloadavg()[0]:.2f} on "
        f"{os.cpu_count()} CPUs.")
    log("Wrote " + ", ".join(paths.values()))


if __name__ == "__main__":
    main()
