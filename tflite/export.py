"""Export a saved Keras model (`.keras`) to a verified LiteRT file.

A thin command line over `keras_sara.export.export_tflite`: loads the model
with `compile=False` (importing keras_sara so SARA layers deserialise),
converts it with builtin ops only, checks the file against Keras on probe
inputs, writes it atomically if it passes, and prints the report.

Usage:
    python -m tflite.export model.keras out.tflite
    python -m tflite.export model.keras out.tflite --quantize int8 --calibration data.npz
    python -m tflite.export model.keras out.tflite --input-shape 1,4096,128 --no-verify

`--calibration` (and `--probe`) take a `.npz` file: one array of examples
`(N, *input_shape[1:])` for a single-input model, or one array per input in
the model's input order (the order `np.savez` stored them in). Exit status 2
for a bad argument (an unreadable `.keras` file included) or a model that
needs Flex ops, 1 when verification fails; nothing is written in either case.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# A .keras file is backend-independent and conversion needs TensorFlow: load
# it there directly rather than through export_tflite's subprocess.
os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

QUANTIZE_CHOICES = ("float32", "float16", "dynamic", "int8")


def parse_shape(text: str) -> tuple:
    try:
        shape = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--input-shape must be comma-separated integers such as 1,4096,128. Received: {text!r}"
        ) from None
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(
            f"--input-shape must have positive sizes. Received: {text!r}"
        )
    return shape


def load_npz(path: str, flag: str):
    """Arrays of a .npz file: one array, or a list in stored order."""
    import numpy as np

    if not os.path.isfile(path):
        raise SystemExit(f"error: {flag} must be an existing .npz file. Received: {path!r}")
    with np.load(path) as data:
        arrays = [data[k] for k in data.files]
    if not arrays:
        raise SystemExit(f"error: {flag} file {path!r} holds no arrays.")
    return arrays[0] if len(arrays) == 1 else arrays


def _write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tflite.export",
        description="Export a .keras model to a verified, builtins-only LiteRT (.tflite) file.",
    )
    p.add_argument("model", help="the saved Keras model (.keras)")
    p.add_argument("output", help="the .tflite file to write")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="float32")
    p.add_argument("--calibration", metavar="NPZ",
                   help="representative inputs for --quantize int8 (.npz)")
    p.add_argument("--probe", metavar="NPZ", help="verification inputs (.npz); default random")
    p.add_argument("--input-shape", type=parse_shape, action="append", metavar="1,T,D",
                   help="fixed input shape; repeat once per input (default: the model's, batch 1)")
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with Keras")
    p.add_argument("--tolerance", type=float, help="relative-error tolerance (default per mode)")
    p.add_argument("--allow-flex", action="store_true",
                   help="embed Flex (TF Select) ops instead of failing (needs --no-verify --runs 0)")
    p.add_argument("--int8-io", action="store_true", help="int8 inputs and outputs (with --quantize int8)")
    p.add_argument("--no-split-heads", action="store_true",
                   help="export SARA attention in the flat layout Keras runs (default: per-head)")
    p.add_argument("--no-fold-layernorm", action="store_true",
                   help="keep LayerNorm scale and shift in place (default: folded into the "
                        "projections that read them)")
    p.add_argument("--threads", type=int, default=2, help="interpreter threads (default 2)")
    p.add_argument("--runs", type=int, default=20, help="timed invocations (default 20; 0 skips)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isfile(args.model):
        print(f"error: model must be an existing .keras file. Received: {args.model!r}", file=sys.stderr)
        return 2

    import keras

    import keras_sara  # noqa: F401  (registers SARA layers for loading)
    from keras_sara.export import export_tflite

    try:
        model = keras.saving.load_model(args.model, compile=False)
    except Exception as err:  # Keras says "File not found" for a damaged archive that exists
        print(
            f"error: model {args.model!r} exists ({os.path.getsize(args.model)} bytes) but is not a "
            "readable .keras archive: the file may be truncated or damaged, or hold a layer "
            "class that is not importable here (register custom layers with "
            "keras.saving.register_keras_serializable and import their module). Keras said: "
            f"{type(err).__name__}: {err}",
            file=sys.stderr,
        )
        return 2
    input_shapes = None
    if args.input_shape:
        input_shapes = args.input_shape[0] if len(args.input_shape) == 1 else args.input_shape
    try:
        report = export_tflite(
            model,
            args.output,
            quantize=None if args.quantize == "float32" else args.quantize,
            representative_data=load_npz(args.calibration, "--calibration") if args.calibration else None,
            input_shapes=input_shapes,
            builtins_only=not args.allow_flex,
            verify=not args.no_verify,
            tolerance=args.tolerance,
            probe=load_npz(args.probe, "--probe") if args.probe else None,
            num_threads=args.threads,
            benchmark_runs=args.runs,
            int8_io=args.int8_io,
            split_heads=not args.no_split_heads,
            fold_layernorm=not args.no_fold_layernorm,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report)
    if args.json:
        from keras_sara.utils import atomic_write

        atomic_write(args.json, lambda tmp: _write_json(tmp, report.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
