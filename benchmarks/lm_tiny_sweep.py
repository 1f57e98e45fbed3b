"""Grid sweep of an LM script on the offline tiny task, in one process, one torch thread.

    python benchmarks/lm_tiny_sweep.py --script pair_grpo_hard_lm.py --seeds 1 2 \\
        --grid "eps_pi=0.002,0.005,0.02" "learning_rate=3e-3,1e-2" --tag hard_lm_tiny_sweep
    python benchmarks/lm_tiny_sweep.py --seeds 1 2 3 --tag ablation \\
        --variants "full=" "fixed=delta_decay=1" "mixed=delta0=0.01,delta_decay=0.99"   # name=field=v,field=v

Writes docs/results/{tag}.csv: one row per setting and seed with the final eval win rate
and score, the mean training score over all iterations (learning speed, where the final
numbers saturate), the mean per-token K_old after the third iteration (Hard) against
eps_pi or trust_region_kl, the range of alpha or the hinge's activity, and the seconds.
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
    parser.add_argument("--variants", nargs="+", default=[], help="name=field=v,field=v: named settings, run after the grid")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--num-iterations", type=int, default=30)
    parser.add_argument("--tag", default="lm_tiny_sweep")
    args = parser.parse_args()
    torch.set_num_threads(1)
    module = importlib.import_module(args.script[: -len(".py")])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fields = [g.split("=", 1)[0] for g in args.grid]
    values = [[type(getattr(module.LMArgs(), f))(v) for v in g.split("=", 1)[1].split(",")] for f, g in zip(fields, args.grid)]
    settings_list = [("", dict(zip(fields, combo))) for combo in itertools.product(*values)] if args.grid else []
    for variant in args.variants:
        name, _, spec = variant.partition("=")
        pairs = [kv.split("=", 1) for kv in spec.split(",") if kv]
        settings_list.append((name, {k: type(getattr(module.LMArgs(), k))(v) for k, v in pairs}))
    rows = []
    for name, settings in settings_list or [("", {})]:
        for seed in args.seeds:
            out = tempfile.mkdtemp()
            start = time.time()
            summary = module.train_lm(module.LMArgs(seed=seed, num_iterations=args.num_iterations,
                                                    eval_every=args.num_iterations, output_dir=out, **settings))
            acc = EventAccumulator(os.path.join(out, summary["run_name"]))
            acc.Reload()
            tags = acc.Tags()["scalars"]
            score = [e.value for e in acc.Scalars("charts/score")]
            row = {**({"variant": name} if args.variants else {}), **settings, "seed": seed,
                   "win_rate": summary["eval/win_rate"], "score": summary["eval/score"],
                   "mean_train_score": sum(score) / len(score),
                   "kl_to_reference": summary["eval/kl_to_reference"], "seconds": round(time.time() - start, 1)}
            if "charts/alpha" in tags:  # group-softmax: K_old against eps_pi, the multiplier's range
                k_old = [e.value for e in acc.Scalars("losses/k_old")][3:]
                alpha = [e.value for e in acc.Scalars("charts/alpha")]
                eps_pi = settings.get("eps_pi", module.LMArgs().eps_pi)
                row.update({"k_old_mean": sum(k_old) / len(k_old), "k_old_over_eps_pi": sum(k_old) / len(k_old) / eps_pi,
                            "alpha_min": min(alpha), "alpha_max": max(alpha)})
            if "charts/hinge_active" in tags:  # pair-shift: K_old against the hinge's threshold, how often it acts
                k_old = [e.value for e in acc.Scalars("losses/k_old")][3:]
                row.update({"k_old_mean": sum(k_old) / len(k_old),
                            "hinge_active": sum(e.value for e in acc.Scalars("charts/hinge_active")) / len(score)})
            rows.append(row)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    path = os.path.join(ROOT, "docs", "results", f"{args.tag}.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows([{k: f"{v:.4g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
