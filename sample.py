"""
The generation loop, written by hand: batched, left-padded, KV-cached.

    python sample.py --prompt "Tom has 3 apples and buys 4 more. How many now?" --budget 64 --answer 7
    python sample.py --adapter runs/exact/adapter --budget 32 --prompt "..."   # a trained adapter
    python sample.py --s1 --budget 64 --prompt "..."                           # budget forcing (S1)

One prefill over the padded prompts fills the cache (once per distinct prompt: GRPO's G samples
of a prompt share it); then every step feeds each live row the token it just sampled. Each row
stops at its own EOS (or stop id) or at its own max_new_tokens, and then leaves the batch.
Per row it returns the tokens, the log-prob of each under the distribution it was sampled
from (logits / temperature, after top-p), and why it stopped: these are GRPO's "old" log-probs,
equal to what `sequence_logprobs` computes by a fresh forward pass over prompt + response.
"""

import argparse
import math
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import data
import model as model_lib
import reward

WAIT = "Wait"  # S1: appended when the model stops before its budget
ANSWER_CUE = "\n\nThe final answer is"  # S1: appended at the budget, then a short greedy answer
LOGPROB_CHUNK = 64  # positions per lm_head chunk in sequence_logprobs: bounds the [B, chunk, vocab] logits
MIN_BUCKET = 16  # fewest rows a fixed-shape decode step runs (StaticDecoder): below it a GPU step costs its launches


@dataclass
class Rollout:
    tokens: list[int]  # generated ids, up to and including the stop token
    logprobs: list[float]  # log-prob of each token under its sampling distribution (nan: inserted, S1 or a marker)
    finish: str  # "eos": a stop id was sampled; "length": max_new_tokens reached
    marks: list[int] = field(default_factory=list)  # where in `tokens` the budget markers are (BudgetMarker)

    @property
    def n_y(self) -> int:
        """The response's length: its tokens without the budget markers."""
        return len(self.tokens) - len(self.marks)

    def text_tokens(self) -> list[int]:
        """The tokens the response wrote: without the budget markers."""
        marked = set(self.marks)
        return [t for i, t in enumerate(self.tokens) if i not in marked]


class BudgetMarker:
    """The budget-marker variant (beyond the paper, as Hansel and BudgetThinker do): after every `every`
    tokens of its own, the response is shown how much of its budget N is left, " [0096 left]", as tokens
    the loop inserts; they are not the model's and do not count in its length.

    A marker is always the same number of tokens (the number has DIGITS digits, one token each), so the
    markers of every row fall at the same steps of the loop, whatever its N, and the layout of a response
    (where its L-th own token is) does not depend on N. With every = 16 and N = 40: 16 tokens of the
    model's, " [0024 left]", 16 more, " [0008 left]", and so on; past N, " [0000 left]".
    """

    DIGITS = 4  # budgets up to 9999 tokens
    PREFIX, SUFFIX = " [", " left]"

    def __init__(self, tokenizer, every: int):
        if every < 1:
            raise ValueError(f"a budget marker needs an interval of at least 1 token, got {every}")
        digits = [tokenizer.encode(str(d), add_special_tokens=False) for d in range(10)]
        if any(len(d) != 1 for d in digits):
            raise ValueError("budget markers need a tokenizer that writes each digit 0-9 as one token")
        self.every, self.digits = every, [d[0] for d in digits]
        self.prefix = tokenizer.encode(self.PREFIX, add_special_tokens=False)
        self.suffix = tokenizer.encode(self.SUFFIX, add_special_tokens=False)
        self.size = len(self.prefix) + self.DIGITS + len(self.suffix)  # tokens per marker

    def ids(self, left: int) -> list[int]:
        """The marker saying `left` tokens are left (0 once the budget is spent)."""
        left = min(max(left, 0), 10**self.DIGITS - 1)
        return self.prefix + [self.digits[int(c)] for c in f"{left:0{self.DIGITS}d}"] + self.suffix

    def columns(self, n: int) -> int:
        """How many tokens a response of n own tokens has, with the marker after its n-th when n % every == 0."""
        return n + (n // self.every) * self.size

    def decision(self, length: int) -> int:
        """The index in the response of the last token before the model picks its (length + 1)-th own token
        (or the stop): its length-th own token, or the marker right after it."""
        return length - 1 + (length // self.every) * self.size

    def insert(self, tokens: list[int], n_gold: int, end: bool = True) -> tuple[list[int], list[int]]:
        """A text with the markers put in where the loop puts them, counting down from n_gold: (tokens,
        where the markers are). end=False: no marker after the last token (a response that stopped there)."""
        out, marks = [], []
        for count, token in enumerate(tokens, 1):
            out.append(token)
            if count % self.every == 0 and (end or count < len(tokens)):
                marks += range(len(out), len(out) + self.size)
                out += self.ids(n_gold - count)
        return out, marks


def check_sampling_args(max_new_tokens, temperature: float, top_p: float) -> None:
    if min(max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens]) <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


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


# -----------------------------------------------------------------------------
# the loop


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int | list[int],
    pad_id: int,
    stop_ids: list[int],
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    on_token=None,
    share_prefix: bool = True,
    compact: bool = True,
    static_cache: bool | None = None,
    marker: BudgetMarker | None = None,
    budgets: list[int] | None = None,
) -> list[Rollout]:
    """Sample a response for each prompt (token ids, chat template applied). See the module docstring.

    max_new_tokens may differ per row. on_token(step, tokens[B], done) is called after every step
    (pad_id for rows already finished; done: how many rows have finished). The speed-ups, each exact up to float rounding:
    share_prefix prefills each distinct prompt once and copies its KV cache to the rows that
    repeat it (GRPO's G samples per prompt); compact drops finished rows from the batch and the
    cache, so a batch costs the sum of its lengths, not rows x the longest; static_cache runs the
    decode step at fixed shapes (`StaticDecoder`), which on a CUDA device replays it from CUDA graphs.
    None: on a CUDA device only (on a CPU it only adds the padding rows of its buckets).

    marker: the budget-marker variant: after every marker.every sampled tokens the loop feeds each row
    the marker of its budget (budgets[row], its N) instead of sampling; max_new_tokens then counts the
    sampled tokens alone, and each Rollout says where its markers are.
    """
    from transformers import DynamicCache, StaticCache

    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and no empty prompt")
    check_sampling_args(max_new_tokens, temperature, top_p)
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    if marker is not None and (budgets is None or len(budgets) != len(prompts)):
        raise ValueError("budget markers need the budget N of every prompt (budgets, one per prompt)")
    room = limits if marker is None else [marker.columns(n - 1) + 1 for n in limits]  # tokens, markers included
    cycle = marker.every + marker.size if marker is not None else None  # the steps of `every` tokens and a marker
    context = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(p) + n for p, n in zip(prompts, room))
    if context is not None and longest > context:
        raise ValueError(f"prompt + max_new_tokens is {longest} tokens, more than the model's context of {context}")

    device = next(model.parameters()).device
    batch = len(prompts)
    distinct = list(dict.fromkeys(map(tuple, prompts))) if share_prefix else [tuple(p) for p in prompts]
    copy_of = torch.tensor([distinct.index(tuple(p)) for p in prompts] if share_prefix else range(batch), device=device)
    input_ids, mask = left_pad([list(p) for p in distinct], pad_id, device)  # every row's next token in one column
    width = input_ids.shape[1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T] each row counts from its first real token

    if static_cache is None:
        static_cache = device.type == "cuda"
    if static_cache:  # room for the longest response; the mask's columns open as tokens are fed
        cache = StaticCache(config=model.config, max_cache_len=width + max(room))
        mask = F.pad(mask, (0, max(room)))
    else:
        cache = DynamicCache(config=model.config)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                   past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # [distinct, V]
    if share_prefix:  # one row per sample from here on
        cache.reorder_cache(copy_of)
        logits, mask, positions = logits[copy_of], mask[copy_of], positions[copy_of]
    next_position = positions[:, -1:] + 1  # [B, 1]
    decoder = StaticDecoder(model, cache, mask, next_position) if static_cache else None

    live = torch.arange(batch, device=device)  # original index of each row in the batch
    active = torch.ones(batch, dtype=torch.bool, device=device)  # rows of the batch still generating
    limits_t = torch.tensor(limits, device=device)
    stop_t = torch.tensor(sorted(set(stop_ids)), device=device, dtype=torch.long)
    out_tokens = torch.full((batch, max(room)), pad_id, dtype=torch.long, device=device)
    out_logprobs = torch.zeros((batch, max(room)), device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    for step in range(max(room)):
        if marker is not None and step % cycle >= marker.every:  # a marker's token, the same step for every row
            if step % cycle == marker.every:  # the markers of this interval, one row each: [batch, marker.size]
                count = (step // cycle + 1) * marker.every  # own tokens so far
                markers = torch.tensor([marker.ids(n - count) for n in budgets], device=device)
            token = markers[live, step % cycle - marker.every]
            rows = live[active]
            out_tokens[rows, step] = token[active]
            out_logprobs[rows, step] = math.nan
            lengths[rows] = step + 1
            finished = torch.zeros_like(active)
        else:
            lp = sampling_logprobs(logits, temperature, top_p)  # [rows in the batch, V]
            if temperature == 0:
                token = lp.argmax(-1)
            else:  # inverse CDF, one uniform per original row: a row's draw does not depend on the others
                u = torch.rand(batch, generator=generator, device=device)[live]
                cdf = lp.exp().cumsum(-1)
                token = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
                token = token.clamp(max=cdf.shape[-1] - 1)
            rows = live[active]
            out_tokens[rows, step] = token[active]
            out_logprobs[rows, step] = lp.gather(-1, token[:, None]).squeeze(-1)[active]
            lengths[rows] = step + 1
            own = step + 1 if marker is None else (step // cycle) * marker.every + step % cycle + 1  # sampled so far
            finished = active & (torch.isin(token, stop_t) | (own >= limits_t[live]))
        active = active & ~finished
        if on_token is not None:
            on_token(step, out_tokens[:, step], batch - int(active.sum()))
        if not active.any():
            break
        # drop the finished rows from the batch and the cache; at fixed shapes, only when the batch drops a bucket
        if compact and finished.any() and (decoder is None or decoder.bucket(int(active.sum())) < decoder.bucket(len(live))):
            keep = active.nonzero().squeeze(-1)
            live, active, token = live[keep], active[keep], token[keep]
            if decoder is not None:
                decoder.keep(keep)
            else:
                cache.reorder_cache(keep)
                mask, next_position = mask[keep], next_position[keep]
        token = token.masked_fill(~active, pad_id)  # rows finished but still in the batch are fed padding
        if decoder is not None:
            logits = decoder(token, width + step)
            continue
        mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=device)], dim=-1)
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_position,
                       past_key_values=cache, use_cache=True).logits[:, -1]
        next_position = next_position + 1

    stop_set = set(stop_ids)
    rollouts = []
    for row, row_lp, n in zip(out_tokens.tolist(), out_logprobs.tolist(), lengths.tolist()):
        finish = "eos" if row[n - 1] in stop_set else "length"
        marks = [] if marker is None else [i for i in range(n) if i % cycle >= marker.every]
        rollouts.append(Rollout(row[:n], row_lp[:n], finish, marks))
    return rollouts


# -----------------------------------------------------------------------------
# the decode step at fixed shapes, replayed from CUDA graphs on a GPU


class StaticDecoder:
    """The decode step of `generate(static_cache=True)`: fixed shapes, so that a CUDA graph can replay it.

    A decode step of a small model is a few hundred tiny kernels, each launched from Python: on a GPU
    the launches, not the arithmetic, set its cost. A CUDA graph records those kernels once and
    replays them with one launch, but only if every tensor they touch keeps its address and shape.
    So everything a step reads or writes is allocated here once: the KV cache (rows x the longest
    sequence), the fed tokens, their positions, and an additive attention mask over every cache column
    (a column opens when its token is fed). The step runs on a bucket of rows, the smallest power of
    two (at least MIN_BUCKET) holding the rows still in the batch; rows past those are padding and
    their logits are ignored. generate() moves the live rows to the front (`keep`) only when that
    drops the batch to a smaller bucket, so compaction still pays and a generation captures a
    handful of graphs.

    On a CUDA device each bucket's step is captured the first time it runs, and the first replay is
    checked against the eager step; a capture that fails or disagrees turns graphs off for the rest
    of the generation (eager steps, the same results). On a CPU every step runs eagerly.
    """

    def __init__(self, model, cache, mask: torch.Tensor, positions: torch.Tensor):
        dtype = model.get_input_embeddings().weight.dtype
        self.model, self.cache, self.rows = model, cache, mask.shape[0]
        self.kv = [(layer.keys, layer.values) for layer in cache.layers]  # [rows, heads, columns, dim] each
        self.mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask == 0, torch.finfo(dtype).min)
        self.mask = self.mask[:, None, None, :]  # [rows, 1, 1, columns]
        self.tokens = torch.zeros((self.rows, 1), dtype=torch.long, device=mask.device)
        self.positions = positions.clone()  # [rows, 1] the position of the token fed next
        # bucket -> (graph, its logits); a graph needs the cache to count its own length on the device
        capturable = mask.device.type == "cuda" and all(hasattr(layer, "cumulative_length") for layer in cache.layers)
        self.graphs = {} if capturable else None
        self.pool = None  # the graphs share one memory pool

    def bucket(self, n: int) -> int:
        return min(self.rows, max(MIN_BUCKET, 1 << (n - 1).bit_length()))

    def keep(self, rows: torch.Tensor) -> None:
        """Move `rows` (indices into the batch) to its front, in place: the addresses stay."""
        n = len(rows)
        for k, v in self.kv:
            k[:n], v[:n] = k[rows], v[rows]
        self.mask[:n], self.positions[:n] = self.mask[rows], self.positions[rows]

    def forward(self, bucket: int) -> torch.Tensor:
        for layer, (k, v) in zip(self.cache.layers, self.kv):  # the cache seen by the model: the bucket's rows
            layer.keys, layer.values = k[:bucket], v[:bucket]
        return self.model(input_ids=self.tokens[:bucket], attention_mask=self.mask[:bucket],
                          position_ids=self.positions[:bucket], past_key_values=self.cache,
                          use_cache=True).logits[:, -1]  # [bucket, V]

    def __call__(self, tokens: torch.Tensor, column: int) -> torch.Tensor:
        """Feed tokens[n] (one per row at the front of the batch) at cache column `column`: their logits [n, V]."""
        n, bucket = len(tokens), self.bucket(len(tokens))
        self.tokens[:n, 0] = tokens
        self.mask[:n, 0, 0, column] = 0.0
        if self.graphs is None:
            logits = self.forward(bucket)
        elif bucket in self.graphs:
            graph, logits = self.graphs[bucket]
            graph.replay()
        else:
            logits = self.capture(bucket)
        self.positions += 1
        return logits[:n]

    def capture(self, bucket: int) -> torch.Tensor:
        """Run this step eagerly (on a side stream, the warm-up a capture needs), then capture it and replay it."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            eager = self.forward(bucket).clone()
        torch.cuda.current_stream().wait_stream(side)
        for layer in self.cache.layers:  # the replay writes this step's keys and values again
            layer.cumulative_length.sub_(1)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self.forward(bucket)
            graph.replay()
            problem = None if torch.allclose(logits.float(), eager.float(), rtol=0, atol=1e-2 * eager.abs().max().item()) \
                else "its logits differ from the eager step's"
        except RuntimeError as e:
            problem = f"capture failed: {e}"
            for layer in self.cache.layers:
                layer.cumulative_length.add_(1)
        if problem is not None:
            print(f"warning: CUDA graph of the decode step not used ({problem}); decoding eagerly", file=sys.stderr)
            self.graphs = None
            return eager
        self.pool = graph.pool()
        self.graphs[bucket] = (graph, logits)
        return logits


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), [rows, longest]: rows left-padded, so every row ends at the last column."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    return ids, torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0,
                      chunk: int = LOGPROB_CHUNK) -> torch.Tensor:
    """Log-prob of each token given the ones before it, at the sampling temperature: [B, T-1].

    Never holds the fp32 logits of the whole batch: the lm_head and log-softmax run `chunk`
    positions at a time, and under autograd each chunk is recomputed in backward instead of stored.
    """
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                                 use_cache=False).last_hidden_state  # [B, T, H]; no KV cache to keep
    lm_head = model.get_output_embeddings()
    scale = temperature or 1.0

    def chunk_logprobs(h, targets):
        logits = lm_head(h).float() / scale  # [B, chunk, V]
        return logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)

    out = []
    for start in range(0, input_ids.shape[1] - 1, chunk):
        h = hidden[:, start:start + chunk][:, : input_ids.shape[1] - 1 - start]
        targets = input_ids[:, start + 1:start + 1 + h.shape[1]]
        if torch.is_grad_enabled():
            out.append(checkpoint(chunk_logprobs, h, targets, use_reentrant=False))
        else:
            out.append(chunk_logprobs(h, targets))
    return torch.cat(out, dim=1)


# -----------------------------------------------------------------------------
# the likelihood of a length, from the stop token's log-probability after each token (train.stop_loss learns
# it, eval.length_scores reads it)


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


# -----------------------------------------------------------------------------
# S1 budget forcing, the baseline L1 is compared with


def budget_forcing(model, tokenizer, prompts: list[list[int]], budget: int, temperature: float = 0.0,
                   top_p: float = 1.0, answer_tokens: int = 32, generator=None) -> list[Rollout]:
    """S1: think for exactly `budget` tokens, then answer.

    Generate up to the budget; while budget remains and the model stopped early (EOS, or
    </think> for thinking models), drop the stop token, append "Wait" and go on. At the budget,
    append the answer cue and decode a short answer greedily. The first `budget` tokens of each
    rollout are its thinking; inserted tokens have log-prob nan.
    """
    think_end = tokenizer.convert_tokens_to_ids("</think>") if "</think>" in tokenizer.get_vocab() else None
    stops = [tokenizer.eos_token_id] + ([think_end] if think_end is not None else [])
    wait = tokenizer.encode(WAIT, add_special_tokens=False)
    cue = tokenizer.encode(("\n</think>" if think_end is not None else "") + ANSWER_CUE, add_special_tokens=False)
    thinking = [Rollout([], [], "length") for _ in prompts]
    live = list(range(len(prompts)))
    while live:
        outs = generate(model, [prompts[i] + thinking[i].tokens for i in live],
                        [budget - thinking[i].n_y for i in live], tokenizer.pad_token_id, stops,
                        temperature, top_p, generator)
        still = []
        for i, out in zip(live, outs):
            kept = out.tokens[:-1] if out.finish == "eos" else out.tokens  # a stop token is not thinking
            thinking[i].tokens += kept
            thinking[i].logprobs += out.logprobs[: len(kept)]
            room = budget - thinking[i].n_y
            if room > 0:
                thinking[i].tokens += wait[:room]
                thinking[i].logprobs += [math.nan] * len(wait[:room])
                if budget - thinking[i].n_y > 0:
                    still.append(i)
        live = still
    answers = generate(model, [p + t.tokens + cue for p, t in zip(prompts, thinking)], answer_tokens,
                       tokenizer.pad_token_id, [tokenizer.eos_token_id], temperature=0.0)
    return [Rollout(t.tokens + cue + a.tokens, t.logprobs + [math.nan] * len(cue) + a.logprobs, a.finish)
            for t, a in zip(thinking, answers)]


# -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Sample one response to a length-controlled prompt.")
    parser.add_argument("--prompt", default=None, help="the problem (default: the first built-in test problem)")
    parser.add_argument("--budget", type=int, default=64,
                        help="N in 'Think for N tokens.' (0: no length sentence); with --s1, the thinking budget")
    parser.add_argument("--mode", default="exact", choices=data.MODES)
    parser.add_argument("--budget-in", default="user", choices=data.BUDGET_PLACES,
                        help="where the length sentence goes: as the adapter was trained (train.py --budget-in)")
    parser.add_argument("--model", default=None, help="hub id or local directory (default: the embedded model)")
    parser.add_argument("--adapter", default=None, help="a saved LoRA adapter, or a train.py run directory (its newest checkpoint)")
    parser.add_argument("--no-quantize", action="store_true", help="load the base in full precision")
    parser.add_argument("--answer", default=None, help="gold answer: also say whether the response is correct")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 2 x budget (256 without one)")
    parser.add_argument("--s1", action="store_true", help="S1 budget forcing: think exactly --budget tokens "
                        "(no length sentence in the prompt, as eval.py --s1)")
    parser.add_argument("--budget-marker", type=int, default=None, metavar="K",
                        help="show the budget left after every K tokens (train.py --budget-marker); default: as the "
                        "adapter was trained, 0: off")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.budget < 0:
            raise ValueError(f"--budget must be >= 0, got {args.budget}")
        if args.s1 and args.budget == 0:
            raise ValueError("--s1 needs a --budget")
        if args.budget_marker is not None and args.budget_marker < 0:
            raise ValueError(f"--budget-marker must be >= 0 (0: off), got {args.budget_marker}")
        if args.budget_marker and (args.s1 or args.budget == 0):
            raise ValueError("--budget-marker counts down from --budget: it needs one, and does not go with --s1")
        max_new = args.max_new_tokens if args.max_new_tokens is not None else (2 * args.budget or 256)
        check_sampling_args(max_new, args.temperature, args.top_p)
        if args.prompt is None:  # the first built-in test problem, with its answer
            example = data.builtin_problems("test", 1)[0]
            args.prompt, args.answer = example.problem, args.answer or example.answer
        model_lib.set_threads()
        model, tokenizer = model_lib.load_model(args.model, adapter=args.adapter, quantize=not args.no_quantize,
                                                trainable=False)
        every = args.budget_marker if args.budget_marker is not None else model.lcpo_marker
        model = model_lib.rollout_copy(model)  # the same function, dequantized and merged once: faster to sample from
        marker = BudgetMarker(tokenizer, every) if every and args.budget and not args.s1 else None
        problem = data.Problem(args.prompt, args.answer or "", multiple_choice=False)
        asked = None if args.s1 else args.budget or None  # S1 (as the paper runs it) has no length sentence
        prompt = data.lcpo_prompt(tokenizer, problem, asked, args.mode, args.budget_in)
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
                              args.temperature, args.top_p, generator, on_token=stream, marker=marker,
                              budgets=[args.budget])
            text = tokenizer.decode(out.text_tokens(), skip_special_tokens=True)  # the markers shown, not judged
            print()
    except (ValueError, model_lib.ModelError) as e:  # e.g. a prompt and response longer than the model's context
        sys.exit(f"error: {e}")
    line = f"--- {out.n_y} tokens (target {args.budget or 'none'}), stopped by {out.finish}"
    if args.answer is not None:
        line += f", correct: {reward.is_correct(text, args.answer, boxed_only=False)}"
    print(line)


if __name__ == "__main__":
    main()
