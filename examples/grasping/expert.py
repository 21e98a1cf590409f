"""A scripted grasping expert that reads the simulator's state, and a random policy.

The expert picks, at the start of an episode, the object nearest to the
gripper among those its workspace can reach (the arm's controller clips the
gripper to x 0.50..0.65, y -0.17..0.22, and objects fall anywhere in
x 0.40..0.70, y -0.15..0.15), then at every step moves the gripper straight
towards that object's current position, as fast as the action allows
(6 cm per step). The environment lowers the gripper by itself and closes it
once low enough. The expert does not turn the gripper (dangle = 0).

`run_episode` plays one episode of any policy and returns what happened:
the observations and actions (what `collect.py` records for successful
expert episodes), the reward and the time taken.

Run this file to measure success rates over fixed seeds:

    python examples/grasping/expert.py --episodes 50
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from env import ACTION_DIM, CAMERA, GraspingEnv  # noqa: E402

EPISODES = 50
FIRST_SEED = 0
#: The arm controller's clip box for the gripper (pybullet_envs.bullet.kuka).
WORKSPACE_LOW = np.array([0.50, -0.17])
WORKSPACE_HIGH = np.array([0.65, 0.22])
STEP = 0.06  # metres per unit action (the environment's `dv`)
REACH_TOLERANCE = 0.03  # an object this far outside the workspace still counts as reachable


class ScriptedExpert:
    """Moves the gripper over the nearest reachable object (simulator state)."""

    def __init__(self):
        self.target = None

    def reset(self, env: GraspingEnv) -> None:
        objects = env.object_positions()[:, :2]  # (num_objects, 2)
        gripper = env.commanded_position()[:2]
        outside = np.linalg.norm(objects - np.clip(objects, WORKSPACE_LOW, WORKSPACE_HIGH), axis=1)
        distance = np.linalg.norm(objects - gripper, axis=1)
        reachable = outside <= REACH_TOLERANCE
        # nearest reachable object; if none is, the one that sticks out least
        self.target = int(np.argmin(np.where(reachable, distance, np.inf))) if reachable.any() else int(np.argmin(outside))

    def __call__(self, env: GraspingEnv, obs: dict) -> np.ndarray:
        goal = np.clip(env.object_positions()[self.target, :2], WORKSPACE_LOW, WORKSPACE_HIGH)
        delta = (goal - env.commanded_position()[:2]) / STEP
        return np.array([*np.clip(delta, -1.0, 1.0), 0.0], np.float32)


class RandomPolicy:
    """Uniform random actions in [-1, 1]^3 (seeded per episode)."""

    def __init__(self):
        self.rng = np.random.default_rng(0)

    def reset(self, env: GraspingEnv, seed: int = 0) -> None:
        self.rng = np.random.default_rng(10_000 + seed)

    def __call__(self, env: GraspingEnv, obs: dict) -> np.ndarray:
        return self.rng.uniform(-1.0, 1.0, ACTION_DIM).astype(np.float32)


def run_episode(env: GraspingEnv, policy, seed: int, record: bool = False) -> dict:
    """Play one episode of `policy` (a callable `(env, obs) -> action`) from `seed`.

    Returns a dict: `success` (the environment's reward at the end), `steps`,
    `seconds` (wall) and `cpu_seconds` (this process; steadier on a shared
    machine), `num_visible` (visible points per observation) and, with
    `record=True`, `observations` (the dicts the policy saw) and `actions`.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    obs = env.reset(seed)
    if hasattr(policy, "reset"):
        if isinstance(policy, RandomPolicy):
            policy.reset(env, seed)
        else:
            policy.reset(env)
    observations, actions, visible = [], [], [obs["num_visible"]]
    done, reward = False, 0.0
    while not done:
        action = np.asarray(policy(env, obs), np.float32)
        if record:
            observations.append(obs)
            actions.append(action)
        obs, reward, done, _ = env.step(action)
        visible.append(obs["num_visible"])
    result = {
        "seed": seed,
        "success": bool(reward > 0),
        "steps": len(visible) - 1,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "num_visible": visible,
    }
    if record:
        result["observations"], result["actions"] = observations, actions
    return result


def success_rate(successes) -> tuple[float, float, float]:
    """Success rate and its 95% Wilson interval."""
    n = len(successes)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    p, z = float(np.mean(successes)), 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, max(0.0, centre - half), min(1.0, centre + half)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=EPISODES)
    parser.add_argument("--first-seed", type=int, default=FIRST_SEED)
    parser.add_argument("--camera", type=int, default=CAMERA)
    parser.add_argument("--policies", default="expert,random")
    args = parser.parse_args()
    env = GraspingEnv(num_points=512, camera=args.camera)
    seeds = range(args.first_seed, args.first_seed + args.episodes)
    policies = {"expert": ScriptedExpert(), "random": RandomPolicy()}
    for name in args.policies.split(","):
        results = [run_episode(env, policies[name], s) for s in seeds]
        rate, low, high = success_rate([r["success"] for r in results])
        seconds = np.array([r["seconds"] for r in results])
        cpu = np.array([r["cpu_seconds"] for r in results])
        visible = np.concatenate([r["num_visible"] for r in results])
        print(
            f"{name:>6}: success {rate:.1%} (95% CI {low:.1%}..{high:.1%}) over {len(results)} episodes "
            f"(seeds {seeds.start}..{seeds.stop - 1}); {seconds.mean():.2f} s/episode "
            f"(median {np.median(seconds):.2f}, CPU {cpu.mean():.2f}); visible points per frame at camera {args.camera}: "
            f"min {visible.min()}, median {int(np.median(visible))}, max {visible.max()}"
        )
    env.close()


if __name__ == "__main__":
    main()
