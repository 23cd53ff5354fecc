"""
The first stage: this project's addition to the paper, not part of LCPO.

Why it exists. The paper starts from a 1.5B reasoning model; our embedded default is a 135M model.
LCPO's reward alone teaches it to stop, but not to read N: its length barely moves with N. So the stop
decision is taught first, directly, by a supervised loss: the untrained model's own responses, each
ended after N of its tokens, learn to stop there under a prompt rewritten to ask for N. Such steps
(train.py --length-steps) make a stop that reads N, and LCPO steps from there make the shipped L1-Exact
(the measurements of each: EXPERIMENTS.md). The recipe runs it once and ships the result as
results/stage1-adapter, where `python train.py` starts.

    python train.py --init-adapter none --length-steps 400 --steps 240 --lr 1e-3 --no-quantize   # the first stage
    python eval.py --stop-probe results/probe-texts.records.jsonl --limit 96 --budgets 32 64 96 128 --adapter DIR

The loss (stop_loss): -log p(the text ends after exactly N tokens), from the stop token's probability
after each token (length_nll; a Max prompt: after N/2 to N tokens, budget_nll), plus a KL to the
untrained model over the text's other tokens, which holds the text itself. The probe (stop_probe,
length_scores) reads the same stop probabilities on fixed texts, without sampling: the low-noise test
of whether a model reads N.

Two more stages for a reasoner (builtin:totals): distill_step writes one (written-out solutions distilled into
the model, as R1's reasoning was into the paper's starting model); route_step teaches it to choose among its
own routes by N (its correct texts, each under the N closest to its length), where LCPO then takes over; under
Max prompts, from L1-Exact, the longest written-out route within N (L1-Max's stage).
"""

import math
import random

import torch
from torch.utils.checkpoint import checkpoint

import data
import model as model_lib
import runs
import sample

# -----------------------------------------------------------------------------
# the likelihood of a length, from the stop token's log-probability after each token


def length_nll(stop_logp: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """-log p(a length of exactly n tokens), from log p(stop) after each token, right-aligned: column -1 is
    after the n-th token, column -1-k after the (n-k)-th; columns before the first token are not read.

        -log p(stop after n) - sum over t < n of log p(no stop after t)

    stop_logp [rows, R], n [rows] with 1 <= n <= R. Returns [rows].

        >>> round(length_nll(torch.tensor([[0.9, 0.5, 0.5, 0.5]]).log(), torch.tensor([3])).item(), 3)  # 3 log 2
        2.079
    """
    return -(stop_logp[:, -1] + (log_no_stop(stop_logp) * before_the_end(stop_logp, n)).sum(-1))


def log_no_stop(stop_logp: torch.Tensor) -> torch.Tensor:
    """log p(not the stop token) from log p(stop), finite where the stop is certain."""
    return torch.log1p(-stop_logp.exp().clamp(max=1 - 1e-6))


def before_the_end(columns: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """[rows, R] True at the columns after tokens 1..n-1 of each row, in length_nll's right-aligned layout
    (column -1 after the n-th token): where the text goes on."""
    R = columns.shape[-1]
    tokens_after = torch.arange(R - 1, -1, -1, device=columns.device)  # how many tokens come after this column
    return (tokens_after >= 1) & (tokens_after < n.to(columns.device)[:, None])


def budget_nll(stop_logp: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """-log p(a length within the budget n and over half of it): the Max prompts' counterpart of
    length_nll, in the same layout. Without the floor, ending at once would be the likeliest length
    within any budget.

        -log p(no stop after tokens 1..n//2) - log p(a stop after one of tokens n//2+1..n)

        >>> round(budget_nll(torch.tensor([[0.5, 0.5, 0.5, 0.5]]).log(), torch.tensor([4])).item(), 3)  # 1/4 * 3/4
        1.674
    """
    go_on = log_no_stop(stop_logp)
    tokens_after = torch.arange(stop_logp.shape[-1] - 1, -1, -1, device=stop_logp.device)[None]  # n - t at token t
    half = (n - n // 2).to(stop_logp.device)[:, None]  # tokens n//2+1..n have n - t < half
    late = tokens_after < half
    survive = (go_on * (before_the_end(stop_logp, n) & ~late)).sum(-1)  # no stop after tokens 1..n//2
    return -(survive + torch.log(-torch.expm1((go_on * late).sum(-1).clamp(max=-1e-6))))


def stop_loss(model, ids: torch.Tensor, mask: torch.Tensor, n: torch.Tensor, eos_id: int,
              chunk: int = sample.LOGPROB_CHUNK,
              within: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The supervised length loss (--length-steps) of rows that are a prompt asking for N followed by the
    first N tokens of a response, left-padded (every row ends at the last column): ([rows] length NLL,
    [rows] KL).

    length NLL: the text ended after exactly N tokens (length_nll); in the rows where `within` [rows] is
    True (Max prompts), after N/2 to N tokens (budget_nll). KL: sum over t < N of
    KL(untrained || model) of the next token after t tokens given that it is not the stop; it holds the
    text itself, which the NLL alone lets drift (into blank lines, measured), and leaves the stop to the
    NLL (a KL over the full distribution also pulls the stop back to the untrained one: measured, it
    slows the length down). The fp32 log-softmax runs `chunk` positions at a time and is recomputed in
    backward, like sample.sequence_logprobs.
    """
    R = int(n.max())  # response columns of the longest row
    positions = sample.position_ids(mask)
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
    exactly = length_nll(stop, n)
    nll = exactly if within is None else torch.where(within, budget_nll(stop, n), exactly)
    return nll, (kl * before_the_end(kl, n)).sum(-1)


# -----------------------------------------------------------------------------
# a length step


def length_step(cfg, step: int, model, tokenizer, optimizer, params, problems, device, progress=None):
    """One step of the first stage, in train.py's place (train_step's rollouts, metrics and seeds).

    The untrained model (the adapter off) answers the step's prompts, up to n_max tokens; each response
    longer than n_min is ended after N of its tokens, N ~ UniformInt(n_min, its length), under its own
    prompt (Exact or Max) rewritten to ask for N, and stop_loss learns the stop there. The texts come from
    the untrained model because from the policy's own the stop collapsed: within a few steps no text was
    long enough to end at any N (EXPERIMENTS.md).
    """
    with model_lib.reference(model):  # the untrained model's texts
        batch = sample.roll_out(cfg, step, model, tokenizer, problems, progress=progress,
                                max_new_tokens=min(cfg.max_new_tokens, cfg.n_max))

    # the rows: a response's text (without its stop token) ended after N of its tokens, under a prompt asking for N
    text = [r.n_y - (r.finish == "eos") for r in batch.rollouts]
    kept = [j for j in range(len(text)) if text[j] >= cfg.n_min]  # shorter ones cannot be ended at any N
    cut = [batch.rng.randint(cfg.n_min, min(cfg.n_max, text[j])) for j in kept]
    modes = [batch.targets[j][1] for j in kept]  # a Max prompt learns a length of N/2 to N (budget_nll)
    cut_prompts = [data.lcpo_prompt(tokenizer, batch.problems[j], n, m) for j, n, m in zip(kept, cut, modes)]
    learnt = [sample.Rollout(batch.rollouts[j].tokens[:n], batch.rollouts[j].logprobs[:n], "length")
              for j, n in zip(kept, cut)]
    within = torch.tensor([m == "max" for m in modes], dtype=torch.bool)

    # the mean over rows of the length NLL + KL, epochs times, then an AdamW step
    model.train()
    micro = sample.micro_batches([len(p) + r.n_y for p, r in zip(cut_prompts, learnt)], cfg.micro_batch_tokens)
    log = runs.StepLog(device, progress, micro_batches=len(micro) * cfg.epochs)
    tensors = [sample.pack([cut_prompts[j] for j in idx], [learnt[j] for j in idx], tokenizer.pad_token_id, device)
               for idx in micro]
    for _ in range(cfg.epochs):
        optimizer.zero_grad(set_to_none=True)
        for idx, (ids, mask, resp_mask, _) in zip(micro, tensors):
            nll, kl = stop_loss(model, ids, mask, resp_mask.sum(-1).long(), tokenizer.eos_token_id,
                                within=within[idx].to(device))
            loss = (nll + kl).sum() / len(cut_prompts)
            loss.backward()
            log.add(loss=loss, kl=kl, stop_nll=nll)
        log.lap("policy")
        grad_norm = model_lib.optimizer_step(optimizer, params, cfg.grad_clip)  # no rows: a zero gradient
        log.lap("optimizer")
        if not grad_norm:  # a zero or non-finite (None) gradient: no update, the weights kept
            break

    updated, tokens = bool(grad_norm), sum(r.n_y for r in learnt)
    epochs, train_s = cfg.epochs if updated else 1, log.seconds["policy"] + log.seconds["optimizer"]
    metrics = dict(
        step=step, updated=updated, loss=log.sums["loss"] / cfg.epochs, **runs.rollout_metrics(batch),
        kl=log.sums["kl"] / (max(1, tokens) * epochs), clip_fraction=None, ratio_mean=None,
        passed_rows=len(cut_prompts), grad_norm=grad_norm if grad_norm is not None else float("nan"),
        rollout_tokens_per_s=sum(r.n_y for r in batch.rollouts) / batch.rollout_s,
        train_tokens_per_s=tokens * cfg.epochs / train_s, peak_memory_mb=model_lib.peak_memory_mb(device),
        rollout_s=batch.rollout_s, reference_s=0.0, policy_s=log.seconds["policy"],
        optimizer_s=log.seconds["optimizer"],
        stop_nll=log.sums["stop_nll"] / max(1, len(cut_prompts)) / epochs,  # -log p(its length) per row, asked for it
        length_rows=len(cut_prompts),
    )
    metrics["entropy_proxy"] = None  # LCPO's alone
    return metrics, runs.examples(tokenizer, batch, every=cfg.group_size)


# -----------------------------------------------------------------------------
# the reasoner: written-out solutions distilled into the model


# how often each written-out solution is learnt, finest first (data.TOTALS_GRANULARITIES: one number a step, two,
# three, the answer alone): half fine steps, so that the reasoner left alone is accurate; the coarser ones often
# enough that every route stays in its repertoire for the route stage and LCPO to choose by N
SOLUTION_MIX = (0.5, 0.15, 0.15, 0.2)
# the share of solutions that go on to check themselves, as R1's traces do: sample.WAIT, CHECK, then the finest
# solution again. A way to spend more tokens on a problem, and what a model forced to think on (S1) then writes
CHECK_SHARE = 0.4
CHECK = ", let me check. "


def written_response(tokenizer, problem, solution: str, check: bool) -> list[int]:
    """What the reasoner is taught to say: `solution` (one of problem.solutions), then, if `check`, sample.WAIT and
    CHECK with the finest solution again, each piece tokenised alone ("Wait" gets its own tokens, as S1 inserts
    them), then the stop."""
    said = [solution] + ([sample.WAIT, CHECK + problem.solutions[0]] if check else [])
    return sum((tokenizer.encode(x, add_special_tokens=False) for x in said), []) + [tokenizer.eos_token_id]


def taught_routes(tokenizer, problem) -> list[list[int]]:
    """Every route the reasoner was taught for `problem`, as written_response gives it: each granularity, with and
    without its check."""
    checks = [False, True] if CHECK_SHARE else [False]
    return [written_response(tokenizer, problem, s, check) for s in problem.solutions for check in checks]


def max_routes(tokenizer, problem) -> list[list[int]]:
    """The routes a Max prompt chooses among: each granularity alone, and the finest with its check. Longer is more
    accurate among these, so the longest that fits N is the best answer within N. A check after a coarser solution
    is left out: its last answer is the finest solution's, which alone is shorter."""
    alone = [written_response(tokenizer, problem, s, False) for s in problem.solutions]
    return alone + ([written_response(tokenizer, problem, problem.solutions[0], True)] if CHECK_SHARE else [])


def route_floor(tokenizer, problems: list, budgets: list[int]) -> dict:
    """The relative RMSE of the length of a model that, for each problem and N, writes the route closest to N among
    those the reasoner was taught (each granularity, with and without its check): the best that a model choosing
    among its routes can do. {N: relative RMSE}; problems without written-out solutions are left out."""
    lengths = [[len(t) for t in taught_routes(tokenizer, p)] for p in problems if p.solutions]
    if not lengths:
        raise ValueError("the route floor needs problems with written-out solutions (--data builtin:totals)")
    errors = {n: [min(((m - n) / n for m in routes), key=abs) for routes in lengths] for n in budgets}
    return {n: math.sqrt(sum(e * e for e in errs) / len(errs)) for n, errs in errors.items()}


def distill_step(cfg, step: int, model, tokenizer, optimizer, params, problems, device, progress=None):
    """One step of distillation (--distill-steps), in train.py's place: cross-entropy on a written-out solution
    and its stop token, after the paper's prompt with N drawn as train_step draws it; the solution does not depend
    on N (as R1's reasoning, distilled into the paper's starting model, did not). Each problem's solution is one
    of its granularities, drawn by SOLUTION_MIX, and a share of them then check themselves (CHECK_SHARE). Only the
    solution's positions go through the lm_head."""
    rng = random.Random(sample.step_seed(cfg.seed, step))
    batch, targets = data.draw_batch(problems, cfg.prompts_per_step, cfg.n_min, cfg.n_max, cfg.mode, rng,
                                     cfg.targets_per_problem)
    prompts = [data.lcpo_prompt(tokenizer, p, n, m) for p, (n, m) in zip(batch, targets)]
    solutions = [rng.choices(p.solutions, weights=SOLUTION_MIX[:len(p.solutions)])[0] for p in batch]
    checks = [rng.random() < CHECK_SHARE for _ in batch]
    answers = [written_response(tokenizer, p, s, check) for p, s, check in zip(batch, solutions, checks)]
    solutions = [tokenizer.decode(a[:-1]) for a in answers]  # as text, for samples.jsonl
    responses = [sample.Rollout(a, [0.0] * len(a), "eos") for a in answers]  # [P]: what the model must say
    tokens = sum(map(len, answers))

    model.train()
    micro = sample.LossBatches(model, prompts, responses, list(range(len(responses))), cfg.micro_batch_tokens,
                               pad_id=tokenizer.pad_token_id)  # train_step's plain loss pass, on these rows
    log = runs.StepLog(device, progress, micro_batches=len(micro))
    optimizer.zero_grad(set_to_none=True)
    for _, inputs, resp_mask, _ in micro:
        logp = micro.logprobs(model, inputs, temperature=1.0)  # [b, R]
        loss = -(logp * resp_mask).sum() / tokens  # the mean over every solution token of the step
        loss.backward()
        log.add(loss=loss)
    log.lap("policy")
    grad_norm = model_lib.optimizer_step(optimizer, params, cfg.grad_clip)
    log.lap("optimizer")
    metrics = dict(step=step, updated=bool(grad_norm), loss=log.sums["loss"], solution_tokens=tokens,
                   mean_n_y=tokens / len(answers), mean_n_gold=sum(n for n, _ in targets) / len(targets),
                   passed_rows=len(answers), grad_norm=grad_norm if grad_norm is not None else float("nan"),
                   train_tokens_per_s=tokens / sum(log.seconds.values()),
                   peak_memory_mb=model_lib.peak_memory_mb(device), rollout_s=0.0, reference_s=0.0,
                   policy_s=log.seconds["policy"], optimizer_s=log.seconds["optimizer"])
    examples = [dict(prompt=tokenizer.decode(prompts[j]), response=solutions[j], n_y=len(answers[j]),
                     n_gold=targets[j][0]) for j in range(0, len(batch), max(1, cfg.group_size))]
    return metrics, examples


# -----------------------------------------------------------------------------
# the route stage: the reasoner's own routes, chosen by N


ROUTE_PAIRS = 4  # pairs of N drawn from each prompt's responses: more readings of N from the same rollouts
MAX_AIM = 0.75  # a Max prompt is taught the longest route within this share of N: room for a length read blurred
MAX_MARGIN = 8  # ... or within N minus this many tokens, where that is more: the blur does not grow with N
ROUTE_TRIES = 8  # draws of two N for a pair before it is left out: the two N may pick the same text


def first_difference(a: list[int], b: list[int]) -> int:
    """The position of the first token where two different texts differ (or where the shorter one ends).

        >>> first_difference([5, 6, 7], [5, 9, 7]), first_difference([5, 6], [5, 6, 7])
        (1, 2)
    """
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def pick_route(texts: list, n: int, mode: str):
    """The text a prompt asking for N is taught: Exact, the closest in length to N; Max, the longest of at most
    max(MAX_AIM * N, N - MAX_MARGIN) tokens (among max_routes the longest is the most accurate), or the shortest
    where none fits.

        >>> routes = [[0] * 10, [0] * 30, [0] * 60]
        >>> [len(pick_route(routes, n, mode)) for n, mode in ((40, "exact"), (50, "exact"), (50, "max"), (32, "max"))]
        [30, 60, 30, 10]
        >>> len(pick_route(routes, 68, "max"))  # 60 <= 68 - 8, though 60 > 0.75 * 68
        60
    """
    if mode == "max":
        fits = [t for t in texts if len(t) <= max(MAX_AIM * n, n - MAX_MARGIN)]
        return max(fits, key=len) if fits else min(texts, key=len)
    return min(texts, key=lambda t: abs(len(t) - n))


def sampled_routes(batch: sample.Batch, group_size: int) -> list[tuple]:
    """The routes a step's rollouts (G in a row per prompt) took: for each prompt, (its problem, its distinct
    responses that are correct and ended by themselves)."""
    groups = []
    for start in range(0, len(batch.rollouts), group_size):
        texts = list(dict.fromkeys(tuple(batch.rollouts[j].tokens) for j in range(start, start + group_size)
                                   if batch.correct[j] and batch.rollouts[j].finish == "eos"))
        groups.append((batch.problems[start], [list(t) for t in texts]))
    return groups


def route_pairs(groups: list[tuple], n_min: int, n_max: int, rng, mode: str = "exact") -> list[tuple]:
    """The route stage's rows, from (problem, its routes) groups: where a problem has two or more routes,
    ROUTE_PAIRS times two target lengths N_a < N_b ~ UniformInt(n_min, n_max), drawn until the route pick_route
    gives each differs (at most ROUTE_TRIES times). Each pair gives two rows, (problem, N, its route's tokens,
    the positions that choose it). Exact (sampled texts): where the two first differ. Max (written routes, each
    part a choice): where the route parts from each of its problem's other routes, so that a short problem learns
    to work its sum out where a long one answers at once under the same N."""
    rows = []
    for problem, texts in groups:
        if len(texts) < 2:
            continue
        for _ in range(ROUTE_PAIRS):
            for _ in range(ROUTE_TRIES):
                n_a, n_b = sorted(rng.sample(range(n_min, n_max + 1), 2))
                a, b = (pick_route(texts, n, mode) for n in (n_a, n_b))
                if a != b:
                    for n, t, other in ((n_a, a, b), (n_b, b, a)):
                        rows.append((problem, n, list(t), choices(t, [other] if mode == "exact" else texts)))
                    break
    return rows


def choices(route: list[int], others: list) -> tuple[int, ...]:
    """The positions of `route`'s tokens where it parts from each other text in `others`.

        >>> choices([5, 6, 7], [[5, 6, 7], [5, 9, 7], [8]])
        (0, 1)
    """
    return tuple(sorted({first_difference(route, t) for t in others if t != route}))


def route_step(cfg, step: int, model, tokenizer, optimizer, params, problems, device, progress=None):
    """One step of the route stage (--route-steps), in train.py's place (train_step's rollouts, metrics, seeds).

    Exact prompts (--mode exact): the starting model (the adapter off: a reasoner merged into the base, under a
    fresh adapter) answers the step's prompts G times; route_pairs picks, for two N, its correct response closest
    in length to each. Where the two differ first is where the route is chosen (answer at once or work it out,
    merge numbers or not, check or stop): each learns its own token there under a prompt asking for its N (the
    decision loss), and every token of both (their mean NLL), which keeps the texts right. The decision loss alone
    read N but let the texts fall apart; the mean NLL alone, averaged over tokens that do not depend on N, did not
    read it (EXPERIMENTS.md).
    Max prompts (--mode max, L1-Max's stage, from L1-Exact): the routes are written-out solutions (max_routes,
    all correct) and each N learns the longest within a margin below N (pick_route). Under a small N only the bare
    answer fits, which a reasoner rarely samples right, so no rollouts: the step draws its problems as distill_step
    does. The decision loss takes every token where the route parts from one of its problem's others: with the
    pair's parting token alone, only long sums ever chose at the first token (the bare answer or not), and the
    choice learnt N alone. With --keep-route, train.py takes one such step after each LCPO-Max step.
    """
    if cfg.mode == "max":
        batch, rng = None, random.Random(sample.step_seed(cfg.seed, step))
        groups = [(p, max_routes(tokenizer, p)) for p in data.draw_batch(
            problems, cfg.prompts_per_step, cfg.n_min, cfg.n_max, cfg.mode, rng)[0]]
    else:
        with model_lib.reference(model):  # the starting model's texts
            batch = sample.roll_out(cfg, step, model, tokenizer, problems, progress=progress)
        groups, rng = sampled_routes(batch, cfg.group_size), batch.rng
    rows = route_pairs(groups, cfg.n_min, cfg.n_max, rng, cfg.mode)
    prompts = [data.lcpo_prompt(tokenizer, problem, n, cfg.mode) for problem, n, _, _ in rows]
    texts = [sample.Rollout(tokens, [0.0] * len(tokens), "eos") for _, _, tokens, _ in rows]
    tokens = max(1, sum(r.n_y for r in texts))

    model.train()
    micro = sample.LossBatches(model, prompts, texts, list(range(len(rows))), cfg.micro_batch_tokens,
                               pad_id=tokenizer.pad_token_id)
    log = runs.StepLog(device, progress, micro_batches=len(micro))
    optimizer.zero_grad(set_to_none=True)
    for idx, inputs, resp_mask, _ in micro:
        logp = micro.logprobs(model, inputs, temperature=1.0)  # [b, R], each response ending at column R - 1
        chosen = torch.zeros_like(logp)  # 1 at each row's choosing positions (right-aligned, as logp)
        for i, j in enumerate(idx):
            chosen[i, [logp.shape[1] - texts[j].n_y + d for d in rows[j][3]]] = 1.0
        decision = -(logp * chosen).sum() / len(rows)  # the mean over rows of -log p(its route's choices)
        text = -(logp * resp_mask).sum() / tokens  # the mean over every token of the step's rows
        (decision + text).backward()
        log.add(loss=decision + text, decision_nll=decision, text_nll=text)
    log.lap("policy")
    grad_norm = model_lib.optimizer_step(optimizer, params, cfg.grad_clip)  # no rows: a zero gradient, no update
    log.lap("optimizer")
    sampled = dict(rollout_tokens_per_s=None, rollout_s=0.0) if batch is None else dict(
        **runs.rollout_metrics(batch), rollout_tokens_per_s=sum(r.n_y for r in batch.rollouts) / batch.rollout_s,
        rollout_s=batch.rollout_s)  # Max prompts: written routes, no rollouts
    metrics = dict(
        step=step, updated=bool(grad_norm), loss=log.sums["loss"], **sampled, kl=None, clip_fraction=None,
        ratio_mean=None, passed_rows=len(rows), route_pairs=len(rows) // 2,
        decision_nll=log.sums["decision_nll"], text_nll=log.sums["text_nll"],
        grad_norm=grad_norm if grad_norm is not None else float("nan"),
        train_tokens_per_s=tokens / (log.seconds["policy"] + log.seconds["optimizer"]),
        peak_memory_mb=model_lib.peak_memory_mb(device), reference_s=0.0, policy_s=log.seconds["policy"],
        optimizer_s=log.seconds["optimizer"])
    examples = [dict(prompt=tokenizer.decode(prompts[j]), response=tokenizer.decode(texts[j].tokens),
                     n_y=texts[j].n_y, n_gold=rows[j][1]) for j in range(len(rows))]
    return metrics, examples


# -----------------------------------------------------------------------------
# the choice probe: does the route follow N? (teacher-forced, no sampling)


@torch.no_grad()
def choice_probe(model, tokenizer, problems: list, budgets: list[int], batch: int = 16) -> dict:
    """At the three places where a written-out solution's length is decided, the model's choice under a prompt
    asking for each N, mean over problems with solutions of two or more steps: answer at once (p of the bare
    answer's first token, first), merge (after the finest solution's "a+b": p("+") / p("+" or "=")), and check
    (after the whole finest solution: p(sample.WAIT) / p(WAIT or the stop)). A model whose route follows N shows
    the first two falling with N and the third rising. {N: {"answer_at_once", "merge", "check"}}.
    """
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    plus, equals, wait, stop = enc("+")[0], enc("=")[0], enc(sample.WAIT)[0], tokenizer.eos_token_id
    kept = [p for p in problems if len(p.solutions) == 4 and p.solutions[0].count("=") >= 2]
    if not kept:
        raise ValueError("the choice probe needs problems with written-out solutions of two or more steps "
                         "(--data builtin:totals)")
    finest = [enc(p.solutions[0]) for p in kept]
    places = dict(answer_at_once=[[] for _ in kept], merge=[f[:f.index(equals)] for f in finest], check=finest)
    out = {}
    for n in budgets:
        prompts = [data.lcpo_prompt(tokenizer, p, n, "exact") for p in kept]
        q = {}
        for name, prefixes in places.items():  # the next token's probabilities after each prompt + prefix
            rows = [prompt + prefix for prompt, prefix in zip(prompts, prefixes)]
            q[name] = torch.cat([logprobs_after(model, tokenizer, rows[i:i + batch], [0])[:, 0].exp().cpu()
                                 for i in range(0, len(rows), batch)])
        first = torch.tensor([enc(p.solutions[3])[0] for p in kept])
        out[n] = dict(answer_at_once=q["answer_at_once"].gather(1, first[:, None]).mean().item(),
                      merge=(q["merge"][:, plus] / q["merge"][:, [plus, equals]].sum(-1)).mean().item(),
                      check=(q["check"][:, wait] / q["check"][:, [wait, stop]].sum(-1)).mean().item())
    return out


@torch.no_grad()
def step_probe(model, tokenizer, problems: list, budget: int) -> dict:
    """The reasoner's arithmetic, step by step, with no sampling: each problem's one-number-a-step solution is fed
    whole after a prompt asking for `budget`, and a step "a+b=c." is right where every token of c is the model's
    likeliest next token there. Counted by the step's units (data.carry_kind). {kind: [right, steps]}.
    """
    kept = [p for p in problems if p.solutions]
    if not kept:
        raise ValueError("the step probe needs problems with written-out solutions (--data builtin:totals)")
    counts = {kind: [0, 0] for kind in data.CARRY_KINDS}
    for p in kept:
        text = p.solutions[0]
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, spans = enc["input_ids"], enc["offset_mapping"]
        prompt = data.lcpo_prompt(tokenizer, p, budget, "exact")
        logits = model(input_ids=torch.tensor([prompt + ids], device=model.device)).logits[0, len(prompt) - 1:-1]
        likeliest = logits.argmax(-1).tolist()  # likeliest[t]: the model's guess at ids[t], given all before it
        for step in data.ONE_NUMBER_STEP.finditer(text):
            start, end = step.span(3)
            result = [t for t, (a, b) in enumerate(spans) if start <= a and b <= end and a < b]
            count = counts[data.carry_kind(int(step[1]), int(step[2]))]
            count[0] += all(likeliest[t] == ids[t] for t in result)
            count[1] += 1
    return counts


# -----------------------------------------------------------------------------
# the stop probe: does the model put its stop where N says? (teacher-forced, no sampling)


def logprobs_after(model, tokenizer, rows: list[list[int]], back: list[int]) -> torch.Tensor:
    """The next token's log-probabilities after the token b places before each row's last, for each b in back
    (0: after the last token): [rows, len(back), vocabulary]. Rows are left-padded here, to end together."""
    ids, mask = sample.left_pad(rows, tokenizer.pad_token_id, model.device)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask,
                                 position_ids=sample.position_ids(mask)).last_hidden_state  # [rows, T, H]
    at = torch.tensor([ids.shape[1] - 1 - b for b in back], device=model.device)
    return model.get_output_embeddings()(hidden[:, at]).float().log_softmax(-1)


def stop_logprobs(model, tokenizer, rows: list[list[int]], cuts: list[int]) -> torch.Tensor:
    """log p(stop token) after each row's first L response tokens, for each L in cuts: [rows, cuts].

    Each row is a prompt followed by exactly max(cuts) response tokens.
    """
    return logprobs_after(model, tokenizer, rows, [max(cuts) - L for L in cuts])[..., tokenizer.eos_token_id]


@torch.no_grad()
def stop_probe(model, tokenizer, prompts: list[list[list[int]]], responses: list[list[int]], cuts: list[int],
               batch: int = 8) -> torch.Tensor:
    """stop_logprobs for each response under each asked N: [responses, asked N, cut L].

    prompts[a][r]: response r's prompt asking the a-th N; cuts: the L; responses at least max(cuts) tokens long.
    """
    out = torch.zeros(len(responses), len(prompts), len(cuts))
    for a, asked in enumerate(prompts):
        for start in range(0, len(responses), batch):
            rows = [p + r[:max(cuts)] for p, r in zip(asked[start:start + batch], responses[start:start + batch])]
            out[start:start + len(rows), a] = stop_logprobs(model, tokenizer, rows, cuts).cpu()
    return out


def probe_scores(logp: torch.Tensor) -> dict:
    """From stop_probe's [responses, asked N, cut L]: how often the stop is likeliest at a cut L when the
    prompt asks for L (accuracy; chance 1 / the number of N), by how much in log-probability (margin,
    against the other N's mean), and the mean matrix [asked][cut].

    >>> probe_scores(torch.tensor([[[-1., -5.], [-3., -2.]]]))["accuracy"]
    1.0
    """
    k = logp.shape[1]
    diagonal = logp.diagonal(dim1=1, dim2=2)  # [responses, k]: asked N = cut L
    others = (logp.sum(1) - diagonal) / (k - 1)  # [responses, k]: the other N at the same cut
    best = logp.argmax(1)  # [responses, cut]: the N under which the stop is likeliest
    return dict(accuracy=(best == torch.arange(k)).float().mean().item(), chance=1 / k,
                margin=(diagonal - others).mean().item(), matrix=logp.mean(0).tolist())


def length_scores(logp: torch.Tensor, budgets: list[int]) -> dict:
    """From stop_probe at every position 1..max(budgets), [responses, asked N, position]: what the stop
    decisions say about the length each asked N gets on these texts. length_nll: -log p(a length of
    exactly N), mean over texts; median: the length by which the stop has come with probability 1/2
    (max(budgets) + 1 when it has not), mean over texts, one per asked N; within: p(a length of at most N),
    mean over texts, one per asked N (what a Max prompt asks).

    >>> s = length_scores(torch.tensor([[[0.0, -9, -9], [-9, 0.0, -9]]]).clamp(max=-1e-4), [1, 2])
    >>> round(s["length_nll"], 2), s["median"], [round(w, 2) for w in s["within"]]
    (0.0, [1.0, 2.0], [1.0, 1.0])
    """
    nll = [length_nll(logp[:, a, :n], torch.full((len(logp),), n)) for a, n in enumerate(budgets)]
    survive = torch.cumprod(1 - logp.exp(), dim=-1)  # [responses, asked, position]: no stop by its end
    median = 1 + (survive > 0.5).sum(-1).float()  # [responses, asked]: the first position where survival <= 1/2
    within = [1 - survive[:, a, n - 1].mean().item() for a, n in enumerate(budgets)]
    return dict(length_nll=torch.stack(nll).mean().item(), median=median.mean(0).tolist(), within=within)
