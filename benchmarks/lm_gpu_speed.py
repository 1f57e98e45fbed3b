"""GPU speed and memory of `grpo_baseline.py` against TRL's GRPOTrainer on the same work: a
random Llama with Qwen2.5-0.5B's shape (359M parameters; built from a config, no download)
and the byte tokenizer, 8 prompts x 8 completions of up to 128 new tokens per optimizer step,
bf16 autocast, beta 0.04, learning rate 1e-6, the tiny task's prompts and rule judge. Reports
the median seconds per optimizer step over steps 4 to 20 and the peak GPU memory (torch's
max_memory_allocated) of each side, each in its own process, one after the other: ours with fast
generation (the default on CUDA), ours eager (`--fast-generation off`), TRL.

    pip install -r requirements.txt -r benchmarks/requirements.txt
    python benchmarks/lm_gpu_speed.py                                  # needs a CUDA GPU
    python benchmarks/lm_gpu_speed.py --sides ours --ours-flags micro_batch_size=32

Writes docs/results/lm_gpu_speed.csv (or --out).
"""
import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]
STEPS, FIRST = 20, 4
WORK = dict(prompts=8, group_size=8, new_tokens=128, beta=0.04, learning_rate=1e-6)


def timed_adamw():
    """Timestamps every optimizer step of whichever side runs (both use torch's AdamW)."""
    import torch

    stamps, step = [], torch.optim.AdamW.step

    def stamped(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return out

    torch.optim.AdamW.step = stamped
    return stamps


def parse_flags(text: str) -> dict:
    """`field=value,field=value` -> LMArgs overrides (true/false, ints and floats parsed)."""
    out = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=", 1)
        lowered = value.lower()
        out[key] = True if lowered == "true" else False if lowered == "false" else (
            int(value) if re.fullmatch(r"-?\d+", value) else float(value) if re.fullmatch(r"[-+.\deE]+", value) else value)
    return out


def run_ours(model_dir: str, out: str, flags: dict) -> list:
    import grpo_baseline as gb

    stamps = timed_adamw()
    gb.train_lm(gb.LMArgs(model_name_or_path=model_dir, prompts_per_step=WORK["prompts"], group_size=WORK["group_size"],
                          max_new_tokens=WORK["new_tokens"], beta=WORK["beta"], learning_rate=WORK["learning_rate"],
                          num_iterations=STEPS, eval_every=10_000, num_eval_prompts=8, output_dir=out, **flags))
    return stamps


def run_trl(model_dir: str, out: str, flags: dict) -> list:
    import datasets
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    import grpo_baseline as gb

    stamps = timed_adamw()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [r["text"] for r in gb.tiny_task_prompts(WORK["prompts"] * STEPS)]
    config = GRPOConfig(
        output_dir=out, per_device_train_batch_size=WORK["prompts"] * WORK["group_size"],  # counts completions
        num_generations=WORK["group_size"], max_completion_length=WORK["new_tokens"], beta=WORK["beta"],
        learning_rate=WORK["learning_rate"], lr_scheduler_type="constant", bf16=True, gradient_checkpointing=False,
        max_steps=STEPS, num_iterations=1, temperature=1.0, top_k=0, top_p=1.0, report_to=[],
        logging_steps=1, save_strategy="no", seed=1, disable_dropout=True, dataloader_num_workers=0, **flags)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=lambda completions, **kw: [gb.vowel_density(c) for c in completions],
                          args=config, train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
                          processing_class=tokenizer)
    trainer.train()
    return stamps


def build_model(folder: str):
    """A random Llama of Qwen2.5-0.5B's shape with the ByT5 byte tokenizer, saved for both sides."""
    import torch
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=2048, rope_theta=1e6,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    model = LlamaForCausalLM(config)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", nargs="+", default=["ours", "ours-eager", "trl"], choices=["ours", "ours-eager", "trl"])
    parser.add_argument("--ours-flags", default="", help="LMArgs overrides for our side: field=value,field=value")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "lm_gpu_speed.csv"))
    parser.add_argument("--side", choices=["ours", "ours-eager", "trl"], help="(internal) run one side in this process")
    parser.add_argument("--model-dir")
    args = parser.parse_args()
    if args.side:
        import torch

        with tempfile.TemporaryDirectory() as out:
            flags = {"ours": parse_flags(args.ours_flags), "ours-eager": {"fast_generation": "off"}, "trl": {}}[args.side]
            stamps = (run_trl if args.side == "trl" else run_ours)(args.model_dir, out, flags)
        all_steps = [b - a for a, b in zip(stamps, stamps[1:])]
        durations = all_steps[FIRST - 2:]  # steps FIRST..STEPS
        print("step seconds: " + " ".join(f"{d:.2f}" for d in all_steps))
        print("RESULT " + json.dumps({"steps": len(stamps), "durations": durations,
                                      "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                                      "device": torch.cuda.get_device_name()}))
        return

    import numpy as np

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        build_model(tmp)
        for side in args.sides:
            command = [sys.executable, os.path.abspath(__file__), "--side", side, "--model-dir", tmp,
                       "--ours-flags", args.ours_flags]
            proc = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
            result = re.search(r"^RESULT (.*)$", proc.stdout, re.M)
            if proc.returncode or not result:
                sys.exit(f"error: the {side} side failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            timing = json.loads(result.group(1))
            label = side + (f" ({args.ours_flags})" if side == "ours" and args.ours_flags else "")
            rows.append({"side": label, "device": timing["device"], "optimizer_steps": timing["steps"],
                         "median_seconds_per_step": float(np.median(timing["durations"])),
                         "steps_timed": len(timing["durations"]), "peak_gpu_gib": timing["peak_gib"]})
            print(f"{label} on {timing['device']}: median {rows[-1]['median_seconds_per_step']:.3f} s/step over steps "
                  f"{FIRST}-{STEPS}, peak {rows[-1]['peak_gpu_gib']:.1f} GiB; "
                  + next(line for line in proc.stdout.splitlines() if line.startswith("step seconds")), flush=True)
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w", newline="") as f:  # after every side, so a cut run keeps what it measured
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows([{k: f"{v:.4g}" if isinstance(v, float) else v for k, v in row.items()} for row in rows])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
