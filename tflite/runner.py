"""Run an exported policy with nothing but the LiteRT runtime and numpy.

This is the file that goes to the robot with the `.tflite` model: it imports
`numpy` and `ai_edge_litert` only (no Keras, no TensorFlow), so it runs where
only `pip install ai-edge-litert` was done.

    from tflite.runner import PolicyRunner
    policy = PolicyRunner("policy.tflite", num_threads=2)
    action = policy(observation)          # numpy in, numpy out
    print(policy.latency(runs=50))        # {'p50_ms': ..., 'p90_ms': ..., ...}

Inputs are checked (count, shape, dtype, finite values) before each call. Files with int8
(or uint8) inputs or outputs, such as `export_tflite(..., quantize="int8",
int8_io=True)` writes, take float inputs and give float outputs here: the
runner applies each tensor's scale and zero point.
"""

from __future__ import annotations

import os
import re
import time
from typing import Optional

import numpy as np
from ai_edge_litert.interpreter import Interpreter

__all__ = ["PolicyRunner"]


def _natural_key(name: str):
    """`input_2` before `input_10`; names without a number after those with one."""
    match = re.fullmatch(r"(.*?)(\d+)", name)
    return (0, match.group(1), int(match.group(2))) if match else (1, name, 0)


class PolicyRunner:
    """A LiteRT policy behind a plain numpy call.

    Args:
        path: the `.tflite` file.
        num_threads: CPU threads for the interpreter (default 2).
        signature: which signature to run, for files with several. Default:
            the only one (files from `keras_sara.export.export_tflite` have
            one, `serve`), or the subgraph's inputs and outputs when the file
            has no signature.
        allow_non_finite: accept NaN and infinite values in float inputs.
            Default False: such an input raises a ValueError naming it, since
            on a robot a NaN observation would become a NaN action. Pass True
            only if the caller handles non-finite values itself.

    Call arguments:
        *inputs: one numpy array per model input, in the model's input order
            (`input_0`, `input_1`, ... for files from `export_tflite`), or
        **named_inputs: the same arrays by input name. Shapes must equal
            `input_shapes` exactly (batch axis included). Float inputs accept
            any real-valued array (cast to float32); integer inputs accept
            integer arrays only. An int8/uint8-quantised input takes real
            values, quantised with its scale and zero point; an array already
            of that integer dtype is passed through as raw quantised values.

    Returns:
        One numpy array for a single-output model, else a list in output
        order. Quantised outputs are dequantised to float32.

    Example:

    >>> policy = PolicyRunner("policy.tflite")             # doctest: +SKIP
    >>> policy.input_shapes                                 # doctest: +SKIP
    [(1, 1024, 128)]
    >>> action = policy(np.zeros((1, 1024, 128), "float32"))  # doctest: +SKIP
    """

    def __init__(
        self,
        path,
        num_threads: int = 2,
        signature: Optional[str] = None,
        allow_non_finite: bool = False,
    ):
        if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
            raise ValueError(
                f"`path` must be an existing .tflite file. Received: path={path!r}"
            )
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(
                f"`num_threads` must be an integer >= 1. Received: num_threads={num_threads!r}"
            )
        if not isinstance(allow_non_finite, bool):
            raise ValueError(
                f"`allow_non_finite` must be True or False. Received: allow_non_finite={allow_non_finite!r}"
            )
        self.path = os.fspath(path)
        self.num_threads = num_threads
        self.allow_non_finite = allow_non_finite
        _check_flatbuffer(self.path)
        try:
            self._interpreter = Interpreter(model_path=self.path, num_threads=num_threads)
        except (ValueError, RuntimeError) as err:  # a truncated or damaged file past its header
            raise ValueError(
                f"`path` {self.path!r} ({os.path.getsize(self.path)} bytes) is not a loadable "
                f"LiteRT model; the file may be truncated or damaged: re-export it. "
                f"The interpreter said: {err}"
            ) from err
        signatures = self._interpreter.get_signature_list()
        if signature is not None and signature not in signatures:
            raise ValueError(
                f"`signature` must be one of {sorted(signatures)}. Received: signature={signature!r}"
            )
        if signature is None and len(signatures) > 1:
            raise ValueError(
                f"This file has several signatures, {sorted(signatures)}: pass `signature`. "
                "Received: signature=None"
            )
        if signatures:
            self.signature = signature or next(iter(signatures))
            self._runner = self._interpreter.get_signature_runner(self.signature)
            inputs = self._runner.get_input_details()
            outputs = self._runner.get_output_details()
            self.input_names = sorted(inputs, key=_natural_key)
            self.output_names = sorted(outputs, key=_natural_key)
            self._in = [inputs[n] for n in self.input_names]
            self._out = [outputs[n] for n in self.output_names]
        else:
            self.signature = None
            self._runner = None
            self._interpreter.allocate_tensors()
            self._in = self._interpreter.get_input_details()
            self._out = self._interpreter.get_output_details()
            self.input_names = [d["name"] for d in self._in]
            self.output_names = [d["name"] for d in self._out]

    # ----------------------------------------------------------- properties

    @property
    def input_shapes(self) -> list:
        return [tuple(int(x) for x in d["shape"]) for d in self._in]

    @property
    def input_dtypes(self) -> list:
        """The dtype each input tensor holds in the file (int8 for a quantised input)."""
        return [np.dtype(d["dtype"]) for d in self._in]

    @property
    def output_shapes(self) -> list:
        return [tuple(int(x) for x in d["shape"]) for d in self._out]

    @property
    def output_dtypes(self) -> list:
        """What `__call__` returns: float32 for quantised outputs."""
        return [np.dtype(np.float32) if _quantised(d) else np.dtype(d["dtype"]) for d in self._out]

    # ----------------------------------------------------------------- call

    def __call__(self, *inputs, **named_inputs):
        arrays = self._gather(inputs, named_inputs)
        feed = [self._prepare(i, x) for i, x in enumerate(arrays)]
        if self._runner is not None:
            result = self._runner(**dict(zip(self.input_names, feed)))
            raw = [result[n] for n in self.output_names]
        else:
            for d, x in zip(self._in, feed):
                self._interpreter.set_tensor(d["index"], x)
            self._interpreter.invoke()
            raw = [self._interpreter.get_tensor(d["index"]) for d in self._out]
        outputs = [_dequantise(y, d) for y, d in zip(raw, self._out)]
        return outputs[0] if len(outputs) == 1 else outputs

    def latency(self, runs: int = 50, warmup: int = 2, inputs=None) -> dict:
        """Wall-clock latency of `runs` calls, in milliseconds.

        Args:
            runs: timed calls.
            warmup: untimed calls first (the first ones pack weights).
            inputs: a list of input arrays to time on; default standard
                normal noise (zeros for integer inputs) of the input shapes.

        Returns:
            `{"p50_ms", "p90_ms", "p99_ms", "mean_ms", "runs", "num_threads"}`.
        """
        for name, value, low in (("runs", runs, 1), ("warmup", warmup, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}. Received: {name}={value!r}")
        if inputs is None:
            rng = np.random.default_rng(0)
            inputs = []
            for shape, d in zip(self.input_shapes, self._in):
                real = _quantised(d) or np.dtype(d["dtype"]).kind == "f"
                inputs.append(rng.standard_normal(shape).astype(np.float32) if real
                              else np.zeros(shape, d["dtype"]))
        for _ in range(warmup):
            self(*inputs)
        times = np.empty(runs)
        for i in range(runs):
            start = time.perf_counter()
            self(*inputs)
            times[i] = (time.perf_counter() - start) * 1e3
        return {
            "p50_ms": float(np.percentile(times, 50)),
            "p90_ms": float(np.percentile(times, 90)),
            "p99_ms": float(np.percentile(times, 99)),
            "mean_ms": float(times.mean()),
            "runs": runs,
            "num_threads": self.num_threads,
        }

    def __repr__(self) -> str:
        ins = ", ".join(f"{n}{s}" for n, s in zip(self.input_names, self.input_shapes))
        outs = ", ".join(f"{n}{s}" for n, s in zip(self.output_names, self.output_shapes))
        return f"PolicyRunner({self.path!r}, inputs: {ins}; outputs: {outs})"

    # ------------------------------------------------------------ internals

    def _gather(self, inputs, named_inputs) -> list:
        n = len(self._in)
        if inputs and named_inputs:
            raise ValueError(
                "Pass the inputs either all by position or all by name. "
                f"Received: {len(inputs)} positional and names {sorted(named_inputs)}"
            )
        if named_inputs:
            unknown = sorted(set(named_inputs) - set(self.input_names))
            missing = [k for k in self.input_names if k not in named_inputs]
            if unknown or missing:
                raise ValueError(
                    f"Inputs must be named {self.input_names}. Received: names "
                    f"{sorted(named_inputs)} (unknown {unknown}, missing {missing})"
                )
            return [named_inputs[k] for k in self.input_names]
        if len(inputs) != n:
            raise ValueError(
                f"The model takes {n} input(s), {self.input_names} with shapes "
                f"{self.input_shapes}. Received: {len(inputs)} input(s)"
            )
        return list(inputs)

    def _prepare(self, i: int, x) -> np.ndarray:
        d = self._in[i]
        name, shape, dtype = self.input_names[i], self.input_shapes[i], np.dtype(d["dtype"])
        x = np.asarray(x)
        if x.shape != shape:
            hint = ""
            if x.shape == shape[1:]:
                hint = " (add the batch axis: x[None])"
            raise ValueError(
                f"Input '{name}' must have shape {shape}{hint}. Received: shape {x.shape}"
            )
        if _quantised(d):
            if x.dtype == dtype:
                return x  # already quantised values
            if x.dtype.kind not in "biuf":
                raise ValueError(
                    f"Input '{name}' must be a real-valued array (quantised to {dtype.name} "
                    f"here). Received: dtype {x.dtype}"
                )
            self._check_finite(name, x)
            scale, zero_point = d["quantization"]
            info = np.iinfo(dtype)
            q = np.round(x.astype(np.float32) / np.float32(scale)) + zero_point
            return np.clip(q, info.min, info.max).astype(dtype)
        if dtype.kind == "f":
            if x.dtype.kind not in "biuf":
                raise ValueError(
                    f"Input '{name}' must be a real-valued array ({dtype.name}). "
                    f"Received: dtype {x.dtype}"
                )
            self._check_finite(name, x)
            return x.astype(dtype, copy=False)
        if dtype.kind in "iu" and x.dtype.kind in "iu":
            if x.size and (x.min() < np.iinfo(dtype).min or x.max() > np.iinfo(dtype).max):
                raise ValueError(
                    f"Input '{name}' must fit {dtype.name}. Received: values in "
                    f"[{x.min()}, {x.max()}]"
                )
            return x.astype(dtype, copy=False)
        if dtype.kind == "b" and x.dtype.kind == "b":
            return x
        raise ValueError(
            f"Input '{name}' must have dtype {dtype.name} (integer inputs take integer arrays). "
            f"Received: dtype {x.dtype}"
        )


    def _check_finite(self, name: str, x: np.ndarray) -> None:
        if self.allow_non_finite or x.dtype.kind != "f" or np.isfinite(x).all():
            return
        bad = ~np.isfinite(x)
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"Input '{name}' must hold finite values: {int(bad.sum())} of its {x.size} values "
            f"are NaN or infinite (first at index {first}: {x[first]}). A non-finite input "
            "gives a non-finite output; check the sensor or state feeding it, or pass "
            "PolicyRunner(..., allow_non_finite=True) to handle it yourself. "
            f"Received: {name} of shape {x.shape}"
        )


def _check_flatbuffer(path: str) -> None:
    """Refuse a file that is not a LiteRT flatbuffer, naming it (the interpreter says only "mmap")."""
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(
            f"`path` {path!r} is empty (0 bytes), not a LiteRT model: an export that did not "
            "finish, or the wrong file. Re-export it (export_tflite writes atomically)."
        )
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[4:8] != b"TFL3":  # the flatbuffer file identifier of .tflite
        raise ValueError(
            f"`path` {path!r} ({size} bytes) is not a LiteRT (.tflite) flatbuffer: its file "
            f"identifier (bytes 4 to 8) is {head[4:8]!r}, expected b'TFL3'. Pass the .tflite "
            "file that export_tflite wrote."
        )


def _quantised(details: dict) -> bool:
    scale, _ = details["quantization"]
    return bool(scale) and np.dtype(details["dtype"]).kind in "iu"


def _dequantise(y: np.ndarray, details: dict) -> np.ndarray:
    if not _quantised(details):
        return y
    scale, zero_point = details["quantization"]
    return (y.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)
