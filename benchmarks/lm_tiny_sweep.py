"""Grid sweep of an LM script on the offline tiny task, in one process, one torch thread.

    python benchmarks/lm_tiny_sweep.py --script pair_grpo_hard_lm.py --seeds 1 2 \\
        --grid "eps_pi=0.002,0.005,0.02" "learning_rate=3e-3,1e-2" --tag hard_lm_tiny_sweep

Writes docs/results/{tag}.csv: one row per setting and seed with the final eval win rate
and score, the mean per-token K_old after the third iteration (Hard only) against
eps_pi, the range of alpha, and the wall-clock seconds.
"""
import argparse
import csv
import importlib
import itertools
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--script", default="pair_grpo_hard_lm.py")
    parser.add_argument("--grid", nargs="+", default=[], help="field=v1,v2,...: LMArgs field names")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--num-iterations", type=int, default=30)
    parser.add_argument("--tag", default="lm_tiny_sweep")
    args = parser.parse_args()
    torch.set_num_threads(1)
    module = importlib.import_module(args.script[: -len(".py")])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fields = [g.split("=", 1)[0] for g in args.grid]
    values = [[type(getattr(module.LMArgs(), f))(v) for v in g.split("=", 1)[1].split(",")] for f, g in zip(fields, args.grid)]
    rows = []
    for combo in itertools.product(*values):
        for seed in args.seeds:
            settings = dict(zip(fields, combo))
            out = tempfile.mkdtemp()
            start = time.time()
            summary = module.train_lm(module.LMArgs(seed=seed, num_iterations=args.num_iterations,
                                                    eval_every=args.num_iterations, output_dir=out, **settings))
            acc = EventAccumulator(os.path.join(out, summary["run_name"]))
            acc.Reload()
            tags = acc.Tags()["scalars"]
            row = {**settings, "seed": seed, "win_rate": summary["eval/win_rate"], "score": summary["eval/score"],
                   "kl_to_reference": summary["eval/kl_to_reference"], "seconds": round(time.time() - start, 1)}
            if "losses/k_old" in tags:
                k_old = [e.value for e in acc.Scalars("losses/k_old")][3:]
                alpha = [e.value for e in acc.Scalars("charts/alpha")]
                eps_pi = settings.get("eps_pi", module.LMArgs().eps_pi)
                row.update({"k_old_mean": sum(k_old) / len(k_old), "k_old_over_eps_pi": sum(k_old) / len(k_old) / eps_pi,
                            "alpha_min": min(alpha), "alpha_max": max(alpha)})
            rows.append(row)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    path = os.path.join(ROOT, "docs", "results", f"{args.tag}.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([{k: f"{v:.4g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
