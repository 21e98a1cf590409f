"""Resolution scaling of a ViT image encoder: softmax vs SARA, Keras and LiteRT.

The encoder is keras-hub's `ViTBackbone` built from constructor arguments
only (nothing is downloaded), ViT-Tiny-like and robot-sized: patch 16,
hidden 192, 4 layers, 3 heads of 64, MLP 768, no class token (every patch
is a token, as in the ViT that feeds RT-2's language model), random weights
(`keras.utils.set_random_seed(0)`; the cost does not depend on the values).
"sara" is `keras_sara.convert(softmax_encoder)`: the same weights, ReLU
features. Image sizes 128, 256, 384, 512 and 768 px give 64, 256, 576, 1,024
and 2,304 tokens; the output is the (1, tokens, 192) token sequence.

For each size, attention and runtime, at batch 1, float32, `--threads`
threads:

- latency, "keras": TensorFlow backend, `model(x, training=False)` in one
  `tf.function` (graph, no XLA; `benchmarks.pct_latency.keras_callable`),
  TensorFlow's intra-op pool set to `--threads`;
- latency, "tflite": the file of `keras_sara.export.export_tflite` (float32,
  builtin ops only, verified against Keras on the timing image) run by
  `tflite.runner.PolicyRunner` (XNNPACK);

  softmax and SARA of one (size, runtime) take turns call by call after
  warm-up (`tflite.benchmark.time_in_turn`), so load from other processes
  hits both alike; p50 and p90 of the timed calls.
- peak memory: a fresh subprocess per (runtime, attention, size) reads its
  RSS after its imports and the input image (the baseline), resets the
  kernel's high-water mark (`/proc/self/clear_refs`, "5"), loads the model
  (`.keras` file or `.tflite` file written by this run), runs
  `MEMORY_CALLS` forward passes and reads VmHWM from `/proc/self/status`.
  `peak_mb` = VmHWM - baseline: the model's whole inference footprint
  (weights, tracing or interpreter arena, activations). `load_mb` is RSS
  after loading minus baseline. Without VmHWM the fallback is `ru_maxrss`
  (`peak_source` says which), which also counts the imports.

Derived figures: for each runtime and attention, t(max)/t(min) against the
token ratio and the log-log slopes (exponent: 1 is linear, 2 quadratic)
over the whole range, between neighbouring sizes and, fitted by least
squares, over the large sizes (tokens >= max / 4); SARA's speed-up and
memory saving at each size; a verdict per curve read from the large-size
slope ("close to linear" within 0.85-1.2), since at small sizes fixed
costs (patch embedding, per-op overheads, the runtime itself) flatten
every curve.

Writes `resolution.csv`, `resolution.json` (rows, derived, config, command,
date, load average), `resolution.png` and `resolution.md` under
`--out-dir`, each atomically; progress goes to stderr, the table to stdout.

Usage:
    python benchmarks/vit_resolution.py --quick          # 64 and 128 px, about 3 minutes
    python benchmarks/vit_resolution.py                  # 128 .. 768 px, about 20 minutes
    python benchmarks/vit_resolution.py --sizes 224 448 --threads 1
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import math
import os
import shlex
import subprocess
import sys
import time

# Export and the Keras timings both run on TensorFlow.
os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402

import keras_sara  # noqa: E402  (registers SARA layers for load_model)
from benchmarks.pct_latency import _cell, _fmt, keras_callable, p50, time_group, write_text  # noqa: E402
from benchmarks.scaling import (  # noqa: E402
    AVAILABLE_RAM_SHARE, SOFTMAX_LIVE_MATRICES, _proc_status_bytes, available_ram_bytes,
    current_rss_bytes, peak_rss_bytes, ratio,
)
from keras_sara.export import export_tflite  # noqa: E402
from keras_sara.utils import atomic_write, work_directory  # noqa: E402
from tflite.benchmark import _error_text, machine_info, write_json  # noqa: E402
from tflite.runner import PolicyRunner  # noqa: E402

# ----------------------------------------------------------------- constants

ATTENTIONS = ("softmax", "sara")
RUNTIMES = ("keras", "tflite")
VIT_CONFIG = {
    "patch_size": 16, "hidden_dim": 192, "num_layers": 4, "num_heads": 3, "mlp_dim": 768,
    "use_class_token": False,
}
DEFAULT_SIZES = (128, 256, 384, 512, 768)  # 64, 256, 576, 1,024, 2,304 tokens
QUICK_SIZES = (64, 128)  # 16, 64 tokens
DEFAULT_THREADS = 2
DEFAULT_MAX_CALL_SECONDS = 120.0
RUNTIME_OVERHEAD_BYTES = 1 << 30  # memory a forward needs besides the softmax scores

# Timed runs per point: about TARGET_SECONDS of the slower attention, within bounds.
TARGET_SECONDS = 2.0
MIN_RUNS, MAX_RUNS = 8, 100
QUICK = dict(target_seconds=0.2, min_runs=3, max_runs=10)
P99_MIN_RUNS = 100  # below this a p99 is the maximum: left empty
MEMORY_CALLS = 2  # forward passes in a memory probe (the first traces / packs weights)

# Log-log slope bands for the verdicts: a slope of 1 is linear, 2 quadratic.
LINEAR_BAND = (0.85, 1.2)
# The large-N slope is fitted over token counts >= max / LARGE_WINDOW.
LARGE_WINDOW = 4

PROBE_PREFIX = "VIT_RESOLUTION_MEMORY "
CSV_COLUMNS = (
    "runtime", "attention", "image_size", "tokens", "threads", "p50_ms", "p90_ms", "p99_ms",
    "mean_ms", "runs", "first_call_s", "peak_mb", "load_mb", "baseline_mb", "peak_source",
    "file_bytes", "rel_error", "export_s", "load_1m", "status", "memory_status",
)


def log(msg: str) -> None:
    """Progress goes to stderr; the table to stdout."""
    print(msg, file=sys.stderr, flush=True)


# -------------------------------------------------------------------- models


def num_tokens(image_size: int, patch_size: int = VIT_CONFIG["patch_size"]) -> int:
    return (image_size // patch_size) ** 2


def build_encoders(image_size: int, num_layers: int) -> dict:
    """`{"softmax": ViTBackbone, "sara": its keras_sara.convert copy}` with the same weights."""
    keras.utils.set_random_seed(0)
    config = dict(VIT_CONFIG, num_layers=num_layers)
    softmax = keras_hub.models.ViTBackbone(image_shape=(image_size, image_size, 3), **config)
    sara, report = keras_sara.convert(softmax, feature_map="relu")
    if len(report.converted) != num_layers or report.skipped:
        raise RuntimeError(f"Expected {num_layers} converted attention layers, got:\n{report}")
    return {"softmax": softmax, "sara": sara}


def make_image(image_size: int) -> np.ndarray:
    """A standard-normal (1, H, W, 3) image (the values do not change the cost)."""
    return np.random.default_rng(image_size).standard_normal((1, image_size, image_size, 3)).astype(np.float32)


def skip_reason(attention: str, tokens: int, num_heads: int = VIT_CONFIG["num_heads"]) -> str:
    """Why a point is not run ("" to run it): softmax sizes whose scores would not fit in RAM."""
    if attention != "softmax":
        return ""
    need = SOFTMAX_LIVE_MATRICES * 4 * num_heads * tokens * tokens + RUNTIME_OVERHEAD_BYTES
    available = available_ram_bytes()
    if available is not None and need > AVAILABLE_RAM_SHARE * available:
        return (
            f"skipped: estimated peak {need / 1e9:.1f} GB > {AVAILABLE_RAM_SHARE:.0%} of "
            f"available RAM ({available / 1e9:.1f} GB)"
        )
    return ""


# -------------------------------------------------------------------- memory


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_memory_probe(spec: dict) -> None:
    """Child process: baseline RSS, reset the peak, load the model, forward passes, print figures."""
    x = make_image(spec["image_size"])
    gc.collect()
    baseline = current_rss_bytes()
    reset = reset_peak_rss()
    if spec["runtime"] == "keras":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(spec["threads"])
        model = keras.models.load_model(spec["path"], compile=False)
        call = keras_callable(model, {model.inputs[0].name: x})
    else:
        runner = PolicyRunner(spec["path"], num_threads=spec["threads"])
        call = lambda: runner(x)  # noqa: E731
    loaded = current_rss_bytes()
    for _ in range(MEMORY_CALLS):
        out = call()
    if not np.all(np.isfinite(out)):
        raise RuntimeError("the forward pass returned non-finite values")
    peak = peak_rss_bytes()
    source = ("VmHWM" if reset else "VmHWM (not reset)") if _proc_status_bytes("VmHWM") is not None else "ru_maxrss"
    print(PROBE_PREFIX + json.dumps({
        "baseline_mb": baseline / 2**20,
        "load_mb": (loaded - baseline) / 2**20,
        "peak_mb": (peak - baseline) / 2**20,
        "peak_source": source,
    }), flush=True)


def memory_check(spec: dict) -> dict:
    """Run `run_memory_probe` in a fresh interpreter; its figures, or `memory_status` saying why not."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory-probe", json.dumps(spec)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"memory_status": "error: memory probe timed out after 600 s"}
    for line in proc.stdout.splitlines():
        if line.startswith(PROBE_PREFIX):
            return {**json.loads(line[len(PROBE_PREFIX):]), "memory_status": "ok"}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
    return {"memory_status": f"error: probe exited {proc.returncode}: {tail}"}


# ----------------------------------------------------------------- measuring


def measure_size(image_size: int, cfg: dict, work: str) -> tuple:
    """Every row of one image size, and the op histograms of its exported files."""
    tokens = num_tokens(image_size)
    load = os.getloadavg()[0]
    rows = {
        (runtime, attention): {
            "runtime": runtime, "attention": attention, "image_size": image_size, "tokens": tokens,
            "threads": cfg["threads"], "load_1m": load, "status": skip_reason(attention, tokens) or "ok",
            "memory_status": "not run",
        }
        for runtime in RUNTIMES for attention in ATTENTIONS
    }
    runnable = lambda runtime: [a for a in ATTENTIONS if rows[(runtime, a)]["status"] == "ok"]  # noqa: E731
    ops, files = {}, {}
    x = make_image(image_size)
    try:
        models = build_encoders(image_size, cfg["num_layers"])
        feed = {models["softmax"].inputs[0].name: x}
        attentions = runnable("keras")
        log(f"  {image_size} px keras: timing {', '.join(attentions)} in turn ...")
        calls = {a: keras_callable(models[a], feed) for a in attentions}
        time_group(calls, {a: rows[("keras", a)] for a in attentions}, cfg)
        del calls
        gc.collect()

        for attention in runnable("tflite"):
            row = rows[("tflite", attention)]
            path = os.path.join(work, f"vit_{attention}_{image_size}.tflite")
            start = time.perf_counter()
            try:
                report = export_tflite(
                    models[attention], path, probe=[[x]], builtins_only=True, verify=True,
                    num_threads=cfg["threads"], benchmark_runs=0,
                )
                row.update(file_bytes=report.size_bytes, rel_error=report.relative_error)
                ops[attention] = report.op_histogram
                files[("tflite", attention)] = path
            except Exception as err:  # a failed export is a row, not the end of the sweep
                row["status"] = _error_text(err)
            row["export_s"] = time.perf_counter() - start
            state = row["status"] if row["status"] != "ok" else (
                f"{row['file_bytes'] / 1e6:.2f} MB, rel error {row['rel_error']:.1e}")
            log(f"  {image_size} px {attention}: exported in {row['export_s']:.1f} s ({state})")
        attentions = [a for a in runnable("tflite") if ("tflite", a) in files]
        log(f"  {image_size} px tflite: timing {', '.join(attentions)} in turn ...")
        calls = {}
        for a in attentions:
            runner = PolicyRunner(files[("tflite", a)], num_threads=cfg["threads"])
            calls[a] = lambda runner=runner: runner(x)
        time_group(calls, {a: rows[("tflite", a)] for a in attentions}, cfg)
        del calls  # frees the interpreters before the memory probes
        for attention in runnable("keras"):
            path = os.path.join(work, f"vit_{attention}_{image_size}.keras")
            models[attention].save(path)
            files[("keras", attention)] = path
    except Exception as err:  # e.g. building the models failed: every pending row says why
        for row in rows.values():
            if row["status"] == "ok" and row.get("p50_ms") is None:
                row["status"] = _error_text(err)
    finally:
        models = None
        keras.backend.clear_session()
        gc.collect()

    if cfg["memory"]:
        for (runtime, attention), path in files.items():
            log(f"  {image_size} px {runtime} {attention}: peak memory (fresh subprocess) ...")
            spec = {"runtime": runtime, "path": path, "image_size": image_size, "threads": cfg["threads"]}
            rows[(runtime, attention)].update(memory_check(spec))
            os.remove(path)
    for path in files.values():
        if os.path.exists(path):
            os.remove(path)

    for row in rows.values():
        head = f"    {row['runtime']} {row['attention']} {image_size} px ({tokens} tokens):"
        if row.get("p50_ms") is not None:
            mem = (f"peak +{row['peak_mb']:.0f} MB" if row["memory_status"] == "ok" else row["memory_status"])
            log(f"{head} p50 {row['p50_ms']:.2f} ms, p90 {row['p90_ms']:.2f} ms ({row['runs']} runs); {mem}")
        else:
            log(f"{head} {row['status']}")
    return list(rows.values()), ops


# ------------------------------------------------------------------- derived


def peak_mb(rows, **match):
    """The first matching row's peak memory, or None when its probe did not run or failed."""
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r.get("peak_mb") if r.get("memory_status") == "ok" else None
    return None


def _slope(a, b, na, nb):
    """Log-log slope between (na, a) and (nb, b): 1 linear, 2 quadratic."""
    if a is None or b is None or a <= 0 or b <= 0 or na == nb:
        return None
    return math.log(b / a) / math.log(nb / na)


def verdict(slope) -> str:
    if slope is None:
        return "not measured"
    low, high = LINEAR_BAND
    if slope < low:
        return "sublinear (fixed costs dominate)"
    if slope <= high:
        return "close to linear"
    return "superlinear"


def growth(values: dict) -> dict:
    """Growth of a {tokens: value} curve: overall ratio and log-log slopes.

    `slope_large` is a least-squares fit over the points with at least
    1 / LARGE_WINDOW of the largest token count: several points, so one
    noisy size on a loaded machine moves it less than `slope_top` (the two
    largest sizes alone); the verdict is read from it.
    """
    pts = sorted((n, v) for n, v in values.items() if v is not None and v > 0)
    if len(pts) < 2:
        return {"ratio_max_over_min": None, "token_ratio": None, "slope_overall": None,
                "slope_by_interval": {}, "slope_top": None, "slope_large": None, "large_tokens": [],
                "verdict": "not measured", "verdict_overall": "not measured"}
    (n0, v0), (n1, v1) = pts[0], pts[-1]
    large = [(n, v) for n, v in pts if n * LARGE_WINDOW >= n1]
    if len(large) < 2:
        large = pts[-2:]
    fit = float(np.polyfit(np.log([n for n, _ in large]), np.log([v for _, v in large]), 1)[0])
    overall = _slope(v0, v1, n0, n1)
    return {
        "tokens_min": n0, "tokens_max": n1, "ratio_max_over_min": v1 / v0, "token_ratio": n1 / n0,
        "slope_overall": overall,
        "slope_by_interval": {f"{a}-{b}": _slope(va, vb, a, b) for (a, va), (b, vb) in zip(pts, pts[1:])},
        "slope_top": _slope(pts[-2][1], v1, pts[-2][0], n1),
        "slope_large": fit, "large_tokens": [n for n, _ in large],
        "verdict": verdict(fit), "verdict_overall": verdict(overall),
    }


def derive(rows, cfg, ops_by_size) -> dict:
    tokens = [num_tokens(s) for s in cfg["sizes"]]
    out = {"latency_growth": {}, "memory_growth": {}, "speedup_softmax_over_sara": {},
           "memory_softmax_over_sara": {}}
    for runtime in RUNTIMES:
        for attention in ATTENTIONS:
            key = f"{runtime}_{attention}"
            out["latency_growth"][key] = growth(
                {n: p50(rows, runtime=runtime, attention=attention, tokens=n) for n in tokens})
            out["memory_growth"][key] = growth(
                {n: peak_mb(rows, runtime=runtime, attention=attention, tokens=n) for n in tokens})
        out["speedup_softmax_over_sara"][runtime] = {
            str(n): ratio(p50(rows, runtime=runtime, attention="softmax", tokens=n),
                          p50(rows, runtime=runtime, attention="sara", tokens=n)) for n in tokens
        }
        out["memory_softmax_over_sara"][runtime] = {
            str(n): ratio(peak_mb(rows, runtime=runtime, attention="softmax", tokens=n),
                          peak_mb(rows, runtime=runtime, attention="sara", tokens=n))
            for n in tokens
        }
    out["summary"] = summary_lines(out)

    notes = []
    for size, ops in ops_by_size.items():
        if ops.get("sara", {}).get("SOFTMAX"):
            notes.append(f"{size} px sara: {ops['sara']['SOFTMAX']} SOFTMAX op(s) in a SARA file")
        if "softmax" in ops and not ops["softmax"].get("SOFTMAX"):
            notes.append(f"{size} px softmax: no SOFTMAX op in a softmax file")
        for attention, hist in ops.items():
            odd = sorted(op for op in hist if op.startswith("Flex") or "WHILE" in op)
            if odd:
                notes.append(f"{size} px {attention}: unexpected ops {odd}")
    out["op_histograms"] = next(iter(ops_by_size.values()), {})
    out["op_notes"] = notes
    return out


def summary_lines(derived) -> list:
    """Plain-language reading of the slopes, per runtime and quantity."""
    lines = []
    for what, key in (("latency", "latency_growth"), ("peak memory", "memory_growth")):
        for runtime in RUNTIMES:
            parts = []
            for attention in ATTENTIONS:
                g = derived[key][f"{runtime}_{attention}"]
                if g["ratio_max_over_min"] is None:
                    parts.append(f"{attention} not measured")
                    continue
                window = f"{g['large_tokens'][0]:,}-{g['large_tokens'][-1]:,} tokens"
                small = " (fixed costs dominate at small sizes)" if g["slope_overall"] < LINEAR_BAND[0] else ""
                parts.append(
                    f"{attention} x{g['ratio_max_over_min']:.1f} for x{g['token_ratio']:.0f} tokens "
                    f"(slope {g['slope_overall']:.2f} overall{small}; {g['slope_large']:.2f} fitted over "
                    f"{window}: {g['verdict']})"
                )
            lines.append(f"{runtime} {what}: " + "; ".join(parts))
    return lines


# --------------------------------------------------------------------- output


def _mem(rows, **match):
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            if r.get("memory_status") == "ok":
                return f"{r['peak_mb']:.0f}"
            return "skipped" if r["status"].startswith("skipped") else "n/a"
    return "-"


def markdown(rows, cfg, derived, load) -> str:
    c = dict(VIT_CONFIG, num_layers=cfg["num_layers"])
    th = f"{cfg['threads']} thread{'s' if cfg['threads'] != 1 else ''}"
    lines = [
        f"**ViT encoder, latency p50 / p90 ms** (keras-hub ViTBackbone: patch {c['patch_size']}, hidden "
        f"{c['hidden_dim']}, {c['num_layers']} layers, {c['num_heads']} heads, MLP {c['mlp_dim']}, no class "
        f"token; batch 1, float32, {th}; keras = TF graph, tflite = LiteRT/XNNPACK)\n",
        "| image | tokens | softmax keras | sara keras | speed-up keras | softmax tflite | sara tflite "
        "| speed-up tflite |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    speedup = derived["speedup_softmax_over_sara"]
    for size in cfg["sizes"]:
        n = num_tokens(size)
        cells = []
        for runtime in RUNTIMES:
            cells += [_cell(rows, runtime=runtime, attention=a, tokens=n) for a in ATTENTIONS]
            cells.append(_fmt(speedup[runtime][str(n)], ".2f", "x"))
        lines.append(f"| {size} px | {n:,} | " + " | ".join(cells) + " |")
    lines += [
        "\n**Peak memory, MB over the process baseline** (fresh process per point: VmHWM after loading "
        "the model and two forward passes, minus RSS after imports)\n",
        "| image | tokens | softmax keras | sara keras | softmax/sara keras | softmax tflite | sara tflite "
        "| softmax/sara tflite |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    mem_ratio = derived["memory_softmax_over_sara"]
    for size in cfg["sizes"]:
        n = num_tokens(size)
        cells = []
        for runtime in RUNTIMES:
            cells += [_mem(rows, runtime=runtime, attention=a, tokens=n) for a in ATTENTIONS]
            cells.append(_fmt(mem_ratio[runtime][str(n)], ".2f", "x"))
        lines.append(f"| {size} px | {n:,} | " + " | ".join(cells) + " |")
    lines += [
        "\n**Growth** (log-log slope of p50 latency or peak memory against tokens: 1 linear, 2 quadratic; "
        f"large N: least-squares fit over tokens >= max/{LARGE_WINDOW})\n",
        "| quantity | runtime | attention | max/min | tokens max/min | slope overall | slope, large N "
        "(fit) | slope, two largest | verdict (large N) |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for what, key in (("latency", "latency_growth"), ("memory", "memory_growth")):
        for runtime in RUNTIMES:
            for attention in ATTENTIONS:
                g = derived[key][f"{runtime}_{attention}"]
                lines.append(
                    f"| {what} | {runtime} | {attention} | {_fmt(g['ratio_max_over_min'], '.1f', 'x')} | "
                    f"{_fmt(g['token_ratio'], '.0f', 'x')} | {_fmt(g['slope_overall'], '.2f')} | "
                    f"{_fmt(g['slope_large'], '.2f')} | {_fmt(g['slope_top'], '.2f')} | {g['verdict']} |"
                )
    not_ok = sorted({f"{r['runtime']} {r['attention']} {r['image_size']} px: {r['status']}"
                     for r in rows if r["status"] != "ok"}
                    | {f"{r['runtime']} {r['attention']} {r['image_size']} px memory: {r['memory_status']}"
                       for r in rows if r["status"] == "ok" and r["memory_status"] != "ok"})
    if not_ok:
        lines.append("\nNot measured:")
        lines += [f"- {s}" for s in not_ok]
    if derived["op_notes"]:
        lines.append("\nOp histogram notes:")
        lines += [f"- {n}" for n in derived["op_notes"]]
    lines.append(f"\nLoad average (1 min) at start / end: {load['start'][0]:.2f} / {load['end'][0]:.2f} "
                 f"on {os.cpu_count()} CPUs (per point: the `load_1m` column).")
    return "\n".join(lines)


def write_csv(path, rows):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for r in rows:
                writer.writerow({k: "" if r.get(k) is None else f"{r[k]:.6g}" if isinstance(r[k], float)
                                 else r[k] for k in CSV_COLUMNS})

    atomic_write(path, write)


def write_plot(path, rows, cfg):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"softmax": "tab:red", "sara": "tab:blue"}
    styles = {"keras": "--", "tflite": "-"}
    markers = {"keras": "s", "tflite": "o"}
    tokens = [num_tokens(s) for s in cfg["sizes"]]
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.8))
    for ax, key, label in ((axes[0], "p50_ms", "p50 latency (ms)"),
                           (axes[1], "peak_mb", "peak RSS over baseline (MB)")):
        for attention in ATTENTIONS:
            for runtime in RUNTIMES:
                pts = sorted(
                    (r["tokens"], r[key]) for r in rows
                    if (r["attention"], r["runtime"]) == (attention, runtime) and r.get(key) is not None
                    and r[key] > 0 and (key != "peak_mb" or r["memory_status"] == "ok")
                )
                if pts:
                    ax.plot(*zip(*pts), styles[runtime], marker=markers[runtime], color=colors[attention],
                            label=f"{attention} {runtime}")
        # Slope guides over the large-size window the verdicts are fitted on, from the
        # SARA curve's first point in it (tflite if measured, else keras).
        n_max = max(tokens)
        start = min((n for n in tokens if n * LARGE_WINDOW >= n_max), default=n_max)
        anchor = next((r[key] for runtime in ("tflite", "keras") for r in rows
                       if (r["runtime"], r["attention"], r["tokens"]) == (runtime, "sara", start)
                       and r.get(key) and (key != "peak_mb" or r["memory_status"] == "ok")), None)
        if anchor and start < n_max:
            ns = np.array([start, n_max], dtype=float)
            ax.plot(ns, anchor * ns / start, ":", color="gray", lw=1.0, label="slope 1 (linear)")
            ax.plot(ns, anchor * (ns / start) ** 2, "-.", color="gray", lw=1.0, label="slope 2 (quadratic)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(tokens, [f"{n}\n{s} px" for n, s in zip(tokens, cfg["sizes"])])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # y keeps its minor labels
        ax.set_xlabel("tokens (image size)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    th = f"{cfg['threads']} thread{'s' if cfg['threads'] != 1 else ''}"
    axes[0].set_title(f"ViT encoder latency, batch 1, float32, {th}")
    axes[1].set_title("Peak memory of one inference process")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


# ---------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/vit_resolution.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+",
                   help=f"image sizes in pixels, multiples of {VIT_CONFIG['patch_size']} (default {DEFAULT_SIZES})")
    p.add_argument("--quick", action="store_true",
                   help=f"sizes {QUICK_SIZES} (unless --sizes) and {QUICK['min_runs']}-{QUICK['max_runs']} "
                        "timed runs per point")
    p.add_argument("--layers", type=int, default=VIT_CONFIG["num_layers"], help="encoder layers")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help="LiteRT interpreter threads and TensorFlow intra-op threads")
    p.add_argument("--max-call-seconds", type=float, default=DEFAULT_MAX_CALL_SECONDS,
                   help="skip a point whose first call takes longer")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--out-dir", default=os.path.join(REPO_ROOT, "benchmarks", "results", "vit_resolution"))
    p.add_argument("--_memory-probe", dest="memory_probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    patch = VIT_CONFIG["patch_size"]
    if args.sizes and any(s < patch or s % patch for s in args.sizes):
        p.error(f"`--sizes` must be positive multiples of the patch size {patch}. Received: {args.sizes}")
    for name in ("layers", "threads"):
        if getattr(args, name) < 1:
            p.error(f"`--{name}` must be >= 1. Received: {getattr(args, name)}")
    if not args.max_call_seconds > 0:
        p.error(f"`--max-call-seconds` must be > 0. Received: {args.max_call_seconds}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.memory_probe:
        run_memory_probe(json.loads(args.memory_probe))
        return
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    # Before any op runs: TensorFlow's pool then matches LiteRT's thread count.
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    keras.config.set_floatx("float32")
    quick = QUICK if args.quick else {}
    cfg = {
        "sizes": sorted(set(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))),
        "num_layers": args.layers,
        "threads": args.threads,
        "max_call_seconds": args.max_call_seconds,
        "target_seconds": quick.get("target_seconds", TARGET_SECONDS),
        "min_runs": quick.get("min_runs", MIN_RUNS),
        "max_runs": quick.get("max_runs", MAX_RUNS),
        "p99_min_runs": P99_MIN_RUNS,
        "memory": not args.no_memory,
        "memory_calls": MEMORY_CALLS,
        "quick": args.quick,
        "vit_config": dict(VIT_CONFIG, num_layers=args.layers),
        "sara": "keras_sara.convert(softmax encoder, feature_map='relu'): same weights",
        "keras_forward": "tf.function(model(x, training=False)), graph without XLA, output .numpy()",
        "tflite": "export_tflite float32, builtins only, verified; tflite.runner.PolicyRunner",
        "memory_method": (
            "fresh subprocess per point; baseline = VmRSS after imports and the input image; VmHWM reset "
            "via /proc/self/clear_refs; model loaded from the .keras / .tflite file of this run; "
            f"{MEMORY_CALLS} forward passes; peak_mb = VmHWM - baseline, load_mb = VmRSS after load - baseline"
        ),
    }
    cfg["tokens"] = [num_tokens(s) for s in cfg["sizes"]]
    started = datetime.datetime.now(datetime.timezone.utc)
    load = {"start": os.getloadavg(), "per_size": {}}
    log(f"ViT resolution: sizes {cfg['sizes']} px = tokens {cfg['tokens']}, {cfg['threads']} threads, "
        f"cpus={os.cpu_count()}, load {load['start'][0]:.2f}")
    rows, ops_by_size = [], {}
    with work_directory("keras_sara_vit_resolution_") as work:
        for i, size in enumerate(cfg["sizes"], 1):
            log(f"[{i}/{len(cfg['sizes'])}] {size} px, {num_tokens(size)} tokens (load {os.getloadavg()[0]:.2f})")
            size_rows, ops = measure_size(size, cfg, work)
            rows += size_rows
            ops_by_size[size] = ops
            load["per_size"][str(size)] = os.getloadavg()
    load["end"] = os.getloadavg()
    derived = derive(rows, cfg, ops_by_size)

    payload = {
        "benchmark": "keras_sara ViT encoder resolution scaling",
        "config": cfg,
        "machine": machine_info(started, keras_hub=keras_hub.__version__, loadavg_start=load["start"],
                                loadavg_end=load["end"], loadavg_after_each_size=load["per_size"]),
        "command": shlex.join(
            [sys.executable, "benchmarks/vit_resolution.py"] + (sys.argv[1:] if argv is None else list(argv))
        ),
        "rows": rows,
        "derived": derived,
    }
    table = markdown(rows, cfg, derived, load)
    summary = "\n".join(f"- {line}" for line in derived["summary"])
    paths = {ext: os.path.join(args.out_dir, f"resolution.{ext}") for ext in ("csv", "json", "png", "md")}
    write_csv(paths["csv"], rows)
    write_json(paths["json"], payload)
    write_plot(paths["png"], rows, cfg)
    write_text(paths["md"], table + f"\n\nSummary:\n{summary}\n\nCommand: `{payload['command']}`\n")
    print(table + "\n\nSummary:\n" + summary, flush=True)
    log("Wrote " + ", ".join(paths.values()))


if __name__ == "__main__":
    main()
