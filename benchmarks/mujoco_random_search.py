"""Random search around a MuJoCo script's defaults: many changes at once, where the suite's
levers table changed one at a time (interactions), then more seeds for the best.

Each configuration moves each knob of SPACE, with probability --p-change (at least one knob), to
one of its other values, drawn from a generator seeded by --search-seed, so a command names the
same configurations everywhere. SPACE lists Hopper-v4's and Walker2d-v4's defaults, so only those
two environments are searched. Configuration 0 is the defaults. A screen runs every configuration on --seeds; then
the --confirm-top configurations with the best screen mean, and the defaults, run --confirm-seeds.
Runs start as cores free up (--jobs at a time, one torch thread each); at --deadline seconds the
ones still running are stopped and left out. One CSV row per finished run, written as each ends.

    python benchmarks/mujoco_random_search.py --env-id Hopper-v4 --configs 14 --seeds 1 2 \
        --confirm-top 3 --confirm-seeds 3 4 5 --jobs 2 --out docs/results/hopper_random_search.csv
"""
import argparse
import csv
import glob
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.dirname(os.path.abspath(__file__))]
from mujoco_suite import ALGOS, tb_scalars  # noqa: E402

# knob -> values, the Hopper and Walker2d default first (ENV_DEFAULTS, else MujocoArgs); a change takes another
SPACE = {
    "--learning-rate": ["3e-4", "2e-4", "4.5e-4", "6e-4"],
    "--update-epochs": ["5", "3", "8"],
    "--num-trunks": ["4", "2", "8"],
    "--group-size": ["8", "4", "12"],
    "--segment-length": ["128", "64", "96", "192"],
    "--log-std-init": ["-0.5", "-0.25", "-0.75"],
    "--clip": ["0.3", "0.2", "0.4"],  # both --clip-eps-low and --clip-eps-high
    "--hidden-size": ["64", "128"],
    "--max-grad-norm": ["0.5", "1.0"],
    "--lookahead": {"Hopper-v4": ["384", "256", "512"], "Walker2d-v4": ["192", "128", "256"]},
}


def draw(rng, env_id: str, p: float, taken: list) -> dict:
    """One configuration not yet taken: the knobs it changes (at least one) and their new values."""
    while True:
        picked = {}
        for knob, values in SPACE.items():
            values = values.get(env_id) if isinstance(values, dict) else values
            if values and rng.random() < p:
                picked[knob] = values[1 + rng.integers(len(values) - 1)]
        if picked and picked not in taken:
            return picked


def flags(picked: dict) -> list:
    out = []
    for knob, value in picked.items():
        out += ["--clip-eps-low", value, "--clip-eps-high", value] if knob == "--clip" else [knob, value]
    return out


def result(out: str) -> tuple:
    """(last 10 training-episode returns' mean, last 3 evaluations' mean) of a finished run."""
    runs = glob.glob(os.path.join(glob.escape(out), "*", "summary.json"))  # a rerun into the same folder adds one
    newest = max(runs, key=os.path.getmtime)
    logged = tb_scalars(os.path.dirname(newest))
    train, evals = logged.get("charts/episodic_return", []), logged.get("eval/episodic_return", [])
    return (np.mean([v for _, v in train[-10:]]) if train else float("nan"),
            np.mean([v for _, v in evals[-3:]]) if evals else float("nan"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-id", default="Hopper-v4")
    parser.add_argument("--algo", default="grpo", choices=["grpo", "soft", "hard"])
    parser.add_argument("--configs", type=int, default=14, help="configurations besides the defaults")
    parser.add_argument("--search-seed", type=int, default=0)
    parser.add_argument("--p-change", type=float, default=0.3, help="chance that a knob leaves its default")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2], help="the screen's seeds")
    parser.add_argument("--confirm-top", type=int, default=3)
    parser.add_argument("--confirm-seeds", nargs="+", type=int, default=[3, 4, 5])
    parser.add_argument("--total-timesteps", type=int, default=1_000_000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--deadline", type=float, default=float("inf"), help="seconds; later runs are stopped")
    parser.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "benchmarks", "random_search"))
    parser.add_argument("--out", required=True, help="CSV: one row per finished run")
    args = parser.parse_args()
    if not 0 < args.p_change <= 1 or args.jobs < 1 or args.configs < 0:
        sys.exit("error: --p-change must lie in (0, 1], --jobs be at least 1 and --configs at least 0")
    if args.env_id not in SPACE["--lookahead"]:
        sys.exit(f"error: --env-id {args.env_id!r}: SPACE lists the defaults of {', '.join(SPACE['--lookahead'])} only")
    rng = np.random.default_rng(args.search_seed)
    configs = [{}]
    for _ in range(args.configs):
        configs.append(draw(rng, args.env_id, args.p_change, configs))
    for i, picked in enumerate(configs):
        print(f"config {i}: {' '.join(flags(picked)) or '(defaults)'}", flush=True)
    pending = [(i, s, "screen") for i in range(len(configs)) for s in args.seeds]
    running, rows, start, confirmed = [], [], time.time(), False
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    fields = ["env_id", "algo", "config", "phase", "seed", "flags", "final_train_return", "final_eval_return",
              "wall_seconds"]
    with open(args.out, "w", newline="") as f:
        csv.DictWriter(f, fieldnames=fields).writeheader()
    while pending or running or not confirmed:
        if not pending and not running and not confirmed:  # the screen has ended: more seeds for its best
            confirmed = True
            screen = {i: np.mean([r["final_train_return"] for r in rows if r["config"] == i])
                      for i in range(1, len(configs)) if any(r["config"] == i for r in rows)}
            best = sorted(screen, key=screen.get, reverse=True)[:args.confirm_top]
            print("confirming " + ", ".join(f"config {i} ({screen[i]:.0f})" for i in best), flush=True)
            pending = [(i, s, "confirm") for i in [0] + best for s in args.confirm_seeds]
        while pending and len(running) < args.jobs and time.time() - start < args.deadline:
            i, seed, phase = pending.pop(0)
            out = os.path.join(args.runs_dir, f"{args.env_id}_{args.algo}_{args.search_seed}", str(i), str(seed))
            os.makedirs(out, exist_ok=True)
            script = ALGOS[args.algo]
            cmd = [sys.executable, os.path.join(ROOT, script[0]), *script[1:], "--env-id", args.env_id, "--seed",
                   str(seed), "--total-timesteps", str(args.total_timesteps), "--output-dir", out,
                   *flags(configs[i])]
            log = open(os.path.join(out, "stdout.log"), "w")
            running.append((i, seed, phase, out, time.time(), subprocess.Popen(cmd, stdout=log, stderr=log, env=env)))
        if time.time() - start >= args.deadline:
            for job in running:
                job[-1].terminate()
            print(f"deadline: stopped {len(running)} runs, {len(pending)} not started", flush=True)
            break
        time.sleep(1)
        for job in [j for j in running if j[-1].poll() is not None]:
            running.remove(job)
            i, seed, phase, out, began, proc = job
            if proc.returncode:
                for other in running:
                    other[-1].terminate()
                sys.exit(f"error: config {i} seed {seed} failed; see {out}/stdout.log")
            train, evaluation = result(out)
            rows.append({"env_id": args.env_id, "algo": args.algo, "config": i, "phase": phase, "seed": seed,
                         "flags": " ".join(flags(configs[i])), "final_train_return": round(train, 1),
                         "final_eval_return": round(evaluation, 1), "wall_seconds": round(time.time() - began)})
            with open(args.out, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=fields).writerow(rows[-1])
            print(f"{time.time() - start:.0f}s config {i} seed {seed}: {train:.0f} (eval {evaluation:.0f}) "
                  f"in {time.time() - began:.0f}s", flush=True)
    print("config | runs | mean +- std of the final training-episode return | flags")
    for i in sorted({r["config"] for r in rows}):
        mine = [r["final_train_return"] for r in rows if r["config"] == i]
        print(f"{i} | {len(mine)} | {np.mean(mine):.0f} +- {np.std(mine):.0f} | {' '.join(flags(configs[i]))}")


if __name__ == "__main__":
    main()
