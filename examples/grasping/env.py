"""pybullet's KukaDiverseObjectEnv, headless, with depth point-cloud observations.

`KukaDiverseObjectEnv` (in the `pybullet` wheel, `pybullet_envs.bullet`) is a
grasping environment written by others: a Kuka arm with a two-finger
gripper over a tray of 5 random objects drawn from 1,000 procedurally
generated ones, an 8-step episode, and its own success reward (1 when an
object ends above 0.2 m). With its default "height hack" the gripper
descends 6 cm per step by itself and grasps once it is low enough; the
policy chooses `(dx, dy, dangle)` in [-1, 1]^3.

It was written for old gym. Importing it needs `gym`, `gym.spaces`,
`gym.utils.seeding` and `pkg_resources`, and `pybullet_envs/__init__.py`
calls `registry.env_specs`, which gym 0.26 removed. `import_env_class`
imports it under a minimal stand-in for those modules (only what the
import and the environment use), installed in `sys.modules` for the
import only and removed afterwards, so no gym package is needed and a
real one, if installed, is left as it was.

`GraspingEnv` wraps it:

- `reset(seed)` seeds both random generators the environment draws from
  (`random` and `numpy.random`), so a seed fixes the object set, their
  poses and the camera; the object files are listed in sorted order (the
  original lists them in the file system's order, which differs between
  machines).
- Observations are dicts:
  `points` (N, 3) float32: the depth camera's point cloud in the world
  frame (metres), cropped to the tray and resampled to N points (a random
  subset when more are visible; all of them then zero rows when fewer);
  `mask` (N,) bool: False on the padding rows;
  `gripper` (6,) float32: the gripper state (end-effector x, y, z, sin and
  cos of its yaw, finger opening);
  `num_visible`: the number of cropped points before resampling;
  `image` (camera, camera, 3) uint8: the RGB frame of the same render
  (the environment's own observation; the camera does not move).
  Points are never NaN: non-finite back-projections and the background
  are dropped before resampling. An empty cloud is all padding (mask all
  False).
- The cloud holds the objects and the gripper. The static scene (tray,
  table, floor) is removed through the renderer's segmentation buffer, the
  simulated counterpart of subtracting a depth image of the empty tray:
  measured at 64x64 pixels, 80% of the cropped points were the tray's
  walls and floor, leaving the objects a fifth of the point budget.
  `keep_tray=True` keeps the walls (the floor is dropped by height).
- The camera is rendered once per step (the original renders RGB only; the
  wrapper keeps the depth and segmentation buffers of the same call).

Run this file to print one observation and the point counts:

    python examples/grasping/env.py --num-points 1024 --camera 128
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import os
import random
import sys
import time
import types

import numpy as np

NUM_POINTS = 1024
CAMERA = 128  # square camera image, pixels per side
NUM_OBJECTS = 5
MAX_STEPS = 8
GRIPPER_DIM = 6
ACTION_DIM = 3  # dx, dy, dangle in [-1, 1] (the default "height hack" lowers z itself)
# Crop, in the world frame (metres): the tray's bounding box (x 0.34..0.94,
# y -0.25..0.37, floor at z -0.184) up to 0.35 m, high enough to see the
# gripper's fingers from the start of an episode down to the grasp.
CROP_LOW = np.array([0.34, -0.25, -0.20], np.float32)
CROP_HIGH = np.array([0.94, 0.37, 0.35], np.float32)
#: Height of the tray's floor; with `keep_tray=True` points below
#: FLOOR_Z + FLOOR_MARGIN are dropped.
FLOOR_Z = -0.184
FLOOR_MARGIN = 0.004
#: Visible points per frame (objects and gripper) by camera size: 5th
#: percentile, median and 95th percentile over the frames of scripted-expert
#: episodes (seeds 0-5; 0-2 for 384), and the median CPU time of one render.
#: Choose the camera so that N is below the 5th percentile to avoid padding.
VISIBLE_POINTS = {
    64: dict(p5=283, median=391, p95=485, render_ms=10),
    128: dict(p5=1148, median=1561, p95=1935, render_ms=26),
    192: dict(p5=2591, median=3526, p95=4362, render_ms=72),
    256: dict(p5=4615, median=6263, p95=7756, render_ms=106),
    384: dict(p5=10912, median=14027, p95=17385, render_ms=193),
}
#: A fixed point near the middle of the tray, for centring points in a model.
TRAY_CENTER = np.array([0.64, 0.075, -0.17], np.float32)

_ENV_MODULE = "pybullet_envs.bullet.kuka_diverse_object_gym_env"


# ----------------------------------------------------------------- import fix


class _Space:
    """The part of `gym.spaces.Box` / `Discrete` the environment touches."""

    def __init__(self, low=None, high=None, shape=None, n=None, dtype=np.float32):
        self.n = n
        if n is not None:
            self.shape, self.low, self.high = (), 0, n - 1
            return
        low = np.asarray(low, np.float32)
        self.shape = tuple(shape) if shape is not None else low.shape
        self.low = np.broadcast_to(low, self.shape).astype(np.float32)
        self.high = np.broadcast_to(np.asarray(high, np.float32), self.shape).astype(np.float32)

    def sample(self, rng=None):
        rng = rng or np.random.default_rng()
        if self.n is not None:
            return int(rng.integers(self.n))
        return rng.uniform(self.low, self.high).astype(np.float32)


def _shim_modules() -> dict:
    """Stand-ins for the old-gym modules (and `pkg_resources`) that the import needs."""
    gym = types.ModuleType("gym")
    gym.__version__ = "0.26.2"  # >= 0.9.6: the environment then defines no `_reset` aliases

    class Env:
        metadata: dict = {}

    gym.Env = Env
    spaces = types.ModuleType("gym.spaces")
    spaces.Box = lambda low, high, shape=None, dtype=np.float32: _Space(low, high, shape)
    spaces.Discrete = lambda n: _Space(n=n)
    utils = types.ModuleType("gym.utils")
    seeding = types.ModuleType("gym.utils.seeding")

    def np_random(seed=None):
        return np.random.RandomState(seed), seed

    seeding.np_random = np_random
    utils.seeding = seeding
    envs = types.ModuleType("gym.envs")
    registration = types.ModuleType("gym.envs.registration")
    registration.registry = types.SimpleNamespace(env_specs={})
    registration.register = lambda *args, **kwargs: None
    registration.make = registration.spec = lambda *args, **kwargs: None
    envs.registration = registration
    gym.spaces, gym.utils, gym.envs = spaces, utils, envs
    modules = {
        "gym": gym,
        "gym.spaces": spaces,
        "gym.utils": utils,
        "gym.utils.seeding": seeding,
        "gym.envs": envs,
        "gym.envs.registration": registration,
    }
    try:
        import pkg_resources  # noqa: F401  (setuptools < 81 still ships it)
    except ImportError:
        from packaging.version import parse

        pkg_resources = types.ModuleType("pkg_resources")
        pkg_resources.parse_version = parse
        modules["pkg_resources"] = pkg_resources
    return modules


def import_env_class():
    """`KukaDiverseObjectEnv`, imported without gym (see the module docstring)."""
    if _ENV_MODULE in sys.modules:
        return sys.modules[_ENV_MODULE].KukaDiverseObjectEnv
    shims = _shim_modules()
    saved = {name: sys.modules.get(name) for name in shims}
    saved_path = list(sys.path)
    try:
        sys.modules.update(shims)
        # the package prints its directory and prepends itself to sys.path
        with contextlib.redirect_stdout(io.StringIO()):
            import importlib

            module = importlib.import_module(_ENV_MODULE)
    finally:
        sys.path[:] = saved_path
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return module.KukaDiverseObjectEnv


# -------------------------------------------------------------- point clouds


def _matrix(flat) -> np.ndarray:
    """pybullet's column-major 16-tuple as a 4x4 matrix."""
    return np.asarray(flat, np.float64).reshape(4, 4, order="F")


def depth_to_points(depth, view_matrix, proj_matrix) -> np.ndarray:
    """Back-project an OpenGL depth buffer to world-frame points.

    Args:
        depth: `(H, W)` depth buffer in [0, 1] from `getCameraImage`.
        view_matrix, proj_matrix: the camera's matrices as pybullet gives
            them (column-major 16-tuples).

    Returns:
        `(H * W, 3)` float64 world coordinates, row-major over pixels;
        background pixels (depth 1, the far plane) come out far away and
        are removed by the crop.
    """
    depth = np.asarray(depth, np.float64)
    h, w = depth.shape
    cols, rows = np.meshgrid(np.arange(w), np.arange(h))  # (H, W) each
    ndc = np.stack(
        [
            (2.0 * cols + 1.0) / w - 1.0,  # pixel centres, x to the right
            1.0 - (2.0 * rows + 1.0) / h,  # image rows grow downwards
            2.0 * depth - 1.0,
            np.ones_like(depth),
        ],
        axis=-1,
    ).reshape(-1, 4)  # (H*W, 4)
    inverse = np.linalg.inv(_matrix(proj_matrix) @ _matrix(view_matrix))
    world = ndc @ inverse.T  # (H*W, 4), homogeneous
    with np.errstate(divide="ignore", invalid="ignore"):
        return world[:, :3] / world[:, 3:]


def crop_to_tray(points, low=CROP_LOW, high=CROP_HIGH, floor_z=FLOOR_Z + FLOOR_MARGIN) -> np.ndarray:
    """Finite points inside the tray box and above its floor, float32 `(M, 3)`."""
    points = np.asarray(points)
    keep = np.all(np.isfinite(points), axis=1)
    keep &= np.all((points >= low) & (points <= high), axis=1)
    keep &= points[:, 2] > floor_z
    return points[keep].astype(np.float32)


def resample(points, num_points, rng) -> tuple[np.ndarray, np.ndarray]:
    """`num_points` rows: a random subset, or every point then zero padding.

    Returns `(points (N, 3) float32, mask (N,) bool)`; `mask` is False on
    padding rows. An empty cloud gives all-padding (mask all False): a
    policy must then rely on its other inputs (the PCT policy pools a fully
    masked cloud to zeros).
    """
    if isinstance(num_points, bool) or not isinstance(num_points, (int, np.integer)) or num_points < 1:
        raise ValueError(f"`num_points` must be a positive integer. Received: num_points={num_points!r}")
    points = np.asarray(points, np.float32).reshape(-1, 3)
    out = np.zeros((num_points, 3), np.float32)
    mask = np.zeros((num_points,), bool)
    if len(points) >= num_points:
        out[:] = points[rng.choice(len(points), num_points, replace=False)]
        mask[:] = True
    else:
        out[: len(points)] = points[rng.permutation(len(points))]
        mask[: len(points)] = True
    return out, mask


# --------------------------------------------------------------- environment


def _make_env_class():
    base = import_env_class()

    class _PointCloudKukaEnv(base):
        """Renders RGB and depth in one call; lists object files in sorted order."""

        def __del__(self):
            # The original disconnects pybullet's default client when garbage
            # collected, which may by then be another environment's: the
            # wrapper's `close()` disconnects its own client instead.
            pass

        def _get_observation(self):
            import pybullet as p

            _, _, rgb, depth, seg = p.getCameraImage(
                width=self._width,
                height=self._height,
                viewMatrix=self._view_matrix,
                projectionMatrix=self._proj_matrix,
            )
            self._depth = np.reshape(depth, (self._height, self._width))
            self._segmentation = np.reshape(seg, (-1,))  # body id per pixel, -1 background
            self._rgb = np.asarray(rgb, np.uint8).reshape(self._height, self._width, 4)[:, :, :3]
            return self._rgb

        def _get_random_object(self, num_objects, test):
            # the original's glob order is the file system's: sort it so that a
            # seed names the same objects on every machine
            pattern = "random_urdfs/*0/*.urdf" if test else "random_urdfs/*[1-9]/*.urdf"
            files = sorted(glob.glob(os.path.join(self._urdfRoot, pattern)))
            chosen = np.random.choice(np.arange(len(files)), num_objects)
            return [files[i] for i in chosen]

    return _PointCloudKukaEnv


class GraspingEnv:
    """Headless `KukaDiverseObjectEnv` with point-cloud observations.

    pybullet drives one simulation per process through module-level calls,
    so make one `GraspingEnv` per process (and `close()` it).

    Args:
        num_points: points per observation, N (512 to 8,192 is the range the
            experiments use; any positive integer works).
        camera: width and height of the square camera image. The number of
            visible points grows with its square (VISIBLE_POINTS lists
            measured counts); so does the rendering time, small next to
            the simulation's.
        num_objects, max_steps: as in `KukaDiverseObjectEnv`.
        is_test: draw objects from the held-out 10% of the object set.
        keep_tray: keep the tray's walls in the cloud (dropping only its
            floor by height) instead of removing the static scene.

    Example:

        env = GraspingEnv(num_points=1024)
        obs = env.reset(seed=0)
        obs, reward, done, info = env.step(np.zeros(3))
    """

    def __init__(self, num_points=NUM_POINTS, camera=CAMERA, num_objects=NUM_OBJECTS,
                 max_steps=MAX_STEPS, is_test=False, keep_tray=False):
        if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
            raise ValueError(f"`num_points` must be a positive integer. Received: num_points={num_points!r}")
        if isinstance(camera, bool) or not isinstance(camera, int) or camera < 8:
            raise ValueError(f"`camera` must be an integer >= 8 (pixels). Received: camera={camera!r}")
        self.num_points = num_points
        self.camera = camera
        self.keep_tray = bool(keep_tray)
        env_class = _make_env_class()
        import pybullet as p

        if p.isConnected():
            # the environment's pybullet calls all go to the default client
            raise RuntimeError(
                "pybullet is already connected in this process: KukaDiverseObjectEnv "
                "drives pybullet's default client, so only one GraspingEnv can run per "
                "process. Close the other one first (`env.close()`)."
            )
        self.env = env_class(
            renders=False,
            isDiscrete=False,
            width=camera,
            height=camera,
            numObjects=num_objects,
            maxSteps=max_steps,
            isTest=is_test,
        )
        self._rng = np.random.default_rng(0)
        self._done = True

    # ------------------------------------------------------------- episodes

    def reset(self, seed: int) -> dict:
        """Start an episode; the seed fixes objects, their poses and the resampling."""
        random.seed(seed)
        np.random.seed(seed)
        self._rng = np.random.default_rng(seed)
        self.env.reset()
        self._done = False
        return self.observation()

    def step(self, action):
        """Apply `(dx, dy, dangle)` in [-1, 1]; returns `(obs, reward, done, info)`."""
        if self._done:
            raise RuntimeError("The episode is over: call `reset(seed)` first.")
        action = np.asarray(action, np.float64).reshape(-1)
        if action.shape != (ACTION_DIM,) or not np.all(np.isfinite(action)):
            raise ValueError(
                f"`action` must hold {ACTION_DIM} finite numbers (dx, dy, dangle). "
                f"Received: action={action!r}"
            )
        _, reward, done, info = self.env.step(np.clip(action, -1.0, 1.0))
        self._done = bool(done)
        return self.observation(), float(reward), self._done, info

    def close(self):
        import pybullet as p

        if p.isConnected(physicsClientId=self.env.cid):
            p.disconnect(physicsClientId=self.env.cid)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --------------------------------------------------------------- state

    def observation(self) -> dict:
        cloud = self.visible_points()
        points, mask = resample(cloud, self.num_points, self._rng)
        return {"points": points, "mask": mask, "gripper": self.gripper_state(), "num_visible": len(cloud),
                "image": self.env._rgb.copy()}

    def visible_points(self) -> np.ndarray:
        """Every cropped point of the current depth image, `(M, 3)` float32."""
        world = depth_to_points(self.env._depth, self.env._view_matrix, self.env._proj_matrix)
        if self.keep_tray:
            return crop_to_tray(world)
        moving = list(self.env._objectUids) + [self.env._kuka.kukaUid]
        world = world[np.isin(self.env._segmentation, moving)]
        return crop_to_tray(world, floor_z=-np.inf)

    def gripper_state(self) -> np.ndarray:
        """(x, y, z) of the end effector (m), sin and cos of its yaw, finger opening (rad)."""
        import pybullet as p

        kuka = self.env._kuka
        position = p.getLinkState(kuka.kukaUid, kuka.kukaEndEffectorIndex)[0]
        yaw = p.getJointState(kuka.kukaUid, 7)[0]  # the wrist joint the yaw action drives
        finger = p.getJointState(kuka.kukaUid, 11)[0]
        return np.array([*position, np.sin(yaw), np.cos(yaw), finger], np.float32)

    def object_positions(self) -> np.ndarray:
        """World positions of the objects, `(num_objects, 3)` (simulator state, for the expert)."""
        import pybullet as p

        return np.array([p.getBasePositionAndOrientation(uid)[0] for uid in self.env._objectUids])

    def commanded_position(self) -> np.ndarray:
        """Where the arm's controller is taking the end effector (x, y, z)."""
        return np.array(self.env._kuka.endEffectorPos, np.float64)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-points", type=int, default=NUM_POINTS)
    parser.add_argument("--camera", type=int, default=CAMERA)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    env = GraspingEnv(num_points=args.num_points, camera=args.camera)
    start = time.perf_counter()
    obs = env.reset(seed=args.seed)
    print(f"reset: {time.perf_counter() - start:.2f} s")
    for name, value in obs.items():
        print(name, getattr(value, "shape", value), getattr(value, "dtype", ""))
    print("visible tray points:", obs["num_visible"], "gripper:", np.round(obs["gripper"], 3))
    done = False
    while not done:
        obs, reward, done, info = env.step(np.zeros(ACTION_DIM))
        print(f"step: visible {obs['num_visible']}, gripper z {obs['gripper'][2]:.3f}, reward {reward}")
    env.close()


if __name__ == "__main__":
    main()
