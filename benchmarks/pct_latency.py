"""Latency of the PCT grasping policy against point count: softmax vs SARA, Keras and LiteRT.

The network is the grasping policy of `examples/grasping/policy.py`
(`POLICY_CONFIG`: 3 PCT blocks, width 64, 4 heads of 16; MLP head; tanh
action), built with `use_mask=False` (full clouds: the masked softmax
teacher builds a dense (N, N) mask per head, a cost of its own that is not
attention). For each point count N and attention ("softmax": Keras MHA,
"sara": ReLU-feature linear attention, the same weights via `set_weights`)
two networks are timed at batch 1, float32:

- "policy": the whole policy, `{"points": (1, N, 3), "extra": (1, 6)}` ->
  action `(1, 3)`;
- "encoder": the same model cut at the pooled features (layer "pool"),
  `{"points": (1, N, 3)}` -> `(1, 384)`. Its only input is the cloud: the
  gripper state joins after the pool, so an "extra" input would be unused.

on two runtimes:

- "keras": TensorFlow backend, `model(x, training=False)` inside one
  `tf.function` (graph, no XLA), output fetched as NumPy. A plain
  `tf.function` rather than `predict_on_batch`, whose per-call data
  handling costs about a millisecond, comparable with SARA's forward at
  small N. TensorFlow's intra-op pool gets `--threads` threads, like LiteRT.
- "tflite": the file of `keras_sara.export.export_tflite` (float32, builtin
  ops only, verified against Keras on the timing input) run by
  `tflite.runner.PolicyRunner` with `--threads` threads (XNNPACK).

Softmax and SARA of one (N, network, runtime) point take turns call by call
(`tflite.benchmark.time_in_turn`: warm-up, then a run count from a time
budget), so load from other processes hits both alike; the machine's load
average is recorded per point. A softmax point is skipped, with its reason,
when its estimated score tensors do not fit in available RAM (at 16,384
points one (4, N, N) float32 tensor is 4.3 GB), when one call takes longer
than `--max-call-seconds`, or when a smaller N already failed; an error at
one point is a row, not the end of the sweep. Each point count runs in a
child process: the machine has no swap, so running out of memory kills
rather than raises, and the parent records such a death in the rows it
left unfinished (then measures the point's SARA rows again on their own).

Writes `latency.csv`, `latency.json` (rows, derived figures, op
histograms, config, command, date, load), `latency.png` and `latency.md`
under `--out-dir`, each atomically, and prints the markdown table.

Usage:
    python benchmarks/pct_latency.py --quick          # 256 and 512 points, about a minute
    python benchmarks/pct_latency.py                  # 512 .. 16,384 points, 30+ minutes (quiet machine)
    python benchmarks/pct_latency.py --points 1024 8192 --threads 1
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import os
import shlex
import signal
import subprocess
import sys
import time

# Export and the Keras timings both run on TensorFlow.
os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (REPO_ROOT, os.path.join(REPO_ROOT, "examples", "grasping")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np  # noqa: E402
import keras  # noqa: E402

from benchmarks.scaling import AVAILABLE_RAM_SHARE, SOFTMAX_LIVE_MATRICES, available_ram_bytes, ratio  # noqa: E402
from keras_sara.export import export_tflite  # noqa: E402
from keras_sara.utils import atomic_write, work_directory  # noqa: E402
from policy import POLICY_CONFIG, build_policy  # noqa: E402
from tflite.benchmark import _error_text, machine_info, time_in_turn, write_json  # noqa: E402
from tflite.runner import PolicyRunner  # noqa: E402

# ----------------------------------------------------------------- constants

ATTENTIONS = ("softmax", "sara")
NETWORKS = ("encoder", "policy")
RUNTIMES = ("keras", "tflite")
DEFAULT_POINTS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_POINTS = (256, 512)
DEFAULT_THREADS = 2
DEFAULT_MAX_SOFTMAX_POINTS = 16384
# One softmax call at 16,384 points takes seconds, not minutes; a call this
# slow means the machine is swapping or starved, and timing it is pointless.
DEFAULT_MAX_CALL_SECONDS = 120.0
POOL_LAYER = "pool"

# Timed runs per point: about TARGET_SECONDS of the slower variant, within bounds.
TARGET_SECONDS = 2.0
MIN_RUNS, MAX_RUNS = 5, 200
QUICK = dict(target_seconds=0.2, min_runs=3, max_runs=10)
# Below this many runs a p99 is just the maximum: reported as empty.
P99_MIN_RUNS = 100
# Memory a forward pass needs besides the softmax score tensors.
RUNTIME_OVERHEAD_BYTES = 1 << 30

# What the issue asks of the LiteRT whole-policy numbers.
TARGETS = {
    "tflite_policy_softmax_over_sara_at_8192": (">=", 15.0),
    "tflite_policy_sara_t8192_over_t1024": ("<=", 9.0),
}

CSV_COLUMNS = (
    "network", "attention", "runtime", "points", "threads", "p50_ms", "p90_ms", "p99_ms",
    "mean_ms", "runs", "first_call_s", "file_bytes", "rel_error", "export_s", "load_1m", "status",
)


def log(msg: str) -> None:
    """Progress goes to stderr; the table to stdout."""
    print(msg, file=sys.stderr, flush=True)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


# -------------------------------------------------------------------- models


def build_pair(num_points: int) -> dict:
    """`{(attention, network): keras.Model}`: softmax and SARA with the same weights."""
    keras.utils.set_random_seed(0)
    models = {}
    teacher = build_policy("softmax", num_points, use_mask=False)
    student = build_policy("sara", num_points, use_mask=False)
    # ReLU features have no variables: the two policies hold the same list.
    student.set_weights(teacher.get_weights())
    for attention, policy in (("softmax", teacher), ("sara", student)):
        models[(attention, "policy")] = policy
        models[(attention, "encoder")] = keras.Model(
            {"points": policy.input["points"]}, policy.get_layer(POOL_LAYER).output,
            name=f"{policy.name}_encoder",
        )
    return models


def make_inputs(num_points: int) -> dict:
    """Standard-normal cloud and gripper state, batch 1 (values do not change the cost)."""
    rng = np.random.default_rng(num_points)
    return {
        "points": rng.standard_normal((1, num_points, 3)).astype(np.float32),
        "extra": rng.standard_normal((1, POLICY_CONFIG["extra_dim"])).astype(np.float32),
    }


def model_arrays(model: keras.Model, inputs: dict) -> list:
    """The model's inputs as a list in `model.inputs` order (the .tflite file's order)."""
    return [inputs[t.name] for t in model.inputs]


def keras_callable(model: keras.Model, inputs: dict):
    """A no-argument forward pass: one tf.function graph, output as NumPy."""
    import tensorflow as tf

    feed = {t.name: tf.constant(inputs[t.name]) for t in model.inputs}
    forward = tf.function(lambda x: model(x, training=False), jit_compile=False)
    return lambda: forward(feed).numpy()


def softmax_peak_bytes(num_points: int) -> int:
    """Rough peak of a softmax forward: live (1, H, N, N) float32 score tensors plus the rest."""
    scores = 4 * POLICY_CONFIG["num_heads"] * num_points * num_points
    return SOFTMAX_LIVE_MATRICES * scores + RUNTIME_OVERHEAD_BYTES


def skip_reason(attention: str, num_points: int, cfg: dict) -> str:
    """Why a point is not run ("" to run it): only softmax sizes are guarded."""
    if attention != "softmax":
        return ""
    if num_points > cfg["max_softmax_points"]:
        return f"skipped: points > --max-softmax-points={cfg['max_softmax_points']}"
    need = softmax_peak_bytes(num_points)
    available = available_ram_bytes()
    if available is not None and need > AVAILABLE_RAM_SHARE * available:
        return (
            f"skipped: estimated peak {need / 1e9:.1f} GB > {AVAILABLE_RAM_SHARE:.0%} of "
            f"available RAM ({available / 1e9:.1f} GB)"
        )
    return ""


# ----------------------------------------------------------------- measuring


def _first_call(call, cfg) -> tuple:
    """Run once (traces / packs weights); (seconds, status)."""
    start = time.perf_counter()
    try:
        call()
    except Exception as err:  # an OOM at one size should not lose the run
        return time.perf_counter() - start, _error_text(err)
    seconds = time.perf_counter() - start
    if seconds > cfg["max_call_seconds"]:
        return seconds, f"skipped: one call took {seconds:.0f} s > --max-call-seconds={cfg['max_call_seconds']:g}"
    return seconds, "ok"


def time_group(calls: dict, rows: dict, cfg: dict) -> None:
    """Time the callables of one (N, network, runtime) point in turn; fill their rows."""
    live = {}
    for attention, call in calls.items():
        seconds, status = _first_call(call, cfg)
        rows[attention].update(first_call_s=seconds, status=status)
        if status == "ok":
            live[attention] = call
    if not live:
        return
    try:
        timings = time_in_turn(live, [], cfg)
    except Exception as err:
        for attention in live:
            rows[attention]["status"] = _error_text(err)
        return
    for attention, stats in timings.items():
        if stats["runs"] < P99_MIN_RUNS:
            stats["p99_ms"] = None
        rows[attention].update(stats)


def new_rows(num_points: int, cfg: dict, given_up: dict) -> dict:
    """The rows of one point count, keyed `"network|runtime|attention"`, skips filled in."""
    load = os.getloadavg()[0]
    rows = {}
    for network in NETWORKS:
        for runtime in RUNTIMES:
            for attention in ATTENTIONS:
                key = f"{network}|{runtime}|{attention}"
                reason = skip_reason(attention, num_points, cfg) or given_up.get(key, "")
                rows[key] = {
                    "network": network, "attention": attention, "runtime": runtime, "points": num_points,
                    "threads": cfg["threads"], "load_1m": load, "status": reason or "ok",
                }
    return rows


def pending(row: dict) -> bool:
    return row["status"] == "ok" and row.get("p50_ms") is None


def measure_points(num_points: int, cfg: dict, work: str, rows: dict, ops: dict, checkpoint) -> None:
    """Fill the pending rows of one point count (and `ops`, the exported files' op histograms).

    `checkpoint(stage)` runs before each stage, so that a process killed
    during one (out of memory) leaves the finished rows and the stage behind.
    """
    todo = lambda network, runtime: [  # noqa: E731
        a for a in ATTENTIONS if pending(rows[f"{network}|{runtime}|{a}"])
    ]
    inputs = make_inputs(num_points)
    try:
        checkpoint("building the models")
        models = build_pair(num_points)
        for network in NETWORKS:
            attentions = todo(network, "keras")
            if not attentions:
                continue
            checkpoint(f"keras {network} ({', '.join(attentions)})")
            log(f"  N={num_points} {network} keras: timing {', '.join(attentions)} ...")
            calls = {a: keras_callable(models[(a, network)], inputs) for a in attentions}
            time_group(calls, {a: rows[f"{network}|keras|{a}"] for a in attentions}, cfg)
            del calls
            gc.collect()

        paths = {}
        for network in NETWORKS:
            for attention in todo(network, "tflite"):
                checkpoint(f"export {network} {attention}")
                row = rows[f"{network}|tflite|{attention}"]
                model = models[(attention, network)]
                path = os.path.join(work, f"{network}_{attention}_{num_points}.tflite")
                start = time.perf_counter()
                try:
                    report = export_tflite(
                        model, path, probe=[model_arrays(model, inputs)], builtins_only=True,
                        verify=True, num_threads=cfg["threads"], benchmark_runs=0,
                    )
                    row.update(file_bytes=report.size_bytes, rel_error=report.relative_error)
                    ops[f"{network}/{attention}"] = report.op_histogram
                    paths[(network, attention)] = path
                except Exception as err:  # a failed export is a row, not the end of the sweep
                    row["status"] = _error_text(err)
                # The verifying interpreter's arena (GBs for softmax at large N)
                # sits in a reference cycle: free it before the next export.
                gc.collect()
                row["export_s"] = time.perf_counter() - start
                state = row["status"] if row["status"] != "ok" else (
                    f"{row['file_bytes'] / 1e6:.2f} MB, rel error {row['rel_error']:.1e}"
                )
                log(f"  N={num_points} {network} {attention}: exported in {row['export_s']:.1f} s ({state})")
        for network in NETWORKS:
            attentions = [a for a in todo(network, "tflite") if (network, a) in paths]
            if not attentions:
                continue
            checkpoint(f"tflite {network} ({', '.join(attentions)})")
            log(f"  N={num_points} {network} tflite: timing {', '.join(attentions)} ...")
            calls = {}
            for a in attentions:
                runner = PolicyRunner(paths[(network, a)], num_threads=cfg["threads"])
                arrays = model_arrays(models[(a, network)], inputs)
                calls[a] = lambda runner=runner, arrays=arrays: runner(*arrays)
            time_group(calls, {a: rows[f"{network}|tflite|{a}"] for a in attentions}, cfg)
            del calls  # frees the interpreters' arenas
            gc.collect()
        for path in paths.values():
            os.remove(path)
    except Exception as err:  # e.g. building the models failed: every pending row says why
        for row in rows.values():
            if pending(row):
                row["status"] = _error_text(err)
    finally:
        keras.backend.clear_session()
        gc.collect()
    checkpoint("done")


def run_worker(num_points: int, state_path: str, cfg: dict) -> None:
    """Child process: measure one point count, checkpointing into `state_path`."""
    state = read_json(state_path)
    rows, ops = state["rows"], state.setdefault("ops", {})

    def checkpoint(stage):
        state["stage"] = stage
        write_json(state_path, state)

    # The parent's folder: it removes what a killed worker leaves behind.
    measure_points(num_points, cfg, os.path.dirname(os.path.abspath(state_path)), rows, ops, checkpoint)


def _exit_text(returncode: int) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (the kernel's OOM killer?)" if -returncode == signal.SIGKILL else ""
        return f"worker killed by {name}{hint}"
    return f"worker exited with status {returncode}"


def measure_point_isolated(num_points: int, cfg: dict, argv: list, work: str, given_up: dict) -> tuple:
    """Measure one point count in a child process; (rows, ops).

    A softmax forward at 16,384 points needs over 10 GB and the machine has
    no swap, so running out of memory kills the process rather than raising.
    The parent turns such a death into rows that say so, and runs the
    point's unfinished SARA rows again without softmax.
    """
    state_path = os.path.join(work, f"point_{num_points}.json")
    write_json(state_path, {"rows": new_rows(num_points, cfg, given_up), "ops": {}, "stage": "starting"})
    for attempt in (1, 2):
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *argv, "--_worker", str(num_points), "--_state", state_path],
            stdin=subprocess.DEVNULL, stdout=sys.stderr,
        )
        state = read_json(state_path)
        rows = state["rows"]
        if proc.returncode == 0 or not any(pending(r) for r in rows.values()):
            break
        reason = f"error: {_exit_text(proc.returncode)} during {state['stage']}"
        log(f"  N={num_points}: {reason}")
        for row in rows.values():
            if pending(row) and (row["attention"] == "softmax" or attempt == 2):
                row["status"] = reason
        if attempt == 2 or not any(pending(r) for r in rows.values()):
            break
        log(f"  N={num_points}: measuring the remaining SARA rows again, without softmax")
        write_json(state_path, state)
    for row in rows.values():
        if pending(row):
            row["status"] = f"error: {_exit_text(proc.returncode)} during {state['stage']}"
    return list(rows.values()), state.get("ops", {})


def report_rows(point_rows: list, given_up: dict) -> None:
    """Log one point's rows; a failed (network, runtime, attention) is skipped at larger N."""
    for row in point_rows:
        key = f"{row['network']}|{row['runtime']}|{row['attention']}"
        if row["status"] != "ok" and key not in given_up:
            given_up[key] = row["status"] if row["status"].startswith("skipped") else (
                f"skipped: failed at N={row['points']} ({row['status']})"
            )
        what = f"    {row['network']} {row['runtime']} {row['attention']} N={row['points']}"
        if row.get("p50_ms") is not None:
            log(f"{what}: p50 {row['p50_ms']:.2f} ms, p90 {row['p90_ms']:.2f} ms ({row['runs']} runs)")
        elif row["status"] != "ok":
            log(f"{what}: {row['status']}")


# ------------------------------------------------------------------- derived


def p50(rows, **match):
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r.get("p50_ms")
    return None


def derive(rows, cfg, ops_by_points) -> dict:
    points = cfg["points"]
    out = {"speedup_softmax_over_sara": {}, "sara_ratio_to_1024": {}}
    for runtime in RUNTIMES:
        for network in NETWORKS:
            key = f"{runtime}_{network}"
            out["speedup_softmax_over_sara"][key] = {
                str(n): ratio(p50(rows, runtime=runtime, network=network, attention="softmax", points=n),
                              p50(rows, runtime=runtime, network=network, attention="sara", points=n))
                for n in points
            }
            base = p50(rows, runtime=runtime, network=network, attention="sara", points=1024)
            out["sara_ratio_to_1024"][key] = {
                str(n): ratio(p50(rows, runtime=runtime, network=network, attention="sara", points=n), base)
                for n in points
            }
    values = {
        "tflite_policy_softmax_over_sara_at_8192": out["speedup_softmax_over_sara"]["tflite_policy"].get("8192"),
        "tflite_policy_sara_t8192_over_t1024": out["sara_ratio_to_1024"]["tflite_policy"].get("8192"),
    }
    out["targets"] = {}
    for key, (op, bound) in TARGETS.items():
        v = values[key]
        met = None if v is None else (v >= bound if op == ">=" else v <= bound)
        out["targets"][key] = {"value": v, "target": f"{op} {bound:g}", "met": met}

    # The graph does not depend on N: every point count should export the same ops.
    histograms = {}
    for n, ops in ops_by_points.items():
        for name, hist in ops.items():
            histograms.setdefault(name, {})[str(n)] = hist
    out["op_histograms"] = {name: next(iter(by_n.values())) for name, by_n in histograms.items()}
    out["op_histograms_vary_with_points"] = sorted(
        name for name, by_n in histograms.items() if len({tuple(sorted(h.items())) for h in by_n.values()}) > 1
    )
    notes = []
    for name, hist in out["op_histograms"].items():
        _, attention = name.split("/")
        if attention == "sara" and hist.get("SOFTMAX"):
            notes.append(f"{name}: {hist['SOFTMAX']} SOFTMAX op(s) in a SARA file")
        if attention == "softmax" and not hist.get("SOFTMAX"):
            notes.append(f"{name}: no SOFTMAX op in a softmax file")
        odd = sorted(op for op in hist if "GATHER" in op or op.startswith("Flex") or "WHILE" in op)
        if odd:
            notes.append(f"{name}: unexpected ops {odd}")
    out["op_notes"] = notes
    return out


# --------------------------------------------------------------------- output


def _cell(rows, **match):
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            if r.get("p50_ms") is not None:
                return f"{r['p50_ms']:.2f} / {r['p90_ms']:.2f}"
            return "skipped" if r["status"].startswith("skipped") else "error"
    return "-"


def _fmt(v, spec=".1f", suffix=""):
    return "n/a" if v is None else f"{v:{spec}}{suffix}"


def markdown(rows, cfg, derived, load) -> str:
    c = POLICY_CONFIG
    lines = [
        f"**PCT grasping policy, latency p50 / p90 ms** (batch 1, float32, {c['num_blocks']} blocks, "
        f"width {c['width']}, {c['num_heads']} heads of {c['key_dim']}; {cfg['threads']} thread"
        f"{'s' if cfg['threads'] != 1 else ''}; keras = TF graph, tflite = LiteRT/XNNPACK)",
    ]
    for network in NETWORKS:
        what = "whole policy (cloud + gripper -> action)" if network == "policy" else "encoder (cloud -> pooled features)"
        lines += [
            f"\n*{what}*\n",
            "| points | softmax keras | sara keras | speed-up keras | softmax tflite | sara tflite | speed-up tflite |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        speedup = derived["speedup_softmax_over_sara"]
        for n in cfg["points"]:
            cells = [
                _cell(rows, network=network, runtime="keras", attention="softmax", points=n),
                _cell(rows, network=network, runtime="keras", attention="sara", points=n),
                _fmt(speedup[f"keras_{network}"][str(n)], ".1f", "x"),
                _cell(rows, network=network, runtime="tflite", attention="softmax", points=n),
                _cell(rows, network=network, runtime="tflite", attention="sara", points=n),
                _fmt(speedup[f"tflite_{network}"][str(n)], ".1f", "x"),
            ]
            lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
    lines.append("\nTargets (LiteRT, whole policy):")
    for key, t in derived["targets"].items():
        met = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        lines.append(f"- {key}: {_fmt(t['value'], '.2f')} (target {t['target']}: {met})")
    skipped = sorted({f"{r['network']} {r['runtime']} {r['attention']} N={r['points']}: {r['status']}"
                      for r in rows if r["status"] != "ok"})
    if skipped:
        lines.append("\nNot measured:")
        lines += [f"- {s}" for s in skipped]
    if derived["op_notes"] or derived["op_histograms_vary_with_points"]:
        lines.append("\nOp histogram notes:")
        lines += [f"- {n}" for n in derived["op_notes"]]
        if derived["op_histograms_vary_with_points"]:
            lines.append(f"- op histogram changes with N: {derived['op_histograms_vary_with_points']}")
    lines.append(f"\nLoad average (1 min) at start / end: {load['start'][0]:.2f} / {load['end'][0]:.2f} "
                 f"on {os.cpu_count()} CPUs (per point: the `load_1m` column).")
    return "\n".join(lines)


def write_csv(path, rows):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for r in rows:
                writer.writerow({
                    k: ("" if r.get(k) is None else f"{r[k]:.6g}" if isinstance(r[k], float) else r[k])
                    for k in CSV_COLUMNS
                })

    atomic_write(path, write)


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def write_plot(path, rows, cfg, derived):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"softmax": "tab:red", "sara": "tab:blue"}
    styles = {"keras": "--", "tflite": "-"}
    markers = {"encoder": "s", "policy": "o"}
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.8))
    ax = axes[0]
    for attention in ATTENTIONS:
        for runtime in RUNTIMES:
            for network in NETWORKS:
                pts = sorted(
                    (r["points"], r["p50_ms"]) for r in rows
                    if (r["attention"], r["runtime"], r["network"]) == (attention, runtime, network)
                    and r.get("p50_ms") is not None
                )
                if pts:
                    ax.plot(*zip(*pts), styles[runtime], marker=markers[network], color=colors[attention],
                            fillstyle="none" if network == "encoder" else "full",
                            label=f"{attention} {runtime} {network}")
    ax.set_ylabel("p50 latency (ms)")
    ax.set_title(f"PCT grasping policy, batch 1, {cfg['threads']} thread{'s' if cfg['threads'] != 1 else ''}")
    ax = axes[1]
    for key, by_n in derived["speedup_softmax_over_sara"].items():
        runtime, network = key.split("_")
        pts = sorted((int(n), v) for n, v in by_n.items() if v is not None)
        if pts:
            ax.plot(*zip(*pts), styles[runtime], marker=markers[network], color="tab:purple",
                    fillstyle="none" if network == "encoder" else "full", label=f"{runtime} {network}")
    ax.axhline(TARGETS["tflite_policy_softmax_over_sara_at_8192"][1], color="gray", lw=0.8, ls=":",
               label="target at 8,192 (tflite policy)")
    ax.set_ylabel("softmax p50 / SARA p50")
    ax.set_title("SARA speed-up over softmax")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(cfg["points"], [str(n) for n in cfg["points"]])
        ax.minorticks_off()
        ax.set_xlabel("points per cloud")
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


# ---------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/pct_latency.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--points", type=int, nargs="+", help=f"points per cloud (default {DEFAULT_POINTS})")
    p.add_argument("--quick", action="store_true",
                   help=f"points {QUICK_POINTS} (unless --points) and {QUICK['min_runs']}-"
                        f"{QUICK['max_runs']} timed runs per point")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help="LiteRT interpreter threads and TensorFlow intra-op threads")
    p.add_argument("--max-softmax-points", type=int, default=DEFAULT_MAX_SOFTMAX_POINTS,
                   help="skip softmax points above this many points")
    p.add_argument("--max-call-seconds", type=float, default=DEFAULT_MAX_CALL_SECONDS,
                   help="skip a point (and larger ones) whose first call takes longer")
    p.add_argument("--out-dir", default=os.path.join(REPO_ROOT, "benchmarks", "results", "pct_latency"))
    # internal: one point count in a child process (see measure_point_isolated)
    p.add_argument("--_worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_state", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.points and min(args.points) < 1:
        p.error(f"`--points` must be positive integers. Received: {args.points}")
    for name in ("threads", "max_softmax_points"):
        if getattr(args, name) < 1:
            p.error(f"`--{name.replace('_', '-')}` must be >= 1. Received: {getattr(args, name)}")
    if not args.max_call_seconds > 0:
        p.error(f"`--max-call-seconds` must be > 0. Received: {args.max_call_seconds}")
    return args


def make_cfg(args) -> dict:
    quick = QUICK if args.quick else {}
    return {
        "points": sorted(set(args.points or (QUICK_POINTS if args.quick else DEFAULT_POINTS))),
        "threads": args.threads,
        "max_softmax_points": args.max_softmax_points,
        "max_call_seconds": args.max_call_seconds,
        "target_seconds": quick.get("target_seconds", TARGET_SECONDS),
        "min_runs": quick.get("min_runs", MIN_RUNS),
        "max_runs": quick.get("max_runs", MAX_RUNS),
        "p99_min_runs": P99_MIN_RUNS,
        "quick": args.quick,
        "use_mask": False,
        "policy_config": dict(POLICY_CONFIG, head_units=list(POLICY_CONFIG["head_units"])),
        "keras_forward": "tf.function(model(x, training=False)), graph without XLA, output .numpy()",
        "tflite": "export_tflite float32, builtins only, verified; tflite.runner.PolicyRunner",
        "isolation": "one child process per point count; an out-of-memory kill becomes rows that say so",
    }


def write_outputs(out_dir, rows, cfg, ops_by_points, load, started, command) -> str:
    """Every output file from the rows so far (after each point: a killed run keeps its data)."""
    derived = derive(rows, cfg, ops_by_points)
    payload = {
        "benchmark": "keras_sara PCT grasping policy latency vs points",
        "config": cfg,
        "machine": machine_info(started, loadavg_start=load["start"], loadavg_end=load["end"]),
        "command": command,
        "complete": len({r["points"] for r in rows}) == len(cfg["points"]),
        "rows": rows,
        "derived": derived,
    }
    table = markdown(rows, cfg, derived, load)
    paths = {ext: os.path.join(out_dir, f"latency.{ext}") for ext in ("csv", "json", "png", "md")}
    write_csv(paths["csv"], rows)
    write_json(paths["json"], payload)
    write_plot(paths["png"], rows, cfg, derived)
    write_text(paths["md"], table + f"\n\nCommand: `{command}`\n")
    return table


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    # Before any op runs: TensorFlow's pool then matches LiteRT's thread count.
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    keras.config.set_floatx("float32")
    cfg = make_cfg(args)
    if args._worker is not None:
        run_worker(args._worker, args._state, cfg)
        return
    started = datetime.datetime.now(datetime.timezone.utc)
    load = {"start": os.getloadavg()}
    command = shlex.join(["python", "benchmarks/pct_latency.py", *argv])
    log(f"PCT latency: points {cfg['points']}, {cfg['threads']} threads, cpus={os.cpu_count()}, "
        f"load {load['start'][0]:.2f}")
    rows, ops_by_points, given_up = [], {}, {}
    with work_directory("keras_sara_pct_latency_") as work:
        for i, n in enumerate(cfg["points"], 1):
            log(f"[{i}/{len(cfg['points'])}] N={n} (load {os.getloadavg()[0]:.2f})")
            point_rows, ops_by_points[n] = measure_point_isolated(n, cfg, argv, work, given_up)
            report_rows(point_rows, given_up)
            rows += point_rows
            load["end"] = os.getloadavg()
            table = write_outputs(args.out_dir, rows, cfg, ops_by_points, load, started, command)
    print(table, flush=True)
    log("Wrote latency.csv, .json, .png and .md under " + args.out_dir)


if __name__ == "__main__":
    main()
