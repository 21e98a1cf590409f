"""Closed-loop evaluation shared by the grasping experiments: fixed seeds, parallel simulators, resumable.

Every policy plays the same episodes (the same seeds, so the same objects
in the same places) in `workers` pybullet processes. Each (policy,
simulator share) is written to `out_dir/episodes/<policy>.part<w>of<W>.json`
when done, so an interrupted evaluation resumes from the last finished
share. `summarise` gives success rates with 95% Wilson intervals and
paired differences over the same seeds.

A policy is loaded inside each simulator process by `load_policy(name,
out_dir)`, a module-level function of the caller (it is sent to spawned
processes by reference), returning a callable `(env, obs) -> action` with
an optional `reset(env)`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time

import numpy as np

from keras_sara.utils import atomic_write

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

#: First seed of the evaluation episodes: far from every training seed (0+, 10,000+, 20,000+, 30,000+).
EVAL_FIRST_SEED = 1_000_000


def log(tag: str, message: str) -> None:
    print(f"[{tag} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _dump_json(path, payload) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=_json_default)


def write_json(path, payload) -> None:
    """JSON (numpy values included), written atomically."""
    atomic_write(path, lambda tmp: _dump_json(tmp, payload))


def shard_path(out_dir, policy_name, worker, workers):
    return os.path.join(out_dir, "episodes", f"{policy_name}.part{worker}of{workers}.json")


def _evaluate_shard(job):
    """One worker, one pybullet simulation: every policy on its share of the seeds."""
    policy_names, seeds, worker, workers, out_dir, load_policy, env_kwargs, tag = job
    import tensorflow as tf

    try:  # a spawned worker: one thread each; in the calling process TensorFlow may already run
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass
    from env import GraspingEnv
    from expert import run_episode

    with GraspingEnv(**env_kwargs) as env:
        for name in policy_names:
            path = shard_path(out_dir, name, worker, workers)
            if os.path.exists(path):
                with open(path) as f:
                    if [e["seed"] for e in json.load(f)] == list(seeds):
                        continue
            policy, start, out = load_policy(name, out_dir), time.perf_counter(), []
            for seed in seeds:
                r = run_episode(env, policy, int(seed))
                out.append({k: r[k] for k in ("seed", "success", "steps", "seconds", "cpu_seconds")})
            write_json(path, out)
            log(tag, f"closed loop: {name}, simulator {worker + 1}/{workers}: success "
                     f"{np.mean([e['success'] for e in out]):.1%} over {len(out)} episodes "
                     f"({time.perf_counter() - start:.0f} s)")
    return worker


def evaluate(policy_names, episodes, workers, out_dir, load_policy, env_kwargs, tag="closed loop") -> dict:
    """Episodes of every policy on the same seeds `EVAL_FIRST_SEED + i`, `workers` simulators in parallel.

    Returns `{policy: [episode dicts sorted by seed]}` and writes
    `out_dir/episodes/<policy>.json`.
    """
    seeds = list(range(EVAL_FIRST_SEED, EVAL_FIRST_SEED + episodes))
    workers = max(1, min(workers, len(seeds)))
    os.makedirs(os.path.join(out_dir, "episodes"), exist_ok=True)
    log(tag, f"closed loop: {', '.join(policy_names)}: {len(seeds)} episodes each on {workers} simulator process(es)")
    jobs = [(list(policy_names), seeds[w::workers], w, workers, out_dir, load_policy, env_kwargs, tag)
            for w in range(workers)]
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.map(_evaluate_shard, jobs)
    else:
        _evaluate_shard(jobs[0])
    result = {}
    for name in policy_names:
        parts = []
        for w in range(workers):
            with open(shard_path(out_dir, name, w, workers)) as f:
                parts += json.load(f)
        result[name] = sorted(parts, key=lambda e: e["seed"])
        write_json(os.path.join(out_dir, "episodes", f"{name}.json"), result[name])
    return result


def wilson(successes) -> tuple[float, float, float]:
    from expert import success_rate

    return success_rate(successes)


def paired_difference(a, b) -> dict:
    """Mean of a - b over the same seeds, with a 95% normal interval of the paired differences."""
    d = np.asarray(a, float) - np.asarray(b, float)
    n = len(d)
    half = 1.96 * d.std(ddof=1) / np.sqrt(n) if n > 1 else float("nan")
    return {"difference": float(d.mean()), "low": max(-1.0, float(d.mean() - half)),
            "high": min(1.0, float(d.mean() + half)),
            "agreement": float(np.mean(np.asarray(a) == np.asarray(b)))}


def summarise(episodes: dict, pairs) -> dict:
    """Success rates (Wilson intervals) per policy and the paired differences `pairs` [(a, b), ...]."""
    table = {}
    for name, eps in episodes.items():
        success = [e["success"] for e in eps]
        rate, low, high = wilson(success)
        table[name] = {"success": rate, "low": low, "high": high, "episodes": len(eps),
                       "mean_steps": float(np.mean([e["steps"] for e in eps])),
                       "cpu_seconds_per_episode": float(np.mean([e["cpu_seconds"] for e in eps]))}
    outcome = {n: [e["success"] for e in eps] for n, eps in episodes.items()}
    paired = {f"{a} - {b}": paired_difference(outcome[a], outcome[b])
              for a, b in pairs if a in outcome and b in outcome}
    return {"policies": table, "paired": paired}


def paired_rows(paired: dict) -> list:
    """Markdown table rows of `summarise(...)["paired"]`."""
    lines = ["| pair | difference | 95% interval | agreement |", "|---|---:|---:|---:|"]
    for pair, d in paired.items():
        lines.append(f"| {pair} | {d['difference']:+.1%} | {d['low']:+.1%} .. {d['high']:+.1%} | {d['agreement']:.1%} |")
    return lines
