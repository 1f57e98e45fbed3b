"""Shared fixtures: tiny models and datasets built from configs, saved to temporary dirs."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=1024, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def save_tiny(path, model_class, chat_template=None, **config):
    """A random tiny model and the ByT5 byte tokenizer, saved where from_pretrained finds them."""
    from transformers import ByT5Tokenizer

    torch.manual_seed(0)
    model_class(tiny_llama_config(**config)).save_pretrained(path)
    tokenizer = ByT5Tokenizer()
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    return save_tiny(tmp_path_factory.mktemp("policy"), LlamaForCausalLM)


@pytest.fixture(scope="session")
def tiny_chat_policy_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    return save_tiny(tmp_path_factory.mktemp("chat_policy"), LlamaForCausalLM, chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory):
    from transformers import LlamaForSequenceClassification

    return save_tiny(tmp_path_factory.mktemp("reward"), LlamaForSequenceClassification, num_labels=1)


@pytest.fixture(scope="session")
def tiny_chat_reward_dir(tmp_path_factory):
    from transformers import LlamaForSequenceClassification

    return save_tiny(tmp_path_factory.mktemp("chat_reward"), LlamaForSequenceClassification,
                     chat_template=CHAT_TEMPLATE, num_labels=1)


@pytest.fixture(scope="session")
def hh_dir(tmp_path_factory):
    """Anthropic/hh-rlhf layout: train/test JSONL files with `chosen` and `rejected` dialogues."""
    root = tmp_path_factory.mktemp("hh-rlhf")
    for split, n in [("train", 12), ("test", 6)]:
        with open(root / f"{split}.jsonl", "w") as f:
            for i in range(n):
                start = f"\n\nHuman: What is {i} plus {i}?\n\nAssistant: It is {2 * i}.\n\nHuman: And times two?\n\nAssistant:"
                f.write(json.dumps({"chosen": start + f" {4 * i}.", "rejected": start + " No idea."}) + "\n")
    return str(root)


@pytest.fixture(scope="session")
def ultrafeedback_dir(tmp_path_factory):
    """HuggingFaceH4/ultrafeedback_binarized layout: parquet shards per split, declared in README.md."""
    import datasets

    root = tmp_path_factory.mktemp("ultrafeedback")
    (root / "data").mkdir()
    for split, n in [("train_prefs", 12), ("test_prefs", 6), ("train_sft", 3)]:
        rows = []
        for i in range(n):
            prompt = f"Write a short line about the number {i}."
            chosen = [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"{i} is fine."}]
            rejected = [{"role": "user", "content": prompt}, {"role": "assistant", "content": "No."}]
            rows.append({"prompt": prompt, "prompt_id": f"{i:04d}", "chosen": chosen, "rejected": rejected,
                         "messages": chosen, "score_chosen": 8.0, "score_rejected": 3.0})
        datasets.Dataset.from_list(rows).to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    configs = "".join(f"  - split: {s}\n    path: data/{s}-*\n" for s in ["train_prefs", "test_prefs", "train_sft"])
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: default\n  data_files:\n{configs}---\n")
    return str(root)
