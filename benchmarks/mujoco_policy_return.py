"""The return of each saved MuJoCo policy with its own sampled actions, over fresh episodes.

Asks whether a run's training-episode return (the last 10 training episodes, which span the last
60k to 200k steps of a 1M-step run at the Hopper and Walker2d defaults) lags its final policy: each `model.pt` the suite saved is
played for `--episodes` episodes from fresh resets, acting as in training (a sample of the policy's
Gaussian, clipped to the action bounds), and once more with the mean action for comparison.

    python benchmarks/mujoco_policy_return.py "runs/benchmarks/hopper_levers/grpo[constlr-H128]"
"""
import argparse
import glob
import os
import sys

import gymnasium as gym
import numpy as np
import torch

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]
from grpo_baseline_mujoco import GaussianPolicy  # identical in the three MuJoCo scripts
from halfcheetah_gait import act  # the action as training takes it, or the mean


def play(policy, obs_rms, env_id: str, sampled: bool, reset_seed: int) -> tuple:
    """One episode: (return, length)."""
    env, generator = gym.make(env_id), torch.Generator().manual_seed(reset_seed) if sampled else None
    obs, _ = env.reset(seed=reset_seed)
    ret, length, done = 0.0, 0, False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(act(policy, obs_rms, env, obs, generator))
        ret, length, done = ret + reward, length + 1, terminated or truncated
    return ret, length


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a suite variant's folder: {folder}/{seed}/{run}/model.pt")
    parser.add_argument("--episodes", type=int, default=30)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    paths = sorted(glob.glob(os.path.join(glob.escape(cli.folder), "*", "*", "model.pt")))
    if not paths:
        sys.exit(f"error: no {cli.folder}/SEED/RUN/model.pt (the suite saves one per finished run)")
    for path in paths:
        saved = torch.load(path, weights_only=False)  # runs saved before model.pt held tensors only
        env = gym.make(saved["env_id"])
        policy = GaussianPolicy(env.observation_space.shape[0], env.action_space.shape[0],
                                hidden=saved["args"]["hidden_size"], activation=saved["args"]["activation"])
        policy.load_state_dict(saved["policy"])
        obs_rms = gym.wrappers.utils.RunningMeanStd(shape=env.observation_space.shape)
        obs_rms.mean, obs_rms.var = np.asarray(saved["obs_mean"]), np.asarray(saved["obs_var"])
        sampled = np.array([play(policy, obs_rms, saved["env_id"], True, 1000 + i) for i in range(cli.episodes)])
        mean_action = np.array([play(policy, obs_rms, saved["env_id"], False, 1000 + i) for i in range(5)])
        returns, lengths = sampled[:, 0], sampled[:, 1]
        print(f"seed {saved['args']['seed']}: sampled actions {returns.mean():,.0f} +- {returns.std():,.0f} "
              f"(length {lengths.mean():.0f}), mean action {mean_action[:, 0].mean():,.0f}, "
              f"log-std {policy.log_std.mean().item():.2f}")


if __name__ == "__main__":
    main()
