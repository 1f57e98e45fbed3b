"""Speed and memory of `grpo_baseline.py` against TRL's GRPOTrainer on the same work:
the same tiny model saved to disk (the random 2-layer Llama of the tiny task, ByT5 byte
tokenizer), the same prompts, 2 prompts x 8 completions per optimizer step, 32 new tokens,
beta 0.04, learning rate 1e-3, fp32, one thread, no gradient checkpointing, one optimizer
step per batch. Reports the median seconds per optimizer step over steps 4 to 20 and the
peak RSS (`/usr/bin/time -v`) of each side, each in its own process, one after the other.

    pip install -r requirements.txt -r benchmarks/requirements.txt
    python benchmarks/trl_speed.py

Writes docs/results/trl_speed.csv.
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
WORK = dict(prompts=2, group_size=8, new_tokens=32, beta=0.04, learning_rate=1e-3)


def timed_adamw():
    """Timestamps every optimizer step of whichever side runs (both use torch's AdamW)."""
    import torch

    stamps, step = [], torch.optim.AdamW.step

    def stamped(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        stamps.append(time.perf_counter())
        return out

    torch.optim.AdamW.step = stamped
    return stamps


def run_ours(model_dir: str, out: str) -> list:
    import grpo_baseline as gb

    stamps = timed_adamw()
    gb.train_lm(gb.LMArgs(model_name_or_path=model_dir, prompts_per_step=WORK["prompts"], group_size=WORK["group_size"],
                          max_new_tokens=WORK["new_tokens"], beta=WORK["beta"], learning_rate=WORK["learning_rate"],
                          num_iterations=STEPS, eval_every=10_000, num_eval_prompts=2, output_dir=out, cuda=False))
    return stamps


def run_trl(model_dir: str, out: str) -> list:
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
        learning_rate=WORK["learning_rate"], lr_scheduler_type="constant", bf16=False, gradient_checkpointing=False,
        max_steps=STEPS, num_iterations=1, temperature=1.0, top_k=0, top_p=1.0, use_cpu=True, report_to=[],
        logging_steps=1, save_strategy="no", seed=1, disable_dropout=True, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=lambda completions, **kw: [gb.vowel_density(c) for c in completions],
                          args=config, train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
                          processing_class=tokenizer)
    trainer.train()
    return stamps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=["ours", "trl"], help="(internal) run one side in this process")
    parser.add_argument("--model-dir")
    args = parser.parse_args()
    if args.side:
        import torch

        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory() as out:
            stamps = (run_ours if args.side == "ours" else run_trl)(args.model_dir, out)
        durations = [b - a for a, b in zip(stamps, stamps[1:])][FIRST - 2:]  # steps FIRST..STEPS
        print("RESULT " + json.dumps({"steps": len(stamps), "durations": durations}))
        return

    import numpy as np
    import torch

    import grpo_baseline as gb

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        gb.seed_everything(1, True)
        policy, _, tokenizer, _ = gb.load_lm_policy(gb.LMArgs(), torch.device("cpu"))
        policy.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        for side in ["ours", "trl"]:
            proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, os.path.abspath(__file__), "--side", side,
                                   "--model-dir", tmp], capture_output=True, text=True, env=env)
            result = re.search(r"^RESULT (.*)$", proc.stdout, re.M)
            if proc.returncode or not result:
                sys.exit(f"error: the {side} side failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            timing = json.loads(result.group(1))
            rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
            rows.append({"side": side, "optimizer_steps": timing["steps"], "median_seconds_per_step": float(np.median(timing["durations"])),
                         "steps_timed": len(timing["durations"]), "peak_rss_mib": rss_kb / 1024})
            print(f"{side}: median {rows[-1]['median_seconds_per_step']:.3f} s/step over steps {FIRST}-{STEPS}, "
                  f"peak RSS {rows[-1]['peak_rss_mib']:.0f} MiB", flush=True)
    ours, trl = rows
    rows.append({"side": "ratio trl/ours", "optimizer_steps": "", "steps_timed": "",
                 "median_seconds_per_step": trl["median_seconds_per_step"] / ours["median_seconds_per_step"],
                 "peak_rss_mib": trl["peak_rss_mib"] / ours["peak_rss_mib"]})
    print(f"TRL / ours: {rows[-1]['median_seconds_per_step']:.2f}x time per step, {rows[-1]['peak_rss_mib']:.2f}x peak RSS")
    path = os.path.join(ROOT, "docs", "results", "trl_speed.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in row.items()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
