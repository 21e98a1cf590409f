"""Latency of the RT-2-style image policy against image size: H = 1 / H = 3, softmax vs SARA, LiteRT.

The network is the grasping image policy of `examples/grasping/image_policy.py`
(`build_image_policy`: per-frame keras-hub ViT, patch 8, 3 layers, width 64;
2-layer Transformer fuser over the pooled frame tokens, the instruction and
the gripper; vector actions), with random weights (`seed=0`): latency does
not depend on the values, so the sweep needs no training. An image of S
pixels gives (S / 8)^2 ViT tokens per frame and (S / 16)^2 pooled tokens per
frame in the fuser.

Variants at each image size:

- `teacher_h1`, `teacher_h3`: softmax everywhere, a history of 1 or 3 frames;
- `sara_h1`, `sara_h3`: `keras_sara.convert(teacher, layers=vit_attention)`,
  the ViT's attention only (the paper's RT-2 choice; what
  `examples/rt2_grasping.py` trains and evaluates at 64 px);
- `sara_h3_fuser`: the ViT's and the fuser's attention (`--convert vit+fuser`).

Each is exported with `keras_sara.export.export_tflite` (float32, builtin
ops only, verified against Keras on the timing input) and run by
`tflite.runner.PolicyRunner` (XNNPACK) at batch 1 with `--threads` threads;
the variants of one size take turns call by call after warm-up
(`tflite.benchmark.time_in_turn`), so load from other processes hits all
alike. The question the table answers is the paper's trade: from which
image size on does the SARA policy with a 3-frame history cost no more per
control step than the softmax policy with one frame (`sara_h3 / teacher_h1`
at or below 1)?

Writes `latency.csv`, `latency.json` (rows, derived ratios, config, machine,
command), `latency.md` and `latency.png` under `--out-dir`, each atomically,
and prints the markdown table.

Usage:
    python benchmarks/rt2_policy_latency.py --quick     # 64 and 128 px, about 2 minutes
    python benchmarks/rt2_policy_latency.py             # 64 .. 384 px, about 10 minutes
    python benchmarks/rt2_policy_latency.py --sizes 256 512 --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time

os.environ["KERAS_BACKEND"] = "tensorflow"  # export runs on TensorFlow
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (REPO_ROOT, os.path.join(REPO_ROOT, "examples", "grasping")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np  # noqa: E402
import keras  # noqa: E402

import keras_sara  # noqa: E402
from keras_sara.export import export_tflite  # noqa: E402
from benchmarks.pct_latency import write_text  # noqa: E402
from keras_sara.utils import atomic_write, work_directory  # noqa: E402
from tflite.benchmark import machine_info, time_in_turn, write_json  # noqa: E402
from tflite.runner import PolicyRunner  # noqa: E402

import image_policy  # noqa: E402  (examples/grasping)

VARIANTS = ("teacher_h1", "sara_h1", "teacher_h3", "sara_h3", "sara_h3_fuser")
DEFAULT_SIZES = (64, 128, 192, 256, 320, 384)
QUICK_SIZES = (64, 128)
TIMING = dict(target_seconds=3.0, min_runs=10, max_runs=300)
QUICK_TIMING = dict(target_seconds=0.3, min_runs=5, max_runs=30)
CSV_COLUMNS = ("image_size", "vit_tokens_per_frame", "fuser_tokens", "variant", "history", "converted",
               "softmax_ops", "file_mb", "rel_error", "p50_ms", "p90_ms", "p99_ms", "runs", "load_1m")


def log(msg: str) -> None:
    print(f"[rt2_policy_latency] {msg}", file=sys.stderr, flush=True)


def build_variants(image_size: int) -> dict:
    """The five policies of one image size: {name: (model, history, what is converted)}."""
    keras.utils.set_random_seed(0)
    out = {}
    for history in (1, 3):
        teacher = image_policy.build_image_policy(history, image_size=image_size, seed=0)
        out[f"teacher_h{history}"] = (teacher, history, "nothing")
        out[f"sara_h{history}"] = (keras_sara.convert(teacher, layers=image_policy.vit_attention)[0],
                                   history, "ViT")
    out["sara_h3_fuser"] = (keras_sara.convert(out["teacher_h3"][0], layers=image_policy.fuser_attention)[0],
                            3, "ViT + fuser")
    return out


def make_inputs(model: keras.Model, image_size: int, history: int, rng) -> list:
    """One control step's inputs, in `model.inputs` order (the .tflite file's order)."""
    images = rng.integers(0, 256, (1, history, image_size, image_size, 3), dtype=np.uint8)
    frame_mask = np.ones((1, history), bool)
    step = image_policy.image_inputs((images[0], frame_mask[0]), rng.uniform(-1, 1, 6).astype(np.float32))
    return [step[t.name] for t in model.inputs]


def measure_size(image_size: int, cfg: dict, work: str) -> list:
    rng = np.random.default_rng(image_size)
    variants = build_variants(image_size)
    runners, inputs, rows = {}, {}, {}
    for name, (model, history, converted) in variants.items():
        x = make_inputs(model, image_size, history, rng)
        path = os.path.join(work, f"{name}_{image_size}.tflite")
        start = time.perf_counter()
        report = export_tflite(model, path, probe=[x], benchmark_runs=0, num_threads=cfg["threads"])
        log(f"{image_size} px {name}: exported in {time.perf_counter() - start:.1f} s, "
            f"rel error {report.relative_error:.1e}")
        runners[name] = PolicyRunner(path, num_threads=cfg["threads"])
        inputs[name] = x
        grid = image_size // image_policy.VIT_CONFIG["patch_size"]
        rows[name] = {
            "image_size": image_size, "vit_tokens_per_frame": grid * grid,
            "fuser_tokens": history * (grid // 2) ** 2 + 2, "variant": name, "history": history,
            "converted": converted, "softmax_ops": int(report.op_histogram.get("SOFTMAX", 0)),
            "file_mb": report.size_bytes / 1e6, "rel_error": report.relative_error,
        }
    # time_in_turn feeds one input list to every runner; the histories differ, so wrap each runner.
    calls = {name: (lambda r=runners[name], x=inputs[name]: r(*x)) for name in runners}
    timing = time_in_turn(calls, [], cfg["timing"])
    load = os.getloadavg()[0]
    for name, row in rows.items():
        row.update(timing[name], load_1m=load)
        row.pop("mean_ms", None)
    keras.backend.clear_session()
    return list(rows.values())


def derive(rows) -> dict:
    """Per size, each variant's p50 over the H = 1 teacher's; the first size where sara_h3 costs no more."""
    by_size = {}
    for r in rows:
        by_size.setdefault(r["image_size"], {})[r["variant"]] = r["p50_ms"]
    ratios = {size: {k: v / t["teacher_h1"] for k, v in t.items()} for size, t in sorted(by_size.items())}
    vit_speedup = {s: t["teacher_h3"] / t["sara_h3"] for s, t in sorted(by_size.items())}
    out = {"over_teacher_h1": ratios, "sara_h3_speedup_over_teacher_h3": vit_speedup}
    for variant in ("sara_h3", "sara_h3_fuser"):
        cheap = [s for s, r in ratios.items() if r.get(variant, np.inf) <= 1.0]
        out[f"first_size_{variant}_le_teacher_h1"] = cheap[0] if cheap else None
    return out


def markdown(rows, cfg, derived) -> str:
    th = f"{cfg['threads']} thread{'s' if cfg['threads'] != 1 else ''}"
    lines = [
        f"**RT-2-style image policy, LiteRT p50 / p90 ms per control step** (batch 1, float32, {th}; "
        "random weights; ViT patch 8, 3 layers, width 64; 2-layer fuser; `sara` = ViT attention converted, "
        "`sara_h3_fuser` = ViT and fuser)", "",
        "| image | ViT tokens / frame | " + " | ".join(VARIANTS) + " | sara_h3 / teacher_h1 | "
        "sara_h3_fuser / teacher_h1 | teacher_h3 / sara_h3 |",
        "|---:|---:|" + "---:|" * (len(VARIANTS) + 3),
    ]
    for size in sorted({r["image_size"] for r in rows}):
        cell = {r["variant"]: r for r in rows if r["image_size"] == size}
        ratio = derived["over_teacher_h1"][size]
        lines.append(
            f"| {size} px | {cell['teacher_h1']['vit_tokens_per_frame']:,} | "
            + " | ".join(f"{cell[v]['p50_ms']:.2f} / {cell[v]['p90_ms']:.2f}" for v in VARIANTS)
            + f" | {ratio['sara_h3']:.2f}x | {ratio['sara_h3_fuser']:.2f}x | "
            f"{derived['sara_h3_speedup_over_teacher_h3'][size]:.2f}x |")
    lines.append("")
    for variant, what in (("sara_h3", "ViT converted"), ("sara_h3_fuser", "ViT and fuser converted")):
        first = derived[f"first_size_{variant}_le_teacher_h1"]
        lines.append(f"- The H = 3 SARA policy ({what}) costs no more per step than the H = 1 softmax teacher "
                     + (f"from {first} px on." if first else "at no size measured."))
    lines += ["", f"Load average (1 min) per size: " + ", ".join(
                  f"{r['image_size']} px {r['load_1m']:.2f}" for r in rows if r["variant"] == "teacher_h1")
              + f" on {os.cpu_count()} CPUs.", "", f"Command: `{cfg['command']}`"]
    return "\n".join(lines) + "\n"


def write_csv(path, rows):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(",".join(CSV_COLUMNS) + "\n")
            for r in rows:
                f.write(",".join(f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c]) for c in CSV_COLUMNS)
                        + "\n")

    atomic_write(path, write)


def write_plot(path, rows, cfg):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"teacher_h1": ("tab:blue", "--", "o"), "sara_h1": ("tab:blue", "-", "o"),
              "teacher_h3": ("tab:red", "--", "s"), "sara_h3": ("tab:red", "-", "s"),
              "sara_h3_fuser": ("tab:purple", "-", "^")}
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for v in VARIANTS:
        pts = sorted((r["vit_tokens_per_frame"], r["p50_ms"]) for r in rows if r["variant"] == v)
        color, style, marker = styles[v]
        ax.plot(*zip(*pts), linestyle=style, marker=marker, color=color, label=v)
    tokens = sorted({r["vit_tokens_per_frame"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    patch = image_policy.VIT_CONFIG["patch_size"]
    ax.set_xticks(tokens, [f"{t}\n({int(np.sqrt(t)) * patch} px)" for t in tokens])
    ax.minorticks_off()
    ax.set_xlabel("ViT tokens per frame (image size)")
    ax.set_ylabel("p50 latency per control step (ms)")
    ax.set_title(f"Image policy, LiteRT, batch 1, {cfg['threads']} thread{'s' if cfg['threads'] != 1 else ''}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", help=f"image sizes in pixels, multiples of 16 "
                   f"(default {' '.join(map(str, DEFAULT_SIZES))}; {' '.join(map(str, QUICK_SIZES))} with --quick)")
    p.add_argument("--threads", type=int, default=1, help="LiteRT interpreter threads (default 1)")
    p.add_argument("--quick", action="store_true", help="two small sizes and short timings (a smoke run)")
    p.add_argument("--out-dir", default=os.path.join(REPO_ROOT, "benchmarks", "results", "rt2_policy_latency"))
    args = p.parse_args(argv)
    args.sizes = args.sizes or list(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    for size in args.sizes:
        if size < 16 or size % 16:
            p.error(f"--sizes must be multiples of 16 of at least 16 (patch 8, pooled 2x2). Received: {size}")
    if args.threads < 1:
        p.error(f"--threads must be at least 1. Received: {args.threads}")
    return args


def main(argv=None):
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    cfg = {"sizes": sorted(args.sizes), "threads": args.threads, "timing": QUICK_TIMING if args.quick else TIMING,
           "command": shlex.join(["python", "benchmarks/rt2_policy_latency.py",
                                      *(sys.argv[1:] if argv is None else argv)])}
    image_policy.policy_layers()
    rows = []
    with work_directory("keras_sara_rt2_latency_") as work:
        for i, size in enumerate(cfg["sizes"], 1):
            log(f"[{i}/{len(cfg['sizes'])}] {size} px")
            rows += measure_size(size, cfg, work)
            done = {r["variant"]: r["p50_ms"] for r in rows if r["image_size"] == size}
            log(f"{size} px p50 ms: " + ", ".join(f"{k} {v:.2f}" for k, v in done.items()))
    derived = derive(rows)
    os.makedirs(args.out_dir, exist_ok=True)
    write_csv(os.path.join(args.out_dir, "latency.csv"), rows)
    write_json(os.path.join(args.out_dir, "latency.json"),
               {"rows": rows, "derived": {k: {str(s): v for s, v in d.items()} if isinstance(d, dict) else d
                                          for k, d in derived.items()},
                "config": cfg, "machine": machine_info(started)})
    text = markdown(rows, cfg, derived)
    write_text(os.path.join(args.out_dir, "latency.md"), text)
    write_plot(os.path.join(args.out_dir, "latency.png"), rows, cfg)
    print(text)


if __name__ == "__main__":
    main()
