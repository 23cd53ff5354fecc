"""
LCPO: GRPO with a length-controlled reward, written by hand.

    python train.py                                   # LCPO-Exact on the embedded default, on a CPU: runs/default
    python train.py --init-adapter none               # the same from a fresh adapter, not from the first stage
    python train.py --mode mix                        # L1-Max style: half Exact, half Max prompts
    python train.py --alpha 0.001                     # an alpha ablation: runs/default-alpha-0.001
    python train.py --preset l1-exact                 # the paper's settings, 1.5B model, one GPU
    python train.py --alpha 0.001 --steps 200         # the same command again continues its run (here, longer)

One step: sample problems and targets -> roll out G responses each -> judge and reward them ->
group-normalised advantages -> clipped policy loss + k3 KL to the adapter-free reference -> one
AdamW update of the LoRA weights (per epoch over the rollouts). A length step (--length-steps) rolls
out the untrained model instead, ends each response after N of its tokens, rewrites its prompt to ask for
N, and learns the stop there (stop_loss), the rest of the text held by the KL to the untrained model.
"""

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import random
import re
import shutil
import signal
import sys
import time
import typing
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

import data
import model as model_lib
import reward
import sample
from data import N_MAX, N_MIN  # the default range of targets (data.py previews the same)

# The recipe's first stage, done once and shipped: the embedded model's adapter whose stop reads N, from
# 163 --length-steps on train-split problems (README, "Training"). From a fresh adapter the reward alone
# teaches this model to stop but not to read N; from this one, 40 LCPO steps make the dial.
STOP_ADAPTER = Path(__file__).resolve().parent / "results" / "stage1-adapter"


@dataclass
class Config:
    # what to train
    model: str | None = None  # hub id or local directory; None: the embedded SmolLM2-135M-Instruct
    data: str = "builtin"  # builtin, a known set (data.KNOWN_SETS), a hub id or a local file
    problem_column: str = "problem"  # the dataset's problem column
    answer_column: str = "answer"  # the dataset's gold answer column
    init_adapter: str | None = None  # start from this adapter or run; none: a fresh one; unset: the first stage (STOP_ADAPTER) on the embedded model
    # the LCPO reward
    mode: str = "exact"  # exact, max, or mix (L1-Max: each prompt Exact or Max with probability 1/2)
    alpha: float | None = 0.0075  # reward per token of length error: the paper's 0.0003 x 25 for 25x shorter targets; None: 0.0003 exact, 0.001 max
    delta: float = 0.5  # Max reward of a correct answer at exactly n_gold tokens
    n_min: int = N_MIN  # smallest target length n_gold, tokens
    n_max: int = N_MAX  # largest target length n_gold, tokens
    length_steps: int = 0  # the first steps are supervised: each response of the untrained model, ended after N of its tokens, learns to stop there under its prompt rewritten to ask for N (stop_loss; a Max prompt: N/2 to N)
    n_min_steps: int = 0  # the next steps use n_min alone (an ablation: it teaches a stop that ignores N)
    ends_steps: int = 0  # the next steps use n_min and n_max alone: the model learns that N sets the length
    targets_per_problem: int = 1  # each problem of a step comes with this many targets, one per k-th of the range: their responses differ by N alone
    budget_marker: int = 0  # the budget-marker variant, beyond the paper: after every k tokens of its own the response is shown the budget left, " [0096 left]"; 0: off (the paper)
    budget_in: str = "user"  # where "Think for N tokens." goes: user (after the problem, the paper) or system (a system message)
    boxed_only: bool = False  # judge only \boxed{} answers (the paper); off: the last number counts too
    # GRPO
    group_size: int = 4  # G: responses per prompt
    prompts_per_step: int = 8  # prompts per update (x G responses)
    epochs: int = 1  # mu: optimisation passes over each batch of rollouts
    clip: float = 0.2  # epsilon of the clipped ratio
    beta: float = 0.0  # weight of the k3 KL to the reference (paper 0.001: a term of ~1e-7 here); 0 skips the reference pass
    loss_norm: str = "token"  # token (DAPO/verl), grpo (per-sequence mean) or dr_grpo (sum / max length)
    temperature: float = 0.7  # sampling temperature (log-probs are taken at it too; no top-p: the loss pass scores the full softmax)
    max_new_tokens: int = 192  # response cap
    # optimisation
    lr: float = 2e-4  # AdamW learning rate of the LoRA weights
    warmup_steps: int = 0  # linear warm-up, then constant
    grad_clip: float = 1.0  # max gradient norm
    steps: int = 40  # updates in the whole run
    micro_batch_tokens: int = 1024  # padded tokens per forward/backward: rows are packed up to it, by length
    rollout_batch: int = 64  # rows per generation batch (rows with similar targets batched together)
    rollout_copy: bool = True  # generate with a dense copy (base dequantized, LoRA merged): faster, + the base's size
    lora_rank: int = 16  # LoRA r
    lora_alpha: int = 32  # LoRA scaling numerator
    lora_dropout: float = 0.0  # dropout on the LoRA input
    quantize: bool = True  # 4-bit NF4 base (off: full precision)
    gradient_checkpointing: bool = True  # recompute activations in backward: far less memory, little time
    # bookkeeping
    seed: int = 0  # everything random derives from it (problems, targets, sampling)
    out_dir: str = "runs"  # where run directories go
    run_name: str | None = None  # default: the preset and the flags given (default, default-alpha-0.001): the same command resumes it
    save_every: int = 10  # steps between checkpoints
    keep_checkpoints: int = 3  # the newest ones kept
    sample_every: int = 5  # steps between saved example responses
    max_bad_steps: int = 5  # non-finite losses in a row before the run stops


_PAPER = dict(model="agentica-org/DeepScaleR-1.5B-Preview", data="deepscaler", n_min=100, n_max=4000, group_size=16,
              prompts_per_step=128, temperature=0.6, max_new_tokens=4096, beta=0.001, boxed_only=True,
              micro_batch_tokens=16384, rollout_batch=64, gradient_checkpointing=True, lora_rank=64, lora_alpha=128,
              save_every=5, lr=1e-5)  # the paper's lr, 1e-6, was for full fine-tuning: LoRA needs a larger step
RESUMABLE = ("steps", "save_every", "keep_checkpoints", "sample_every", "max_bad_steps", "micro_batch_tokens",
             "rollout_batch", "rollout_copy", "gradient_checkpointing", "out_dir", "run_name")  # a resumed run may change
# these (its length, bookkeeping, memory and speed); any other setting would make it another run
PRESETS = {
    "default": {},  # the CPU demo: the embedded model, short targets
    "l1-exact": {**_PAPER, "mode": "exact", "alpha": 0.0003},  # the paper's runs, a 1.5B model on one GPU
    "l1-max": {**_PAPER, "mode": "mix", "alpha": None},  # each mode at its own alpha (0.0003 / 0.001)
}


def check_config(cfg: Config) -> None:
    """Refuse a configuration that cannot run, before anything is loaded."""
    problems = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
    if problems:
        raise ValueError("; ".join(problems))
    if cfg.mode not in ("exact", "max", "mix"):
        problems.append(f"--mode must be exact, max or mix, not {cfg.mode!r}")
    if cfg.alpha is not None and cfg.alpha < 0:
        problems.append(f"--alpha must be >= 0, got {cfg.alpha}")
    if not 0 <= cfg.delta <= 1:
        problems.append(f"--delta must be in [0, 1], got {cfg.delta}")
    if cfg.group_size < 2:
        problems.append(f"--group-size must be >= 2 (advantages compare responses to the same prompt), got {cfg.group_size}")
    if cfg.targets_per_problem >= 1 and cfg.prompts_per_step % cfg.targets_per_problem:
        problems.append(f"--targets-per-problem must divide --prompts-per-step ({cfg.prompts_per_step}), "
                        f"got {cfg.targets_per_problem}")
    if cfg.budget_in not in data.BUDGET_PLACES:
        problems.append(f"--budget-in must be one of {', '.join(data.BUDGET_PLACES)}, not {cfg.budget_in!r}")
    if cfg.loss_norm not in ("token", "grpo", "dr_grpo"):
        problems.append(f"--loss-norm must be token, grpo or dr_grpo, not {cfg.loss_norm!r}")
    for name in ("prompts_per_step", "epochs", "steps", "micro_batch_tokens", "rollout_batch", "max_new_tokens",
                 "save_every", "keep_checkpoints", "sample_every", "max_bad_steps", "lora_rank", "targets_per_problem"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("beta", "clip", "lr", "warmup_steps", "grad_clip", "lora_dropout", "n_min_steps", "ends_steps",
                 "length_steps", "budget_marker"):
        if getattr(cfg, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.init_adapter is not None:
        try:
            base = model_lib.adapter_base(cfg.init_adapter)
            if cfg.model is not None and cfg.model != base:
                problems.append(f"--init-adapter {cfg.init_adapter} was trained on {base}, not on --model {cfg.model}")
            every = model_lib.adapter_marker(cfg.init_adapter)
            if every and every != cfg.budget_marker:  # a plain adapter may start a marker run, not the reverse
                problems.append(f"--init-adapter {cfg.init_adapter} was trained with --budget-marker {every}: "
                                f"pass --budget-marker {every}")
        except model_lib.ModelError as e:
            problems.append(f"--init-adapter: {e}")
    try:
        data.check_target_range(cfg.n_min, cfg.n_max)
        sample.check_sampling_args(cfg.max_new_tokens, cfg.temperature, 1.0)
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise ValueError("; ".join(problems))


# -----------------------------------------------------------------------------
# the GRPO pieces


def length_slope(n_gold: list[int], n_y: list[int]) -> float | None:
    """Least-squares slope of the response length on the target: 1 follows N, 0 ignores it.

    The number that says whether LCPO is working (the length error also falls for a model that
    learns one middle length). None when every target is the same.

        >>> length_slope([32, 64, 128], [40, 72, 136]), length_slope([32, 128], [60, 60]), length_slope([32, 32], [9, 70])
        (1.0, 0.0, None)
    """
    mean_g, mean_y = sum(n_gold) / len(n_gold), sum(n_y) / len(n_y)
    var_g = sum((g - mean_g) ** 2 for g in n_gold)
    return sum((g - mean_g) * (y - mean_y) for g, y in zip(n_gold, n_y)) / var_g if var_g else None


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """A_i = (r_i - mean(r)) / (std(r) + 1e-6) within each group of G responses to one prompt.

    A group whose rewards are all equal gets 0: it says nothing about which response was better.
    scale=False (Dr. GRPO) keeps r_i - mean(r). `rewards` is [P * G], grouped contiguously.
    """
    groups = rewards.view(-1, group_size)  # [P, G]
    centred = groups - groups.mean(-1, keepdim=True)
    if scale:
        centred = centred / (groups.std(-1, keepdim=True) + 1e-6)
    return centred.view(-1)


def per_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                   advantages: torch.Tensor, clip: float, beta: float):
    """Clipped policy-gradient loss plus beta * k3 KL, per token: ([B, T] loss, [B, T] kl, [B, T] clipped).

        ratio = exp(logp - old_logp)
        L_pg  = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)
        KL_k3 = exp(ref - logp) - (ref - logp) - 1        (>= 0, and 0 where the two agree)
    """
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None]  # [B, 1]: one advantage for every token of a response
    unclipped, clipped = ratio * a, torch.clamp(ratio, 1 - clip, 1 + clip) * a
    loss = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta > 0:
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
        loss = loss + beta * kl
    return loss, kl, (clipped < unclipped)


def normalise(loss: torch.Tensor, mask: torch.Tensor, how: str, batch_tokens: int, batch_rows: int,
              max_new_tokens: int) -> torch.Tensor:
    """This micro-batch's share of the batch loss, so that summing over micro-batches gives:

    token   : sum over every response token of the batch / number of those tokens (DAPO, verl)
    grpo    : mean over sequences of each sequence's token mean
    dr_grpo : sum over tokens / (rows x max_new_tokens), a constant (Dr. GRPO)
    """
    if how == "token":
        return (loss * mask).sum() / batch_tokens
    if how == "grpo":
        return ((loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / batch_rows
    return (loss * mask).sum() / (batch_rows * max_new_tokens)


def budget_nll(stop_logp: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """-log p(a length within the budget n and over half of it): the Max prompts' counterpart of
    sample.length_nll, in the same layout. Without the floor, ending at once would be the likeliest length
    within any budget.

        -log p(no stop after tokens 1..n//2) - log p(a stop after one of tokens n//2+1..n)

        >>> round(budget_nll(torch.tensor([[0.5, 0.5, 0.5, 0.5]]).log(), torch.tensor([4])).item(), 3)  # 1/4 * 3/4
        1.674
    """
    go_on = sample.log_no_stop(stop_logp)
    tokens_after = torch.arange(stop_logp.shape[-1] - 1, -1, -1, device=stop_logp.device)[None]  # n - t at token t
    half = (n - n // 2).to(stop_logp.device)[:, None]  # tokens n//2+1..n have n - t < half
    late = tokens_after < half
    survive = (go_on * (sample.before_the_end(stop_logp, n) & ~late)).sum(-1)  # no stop after tokens 1..n//2
    return -(survive + torch.log(-torch.expm1((go_on * late).sum(-1).clamp(max=-1e-6))))


def stop_loss(model, ids: torch.Tensor, mask: torch.Tensor, n: torch.Tensor, eos_id: int,
              chunk: int = sample.LOGPROB_CHUNK, within: torch.Tensor | None = None,
              marker: sample.BudgetMarker | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The supervised length loss (--length-steps) of rows that are a prompt asking for N followed by the
    first N tokens of a response, left-padded (every row ends at the last column): ([rows] length NLL,
    [rows] KL).

    length NLL: the text ended after exactly N tokens (sample.length_nll); in the rows where `within` [rows] is
    True (Max prompts), after N/2 to N tokens (budget_nll). KL: sum over t < N of
    KL(untrained || model) of the next token after t tokens given that it is not the stop; it holds the
    text itself, which the NLL alone lets drift (into blank lines, measured), and leaves the stop to the
    NLL (a KL over the full distribution also pulls the stop back to the untrained one: measured, it
    slows the length down). The fp32 log-softmax runs `chunk` positions at a time and is recomputed in
    backward, like sample.sequence_logprobs.

    marker: the rows hold budget markers (BudgetMarker.insert, with one after an N-th token on the
    interval); N counts the text's own tokens, and only the columns where the model picks its next own
    token (or the stop) count: the rest are inside a marker, whose tokens are given.
    """
    R = int(n.max()) if marker is None else marker.columns(int(n.max()))  # response columns of the longest row
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with model_lib.reference(model) as untrained:
        reference = untrained.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions,
                                            use_cache=False).last_hidden_state[:, -R:]  # [rows, R, H]
        reference_head = untrained.get_output_embeddings()  # LoRA leaves lm_head alone: valid outside too
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions,
                                 use_cache=False).last_hidden_state[:, -R:]
    lm_head, stop_id = model.get_output_embeddings(), torch.tensor([eos_id], device=ids.device)

    def terms(h, h_ref):
        logits, ref_logits = lm_head(h).float(), reference_head(h_ref).float()
        text, ref = (x.index_fill(-1, stop_id, -1e4).log_softmax(-1) for x in (logits, ref_logits))  # given no stop
        return torch.stack([logits.log_softmax(-1)[..., eos_id], (ref.exp() * (ref - text)).sum(-1)])

    stop, kl = torch.cat([checkpoint(terms, hidden[:, s:s + chunk], reference[:, s:s + chunk], use_reentrant=False)
                          for s in range(0, R, chunk)], dim=-1)  # each [rows, R]
    if marker is not None:
        stop, kl = own_columns(stop, n, marker), own_columns(kl, n, marker)
    exactly = sample.length_nll(stop, n)
    nll = exactly if within is None else torch.where(within, budget_nll(stop, n), exactly)
    return nll, (kl * sample.before_the_end(kl, n)).sum(-1)


def own_columns(columns: torch.Tensor, n: torch.Tensor, marker: sample.BudgetMarker) -> torch.Tensor:
    """From [rows, R] columns over responses with budget markers (right-aligned, each row n own tokens
    long, BudgetMarker.insert), the columns where the model decides its next own token, in sample.length_nll's
    layout: [rows, max n], column -1 after the n-th own token (and its marker), -1-k after the (n-k)-th."""
    n = n.to(columns.device)[:, None]
    width = int(n.max())
    length = n - torch.arange(width - 1, -1, -1, device=columns.device)  # [rows, width]: own tokens so far
    at = columns.shape[-1] - marker.columns(n) + marker.decision(length)
    return columns.gather(-1, at.clamp(min=0, max=columns.shape[-1] - 1))  # columns before a row's start: unread


# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, cfg: Config) -> None:
    """adapter + optimizer + RNG + step, written atomically; the newest keep_checkpoints are kept."""
    if not all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
        raise RuntimeError(f"the adapter's weights are not finite at step {step}: not saved (the checkpoints in "
                           f"{run_dir} are the last good ones)")
    path = run_dir / "checkpoints" / f"step-{step:06d}"
    with model_lib.atomic_dir(path) as staging:
        model_lib.save_adapter(model, tokenizer, staging / "adapter")
        torch.save({"optimizer": optimizer.state_dict(), "step": step, "torch_rng": torch.get_rng_state()},
                   staging / "state.pt")
    for old in sorted((run_dir / "checkpoints").glob("step-*"))[: -cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> tuple[Path | None, dict | None]:
    """(directory, state) of the newest checkpoint that can be read, or (None, None); damaged ones (a crash
    mid-write, a full disk) are skipped, saying so."""
    for path in sorted((run_dir / "checkpoints").glob("step-*"), reverse=True):  # staging dirs start with ".": never listed
        try:
            model_lib.check_adapter(path / "adapter")
            state = torch.load(path / "state.pt", weights_only=False)
            state["step"]  # a state without its step is damaged too (KeyError)
            return path, state
        except Exception as e:  # torch.load fails in many ways (zip, pickle, EOF errors): any of them means damaged
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"note: checkpoint {path} cannot be read ({detail[:200]}): using the one before it", file=sys.stderr)
    return None, None


# -----------------------------------------------------------------------------
# the loop


def train(cfg: Config, run_dir: Path, resume: bool = False, on_step=None) -> Path:
    """Train until cfg.steps updates are done; returns the run directory. on_step(step, metrics) is for tests.

    Ctrl-C or a kill finishes the step, saves a checkpoint and returns; a second Ctrl-C quits at once.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint, state = None, None
    if resume:
        for staging in (run_dir / "checkpoints").glob(".step-*"):  # left by a kill mid-save
            shutil.rmtree(staging, ignore_errors=True)
        checkpoint, state = latest_checkpoint(run_dir)
        if checkpoint is None and any((run_dir / "checkpoints").glob("step-*")):
            raise ValueError(f"no checkpoint of {run_dir} can be read: delete {run_dir / 'checkpoints'} to start "
                             f"the run again")
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    start = state["step"] if state else 0
    if start >= cfg.steps:
        print(f"{run_dir} has done its {start} steps: pass --steps with more to continue it")
        return run_dir
    torch.manual_seed(cfg.seed)  # the new adapter's initial weights
    model, tokenizer = model_lib.load_model(
        cfg.model, adapter=str(checkpoint / "adapter") if checkpoint else cfg.init_adapter, quantize=cfg.quantize,
        lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        gradient_checkpointing=cfg.gradient_checkpointing)
    # split None: the set's own (train for the built-in one, e.g. test for math500)
    problems = data.load_problems(cfg.data, None, cfg.problem_column, cfg.answer_column, seed=cfg.seed)
    thinks = "</think>" in tokenizer.get_vocab()  # R1-style models: an answer only counts after </think>
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
    model.lcpo_marker = cfg.budget_marker  # saved with the adapter: eval.py and sample.py put in the same markers
    device = next(model.parameters()).device
    print(f"training {model.lcpo_base} on {len(problems)} problems of {cfg.data}; run: {run_dir}"
          + (f", resumed at step {start}" if start else ""))

    for log in ("metrics.jsonl", "samples.jsonl"):  # a resumed run redoes the steps after its checkpoint
        path = run_dir / log
        kept = [r for r in data.read_jsonl(path) if r.get("step", math.inf) < start]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    stop = {"asked": False}

    def ask_to_stop(signum, frame):  # Ctrl-C or kill: finish this step, save, exit; twice: exit now
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        print("\nstopping after this step (press Ctrl-C again to quit without saving it)", file=sys.stderr)

    previous = {sig: signal.signal(sig, ask_to_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    from tqdm import tqdm

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="steps", dynamic_ncols=True)
    work = tqdm(total=cfg.prompts_per_step * cfg.group_size, desc=f"step {start}: rollout", unit="response",
                position=1, leave=False, dynamic_ncols=True)  # the work inside a step: train_step moves it
    bad_steps, policy = 0, None
    try:
        for step in bar:
            if step >= cfg.length_steps:  # (length steps roll out the untrained model: train_step)
                policy = model_lib.rollout_copy(model, policy) if cfg.rollout_copy else model  # today's weights
            metrics, examples = train_step(cfg, step, model, tokenizer, optimizer, params, problems, thinks, device,
                                           policy, work)
            bad_steps = 0 if metrics["updated"] else bad_steps + 1
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if step % cfg.sample_every == 0:
                with open(run_dir / "samples.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, "examples": examples}) + "\n")
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", acc=f"{metrics['accuracy']:.2f}",
                            len_err=f"{metrics['length_error']:.2f}")
            if on_step is not None:
                on_step(step, metrics)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps or stop["asked"]:
                save_checkpoint(run_dir, step + 1, model, tokenizer, optimizer, cfg)
            if stop["asked"]:
                bar.write(f"stopped and saved at step {step + 1}; the same command continues the run")
                break
            if bad_steps >= cfg.max_bad_steps:
                raise RuntimeError(f"{bad_steps} steps in a row had a non-finite loss or reward: check the data, or "
                                   f"start a new run with a lower --lr and --init-adapter {run_dir} (its last checkpoint)")
    finally:
        work.close()
        bar.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return run_dir


def train_step(cfg: Config, step: int, model, tokenizer, optimizer, params, problems, thinks, device, policy=None,
               progress=None):
    """One GRPO update. Everything random is seeded by (seed, step), so a resumed run repeats it exactly.

    policy: what generates the rollouts, `model` itself or its dense copy (model.rollout_copy); a length
    step generates with the adapter off.
    progress: a tqdm bar to count the step's work on: responses finished, then micro-batches learnt.
    """
    rng = random.Random(cfg.seed * 1_000_003 + step)
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)
    G = cfg.group_size

    # 1. problems and targets
    drawn = [problems[rng.randrange(len(problems))] for _ in range(cfg.prompts_per_step // cfg.targets_per_problem)]
    batch = [p for p in drawn for _ in range(cfg.targets_per_problem)]  # the same problem, different N
    supervised, phase = step < cfg.length_steps, step - cfg.length_steps  # the LCPO curriculum follows them
    n_max = cfg.n_min if 0 <= phase < cfg.n_min_steps else cfg.n_max  # first learn to stop, then to vary the length
    if cfg.n_min_steps <= phase < cfg.n_min_steps + cfg.ends_steps:  # then the two ends alone: 1 -> n_min, 2 -> n_max
        ends = data.sample_targets(len(batch), 1, 2, cfg.mode, rng, cfg.targets_per_problem)
        targets = [((cfg.n_min, cfg.n_max)[n - 1], m) for n, m in ends]
    else:  # [(n_gold, mode)]; a problem's k targets spread over the range
        targets = data.sample_targets(len(batch), cfg.n_min, n_max, cfg.mode, rng, cfg.targets_per_problem)
    prompts = [data.lcpo_prompt(tokenizer, p, n, m, cfg.budget_in) for p, (n, m) in zip(batch, targets)]
    marker = sample.BudgetMarker(tokenizer, cfg.budget_marker) if cfg.budget_marker else None

    # 2. roll out G responses per prompt; their log-probs are GRPO's old log-probs. A length step rolls out the
    # untrained model (the adapter off): its texts do not shrink as the adapter's stop moves; the policy's own
    # did, in 5 steps, until none was long enough to end at any N (EXPERIMENTS.md)
    t0 = time.perf_counter()
    model.eval()
    source = model if supervised or policy is None else policy
    untrained = model_lib.reference(model) if supervised else contextlib.nullcontext()
    cap = min(cfg.max_new_tokens, cfg.n_max) if supervised else cfg.max_new_tokens  # a length step cuts at N <= n_max
    rows = [prompt for prompt in prompts for _ in range(G)]  # [P * G], groups contiguous
    by_target = sorted(range(len(rows)), key=lambda j: targets[j // G][0])  # similar lengths share a batch
    rollouts = [None] * len(rows)
    if progress is not None:
        progress.set_description(f"step {step}: rollout", refresh=False)
        progress.unit = "response"
        progress.reset(total=len(rows))
    with untrained:
        for i in range(0, len(rows), cfg.rollout_batch):
            chunk = by_target[i:i + cfg.rollout_batch]
            on_token = None if progress is None else lambda t, tokens, done: progress.update(i + done - progress.n)
            outs = sample.generate(source, [rows[j] for j in chunk], cap, tokenizer.pad_token_id,
                                   [tokenizer.eos_token_id], cfg.temperature, 1.0, generator, on_token=on_token,
                                   marker=marker, budgets=[targets[j // G][0] for j in chunk])
            for j, out in zip(chunk, outs):
                rollouts[j] = out
    rollout_s = time.perf_counter() - t0

    # 3. judge and reward
    texts = [tokenizer.decode(r.text_tokens(), skip_special_tokens=True) for r in rollouts]  # without markers
    correct, rewards = [], []
    for j, (r, text) in enumerate(zip(rollouts, texts)):
        problem, (n_gold, mode) = batch[j // G], targets[j // G]
        ok = reward.judge(text, problem.answer, problem.multiple_choice, thinks, cfg.boxed_only)
        correct.append(ok)
        rewards.append(reward.lcpo_reward(ok, r.n_y, n_gold, mode, cfg.alpha, cfg.delta))
    rewards_t = torch.tensor(rewards, dtype=torch.float32)

    # 4. advantages; in the first --length-steps, the supervised rows instead: each (untrained) response's text
    # (without its stop token) ended after N of its tokens, N drawn from n_min to its length, under its own prompt
    # (Exact or Max) rewritten to ask for N. The same kind of text ended at every N is the contrast that
    # reading N needs, and the reward gives it only slowly; stop_loss's KL holds the rest of the text to the
    # untrained model's, the very texts learnt here.
    learnt = rollouts
    if supervised:
        text = [r.n_y - (r.finish == "eos") for r in rollouts]
        kept = [j for j in range(len(rollouts)) if text[j] >= cfg.n_min]  # shorter ones cannot be ended at any N
        cut = [rng.randint(cfg.n_min, min(cfg.n_max, text[j])) for j in kept]
        modes = [targets[j // G][1] for j in kept]  # a Max prompt learns a length of N/2 to N (budget_nll)
        rows = [data.lcpo_prompt(tokenizer, batch[j // G], n, m, cfg.budget_in) for j, n, m in zip(kept, cut, modes)]
        learnt = [cut_at(rollouts[j], n, marker) for j, n in zip(kept, cut)]
        within = torch.tensor([m == "max" for m in modes], dtype=torch.bool)
    else:
        advantages = group_advantages(rewards_t, G, scale=cfg.loss_norm != "dr_grpo")  # [P * G]

    # 5. the loss, over micro-batches, epochs times. A row whose advantage is 0 (its group's rewards all equal:
    # under Max prompts, every group with no correct answer) adds nothing to the gradient unless the KL term is
    # on, so it is not passed; the normalisers still count every row, so the gradient is the same.
    t1 = time.perf_counter()
    model.train()
    batch_tokens = sum(r.n_y for r in learnt)
    passed = [j for j in range(len(rows)) if supervised or cfg.beta > 0 or advantages[j] != 0]
    micro = [[passed[i] for i in idx]
             for idx in micro_batches([len(rows[j]) + len(learnt[j].tokens) for j in passed], cfg.micro_batch_tokens)]
    if progress is not None:
        progress.set_description(f"step {step}: update", refresh=False)
        progress.unit = "micro-batch"
        progress.reset(total=len(micro) * (cfg.epochs + (cfg.beta > 0 and not supervised)))
    tensors = [pack([rows[j] for j in idx], [learnt[j] for j in idx], tokenizer.pad_token_id, device) for idx in micro]
    ref = []
    t_ref = time.perf_counter()
    for ids, mask, resp_mask, _ in tensors:  # the reference pass, once per rollout batch (stop_loss has its own)
        if cfg.beta > 0 and not supervised:
            with model_lib.reference(model):
                ref.append(response_logprobs(model, ids, mask, resp_mask, cfg.temperature))
            if progress is not None:
                progress.update()
        else:
            ref.append(None)
    if device.type == "cuda":  # let the reference pass finish before timing it
        torch.cuda.synchronize(device)
    reference_s, optimizer_s = time.perf_counter() - t_ref, 0.0
    sums = dict(kl=0.0, clipped=0.0, ratio=0.0, loss=0.0, stop_nll=0.0)
    updated, grad_norm = bool(torch.isfinite(rewards_t).all() and rows), float("nan")  # non-finite rewards: no passes
    for _ in range(cfg.epochs if updated else 0):
        optimizer.zero_grad(set_to_none=True)
        for idx, (ids, mask, resp_mask, old), ref_logp in zip(micro, tensors, ref):
            if supervised:  # the mean over rows of the length NLL + KL
                nll, kl = stop_loss(model, ids, mask, resp_mask.sum(-1).long(), tokenizer.eos_token_id,
                                    within=within[idx].to(device), marker=marker)
                loss = (nll + kl).sum() / len(rows)
            else:
                logp = response_logprobs(model, ids, mask, resp_mask, cfg.temperature)  # [b, R]
                loss_tok, kl, clipped = per_token_loss(logp, old, ref_logp, advantages[idx].to(device), cfg.clip,
                                                       cfg.beta)
                loss = normalise(loss_tok, resp_mask, cfg.loss_norm, batch_tokens, len(rows), cfg.max_new_tokens)
            if not torch.isfinite(loss):
                updated = False
                break
            loss.backward()
            if progress is not None:
                progress.update()
            with torch.no_grad():
                sums["loss"] += loss.item()
                if supervised:
                    sums["kl"] += kl.sum().item()
                    sums["stop_nll"] += nll.sum().item()
                    continue
                sums["kl"] += (kl * resp_mask).sum().item()
                sums["clipped"] += (clipped * resp_mask).sum().item()
                sums["ratio"] += (torch.exp(logp - old) * resp_mask).sum().item()
        if updated:
            for p in params:  # a row-less pass still steps, as a pass of zero advantages would (Adam's momentum)
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            for group in optimizer.param_groups:  # linear warm-up, then constant
                group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
            updated = math.isfinite(grad_norm)
        if not updated:  # a non-finite loss or gradient: skip the update, keep the weights
            optimizer.zero_grad(set_to_none=True)
            break
        t_opt = time.perf_counter()
        optimizer.step()
        optimizer_s += time.perf_counter() - t_opt
        if not all(torch.isfinite(p).all() for p in params):  # nothing after this could be saved or trusted
            raise RuntimeError(f"the update of step {step} made the adapter's weights non-finite: start a new run "
                               f"with a lower --lr (now {cfg.lr}), from the last checkpoint with --init-adapter")
    train_s = time.perf_counter() - t1

    # 6. what happened
    n_y = [r.n_y for r in rollouts]
    n_gold = [targets[j // G][0] for j in range(len(rollouts))]
    passed_tokens = sum(learnt[j].n_y for j in passed)
    denom = max(1, passed_tokens) * (cfg.epochs if updated else 1)  # the ratio and clip metrics: the passed rows
    sampled = [lp for r in rollouts for lp in r.logprobs if math.isfinite(lp)]  # the model's own tokens
    under = [y <= g for j, (y, g) in enumerate(zip(n_y, n_gold)) if targets[j // G][1] == "max"]  # within budget
    metrics = dict(
        step=step, updated=updated, loss=sums["loss"] / cfg.epochs,
        reward_mean=rewards_t.mean().item(), reward_std=rewards_t.std().item(),
        accuracy=sum(correct) / len(correct), mean_n_gold=sum(n_gold) / len(n_gold), mean_n_y=sum(n_y) / len(n_y),
        length_error=sum(abs(y - g) / g for y, g in zip(n_y, n_gold)) / len(n_y),
        length_slope=length_slope(n_gold, n_y),
        within_budget=sum(under) / len(under) if under else None,  # of the Max prompts' responses
        stopped_by_length=sum(r.finish == "length" for r in rollouts) / len(rollouts),
        kl=sums["kl"] / denom, clip_fraction=sums["clipped"] / denom if passed else None,
        ratio_mean=sums["ratio"] / denom if passed else None,
        entropy_proxy=-sum(sampled) / max(1, len(sampled)),  # mean -log p of the sampled tokens, at sampling
        passed_rows=len(passed), grad_norm=grad_norm,
        rollout_tokens_per_s=sum(n_y) / rollout_s, train_tokens_per_s=passed_tokens * cfg.epochs / train_s,
        peak_memory_mb=peak_memory_mb(device), rollout_s=rollout_s, reference_s=reference_s,
        policy_s=train_s - reference_s - optimizer_s, optimizer_s=optimizer_s,
    )
    if supervised:  # stop_nll: -log p(its length) per learnt row, under the prompt asking for it (kl: per token)
        metrics.update(stop_nll=sums["stop_nll"] / max(1, len(rows)) / (cfg.epochs if updated else 1),
                       length_rows=len(rows), clip_fraction=None, ratio_mean=None, entropy_proxy=None)  # LCPO's alone
    examples = [dict(prompt=tokenizer.decode(prompts[j // G]), response=tokenizer.decode(rollouts[j].tokens), n_y=n_y[j], n_gold=n_gold[j],
                     correct=correct[j], reward=rewards[j]) for j in range(0, len(rollouts), G)]
    return metrics, examples


def micro_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Row indices in micro-batches of similar length, each at most max_tokens once padded (rows x longest).

    Memory follows the tokens of a micro-batch, not its rows: many short rows or a few long ones.
    A row longer than max_tokens goes alone.
    """
    batches, current = [], []
    for j in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        if current and (len(current) + 1) * lengths[j] > max_tokens:  # sorted: row j is the longest so far
            batches.append(current)
            current = []
        current.append(j)
    return batches + [current] if current else batches


def pack(prompts: list[list[int]], rollouts, pad_id: int, device):
    """Left-padded prompt + response rows: (ids [b, T], mask [b, T], response mask [b, R], old log-probs [b, R]).

    R is the longest response; every row's response ends at the last column. The response mask leaves out
    the budget markers: they are read, not learnt.
    """
    ids, mask = sample.left_pad([p + r.tokens for p, r in zip(prompts, rollouts)], pad_id, device)
    longest = max(len(r.tokens) for r in rollouts)
    resp_mask = torch.zeros((len(prompts), longest))
    old = torch.zeros((len(prompts), longest))
    for i, r in enumerate(rollouts):
        start = longest - len(r.tokens)
        resp_mask[i, start:] = 1
        resp_mask[i, [start + m for m in r.marks]] = 0
        old[i, start:] = torch.tensor(r.logprobs).nan_to_num(0.0)  # a marker's nan: no log-prob, masked out
    return ids, mask, resp_mask.to(device), old.to(device)


def cut_at(rollout: sample.Rollout, n: int, marker: sample.BudgetMarker | None) -> sample.Rollout:
    """The first n tokens of a response's own text, as a row of --length-steps asking for n: with markers,
    they count down from n (not from the N the response was sampled under), and one follows an n-th
    token that falls on the interval, where the model's next decision comes after it."""
    if marker is None:
        return sample.Rollout(rollout.tokens[:n], rollout.logprobs[:n], "length")
    marked = set(rollout.marks)
    own = [(t, lp) for i, (t, lp) in enumerate(zip(rollout.tokens, rollout.logprobs)) if i not in marked][:n]
    tokens, marks = marker.insert([t for t, _ in own], n)
    logprobs, marked = iter(lp for _, lp in own), set(marks)
    return sample.Rollout(tokens, [math.nan if i in marked else next(logprobs) for i in range(len(tokens))], "length",
                          marks)


def response_logprobs(model, ids, mask, resp_mask, temperature: float) -> torch.Tensor:
    """Log-probs of the response tokens only: the last R columns of sample.sequence_logprobs. [b, R]"""
    return sample.sequence_logprobs(model, ids, mask, temperature)[:, -resp_mask.shape[1]:]


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[Config, Path, bool]:
    """Flags from the Config fields (--group-size 8, --no-quantize, ...), a preset under them, or --resume."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--preset", default="default", help=f"one of {', '.join(PRESETS)}")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this run from its last checkpoint")
    comments = dict(re.findall(r"^    (\w+): .*?  # (.*)$", inspect.getsource(Config), re.M))  # the knob's comment
    for f in dataclasses.fields(Config):
        flag, help = "--" + f.name.replace("_", "-"), f"{comments[f.name]} (default: {f.default})"
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:  # int, float, str, or one of them | None
            kind = next(t for t in typing.get_args(f.type) or (f.type,) if t is not type(None))
            parser.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper(), help=help)
    args = parser.parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}

    if args.resume is not None:
        run_dir = Path(args.resume)
        saved = saved_config(run_dir)
        changed = sorted(k for k, v in given.items() if k not in RESUMABLE and v != saved.get(k))
        if changed:
            raise ValueError(f"--resume continues {run_dir} with its own settings: drop "
                             f"{', '.join('--' + k.replace('_', '-') for k in changed)}, or start a new run with "
                             f"--run-name (and --init-adapter {run_dir} to start from its weights)")
        cfg = Config(**{**saved, **given})
        check_config(cfg)
        return cfg, run_dir, True
    if args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}: use one of {', '.join(PRESETS)}")
    cfg = Config(**{**PRESETS[args.preset], **given})
    if cfg.init_adapter == "none":
        cfg.init_adapter = None
    elif cfg.init_adapter is None and cfg.model is None:  # the recipe: LCPO from the stop that reads N
        cfg.init_adapter = str(STOP_ADAPTER)
    check_config(cfg)
    cfg.run_name = cfg.run_name or run_name(args.preset, given)
    run_dir = Path(cfg.out_dir) / cfg.run_name
    if not (run_dir / "config.json").exists():
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ValueError(f"{run_dir} exists and is not a run (no config.json): pass another --run-name")
        return cfg, run_dir, False
    saved = saved_config(run_dir)
    changed = sorted(k for k in saved if k not in RESUMABLE and saved[k] != getattr(cfg, k))
    if changed:
        raise ValueError(f"{run_dir} holds a run with other settings ({', '.join(f'{k} {saved[k]!r}' for k in changed)})"
                         f": pass another --run-name for a new run, or --resume {run_dir} to continue that one")
    return cfg, run_dir, True  # the same command again: continue the run


def run_name(preset: str, given: dict) -> str:
    """A run's default name: the preset and the flags that change what is trained, so that the same
    command names the same run (and resumes it), and an ablation gets its own.

        >>> run_name("default", {}), run_name("default", {"alpha": 0.001, "steps": 50, "model": "Qwen/Qwen2.5-0.5B"})
        ('default', 'default-alpha-0.001-model-Qwen2.5-0.5B')
    """
    parts = [preset]
    for key, value in sorted(given.items()):
        if key not in RESUMABLE:
            if isinstance(value, bool):
                parts.append(key.replace("_", "-") if value else "no-" + key.replace("_", "-"))
            else:
                parts += [key.replace("_", "-"), Path(str(value)).name or str(value)]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts))
    return name if len(name) <= 100 else f"{name[:80]}-{zlib.crc32(name.encode()):08x}"


def saved_config(run_dir: Path) -> dict:
    """A run's config.json, checked against the settings this train.py knows."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a run directory (no config.json)")
    try:
        saved = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} cannot be read ({e}): it is damaged; restore it or start a new run") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} is not a train.py config (a JSON object of settings)")
    unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(Config)})
    if unknown:
        raise ValueError(f"{path} has settings this train.py does not know ({', '.join(unknown)}): it was written by "
                         f"another version; remove them from the file, or start a new run")
    return saved


def main(argv: list[str] | None = None) -> None:
    try:
        cfg, run_dir, resume = parse_args(argv)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(json.dumps(dataclasses.asdict(cfg), indent=1))
    model_lib.set_threads()
    print(f"{'continuing' if resume else 'new'} run: {run_dir}")
    try:
        train(cfg, run_dir, resume)
    except (ValueError, model_lib.ModelError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # a second Ctrl-C: the step in progress is lost, the last checkpoint is not
        sys.exit(130)


if __name__ == "__main__":
    main()
