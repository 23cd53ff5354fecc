import itertools
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st

import data
import model as model_lib
import sample
import shared_prompts
from sample import Rollout, budget_forcing, generate, sequence_logprobs
from tests.conftest import make_char_tokenizer, make_tiny_llama

MESSAGES = ["1+1?", "What is seven times six, please?", "Ava has 3 pencils.", "x"]


@pytest.fixture
def prompts(char_tokenizer):
    return [data.encode_prompt(char_tokenizer, m) for m in MESSAGES]  # four different lengths


def _left_pad(prompts, pad_id):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _run(model, prompts, tok, n=16, **kwargs):
    return generate(model, prompts, n, tok.pad_token_id, kwargs.pop("stop_ids", []), **kwargs)


def test_greedy_matches_hf_generate_with_left_padding(tiny_llama, char_tokenizer, prompts):
    ids, mask = _left_pad(prompts, char_tokenizer.pad_token_id)
    expected = tiny_llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                                   pad_token_id=char_tokenizer.pad_token_id, eos_token_id=None)
    ours = _run(tiny_llama, prompts, char_tokenizer, 24, temperature=0)
    assert [r.tokens for r in ours] == expected[:, ids.shape[1]:].tolist()
    assert all(r.finish == "length" and r.n_y == 24 for r in ours)


def test_a_row_alone_equals_the_row_in_a_padded_batch(tiny_llama, char_tokenizer, prompts):
    batch = _run(tiny_llama, prompts, char_tokenizer, 20, temperature=0)
    for prompt, in_batch in zip(prompts, batch):
        (alone,) = _run(tiny_llama, [prompt], char_tokenizer, 20, temperature=0)
        assert alone.tokens == in_batch.tokens
        assert alone.logprobs == pytest.approx(in_batch.logprobs, abs=1e-4)


def test_stop_id_ends_its_row_and_nothing_after_counts(tiny_llama, char_tokenizer, prompts):
    free = _run(tiny_llama, prompts, char_tokenizer, 20, temperature=0)
    stop = free[1].tokens[5]  # a token row 1 produces at step 6
    stopped = _run(tiny_llama, prompts, char_tokenizer, 20, temperature=0, stop_ids=[stop])
    for f, s in zip(free, stopped):
        if stop in f.tokens:
            n = f.tokens.index(stop) + 1
            assert s.tokens == f.tokens[:n] and s.finish == "eos" and s.n_y == n
            assert len(s.logprobs) == n
        else:
            assert s.tokens == f.tokens and s.finish == "length"
    assert stopped[1].n_y <= 6


def test_per_row_token_limits(tiny_llama, char_tokenizer, prompts):
    out = generate(tiny_llama, prompts, [3, 9, 1, 5], char_tokenizer.pad_token_id, [], temperature=0)
    assert [r.n_y for r in out] == [3, 9, 1, 5]
    full = _run(tiny_llama, prompts, char_tokenizer, 9, temperature=0)
    assert [r.tokens for r in out] == [f.tokens[:n] for f, n in zip(full, [3, 9, 1, 5])]


def _grpo_rows(prompts, G=3):
    return [p for p in prompts for _ in range(G)]  # each prompt G times, as in a GRPO step


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_prefix_sharing_compaction_and_static_cache_sample_the_same_tokens(tiny_llama, char_tokenizer, prompts,
                                                                           temperature):
    from bench import ablated  # the decoder with its speed-ups taken away, one by one

    rows = _grpo_rows(prompts)
    limits = [3 + 2 * i for i in range(len(rows))]  # rows finish at different steps
    runs = {}
    for flags in itertools.product((True, False), repeat=4):
        generator = torch.Generator().manual_seed(7)
        speed_ups = dict(share_prefix=flags[0], compact=flags[1], static_cache=flags[2], grow_cache=flags[3])
        runs[flags] = generate(tiny_llama, rows, limits, char_tokenizer.pad_token_id, [], temperature,
                               generator=generator, make_decoder=ablated(**speed_ups))
    runs["default"] = generate(tiny_llama, rows, limits, char_tokenizer.pad_token_id, [], temperature,
                               generator=torch.Generator().manual_seed(7))
    plain = runs[False, False, False, False]
    assert [r.n_y for r in plain] == limits
    for out in runs.values():
        assert [r.tokens for r in out] == [r.tokens for r in plain]
        for a, b in zip(out, plain):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    if temperature > 0:  # the G copies of a prompt are different samples, not one sample copied
        assert len({tuple(r.tokens) for r in runs[True, True, True, True][:3]}) > 1


def test_generation_builds_no_autograd_graph(tiny_llama, char_tokenizer, prompts):
    tiny_llama.requires_grad_(True)  # as the policy is when it samples without a rollout copy
    seen = []
    hook = tiny_llama.register_forward_hook(lambda module, args, out: seen.append(out.logits.requires_grad))
    try:
        generate(tiny_llama, prompts, 4, char_tokenizer.pad_token_id, [], 1.0)
    finally:
        hook.remove()
    assert seen and not any(seen)


def test_the_growing_cache_holds_what_concatenation_holds_and_moves_only_when_it_doubles(tiny_llama):
    from transformers import DynamicCache

    from sample import growing_cache

    grown, concatenated = growing_cache(tiny_llama.config), DynamicCache(config=tiny_llama.config)
    places = set()  # where layer 0's keys live: in place, they move only when the room runs out
    torch.manual_seed(0)
    for step, width in enumerate([5] + [1] * 40):
        k, v = torch.randn(3, 2, width, 16), torch.randn(3, 2, width, 16)
        if step == 20:  # rows dropped from the batch, as compaction does
            for cache in (grown, concatenated):
                cache.reorder_cache(torch.tensor([2, 0]))
        k, v = (k[:2], v[:2]) if step >= 20 else (k, v)
        for cache in (grown, concatenated):
            out = cache.layers[0].update(k, v)
        torch.testing.assert_close(out[0], concatenated.layers[0].keys, rtol=0, atol=0)
        torch.testing.assert_close(grown.layers[0].values, concatenated.layers[0].values, rtol=0, atol=0)
        places.add(grown.layers[0].keys.data_ptr())
    assert grown.get_seq_length() == concatenated.get_seq_length() == 45
    assert len(places) <= 5  # 5 -> 10 -> 20 (and once after the reorder) -> 40 -> 80 slots, not one per token


def test_compaction_feeds_only_live_rows_and_sharing_prefills_each_prompt_once(tiny_llama, char_tokenizer, prompts):
    from bench import ablated

    rows = _grpo_rows(prompts)
    limits = [1 + i for i in range(len(rows))]
    for share, compact in ((True, True), (False, False)):  # generate's own decoder, and one without either
        widths = []  # rows in each forward pass
        hook = tiny_llama.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[0]),
                                                    with_kwargs=True)
        try:
            generate(tiny_llama, rows, limits, char_tokenizer.pad_token_id, [], 1.0,
                     make_decoder=None if share else ablated(share_prefix=False, compact=False))
        finally:
            hook.remove()
        prefill, decode = widths[0], widths[1:]
        if share:
            assert prefill == len(prompts)
            assert sum(decode) == sum(n - 1 for n in limits)  # a row is fed once per token after its first
        else:
            assert prefill == len(rows)
            assert decode == [len(rows)] * (max(limits) - 1)


@pytest.mark.parametrize("temperature", [0.6, 1.0, 0.0])
def test_logprobs_equal_a_fresh_forward_pass(tiny_llama, char_tokenizer, prompts, temperature):
    generator = torch.Generator().manual_seed(0)
    out = _run(tiny_llama, prompts, char_tokenizer, 16, temperature=temperature, generator=generator)
    ids, mask = _left_pad([p + r.tokens for p, r in zip(prompts, out)], char_tokenizer.pad_token_id)
    with torch.no_grad():
        fresh = sequence_logprobs(tiny_llama, ids, mask, temperature)  # [B, T-1]
    for i, r in enumerate(out):
        torch.testing.assert_close(fresh[i, -r.n_y:], torch.tensor(r.logprobs), atol=1e-4, rtol=1e-4)


def test_sampling_is_seeded_and_top_p_keeps_to_the_nucleus(tiny_llama, char_tokenizer, prompts):
    def run(seed, **kw):
        return _run(tiny_llama, prompts, char_tokenizer, 16, temperature=1.0,
                    generator=torch.Generator().manual_seed(seed), **kw)

    assert [r.tokens for r in run(3)] == [r.tokens for r in run(3)]
    assert [r.tokens for r in run(3)] != [r.tokens for r in run(4)]
    # a nucleus this small holds only the top token: sampling is greedy and certain
    narrow = run(3, top_p=1e-6)
    greedy = _run(tiny_llama, prompts, char_tokenizer, 16, temperature=0)
    assert [r.tokens for r in narrow] == [r.tokens for r in greedy]
    assert all(lp == pytest.approx(0.0, abs=1e-6) for r in narrow for lp in r.logprobs)


def test_top_p_renormalises_over_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    lp = sample.sampling_logprobs(logits, 1.0, top_p=0.8)
    # 0.5 + 0.3 reaches 0.8: those two are kept and renormalised
    torch.testing.assert_close(lp.exp(), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_chunked_logprobs_and_their_gradients_match_the_plain_computation(char_tokenizer, prompts):
    model = make_tiny_llama(char_tokenizer)
    ids, mask = _left_pad(prompts, char_tokenizer.pad_token_id)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=sample.position_ids(mask)).logits
    plain = (logits[:, :-1].float() / 0.7).log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    plain.sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = sequence_logprobs(model, ids, mask, 0.7, chunk=5 * len(ids))  # several chunks, a ragged last one
    torch.testing.assert_close(chunked, plain)
    chunked.sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # the last tokens alone (a response after its prompt): the same numbers
        torch.testing.assert_close(sequence_logprobs(model, ids, mask, 0.7, chunk=5, last=7), plain[:, -7:].detach())


def _groups(prompts, seed=0):
    """GRPO rows: each prompt 3 times, with responses of different lengths (random tokens, a few ending in EOS)."""
    gen = torch.Generator().manual_seed(seed)
    rows, rollouts = [], []
    for p in prompts:
        for n in torch.randint(1, 12, (3,), generator=gen).tolist():
            tokens = torch.randint(10, 90, (n,), generator=gen).tolist()
            rows.append(p)
            rollouts.append(Rollout(tokens, torch.rand(n, generator=gen).log().tolist(), "length"))
    return rows, rollouts


def _per_row(model, rows, rollouts, pad_id, temperature):
    """Each row its own prompt + response, left-padded (sample.pack), every position scored, read at its response."""
    ids, mask, resp_mask, _ = sample.pack(rows, rollouts, pad_id, "cpu")
    return sequence_logprobs(model, ids, mask, temperature)[:, -resp_mask.shape[1]:] * resp_mask, resp_mask


def test_the_shared_prompt_pass_gives_each_rows_log_probs_and_gradients(char_tokenizer, prompts):
    model = make_tiny_llama(char_tokenizer, seed=2).train()
    rows, rollouts = _groups(prompts)
    expected, resp_mask = _per_row(model, rows, rollouts, char_tokenizer.pad_token_id, 0.7)
    (expected * torch.linspace(-1, 1, len(rows))[:, None]).sum().backward()  # a loss that weighs rows differently
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    units = [list(range(j, j + 3)) for j in range(0, len(rows), 3)]  # each group's three rows, one micro-batch
    inputs, shared_mask, old = shared_prompts.pack_shared(units, rows, rollouts, char_tokenizer.pad_token_id, "cpu")
    assert inputs["ids"].shape[0] == len(prompts)  # one sequence per group: each prompt once
    torch.testing.assert_close(shared_mask, resp_mask)
    shared = shared_prompts.SharedBatches.logprobs(model, inputs, 0.7) * shared_mask
    torch.testing.assert_close(shared, expected, atol=1e-5, rtol=1e-5)
    (shared * torch.linspace(-1, 1, len(rows))[:, None]).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-5, rtol=1e-4)
    # the test sees the mask: responses that also see the responses before them give other log-probs
    seen_by_all = (inputs["mask"] == 0) | (inputs["ids"] != char_tokenizer.pad_token_id)[:, None, None, :]
    causal = torch.ones_like(seen_by_all).tril()
    broken = dict(inputs, mask=torch.zeros_like(inputs["mask"]).masked_fill(~(seen_by_all & causal), -1e30))
    with torch.no_grad():
        assert not torch.allclose(shared_prompts.SharedBatches.logprobs(model, broken, 0.7) * shared_mask, expected,
                                  atol=1e-3)


def _loss_pass(model, micro, n_rows, width):
    """Each row's response log-probs [n_rows, width] (right-aligned, 0 past the response), response mask and old
    log-probs, from a pass over a step's LossBatches, and the gradient of a loss that weighs rows differently."""
    model.zero_grad()
    logp, masks, olds = (torch.zeros(n_rows, width) for _ in range(3))
    weights = torch.linspace(-1, 1, n_rows)
    for rows, inputs, resp_mask, old in micro:
        row_logp = micro.logprobs(model, inputs, 0.7) * resp_mask  # [b, R]
        (row_logp * weights[rows][:, None]).sum().backward()
        R = resp_mask.shape[1]
        logp[rows, -R:], masks[rows, -R:], olds[rows, -R:] = row_logp.detach(), resp_mask, old
    return logp, masks, olds, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_the_loss_pass_with_shared_prompts_is_the_plain_one(char_tokenizer, prompts):
    """--share-prompts (shared_prompts.SharedBatches) against the plain pass (sample.LossBatches) over the same
    rows of a step, some left out: every row once, the same log-probs, masks, old log-probs and gradients."""
    model = make_tiny_llama(char_tokenizer, seed=3).train()
    rows, rollouts = _groups(prompts, seed=1)
    passed = [j for j in range(len(rows)) if j % 5 != 2]  # as rows of advantage 0 are left out
    width = max(r.n_y for r in rollouts)
    out = {}
    for name, LossBatches in (("plain", sample.LossBatches), ("shared", shared_prompts.SharedBatches)):
        micro = LossBatches(model, rows, rollouts, passed, 60, pad_id=char_tokenizer.pad_token_id)
        assert sorted(j for rows_of, *_ in micro for j in rows_of) == passed and len(micro) > 1
        out[name] = _loss_pass(model, micro, len(rows), width)
    (plain, plain_mask, plain_old, plain_grads), (shared, shared_mask, shared_old, shared_grads) = out.values()
    assert torch.equal(plain_mask, shared_mask) and torch.equal(plain_old, shared_old)
    assert plain_mask[[j for j in range(len(rows)) if j not in passed]].sum() == 0
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    for name in plain_grads:
        torch.testing.assert_close(shared_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # the plain pass reads what a fresh forward pass over each row gives
        expected, _ = _per_row(model, rows, rollouts, char_tokenizer.pad_token_id, 0.7)
    torch.testing.assert_close(plain[passed], expected[passed][:, -width:], atol=1e-5, rtol=1e-5)


@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=12), prompt=st.integers(1, 30),
       group=st.integers(1, 4), max_tokens=st.integers(1, 120), per_key=st.sampled_from([0.0, 50.0, math.inf]))
def test_share_prompts_keeps_groups_together_and_every_row_once(lengths, prompt, group, max_tokens, per_key):
    prompts = [[j // group] * prompt for j in range(len(lengths))]  # groups of `group` rows share a prompt
    micro = shared_prompts.share_prompts(prompts, lengths, max_tokens, per_key)
    assert sorted(j for units in micro for u in units for j in u) == list(range(len(lengths)))
    for units in micro:
        sizes = [prompt + sum(lengths[j] for j in u) for u in units]
        assert all(len({tuple(prompts[j]) for j in u}) == 1 for u in units)  # a unit: one prompt
        assert len(units) * max(sizes) <= max_tokens or sum(map(len, units)) == 1  # within budget, or a row alone
        for u in units:  # each response joined its unit only where that costs less than a unit of its own
            for k in range(1, len(u)):
                width, r = prompt + sum(lengths[j] for j in u[:k]), lengths[u[k]]
                assert 2 * width * r + r * r <= (prompt + r) ** 2 + per_key * prompt


def test_share_prompts_shares_a_long_prompt_and_not_a_short_one_before_long_responses():
    config = make_tiny_llama(make_char_tokenizer()).config  # hidden 64, kv 32, intermediate 128: 288 per key
    per_key = shared_prompts.linear_per_key(config)
    assert per_key == 64 + 32 + 1.5 * 128
    long_prompt = shared_prompts.share_prompts([[1] * 200] * 4, [20] * 4, 4096, per_key)
    assert [len(u) for units in long_prompt for u in units] == [4]  # 200 prompt tokens once, not four times
    short_prompt = shared_prompts.share_prompts([[1] * 5] * 4, [500] * 4, 4096, per_key)
    assert [len(u) for units in short_prompt for u in units] == [1, 1, 1, 1]  # 5 tokens saved, 500^2 pairs lost


@pytest.mark.parametrize("call, message", [
    (lambda m, t, p: generate(m, [], 4, t.pad_token_id, []), "at least one prompt"),
    (lambda m, t, p: generate(m, [p[0], []], 4, t.pad_token_id, []), "no empty prompt"),
    (lambda m, t, p: generate(m, p, 0, t.pad_token_id, []), "max_new_tokens must be positive"),
    (lambda m, t, p: generate(m, p, [4, 4, -1, 4], t.pad_token_id, []), "max_new_tokens must be positive"),
    (lambda m, t, p: generate(m, p, 4, t.pad_token_id, [], temperature=-0.1),
     "temperature must be a finite number >= 0"),
    (lambda m, t, p: generate(m, p, 4, t.pad_token_id, [], top_p=0.0), r"top_p must be in \(0, 1\]"),
    (lambda m, t, p: generate(m, p, 4, t.pad_token_id, [], top_p=1.5), r"top_p must be in \(0, 1\]"),
    (lambda m, t, p: generate(m, [p[0] * 100], 4, t.pad_token_id, []), "more than the model's context of 512"),
    (lambda m, t, p: generate(m, p, 500, t.pad_token_id, []), "more than the model's context"),
])
def test_bad_generation_arguments(tiny_llama, char_tokenizer, prompts, call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_llama, char_tokenizer, prompts)


def test_roll_out_draws_generates_judges_and_rewards_by_seed_and_step(tiny_llama, char_tokenizer):
    import reward
    from tests.conftest import tiny_config

    cfg = tiny_config("unused", n_min=4, n_max=12, group_size=3, prompts_per_step=2, max_new_tokens=12, mode="mix")
    problems = data.builtin_problems("train", 10)
    batch = sample.roll_out(cfg, 5, tiny_llama, char_tokenizer, problems)
    assert len(batch.rollouts) == len(batch.prompt_ids) == len(batch.rewards) == 6
    for j in range(6):  # G rows in a row for each prompt, each its own sample of it
        first = j - j % 3
        assert batch.prompt_ids[j] == batch.prompt_ids[first] and batch.problems[j] is batch.problems[first]
        n_gold, mode = batch.targets[j]
        assert f"Think for {'maximum ' if mode == 'max' else ''}{n_gold} tokens." in char_tokenizer.decode(
            batch.prompt_ids[j])
        r = batch.rollouts[j]
        text = char_tokenizer.decode(r.tokens, skip_special_tokens=True)
        assert batch.correct[j] == reward.judge(text, batch.problems[j].answer, batch.problems[j].multiple_choice, True,
                                               cfg.boxed_only)
        assert batch.rewards[j] == reward.lcpo_reward(batch.correct[j], r.n_y, n_gold, mode, cfg.alpha, cfg.delta)
        assert r.n_y <= 12
    again, other = (sample.roll_out(cfg, step, tiny_llama, char_tokenizer, problems) for step in (5, 6))
    assert [r.tokens for r in again.rollouts] == [r.tokens for r in batch.rollouts]  # seeded by (seed, step)
    assert again.rng.random() == batch.rng.random()  # and it hands on its random numbers where the draw left them
    assert [r.tokens for r in other.rollouts] != [r.tokens for r in batch.rollouts]
    short = sample.roll_out(cfg, 5, tiny_llama, char_tokenizer, problems, max_new_tokens=2)
    assert short.prompt_ids == batch.prompt_ids and max(r.n_y for r in short.rollouts) <= 2


# -----------------------------------------------------------------------------
# S1 budget forcing


@pytest.fixture
def eager_to_stop(tiny_llama, char_tokenizer):
    """The tiny model, made to emit EOS on every 4th decoding step, so S1 must keep it going."""
    calls = {"n": 0}
    eos = char_tokenizer.eos_token_id

    def hook(module, inputs, logits):
        calls["n"] += 1
        if calls["n"] % 4 == 0:
            logits = logits.clone()
            logits[:, -1, eos] += 1e4
        return logits

    handle = tiny_llama.lm_head.register_forward_hook(hook)
    yield tiny_llama
    handle.remove()


@pytest.mark.parametrize("budget", [1, 7, 30])
def test_budget_forcing_thinks_exactly_its_budget(eager_to_stop, char_tokenizer, prompts, budget):
    out = budget_forcing(eager_to_stop, char_tokenizer, prompts, budget, answer_tokens=5)
    # the character tokenizer knows </think>: the cue closes the thinking before the answer
    cue = char_tokenizer.encode("\n</think>" + sample.ANSWER_CUE, add_special_tokens=False)
    wait = char_tokenizer.encode(sample.WAIT, add_special_tokens=False)
    eos = char_tokenizer.eos_token_id
    for r in out:
        thinking = r.tokens[:budget]
        assert r.tokens[budget:budget + len(cue)] == cue  # the cue comes exactly at the budget
        assert eos not in thinking  # early stops were replaced by "Wait"
        assert 0 < r.n_y - budget - len(cue) <= 5  # then a short answer
        assert len(r.logprobs) == r.n_y
        assert all(math.isnan(lp) for lp in r.logprobs[budget:budget + len(cue)])
    if budget == 30:
        text = char_tokenizer.decode(out[0].tokens[:budget])
        assert sample.WAIT in text and len(wait) == len(sample.WAIT)


def test_budget_forcing_cue_without_think_tokens(tiny_llama, prompts):
    from tests.conftest import make_char_tokenizer

    plain = make_char_tokenizer()
    plain.get_vocab = lambda: {}  # as for a model that never thinks in tags
    (out,) = budget_forcing(tiny_llama, plain, prompts[:1], 6, answer_tokens=3)
    assert plain.decode(out.tokens[6:]).startswith(sample.ANSWER_CUE)


@pytest.fixture
def stops_often(tiny_llama, char_tokenizer, request):
    """The tiny model with its EOS logit raised (by 0.1 for greedy decoding, 3 when sampling: every few tokens
    it stops), by what it has read: the same model however its forward calls are split, unlike eager_to_stop."""
    eos = char_tokenizer.eos_token_id
    raise_by = getattr(request, "param", 0.1)
    handle = tiny_llama.lm_head.register_forward_hook(lambda module, inputs, logits: logits.index_add(
        -1, torch.tensor([eos]), torch.full((*logits.shape[:-1], 1), raise_by)))
    yield tiny_llama
    handle.remove()


def s1_both_ways(model, tokenizer, prompts, budget, temperature=0.0, top_p=1.0, seed=3):
    """S1 in one pass and as the old rounds (bench.s1_rounds), each with its own generator from one seed."""
    from bench import s1_rounds

    out = {}
    for name, s1 in (("pass", budget_forcing), ("rounds", s1_rounds)):
        generator = torch.Generator().manual_seed(seed)
        out[name] = s1(model, tokenizer, prompts, budget, temperature, top_p, 6, generator), generator.get_state()
    return out["pass"], out["rounds"]


def waits(tokenizer, rollout, budget):
    return tokenizer.decode(rollout.tokens[:budget]).count(sample.WAIT)


def same_rollouts(ours, old):
    for a, b in zip(ours, old, strict=True):
        assert a.tokens == b.tokens and a.finish == b.finish
        assert [math.isnan(x) for x in a.logprobs] == [math.isnan(x) for x in b.logprobs]  # what was inserted
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4, nan_ok=True)


@pytest.mark.parametrize("budget", [1, 7, 40, 90])
def test_budget_forcing_greedy_is_the_old_rounds_text(stops_often, char_tokenizer, prompts, budget):
    (ours, _), (old, _) = s1_both_ways(stops_often, char_tokenizer, prompts, budget)
    same_rollouts(ours, old)
    if budget == 90:  # the rows went through several "Wait" rounds, each a new prefill in the old code
        assert min(waits(char_tokenizer, r, budget) for r in old) >= 2


@pytest.mark.parametrize("stops_often", [3.0], indirect=True)
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_budget_forcing_sampled_row_is_the_old_rounds_text(stops_often, char_tokenizer, prompts, temperature, top_p):
    """One row draws its random numbers in the same order as the rounds did (none for a forced token), so the
    same seed gives the same text, and leaves the generator where the rounds left it."""
    for prompt in prompts:
        (ours, state), (old, old_state) = s1_both_ways(stops_often, char_tokenizer, [prompt], 60, temperature, top_p)
        same_rollouts(ours, old)
        assert torch.equal(state, old_state)
        assert waits(char_tokenizer, old[0], 60) >= 2


@pytest.mark.parametrize("stops_often", [3.0], indirect=True)
def test_budget_forcing_sampled_batch_follows_the_rounds_to_the_first_wait(stops_often, char_tokenizer, prompts):
    """In a batch, the rounds drew a row's numbers after its second "Wait" only once every row had ended its
    first round; one pass cannot wait for that. Up to each row's first "Wait", the texts are the same."""
    (ours, _), (old, _) = s1_both_ways(stops_often, char_tokenizer, prompts, 60, temperature=1.0)
    wait = char_tokenizer.encode(sample.WAIT, add_special_tokens=False)
    for a, b in zip(ours, old):
        first = [i for i, lp in enumerate(b.logprobs) if math.isnan(lp)][0] + len(wait)
        assert a.tokens[:first] == b.tokens[:first] and waits(char_tokenizer, b, 60) >= 2
        assert a.n_y - len(a.tokens[60:]) == 60 and char_tokenizer.eos_token_id not in a.tokens[:60]


def test_budget_forcing_at_fixed_shapes_as_on_a_gpu(stops_often, char_tokenizer, prompts, monkeypatch):
    """On a CUDA device generate decodes at fixed shapes (StaticDecoder), finished rows kept until a bucket
    drops: the rule gives the same rollouts there."""
    import functools

    import cuda_graphs

    monkeypatch.setattr(cuda_graphs, "MIN_BUCKET", 2)
    rows = _grpo_rows(prompts, G=3)
    runs = []
    for decoder in (sample.Decoder, cuda_graphs.StaticDecoder):
        monkeypatch.setattr(sample, "generate", functools.partial(generate, make_decoder=decoder))
        runs.append(budget_forcing(stops_often, char_tokenizer, rows, 40, 0.3, answer_tokens=8,
                                   generator=torch.Generator().manual_seed(2)))
    same_rollouts(*runs)
    assert {r.finish for r in runs[0]} == {"eos", "length"}  # rows leave the batch at different steps
    assert max(waits(char_tokenizer, r, 40) for r in runs[0]) >= 1


def test_budget_forcing_prefills_once(stops_often, char_tokenizer, prompts):
    """The point of the one pass: after "Wait" it goes on from its cache; the rounds prefilled again."""
    from bench import s1_rounds

    prefills = []
    handle = stops_often.register_forward_pre_hook(
        lambda module, args, kwargs: prefills.append(kwargs["input_ids"].shape[1] > 1), with_kwargs=True)
    budget_forcing(stops_often, char_tokenizer, prompts, 60)
    ours, prefills[:] = sum(prefills), []
    s1_rounds(stops_often, char_tokenizer, prompts, 60)
    handle.remove()
    assert ours == 1 and sum(prefills) > 3


# -----------------------------------------------------------------------------
# the command line


def test_cli_samples_from_a_model_directory(tiny_model_dir, capsys):
    sample.main(["--model", str(tiny_model_dir), "--prompt", "1+1?", "--budget", "8", "--answer", "2"])
    out = capsys.readouterr().out
    assert "Think for 8 tokens." in out
    assert "--- 16 tokens (target 8), stopped by length, correct: False" in out


def test_cli_s1_is_the_papers_no_length_sentence(tiny_model_dir, capsys):
    sample.main(["--model", str(tiny_model_dir), "--prompt", "1+1?", "--budget", "5", "--s1"])
    out = capsys.readouterr().out
    assert "(target 5)" in out and "Think for" not in out  # as eval.py --s1: the budget is forced, not asked


def test_cli_samples_from_the_dense_copy(tiny_model_dir, monkeypatch, capsys):
    used = []
    real = sample.generate
    monkeypatch.setattr(sample, "generate", lambda model, *a, **k: used.append(model) or real(model, *a, **k))
    sample.main(["--model", str(tiny_model_dir), "--prompt", "1+1?", "--budget", "4"])
    (model,) = used
    assert not hasattr(model, "peft_config") and not any("4bit" in type(m).__name__ for m in model.modules())


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "x" * 100_000], "do not fit in the model's context of 512 tokens"),
    (["--max-new-tokens", "100000"], "do not fit in the model's context of 512 tokens"),
    (["--s1", "--budget", "100000"], "do not fit in the model's context of 512 tokens"),
    (["--seed", str(2**64)], "--seed must be in [0, 2**32), got 18446744073709551616"),
])
def test_cli_refuses_what_does_not_fit_the_context(tiny_model_dir, argv, message):
    with pytest.raises(SystemExit) as info:
        sample.main(["--model", str(tiny_model_dir), "--no-quantize"] + argv)
    assert str(info.value).startswith("error: ") and message in str(info.value) and "\n" not in str(info.value)


def test_cli_refuses_a_damaged_adapter(tiny_model_dir, tmp_path):
    import model as model_lib

    model, tok = model_lib.load_model(str(tiny_model_dir), quantize=False)
    model_lib.save_adapter(model, tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(SystemExit) as info:
        sample.main(["--adapter", str(tmp_path / "adapter"), "--no-quantize"])
    assert "adapter" in str(info.value) and "is damaged" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("argv, message", [
    (["--budget", "-3"], "error: --budget must be >= 0"),
    (["--temperature", "-1"], "error: temperature must be a finite number >= 0"),
    (["--temperature", "nan"], "error: temperature must be a finite number >= 0"),
    (["--temperature", "1e-40"], "error: temperature must be 0 (greedy) or at least 0.01, got 1e-40"),
    (["--top-p", "2"], "error: top_p must be in (0, 1]"),
    (["--max-new-tokens", "0"], "error: max_new_tokens must be positive"),
    (["--model", "/no/such/dir"], "error: model directory /no/such/dir does not exist"),
    (["--s1", "--budget", "0"], "error: --s1 needs a --budget"),
])
def test_cli_refuses_bad_input_before_loading(argv, message):
    with pytest.raises(SystemExit) as info:
        sample.main(argv)
    assert str(info.value).startswith(message)


def test_rollout_length_is_its_token_count():
    assert Rollout([5, 6, 1], [-0.1, -0.2, -0.3], "eos").n_y == 3


def test_the_shipped_l1_exact_adapter_turns_the_dial():
    """results/l1-exact-adapter on the reasoner: asked for 128 tokens it writes far more than for 32."""
    adapter = Path(__file__).resolve().parent.parent / "results" / "l1-exact-adapter"
    model, tokenizer = model_lib.load_model(adapter=str(adapter), quantize=False, trainable=False)
    problems = data.load_problems("builtin:totals", "test", limit=16)
    lengths = {}
    for n in (32, 128):  # sampled as eval.py samples (greedy decoding is not what it was trained to do)
        prompts = [data.lcpo_prompt(tokenizer, p, n, "exact") for p in problems]
        outs = sample.generate(model, prompts, 256, tokenizer.pad_token_id, [tokenizer.eos_token_id], temperature=0.6,
                               generator=torch.Generator().manual_seed(0))
        lengths[n] = sum(o.n_y for o in outs) / len(outs)
    # the same cap for both, so that the cap is not what differs (the lengths of the 64 x 4 evaluation: README)
    assert lengths[128] > lengths[32] + 16, lengths


def test_the_shipped_l1_max_adapter_stays_under_a_generous_budget_and_spends_more_of_a_larger_one():
    """results/l1-max-adapter on the reasoner, under Max prompts ("Think for maximum N tokens.")."""
    adapter = Path(__file__).resolve().parent.parent / "results" / "l1-max-adapter"
    model, tokenizer = model_lib.load_model(adapter=str(adapter), quantize=False, trainable=False)
    problems = data.load_problems("builtin:totals", "test", limit=16)
    lengths = {}
    for n in (32, 128):
        prompts = [data.lcpo_prompt(tokenizer, p, n, "max") for p in problems]
        outs = sample.generate(model, prompts, 256, tokenizer.pad_token_id, [tokenizer.eos_token_id], temperature=0.6,
                               generator=torch.Generator().manual_seed(0))
        lengths[n] = [o.n_y for o in outs]
    assert sum(n_y <= 128 for n_y in lengths[128]) >= 14, lengths[128]  # the 64 x 4 evaluation: 100% within N
    assert sum(lengths[128]) / 16 > sum(lengths[32]) / 16 + 10, lengths


@pytest.mark.parametrize("prompt", ["", "  \n"])
def test_cli_refuses_an_empty_prompt_before_loading(prompt, monkeypatch):
    import model as model_lib

    monkeypatch.setattr(model_lib, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as info:
        sample.main(["--prompt", prompt])
    assert str(info.value).startswith("error: --prompt is empty") and "\n" not in str(info.value)


def test_a_log_prob_chunk_holds_about_chunk_tokens_of_logits_however_many_rows(char_tokenizer):
    # many short rows (a micro-batch of short responses) must not hold rows x positions x vocab logits at once
    model = make_tiny_llama(char_tokenizer)
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(out.shape[:2]))
    hidden = torch.randn(40, 30, model.config.hidden_size)
    targets = torch.randint(0, len(char_tokenizer), (40, 30))
    plain = sample.token_logprobs(model, hidden, targets, chunk=10 ** 6)
    seen.clear()
    chunked = sample.token_logprobs(model, hidden, targets, chunk=128)  # 3 positions of 40 rows a chunk
    assert all(rows * positions <= 128 for rows, positions in seen) and len(seen) == 10
    torch.testing.assert_close(chunked, plain)
    sample.token_logprobs(model, hidden[:, :5], targets[:, :5], chunk=8)  # fewer tokens than rows: a position each
    assert seen[-1] == (40, 1)
