"""The six scripts copy their shared pieces on purpose (each file stands alone). These tests
keep the copies honest: every function or class that two scripts both define must be the
same source, except the few that are each script's own (its Args, its checks, its loop).
What the shared pieces compute is tested once, on hand-computed inputs, in the other files."""
import importlib
import inspect

import pytest
import torch

SCRIPTS = ["grpo_baseline", "pair_grpo_soft_lm", "pair_grpo_hard_lm",
           "grpo_baseline_mujoco", "pair_grpo_soft_mujoco", "pair_grpo_hard_mujoco"]
MODULES = {name: importlib.import_module(name) for name in SCRIPTS}
OWN = {"LMArgs", "MujocoArgs", "train_lm", "train_mujoco", "validate_lm_args", "validate_mujoco_args"}


def definitions(module) -> dict:
    return {name: inspect.getsource(value) for name, value in vars(module).items()
            if (inspect.isfunction(value) or inspect.isclass(value)) and value.__module__ == module.__name__}


SOURCES = {script: definitions(module) for script, module in MODULES.items()}
SHARED = sorted({name for defs in SOURCES.values() for name in defs
                 if name not in OWN and sum(name in defs for defs in SOURCES.values()) >= 2})


def test_the_scripts_share_their_plumbing():
    """The plumbing block exists in every script, so a change to it must reach all six."""
    everywhere = {"fail", "first_line", "check", "seed_everything", "on_signal", "save_checkpoint", "load_checkpoint",
                  "k3_kl", "loss_weights"}
    assert everywhere <= {name for name in SHARED if all(name in defs for defs in SOURCES.values())}


@pytest.mark.parametrize("name", SHARED)
def test_shared_pieces_have_identical_source(name):
    sources = {script: defs[name] for script, defs in SOURCES.items() if name in defs}
    first = next(iter(sources.values()))
    assert all(src == first for src in sources.values()), f"{name} differs between {list(sources)}"


def test_every_script_lets_the_same_flags_change_on_resume():
    sets = {script: module.RESUMABLE_ARGS for script, module in MODULES.items()}
    assert all(value == sets["grpo_baseline"] for value in sets.values()), sets


def test_every_mujoco_script_has_the_same_per_environment_defaults():
    """ENV_DEFAULTS is data, not source the test above compares: a HalfCheetah row edited in one
    script alone would run GRPO, Soft and Hard on different segment lengths or noise."""
    tables = {script: module.ENV_DEFAULTS for script, module in MODULES.items() if script.endswith("_mujoco")}
    assert len(tables) == 3 and all(value == tables["grpo_baseline_mujoco"] for value in tables.values()), tables


@pytest.mark.parametrize("anchor", ["old", "ref"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_loss_takes_its_kl_terms_in_the_specs_direction_and_anchor(tmp_path, monkeypatch, script, anchor):
    """beta * KL(pi_theta || anchor) is k3 on the current log-probs against the anchor's; Hard's LM K_old =
    KL(pi_old || pi_theta) takes the batch policy's first. Swapped, either agrees with the right one to
    second order in the step, so no return and no tiny run shows it: the gradients say which is which.
    The anchor: at each batch's first step theta = theta_old, so the penalty is 0 there for `old`, and for
    `ref` only until the first update has moved the policy from where it started."""
    module, calls = MODULES[script], []
    exact = module.k3_kl

    def recording(first, second):
        value = exact(first, second)
        calls.append((first.requires_grad, second.requires_grad, value.abs().sum().item()))
        return value

    monkeypatch.setattr(module, "k3_kl", recording)
    common = dict(output_dir=str(tmp_path), beta=0.04, kl_anchor=anchor, update_epochs=2)
    if script.endswith("mujoco"):  # two iterations of 2 x 4 x 16 steps, 2 x 2 optimizer steps each
        module.train_mujoco(module.MujocoArgs(num_trunks=2, group_size=4, segment_length=16, lookahead=0,
                                              num_minibatches=2, total_timesteps=256, eval_every=100,
                                              num_eval_episodes=1, **common))
        steps = 4
    else:  # two iterations of 2 optimizer steps
        module.train_lm(module.LMArgs(num_iterations=2, prompts_per_step=2, group_size=4, max_new_tokens=8,
                                      num_eval_prompts=4, **common))
        steps = 2
    penalty = [value for needs_grad, anchor_grad, value in calls if needs_grad and not anchor_grad]
    assert ((False, True) in [c[:2] for c in calls]) == (script == "pair_grpo_hard_lm")  # K_old (MuJoCo: exact)
    assert len(penalty) == 2 * steps and penalty[0] == 0.0 and max(penalty) > 0
    assert (penalty[steps] == 0.0) == (anchor == "old"), penalty  # the second batch's first step


@pytest.mark.parametrize("script", [s for s in SCRIPTS if "hard" not in s])
def test_every_surrogate_takes_its_clip_range_the_right_way_round(tmp_path, monkeypatch, script):
    """--clip-eps-low bounds the ratio from below and --clip-eps-high from above (a wider upper range lets
    rare good tokens grow); with the defaults equal, swapped ranges change nothing any other test sees."""
    module, calls = MODULES[script], []
    exact = module.clipped_surrogate

    def recording(logp, old_logp, advantages, eps_low, eps_high):
        calls.append((eps_low, eps_high))
        return exact(logp, old_logp, advantages, eps_low, eps_high)

    monkeypatch.setattr(module, "clipped_surrogate", recording)
    common = dict(output_dir=str(tmp_path), clip_eps_low=0.1, clip_eps_high=0.3)
    if script.endswith("mujoco"):
        module.train_mujoco(module.MujocoArgs(num_trunks=2, group_size=4, segment_length=16, lookahead=0,
                                              total_timesteps=128, eval_every=100, num_eval_episodes=1, **common))
    else:
        module.train_lm(module.LMArgs(num_iterations=1, prompts_per_step=2, group_size=4, max_new_tokens=8,
                                      num_eval_prompts=4, **common))
    assert calls and set(calls) == {(0.1, 0.3)}, calls


MUJOCO_TINY = dict(num_trunks=2, group_size=4, segment_length=16, lookahead=0, total_timesteps=128, eval_every=100,
                   num_eval_episodes=1)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_optimizer_step_sees_gradients_clipped_to_max_grad_norm(tmp_path, monkeypatch, script):
    """--max-grad-norm bounds the gradient each optimizer step takes. Adam divides out a gradient's scale,
    so a clip left out changes little on any one step and nothing a short run shows: the steps say it."""
    module, norms = MODULES[script], []
    for optimizer in {torch.optim.Adam, torch.optim.AdamW}:
        def recording(self, *args, exact=optimizer.step, **kwargs):
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
            return exact(self, *args, **kwargs)

        monkeypatch.setattr(optimizer, "step", recording)
    common = dict(output_dir=str(tmp_path), max_grad_norm=1e-3, update_epochs=2)
    if script.endswith("mujoco"):
        module.train_mujoco(module.MujocoArgs(**MUJOCO_TINY, **common))
    else:
        module.train_lm(module.LMArgs(num_iterations=1, prompts_per_step=2, group_size=4, max_new_tokens=8,
                                      num_eval_prompts=4, **common))
    assert len(norms) >= 2 and 0.5e-3 < max(norms) <= 1e-3 * (1 + 1e-5), norms


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s.endswith("mujoco")])
def test_every_mujoco_script_anneals_its_learning_rate_from_the_full_rate_towards_zero(tmp_path, script):
    """--anneal-lr: each iteration starts at learning_rate * (1 - steps so far / total_timesteps)."""
    from test_lm_runs import scalars

    module = MODULES[script]
    summary = module.train_mujoco(module.MujocoArgs(**{**MUJOCO_TINY, "total_timesteps": 512}, anneal_lr=True,
                                                    learning_rate=1e-3, output_dir=str(tmp_path)))
    steps, rates = zip(*sorted(scalars(str(tmp_path / summary["run_name"]))["charts/learning_rate"]))
    expected = [1e-3 * (1 - done / 512) for done in (0,) + steps[:-1]]
    assert len(rates) == 4 and rates == pytest.approx(expected, rel=1e-6), (steps, rates)


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s.endswith("mujoco")])
def test_every_mujoco_script_builds_the_policy_its_flags_ask_for(tmp_path, monkeypatch, script):
    module, built = MODULES[script], []

    class Recording(module.GaussianPolicy):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append((self.log_std.detach().clone(), list(self.mean)))

    monkeypatch.setattr(module, "GaussianPolicy", Recording)
    module.train_mujoco(module.MujocoArgs(hidden_size=32, activation="relu", log_std_init=-1.3,
                                          output_dir=str(tmp_path), **MUJOCO_TINY))
    (log_std, layers), = built
    assert torch.equal(log_std, torch.full((6,), -1.3))  # HalfCheetah's 6 joints
    assert [type(m) for m in layers] == [torch.nn.Linear, torch.nn.ReLU] * 2 + [torch.nn.Linear]
    assert layers[0].out_features == layers[2].out_features == 32


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s.endswith("mujoco")])
def test_every_mujoco_script_steps_its_branches_in_the_workers_it_is_given(tmp_path, monkeypatch, script):
    """--num-workers leaves every number as it is (test_mujoco checks that), so only the processes show it."""
    import multiprocessing

    module, before, seen = MODULES[script], {p.pid for p in multiprocessing.active_children()}, []
    rollout = module.branched_rollout

    def counting(*args, **kwargs):
        seen.append(len({p.pid for p in multiprocessing.active_children()} - before))
        return rollout(*args, **kwargs)

    monkeypatch.setattr(module, "branched_rollout", counting)
    module.train_mujoco(module.MujocoArgs(num_workers=3, output_dir=str(tmp_path), **MUJOCO_TINY))
    assert seen == [3]
