"""Mutation check of the test suite: put a known slip into the scripts, run the tests, expect a failure.

    python tests/mutations.py                # all of them: about 3 minutes each on this project's 2 cores
    python tests/mutations.py NAME [NAME]    # some of them

Each mutation is a realistic slip (an argument swapped, a line moved up, a division dropped, a flag
ignored), applied to every script that holds the line, in a copy of the checkout's tracked files. The
suite runs there without the 2-rank gloo runs (a minute each, and every slip here sits in code that one
process runs too) and without the patch check (a moved line breaks a patch's context, which says nothing
of behaviour); first once unchanged, which must pass. Prints CAUGHT and the first failing test, or MISSED;
exits 1 if any was missed. Not part of the suite or of CI: run it after changing a training loop."""
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["grpo_baseline.py", "pair_grpo_soft_lm.py", "pair_grpo_hard_lm.py",
           "grpo_baseline_mujoco.py", "pair_grpo_soft_mujoco.py", "pair_grpo_hard_mujoco.py"]
SKIP = ["tests/test_scale_out.py::test_two_gloo_ranks_end_with_the_parameters_of_one_process",
        "tests/test_mujoco.py::test_every_benchmark_patch_applies_to_its_script"]
MUTATIONS = [  # name, a line's text in the scripts, the slip
    ('all_clip_max',
     'torch.minimum(unclipped, clipped)',
     'torch.maximum(unclipped, clipped)'),
    ('all_group_adv_batch_std',
     'rewards.std(dim=1, keepdim=True)',
     'rewards.std()'),
    ('all_k3_sign',
     'log_ratio = ref_logp - logp',
     'log_ratio = logp - ref_logp'),
    ('all_labels_lower_not_antisymmetric',
     'labels = torch.where(upper, labels, 1 - labels.transpose(1, 2))',
     'labels = torch.where(upper, labels, labels)'),
    ('all_loss_weights_sequence_as_token',
     'return mask / mask.sum(1, keepdim=True).clamp(min=1) / mask.shape[0]',
     'return mask / mask.sum().clamp(min=1)'),
    ('all_mask_ignored_in_weights',
     'weights = loss_weights(mask[rows], args.loss_aggregation)',
     'weights = loss_weights(torch.ones_like(mask[rows]), args.loss_aggregation)'),
    ('all_net_win_rate_divides_by_G',
     '(2 * labels - 1).sum(dim=2) / (labels.shape[1] - 1)',
     '(2 * labels - 1).sum(dim=2) / labels.shape[1]'),
    ('all_reverse_kl_direction',
     'return (log_p.exp() * (log_p - torch.log(q))).sum(1)',
     'return (q * (torch.log(q) - log_p)).sum(1)'),
    ('all_seq_log_ratio_unnormalised',
     'return ((logp - old_logp) * mask).sum(1) / mask.sum(1).clamp(min=1)',
     'return ((logp - old_logp) * mask).sum(1)'),
    ('hard_gaussian_kl_reversed',
     'gaussian_kl(old_dist.mean[rows], old_dist.stddev[rows], dist.mean, dist.stddev)',
     'gaussian_kl(dist.mean, dist.stddev, old_dist.mean[rows], old_dist.stddev[rows])'),
    ('lm_anchor_swapped',
     'anchored_to_ref = args.beta > 0 and args.kl_anchor == "ref"',
     'anchored_to_ref = args.beta > 0 and args.kl_anchor == "old"'),
    ('lm_beta_kl_swapped',
     'kl = k3_kl(logp, ref_logp[idx] if anchored_to_ref else old)',
     'kl = k3_kl(ref_logp[idx] if anchored_to_ref else old, logp)'),
    ('lm_clip_eps_swapped',
     'advantages[idx, None], args.clip_eps_low,\n                                                       args.clip_eps_high)',
     'advantages[idx, None], args.clip_eps_high,\n                                                       args.clip_eps_low)'),
    ('lm_eval_ties_ignored',
     '((s_ours > s_ref).float() + 0.5 * (s_ours == s_ref).float()).mean()',
     '(s_ours > s_ref).float().mean()'),
    ('lm_groups_interleaved',
     'group_advantages(rewards.view(local_groups, G), args.scale_rewards)',
     'group_advantages(rewards.view(G, local_groups).t().contiguous(), args.scale_rewards)'),
    ('lm_hard_anchor_always_old',
     'if args.kl_anchor == "ref" and args.beta > 0',
     'if args.kl_anchor == "none" and args.beta > 0'),
    ('lm_hard_fit_unscaled',
     'fit = fit_to_target(q.view(-1)[idx].view(-1, G), ratios).sum() / len(groups)',
     'fit = fit_to_target(q.view(-1)[idx].view(-1, G), ratios).sum()'),
    ('lm_hard_k_old_swapped',
     'k_old = (w * k3_kl(old_logp[idx], logp)).sum()',
     'k_old = (w * k3_kl(logp, old_logp[idx])).sum()'),
    ('lm_judge_records_interleaved',
     '[train_records[p] for p in prompts for _ in range(G)]',
     '[train_records[p] for _ in range(G) for p in prompts]'),
    ('lm_logprobs_ignore_temperature',
     'logits_to_keep=num_new + 1, use_cache=False).logits[:, :-1].float() / temperature',
     'logits_to_keep=num_new + 1, use_cache=False).logits[:, :-1].float()'),
    ('lm_mask_excludes_eos',
     'return ((is_eos.long().cumsum(1) - is_eos.long()) == 0).float()',
     'return (is_eos.long().cumsum(1) == 0).float()'),
    ('lm_pair_labels_interleaved',
     'labels = teacher_labels(rewards.view(local_groups, G)',
     'labels = teacher_labels(rewards.view(G, local_groups).t().contiguous()'),
    ('lm_positions_ignore_padding',
     'positions = (attention_mask.cumsum(1) - 1).clamp(min=0)',
     'positions = torch.arange(attention_mask.shape[1], device=attention_mask.device).expand_as(attention_mask)'),
    ('lm_reuse_old_always',
     'reuse_old = args.update_epochs * args.num_minibatches == 1',
     'reuse_old = True'),
    ('lm_same_noise_every_iteration',
     'sampling_seed(args.seed, 0, iteration, rank * local_groups + p, j)',
     'sampling_seed(args.seed, 0, 0, rank * local_groups + p, j)'),
    ('mj_actions_stored_clipped',
     'raw_obs[active, t], actions[active, t] = obs[active], sampled[active]',
     'raw_obs[active, t], actions[active, t] = obs[active], np.clip(sampled, low, high)[active]'),
    ('mj_anchor_always_old',
     'anchor = (ref_logp if reference is not None else old_logp)[rows]',
     'anchor = old_logp[rows]'),
    ('mj_beta_kl_swapped',
     'kl = k3_kl(logp, anchor) if',
     'kl = k3_kl(anchor, logp) if'),
    ('mj_clip_eps_swapped',
     'advantages[rows, None], args.clip_eps_low,\n                                                   args.clip_eps_high)',
     'advantages[rows, None], args.clip_eps_high,\n                                                   args.clip_eps_low)'),
    ('mj_eval_unnormalised',
     'mean_action = policy(torch.as_tensor(normalize(obs_rms, obs), device=device)).mean',
     'mean_action = policy(torch.as_tensor(obs, device=device)).mean'),
    ('mj_global_step_counts_padding',
     'global_step += int(batch["lengths"].sum())',
     'global_step += int(batch["rewards"].size)'),
    ('mj_groups_interleaved',
     'group_advantages(scores.view(N, G), args.scale_rewards)',
     'group_advantages(scores.view(G, N).t().contiguous(), args.scale_rewards)'),
    ('mj_hard_fit_sum',
     'fit = fit_to_target(q.view(-1)[rows].view(-1, G), ratios).mean()',
     'fit = fit_to_target(q.view(-1)[rows].view(-1, G), ratios).sum()'),
    ('mj_no_time_limit',
     'np.repeat(np.minimum(steps_left, H + L), G)',
     'np.repeat(np.full_like(steps_left, H + L), G)'),
    ('mj_obs_rms_includes_padding',
     'obs_rms.update(batch["raw_obs"][batch["mask"] > 0])',
     'obs_rms.update(batch["raw_obs"].reshape(-1, batch["raw_obs"].shape[-1]))'),
    ('mj_obs_rms_update_before_normalize',
     '        obs = torch.as_tensor(normalize(obs_rms, batch["raw_obs"]), device=device)\n        obs_rms.update(batch["raw_obs"][batch["mask"] > 0])  # frozen until the next iteration\n',
     '        obs_rms.update(batch["raw_obs"][batch["mask"] > 0])  # frozen until the next iteration\n        obs = torch.as_tensor(normalize(obs_rms, batch["raw_obs"]), device=device)\n'),
    ('mj_obs_tiled',
     'obs, limit = np.repeat(trunk_obs, G, axis=0)',
     'obs, limit = np.tile(trunk_obs, (G, 1))'),
    ('mj_pair_labels_interleaved',
     'labels = teacher_labels((hidden if myopic else scores).view(N, G)',
     'labels = teacher_labels((hidden if myopic else scores).view(G, N).t().contiguous()'),
    ('mj_score_ignores_lookahead',
     '"scores": rewards.sum(1)',
     '"scores": rewards[:, :H].sum(1)'),
    ('mj_train_return_counts_lookahead',
     'trunk_return[n] += batch["segment_returns"][i]',
     'trunk_return[n] += batch["scores"][i]'),
    ('mj_trunk_obs_of_branch0',
     'trunk_states[n], trunk_obs[n] = batch["states"][i], batch["end_obs"][i]',
     'trunk_states[n], trunk_obs[n] = batch["states"][i], batch["end_obs"][n * G]'),
    ('mj_trunk_one_step_late',
     '        if t == H:  # where the trunk goes on',
     '        if t == H + 1:  # where the trunk goes on'),
    ('mj_trunk_t_plus_H',
     'trunk_t[n] += batch["segment_lengths"][i]',
     'trunk_t[n] += H'),
    ('soft_scale_ignored',
     'advantages = net_win_rate(labels, args.scale_advantages)',
     'advantages = net_win_rate(labels)'),
]


def suite(workdir: str) -> subprocess.CompletedProcess:
    deselect = [arg for test in SKIP for arg in ("--deselect", test)]
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests", *deselect],
                          cwd=workdir, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))  # no stale bytecode of a slip


def run(name: str, text: str, slip: str, workdir: str) -> bool:
    held = [s for s in SCRIPTS if text in open(os.path.join(ROOT, s)).read()]
    if not held:
        sys.exit(f"{name}: no script holds {text!r} any more; update the mutation")
    for script in SCRIPTS:  # every script fresh, then the slip where the line is
        source = open(os.path.join(ROOT, script)).read()
        with open(os.path.join(workdir, script), "w") as f:
            f.write(source.replace(text, slip) if script in held else source)
    out = suite(workdir)
    if out.returncode not in (0, 1):  # pytest's own trouble (collection, usage): not a verdict on the slip
        sys.exit(f"{name}: pytest exited {out.returncode}:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    failed = [line[len("FAILED "):] for line in out.stdout.splitlines() if line.startswith("FAILED")][:1]
    print(f"{name} ({len(held)} scripts): " + (f"CAUGHT by {failed[0]}" if failed else "MISSED"), flush=True)
    return bool(failed)


if __name__ == "__main__":
    chosen = [m for m in MUTATIONS if not sys.argv[1:] or m[0] in sys.argv[1:]]
    if len(chosen) < len(set(sys.argv[1:])):
        sys.exit(f"unknown mutation; known: {', '.join(m[0] for m in MUTATIONS)}")
    with tempfile.TemporaryDirectory() as workdir:  # a copy of the tracked files: the checkout stays untouched
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        for path in tracked.split():
            os.makedirs(os.path.dirname(os.path.join(workdir, path)), exist_ok=True)
            shutil.copy(os.path.join(ROOT, path), os.path.join(workdir, path))
        clean = suite(workdir)
        if clean.returncode != 0:
            sys.exit(f"the unchanged suite fails in the copy, so no slip can be judged:\n{clean.stdout[-2000:]}")
        missed = [name for name, text, slip in chosen if not run(name, text, slip, workdir)]
    print(f"{len(chosen) - len(missed)} of {len(chosen)} caught" + (f"; missed: {', '.join(missed)}" if missed else ""))
    sys.exit(1 if missed else 0)
