"""Fast rollouts (`--fast-generation`): a rollout copy of the policy with a static KV cache. On the
CPU in fp32 they must sample exactly what the eager path samples, and the copy must follow the
policy after every update (on CUDA the copy is bf16 and the decode step is compiled)."""
import os

import pytest
import torch

import grpo_baseline as gb
from test_lm_runs import scalars


@pytest.mark.parametrize("repeats", [1, 4])
def test_static_cache_samples_the_same_tokens_as_the_eager_path(repeats):
    gb.seed_everything(3, True)
    policy, _, tokenizer, eos_ids = gb.load_lm_policy(gb.LMArgs(max_new_tokens=40), torch.device("cpu"))
    prompts = gb.encode_prompts(tokenizer, gb.tiny_task_prompts(5), 256, eos_ids)
    prompts[1] = prompts[1][:7]  # prompts of different lengths: left padding differs between the paths
    seeds = list(range(100, 100 + 5 * repeats))
    eager, static = (gb.sample_completions(policy, tokenizer, prompts, repeats, eos_ids, torch.autocast("cpu", enabled=False),
                                           torch.device("cpu"), seeds, 1.0, static_cache=s) for s in (False, True))
    assert eager["texts"] == static["texts"]
    for key in ["input_ids", "attention_mask", "mask"]:
        assert torch.equal(eager[key], static[key]), key
    torch.testing.assert_close(eager["logp"], static["logp"], atol=1e-5, rtol=1e-5)
    # the sampler's log-probs are the policy's own on the sampled tokens
    own = gb.token_logprobs(policy, eager["input_ids"], eager["attention_mask"], eager["mask"].shape[1], 1.0)
    torch.testing.assert_close((own * eager["mask"]), (eager["logp"] * eager["mask"]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("script", ["grpo_baseline", "pair_grpo_soft_lm", "pair_grpo_hard_lm"])
def test_fast_generation_run_equals_the_eager_run_so_the_rollout_copy_follows_the_policy(tmp_path, script):
    """A stale copy would sample iteration 2's completions from the starting weights: every later
    score, loss and evaluation would differ from the eager run's."""
    module = __import__(script)
    runs = {}
    for mode in ["off", "on"]:
        summary = module.train_lm(module.LMArgs(output_dir=str(tmp_path / mode), num_iterations=3, eval_every=3,
                                                num_eval_prompts=8, fast_generation=mode))
        runs[mode] = scalars(os.path.join(str(tmp_path / mode), summary["run_name"]))
    assert runs["off"].keys() == runs["on"].keys()
    for tag in runs["off"]:
        if tag not in ("charts/SPS", "losses/rollout_logp_gap"):
            assert runs["off"][tag] == runs["on"][tag], tag
    assert all(0 <= v < 1e-4 for _, v in runs["on"]["losses/rollout_logp_gap"])  # fp32 copy: rounding only
