"""Spec 4.3: the properties of the group-softmax target (`--target group-softmax`), against autograd or exact values."""
import math
import os

import pytest
import torch

import pair_grpo_hard_lm as hard
import pair_grpo_soft_lm as soft
from test_gradient_equivalence import ADVANTAGES, ARM_REWARDS, G, LOGITS, bt_expected_labels, cosine, expected_gradient, groups_and_probs
from test_lm_runs import scalars


def kl_to_uniform(q):
    return (torch.xlogy(q, q).sum(1) + math.log(q.shape[1])).double()


@pytest.mark.parametrize("eps_q", [0.001, 0.05, 0.3])
def test_bisection_hits_the_kl_budget_and_keeps_the_order(eps_q):
    g = torch.Generator().manual_seed(0)
    labels = soft.teacher_labels(torch.randn(200, 8, generator=g), "stochastic", tau=1.0, generator=g)
    advantages = torch.cat([hard.net_win_rate(labels), torch.randn(200, 8, generator=g) * 3])
    q, eta = hard.target_distribution(advantages, eps_q)
    signal = advantages.max(1).values > advantages.min(1).values
    assert (kl_to_uniform(q)[signal] - eps_q).abs().max() < 1e-6
    for a, p in zip(advantages[signal], q[signal]):  # order kept: higher advantage, higher target
        i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
        assert ((a[i] > a[j]) <= (p[i] > p[j])).all() and ((a[i] == a[j]) <= torch.isclose(p[i], p[j])).all()
    torch.testing.assert_close(q.sum(1), torch.ones(400))


def test_flat_group_gets_the_uniform_target():
    q, eta = hard.target_distribution(torch.tensor([[0.5, 0.5, 0.5, 0.5], [1.0, 0.0, 0.0, -1.0]]), 0.1)
    assert torch.equal(q[0], torch.full((4,), 0.25)) and math.isinf(eta[0]) and math.isfinite(eta[1])


def test_target_ignores_the_advantage_scale():  # variance control whatever the reward scale
    advantages = torch.randn(50, 6)
    q1, _ = hard.target_distribution(advantages, 0.2)
    q2, _ = hard.target_distribution(100 * advantages, 0.2)
    torch.testing.assert_close(q1, q2, atol=1e-6, rtol=1e-5)
    chi2 = ((6 * q1.double() - 1) ** 2).mean(1)  # chi2(q || uniform): the variance bound of the fit
    assert chi2.max() < 2 * 0.2 * 1.5  # chi2 ~ 2 KL for small budgets


def test_fit_gradient_at_theta_old_is_a_policy_gradient_with_advantage_Gq_minus_1():
    from conftest import tiny_llama_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config())
    ids = torch.randint(3, 300, (4, 9))
    attention = torch.ones_like(ids)
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
    with torch.no_grad():
        old = hard.token_logprobs(model, ids, attention, 4, 1.0)
    q = torch.tensor([[0.4, 0.1, 0.3, 0.2]])
    params = [p for p in model.parameters()]
    logp = hard.token_logprobs(model, ids, attention, 4, 1.0)
    l = hard.sequence_log_ratios(logp, old, mask)
    fit_grad = torch.autograd.grad(hard.kl_to_target(q, l.view(1, 4)).sum(), params, retain_graph=True)
    expected = [torch.zeros_like(p) for p in params]
    for i in range(4):  # -sum_i (q_i - 1/G) grad l_i
        for e, g_i in zip(expected, torch.autograd.grad(l[i], params, retain_graph=True)):
            e -= (q[0, i] - 0.25) * g_i
    for a, b in zip(fit_grad, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def expected_hard_gradient(eps_q: float, scale: float) -> torch.Tensor:
    """Exact E over groups of -grad KL(q || p_theta) at theta_old (the bandit of the Soft test)."""
    groups, prob = groups_and_probs()
    q, _ = hard.target_distribution(hard.net_win_rate(bt_expected_labels(ARM_REWARDS[groups] * scale)), eps_q)
    theta = LOGITS.clone().requires_grad_(True)
    logp = theta.log_softmax(0)[groups].reshape(-1, 1)  # each sample is a one-token sequence
    l = hard.sequence_log_ratios(logp, logp.detach(), torch.ones_like(logp))
    (-(prob * hard.kl_to_target(q.double(), l.view(-1, G))).sum()).backward()
    return theta.grad


def test_hard_direction_tends_to_std_normalised_soft_as_eps_q_shrinks():
    target = expected_gradient(ADVANTAGES["soft_bt_std"], 1.0)
    cosines = [cosine(expected_hard_gradient(e, 1.0), target) for e in [0.3, 0.1, 0.01, 0.001]]
    print("cos(Hard, Soft/std) at eps_q 0.3, 0.1, 0.01, 0.001:", cosines)
    assert all(a < b for a, b in zip(cosines, cosines[1:])) and cosines[-1] > 0.9999, cosines


def test_per_group_G_q_minus_1_tends_to_A_over_eta():
    groups, _ = groups_and_probs()
    advantages = hard.net_win_rate(bt_expected_labels(ARM_REWARDS[groups] * 2.0)).double()
    q, eta = hard.target_distribution(advantages, 1e-5)
    signal = torch.isfinite(eta)
    torch.testing.assert_close((G * q.double() - 1)[signal], (advantages / eta.double()[:, None])[signal], atol=1e-4, rtol=0)
    # and eta ~ popstd(A) / sqrt(2 eps_q)
    expected_eta = advantages.std(1, unbiased=False) / math.sqrt(2e-5)
    torch.testing.assert_close(eta.double()[signal], expected_eta[signal], rtol=1e-2, atol=0)


def test_dual_ascent_rises_above_and_falls_below_the_trust_region():
    assert hard.dual_ascent(1.0, 0.05, 0.02, 0.5) == pytest.approx(1.015)
    assert hard.dual_ascent(1.0, 0.01, 0.02, 0.5) == pytest.approx(0.995)
    assert hard.dual_ascent(0.001, 0.0, 0.02, 0.5) == 0.0  # projected onto alpha >= 0
    alpha = 1.0
    for _ in range(200):
        alpha = hard.dual_ascent(alpha, 0.0, 0.02, 0.5)
    assert alpha == 0.0


GROUP_SOFTMAX = {"target": "group-softmax", "beta": 0.04, "kl_anchor": "ref"}  # the configuration it was measured in


def run(tmp_path, **overrides):
    summary = hard.train_lm(hard.LMArgs(output_dir=str(tmp_path), **GROUP_SOFTMAX, **overrides))
    return summary, scalars(os.path.join(str(tmp_path), summary["run_name"]))


@pytest.mark.parametrize("seed", [1, 2])
def test_tiny_task_win_rate_rises_and_the_trust_region_holds(tmp_path, seed):
    summary, logged = run(tmp_path, seed=seed, num_iterations=20, eval_every=20)
    assert 0.3 <= dict(logged["eval/win_rate"])[0] <= 0.7
    assert summary["eval/win_rate"] >= 0.75, summary
    k_old = [v for _, v in logged["losses/k_old"]][3:]
    eps_pi = hard.LMArgs().eps_pi
    assert max(k_old) < 5 * eps_pi and sum(k_old) / len(k_old) > eps_pi / 5, k_old
    alphas = [v for _, v in logged["charts/alpha"]]
    assert max(alphas) - min(alphas) > 0.01  # the multiplier adapts
    kl_q = [v for _, v in logged["charts/kl_q_uniform"]]
    assert all(v <= hard.LMArgs().eps_q + 1e-5 for v in kl_q)


def test_hard_needs_several_steps_per_batch(tmp_path):
    with pytest.raises(SystemExit, match="at least 2"):
        hard.train_lm(hard.LMArgs(update_epochs=1, num_minibatches=1, output_dir=str(tmp_path)))


def test_gaussian_kl_is_exact():
    import pair_grpo_hard_mujoco as hard_mj

    old = torch.distributions.Normal(torch.tensor([[0.3, -1.0]]), torch.tensor([[0.5, 2.0]]))
    new = torch.distributions.Normal(torch.tensor([[0.1, 0.0]]), torch.tensor([[1.0, 1.5]]))
    expected = torch.distributions.kl_divergence(old, new).sum(-1)
    torch.testing.assert_close(hard_mj.gaussian_kl(old.mean, old.stddev, new.mean, new.stddev), expected)


def test_mujoco_trust_region_measures_from_the_batch_policy_to_the_current_one(tmp_path, monkeypatch):
    """K_old = KL(pi_old || pi_theta) (the spec): the fixed batch policy first, the one being trained second.
    The two directions agree to second order in the step, so no return or logged value tells them apart."""
    import pair_grpo_hard_mujoco as hard_mj

    calls, exact = [], hard_mj.gaussian_kl

    def recording(old_mean, old_std, mean, std):
        calls.append((old_mean.requires_grad or old_std.requires_grad, mean.requires_grad and std.requires_grad))
        return exact(old_mean, old_std, mean, std)

    monkeypatch.setattr(hard_mj, "gaussian_kl", recording)
    hard_mj.train_mujoco(hard_mj.MujocoArgs(output_dir=str(tmp_path), num_trunks=2, group_size=4, segment_length=16,
                                            lookahead=0, num_minibatches=2, update_epochs=2, total_timesteps=128,
                                            eval_every=100, num_eval_episodes=1))
    assert calls and all(c == (False, True) for c in calls), calls


def test_mujoco_fit_is_the_mean_over_a_minibatchs_groups(tmp_path, monkeypatch):
    """The fit is a mean over groups, so its weight against the trust region does not grow with the groups
    a minibatch holds. At the default (one group per minibatch) a sum is the same number, so two groups."""
    import pair_grpo_hard_mujoco as hard_mj

    per_group, exact = [], hard_mj.reverse_kl_fit

    def recording(q, log_ratios):
        value = exact(q, log_ratios)
        per_group.append(value.detach().mean().item())
        return value

    monkeypatch.setattr(hard_mj, "reverse_kl_fit", recording)
    summary = hard_mj.train_mujoco(hard_mj.MujocoArgs(num_trunks=2, group_size=4, segment_length=16, lookahead=0,
                                                      num_minibatches=1, update_epochs=2, total_timesteps=256,
                                                      eval_every=100, num_eval_episodes=1, output_dir=str(tmp_path)))
    logged = [v for _, v in scalars(os.path.join(str(tmp_path), summary["run_name"]))["losses/fit"]]
    assert len(per_group) == 4 and len(logged) == 2  # two iterations of two optimizer steps
    assert logged == pytest.approx([sum(per_group[:2]) / 2, sum(per_group[2:]) / 2], rel=1e-5)


def test_lm_fit_is_the_mean_over_a_minibatchs_groups_across_micro_batches(tmp_path, monkeypatch):
    """As on MuJoCo: micro-batches of one group each add up to the mean over the minibatch's four groups."""
    per_group, exact = [], hard.reverse_kl_fit

    def recording(q, log_ratios):
        value = exact(q, log_ratios)
        per_group.extend(value.detach().tolist())
        return value

    monkeypatch.setattr(hard, "reverse_kl_fit", recording)
    summary = hard.train_lm(hard.LMArgs(num_iterations=1, prompts_per_step=4, group_size=4, micro_batch_size=4,
                                        update_epochs=2, max_new_tokens=8, num_eval_prompts=4,
                                        output_dir=str(tmp_path)))
    (logged,) = [v for _, v in scalars(os.path.join(str(tmp_path), summary["run_name"]))["losses/fit"]]
    assert len(per_group) == 2 * 4 and logged == pytest.approx(sum(per_group) / len(per_group), rel=1e-5)


@pytest.mark.parametrize("teacher", ["oracle", "mistake"])
def test_mujoco_smoke_run_logs_the_hard_quantities(tmp_path, teacher):
    import pair_grpo_hard_mujoco as hard_mj

    args = hard_mj.MujocoArgs(output_dir=str(tmp_path), target="group-softmax", num_trunks=2, group_size=4, segment_length=16, num_minibatches=2,
                              update_epochs=2, total_timesteps=1024, eval_every=100, num_eval_episodes=1, teacher=teacher)
    summary = hard_mj.train_mujoco(args)
    logged = scalars(os.path.join(str(tmp_path), summary["run_name"]))
    assert summary["global_step"] == 1024
    for tag in ["losses/fit", "losses/k_old", "charts/alpha", "charts/eta", "charts/kl_q_uniform", "charts/chi2_q_uniform"]:
        assert tag in logged, tag
    kl_q = [v for _, v in logged["charts/kl_q_uniform"]]
    if teacher == "oracle":  # distinct returns: every group has signal and sits on the budget
        assert all(abs(v - args.eps_q) < 1e-5 for v in kl_q), kl_q
    else:  # flipped labels can cancel a group's net win rates: that group's target is uniform (KL 0)
        assert all(-1e-6 <= v <= args.eps_q + 1e-5 for v in kl_q), kl_q
    with pytest.raises(SystemExit, match="at least 2"):
        hard_mj.train_mujoco(hard_mj.MujocoArgs(update_epochs=1, num_minibatches=1, output_dir=str(tmp_path)))
