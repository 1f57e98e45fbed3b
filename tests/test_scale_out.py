"""Scale-out and survival: torchrun ranks, resume, signals, non-finite steps."""
import os
import signal
import subprocess
import sys

import pytest
import torch

import grpo_baseline as gb
from test_lm_runs import ROOT, run, scalars

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def saved_parameters(run_dir: str) -> dict:
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "model")).named_parameters())


def assert_same_scalars(dir_a: str, dir_b: str):
    """Same tags, same (step, value) pairs. Sorted by step: a run cut and resumed in one
    process within one second writes two event files whose names sort by a counter
    (".9" after ".10"), so the reader may see the resumed file first."""
    a, b = scalars(dir_a), scalars(dir_b)
    assert a.keys() == b.keys()
    for tag in a:
        if tag != "charts/SPS":  # wall-clock
            assert sorted(a[tag]) == sorted(b[tag]), tag


def only_run(folder) -> str:
    (name,) = [n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n))]
    return os.path.join(folder, name)


@pytest.mark.parametrize("script, fast", [("grpo_baseline.py", "off"), ("pair_grpo_soft_lm.py", "off"),
                                          ("pair_grpo_hard_lm.py", "off"), ("grpo_baseline.py", "on")])
def test_two_gloo_ranks_end_with_the_parameters_of_one_process(tmp_path, script, fast):
    # token aggregation and small micro-batches exercise the rank weighting and the gradient sync;
    # the pair scripts' default (oracle) teacher draws no noise, so the runs can agree exactly.
    # fast "on": the two ranks sample from their rollout copies, the one process from its policy
    # each rank runs through tests/run_rank.py, which also fails if gloo's threads outlive the script
    flags = [
        "--num-iterations", "3", "--eval-every", "3", "--update-epochs", "2", "--loss-aggregation", "token",
        "--micro-batch-size", "12", "--save-model"]
    script = os.path.join(ROOT, script)
    one = subprocess.run([sys.executable, script, *flags, "--output-dir", str(tmp_path / "one")],
                         env=ENV, capture_output=True, text=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          os.path.join(ROOT, "tests", "run_rank.py"), script, *flags, "--fast-generation", fast,
                          "--output-dir", str(tmp_path / "two")],
                         env=ENV, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    # all but the warnings: a rank that aborts prints its cause without a "[rank" prefix
    assert two.returncode == 0, "\n".join(line for line in two.stderr.splitlines() if "warn" not in line.lower())[-6000:]
    assert "rank 0 of 2" in two.stdout
    a, b = saved_parameters(only_run(tmp_path / "one")), saved_parameters(only_run(tmp_path / "two"))
    gb.seed_everything(1, True)  # the runs' starting weights, to measure how far training moved them
    start = dict(gb.load_lm_policy(gb.LMArgs(), torch.device("cpu"))[0].named_parameters())
    for name in a:
        # Summing gradients over ranks changes float rounding, which Adam's normalisation can
        # amplify on near-zero gradients: the tolerance is 1% of the distance trained.
        moved = (a[name] - start[name]).abs().max().item()
        assert moved > 1e-3, name
        assert (a[name] - b[name]).abs().max().item() <= 1e-2 * moved, name
    # the same completions were sampled and scored, split over two ranks
    assert scalars(only_run(tmp_path / "one"))["charts/score"] == scalars(only_run(tmp_path / "two"))["charts/score"]


def test_resumed_run_equals_the_uninterrupted_run(tmp_path):
    common = dict(eval_every=2, update_epochs=2, num_minibatches=2, save_model=True)
    _, full_dir = run(tmp_path / "full", num_iterations=4, **common)
    first, part_dir = run(tmp_path / "part", num_iterations=2, checkpoint_every=2, **common)
    second, resumed_dir = run(tmp_path / "part", num_iterations=4, resume=part_dir, **common)
    assert resumed_dir == part_dir and second["global_step"] == 2 * first["global_step"]
    assert_same_scalars(full_dir, resumed_dir)
    a, b = saved_parameters(full_dir), saved_parameters(resumed_dir)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)


def test_resume_refuses_a_different_run(tmp_path):
    _, part_dir = run(tmp_path, num_iterations=1, checkpoint_every=1, eval_every=1)
    with pytest.raises(SystemExit, match="--resume .*different --learning-rate"):
        gb.train_lm(gb.LMArgs(output_dir=str(tmp_path), num_iterations=2, resume=part_dir, learning_rate=0.1))
    with pytest.raises(SystemExit, match="--resume .*no checkpoint"):
        gb.train_lm(gb.LMArgs(output_dir=str(tmp_path), resume=str(tmp_path)))


def test_sigterm_mid_run_leaves_a_checkpoint_that_resumes(tmp_path):
    script = os.path.join(ROOT, "grpo_baseline.py")
    proc = subprocess.Popen([sys.executable, script, "--num-iterations", "1000", "--eval-every", "1000",
                             "--output-dir", str(tmp_path)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("iter 1/"):
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, out
    assert "Traceback" not in out and "continue with --resume" in out, out
    folder = os.path.join(only_run(tmp_path), "checkpoint")
    state = torch.load(os.path.join(folder, "state.pt"), weights_only=False)
    stopped_at = state["iteration"]
    assert 1 <= stopped_at < 1000
    summary = gb.train_lm(gb.LMArgs(output_dir=str(tmp_path), num_iterations=stopped_at + 1, eval_every=1000, resume=folder))
    assert summary["global_step"] == (stopped_at + 1) * 64


def test_nonfinite_loss_is_skipped_and_counted(tmp_path, monkeypatch):
    calls, real = [], gb.clipped_surrogate

    def poisoned(*a, **k):  # the second minibatch step of the run gets a NaN loss
        calls.append(1)
        surrogate, clipped = real(*a, **k)
        return (surrogate * float("nan"), clipped) if len(calls) == 2 else (surrogate, clipped)

    monkeypatch.setattr(gb, "clipped_surrogate", poisoned)
    summary, run_dir = run(tmp_path, num_iterations=3, eval_every=3, save_model=True)
    assert summary["nonfinite_skipped_steps"] == 1
    assert dict(scalars(run_dir)["charts/nonfinite_skipped_steps"]) == {64: 0, 128: 1, 192: 1}
    assert all(torch.isfinite(p).all() for p in saved_parameters(run_dir).values())


def test_repeated_nonfinite_losses_stop_with_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(gb, "clipped_surrogate", lambda logp, *a: (logp * float("nan"), torch.zeros_like(logp)))
    with pytest.raises(SystemExit, match="3 non-finite losses or gradients in a row .*checkpoint in"):
        run(tmp_path, num_iterations=5, eval_every=5, update_epochs=2, num_minibatches=2)
    state = torch.load(os.path.join(only_run(tmp_path), "checkpoint", "state.pt"), weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["policy"].values())


def test_mujoco_run_stopped_by_sigterm_and_resumed_equals_the_uninterrupted_run(tmp_path):
    script = os.path.join(ROOT, "grpo_baseline_mujoco.py")
    flags = ["--total-timesteps", "12000", "--num-trunks", "4", "--group-size", "4", "--num-minibatches", "2", "--eval-every", "1",
             "--num-eval-episodes", "1", "--save-model"]
    full = subprocess.run([sys.executable, script, *flags, "--output-dir", str(tmp_path / "full")],
                          env=ENV, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-2000:]
    proc = subprocess.Popen([sys.executable, script, *flags, "--output-dir", str(tmp_path / "cut")], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("iter 2 "):
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, out
    cut_dir = only_run(tmp_path / "cut")
    state = torch.load(os.path.join(cut_dir, "checkpoint", "state.pt"), weights_only=False)
    assert 0 < state["global_step"] < 12000
    resumed = subprocess.run([sys.executable, script, *flags, "--output-dir", str(tmp_path / "cut"), "--resume", cut_dir],
                             env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_scalars(only_run(tmp_path / "full"), cut_dir)
    pa = torch.load(os.path.join(only_run(tmp_path / "full"), "model.pt"), weights_only=False)
    pb = torch.load(os.path.join(cut_dir, "model.pt"), weights_only=False)
    for name, value in pa["policy"].items():
        assert torch.equal(value, pb["policy"][name]), name


@pytest.mark.parametrize("script", ["grpo_baseline_mujoco", "pair_grpo_soft_mujoco", "pair_grpo_hard_mujoco"])
def test_a_resumed_mujoco_run_starts_its_next_episodes_where_the_uninterrupted_run_does(tmp_path, script):
    """A trunk that falls starts its next episode from the reset environment's random stream, so the
    checkpoint must carry that stream: on HalfCheetah, above, no episode ends within a test's steps."""
    module = __import__(script)
    common = dict(env_id="Hopper-v4", num_trunks=2, group_size=4, segment_length=16, lookahead=16, log_std_init=0.7,
                  eval_every=1, num_eval_episodes=1, anneal_lr=False)  # wide noise: falls within ~30 steps

    def go(folder, **kw):
        summary = module.train_mujoco(module.MujocoArgs(output_dir=str(folder), **common, **kw))
        return os.path.join(str(folder), summary["run_name"])

    full = go(tmp_path / "full", total_timesteps=2048)
    part = go(tmp_path / "part", total_timesteps=1024, checkpoint_every=1)
    go(tmp_path / "part", resume=part, total_timesteps=2048)
    assert len([step for step, _ in scalars(full)["charts/episodic_return"] if step > 1024]) >= 2
    assert_same_scalars(full, part)


@pytest.mark.parametrize("script", ["pair_grpo_soft_lm", "pair_grpo_hard_lm", "pair_grpo_soft_mujoco", "pair_grpo_hard_mujoco"])
def test_pair_scripts_resume_their_teacher_noise_and_multiplier(tmp_path, script):
    module = __import__(script)
    if script.endswith("_lm"):  # the cut run evaluates at its end, so both evaluate every iteration
        train, make, common = module.train_lm, module.LMArgs, dict(eval_every=1, num_eval_prompts=8)
        length, full_length, cut_length, every = "num_iterations", 2, 1, 1
    else:  # constant lr: annealing follows --total-timesteps, which the resume changes
        train, make = module.train_mujoco, module.MujocoArgs
        common = dict(num_trunks=2, group_size=4, num_minibatches=2, segment_length=64, eval_every=2,
                      num_eval_episodes=1, anneal_lr=False)
        length, full_length, cut_length, every = "total_timesteps", 2048, 1024, 2

    def go(folder, **kw):
        summary = train(make(output_dir=str(folder), teacher="stochastic", **common, **kw))
        return os.path.join(str(folder), summary["run_name"])

    full = go(tmp_path / "full", **{length: full_length})
    part = go(tmp_path / "part", checkpoint_every=every, **{length: cut_length})
    go(tmp_path / "part", resume=part, **{length: full_length})
    assert_same_scalars(full, part)


@pytest.mark.parametrize("script", ["pair_grpo_soft_lm", "pair_grpo_hard_lm", "grpo_baseline_mujoco",
                                    "pair_grpo_soft_mujoco", "pair_grpo_hard_mujoco"])
def test_every_other_script_skips_a_nonfinite_step_and_keeps_its_weights_finite(tmp_path, monkeypatch, script):
    """Each training loop is the script's own: the guard above must hold in every copy of it."""
    module, calls = __import__(script), []
    real = module.loss_weights

    def poisoned(*a, **k):  # the run's second minibatch gets NaN weights, so a NaN loss and NaN gradients
        calls.append(1)
        return real(*a, **k) * (float("nan") if len(calls) == 2 else 1.0)

    monkeypatch.setattr(module, "loss_weights", poisoned)
    common = dict(output_dir=str(tmp_path), update_epochs=2, save_model=True)
    if script.endswith("mujoco"):
        summary = module.train_mujoco(module.MujocoArgs(num_trunks=2, group_size=4, segment_length=16, lookahead=0,
                                                        num_minibatches=2, total_timesteps=256, eval_every=100,
                                                        num_eval_episodes=1, **common))
        weights = torch.load(os.path.join(tmp_path, summary["run_name"], "model.pt"))["policy"]
    else:
        summary = module.train_lm(module.LMArgs(num_iterations=2, prompts_per_step=2, group_size=4, max_new_tokens=8,
                                                num_eval_prompts=4, **common))
        weights = saved_parameters(os.path.join(tmp_path, summary["run_name"]))
    assert summary["nonfinite_skipped_steps"] == 1 and len(calls) >= 4
    assert all(torch.isfinite(w).all() for w in weights.values())
