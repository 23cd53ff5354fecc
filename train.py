"""
LCPO: GRPO with a length-controlled reward, written by hand.

    python train.py                                   # LCPO-Exact on the reasoner, on a CPU: runs/default
    python train.py --init-adapter none               # the same from a fresh adapter, not from the route stage
    python train.py --mode mix                        # L1-Max style: half Exact, half Max prompts
    python train.py --alpha 0.05                      # an alpha ablation: runs/default-alpha-0.05
    python train.py --preset chat                     # the embedded chat model on word problems: runs/chat
    python train.py --preset l1-exact                 # the paper's settings, 1.5B model, one GPU
    python train.py --alpha 0.001 --steps 200         # the same command again continues its run (here, longer)

One step (train_step): sample problems and targets -> roll out G responses each -> judge and reward
them -> group-normalised advantages -> clipped policy loss + k3 KL to the adapter-free reference ->
one AdamW update of the LoRA weights (per epoch over the rollouts). The first --distill-steps, then
--length-steps, then --route-steps steps are this project's first stages instead (stage1.py), not the paper's:
they make a small model a reasoner (written-out solutions distilled into it) and teach it to read N (its stop,
or its choice among its own routes).
Run directories, resuming and checkpoints: runs.py.
"""

import dataclasses
import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while the libraries below load: quit quietly (main takes Ctrl-C over)
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import torch

import data
import model as model_lib
import reward
import runs
import sample
import shared_prompts
import stage1
from data import N_MAX, N_MIN  # the default range of targets (data.py previews the same)

# The stage before LCPO of each recipe, done once and shipped, by the model it is for: an unset --init-adapter on
# that model starts from it (the README's "Training" makes them; EXPERIMENTS.md says why LCPO alone does not).
RESULTS = Path(__file__).resolve().parent / "results"
ROUTE_ADAPTER = RESULTS / "route-adapter"  # the reasoner's (--model reasoner): its route follows N
STOP_ADAPTER = RESULTS / "stage1-adapter"  # the embedded chat model's: its stop reads N
FIRST_STAGES = {"reasoner": ROUTE_ADAPTER, None: STOP_ADAPTER}


@dataclass
class Config:
    # what to train
    model: str | None = None  # hub id or local directory; None: the embedded SmolLM2-135M-Instruct
    data: str = "builtin"  # builtin, a known set (data.KNOWN_SETS), a hub id or a local file
    problem_column: str = "problem"  # the dataset's problem column
    answer_column: str = "answer"  # the dataset's gold answer column
    init_adapter: str | None = None  # adapter or run to start from; none: fresh; unset: the model's FIRST_STAGES
    # the LCPO reward
    mode: str = "exact"  # exact, max, or mix (L1-Max: each prompt Exact or Max with probability 1/2)
    # alpha: the paper's 0.0003, x 25 for targets 25x shorter than the paper's
    alpha: float | None = 0.0075  # reward per token of length error; None: the paper's, 0.0003 exact, 0.001 max
    delta: float = 0.5  # Max reward of a correct answer at exactly n_gold tokens
    n_min: int = N_MIN  # smallest target length n_gold, tokens
    n_max: int = N_MAX  # largest target length n_gold, tokens
    distill_steps: int = 0  # first steps that distil written-out solutions (stage1.py; builtin:totals): a reasoner
    length_steps: int = 0  # first steps that teach the stop to read N (stage1.py: texts cut at N learn to stop)
    route_steps: int = 0  # then steps that teach the route to follow N (stage1.py; --mode max: the written routes)
    keep_route: bool = False  # --mode max: a route-stage step after each LCPO step, which keeps its reading of N
    targets_per_problem: int = 1  # k targets per problem, one per k-th of the range: responses differ by N alone
    boxed_only: bool = False  # judge only \boxed{} answers (the paper); off: the last number counts too
    # GRPO
    group_size: int = 4  # G: responses per prompt
    prompts_per_step: int = 8  # prompts per update (x G responses)
    epochs: int = 1  # mu: optimisation passes over each batch of rollouts
    clip: float = 0.2  # epsilon of the clipped ratio
    beta: float = 0.0  # weight of the k3 KL to the reference (paper: 0.001, a ~1e-7 term here); 0: no reference pass
    loss_norm: str = "token"  # token (DAPO/verl), grpo (per-sequence mean) or dr_grpo (sum / max length)
    temperature: float = 0.7  # sampling temperature, also of the log-probs (no top-p: the loss scores the full softmax)
    max_new_tokens: int = 192  # response cap
    # optimisation
    lr: float = 2e-4  # AdamW learning rate of the LoRA weights
    grad_clip: float = 1.0  # max gradient norm
    steps: int = 40  # updates in the whole run
    micro_batch_tokens: int = 1024  # padded tokens per forward/backward: rows are packed up to it, by length
    rollout_batch: int = 64  # rows per generation batch (rows with similar targets batched together)
    rollout_copy: bool = True  # generate with a dense copy (base dequantized, LoRA merged): faster, + the base's size
    share_prompts: bool = True  # the loss pass reads a group's prompt once (shared_prompts.py): faster, the same loss
    lora_rank: int = 16  # LoRA r
    lora_alpha: int = 32  # LoRA scaling numerator
    quantize: bool = True  # 4-bit NF4 base (off: full precision)
    gradient_checkpointing: bool = True  # recompute activations in backward: far less memory, little time
    # bookkeeping
    seed: int = 0  # everything random derives from it (problems, targets, sampling)
    out_dir: str = "runs"  # where run directories go
    run_name: str | None = None  # default: preset and flags given (default-alpha-0.001): the same command resumes it
    save_every: int = 10  # steps between checkpoints
    keep_checkpoints: int = 3  # the newest ones kept
    sample_every: int = 5  # steps between saved example responses
    max_bad_steps: int = 5  # steps in a row that update nothing (a non-finite loss, a zero gradient) before a stop


_PAPER = dict(model="agentica-org/DeepScaleR-1.5B-Preview", data="deepscaler", n_min=100, n_max=4000, group_size=16,
              prompts_per_step=128, temperature=0.6, max_new_tokens=4096, beta=0.001, boxed_only=True,
              micro_batch_tokens=16384, rollout_batch=64, gradient_checkpointing=True, lora_rank=64, lora_alpha=128,
              save_every=5, lr=1e-5)  # the paper's lr, 1e-6, was for full fine-tuning: LoRA needs a larger step
# the CPU recipe: the shipped reasoner (model.reasoner_model_dir) on its problems, full precision (135M)
_REASONER = dict(model="reasoner", data="builtin:totals", n_min=16, n_max=128, alpha=0.02, lr=1e-4,
                 targets_per_problem=4, lora_rank=32, lora_alpha=64, quantize=False)
PRESETS = {
    "default": _REASONER,  # LCPO on the reasoner, from its route stage: the trade-off shows (README)
    "chat": {},  # the embedded chat model on word problems, from its stop stage: a dial, no trade-off
    "l1-exact": {**_PAPER, "mode": "exact", "alpha": 0.0003},  # the paper's runs, a 1.5B model on one GPU
    "l1-max": {**_PAPER, "mode": "mix", "alpha": None},  # each mode at its own alpha (0.0003 / 0.001)
}


# -----------------------------------------------------------------------------
# the GRPO pieces


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


# -----------------------------------------------------------------------------
# one step


def train_step(cfg: Config, step: int, model, tokenizer, optimizer, params, problems, device, sampler, progress=None):
    """One GRPO update, the paper's steps in order, seeded by (seed, step): a resumed run repeats it exactly.
    sampler: what generates the rollouts, `model` or its dense copy. progress: a tqdm bar for the work inside."""
    # 1-3. problems with a target n_gold each in the paper's prompt, G responses to each, each judged and rewarded
    batch = sample.roll_out(cfg, step, sampler, tokenizer, problems, progress=progress)
    rewards = torch.tensor(batch.rewards, dtype=torch.float32)  # [P * G]

    # 4. advantages, within each group of G
    advantages = group_advantages(rewards, cfg.group_size, scale=cfg.loss_norm != "dr_grpo")  # [P * G]

    # 5. the clipped policy loss + beta x KL per token, summed over micro-batches, then an AdamW step; epochs times.
    # A row of advantage 0 (its group's rewards all equal) adds nothing to the gradient unless the KL term is on:
    # it is not passed (the normalisers still count it, so the gradient is the same)
    model.train()
    loss_rows = [j for j in range(len(rewards)) if cfg.beta > 0 or advantages[j] != 0]
    LossBatches = shared_prompts.SharedBatches if cfg.share_prompts else sample.LossBatches  # speed-up: prompts once
    micro = LossBatches(model, batch.prompt_ids, batch.rollouts, loss_rows, cfg.micro_batch_tokens,
                        pad_id=tokenizer.pad_token_id)  # each micro-batch built when it is reached
    log = runs.StepLog(device, progress, micro_batches=len(micro) * cfg.epochs)
    reference = [None] * len(micro)
    if cfg.beta > 0:  # the KL's reference: the same model with its adapter off (it does not change: once a step)
        with model_lib.reference(model):
            reference = [micro.logprobs(model, inputs, cfg.temperature) for _, inputs, _, _ in micro]
    log.lap("reference")
    response_tokens = sum(r.n_y for r in batch.rollouts)
    for _ in range(cfg.epochs):
        optimizer.zero_grad(set_to_none=True)
        for (rows, inputs, resp_mask, old), ref_logp in zip(micro, reference):
            logp = micro.logprobs(model, inputs, cfg.temperature)  # [b, R]
            loss_tok, kl, clipped = per_token_loss(logp, old, ref_logp, advantages[rows].to(device), clip=cfg.clip,
                                                   beta=cfg.beta)
            loss = normalise(loss_tok, resp_mask, how=cfg.loss_norm, batch_tokens=response_tokens,
                             batch_rows=len(rewards), max_new_tokens=cfg.max_new_tokens)
            loss.backward()
            log.add(loss=loss, kl=kl * resp_mask, clipped=clipped * resp_mask, ratio=(logp - old).exp() * resp_mask)
        log.lap("policy")
        grad_norm = model_lib.optimizer_step(optimizer, params, cfg.grad_clip)
        log.lap("optimizer")
        if not grad_norm:  # a zero or non-finite (None; a non-finite reward makes one) gradient: the weights kept
            break

    # 6. what happened
    metrics = step_metrics(cfg, step, batch, log, loss_rows, grad_norm, device)
    return metrics, runs.examples(tokenizer, batch, every=cfg.group_size)


# -----------------------------------------------------------------------------
# the loop


def train(cfg: Config, run_dir: Path, resume: bool = False, on_step=None) -> Path:
    """Train until cfg.steps updates are done; returns the run directory. on_step(step, metrics) is for tests.

    Ctrl-C or a kill finishes the step, saves a checkpoint and returns; a second Ctrl-C quits at once.
    """
    # split None: the set's own (train for the built-in one, e.g. test for math500)
    problems = data.load_problems(cfg.data, None, cfg.problem_column, cfg.answer_column, seed=cfg.seed)
    writes_out = cfg.distill_steps or ((cfg.route_steps or cfg.keep_route) and cfg.mode == "max")  # written solutions
    if writes_out and not all(p.solutions for p in problems):
        stage = "--distill-steps" if cfg.distill_steps else "--route-steps or --keep-route with --mode max"
        raise ValueError(f"{stage} needs problems with written-out solutions, and {cfg.data} has none: use "
                         f"--data builtin:totals")
    with runs.open_run(run_dir, cfg, resume, problems) as state:  # this process's alone until it returns
        return train_loop(cfg, run_dir, state, problems, on_step)


def train_loop(cfg: Config, run_dir: Path, state: dict | None, problems: list, on_step=None) -> Path:
    """The steps from `state` (a checkpoint's, or None: step 0) to cfg.steps, saving checkpoints on the way."""
    start = state["step"] if state else 0
    if start >= cfg.steps:
        print(f"{run_dir} has done its {start} steps: pass --steps with more to continue it")
        return run_dir
    torch.manual_seed(cfg.seed)  # the new adapter's initial weights
    model, tokenizer = model_lib.load_model(
        cfg.model, adapter=str(state["adapter"]) if state else cfg.init_adapter, quantize=cfg.quantize,
        lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, gradient_checkpointing=cfg.gradient_checkpointing)
    trained_on = runs.problems_id(problems)  # saved with each checkpoint: a resume must see the same problems
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None:  # a problem too long for the model is skipped now, not found when it is drawn
        problems = data.within_context(problems, tokenizer, context - cfg.max_new_tokens, cfg.n_max, cfg.data)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    if state is not None:
        restore(optimizer, state)
    device = next(model.parameters()).device
    print(f"training {model.lcpo_base} on {len(problems)} problems of {cfg.data}; run: {run_dir}"
          + (f", resumed at step {start}" if start else ""))

    from tqdm import tqdm

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="steps", dynamic_ncols=True)
    work = tqdm(total=cfg.prompts_per_step * cfg.group_size, desc=f"step {start}", unit="response", position=1,
                leave=False, dynamic_ncols=True)  # the work inside a step: responses finished, micro-batches learnt
    stalled, sampler = [], None  # the grad norms of the steps in a row that updated nothing
    try:
        with runs.StopRequests() as stop:
            for step in bar:
                work.set_description(f"step {step}", refresh=False)
                if step < cfg.distill_steps:  # the first stages (stage1.py), not the paper's
                    metrics, examples = stage1.distill_step(cfg, step, model, tokenizer, optimizer, params, problems,
                                                            device, work)
                elif step < cfg.distill_steps + cfg.length_steps:
                    metrics, examples = stage1.length_step(cfg, step, model, tokenizer, optimizer, params, problems,
                                                           device, work)
                elif step < cfg.distill_steps + cfg.length_steps + cfg.route_steps:
                    metrics, examples = stage1.route_step(cfg, step, model, tokenizer, optimizer, params, problems,
                                                          device, work)
                else:
                    sampler = model_lib.rollout_copy(model, sampler) if cfg.rollout_copy else model  # today's weights
                    metrics, examples = train_step(cfg, step, model, tokenizer, optimizer, params, problems, device,
                                                   sampler, work)
                    if cfg.keep_route:  # not the paper's: the Max route stage's loss goes on (stage1.route_step)
                        kept, _ = stage1.route_step(cfg, step, model, tokenizer, optimizer, params, problems, device,
                                                    work)
                        metrics["route_decision_nll"] = kept["decision_nll"]
                record(cfg, run_dir, step, metrics, examples, bar)
                if on_step is not None:
                    on_step(step, metrics)
                if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps or stop.asked:
                    runs.save_checkpoint(run_dir, step + 1, model, optimizer, cfg.keep_checkpoints, trained_on)
                if stop.asked:
                    bar.write(f"stopped and saved at step {step + 1}; the same command continues the run")
                    break
                stalled = [] if metrics["updated"] else stalled + [metrics["grad_norm"]]  # 0, or nan: non-finite
                check_stalled(stalled, cfg.max_bad_steps, run_dir)
    finally:
        work.close()
        bar.close()
    return run_dir


# -----------------------------------------------------------------------------
# bookkeeping, apart from the algorithm: a step's metrics, the loop's records


def step_metrics(cfg: Config, step: int, batch: sample.Batch, log: runs.StepLog, loss_rows: list[int],
                 grad_norm: float | None, device) -> dict:
    """train_step's metrics, from what it logged: its rollouts, the sums over the response tokens the loss pass
    saw (per token: ratio, clip fraction, KL), and the seconds of each phase."""
    updated = bool(grad_norm)
    seen = sum(batch.rollouts[j].n_y for j in loss_rows)
    per_token = max(1, seen) * (cfg.epochs if updated else 1)
    sums, seconds = log.sums, log.seconds
    train_s = seconds["reference"] + seconds["policy"] + seconds["optimizer"]
    return dict(
        step=step, updated=updated, loss=sums["loss"] / cfg.epochs, **runs.rollout_metrics(batch),
        kl=sums["kl"] / per_token, clip_fraction=sums["clipped"] / per_token if loss_rows else None,
        ratio_mean=sums["ratio"] / per_token if loss_rows else None, passed_rows=len(loss_rows),
        grad_norm=grad_norm if grad_norm is not None else float("nan"),
        rollout_tokens_per_s=sum(r.n_y for r in batch.rollouts) / batch.rollout_s,
        train_tokens_per_s=seen * cfg.epochs / train_s, peak_memory_mb=model_lib.peak_memory_mb(device),
        rollout_s=batch.rollout_s, reference_s=seconds["reference"], policy_s=seconds["policy"],
        optimizer_s=seconds["optimizer"],
    )


def restore(optimizer, state: dict) -> None:
    """A checkpoint's AdamW moments and torch RNG state, or one line saying which checkpoint to delete."""
    try:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"the optimizer or RNG state of {state['adapter'].parent} does not fit its adapter "
                         f"({type(e).__name__}: {data.first_line(e)}): "
                         f"delete that checkpoint to resume from the one before it") from None


def record(cfg: Config, run_dir: Path, step: int, metrics: dict, examples: list[dict], bar) -> None:
    """A step's metrics (metrics.jsonl), every sample_every-th step's examples (samples.jsonl), and the bar's
    summary of it."""
    runs.append_jsonl(run_dir / "metrics.jsonl", metrics)
    if step % cfg.sample_every == 0:
        runs.append_jsonl(run_dir / "samples.jsonl", {"step": step, "examples": examples})
    if "decision_nll" in metrics:  # a route step: its two losses (its rollouts are the starting model's)
        shown = dict(decision=f"{metrics['decision_nll']:.3f}", text=f"{metrics['text_nll']:.3f}")
    elif "reward_mean" in metrics:
        shown = dict(reward=f"{metrics['reward_mean']:.3f}", acc=f"{metrics['accuracy']:.2f}",
                     len_err=f"{metrics['length_error']:.2f}")
    else:  # a distillation step: no rollouts, the solutions' loss
        shown = dict(nll=f"{metrics['loss']:.3f}")
    if not metrics["updated"]:
        shown["update"] = "none"
    bar.set_postfix(shown)


def check_stalled(stalled: list, max_bad_steps: int, run_dir: Path) -> None:
    """Stop a run whose last max_bad_steps steps updated nothing (stalled: their grad norms, 0 or nan), with
    the cause: a zero gradient every time, or non-finite losses or rewards."""
    if len(stalled) >= max_bad_steps and all(g == 0 for g in stalled):
        raise RuntimeError(f"{len(stalled)} steps in a row learnt nothing (a zero gradient: in every group the "
                           f"rewards tied, or no response reached --n-min for a length step): let the responses "
                           f"differ, with a larger --group-size, --temperature or --max-new-tokens, or problems the "
                           f"model can sometimes answer")
    if len(stalled) >= max_bad_steps:
        raise RuntimeError(f"{len(stalled)} steps in a row updated nothing, {sum(g != 0 for g in stalled)} of them "
                           f"with a non-finite loss or reward: check the data, or start a new run with a lower --lr "
                           f"and --init-adapter {run_dir} (its last checkpoint)")


def parse_args(argv: list[str] | None = None) -> tuple[Config, Path, bool]:
    """(Config, run directory, resume?) from the command line: runs.parse_args with this file's Config."""
    return runs.parse_args(argv, Config, PRESETS, __doc__.split("\n\n")[0].strip(), FIRST_STAGES)


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C from here on: the handling below
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
    except OSError as e:  # a full disk or a permission taken away mid-run: the last checkpoint is intact
        kept = "the run's last checkpoint is kept" if any(run_dir.glob("checkpoints/step-*")) else \
            "no checkpoint was saved yet"
        sys.exit(f"error: cannot write {e.filename or run_dir} ({e.strerror or e}): {kept}; fix it, then the same "
                 f"command continues")
    except KeyboardInterrupt:  # a second Ctrl-C: the step in progress is lost, the last checkpoint is not
        sys.exit(130)


if __name__ == "__main__":
    main()
