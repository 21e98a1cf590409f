"""Collect scripted-expert grasping demonstrations in pybullet, cached to an .npz file.

Plays the scripted expert (`expert.py`) in `KukaDiverseObjectEnv` on the
seeds `first_seed, first_seed + 1, ...` until `demos` episodes succeeded,
and keeps every (observation, action) pair of the successful episodes only.
The same arguments always give the same seeds, so the same object sets.

The cache file (under `--cache-dir`, default
`examples/results/grasping/cache/`, ignored by git) is named after every
setting that changes its content and holds:

    points       (F, N, 3) float32  world-frame cloud, zero rows where padded
    mask         (F, N)    bool     True for real points
    gripper      (F, 6)    float32  end-effector x, y, z, sin/cos yaw, finger
    actions      (F, 3)    float32  the expert's (dx, dy, dangle) in [-1, 1]
    episode      (F,)      int32    index of the demonstration (0..demos-1)
    step         (F,)      int32    step within the episode
    num_visible  (F,)      int32    cropped points before resampling
    image        (F, C, C, 3) uint8 the RGB camera frame (only with `images=True`,
                                    `--images`; the file name then starts `img_`)
    demo_seeds   (demos,)  int64    seed of each demonstration
    tried_seeds  (E,)      int64    every seed played, success or not
    tried_success(E,)      bool     whether it succeeded
    seconds      (E,)      float64  wall time of each episode
    cpu_seconds  (E,)      float64  CPU time of each episode (this process)

A run that finds its file loads it instead of simulating. Files are
written atomically (a temporary file, then a rename), so an interrupted run
never leaves a truncated cache.

    python examples/grasping/collect.py --demos 20 --num-points 1024
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from keras_sara.utils import atomic_write

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from env import CAMERA, GraspingEnv  # noqa: E402
from expert import ScriptedExpert, run_episode  # noqa: E402

DEMOS = 20
NUM_POINTS = 1024
FIRST_SEED = 0
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE_DIR = os.path.join(ROOT, "examples", "results", "grasping", "cache")
PERTURBED_STEPS = 6  # states recorded per perturbed episode (the env grasps at about step 7)
FORMAT_VERSION = 1  # bump when the file's content or the environment's settings change


#: dtype of each per-frame array of a cache file
FRAME_DTYPES = dict(points="float32", mask="bool", gripper="float32", actions="float32",
                    episode="int32", step="int32", num_visible="int32", image="uint8")


def _frame_keys(images: bool) -> list:
    return [k for k in FRAME_DTYPES if images or k != "image"]


def cache_path(cache_dir, demos, num_points, camera, first_seed, images=False) -> str:
    name = f"{'img_' if images else ''}expert_v{FORMAT_VERSION}_k{demos}_n{num_points}_c{camera}_s{first_seed}.npz"
    return os.path.join(cache_dir, name)


class Progress:
    """A one-line text progress bar on stderr (no dependency)."""

    def __init__(self, total, label, stream=sys.stderr, enabled=True):
        self.total, self.label, self.stream, self.enabled = total, label, stream, enabled
        self.start = time.perf_counter()

    def update(self, done, note=""):
        if not self.enabled:
            return
        width = 30
        filled = int(width * done / max(self.total, 1))
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total - done) if done else float("nan")
        self.stream.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
            f"{elapsed:.0f}s elapsed, eta {eta:.0f}s {note}   "
        )
        self.stream.flush()

    def close(self):
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def collect(demos, num_points=NUM_POINTS, camera=CAMERA, first_seed=FIRST_SEED,
            max_episodes=None, progress=True, images=False) -> dict:
    """Play the expert until `demos` episodes succeed; return the arrays listed above."""
    if isinstance(demos, bool) or not isinstance(demos, int) or demos < 1:
        raise ValueError(f"`demos` must be a positive integer. Received: demos={demos!r}")
    max_episodes = max_episodes or 4 * demos + 20
    frames = {k: [] for k in _frame_keys(images)}
    demo_seeds, tried, succeeded, seconds, cpu_seconds = [], [], [], [], []
    bar = Progress(demos, "demonstrations", enabled=progress)
    env = GraspingEnv(num_points=num_points, camera=camera)
    try:
        expert = ScriptedExpert()
        seed = first_seed
        while len(demo_seeds) < demos:
            if len(tried) >= max_episodes:
                raise RuntimeError(
                    f"Only {len(demo_seeds)} of {demos} demonstrations succeeded in "
                    f"{len(tried)} episodes (`max_episodes`={max_episodes}): raise `max_episodes`."
                )
            result = run_episode(env, expert, seed, record=True)
            tried.append(seed)
            succeeded.append(result["success"])
            seconds.append(result["seconds"])
            cpu_seconds.append(result["cpu_seconds"])
            if result["success"]:
                index = len(demo_seeds)
                demo_seeds.append(seed)
                for step, (obs, action) in enumerate(zip(result["observations"], result["actions"])):
                    frames["points"].append(obs["points"])
                    frames["mask"].append(obs["mask"])
                    frames["gripper"].append(obs["gripper"])
                    frames["actions"].append(action)
                    frames["episode"].append(index)
                    frames["step"].append(step)
                    frames["num_visible"].append(obs["num_visible"])
                    if images:
                        frames["image"].append(obs["image"])
            bar.update(len(demo_seeds), f"({len(tried)} episodes, expert success {np.mean(succeeded):.0%})")
            seed += 1
    finally:
        bar.close()
        env.close()
    data = {k: np.asarray(v, dtype=FRAME_DTYPES[k]) for k, v in frames.items()}
    if images and not len(data["image"]):
        data["image"] = np.zeros((0, camera, camera, 3), np.uint8)
    data.update(
        demo_seeds=np.asarray(demo_seeds, np.int64),
        tried_seeds=np.asarray(tried, np.int64),
        tried_success=np.asarray(succeeded, bool),
        seconds=np.asarray(seconds, np.float64),
        cpu_seconds=np.asarray(cpu_seconds, np.float64),
    )
    return data


def perturbed_cache_path(cache_dir, episodes, num_points, camera, first_seed, noise, images=False) -> str:
    name = f"{'img_' if images else ''}perturbed_v{FORMAT_VERSION}_e{episodes}_n{num_points}_c{camera}_s{first_seed}_z{noise:g}.npz"
    return os.path.join(cache_dir, name)


def collect_perturbed(episodes, num_points=NUM_POINTS, camera=CAMERA, first_seed=FIRST_SEED,
                      noise=0.3, random_prob=0.25, steps=PERTURBED_STEPS, progress=True, images=False) -> dict:
    """Expert labels on states off the expert's path (DART-style noise injection).

    Behaviour cloning from successful demonstrations alone never shows the
    policy a gripper that is off target, so one early mistake leads to
    states it has never seen. Here each episode (seed `first_seed + i`)
    executes the expert's action plus Gaussian noise (`noise`, per axis), or
    with probability `random_prob` a uniform random action, and records at
    every state the action the expert would take there: move straight
    towards the reachable object nearest to the gripper *now* (the expert
    re-targets at every step, so the label depends on the observation only).
    Only the first `steps` states are recorded and the episode is cut before
    the final descent and grasp (the slow part of the simulation), so no
    success is known: these frames have the same keys as `collect`'s, with
    `episode` counting from 0, and `seeds` instead of the demo/tried arrays.
    """
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"`episodes` must be a positive integer. Received: episodes={episodes!r}")
    if not (isinstance(noise, (int, float)) and noise >= 0):
        raise ValueError(f"`noise` must be a number >= 0. Received: noise={noise!r}")
    frames = {k: [] for k in _frame_keys(images)}
    bar = Progress(episodes, "perturbed episodes", enabled=progress)
    env = GraspingEnv(num_points=num_points, camera=camera)
    expert = ScriptedExpert()
    try:
        for i in range(episodes):
            seed = first_seed + i
            obs = env.reset(seed)
            rng = np.random.default_rng([seed, 7])
            for step in range(steps):
                expert.reset(env)  # re-target: the nearest reachable object from here
                action = expert(env, obs)
                for key, value in (("points", obs["points"]), ("mask", obs["mask"]), ("gripper", obs["gripper"]),
                                   ("actions", action), ("episode", i), ("step", step),
                                   ("num_visible", obs["num_visible"]), ("image", obs["image"])):
                    if key in frames:
                        frames[key].append(value)
                if step == steps - 1:
                    break
                if rng.random() < random_prob:
                    executed = rng.uniform(-1.0, 1.0, 3)
                else:
                    executed = action + rng.normal(0.0, noise, 3)
                obs, _, done, _ = env.step(np.clip(executed, -1.0, 1.0))
                if done:
                    break
            bar.update(i + 1)
    finally:
        bar.close()
        env.close()
    data = {k: np.asarray(v, dtype=FRAME_DTYPES[k]) for k, v in frames.items()}
    data["seeds"] = np.arange(first_seed, first_seed + episodes, dtype=np.int64)
    return data


def load_or_collect_perturbed(episodes, num_points=NUM_POINTS, camera=CAMERA, first_seed=FIRST_SEED,
                              noise=0.3, cache_dir=CACHE_DIR, progress=True, images=False) -> tuple[dict, str, bool]:
    """`collect_perturbed`'s frames, from the cache or collected (then cached)."""
    path = perturbed_cache_path(cache_dir, episodes, num_points, camera, first_seed, noise, images)
    if os.path.exists(path):
        with np.load(path) as f:
            return {k: f[k] for k in f.files}, path, True
    data = collect_perturbed(episodes, num_points, camera, first_seed, noise, progress=progress, images=images)
    save_atomically(path, data)
    return data, path, False


def save_atomically(path, arrays) -> None:
    """`np.savez` to a temporary file in the same directory, then rename it over `path`."""
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def load_or_collect(demos=DEMOS, num_points=NUM_POINTS, camera=CAMERA, first_seed=FIRST_SEED,
                    cache_dir=CACHE_DIR, max_episodes=None, progress=True, images=False) -> tuple[dict, str, bool]:
    """The cached demonstrations for these settings, collected first if missing.

    Returns `(arrays, path, loaded)`; `loaded` is True when the cache was hit.
    """
    path = cache_path(cache_dir, demos, num_points, camera, first_seed, images)
    if os.path.exists(path):
        with np.load(path) as f:
            return {k: f[k] for k in f.files}, path, True
    data = collect(demos, num_points, camera, first_seed, max_episodes, progress, images)
    save_atomically(path, data)
    return data, path, False


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demos", type=int, default=DEMOS, help="successful episodes to record")
    parser.add_argument("--num-points", type=int, default=NUM_POINTS, help="points per cloud, N")
    parser.add_argument("--camera", type=int, default=CAMERA, help="camera image side in pixels")
    parser.add_argument("--first-seed", type=int, default=FIRST_SEED)
    parser.add_argument("--max-episodes", type=int, default=None)
    parser.add_argument("--cache-dir", default=CACHE_DIR)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--images", action="store_true", help="also record the RGB camera frames")
    args = parser.parse_args()
    data, path, loaded = load_or_collect(
        args.demos, args.num_points, args.camera, args.first_seed, args.cache_dir,
        args.max_episodes, progress=not args.no_progress, images=args.images,
    )
    success = data["tried_success"]
    visible = data["num_visible"]
    print(f"{'loaded' if loaded else 'wrote'} {path}")
    print(
        f"{len(data['demo_seeds'])} demonstrations, {len(data['actions'])} frames, from "
        f"{len(success)} episodes (seeds {data['tried_seeds'][0]}..{data['tried_seeds'][-1]}); "
        f"expert success {success.mean():.1%}; {data['seconds'].mean():.2f} s per episode "
        f"({data['cpu_seconds'].mean():.2f} s CPU)"
    )
    print(
        f"visible points per frame (camera {args.camera}): min {visible.min()}, median "
        f"{int(np.median(visible))}, max {visible.max()}; frames padded to N={args.num_points}: "
        f"{np.mean(visible < args.num_points):.0%}"
    )


if __name__ == "__main__":
    main()
