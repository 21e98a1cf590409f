"""Verified LiteRT (TFLite) export of Keras models, from any backend.

    report = keras_sara.export.export_tflite(model, "policy.tflite")
    print(report)          # size, op histogram, Flex-free, error vs Keras, latency

What `export_tflite` does, in order:

1. checks every argument, the output path (its directory must exist and be
   writable) and the shape of the representative/probe data, before any
   conversion work, so a bad call fails fast and writes nothing;
2. converts the model at fixed input shapes (batch 1 unless told otherwise)
   with `tf.lite.TFLiteConverter.from_saved_model` on a SavedModel written by
   `keras.export.ExportArchive`, with builtin ops only by default: a model
   that would need a Flex (TF Select) op fails with the op named. (Keras'
   `model.export(format="litert")` always allows Flex, which the LiteRT
   runtime on a robot cannot run, and `from_concrete_functions` returned NaNs
   on this stack; see DESIGN.md section 3);
3. runs the flatbuffer in `ai_edge_litert`'s interpreter on probe inputs and
   compares it with the Keras model: the file is written (atomically: a
   temporary file in the same directory, then `os.replace`) only if the
   relative error is within tolerance;
4. times `benchmark_runs` invocations at the exported shape and returns an
   `ExportReport`.

Models on the JAX or PyTorch backend are saved to a temporary `.keras` file and
converted by a TensorFlow-backend subprocess (`compile=False`); the Keras
reference outputs are still computed here, on the backend the model was
trained on, so verification compares the file with the model the user has.

TensorFlow is imported only inside the functions that convert, so importing
this module (or `keras_sara`) on JAX or PyTorch never loads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import os
import re
import subprocess
import sys
import time
from typing import Iterable, Optional, Sequence

import keras
import numpy as np

from keras_sara.folding import fold_layernorm as fold_layernorm_affine
from keras_sara.layers.sara_multi_head_attention import split_heads_layout
from keras_sara.utils import atomic_write, temporary_name, work_directory

QUANTIZE_MODES = (None, "float16", "dynamic", "int8")

# Default verification tolerances on the relative error
# ||litert - keras|| / ||keras|| over all probe outputs.
# - float32: the same graph in the same precision; only summation order
#   differs (measured about 2e-7 on small encoders).
# - float16: weights rounded to 11 significant bits, computed in float32
#   (measured about 2e-4 on small encoders, 4e-4 on 4-layer 128-wide).
# - dynamic / int8: quantisation noise depends on the model and, for int8, on
#   the calibration data, so these defaults do not judge accuracy (report it
#   in action space on held-out data for that). They catch broken
#   conversions: an output unrelated to the reference has a relative error
#   near 1 or above, a saturated or badly calibrated one well above 0.3.
DEFAULT_TOLERANCES = {None: 1e-4, "float16": 1e-2, "dynamic": 0.2, "int8": 0.3}
# Ops that `quantize="int8"` keeps in float by default: everything on this CPU
# whose int8 kernel is slower than float or whose int8 form only adds
# QUANTIZE/DEQUANTIZE glue; the matmuls with constant weights
# (FULLY_CONNECTED: projections, MLPs) go int8. Measured on the 2-core machine
# (4-layer 128-wide SARA encoder, 4,096 tokens, per-head layout, LiteRT p50,
# 1 / 2 threads, timed in turn): float32 64 / 39 ms; full int8 several times
# slower than float32 (int8 BATCH_MATMUL, the attention core's
# activation-by-activation products, is the slow kernel: 318 ms vs 69 ms with
# it in float, 1 thread, flat layout); LayerNorm's statistics and GELU are
# slow in int8 too; with MUL, ADD and MAXIMUM also int8 (the previous default)
# 44 / 29 ms; with them in float 45 / 26 ms, fewer glue ops and a lower error
# (relative 3.5e-2 vs 4.7e-2 on random-normal probes).
DEFAULT_INT8_FLOAT_OPS = (
    "BATCH_MATMUL", "DIV", "SUM", "MEAN", "SQUARED_DIFFERENCE", "RSQRT", "NEG", "GELU",
    "MUL", "ADD", "MAXIMUM",
)

# Quantise/dequantise glue: a failed int8 export's diagnosis does not try keeping
# it in float (every other op can matter, layout ops included: an int8 RESHAPE
# or PAD after a float op quantises that op's output).
_INT8_GLUE_OPS = frozenset({"QUANTIZE", "DEQUANTIZE"})

# Random normal probes used when neither `probe` nor representative data is given.
DEFAULT_NUM_PROBES = 2
# With representative data and no `probe`, verify on at most this many of its batches.
MAX_REPRESENTATIVE_PROBES = 4
WARMUP_RUNS = 2  # the first invocations pack weights for XNNPACK
SIGNATURE_KEY = "serve"

_WORKER_RESULT = "result.json"


# --------------------------------------------------------------------- report


@dataclasses.dataclass
class ExportReport:
    """What `export_tflite` wrote and how the file compares with Keras.

    Attributes:
        path: the written `.tflite` file (absolute).
        quantize: None (float32), "float16", "dynamic" or "int8".
        size_bytes: file size.
        op_histogram: number of operators per op name in the flatbuffer
            (builtin names such as `FULLY_CONNECTED`; custom and Flex ops by
            their custom code, e.g. `FlexMatrixInverse`).
        flex_ops: names of Flex (TF Select) and other custom ops; empty when
            the file runs on the builtin LiteRT runtime alone.
        float_ops: for int8 files, operators that stayed in float32 (their
            output is float32; `DEQUANTIZE` excluded), per op name. Empty for
            the other modes (dynamic-range ops take and give float32 by
            design, with int8 weights inside).
        input_names, input_shapes, input_dtypes: the file's inputs, in the
            model's input order (signature names `input_0`, `input_1`, ...).
        output_names, output_shapes, output_dtypes: its outputs, in the order
            of `keras.tree.flatten(model outputs)` (`output_0`, ...).
        verified: whether the outputs were compared with Keras.
        max_abs_error, mean_abs_error, relative_error: against the Keras
            model over all probe outputs (None when not verified).
            `relative_error = ||litert - keras|| / ||keras||`.
        tolerance: the relative-error tolerance that was applied.
        num_probes: number of probe batches compared.
        latency_p50_ms, latency_p90_ms: over `benchmark_runs` invocations
            (None when `benchmark_runs=0`).
        benchmark_runs, num_threads: how latency was measured.
        source_backend: the Keras backend the model came from.
        folded_layernorms: LayerNormalization layers whose scale and shift
            were folded into the projections that read them before
            conversion (`fold_layernorm=True`; see `keras_sara.folding`).
    """

    path: str
    quantize: Optional[str]
    size_bytes: int
    op_histogram: dict
    flex_ops: list
    float_ops: dict
    input_names: list
    input_shapes: list
    input_dtypes: list
    output_names: list
    output_shapes: list
    output_dtypes: list
    verified: bool = False
    max_abs_error: Optional[float] = None
    mean_abs_error: Optional[float] = None
    relative_error: Optional[float] = None
    tolerance: Optional[float] = None
    num_probes: int = 0
    latency_p50_ms: Optional[float] = None
    latency_p90_ms: Optional[float] = None
    benchmark_runs: int = 0
    num_threads: int = 1
    source_backend: str = "tensorflow"
    folded_layernorms: list = dataclasses.field(default_factory=list)

    @property
    def flex_free(self) -> bool:
        """True when the file needs no Flex or custom op (builtin runtime only)."""
        return not self.flex_ops

    def to_dict(self) -> dict:
        """The report as plain Python data (JSON-serialisable)."""
        out = dataclasses.asdict(self)
        out["flex_free"] = self.flex_free
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "ExportReport":
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields}
        for key in ("input_shapes", "output_shapes"):
            kwargs[key] = [tuple(s) for s in kwargs[key]]
        return cls(**kwargs)

    def __str__(self) -> str:
        def io_rows(names, shapes, dtypes):
            return ", ".join(f"{n} {tuple(s)} {d}" for n, s, d in zip(names, shapes, dtypes))

        size = f"{self.size_bytes / 1e6:.2f} MB ({self.size_bytes:,} bytes)"
        if self.verified:
            verdict = (
                f"passed: relative error {self.relative_error:.2e} <= {self.tolerance:.0e}; "
                f"max abs {self.max_abs_error:.2e}, mean abs {self.mean_abs_error:.2e} "
                f"({self.num_probes} probe batch{'es' if self.num_probes != 1 else ''})"
            )
        else:
            verdict = "not verified (verify=False)"
        if self.latency_p50_ms is None:
            latency = "not measured (benchmark_runs=0)"
        else:
            latency = (
                f"p50 {self.latency_p50_ms:.2f} ms, p90 {self.latency_p90_ms:.2f} ms "
                f"({self.benchmark_runs} runs, {self.num_threads} thread"
                f"{'s' if self.num_threads != 1 else ''})"
            )
        rows = [
            ("file", self.path),
            ("quantize", self.quantize or "none (float32)"),
            ("size", size),
            ("inputs", io_rows(self.input_names, self.input_shapes, self.input_dtypes)),
            ("outputs", io_rows(self.output_names, self.output_shapes, self.output_dtypes)),
            ("flex ops", ", ".join(self.flex_ops) if self.flex_ops else "none (builtin ops only)"),
            ("vs keras", verdict),
            ("latency", latency),
            ("from backend", self.source_backend),
            ("layernorm fold", f"{len(self.folded_layernorms)} folded into their projections"
             if self.folded_layernorms else "none"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = ["LiteRT export report"] + [f"  {k:<{width}}  {v}" for k, v in rows]
        total = sum(self.op_histogram.values())
        lines += ["", f"  ops ({total} operators)"]
        lines += _histogram_lines(self.op_histogram, self.float_ops if self.quantize == "int8" else None)
        return "\n".join(lines)


def _histogram_lines(histogram: dict, float_ops: Optional[dict]) -> list:
    items = sorted(histogram.items(), key=lambda kv: (-kv[1], kv[0]))
    if not items:
        return []
    width = max(len(k) for k, _ in items)
    lines = []
    for name, count in items:
        line = f"    {name:<{width}}  {count:>4}"
        if float_ops is not None and float_ops.get(name):
            line += f"   ({float_ops[name]} in float32)"
        lines.append(line)
    return lines


# -------------------------------------------------------------- validation


def _check_quantize(quantize) -> Optional[str]:
    if quantize == "float32":
        return None
    if quantize not in QUANTIZE_MODES:
        raise ValueError(
            f"`quantize` must be one of {QUANTIZE_MODES} (None or 'float32' for float32). "
            f"Received: quantize={quantize!r}"
        )
    return quantize


def _check_positive_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}. Received: {name}={value!r}")
    return int(value)


def _check_tolerance(tolerance) -> Optional[float]:
    if tolerance is None:
        return None
    if (
        isinstance(tolerance, bool)
        or not isinstance(tolerance, (int, float, np.floating))
        or not np.isfinite(tolerance)
        or tolerance <= 0
    ):
        raise ValueError(
            "`tolerance` must be a positive float (a relative error) or None for the "
            f"default of the quantize mode. Received: tolerance={tolerance!r}"
        )
    return float(tolerance)


def _check_path(path) -> str:
    """Absolute output path, after proving its directory accepts a new file."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(
            f"`path` must be a file path (str or os.PathLike). Received: path={path!r}"
        )
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise ValueError(
            "`path` must name a file, not a directory: add a file name such as "
            f"'policy.tflite'. Received: path={path!r}"
        )
    directory = os.path.dirname(path)
    parent = directory
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent) if os.path.dirname(parent) != parent else ""
    if parent and not os.path.isdir(parent):
        raise ValueError(
            f"`path` must be in a directory, but {parent!r} is a file. "
            f"Received: path={path!r}"
        )
    if not os.path.isdir(directory):
        raise ValueError(
            f"`path` must be in an existing directory; create {directory!r} first. "
            f"Received: path={path!r}"
        )
    try:
        probe = temporary_name(path)  # removed by the next write if this process dies here
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as err:
        raise ValueError(
            f"`path` must be in a writable directory; {directory!r} is not writable "
            f"({err.strerror}). Choose another directory or fix its permissions. "
            f"Received: path={path!r}"
        ) from err
    return path


def _model_inputs(model) -> Optional[list]:
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    return list(inputs) if inputs else None


def _resolve_input_specs(model, input_shapes) -> tuple:
    """(names, shapes, dtypes) of the exported inputs: fixed shapes, batch 1 by default."""
    model_inputs = _model_inputs(model)
    if input_shapes is None:
        if model_inputs is None:
            raise ValueError(
                f"`input_shapes` must be given for model '{model.name}': it is not a "
                "Functional or Sequential model, so its input shapes are unknown. Pass "
                "e.g. input_shapes=(1, 1024, 128), or a list of shapes for several inputs. "
                "Received: input_shapes=None"
            )
        shapes = [tuple(t.shape) for t in model_inputs]
        given = False
    else:
        if isinstance(input_shapes, (tuple, list)) and input_shapes and all(
            d is None or isinstance(d, (int, np.integer)) for d in input_shapes
        ):
            shapes = [tuple(input_shapes)]
        elif isinstance(input_shapes, (tuple, list)) and input_shapes and all(
            isinstance(s, (tuple, list)) for s in input_shapes
        ):
            shapes = [tuple(s) for s in input_shapes]
        else:
            raise ValueError(
                "`input_shapes` must be one shape (a tuple of ints, e.g. (1, 1024, 128)) "
                f"or a list of shapes, one per model input. Received: input_shapes={input_shapes!r}"
            )
        given = True
        if model_inputs is not None and len(shapes) != len(model_inputs):
            raise ValueError(
                f"`input_shapes` must hold one shape per model input: model '{model.name}' "
                f"has {len(model_inputs)} input(s). Received: input_shapes={input_shapes!r}"
            )
        if model_inputs is not None:
            for i, (shape, t) in enumerate(zip(shapes, model_inputs)):
                if len(shape) != len(t.shape):
                    raise ValueError(
                        f"`input_shapes` must match the rank of each model input: input {i} "
                        f"has shape {tuple(t.shape)}. Received: input_shapes={input_shapes!r}"
                    )
                fixed_axes = [j for j, d in enumerate(t.shape) if d is not None]
                if any(shape[j] != t.shape[j] for j in fixed_axes if shape[j] is not None):
                    raise ValueError(
                        f"`input_shapes` must keep the axes that model '{model.name}' fixes: "
                        f"input {i} has shape {tuple(t.shape)}. To export at another length, "
                        "build the model with that axis as None (e.g. keras.Input(shape=(None, "
                        "128)); SARA layers take any length) and copy the weights over. "
                        f"Received: input_shapes={input_shapes!r}"
                    )
    fixed = []
    for i, shape in enumerate(shapes):
        shape = tuple(1 if (j == 0 and d is None) else d for j, d in enumerate(shape))
        if any(d is None or int(d) < 1 for d in shape):
            what = "Received: input_shapes=" + repr(input_shapes) if given else (
                "Received: input_shapes=None"
            )
            raise ValueError(
                f"`input_shapes` must fix every axis but the batch axis (LiteRT verifies and "
                f"benchmarks one shape): input {i} of model '{model.name}' has shape "
                f"{shapes[i]}. Pass e.g. input_shapes={tuple(1 if d is None else d for d in shape)} "
                f"with the sizes the robot will feed. {what}"
            )
        fixed.append(tuple(int(d) for d in shape))
    if model_inputs is not None:
        dtypes = [keras.backend.standardize_dtype(t.dtype) for t in model_inputs]
        names = [getattr(t, "name", None) or f"input_{i}" for i, t in enumerate(model_inputs)]
    else:
        dtypes = ["float32"] * len(fixed)
        names = [f"input_{i}" for i in range(len(fixed))]
    return names, fixed, dtypes


def _is_array(x) -> bool:
    return isinstance(x, np.ndarray) or (
        hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (list, tuple, dict))
    )


def _as_numpy(x, name: str, dtype: str) -> np.ndarray:
    try:
        arr = np.asarray(keras.ops.convert_to_numpy(x) if not isinstance(x, np.ndarray) else x)
    except Exception as err:  # anything that is not array-like
        raise ValueError(
            f"`{name}` must hold numeric arrays. Received: an item of type {type(x).__name__}"
        ) from err
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"`{name}` must hold numeric arrays. Received: dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        # checked first: a NaN probe would read as a parity failure, a NaN calibration as a bad range
        bad = int(np.sum(~np.isfinite(arr)))
        raise ValueError(
            f"`{name}` must hold finite values: {bad} of its {arr.size} values are NaN or "
            f"infinite. Received: {name} with an array of shape {arr.shape}"
        )
    return arr.astype(dtype, copy=False)


def _by_input_name(data: dict, name: str, input_names: list, where: str = "") -> list:
    """A dict keyed by the model's input names, as a list in input order."""
    keys = list(data)
    missing = [n for n in input_names if n not in data]
    extra = [k for k in keys if k not in input_names]
    if missing or extra:
        problems = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
        raise ValueError(
            f"`{name}` keys must be the model's input names {input_names}{where}. "
            f"Received: keys {keys} ({', '.join(problems)})"
        )
    return [data[n] for n in input_names]


def _batches(data, name: str, shapes: list, dtypes: list, input_names: list) -> list:
    """Normalise example data into a list of batches, each a list of arrays of the exported shapes.

    Accepted forms (N examples, exported shapes with batch size B):
    - one array of shape (N, *shape[1:]) for a single-input model;
    - a list/tuple with one such array per input (same N), or a dict of
      them keyed by the model's input names;
    - any other iterable of batches, each an array (or a list/tuple of
      arrays, one per input, or a dict keyed by input name) of exactly the
      exported shape(s).
    Arrays of examples are cut into N // B batches of B consecutive examples.
    """
    n_inputs = len(shapes)
    if isinstance(data, dict):
        data = _by_input_name(data, name, input_names)
    example_shapes = [s[1:] for s in shapes]
    batch = shapes[0][0]

    def examples_form(arrays):
        arrays = [_as_numpy(a, name, d) for a, d in zip(arrays, dtypes)]
        for i, (a, ex) in enumerate(zip(arrays, example_shapes)):
            if a.ndim != len(ex) + 1 or tuple(a.shape[1:]) != ex:
                where = f" for input {i}" if n_inputs > 1 else ""
                raise ValueError(
                    f"`{name}` must hold examples of shape {ex}{where} (the exported input "
                    f"shape {shapes[i]} without its batch axis), stacked on a first axis of "
                    f"examples, e.g. an array of shape (N, {', '.join(map(str, ex))}). "
                    f"Received: {name} of shape {tuple(a.shape)}"
                )
        counts = {a.shape[0] for a in arrays}
        if len(counts) != 1:
            raise ValueError(
                f"`{name}` must have the same number of examples for every input. "
                f"Received: {name} with {[a.shape[0] for a in arrays]} examples"
            )
        count = counts.pop()
        if count < batch:
            raise ValueError(
                f"`{name}` must hold at least one batch of {batch} example(s) (the exported "
                f"batch size). Received: {name} with {count} example(s)"
            )
        return [
            [a[i * batch : (i + 1) * batch] for a in arrays] for i in range(count // batch)
        ]

    if _is_array(data):
        if n_inputs != 1:
            raise ValueError(
                f"`{name}` must be a list of {n_inputs} arrays (one per model input) or an "
                f"iterable of batches for this {n_inputs}-input model. "
                f"Received: {name}=one array of shape {tuple(np.shape(data))}"
            )
        return examples_form([data])
    if isinstance(data, (list, tuple)) and len(data) == n_inputs and all(
        _is_array(a) and np.ndim(a) == len(ex) + 1 for a, ex in zip(data, example_shapes)
    ):
        return examples_form(list(data))
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise ValueError(
            f"`{name}` must be an array of examples, a list of arrays (one per input), a dict of "
            f"arrays keyed by input name or an iterable of batches. Received: {name} of type "
            f"{type(data).__name__}"
        )
    out = []
    for step, item in enumerate(data):
        if isinstance(item, dict):
            item = _by_input_name(item, name, input_names, where=f" (batch {step})")
        arrays = [item] if _is_array(item) else list(item) if isinstance(item, (list, tuple)) else None
        if arrays is None or len(arrays) != n_inputs:
            raise ValueError(
                f"`{name}` batches must each be {'an array' if n_inputs == 1 else f'a list of {n_inputs} arrays'} "
                f"of the exported shape(s) {shapes}. Received: batch {step} of type {type(item).__name__}"
                + (f" with {len(arrays)} array(s)" if arrays is not None else "")
            )
        arrays = [_as_numpy(a, name, d) for a, d in zip(arrays, dtypes)]
        for i, (a, s) in enumerate(zip(arrays, shapes)):
            if tuple(a.shape) != s:
                raise ValueError(
                    f"`{name}` batches must have the exported shape {s}"
                    f"{f' for input {i}' if n_inputs > 1 else ''}. Received: batch {step} of "
                    f"shape {tuple(a.shape)}"
                )
        out.append(arrays)
    if not out:
        raise ValueError(f"`{name}` must hold at least one batch. Received: an empty {name}")
    return out


def _random_probes(shapes: list, dtypes: list, count: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    probes = []
    for _ in range(count):
        batch = []
        for shape, dtype in zip(shapes, dtypes):
            if np.dtype(dtype).kind == "f":
                batch.append(rng.standard_normal(shape).astype(dtype))
            elif np.dtype(dtype).kind == "b":
                batch.append(rng.integers(0, 2, shape).astype(bool))
            else:  # index inputs: small ids, valid for any vocabulary
                batch.append(rng.integers(0, 2, shape).astype(dtype))
        probes.append(batch)
    return probes


def _keras_outputs(model, batches: list, structure) -> list:
    """Flattened Keras outputs (float64 numpy) for each batch."""
    outs = []
    for arrays in batches:
        inputs = _pack(structure, arrays)
        y = model(inputs, training=False)
        outs.append([np.asarray(keras.ops.convert_to_numpy(t)) for t in keras.tree.flatten(y)])
    return outs


def _input_structure(model, n_inputs: int):
    struct = getattr(model, "_inputs_struct", None)
    if struct is not None and len(keras.tree.flatten(struct)) == n_inputs:
        return struct
    return None


def _pack(structure, arrays: list):
    if structure is not None:
        return keras.tree.pack_sequence_as(structure, list(arrays))
    return arrays[0] if len(arrays) == 1 else list(arrays)


# -------------------------------------------------------------- public API


def export_tflite(
    model,
    path,
    quantize: Optional[str] = None,
    representative_data=None,
    input_shapes=None,
    builtins_only: bool = True,
    verify: bool = True,
    tolerance: Optional[float] = None,
    probe=None,
    num_threads: int = 2,
    benchmark_runs: int = 20,
    int8_io: bool = False,
    int8_float_ops: Optional[Sequence[str]] = None,
    split_heads: bool = True,
    fold_layernorm: bool = True,
) -> ExportReport:
    """Convert a Keras model to a verified LiteRT (`.tflite`) file.

    Args:
        model: a built `keras.Model` on any backend. Functional and
            Sequential models give their input shapes; subclassed models need
            `input_shapes`.
        path: the `.tflite` file to write. Its directory must exist and be
            writable; the file appears only once verification has passed.
        quantize: None (float32), `"float16"` (float16 weights, float32
            compute), `"dynamic"` (int8 weights, activations quantised on the
            fly) or `"int8"` (full-integer where the ops allow, float fallback
            for the rest; needs `representative_data`).
        representative_data: example inputs for int8 calibration: an array
            of shape `(N, *input_shape[1:])` (first axis = examples), a list
            of such arrays for a multi-input model or a dict of them keyed
            by the model's input names, or an iterable of batches of the
            exported shape. Calibrate on realistic inputs: the ranges
            seen here are the ranges the file can represent. Without `probe`,
            its first batches are also the verification probes (in-sample:
            pass held-out `probe` data for an out-of-sample figure).
        input_shapes: fixed shapes to export at, e.g. `(1, 4096, 128)`, or a
            list of shapes for several inputs. Default: the model's own input
            shapes with a batch of 1; every other axis must be known.
        builtins_only: allow builtin LiteRT ops only (default). A model that
            needs a Flex (TF Select) op raises with the op named. False embeds
            Flex ops; such a file needs the Flex delegate at run time, which
            `ai_edge_litert`'s Python runtime lacks, so it cannot be verified
            here (pass `verify=False`).
        verify: run the converted model in `ai_edge_litert` on the probes and
            compare it with Keras before writing (default True).
        tolerance: maximum relative error `||litert - keras|| / ||keras||`.
            None: `DEFAULT_TOLERANCES[quantize]` (1e-4 float32, 1e-2
            float16, 0.2 dynamic, 0.3 int8; the quantised defaults catch
            broken conversions, they do not judge accuracy).
        probe: verification inputs, in any form `representative_data`
            accepts. Default: the first batches of `representative_data` if
            given, else two batches of standard normal noise (small integer
            ids for integer inputs: pass `probe` for token-id models).
        num_threads: interpreter threads for verification and latency.
        benchmark_runs: timed invocations at the exported shape (0: skip).
        int8_io: with `quantize="int8"`, make the file's inputs and outputs
            int8 too (scale and zero point in the tensor details; the
            `tflite/runner.py` runner applies them). Default: float32
            inputs and outputs with the quantisation inside.
        int8_float_ops: with `quantize="int8"`, LiteRT op names kept in
            float32 (selective quantisation). None: `DEFAULT_INT8_FLOAT_OPS`,
            the attention core (`BATCH_MATMUL`, `DIV`, `SUM`), LayerNorm,
            GELU and the elementwise `MUL`/`ADD`/`MAXIMUM`, whose int8 kernels
            are slower than float here or only add quantise/dequantise glue;
            the projections and MLPs (`FULLY_CONNECTED`) go int8. `()`:
            full integer wherever the converter can (the default with
            `int8_io=True`).
        split_heads: trace `SARAMultiHeadAttention` layers in their per-head
            layout (`keras_sara.layers.split_heads_layout`): fewer flops in
            the attention core and an int8-friendly output projection; same
            outputs up to float32 rounding. False keeps the layout Keras
            runs (one flat `K^T V` product with the output projection folded
            in), for comparison.
        fold_layernorm: convert a copy of the model in which each
            LayerNormalization read only by Dense or attention projections
            computes the plain normalisation and those projections carry its
            scale and shift (`keras_sara.folding.fold_layernorm`): three
            fewer full-size elementwise passes per LayerNorm, same outputs up
            to float32 rounding; verification still compares with `model`
            itself. The report lists what was folded. False converts the
            model as it is.

    Returns:
        An `ExportReport`.

    Raises:
        ValueError: a bad argument, representative data of the wrong shape,
            an unwritable path, or a model that needs Flex ops while
            `builtins_only=True`. Nothing is written.
        RuntimeError: verification failed (the figures are in the message),
            or the TensorFlow-backend conversion process failed. Nothing is
            written.

    Example:

    >>> report = export_tflite(model, "policy.tflite")            # doctest: +SKIP
    >>> report = export_tflite(model, "policy_int8.tflite", quantize="int8",
    ...                        representative_data=x_calib)        # doctest: +SKIP
    >>> print(report)                                              # doctest: +SKIP
    """
    quantize = _check_quantize(quantize)
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"`model` must be a keras.Model. Received: model of type {type(model).__name__}"
        )
    for name, value in (("builtins_only", builtins_only), ("verify", verify), ("int8_io", int8_io),
                        ("split_heads", split_heads), ("fold_layernorm", fold_layernorm)):
        if not isinstance(value, bool):
            raise ValueError(f"`{name}` must be True or False. Received: {name}={value!r}")
    if int8_io and quantize != "int8":
        raise ValueError(
            "`int8_io=True` needs quantize='int8' (only a full-integer model has int8 "
            f"inputs and outputs). Received: int8_io=True, quantize={quantize!r}"
        )
    if int8_float_ops is None:  # an int8 interface needs the full-integer conversion
        int8_float_ops = DEFAULT_INT8_FLOAT_OPS if quantize == "int8" and not int8_io else ()
    if isinstance(int8_float_ops, str) or not all(isinstance(o, str) and o.isupper() for o in int8_float_ops):
        raise ValueError(
            "`int8_float_ops` must be a list of LiteRT op names such as ['BATCH_MATMUL', 'DIV'] "
            f"(or () for full integer). Received: int8_float_ops={int8_float_ops!r}"
        )
    if int8_float_ops and int8_io:
        raise ValueError(
            "`int8_io=True` needs the full-integer conversion: pass int8_float_ops=() (or "
            f"leave it None). Received: int8_float_ops={list(int8_float_ops)!r}"
        )
    if int8_float_ops and quantize != "int8":
        raise ValueError(
            "`int8_float_ops` applies to quantize='int8' only. "
            f"Received: int8_float_ops={list(int8_float_ops)!r}, quantize={quantize!r}"
        )
    num_threads = _check_positive_int("num_threads", num_threads, 1)
    benchmark_runs = _check_positive_int("benchmark_runs", benchmark_runs, 0)
    tolerance = _check_tolerance(tolerance)
    if tolerance is None:
        tolerance = DEFAULT_TOLERANCES[quantize]
    if quantize == "int8" and representative_data is None:
        raise ValueError(
            "`representative_data` must be given for quantize='int8': full-integer "
            "quantisation calibrates activation ranges on example inputs. Pass a few "
            "hundred realistic inputs, e.g. an array of shape (N, *input_shape[1:]), or "
            "use quantize='dynamic' (no calibration). Received: representative_data=None"
        )
    path = _check_path(path)
    if not model.built:
        raise ValueError(
            f"`model` must be built (called once, or given an Input) before export. "
            f"Received: model '{model.name}' with built=False"
        )
    names, shapes, dtypes = _resolve_input_specs(model, input_shapes)
    representative = None
    if representative_data is not None:
        representative = _batches(representative_data, "representative_data", shapes, dtypes, names)
    if not verify:
        probes = []
    elif probe is not None:
        probes = _batches(probe, "probe", shapes, dtypes, names)
    elif representative is not None:
        probes = representative[:MAX_REPRESENTATIVE_PROBES]
    else:
        probes = _random_probes(shapes, dtypes, DEFAULT_NUM_PROBES)

    settings = dict(
        quantize=quantize,
        builtins_only=builtins_only,
        verify=verify,
        tolerance=tolerance,
        num_threads=num_threads,
        benchmark_runs=benchmark_runs,
        int8_io=int8_io,
        int8_float_ops=list(int8_float_ops),
        split_heads=split_heads,
        fold_layernorm=fold_layernorm,
        input_shapes=[list(s) for s in shapes],
        input_dtypes=dtypes,
        input_names=names,
        source_backend=keras.backend.backend(),
    )
    structure = _input_structure(model, len(shapes))
    references = _keras_outputs(model, probes, structure) if verify else []
    if keras.backend.backend() == "tensorflow":
        return _export_tensorflow(model, path, settings, probes, references, representative)
    return _export_in_subprocess(model, path, settings, probes, references, representative)


# ------------------------------------------------------ TensorFlow conversion


def _convert(
    model, shapes: list, dtypes: list, quantize, representative, builtins_only, int8_io,
    int8_float_ops=(), split_heads=True,
) -> bytes:
    """The flatbuffer of `model` at fixed shapes (TensorFlow backend only)."""
    import tensorflow as tf

    structure = _input_structure(model, len(shapes))
    specs = [
        tf.TensorSpec(shape, tf.as_dtype(dtype), name=f"input_{i}")
        for i, (shape, dtype) in enumerate(zip(shapes, dtypes))
    ]

    def serve(*args):
        outputs = model(_pack(structure, list(args)), training=False)
        return {f"output_{i}": t for i, t in enumerate(keras.tree.flatten(outputs))}

    with work_directory("keras_sara_export_") as saved_model:
        layout = split_heads_layout() if split_heads else contextlib.nullcontext()
        with layout:  # SARA layers in their fastest LiteRT layout
            archive = keras.export.ExportArchive()
            archive.track(model)
            archive.add_endpoint(SIGNATURE_KEY, serve, specs)
            archive.write_out(saved_model, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(
            saved_model, signature_keys=[SIGNATURE_KEY]
        )
        ops_sets = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantize == "int8":
            ops_sets = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8] + ops_sets
        if not builtins_only:
            ops_sets.append(tf.lite.OpsSet.SELECT_TF_OPS)
        converter.target_spec.supported_ops = ops_sets
        if quantize is not None:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if quantize == "int8":
            def dataset():
                # By signature name: a positional list is matched to the file's
                # internal input order, which differs from the signature's.
                for arrays in representative:
                    yield {f"input_{i}": a for i, a in enumerate(arrays)}

            converter.representative_dataset = dataset
            if int8_io:
                converter.inference_input_type = tf.int8
                converter.inference_output_type = tf.int8
        try:
            if quantize == "int8" and int8_float_ops:
                # Selective quantisation: these ops keep float kernels, the rest
                # (the FULLY_CONNECTED projections and MLPs above all) go int8.
                debugger = tf.lite.experimental.QuantizationDebugger(
                    converter=converter,
                    debug_dataset=dataset,
                    debug_options=tf.lite.experimental.QuantizationDebugOptions(
                        denylisted_ops=list(int8_float_ops)
                    ),
                )
                return debugger.get_nondebug_quantized_model()
            return converter.convert()
        except Exception as err:  # ConverterError; its class lives in a private module
            raise _converter_error(err, builtins_only) from err


def _converter_error(err: Exception, builtins_only: bool) -> Exception:
    """A ValueError naming the ops LiteRT lacks, or the original error."""
    text = str(err)
    select = _parse_op_list(text, "TF Select ops")
    custom = _parse_op_list(text, "Custom ops")
    if not (select or custom):
        return err
    parts = []
    if select:
        parts.append(
            f"{', '.join(select)} (a TensorFlow op with no builtin LiteRT kernel: it would run "
            "only as a Flex op, which the plain LiteRT runtime on a robot cannot execute)"
        )
    if custom:
        parts.append(
            f"{', '.join(custom)} (no builtin and no Flex kernel at all)"
        )
    fix = (
        "Rewrite the layer that uses it with ops that have builtin kernels (keras.ops "
        "matmul/einsum, elementwise maths, reductions, reshapes; use ops.expand_dims rather "
        "than x[..., None] and keep shapes static)"
    )
    if select and builtins_only:
        fix += (
            ", or pass builtins_only=False to embed Flex ops (the file then needs the Flex "
            "delegate at run time; pass verify=False too, as ai-edge-litert cannot run it)"
        )
    return ValueError(
        "The model needs ops that LiteRT has no builtin kernel for: "
        + "; ".join(parts)
        + f". {fix}. Received: builtins_only={builtins_only}"
    )


def _parse_op_list(text: str, label: str) -> list:
    names = []
    for match in re.finditer(re.escape(label) + r":\s*([^\n]+)", text):
        for name in match.group(1).split(","):
            name = name.strip()
            if name and name not in names:
                names.append(name)
    return names


# ------------------------------------------------------- flatbuffer reading


def _flatbuffer_ops(buffer: bytes) -> tuple:
    """(op histogram, flex/custom op names, float32-computing ops) of a flatbuffer."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAsModel(buffer, 0)
    builtin_names = {
        value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")
    }
    codes = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == schema.BuiltinOperator.CUSTOM:
            custom = code.CustomCode()
            codes.append((custom.decode() if custom else "CUSTOM", True))
        else:
            codes.append((builtin_names.get(builtin, f"BUILTIN_{builtin}"), False))
    histogram, custom_ops, float_ops = {}, [], {}
    for s in range(model.SubgraphsLength()):
        graph = model.Subgraphs(s)
        for o in range(graph.OperatorsLength()):
            op = graph.Operators(o)
            name, is_custom = codes[op.OpcodeIndex()]
            histogram[name] = histogram.get(name, 0) + 1
            if is_custom and name not in custom_ops:
                custom_ops.append(name)
            outputs = [graph.Tensors(int(t)) for t in op.OutputsAsNumpy() if t >= 0]
            if name != "DEQUANTIZE" and any(t.Type() == schema.TensorType.FLOAT32 for t in outputs):
                float_ops[name] = float_ops.get(name, 0) + 1
    return histogram, custom_ops, float_ops


def _flatbuffer_io(buffer: bytes) -> dict:
    """Names, shapes and dtypes of the `serve` signature's inputs and outputs."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAsModel(buffer, 0)
    type_names = {
        value: name.lower() for name, value in vars(schema.TensorType).items() if not name.startswith("_")
    }
    signature = None
    for i in range(model.SignatureDefsLength()):
        sig = model.SignatureDefs(i)
        if sig.SignatureKey().decode() == SIGNATURE_KEY:
            signature = sig
    graph = model.Subgraphs(signature.SubgraphIndex() if signature is not None else 0)

    def describe(maps, prefix):
        entries = {m.Name().decode(): graph.Tensors(m.TensorIndex()) for m in maps}
        names = _ordered(entries, prefix)
        return (
            names,
            [tuple(int(d) for d in entries[n].ShapeAsNumpy()) for n in names],
            [type_names.get(entries[n].Type(), str(entries[n].Type())) for n in names],
        )

    ins = describe([signature.Inputs(i) for i in range(signature.InputsLength())], "input")
    outs = describe([signature.Outputs(i) for i in range(signature.OutputsLength())], "output")
    return dict(
        input_names=ins[0], input_shapes=ins[1], input_dtypes=ins[2],
        output_names=outs[0], output_shapes=outs[1], output_dtypes=outs[2],
    )


# ------------------------------------------------------ interpreter helpers


def _ordered(details: dict, prefix: str) -> list:
    def key(name):
        match = re.fullmatch(prefix + r"_(\d+)", name)
        return (0, int(match.group(1)), name) if match else (1, 0, name)

    return sorted(details, key=key)


class _Runner:
    """Signature runner with float-in, float-out handling of int8 tensors."""

    def __init__(self, buffer: bytes, num_threads: int):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_content=buffer, num_threads=num_threads)
        self.runner = self.interpreter.get_signature_runner(SIGNATURE_KEY)
        self.inputs = self.runner.get_input_details()
        self.outputs = self.runner.get_output_details()
        self.input_names = _ordered(self.inputs, "input")
        self.output_names = _ordered(self.outputs, "output")

    def __call__(self, arrays: list) -> list:
        feed = {}
        for name, x in zip(self.input_names, arrays):
            d = self.inputs[name]
            scale, zero = d["quantization"]
            if scale and np.dtype(d["dtype"]).kind in "iu":
                info = np.iinfo(d["dtype"])
                x = np.clip(np.round(x / scale + zero), info.min, info.max)
            feed[name] = np.asarray(x).astype(d["dtype"], copy=False)
        result = self.runner(**feed)
        out = []
        for name in self.output_names:
            y = result[name]
            scale, zero = self.outputs[name]["quantization"]
            if scale and y.dtype.kind in "iu":
                y = (y.astype(np.float32) - zero) * scale
            out.append(y)
        return out


def _compare(runner: _Runner, probes: list, references: list) -> dict:
    diffs, refs = [], []
    for arrays, expected in zip(probes, references):
        got = runner(arrays)
        if len(got) != len(expected):
            raise RuntimeError(
                f"The LiteRT file has {len(got)} output(s) but the Keras model {len(expected)}."
            )
        for g, e in zip(got, expected):
            if g.shape != e.shape:
                raise RuntimeError(
                    f"A LiteRT output has shape {g.shape} where Keras gives {e.shape}."
                )
            diffs.append((g.astype(np.float64) - e.astype(np.float64)).ravel())
            refs.append(e.astype(np.float64).ravel())
    diff, ref = np.concatenate(diffs), np.concatenate(refs)
    finite = bool(np.all(np.isfinite(diff)))
    abs_diff = np.abs(diff)
    return dict(
        max_abs_error=float(abs_diff.max()) if finite else float("nan"),
        mean_abs_error=float(abs_diff.mean()) if finite else float("nan"),
        relative_error=(
            float(np.linalg.norm(diff) / max(np.linalg.norm(ref), np.finfo(np.float64).tiny))
            if finite else float("nan")
        ),
    )


def _latency(runner: _Runner, arrays: list, runs: int) -> tuple:
    for _ in range(WARMUP_RUNS):
        runner(arrays)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runner(arrays)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 90))


def int8_diagnosis(histogram: dict, float_ops: dict, kept_float: Sequence[str], tolerance: float,
                   error: float, error_keeping) -> str:
    """Which int8 ops drive a failed int8 export's error, measured, as text for the error message.

    Each op type that ran in int8 (quantise/dequantise glue aside; layout
    ops count, since an int8 RESHAPE after a float op quantises that op's
    output) is measured on its own: the file is re-converted with every
    other such op type kept in float32, so its relative error is what that
    op type's int8 form contributes. Then the largest contributors are kept
    in float, one more at a time, until the error is within `tolerance`;
    the text ends with the `int8_float_ops` to pass. Conversions run only on
    this failure path (one per op type, plus one per greedy step).

    Args:
        histogram: op counts of the failed file; float_ops: how many of them
            already compute in float32.
        kept_float: the `int8_float_ops` of the failed export.
        tolerance: the tolerance that failed; error: its relative error.
        error_keeping: callable, a list of op names -> relative error of
            the file converted with those ops also kept in float.

    Returns:
        The lines to append to the error message ("" when no op ran in int8).
    """
    candidates = sorted(
        name for name, count in histogram.items()
        if name not in _INT8_GLUE_OPS and name not in kept_float and float_ops.get(name, 0) < count
    )
    if not candidates:
        return ""
    print(f"export_tflite: int8 error {error:.3f} > {tolerance:g}; measuring what each of "
          f"{len(candidates)} int8 op type(s) contributes ({', '.join(candidates)})", file=sys.stderr)
    def measure(extra):
        try:
            return float(error_keeping(extra))
        except Exception:  # e.g. the converter's debug mode needs one numeric int8 op left
            return float("nan")

    if len(candidates) == 1:
        alone = {candidates[0]: error}
    else:
        alone = {n: measure([c for c in candidates if c != n]) for n in candidates}
    ranked = sorted(candidates, key=lambda n: (not np.isfinite(alone[n]), -alone[n]))  # unmeasurable last
    lines = [f"\nPer-op contribution (relative error with only that op type in int8; {error:.3f} with all):"]
    for name in ranked:
        shown = f"{alone[name]:.3f}" if np.isfinite(alone[name]) else "not measurable alone"
        lines.append(f"  {name:<18} ({histogram[name]} op(s)) alone in int8 -> {shown}")
    keep = None
    for k in range(1, len(ranked)):  # all in float is no int8 file at all: not tried
        trial = measure(ranked[:k])
        lines.append(f"  keeping {', '.join(ranked[:k])} in float32 -> {trial:.3f}"
                     + ("  (passes)" if trial <= tolerance else ""))
        if trial <= tolerance:
            keep = ranked[:k]
            break
    if keep:
        lines.append(f"Keep them in float: int8_float_ops={tuple(kept_float) + tuple(keep)!r}.")
    else:
        lines.append("Keeping op types in float does not bring the error under the tolerance: the error "
                     "is spread over the model's int8 activations (calibrate on real inputs, or use "
                     "quantize='dynamic').")
    return "\n".join(lines)


def _write_atomically(path: str, buffer: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(buffer)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def _export_tensorflow(model, path, settings, probes, references, representative) -> ExportReport:
    """Convert, verify, time and write (TensorFlow backend)."""
    shapes = [tuple(s) for s in settings["input_shapes"]]
    dtypes = settings["input_dtypes"]
    quantize = settings["quantize"]
    folded = []
    if settings["fold_layernorm"]:  # references come from the unfolded model
        model, fold_report = fold_layernorm_affine(model)
        folded = fold_report.folded
    buffer = _convert(
        model, shapes, dtypes, quantize, representative,
        settings["builtins_only"], settings["int8_io"], settings["int8_float_ops"],
        settings["split_heads"],
    )
    histogram, flex_ops, float_ops = _flatbuffer_ops(buffer)
    if quantize != "int8":  # dynamic-range ops take and give float32 by design
        float_ops = {}
    if flex_ops and (settings["verify"] or settings["benchmark_runs"]):
        raise ValueError(
            f"The converted model contains Flex/custom ops ({', '.join(flex_ops)}), which "
            "ai-edge-litert cannot run here, so it can be neither verified nor timed. Pass "
            "verify=False and benchmark_runs=0 to write it unverified, or remove the ops "
            f"(builtins_only=True names them). Received: verify={settings['verify']}, "
            f"benchmark_runs={settings['benchmark_runs']}"
        )
    errors = {}
    num_threads = settings["num_threads"]
    runner = None
    if settings["verify"]:
        runner = _Runner(buffer, num_threads)
        errors = _compare(runner, probes, references)
        rel = errors["relative_error"]
        if not (rel <= settings["tolerance"]):  # NaN fails too
            diagnosis = ""
            if quantize == "int8" and not settings["int8_io"]:
                def convert_keeping(extra):
                    return _convert(
                        model, shapes, dtypes, quantize, representative, settings["builtins_only"],
                        False, list(settings["int8_float_ops"]) + list(extra), settings["split_heads"],
                    )
                diagnosis = int8_diagnosis(
                    histogram, float_ops, settings["int8_float_ops"], settings["tolerance"], rel,
                    lambda extra: _compare(_Runner(convert_keeping(extra), num_threads), probes, references)["relative_error"],
                )
            raise RuntimeError(
                f"LiteRT output does not match Keras: relative error {rel:.3e} > tolerance "
                f"{settings['tolerance']:.1e} (max abs error {errors['max_abs_error']:.3e}, "
                f"mean abs error {errors['mean_abs_error']:.3e}, {len(probes)} probe batch(es), "
                f"quantize={quantize!r}). Nothing was written to {path!r}. "
                + (
                    "For int8, calibrate on more realistic representative_data; "
                    if quantize == "int8" else ""
                )
                + "Raise `tolerance` if this error is acceptable."
                + diagnosis
            )
    latency = (None, None)
    if settings["benchmark_runs"]:
        runner = runner or _Runner(buffer, num_threads)
        timing_input = probes[0] if probes else _random_probes(shapes, dtypes, 1, seed=1)[0]
        latency = _latency(runner, timing_input, settings["benchmark_runs"])
    tensors = _flatbuffer_io(buffer)
    _write_atomically(path, buffer)
    return ExportReport(
        path=path,
        quantize=quantize,
        size_bytes=len(buffer),
        op_histogram=histogram,
        flex_ops=flex_ops,
        float_ops=float_ops,
        verified=bool(settings["verify"]),
        tolerance=settings["tolerance"] if settings["verify"] else None,
        num_probes=len(probes),
        latency_p50_ms=latency[0],
        latency_p90_ms=latency[1],
        benchmark_runs=settings["benchmark_runs"],
        num_threads=num_threads,
        source_backend=settings["source_backend"],
        folded_layernorms=folded,
        **errors,
        **tensors,
    )


# ---------------------------------------------- other backends: a subprocess


def _save_batches(store: dict, prefix: str, batches: Optional[list]) -> None:
    if batches is None:
        return
    for b, arrays in enumerate(batches):
        for i, a in enumerate(arrays):
            store[f"{prefix}_{b}_{i}"] = a


def _load_batches(data, prefix: str) -> Optional[list]:
    keys = [k for k in data.files if k.startswith(prefix + "_")]
    if not keys:
        return None
    index = {}
    for k in keys:
        b, i = (int(p) for p in k[len(prefix) + 1 :].split("_"))
        index.setdefault(b, {})[i] = data[k]
    return [[index[b][i] for i in sorted(index[b])] for b in sorted(index)]


def _custom_layer_modules(model) -> list:
    """Modules that must be imported for the `.keras` file to load in a fresh process."""
    modules = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        module = type(layer).__module__
        if module.startswith(("keras.", "keras_sara")) or module == "keras":
            continue
        if module == "__main__":
            raise ValueError(
                f"Layer '{layer.name}' ({type(layer).__name__}) is defined in the __main__ "
                "script, which the TensorFlow-backend export process cannot import. Models "
                f"on the {keras.backend.backend()} backend are exported by reloading them in "
                "a TensorFlow-backend process: move the class to an importable module (and "
                "register it with keras.saving.register_keras_serializable), or export "
                "with KERAS_BACKEND=tensorflow. Received: a model with "
                f"{type(layer).__name__} from __main__"
            )
        cls = type(layer)
        if keras.saving.get_registered_object(keras.saving.get_registered_name(cls)) is not cls:
            # checked here: the worker would fail on it only after starting TensorFlow
            raise ValueError(
                f"Layer '{layer.name}' ({module}.{cls.__qualname__}) is not registered for "
                "serialisation, so the TensorFlow-backend export process cannot rebuild it "
                f"from the saved .keras file (models on the {keras.backend.backend()} backend "
                "are exported by reloading them there). Decorate the class with "
                "@keras.saving.register_keras_serializable(package=...) and give it a "
                "complete get_config(), or export with KERAS_BACKEND=tensorflow. Received: "
                f"a model with the unregistered class {cls.__qualname__}"
            )
        if module not in modules:
            modules.append(module)
    return modules


def run_tensorflow_worker(module: str, work: str) -> subprocess.CompletedProcess:
    """Run `module._worker_main(work)` in a TensorFlow-backend Python process.

    The worker exits if this process dies (`keras_sara.utils.exit_with_parent`):
    a killed caller must not leave it running on to write the destination.
    """
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(
        [package_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    return subprocess.run(
        [
            sys.executable,
            "-c",
            f"from keras_sara.utils import exit_with_parent; exit_with_parent({os.getpid()}); "
            f"from {module} import _worker_main; _worker_main()",
            work,
        ],
        env=env,
        capture_output=True,
        text=True,
    )


def _export_in_subprocess(model, path, settings, probes, references, representative) -> ExportReport:
    """Save to `.keras`, convert in a TensorFlow-backend process, return its report."""
    modules = _custom_layer_modules(model)
    with work_directory("keras_sara_export_") as work:
        model_path = os.path.join(work, "model.keras")
        model.save(model_path)
        store = {}
        _save_batches(store, "probe", probes)
        _save_batches(store, "ref", references)
        _save_batches(store, "rep", representative)
        np.savez(os.path.join(work, "data.npz"), **store)
        job = dict(
            settings,
            model_path=model_path,
            path=path,
            modules=modules,
            sys_path=[os.path.abspath(p) for p in sys.path if p and os.path.isdir(p)],
        )
        with open(os.path.join(work, "job.json"), "w") as f:
            json.dump(job, f)
        proc = run_tensorflow_worker("keras_sara.export", work)
        result_path = os.path.join(work, _WORKER_RESULT)
        if not os.path.exists(result_path):
            tail = (proc.stderr or proc.stdout or "")[-3000:]
            raise RuntimeError(
                f"The TensorFlow-backend export process failed (exit code {proc.returncode}); "
                f"nothing was written to {path!r}. Its output ended with:\n{tail}"
            )
        with open(result_path) as f:
            result = json.load(f)
    if not result["ok"]:
        error_type = {"ValueError": ValueError}.get(result["type"], RuntimeError)
        raise error_type(result["message"])
    return ExportReport.from_dict(result["report"])


def _worker_main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of the TensorFlow-backend export process (private)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    work = argv[0]
    result_path = os.path.join(work, _WORKER_RESULT)
    try:
        if keras.backend.backend() != "tensorflow":
            raise RuntimeError(
                "The export worker must run with KERAS_BACKEND=tensorflow. "
                f"Received: backend={keras.backend.backend()!r}"
            )
        with open(os.path.join(work, "job.json")) as f:
            job = json.load(f)
        for p in job["sys_path"]:
            if p not in sys.path:
                sys.path.append(p)
        importlib.import_module("keras_sara")  # registers SARA layers for loading
        for module in job["modules"]:
            importlib.import_module(module)
        model = keras.saving.load_model(job["model_path"], compile=False)
        data = np.load(os.path.join(work, "data.npz"))
        probes = _load_batches(data, "probe") or []
        references = _load_batches(data, "ref") or []
        representative = _load_batches(data, "rep")
        with contextlib.redirect_stdout(io.StringIO()):
            report = _export_tensorflow(model, job["path"], job, probes, references, representative)
        result = {"ok": True, "report": report.to_dict()}
    except Exception as err:  # reported to the parent, which re-raises it
        result = {"ok": False, "type": type(err).__name__, "message": str(err)}
    with open(result_path, "w") as f:
        json.dump(result, f)


__all__ = ["DEFAULT_TOLERANCES", "ExportReport", "QUANTIZE_MODES", "export_tflite"]
