"""Hand-computed checks of the LM pieces of grpo_baseline.py (spec sections 1-2)."""
import contextlib
import json
import math

import pytest
import torch

import grpo_baseline as gb


def test_group_advantages_with_std():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    std = math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3)  # unbiased group std
    expected = torch.tensor([[-1.5, -0.5, 0.5, 1.5]]) / (std + 1e-4)
    torch.testing.assert_close(gb.group_advantages(rewards, scale_by_std=True), expected)


def test_group_advantages_without_std_is_centred_reward():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 3.0]])
    expected = torch.tensor([[-1.5, -0.5, 0.5, 1.5], [-1.0, -1.0, 0.0, 2.0]])
    torch.testing.assert_close(gb.group_advantages(rewards, scale_by_std=False), expected)


@pytest.mark.parametrize("scale", [True, False])
def test_all_equal_group_has_zero_advantage(scale):
    rewards = torch.tensor([[5.0, 5.0, 5.0, 5.0], [1.0, 2.0, 3.0, 4.0]])
    advantages = gb.group_advantages(rewards, scale_by_std=scale)
    assert torch.equal(advantages[0], torch.zeros(4))
    assert advantages[1].abs().sum() > 0


def test_clipped_surrogate_both_sides_of_the_clip():
    # ratio 1.5 and 0.5 against advantages +1 and -1, eps = 0.2
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1]))
    old = torch.zeros(5)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    surrogate, clipped = gb.clipped_surrogate(logp, old, adv, 0.2, 0.2)
    # A>0, ratio above 1+eps: capped at 1.2.  A<0, ratio above: unclipped -1.5 is lower.
    # A>0, ratio below 1-eps: unclipped 0.5 is lower.  A<0, ratio below: capped at -0.8.
    torch.testing.assert_close(surrogate, torch.tensor([1.2, -1.5, 0.5, -0.8, 1.1]))
    assert clipped.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]


def test_clipped_surrogate_asymmetric_range():
    logp = torch.log(torch.tensor([1.3, 0.7]))
    surrogate, clipped = gb.clipped_surrogate(logp, torch.zeros(2), torch.tensor([1.0, -1.0]), 0.2, 0.28)
    torch.testing.assert_close(surrogate, torch.tensor([1.28, -0.8]))
    assert clipped.tolist() == [1.0, 1.0]


def test_surrogate_gradient_is_zero_where_clipped():
    logp = torch.log(torch.tensor([1.5, 1.1])).requires_grad_(True)
    surrogate, _ = gb.clipped_surrogate(logp, torch.zeros(2), torch.ones(2), 0.2, 0.2)
    surrogate.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 1.1]))  # d(rho)/d(logp) = rho


def test_k3_kl_hand_values():
    logp = torch.log(torch.tensor([0.5, 0.25, 0.3]))
    ref = torch.log(torch.tensor([0.25, 0.5, 0.3]))
    # r = p_ref / p_theta: 0.5 -> 0.5 - ln 0.5 - 1 ; 2 -> 2 - ln 2 - 1 ; equal -> 0
    expected = torch.tensor([0.5 + math.log(2) - 1, 2 - math.log(2) - 1, 0.0])
    torch.testing.assert_close(gb.k3_kl(logp, ref), expected)


def test_k3_kl_is_unbiased_for_the_true_kl():
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    exact = (p * (p / q).log()).sum()
    expectation = (p * gb.k3_kl(p.log(), q.log())).sum()  # E over tokens sampled from p
    torch.testing.assert_close(expectation, exact)


def test_completion_mask_stops_after_first_eos():
    tokens = torch.tensor([[5, 1, 7, 0], [5, 6, 7, 8], [1, 0, 0, 0], [4, 2, 1, 1]])
    assert gb.completion_mask(tokens, {1}).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]]
    # several EOS ids (chat models): the first of any ends the completion
    assert gb.completion_mask(tokens, {1, 2}).tolist()[3] == [1, 1, 0, 0]


@pytest.mark.parametrize("script", ["grpo_baseline", "pair_grpo_soft_lm", "pair_grpo_hard_lm"])
def test_left_padding_does_not_change_a_sequences_log_probs(script):
    """A batch left-pads its shorter prompts; each sequence must be scored as if alone, as generate() sampled
    it. Rotary models barely notice positions shifted by the padding (a shift leaves q.k unchanged), so
    the check uses a model with absolute position embeddings, where a shift changes every log-prob."""
    from transformers import GPT2Config, GPT2LMHeadModel

    module = __import__(script)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2)).eval()
    alone = torch.tensor([[7, 8, 9, 10, 11]])
    padded = torch.tensor([[0, 0, 0, 7, 8, 9, 10, 11], [1, 2, 3, 4, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = module.token_logprobs(model, alone, torch.ones_like(alone), 3, 1.0)
        batch = module.token_logprobs(model, padded, mask, 3, 1.0)
    torch.testing.assert_close(batch[:1], expected)


@pytest.mark.parametrize("script", ["grpo_baseline", "pair_grpo_soft_lm", "pair_grpo_hard_lm"])
@pytest.mark.parametrize("family", ["opt", "llama", "gpt2"])
def test_a_loaded_policy_trains_without_dropout_and_saves_its_config_unchanged(tmp_path, script, family):
    """The policy trains in training mode and must give pi_old's log-probs at theta_old, or every ratio carries
    dropout noise. OPT reads its rates from the config in its forward, Llama its attention's; GPT-2 has modules."""
    import transformers
    from transformers import ByT5Tokenizer

    config, model_class = {
        "opt": (transformers.OPTConfig(ffn_dim=64, word_embed_proj_dim=32, dropout=0.5, attention_dropout=0.5,
                                       activation_dropout=0.5, max_position_embeddings=64), "OPTForCausalLM"),
        "llama": (transformers.LlamaConfig(intermediate_size=64, num_key_value_heads=4, attention_dropout=0.5),
                  "LlamaForCausalLM"),
        "gpt2": (transformers.GPT2Config(n_positions=64, resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5),
                 "GPT2LMHeadModel")}[family]
    config.update(dict(vocab_size=384, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0,
                       eos_token_id=1, bos_token_id=None))
    torch.manual_seed(0)
    getattr(transformers, model_class)(config).save_pretrained(tmp_path)
    ByT5Tokenizer().save_pretrained(tmp_path)
    module = __import__(script)
    policy, _, _, _ = module.load_lm_policy(module.LMArgs(model_name_or_path=str(tmp_path), cuda=False),
                                            torch.device("cpu"))
    ids = torch.randint(3, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    first, second = (module.token_logprobs(policy, ids, torch.ones_like(ids), 8, 1.0) for _ in range(2))
    assert policy.training and torch.equal(first, second)  # training mode: checkpointing needs it
    rates = [k for k, v in config.to_dict().items() if "drop" in k and v == 0.5]
    assert rates and all(policy.config.to_dict()[k] == 0.5 for k in rates)  # what save_pretrained would write


@pytest.mark.parametrize("script", ["grpo_baseline", "pair_grpo_soft_lm", "pair_grpo_hard_lm"])
def test_rollouts_ignore_the_models_generation_config_and_the_saved_model_keeps_it(tmp_path, script):
    """A hub generation_config.json (Qwen's has sampling, top-k and a repetition penalty) must not touch the
    rollouts: they sample softmax(logits / T) up to --max-new-tokens. The saved model keeps it, or what serving
    tools load from it greedy-decodes --max-new-tokens tokens."""
    from conftest import tiny_llama_config
    from transformers import ByT5Tokenizer, GenerationConfig, LlamaForCausalLM

    hub = dict(do_sample=True, temperature=0.3, top_k=2, repetition_penalty=3.0, no_repeat_ngram_size=1,
               max_new_tokens=3, eos_token_id=[1], pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    model.generation_config = GenerationConfig(**hub)
    model.save_pretrained(tmp_path / "hub")
    ByT5Tokenizer().save_pretrained(tmp_path / "hub")
    module = __import__(script)
    args = module.LMArgs(model_name_or_path=str(tmp_path / "hub"), cuda=False, max_new_tokens=10, num_iterations=1,
                         prompts_per_step=2, group_size=4, num_eval_prompts=2, output_dir=str(tmp_path),
                         save_model=True)
    policy, _, tokenizer, eos_ids = module.load_lm_policy(args, torch.device("cpu"))
    prompts = module.encode_prompts(tokenizer, module.tiny_task_prompts(4), 64, eos_ids)
    batch = module.sample_completions(policy, tokenizer, prompts, 4, eos_ids, contextlib.nullcontext(),
                                      torch.device("cpu"), list(range(16)), 1.0)
    with torch.no_grad():
        logp = module.token_logprobs(policy, batch["input_ids"], batch["attention_mask"], batch["mask"].shape[1], 1.0)
    assert batch["mask"].shape[1] == 10
    torch.testing.assert_close(logp * batch["mask"], batch["logp"] * batch["mask"], atol=1e-4, rtol=0)
    summary = module.train_lm(args)
    with open(tmp_path / summary["run_name"] / "model" / "generation_config.json") as f:
        saved = json.load(f)
    assert {k: saved.get(k) for k in hub} == hub


@pytest.mark.parametrize("loaded", [False, True])
def test_gradient_checkpointing_keeps_fewer_activations_whether_built_or_loaded(tiny_policy_dir, loaded):
    """The equality test in test_lm_runs passes with or without checkpointing, so count what the backward keeps:
    transformers checkpoints only in training mode, and from_pretrained returns a model in eval mode."""
    def saved_tensors(checkpointing: bool) -> int:
        args = gb.LMArgs(model_name_or_path=tiny_policy_dir if loaded else "tiny", gradient_checkpointing=checkpointing,
                         cuda=False)
        policy, count = gb.load_lm_policy(args, torch.device("cpu"))[0], []
        ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(lambda t: count.append(1) or t, lambda t: t):
            gb.token_logprobs(policy, ids, torch.ones_like(ids), 4, 1.0).sum().backward()
        return len(count)

    assert saved_tensors(True) < saved_tensors(False) / 2


def test_sequence_aggregation_is_mean_of_token_means():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0], [7.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    assert (gb.loss_weights(mask, "sequence") * x).sum().item() == pytest.approx((1.5 + 25.0 + 7.0) / 3)
    assert (gb.loss_weights(mask, "token") * x).sum().item() == pytest.approx((1 + 2 + 10 + 20 + 30 + 40 + 7) / 7)


def test_loss_weights_split_exactly_over_micro_batches():
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1
    x = torch.randn(6, 5)
    w = gb.loss_weights(mask, "sequence")
    whole = (w * x).sum()
    parts = sum((w[i: i + 4] * x[i: i + 4]).sum() for i in range(0, 6, 4))
    torch.testing.assert_close(whole, parts)


def test_hh_prompt_keeps_dialogue_up_to_last_assistant_turn():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye?\n\nAssistant: see you"
    record = gb.hh_prompt(chosen, 0, "train")
    assert record["text"] == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye?\n\nAssistant:"
    assert record["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                  {"role": "user", "content": "bye?"}]


def test_hh_prompt_keeps_an_empty_turn_so_roles_alternate():
    """Strict chat templates (Llama 2's, Gemma's) raise when roles do not alternate: a reward model's template
    would fail mid-run on the first dialogue with an empty reply in it."""
    record = gb.hh_prompt("\n\nHuman: hi\n\nAssistant:\n\nHuman: still there?\n\nAssistant: yes\n\nHuman: ok"
                          "\n\nAssistant:", 0, "train")
    assert [(m["role"], m["content"]) for m in record["messages"]] == [
        ("user", "hi"), ("assistant", ""), ("user", "still there?"), ("assistant", "yes"), ("user", "ok")]


def test_hh_prompt_without_assistant_turn_names_the_row():
    with pytest.raises(SystemExit, match="row 3 of split 'test'"):
        gb.hh_prompt("\n\nHuman: hi", 3, "test")


def test_prompts_never_end_in_eos():
    from transformers import ByT5Tokenizer

    tokenizer = ByT5Tokenizer()  # appends EOS (id 1) to every text by default
    ids = gb.encode_prompts(tokenizer, gb.tiny_task_prompts(4), 256, {tokenizer.eos_token_id})
    assert all(p and p[-1] != tokenizer.eos_token_id for p in ids)
    record = {"text": "abcdef", "templated": False, "messages": []}
    assert gb.encode_prompts(tokenizer, [record], 3, {1}) == [[ord("d") + 3, ord("e") + 3, ord("f") + 3]]


def test_token_logprobs_match_generate_under_left_padding():
    from conftest import tiny_llama_config
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config()).eval()
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=6,
                                               eos_token_id=[1], pad_token_id=0)
    ids, mask = gb.left_pad([[100, 101], [102, 103, 104, 105]], 0)
    out = model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, output_logits=True)
    n = out.sequences.shape[1] - ids.shape[1]
    full_mask = torch.cat([mask, torch.ones(2, n, dtype=torch.long)], 1)
    ours = gb.token_logprobs(model, out.sequences, full_mask, n, 0.7)
    scaled = torch.stack(out.logits, 1).float() / 0.7
    theirs = scaled.log_softmax(-1).gather(-1, out.sequences[:, -n:, None]).squeeze(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # the short prompt's log-probs do not depend on how much padding sits to its left
    alone = gb.token_logprobs(model, out.sequences[:1, 2:], full_mask[:1, 2:], n, 0.7)
    torch.testing.assert_close(alone, ours[:1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("script", ["grpo_baseline", "pair_grpo_soft_lm", "pair_grpo_hard_lm"])
def test_gumbel_sampler_draws_the_tempered_softmax_per_completion(script):
    """40,000 completions, one seed each, two decode steps: token frequencies match softmax(logits / T)
    within 4.5 standard errors, and a completion's draw does not depend on who shares its batch."""
    module = __import__(script)
    logits, T, n = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2]), 0.7, 40_000
    sampler = module.GumbelSampler(list(range(n)), T, torch.device("cpu"))
    p = (logits / T).softmax(0)
    draws = []
    for _ in range(2):
        draws.append(sampler(None, logits.expand(n, 8)).argmax(-1))
        freq = torch.bincount(draws[-1], minlength=8).float() / n
        assert ((freq - p).abs() / (p * (1 - p) / n).sqrt()).max() < 4.5, (freq, p)
    assert (draws[0] != draws[1]).float().mean() > 0.3  # each decode step draws fresh noise
    alone = module.GumbelSampler([123], T, torch.device("cpu"))(None, logits[None])
    mixed = module.GumbelSampler([7, 123, 99], T, torch.device("cpu"))(None, logits.expand(3, 8))
    torch.testing.assert_close(alone[0], mixed[1], rtol=0, atol=0)


def test_left_pad_puts_the_padding_first_and_masks_it():
    ids, mask = gb.left_pad([[3, 4], [5, 6, 7], [8]], 0)
    assert ids.tolist() == [[0, 3, 4], [5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[0, 1, 1], [1, 1, 1], [0, 0, 1]]


def test_rules_score_hand_values():
    record = {"keys": ["soci", "zono"], "avoid": ["n", "s"], "length": 10}  # allowed letters: c, i, o, z
    assert gb.rules_score(record, "cioz" * 2 + "zz") == 1.0  # every allowed letter, nothing forbidden, 10 long
    assert gb.rules_score(record, "ciozzzzzzz" + "n" * 10) == 0.5 * 0.0  # twice the length: no length credit
    assert gb.rules_score(record, "cizzzzzzzz") == pytest.approx(0.75)  # three of the four allowed letters
    assert gb.rules_score(record, "ciozzzzzsn") == pytest.approx(0.8)  # 2 of 10 characters forbidden
    assert gb.rules_score(record, "cioz") == pytest.approx(0.4)  # 4 of 10 letters
    assert gb.rules_score(record, "") == 0.0


def test_rules_task_prompts_state_their_constraints():
    for record in gb.rules_task_prompts(50):
        assert set(record["avoid"]) <= set("".join(record["keys"])) and 8 <= record["length"] <= 20
        assert all(word in record["text"] for word in record["keys"]) and f"{record['length']} letters" in record["text"]
