"""Peer baseline: Stable-Baselines3 PPO with the RL Baselines3 Zoo's tuned hyperparameters
(rl_zoo3 2.9.2, hyperparams/ppo.yml: HalfCheetah-v4, Hopper-v4, Walker2d-v4), logged like our
MuJoCo scripts so benchmarks/mujoco_suite.py can run and plot it beside them (`--algos sb3_ppo`).

    pip install -r requirements.txt -r benchmarks/requirements.txt
    python benchmarks/sb3_ppo.py --seed 1 --total-timesteps 1000000 --output-dir runs/sb3

Writes TensorBoard scalars `charts/episodic_return` (the training episodes' raw returns,
before reward normalisation), `eval/episodic_return` (every --eval-every steps,
--num-eval-episodes episodes from fresh resets with the deterministic action and frozen
observation statistics) and `charts/SPS` (training time only), plus summary.json.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

# The Zoo's tuned entries (each: normalize: true, n_envs: 1, 1e6 steps), copied field by field from rl_zoo3
# 2.9.2's hyperparams/ppo.yml. HalfCheetah and Hopper also set the network (TUNED_NET); Walker2d keeps SB3's
# default (64-64 tanh, orthogonal init, log-std 0).
ZOO = {
    "HalfCheetah-v4": dict(batch_size=64, n_steps=512, gamma=0.98, learning_rate=2.0633e-05, ent_coef=0.000401762,
                           clip_range=0.1, n_epochs=20, gae_lambda=0.92, max_grad_norm=0.8, vf_coef=0.58096),
    "Hopper-v4": dict(batch_size=32, n_steps=512, gamma=0.999, learning_rate=9.80828e-05, ent_coef=0.00229519,
                      clip_range=0.2, n_epochs=5, gae_lambda=0.99, max_grad_norm=0.7, vf_coef=0.835671),
    "Walker2d-v4": dict(batch_size=32, n_steps=512, gamma=0.99, learning_rate=5.05041e-05, ent_coef=0.000585045,
                        clip_range=0.1, n_epochs=20, gae_lambda=0.95, max_grad_norm=1, vf_coef=0.871923),
}
TUNED_NET = {"HalfCheetah-v4", "Hopper-v4"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-id", default="HalfCheetah-v4", choices=sorted(ZOO))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--total-timesteps", type=int, default=1_000_000)
    parser.add_argument("--output-dir", default="runs/sb3_ppo")
    parser.add_argument("--eval-every", type=int, default=25_600, help="environment steps between evaluations")
    parser.add_argument("--num-eval-episodes", type=int, default=3)
    args = parser.parse_args()

    import gymnasium as gym
    import mujoco
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize
    from torch.utils.tensorboard import SummaryWriter

    torch.set_num_threads(1)
    zoo = ZOO[args.env_id]
    mujoco.set_mju_user_warning(lambda msg: None if "settotalmass" in msg else print(msg, file=sys.stderr))
    run_name = f"{args.env_id}__sb3_ppo__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.output_dir, run_name)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", json.dumps({**vars(args), **zoo}))
    env = VecNormalize(DummyVecEnv([lambda: Monitor(gym.make(args.env_id))]), gamma=zoo["gamma"])
    env.seed(args.seed)
    model = PPO("MlpPolicy", env, seed=args.seed, device="cpu", verbose=0, **zoo,
                policy_kwargs=dict(log_std_init=-2, ortho_init=False, activation_fn=torch.nn.ReLU,
                                   net_arch=dict(pi=[256, 256], vf=[256, 256])) if args.env_id in TUNED_NET else None)

    def evaluate(seed: int) -> float:
        returns = []
        for i in range(args.num_eval_episodes):
            eval_env = gym.make(args.env_id)
            obs, _ = eval_env.reset(seed=seed + i)
            done, total = False, 0.0
            while not done:
                action, _ = model.predict(env.normalize_obs(obs), deterministic=True)
                obs, reward, terminated, truncated, _ = eval_env.step(action)
                total += reward
                done = terminated or truncated
            returns.append(total)
        return float(np.mean(returns))

    class Log(BaseCallback):
        def __init__(self):
            super().__init__()
            self.train_time, self.tick, self.next_eval, self.recent, self.last_eval = 0.0, time.time(), args.eval_every, [], None

        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:
                    writer.add_scalar("charts/episodic_return", info["episode"]["r"], self.num_timesteps)
                    self.recent = (self.recent + [info["episode"]["r"]])[-20:]
            if self.num_timesteps >= self.next_eval:
                self.log_eval()
                self.next_eval += args.eval_every
            return True

        def log_eval(self):  # evaluation time is not training time
            self.train_time += time.time() - self.tick
            self.last_eval = evaluate(args.seed + 10_000 * self.num_timesteps)
            writer.add_scalar("eval/episodic_return", self.last_eval, self.num_timesteps)
            writer.add_scalar("charts/SPS", self.num_timesteps / self.train_time, self.num_timesteps)
            print(f"step {self.num_timesteps}/{args.total_timesteps} | episodic return "
                  f"{np.mean(self.recent) if self.recent else float('nan'):.1f} | eval return {self.last_eval:.1f} | "
                  f"SPS {self.num_timesteps / self.train_time:.0f}", flush=True)
            self.tick = time.time()

    log = Log()
    model.learn(total_timesteps=args.total_timesteps, callback=log)
    if log.next_eval - args.eval_every != model.num_timesteps:  # the final policy, unless just evaluated
        log.log_eval()
    summary = {"run_name": run_name, "global_step": int(model.num_timesteps), "train_seconds": round(log.train_time, 1),
               "SPS": round(model.num_timesteps / log.train_time), "episodic_return": float(np.mean(log.recent)),
               "eval/episodic_return": log.last_eval}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    writer.close()
    print("summary: " + " ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
