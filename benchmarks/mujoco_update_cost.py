"""Where the time beside the simulator goes: one optimizer step of a MuJoCo script, and the rollout's
batched forwards, timed in isolation with the script's own policy and clipped surrogate, one thread.

    python benchmarks/mujoco_update_cost.py                      # GRPO at HalfCheetah-v4's default shape
    python benchmarks/mujoco_update_cost.py --rows 1024 --obs-dim 11 --act-dim 3   # Hopper-v4's (G 8 x H 128)

The clipped surrogate is GRPO's and Soft-Pair-GRPO's loss (`--script pair_grpo_soft_mujoco.py`);
Hard-Pair-GRPO's pair-shift loss is not timed here.

Prints microseconds per call of each part of an optimizer step on a minibatch of `--rows` steps
(one group: G x H), and of the rollout's per-step forward with sampling on `--branches` rows (and
of the same with a distribution object and log-probs per step, as the scripts did before).
"""
import argparse
import importlib
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]


def per_call_us(fn, calls: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--script", default="grpo_baseline_mujoco.py",
                        choices=["grpo_baseline_mujoco.py", "pair_grpo_soft_mujoco.py"])
    parser.add_argument("--obs-dim", type=int, default=17, help="HalfCheetah-v4: 17; Hopper-v4: 11")
    parser.add_argument("--act-dim", type=int, default=6, help="HalfCheetah-v4: 6; Hopper-v4: 3")
    parser.add_argument("--rows", type=int, default=512, help="steps per minibatch (G x H)")
    parser.add_argument("--branches", type=int, default=32, help="rows of one rollout forward (N x G)")
    parser.add_argument("--calls", type=int, default=500)
    cli = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    module = importlib.import_module(cli.script[: -len(".py")])
    policy = module.GaussianPolicy(cli.obs_dim, cli.act_dim, -0.5)
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-4, eps=1e-5, foreach=True)
    obs, actions = torch.randn(8, cli.rows // 8, cli.obs_dim), torch.randn(8, cli.rows // 8, cli.act_dim)
    with torch.no_grad():
        old_logp = policy(obs).log_prob(actions).sum(-1)
    mask, advantages, parts = torch.ones(8, cli.rows // 8), torch.randn(8, 1), {}

    def forward_and_loss():
        logp = policy(obs).log_prob(actions).sum(-1)
        surrogate, clipped = module.clipped_surrogate(logp, old_logp, advantages, 0.3, 0.3)
        return -(module.loss_weights(mask, "sequence") * surrogate).sum(), logp, clipped

    def forward_backward():
        optimizer.zero_grad()
        forward_and_loss()[0].backward()

    loss, logp, clipped = forward_and_loss()
    parts["forward and loss"] = per_call_us(forward_and_loss, cli.calls)
    parts["backward"] = per_call_us(forward_backward, cli.calls) - parts["forward and loss"]
    parts["gradient clipping"] = per_call_us(lambda: torch.nn.utils.clip_grad_norm_(policy.parameters(), 0.5).item(),
                                             cli.calls)
    parts["Adam"] = per_call_us(optimizer.step, cli.calls)
    parts["logged statistics"] = per_call_us(lambda: [v.sum().item() for v in (
        mask * clipped, module.k3_kl(old_logp, logp.detach()))], cli.calls)
    branch_obs = torch.randn(cli.branches, cli.obs_dim)
    with torch.no_grad():  # the rollout's draw, and the same draw with a distribution and log-probs per step
        std = policy.log_std.exp()
        rollout = per_call_us(lambda: (lambda m: (m + std * torch.randn_like(m)).numpy())(policy.mean(branch_obs)),
                              cli.calls)
        with_logp = per_call_us(lambda: (lambda d: d.log_prob(d.sample()).sum(-1).numpy())(policy(branch_obs)),
                                cli.calls)
    for name, us in parts.items():
        print(f"{name:20s} {us:8.1f} us")
    print(f"{'optimizer step':20s} {sum(parts.values()):8.1f} us on {cli.rows} rows; rollout forward with "
          f"sampling {rollout:.1f} us on {cli.branches} rows ({module.__name__}; {with_logp:.1f} us with a "
          f"distribution and log-probs per step)")
    # Cheaper kernels the scripts do not use (each changes the float rounding of every run):
    # torch's float32 tanh against the same function through sigmoid, forward and backward on one
    # hidden layer's activations, and Adam's fused CPU kernel against the foreach one used
    hidden = torch.randn(cli.rows, 64, requires_grad=True)
    activations = {"tanh": torch.tanh, "2 sigmoid(2x) - 1": lambda x: 2 * torch.sigmoid(2 * x) - 1}
    for name, fn in activations.items():
        print(f"{name:20s} {per_call_us(lambda: fn(hidden).sum().backward(), cli.calls):8.1f} us forward and "
              f"backward (with a sum) on {cli.rows} x 64")
    for name, kind in (("Adam foreach", {"foreach": True}), ("Adam fused", {"fused": True})):
        adam = torch.optim.Adam(policy.parameters(), lr=3e-4, eps=1e-5, **kind)
        print(f"{name:20s} {per_call_us(adam.step, cli.calls):8.1f} us")


if __name__ == "__main__":
    main()
