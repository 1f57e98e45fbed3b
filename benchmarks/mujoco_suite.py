"""The MuJoCo suite: every environment x algorithm x seed for 1M environment steps, two jobs at
a time with one torch thread each, then curves and a summary per environment from their
TensorBoard logs.

    pip install -r requirements.txt -r benchmarks/requirements.txt
    python benchmarks/mujoco_suite.py --reuse                 # HalfCheetah, Hopper, Walker2d, InvertedPendulum
    python benchmarks/mujoco_suite.py --envs HalfCheetah-v4 --algos grpo --seeds 1 --tag sweep \
        --variants "H16=" "H32=--segment-length 32"      # name=flags, one label each

Writes, per environment, docs/results/{tag}_curves.csv (algo, seed, tag, global_step, value),
docs/results/{tag}_summary.csv (one row per algo and seed) and docs/results/{tag}.png, where
`{env}` in --tag stands for the environment's short name (halfcheetah, hopper, ...) and algo is
the algorithm's name, with the variant's name in brackets if any. Runs live in
runs/benchmarks/{tag}/{algo}/{seed}; --reuse keeps the finished ones, so a suite accumulates
across sessions, and a tag's CSVs keep the rows of runs that are not in runs/ any more (a fresh
checkout): an invocation replaces only the rows of the runs it summarises. Raw `env.step`
throughput, the physical limit of this design, is measured alone on one core before and after
the runs (best of each three).
"""
import argparse
import csv
import glob
import json
import os
import subprocess
import sys
import time
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALGOS = {  # name -> command prefix; extra flags go through --extra
    "grpo": ["grpo_baseline_mujoco.py"],
    "soft": ["pair_grpo_soft_mujoco.py"],
    "hard": ["pair_grpo_hard_mujoco.py"],  # the paper's pair-shift target
    "hard_group_softmax": ["pair_grpo_hard_mujoco.py", "--target", "group-softmax"],  # our first target (spec 4.3)
    "sb3_ppo": ["benchmarks/sb3_ppo.py"],  # the peer: Stable-Baselines3 PPO, RL Zoo hyperparameters
}
# CleanRL ppo_continuous_action's published training-episode returns at 1M steps (v4 environments)
ANCHORS = {"HalfCheetah-v4": 1443, "Hopper-v4": 2383, "Walker2d-v4": 2288, "InvertedPendulum-v4": None}


def short(env_id: str) -> str:
    return env_id.split("-")[0].lower()


def raw_env_sps(env_id: str, num_envs: int, steps: int) -> float:
    """Unwrapped env.step over num_envs environments in a Python loop, random actions; an environment
    that terminates is reset (timed too), as a fallen robot steps unlike a standing one."""
    import gymnasium as gym
    import mujoco

    mujoco.set_mju_user_warning(lambda msg: None if "settotalmass" in msg else print(msg, file=sys.stderr))
    envs = [gym.make(env_id).unwrapped for _ in range(num_envs)]
    for i, env in enumerate(envs):
        env.reset(seed=i)
    actions = np.random.default_rng(0).uniform(-1, 1, (steps // num_envs + 1, num_envs, envs[0].action_space.shape[0]))
    start = time.perf_counter()
    for t in range(steps // num_envs):
        for i, env in enumerate(envs):
            if env.step(actions[t, i])[2]:
                env.reset()
    return (steps // num_envs) * num_envs / (time.perf_counter() - start)


def previous_raw(summary_csv: str):
    """The raw env.step figure an earlier summary wrote, or None."""
    try:
        return float(next(csv.DictReader(open(summary_csv)))["raw_env_sps"])
    except (OSError, StopIteration, KeyError, ValueError):
        return None


def tb_scalars(run_dir: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=list(ANCHORS), help="gymnasium MuJoCo environment ids")
    parser.add_argument("--algos", nargs="+", default=["grpo", "soft", "hard"], choices=sorted(ALGOS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--total-timesteps", type=int, default=1_000_000)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (at most the number of cores)")
    parser.add_argument("--extra", default="", help="flags added to every run, e.g. '--segment-length 32'")
    parser.add_argument("--variants", nargs="+", default=["="], help="name=flags: each algo runs once per variant")
    parser.add_argument("--tag", default="{env}", help="prefix of the output files; {env}: the environment's short name")
    parser.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "benchmarks"))
    parser.add_argument("--reuse", action="store_true", help="keep finished runs already in --runs-dir, run only the rest")
    parser.add_argument("--summarize-only", action="store_true", help="with --reuse: start nothing, summarize what is done")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "docs", "results"))
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    pattern = args.tag if "{env}" in args.tag or len(args.envs) == 1 else args.tag + "_{env}"
    tags = {env_id: pattern.format(env=short(env_id)) for env_id in args.envs}

    # The physical limit: best of three, before and after the runs (this VM's speed drifts). A summary
    # alone keeps the figure its CSV already holds: a timing taken beside other work would be noise.
    kept = {e: previous_raw(os.path.join(args.out_dir, f"{tags[e]}_summary.csv")) if args.summarize_only else None
            for e in args.envs}
    raw_before = {e: kept[e] or max(raw_env_sps(e, 64, 30_000) for _ in range(3)) for e in args.envs}
    print("raw env.step throughput, one core: " + ", ".join(f"{e} {v:.0f}" for e, v in raw_before.items()), flush=True)

    variants = [v.split("=", 1) for v in args.variants]
    labels = [f"{a}[{name}]" if name else a for a in args.algos for name, _ in variants]
    pending = [(e, f"{a}[{name}]" if name else a, a, flags, s)
               for e in args.envs for a in args.algos for name, flags in variants for s in args.seeds]
    running, finished = [], []
    if args.reuse:  # a run counts as finished once it wrote its wall-clock time
        for job in list(pending):
            out = os.path.join(args.runs_dir, tags[job[0]], job[1], str(job[4]))
            if os.path.exists(os.path.join(out, "wall_seconds.txt")):
                pending.remove(job)
                finished.append((job[0], job[1], job[4], out, float(open(os.path.join(out, "wall_seconds.txt")).read())))
                print(f"reusing {tags[job[0]]} {job[1]} seed {job[4]}", flush=True)
    if args.summarize_only:
        print("not run: " + (", ".join(f"{tags[e]} {label} seed {seed}" for e, label, _, _, seed in pending) or "none"))
        pending = []
    while pending or running:
        while pending and len(running) < args.jobs:
            env_id, label, algo, flags, seed = pending.pop(0)
            out = os.path.join(args.runs_dir, tags[env_id], label, str(seed))
            cmd = [sys.executable, os.path.join(ROOT, ALGOS[algo][0]), *ALGOS[algo][1:], "--env-id", env_id,
                   "--seed", str(seed), "--total-timesteps", str(args.total_timesteps), "--output-dir", out,
                   *([] if algo == "sb3_ppo" else ["--save-model"]), *args.extra.split(), *flags.split()]
            os.makedirs(out, exist_ok=True)
            log = open(os.path.join(out, "stdout.log"), "w")
            print("+ " + " ".join(cmd[1:]), flush=True)
            running.append((env_id, label, seed, out, time.time(),
                            subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
        time.sleep(2)
        for job in list(running):
            env_id, label, seed, out, start, proc = job
            if proc.poll() is not None:
                running.remove(job)
                if proc.returncode:
                    sys.exit(f"error: {env_id} {label} seed {seed} failed; see {out}/stdout.log")
                finished.append((env_id, label, seed, out, time.time() - start))
                with open(os.path.join(out, "wall_seconds.txt"), "w") as f:
                    f.write(f"{time.time() - start:.0f}\n")
                print(f"done {env_id} {label} seed {seed} in {time.time() - start:.0f}s", flush=True)

    table = ["| environment | " + " | ".join(labels) + " | CleanRL PPO (published) |",
             "|---|" + "---|" * (len(labels) + 1)]
    for env_id in [e for e in args.envs if any(f[0] == e for f in finished)]:
        raw = kept[env_id] or max(raw_before[env_id], max(raw_env_sps(env_id, 64, 30_000) for _ in range(3)))
        rows = summarize(env_id, tags[env_id], labels, [f for f in finished if f[0] == env_id], raw, args)
        cells = []
        for label in labels:
            final = [r["final_train_return"] for r in rows if r["algo"] == label]
            cells.append(f"{np.mean(final):,.0f} +- {np.std(final):,.0f}" if final else "")
        table.append(f"| {env_id} | " + " | ".join(cells) + f" | {ANCHORS.get(env_id) or ''} |")
    print("\ntraining-episode return at the end (last 10 episodes), mean +- std over seeds:\n" + "\n".join(table))


def summarize(env_id: str, tag: str, labels: list, finished: list, raw: float, args) -> list:
    """One environment: curves CSV, summary CSV (a row per run), a printed table and the plot."""
    print(f"{env_id}: raw env.step throughput, one core, best before/after: {raw:.0f} steps/s", flush=True)
    curves, rows, anchor = [], [], ANCHORS.get(env_id)
    for _, algo, seed, out, wall in sorted(finished):
        run_dir = max(glob.glob(os.path.join(glob.escape(out), "*", "summary.json")), key=os.path.getmtime)
        summary = json.load(open(run_dir))
        logged = tb_scalars(os.path.dirname(run_dir))
        for tb_tag in ["charts/episodic_return", "eval/episodic_return"]:
            curves += [(algo, seed, tb_tag, step, value) for step, value in logged.get(tb_tag, [])]
        train = logged.get("charts/episodic_return", [])
        evals = logged.get("eval/episodic_return", [])
        reach = next((step for step, value in train if anchor and value >= anchor), "")
        rows.append({"algo": algo, "seed": seed,
                     "final_train_return": np.mean([v for _, v in train[-10:]]) if train else float("nan"),
                     "final_eval_return": np.mean([v for _, v in evals[-3:]]) if evals else float("nan"),
                     # standing still for a whole episode and hopping until a fall can score alike
                     "final_episode_length": np.mean([v for _, v in logged["charts/episodic_length"][-10:]])
                     if "charts/episodic_length" in logged else float("nan"),
                     "steps_to_anchor": reach, "SPS": summary["SPS"], "raw_env_sps": round(raw),
                     "sps_ratio": summary["SPS"] / raw, "wall_seconds": round(wall),
                     # pair methods: the fraction of the teacher's labels that agree with the oracle
                     "label_agreement": np.mean([v for _, v in logged["charts/label_agreement"]])
                     if "charts/label_agreement" in logged else ""})
    # runs/ does not outlive a checkout, the CSVs do: rows of runs not summarised now are kept
    rows_csv, curves_csv = (os.path.join(args.out_dir, f"{tag}_{kind}.csv") for kind in ("summary", "curves"))
    done, fields = {(r["algo"], r["seed"]) for r in rows}, list(rows[0])  # an older CSV may lack a column
    kept = [r for r in (csv.DictReader(open(rows_csv)) if os.path.exists(rows_csv) else [])
            if (r["algo"], int(r["seed"])) not in done]
    if kept:
        print("kept from the CSVs: " + ", ".join(f"{r['algo']} seed {r['seed']}" for r in kept), flush=True)
        rows += [{k: number(v) for k, v in r.items()} for r in kept]
        keep = {(r["algo"], int(r["seed"])) for r in kept}
        curves += [(a, int(sd), t, int(float(st)), float(v))
                   for a, sd, t, st, v in list(csv.reader(open(curves_csv)))[1:] if (a, int(sd)) in keep]
        labels = labels + sorted({r["algo"] for r in kept} - set(labels))
        rows.sort(key=lambda r: (r["algo"], r["seed"]))
    with open(os.path.join(args.out_dir, f"{tag}_curves.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["algo", "seed", "tag", "global_step", "value"])
        writer.writerows(curves)
    with open(os.path.join(args.out_dir, f"{tag}_summary.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.3f}" if isinstance(v, float) else v for k, v in row.items()})
    print("algo | final training-episode return | final eval return | SPS (ratio to raw env.step)")
    for algo in labels:
        mine = [r for r in rows if r["algo"] == algo]
        if mine:
            tr, ev, sps, ratio = ([r[k] for r in mine] for k in ("final_train_return", "final_eval_return", "SPS",
                                                                  "sps_ratio"))
            print(f"{algo} | {np.mean(tr):.0f} +- {np.std(tr):.0f} | {np.mean(ev):.0f} +- {np.std(ev):.0f} | "
                  f"{np.mean(sps):.0f} ({np.mean(ratio):.2f})")
    plot(curves, labels, args.total_timesteps, env_id, os.path.join(args.out_dir, f"{tag}.png"))
    return rows


def number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def plot(curves, algos, total, env_id, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(0, total, 51)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, tag, title in [(axes[0], "charts/episodic_return", "training episodes (CleanRL's meaning)"),
                           (axes[1], "eval/episodic_return", "evaluation, mean action")]:
        for algo in algos:
            per_seed = []
            for seed in sorted({c[1] for c in curves if c[0] == algo}):
                pts = [(s, v) for a, sd, t, s, v in curves if a == algo and sd == seed and t == tag]
                if len(pts) > 1:
                    steps, values = zip(*pts)
                    per_seed.append(np.interp(grid, steps, values, left=np.nan, right=values[-1]))
            if per_seed:
                with warnings.catch_warnings():  # grid points before every seed's first episode stay NaN
                    warnings.simplefilter("ignore", RuntimeWarning)
                    mean, std = np.nanmean(per_seed, 0), np.nanstd(per_seed, 0)
                ax.plot(grid, mean, label=f"{algo} ({len(per_seed)} seeds)")
                ax.fill_between(grid, mean - std, mean + std, alpha=0.2)
        if ANCHORS.get(env_id):
            ax.axhline(ANCHORS[env_id], color="gray", linestyle="--", linewidth=1,
                       label=f"CleanRL PPO at 1M ({ANCHORS[env_id]:,})")
        ax.set_title(title)
        ax.set_xlabel("environment steps")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("episodic return")
    axes[0].legend()
    fig.suptitle(env_id)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
