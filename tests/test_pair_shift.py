"""Spec 4.1: the paper's Hard-Pair-GRPO (`--target pair-shift`): the target, the reverse-KL fit,
the hinge trust region and the decaying step; and `--kl-anchor` in the pair scripts."""
import glob
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

import pair_grpo_hard_lm as hard
import pair_grpo_hard_mujoco as hard_mj
import pair_grpo_soft_lm as soft
from test_lm_runs import ROOT, scalars


def random_labels(groups: int, G: int, seed: int = 0) -> torch.Tensor:
    """Noisy labels with ties: half the groups from a Bradley-Terry teacher, half with ties below a margin."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(groups, G, generator=g)
    return torch.cat([soft.teacher_labels(scores[: groups // 2], "stochastic", tau=0.5, generator=g),
                      soft.teacher_labels(scores[groups // 2:], "equal", tie_margin=0.5)])


def pair_by_pair(labels: torch.Tensor, delta: float) -> torch.Tensor:
    """The body's rule, one labelled pair at a time: delta / (G-1) moves from rejected to preferred."""
    G = labels.shape[1]
    q = torch.full(labels.shape[:2], 1.0 / G, dtype=torch.float64)
    for i in range(G):
        for j in range(i + 1, G):
            move = delta / (G - 1) * (2 * labels[:, i, j].double() - 1)  # a tie (z = 1/2) moves nothing
            q[:, i] += move
            q[:, j] -= move
    return q


@pytest.mark.parametrize("G", [2, 5, 8])
def test_target_is_the_pairwise_mass_shift_and_a_distribution(G):
    labels = random_labels(200, G)
    delta = 0.999 / G  # the largest legal step: a response that loses every pair keeps 0.001 / G
    q = hard.pair_shift_target(hard.net_win_rate(labels), delta).double()
    torch.testing.assert_close(q, pair_by_pair(labels, delta), atol=1e-6, rtol=0)
    torch.testing.assert_close(q.sum(1), torch.ones(200, dtype=torch.float64), atol=1e-6, rtol=0)
    assert q.min() > 0


def test_target_is_local_and_matches_the_body_for_two():
    z = torch.tensor([[0.5, 1, 0, 0.5], [0, 0.5, 1, 1], [1, 0, 0.5, 0], [0.5, 0, 1, 0.5]])  # y_0: one win, one loss, a tie
    q = hard.pair_shift_target(hard.net_win_rate(z[None]), 0.05)
    assert q[0, 0].item() == 0.25  # as many wins as losses: its mass stays 1/G exactly
    two = hard.pair_shift_target(hard.net_win_rate(torch.tensor([[[0.5, 1.0], [0.0, 0.5]]])), 0.02)
    torch.testing.assert_close(two, torch.tensor([[0.52, 0.48]]))


def tiny_group(seed=0):
    from conftest import tiny_llama_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config())
    ids = torch.randint(3, 300, (8, 9))
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]] * 2)
    with torch.no_grad():
        old = hard.token_logprobs(model, ids, torch.ones_like(ids), 4, 1.0)
    advantages = hard.net_win_rate(random_labels(2, 4, seed=3)[:1].expand(2, 4, 4).clone())
    advantages[1] = torch.tensor([1.0, 1 / 3, -1 / 3, -1.0])
    return model, ids, mask, old, advantages


def fit_gradient(model, ids, mask, old, q):
    logp = hard.token_logprobs(model, ids, torch.ones_like(ids), 4, 1.0)
    l = hard.sequence_log_ratios(logp, old, mask).view(-1, 4)
    return torch.cat([g.flatten() for g in torch.autograd.grad(hard.reverse_kl_fit(q, l).sum(), list(model.parameters()))])


def test_fit_gradient_at_theta_old_is_a_policy_gradient_with_log_target_advantages():
    model, ids, mask, old, advantages = tiny_group()
    q = hard.pair_shift_target(advantages, 0.2)
    params = list(model.parameters())
    logp = hard.token_logprobs(model, ids, torch.ones_like(ids), 4, 1.0)
    l = hard.sequence_log_ratios(logp, old, mask)
    adv = (torch.log(4 * q) - torch.log(4 * q).mean(1, keepdim=True)).view(-1)
    expected = [torch.zeros_like(p) for p in params]
    for i in range(8):  # grad KL(p||q) at p = 1/G: -(1/G) sum_i adv_i grad l_i
        for e, g_i in zip(expected, torch.autograd.grad(l[i], params, retain_graph=True)):
            e -= adv[i] / 4 * g_i
    got = fit_gradient(model, ids, mask, old, q)
    torch.testing.assert_close(got, torch.cat([e.flatten() for e in expected]), atol=1e-6, rtol=1e-5)


def test_fit_direction_is_the_soft_direction_for_small_steps():
    model, ids, mask, old, advantages = tiny_group()
    logp = soft.token_logprobs(model, ids, torch.ones_like(ids), 4, 1.0)
    surrogate, _ = soft.clipped_surrogate(logp, old, advantages.view(-1, 1), 0.2, 0.2)
    soft_loss = -(soft.loss_weights(mask, "sequence") * surrogate).sum()
    soft_grad = torch.cat([g.flatten() for g in torch.autograd.grad(soft_loss, list(model.parameters()))])

    def cos(delta):
        return torch.nn.functional.cosine_similarity(
            fit_gradient(model, ids, mask, old, hard.pair_shift_target(advantages, delta)), soft_grad, dim=0).item()

    small, large = cos(0.002), cos(0.24)
    print(f"cos(pair-shift fit, Soft) at delta 0.002: {small:.6f}, at 0.24: {large:.6f}")
    assert small > 0.999 and large < small - 1e-3, (small, large)


def lm_run(tmp_path, name, **overrides):
    overrides = {"num_iterations": 3, "eval_every": 3, "num_eval_prompts": 8, **overrides}
    summary = hard.train_lm(hard.LMArgs(output_dir=str(tmp_path / name), **overrides))
    return scalars(os.path.join(str(tmp_path / name), summary["run_name"]))


def mujoco_run(tmp_path, name, module=hard_mj, **overrides):
    overrides = {"num_trunks": 2, "group_size": 4, "segment_length": 16, "num_minibatches": 2, "update_epochs": 2,
                 "total_timesteps": 1024, "eval_every": 100, "num_eval_episodes": 1, **overrides}
    summary = module.train_mujoco(module.MujocoArgs(output_dir=str(tmp_path / name), **overrides))
    return scalars(os.path.join(str(tmp_path / name), summary["run_name"]))


@pytest.mark.parametrize("domain", ["lm", "mujoco"])
def test_hinge_acts_only_above_the_trust_region_and_alpha_zero_removes_it(tmp_path, domain):
    def run(name, **kw):  # four optimizer steps per batch, so that K_old is measured after hinged steps
        if domain == "lm":
            return lm_run(tmp_path, name, update_epochs=4, **kw)
        return mujoco_run(tmp_path, name, anneal_lr=False, learning_rate=1e-3, **kw)  # a short run: no annealing to 0

    strong = 200.0 if domain == "lm" else 50.0
    free = run("free", alpha=strong, trust_region_kl=1e9)  # K_old never reaches it
    off = run("off", alpha=0.0, trust_region_kl=0.0)  # always above it, but no weight
    on = run("on", alpha=strong, trust_region_kl=0.0)
    for tag in ["losses/fit", "losses/k_old", "charts/score" if domain == "lm" else "charts/segment_return"]:
        assert free[tag] == off[tag], tag  # zero gradient below the threshold; alpha = 0 is no trust region
    assert all(v == 0 for _, v in free["charts/hinge_active"])
    assert [v for _, v in on["charts/hinge_active"]] == pytest.approx([3 / 4] * len(on["charts/hinge_active"]))  # all but the first
    k_on, k_off = (sum(v for _, v in r["losses/k_old"]) for r in (on, off))
    assert k_on < 0.7 * k_off, (k_on, k_off)  # the hinge holds the policy nearer pi_old


@pytest.mark.parametrize("domain", ["lm", "mujoco"])
def test_delta_decays_geometrically_from_the_first_iteration(tmp_path, domain):
    run = lm_run if domain == "lm" else mujoco_run
    decayed = [v for _, v in run(tmp_path, "decay", delta0=0.04, delta_decay=0.5)["charts/delta"]]
    assert decayed == pytest.approx([0.04 * 0.5**t for t in range(len(decayed))], rel=1e-6)
    fixed = [v for _, v in run(tmp_path, "fixed", delta0=0.04, delta_decay=1.0)["charts/delta"]]
    assert fixed == pytest.approx([0.04] * len(fixed), rel=1e-6) and len(fixed) >= 3


@pytest.mark.parametrize("seed", [1, 2])
def test_tiny_task_win_rate_rises_under_pair_shift(tmp_path, seed):
    summary = hard.train_lm(hard.LMArgs(seed=seed, num_iterations=20, eval_every=20, output_dir=str(tmp_path)))
    logged = scalars(os.path.join(str(tmp_path), summary["run_name"]))
    assert 0.3 <= dict(logged["eval/win_rate"])[0] <= 0.7
    assert summary["eval/win_rate"] >= 0.75, summary


@pytest.mark.parametrize("script, flags", [("pair_grpo_hard_lm.py", ["--delta0", "0.125"]),
                                           ("pair_grpo_hard_mujoco.py", ["--group-size", "4", "--delta0", "0.3",
                                                                         "--env-id", "NoSuchEnv-v0"])])
def test_a_step_of_1_over_G_or_more_is_refused_in_one_line_before_loading(script, flags):
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and out.stderr.strip().count("\n") == 0, out.stderr
    assert "--delta0" in out.stderr and "1/G" in out.stderr, out.stderr


def test_kl_anchor_old_is_the_batch_policy_and_ref_the_starting_one(tmp_path):
    """One optimizer step per batch: the KL to pi_old is exactly 0 at theta_old, the KL to pi_ref is not after the first batch."""
    def kl(anchor):
        summary = soft.train_lm(soft.LMArgs(num_iterations=3, eval_every=3, num_eval_prompts=8, beta=0.5, kl_anchor=anchor,
                                            update_epochs=1, output_dir=str(tmp_path / anchor)))
        return [v for _, v in scalars(os.path.join(str(tmp_path / anchor), summary["run_name"]))["losses/kl"]]

    assert kl("old") == [0.0, 0.0, 0.0]
    ref = kl("ref")
    assert ref[0] == 0.0 and min(ref[1:]) > 1e-4, ref
    mj = importlib.import_module("pair_grpo_soft_mujoco")
    for anchor in ["old", "ref"]:
        values = [v for _, v in mujoco_run(tmp_path, f"mj_{anchor}", mj, beta=0.5, kl_anchor=anchor, update_epochs=1,
                                           num_minibatches=1)["losses/kl"]]
        assert (max(values) == 0.0) == (anchor == "old"), (anchor, values)


@pytest.mark.parametrize("script", ["grpo_baseline", "pair_grpo_soft_lm", "pair_grpo_hard_lm"])
def test_with_several_steps_per_batch_pi_old_stays_the_sampling_policy(tmp_path, script):
    """From a batch's second optimizer step on, the policy has moved from pi_old: the KL to it is positive.
    The one-step shortcut (old log-probs = the current ones) taken with several steps would set every
    ratio to 1, turn the clip off and zero this KL."""
    module = importlib.import_module(script)
    summary = module.train_lm(module.LMArgs(num_iterations=2, eval_every=2, num_eval_prompts=8, beta=0.5,
                                            kl_anchor="old", update_epochs=2, output_dir=str(tmp_path)))
    kl = [v for _, v in scalars(os.path.join(str(tmp_path), summary["run_name"]))["losses/kl"]]
    assert len(kl) == 2 and min(kl) > 1e-6, kl


@pytest.mark.parametrize("script", ["grpo_baseline", "pair_grpo_soft_lm", "pair_grpo_hard_lm", "grpo_baseline_mujoco",
                                    "pair_grpo_soft_mujoco", "pair_grpo_hard_mujoco"])
def test_every_script_logs_the_gradient_norm_before_clipping(tmp_path, script):
    module = importlib.import_module(script)
    if "mujoco" in script:
        logged = mujoco_run(tmp_path, "run", module, max_grad_norm=1e-9, total_timesteps=256, num_minibatches=1)
    else:
        summary = module.train_lm(module.LMArgs(num_iterations=2, eval_every=2, num_eval_prompts=8, max_grad_norm=1e-9,
                                                output_dir=str(tmp_path)))
        logged = scalars(os.path.join(str(tmp_path), summary["run_name"]))
    norms = [v for _, v in logged["losses/grad_norm"]]
    assert len(norms) >= 2 and min(norms) > 1e-6, norms  # far above the clip: the norm before clipping
    (path,) = glob.glob(os.path.join(str(tmp_path), "**", "summary.json"), recursive=True)
    keys = set(json.load(open(path)))  # one set of keys in every script, plus its domain's results
    domain = {"episodic_return", "eval/episodic_return"} if "mujoco" in script else {
        "eval/win_rate", "eval/score", "eval/reference_score", "eval/kl_to_reference", "eval/completion_length"}
    assert keys == {"run_name", "global_step", "iterations", "train_seconds", "SPS", "nonfinite_skipped_steps"} | domain
