"""The paper's variance claim, measured: at one fixed policy, draw K independent rollout
batches of the same size, compute each method's policy gradient on each, and report

    normalised variance  E||g - mean g||^2 / ||mean g||^2      mean pairwise cosine

for GRPO, Soft-Pair-GRPO and Hard-Pair-GRPO (the paper's pair-shift target at the script's
default delta_0; the group-softmax target at two eps_q values). Every method sees the same
K batches, and each gradient is taken at theta_old (the first optimizer step of an
iteration), through the scripts' own functions; the KL-to-reference term is left out
(beta = 0) and the pair methods use the oracle teacher.

    python benchmarks/gradient_variance.py --domain lm          # tiny LM policy after 5 GRPO iterations
    python benchmarks/gradient_variance.py --domain mujoco      # HalfCheetah policy after 200k GRPO steps

Writes docs/results/gradient_variance_{domain}.csv.
"""
import argparse
import contextlib
import csv
import os
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]
import grpo_baseline as gb  # noqa: E402


def flat_grad(loss, params) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])


def method_losses(logp, mask, scores, groups, G, soft, hard, eps_qs, mean_fit) -> dict:
    """Each method's loss at theta_old from the same log-probs ([B, T]) and hidden scores."""
    old = logp.detach()
    weights = gb.loss_weights(mask, "sequence")
    losses = {}
    for name, advantages in [("grpo", gb.group_advantages(scores.view(groups, G), True)),
                             ("soft", soft.net_win_rate(soft.teacher_labels(scores.view(groups, G), "oracle"), False))]:
        surrogate, _ = gb.clipped_surrogate(logp, old, advantages.reshape(-1, 1), 0.2, 0.2)
        losses[name] = -(weights * surrogate).sum()
    net = hard.net_win_rate(hard.teacher_labels(scores.view(groups, G), "oracle"))
    for eps_q in eps_qs:
        q, _ = hard.target_distribution(net, eps_q)
        ratios = hard.sequence_log_ratios(logp, old, mask).view(-1, G)
        fit = hard.kl_to_target(q, ratios)
        losses[f"hard_eps_q{eps_q:g}"] = fit.mean() if mean_fit else fit.sum() / groups
    delta0 = (hard.LMArgs() if hasattr(hard, "LMArgs") else hard.MujocoArgs()).delta0  # the paper's target, first step
    fit = hard.reverse_kl_fit(hard.pair_shift_target(net, delta0), hard.sequence_log_ratios(logp, old, mask).view(-1, G))
    losses[f"hard_pair_shift_delta{delta0:g}"] = fit.mean() if mean_fit else fit.sum() / groups
    return losses


def lm_batches(args, eps_qs):
    import pair_grpo_hard_lm as hard
    import pair_grpo_soft_lm as soft

    with tempfile.TemporaryDirectory() as tmp:  # the fixed policy: the tiny LM after 5 GRPO iterations
        summary = gb.train_lm(gb.LMArgs(num_iterations=5, eval_every=5, save_model=True, output_dir=tmp))
        lm_args = gb.LMArgs(model_name_or_path=os.path.join(tmp, summary["run_name"], "model"))
        policy, _, tokenizer, eos_ids = gb.load_lm_policy(lm_args, torch.device("cpu"))
    records = gb.tiny_task_prompts(1024)
    prompt_ids = gb.encode_prompts(tokenizer, records, 256, eos_ids)
    params = [p for p in policy.parameters() if p.requires_grad]
    P, G = args.prompts, args.group_size
    for k in range(args.batches):
        chosen = np.random.default_rng(1000 + k).choice(len(records), P, replace=False)
        seeds = [gb.sampling_seed(4242, k, p, j) for p in range(P) for j in range(G)]
        batch = gb.sample_completions(policy, tokenizer, [prompt_ids[i] for i in chosen], G, eos_ids,
                                      contextlib.nullcontext(), torch.device("cpu"), seeds, 1.0)
        scores = torch.tensor([gb.vowel_density(t) for t in batch["texts"]])
        logp = gb.token_logprobs(policy, batch["input_ids"], batch["attention_mask"], batch["mask"].shape[1], 1.0)
        losses = method_losses(logp, batch["mask"], scores, P, G, soft, hard, eps_qs, mean_fit=False)
        yield {name: flat_grad(loss, params) for name, loss in losses.items()}


def mujoco_batches(args, eps_qs):
    import pair_grpo_hard_mujoco as hard
    import pair_grpo_soft_mujoco as soft
    import grpo_baseline_mujoco as gbm

    # The shape the published rows were measured at (HalfCheetah's defaults then): H = 16, 8 trunks, log-std 0
    shape = dict(num_trunks=8, segment_length=16, lookahead=0, log_std_init=0.0, anneal_lr=True)
    with tempfile.TemporaryDirectory() as tmp:  # the fixed policy: GRPO after 200k steps
        summary = gbm.train_mujoco(gbm.MujocoArgs(total_timesteps=200_000, eval_every=1000, save_model=True,
                                                  output_dir=tmp, **shape))
        saved = torch.load(os.path.join(tmp, summary["run_name"], "model.pt"))
    env = gbm.make_mujoco_env("HalfCheetah-v4")
    policy = gbm.GaussianPolicy(env.observation_space.shape[0], env.action_space.shape[0])
    policy.load_state_dict(saved["policy"])
    obs_rms = gbm.RunningMeanStd(shape=env.observation_space.shape)
    obs_rms.mean, obs_rms.var = np.asarray(saved["obs_mean"]), np.asarray(saved["obs_var"])
    obs_rms.count = saved["obs_count"]
    N, G = args.prompts, args.group_size
    mj_args = gbm.with_env_defaults(gbm.MujocoArgs(**{**shape, "num_trunks": N, "group_size": G}))
    branches = gbm.Branches("HalfCheetah-v4", N * G, 1)
    params = list(policy.parameters())
    for k in range(args.batches):
        rng = np.random.default_rng(1000 + k)
        states, obs = [], []
        for n in range(N):  # start states from the policy's own state distribution
            o, _ = env.reset(seed=int(rng.integers(1 << 30)))
            for _ in range(int(rng.integers(0, 900))):
                with torch.no_grad():
                    action = policy(torch.as_tensor(gbm.normalize(obs_rms, o[None]))).sample()[0].numpy()
                o, *_ = env.step(np.clip(action, -1, 1))
            states.append(gbm.snapshot(env))
            obs.append(o)
        torch.manual_seed(1000 + k)
        batch = gbm.branched_rollout(policy, branches, states, np.stack(obs), np.full(N, 1000), obs_rms, mj_args, torch.device("cpu"))
        norm_obs = torch.as_tensor(gbm.normalize(obs_rms, batch["raw_obs"]))
        logp = policy(norm_obs).log_prob(torch.as_tensor(batch["actions"])).sum(-1)
        mask = torch.as_tensor(batch["mask"])
        scores = torch.as_tensor(batch["scores"], dtype=torch.float32)
        losses = method_losses(logp, mask, scores, N, G, soft, hard, eps_qs, mean_fit=True)
        yield {name: flat_grad(loss, params) for name, loss in losses.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", choices=["lm", "mujoco"], default="lm")
    parser.add_argument("--batches", type=int, default=32, help="K independent rollout batches")
    parser.add_argument("--prompts", type=int, default=8, help="groups per batch (prompts, or MuJoCo trunks)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--eps-q", type=float, nargs=2, default=[0.3, 1.0], help="two Hard eps_q values")
    args = parser.parse_args()
    torch.set_num_threads(1)
    grads = {}
    for k, per_method in enumerate((lm_batches if args.domain == "lm" else mujoco_batches)(args, args.eps_q)):
        for name, g in per_method.items():
            grads.setdefault(name, []).append(g)
        print(f"batch {k + 1}/{args.batches}", flush=True)
    def normalised_variance(g):
        mean = g.mean(0)
        return ((g - mean) ** 2).sum(1).mean() / (mean**2).sum()

    # Paired bootstrap over the K batches (every method resampled with the same indices):
    # a 90% interval for each method's normalised variance divided by GRPO's.
    stacked = {name: torch.stack(gs).double() for name, gs in grads.items()}
    resamples = [torch.from_numpy(np.random.default_rng(r).integers(0, args.batches, args.batches)) for r in range(500)]
    boot = {name: torch.stack([normalised_variance(g[idx]) for idx in resamples]) for name, g in stacked.items()}
    rows = []
    for name, g in stacked.items():
        unit = g / g.norm(dim=1, keepdim=True)
        cosines = unit @ unit.T
        pairwise = (cosines.sum() - cosines.diagonal().sum()) / (len(g) * (len(g) - 1))
        ratio = (boot[name] / boot["grpo"]).numpy()
        rows.append({"domain": args.domain, "method": name, "batches": len(g),
                     "normalised_variance": f"{normalised_variance(g).item():.4g}",
                     "ratio_to_grpo_90ci": f"{np.percentile(ratio, 5):.3f}..{np.percentile(ratio, 95):.3f}",
                     "mean_pairwise_cosine": f"{pairwise.item():.4g}", "mean_grad_norm": f"{g.norm(dim=1).mean().item():.4g}"})
        print(" | ".join(str(v) for v in rows[-1].values()))
    path = os.path.join(ROOT, "docs", "results", f"gradient_variance_{args.domain}.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
