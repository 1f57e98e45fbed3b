"""End-to-end runs of `grpo_baseline.py`: learning, determinism, reward-model path, bad input."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import grpo_baseline as gb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scalars(run_dir: str) -> dict:
    """All TensorBoard scalars of a run: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def run(tmp_path, **overrides) -> tuple:
    args = gb.LMArgs(output_dir=str(tmp_path), **overrides)
    summary = gb.train_lm(args)
    return summary, os.path.join(str(tmp_path), summary["run_name"])


@pytest.mark.parametrize("seed", [1, 2])
def test_tiny_task_win_rate_rises_from_half(tmp_path, seed):
    summary, run_dir = run(tmp_path, seed=seed, num_iterations=20, eval_every=20)
    win = dict(scalars(run_dir)["eval/win_rate"])
    assert 0.3 <= win[0] <= 0.7, win  # the policy starts as the reference
    assert summary["eval/win_rate"] >= 0.75, summary
    assert summary["eval/score"] > summary["eval/reference_score"]


def test_same_seed_same_logged_metrics(tmp_path):
    _, dir_a = run(tmp_path / "a", num_iterations=3, eval_every=2)
    _, dir_b = run(tmp_path / "b", num_iterations=3, eval_every=2)
    a, b = scalars(dir_a), scalars(dir_b)
    assert a.keys() == b.keys() and "losses/policy_loss" in a and "eval/win_rate" in a
    for tag in a:
        if tag != "charts/SPS":  # wall-clock
            assert a[tag] == b[tag], tag


@pytest.mark.parametrize("script", ["grpo_baseline", "pair_grpo_soft_lm", "pair_grpo_hard_lm"])
def test_tiny_task_holds_out_prompts_that_training_never_sees(script):
    from transformers import ByT5Tokenizer

    module = __import__(script)
    train, held_out = module.load_lm_prompts(module.LMArgs(num_eval_prompts=256), ByT5Tokenizer())
    assert len(held_out) == 256 and not {r["text"] for r in train} & {r["text"] for r in held_out}
    assert train == module.tiny_task_prompts(1024)  # the training prompts (and so training) are the same as before


def test_eval_kl_to_reference_is_per_token_like_the_training_kl(tmp_path):
    summary, run_dir = run(tmp_path, num_iterations=6, eval_every=6)
    logged = scalars(run_dir)
    eval_kl, train_kl = dict(logged["eval/kl_to_reference"]), [v for _, v in logged["losses/kl"]]
    assert eval_kl[0] == 0.0  # the policy starts as the reference
    assert train_kl[-1] / 3 < summary["eval/kl_to_reference"] < train_kl[-1] * 3, (eval_kl, train_kl)


@pytest.mark.parametrize("script", ["grpo_baseline", "pair_grpo_soft_lm", "pair_grpo_hard_lm"])
def test_eval_kl_runs_from_the_policy_to_the_reference(tmp_path, monkeypatch, script):
    """eval/kl_to_reference is k3 KL(policy || reference) on the policy's samples, the training penalty's
    direction. Swapped, it reads about the same number, so the call says which is which."""
    module, made, pairs = __import__(script), {}, []
    real_logprobs, real_k3 = module.batched_logprobs, module.k3_kl

    def tagging(model, *args, **kwargs):
        out = real_logprobs(model, *args, **kwargs)
        made[id(out)] = (out, "policy" if any(p.requires_grad for p in model.parameters()) else "reference")
        return out  # kept in `made`, so no later tensor takes its id

    def recording(first, second):
        pairs.append(tuple(made[id(x)][1] if id(x) in made and made[id(x)][0] is x else None for x in (first, second)))
        return real_k3(first, second)

    monkeypatch.setattr(module, "batched_logprobs", tagging)
    monkeypatch.setattr(module, "k3_kl", recording)
    module.train_lm(module.LMArgs(num_iterations=1, eval_every=1, prompts_per_step=2, group_size=4, max_new_tokens=8,
                                  num_eval_prompts=4, update_epochs=2, output_dir=str(tmp_path)))
    assert pairs.count(("policy", "reference")) == 2 and ("reference", "policy") not in pairs, pairs  # two evaluations


@pytest.mark.parametrize("script", ["grpo_baseline", "pair_grpo_soft_lm", "pair_grpo_hard_lm"])
def test_micro_batching_and_checkpointing_give_the_full_batch_update_and_saved_model_loads(tmp_path, script):
    """Micro-batches of 5 sequences; Hard's hold whole groups of 8 (its fit is a softmax over a group)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    module, common = __import__(script), dict(num_iterations=2, eval_every=2, update_epochs=2, num_minibatches=2,
                                              save_model=True)

    def run(folder, **kw):
        summary = module.train_lm(module.LMArgs(output_dir=str(folder), **kw))
        return summary, os.path.join(str(folder), summary["run_name"])

    _, dir_full = run(tmp_path / "full", micro_batch_size=64, **common)
    _, dir_micro = run(tmp_path / "micro", micro_batch_size=5, gradient_checkpointing=True, **common)
    full = AutoModelForCausalLM.from_pretrained(os.path.join(dir_full, "model"))
    micro = AutoModelForCausalLM.from_pretrained(os.path.join(dir_micro, "model"))
    gb.seed_everything(1, True)  # the runs' starting weights, to measure how far training moved them
    start = dict(gb.load_lm_policy(gb.LMArgs(), torch.device("cpu"))[0].named_parameters())
    for (name, p), q in zip(full.named_parameters(), micro.parameters()):
        # Micro-batches sum the loss in another order; Adam's normalisation can amplify that
        # rounding on near-zero gradients: the tolerance is 1% of the distance trained, per tensor.
        moved = (p - start[name]).abs().max().item()
        assert moved > 1e-3 and (p - q).abs().max().item() <= 1e-2 * moved, name
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(dir_full, "model"))
    assert tokenizer("a")["input_ids"][0] == ord("a") + 3
    assert json.load(open(os.path.join(dir_full, "summary.json")))["iterations"] == 2


SMALL = dict(num_iterations=2, eval_every=1, prompts_per_step=2, group_size=4, num_eval_prompts=3, max_new_tokens=8)


def test_reward_model_on_hh_rlhf_schema(tmp_path, tiny_policy_dir, tiny_reward_dir, hh_dir):
    summary, run_dir = run(tmp_path, model_name_or_path=tiny_policy_dir, reward_model_name_or_path=tiny_reward_dir,
                           dataset_name=hh_dir, save_model=True, **SMALL)
    assert summary["global_step"] == 2 * 2 * 4
    logged = scalars(run_dir)
    assert all(v > 0 for _, v in logged["charts/score_std"]) and "eval/kl_to_reference" in logged  # scored, not constant
    assert os.path.exists(os.path.join(run_dir, "model", "config.json"))


def test_reward_model_with_chat_templates_on_ultrafeedback_schema(tmp_path, tiny_chat_policy_dir,
                                                                   tiny_chat_reward_dir, ultrafeedback_dir):
    summary, _ = run(tmp_path, model_name_or_path=tiny_chat_policy_dir, reward_model_name_or_path=tiny_chat_reward_dir,
                     dataset_name=ultrafeedback_dir, **SMALL)
    assert summary["global_step"] == 16 and "eval/win_rate" in summary


def test_reward_model_judge_scores_each_reply_in_its_chat_template_whatever_the_batch(
        tiny_chat_policy_dir, tiny_chat_reward_dir, ultrafeedback_dir):
    """The batched, padded judge equals the reward model on each templated dialogue alone."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    args = gb.LMArgs(model_name_or_path=tiny_chat_policy_dir, reward_model_name_or_path=tiny_chat_reward_dir,
                     dataset_name=ultrafeedback_dir, num_eval_prompts=4)
    records = gb.load_lm_prompts(args, AutoTokenizer.from_pretrained(tiny_chat_policy_dir))[0][:3]
    replies = ["ok", "a much longer reply than the others", "no"]
    scores = gb.load_lm_judge(args, torch.device("cpu"))(records, replies)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_reward_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_chat_reward_dir).eval()
    for record, reply, score in zip(records, replies, scores):
        text = f"<user>{record['messages'][0]['content']}<assistant>{reply}"  # conftest's template, written out
        with torch.no_grad():
            alone = model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0]
        torch.testing.assert_close(score, alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pad_in_config", [True, False])
def test_reward_model_judge_reads_the_dialogue_and_the_reply_and_keeps_their_end(tmp_path, tiny_reward_dir, hh_dir,
                                                                                 pad_in_config):
    """Without a chat template the reward model reads the prompt's text followed by the reply; a dialogue
    longer than --reward-max-length loses its beginning, never the reply being judged. A reward model
    whose config names no pad token (many do) still scores a padded batch."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, ByT5Tokenizer, LlamaForSequenceClassification

    from conftest import save_tiny

    path = tiny_reward_dir if pad_in_config else save_tiny(tmp_path, LlamaForSequenceClassification, num_labels=1,
                                                           pad_token_id=None)
    args = gb.LMArgs(reward_model_name_or_path=path, dataset_name=hh_dir, num_eval_prompts=4, reward_max_length=24)
    records = gb.load_lm_prompts(args, ByT5Tokenizer())[0][:3]
    replies = [" It is 4.", " No idea at all, sorry.", " 8"]
    scores = gb.load_lm_judge(args, torch.device("cpu"))(records, replies)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    for record, reply, score in zip(records, replies, scores):
        assert len(record["text"]) > 24
        ids = tokenizer(record["text"] + reply)["input_ids"][-24:]  # the end, the EOS the tokenizer adds included
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([ids])).logits[0, 0]
        torch.testing.assert_close(score, alone, atol=1e-4, rtol=1e-4)


def test_reward_model_reads_no_more_than_its_tokenizer_takes(tmp_path, hh_dir):
    """An encoder reward model (RoBERTa: 24 tokens, its tokenizer's model_max_length, in 26 positions) fails
    inside its embedding on a longer text, mid-run when a long dialogue comes; under the default
    --reward-max-length 1024 it reads each text's last 24 tokens instead."""
    import transformers

    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=384, max_position_embeddings=26, hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64, pad_token_id=0, num_labels=1)
    transformers.RobertaForSequenceClassification(config).save_pretrained(tmp_path)
    transformers.ByT5Tokenizer(model_max_length=24).save_pretrained(tmp_path)
    args = gb.LMArgs(reward_model_name_or_path=str(tmp_path), dataset_name=hh_dir, num_eval_prompts=4)
    records = gb.load_lm_prompts(args, transformers.ByT5Tokenizer())[0][:3]
    replies = [" It is 4.", " No idea at all, sorry.", " 8"]
    scores = gb.load_lm_judge(args, torch.device("cpu"))(records, replies)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    for record, reply, score in zip(records, replies, scores):
        ids = transformers.ByT5Tokenizer()(record["text"] + reply)["input_ids"]
        assert len(ids) > 24 and args.reward_max_length > 24
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([ids[-24:]])).logits[0, 0]
        torch.testing.assert_close(score, alone, atol=1e-4, rtol=1e-4)


def test_ultrafeedback_prompts_are_chat_templated(ultrafeedback_dir, tiny_chat_policy_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_policy_dir)
    train, held_out = gb.load_lm_prompts(gb.LMArgs(dataset_name=ultrafeedback_dir, num_eval_prompts=4), tokenizer)
    assert len(train) == 12 and len(held_out) == 4  # train_prefs / test_prefs, not train_sft
    assert train[0]["text"] == "<user>Write a short line about the number 0.<assistant>" and train[0]["templated"]


def test_single_local_jsonl_file_holds_out_eval_prompts(tmp_path, hh_dir):
    from transformers import ByT5Tokenizer

    args = gb.LMArgs(dataset_name=os.path.join(hh_dir, "train.jsonl"), num_eval_prompts=4)
    train, held_out = gb.load_lm_prompts(args, ByT5Tokenizer())
    assert len(train) == 8 and len(held_out) == 4
    assert held_out[0]["text"].endswith("\n\nAssistant:")


# ---- bad input: one line, non-zero exit, naming the problem
def expect_error(match: str, **overrides):
    with pytest.raises(SystemExit) as info:
        gb.train_lm(gb.LMArgs(**overrides))
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message and match in message, message


def test_group_size_below_two(tmp_path):
    expect_error("--group-size", group_size=1, output_dir=str(tmp_path))


@pytest.mark.parametrize("script", ["grpo_baseline", "pair_grpo_soft_lm", "pair_grpo_hard_lm"])
@pytest.mark.parametrize("flag, overrides", [
    ("--learning-rate", dict(learning_rate=0.0)), ("--max-grad-norm", dict(max_grad_norm=float("nan"))),
    ("--beta", dict(beta=float("nan"))), ("--num-minibatches", dict(num_minibatches=0)),
    ("--group-size", dict(group_size=0)), ("--max-prompt-length", dict(max_prompt_length=0)),
    ("--reward-max-length", dict(reward_max_length=0))])
def test_bad_settings_fail_in_one_line(tmp_path, script, flag, overrides):
    """Not a traceback from the optimizer or from a later check dividing by the bad count, nor a run that
    silently never learns, drops its KL term or reads empty prompts."""
    module = __import__(script)
    with pytest.raises(SystemExit) as info:
        module.train_lm(module.LMArgs(output_dir=str(tmp_path), **overrides))
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message and flag in message, message


@pytest.mark.parametrize("script", ["grpo_baseline", "pair_grpo_soft_lm", "pair_grpo_hard_lm"])
def test_prompt_and_completion_longer_than_the_policys_positions_fail_in_one_line(tmp_path, script):
    """A GPT-2 policy with 64 positions: a 30-token prompt and 40 new tokens would index past its position table
    inside generate; 24 + 40 fit exactly and train."""
    import transformers

    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=384, n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
                                 ).save_pretrained(tmp_path / "gpt2")
    transformers.ByT5Tokenizer().save_pretrained(tmp_path / "gpt2")
    module = __import__(script)
    args = module.LMArgs(model_name_or_path=str(tmp_path / "gpt2"), max_new_tokens=40, num_iterations=1,
                         prompts_per_step=2, group_size=4, num_eval_prompts=2, output_dir=str(tmp_path), cuda=False)
    with pytest.raises(SystemExit) as info:
        module.train_lm(args)
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message and "70 positions" in message, message
    assert module.train_lm(dataclasses.replace(args, max_prompt_length=24))["global_step"] == 8


@pytest.mark.parametrize("script", ["grpo_baseline", "pair_grpo_soft_lm", "pair_grpo_hard_lm"])
def test_output_dir_that_cannot_be_made_fails_in_one_line(tmp_path, script):
    module, blocker = __import__(script), tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match=r"^error: --output-dir .*a_file/runs.*: cannot create it") as info:
        module.train_lm(module.LMArgs(output_dir=str(blocker / "runs")))
    assert "\n" not in str(info.value)


def test_dataset_without_expected_column(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n" + json.dumps({"text": "bye"}) + "\n")
    expect_error("expected 'prompt' (UltraFeedback) or 'chosen' (HH-RLHF)", dataset_name=str(path),
                 num_eval_prompts=1, output_dir=str(tmp_path))


def test_hh_row_without_assistant_turn(tmp_path):
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b"}) + "\n" + json.dumps({"chosen": "oops"}) + "\n")
    expect_error("dataset row 1 of split 'train'", dataset_name=str(path), num_eval_prompts=1, output_dir=str(tmp_path))


def test_conversational_preference_rows_name_the_row(tmp_path):
    """TRL's conversational format keeps 'chosen' (or 'prompt') as a list of messages: a one-line error naming
    the row, not an AttributeError from inside the prompt parser."""
    row = {"role": "user", "content": "hi"}
    for column in ("chosen", "prompt"):
        path = tmp_path / f"{column}.jsonl"
        path.write_text("".join(json.dumps({column: [row, {"role": "assistant", "content": "yo"}]}) + "\n"
                                for _ in range(3)))
        expect_error("dataset row 0 of split 'train'", dataset_name=str(path), num_eval_prompts=1,
                     output_dir=str(tmp_path))


@pytest.mark.parametrize("flag", ["model_name_or_path", "reward_model_name_or_path", "dataset_name"])
def test_path_that_does_not_exist(tmp_path, flag):
    expect_error("no such file or directory", **{flag: str(tmp_path / "missing" / "thing")}, output_dir=str(tmp_path))


def test_reward_model_that_is_not_a_sequence_classifier(tmp_path, tiny_policy_dir):
    expect_error("not a sequence classifier", reward_model_name_or_path=tiny_policy_dir, output_dir=str(tmp_path))


def test_cli_prints_one_line_and_exits_non_zero(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "grpo_baseline.py"), "--group-size", "1",
                           "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --group-size must be at least 2")
    assert "Traceback" not in proc.stderr


def test_rules_task_is_learned_but_not_saturated(tmp_path):
    summary, run_dir = run(tmp_path, dataset_name="rules", num_iterations=40, eval_every=40)
    assert 0.3 <= dict(scalars(run_dir)["eval/win_rate"])[0] <= 0.7, summary
    assert 0.7 <= summary["eval/win_rate"] < 0.95 and summary["eval/score"] > 2 * summary["eval/reference_score"], summary


@pytest.mark.parametrize("script", ["grpo_baseline", "pair_grpo_soft_lm", "pair_grpo_hard_lm"])
def test_each_completion_is_judged_against_its_own_prompt(tmp_path, monkeypatch, script):
    """The rules task's judge reads each prompt's rules from its record: records laid out in another order
    than the completions score every reply against another prompt's rules, and the rules task's learning
    test still passed with them so laid out."""
    from transformers import ByT5Tokenizer

    module, tokenizer, sampled, checked = __import__(script), ByT5Tokenizer(), {}, []
    sample, load_judge = module.sample_completions, module.load_lm_judge

    def recording_sample(*args, **kwargs):
        sampled["batch"] = sample(*args, **kwargs)
        return sampled["batch"]

    def checking_judge(*args, **kwargs):
        judge = load_judge(*args, **kwargs)

        def check(records, texts):
            batch = sampled["batch"]
            prompts = batch["input_ids"][:, : batch["input_ids"].shape[1] - batch["mask"].shape[1]]
            assert [r["text"] for r in records] == tokenizer.batch_decode(prompts, skip_special_tokens=True)
            checked.append((len(records), len({r["text"] for r in records}), batch["mask"].shape[1]))
            return judge(records, texts)
        return check

    monkeypatch.setattr(module, "sample_completions", recording_sample)
    monkeypatch.setattr(module, "load_lm_judge", checking_judge)
    module.train_lm(module.LMArgs(dataset_name="rules", num_iterations=1, prompts_per_step=4, group_size=4,
                                  max_new_tokens=8, num_eval_prompts=4, update_epochs=2, output_dir=str(tmp_path)))
    assert (16, 4, 8) in checked  # the training batch: 4 different prompts x 4 completions of at most 8 tokens
