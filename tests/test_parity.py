"""The six scripts copy their shared-shape pieces on purpose (each file stands alone).
These tests keep the copies honest: the same inputs give the same outputs in every script."""
import importlib
import inspect

import numpy as np
import pytest
import torch

SCRIPTS = ["grpo_baseline", "grpo_baseline_mujoco", "pair_grpo_soft_lm", "pair_grpo_soft_mujoco", "pair_grpo_hard_lm", "pair_grpo_hard_mujoco"]
MODULES = {}
for name in SCRIPTS:
    try:
        MODULES[name] = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise


def having(*names):
    """(script, module) pairs for every script that defines all of `names`."""
    mods = [(n, m) for n, m in MODULES.items() if all(hasattr(m, x) for x in names)]
    if len(mods) < 2:
        pytest.skip(f"fewer than two scripts define {names} yet")
    return mods


def same_everywhere(names, call):
    results = [(n, call(m)) for n, m in having(*names)]
    for name, value in results[1:]:
        for a, b in zip(results[0][1] if isinstance(results[0][1], tuple) else (results[0][1],),
                        value if isinstance(value, tuple) else (value,)):
            torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), msg=f"{name} vs {results[0][0]}")


def test_surrogate_kl_and_weights_agree():
    g = torch.Generator().manual_seed(0)
    logp, old, ref = torch.randn(3, 6, 9, generator=g) * 0.3
    adv = torch.randn(6, 1, generator=g)
    mask = (torch.rand(6, 9, generator=g) > 0.3).float()
    same_everywhere(["clipped_surrogate"], lambda m: m.clipped_surrogate(logp, old, adv, 0.2, 0.28))
    same_everywhere(["k3_kl"], lambda m: m.k3_kl(logp, ref))
    for mode in ["sequence", "token"]:
        same_everywhere(["loss_weights"], lambda m: m.loss_weights(mask, mode))


def test_lm_masking_padding_and_prompts_agree():
    tokens = torch.tensor([[5, 1, 7, 0], [5, 6, 7, 8], [2, 1, 1, 1]])
    same_everywhere(["completion_mask", "left_pad"], lambda m: m.completion_mask(tokens, {1, 2}))
    same_everywhere(["completion_mask", "left_pad"], lambda m: m.left_pad([[3, 4], [5, 6, 7]], 0))
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    for n, m in having("encode_prompts", "tiny_task_prompts"):
        assert m.encode_prompts(tok, m.tiny_task_prompts(5), 64, {1}) == MODULES["grpo_baseline"].encode_prompts(
            tok, MODULES["grpo_baseline"].tiny_task_prompts(5), 64, {1}), n
    chosen = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d"
    for n, m in having("hh_prompt"):
        assert m.hh_prompt(chosen, 0, "train") == MODULES["grpo_baseline"].hh_prompt(chosen, 0, "train"), n


def test_lm_log_probs_agree():
    from conftest import tiny_llama_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config()).eval()
    ids = torch.randint(3, 300, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        same_everywhere(["token_logprobs", "left_pad"], lambda m: m.token_logprobs(model, ids, mask, 4, 0.7))


def test_teachers_and_net_win_rate_agree():
    scores = torch.randn(20, 5)
    for kind in ["oracle", "stochastic", "mistake", "equal"]:
        same_everywhere(["teacher_labels"], lambda m: m.teacher_labels(scores, kind, 0.3, 0.2, 0.1, torch.Generator().manual_seed(3)))
    labels = MODULES["pair_grpo_soft_lm"].teacher_labels(scores, "oracle")
    for scale in [False, True]:
        same_everywhere(["net_win_rate"], lambda m: m.net_win_rate(labels, scale))
    same_everywhere(["label_agreement"], lambda m: m.label_agreement(labels, scores))


def test_mujoco_policy_and_statistics_agree():
    obs = np.random.default_rng(0).normal(size=(7, 17))

    def run(m):
        rms = m.RunningMeanStd(17)
        rms.update(obs)
        torch.manual_seed(0)
        dist = m.GaussianPolicy(17, 6)(torch.as_tensor(rms.normalize(obs)))
        return torch.as_tensor(rms.normalize(obs)), dist.mean, dist.stddev

    same_everywhere(["GaussianPolicy", "RunningMeanStd"], run)


@pytest.mark.parametrize("name", ["clipped_surrogate", "k3_kl", "loss_weights", "completion_mask", "token_logprobs",
                                  "left_pad", "teacher_labels", "net_win_rate", "label_agreement", "snapshot",
                                  "restore", "branched_rollout", "RunningMeanStd", "GaussianPolicy", "fail",
                                  "target_distribution", "sequence_log_ratios", "kl_to_target", "dual_ascent",
                                  "pair_shift_target", "reverse_kl_fit",
                                  "sampling_seed", "counter_uniform", "GumbelSampler", "sample_completions", "setup_distributed", "all_sum",
                                  "all_gather", "StopSignal", "save_checkpoint", "load_checkpoint", "make_writer",
                                  "Branches", "WorkerBranches", "branch_worker", "check_video"])
def test_shared_pieces_have_identical_source(name):
    sources = {n: inspect.getsource(getattr(m, name)) for n, m in having(name)}
    first = next(iter(sources.values()))
    assert all(src == first for src in sources.values()), f"{name} differs between {list(sources)}"


def test_every_script_lets_the_same_flags_change_on_resume():
    sets = {n: m.RESUMABLE_ARGS for n, m in having("RESUMABLE_ARGS")}
    assert len(sets) == 6 and all(v == sets["grpo_baseline"] for v in sets.values()), sets
