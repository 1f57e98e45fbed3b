"""Equal wall-clock against the peer: SB3 PPO (RL Zoo settings) runs its 1M steps on one core, then
each family member runs on one core for exactly as many seconds (a SIGTERM at SB3's time: the
scripts checkpoint and stop), with --cap as its --total-timesteps (where the learning rate anneals, it
anneals over --cap; on HalfCheetah, Hopper and Walker2d it is constant unless --extra "--anneal-lr
True"). The first member runs beside SB3 and is stopped when SB3 ends; the others run two at a
time. So every run shares the two cores of this VM with one other single-thread run, as SB3 did.

    pip install -r requirements.txt -r benchmarks/requirements.txt
    python benchmarks/mujoco_wallclock.py --env-id HalfCheetah-v4 --seed 1 --cap 10000000
    python benchmarks/mujoco_wallclock.py --env-id Hopper-v4 --seed 1 --cap 8000000 \
        --sb3-run runs/benchmarks/hopper/sb3_ppo/1 --reuse    # SB3's run from the suite sets the time

Runs live in runs/benchmarks/{tag}/{algo}/{seed} (--tag, default {env}_wallclock; a finished run holds
wall_seconds.txt; --reuse keeps those). Writes docs/results/{tag}.csv: per run its seconds, the steps it
reached, and its training-episode return (last 10 episodes) and eval return at the end; an invocation
replaces the rows of the runs it names and keeps the others (another seed's).
"""
import argparse
import csv
import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mujoco_suite import ALGOS, ROOT, short, tb_scalars  # noqa: E402


def start(algo: str, args, out: str, steps: int) -> subprocess.Popen:
    cmd = [sys.executable, os.path.join(ROOT, ALGOS[algo][0]), *ALGOS[algo][1:], "--env-id", args.env_id,
           "--seed", str(args.seed), "--total-timesteps", str(steps), "--output-dir", out,
           *([] if algo == "sb3_ppo" else args.extra.split())]
    os.makedirs(out, exist_ok=True)
    print("+ " + " ".join(cmd[1:]), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=open(os.path.join(out, "stdout.log"), "w"), stderr=subprocess.STDOUT, env=env)


def finish(procs: dict, began: float, budget: float = 0.0, leader: str = ""):
    """Wait for the runs {folder: process}; stop the ones still running (one SIGTERM: they checkpoint
    and exit) once `budget` seconds have passed or the `leader` run has ended. Each run's own time
    goes to its wall_seconds.txt, which marks it done."""
    ended, stopped = {}, set()
    while len(ended) < len(procs):
        time.sleep(1)
        for out, proc in procs.items():
            if out not in ended and proc.poll() is not None:
                ended[out] = time.time() - began
                if proc.returncode not in (0, 128 + signal.SIGTERM):
                    sys.exit(f"error: the run in {out} failed; see {out}/stdout.log")
                with open(os.path.join(out, "wall_seconds.txt"), "w") as f:
                    f.write(f"{ended[out]:.0f}\n")
        if (budget and time.time() - began >= budget) or leader in ended:
            for out in set(procs) - set(ended) - stopped:
                procs[out].send_signal(signal.SIGTERM)
                stopped.add(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-id", default="HalfCheetah-v4")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--algos", nargs="+", default=["grpo", "soft", "hard"], choices=["grpo", "soft", "hard"])
    parser.add_argument("--cap", type=int, default=10_000_000, help="the family runs' step budget (lr schedule)")
    parser.add_argument("--sb3-run", default=None, help="a finished SB3 run folder to take the time from")
    parser.add_argument("--extra", default="", help="flags added to every family run, e.g. '--anneal-lr True'")
    parser.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "benchmarks"))
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "docs", "results"))
    parser.add_argument("--tag", default="{env}_wallclock", help="runs folder and CSV name; {env}: the short name")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs")
    args = parser.parse_args()
    tag = args.tag.format(env=short(args.env_id))
    base = os.path.join(args.runs_dir, tag)
    outs = {a: os.path.join(base, a, str(args.seed)) for a in ["sb3_ppo", *args.algos]}
    outs["sb3_ppo"] = args.sb3_run or outs["sb3_ppo"]
    if args.sb3_run and not os.path.exists(os.path.join(args.sb3_run, "wall_seconds.txt")):
        sys.exit(f"error: --sb3-run {args.sb3_run!r} is not a finished run (no wall_seconds.txt in it)")
    finished = {a for a, out in outs.items() if os.path.exists(os.path.join(out, "wall_seconds.txt"))}
    done = finished if args.reuse else finished & ({"sb3_ppo"} if args.sb3_run else set())  # --sb3-run: read only
    todo = [a for a in args.algos if a not in done]
    if "sb3_ppo" not in done:  # SB3's 1M steps, the first member beside it until SB3 ends
        began, steps = time.time(), {"sb3_ppo": 1_000_000, **{a: args.cap for a in todo[:1]}}
        finish({outs[a]: start(a, args, outs[a], n) for a, n in steps.items()}, began, leader=outs["sb3_ppo"])
        todo = todo[1:]
    budget = float(open(os.path.join(outs["sb3_ppo"], "wall_seconds.txt")).read())
    print(f"SB3 PPO's 1M steps took {budget:.0f} s: each member gets as long", flush=True)
    while todo:  # two at a time
        pair, began = todo[:2], time.time()
        finish({outs[a]: start(a, args, outs[a], args.cap) for a in pair}, began, budget)
        todo = todo[2:]
    rows = []
    for algo, out in outs.items():
        logged = tb_scalars(os.path.dirname(max(glob.glob(os.path.join(glob.escape(out), "*", "events.out.*")),
                                                key=os.path.getmtime)))
        train, evals = logged.get("charts/episodic_return", []), logged.get("eval/episodic_return", [])
        seed = os.path.basename(os.path.normpath(out)) if algo == "sb3_ppo" else args.seed  # --sb3-run: its own
        rows.append({"algo": algo, "seed": seed, "wall_seconds": open(os.path.join(out, "wall_seconds.txt")).read()
                     .strip(), "steps": max(s for s, _ in logged["charts/SPS"]),
                     "train_return": round(float(np.mean([v for _, v in train[-10:]])), 1),
                     "eval_return": round(float(evals[-1][1]), 1) if evals else ""})
    path = os.path.join(args.out_dir, f"{tag}.csv")
    mine = {(r["algo"], str(r["seed"])) for r in rows}  # other seeds' rows stay
    kept = [r for r in csv.DictReader(open(path))] if os.path.exists(path) else []
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([r for r in kept if (r["algo"], r["seed"]) not in mine] + rows)
    print("algo | seconds | steps | training-episode return (last 10) | last eval return")
    for r in rows:
        print(f"{r['algo']} | {r['wall_seconds']} | {r['steps']:,} | {r['train_return']:,.0f} | {r['eval_return']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
