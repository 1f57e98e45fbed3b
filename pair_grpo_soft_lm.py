"""Soft-Pair-GRPO for language models: GRPO driven by pairwise preference labels only.

The method as docs/formulation.md (section 3) writes it down: sample a group of G
completions per prompt; a teacher compares every pair and returns binary labels (never
scores); each completion's advantage is its net win rate in the group; GRPO's clipped
surrogate stays as it is, and the k3 KL penalty is anchored at the batch's sampling
policy with beta 0.01, as the paper's body defines it (`--kl-anchor ref`: GRPO's).

    python pair_grpo_soft_lm.py          # offline tiny task: random 2-layer Llama, CPU, ~1 min
    python pair_grpo_soft_lm.py --model-name-or-path Qwen/Qwen2.5-0.5B-Instruct \
        --reward-model-name-or-path Skywork/Skywork-Reward-V2-Qwen3-0.6B \
        --dataset-name HuggingFaceH4/ultrafeedback_binarized --learning-rate 1e-6
"""
import contextlib
import copy
import json
import os
import random
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import numpy as np
import torch
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class LMArgs:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, CUDA is used when available"""
    torch_threads: int = 0
    """torch CPU threads (0: torch's default)"""
    output_dir: str = "runs"
    """TensorBoard logs and saved models go to `{output_dir}/{run_name}`"""
    save_model: bool = False
    """whether to save the trained policy (`save_pretrained`) into the run folder"""
    checkpoint_every: int = 0
    """write a resumable checkpoint every this many iterations (0: only when a signal or faults stop the run)"""
    resume: Optional[str] = None
    """a checkpoint folder (or the run folder holding one) whose run to continue"""
    max_nonfinite_steps: int = 3
    """a non-finite loss or gradient skips its optimizer step; this many in a row stop the run"""

    # model, prompts and reward
    model_name_or_path: str = "tiny"
    """policy: a hub id or local path of a causal LM; `tiny` builds a random 2-layer Llama"""
    reward_model_name_or_path: str = "rule"
    """reward: a sequence-classification model (hub id or local path); `rule` is the tiny task's judge"""
    dataset_name: str = "tiny"
    """prompts: `tiny`, `rules` (built-in tasks), a hub id (e.g. HuggingFaceH4/ultrafeedback_binarized) or a path"""
    train_split: Optional[str] = None
    """training split (default: `train_prefs` if present, else `train`)"""
    eval_split: Optional[str] = None
    """held-out split (default: `test_prefs` or `test`; else the last prompts of the training split)"""
    use_chat_template: bool = True
    """wrap plain `prompt` rows in the policy's chat template when it has one"""
    max_prompt_length: int = 256
    """prompts longer than this many tokens keep their last tokens"""
    max_new_tokens: int = 24
    """completion length limit"""
    temperature: float = 1.0
    """sampling temperature; the ratios use the same temperature-scaled logits"""
    reward_max_length: int = 1024
    """the reward model sees at most this many tokens, and no more than its tokenizer takes (the end is kept)"""

    # algorithm
    num_iterations: int = 40
    """number of rollout batches (one or more optimizer steps each)"""
    prompts_per_step: int = 8
    """prompts per rollout batch; each gives one group"""
    group_size: int = 8
    """completions per prompt (G)"""
    learning_rate: float = 3e-3
    """AdamW learning rate (use about 1e-6 for real models)"""
    update_epochs: int = 1
    """passes over each rollout batch"""
    num_minibatches: int = 1
    """minibatches per pass; each holds whole groups and makes one optimizer step"""
    clip_eps_low: float = 0.2
    """lower clip range of the ratio (1 - eps_low)"""
    clip_eps_high: float = 0.2
    """upper clip range of the ratio (1 + eps_high)"""
    beta: float = 0.01
    """weight of the k3 KL penalty to the anchor policy"""
    kl_anchor: Literal["old", "ref"] = "old"
    """the KL penalty's anchor: `old` the batch's sampling policy (the paper), `ref` the starting policy"""
    scale_advantages: bool = False
    """divide the net win rates by their group std (ablation: then the update tends to GRPO's)"""
    loss_aggregation: Literal["sequence", "token"] = "sequence"
    """`sequence`: mean over sequences of token means (DeepSeekMath); `token`: mean over all tokens"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""

    # teacher: turns the hidden scores into labels, the only thing the learner sees
    teacher: Literal["oracle", "stochastic", "mistake", "equal"] = "oracle"
    """simulated teacher (B-Pref): exact, Bradley-Terry noisy, flipped labels, or ties below a margin"""
    teacher_tau: float = 0.05
    """`stochastic`: P(i preferred to j) = sigmoid((u_i - u_j) / tau)"""
    teacher_flip_prob: float = 0.1
    """`mistake`: probability that a label is flipped"""
    teacher_tie_margin: float = 0.02
    """`equal`: label 1/2 when |u_i - u_j| is below this margin"""

    # evaluation and efficiency
    eval_every: int = 10
    """evaluate every this many iterations (and before the first and after the last)"""
    num_eval_prompts: int = 64
    """held-out prompts per evaluation"""
    micro_batch_size: int = 64
    """sequences per forward pass (gradients are accumulated over micro-batches)"""
    gradient_checkpointing: bool = False
    """trade compute for memory in the policy's backward pass"""
    bf16: bool = True
    """bf16 autocast (and bf16 reference and reward models) on CUDA; CPU always runs fp32"""
    fast_generation: Literal["auto", "on", "off"] = "auto"
    """sample from a copy of the policy with a static KV cache, its decode step compiled on CUDA (auto: on CUDA)"""


# ----------------------------------------------------------------------------- the algorithm: teacher, advantages, loss
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

def net_win_rate(labels: torch.Tensor, scale_by_std: bool = False) -> torch.Tensor:
    """labels [groups, G, G] -> A_i = (1/(G-1)) sum_{j != i} (2 z_ij - 1), in [-1, 1], summing to 0."""
    advantages = (2 * labels - 1).sum(dim=2) / (labels.shape[1] - 1)  # z_ii = 1/2 adds nothing
    return advantages / (advantages.std(dim=1, keepdim=True) + 1e-4) if scale_by_std else advantages

def clipped_surrogate(logp, old_logp, advantages, eps_low: float, eps_high: float) -> tuple:
    """Per-token min(rho A, clip(rho) A); also returns where the clip is active."""
    ratio = torch.exp(logp - old_logp)
    unclipped, clipped = ratio * advantages, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantages
    return torch.minimum(unclipped, clipped), (clipped < unclipped).float()

def k3_kl(logp, ref_logp) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref) on tokens sampled from pi_theta."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1

def loss_weights(mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Per-token weights whose weighted sum is the minibatch's aggregate; micro-batches then sum exactly."""
    if aggregation == "sequence":  # mean over sequences of each sequence's token mean
        return mask / mask.sum(1, keepdim=True).clamp(min=1) / mask.shape[0]
    return mask / mask.sum().clamp(min=1)

# ----------------------------------------------------------------------------- plumbing: errors, scale-out, survival
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

def setup_distributed(use_cuda: bool) -> tuple:
    """(rank, world_size, device). Under `torchrun --nproc-per-node R` each process is one rank: it
    samples and scores its share of the groups (a group never spans ranks); DDP averages gradients."""
    world, cuda = int(os.environ.get("WORLD_SIZE", "1")), use_cuda and torch.cuda.is_available()
    if world == 1:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    # DDP imports torch.distributed.nn, whose functions' defaults would hold the group, and its threads, past
    # destroy_process_group into interpreter exit, where a thread freeing a tensor aborts: import it groupless
    from torch.distributed import nn  # noqa: F401
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return torch.distributed.get_rank(), world, torch.device(f"cuda:{local_rank}" if cuda else "cpu")

def all_sum(x: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(x := x.clone())
    return x

def all_gather(x: torch.Tensor) -> torch.Tensor:
    if not torch.distributed.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)

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

def exists_if_local(value: str) -> bool:
    """A value that can only be a local path must exist; anything else may be a hub id."""
    return not (value.startswith((".", "/", "~")) or value.count("/") > 1) or os.path.exists(os.path.expanduser(value))

def validate_lm_args(args: LMArgs):
    at_least_one = ["prompts_per_step", "num_iterations", "update_epochs", "num_minibatches", "max_new_tokens",
                    "micro_batch_size", "num_eval_prompts", "eval_every", "max_nonfinite_steps", "max_prompt_length",
                    "reward_max_length"]
    check([(args.group_size >= 2, f"--group-size must be at least 2 (got {args.group_size}): "
             "a group of one has no comparison")]
          + [(getattr(args, k) >= 1, f"--{k.replace('_', '-')} must be at least 1 (got {getattr(args, k)})")
             for k in at_least_one])
    check([(args.checkpoint_every >= 0, f"--checkpoint-every must be 0 (off) or positive "
            f"(got {args.checkpoint_every})"),
           (args.learning_rate > 0 and args.max_grad_norm > 0, f"--learning-rate and --max-grad-norm must be "
            f"positive (got {args.learning_rate}, {args.max_grad_norm})"),
           (args.torch_threads >= 0, f"--torch-threads must be 0 (torch's default) or positive "
            f"(got {args.torch_threads})"),
           (args.prompts_per_step % args.num_minibatches == 0, f"--num-minibatches {args.num_minibatches} must "
            f"divide --prompts-per-step {args.prompts_per_step} (minibatches hold whole groups)"),
           (args.temperature > 0, f"--temperature must be positive (got {args.temperature})"),
           (all(x >= 0 for x in (args.clip_eps_low, args.clip_eps_high, args.beta)) and args.clip_eps_low < 1,
            "--clip-eps-low must lie in [0, 1), --clip-eps-high and --beta must be non-negative"),
           (args.teacher_tau > 0 and 0 <= args.teacher_flip_prob <= 1 and args.teacher_tie_margin >= 0,
            "--teacher-tau must be positive, --teacher-flip-prob in [0, 1], --teacher-tie-margin non-negative")]
        + [(value in special or exists_if_local(value), f"--{flag.replace('_', '-')} {value!r}: no such file or "
            "directory") for flag, special in [("model_name_or_path", ["tiny"]),
                                                ("reward_model_name_or_path", ["rule"]),
                                                ("dataset_name", ["tiny", "rules"])]
           for value in [getattr(args, flag)]])
    try:  # fail now, not after the models load: every run folder goes in here
        os.makedirs(args.output_dir, exist_ok=True)
        check([(os.access(args.output_dir, os.W_OK), f"--output-dir {args.output_dir!r}: not writable")])
    except OSError as exc:
        fail(f"--output-dir {args.output_dir!r}: cannot create it ({first_line(exc)})")

# ----------------------------------------------------------------------------- prompts
# A prompt is a record: `text` is what the policy reads (`templated` if the policy's chat
# template made it), `messages` the same turns for a reward model with a chat template.
def tiny_task_prompts(n: int, seed: int = 0) -> list:
    """Offline task: short requests of random words; the rule judge rewards vowel-dense replies."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("bcdfghklmnprstvz") + rng.choice("aeiou") for _ in range(2)) for _ in range(64)]
    texts = [f"Say something about {rng.choice(words)} {rng.choice(words)}:" for _ in range(n)]
    return [{"text": t, "templated": False, "messages": [{"role": "user", "content": t}]} for t in texts]

def rules_task_prompts(n: int, seed: int = 0) -> list:
    """Offline task whose good reply depends on the prompt: use the letters of two key words, but not two
    of those letters, in a reply of a given length. The criteria pull against each other (`rules_score`)."""
    rng, records = random.Random(seed), []
    for _ in range(n):
        keys = ["".join(rng.choice("bcdfghklmnprstvz") + rng.choice("aeiou") for _ in range(2)) for _ in range(2)]
        avoid, length = rng.sample(sorted(set("".join(keys))), 2), rng.randint(8, 20)
        text = f"Use {keys[0]} {keys[1]} without {avoid[0]} or {avoid[1]}, {length} letters:"
        records.append({"text": text, "templated": False, "messages": [{"role": "user", "content": text}],
                        "keys": keys, "avoid": avoid, "length": length})
    return records

def rules_score(record: dict, reply: str) -> float:
    """In [0, 1]: the share of the key words' allowed letters the reply uses, times the share of its
    characters that are not forbidden, times its closeness to the target length."""
    allowed = set("".join(record["keys"])) - set(record["avoid"])
    clean = 1 - sum(ch in record["avoid"] for ch in reply) / max(len(reply), 1)
    fit = max(0.0, 1 - abs(len(reply) - record["length"]) / record["length"])
    return len(allowed & set(reply)) / len(allowed) * clean * fit

def hh_prompt(chosen, row: int, split: str) -> dict:
    """HH-RLHF: the dialogue of `chosen` up to and including its last "\\n\\nAssistant:"."""
    cut = chosen.rfind("\n\nAssistant:") if isinstance(chosen, str) else -1  # not a list of messages
    check([(cut >= 0, f"dataset row {row} of split {split!r}: 'chosen' is not a text dialogue with a "
            "'\\n\\nAssistant:' turn (HH-RLHF's schema)")])
    parts = re.split(r"\n\n(Human|Assistant):", text := chosen[: cut + len("\n\nAssistant:")])[1:]
    # every turn, an empty one too (strict chat templates need roles that alternate), but the reply to come
    messages = [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
                for who, said in zip(parts[::2], parts[1::2])][:-1]
    return {"text": text, "templated": False, "messages": messages}

def plain_prompt(prompt, row: int, split: str, tokenizer, use_chat_template: bool) -> dict:
    """UltraFeedback: a plain prompt, wrapped in the policy's chat template when it has one."""
    check([(isinstance(prompt, str) and prompt.strip(),
            f"dataset row {row} of split {split!r}: 'prompt' is not a non-empty string")])
    messages = [{"role": "user", "content": prompt}]
    chat = use_chat_template and getattr(tokenizer, "chat_template", None)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) if chat else prompt
    return {"text": text, "templated": bool(chat), "messages": messages}

def load_lm_prompts(args: LMArgs, tokenizer) -> tuple:
    if args.dataset_name in ("tiny", "rules"):  # built in; held out: prompts training never sees
        task = {"tiny": tiny_task_prompts, "rules": rules_task_prompts}[args.dataset_name]
        records = task(1024 + 4 * args.num_eval_prompts)
        seen = {r["text"] for r in records[:1024]}
        return records[:1024], [r for r in records[1024:] if r["text"] not in seen][: args.num_eval_prompts]
    import datasets

    name, flag = os.path.expanduser(args.dataset_name), f"--dataset-name {args.dataset_name!r}"
    builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}.get(os.path.splitext(name)[1])
    try:  # a single local file goes through the matching builder, everything else by name
        single_file = os.path.isfile(name) and builder
        ds = datasets.load_dataset(builder, data_files=name) if single_file else datasets.load_dataset(name)
    except Exception as exc:
        fail(f"{flag}: could not load ({first_line(exc)})")
    train_split = args.train_split or next((s for s in ("train_prefs", "train") if s in ds), None)
    eval_split = args.eval_split or next((s for s in ("test_prefs", "test") if s in ds), None)
    check([(split is None or split in ds, f"{f} {split!r} is not a split of {args.dataset_name!r} (splits: {list(ds)})")
           for f, split in [("--train-split", train_split), ("--eval-split", eval_split)]]
          + [(train_split is not None, f"{flag} has no training split; pass --train-split (splits: {list(ds)})")])

    def records(split):
        columns = ds[split].column_names
        check([("prompt" in columns or "chosen" in columns, f"split {split!r} of {args.dataset_name!r} has columns "
                f"{columns}; expected 'prompt' (UltraFeedback) or 'chosen' (HH-RLHF)")])
        if "prompt" in columns:
            return [plain_prompt(p, row, split, tokenizer, args.use_chat_template)
                    for row, p in enumerate(ds[split]["prompt"])]
        return [hh_prompt(chosen, row, split) for row, chosen in enumerate(ds[split]["chosen"])]

    train = records(train_split)
    if eval_split is None:  # hold out the end of the training split
        train, held_out = train[: -args.num_eval_prompts], train[-args.num_eval_prompts:]
    else:
        held_out = records(eval_split)[: args.num_eval_prompts]
    check([(train and held_out, f"{flag}: too few rows for training and {args.num_eval_prompts} eval prompts")])
    return train, held_out

def encode_prompts(tokenizer, records: list, max_length: int, eos_ids: set) -> list:
    ids = []
    for record in records:
        tokens = tokenizer(record["text"], add_special_tokens=not record["templated"])["input_ids"]
        while tokens and tokens[-1] in eos_ids:  # some tokenizers (ByT5) append EOS: a prompt must not end
            tokens = tokens[:-1]
        ids.append(tokens[-max_length:])
    return ids

# ----------------------------------------------------------------------------- models
def load_lm_policy(args: LMArgs, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer, ByT5Tokenizer, GenerationConfig, LlamaConfig

    if args.model_name_or_path == "tiny":
        tokenizer = ByT5Tokenizer()
        policy = AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None))
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
            policy = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32)
        except Exception as exc:
            fail(f"--model-name-or-path {args.model_name_or_path!r}: could not load a causal LM ({first_line(exc)})")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    eos = policy.generation_config.eos_token_id or tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    # A fresh config, so no hub default (top-k, top-p, repetition penalty) distorts the distribution the
    # ratios are computed under; GumbelSampler below does the sampling. --save-model puts the loaded one back.
    policy.loaded_generation_config = policy.generation_config
    policy.generation_config = GenerationConfig(do_sample=False, max_new_tokens=args.max_new_tokens,
                                                eos_token_id=sorted(eos_ids), pad_token_id=tokenizer.pad_token_id)
    # The policy runs in training mode, the only one where transformers checkpoints activations (from_pretrained
    # returns eval mode), so every dropout rate goes to 0, or pi_theta would differ from pi_old at theta_old:
    # Dropout modules (GPT-2) and the rates layers read in their forward (OPT's `dropout`, Llama's
    # `attention_dropout`). The config keeps its rates.
    for module in policy.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and ("drop" in name or isinstance(module, torch.nn.Dropout) and name == "p"):
                setattr(module, name, 0.0)
    if args.gradient_checkpointing:
        policy.activation_checkpointing_enable()
    policy.to(device).train()
    frozen_dtype = torch.bfloat16 if device.type == "cuda" and args.bf16 else torch.float32
    return policy, copy.deepcopy(policy).to(frozen_dtype).eval().requires_grad_(False), tokenizer, eos_ids

def vowel_density(text: str) -> float:
    return sum(ch in "aeiouAEIOU" for ch in text) / max(len(text), 1)

def load_lm_judge(args: LMArgs, device: torch.device):
    """Returns judge(records, completions) -> scores: the rule judge (the rules task's score, else vowel
    density) or a reward model."""
    if args.reward_model_name_or_path == "rule":
        return lambda records, completions: torch.tensor([rules_score(r, c) if "keys" in r else vowel_density(c)
                                                          for r, c in zip(records, completions)])
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    path, flag = args.reward_model_name_or_path, f"--reward-model-name-or-path {args.reward_model_name_or_path!r}"
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        fail(f"{flag}: could not load a model config ({first_line(exc)})")
    architectures = config.architectures or [config.model_type]
    check([(any(a.endswith("ForSequenceClassification") for a in architectures),
            f"{flag} is {architectures}, not a sequence classifier (*ForSequenceClassification)"),
           (config.num_labels == 1, f"{flag} has {config.num_labels} labels; a reward model has 1")])
    try:
        rm_tokenizer = AutoTokenizer.from_pretrained(path)
        reward_model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch.bfloat16 if device.type == "cuda" and args.bf16 else torch.float32).to(device).eval()
    except Exception as exc:
        fail(f"{flag}: could not load ({first_line(exc)})")
    rm_tokenizer.pad_token = rm_tokenizer.pad_token or rm_tokenizer.eos_token
    reward_model.config.pad_token_id = rm_tokenizer.pad_token_id
    rm_tokenizer.truncation_side = "left"  # keep the completion when a dialogue is too long
    # an encoder's position table (RoBERTa, ELECTRA) ends where its tokenizer says; past it, it fails mid-run
    max_length = min(args.reward_max_length, rm_tokenizer.model_max_length)
    if max_length < args.reward_max_length:
        print(f"{flag}: reads at most {max_length} tokens (its tokenizer's model_max_length), "
              f"not --reward-max-length {args.reward_max_length}")
    templated = bool(getattr(rm_tokenizer, "chat_template", None))

    @torch.no_grad()
    def judge(records, completions):
        texts = [rm_tokenizer.apply_chat_template(r["messages"] + [{"role": "assistant", "content": c}], tokenize=False)
                 if templated else r["text"] + c for r, c in zip(records, completions)]
        return torch.cat([reward_model(**rm_tokenizer(
            texts[i: i + args.micro_batch_size], return_tensors="pt", padding=True, truncation=True,
            max_length=max_length, add_special_tokens=not templated).to(device)).logits[:, 0].float().cpu()
            for i in range(0, len(texts), args.micro_batch_size)])

    return judge

# ----------------------------------------------------------------------------- rollout
def left_pad(sequences: list, pad_id: int, width: int = 0) -> tuple:
    width = max(width, max(len(s) for s in sequences))
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in sequences], dtype=torch.long)
    return ids, (torch.arange(width) >= width - torch.tensor([len(s) for s in sequences])[:, None]).long()

def completion_mask(completion_ids: torch.Tensor, eos_ids: set) -> torch.Tensor:
    """1 up to and including the first EOS, 0 after it (and on the padding generate adds)."""
    is_eos = torch.isin(completion_ids, torch.tensor(sorted(eos_ids), device=completion_ids.device))
    return ((is_eos.long().cumsum(1) - is_eos.long()) == 0).float()

def token_logprobs(model, input_ids, attention_mask, num_new: int, temperature: float) -> torch.Tensor:
    """Log-probs of the last `num_new` tokens under temperature-scaled logits, as sampled."""
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)  # left padding must not shift positions
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                   logits_to_keep=num_new + 1, use_cache=False).logits[:, :-1].float() / temperature
    return logits.gather(-1, input_ids[:, -num_new:].unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)

@torch.no_grad()
def batched_logprobs(model, batch: dict, args, autocast) -> torch.Tensor:
    parts = [slice(i, i + args.micro_batch_size) for i in range(0, len(batch["input_ids"]), args.micro_batch_size)]
    with autocast:
        return torch.cat([token_logprobs(model, batch["input_ids"][part], batch["attention_mask"][part],
                                         batch["mask"].shape[1], args.temperature) for part in parts])

def sampling_seed(*key: int) -> int:
    return int(np.random.SeedSequence([k % 2**32 for k in key]).generate_state(1)[0])

def counter_uniform(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1) from a SplitMix64 hash of (seed, counter) in wrapping int64 arithmetic,
    the same on every device: seeds [B, 1] x counters [V] -> [B, V], one vectorised call."""
    z = seeds * -7046029254386353131 + counters  # 0x9E3779B97F4A7C15: keeps different seeds apart
    z = (z ^ ((z >> 30) & 0x3FFFFFFFF)) * -4658895280553007687  # logical shifts on a signed type
    z = (z ^ ((z >> 27) & 0x1FFFFFFFFF)) * -7723592293110705685
    z = z ^ ((z >> 31) & 0x1FFFFFFFF)
    return (((z >> 41) & 0x7FFFFF).float() + 0.5) / 2**23  # 23 bits: never 0 or 1 in float32

class GumbelSampler:
    """Samples softmax(logits / T) exactly, as argmax(logits / T + Gumbel noise). The noise is a
    hash of (completion seed, decode step, token id): what a completion samples depends on its
    seed alone, not on the batch, the rank or the resume it happens in. Keeps the sampled
    tokens' log-probs under the sampling model."""

    def __init__(self, seeds: list, temperature: float, device: torch.device):
        self.seeds = torch.tensor(seeds, dtype=torch.int64, device=device)[:, None]
        self.temperature, self.step, self.logps = temperature, 0, []

    def __call__(self, input_ids, scores):  # a transformers logits processor; generate takes the argmax
        vocab, logits = scores.shape[-1], scores.float() / self.temperature
        uniform = counter_uniform(self.seeds, self.step * vocab + torch.arange(vocab, device=scores.device))
        self.step += 1
        noisy = logits - torch.log(-torch.log(uniform))
        self.logps.append(logits.log_softmax(-1).gather(-1, noisy.argmax(-1, keepdim=True))[:, 0])
        return noisy

@torch.no_grad()
def sample_completions(model, tokenizer, prompt_ids: list, repeats: int, eos_ids: set, autocast, device,
                       seeds: list, temperature: float, static_cache: bool = False) -> dict:
    """One batched generate for all prompts x repeats (KV cache on); one seed per completion.
    `static_cache`: a fixed-size cache, prompts padded to a multiple of 64 tokens so that its shape
    repeats and transformers' compiled decode step (a CUDA graph) is reused; the padding is cut after."""
    sequences = [p for p in prompt_ids for _ in range(repeats)]
    extra = -max(map(len, sequences)) % 64 if static_cache else 0
    ids, mask = left_pad(sequences, tokenizer.pad_token_id, max(map(len, sequences)) + extra)
    ids, mask, sampler = ids.to(device), mask.to(device), GumbelSampler(seeds, temperature, device)
    was_training = model.training
    model.eval()
    with autocast:
        generated = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, logits_processor=[sampler],
                                   cache_implementation="static" if static_cache else None)
    model.train(was_training)
    completion = generated[:, ids.shape[1]:]
    cmask = completion_mask(completion, eos_ids)
    texts = tokenizer.batch_decode(completion.masked_fill(cmask == 0, tokenizer.pad_token_id), skip_special_tokens=True)
    attention_mask = torch.cat([mask, torch.ones_like(completion)], 1)
    return {"input_ids": generated[:, extra:], "attention_mask": attention_mask[:, extra:], "mask": cmask,
            "texts": texts, "logp": torch.stack(sampler.logps, 1)[:, :completion.shape[1]]}

# ----------------------------------------------------------------------------- training
def train_lm(args: LMArgs) -> dict:
    validate_lm_args(args)
    rank, world, device = setup_distributed(args.cuda)
    check([(args.prompts_per_step % (world * args.num_minibatches) == 0, f"--prompts-per-step {args.prompts_per_step} "
            f"must be a multiple of ranks x --num-minibatches ({world} x {args.num_minibatches}): every rank's "
            "minibatches hold whole groups")])
    seed_everything(args.seed, args.torch_deterministic)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and args.bf16)
    policy, reference, tokenizer, eos_ids = load_lm_policy(args, device)
    judge = load_lm_judge(args, device)
    train_records, eval_records = load_lm_prompts(args, tokenizer)
    train_ids, eval_ids = (encode_prompts(tokenizer, records, args.max_prompt_length, eos_ids)
                           for records in (train_records, eval_records))
    # past its position table a GPT-2 or OPT policy fails deep inside generate, a rotary one drifts silently
    positions, longest = getattr(policy.config, "max_position_embeddings", None), max(map(len, train_ids + eval_ids))
    check([(not positions or longest + args.max_new_tokens <= positions, f"the longest prompt ({longest} tokens after "
            f"--max-prompt-length {args.max_prompt_length}) and --max-new-tokens {args.max_new_tokens} need "
            f"{longest + args.max_new_tokens} positions; the policy has {positions}: lower one of the two")])
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate)
    # Fast rollouts sample from a bf16 copy (fp32 on the CPU) refreshed after each update; the ratios
    # keep using the policy's own log-probs, so the objective is unchanged.
    fast = args.fast_generation == "on" or (args.fast_generation == "auto" and device.type == "cuda")
    rollout = copy.deepcopy(reference).requires_grad_(False) if fast else policy
    shared_rng = np.random.default_rng(args.seed)  # every rank draws the same prompts and minibatches
    teacher_rng = torch.Generator().manual_seed(args.seed + rank)  # the teacher's noise, apart from sampling
    order, cursor, global_step, queries, start_iteration, elapsed, nonfinite = [], 0, 0, 0, 0, 0.0, 0
    run_name = f"{os.path.basename(args.dataset_name.rstrip('/'))}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.output_dir, run_name)
    if args.resume:  # the run continues in its own folder
        state, own, run_dir = load_checkpoint(args.resume, args, world)
        policy.load_state_dict(state["policy"])
        optimizer.load_state_dict(state["optimizer"])
        shared_rng.bit_generator.state = state["shared_rng"]
        teacher_rng.set_state(own["teacher_rng"])
        order, cursor, global_step, queries, start_iteration, elapsed, nonfinite = (
            state[k] for k in ("order", "cursor", "global_step", "queries", "iteration", "elapsed", "nonfinite"))
        run_name = os.path.basename(run_dir)
    model = torch.nn.parallel.DistributedDataParallel(policy, broadcast_buffers=False) if world > 1 else policy
    writer = SummaryWriter(run_dir, purge_step=global_step + 1 if args.resume else None) if rank == 0 else None
    if writer:  # a resumed run writes on in its own folder; TensorBoard drops what it logged after the checkpoint
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
            f"|{k}|{v}|" for k, v in vars(args).items()))
    STOP["signum"] = 0
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    G, batch_groups, local_groups = args.group_size, args.prompts_per_step, args.prompts_per_step // world
    print(f"{run_name}: {len(train_records)} train / {len(eval_records)} eval prompts on {device}"
          + (f", rank {rank} of {world}" if world > 1 else "")
          + (f", resumed at iteration {start_iteration}" if args.resume else ""))

    def evaluate(iteration: int) -> dict:
        """Policy vs reference on held-out prompts, judged by the same reward source (rank 0).
        Not training time: the training clock `start` moves past it."""
        nonlocal start
        tick = time.time()
        ours, theirs = (sample_completions(
            m, tokenizer, eval_ids, 1, eos_ids, autocast, device,
            [sampling_seed(args.seed, stream, iteration, p) for p in range(len(eval_ids))], args.temperature)
            for stream, m in ((1, policy), (2, reference)))
        s_ours, s_ref = judge(eval_records, ours["texts"]), judge(eval_records, theirs["texts"])
        kl = k3_kl(batched_logprobs(policy, ours, args, autocast), batched_logprobs(reference, ours, args, autocast))
        start += time.time() - tick
        return {"eval/win_rate": ((s_ours > s_ref).float() + 0.5 * (s_ours == s_ref).float()).mean().item(),
                "eval/score": s_ours.mean().item(), "eval/reference_score": s_ref.mean().item(),
                "eval/kl_to_reference": ((kl * ours["mask"]).sum() / ours["mask"].sum()).item(),  # per token
                "eval/completion_length": ours["mask"].sum(1).mean().item()}

    def checkpoint(iteration: int) -> str:
        return save_checkpoint(os.path.join(run_dir, "checkpoint"), {
            "policy": policy.state_dict(), "optimizer": optimizer.state_dict(),
            "shared_rng": shared_rng.bit_generator.state, "order": order, "cursor": cursor, "global_step": global_step,
            "iteration": iteration, "elapsed": time.time() - start, "nonfinite": nonfinite, "args": asdict(args),
            "queries": queries},
            own={"teacher_rng": teacher_rng.get_state()})

    # Old log-probs equal the current ones when each batch gets exactly one optimizer
    # step (that step starts at theta_old): then the separate no-grad pass is skipped.
    reuse_old = args.update_epochs * args.num_minibatches == 1
    start, resumed_at, nonfinite_in_a_row, stopping = time.time() - elapsed, time.time(), 0, False
    if start_iteration == 0 and rank == 0:
        metrics = evaluate(0)
        for key, value in metrics.items():
            writer.add_scalar(key, value, global_step)
        print(f"before training | eval win {metrics['eval/win_rate']:.3f} | eval score {metrics['eval/score']:.3f}",
              flush=True)
    for iteration in range(start_iteration + 1, args.num_iterations + 1):
        # ---- rollout: this rank's prompts x G completions, scores, old and reference log-probs
        batch_prompts = []
        while len(batch_prompts) < batch_groups:
            if cursor == len(order):
                order, cursor = shared_rng.permutation(len(train_ids)).tolist(), 0
            batch_prompts.append(order[cursor])
            cursor += 1
        prompts = [batch_prompts[p] for p in range(rank * local_groups, (rank + 1) * local_groups)]
        seeds = [sampling_seed(args.seed, 0, iteration, rank * local_groups + p, j)
                 for p in range(local_groups) for j in range(G)]
        if fast:  # the rollout copy is the policy after the last update
            rollout.load_state_dict(policy.state_dict())
        batch = sample_completions(rollout, tokenizer, [train_ids[p] for p in prompts], G, eos_ids,
                                   contextlib.nullcontext() if fast else autocast, device, seeds, args.temperature,
                                   static_cache=fast)
        rewards = judge([train_records[p] for p in prompts for _ in range(G)], batch["texts"])  # hidden
        mask = batch["mask"]
        old_logp = None if reuse_old else batched_logprobs(policy, batch, args, autocast)
        anchored_to_ref = args.beta > 0 and args.kl_anchor == "ref"
        ref_logp = batched_logprobs(reference, batch, args, autocast) if anchored_to_ref else None
        global_step += batch_groups * G

        # ---- teacher: labels for all G(G-1)/2 pairs of each group; the learner sees only these
        labels = teacher_labels(rewards.view(local_groups, G), args.teacher, args.teacher_tau,
                                args.teacher_flip_prob, args.teacher_tie_margin, teacher_rng)
        queries += batch_groups * G * (G - 1) // 2

        # ---- advantages: net win rate within each group, shared by every token of a completion
        advantages = net_win_rate(labels, args.scale_advantages).view(-1).to(device)

        # ---- loss: clipped surrogate minus beta * k3 KL, over minibatches of whole groups
        stats = {"policy_loss": 0.0, "kl": 0.0, "clipfrac": 0.0, "approx_kl": 0.0, "entropy": 0.0,
                 "rollout_logp_gap": 0.0, "grad_norm": 0.0}
        minibatches = [g for _ in range(args.update_epochs)
                       for g in np.array_split(shared_rng.permutation(local_groups), args.num_minibatches)]
        for groups in minibatches:
            rows = torch.from_numpy((groups[:, None] * G + np.arange(G)).reshape(-1)).to(device)
            weights = loss_weights(mask[rows], args.loss_aggregation)
            if args.loss_aggregation == "token" and world > 1:  # DDP averages ranks: weigh by this rank's token share
                weights = weights * mask[rows].sum() * world / all_sum(mask[rows].sum())
            optimizer.zero_grad()
            micros = torch.split(torch.arange(len(rows), device=device), args.micro_batch_size)
            for m, micro in enumerate(micros):
                idx, w = rows[micro], weights[micro]
                if world > 1:  # DDP averages gradients across ranks once, on the last micro-batch
                    model.require_backward_grad_sync = m == len(micros) - 1
                with autocast:
                    logp = token_logprobs(model, batch["input_ids"][idx], batch["attention_mask"][idx], mask.shape[1],
                                          args.temperature)
                old = logp.detach() if reuse_old else old_logp[idx]
                surrogate, clipped = clipped_surrogate(logp, old, advantages[idx, None], args.clip_eps_low,
                                                       args.clip_eps_high)
                kl = k3_kl(logp, ref_logp[idx] if anchored_to_ref else old) if args.beta > 0 else torch.zeros_like(logp)
                (-(w * (surrogate - args.beta * kl)).sum()).backward()
                # entropy: the sampled-token estimate; the gap: |log pi_old - the sampler's log-prob| per token
                for key, value in zip(stats, (-(w * surrogate), w * kl, w * clipped, w * k3_kl(old, logp.detach()),
                                              -(w * logp.detach()), w * (old - batch["logp"][idx]).abs())):
                    stats[key] += value.sum().item()
            # A non-finite loss or gradient skips the step instead of poisoning the weights
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
            finite = bool(torch.isfinite(grad_norm))
            nonfinite, nonfinite_in_a_row = nonfinite + (not finite), 0 if finite else nonfinite_in_a_row + 1
            if nonfinite_in_a_row >= args.max_nonfinite_steps:
                fail(f"{nonfinite_in_a_row} non-finite losses or gradients in a row at iteration {iteration}; "
                     f"checkpoint in {checkpoint(iteration)}. Lower --learning-rate or check the rewards, "
                     "then --resume it")
            stats["grad_norm"] += grad_norm.item() if finite else 0.0  # before clipping
            optimizer.step() if finite else optimizer.zero_grad()

        # ---- logging (rank 0 logs the whole batch)
        elapsed = time.time() - start
        all_rewards, lengths = all_gather(rewards.to(device)), all_gather(mask.sum(1))
        stat_means = all_sum(torch.tensor(list(stats.values()), device=device)) / world / len(minibatches)
        agreement = all_sum(torch.tensor([label_agreement(labels, rewards.view(local_groups, G))], device=device))
        metrics = {"charts/score": all_rewards.mean().item(), "charts/score_std": all_rewards.std().item(),
                   "charts/completion_length": lengths.mean().item(),
                   "charts/learning_rate": optimizer.param_groups[0]["lr"],
                   "charts/nonfinite_skipped_steps": nonfinite, "charts/SPS": global_step / elapsed,
                   "charts/preference_queries": queries, "charts/label_agreement": agreement.item() / world,
                   **{f"losses/{k}": v.item() for k, v in zip(stats, stat_means)}}
        # all ranks stop together
        stopping = all_sum(torch.tensor([float(STOP["signum"] > 0)], device=device)).item() > 0
        if rank == 0:
            if iteration % args.eval_every == 0 or iteration == args.num_iterations:
                metrics.update(evaluate(iteration))
            for key, value in metrics.items():
                writer.add_scalar(key, value, global_step)
            eval_note = f" | eval win {metrics['eval/win_rate']:.3f}" if "eval/win_rate" in metrics else ""
            eta = (time.time() - resumed_at) / (iteration - start_iteration) * (args.num_iterations - iteration)
            print(f"iter {iteration}/{args.num_iterations} | step {global_step} | "
                  f"score {metrics['charts/score']:.3f} | "
                  f"len {metrics['charts/completion_length']:.1f} | kl {metrics['losses/kl']:.4f}{eval_note} | "
                  f"{metrics['charts/SPS']:.1f} completions/s | ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}",
                  flush=True)
        if stopping or (args.checkpoint_every and iteration % args.checkpoint_every == 0):
            folder = checkpoint(iteration)
        if stopping:
            break
    for s, handler in handlers.items():
        signal.signal(s, handler)
    if world > 1:  # leave together: a rank that exits while its peers still hold connections can abort the job.
        torch.distributed.barrier()  # DDP goes first, so that destroying the group joins its threads while Python runs
        del model
        torch.distributed.destroy_process_group()
    if stopping:
        signum = STOP["signum"] or signal.SIGTERM
        print(f"stopped by {signal.Signals(signum).name} at iteration {iteration}; continue with --resume {folder}",
              flush=True)
        if writer:
            writer.close()
        sys.exit(128 + signum)
    if rank != 0:
        return {}
    if args.save_model:
        policy.generation_config = policy.loaded_generation_config  # the saved model samples as the loaded one
        policy.save_pretrained(os.path.join(run_dir, "model"))
        tokenizer.save_pretrained(os.path.join(run_dir, "model"))
    train_time = time.time() - start  # evaluation excluded, as in the MuJoCo scripts
    summary = {"run_name": run_name, "global_step": global_step, "iterations": args.num_iterations,
               "train_seconds": round(train_time, 1), "SPS": round(global_step / train_time, 1),
               "nonfinite_skipped_steps": nonfinite, **{k: v for k, v in metrics.items() if k.startswith("eval/")}}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    writer.close()
    print("summary: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
          + (f" model={os.path.join(run_dir, 'model')}" if args.save_model else ""))
    return summary

if __name__ == "__main__":
    train_lm(tyro.cli(LMArgs))
