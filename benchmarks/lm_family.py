"""The family on the built-in `rules` LM task beside TRL's DPO and ORPO (the paper's tables in miniature).

Every method starts from the same policy (the tiny model at the seed's initialisation) and,
where it learns from preferences, gets the same teacher and the same number of preference
queries: GRPO, Soft and Hard (pair-shift, and group-softmax) train online for the default 40
iterations of 8 prompts x 8 completions (8,960 labelled pairs for the pair methods; GRPO
reads the scalar scores instead); DPO and ORPO (TRL) train for one epoch on 8,960 pairs
sampled from the starting policy (320 prompts x 8 completions, every pair of a group) and
labelled by that teacher (ties dropped). All are evaluated the same way on the same held-out
prompts every 5 iterations' worth of queries: win rate against the starting policy, mean
score, per-token KL to the starting policy. Stability: the variance of the gradient norm
over the optimizer steps, and the std of the KL to the starting policy over the evaluations.

    pip install -r requirements.txt -r benchmarks/requirements.txt
    python benchmarks/lm_family.py --seeds 1 2 3 --jobs 2
    python benchmarks/lm_family.py --methods soft hard dpo --teachers stochastic mistake --tag lm_family_teachers

Writes docs/results/{tag}.csv (a row per method, teacher and seed), {tag}_curves.csv (win rate
against preference queries) and {tag}.png.
"""
import argparse
import concurrent.futures
import csv
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]
ITERATIONS, PROMPTS, G, EVAL_EVERY = 40, 8, 8, 5
PAIRS_PER_ITERATION = PROMPTS * G * (G - 1) // 2
SCRIPTS = {"grpo": ("grpo_baseline", {}), "soft": ("pair_grpo_soft_lm", {}), "hard": ("pair_grpo_hard_lm", {}),
           "hard_group_softmax": ("pair_grpo_hard_lm", {"target": "group-softmax"})}
TEACHER_FLAGS = {"stochastic": {"teacher_tau": 0.05}, "mistake": {"teacher_flip_prob": 0.1}}
OFFLINE_LR = 3e-3  # DPO and ORPO: the online methods' learning rate on this model (--offline-lr)


def run_ours(method: str, teacher: str, seed: int) -> dict:
    import importlib

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module, flags = importlib.import_module(SCRIPTS[method][0]), dict(SCRIPTS[method][1])
    if method != "grpo":
        flags.update(teacher=teacher, **TEACHER_FLAGS.get(teacher, {}))
    with tempfile.TemporaryDirectory() as out:
        summary = module.train_lm(module.LMArgs(dataset_name="rules", seed=seed, num_iterations=ITERATIONS,
                                                eval_every=EVAL_EVERY, output_dir=out, torch_threads=1, **flags))
        acc = EventAccumulator(os.path.join(out, summary["run_name"]))
        acc.Reload()
        logged = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    steps_per_iteration = PROMPTS * G
    curve = [(step // steps_per_iteration * PAIRS_PER_ITERATION, win) for step, win in logged["eval/win_rate"]]
    return {"grad_norms": [v for _, v in logged["losses/grad_norm"]], "kls": [v for _, v in logged["eval/kl_to_reference"]],
            "curve": curve, "final": {k: summary[f"eval/{k}"] for k in ("win_rate", "score", "kl_to_reference")}}


def run_offline(method: str, teacher: str, seed: int) -> dict:
    """DPO or ORPO on pairs sampled from the starting policy, labelled by the teacher."""
    import datasets
    import numpy as np
    import torch
    from transformers import TrainerCallback

    import grpo_baseline as gb
    import pair_grpo_soft_lm as soft

    torch.set_num_threads(1)
    args = soft.LMArgs(dataset_name="rules", seed=seed, teacher=teacher, **TEACHER_FLAGS.get(teacher, {}))
    gb.seed_everything(seed, True)  # as train_lm does before it builds the policy: the same starting weights
    policy, reference, tokenizer, eos_ids = gb.load_lm_policy(args, torch.device("cpu"))
    train_records, eval_records = gb.load_lm_prompts(args, tokenizer)
    train_ids, eval_ids = (gb.encode_prompts(tokenizer, r, args.max_prompt_length, eos_ids) for r in (train_records, eval_records))
    judge, off = gb.load_lm_judge(args, torch.device("cpu")), torch.autocast("cpu", enabled=False)
    order, teacher_rng, rows = np.random.default_rng(seed).permutation(len(train_ids)), torch.Generator().manual_seed(seed), []
    for it in range(ITERATIONS):  # the same number of groups and labelled pairs as the online methods
        prompts = [int(p) for p in order[it * PROMPTS: (it + 1) * PROMPTS]]
        seeds = [gb.sampling_seed(seed, 0, it + 1, p, j) for p in range(PROMPTS) for j in range(G)]
        batch = gb.sample_completions(policy, tokenizer, [train_ids[p] for p in prompts], G, eos_ids, off,
                                      torch.device("cpu"), seeds, args.temperature)
        scores = judge([train_records[p] for p in prompts for _ in range(G)], batch["texts"]).view(PROMPTS, G)
        labels = soft.teacher_labels(scores, teacher, args.teacher_tau, args.teacher_flip_prob, args.teacher_tie_margin,
                                     teacher_rng)
        for g, p in enumerate(prompts):
            for i in range(G):
                for j in range(i + 1, G):
                    if labels[g, i, j] != 0.5:  # a tie says nothing about which is better
                        win, lose = (i, j) if labels[g, i, j] == 1 else (j, i)
                        rows.append({"prompt": train_records[p]["text"], "chosen": batch["texts"][g * G + win],
                                     "rejected": batch["texts"][g * G + lose]})

    evaluations = []

    def evaluate(queries: int):
        """train_lm's evaluation: the same held-out prompts, seeds and judge."""
        ours, theirs = (gb.sample_completions(m, tokenizer, eval_ids, 1, eos_ids, off, torch.device("cpu"),
                                              [gb.sampling_seed(seed, stream, queries // PAIRS_PER_ITERATION, p)
                                               for p in range(len(eval_ids))], args.temperature)
                        for stream, m in ((1, policy), (2, reference)))
        s_ours, s_ref = judge(eval_records, ours["texts"]), judge(eval_records, theirs["texts"])
        with torch.no_grad():
            kl = gb.k3_kl(gb.batched_logprobs(policy, ours, args, off), gb.batched_logprobs(reference, ours, args, off))
        evaluations.append((queries, ((s_ours > s_ref).float() + 0.5 * (s_ours == s_ref).float()).mean().item(),
                            s_ours.mean().item(), ((kl * ours["mask"]).sum() / ours["mask"].sum()).item()))

    # All the queries were spent before training: a step that has used a share of the labelled pairs is
    # charged that share of the queries, so every curve ends at the same 8,960.
    per_step, queries_per_pair = 64, ITERATIONS * PAIRS_PER_ITERATION / len(rows)
    every = max(1, round(EVAL_EVERY * PAIRS_PER_ITERATION / queries_per_pair / per_step))

    class Evaluate(TrainerCallback):
        def on_step_end(self, train_args, state, control, **kwargs):
            if state.global_step % every == 0:
                was = policy.training
                evaluate(round(min(state.global_step * per_step, len(rows)) * queries_per_pair))
                policy.train(was)

    evaluate(0)
    with tempfile.TemporaryDirectory() as out:
        common = dict(output_dir=out, per_device_train_batch_size=per_step, num_train_epochs=1, learning_rate=OFFLINE_LR,
                      lr_scheduler_type="constant", use_cpu=True, bf16=False, report_to=[], logging_steps=1,
                      save_strategy="no", seed=seed, max_grad_norm=args.max_grad_norm, dataloader_num_workers=0,
                      disable_tqdm=True, log_level="error")
        if method == "dpo":
            from trl import DPOConfig, DPOTrainer

            trainer = DPOTrainer(model=policy, ref_model=reference, args=DPOConfig(**common), processing_class=tokenizer,
                                 train_dataset=datasets.Dataset.from_list(rows), callbacks=[Evaluate()])
        else:
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

            trainer = ORPOTrainer(model=policy, args=ORPOConfig(**common), processing_class=tokenizer,
                                  train_dataset=datasets.Dataset.from_list(rows), callbacks=[Evaluate()])
        trainer.train()
    if evaluations[-1][0] != ITERATIONS * PAIRS_PER_ITERATION:
        evaluate(ITERATIONS * PAIRS_PER_ITERATION)
    queries, win, score, kl = evaluations[-1]
    return {"grad_norms": [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h],
            "kls": [e[3] for e in evaluations], "curve": [(e[0], e[1]) for e in evaluations],
            "final": {"win_rate": win, "score": score, "kl_to_reference": kl}, "pairs": len(rows)}


def set_offline_lr(lr: float):
    global OFFLINE_LR
    OFFLINE_LR = lr


def run_one(method: str, teacher: str, seed: int) -> dict:
    import numpy as np

    result = (run_offline if method in ("dpo", "orpo") else run_ours)(method, teacher, seed)
    return {"method": method + (f"_lr{OFFLINE_LR:g}" if method in ("dpo", "orpo") and OFFLINE_LR != 3e-3 else ""),
            "teacher": teacher if method != "grpo" else "scores", "seed": seed, **result["final"],
            "grad_norm_variance": float(np.var(result["grad_norms"])), "kl_std": float(np.std(result["kls"])),
            # scale-free versions: the losses differ in scale (GRPO's std-normalised advantages, Soft's in [-1, 1])
            "grad_norm_cv": float(np.std(result["grad_norms"]) / np.mean(result["grad_norms"])),
            "kl_cv": float(np.std(result["kls"]) / np.mean(result["kls"])),
            "pairs": result.get("pairs", ITERATIONS * PAIRS_PER_ITERATION), "curve": result["curve"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["grpo", "soft", "hard", "hard_group_softmax", "dpo", "orpo"])
    parser.add_argument("--teachers", nargs="+", default=["oracle"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--tag", default="lm_family")
    parser.add_argument("--offline-lr", type=float, default=OFFLINE_LR, help="DPO and ORPO learning rate")
    parser.add_argument("--plot-only", action="store_true", help="redraw the table and plot from the tag's CSVs")
    args = parser.parse_args()
    folder = os.path.join(ROOT, "docs", "results")
    if args.plot_only:
        rows = [{k: v if k in ("method", "teacher") else float(v) for k, v in r.items()}
                for r in csv.DictReader(open(os.path.join(folder, f"{args.tag}.csv")))]
        for r in rows:
            r["curve"] = [(float(c["preference_queries"]), float(c["win_rate"]))
                          for c in csv.DictReader(open(os.path.join(folder, f"{args.tag}_curves.csv")))
                          if (c["method"], c["teacher"], float(c["seed"])) == (r["method"], r["teacher"], r["seed"])]
        return summarise(rows, folder, args.tag)
    jobs = [(m, t, s) for m in args.methods for t in ([args.teachers[0]] if m == "grpo" else args.teachers) for s in args.seeds]
    rows = []
    with concurrent.futures.ProcessPoolExecutor(args.jobs, initializer=set_offline_lr, initargs=(args.offline_lr,)) as pool:
        for row in pool.map(run_one, *zip(*jobs)):
            rows.append(row)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "curve"),
                  flush=True)
    os.makedirs(folder, exist_ok=True)
    fields = [k for k in rows[0] if k != "curve"]
    with open(os.path.join(folder, f"{args.tag}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows([{k: f"{r[k]:.4g}" if isinstance(r[k], float) else r[k] for k in fields} for r in rows])
    with open(os.path.join(folder, f"{args.tag}_curves.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "teacher", "seed", "preference_queries", "win_rate"])
        writer.writerows([(r["method"], r["teacher"], r["seed"], q, f"{w:.4g}") for r in rows for q, w in r["curve"]])
    summarise(rows, folder, args.tag)


def summarise(rows: list, folder: str, tag: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["teacher"]), []).append(r)
    print("| method | teacher | win rate | score | KL to reference | grad-norm variance | KL std | grad-norm CV | KL CV |")
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for (method, teacher), rs in groups.items():
        cells = [f"{np.mean([r[k] for r in rs]):.3g} +- {np.std([r[k] for r in rs]):.2g}"
                 for k in ("win_rate", "score", "kl_to_reference", "grad_norm_variance", "kl_std", "grad_norm_cv", "kl_cv")]
        print(f"| {method} | {teacher} | " + " | ".join(cells) + " |")
        grid = np.arange(0, ITERATIONS * PAIRS_PER_ITERATION + 1, EVAL_EVERY * PAIRS_PER_ITERATION)
        wins = np.mean([np.interp(grid, *zip(*sorted(r["curve"]))) for r in rs], axis=0)  # seeds differ in x (DPO)
        axis.plot(grid, wins, marker="o", markersize=3, label=f"{method} ({teacher})")
    axis.set_xlabel("preference queries (GRPO: the same rollouts, scored)")
    axis.set_ylabel(f"held-out win rate against the start (mean of {len(rs)} seeds)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(os.path.join(folder, f"{tag}.png"), dpi=120)


if __name__ == "__main__":
    main()
