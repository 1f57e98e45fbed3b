"""Training speed of a MuJoCo script against raw `env.step`, both measured in one process on one core.

    python benchmarks/mujoco_speed.py                            # GRPO, HalfCheetah-v4, default N x G x H
    python benchmarks/mujoco_speed.py --script pair_grpo_hard_mujoco.py --profile
    python benchmarks/mujoco_speed.py --set num_minibatches=2   # fewer, larger optimizer steps

Raw: steps per second of one gymnasium environment (`env.step` with random actions, resets at
episode ends), best of three 5,000-step timings, taken before and again after training (the
ratio is to their mean; where the two differ much, the machine's speed moved and the ratio is
unsure); and of N*G unwrapped environments stepped in turn (the branches: this design's own
limit). Training: the script's own `charts/SPS` (training time only, evaluation excluded) over
`--total-timesteps`; and, immune to the drift, that SPS against the rate the simulator itself
stepped at during that training (every `step` call timed; its final evaluation's 1,000 steps
included). `--profile` prints where one run's time goes; `--blocks` times the
iteration's parts (the rollout and its simulator steps, the policy's forwards, backward, clipping,
optimizer steps) in milliseconds per iteration; `--interleave K` also times raw `env.step` inside the
run, 2,000 steps before every K-th iteration (left out of its training SPS, not of the script's or
the blocks' training time), so both rates meet the same slow spells of a drifting machine.
`--replay` records every 10th iteration's branches (the states restored into them and the
actions they step) and, after training, steps the same actions from the same states in one bare
simulator, timing only `step`: raw `env.step` on the training's own trajectories, whose physics
(contacts, how hard the solver works) can cost more or less than under random actions.
"""
import argparse
import cProfile
import dataclasses
import importlib
import os
import pstats
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]


def raw_steps_per_second(module, env_id: str, num_envs: int = 1, steps: int = 5000, repeats: int = 3) -> float:
    import numpy as np

    envs = [module.make_mujoco_env(env_id) if num_envs == 1 else module.make_mujoco_env(env_id).unwrapped
            for _ in range(num_envs)]
    for i, env in enumerate(envs):
        env.reset(seed=i)
    actions = np.random.default_rng(0).uniform(-1, 1, (steps, envs[0].action_space.shape[0]))
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for t, a in enumerate(actions):
            env = envs[t % num_envs]
            _, _, terminated, truncated, _ = env.step(a)
            if terminated or truncated:
                env.reset()
        best = max(best, steps / (time.perf_counter() - start))
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--script", default="grpo_baseline_mujoco.py")
    parser.add_argument("--env-id", default="HalfCheetah-v4")
    parser.add_argument("--total-timesteps", type=int, default=100_000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--interleave", type=int, default=0, metavar="K",
                        help="also time 2,000 raw env.step calls before every K-th iteration, inside the run")
    parser.add_argument("--blocks", action="store_true", help="also time the rollout, forwards, backward, clipping "
                        "and optimizer steps (ms per iteration; the timers add about 1 ms)")
    parser.add_argument("--replay", action="store_true", help="also time raw env.step on the training's own "
                        "trajectories: every 10th iteration's branch steps, replayed in one simulator after training")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="other Args fields, e.g. num_minibatches=2 (the shape N x G x H stays the default's)")
    cli = parser.parse_args()
    import numpy as np
    import torch

    torch.set_num_threads(1)
    module = importlib.import_module(cli.script[: -len(".py")])
    args = module.MujocoArgs(env_id=cli.env_id, total_timesteps=cli.total_timesteps, eval_every=10**9,
                             num_eval_episodes=1, output_dir=tempfile.mkdtemp())
    filled = module.with_env_defaults(args)  # every field --set names has a type to cast to here; the fill
    args = module.with_env_defaults(dataclasses.replace(args, **{  # comes after, so num_trunks=8 brings 8 minibatches
        k: v.lower() in ("true", "1") if isinstance(getattr(filled, k), bool) else type(getattr(filled, k))(v)
        for k, v in (item.split("=", 1) for item in cli.set)}))
    raw, branches = (raw_steps_per_second(module, cli.env_id, n) for n in (1, args.num_trunks * args.group_size))
    # Drift-proof: time every simulator step inside the training run too (the bare simulator, no
    # wrappers): what a step costs there, measured at the same moments as the training SPS
    simulator, timed = type(module.make_mujoco_env(cli.env_id).unwrapped), {}
    blocks = {"simulator": (simulator, "step")}
    if cli.blocks:  # where an iteration goes; the policy's forwards run in the rollout and in the update
        blocks.update(rollout=(module, "branched_rollout"), forwards=(torch.nn.Sequential, "forward"),
                      backward=(torch.Tensor, "backward"), clipping=(torch.nn.utils, "clip_grad_norm_"),
                      optimizer=(torch.optim.Adam, "step"))
    originals = {key: getattr(owner, name) for key, (owner, name) in blocks.items()}

    def timer(key):
        def timed_call(*a, **k):
            start = time.perf_counter()
            result = originals[key](*a, **k)
            seconds, calls = timed.get(key, (0.0, 0))
            timed[key] = seconds + time.perf_counter() - start, calls + 1
            return result
        return timed_call

    for key, (owner, name) in blocks.items():
        setattr(owner, name, timer(key))
    # --replay: outside the timer, so recording adds to the training time, not to the simulator's
    recorded, restore, timed_step = {"on": False, "segments": [], "open": {}}, module.restore, simulator.step

    def recording_restore(env, state):
        restore(env, state)
        if recorded["on"]:  # a new segment: this branch steps from here until its next restore
            recorded["segments"].append((state.copy(), []))
            recorded["open"][id(env)] = recorded["segments"][-1][1]

    def recording_step(env, action):
        if recorded["on"] and id(env) in recorded["open"]:  # the branches only, not the evaluation's
            recorded["open"][id(env)].append(np.array(action))
        return timed_step(env, action)

    if cli.replay:
        module.restore, simulator.step = recording_restore, recording_step
    # Raw env.step timed inside the run as well, before every K-th rollout, so the VM's slow spells
    # slow both rates alike; the time it takes leaves the training time, its steps the simulator's
    rollout, interleaved = module.branched_rollout, {"calls": 0, "steps": 0, "seconds": 0.0, "spent": 0.0}

    def interleaved_rollout(*a, **k):
        interleaved["calls"] += 1
        recorded["on"], recorded["open"] = cli.replay and interleaved["calls"] % 10 == 0, {}
        if cli.interleave and (interleaved["calls"] - 1) % cli.interleave == 0:
            kept, start = timed.get("simulator", (0.0, 0)), time.perf_counter()
            interleaved["seconds"] += 2000 / raw_steps_per_second(module, cli.env_id, steps=2000, repeats=1)
            interleaved["steps"] += 2000
            interleaved["spent"] += time.perf_counter() - start  # with making the environment
            timed["simulator"] = kept
        return rollout(*a, **k)

    module.branched_rollout = interleaved_rollout
    profiler = cProfile.Profile() if cli.profile else None
    if profiler:
        profiler.enable()
    summary = module.train_mujoco(args)
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    module.branched_rollout, module.restore = rollout, restore
    for key, (owner, name) in blocks.items():
        setattr(owner, name, originals[key])
    replay_seconds, env = 0.0, module.make_mujoco_env(cli.env_id).unwrapped if cli.replay else None
    for state, actions in recorded["segments"]:  # the recorded branch segments, stepped again in one simulator
        restore(env, state)
        start = time.perf_counter()
        for action in actions:
            env.step(action)
        replay_seconds += time.perf_counter() - start
    after = raw_steps_per_second(module, cli.env_id)  # this machine's speed drifts: bracket the training run
    inside = timed["simulator"][1] / timed["simulator"][0]
    print(f"{cli.script} {cli.env_id}: raw env.step {raw:,.0f} steps/s before training, {after:,.0f} after "
          f"(one environment), {branches:,.0f} ({args.num_trunks * args.group_size} in turn); training "
          f"{summary['SPS']:,.0f} SPS (N={args.num_trunks} x G={args.group_size} x H={args.segment_length}"
          f"{f' + L={args.lookahead}' if args.lookahead else ''}): ratio "
          f"{summary['SPS'] / ((raw + after) / 2):.2f} to one environment (mean of before and after), "
          f"{summary['SPS'] / branches:.2f} to the branches; the simulator stepped at {inside:,.0f} steps/s during "
          f"training: ratio {summary['SPS'] / inside:.2f} to that")
    # the script's own SPS counts the interleaved seconds as training time: leave them out here
    sps = (summary["global_step"] / (summary["train_seconds"] - interleaved["spent"]) if cli.interleave
           else summary["SPS"])
    if cli.interleave:
        rate = interleaved["steps"] / interleaved["seconds"]
        print(f"interleaved: raw env.step {rate:,.0f} steps/s ({interleaved['steps'] // 2000} timings of 2,000 "
              f"steps, one every {cli.interleave} iterations); training without them {sps:,.0f} SPS: ratio "
              f"{sps / rate:.2f}")
    if cli.replay:
        replay_steps = sum(len(actions) for _, actions in recorded["segments"])
        rate = replay_steps / replay_seconds
        print(f"replayed: raw env.step on the training's own trajectories {rate:,.0f} steps/s ({replay_steps:,} "
              f"steps of every 10th iteration's branches, in one simulator); training {sps:,.0f} SPS (without "
              f"interleaved timings): ratio {sps / rate:.2f}; the simulator inside training ran at {inside / rate:.2f} "
              "of that")
    if cli.blocks:
        per_iteration = 1000 / summary["iterations"]
        print(f"ms per iteration: training {summary['train_seconds'] * per_iteration:.1f}; " + ", ".join(
            f"{key} {timed[key][0] * per_iteration:.1f} ({timed[key][1] / summary['iterations']:.0f} calls)"
            for key in blocks))


if __name__ == "__main__":
    main()
