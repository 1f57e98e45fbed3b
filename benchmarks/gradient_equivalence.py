"""Exact expected-gradient cosines of spec 3.1 (and, once it exists, Hard-Pair-GRPO's
eps_q -> 0 limit), from the same enumeration the tests assert on.

    python benchmarks/gradient_equivalence.py     # writes docs/results/gradient_equivalence.csv
"""
import csv
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from test_gradient_equivalence import ARM_REWARDS, G, K, RANDOM_ARM_REWARDS, TAU, table  # noqa: E402

if __name__ == "__main__":
    draws = [("even", ARM_REWARDS)] + [(f"random{i}", r) for i, r in enumerate(RANDOM_ARM_REWARDS)]
    rows = [{"arms": name, **{("one_minus_" + k if k.startswith("cos") else k): (1 - v if k.startswith("cos") else v)
                              for k, v in r.items()}} for name, rewards in draws for r in table(rewards)]
    path = os.path.join(ROOT, "docs", "results", "gradient_equivalence.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([{k: v if isinstance(v, str) else f"{v:.3e}" for k, v in row.items()} for row in rows])
    print(f"K={K} arms, G={G}, tau={TAU}, exact enumeration of {K ** G} ordered groups")
    for row in rows:
        print(" | ".join(f"{k} {v}" if isinstance(v, str) else f"{k} {v:.3e}" for k, v in row.items()))
    print(f"wrote {path}")
