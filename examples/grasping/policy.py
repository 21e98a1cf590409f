"""The PCT grasping policy: its architecture and what it sees.

One place for the policy's settings, shared by the closed-loop experiment
(`examples/pct_grasping.py`) and the latency benchmark
(`benchmarks/pct_latency.py`), so that both measure the same network.

The policy sees the observation of `env.GraspingEnv` made relative to the
gripper: every point minus the gripper's (x, y, z), in decimetres, so that
"which object is nearest and where" reads the same wherever the arm is;
plus the gripper state (`GRIPPER_DIM` numbers). It outputs the action
`(dx, dy, dangle)` in [-1, 1] (tanh).

    from policy import build_policy, policy_inputs
    teacher = build_policy("softmax", num_points=512)
    action = teacher(policy_inputs(obs))  # obs from GraspingEnv.reset / step
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from env import ACTION_DIM, GRIPPER_DIM  # noqa: E402

#: Scale of the gripper-relative coordinates (metres -> decimetres).
POINT_SCALE = 10.0

#: Architecture of the grasping policy (arguments of keras_sara.models.build_pct_policy).
POLICY_CONFIG = dict(
    action_dim=ACTION_DIM,
    extra_dim=GRIPPER_DIM,
    width=64,
    num_blocks=3,
    num_heads=4,
    key_dim=16,
    head_units=(128, 64),
    action_activation="tanh",
)


def build_policy(attention: str, num_points, use_mask: bool = True, feature_map="relu", name=None):
    """The grasping PCT policy with `"softmax"` (teacher) or `"sara"` attention."""
    from keras_sara.models import build_pct_policy

    return build_pct_policy(
        num_points,
        attention=attention,
        feature_map=feature_map,
        use_mask=use_mask,
        name=name or f"pct_{attention}",
        **POLICY_CONFIG,
    )


def policy_inputs(points, mask=None, gripper=None) -> dict:
    """Observation(s) -> the policy's input dict, batched, float32.

    Accepts an observation dict of `GraspingEnv` (`policy_inputs(obs)`) or
    arrays: `points` `(N, 3)` or `(B, N, 3)`, `mask` `(N,)` / `(B, N)`,
    `gripper` `(6,)` / `(B, 6)`. Padded points (mask False) may hold
    anything, NaN included, and come out exactly zero; a non-finite point
    marked valid is an error (the policy would act on garbage), and so is
    a cloud with no valid point at all.
    """
    if isinstance(points, dict):
        points, mask, gripper = points["points"], points["mask"], points["gripper"]
    points = np.asarray(points, np.float32)
    mask = np.asarray(mask, bool)
    gripper = np.asarray(gripper, np.float32)
    if points.ndim == 2:
        points, mask, gripper = points[None], mask[None], gripper[None]
    if points.ndim != 3 or points.shape[-1] != 3:
        raise ValueError(f"`points` must have shape (N, 3) or (B, N, 3). Received: shape={points.shape}")
    if mask.shape != points.shape[:2]:
        raise ValueError(f"`mask` must have shape {points.shape[:2]}. Received: shape={mask.shape}")
    if gripper.shape != (points.shape[0], GRIPPER_DIM):
        raise ValueError(
            f"`gripper` must have shape {(points.shape[0], GRIPPER_DIM)}. Received: shape={gripper.shape}"
        )
    empty = ~mask.any(axis=1)
    if empty.any():
        raise ValueError(
            f"`mask` has no valid point in cloud(s) {np.flatnonzero(empty).tolist()}: an empty cloud "
            "gives the policy nothing to act on. Check the camera and the crop, or skip the step."
        )
    bad = mask & ~np.isfinite(points).all(-1)
    if bad.any():
        raise ValueError(
            f"`points` has {int(bad.sum())} non-finite point(s) marked valid in `mask`: drop them "
            "or set their mask to False (padded points may hold anything)."
        )
    if not np.isfinite(gripper).all():
        raise ValueError(f"`gripper` must be finite. Received: gripper={gripper!r}")
    relative = (points - gripper[:, None, :3]) * POINT_SCALE
    relative = np.where(mask[..., None], relative, 0.0).astype(np.float32)
    return {"points": relative, "mask": mask, "extra": gripper}
