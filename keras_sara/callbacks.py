"""`UpTraining`: SARA-RT up-training steered from inside plain `model.fit`."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence

import keras
import numpy as np

from keras_sara.conversion import _attention_layers, _select, check_probe
from keras_sara.layers.sara_state import DISTILLATION_TARGETS, SARALayer

SCHEDULES = ("hard", "constant", "linear", "cosine")


def schedule_value(schedule: str, step: int, steps: int, start: float, end: float) -> float:
    """Value at `step` of a move from `start` to `end` over `steps` steps.

    `"hard"`: `end` from the first step. `"constant"`: `start` until `steps`,
    then `end`. `"linear"`, `"cosine"`: a linear or half-cosine ramp that
    reaches `end` at `steps`. Every schedule is `end` from `steps` on.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"`schedule` must be one of {SCHEDULES}. Received: schedule={schedule!r}")
    if schedule == "hard" or steps <= 0 or step >= steps:
        return float(end)
    frac = max(step, 0) / steps
    if schedule == "constant":
        return float(start)
    if schedule == "linear":
        return float(start + (end - start) * frac)
    return float(start + (end - start) * 0.5 * (1.0 - math.cos(math.pi * frac)))


def _check_int(name, value, minimum=0):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}. Received: {name}={value!r}")
    return int(value)


def _check_float(name, value, low, high=None):
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.floating)) and np.isfinite(value)
    ok = ok and value >= low and (high is None or value <= high)
    if not ok:
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"`{name}` must be a finite float {bound}. Received: {name}={value!r}")
    return float(value)


class UpTraining(keras.callbacks.Callback):
    """Steers SARA-RT up-training of a converted model inside `model.fit`.

    SARA-RT (the paper) swaps softmax attention for linear attention, keeps
    every weight and simply goes on training: the `"hard"` schedule, the
    default. This callback adds what helps on a short budget:

    - a **blend schedule**: attention output `(1 - a) * softmax + a * linear`
      with `a` going from `initial_blend` to 1 over `blend_steps` steps
      (`"constant"`, `"linear"` or `"cosine"`);
    - an **attention-distillation loss** (Hedgehog-style): each layer's linear
      attention is pulled towards its own softmax attention (no gradient
      through the softmax side), added with `add_loss` and weighted by
      `distillation_weight` (averaged over layers), optionally decaying to 0
      over `distillation_steps`;
    - **stages**: for the first `attention_only_steps` steps only the SARA
      layers' weights (projections and feature maps) change; then all train;
    - **fidelity**: with a `probe` batch, the relative error
      `||linear - softmax|| / ||softmax||` of every SARA layer's attention
      output is written into the logs at each epoch end (`fidelity`, the
      mean, and `fidelity/<layer path>`), so it shows in the progress bar and
      in `History`; `fidelity_history` keeps every measurement.

    The schedule position is the optimizer's step counter, so training
    resumed with `keras.callbacks.BackupAndRestore` continues the schedule
    exactly where it stopped. Blend and distillation weight live in
    non-trainable variables of the layers (saved with the model).

    **Resume, exactly stated.** With the default per-epoch backups
    (`BackupAndRestore(dir)`) a killed run resumes bit-identical to one that
    was never interrupted (tested with a SIGKILL). With step-level backups
    (`save_freq=<steps>`) weights, optimizer and schedule resume at the saved
    step, but Keras restarts the interrupted epoch's data at its first
    batch: the batches of that epoch seen before the backup are trained on
    twice and the run takes that many extra steps (12 batches per epoch,
    killed after step 30 with `save_freq=4`: 52 steps instead of 48), so the
    result differs from an uninterrupted run. This callback warns when it
    sees such a mid-epoch resume. For exact resume keep per-epoch backups and
    make epochs as short as the work you can afford to lose
    (`steps_per_epoch`).

    Blending and distillation need the softmax branch: convert with
    `keras_sara.convert(model, blend=0.0)`, and call `keras_sara.finalize`
    after up-training for a linear-only model to deploy.

    Args:
        schedule: `"hard"` (default: linear attention from the first step),
            `"constant"`, `"linear"` or `"cosine"`.
        blend_steps: optimizer steps until the blend reaches 1 (required,
            > 0, for every schedule but `"hard"`).
        initial_blend: blend factor at step 0, in [0, 1] (0 = softmax).
        distillation_weight: weight of the distillation loss; 0 disables it.
        distillation_steps: None (constant weight for the whole run) or the
            number of steps over which the weight decays to 0.
        distillation_schedule: shape of that decay: `"constant"` (full weight
            until `distillation_steps`, then 0), `"linear"` or `"cosine"`.
        distillation_target: `"scores"` (KL divergence between attention
            weights, as Hedgehog) or `"outputs"` (relative squared error of
            attention outputs).
        attention_only_steps: length of the first stage, in optimizer steps.
            Frozen weights get zero gradients and their updates (weight decay
            included) are undone in that stage, in the compiled step.
        probe: inputs (as the model takes them) for the fidelity log, or None.
        layers: which SARA layers to steer: None (all), names or paths, or a
            callable `(layer, path) -> bool`, as in `keras_sara.convert`.
        verbose: 1 prints the plan when training starts; 0 is silent.

    Example:

    >>> student, report = keras_sara.convert(teacher, blend=0.0)   # doctest: +SKIP
    >>> student.compile(keras.optimizers.AdamW(3e-4), "sparse_categorical_crossentropy")
    >>> student.fit(x, y, epochs=2, callbacks=[                   # doctest: +SKIP
    ...     keras_sara.callbacks.UpTraining(schedule="cosine", blend_steps=300,
    ...                                     distillation_weight=1.0, probe=x[:64]),
    ...     keras.callbacks.BackupAndRestore("backup")])
    >>> robot_policy = keras_sara.finalize(student)               # doctest: +SKIP
    """

    def __init__(
        self,
        schedule: str = "hard",
        blend_steps: int = 0,
        initial_blend: float = 0.0,
        distillation_weight: float = 0.0,
        distillation_steps: int | None = None,
        distillation_schedule: str = "constant",
        distillation_target: str = "scores",
        attention_only_steps: int = 0,
        probe: Any = None,
        layers: Sequence[str] | Callable[[Any, str], bool] | None = None,
        verbose: int = 1,
    ):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {SCHEDULES}. Received: schedule={schedule!r}")
        self.schedule = schedule
        self.blend_steps = _check_int("blend_steps", blend_steps)
        if schedule != "hard" and self.blend_steps == 0:
            raise ValueError(
                f"`blend_steps` must be > 0 for schedule={schedule!r} (the number of "
                "optimizer steps until the blend reaches 1); use schedule='hard' for "
                f"an immediate swap. Received: blend_steps={blend_steps!r}"
            )
        self.initial_blend = _check_float("initial_blend", initial_blend, 0.0, 1.0)
        self.distillation_weight = _check_float("distillation_weight", distillation_weight, 0.0)
        if distillation_steps is not None:
            distillation_steps = _check_int("distillation_steps", distillation_steps, 1)
        self.distillation_steps = distillation_steps
        if distillation_schedule not in SCHEDULES[1:]:
            raise ValueError(
                f"`distillation_schedule` must be one of {SCHEDULES[1:]}. "
                f"Received: distillation_schedule={distillation_schedule!r}"
            )
        self.distillation_schedule = distillation_schedule
        if distillation_target not in DISTILLATION_TARGETS:
            raise ValueError(
                f"`distillation_target` must be one of {DISTILLATION_TARGETS}. "
                f"Received: distillation_target={distillation_target!r}"
            )
        self.distillation_target = distillation_target
        self.attention_only_steps = _check_int("attention_only_steps", attention_only_steps)
        self.probe = probe
        self.layers = layers
        self.verbose = verbose
        self.fidelity_history: list[dict] = []
        self._targets: list = []  # (path, layer)
        self._step = None
        self._assigned: dict = {}
        self._wrapped_optimizer = None
        self._epoch = 0

    # ------------------------------------------------------------ schedules

    def blend_at(self, step: int) -> float:
        """The blend factor this callback sets at optimizer step `step`."""
        return schedule_value(self.schedule, step, self.blend_steps, self.initial_blend, 1.0)

    def distillation_weight_at(self, step: int) -> float:
        """The distillation weight (before averaging over layers) at `step`."""
        if self.distillation_steps is None:
            return self.distillation_weight
        return schedule_value(
            self.distillation_schedule, step, self.distillation_steps, self.distillation_weight, 0.0
        )

    @property
    def step(self) -> int | None:
        """The optimizer step the next batch will take (None before training)."""
        return self._step

    # -------------------------------------------------------------- set-up

    def _find_targets(self):
        sara = [(p, l) for p, l in _attention_layers(self.model) if isinstance(l, SARALayer)]
        if not sara:
            raise ValueError(
                f"UpTraining: model '{self.model.name}' has no SARA attention layer. "
                "Convert it first: `student, report = keras_sara.convert(model, blend=0.0)`."
            )
        chosen = _select(sara, self.layers)
        return [(p, l) for p, l in sara if id(l) in chosen]

    def _needs_softmax(self) -> bool:
        return self.schedule != "hard" or self.distillation_weight > 0

    def on_train_begin(self, logs=None):
        if self.probe is not None:  # before any change to the model or the optimizer
            try:
                check_probe(self.model, self.probe)
            except ValueError as err:
                raise ValueError(f"UpTraining: {err}") from None
        self._targets = self._find_targets()
        if self._needs_softmax():
            linear_only = [p for p, l in self._targets if l.blend_variable is None]
            if linear_only:
                raise ValueError(
                    f"UpTraining(schedule={self.schedule!r}, distillation_weight="
                    f"{self.distillation_weight}) needs the softmax branch, but these SARA "
                    f"layers were built linear-only (blend=1.0): {linear_only}. Convert with "
                    "`keras_sara.convert(model, blend=0.0)`, or use schedule='hard' with "
                    "distillation_weight=0 (the paper's plain swap)."
                )
        if self.model.optimizer is None:
            raise ValueError("UpTraining needs a compiled model: call `model.compile(optimizer, loss)` first.")
        self._step = None  # read from the optimizer at the first batch (after any restore)
        self._assigned = {}
        retrace = False
        target = self.distillation_target if self.distillation_weight > 0 else None
        for _, layer in self._targets:
            if layer.blend_variable is not None and layer._distillation_target != target:
                layer.configure_distillation(target)
                retrace = True
        if self.attention_only_steps > 0:
            self._freeze_all_but_attention()
            retrace = True
        if retrace:  # trace-time changes: a step traced before would not see them
            self.model.make_train_function(force=True)
        if self.verbose:
            print(self._plan())
        if self.probe is not None:
            self._record_fidelity(int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)))

    def _plan(self) -> str:
        parts = [f"UpTraining: {len(self._targets)} SARA layer(s); blend {self.schedule}"]
        if self.schedule != "hard":
            parts[-1] += f" from {self.initial_blend:g} to 1 over {self.blend_steps} steps"
        if self.distillation_weight > 0:
            decay = "" if self.distillation_steps is None else (
                f", {self.distillation_schedule} to 0 over {self.distillation_steps} steps")
            parts.append(f"distillation ({self.distillation_target}) weight {self.distillation_weight:g}{decay}")
        if self.attention_only_steps:
            parts.append(f"attention-only for the first {self.attention_only_steps} steps")
        return "; ".join(parts)

    def _freeze_all_but_attention(self):
        """Stage 1 inside the compiled step: gate frozen weights on the optimizer's counter.

        Keras has no per-variable freezing that a compiled step picks up
        mid-run (toggling `trainable` changes the variable lists, which the
        JAX step cannot take), so the optimizer's `apply` is wrapped: frozen
        variables get zero gradients and any update to them (weight decay)
        is undone while `iterations < attention_only_steps`.
        """
        opt = self.model.optimizer
        keep = {id(v) for _, layer in self._targets for v in layer.trainable_variables}
        frozen = {id(v) for v in self.model.trainable_variables if id(v) not in keep}
        boundary = self.attention_only_steps
        inner = type(opt).apply.__get__(opt)
        ops = keras.ops

        def apply(grads, trainable_variables=None):
            variables = list(trainable_variables) if trainable_variables is not None else list(
                opt._trainable_variables)
            open_ = ops.greater_equal(opt.iterations, boundary)
            grads = list(grads)
            held = [(i, v) for i, v in enumerate(variables) if id(v) in frozen]
            for i, v in held:
                if grads[i] is not None:
                    grads[i] = grads[i] * ops.cast(open_, grads[i].dtype)
            before = [ops.copy(v.value) for _, v in held]
            result = inner(grads, trainable_variables)
            for (_, v), old in zip(held, before):
                v.assign(ops.where(open_, v.value, old))
            return result

        opt.apply = apply
        self._wrapped_optimizer = opt

    # ------------------------------------------------------------- stepping

    def _assign(self, variable, value: float):
        if self._assigned.get(id(variable)) == value:
            return
        if keras.backend.backend() == "jax":
            # Mid-epoch the JAX loop keeps the state outside the variables.
            self.model.jax_state_sync()
        variable.assign(value)
        self._assigned[id(variable)] = value

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def _warn_if_resumed_mid_epoch(self, batch):
        """A restored step counter that is not at the start of this epoch: a step-level backup."""
        steps = (self.params or {}).get("steps")
        per_execution = int(getattr(self.model, "steps_per_execution", 1) or 1)
        if not steps or self._epoch == 0 or batch != 0:
            return
        boundary = self._epoch * -(-steps // per_execution) * per_execution
        if self._step > boundary:
            warnings.warn(
                f"UpTraining: resumed at optimizer step {self._step}, inside epoch {self._epoch} "
                f"(which starts at step {boundary} with {steps} steps per epoch), as a "
                "`BackupAndRestore(save_freq=<steps>)` backup does. The schedule continues "
                "exactly from that step, but Keras replays this epoch's data from its first "
                f"batch: {self._step - boundary} batch(es) are trained on twice and the result "
                "differs from an uninterrupted run. Per-epoch backups resume exactly.",
                UserWarning,
                stacklevel=2,
            )

    def on_train_batch_begin(self, batch, logs=None):
        if self._step is None:
            self._step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            self._warn_if_resumed_mid_epoch(batch)
        blend = self.blend_at(self._step)
        weight = self.distillation_weight_at(self._step) / max(len(self._targets), 1)
        for _, layer in self._targets:
            if layer.blend_variable is None:
                continue
            self._assign(layer.blend_variable, blend)
            if self.distillation_weight > 0:
                self._assign(layer.distillation_weight_variable, weight)

    def on_train_batch_end(self, batch, logs=None):
        self._step += int(getattr(self.model, "steps_per_execution", 1) or 1)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or self._step is None:
            return
        logs["blend"] = self.blend_at(self._step - 1)
        if self.distillation_weight > 0:
            logs["distillation_weight"] = self.distillation_weight_at(self._step - 1)
        if self.probe is not None:
            logs.update(self._record_fidelity(self._step))

    def on_train_end(self, logs=None):
        opt = self._wrapped_optimizer
        if opt is not None:
            del opt.apply  # back to the class method
            self._wrapped_optimizer = None
        changed = False
        for _, layer in self._targets:
            if layer._distillation_target is not None:
                layer.configure_distillation(None)
                changed = True
        if changed or opt is not None:
            self.model.train_function = None  # the next fit traces without them

    # ------------------------------------------------------------- fidelity

    def _record_fidelity(self, step: int) -> dict:
        for _, layer in self._targets:
            object.__setattr__(layer, "_fidelity_records", [])
        try:
            self.model(self.probe, training=False)
            values = {}
            for path, layer in self._targets:
                records = layer._fidelity_records
                if records:
                    values[path] = float(np.mean([float(keras.ops.convert_to_numpy(r)) for r in records]))
        finally:
            for _, layer in self._targets:
                object.__setattr__(layer, "_fidelity_records", None)
        logs = {f"fidelity/{p}": v for p, v in values.items()}
        if values:
            logs["fidelity"] = float(np.mean(list(values.values())))
        self.fidelity_history.append({"step": step, "mean": logs.get("fidelity"), **values})
        return logs
