"""Learning curves on the offline tiny LM task: eval win rate against the reference policy
vs optimizer steps, for GRPO, Soft-Pair-GRPO and Hard-Pair-GRPO at their defaults.

    pip install -r requirements.txt -r benchmarks/requirements.txt
    python benchmarks/lm_curves.py --seeds 1 2 3

Runs in one process with one torch thread; writes docs/results/lm_curves.csv (script, seed,
iteration, optimizer_step, win_rate, score) and docs/results/lm_curves.png (mean and
min-max band over seeds).
"""
import argparse
import csv
import importlib
import os
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]
SCRIPTS = {"GRPO": "grpo_baseline", "Soft-Pair-GRPO": "pair_grpo_soft_lm", "Hard-Pair-GRPO": "pair_grpo_hard_lm"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--num-iterations", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = []
    for label, name in SCRIPTS.items():
        module = importlib.import_module(name)
        for seed in args.seeds:
            lm_args = module.LMArgs(seed=seed, num_iterations=args.num_iterations, eval_every=args.eval_every)
            steps_per_iteration = lm_args.update_epochs * lm_args.num_minibatches
            with tempfile.TemporaryDirectory() as tmp:
                lm_args.output_dir = tmp
                summary = module.train_lm(lm_args)
                acc = EventAccumulator(os.path.join(tmp, summary["run_name"]))
                acc.Reload()
                per_completion = lm_args.prompts_per_step * lm_args.group_size  # global_step -> iteration
                score = {e.step: e.value for e in acc.Scalars("eval/score")}
                for e in acc.Scalars("eval/win_rate"):
                    iteration = e.step // per_completion
                    rows.append({"script": label, "seed": seed, "iteration": iteration,
                                 "optimizer_step": iteration * steps_per_iteration,
                                 "win_rate": round(e.value, 4), "score": round(score[e.step], 4)})
    path = os.path.join(ROOT, "docs", "results", "lm_curves.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for label in SCRIPTS:
        for ax, key in zip(axes, ["win_rate", "score"]):
            mine = [r for r in rows if r["script"] == label]
            steps = sorted({r["optimizer_step"] for r in mine})
            values = np.array([[next(r[key] for r in mine if r["seed"] == s and r["optimizer_step"] == x) for x in steps]
                               for s in args.seeds])
            ax.plot(steps, values.mean(0), label=f"{label} ({len(args.seeds)} seeds)")
            ax.fill_between(steps, values.min(0), values.max(0), alpha=0.2)
    axes[0].set_ylabel("eval win rate vs reference")
    axes[1].set_ylabel("eval score (vowel density)")
    for ax in axes:
        ax.set_xlabel("optimizer steps")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("tiny LM task (random 2-layer Llama, rule judge), defaults of each script")
    fig.tight_layout()
    fig.savefig(os.path.join(ROOT, "docs", "results", "lm_curves.png"), dpi=110)
    print("wrote docs/results/lm_curves.png")


if __name__ == "__main__":
    main()
