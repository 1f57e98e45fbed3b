"""`grpo_baseline_mujoco.py`: branched rollouts (spec section 6), masks, a smoke run, bad input."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import grpo_baseline_mujoco as gb


def small_args(**overrides):
    kwargs = dict(num_trunks=2, group_size=4, segment_length=16, lookahead=0, num_minibatches=2, update_epochs=2,
                  total_timesteps=1024, eval_every=100, num_eval_episodes=1)
    kwargs.update(overrides)
    return gb.MujocoArgs(**kwargs)


def branches_for(args, histories=True):
    envs = [gb.make_mujoco_env(args.env_id).unwrapped for _ in range(args.num_trunks * args.group_size)]
    rng = np.random.default_rng(0)
    for i, env in enumerate(envs):
        env.reset(seed=i)
        for _ in range(rng.integers(1, 30) if histories else 0):  # different pasts, different solver warm starts
            env.step(env.action_space.sample())
    return envs


def start_states(args):
    env = gb.make_mujoco_env(args.env_id)
    states, obs = [], []
    for n in range(args.num_trunks):
        obs.append(env.reset(seed=100 + n)[0])
        states.append(gb.snapshot(env))
    return states, np.stack(obs)


@pytest.mark.parametrize("env_id", ["HalfCheetah-v4", "Hopper-v4"])
def test_restored_branches_with_the_same_actions_are_identical(env_id):
    args = small_args(env_id=env_id)
    envs = branches_for(args)
    states, _ = start_states(args)
    actions = np.random.default_rng(1).uniform(-1, 1, size=(40, envs[0].action_space.shape[0]))
    finals = []
    for env in envs[:4]:
        gb.restore(env, states[0])
        for a in actions:
            obs, *_ = env.step(a)
        finals.append(obs)
    for other in finals[1:]:
        np.testing.assert_array_equal(finals[0], other)


def test_rollout_groups_share_their_trunk_state():
    args = small_args()
    envs = branches_for(args)
    states, obs = start_states(args)
    policy = gb.GaussianPolicy(obs.shape[1], envs[0].action_space.shape[0])
    with torch.no_grad():
        policy.log_std.fill_(-30.0)  # std ~ 1e-13: every branch of a group takes the same actions
    batch = gb.branched_rollout(policy, gb.Branches(args.env_id, len(envs), 0, envs=envs), states, obs, np.array([1000, 1000]), gb.RunningMeanStd(shape=(obs.shape[1],)),
                                args, torch.device("cpu"))
    G = args.group_size
    for n in range(args.num_trunks):
        np.testing.assert_array_equal(batch["raw_obs"][n * G: (n + 1) * G, 0], np.repeat(obs[n: n + 1], G, 0))
        np.testing.assert_allclose(batch["end_obs"][n * G: (n + 1) * G], np.repeat(batch["end_obs"][n * G: n * G + 1], G, 0), atol=1e-6)
    assert not np.allclose(batch["end_obs"][0], batch["end_obs"][G])  # different trunks, different states


def test_the_rollout_draws_what_the_policy_samples_on_normalised_observations():
    args = small_args()
    envs = branches_for(args, histories=False)
    states, obs = start_states(args)
    policy = gb.GaussianPolicy(obs.shape[1], envs[0].action_space.shape[0], log_std_init=-0.7)
    obs_rms = gb.RunningMeanStd(shape=(obs.shape[1],))
    obs_rms.mean, obs_rms.var = np.linspace(-1, 1, obs.shape[1]), np.linspace(0.5, 4, obs.shape[1])
    torch.manual_seed(3)
    batch = gb.branched_rollout(policy, gb.Branches(args.env_id, len(envs), 0, envs=envs), states, obs,
                                np.array([1000, 1000]), obs_rms, args, torch.device("cpu"))
    torch.manual_seed(3)  # the first step: every branch's draw from pi(. | its trunk's normalised observation)
    with torch.no_grad():
        expected = policy(torch.as_tensor(gb.normalize(obs_rms, np.repeat(obs, args.group_size, 0)))).sample()
    np.testing.assert_array_equal(batch["actions"][:, 0], expected.numpy())


def test_terminated_and_time_limited_branches_are_masked():
    args = small_args(env_id="Hopper-v4", segment_length=200)
    envs = branches_for(args, histories=False)
    states, obs = start_states(args)
    policy = gb.GaussianPolicy(obs.shape[1], envs[0].action_space.shape[0])
    with torch.no_grad():
        policy.log_std.fill_(1.0)  # wild actions: Hopper falls within 200 steps
    steps_left = np.array([1000, 37])  # trunk 1 is 37 steps from its time limit
    batch = gb.branched_rollout(policy, gb.Branches(args.env_id, len(envs), 0, envs=envs), states, obs, steps_left, gb.RunningMeanStd(shape=(obs.shape[1],)), args, torch.device("cpu"))
    mask, lengths, G = batch["mask"], batch["lengths"], args.group_size
    assert batch["terminated"][:G].any()
    for i in range(len(envs)):
        assert mask[i, : lengths[i]].all() and not mask[i, lengths[i]:].any()  # a prefix, then nothing
        if batch["terminated"][i]:
            assert lengths[i] < 200
    assert (lengths[G:] <= 37).all() and (lengths[G:][~batch["terminated"][G:]] == 37).all()
    assert (batch["actions"][mask == 0] == 0).all() and batch["raw_obs"][mask == 0].sum() == 0
    assert mask.shape[1] == lengths.max()  # the steps no branch reached are cut, not carried as padding


def test_lookahead_scores_the_branch_but_the_loss_and_the_trunk_stop_at_h():
    H, L = 8, 60
    args = small_args(env_id="Hopper-v4", segment_length=H)
    envs = branches_for(args, histories=False)
    states, obs = start_states(args)
    policy = gb.GaussianPolicy(obs.shape[1], envs[0].action_space.shape[0], log_std_init=0.7)  # falls in ~30 steps

    def rollout(**shape):  # the same seed: the first steps draw the same actions whatever H + L is
        torch.manual_seed(0)
        return gb.branched_rollout(policy, gb.Branches(args.env_id, len(envs), 0, envs=envs), states, obs,
                                   np.array([1000, 1000]), gb.RunningMeanStd(shape=(obs.shape[1],)),
                                   gb.replace(args, **shape), torch.device("cpu"))

    ahead, short, long = rollout(lookahead=L), rollout(lookahead=0), rollout(segment_length=H + L, lookahead=0)
    for key in ("raw_obs", "actions", "mask", "end_obs", "terminated", "segment_returns"):
        np.testing.assert_array_equal(ahead[key], short[key], err_msg=key)  # the loss and the trunk see H steps
    for a, b in zip(ahead["states"], short["states"]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ahead["scores"], long["scores"])  # the score sees all H + L
    np.testing.assert_array_equal(ahead["lengths"], long["lengths"])
    assert ahead["mask"].shape[1] == H and (ahead["segment_lengths"] <= H).all()
    fell_ahead = ~ahead["terminated"] & (ahead["lengths"] < H + L)  # the trunk goes on; the score saw the fall
    assert fell_ahead.any() and long["terminated"][fell_ahead].all() and (ahead["segment_lengths"][fell_ahead] == H).all()


@pytest.mark.parametrize("script", ["grpo_baseline_mujoco", "pair_grpo_soft_mujoco", "pair_grpo_hard_mujoco"])
def test_the_update_sees_the_batch_as_it_was_sampled(tmp_path, monkeypatch, script):
    """The old log-probs are the sampling policy's only if the batch is normalised with the statistics the
    rollout used (they take the batch's own data after it); steps after a fall are padding the loss must
    not weigh; a group holds the G branches of one trunk; a trunk goes on with one branch's state and that
    branch's observation. A swapped line, a dropped mask, groups laid across trunks or another branch's
    observation pass every return-level check on tiny runs, as do a step count or running statistics
    that take in the padding."""
    module, seen = __import__(script), []
    counts = {"sampled": 0.0, "weighted": 0.0, "padding": 0.0, "stepped": 0.0}
    normalize, rollout, loss_weights = module.normalize, module.branched_rollout, module.loss_weights
    step = module.Branches.step
    grouping = "group_advantages" if script == "grpo_baseline_mujoco" else "teacher_labels"
    group_of, scores, grouped = getattr(module, grouping), [], []

    def recording_normalize(obs_rms, x):
        seen.append((x.ndim, obs_rms.count, obs_rms.mean.copy()))
        return normalize(obs_rms, x)

    probe = module.make_mujoco_env("Hopper-v4")
    probe.reset(seed=0)

    def recording_rollout(policy, branches, trunk_states, trunk_obs, *rest):
        for state, obs in zip(trunk_states, trunk_obs):  # a trunk goes on from one branch: its state and its obs
            module.restore(probe, state)
            np.testing.assert_array_equal(obs, probe.unwrapped._get_obs())
        batch = rollout(policy, branches, trunk_states, trunk_obs, *rest)
        counts["sampled"] += batch["mask"].sum()
        counts["padding"] += (batch["mask"] == 0).sum()
        scores.append(torch.as_tensor(batch["scores"], dtype=torch.float32))
        return batch

    def recording_grouping(values, *rest, **kwargs):
        grouped.append((values.clone(), scores[-1]))  # against the scores of the rollout just made
        return group_of(values, *rest, **kwargs)

    def counting_step(branches, actions, active):  # the simulator's own count of environment steps
        counts["stepped"] += active.sum()
        return step(branches, actions, active)

    def recording_weights(mask, aggregation):
        counts["weighted"] += mask.sum().item()
        return loss_weights(mask, aggregation)

    for name, wrapper in [("normalize", recording_normalize), ("branched_rollout", recording_rollout),
                          ("loss_weights", recording_weights), (grouping, recording_grouping)]:
        monkeypatch.setattr(module, name, wrapper)
    monkeypatch.setattr(module.Branches, "step", counting_step)
    args = module.MujocoArgs(env_id="Hopper-v4", num_trunks=2, group_size=4, segment_length=16, lookahead=0,
                             num_minibatches=2, update_epochs=2, log_std_init=0.5, total_timesteps=1500,
                             eval_every=100, num_eval_episodes=1, output_dir=str(tmp_path), save_model=True)
    summary = module.train_mujoco(args)
    probe.close()
    batch_calls = [i for i, (ndim, _, _) in enumerate(seen) if ndim == 3]
    assert batch_calls
    for i in batch_calls:  # the batch: the statistics of the rollout's last step
        assert seen[i - 1][0] == 2 and seen[i][1] == seen[i - 1][1]
        np.testing.assert_array_equal(seen[i][2], seen[i - 1][2])
    assert counts["padding"] > 0 and counts["weighted"] == pytest.approx(args.update_epochs * counts["sampled"])
    assert summary["global_step"] == counts["stepped"]
    saved = torch.load(os.path.join(str(tmp_path), summary["run_name"], "model.pt"))
    assert saved["obs_count"] == pytest.approx(counts["sampled"], abs=1e-3)  # the statistics saw each step once
    assert len(grouped) >= len(scores)
    for values, sampled in grouped:  # row n: trunk n's branches, in order
        torch.testing.assert_close(values.cpu(), sampled.view(args.num_trunks, args.group_size))


def test_segment_advantage_is_shared_by_every_step_and_masked_steps_get_no_gradient():
    scores = torch.tensor([1.0, 3.0, 2.0, 6.0])
    advantages = gb.group_advantages(scores.view(1, 4)).view(-1)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    logp = torch.zeros(4, 3, requires_grad=True)  # at theta_old: every ratio is 1
    surrogate, _ = gb.clipped_surrogate(logp, logp.detach(), advantages[:, None], 0.2, 0.2)
    weights = gb.loss_weights(mask, "sequence")
    (-(weights * surrogate).sum()).backward()
    lengths = mask.sum(1, keepdim=True)
    torch.testing.assert_close(logp.grad, -advantages[:, None] * mask / lengths / 4)


def test_smoke_run_logs_saves_and_reloads(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = small_args(output_dir=str(tmp_path), group_size=2, total_timesteps=2 * 2 * 250 * 4, segment_length=250,
                      eval_every=1, save_model=True)  # 4 segments of 250 steps: each trunk finishes one episode
    summary = gb.train_mujoco(args)
    run_dir = os.path.join(str(tmp_path), summary["run_name"])
    assert summary["global_step"] == 4000 and summary["episodic_return"] is not None
    acc = EventAccumulator(run_dir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"charts/episodic_return", "charts/SPS", "eval/episodic_return", "losses/policy_loss",
            "losses/approx_kl", "losses/clipfrac", "losses/entropy"} <= tags
    rates = [s.value for s in acc.Scalars("charts/learning_rate")]  # HalfCheetah's default: constant
    assert len(rates) == 4 and rates == pytest.approx([args.learning_rate] * 4)
    assert len(acc.Scalars("charts/episodic_return")) == 2  # one finished episode per trunk
    saved = torch.load(os.path.join(run_dir, "model.pt"))  # the safe default: tensors and plain values only
    policy = gb.GaussianPolicy(17, 6)
    policy.load_state_dict(saved["policy"])
    assert saved["obs_mean"].shape == (17,) and saved["obs_count"] > 4000
    assert json.load(open(os.path.join(run_dir, "summary.json")))["global_step"] == 4000


def test_env_defaults_serve_every_version_of_a_robot():
    for v4, v5 in (("HalfCheetah-v4", "HalfCheetah-v5"), ("Hopper-v4", "Hopper-v5"), ("Walker2d-v4", "Walker2d-v5")):
        a, b = (gb.with_env_defaults(gb.MujocoArgs(env_id=e)) for e in (v4, v5))
        assert (a.num_trunks, a.segment_length, a.lookahead, a.log_std_init, a.anneal_lr) == (
            b.num_trunks, b.segment_length, b.lookahead, b.log_std_init, b.anneal_lr)
    assert gb.with_env_defaults(gb.MujocoArgs(env_id="Hopper-v5")).lookahead == 384  # not the generic row's 192
    assert gb.with_env_defaults(gb.MujocoArgs(env_id="Ant-v5")).segment_length == 16  # Ant's own row


def test_robots_without_a_row_get_the_long_score_and_ant_does_not():
    """The generic row is the look-ahead (it beat 16-step segments on Humanoid, InvertedDoublePendulum and
    Swimmer); Ant, whose noisy steps cost more than its alive bonus, keeps 16-step segments, and so does
    HumanoidStandup (GRPO 97k against the look-ahead's 64k)."""
    for env_id in ("Walker2d-v4", "Humanoid-v4", "InvertedDoublePendulum-v5", "Swimmer-v4", "Reacher-v4", "Pusher-v5"):
        row = gb.with_env_defaults(gb.MujocoArgs(env_id=env_id))
        assert (row.num_trunks, row.segment_length, row.lookahead, row.log_std_init, row.anneal_lr) == (
            4, 128, 192, -0.5, False), env_id
    for env_id in ("Ant-v4", "InvertedPendulum-v4", "HumanoidStandup-v4", "HumanoidStandup-v5"):
        row = gb.with_env_defaults(gb.MujocoArgs(env_id=env_id))
        assert (row.num_trunks, row.segment_length, row.lookahead, row.log_std_init, row.anneal_lr) == (
            8, 16, 0, 0.0, True), env_id


def test_env_defaults_fill_only_the_fields_left_unset():
    for env_id, H, L in (("Hopper-v4", 128, 384), ("Walker2d-v4", 128, 192)):  # H learned steps, scored L past them
        falls = gb.with_env_defaults(gb.MujocoArgs(env_id=env_id))
        assert (falls.segment_length, falls.lookahead, falls.num_trunks, falls.log_std_init) == (H, L, 4, -0.5)
    assert gb.with_env_defaults(gb.MujocoArgs(env_id="Hopper-v4", segment_length=1000, lookahead=0)).lookahead == 0
    cheetah = gb.with_env_defaults(gb.MujocoArgs(env_id="HalfCheetah-v4"))
    assert (cheetah.segment_length, cheetah.log_std_init) == (64, -3.0)  # small noise, long segments: upright
    assert (cheetah.num_trunks, cheetah.num_minibatches) == (4, 4)  # unset minibatches: one group each
    assert cheetah.anneal_lr is False  # a constant rate: the return still climbs at 1M steps
    assert gb.with_env_defaults(gb.MujocoArgs(env_id="HalfCheetah-v4", anneal_lr=True)).anneal_lr is True
    assert gb.with_env_defaults(gb.MujocoArgs(env_id="HalfCheetah-v4", num_trunks=16)).num_minibatches == 16
    assert gb.with_env_defaults(gb.MujocoArgs(num_trunks=8, num_minibatches=2)).num_minibatches == 2
    assert gb.with_env_defaults(gb.MujocoArgs(env_id="HalfCheetah-v4", log_std_init=0.5)).log_std_init == 0.5
    for env_id in ("Hopper-v4", "Walker2d-v4"):  # a constant rate, as on HalfCheetah
        assert gb.with_env_defaults(gb.MujocoArgs(env_id=env_id)).anneal_lr is False
    assert gb.with_env_defaults(gb.MujocoArgs(env_id="Hopper-v4")).num_minibatches == 4
    pendulum = gb.with_env_defaults(gb.MujocoArgs(env_id="InvertedPendulum-v4"))
    assert (pendulum.segment_length, pendulum.lookahead, pendulum.log_std_init, pendulum.anneal_lr) == (16, 0, 0.0, True)
    assert cheetah.lookahead == 0


def test_hopper_smoke_run_with_terminations(tmp_path):
    summary = gb.train_mujoco(small_args(env_id="Hopper-v4", output_dir=str(tmp_path), total_timesteps=3000,
                                         segment_length=None, lookahead=None))  # the defaults: a look-ahead
    assert summary["global_step"] >= 3000


def test_lookahead_steps_count_but_the_episode_clock_moves_by_h(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # H = 250, L = 100: three iterations of 350 steps per branch, then the time limit cuts the fourth to 250
    args = small_args(output_dir=str(tmp_path), group_size=2, segment_length=250, lookahead=100, total_timesteps=1)
    summary = gb.train_mujoco(gb.replace(args, total_timesteps=2 * 2 * (3 * 350 + 250)))
    assert (summary["global_step"], summary["iterations"]) == (5200, 4)
    acc = EventAccumulator(os.path.join(str(tmp_path), summary["run_name"]))
    acc.Reload()
    assert [s.value for s in acc.Scalars("charts/episodic_length")] == [1000, 1000]  # one episode per trunk


@pytest.mark.parametrize("script", ["grpo_baseline_mujoco", "pair_grpo_soft_mujoco", "pair_grpo_hard_mujoco"])
def test_a_training_episode_counts_the_trunks_own_steps_and_rewards_only(tmp_path, script):
    """The goal's measure. InvertedPendulum pays exactly 1 per step and its pole falls within a few dozen
    random steps, often inside a segment: an episode's return must equal its length. Counting a chosen
    branch's look-ahead rewards raises the return; advancing the clock by H past a fall raises the length."""
    from test_lm_runs import scalars

    module = __import__(script)
    summary = module.train_mujoco(module.MujocoArgs(env_id="InvertedPendulum-v4", num_trunks=2, group_size=4,
                                                    segment_length=8, lookahead=16, total_timesteps=3000,
                                                    eval_every=100, num_eval_episodes=1, output_dir=str(tmp_path)))
    logged = scalars(os.path.join(str(tmp_path), summary["run_name"]))
    lengths, returns = ([value for _, value in logged[f"charts/episodic_{k}"]] for k in ("length", "return"))
    assert len(lengths) >= 5 and any(n % 8 for n in lengths)  # episodes, some ending inside a segment
    assert returns == pytest.approx(lengths)


def expect_error(match, **overrides):
    with pytest.raises(SystemExit) as info:
        gb.train_mujoco(small_args(**overrides))
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message and match in message, message


def test_bad_mujoco_input(tmp_path):
    expect_error("--group-size", group_size=1, output_dir=str(tmp_path))
    expect_error("--num-minibatches 3 must divide --num-trunks 2", num_minibatches=3, output_dir=str(tmp_path))
    expect_error("not a MuJoCo environment", env_id="CartPole-v1", output_dir=str(tmp_path))
    expect_error("--env-id 'NoSuchEnv-v0'", env_id="NoSuchEnv-v0", output_dir=str(tmp_path))


@pytest.mark.parametrize("script", ["grpo_baseline_mujoco", "pair_grpo_soft_mujoco", "pair_grpo_hard_mujoco"])
@pytest.mark.parametrize("flag, overrides", [
    ("--learning-rate", dict(learning_rate=-1e-3)), ("--learning-rate", dict(learning_rate=float("nan"))),
    ("--max-grad-norm", dict(max_grad_norm=0.0)), ("--log-std-init", dict(log_std_init=float("inf"))),
    ("--beta", dict(beta=float("nan"))), ("--num-minibatches", dict(num_minibatches=0)),
    ("--num-trunks", dict(num_trunks=0)), ("--group-size", dict(group_size=0))])
def test_bad_settings_fail_in_one_line(tmp_path, script, flag, overrides):
    """Not a traceback from Adam or from a later check dividing by the bad count, nor a run that silently
    never learns or drops its KL term."""
    module = __import__(script)
    with pytest.raises(SystemExit) as info:
        module.train_mujoco(module.MujocoArgs(output_dir=str(tmp_path), total_timesteps=1024, **overrides))
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message and flag in message, message
    assert not os.listdir(tmp_path)  # failed before a run folder was made


@pytest.mark.parametrize("script", ["grpo_baseline_mujoco", "pair_grpo_soft_mujoco", "pair_grpo_hard_mujoco"])
def test_output_dir_that_cannot_be_made_fails_in_one_line(tmp_path, script):
    module, blocker = __import__(script), tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match=r"^error: --output-dir .*a_file/runs.*: cannot create it") as info:
        module.train_mujoco(module.MujocoArgs(output_dir=str(blocker / "runs"), total_timesteps=1024))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("env_id", ["HalfCheetah-v4", "Hopper-v4"])
def test_worker_processes_step_the_same_branches(tmp_path, env_id):
    from test_lm_runs import scalars

    runs = {}
    for workers in [0, 3]:  # 3 workers over 8 branches: uneven slices
        summary = gb.train_mujoco(small_args(env_id=env_id, output_dir=str(tmp_path / str(workers)), total_timesteps=3000,
                                             segment_length=64, eval_every=2, num_workers=workers))
        runs[workers] = scalars(os.path.join(str(tmp_path / str(workers)), summary["run_name"]))
    assert runs[0].keys() == runs[3].keys() and "eval/episodic_return" in runs[0]
    for tag in runs[0]:
        if tag != "charts/SPS":
            assert runs[0][tag] == runs[3][tag], tag


def test_bad_worker_count():
    with pytest.raises(SystemExit, match="--num-workers must lie in"):
        gb.train_mujoco(small_args(num_workers=99))


@pytest.mark.parametrize("script", ["grpo_baseline_mujoco", "pair_grpo_soft_mujoco", "pair_grpo_hard_mujoco"])
def test_capture_video_without_moviepy_fails_before_training(tmp_path, monkeypatch, script):
    module = __import__(script)
    monkeypatch.setitem(sys.modules, "moviepy", None)  # as on a machine without it: the import fails
    with pytest.raises(SystemExit, match="--capture-video: cannot record .*moviepy") as info:
        module.train_mujoco(module.MujocoArgs(capture_video=True, output_dir=str(tmp_path), total_timesteps=1024))
    assert "\n" not in str(info.value) and not os.listdir(tmp_path)  # one line, and no run was started


def test_running_statistics_equal_those_of_all_the_data_seen():
    data = np.random.default_rng(0).normal(3.0, 2.0, size=(300, 5))
    rms = gb.RunningMeanStd(shape=(5,))
    for part in np.array_split(data, [10, 150, 151]):  # uneven batches, one of a single row
        rms.update(part)
    np.testing.assert_allclose(rms.mean, data.mean(0), rtol=1e-5)
    np.testing.assert_allclose(rms.var, data.var(0), rtol=1e-5)  # the 1e-4 prior count weighs ~3e-7
    np.testing.assert_allclose(gb.normalize(rms, data).mean(0), 0.0, atol=1e-5)


def test_worker_branches_snapshot_the_asked_branches_in_order():
    args = small_args()
    states, obs = start_states(args)
    local, workers = gb.Branches(args.env_id, 8, 0), gb.Branches(args.env_id, 8, 0, num_workers=3)
    actions = np.random.default_rng(2).uniform(-1, 1, size=(8, local.action_space.shape[0]))
    for branches in (local, workers):
        branches.restore([states[i % 2] for i in range(8)])
        branches.step(actions, np.ones(8, dtype=bool))
    picked = [1, 2, 6, 7]  # spans the workers' slices (3, 3, 2 branches)
    for a, b in zip(local.snapshot(picked), workers.snapshot(picked)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(local.snapshot([1])[0], local.snapshot([2])[0])  # different actions, different states
    workers.close()


def test_capture_video_records_the_final_episode_in_the_run_folder(tmp_path):
    import subprocess

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "grpo_baseline_mujoco.py")
    proc = subprocess.run([sys.executable, script, "--env-id", "InvertedPendulum-v4", "--total-timesteps", "512",
                           "--num-trunks", "2", "--group-size", "4",
                           "--num-minibatches", "2", "--num-eval-episodes", "1", "--capture-video",
                           "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, MUJOCO_GL="egl"))
    if proc.returncode and "cannot record" in proc.stderr and "moviepy" not in proc.stderr.split("(")[1]:
        pytest.skip("no EGL renderer here: " + proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_name,) = os.listdir(tmp_path)
    videos = [f for f in os.listdir(tmp_path / run_name / "videos") if f.endswith(".mp4")]
    assert len(videos) == 1 and os.path.getsize(tmp_path / run_name / "videos" / videos[0]) > 1000  # a short episode


def test_policy_return_benchmark_plays_the_mean_action_as_the_script_evaluates(monkeypatch):
    """`benchmarks/mujoco_policy_return.py` compares a run's training figure with its saved policy played
    again; its mean-action episode must be the script's own evaluation episode for the same reset."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from mujoco_policy_return import play

    torch.manual_seed(0)
    policy, obs_rms = gb.GaussianPolicy(11, 3, -0.5), gb.RunningMeanStd(shape=(11,))
    obs_rms.update(np.random.default_rng(0).normal(size=(100, 11)))
    args = small_args(env_id="Hopper-v4")
    ret, length = play(policy, obs_rms, "Hopper-v4", sampled=False, reset_seed=1000)
    assert ret == pytest.approx(gb.evaluate_mujoco(policy, obs_rms, args, 1, 1000, "cpu")[0]) and 1 < length < 1000
    assert play(policy, obs_rms, "Hopper-v4", sampled=True, reset_seed=1000)[0] != pytest.approx(ret)


def test_evaluation_episodes_start_from_their_own_resets():
    """Each of --num-eval-episodes starts from its own seeded reset: the same start played three times
    would report one episode's return as a mean over three."""
    torch.manual_seed(0)
    policy, obs_rms = gb.GaussianPolicy(11, 3, -0.5), gb.RunningMeanStd(shape=(11,))
    obs_rms.update(np.random.default_rng(0).normal(size=(100, 11)))
    args = small_args(env_id="Hopper-v4")
    together = gb.evaluate_mujoco(policy, obs_rms, args, 3, 1000, "cpu")
    alone = [gb.evaluate_mujoco(policy, obs_rms, args, 1, 1000 + i, "cpu")[0] for i in range(3)]
    assert together == pytest.approx(alone) and len(set(together)) == 3


@pytest.mark.parametrize("env_id", ["Hopper-v4", "Walker2d-v4"])
def test_random_search_changes_the_scripts_real_defaults_through_real_flags(monkeypatch, env_id):
    """`benchmarks/mujoco_random_search.py` lists each knob's default first and draws changes from the
    rest: the first value must be what the script runs with, and every drawn flag must parse and take effect."""
    import tyro

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from mujoco_random_search import SPACE, draw, flags

    defaults = gb.with_env_defaults(gb.MujocoArgs(env_id=env_id))
    for knob, values in SPACE.items():
        values = values[env_id] if isinstance(values, dict) else values
        field = "clip_eps_low" if knob == "--clip" else knob[2:].replace("-", "_")
        assert float(values[0]) == getattr(defaults, field), knob
    rng, taken = np.random.default_rng(0), [{}]
    for _ in range(20):
        taken.append(draw(rng, env_id, 0.3, taken))
    assert [draw(np.random.default_rng(0), env_id, 0.3, [{}])] == taken[1:2]  # the same search seed, the same draws
    assert len({tuple(sorted(c.items())) for c in taken}) == len(taken)
    for picked in taken[1:]:
        changed = gb.with_env_defaults(tyro.cli(gb.MujocoArgs, args=["--env-id", env_id, *flags(picked)]))
        differ = {k for k, v in vars(changed).items() if v != getattr(defaults, k)}
        assert differ == {"clip_eps_low" if k == "--clip" else k[2:].replace("-", "_") for k in picked} | (
            {"clip_eps_high"} if "--clip" in picked else set()) | (
            {"num_minibatches"} if "--num-trunks" in picked else set())


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git apply")
def test_every_benchmark_patch_applies_to_its_script():
    """docs/results.md reruns its diagnostic patches with `git apply`: a script change must carry them along."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = os.path.join(root, "benchmarks", "patches")
    for name in sorted(os.listdir(folder)):
        check = subprocess.run(["git", "apply", "--check", os.path.join(folder, name)], cwd=root,
                               capture_output=True, text=True)
        assert check.returncode == 0, f"benchmarks/patches/{name} no longer applies: {check.stderr.strip()}"
