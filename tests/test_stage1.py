"""The first stage (stage1.py): the length step, its loss, and the stop probe."""

import dataclasses
import json
import random
import types

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

import data
import model as model_lib
import runs
import sample
import stage1
import train
from tests.conftest import make_char_tokenizer, make_tiny_llama, read_metrics, tiny_config


def test_length_steps_end_each_response_at_the_n_its_prompt_asks(learnable_model_dir, tmp_path, monkeypatch):
    asked, learnt = [], []
    build_prompt, stop_loss = data.build_prompt, stage1.stop_loss
    monkeypatch.setattr(data, "build_prompt",  # the prompts of problems (data.within_context measures an empty one's)
                        lambda problem, n, *a: (problem and asked.append((n, a[0]))) or build_prompt(problem, n, *a))

    def recording(model, ids, mask, n, eos_id, within=None):
        rows = [r[m.bool()].tolist() for r, m in zip(ids, mask)]
        flags = [False] * len(rows) if within is None else within.tolist()
        learnt.extend(zip(rows, n.tolist(), flags))
        return stop_loss(model, ids, mask, n, eos_id, within=within)

    monkeypatch.setattr(stage1, "stop_loss", recording)
    cfg = tiny_config(learnable_model_dir, n_min=4, n_max=12, mode="mix", length_steps=2, steps=4)
    metrics = read_metrics(train.train(cfg, tmp_path / "run"))
    rows = [m.get("length_rows", 0) for m in metrics]
    assert rows[:2] > [0, 0] and rows[2:] == [0, 0] and len(learnt) == sum(rows)
    rollout_modes = [mode for _, mode in asked[:cfg.prompts_per_step]]
    relabelled = asked[cfg.prompts_per_step:cfg.prompts_per_step + rows[0]]  # step 0: its rollouts' prompts, then these
    assert sorted(n for n, _ in relabelled) == sorted(k for _, k, _ in learnt[:rows[0]])
    assert {m for _, m in relabelled} <= set(rollout_modes) and {w for _, _, w in learnt} == {True, False}  # both
    tok = make_char_tokenizer()
    for row, k, within in learnt:  # the prompt asks for k, then k tokens of the response, no stop token
        prompt = tok.decode(row[:-k])
        assert 4 <= k <= 12 and tok.eos_token_id not in row[-k:]
        assert f"Think for {'maximum ' if within else ''}{k} tokens." in prompt  # a Max prompt: N/2 to N tokens
    assert all(m["stop_nll"] > 0 and m["kl"] >= 0 and m["ratio_mean"] is None for m in metrics[:2])  # supervised
    assert all(m["ratio_mean"] == pytest.approx(1.0, abs=1e-3) for m in metrics[2:])  # then LCPO
    within = [m["within_budget"] for m in metrics]  # of the Max prompts' responses, n_y <= N
    assert all(w is None or 0 <= w <= 1 for w in within) and any(w is not None for w in within)


def test_length_steps_roll_out_the_untrained_model_whatever_the_adapter(learnable_model_dir, tmp_path):
    # the policy's own texts shrink as its stop moves, until none can be ended at any N: a length step learns
    # the untrained model's texts instead, so its rollouts do not depend on the adapter it starts from
    trained = train.train(tiny_config(learnable_model_dir, steps=3), tmp_path / "trained")

    def first_responses(name, **overrides):
        cfg = tiny_config(learnable_model_dir, n_max=12, steps=1, sample_every=1, lr=0.0, **overrides)
        run = train.train(cfg, tmp_path / name)
        return [e["response"] for e in json.loads((run / "samples.jsonl").read_text().splitlines()[0])["examples"]]

    assert first_responses("lcpo-fresh") != first_responses("lcpo-trained", init_adapter=str(trained))  # it matters
    assert first_responses("length-fresh", length_steps=1) == \
        first_responses("length-trained", length_steps=1, init_adapter=str(trained))


def test_a_length_step_and_an_lcpo_step_learn_from_the_same_roll_out(learnable_model_dir, tmp_path, monkeypatch):
    # both start with sample.roll_out (draw, generate, judge, reward) and log what it gave; the length step caps
    # its responses at n_max (and rolls out with the adapter off: the test after this one)
    calls, real = [], sample.roll_out

    def recording(cfg, step, sampler, tokenizer, problems, **kwargs):
        batch = real(cfg, step, sampler, tokenizer, problems, **kwargs)
        calls.append((step, kwargs.get("max_new_tokens"), batch))
        return batch

    monkeypatch.setattr(sample, "roll_out", recording)
    cfg = tiny_config(learnable_model_dir, n_min=4, n_max=12, length_steps=1, steps=2, sample_every=1)
    run = train.train(cfg, tmp_path / "run")
    assert [(step, cap) for step, cap, _ in calls] == [(0, 12), (1, None)]
    tokenizer = model_lib.load_tokenizer(str(learnable_model_dir))
    logged = [json.loads(line)["examples"] for line in (run / "samples.jsonl").read_text().splitlines()]
    for (_, _, batch), examples, metrics in zip(calls, logged, read_metrics(run)):
        assert examples == runs.examples(tokenizer, batch, every=cfg.group_size)
        assert metrics["reward_mean"] == pytest.approx(sum(batch.rewards) / len(batch.rewards), abs=1e-6)
        assert metrics["mean_n_y"] == sum(r.n_y for r in batch.rollouts) / len(batch.rollouts)


def test_stop_loss_scores_the_length_and_holds_the_text_apart_from_the_stop(char_tokenizer, monkeypatch):
    import contextlib
    import copy

    model = make_tiny_llama(char_tokenizer, seed=1)
    untrained = copy.deepcopy(model).requires_grad_(False)
    monkeypatch.setattr(model_lib, "reference", lambda m: contextlib.nullcontext(untrained))  # LoRA switched off
    torch.manual_seed(0)
    text, eos = torch.randint(10, 90, (6,)).tolist(), char_tokenizer.eos_token_id
    rows = [data.lcpo_prompt(char_tokenizer, data.Problem("1+1?", "2"), n) + text[:n] for n in (3, 6)]
    ids, mask = sample.left_pad(rows, char_tokenizer.pad_token_id, "cpu")

    def loss():
        with torch.no_grad():
            return stage1.stop_loss(model, ids, mask, torch.tensor([3, 6]), eos)

    nll, kl = loss()
    for row, n, value in zip(rows, (3, 6), nll):  # unpadded, from the plain forward: -log p(stop after n, not before)
        with torch.no_grad():
            stop = model(torch.tensor([row])).logits[0, -n:].log_softmax(-1)[:, eos]  # after tokens 1..n
        assert value.item() == pytest.approx(-(stop[-1] + torch.log1p(-stop[:-1].exp()).sum()).item(), abs=1e-4)
    with torch.no_grad():  # Max rows: a length of n//2 + 1 .. n, the same probabilities added up by hand
        within, _ = stage1.stop_loss(model, ids, mask, torch.tensor([3, 6]), eos, within=torch.tensor([True, False]))
        stop = model(torch.tensor([rows[0]])).logits[0, -3:].softmax(-1)[:, eos]  # p(stop) after tokens 1..3
    by_hand = (1 - stop[0]) * (stop[1] + (1 - stop[1]) * stop[2])  # no stop after token 1, then one after 2 or 3
    assert within[0].item() == pytest.approx(-by_hand.log().item(), abs=1e-4) and within[1] == nll[1]
    assert kl.abs().max() < 1e-5  # the model is the untrained one
    with torch.no_grad():
        model.lm_head.weight[eos] += torch.randn(64)  # the stop alone moves
    moved_nll, moved_kl = loss()
    assert (moved_nll - nll).abs().min() > 0.01 and moved_kl.abs().max() < 1e-5  # the text is held, not the stop
    with torch.no_grad():
        model.lm_head.weight[20] += torch.randn(64)  # a text token moves
    assert loss()[1].min() > 0.01


def learn_stop(model, tokenizer, problem, text, cuts, modes, steps, monkeypatch):
    """stop_loss alone, as --length-steps applies it (the first stage, and its positive control): 12 pairs an
    update, the text ended after N of its tokens, N drawn over the cuts' range, each pair Exact or Max. The
    untrained model is a frozen copy (the tiny model's LoRA cannot be switched off). Returns the losses."""
    import contextlib
    import copy
    import random

    untrained = copy.deepcopy(model).requires_grad_(False)
    monkeypatch.setattr(model_lib, "reference", lambda m: contextlib.nullcontext(untrained))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, rng, losses = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0), random.Random(0), []
    for _ in range(steps):
        pairs = [(rng.randint(min(cuts), max(cuts)), rng.choice(modes)) for _ in range(12)]
        rows = [data.lcpo_prompt(tokenizer, problem, n, mode) + text[:n] for n, mode in pairs]
        ids, mask = sample.left_pad(rows, tokenizer.pad_token_id, "cpu")
        nll, kl = stage1.stop_loss(model, ids, mask, torch.tensor([n for n, _ in pairs]), tokenizer.eos_token_id,
                                  within=torch.tensor([mode == "max" for _, mode in pairs]))
        loss = (nll + kl).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_stop_loss_makes_the_length_follow_n(char_tokenizer, monkeypatch):
    """The same text under prompts asking 3..9 tokens: learnt, the stop comes after exactly N tokens and not
    before (read by the stop probe)."""
    model = make_tiny_llama(char_tokenizer, seed=1)
    torch.manual_seed(0)
    cuts, problem, text = [3, 6, 9], data.Problem("1+1?", "2"), torch.randint(10, 90, (9,)).tolist()
    prompts = [[data.lcpo_prompt(char_tokenizer, problem, n)] for n in cuts]

    def scores():
        return stage1.length_scores(stage1.stop_probe(model, char_tokenizer, prompts, [text], list(range(1, 10))), cuts)

    before = scores()
    losses = learn_stop(model, char_tokenizer, problem, text, cuts, ["exact"], 300, monkeypatch)
    after = scores()
    assert before["median"] == [10, 10, 10] and after["median"] == cuts  # 10: no stop within the text
    assert after["length_nll"] < 0.1 < 1 < before["length_nll"] and sum(losses[-5:]) < sum(losses[:5]) / 10


def test_stop_loss_under_max_prompts_ends_within_the_budget_and_past_half_of_it(char_tokenizer, monkeypatch):
    """Half the pairs Max prompts (a length of N/2..N learnt), half Exact (exactly N): each prompt gets its own."""
    model = make_tiny_llama(char_tokenizer, seed=1)
    torch.manual_seed(0)
    cuts, problem, text = [4, 8, 12], data.Problem("1+1?", "2"), torch.randint(10, 90, (12,)).tolist()

    def scores(mode):
        prompts = [[data.lcpo_prompt(char_tokenizer, problem, n, mode)] for n in cuts]
        return stage1.length_scores(stage1.stop_probe(model, char_tokenizer, prompts, [text], list(range(1, 13))), cuts)

    assert max(scores("max")["within"]) < 0.5
    learn_stop(model, char_tokenizer, problem, text, cuts, ["exact", "max"], 250, monkeypatch)
    at_most, exact = scores("max"), scores("exact")
    assert min(at_most["within"]) > 0.9 and all(n / 2 < m <= n for m, n in zip(at_most["median"], cuts))
    assert exact["median"] == cuts and exact["median"] != at_most["median"]


def test_stop_probe_is_the_stop_log_prob_after_each_cut(tiny_llama, char_tokenizer):
    import torch

    torch.manual_seed(0)
    cuts = [3, 6, 9]
    problems = [data.Problem(t, "1") for t in ("1+1?", "A long problem about seven apples.", "x")]
    responses = [torch.randint(10, 90, (n,)).tolist() for n in (9, 12, 10)]  # longer than the cut: trimmed
    prompts = [[data.lcpo_prompt(char_tokenizer, p, n) for p in problems] for n in cuts]
    logp = stage1.stop_probe(tiny_llama, char_tokenizer, prompts, responses, cuts, batch=2)  # padded, two batches
    assert logp.shape == (3, 3, 3)
    for a in range(3):
        for r in range(3):
            ids = torch.tensor([prompts[a][r] + responses[r][:9]])
            direct = tiny_llama(input_ids=ids).logits[0].log_softmax(-1)[:, char_tokenizer.eos_token_id]
            for c, L in enumerate(cuts):  # the output after the response's L-th token
                assert logp[r, a, c].item() == pytest.approx(direct[len(prompts[a][r]) + L - 1].item(), abs=1e-4)


def test_probe_scores_reward_the_stop_where_n_says_and_not_a_length_bias():
    import torch

    reads_n = torch.tensor([[[-1.0, -6, -6], [-6, -1, -6], [-6, -6, -1]]])  # [response, asked, cut]
    shorter_when_asked_less = torch.tensor([[[-1.0, -1, -1], [-2, -2, -2], [-3, -3, -3]]])
    s = stage1.probe_scores(reads_n)
    assert s["accuracy"] == 1.0 and s["margin"] == pytest.approx(5.0) and s["chance"] == pytest.approx(1 / 3)
    # the stop rises for small N at every cut: right at one cut of three
    s = stage1.probe_scores(shorter_when_asked_less)
    assert s["accuracy"] == pytest.approx(1 / 3) and s["margin"] == pytest.approx(0.0)
    assert s["matrix"] == shorter_when_asked_less[0].tolist()


def test_length_steps_with_no_row_to_learn_say_so_then_stop_the_run(learnable_model_dir, tmp_path):
    # every response is shorter than the smallest target (the cap is below it): no text can be ended at any N
    cfg = tiny_config(learnable_model_dir, n_min=30, n_max=30, max_new_tokens=24, length_steps=5, steps=5,
                      max_bad_steps=2)
    with pytest.raises(RuntimeError, match="^2 steps in a row learnt nothing"):
        train.train(cfg, tmp_path / "run")
    metrics = read_metrics(tmp_path / "run")
    assert [(m["updated"], m["length_rows"], m["grad_norm"]) for m in metrics] == [(False, 0, 0.0)] * 2


@pytest.mark.parametrize("check_share", [0.0, 1.0])
def test_a_distillation_step_is_the_cross_entropy_of_a_written_out_solution_and_its_stop(char_tokenizer, monkeypatch,
                                                                                       check_share):
    monkeypatch.setattr(stage1, "CHECK_SHARE", check_share)  # none, or every solution checks itself after "Wait"
    model = make_tiny_llama(char_tokenizer, seed=2)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.0)
    problems = data.builtin_problems("train", 20, family="totals")
    cfg = tiny_config("unused", n_min=5, n_max=50, prompts_per_step=6, micro_batch_tokens=400)  # several micro-batches
    packed, pack = [], sample.pack
    monkeypatch.setattr(sample, "pack", lambda prompts, responses, *a: packed.append((prompts, responses)) or
                        pack(prompts, responses, *a))
    metrics, examples = stage1.distill_step(cfg, 3, model, char_tokenizer, optimizer, params, problems,
                                            torch.device("cpu"))
    rows = [(p, r.tokens) for prompts, responses in packed for p, r in zip(prompts, responses)]
    assert len(packed) > 1 and len(rows) == 6 and metrics["solution_tokens"] == sum(len(s) for _, s in rows)
    nll = 0.0
    for prompt, solution in rows:  # a plain forward of each row alone: -log p of the solution's tokens and its stop
        text = char_tokenizer.decode(prompt)
        n = int(text.split("Think for ")[1].split(" tokens.")[0])
        problem = next(p for p in problems if p.problem in text)
        first, wait, check = char_tokenizer.decode(solution[:-1]).partition(sample.WAIT + stage1.CHECK)
        assert 5 <= n <= 50 and first in problem.solutions
        assert (check == problem.solutions[0]) if check_share else not wait  # the check: the finest solution again
        assert solution[-1] == char_tokenizer.eos_token_id
        with torch.no_grad():
            logits = model(torch.tensor([prompt + solution])).logits[0, len(prompt) - 1:-1]
        nll -= logits.log_softmax(-1).gather(-1, torch.tensor(solution)[:, None]).sum().item()
    assert metrics["loss"] == pytest.approx(nll / metrics["solution_tokens"], rel=1e-4)
    assert metrics["updated"] and metrics["grad_norm"] > 0
    said = [e["response"].partition(sample.WAIT)[0] for e in examples]
    assert all(any(s in p.solutions for p in problems) for s in said) and examples


def test_the_route_floor_is_the_length_error_of_the_taught_route_closest_to_each_n(char_tokenizer, monkeypatch):
    problem = data.builtin_problems("test", 1, family="totals")[0]
    lengths = sorted({len(stage1.written_response(char_tokenizer, problem, s, check))
                      for s in problem.solutions for check in (False, True)})
    assert len(lengths) == 2 * len(problem.solutions)  # each route, with and without its check
    short, long = lengths[0], lengths[-1]
    between = (lengths[1] + lengths[2]) // 2
    closest = min(lengths, key=lambda m: abs(m - between))
    floor = stage1.route_floor(char_tokenizer, [problem], [short, between, 3 * long])
    assert floor == pytest.approx({short: 0.0, between: abs(closest - between) / between, 3 * long: 2 / 3})
    monkeypatch.setattr(stage1, "CHECK_SHARE", 0.0)  # never taught to check: the longest route is shorter
    no_check = max(len(stage1.written_response(char_tokenizer, problem, s, False)) for s in problem.solutions)
    assert no_check < long
    assert stage1.route_floor(char_tokenizer, [problem], [2 * no_check]) == pytest.approx({2 * no_check: 0.5})
    with pytest.raises(ValueError, match="needs problems with written-out solutions"):
        stage1.route_floor(char_tokenizer, data.builtin_problems("test", 2), [16])


def test_distillation_steps_come_first_then_lcpo_and_need_problems_with_solutions(learnable_model_dir, tmp_path):
    cfg = tiny_config(learnable_model_dir, data="builtin:totals", n_min=4, n_max=8, max_new_tokens=8, group_size=2,
                      prompts_per_step=4, distill_steps=6, steps=7, lr=0.02)
    metrics = read_metrics(train.train(cfg, tmp_path / "run"))
    assert [("solution_tokens" in m, "reward_mean" in m) for m in metrics] == [(True, False)] * 6 + [(False, True)]
    assert metrics[5]["loss"] < metrics[0]["loss"] and all(m["updated"] for m in metrics)  # the solutions are learnt
    with pytest.raises(ValueError, match="--distill-steps needs problems with written-out solutions.*builtin:totals"):
        train.train(tiny_config(learnable_model_dir, distill_steps=1, steps=1), tmp_path / "words")
    with pytest.raises(ValueError, match="--route-steps or --keep-route with --mode max needs problems with written"):
        train.train(tiny_config(learnable_model_dir, mode="max", route_steps=1, steps=1), tmp_path / "words")
    with pytest.raises(ValueError, match="--route-steps or --keep-route with --mode max needs problems with written"):
        train.train(tiny_config(learnable_model_dir, mode="max", keep_route=True, steps=1), tmp_path / "words")
    assert not (tmp_path / "words").exists()


# -----------------------------------------------------------------------------
# the route stage


def _batch(texts: list[list[int]], correct: list[bool], finish: list[str], problems, seed: int = 0) -> sample.Batch:
    return sample.Batch(problems=problems, prompt_ids=[[1]] * len(texts), targets=[(8, "exact")] * len(texts),
                        rollouts=[sample.Rollout(t, [0.0] * len(t), f) for t, f in zip(texts, finish)],
                        correct=correct, rewards=[0.0] * len(texts), rng=random.Random(seed),
                        rollout_s=1.0)


def test_route_pairs_take_the_correct_finished_text_closest_to_each_n_and_where_they_part():
    short, mid, long_, wrong = [7, 1], [5, 6, 1], [5, 5, 5, 5, 5, 5, 5, 5, 1], [9] * 12 + [1]
    groups = [  # G = 4 per prompt
        ([short, long_, mid, long_], [True] * 4, ["eos"] * 4),  # three distinct routes (one twice): pairs
        ([short, wrong, long_[:-1], short], [True, False, True, True], ["eos", "eos", "length", "eos"]),  # one route
        ([mid, long_, wrong, wrong], [True, True, False, False], ["eos"] * 4),  # two routes
    ]
    texts, correct, finish = (sum((list(g[i]) for g in groups), []) for i in range(3))
    problems = [data.Problem(f"p{i}", "0") for i in range(3) for _ in range(4)]
    for seed in range(20):
        groups = stage1.sampled_routes(_batch(texts, correct, finish, problems, seed), 4)
        rows = stage1.route_pairs(groups, 2, 12, random.Random(seed))
        assert len(rows) % 2 == 0 and {r[0].problem for r in rows} <= {"p0", "p2"}  # p1: one route, nothing to choose
        assert all(0 < sum(r[0].problem == p for r in rows) <= 2 * stage1.ROUTE_PAIRS for p in ("p0", "p2"))
        for (pa, na, a, da), (pb, nb, b, db) in zip(rows[::2], rows[1::2]):
            pool = {"p0": [short, long_, mid], "p2": [mid, long_]}[pa.problem]
            assert pa is pb and 2 <= na < nb <= 12 and a != b and da == db == (stage1.first_difference(a, b),)
            (d,) = da
            assert a[:d] == b[:d] and (d == len(a) or d == len(b) or a[d] != b[d])
            for n, t in ((na, a), (nb, b)):
                assert abs(len(t) - n) == min(abs(len(u) - n) for u in pool)  # the closest in length to its N
    groups = stage1.sampled_routes(_batch([short] * 4, [True] * 4, ["eos"] * 4, problems[:4]), 4)
    assert groups == [(problems[0], [short])] and stage1.route_pairs(groups, 2, 12, random.Random(0)) == []


def test_a_route_step_learns_each_texts_parting_token_under_its_own_n_and_all_its_tokens(
        learnable_model_dir, tmp_path, monkeypatch):
    tokenizer = model_lib.load_tokenizer(str(learnable_model_dir))
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False) + [tokenizer.eos_token_id]  # noqa: E731
    problem = data.Problem("What is 2 + 3?", "5")
    texts = [enc("2+3=5. 5"), enc("2+3=5. Wait, 2+3=5. 5"), enc("2+3=5. Wait, 2+3=5. 5"), enc("4")]
    batch = _batch(texts, [True, True, True, False], ["eos"] * 4, [problem] * 4, seed=3)
    cfg = tiny_config(learnable_model_dir, group_size=4, prompts_per_step=1, n_min=2, n_max=30, lr=0.05,
                      route_steps=1, steps=1)
    model, _ = model_lib.load_model(cfg.model, quantize=False, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha)
    seen = []

    def fixed(cfg, step, sampler, tokenizer, problems, **kwargs):
        seen.append([m.disable_adapters for m in sampler.modules() if isinstance(m, BaseTunerLayer)])
        return batch

    monkeypatch.setattr(sample, "roll_out", fixed)
    monkeypatch.setattr(stage1, "ROUTE_PAIRS", 1)
    groups = stage1.sampled_routes(_batch(texts, batch.correct, ["eos"] * 4, [problem] * 4, seed=3), 4)
    rows = stage1.route_pairs(groups, 2, 30, random.Random(3))  # what the step will draw: batch.rng is seeded alike
    assert len(rows) == 2 and rows[0][2] == texts[0] and rows[1][2] == texts[1] and rows[0][3] == (7,)  # '5' | 'W'
    decision = text = tokens = 0.0
    with torch.no_grad():
        for _, n, t, d in rows:  # a plain forward of each row alone
            prompt = data.lcpo_prompt(tokenizer, problem, n, "exact")
            logp = model(torch.tensor([prompt + t])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
            said = logp.gather(-1, torch.tensor(t)[:, None])[:, 0]
            decision -= said[list(d)].sum().item() / len(rows)
            text -= said.sum().item()
            tokens += len(t)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    metrics, examples = stage1.route_step(cfg, 0, model, tokenizer, optimizer, params, [problem], torch.device("cpu"))
    assert len(seen) == 1 and seen[0] and all(seen[0])  # rolled out under model.reference: the adapter off
    assert metrics["route_pairs"] == 1 and metrics["passed_rows"] == 2 and metrics["updated"]
    assert metrics["decision_nll"] == pytest.approx(decision, rel=1e-4)
    assert metrics["text_nll"] == pytest.approx(text / tokens, rel=1e-4)
    assert metrics["accuracy"] == 0.75 and any(not torch.equal(a, p) for a, p in zip(before, params))
    assert [e["n_gold"] for e in examples] == [rows[0][1], rows[1][1]]


def test_under_max_prompts_each_n_learns_the_longest_written_route_within_its_margin_without_rollouts(
        learnable_model_dir, tmp_path, monkeypatch):
    tokenizer = model_lib.load_tokenizer(str(learnable_model_dir))
    problems = data.builtin_problems("train", 6, family="totals")
    p = problems[0]
    routes = stage1.max_routes(tokenizer, p)  # each granularity alone, then the finest checked: longer, more accurate
    assert routes == [stage1.written_response(tokenizer, p, s, False) for s in p.solutions] + [
        stage1.written_response(tokenizer, p, p.solutions[0], True)]
    assert all(r in stage1.taught_routes(tokenizer, p) for r in routes)
    groups = [(q, stage1.max_routes(tokenizer, q)) for q in problems]
    lengths = sorted(len(r) for _, rs in groups for r in rs)
    rows = stage1.route_pairs(groups, lengths[0] - 1, lengths[-1] + 5, random.Random(0), "max")
    assert rows and len(rows) <= 2 * stage1.ROUTE_PAIRS * len(problems)
    for problem, n, text, chosen in rows:
        routes = stage1.max_routes(tokenizer, problem)
        fits = [len(r) for r in routes if len(r) <= max(stage1.MAX_AIM * n, n - stage1.MAX_MARGIN)]  # N read blurred
        assert len(text) == (max(fits) if fits else min(map(len, routes)))
        # the decision loss's positions: where the text parts from each other route of its problem
        assert chosen == tuple(sorted({stage1.first_difference(text, r) for r in routes if r != text}))
        assert all(any(len(r) > d and r[d] != text[d] and r[:d] == text[:d] for r in routes) for d in chosen)
        assert 0 in chosen  # a worked-out route also chooses not to answer at once, which the bare answer parts at
    assert any(len(text) > n for _, n, text, _ in rows)  # below the bare answer: the shortest, over N
    assert any(len(text) < len(r) <= n for problem, n, text, _ in rows for r in stage1.max_routes(tokenizer, problem))

    monkeypatch.setattr(sample, "roll_out", lambda *a, **k: pytest.fail("a Max route step sampled"))
    cfg = tiny_config(learnable_model_dir, data="builtin:totals", mode="max", prompts_per_step=4, n_min=4, n_max=80,
                      lr=0.05, route_steps=1, steps=1)
    model, _ = model_lib.load_model(cfg.model, quantize=False, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    metrics, examples = stage1.route_step(cfg, 0, model, tokenizer, optimizer, params, problems, torch.device("cpu"))
    assert metrics["updated"] and metrics["passed_rows"] == len(examples) > 0 and "accuracy" not in metrics
    said = {tokenizer.decode(r) for q in problems for r in stage1.max_routes(tokenizer, q)}
    assert all(e["response"] in said and "maximum" in e["prompt"] for e in examples)  # written routes, Max prompts


def test_keep_route_takes_a_max_route_step_after_each_lcpo_step_on_the_same_adapter(learnable_model_dir, tmp_path,
                                                                                      monkeypatch):
    calls = []
    lcpo_step, route_step = train.train_step, stage1.route_step

    def spy(name, fn):
        def wrapped(cfg, step, model, *args, **kwargs):
            calls.append((name, step, id(model)))
            return fn(cfg, step, model, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(train, "train_step", spy("lcpo", lcpo_step))
    monkeypatch.setattr(stage1, "route_step", spy("route", route_step))
    cfg = tiny_config(learnable_model_dir, data="builtin:totals", mode="max", n_min=4, n_max=80, max_new_tokens=80,
                      prompts_per_step=4, group_size=2, steps=2, keep_route=True)
    metrics = read_metrics(train.train(cfg, tmp_path / "run"))
    assert [c[:2] for c in calls] == [("lcpo", 0), ("route", 0), ("lcpo", 1), ("route", 1)]
    assert len({c[2] for c in calls}) == 1  # one model: the route step trains the adapter LCPO trains
    assert all("reward_mean" in m and m["route_decision_nll"] > 0 for m in metrics)
    calls.clear()
    read_metrics(train.train(dataclasses.replace(cfg, keep_route=False), tmp_path / "plain"))
    assert [c[0] for c in calls] == ["lcpo", "lcpo"]


def test_the_choice_probe_reads_the_next_token_where_a_solution_s_length_is_decided(tiny_model_dir):
    model, tokenizer = model_lib.load_model(str(tiny_model_dir), quantize=False, trainable=False)
    problems = data.builtin_problems("test", 8, family="totals")
    kept = [p for p in problems if p.solutions[0].count("=") >= 2]
    got = stage1.choice_probe(model, tokenizer, problems, [8, 40], batch=3)  # batches of 3: padding in play
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    for n in (8, 40):
        expected = {"answer_at_once": 0.0, "merge": 0.0, "check": 0.0}
        for p in kept:  # a plain forward of each problem alone, no padding
            prompt, finest = data.lcpo_prompt(tokenizer, p, n, "exact"), enc(p.solutions[0])
            def probs(prefix):
                with torch.no_grad():
                    return model(torch.tensor([prompt + prefix])).logits[0, -1].float().softmax(-1)
            expected["answer_at_once"] += probs([])[enc(p.solutions[3])[0]].item() / len(kept)
            q = probs(finest[:finest.index(enc("=")[0])])
            expected["merge"] += (q[enc("+")[0]] / (q[enc("+")[0]] + q[enc("=")[0]])).item() / len(kept)
            q = probs(finest)
            wait, stop = q[enc(sample.WAIT)[0]], q[tokenizer.eos_token_id]
            expected["check"] += (wait / (wait + stop)).item() / len(kept)
        assert got[n] == pytest.approx(expected, rel=1e-4)
    assert got[8] != got[40]  # the prompt's N is read
    with pytest.raises(ValueError, match="written-out solutions of two or more steps"):
        stage1.choice_probe(model, tokenizer, data.builtin_problems("test", 3), [8])


def test_the_step_probe_counts_each_one_number_step_by_the_units_it_adds(char_tokenizer):
    problems = data.builtin_problems("test", 12, family="totals-edge")  # every one with a step at units 9 or 10
    zero = char_tokenizer.convert_tokens_to_ids("0")

    class Oracle(torch.nn.Module):  # guesses each next token right, except a "0" where `miss_zero`
        def __init__(self, miss_zero):
            super().__init__()
            self.miss_zero, self.device = miss_zero, torch.device("cpu")

        def forward(self, input_ids):
            following = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)
            if self.miss_zero:
                following = torch.where(following == zero, following + 1, following)
            return types.SimpleNamespace(logits=torch.nn.functional.one_hot(following, len(char_tokenizer)).float())

    steps = [data.carry_kind(int(m[1]), int(m[2])) for p in problems
             for m in data.ONE_NUMBER_STEP.finditer(p.solutions[0])]
    right = stage1.step_probe(Oracle(False), char_tokenizer, problems, 64)
    assert right == {kind: [steps.count(kind)] * 2 for kind in data.CARRY_KINDS}
    assert right["units 9"][1] + right["units 10"][1] >= len(problems)
    # a result ending in 0 is exactly a step whose units add to 10 (the numbers are 1 to 9): those alone go wrong
    missed = stage1.step_probe(Oracle(True), char_tokenizer, problems, 64)
    assert missed == {**right, "units 10": [0, steps.count("units 10")]}
    assert stage1.step_probe(Oracle(False), char_tokenizer, problems, 16) == right  # N in the prompt, same text
    with pytest.raises(ValueError, match="written-out solutions"):
        stage1.step_probe(Oracle(False), char_tokenizer, data.builtin_problems("test", 3), 64)
