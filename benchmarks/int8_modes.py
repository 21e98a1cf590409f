"""Which quantisation pays for a SARA encoder in LiteRT, and what it costs in error.

The 4-layer, 128-wide, 4-head SARA encoder of `benchmarks/scaling.py`
(`build_model("encoder", "sara", tokens)`, random weights, seed 0) exported
with `keras_sara.export.export_tflite` in every variant below, all verified
against Keras; the variants of a thread count take turns call by call after
warm-up (`tflite.benchmark.time_in_turn`), so machine load hits all alike and
the ratios are comparable within a run:

- layout `split` (the default, `split_heads=True`: one projection per head,
  H times fewer flops in `K^T V`, output projection a constant-weight matmul)
  and `flat` (`split_heads=False`: the layout Keras runs, output projection
  folded into an activation-by-activation product);
- `float32`, `float16`, `dynamic`, `int8` (selective, the default float-op
  list), `int8_elementwise` (the previous default: `MUL`, `ADD`, `MAXIMUM` in
  int8 as well) and `int8_full` (`int8_float_ops=()`, full integer; timed in
  its own group, it is several times slower);
- `unfolded float32` / `unfolded int8`: the split layout with
  `fold_layernorm=False` (LayerNorm scale and shift computed in place rather
  than folded into the projections that read them).

The LayerNorms get random scales and shifts (a fresh layer's are 1 and 0), so
the folded variants' errors include quantising the folded kernels.

int8 is calibrated on `--calibration-examples` random-normal inputs; every
error is measured on `--probes` other random-normal inputs (held out from
calibration): relative error `||litert - keras|| / ||keras||` and max abs error
of the encoder's output. Random inputs are not a robot's: for a policy,
calibrate and measure on real observations (`examples/pct_grasping.py`
reports each quantised variant's error in action space).

`--rounds R` repeats the timing R times (each round a fresh time budget,
the same interpreters) and reports each variant's median over the rounds'
p50s with the spread of its per-round speed-up: on a shared machine one
round's ratio is one draw. `--variants` times a subset (the baseline, `split
float32`, is always included); `--mlp-ratio 4` gives the encoder a ViT-style
feed-forward block instead of the PCT-style one.

Writes `int8_modes.json` (rows, ratios, config, machine, command),
`int8_modes.md` and, with `--rounds` > 1, `int8_rounds.png` (each round's
speed-up against that round's float32 time, per thread count) under
`--out-dir`, atomically, and prints the table.

Usage:
    python benchmarks/int8_modes.py                 # 4,096 tokens, 1 and 2 threads, about 8 minutes
    python benchmarks/int8_modes.py --quick         # 256 tokens, about 2 minutes
    python benchmarks/int8_modes.py --variants "split int8" --rounds 12 --seconds 3 --no-full-int8
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys

os.environ["KERAS_BACKEND"] = "tensorflow"  # export runs on TensorFlow
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402
import keras  # noqa: E402

from benchmarks import scaling  # noqa: E402
from benchmarks.pct_latency import write_text  # noqa: E402
from keras_sara.export import DEFAULT_INT8_FLOAT_OPS, export_tflite  # noqa: E402
from keras_sara.utils import atomic_write, work_directory  # noqa: E402
from tflite.benchmark import check_args, machine_info, time_in_turn, write_json  # noqa: E402
from tflite.runner import PolicyRunner  # noqa: E402

# name: (split_heads, quantize, int8_float_ops, fold_layernorm)
VARIANTS = {
    "split float32": (True, None, None, True),
    "split float16": (True, "float16", None, True),
    "split dynamic": (True, "dynamic", None, True),
    "split int8": (True, "int8", None, True),
    "split int8_elementwise": (
        True, "int8", tuple(o for o in DEFAULT_INT8_FLOAT_OPS if o not in ("MUL", "ADD", "MAXIMUM")), True,
    ),
    "unfolded float32": (True, None, None, False),
    "unfolded int8": (True, "int8", None, False),
    "flat float32": (False, None, None, True),
    "flat int8": (False, "int8", None, True),
}
FULL_INT8 = {"split int8_full": (True, "int8", (), True)}
BASELINE = "split float32"
DEFAULT_TOKENS, QUICK_TOKENS = 4096, 256


def log(msg: str) -> None:
    print(msg, flush=True)


def _randomise_layernorms(model) -> None:
    """LayerNorm scale 1 + N(0, 0.1^2), shift N(0, 0.1^2): a trained model's are not 1 and 0,
    so the folded variants' errors include the folded weights' quantisation."""
    rng = np.random.default_rng(2)
    for layer in model.layers:
        if isinstance(layer, keras.layers.LayerNormalization):
            layer.gamma.assign(1.0 + 0.1 * rng.standard_normal(layer.gamma.shape).astype(np.float32))
            layer.beta.assign(0.1 * rng.standard_normal(layer.beta.shape).astype(np.float32))


def export_variant(name, spec, tokens, calibration, probes, work, mlp_ratio) -> dict:
    split_heads, quantize, float_ops, fold = spec
    keras.utils.set_random_seed(0)
    model = scaling.build_model("encoder", "sara", tokens, mlp_ratio)
    _randomise_layernorms(model)
    kwargs = {}
    if quantize == "int8":
        kwargs = dict(representative_data=calibration, int8_float_ops=float_ops)
    path = os.path.join(work, name.replace(" ", "_") + ".tflite")
    report = export_tflite(
        model, path, quantize=quantize, probe=probes, split_heads=split_heads, fold_layernorm=fold,
        tolerance=None if quantize in (None, "float16") else 1.0, benchmark_runs=0, **kwargs,
    )
    keras.backend.clear_session()
    return {
        "variant": name, "path": path, "file_bytes": report.size_bytes,
        "rel_error": report.relative_error, "max_abs_error": report.max_abs_error,
        "float_ops": dict(sorted(report.float_ops.items())),
        "ops": sum(report.op_histogram.values()),
    }


def run(cfg: dict) -> list:
    tokens = cfg["tokens"]
    rng = np.random.default_rng(tokens)
    shape = (cfg["calibration_examples"], tokens, scaling.WIDTH)
    calibration = rng.standard_normal(shape).astype(np.float32)
    probes = rng.standard_normal((cfg["probes"], tokens, scaling.WIDTH)).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((1, tokens, scaling.WIDTH)).astype(np.float32)
    rows = []
    with work_directory("keras_sara_int8_modes_") as work:
        exported = {}
        groups = [{n: VARIANTS[n] for n in cfg["variants"]}]
        if cfg["full_int8"]:
            groups.append(FULL_INT8)
        for group in groups:
            for name, spec in group.items():
                exported[name] = export_variant(name, spec, tokens, calibration, probes, work, cfg["mlp_ratio"])
                e = exported[name]
                log(f"exported {name}: {e['file_bytes'] / 1e6:.2f} MB, rel error {e['rel_error']:.1e}")
        for threads in cfg["threads"]:
            for group in groups:
                runners = {n: PolicyRunner(exported[n]["path"], num_threads=threads) for n in group}
                timing_cfg = dict(cfg["timing"])
                if group is FULL_INT8:
                    timing_cfg.update(min_runs=3, max_runs=10)
                rounds = []
                for i in range(cfg["rounds"]):
                    rounds.append(time_in_turn(runners, [x], timing_cfg))
                    if cfg["rounds"] > 1:
                        log(f"  threads={threads} round {i + 1}/{cfg['rounds']}: "
                            + ", ".join(f"{n} {t['p50_ms']:.1f} ms" for n, t in rounds[-1].items()))
                for name in group:
                    row = {k: v for k, v in exported[name].items() if k != "path"}
                    row.update(threads=threads, tokens=tokens, **combine_rounds([r[name] for r in rounds]))
                    rows.append(row)
                    log(f"  {name} threads={threads}: p50 {row['p50_ms']:.2f} ms, p90 {row['p90_ms']:.2f} ms")
                runners = None
    return rows


def combine_rounds(rounds: list) -> dict:
    """One row's timing from its rounds: the median of each percentile over the rounds, runs summed,
    and every round's p50 kept (`round_p50_ms`) for the spread of the ratios."""
    out = {key: float(np.median([r[key] for r in rounds])) for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms")}
    out["runs"] = int(sum(r["runs"] for r in rounds))
    out["round_p50_ms"] = [r["p50_ms"] for r in rounds]
    return out


def speedups(rows) -> dict:
    """p50 of `split float32` over each variant's p50 (medians over the rounds), per thread count."""
    out = {}
    for threads in sorted({r["threads"] for r in rows}):
        base = next(r["p50_ms"] for r in rows if r["threads"] == threads and r["variant"] == BASELINE)
        out[str(threads)] = {r["variant"]: base / r["p50_ms"] for r in rows if r["threads"] == threads}
    return out


def round_speedups(rows) -> dict:
    """Per thread count and variant: the speed-up over `split float32` in each round (the two timed in
    turn; full int8, timed in a group of its own, is left out)."""
    out = {}
    for threads in sorted({r["threads"] for r in rows}):
        base = next(r for r in rows if r["threads"] == threads and r["variant"] == BASELINE)["round_p50_ms"]
        out[str(threads)] = {
            r["variant"]: [b / v for b, v in zip(base, r["round_p50_ms"])]
            for r in rows if r["threads"] == threads and r["variant"] not in FULL_INT8
        }
    return out


def markdown(rows, cfg, ratios, per_round) -> str:
    threads = sorted({r["threads"] for r in rows})
    rounds = cfg["rounds"]
    spread = rounds > 1
    head = " | ".join(f"p50 ms {t}t | x vs split float32 {t}t" + (f" | x per round {t}t" if spread else "")
                      for t in threads)
    timing = (f"medians over {rounds} rounds of each round's p50, the spread is the lowest and highest "
              "per-round speed-up" if spread else "one round")
    lines = [
        f"SARA encoder (4 layers, width {scaling.WIDTH}, {scaling.NUM_HEADS} heads, MLP ratio "
        f"{cfg['mlp_ratio']}), {cfg['tokens']:,} tokens, batch 1, LiteRT (XNNPACK); variants of one "
        f"thread count timed in turn (full int8 in its own group; {timing}). Errors on "
        f"{cfg['probes']} held-out random-normal inputs (int8 calibrated on "
        f"{cfg['calibration_examples']} others).",
        "",
        f"| variant | {head} | relative error | max abs error | size MB | ops kept in float32 |",
        "|---|" + ("---:|---:|---:|" if spread else "---:|---:|") * len(threads) + "---:|---:|---:|---|",
    ]
    for name in list(cfg["variants"]) + (list(FULL_INT8) if cfg["full_int8"] else []):
        by_t = {r["threads"]: r for r in rows if r["variant"] == name}
        r = by_t[threads[0]]
        cells = []
        for t in threads:
            cells.append(f"{by_t[t]['p50_ms']:.1f} | {ratios[str(t)][name]:.2f}")
            if spread:
                x = per_round[str(t)].get(name)
                cells.append(f"{min(x):.2f}-{max(x):.2f}" if x else "-")
        float_ops = ", ".join(f"{k} {v}" for k, v in r["float_ops"].items()) or "-"
        if name.endswith(("float32", "float16", "dynamic")):
            float_ops = "(all; float16: weights only; dynamic: int8 weights)"
        lines.append(f"| {name} | {' | '.join(cells)} | {r['rel_error']:.1e} | {r['max_abs_error']:.1e} | "
                     f"{r['file_bytes'] / 1e6:.2f} | {float_ops} |")
    return "\n".join(lines)


def write_rounds_plot(path, rows, per_round, cfg) -> None:
    """Each round's speed-up over `split float32` against that round's float32 p50, one panel per
    thread count: on a shared machine the float32 time says how loaded the host was."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = sorted(per_round, key=int)
    fig, axes = plt.subplots(1, len(threads), figsize=(6 * len(threads), 4.2), squeeze=False)
    for ax, t in zip(axes[0], threads):
        base = next(r for r in rows if str(r["threads"]) == t and r["variant"] == BASELINE)["round_p50_ms"]
        for name, x in per_round[t].items():
            if name == BASELINE:
                continue
            ax.scatter(base, x, label=f"{name}: median {np.median(x):.2f}x, {min(x):.2f}-{max(x):.2f}x")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel(f"{BASELINE} p50 in the round (ms): higher = busier host")
        ax.set_ylabel(f"speed-up over {BASELINE} (p50)")
        ax.set_title(f"{t} thread{'s' if t != '1' else ''}, {len(base)} rounds")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"LiteRT SARA encoder, {cfg['tokens']:,} tokens, MLP ratio {cfg['mlp_ratio']}: "
                 "speed-up per round (variants timed in turn within a round)")
    fig.tight_layout()

    def write(tmp):
        fig.savefig(tmp, format="png", dpi=110)

    atomic_write(path, write)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, help=f"tokens (default {DEFAULT_TOKENS}; {QUICK_TOKENS} with --quick)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seconds", type=float, help="time budget per group and thread count (default 8; 1 with --quick)")
    p.add_argument("--calibration-examples", type=int, default=8)
    p.add_argument("--probes", type=int, default=4, help="held-out inputs for the errors (default 4)")
    p.add_argument("--no-full-int8", action="store_true", help="skip the (slow) full-integer variant")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), metavar="VARIANT",
                   help=f"variants to time (default all; {BASELINE!r} is always included): "
                        + ", ".join(repr(v) for v in VARIANTS))
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the timing this many times and report medians and the per-round spread (default 1)")
    p.add_argument("--mlp-ratio", type=int, default=scaling.MLP_RATIO,
                   help=f"encoder feed-forward hidden size / width (default {scaling.MLP_RATIO}, PCT-style)")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_TOKENS} tokens, short timing")
    p.add_argument("--out-dir", default=os.path.join(REPO_ROOT, "benchmarks", "results", "int8_modes"))
    args = p.parse_args(argv)
    check_args(p, args, lists=("threads",),
               counts=("tokens", "calibration_examples", "probes", "rounds", "mlp_ratio"),
               positive=("seconds",))
    return args


def main(argv=None):
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    seconds = args.seconds or (1.0 if args.quick else 8.0)
    cfg = {
        "tokens": args.tokens or (QUICK_TOKENS if args.quick else DEFAULT_TOKENS),
        "threads": sorted(set(args.threads)),
        "calibration_examples": args.calibration_examples,
        "probes": args.probes,
        "full_int8": not args.no_full_int8,
        "variants": [BASELINE] + [v for v in VARIANTS if v != BASELINE and (not args.variants or v in args.variants)],
        "rounds": args.rounds,
        "mlp_ratio": args.mlp_ratio,
        "timing": dict(target_seconds=seconds, min_runs=5, max_runs=400),
        "default_int8_float_ops": list(DEFAULT_INT8_FLOAT_OPS),
    }
    os.makedirs(args.out_dir, exist_ok=True)
    load_start = os.getloadavg()
    rows = run(cfg)
    ratios = speedups(rows)
    per_round = round_speedups(rows)
    table = markdown(rows, cfg, ratios, per_round)
    payload = {
        "rows": rows, "speedup_over_split_float32": ratios, "speedup_per_round": per_round, "config": cfg,
        "machine": machine_info(started, load_average_start=load_start[0], load_average_end=os.getloadavg()[0]),
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO_ROOT)] + sys.argv[1:]),
    }
    write_json(os.path.join(args.out_dir, "int8_modes.json"), payload)
    write_text(os.path.join(args.out_dir, "int8_modes.md"), table + "\n")
    if cfg["rounds"] > 1:
        write_rounds_plot(os.path.join(args.out_dir, "int8_rounds.png"), rows, per_round, cfg)
    print(table)
    print(f"Load average start/end: {load_start[0]:.2f} / {os.getloadavg()[0]:.2f}. Wrote {args.out_dir}")


if __name__ == "__main__":
    main()
