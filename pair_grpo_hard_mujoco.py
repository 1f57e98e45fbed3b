"""Hard-Pair-GRPO for MuJoCo: an explicit target over each group of branches, fitted under a trust region.

The paper's definition, read over a group as docs/formulation.md (sections 4.1 and 6)
writes it down: restore each trunk's simulator state into G branches and run each H
steps; a teacher labels every pair of branches; each labelled pair moves delta_t / (G-1)
of probability from its rejected to its preferred branch, so the target is
q_i = 1/G + delta_t * A_i (A: net win rate), delta_t = delta_0 * gamma^t; the policy's
group-restricted probabilities of the segments are fitted by KL(p_theta || q), no
clipping, with a hinge alpha * max(K_old - trust_region_kl, 0) on the per-step
KL(pi_old || pi_theta), exact for diagonal Gaussians. No critic. `--target group-softmax`:
our earlier MPO-style target (section 4.2) under a dual-ascent multiplier.

    python pair_grpo_hard_mujoco.py                        # HalfCheetah-v4, 1M steps
    python pair_grpo_hard_mujoco.py --teacher mistake --teacher-flip-prob 0.1
"""
import copy
import json
import math
import multiprocessing
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Literal, Optional

import numpy as np
import torch
import tyro
from gymnasium.wrappers.utils import RunningMeanStd
from torch.utils.tensorboard import SummaryWriter


@dataclass
class MujocoArgs:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = False
    """use CUDA when available (a 64-unit MLP on a few dozen states runs faster on the CPU)"""
    torch_threads: int = 1
    """torch threads; one is fastest for these small batches"""
    output_dir: str = "runs"
    """TensorBoard logs and saved models go to `{output_dir}/{run_name}`"""
    save_model: bool = False
    """whether to save the policy and observation statistics into the run folder"""
    capture_video: bool = False
    """record the final evaluation's first episode to `{output_dir}/{run_name}/videos` (headless: MUJOCO_GL=egl)"""
    checkpoint_every: int = 0
    """write a resumable checkpoint every this many iterations (0: only when a signal or faults stop the run)"""
    resume: Optional[str] = None
    """a checkpoint folder (or the run folder holding one) whose run to continue"""
    max_nonfinite_steps: int = 3
    """a non-finite loss or gradient skips its optimizer step; this many in a row stop the run"""

    # environment and branched rollouts
    env_id: str = "HalfCheetah-v4"
    """the id of a gymnasium MuJoCo environment (any with `set_state`)"""
    total_timesteps: int = 1_000_000
    """total simulated environment steps, every branch step counted"""
    num_trunks: Optional[int] = None
    """N: trunk environments, each the root of one group per iteration (unset: ENV_DEFAULTS)"""
    group_size: int = 8
    """G: branches restored from each trunk's state"""
    segment_length: Optional[int] = None
    """H: steps each branch runs (unset: ENV_DEFAULTS; the episode length gives whole-episode groups)"""
    lookahead: Optional[int] = None
    """L: further steps each branch runs after its H, scored but left out of the loss (unset: ENV_DEFAULTS)"""
    num_workers: int = 0
    """step the N*G branches in this many worker processes, a slice each (0: all in this process)"""
    log_std_init: Optional[float] = None
    """initial log-std of the Gaussian policy (unset: ENV_DEFAULTS; CleanRL: 0; the RL Zoo's HalfCheetah PPO: -2)"""
    hidden_size: int = 64
    """width of the policy's two hidden layers (CleanRL: 64; the RL Zoo's HalfCheetah PPO: 256)"""
    activation: Literal["tanh", "relu"] = "tanh"
    """hidden-layer activation (CleanRL: tanh; the RL Zoo's HalfCheetah PPO: ReLU)"""

    # algorithm
    learning_rate: float = 3e-4
    """Adam learning rate"""
    anneal_lr: Optional[bool] = None
    """linearly anneal the learning rate to 0 (unset: ENV_DEFAULTS; CleanRL: True)"""
    update_epochs: int = 5
    """passes over each rollout batch"""
    num_minibatches: Optional[int] = None
    """minibatches per pass; each holds whole groups and makes one optimizer step (unset: N, a group each)"""
    target: Literal["pair-shift", "group-softmax"] = "pair-shift"
    """`pair-shift`: the paper's 1/G + delta_t A, reverse-KL fit, hinge; `group-softmax`: softmax(A/eta), dual ascent"""
    delta0: float = 0.1
    """pair-shift: the step delta_0, the mass a branch moves per unit of net win rate (below 1/G)"""
    delta_decay: float = 0.999
    """pair-shift: gamma in delta_t = delta_0 * gamma^t, t the iteration from 0 (1: fixed delta)"""
    alpha: float = 0.5
    """pair-shift: weight of the hinge alpha * max(K_old - trust_region_kl, 0) (0: no trust region)"""
    trust_region_kl: float = 0.01
    """pair-shift: the per-step KL(pi_old || pi_theta) the hinge lets through for free"""
    eps_q: float = 0.3
    """group-softmax E-step: KL(q || uniform) budget of the target over each group"""
    eps_pi: float = 0.02
    """group-softmax M-step trust region: target per-step KL(pi_old || pi_theta)"""
    alpha_init: float = 1.0
    """group-softmax: initial Lagrange multiplier of the trust region"""
    lr_alpha: float = 1.0
    """group-softmax dual ascent: alpha <- max(0, alpha + lr_alpha * (K_old - eps_pi)) after each optimizer step"""
    beta: float = 0.0
    """weight of the k3 KL penalty to the anchor policy (none by default)"""
    kl_anchor: Literal["old", "ref"] = "old"
    """the beta penalty's anchor: `old` the batch's sampling policy (the paper), `ref` the initial policy"""
    loss_aggregation: Literal["sequence", "token"] = "sequence"
    """`sequence`: mean over segments of step means; `token`: mean over all steps"""
    max_grad_norm: float = 0.5
    """gradient clipping norm"""

    # teacher: turns the hidden segment returns into labels, the only thing the learner sees
    teacher: Literal["oracle", "stochastic", "mistake", "equal", "myopic"] = "oracle"
    """simulated teacher (B-Pref): exact, Bradley-Terry noisy, flipped, ties below a margin, or recent-weighted"""
    teacher_tau: float = 1.0
    """`stochastic`: P(i preferred to j) = sigmoid((u_i - u_j) / tau)"""
    teacher_flip_prob: float = 0.1
    """`mistake`: probability that a label is flipped"""
    teacher_tie_margin: float = 0.5
    """`equal`: label 1/2 when |u_i - u_j| is below this margin"""
    teacher_gamma: float = 0.9
    """`myopic`: the teacher scores sum_t gamma^(L-1-t) r_t, weighting the segment's end most"""

    # evaluation
    eval_every: int = 25
    """evaluate (and print a progress line) every this many iterations, and after the last"""
    num_eval_episodes: int = 3
    """full episodes from fresh resets with the mean action, per evaluation"""


# Per-environment defaults for the fields left unset (docs/results.md, the MuJoCo suite). A branch learns
# from 128 steps and is scored over 192 more (the look-ahead): where the body can fall, a 16-step branch
# scores like its siblings until it falls 30 steps later, and whole episodes rank standing still above
# hopping and falling. This row serves every robot without its own: it beat 16-step segments on Humanoid,
# InvertedDoublePendulum and Swimmer, and drew on Reacher and Pusher. Hopper looks 384 steps ahead. Ant keeps
# 16-step segments: its noisy steps cost more than its alive bonus, so a long score favours an early fall;
# InvertedPendulum keeps them too (999 of 1,000), and HumanoidStandup, which cannot fall and is paid its
# torso's height at every step, so 16 steps show a branch's worth and their many updates learn faster. The
# cheetah turns over and learns to run on its back unless the noise is small and a segment long enough to
# show what a tumble costs; there, 4 trunks (twice the updates per step) learn faster than 8. A constant
# learning rate beats one annealed to 0 on the cheetah, Hopper and Walker2d: the return still climbs at 1M steps.
LONG_SCORE = dict(num_trunks=4, segment_length=128, lookahead=192, log_std_init=-0.5, anneal_lr=False)
SHORT = dict(num_trunks=8, segment_length=16, lookahead=0, log_std_init=0.0, anneal_lr=True)
ENV_DEFAULTS = {"*": LONG_SCORE, "Hopper": dict(LONG_SCORE, lookahead=384),
                "Ant": SHORT, "InvertedPendulum": SHORT, "HumanoidStandup": SHORT,
                "HalfCheetah": dict(num_trunks=4, segment_length=64, lookahead=0, log_std_init=-3.0, anneal_lr=False)}

def with_env_defaults(args):
    defaults = ENV_DEFAULTS.get(args.env_id.split("-v")[0], ENV_DEFAULTS["*"])  # a robot's row serves v4 and v5
    args = replace(args, **{k: v for k, v in defaults.items() if getattr(args, k) is None})
    return replace(args, num_minibatches=args.num_trunks if args.num_minibatches is None else args.num_minibatches)

# ----------------------------------------------------------------------------- the algorithm: teacher, target, fit
def teacher_labels(scores: torch.Tensor, kind: str, tau: float = 0.05, flip_prob: float = 0.1,
                   tie_margin: float = 0.02, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Hidden scores [groups, G] -> labels z [groups, G, G], z_ij = 1 when y_i is preferred.
    One query per pair i < j; z_ji = 1 - z_ij and z_ii = 1/2, so labels are antisymmetric."""
    diff = scores[:, :, None] - scores[:, None, :]
    oracle = (diff > 0).float() + 0.5 * (diff == 0).float()
    if kind == "oracle":
        labels = oracle
    elif kind == "stochastic":  # Bradley-Terry: a noisy teacher that still prefers the better one
        labels = torch.bernoulli(torch.sigmoid(diff / tau), generator=generator)
    elif kind == "mistake":
        labels = torch.where(torch.rand(diff.shape, generator=generator) < flip_prob, 1 - oracle, oracle)
    elif kind == "equal":  # cannot tell close ones apart
        labels = torch.where(diff.abs() < tie_margin, torch.full_like(oracle, 0.5), oracle)
    else:
        fail(f"unknown teacher {kind!r}")
    upper = torch.ones(diff.shape[1:], dtype=torch.bool).triu(diagonal=1)
    labels = torch.where(upper, labels, 1 - labels.transpose(1, 2))
    labels.diagonal(dim1=1, dim2=2).fill_(0.5)
    return labels

def label_agreement(labels: torch.Tensor, scores: torch.Tensor) -> float:
    """Fraction of the queried pairs (i < j) whose label equals the oracle's."""
    upper = torch.ones(labels.shape[1:], dtype=torch.bool).triu(diagonal=1)
    return (labels == teacher_labels(scores, "oracle"))[:, upper].float().mean().item()

def myopic_scores(rewards: torch.Tensor, lengths: torch.Tensor, gamma: float) -> torch.Tensor:
    """B-Pref's myopic teacher: step t of a length-L segment weighs gamma^(L-1-t)."""
    age = lengths[:, None] - 1 - torch.arange(rewards.shape[1], device=rewards.device)
    return (rewards * torch.where(age >= 0, gamma ** age.clamp(min=0).double(), 0.0)).sum(1)

def net_win_rate(labels: torch.Tensor, scale_by_std: bool = False) -> torch.Tensor:
    """labels [groups, G, G] -> A_i = (1/(G-1)) sum_{j != i} (2 z_ij - 1), in [-1, 1], summing to 0."""
    advantages = (2 * labels - 1).sum(dim=2) / (labels.shape[1] - 1)  # z_ii = 1/2 adds nothing
    return advantages / (advantages.std(dim=1, keepdim=True) + 1e-4) if scale_by_std else advantages

def pair_shift_target(advantages: torch.Tensor, delta: float) -> torch.Tensor:
    """The paper's target q_i = 1/G + delta * A_i: every labelled pair moves delta / (G-1) of mass from
    its rejected to its preferred member, starting from the group's uniform sampling distribution.
    A response that wins as often as it loses keeps 1/G; positive whenever delta < 1/G."""
    return 1.0 / advantages.shape[1] + delta * advantages

def reverse_kl_fit(q: torch.Tensor, log_ratios: torch.Tensor) -> torch.Tensor:
    """Per group KL(p_theta || q), p_theta = softmax(log_ratios): the paper's direction. It stops pulling
    once p_theta = q, so delta_t bounds how far one batch moves the group."""
    log_p = torch.log_softmax(log_ratios, dim=1)
    return (log_p.exp() * (log_p - torch.log(q))).sum(1)

def target_distribution(advantages: torch.Tensor, eps_q: float, steps: int = 40) -> tuple:
    """group-softmax: q = softmax(A / eta) per group, eta the smallest temperature with KL(q || uniform)
    <= eps_q, the best re-weighting of the group within that ball. Bisection in log eta, all groups at
    once. A group whose advantages are all equal carries no signal: q = uniform, eta = inf."""
    A, G = advantages.double(), advantages.shape[1]
    lo, hi = torch.full(A.shape[:1], -12.0, dtype=torch.float64), torch.full(A.shape[:1], 12.0, dtype=torch.float64)
    for _ in range(steps):  # KL(q || u) falls as eta grows
        mid = (lo + hi) / 2
        log_q = torch.log_softmax(A / mid.exp()[:, None], dim=1)
        too_sharp = (log_q.exp() * (log_q + math.log(G))).sum(1) > eps_q
        lo, hi = torch.where(too_sharp, mid, lo), torch.where(too_sharp, hi, mid)
    flat = (A.max(1).values - A.min(1).values) == 0
    q = torch.where(flat[:, None], torch.full_like(A, 1.0 / G), torch.softmax(A / hi.exp()[:, None], dim=1))
    return q.float(), torch.where(flat, torch.full_like(hi, math.inf), hi.exp()).float()

def sequence_log_ratios(logp, old_logp, mask) -> torch.Tensor:
    """l_i = (1/T_i) sum_t (log pi_theta - log pi_old): the length-normalised sequence log-ratio."""
    return ((logp - old_logp) * mask).sum(1) / mask.sum(1).clamp(min=1)

def kl_to_target(q: torch.Tensor, log_ratios: torch.Tensor) -> torch.Tensor:
    """group-softmax: per group KL(q || p_theta), p_theta = softmax(log_ratios): 0 once the group matches q."""
    return (torch.xlogy(q, q) - q * torch.log_softmax(log_ratios, dim=1)).sum(1)

def gaussian_kl(old_mean, old_std, mean, std) -> torch.Tensor:
    """Exact per-step KL(pi_old || pi_theta) between diagonal Gaussians, summed over action dims."""
    return (torch.log(std / old_std) + (old_std**2 + (old_mean - mean) ** 2) / (2 * std**2) - 0.5).sum(-1)

def dual_ascent(alpha: float, k_old: float, eps_pi: float, lr_alpha: float) -> float:
    """group-softmax: projected dual ascent, tighter when the policy moved more than eps_pi, looser when less."""
    return max(0.0, alpha + lr_alpha * (k_old - eps_pi))

def k3_kl(logp, ref_logp) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref) on tokens sampled from pi_theta."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1

def loss_weights(mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Per-token weights whose weighted sum is the minibatch's aggregate; micro-batches then sum exactly."""
    if aggregation == "sequence":  # mean over sequences of each sequence's token mean
        return mask / mask.sum(1, keepdim=True).clamp(min=1) / mask.shape[0]
    return mask / mask.sum().clamp(min=1)

# ----------------------------------------------------------------------------- plumbing: errors, survival
def fail(message: str):
    """Bad input ends the run with one line, never a library stack trace."""
    raise SystemExit(f"error: {message}")

def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"

def check(conditions: list):
    """Argument checks as a table of (holds, message): the first that fails ends the run."""
    for holds, message in conditions:
        if not holds:
            fail(message)

def seed_everything(seed: int, deterministic: bool):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic

STOP = {"signum": 0}

def on_signal(signum, frame):
    """SIGINT/SIGTERM: checkpoint after the current iteration and exit; a second signal stops at once."""
    if STOP["signum"]:
        raise KeyboardInterrupt
    STOP["signum"] = signum
    print(f"{signal.Signals(signum).name}: stopping with a checkpoint after this iteration (again: stop now)",
          flush=True)

# A resumed run must be the run it continues: these may change, nothing else may.
RESUMABLE_ARGS = {"resume", "checkpoint_every", "num_iterations", "total_timesteps", "eval_every", "output_dir",
                  "cuda", "micro_batch_size", "gradient_checkpointing", "save_model", "max_nonfinite_steps"}

def save_checkpoint(folder: str, state: dict, own: Optional[dict] = None) -> str:
    """One file, `state.pt`: the run's state and every rank's own state and random streams. Rank 0
    writes it under a temporary name and renames it, so a kill mid-write leaves the old one."""
    own = {**(own or {}), "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    ranks, dist = [own], torch.distributed.is_initialized()
    if dist:
        torch.distributed.all_gather_object(ranks := [None] * torch.distributed.get_world_size(), own)
    if not dist or torch.distributed.get_rank() == 0:
        os.makedirs(folder, exist_ok=True)
        torch.save({**state, "ranks": ranks}, os.path.join(folder, "state.pt.tmp"))
        os.replace(os.path.join(folder, "state.pt.tmp"), os.path.join(folder, "state.pt"))
    if dist:
        torch.distributed.barrier()
    return folder

def load_checkpoint(path: str, args, world: int) -> tuple:
    """(state, this rank's own state, run folder), this rank's random streams restored. The file
    holds numpy states, hence weights_only=False: load only checkpoints you wrote."""
    folder = path if os.path.isfile(os.path.join(path, "state.pt")) else os.path.join(path, "checkpoint")
    check([(os.path.isfile(os.path.join(folder, "state.pt")),
            f"--resume {path!r}: no checkpoint there (expected state.pt in it or in its checkpoint/ folder)")])
    state = torch.load(os.path.join(folder, "state.pt"), weights_only=False)
    differ = [k for k, v in asdict(args).items() if k not in RESUMABLE_ARGS and state["args"].get(k) != v]
    check([(not differ, f"--resume {path!r}: the run used different " + ", ".join(
        f"--{k.replace('_', '-')} {state['args'].get(k)!r}" for k in differ) + "; pass the same values"),
           (len(state["ranks"]) == world, f"--resume {path!r}: the run had {len(state['ranks'])} ranks; "
            f"launch it with {len(state['ranks'])}, not {world}")])
    own = state["ranks"][torch.distributed.get_rank() if torch.distributed.is_initialized() else 0]
    random.setstate(own["python"])
    np.random.set_state(own["numpy"])
    torch.set_rng_state(own["torch"])
    if own["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(own["cuda"])
    return state, own, os.path.dirname(os.path.abspath(folder))

def validate_mujoco_args(args: MujocoArgs):
    at_least_one = ["num_trunks", "segment_length", "update_epochs", "num_minibatches", "eval_every",
                    "num_eval_episodes", "total_timesteps", "torch_threads", "max_nonfinite_steps", "hidden_size"]
    check([(args.group_size >= 2, f"--group-size must be at least 2 (got {args.group_size}): "
             "a group of one has no comparison")]
          + [(getattr(args, k) >= 1, f"--{k.replace('_', '-')} must be at least 1 (got {getattr(args, k)})")
             for k in at_least_one])
    check([(args.checkpoint_every >= 0, f"--checkpoint-every must be 0 (off) or positive "
            f"(got {args.checkpoint_every})"),
           (args.learning_rate > 0 and args.max_grad_norm > 0, f"--learning-rate and --max-grad-norm must be "
            f"positive (got {args.learning_rate}, {args.max_grad_norm})"),
           (bool(np.isfinite(args.log_std_init)), f"--log-std-init must be finite (got {args.log_std_init})"),
           (args.lookahead >= 0, f"--lookahead must be 0 (off) or positive (got {args.lookahead})"),
           (0 <= args.num_workers <= args.num_trunks * args.group_size, f"--num-workers must lie in [0, N*G = "
            f"{args.num_trunks * args.group_size}] (got {args.num_workers})"),
           (args.num_trunks % args.num_minibatches == 0, f"--num-minibatches {args.num_minibatches} must divide "
            f"--num-trunks {args.num_trunks} (minibatches hold whole groups)"),
           (args.teacher_tau > 0 and 0 <= args.teacher_flip_prob <= 1 and args.teacher_tie_margin >= 0
            and 0 < args.teacher_gamma <= 1, "--teacher-tau must be positive, --teacher-flip-prob in [0, 1], "
            "--teacher-tie-margin non-negative, --teacher-gamma in (0, 1]"),
           (args.update_epochs * args.num_minibatches >= 2, "--update-epochs x --num-minibatches must be at least 2: "
            "at theta_old the fit and the trust region have no gradient"),
           (args.eps_q > 0 and args.eps_pi > 0 and all(x >= 0 for x in (args.alpha_init, args.lr_alpha, args.beta)),
            "--eps-q and --eps-pi must be positive; --alpha-init, --lr-alpha and --beta non-negative"),
           (args.target != "pair-shift" or 0 < args.delta0 < 1 / args.group_size, f"--delta0 must lie in (0, 1/G) = "
            f"(0, {1 / args.group_size:.4g}) for --group-size {args.group_size} (got {args.delta0}): the target "
            "1/G + delta_t A_i must stay positive"),
           (0 < args.delta_decay <= 1 and all(x >= 0 for x in (args.alpha, args.trust_region_kl)),
            "--delta-decay must lie in (0, 1]; --alpha and --trust-region-kl must be non-negative")])
    try:  # fail now, not after the models load: every run folder goes in here
        os.makedirs(args.output_dir, exist_ok=True)
        check([(os.access(args.output_dir, os.W_OK), f"--output-dir {args.output_dir!r}: not writable")])
    except OSError as exc:
        fail(f"--output-dir {args.output_dir!r}: cannot create it ({first_line(exc)})")

# ----------------------------------------------------------------------------- policy
def normalize(obs_rms: RunningMeanStd, x: np.ndarray) -> np.ndarray:
    """Observations scaled by statistics shared by all branches, frozen within an iteration."""
    return np.clip((x - obs_rms.mean) / np.sqrt(obs_rms.var + 1e-8), -10.0, 10.0).astype(np.float32)

def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer

class GaussianPolicy(torch.nn.Module):
    """Diagonal Gaussian with a state-independent log-std (CleanRL's continuous PPO actor)."""

    def __init__(self, obs_dim: int, act_dim: int, log_std_init: float = 0.0, hidden: int = 64, activation="tanh"):
        super().__init__()
        act = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}[activation]
        self.mean = torch.nn.Sequential(
            layer_init(torch.nn.Linear(obs_dim, hidden)), act(),
            layer_init(torch.nn.Linear(hidden, hidden)), act(),
            layer_init(torch.nn.Linear(hidden, act_dim), std=0.01))
        self.log_std = torch.nn.Parameter(torch.full((act_dim,), log_std_init))

    def forward(self, obs: torch.Tensor) -> torch.distributions.Normal:
        mean = self.mean(obs)
        # no argument checks: they cost ~6% of an optimizer step and std = exp(.) is positive anyway
        return torch.distributions.Normal(mean, self.log_std.exp().expand_as(mean), validate_args=False)

# ----------------------------------------------------------------------------- branched rollouts
def make_mujoco_env(env_id: str, **kwargs):
    import gymnasium as gym
    import mujoco

    # MuJoCo 4 warns at every compile that the v4 XMLs use `settotalmass`: with N*G
    # branches that is dozens of identical lines. Every other MuJoCo warning still prints.
    mujoco.set_mju_user_warning(
        lambda msg: None if "settotalmass" in msg else print(f"MuJoCo warning: {msg}", file=sys.stderr))
    try:
        env = gym.make(env_id, **kwargs)
    except Exception as exc:
        fail(f"--env-id {env_id!r}: could not make the environment ({first_line(exc)})")
    check([(hasattr(env.unwrapped, "set_state") and hasattr(env.unwrapped, "data"),
            f"--env-id {env_id!r} is not a MuJoCo environment with set_state: branches cannot be restored")])
    return env

def snapshot(env) -> np.ndarray:
    """MuJoCo's integration state: qpos and qvel, and also activations and the solver's warm
    start, without which restored branches drift apart by ~1e-15 per contact-rich step."""
    import mujoco

    state = np.empty(mujoco.mj_stateSize(env.unwrapped.model, mujoco.mjtState.mjSTATE_INTEGRATION))
    mujoco.mj_getState(env.unwrapped.model, env.unwrapped.data, state, mujoco.mjtState.mjSTATE_INTEGRATION)
    return state

def restore(env, state: np.ndarray):
    import mujoco

    mujoco.mj_setState(env.unwrapped.model, env.unwrapped.data, state, mujoco.mjtState.mjSTATE_INTEGRATION)
    mujoco.mj_forward(env.unwrapped.model, env.unwrapped.data)

def branch_call(envs: list, method: str, arg):
    """One call on a slice of the branches: `restore` their states, `step` (actions, active) them,
    or `snapshot` some. Inactive branches do not step; their rows of (obs, rewards, terminated) are 0."""
    if method == "restore":
        return [restore(env, state) for env, state in zip(envs, arg)]
    if method == "snapshot":
        return [snapshot(envs[i]) for i in arg]
    (actions, active), B = arg, len(envs)
    obs, rewards, terminated = np.zeros((B, envs[0].observation_space.shape[0])), np.zeros(B), np.zeros(B, dtype=bool)
    for i in np.flatnonzero(active):
        obs[i], rewards[i], terminated[i], _, _ = envs[i].step(actions[i])
    return obs, rewards, terminated

def make_branches(env_id: str, num: int, seed: int) -> list:
    """Unwrapped simulators: the trunk keeps the episode clock."""
    envs = [make_mujoco_env(env_id).unwrapped for _ in range(num)]
    for i, env in enumerate(envs):
        env.reset(seed=seed + i)
    return envs

def branch_worker(conn, env_id: str, num: int, seed: int):
    """A worker process: owns a slice of the branches and runs the calls it is sent until None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    envs = make_branches(env_id, num, seed)
    for method, arg in iter(conn.recv, None):
        conn.send(branch_call(envs, method, arg))

class Branches:
    """The N*G branch simulators, stepped in this process or split in contiguous slices over
    `num_workers` processes, so several cores step them at once (one message per worker per call;
    the results are identical). `envs` steps given simulators in this process."""

    def __init__(self, env_id: str, num: int, seed: int, num_workers: int = 0, envs: Optional[list] = None):
        self.slices, self.conns = np.array_split(np.arange(num), max(num_workers, 1)), []
        self.envs = envs or ([] if num_workers else make_branches(env_id, num, seed))
        self.action_space = (self.envs[0] if self.envs else make_mujoco_env(env_id)).action_space
        context = multiprocessing.get_context("fork")  # workers never touch torch
        for part in self.slices if num_workers else []:
            conn, child = context.Pipe()
            context.Process(target=branch_worker, args=(child, env_id, len(part), seed + int(part[0])),
                            daemon=True).start()
            self.conns.append(conn)

    def call(self, method: str, args_per_slice: list) -> list:
        if not self.conns:
            return [branch_call(self.envs, method, args_per_slice[0])]
        for conn, arg in zip(self.conns, args_per_slice):
            conn.send((method, arg))
        try:
            return [conn.recv() for conn in self.conns]
        except EOFError:
            fail("a branch worker process died (see its error above); rerun with --num-workers 0 to see it here")

    def restore(self, states: list):
        self.call("restore", [[states[i] for i in part] for part in self.slices])

    def step(self, actions: np.ndarray, active: np.ndarray) -> tuple:
        return tuple(np.concatenate(c) for c in zip(*self.call("step", [(actions[p], active[p]) for p in self.slices])))

    def snapshot(self, indices: list) -> list:
        """The states of the given branches (in ascending order), one message per worker."""
        parts = self.call("snapshot", [[i - part[0] for i in indices if part[0] <= i <= part[-1]]
                                       for part in self.slices])
        return [state for part in parts for state in part]

    def close(self):
        for conn in self.conns:
            conn.send(None)

@torch.no_grad()
def branched_rollout(policy, branches, trunk_states, trunk_obs, steps_left, obs_rms, args, device) -> dict:
    """Restore each trunk's state into its G branches and step all N*G of them H steps, then L
    look-ahead steps that count in a branch's score, not in the loss. A branch stops at termination
    or at its trunk's time limit; later steps are masked. The trunk goes on from step H."""
    G, H, L, B = args.group_size, args.segment_length, args.lookahead, len(trunk_states) * args.group_size
    branches.restore([trunk_states[i // G] for i in range(B)])
    obs, limit = np.repeat(trunk_obs, G, axis=0), np.repeat(np.minimum(steps_left, H + L), G)
    raw_obs = np.zeros((B, H, obs.shape[1]))  # the loss's steps; the look-ahead keeps only rewards and mask
    actions = np.zeros((B, H, branches.action_space.shape[0]), dtype=np.float32)
    rewards, mask, std = np.zeros((B, H + L)), np.zeros((B, H + L), np.float32), policy.log_std.exp()
    terminated, low, high = np.zeros(B, dtype=bool), branches.action_space.low, branches.action_space.high
    trunk_next = None
    for t in range(H + L):
        if t == H:  # where the trunk goes on; the look-ahead only scores the branch
            trunk_next = branches.snapshot(list(range(B))), obs.copy(), terminated.copy()
        active = ~terminated & (t < limit)
        if not active.any():
            break
        # policy(obs).sample()'s very draw, without a distribution object per step: the rollout only
        # samples (the unclipped action, clipping lives in the env); its log-probs come in one batch later
        mean = policy.mean(torch.as_tensor(normalize(obs_rms, obs), device=device))
        mask[:, t], sampled = active, (mean + std * torch.randn_like(mean)).cpu().numpy()
        if t < H:
            raw_obs[active, t], actions[active, t] = obs[active], sampled[active]
        step_obs, step_rewards, step_terminated = branches.step(np.clip(sampled, low, high), active)
        obs[active], rewards[active, t] = step_obs[active], step_rewards[active]
        terminated[active] = step_terminated[active]
    states, end_obs, ended = trunk_next or (branches.snapshot(list(range(B))), obs, terminated)
    lengths, segment_lengths = mask.sum(1).astype(int), mask[:, :H].sum(1).astype(int)
    T = segment_lengths.max()  # cut the steps no branch reached: long H on a falling robot is mostly padding
    return {"raw_obs": raw_obs[:, :T], "actions": actions[:, :T], "mask": mask[:, :T],
            "rewards": rewards[:, :lengths.max()], "scores": rewards.sum(1), "lengths": lengths, "states": states,
            "end_obs": end_obs, "terminated": ended, "segment_lengths": segment_lengths,
            "segment_returns": rewards[:, :H].sum(1)}

def check_video(env_id: str):
    """--capture-video fails at the start, not after the whole run: gymnasium's RecordVideo
    writes with moviepy, and a MuJoCo renderer must draw a frame (headless: MUJOCO_GL=egl or osmesa)."""
    try:
        import moviepy  # noqa: F401

        env = make_mujoco_env(env_id, render_mode="rgb_array")
        env.reset(seed=0)
        env.render()
        env.close()
    except Exception as exc:
        fail(f"--capture-video: cannot record ({first_line(exc)}); it needs moviepy and a MuJoCo renderer")

@torch.no_grad()
def evaluate_mujoco(policy, obs_rms, args, num_episodes: int, seed: int, device, video_folder=None) -> list:
    """Full episodes from fresh resets, acting with the mean action."""
    import gymnasium as gym

    envs = [make_mujoco_env(args.env_id, render_mode="rgb_array" if video_folder and i == 0 else None)
            for i in range(num_episodes)]
    if video_folder:
        envs[0] = gym.wrappers.RecordVideo(envs[0], video_folder, episode_trigger=lambda _: True)
    obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])
    returns, done = np.zeros(num_episodes), np.zeros(num_episodes, dtype=bool)
    while not done.all():
        mean_action = policy(torch.as_tensor(normalize(obs_rms, obs), device=device)).mean.cpu().numpy()
        for i in np.flatnonzero(~done):
            low, high = envs[i].action_space.low, envs[i].action_space.high
            obs[i], reward, terminated, truncated, _ = envs[i].step(np.clip(mean_action[i], low, high))
            returns[i], done[i] = returns[i] + reward, terminated or truncated
    for env in envs:
        env.close()
    return returns.tolist()

# ----------------------------------------------------------------------------- training
def train_mujoco(args: MujocoArgs) -> dict:
    args = with_env_defaults(args)
    validate_mujoco_args(args)
    seed_everything(args.seed, args.torch_deterministic)
    torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    N, G, H = args.num_trunks, args.group_size, args.segment_length
    pair_shift = args.target == "pair-shift"
    fit_to_target = reverse_kl_fit if pair_shift else kl_to_target
    reset_env = make_mujoco_env(args.env_id)
    if args.capture_video:
        check_video(args.env_id)
    max_steps = reset_env.spec.max_episode_steps or 1000
    branches = Branches(args.env_id, N * G, args.seed + 1, args.num_workers)
    reset_env.reset(seed=args.seed)
    obs_dim, act_dim = reset_env.observation_space.shape[0], reset_env.action_space.shape[0]
    policy = GaussianPolicy(obs_dim, act_dim, args.log_std_init, args.hidden_size, args.activation).to(device)
    reference = copy.deepcopy(policy).requires_grad_(False) if args.beta > 0 and args.kl_anchor == "ref" else None
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.learning_rate, eps=1e-5, foreach=True)
    obs_rms = RunningMeanStd(shape=(obs_dim,))
    teacher_rng = torch.Generator().manual_seed(args.seed)  # the teacher's noise, apart from sampling

    def new_episode():
        obs, _ = reset_env.reset()
        return snapshot(reset_env), obs

    trunk_states, trunk_obs = map(list, zip(*[new_episode() for _ in range(N)]))
    trunk_obs, trunk_t, trunk_return = np.stack(trunk_obs), np.zeros(N, dtype=int), np.zeros(N)
    global_step, iteration, train_time, recent_returns, eval_returns, nonfinite, queries = 0, 0, 0.0, [], [], 0, 0
    alpha = args.alpha_init
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.output_dir, run_name)
    if args.resume:  # everything the next iteration reads: weights, statistics, trunks, clocks, random streams
        state, _, run_dir = load_checkpoint(args.resume, args, 1)
        policy.load_state_dict(state["policy"])
        optimizer.load_state_dict(state["optimizer"])
        if reference is not None:
            reference.load_state_dict(state["reference"])
        obs_rms.mean, obs_rms.var, obs_rms.count = state["obs_rms"]
        reset_env.unwrapped.np_random.bit_generator.state = state["reset_rng"]
        teacher_rng.set_state(state["teacher_rng"])
        (trunk_states, trunk_obs, trunk_t, trunk_return, global_step, iteration, train_time, recent_returns,
         eval_returns, nonfinite, queries, alpha) = (state[k] for k in (
            "trunk_states", "trunk_obs", "trunk_t", "trunk_return", "global_step", "iteration", "train_time",
            "recent_returns", "eval_returns", "nonfinite", "queries", "alpha"))
        run_name = os.path.basename(run_dir)
    writer = SummaryWriter(run_dir, purge_step=global_step + 1 if args.resume else None)
    # a resumed run writes on in its own folder; TensorBoard drops what it logged after the checkpoint
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
        f"|{k}|{v}|" for k, v in vars(args).items()))
    STOP["signum"], nonfinite_in_a_row = 0, 0
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def checkpoint() -> str:
        return save_checkpoint(os.path.join(run_dir, "checkpoint"), {
            "policy": policy.state_dict(), "optimizer": optimizer.state_dict(),
            "reference": reference.state_dict() if reference is not None else None,
            "obs_rms": (obs_rms.mean, obs_rms.var, obs_rms.count),
            "reset_rng": reset_env.unwrapped.np_random.bit_generator.state, "trunk_states": trunk_states,
            "trunk_obs": trunk_obs, "trunk_t": trunk_t, "trunk_return": trunk_return, "global_step": global_step,
            "iteration": iteration, "train_time": train_time, "recent_returns": recent_returns,
            "eval_returns": eval_returns, "nonfinite": nonfinite, "args": asdict(args),
            "teacher_rng": teacher_rng.get_state(), "queries": queries, "alpha": alpha})

    print(f"{run_name}: N={N} trunks x G={G} branches x H={H} + L={args.lookahead} steps per iteration on {device}"
          + (f", resumed at step {global_step}" if args.resume else ""))
    while global_step < args.total_timesteps:
        iteration += 1
        tick = time.time()
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - global_step / args.total_timesteps)

        # ---- rollout: G branches from each trunk's state, H steps, one batched forward per step
        batch = branched_rollout(policy, branches, trunk_states, trunk_obs, max_steps - trunk_t, obs_rms, args, device)
        global_step += int(batch["lengths"].sum())
        obs = torch.as_tensor(normalize(obs_rms, batch["raw_obs"]), device=device)
        obs_rms.update(batch["raw_obs"][batch["mask"] > 0])  # frozen until the next iteration
        actions, mask = (torch.as_tensor(batch[k], device=device) for k in ("actions", "mask"))
        with torch.no_grad():  # pi_old's Gaussians: its log-probs, and the exact trust-region KL
            old_dist = policy(obs)
            old_logp = old_dist.log_prob(actions).sum(-1)
            # the beta penalty's anchor: the batch's sampling policy (the paper) or the initial policy
            anchor_logp = reference(obs).log_prob(actions).sum(-1) if reference is not None else old_logp

        # ---- trunks continue from one uniformly chosen branch; episodes end at termination or the time limit
        chosen = [n * G + np.random.randint(G) for n in range(N)]
        for n, i in enumerate(chosen):
            trunk_return[n] += batch["segment_returns"][i]
            trunk_t[n] += batch["segment_lengths"][i]
            if batch["terminated"][i] or trunk_t[n] >= max_steps:
                writer.add_scalar("charts/episodic_return", trunk_return[n], global_step)
                writer.add_scalar("charts/episodic_length", trunk_t[n], global_step)
                recent_returns = (recent_returns + [trunk_return[n]])[-20:]
                (trunk_states[n], trunk_obs[n]), trunk_t[n], trunk_return[n] = new_episode(), 0, 0.0
            else:
                trunk_states[n], trunk_obs[n] = batch["states"][i], batch["end_obs"][i]

        # ---- teacher: labels for all G(G-1)/2 pairs of each group; the learner sees only these
        scores = torch.as_tensor(batch["scores"], dtype=torch.float32)  # hidden from the learner
        myopic = args.teacher == "myopic"  # the oracle on discounted segment returns
        hidden = myopic_scores(*(torch.as_tensor(batch[k]) for k in ("rewards", "lengths")), args.teacher_gamma).float()
        labels = teacher_labels((hidden if myopic else scores).view(N, G), "oracle" if myopic else args.teacher,
                                args.teacher_tau, args.teacher_flip_prob, args.teacher_tie_margin, teacher_rng)
        queries += N * G * (G - 1) // 2

        # ---- advantages: net win rate within each group; the explicit target over the group it defines
        advantages = net_win_rate(labels)
        delta = args.delta0 * args.delta_decay ** (iteration - 1)  # the dynamic step, t = iteration - 1
        q, eta = ((pair_shift_target(advantages, delta), None) if pair_shift
                  else target_distribution(advantages, args.eps_q))
        q = q.to(device)

        # ---- fit: KL(p_theta || q) + alpha * max(K_old - trust_region_kl, 0) (pair-shift) or
        # KL(q || p_theta) + alpha_t * K_old (group-softmax), + beta * KL to the anchor; minibatches of whole groups
        stats = {"fit": 0.0, "k_old": 0.0, "kl": 0.0, "grad_norm": 0.0, "hinge_active": 0.0}
        minibatches = [g for _ in range(args.update_epochs)
                       for g in np.array_split(np.random.permutation(N), args.num_minibatches)]
        for groups in minibatches:
            rows = torch.from_numpy((groups[:, None] * G + np.arange(G)).reshape(-1)).to(device)
            weights = loss_weights(mask[rows], args.loss_aggregation)
            dist = policy(obs[rows])
            logp = dist.log_prob(actions[rows]).sum(-1)
            ratios = sequence_log_ratios(logp, old_logp[rows], mask[rows]).view(-1, G)
            fit = fit_to_target(q.view(-1)[rows].view(-1, G), ratios).mean()
            k_old = (weights * gaussian_kl(old_dist.mean[rows], old_dist.stddev[rows], dist.mean, dist.stddev)).sum()
            kl = (weights * k3_kl(logp, anchor_logp[rows])).sum() if args.beta > 0 else torch.zeros(())
            # pair-shift: the hinge on K_old; group-softmax: the dual multiplier, held constant inside the loss
            trust = args.alpha * torch.relu(k_old - args.trust_region_kl) if pair_shift else alpha * k_old
            optimizer.zero_grad()
            (fit + trust + args.beta * kl).backward()
            for key, value in zip(stats, (fit.item(), k_old_value := k_old.item(), kl.item())):
                stats[key] += value
            stats["hinge_active"] += float(k_old_value > args.trust_region_kl)
            # A non-finite loss or gradient skips the step instead of poisoning the weights
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
            finite = bool(torch.isfinite(grad_norm))
            nonfinite, nonfinite_in_a_row = nonfinite + (not finite), 0 if finite else nonfinite_in_a_row + 1
            if nonfinite_in_a_row >= args.max_nonfinite_steps:
                fail(f"{nonfinite_in_a_row} non-finite losses or gradients in a row at step {global_step}; "
                     f"checkpoint in {checkpoint()}. Lower --learning-rate, then --resume it")
            stats["grad_norm"] += grad_norm.item() if finite else 0.0  # before clipping
            if finite:
                optimizer.step()
            if finite and not pair_shift:
                alpha = dual_ascent(alpha, k_old_value, args.eps_pi, args.lr_alpha)
        train_time += time.time() - tick

        # ---- logging (SPS counts training time only, evaluation excluded)
        metrics = {"charts/SPS": global_step / train_time, "charts/learning_rate": optimizer.param_groups[0]["lr"],
                   "charts/segment_return": batch["scores"].mean(), "charts/segment_length": batch["lengths"].mean(),
                   "losses/entropy": policy(obs[:1]).entropy().sum(-1).mean().item(),
                   "losses/log_std": policy.log_std.mean().item(), "charts/nonfinite_skipped_steps": nonfinite,
                   "charts/preference_queries": queries,
                   "charts/label_agreement": label_agreement(labels, scores.view(N, G)),
                   "charts/kl_q_uniform": (torch.xlogy(q, q).sum(1) + math.log(G)).mean().item(),
                   "charts/chi2_q_uniform": (G * (q**2).sum(1) - 1).mean().item(),
                   **{f"losses/{k}": v / len(minibatches) for k, v in stats.items() if k != "hinge_active"},
                   **({"charts/delta": delta, "charts/hinge_active": stats["hinge_active"] / len(minibatches)}
                      if pair_shift else {"charts/alpha": alpha, "charts/eta": eta[eta.isfinite()].mean().item()
                                          if eta.isfinite().any() else 0.0})}
        last = global_step >= args.total_timesteps
        if iteration % args.eval_every == 0 or last:
            video = os.path.join(run_dir, "videos") if args.capture_video and last else None
            eval_returns = evaluate_mujoco(policy, obs_rms, args, args.num_eval_episodes,
                                           args.seed + 10_000 * iteration, device, video)
            metrics["eval/episodic_return"] = float(np.mean(eval_returns))
        for key, value in metrics.items():
            writer.add_scalar(key, value, global_step)
        if "eval/episodic_return" in metrics:
            train_return = f"{np.mean(recent_returns):.1f}" if recent_returns else "n/a"
            eta = max(args.total_timesteps - global_step, 0) / metrics["charts/SPS"]
            print(f"iter {iteration} | step {global_step}/{args.total_timesteps} | episodic return {train_return} | "
                  f"eval return {metrics['eval/episodic_return']:.1f} | K_old {metrics['losses/k_old']:.4f} | "
                  f"{f'delta {delta:.4f}' if pair_shift else f'alpha {alpha:.2f}'} | SPS {metrics['charts/SPS']:.0f} | "
                  f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}", flush=True)
        if STOP["signum"] or (args.checkpoint_every and iteration % args.checkpoint_every == 0):
            folder = checkpoint()
        if STOP["signum"]:
            print(f"stopped by {signal.Signals(STOP['signum']).name} at step {global_step}; "
                  f"continue with --resume {folder}", flush=True)
            writer.close()
            sys.exit(128 + STOP["signum"])
    for s, handler in handlers.items():
        signal.signal(s, handler)
    branches.close()
    if args.save_model:
        # tensors and plain values only, so that `torch.load(path)` reads it with its safe default (weights_only)
        torch.save({"policy": policy.state_dict(), "obs_mean": torch.from_numpy(obs_rms.mean),
                    "obs_var": torch.from_numpy(obs_rms.var), "obs_count": float(obs_rms.count),
                    "env_id": args.env_id, "args": asdict(args)}, os.path.join(run_dir, "model.pt"))
    summary = {"run_name": run_name, "global_step": global_step, "iterations": iteration,
               "train_seconds": round(train_time, 1), "SPS": round(global_step / train_time),
               "nonfinite_skipped_steps": nonfinite,
               "episodic_return": float(np.mean(recent_returns)) if recent_returns else None,
               "eval/episodic_return": float(np.mean(eval_returns))}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    writer.close()
    print("summary: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
          + (f" model={os.path.join(run_dir, 'model.pt')}" if args.save_model else ""))
    return summary

if __name__ == "__main__":
    train_mujoco(tyro.cli(MujocoArgs))
