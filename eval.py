"""
The paper's evaluation: accuracy and length against the budget in the prompt.

    python eval.py                                    # the embedded default, built-in test set, budgets 32 64 128
    python eval.py --adapter runs/exact               # a trained adapter (or a train.py run: its newest checkpoint)
    python eval.py --s1                               # the S1 baseline: budget forcing on the same base
    python eval.py --mode none                        # no length sentence: the model's natural length
    python eval.py --model agentica-org/DeepScaleR-1.5B-Preview --data aime2025 --budgets 512 1024 2048 3600 \\
                   --samples 16 --temperature 0.6 --top-p 0.95
    python eval.py --compare evals/a.json evals/b.json --plot compare.png   # side by side, and the figure
    python eval.py --curves runs/exact runs/max --plot curves.png           # training curves from metrics.jsonl
    python eval.py --stop-probe evals/base-exact.records.jsonl --adapter runs/exact --budgets 32 64 96 128
    python eval.py --choice-probe --data builtin:totals --adapter runs/route --budgets 16 64 128
    python eval.py --step-probe --model reasoner --data builtin:totals --limit 200 --budgets 128

For each budget: K samples per problem with "Think for N tokens." in the prompt, and per budget
pass@1 (mean correctness over samples), mean n_y, the paper's adherence numbers over e = (n_y - N) / N
(the error of the mean length, mean e; the relative RMSE, sqrt(mean e^2); and mean |e|), the share over
budget, the share cut by the token cap, and two signs of a length bought with filler: the share that
writes N itself and the share that pads (repeats a line or sentence 3+ times, or its answer with no
working between). Writes OUT.json (every number and the exact settings) and OUT.records.jsonl (one line
per response); an interrupted run started again with the same command skips the budgets already finished.
--compare of builtin:totals results also reads their responses: the route at each budget (answer at once,
merged steps, a check), the one-number steps written right, by their units (steps_right), and what a perfect
choice among the taught routes would give at each α compared (route_frontier: the reward's ideal, to hold LCPO to).

--stop-probe asks, without sampling, whether a model reads N: over fixed response texts (an
evaluation's records), the probability of the stop token at every position under prompts asking for
each N, and the length each N would get from it (stage1.stop_probe, stage1.length_scores).
--choice-probe asks the same of a reasoner's route: at the places where a written-out solution's length is
decided (answer at once, merge numbers, check), its choice under each N (stage1.choice_probe).
--step-probe asks whether a reasoner adds right: each one-number step of the written-out solutions,
teacher-forced, by the units it adds (the edge of the carry, units 9 and 10, apart; stage1.step_probe).
"""

import argparse
import json
import math
import re
import signal
import sys
from collections import Counter, defaultdict
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while the libraries below load: quit quietly (main takes Ctrl-C over)
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import torch

import data
import model as model_lib
import reward
import runs
import sample
import stage1

MAX_CAP_FACTOR = 4  # Max prompts: the cap is 4 x the budget (Exact: 2 x), room to show they stay under it
NO_BUDGET = 0  # the budget recorded for --mode none


def writes_budget(text: str, budget: int, problem: str, answer: str) -> bool:
    """The response writes the number N although neither the problem nor its answer holds it:
    the model took the length sentence for one more quantity of the problem."""
    numbers = lambda s: set(re.findall(r"\d+", s))
    return str(budget) in numbers(text) and str(budget) not in numbers(f"{problem} {answer}")


def pads(text: str) -> bool:
    r"""The response repeats a line or a sentence three or more times, or states its boxed answer again with no
    working (no "=") in between: length bought with filler (lines of "1", the same sentence again and again,
    "\boxed{9}. Wait, so the answer is \boxed{9}.") rather than with reasoning. A check that works the sum
    out again before restating the answer is not padding.

        >>> pads("2 + 3 = 5.\n1\n1\n1"), pads("First 2 + 3 = 5. Then 5 + 4 = 9. So 9.")
        (True, False)
        >>> pads(r"5+4=9. \boxed{9}. Wait, so it is \boxed{9}."), pads(r"5+4=9. \boxed{9}. Wait, 4+5=9. \boxed{9}.")
        (True, False)
    """
    parts = [p.strip() for p in re.split(r"\n|(?<=[.!?])\s+", text) if p.strip()]
    pieces = text.split("\\boxed")[1:]  # each boxed answer and what follows it, up to the next
    answers = [reward.extract_boxed("\\boxed" + piece) for piece in pieces]
    restated = any(a is not None and a == b and "=" not in piece for a, b, piece in zip(answers, answers[1:], pieces))
    return restated or any(count >= 3 for count in Counter(parts).values())


def summarise(records: list[dict], budget: int) -> dict:
    """Per-budget numbers from response records (n_y, correct, cut; text if any). budget NO_BUDGET: no length errors.

    The paper's adherence numbers, with e = (n_y - N) / N: length_error = mean e = (E[n_y] - N) / N (the error of
    the mean length), rel_rmse = sqrt(mean e^2) (the relative RMSE), abs_length_error = mean |e|."""
    n = len(records)
    out = dict(budget=budget, responses=n, accuracy=sum(r["correct"] for r in records) / n,
               mean_tokens=sum(r["n_y"] for r in records) / n, cut_by_cap=sum(r["cut"] for r in records) / n)
    if budget != NO_BUDGET:
        errors = [(r["n_y"] - budget) / budget for r in records]
        out.update(length_error=sum(errors) / n, abs_length_error=sum(map(abs, errors)) / n,
                   rel_rmse=math.sqrt(sum(e * e for e in errors) / n),
                   over_budget=sum(r["n_y"] > budget for r in records) / n)
        if all("writes_n" in r for r in records):
            out["writes_n"] = sum(r["writes_n"] for r in records) / n
    if all("text" in r for r in records):
        out["pads"] = sum(pads(r["text"]) for r in records) / n
    return out


def route(text: str) -> tuple[int, bool, bool]:
    r"""The route a response to a builtin:totals problem takes: (the steps it writes before any check, whether a
    step adds more than one number, whether it checks itself after sample.WAIT). No step: the answer at once.

        >>> route("3+8+2=13. 13+5=18. The answer is \\boxed{18}. Wait, let me check. 3+8=11. 11+2=13. 13+5=18.")
        (2, True, True)
        >>> route("The answer is \\boxed{18}.")
        (0, False, False)
    """
    steps = re.findall(r"\d+(?:\+\d+)+=", text.split(sample.WAIT)[0])
    return len(steps), any(s.count("+") > 1 for s in steps), sample.WAIT in text


def totals_records(result: dict, path: str) -> list[dict]:
    """The responses of a builtin:totals result (its records file), which --compare reads routes and steps from;
    [] for another data set or a result without them."""
    if not str(result["settings"].get("data")).startswith("builtin:totals"):
        return []
    return runs.read_jsonl(records_file(Path(path)))


def route_table(results: list[dict], names: list[str], records: list[list[dict]]) -> str:
    """How the route changes with N (the paper's Figure 6 in miniature), from each result's responses (totals_records):
    the share that answer at once, merge numbers in a step, check themselves; the steps written before a check.
    Empty when no result has them."""
    head = ["run", "budget", "answer at once", "merged steps", "checks", "steps written", "pass@1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, result, responses in zip(names, results, records):
        for b in result["budgets"]:
            texts = [r["text"] for r in responses if r.get("budget") == b["budget"] and isinstance(r.get("text"), str)]
            if texts:
                steps, merged, checks = zip(*map(route, texts))
                share = lambda flags: f"{100 * sum(flags) / len(texts):.0f}%"
                lines.append(f"| {name} | {b['budget'] or 'none'} | {share([n == 0 for n in steps])} | "
                             f"{share(merged)} | {share(checks)} | {sum(steps) / len(texts):.1f} | "
                             f"{100 * b['accuracy']:.1f}% |")
    return "\n".join(lines) if len(lines) > 2 else ""


def steps_right(texts: list[str]) -> dict:
    r"""The one-number steps a set of responses writes (data.ONE_NUMBER_STEP, checks included), by their units
    (data.carry_kind): {kind: [right, steps]}, a step right when a + b = c.

        >>> steps_right(["12+8=20. 20+1=21. Wait, let me check. 12+8=10."])["units 10"]
        [1, 2]
    """
    counts = {kind: [0, 0] for kind in data.CARRY_KINDS}
    for text in texts:
        for step in data.ONE_NUMBER_STEP.finditer(text):
            a, b, c = map(int, step.groups())
            count = counts[data.carry_kind(a, b)]
            count[0] += a + b == c
            count[1] += 1
    return counts


def steps_table(names: list[str], records: list[list[dict]]) -> str:
    """The sampled counterpart of --step-probe, from each result's responses (totals_records, every budget): the
    share of the one-number steps written right, by their units. Empty when no result has such steps."""
    head = ["run"] + [f"{kind} right" for kind in data.CARRY_KINDS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, responses in zip(names, records):
        counts = steps_right([r["text"] for r in responses if isinstance(r.get("text"), str)])
        if any(n for _, n in counts.values()):
            lines.append(f"| {name} | " + " | ".join(f"{100 * right / n:.1f}% of {n}" if n else "–"
                                                      for right, n in counts.values()) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def route_of(text: str) -> tuple:
    r"""The taught route a response to a builtin:totals problem follows: (the numbers its first step adds, as
    data.TOTALS_GRANULARITIES counts them, None for the answer at once; whether it checks after sample.WAIT).

        >>> route_of("3+8+2=13. 13+5=18. The answer is \\boxed{18}."), route_of("The answer is \\boxed{18}. Wait")
        ((2, False), (None, True))
    """
    first = re.search(r"\d+((?:\+\d+)+)=", text.split(sample.WAIT)[0])
    most = max(g for g in data.TOTALS_GRANULARITIES if g)
    return (min(first[1].count("+"), most) if first else None), sample.WAIT in text


def best_route(routes: list[tuple], n: int, alpha: float) -> tuple:
    """Of a problem's routes, (tokens, accuracy) each, the one LCPO-Exact's reward pays most at N = n in expectation,
    accuracy − α·|N − tokens| (α = inf: the closest), ties to the closer, then the shorter; as the evaluation sees
    it, a route past its cap of 2N cut: (2N, 0.0)."""
    def score(route):
        tokens, accuracy = route
        right, miss = (accuracy if tokens <= 2 * n else 0.0), abs(n - tokens)
        return (-miss, right) if alpha == math.inf else (right - alpha * miss, -miss, -tokens)
    tokens, accuracy = max(routes, key=score)
    return (2 * n, 0.0) if tokens > 2 * n else (tokens, accuracy)


ROUTE_PRIOR = 4  # a route's accuracy at k terms is shrunk toward its rate over every k by this many responses


def route_frontier(results: list[dict], records: list[list[dict]], alphas: list[float]) -> str:
    """What a perfect choice among the reasoner's taught routes would give under LCPO-Exact's reward at each α: for
    each problem and N, the route (granularity, with or without its check) that maximises its accuracy − α·|N − its
    length|, a route longer than the evaluation's cap of 2N being cut (wrong, 2N tokens). A route's accuracy on a sum
    of k numbers is measured in the compared responses (every run's but S1's, not cut), shrunk toward its rate over
    every k (ROUTE_PRIOR); a route never written is left out. α = inf is the route closest to N (stage1.route_floor).
    The ideal that LCPO's choice can be held against. Empty without builtin:totals results that have responses."""
    totals = [(r, rs) for r, rs in zip(results, records) if rs and not r["settings"].get("s1")]  # S1's: forced
    if not totals:
        return ""
    keys = ("data", "split", "problem_column", "answer_column", "limit", "seed")
    first = totals[0][0]["settings"]
    if not all(k in first for k in keys):
        return ""
    problems = data.load_problems(*(first[k] for k in keys[:4]), limit=first["limit"], seed=first["seed"])
    terms = [p.solutions[0].count("=") + 1 for p in problems]  # k: the one-number route writes k - 1 steps
    counts = defaultdict(lambda: [0, 0])  # (k, route) and route alone: [right, responses]
    for result, responses in totals:
        if any(result["settings"].get(k) != first.get(k) for k in keys):  # other problems: not these routes
            continue
        for r in responses:
            if isinstance(r.get("text"), str) and not r.get("cut") and r.get("problem") in range(len(problems)):
                route = route_of(r["text"])
                for key in ((terms[r["problem"]], route), route):
                    counts[key][0] += bool(r.get("correct"))
                    counts[key][1] += 1
    if not counts:
        return ""
    try:  # the routes' lengths are in the base model's tokens
        tokenizer = model_lib.load_tokenizer(model_lib.resolve(first.get("base")))
    except (OSError, model_lib.ModelError) as e:
        return f"not computed: the tokenizer of {first.get('base')} cannot be loaded ({data.first_line(e)})"
    options = []  # per problem: (tokens, accuracy) of each route whose accuracy was measured
    for p, k in zip(problems, terms):
        routes = {}
        for solution in dict.fromkeys(p.solutions):  # a short sum writes some granularities alike: the finest counts
            for check in (False, True):
                route = (route_of(solution)[0], check)
                right, n = counts.get(route, (0, 0))
                if n:
                    at_k = counts.get((k, route), (0, 0))
                    accuracy = (at_k[0] + ROUTE_PRIOR * right / n) / (at_k[1] + ROUTE_PRIOR)
                    routes[route] = (len(stage1.written_response(tokenizer, p, solution, check)), accuracy)
        options.append(list(routes.values()))
    if not any(options):
        return ""
    budgets = sorted({b["budget"] for r, _ in totals for b in r["budgets"] if b["budget"]})
    head = ["α", "pass@1 % at N = " + " / ".join(map(str, budgets)), "mean tokens", "rel. RMSE (mean)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for alpha in alphas:
        cells = []
        for n in budgets:
            picked = [best_route(routes, n, alpha) for routes in options if routes]
            cells.append((100 * sum(a for _, a in picked) / len(picked), sum(t for t, _ in picked) / len(picked),
                          math.sqrt(sum(((t - n) / n) ** 2 for t, _ in picked) / len(picked))))
        rmse = [c[2] for c in cells]
        lines.append(f"| {alpha:g} | " + " / ".join(f"{c[0]:.1f}" for c in cells) + " | " +
                     " / ".join(f"{c[1]:.0f}" for c in cells) + " | " + " / ".join(f"{e:.2f}" for e in rmse) +
                     f" ({sum(rmse) / len(rmse):.2f}) |")
    return "\n".join(lines)


def table(rows: list[dict], label: str | None = None) -> str:
    """A Markdown table of per-budget summaries (a label column when comparing runs)."""
    head = (["run"] if label else []) + ["budget", "pass@1", "mean tokens", "(E[n_y] - N)/N", "rel. RMSE",
                                         "mean |n_y - N|/N", "over budget", "cut by cap", "writes N", "pads"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        pct = lambda k: f"{100 * r[k]:.1f}%" if k in r else "-"
        num = lambda k, f="{:.3f}": f.format(r[k]) if k in r else "-"
        cells = [str(r["budget"] or "none"), pct("accuracy"), f"{r['mean_tokens']:.1f}",
                 num("length_error", "{:+.3f}"), num("rel_rmse"), num("abs_length_error"),
                 pct("over_budget"), pct("cut_by_cap"), pct("writes_n"), pct("pads")]
        lines.append("| " + " | ".join(([r[label]] if label else []) + cells) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# evaluating one model


def settings_from(args) -> dict:
    """Everything that decides the numbers; a resumed run must match them exactly."""
    keys = ("model", "adapter", "data", "split", "problem_column", "answer_column", "limit", "budgets", "mode", "s1",
            "samples", "temperature", "top_p", "boxed_only", "answer_tokens", "quantize", "seed")
    settings = {k: getattr(args, k) for k in keys}
    settings["adapter"] = str(model_lib.find_adapter(args.adapter)) if args.adapter else None
    settings["base"] = model_lib.adapter_base(args.adapter) if args.adapter else (args.model or "embedded")
    return settings


def train_config(adapter: str | None) -> dict:
    """The train.py config of the run an adapter came from (its config.json), if it can be found."""
    if adapter is None:
        return {}
    path = Path(adapter)
    for candidate in (path / "config.json", path.parents[2] / "config.json" if len(path.parents) > 2 else None):
        if candidate is not None and candidate.is_file():
            try:
                config = json.loads(candidate.read_text())
            except ValueError:
                config = None
            if not isinstance(config, dict):
                raise ValueError(f"{candidate} is not a JSON object of settings: restore the run's config.json")
            step = runs.checkpoint_step(path.parent)
            if candidate.parent != path and step is not None:  # a checkpoint: the steps it had taken, not the plan
                config["steps"] = step
            return config
    return {}


def records_file(out: Path) -> Path:
    """The responses of the evaluation whose result is `out` (e.json: e.records.jsonl)."""
    return out.with_suffix(".records.jsonl")


def evaluate(args, out: Path) -> dict:
    settings = settings_from(args)
    records_path = records_file(out)
    result = dict(settings=settings, train_config=train_config(settings["adapter"]), budgets=[])
    if out.exists() and not args.replace:  # resume: keep the finished budgets if the settings are the same
        previous = load_result(str(out))
        if previous.get("settings") != settings:
            raise ValueError(f"{out} holds an evaluation with other settings: pass another --out, or --replace")
        result["budgets"] = previous["budgets"]
    elif runs.read_jsonl(records_path) and not args.replace:  # responses without their result: not ours to drop
        raise ValueError(f"{records_path} exists without {out.name}: pass --replace to write over it, or another --out")
    kept = runs.read_jsonl(records_path) if result["budgets"] else []
    for b in list(result["budgets"]):  # a finished budget whose responses are gone (a deleted file) is done again
        if sum(r.get("budget") == b["budget"] for r in kept) != b["responses"]:
            print(f"note: {records_path} lacks the responses of budget {b['budget']}: evaluating it again",
                  file=sys.stderr)
            result["budgets"].remove(b)
    done = {b["budget"] for b in result["budgets"]}
    budgets = [NO_BUDGET] if args.mode == "none" else args.budgets
    kept = [r for r in kept if r.get("budget") in done]
    records_path.parent.mkdir(parents=True, exist_ok=True)
    if records_path.exists():  # written only once a budget has responses: a failed start leaves no file
        records_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    if all(b in done for b in budgets):
        print(f"{out}: every budget is already done")
        return result

    problems = data.load_problems(args.data, args.split, args.problem_column, args.answer_column, limit=args.limit,
                                  seed=args.seed)
    model, tokenizer = model_lib.load_model(args.model, adapter=args.adapter, quantize=args.quantize, trainable=False)
    model = model_lib.rollout_copy(model)  # the same function, dequantized and merged once: faster to sample from
    thinks = "</think>" in tokenizer.get_vocab()
    from tqdm import tqdm

    todo = [b for b in budgets if b not in done]
    bar = tqdm(total=len(todo) * len(problems) * args.samples, desc="responses", dynamic_ncols=True)
    for budget in todo:
        generator = torch.Generator(device=model.device).manual_seed(sample.step_seed(args.seed, budget))
        rows = [(i, k) for i in range(len(problems)) for k in range(args.samples)]
        asked = budget if (budget != NO_BUDGET and not args.s1) else None  # N in the prompt, if any
        mode = "exact" if args.mode == "none" else args.mode
        prompts = [data.lcpo_prompt(tokenizer, p, asked, mode) for p in problems]
        cap = args.max_new_tokens or (2 * max(args.budgets) if budget == NO_BUDGET else
                                      (MAX_CAP_FACTOR if mode == "max" else 2) * budget)
        records = []
        for start in range(0, len(rows), args.batch):
            chunk = rows[start:start + args.batch]
            batch_prompts = [prompts[i] for i, _ in chunk]
            done = bar.n  # the bar moves as responses finish
            if args.s1:
                outs = sample.budget_forcing(model, tokenizer, batch_prompts, budget, args.temperature, args.top_p,
                                             args.answer_tokens, generator)
            else:
                outs = sample.generate(model, batch_prompts, cap, tokenizer.pad_token_id, [tokenizer.eos_token_id],
                                       args.temperature, args.top_p, generator,
                                       on_token=lambda step, tokens, finished: bar.update(done + finished - bar.n))
            for (i, k), o in zip(chunk, outs):
                text = tokenizer.decode(o.tokens, skip_special_tokens=True)
                p = problems[i]
                ok = reward.judge(text, p.answer, p.multiple_choice, thinks, args.boxed_only)
                records.append(dict(problem=i, budget=budget, sample=k, n_y=o.n_y, correct=ok,
                                    cut=(o.finish == "length" and not args.s1), text=text,
                                    writes_n=asked is not None and writes_budget(text, budget, p.problem, p.answer)))
            bar.update(done + len(chunk) - bar.n)
        summary = summarise(records, budget)
        summary["cap"] = None if args.s1 else cap
        result["budgets"] = sorted(result["budgets"] + [summary], key=lambda b: b["budget"])
        out.write_text(json.dumps(result, indent=1))  # after every budget: what a resumed run keeps
        with open(records_path, "a") as f:  # after the result: a budget done without its responses is redone
            f.writelines(json.dumps(r) + "\n" for r in records)
    bar.close()
    return result


# -----------------------------------------------------------------------------
# the stop probe (stage1.py): does the model put its stop where N says? (teacher-forced, no sampling)


def run_stop_probe(args) -> dict:
    """The probe over an evaluation's records: every text at least max(budgets) tokens long, read under
    a prompt asking for each budget."""
    records = [r for r in runs.read_jsonl(Path(args.stop_probe)) if "text" in r]
    problems = data.load_problems(args.data, args.split, args.problem_column, args.answer_column, limit=args.limit,
                                  seed=args.seed)
    for line, r in enumerate(records, 1):  # each names its problem by its index: anything else would pair the wrong one
        if type(r.get("problem")) is not int or not 0 <= r["problem"] < len(problems):
            raise ValueError(f"{args.stop_probe}: response {line} has problem {r.get('problem', 'missing')!r}, not an "
                             f"index of the {len(problems)} problems of --data {args.data} --limit {args.limit}: give "
                             f"the records of an evaluation of the same problems")
        if not isinstance(r["text"], str):
            raise ValueError(f"{args.stop_probe}: response {line} has text {r['text']!r}, not a string: give the "
                             f"records written by eval.py")
    if not records:
        raise ValueError(f"{args.stop_probe} has no responses to the problems of --data {args.data} --limit "
                         f"{args.limit}: give the records of an evaluation of the same problems")
    model, tokenizer = model_lib.load_model(args.model, adapter=args.adapter, quantize=args.quantize, trainable=False)
    model = model_lib.rollout_copy(model)
    cuts = sorted(args.budgets)
    kept = [(r["problem"], ids[:max(cuts)]) for r in records
            if len(ids := tokenizer.encode(r["text"], add_special_tokens=False)) >= max(cuts)]
    if not kept:
        raise ValueError(f"no response in {args.stop_probe} is {max(cuts)} tokens long: use smaller --budgets")
    prompts = [[data.lcpo_prompt(tokenizer, problems[p], n, args.mode) for p, _ in kept] for n in cuts]
    asked = stage1.stop_probe(model, tokenizer, prompts, [ids for _, ids in kept],
                              list(range(1, max(cuts) + 1)))  # every position: the cuts, and the lengths they imply
    return dict(settings=settings_from(args), records=args.stop_probe, responses=len(kept), budgets=cuts,
                **stage1.probe_scores(asked[..., [L - 1 for L in cuts]]), **stage1.length_scores(asked, cuts))


def probe_inputs(args, flag: str) -> tuple:
    """The problems of --data (they need written-out solutions: builtin:totals), then the model to probe on them."""
    problems = data.load_problems(args.data, args.split, args.problem_column, args.answer_column, limit=args.limit,
                                  seed=args.seed)
    if not any(p.solutions for p in problems):
        raise ValueError(f"{flag} needs problems with written-out solutions, and {args.data} has none: use "
                         f"--data builtin:totals")
    model, tokenizer = model_lib.load_model(args.model, adapter=args.adapter, quantize=args.quantize, trainable=False)
    return problems, model_lib.rollout_copy(model), tokenizer


def run_choice_probe(args) -> dict:
    """The choice probe over the problems of --data."""
    problems, model, tokenizer = probe_inputs(args, "--choice-probe")
    chosen = stage1.choice_probe(model, tokenizer, problems, sorted(args.budgets))
    floor = stage1.route_floor(tokenizer, problems, sorted(args.budgets))  # the best a choice among routes can do
    return dict(settings=settings_from(args), budgets=sorted(args.budgets), choices=chosen, route_floor=floor)


def run_step_probe(args) -> dict:
    """The step probe over the problems of --data."""
    problems, model, tokenizer = probe_inputs(args, "--step-probe")
    steps = {n: stage1.step_probe(model, tokenizer, problems, n) for n in sorted(args.budgets)}
    return dict(settings=settings_from(args), budgets=sorted(args.budgets), steps=steps)


# -----------------------------------------------------------------------------
# comparing runs


PRETTY = {"alpha": "α", "mode": "mode", "lr": "lr", "n_min": "n_min", "n_max": "n_max", "group_size": "G",
          "beta": "β", "steps": "steps", "delta": "δ"}
IGNORED = {"run_name", "out_dir", "save_every", "keep_checkpoints", "sample_every", "max_bad_steps", "adapter"}


def method(result: dict) -> str:
    s = result["settings"]
    if s["s1"]:
        return "S1"
    if not s["adapter"]:
        return "base" + (" (no length)" if s["mode"] == "none" else "")
    if not result.get("train_config"):  # not a train.py run (e.g. an exported adapter): the adapter's own name
        return f"adapter {Path(s['adapter']).name}" + (" (max)" if s["mode"] == "max" else "")
    return "LCPO" + ("-Max" if s["mode"] == "max" else "")


def labels(results: list[dict], names: list[str]) -> list[str]:
    """Name each run by what differs: the method, then the train.py settings that differ among the runs of that
    method (e.g. "LCPO α=0.001"; LCPO beside LCPO-Max is named by its method alone)."""
    out = []
    for r, name in zip(results, names):
        parts = [method(r)]
        same = [q for q in results if method(q) == parts[0] and q.get("train_config")]
        keys = sorted({k for q in same for k in q["train_config"]} - IGNORED)
        differ = [k for k in keys if len({json.dumps(q["train_config"][k]) for q in same  # a knob newer than a
                                          if k in q["train_config"]}) > 1]  # run: that run had its neutral value
        if r.get("train_config"):
            parts += [f"{PRETTY.get(k, k)}={r['train_config'].get(k)}" for k in differ[:3]]
        out.append(" ".join(parts))
    if len(set(out)) < len(out):  # still ambiguous: the file names decide
        out = [f"{label} ({name})" for label, name in zip(out, names)]
    return out


def load_result(path: str) -> dict:
    try:
        result = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path} is not JSON: give result files written by eval.py "
                         f"(or delete a damaged one)") from None
    if not isinstance(result, dict) or not isinstance(result.get("settings"), dict) or not result.get("budgets") \
            or not {"s1", "adapter", "mode"} <= set(result["settings"]):
        raise ValueError(f"{path} is not an eval.py result (no settings and budgets): give files written by eval.py")
    number = lambda v: type(v) in (int, float)
    for b in result["budgets"] if isinstance(result["budgets"], list) else [None]:
        if not (isinstance(b, dict) and type(b.get("budget")) is int and type(b.get("responses")) is int
                and number(b.get("accuracy")) and number(b.get("mean_tokens"))):
            raise ValueError(f"{path} is damaged (a budget without its budget, responses, accuracy and mean_tokens): "
                             f"restore it, or evaluate again with --replace")
    return result


def compare(paths: list[str], plot: str | None) -> str:
    results = [load_result(p) for p in paths]
    names = labels(results, [Path(p).stem for p in paths])
    rows = [dict(b, run=name) for name, r in zip(names, results) for b in r["budgets"]]
    records = [totals_records(r, p) for r, p in zip(results, paths)]  # read once, for the three tables below
    routes = route_table(results, names, records)
    steps = steps_table(names, records)
    alphas = {r["train_config"]["alpha"] for r in results if r.get("train_config", {}).get("mode") == "exact"
              and type(r["train_config"].get("alpha")) in (int, float)}
    ideal = route_frontier(results, records, sorted(alphas | {0.0}) + [math.inf]) if routes else ""
    text = table(rows, label="run") + (f"\n\nThe route at each budget:\n\n{routes}" if routes else "") + \
        (f"\n\nOne-number steps written right, by their units (all budgets):\n\n{steps}" if steps else "") + \
        (f"\n\nA perfect choice among the taught routes at each α (route_frontier):\n\n{ideal}" if ideal else "")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker

        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2 + 0.2 * len(names)), layout="constrained")
        for name, r in zip(names, results):
            b = r["budgets"]
            line, = left.plot([x["mean_tokens"] for x in b], [100 * x["accuracy"] for x in b], "o-", label=name)
            for x in b:
                left.annotate(str(x["budget"] or "none"), (x["mean_tokens"], 100 * x["accuracy"]), fontsize=7,
                              textcoords="offset points", xytext=(3, 3), color=line.get_color())
            with_err = [x for x in b if "abs_length_error" in x]
            if with_err:
                right.plot([x["budget"] for x in with_err], [x["abs_length_error"] for x in with_err], "o-",
                           label=name, color=line.get_color())
        left.set(xscale="log", xlabel="mean tokens used", ylabel="pass@1 (%)", title="accuracy against tokens used")
        right.set(xscale="log", xlabel="budget N in the prompt (tokens)", ylabel="mean |n_y - N| / N",
                  title="length error against budget")
        budgets = sorted({x["budget"] for r in results for x in r["budgets"] if x["budget"]})
        right.set_xticks(budgets)
        left.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))  # 20, 50, 100, 200, ...
        left.set_ylim(bottom=0)
        right.set_ylim(bottom=0)
        for ax in (left, right):  # log axes labelled with plain token counts
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(alpha=0.3, which="both")
        # one legend, under both panels: labels can be long
        fig.legend(*left.get_legend_handles_labels(), loc="outside lower center", fontsize=8)
        Path(plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot, dpi=120)
        plt.close(fig)
    return text


def read_metrics(run_dir: str) -> list[dict]:
    """A train.py run's metrics.jsonl, one dict per step."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a train.py run (no metrics.jsonl): give run directories to --curves")
    metrics = runs.read_jsonl(path)
    for line, m in enumerate(metrics, 1):
        bad = [k for k in ("step", "reward_mean", "length_error", "length_slope", "accuracy", "mean_n_y")
               if not (m.get(k) is None and k != "step" or type(m.get(k)) in (int, float))]
        if bad:
            raise ValueError(f"{path} is damaged: its line {line} has {bad[0]} {m.get(bad[0])!r}, not a number; "
                             f"restore it from the run, or remove that line")
    return metrics


def curves(run_dirs: list[str], plot: str | None, window: int = 10) -> str:
    """Training curves from train.py runs: reward, length error and length slope per step (and a moving
    mean over `window`). The slope (d n_y / d N) is what says the model reads N: 1 follows it, 0 ignores it."""
    runs = [read_metrics(d) for d in run_dirs]
    names = [Path(d).name for d in run_dirs]
    keys = ("reward_mean", "length_error", "length_slope", "accuracy", "mean_n_y")
    head = ["run", "steps"] + [f"{k} (first {window} → last {window})" for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def mean(rows, k):  # over the steps that have the key (the slope: steps with more than one N)
        values = [r[k] for r in rows if r.get(k) is not None]
        return f"{sum(values) / len(values):.3f}" if values else "–"

    for name, m in zip(names, runs):
        lines.append("| " + " | ".join([name, str(len(m))] + [f"{mean(m[:window], k)} → {mean(m[-window:], k)}"
                                                              for k in keys]) + " |")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker

        fig, axes = plt.subplots(1, 3, figsize=(16, 4.4 + 0.2 * len(names)), layout="constrained")
        handles = {}
        for i, (name, m) in enumerate(zip(names, runs)):
            colour = f"C{i % 10}"  # one colour per run on every panel (a run without a slope skips the third)
            for ax, key in zip(axes, ("reward_mean", "length_error", "length_slope")):
                points = [(r["step"], r[key]) for r in m if r.get(key) is not None]  # older runs have no slope
                if not points:
                    continue
                steps, values = zip(*points)
                recent = [values[max(0, i - window + 1):i + 1] for i in range(len(values))]
                smooth = [sum(v) / len(v) for v in recent]
                handles[name], = ax.plot(steps, smooth, color=colour, label=f"{name} (mean of {window})")
                ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
        axes[0].set(xlabel="step", ylabel="mean reward", title="reward per step")
        axes[1].set(xlabel="step", ylabel="mean |n_y - N| / N", title="length error per step")
        axes[1].set_ylim(bottom=0)
        axes[2].axhline(1.0, color="grey", linestyle=":", linewidth=1)
        axes[2].axhline(0.0, color="grey", linewidth=0.8)
        axes[2].set(xlabel="step", ylabel="d n_y / d N", title="length slope per step (1: follows N)")
        for ax in axes:
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        if handles:  # one legend under the three panels: run names can be long
            fig.legend(handles=list(handles.values()), loc="outside lower center", fontsize=8)
        Path(plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot, dpi=120)
        plt.close(fig)
    return "\n".join(lines)


# -----------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--compare", nargs="+", metavar="RESULT", help="eval.py result files: one table, one figure")
    parser.add_argument("--curves", nargs="+", metavar="RUN_DIR",
                        help="train.py runs: reward and length error per step")
    parser.add_argument("--plot", default=None, help="with --compare or --curves: write the figure here (.png)")
    parser.add_argument("--choice-probe", action="store_true", help="the route a reasoner chooses at each budget, "
                        "teacher-forced: answer at once, merge, check (builtin:totals; stage1.choice_probe)")
    parser.add_argument("--step-probe", action="store_true", help="a reasoner's one-number steps, teacher-forced: "
                        "the share right, by the units they add (builtin:totals; stage1.step_probe)")
    parser.add_argument("--stop-probe", default=None, metavar="RECORDS", help="an evaluation's records.jsonl: "
                        "the stop token's probability after each budget's worth of its texts, under each N")
    parser.add_argument("--model", default=None, help="hub id, local directory, or reasoner (the embedded model with "
                        "results/reasoner-adapter merged); default: the embedded model")
    parser.add_argument("--adapter", default=None, help="a saved adapter, or a train.py run directory")
    parser.add_argument("--data", default="builtin", help="builtin[:FAMILY] (data.FAMILIES), a known set "
                        "(data.KNOWN_SETS), a hub id or a file")
    parser.add_argument("--split", default=None, help="default: test for the built-in set, the set's own otherwise")
    parser.add_argument("--problem-column", default="problem")
    parser.add_argument("--answer-column", default="answer")
    parser.add_argument("--limit", type=int, default=64, help="problems (first N; 0: all)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[32, 64, 128], help="N of 'Think for N tokens.'")
    parser.add_argument("--mode", default="exact", choices=["exact", "max", "none"],
                        help="Exact or Max prompts; none: no length sentence")
    parser.add_argument("--s1", action="store_true", help="S1 budget forcing at each budget (no length sentence)")
    parser.add_argument("--samples", type=int, default=2, help="K samples per problem (the paper: 16)")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"cap (default: 2 x budget for exact, {MAX_CAP_FACTOR} x for max, "
                             f"2 x the largest for none)")
    parser.add_argument("--answer-tokens", type=int, default=32, help="S1: tokens for the answer after the budget")
    parser.add_argument("--boxed-only", action="store_true", help="judge only \\boxed{} answers (the paper)")
    parser.add_argument("--no-quantize", dest="quantize", action="store_false", help="load the base in full precision")
    parser.add_argument("--batch", type=int, default=64, help="responses per generation batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="result file (default: evals/<base or run>-<mode>.json)")
    parser.add_argument("--replace", action="store_true", help="write over an existing result or --plot (default: "
                        "keep it; the same command resumes an unfinished evaluation)")
    args = parser.parse_args(argv)
    if args.compare and args.curves:
        raise ValueError("--compare and --curves are two different figures: give one of them")
    if args.compare or args.curves:
        if args.plot:
            args.plot = str(runs.output_file(args.plot, "--plot", ".png"))
            runs.keep_existing(Path(args.plot), "--plot", args.replace)
        return args
    if args.plot:
        raise ValueError("--plot goes with --compare or --curves")
    if any(b <= 0 for b in args.budgets):
        raise ValueError(f"budgets must be positive token counts, got {args.budgets}")
    args.budgets = list(dict.fromkeys(args.budgets))  # a budget given twice is evaluated once
    for name in ("samples", "batch", "answer_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.limit < 0:
        raise ValueError(f"--limit must be >= 0 (0: all problems), got {args.limit}")
    if args.stop_probe and (args.s1 or args.mode == "none"):
        raise ValueError("--stop-probe asks for each budget in the prompt: it goes with --mode exact or max")
    probes = [name for name in ("stop_probe", "choice_probe", "step_probe") if getattr(args, name)]
    if len(probes) > 1:
        raise ValueError(f"{' and '.join('--' + p.replace('_', '-') for p in probes)} are separate probes: give one")
    if (args.choice_probe or args.step_probe) and (args.s1 or args.mode != "exact"):
        name = "--choice-probe" if args.choice_probe else "--step-probe"
        raise ValueError(f"{name} asks for each budget in an Exact prompt: it goes without --s1 and --mode")
    if args.s1 and args.mode == "none":
        raise ValueError("--s1 forces each budget: it cannot go with --mode none")
    args.limit = args.limit or None
    if args.split is None and args.data.partition(":")[0] == "builtin":
        args.split = "test"
    sample.check_sampling_args(1 if args.max_new_tokens is None else args.max_new_tokens, args.temperature, args.top_p)
    if args.out is None:
        run = Path(args.adapter).resolve().name if args.adapter else "base"
        kind = next((p.replace("_", "-") for p in probes), "s1" if args.s1 else args.mode)
        args.out = f"evals/{run}-{kind}.json"
    out = runs.output_file(args.out, "--out", ".json")
    if probes:  # written at once, not resumed
        runs.keep_existing(out, "--out", args.replace)
    args.out = str(out)
    return args


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C from here on: the handling below
    try:
        args = parse_args(argv)
        if args.compare or args.curves:
            print(compare(args.compare, args.plot) if args.compare else curves(args.curves, args.plot))
            if args.plot:
                print(f"figure: {args.plot}")
            return
        out = Path(args.out)
        model_lib.set_threads()
        # one evaluation writes a result at a time; the lock's name is hidden, so it is never a file of the user's
        with runs.exclusive(out.with_name(f".{out.name}.lock"), f"--out {out}"):
            if args.stop_probe or args.choice_probe or args.step_probe:
                result = run_stop_probe(args) if args.stop_probe else run_choice_probe(args) if args.choice_probe \
                    else run_step_probe(args)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result, indent=1))
            else:
                result = evaluate(args, out)  # it writes the result after every budget
        if args.stop_probe:
            print(f"log p(stop) after L tokens (columns) when N is asked (rows), mean of {result['responses']} texts:")
            print("| asked N | " + " | ".join(f"L = {L}" for L in result["budgets"]) + " |\n|---|"
                  + "---:|" * len(result["budgets"]))
            for n, row in zip(result["budgets"], result["matrix"]):
                print(f"| {n} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
            medians = " / ".join(f"{m:.0f}" for m in result["median"])
            asked = " / ".join(map(str, result["budgets"]))
            within = " / ".join(f"{w:.0%}" for w in result["within"])
            print(f"stop likeliest under the asked N: {result['accuracy']:.1%} (chance {result['chance']:.0%}), "
                  f"margin {result['margin']:.3f} nats; length NLL {result['length_nll']:.2f} nats, median length "
                  f"{medians} (asked {asked}), p(length <= N) {within}\nresults: {out}")
            return
        if args.choice_probe:
            print("| N | p(answer at once) | p(merge) | p(check) | route floor (rel. RMSE) |\n"
                  "|---|---:|---:|---:|---:|")
            for n, c in result["choices"].items():
                print(f"| {n} | {c['answer_at_once']:.3f} | {c['merge']:.3f} | {c['check']:.3f} | "
                      f"{result['route_floor'][n]:.2f} |")
            print(f"results: {out}")
            return
        if args.step_probe:
            print("| N | " + " | ".join(data.CARRY_KINDS) + " |\n|---|" + "---:|" * len(data.CARRY_KINDS))
            for n, counts in result["steps"].items():
                print(f"| {n} | " + " | ".join(f"{right / max(total, 1):.1%} of {total}" for right, total in
                                              counts.values()) + " |")
            print(f"results: {out}")
            return
    except (ValueError, model_lib.ModelError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a full disk, a permission taken away: the finished budgets are kept
        sys.exit(f"error: cannot write {e.filename or args.out} ({e.strerror or e}): the finished budgets are kept; "
                 f"fix it, then the same command resumes")
    except KeyboardInterrupt:
        sys.exit(f"\ninterrupted: the finished budgets are in {args.out}; the same command resumes")
    print(table(result["budgets"]))
    print(f"results: {out}  responses: {records_file(out)}")


if __name__ == "__main__":
    main()
