"""
The generation loop, written by hand: batched, left-padded, KV-cached.

    python sample.py --prompt "Tom has 3 apples and buys 4 more. How many now?" --budget 64 --answer 7
    python sample.py --adapter runs/exact/adapter --budget 32 --prompt "..."   # a trained adapter
    python sample.py --s1 --budget 64 --prompt "..."                           # budget forcing (S1)

`generate`: one forward pass over the left-padded prompts fills the KV cache (prefill); then, step by step,
each row samples its next token, records it with its log-prob, and stops at its own EOS (or stop id) or its
own max_new_tokens, leaving the batch; the others are fed the token they sampled. The log-prob is taken
under the distribution the token was drawn from (logits / temperature, after top-p): these are GRPO's "old"
log-probs, equal to what `sequence_logprobs` computes by a fresh forward pass over prompt + response. The
speed-ups sit one call away from the loop: the KV cache grown in place (`growing_cache`), and on a GPU the decode
step replayed from CUDA graphs (cuda_graphs.py).

Around the loop, what a training step does with rollouts: `roll_out` (draw the problems and targets, roll
out, judge, reward), the loss pass's micro-batches (`LossBatches`) and their log-probs (`LossBatches.logprobs`).
S1 budget forcing is `budget_forcing`; a step's bookkeeping is in runs.py.
"""

import argparse
import math
import random
import signal
import sys
import time
from dataclasses import dataclass

if __name__ == "__main__":  # Ctrl-C while the libraries below load: quit quietly, as at any time
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import data
import model as model_lib
import reward
from cuda_graphs import StaticDecoder

WAIT = "Wait"  # S1: appended when the model stops before its budget
ANSWER_CUE = "\n\nThe final answer is"  # S1: appended at the budget, then a short greedy answer
LOGPROB_TOKENS = 1024  # tokens (rows x positions) per lm_head chunk of token_logprobs: bounds the fp32 logits
LOGPROB_CHUNK = 64  # positions per log-softmax chunk of stage1.stop_loss


@dataclass
class Rollout:
    tokens: list[int]  # generated ids, up to and including the stop token
    logprobs: list[float]  # log-prob of each token under its sampling distribution (nan: inserted by S1)
    finish: str  # "eos": a stop id was sampled; "length": max_new_tokens reached

    @property
    def n_y(self) -> int:
        """The response's length, n_y of the LCPO reward: every token it generated."""
        return len(self.tokens)


MIN_TEMPERATURE = 0.01  # below it, 0 (greedy) aside, sampling is greedy in effect; at 1e-38 logits / T overflow


def check_sampling_args(max_new_tokens, temperature: float, top_p: float) -> None:
    if min(max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens]) <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    if 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {temperature}: below "
                         f"it the logits / T overflow")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def check_generate_args(model, prompts: list[list[int]], max_new_tokens, temperature: float, top_p: float) -> None:
    """generate's arguments, a problem refused in one line: prompts, lengths, sampling, the model's context."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and no empty prompt")
    check_sampling_args(max_new_tokens, temperature, top_p)
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    context = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(p) + n for p, n in zip(prompts, limits))
    if context is not None and longest > context:
        raise ValueError(f"prompt + max_new_tokens is {longest} tokens, more than the model's context of {context}")


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """Log-probs of the distribution tokens are drawn from: logits / T, then the top-p nucleus.

    Temperature 0 (greedy) scores tokens at temperature 1.
    """
    logprobs = F.log_softmax(logits.float() / (temperature or 1.0), dim=-1)  # [B, V]
    if top_p < 1.0:
        sorted_lp, order = logprobs.sort(dim=-1, descending=True)
        mass_before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
        outside = (mass_before >= top_p).scatter(-1, order, mass_before >= top_p)  # back to vocab order
        logprobs = F.log_softmax(logprobs.masked_fill(outside, -math.inf), dim=-1)
    return logprobs


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), [rows, longest]: rows left-padded, so every row ends at the last column."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    return ids, torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """The position of each token of left-padded rows, [B, T]: each row counts from its first real token."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


# -----------------------------------------------------------------------------
# the loop


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int | list[int], pad_id: int, stop_ids: list[int],
             temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None, on_token=None,
             forced: "BudgetForcing | None" = None, make_decoder=None) -> list[Rollout]:
    """Sample a response for each prompt (token ids, chat template applied): prefill, then sample, record and stop
    at every step (the module docstring).

    max_new_tokens may differ per row. on_token(step, tokens[B], done) is called after every step (pad_id for
    rows already finished; done: how many rows have finished). forced: S1's rule (BudgetForcing), which sets
    some of each step's tokens in place of the sampled ones. make_decoder(model, max_new_tokens): what holds the
    KV cache and feeds the tokens (`Decoder`'s interface); default: Decoder, or StaticDecoder on a CUDA device.
    """
    check_generate_args(model, prompts, max_new_tokens, temperature, top_p)
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    device = next(model.parameters()).device
    batch, steps = len(prompts), max(limits)

    # prefill: each distinct prompt once (a GRPO group's G rows share their prompt's KV cache)
    distinct = list(dict.fromkeys(map(tuple, prompts)))
    ids, mask = left_pad([list(p) for p in distinct], pad_id, device)  # [distinct, T]
    prompt_of = torch.tensor([distinct.index(tuple(p)) for p in prompts], device=device)  # [B]
    if make_decoder is None:  # speed-up: on a GPU the decode step at fixed shapes, replayed from CUDA graphs
        make_decoder = StaticDecoder if device.type == "cuda" else Decoder
    decoder = make_decoder(model, max_new_tokens=steps)
    logits = decoder.prefill(ids, mask, position_ids(mask), rows=prompt_of)  # [B, V]

    live = torch.arange(batch, device=device)  # the original index of each row still in the batch
    limits_t = torch.tensor(limits, device=device)
    stop_t = torch.tensor(sorted(set(stop_ids)), device=device, dtype=torch.long)
    out_tokens = torch.full((batch, steps), pad_id, dtype=torch.long, device=device)
    out_logprobs = torch.zeros((batch, steps), device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    for step in range(steps):
        # sample each row's next token, and its log-prob under the distribution it is drawn from
        lp = sampling_logprobs(logits, temperature, top_p)  # [rows in the batch, V]
        draws = temperature > 0 and (forced is None or forced.samples(step, live))  # S1's forced steps draw nothing
        if not draws:
            token = lp.argmax(-1)
        else:  # inverse CDF, one uniform per original row: a row's draw does not depend on the others
            u = torch.rand(batch, generator=generator, device=device)[live]
            cdf = lp.exp().cumsum(-1)
            token = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
            token = token.clamp(max=cdf.shape[-1] - 1)
        token_lp = lp.gather(-1, token[:, None]).squeeze(-1)
        if forced is not None:  # S1 budget forcing: some tokens are set, not sampled
            token, token_lp = forced(step, live, token, token_lp, logits)

        # record
        out_tokens[live, step], out_logprobs[live, step], lengths[live] = token, token_lp, step + 1

        # stop: at a stop id or at the row's own limit; a finished row leaves the batch
        going = ~(torch.isin(token, stop_t) | (step + 1 >= limits_t[live]))
        if on_token is not None:
            on_token(step, out_tokens[:, step], batch - int(going.sum()))
        if not going.any():
            break
        if not going.all():
            rows = going.nonzero().squeeze(-1)
            live, token = live[rows], token[rows]
            decoder.keep(rows)
        logits = decoder(token)  # [rows in the batch, V]

    stop_set = set(stop_ids)
    rollouts = []
    for row, row_lp, n in zip(out_tokens.tolist(), out_logprobs.tolist(), lengths.tolist()):
        rollouts.append(Rollout(row[:n], row_lp[:n], "eos" if row[n - 1] in stop_set else "length"))
    return rollouts


class Decoder:
    """generate's decode state: the KV cache of the rows in the batch, their attention mask, and the position of
    the token each is fed next. `prefill` fills it from the prompts, `keep(rows)` keeps only those rows (a
    finished row leaves the batch: a batch costs the sum of its lengths, not rows x the longest), and
    `decoder(tokens)` feeds each row its token and returns the logits of the next, [rows, V].
    cuda_graphs.StaticDecoder does the same at fixed shapes (max_new_tokens sizes its cache; this one grows)."""

    def __init__(self, model, max_new_tokens: int):
        self.model = model
        self.cache = growing_cache(model.config)  # speed-up: each token's keys and values written in place

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                rows: torch.Tensor) -> torch.Tensor:
        """One forward pass over the left-padded prompts ids [P, T], then a batch row for each of rows (the
        prompt it answers), sharing its prompt's cache: the logits after each row's prompt, [rows, V]."""
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1]  # [P, V]
        self.mask, self.next_position = mask, positions[:, -1:] + 1  # [P, T], [P, 1]
        self.keep(rows)
        return logits[rows]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these rows of the batch (indices into it), in their order."""
        self.cache.reorder_cache(rows)
        self.mask, self.next_position = self.mask[rows], self.next_position[rows]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(tokens), 1))], dim=-1)
        logits = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.next_position,
                            past_key_values=self.cache, use_cache=True).logits[:, -1]
        self.next_position = self.next_position + 1
        return logits


def growing_cache(config):
    """A DynamicCache whose layers append each token in place, into room that doubles when it runs out:
    transformers' own copies the whole cache (torch.cat) at every token (its cost: BENCHMARKS.md). The same
    keys and values, so the same tokens. Layers of other kinds (sliding windows) are kept as they are."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        room = None  # (keys, values) with space after the cached positions; self.keys is a view of its front

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, new = self.keys.shape[-2] if self.keys.dim() == 4 else 0, key_states.shape[-2]
            moved = self.room is None or self.keys.data_ptr() != self.room[0].data_ptr()  # e.g. reorder_cache
            if moved or n + new > self.room[0].shape[-2]:
                self.room = tuple(x.new_empty(*x.shape[:2], 2 * (n + new), x.shape[-1])
                                  for x in (key_states, value_states))
                if n:
                    self.room[0][:, :, :n], self.room[1][:, :, :n] = self.keys, self.values
            self.room[0][:, :, n:n + new], self.room[1][:, :, n:n + new] = key_states, value_states
            self.keys, self.values = self.room[0][:, :, :n + new], self.room[1][:, :, :n + new]
            return self.keys, self.values

    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


# -----------------------------------------------------------------------------
# a step's rollouts: drawn, generated, judged, rewarded


def step_seed(seed: int, step: int) -> int:
    """The seed of one step of a run (or one budget of eval.py): its own for each step, the same in every run."""
    return seed * 1_000_003 + step


@dataclass
class Batch:
    """A step's responses, judged and rewarded: one entry per response, G in a row for each prompt."""
    problems: list  # the data.Problem it answers
    prompt_ids: list[list[int]]  # its prompt (token ids, chat template applied)
    targets: list[tuple[int, str]]  # its prompt's (n_gold, mode)
    rollouts: list[Rollout]  # its tokens and their log-probs (GRPO's old log-probs)
    correct: list[bool]  # its answer judged correct
    rewards: list[float]  # its LCPO reward
    rng: random.Random  # the step's random numbers, past the draw: for whatever the step draws next
    rollout_s: float  # seconds of generation


def roll_out(cfg, step: int, sampler, tokenizer, problems: list, max_new_tokens: int | None = None,
             progress=None) -> Batch:
    """Steps 1-3 of train_step (and the start of stage1.length_step): draw problems and targets, roll out G
    responses to each, judge and reward them; seeded by (seed, step), so a resumed run repeats them exactly.
    sampler: the model that generates; max_new_tokens: default cfg.max_new_tokens; progress: a tqdm bar,
    counting the responses as they finish."""
    rng = random.Random(step_seed(cfg.seed, step))
    device = next(sampler.parameters()).device
    generator = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, step))
    G = cfg.group_size

    # 1. problems, and a target length n_gold ~ UniformInt(n_min, n_max) for each, in the paper's prompt
    drawn, targets = data.draw_batch(problems, cfg.prompts_per_step, cfg.n_min, cfg.n_max, cfg.mode, rng,
                                     cfg.targets_per_problem)  # [P], [P] (n_gold, mode)
    prompts = [data.lcpo_prompt(tokenizer, p, n, m) for p, (n, m) in zip(drawn, targets)]

    # 2. G responses per prompt; their log-probs are GRPO's old log-probs
    start = time.perf_counter()
    sampler.eval()
    row_problems, prompt_ids, row_targets = ([x for x in xs for _ in range(G)] for xs in (drawn, prompts, targets))
    rollouts = generate_in_batches(sampler, prompt_ids, n_gold=[n for n, _ in row_targets],
                                   max_new_tokens=max_new_tokens or cfg.max_new_tokens, batch=cfg.rollout_batch,
                                   pad_id=tokenizer.pad_token_id, stop_ids=[tokenizer.eos_token_id],
                                   temperature=cfg.temperature, generator=generator, progress=progress)
    rollout_s = time.perf_counter() - start

    # 3. judge each response, and its LCPO reward (reward.py: Exact or Max, by its prompt)
    thinking_model = "</think>" in tokenizer.get_vocab()  # R1-style models: an answer only counts after </think>
    correct = [reward.judge(tokenizer.decode(r.tokens, skip_special_tokens=True), p.answer, p.multiple_choice,
                            thinking_model, cfg.boxed_only) for p, r in zip(row_problems, rollouts)]
    rewards = [reward.lcpo_reward(ok, r.n_y, n_gold, mode, cfg.alpha, cfg.delta)
               for ok, r, (n_gold, mode) in zip(correct, rollouts, row_targets)]
    return Batch(row_problems, prompt_ids, row_targets, rollouts, correct, rewards, rng, rollout_s)


def generate_in_batches(model, prompts: list[list[int]], n_gold: list[int], max_new_tokens: int, batch: int,
                        pad_id: int, stop_ids: list[int], temperature: float, generator=None,
                        progress=None) -> list[Rollout]:
    """generate() over many prompts, `batch` at a time, prompts of similar targets n_gold[row] in the same batch
    (their lengths are alike, so a batch ends together); the rollouts come back in the prompts' order.
    progress: a tqdm bar, counting the responses as they finish."""
    order = sorted(range(len(prompts)), key=lambda j: n_gold[j])
    rollouts = [None] * len(prompts)
    if progress is not None:
        progress.unit = "response"
        progress.reset(total=len(prompts))
    for i in range(0, len(prompts), batch):
        chunk = order[i:i + batch]
        on_token = None if progress is None else lambda step, tokens, done: progress.update(i + done - progress.n)
        outs = generate(model, [prompts[j] for j in chunk], max_new_tokens, pad_id, stop_ids, temperature, 1.0,
                        generator, on_token=on_token)
        for j, out in zip(chunk, outs):
            rollouts[j] = out
    return rollouts


# -----------------------------------------------------------------------------
# the loss pass: prompt + response rows, batched by their token count


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


def pack(prompts: list[list[int]], rollouts: list[Rollout], pad_id: int, device):
    """Left-padded prompt + response rows: (ids [b, T], mask [b, T], response mask [b, R], old log-probs [b, R]).

    R is the longest response; every row's response ends at the last column.
    """
    ids, mask = left_pad([p + r.tokens for p, r in zip(prompts, rollouts)], pad_id, device)
    longest = max(len(r.tokens) for r in rollouts)
    resp_mask = torch.zeros((len(prompts), longest))
    old = torch.zeros((len(prompts), longest))
    for i, r in enumerate(rollouts):
        start = longest - len(r.tokens)
        resp_mask[i, start:] = 1
        old[i, start:] = torch.tensor(r.logprobs).nan_to_num(0.0)
    return ids, mask, resp_mask.to(device), old.to(device)


class LossBatches:
    """A step's responses `rows` (indices) for the loss pass, in micro-batches of at most max_tokens padded
    tokens (micro_batches). Iterating gives, for each micro-batch, (its rows, inputs for `logprobs`, response
    mask [b, R], old log-probs [b, R]), built when it is reached, so that one micro-batch's tensors are alive at
    a time; iterate it once per pass. shared_prompts.SharedBatches gives the same, faster."""

    def __init__(self, model, prompts: list[list[int]], rollouts: list[Rollout], rows: list[int], max_tokens: int,
                 pad_id: int):
        self.prompts, self.rollouts, self.pad_id = prompts, rollouts, pad_id
        self.device = next(model.parameters()).device
        lengths = [len(prompts[j]) + rollouts[j].n_y for j in rows]
        self.micro = [[rows[i] for i in idx] for idx in micro_batches(lengths, max_tokens)]

    def __len__(self) -> int:
        return len(self.micro)

    def __iter__(self):
        for rows in self.micro:
            ids, mask, resp_mask, old = pack([self.prompts[j] for j in rows], [self.rollouts[j] for j in rows],
                                             self.pad_id, self.device)
            yield rows, dict(ids=ids, mask=mask, response_width=resp_mask.shape[1]), resp_mask, old

    @staticmethod
    def logprobs(model, inputs: dict, temperature: float) -> torch.Tensor:
        """The log-prob of each response token of a micro-batch, at the sampling temperature, [b, R], as generate
        scored it (padding where the response mask is 0): one forward pass over prompt + response (pack puts every
        response at the end of its row), the lm_head on the response tokens only."""
        return sequence_logprobs(model, inputs["ids"], inputs["mask"], temperature, last=inputs["response_width"])


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0,
                      chunk: int = LOGPROB_TOKENS, last: int | None = None) -> torch.Tensor:
    """Log-prob of each token given the ones before it, at the sampling temperature: [B, T-1]; with `last`,
    of the last `last` tokens only, [B, last] (the lm_head runs only there: a response after its prompt)."""
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids(attention_mask),
                                 use_cache=False).last_hidden_state  # [B, T, H]; no KV cache to keep
    start = 1 if last is None else input_ids.shape[1] - last
    return token_logprobs(model, hidden[:, start - 1:-1], input_ids[:, start:], temperature, chunk)


def token_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   chunk: int = LOGPROB_TOKENS) -> torch.Tensor:
    """log p(targets[b, t]) from the hidden states that predict them, hidden[b, t], at the temperature: [B, L].

    Never holds the fp32 logits of the whole batch: the lm_head and log-softmax run on about `chunk` tokens
    at a time (as many positions of every row; at least one), and under autograd each chunk is recomputed in
    backward instead of stored. A chunk counts tokens, not positions: a micro-batch of many short rows would
    otherwise hold rows x positions x vocab logits.
    """
    lm_head, scale = model.get_output_embeddings(), temperature or 1.0

    def chunk_logprobs(h, t):
        logits = lm_head(h).float() / scale  # [B, chunk, V]
        return logits.log_softmax(-1).gather(-1, t[..., None]).squeeze(-1)

    out, positions = [], max(1, chunk // hidden.shape[0])
    for start in range(0, targets.shape[1], positions):
        h, t = hidden[:, start:start + positions], targets[:, start:start + positions]
        out.append(checkpoint(chunk_logprobs, h, t, use_reentrant=False) if torch.is_grad_enabled()
                   else chunk_logprobs(h, t))
    return torch.cat(out, dim=1)


# -----------------------------------------------------------------------------
# S1 budget forcing, the baseline L1 is compared with


class BudgetForcing:
    """S1 as a rule of generate's loop, which hands it each step's tokens: every row thinks exactly `budget`
    tokens, then answers.

    Before the budget, a stop token the model samples is replaced by "Wait" (fed one token a step, cut at the
    budget) and the row goes on; at the budget the answer cue is fed; after it the answer is decoded greedily
    and scored at temperature 1. Forced tokens have log-prob nan and take no random number. One per generate
    call: it keeps each row's place in "Wait".
    """

    def __init__(self, budget: int, stops: list[int], wait: list[int], cue: list[int], rows: int, device=None):
        self.budget, self.stops = budget, torch.tensor(stops, device=device)
        self.wait, self.cue = torch.tensor(wait, device=device), torch.tensor(cue, device=device)
        self.in_wait = torch.full((rows,), -1, device=device)  # per row: which token of "Wait" it feeds next, -1: none

    def samples(self, step: int, live: torch.Tensor) -> bool:
        """Whether any row of the batch (original indices `live`) draws its token from the model at this step."""
        return step < self.budget and bool((self.in_wait[live] < 0).any())

    def __call__(self, step: int, live: torch.Tensor, token: torch.Tensor, token_lp: torch.Tensor,
                 logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's tokens at this step and their log-probs, from what generate sampled ([rows] each)."""
        nan = torch.full_like(token_lp, math.nan)
        if step < self.budget:  # thinking: a stop token starts "Wait" in its place
            at = self.in_wait[live]
            at = torch.where((at < 0) & torch.isin(token, self.stops), 0, at)
            waiting = at >= 0
            self.in_wait[live] = torch.where(waiting & (at + 1 < len(self.wait)), at + 1, -1)
            return torch.where(waiting, self.wait[at.clamp(min=0)], token), torch.where(waiting, nan, token_lp)
        if step < self.budget + len(self.cue):  # the end of thinking
            return torch.full_like(token, self.cue[step - self.budget].item()), nan
        lp = sampling_logprobs(logits, 0.0)  # the answer, greedy
        token = lp.argmax(-1)
        return token, lp.gather(-1, token[:, None]).squeeze(-1)


def budget_forcing(model, tokenizer, prompts: list[list[int]], budget: int, temperature: float = 0.0,
                   top_p: float = 1.0, answer_tokens: int = 32, generator=None) -> list[Rollout]:
    """S1: think for exactly `budget` tokens, then answer.

    One pass of generate under BudgetForcing: while budget remains and the model stops (EOS, or </think>
    for thinking models), "Wait" takes the place of its stop token and generation goes on from the cache. At
    the budget the answer cue comes, then a short answer decoded greedily. The first `budget` tokens of each
    rollout are its thinking; inserted tokens have log-prob nan.
    """
    think_end = tokenizer.convert_tokens_to_ids("</think>") if "</think>" in tokenizer.get_vocab() else None
    stops = [tokenizer.eos_token_id] + ([think_end] if think_end is not None else [])
    wait = tokenizer.encode(WAIT, add_special_tokens=False)
    cue = tokenizer.encode(("\n</think>" if think_end is not None else "") + ANSWER_CUE, add_special_tokens=False)
    forced = BudgetForcing(budget, stops, wait, cue, len(prompts), next(model.parameters()).device)
    return generate(model, prompts, budget + len(cue) + answer_tokens, tokenizer.pad_token_id,
                    [tokenizer.eos_token_id], temperature, top_p, generator, forced=forced)


# -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Sample one response to a length-controlled prompt.")
    parser.add_argument("--prompt", default=None, help="the problem (default: the first built-in test problem)")
    parser.add_argument("--budget", type=int, default=64,
                        help="N in 'Think for N tokens.' (0: no length sentence); with --s1, the thinking budget")
    parser.add_argument("--mode", default="exact", choices=data.MODES)
    parser.add_argument("--model", default=None, help="hub id, local directory, or reasoner (the embedded model with "
                        "results/reasoner-adapter merged); default: the embedded model")
    parser.add_argument("--adapter", default=None,
                        help="a saved LoRA adapter, or a train.py run directory (its newest checkpoint)")
    parser.add_argument("--no-quantize", action="store_true", help="load the base in full precision")
    parser.add_argument("--answer", default=None, help="gold answer: also say whether the response is correct")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 2 x budget (256 without one)")
    parser.add_argument("--s1", action="store_true", help="S1 budget forcing: think exactly --budget tokens "
                        "(no length sentence in the prompt, as eval.py --s1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.prompt is not None and not args.prompt.strip():
            raise ValueError("--prompt is empty: give the problem to answer, or leave it out for a built-in one")
        if args.budget < 0:
            raise ValueError(f"--budget must be >= 0, got {args.budget}")
        if args.s1 and args.budget == 0:
            raise ValueError("--s1 needs a --budget")
        if not 0 <= args.seed < 2**32:
            raise ValueError(f"--seed must be in [0, 2**32), got {args.seed}")
        max_new = args.max_new_tokens if args.max_new_tokens is not None else (2 * args.budget or 256)
        check_sampling_args(max_new, args.temperature, args.top_p)
        if args.prompt is None:  # the first built-in test problem, with its answer
            example = data.builtin_problems("test", 1)[0]
            args.prompt, args.answer = example.problem, args.answer or example.answer
        model_lib.set_threads()
        model, tokenizer = model_lib.load_model(args.model, adapter=args.adapter, quantize=not args.no_quantize,
                                                trainable=False)
        model = model_lib.rollout_copy(model)  # the same function, dequantized and merged once: faster to sample
        problem = data.Problem(args.prompt, args.answer or "", multiple_choice=False)
        asked = None if args.s1 else args.budget or None  # S1 (as the paper runs it) has no length sentence
        prompt = data.lcpo_prompt(tokenizer, problem, asked, args.mode)
        context, wanted = getattr(model.config, "max_position_embeddings", None), args.budget if args.s1 else max_new
        if context is not None and len(prompt) + wanted > context:
            raise ValueError(f"the prompt ({len(prompt)} tokens) and {wanted} new tokens do not fit in the model's "
                             f"context of {context} tokens: shorten the prompt or --max-new-tokens")
        print(f"--- prompt\n{tokenizer.decode(prompt, skip_special_tokens=True).strip()}\n--- response")
        generator = torch.Generator(device=model.device).manual_seed(args.seed)
        if args.s1:
            (out,) = budget_forcing(model, tokenizer, [prompt], args.budget, args.temperature, args.top_p,
                                    generator=generator)
            text = tokenizer.decode(out.tokens, skip_special_tokens=True)
            print(text)
        else:
            streamed = []

            def stream(step, token, done):  # print the text as it grows
                before = tokenizer.decode(streamed, skip_special_tokens=True)
                streamed.append(int(token[0]))
                print(tokenizer.decode(streamed, skip_special_tokens=True)[len(before):], end="", flush=True)

            (out,) = generate(model, [prompt], max_new, tokenizer.pad_token_id, [tokenizer.eos_token_id],
                              args.temperature, args.top_p, generator, on_token=stream)
            text = tokenizer.decode(out.tokens, skip_special_tokens=True)
            print()
    except (ValueError, model_lib.ModelError) as e:  # e.g. a prompt and response longer than the model's context
        sys.exit(f"error: {e}")
    line = f"--- {out.n_y} tokens (target {args.budget or 'none'}), stopped by {out.finish}"
    if args.answer is not None:
        line += f", correct: {reward.is_correct(text, args.answer, boxed_only=False)}"
    print(line)


if __name__ == "__main__":
    main()
