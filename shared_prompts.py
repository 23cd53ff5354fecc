"""
The loss pass with each prompt computed once for its G responses: a speed-up of train_step's loss pass, on by
default (--share-prompts), not part of the method. It gives sample.LossBatches's micro-batches in the same form,
with the same log-probs and gradients up to float rounding (tests/test_sample.py checks both). What it buys, and
where: BENCHMARKS.md.

A GRPO group is one prompt and its G responses. sample.LossBatches gives every response a row of its own, the
prompt then the response, so the prompt goes through the model G times. Here a group becomes one sequence, the
prompt once then each response in turn, under a block attention mask: a response sees the prompt and its own
past, not the other responses, and its positions continue from the prompt's end, as in its own row.
"""

import math

import torch

import sample
from sample import Rollout


class SharedBatches(sample.LossBatches):
    """sample.LossBatches with each group's prompt computed once: micro-batches of units (share_prompts), each
    unit a prompt and some of its responses, packed into one row by pack_shared."""

    def __init__(self, model, prompts: list[list[int]], rollouts: list[Rollout], rows: list[int], max_tokens: int,
                 pad_id: int):
        self.prompts, self.rollouts, self.pad_id = prompts, rollouts, pad_id
        self.device, self.dtype = next(model.parameters()).device, model.get_input_embeddings().weight.dtype
        lengths = [r.n_y for r in rollouts]
        self.micro = share_prompts(prompts, lengths, max_tokens, linear_per_key(model.config), rows)

    def __iter__(self):
        for units in self.micro:
            rows = [j for unit in units for j in unit]
            yield rows, *pack_shared(units, self.prompts, self.rollouts, self.pad_id, self.device, self.dtype)

    @staticmethod
    def logprobs(model, inputs: dict, temperature: float) -> torch.Tensor:
        """sample.LossBatches.logprobs on pack_shared's sequences: one forward pass, then the lm_head on the hidden
        state before each response token (inputs' unit_of and column), [n, R]."""
        hidden = model.get_decoder()(input_ids=inputs["ids"], attention_mask=inputs["mask"],
                                     position_ids=inputs["positions"], use_cache=False).last_hidden_state  # [u, T, H]
        return sample.token_logprobs(model, hidden[inputs["unit_of"], inputs["column"]], inputs["targets"],
                                     temperature)


def share_prompts(prompts: list[list[int]], lengths: list[int], max_tokens: int, linear_per_key: float = math.inf,
                  rows: list[int] | None = None) -> list[list[list[int]]]:
    """Rows in micro-batches of units for pack_shared ([micro-batch][unit][row index]): the rows of a unit
    share one prompt (a GRPO group's), computed once for all of them, and units of similar size share a
    micro-batch of at most max_tokens padded tokens. lengths: each row's response length; rows: the rows
    to pass (default all).

    A unit is the prompt, then as many of its responses as fit in max_tokens and still pay: under the block
    mask every token of a unit is scored against every column of it, so a response of R tokens joining a
    unit T wide adds 2TR + R^2 query-key pairs, where a unit of its own would cost (P + R)^2 pairs and P more
    tokens through the layers; linear_per_key (linear_per_key(config)) converts tokens into pairs. Short
    responses after a long prompt share it; responses far longer than it go alone, as in the per-row pass.
    """
    groups = {}
    for j in range(len(prompts)) if rows is None else rows:
        groups.setdefault(tuple(prompts[j]), []).append(j)
    units, sizes = [], []  # sizes: a unit's width, its prompt and its responses
    for prompt, members in groups.items():
        P = len(prompt)
        for k, j in enumerate(members):
            R = lengths[j]
            joined = 2 * sizes[-1] * R + R * R if k else 0  # query-key pairs it adds to the unit before it
            if k == 0 or sizes[-1] + R > max_tokens or joined > (P + R) ** 2 + linear_per_key * P:  # a new unit
                units.append([])
                sizes.append(P)
            units[-1].append(j)
            sizes[-1] += R
    return [[units[i] for i in idx] for idx in sample.micro_batches(sizes, max_tokens)]


def linear_per_key(config) -> float:
    """A decoder layer's work per token in its linear layers, in units of its attention's work per query-key
    pair (4 x hidden flops): (2 hidden^2 + 2 hidden kv + 3 hidden intermediate) x 2 / (4 hidden)."""
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden, kv = config.hidden_size, config.num_key_value_heads * head
    return hidden + kv + 1.5 * config.intermediate_size


def pack_shared(units: list[list[int]], prompts: list[list[int]], rollouts: list[Rollout], pad_id: int, device,
                dtype=torch.float32):
    """Rows for SharedBatches.logprobs, each prompt computed once: the rows of a unit (of share_prompts, all
    with one prompt) become one sequence, the prompt then each response, under a block attention mask (a
    response sees the prompt and its own past, not the other responses), each response's positions continuing
    from the prompt's end.

    Returns (inputs, response mask [n, R], old log-probs [n, R]), a row for each row of the units in their
    order, in sample.pack's layout (every response ends at the last column). inputs: ids [u, T],
    positions [u, T], the additive mask [u, 1, T, T] (0: seen; a padding column sees only itself), and for each
    response token the sequence and column of the hidden state that predicts it, and the token ([n, R] each).
    """
    sequences, positions, segments, predictors = [], [], [], []  # per unit; per row: (unit, columns)
    for u, rows in enumerate(units):
        P = len(prompts[rows[0]])
        tokens, position, segment = list(prompts[rows[0]]), list(range(P)), [0] * P  # segment 0: the prompt
        for k, j in enumerate(rows, 1):  # the prompt's last token predicts a response's first, then its own
            predictors.append((u, [P - 1] + list(range(len(tokens), len(tokens) + rollouts[j].n_y - 1))))
            tokens, position = tokens + rollouts[j].tokens, position + list(range(P, P + rollouts[j].n_y))
            segment += [k] * rollouts[j].n_y
        sequences.append(tokens), positions.append(position), segments.append(segment)
    width = max(map(len, sequences))
    pads = [width - len(s) for s in sequences]
    ids, positions = _padded(sequences, pad_id, width, device), _padded(positions, 0, width, device)  # [u, T]
    segment = _padded(segments, -1, width, device)
    columns = torch.arange(width, device=device)
    q, k = segment[:, :, None], segment[:, None, :]  # [u, query, key]; segment -1: padding
    causal, diagonal = columns[:, None] >= columns, columns[:, None] == columns
    seen = (causal & (k != -1) & ((k == 0) | (k == q))) | diagonal  # the prompt and its own response, or itself
    mask = torch.zeros((len(units), 1, width, width), dtype=dtype, device=device)
    mask.masked_fill_(~seen[:, None], torch.finfo(dtype).min)  # in place: one [u, 1, T, T] mask, not two
    responses = [rollouts[j] for rows in units for j in rows]
    R = max(r.n_y for r in responses)
    inputs = dict(ids=ids, positions=positions, mask=mask,
                  unit_of=_padded([[u] * len(c) for u, c in predictors], 0, R, device),
                  column=_padded([[c + pads[u] for c in cols] for u, cols in predictors], 0, R, device),
                  targets=_padded([r.tokens for r in responses], 0, R, device))
    old = _padded([[0.0 if math.isnan(lp) else lp for lp in r.logprobs] for r in responses], 0.0, R, device)
    return inputs, _padded([[1.0] * r.n_y for r in responses], 0.0, R, device), old


def _padded(rows: list[list], fill, width: int, device) -> torch.Tensor:
    """rows as a [rows, width] tensor, each filled with `fill` before it: every row ends at the last column."""
    return torch.tensor([[fill] * (width - len(r)) + r for r in rows], device=device)
