"""Which gait did each HalfCheetah run find? Upright, or running on its back.

Loads every HalfCheetah-v4 policy under the given run folders (a run's saved `model.pt`, which the
suite writes, else its last checkpoint), plays one 1,000-step episode from a fixed reset with the
mean action and one with sampled actions, and reports the returns, the share of steps the torso is
upright (cos of its pitch > 0) and the mean forward velocity.

    python benchmarks/halfcheetah_gait.py runs/benchmarks/halfcheetah_defaults --csv gait.csv
"""
import argparse
import csv
import glob
import os
import sys

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grpo_baseline_mujoco import GaussianPolicy, normalize  # identical in the three MuJoCo scripts


@torch.no_grad()
def act(policy, obs_rms, env, obs: np.ndarray, generator) -> np.ndarray:
    """The action training would take (a sample, drawn from `generator`), or the mean action (None)."""
    dist = policy(torch.as_tensor(normalize(obs_rms, obs[None])))
    noise = torch.randn(dist.mean.shape, generator=generator) if generator is not None else 0.0
    return np.clip((dist.mean + dist.stddev * noise)[0].numpy(), env.action_space.low, env.action_space.high)


def play(policy, obs_rms, sampled: bool, reset_seed: int) -> tuple:
    """One episode: (return, share of steps upright, mean forward velocity)."""
    env, generator = gym.make("HalfCheetah-v4"), torch.Generator().manual_seed(reset_seed) if sampled else None
    obs, _ = env.reset(seed=reset_seed)
    ret, pitch, velocity, done = 0.0, [], [], False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(act(policy, obs_rms, env, obs, generator))
        ret, done = ret + reward, terminated or truncated
        pitch.append(obs[1])  # observation 1: the torso's pitch angle; 8: its forward velocity
        velocity.append(obs[8])
    return round(ret, 1), round(float(np.mean(np.cos(pitch) > 0)), 3), round(float(np.mean(velocity)), 2)


def gait(state: dict, reset_seed: int = 0) -> dict:
    """The policy from a model.pt or checkpoint, played with its mean action and with sampled actions
    (the exploration noise training episodes see) from the same reset."""
    args, obs_rms = state["args"], (state["obs_mean"], state["obs_var"]) if "obs_mean" in state else state["obs_rms"]
    policy = GaussianPolicy(17, 6, hidden=args.get("hidden_size", 64), activation=args.get("activation", "tanh"))
    policy.load_state_dict(state["policy"])
    obs_rms = argparse.Namespace(mean=np.asarray(obs_rms[0]), var=np.asarray(obs_rms[1]))
    mean, sampled = (play(policy, obs_rms, s, reset_seed) for s in (False, True))
    return {"eval_return": mean[0], "upright_share": mean[1], "forward_velocity": mean[2],
            "sampled_return": sampled[0], "sampled_upright_share": sampled[1], "log_std": round(float(
                policy.log_std.mean()), 2)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="a sweep's folder: {tag}/{algo[variant]}/{seed}/{run}/")
    parser.add_argument("--csv", help="also write the rows here")
    cli = parser.parse_args()
    rows = []
    for folder in cli.folders:
        for run in sorted(glob.glob(os.path.join(glob.escape(folder), "*", "*", "*", ""))):
            path = next((p for p in (run + "model.pt", run + "checkpoint/state.pt") if os.path.exists(p)), None)
            if path is None:
                continue
            state = torch.load(path, weights_only=False)  # written by our scripts: load only runs you made
            if state["args"]["env_id"] != "HalfCheetah-v4":
                continue
            parts = run.split(os.sep)
            rows.append({"sweep": parts[-5], "algo": parts[-4], "seed": parts[-3], **gait(state)})
            print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    if not rows:
        raise SystemExit(f"error: no HalfCheetah-v4 model.pt or checkpoint under {cli.folders}")
    upright = [r["eval_return"] for r in rows if r["upright_share"] >= 0.9]
    other = [r["eval_return"] for r in rows if r["upright_share"] < 0.9]
    mean = {name: f"{np.mean(x):.0f}" if x else "n/a" for name, x in (("upright", upright), ("other", other))}
    print(f"{len(upright)} of {len(rows)} runs upright for at least 90% of the episode: mean return "
          f"{mean['upright']}; the rest {mean['other']}")
    if cli.csv:
        with open(cli.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
