"""Raw branch-stepping throughput: N*G HalfCheetah branches stepped in this process or in
worker processes (grpo_baseline_mujoco.Branches), fixed random actions, no policy.

    python benchmarks/branch_stepping.py --branches 64 --workers 0 1 2
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo_baseline_mujoco as gb  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-id", default="HalfCheetah-v4")
    parser.add_argument("--branches", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    cli = parser.parse_args()
    for workers in cli.workers:
        branches = gb.Branches(cli.env_id, cli.branches, 1, workers)
        actions = np.random.default_rng(0).uniform(-1, 1, (cli.branches, branches.action_space.shape[0]))
        active = np.ones(cli.branches, dtype=bool)
        best = 0.0
        for _ in range(cli.repeats):
            start = time.perf_counter()
            for _ in range(cli.steps):
                branches.step(actions, active)
            best = max(best, cli.steps * cli.branches / (time.perf_counter() - start))
        branches.close()
        print(f"{cli.env_id}: {cli.branches} branches, {workers} workers: {best:,.0f} steps/s (best of {cli.repeats})")


if __name__ == "__main__":
    main()
