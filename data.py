"""
Problems in, prompts out.

    python data.py                                  # preview the built-in set's prompts
    python data.py --data builtin:sums              # another built-in family (FAMILIES)
    python data.py --data math500 --n 3             # a known eval set (needs the hub, or its cache)
    python data.py --data my_problems.jsonl --problem-column question --answer-column solution

A dataset is any table with a problem and an answer column: the built-in offline set, a Hugging
Face hub id, a local .json/.jsonl/.parquet file, or a known eval set by name (KNOWN_SETS). Each
problem gets a target length n_gold and a mode, and becomes the paper's prompt:

    >>> build_prompt("What is 2+3?", 100, "exact")
    "What is 2+3? Let's think step by step and output the final answer within \\\\boxed{}. Think for 100 tokens."
    >>> build_prompt("What is 2+3?", 100, "max").endswith("within \\\\boxed{}. Think for maximum 100 tokens.")
    True

which goes to the model as one user turn through its chat template (encode_prompt).
"""

import argparse
import json
import math
import random
import re
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

MODES = ("exact", "max")  # the two LCPO prompt forms; "mix" (training only) draws one of them per problem
MATH_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
CHOICE_INSTRUCTION = "Let's think step by step and output the final answer (eg, A, B, C, D) within \\boxed{}."
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
BUILTIN_SIZE = {"train": 5000, "test": 200}  # problems in each split of the built-in set
N_MIN, N_MAX = 32, 128  # the default range of target lengths on the embedded model (train.py's, data.py's)
MAX_PROBLEM_CHARS = 1_000_000  # a longer problem fits no model's context: skipped at load, before it is tokenized
_LENGTH_SENTENCE = re.compile(r"think for (?:maximum )?\d+ tokens", re.I)  # the sentence LCPO adds to each prompt


class DataError(ValueError):
    """Bad input from the user (a path, a column, a range): the message says what to fix."""


def first_line(error: BaseException) -> str:
    """A library's exception in one short line, to quote inside an error of ours: the first line of its
    message (at most 200 characters), or its type's name when it has none.

        >>> first_line(ValueError("bad header\\n  at byte 12")), first_line(EOFError())
        ('bad header', 'EOFError')
    """
    message = str(error).strip()
    return message.splitlines()[0][:200] if message else type(error).__name__


@dataclass(frozen=True)
class Problem:
    problem: str  # the question; for multiple choice it already lists the lettered options
    answer: str  # the gold answer; a letter for multiple choice
    multiple_choice: bool = False
    solutions: tuple[str, ...] = ()  # written-out solutions, finest steps first (builtin:totals); for distillation


# -----------------------------------------------------------------------------
# prompts


def build_prompt(problem: str, n_gold: int | None, mode: str = "exact", multiple_choice: bool = False) -> str:
    """The user message, as the paper's code builds it.

    mode "exact" ends with "Think for {n_gold} tokens.", "max" with "Think for maximum {n_gold} tokens.",
    n_gold=None has no length sentence (the model's natural length). Multiple-choice problems ask
    for a boxed letter and, as in the original eval scripts, start the instruction on a new paragraph.
    """
    if mode not in MODES:
        raise DataError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    if multiple_choice:
        prompt = f"{problem}\n\n{CHOICE_INSTRUCTION}"
    else:
        prompt = f"{problem} {MATH_INSTRUCTION}"
    if n_gold is None:
        return prompt
    return f"{prompt} {length_sentence(n_gold, mode)}"


def length_sentence(n_gold: int, mode: str = "exact") -> str:
    """The paper's length instruction: "Think for {n_gold} tokens." or "Think for maximum {n_gold} tokens."."""
    if n_gold <= 0:
        raise DataError(f"target length must be a positive number of tokens, got {n_gold}")
    return f"Think for {n_gold} tokens." if mode == "exact" else f"Think for maximum {n_gold} tokens."


def lcpo_prompt(tokenizer, problem: "Problem", n_gold: int | None, mode: str = "exact") -> list[int]:
    """Token ids of the LCPO prompt for `problem` asking for n_gold tokens, ready to generate from."""
    return encode_prompt(tokenizer, build_prompt(problem.problem, n_gold, mode, problem.multiple_choice))


def encode_prompt(tokenizer, message: str) -> list[int]:
    """Token ids of `message` as one user turn of the tokenizer's chat template, ready to generate from."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"tokenizer {name!r} has no chat template: use an instruct/chat model, "
            "or set tokenizer.chat_template to a Jinja template"
        )
    messages = [{"role": "user", "content": message}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


# -----------------------------------------------------------------------------
# targets


def check_target_range(n_min: int, n_max: int) -> None:
    """Refuse a target range that cannot be sampled, before any work starts."""
    if n_min <= 0:
        raise DataError(f"n_min must be a positive number of tokens, got {n_min}")
    if n_min > n_max:
        raise DataError(f"n_min ({n_min}) is larger than n_max ({n_max}): swap them")


def sample_targets(n: int, n_min: int, n_max: int, mode: str, rng: random.Random,
                   strata: int = 1) -> list[tuple[int, str]]:
    """n pairs (n_gold, mode) with n_gold ~ UniformInt(n_min, n_max), both ends included.

    mode "exact" or "max" gives that mode to every pair; "mix" is L1-Max training's 50/50 mix of
    Exact and Max prompts, drawn independently per pair.

        >>> sample_targets(4, 100, 4000, "mix", random.Random(1))
        [(624, 'exact'), (1095, 'max'), (3068, 'max'), (2641, 'exact')]

    strata k > 1 cuts the range into k equal slices and draws each run of k consecutive targets one
    per slice, low to high: each target is still uniform over the range, and the k targets that
    share a problem (train.py --targets-per-problem) are spread over it instead of bunched by chance.

        >>> sample_targets(4, 32, 128, "exact", random.Random(1), strata=2)
        [(38, 'exact'), (121, 'exact'), (69, 'exact'), (92, 'exact')]
    """
    check_target_range(n_min, n_max)
    if mode not in (*MODES, "mix"):
        raise DataError(f"unknown mode {mode!r}: use exact, max or mix")
    pairs = []
    for i in range(n):
        u = (i % strata + rng.random()) / strata  # uniform in [0, 1), inside slice i % strata
        n_gold = min(n_max, n_min + int(u * (n_max - n_min + 1)))
        pairs.append((n_gold, rng.choice(MODES) if mode == "mix" else mode))
    return pairs


def draw_batch(problems: list["Problem"], prompts: int, n_min: int, n_max: int, mode: str, rng: random.Random,
               targets_per_problem: int = 1) -> tuple[list["Problem"], list[tuple[int, str]]]:
    """A training step's prompts: problems drawn with replacement, each `targets_per_problem` times with
    targets spread over the range (sample_targets' strata): ([prompts] problems, [prompts] (n_gold, mode))."""
    drawn = [problems[rng.randrange(len(problems))] for _ in range(prompts // targets_per_problem)]
    batch = [p for p in drawn for _ in range(targets_per_problem)]  # the same problem, different N
    return batch, sample_targets(len(batch), n_min, n_max, mode, rng, targets_per_problem)


# -----------------------------------------------------------------------------
# the built-in offline set: families of generated problems with exact integer answers
#
# `builtin` is the word problems (`builtin:words`); `builtin:sums` etc. pick another family. Each family
# is a function from a random.Random to (problem text, answer) whose difficulty varies from draw to draw,
# so that accuracy against the token budget can show whether more thinking pays on it.

_NAMES = ["Ava", "Ben", "Cara", "Dan", "Eli", "Fay", "Gus", "Hana",
          "Ivan", "Jo", "Kim", "Leo", "Mia", "Noah", "Omar", "Pia"]
_ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stickers", "cards", "shells", "cookies", "stamps"]


def _word_problem(rng: random.Random) -> tuple[str, int]:
    """One to three operations (+, -, x2/x3, and a final equal split) on a small starting count.

    Half the problems take one step, a third two, a sixth three: a 135M model must get some right.
    """
    name, friend = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    x = rng.randint(2, 9)
    sentences = [f"{name} has {x} {item}."]
    question = f"How many {item} does {name} have now?"
    n_ops = rng.choice((1, 1, 1, 2, 2, 3))
    for i in range(n_ops):
        ops = ["add", "mul"] + (["sub"] if x >= 3 else [])
        divisors = [k for k in (2, 3, 4, 5) if x % k == 0]
        if i == n_ops - 1 and divisors:
            ops.append("div")  # a split changes the question, so it can only come last
        op = rng.choice(ops)
        if op == "add":
            b = rng.randint(2, 9)
            sentences.append(f"{friend} gives {name} {b} more {item}.")
            x += b
        elif op == "sub":
            b = rng.randint(1, min(9, x - 1))
            sentences.append(f"{name} gives {b} {item} to {friend}.")
            x -= b
        elif op == "mul":
            k = rng.choice((2, 3))
            sentences.append(f"Then {name} {'doubles' if k == 2 else 'triples'} the number of {item}.")
            x *= k
        else:
            k = rng.choice(divisors)
            sentences.append(f"{name} puts all the {item} into {k} equal piles.")
            question = f"How many {item} are in each pile?"
            x //= k
    return " ".join(sentences + [question]), x


def _sums_problem(rng: random.Random) -> tuple[str, int]:
    """The sum of 2 to 10 one-digit numbers: a running total, one addition per number."""
    numbers = [rng.randint(1, 9) for _ in range(rng.randint(2, 10))]
    return f"What is {' + '.join(map(str, numbers))}?", sum(numbers)


def _steps_problem(rng: random.Random) -> tuple[str, int]:
    """A word problem of 1 to 6 numbered steps (+, -, x2), the text saying how many there are."""
    name, friend = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    x = rng.randint(2, 9)
    n_steps = rng.randint(1, 6)
    happen = "thing happens" if n_steps == 1 else "things happen, in order"
    sentences = [f"{name} has {x} {item}.", f"Then {n_steps} {happen}."]
    for i in range(1, n_steps + 1):
        op = rng.choice(["add"] + (["sub"] if x >= 2 else []) + (["mul"] if x <= 20 else []))  # no 0, no huge counts
        if op == "sub":
            b = rng.randint(1, min(9, x - 1))
            sentences.append(f"{i}. {name} gives {b} {item} to {friend}.")
            x -= b
        elif op == "mul":
            sentences.append(f"{i}. {name} doubles the number of {item}.")
            x *= 2
        else:
            b = rng.randint(1, 9)
            sentences.append(f"{i}. {friend} gives {name} {b} more {item}.")
            x += b
    return " ".join(sentences + [f"How many {item} does {name} have at the end?"]), x


def _digits_problem(rng: random.Random) -> tuple[str, int]:
    """The sum of two numbers of 2 to 6 digits each: column by column, with carries."""
    a, b = (rng.randint(10 ** (d - 1), 10 ** d - 1) for d in (rng.randint(2, 6), rng.randint(2, 6)))
    return f"What is {a} + {b}?", a + b


_FRUITS = ["apple", "pear", "fig", "plum", "kiwi", "lime"]


def _count_problem(rng: random.Random) -> tuple[str, int]:
    """How often one word occurs in a list of 3 to 15 words (at least once, at most half the list, rounded up)."""
    target, *others = rng.sample(_FRUITS, 3)
    items = [rng.choice(others) for _ in range(rng.randint(3, 15))]
    count = rng.randint(1, (len(items) + 1) // 2)
    for i in rng.sample(range(len(items)), count):
        items[i] = target
    return f"How many times does '{target}' appear in this list: {', '.join(items)}?", count


# `totals`: a sum of 2 to 10 one-digit numbers in one of several phrasings, with its solution written out at four
# granularities, the finest first: one number added per step, two, three, and the bare answer. Finer steps are
# longer and more often right: what a length budget trades. TOTALS_NEW's phrasing never appears in `totals`: it is
# `totals-new`, for evaluation only (does the skill carry over to a sentence never trained on?).
# `totals-edge`: only the `totals` problems with a step at the edge of the carry (at_carry_edge), for more
# distillation where the reasoner is weakest; a problem's split is the one it has in `totals`.
TOTALS_TERMS = (2, 10)  # how many numbers a problem adds, both ends included
TOTALS_GRANULARITIES = (1, 2, 3, None)  # numbers added per written step; None: the answer alone
TOTALS_PHRASINGS = (
    "What is {plus}?",
    "Add these numbers: {commas}.",
    "Find the sum of {listed}.",
    "{name} has {first} {item}. {name} gets {more}. How many {item} does {name} have now?",
)
TOTALS_NEW = "Start with {first}, {then_add}. What is the result?"


def written_solution(numbers: list[int], per_step: int | None) -> str:
    """A sum worked out `per_step` numbers at a time, then the answer boxed; per_step None: the answer alone.

        >>> written_solution([3, 8, 2], 1)
        '3+8=11. 11+2=13. The answer is \\\\boxed{13}.'
        >>> written_solution([3, 8, 2, 5], 2), written_solution([3, 8], None)
        ('3+8+2=13. 13+5=18. The answer is \\\\boxed{18}.', 'The answer is \\\\boxed{11}.')
    """
    steps, total, rest = [], numbers[0], numbers[1:]
    while rest and per_step is not None:
        chunk, rest = rest[:per_step], rest[per_step:]
        terms = [total, *chunk]
        total += sum(chunk)
        steps.append(f"{'+'.join(map(str, terms))}={total}.")
    return " ".join(steps + [f"The answer is \\boxed{{{sum(numbers)}}}."])


def _totals_problem(rng: random.Random, phrasings: tuple[str, ...] = TOTALS_PHRASINGS) -> tuple[str, int, tuple]:
    numbers = [rng.randint(1, 9) for _ in range(rng.randint(*TOTALS_TERMS))]
    ns = [str(n) for n in numbers]
    text = rng.choice(phrasings).format(
        plus=" + ".join(ns), commas=", ".join(ns), listed=f"{', '.join(ns[:-1])} and {ns[-1]}", first=ns[0],
        more=", then ".join(f"{n} more" for n in ns[1:]), then_add=", then ".join(f"add {n}" for n in ns[1:]),
        name=rng.choice(_NAMES), item=rng.choice(_ITEMS))
    return text, sum(numbers), tuple(written_solution(numbers, g) for g in TOTALS_GRANULARITIES)


def _totals_new_problem(rng: random.Random) -> tuple[str, int, tuple]:
    return _totals_problem(rng, (TOTALS_NEW,))


ONE_NUMBER_STEP = re.compile(r"(?<![\d+])(\d+)\+(\d)=(\d+)\.")  # "13+5=18.": a running sum, one number added
CARRY_KINDS = ("no carry", "units 9", "units 10", "a carry")


def carry_kind(a: int, b: int) -> str:
    """A step a + b (b one digit) by its units, a % 10 + b: up to 8 no carry, 11 to 18 a carry, and between them
    the edge of the carry, 9 and 10, where the reasoner errs most ("28+1=39.", "12+8=10.": EXPERIMENTS.md).

        >>> [carry_kind(a, b) for a, b in ((3, 5), (28, 1), (12, 8), (17, 6))]
        ['no carry', 'units 9', 'units 10', 'a carry']
    """
    units = a % 10 + b
    return CARRY_KINDS[0] if units < 9 else CARRY_KINDS[1] if units == 9 else CARRY_KINDS[2] if units == 10 else \
        CARRY_KINDS[3]


def at_carry_edge(solution: str) -> bool:
    """Whether a one-number-a-step solution has a step at the edge of the carry (units 9 or 10: carry_kind).

        >>> at_carry_edge("3+8=11. 11+2=13. The answer is \\boxed{13}."), at_carry_edge("12+8=20. 20+1=21.")
        (False, True)
    """
    return any(carry_kind(int(m[1]), int(m[2])) in CARRY_KINDS[1:3] for m in ONE_NUMBER_STEP.finditer(solution))


def _totals_edge_problem(rng: random.Random) -> tuple[str, int, tuple]:
    while True:  # a `totals` draw, kept when its finest solution has a step at the edge (two in three)
        text, answer, solutions = _totals_problem(rng)
        if at_carry_edge(solutions[0]):
            return text, answer, solutions


FAMILIES = {"words": _word_problem, "sums": _sums_problem, "steps": _steps_problem, "digits": _digits_problem,
            "count": _count_problem, "totals": _totals_problem, "totals-new": _totals_new_problem,
            "totals-edge": _totals_edge_problem}


def _builtin_split(text: str) -> str:
    # a problem's split is a function of its text (or its written-out solution), so train and test never share one
    return "test" if zlib.crc32(text.encode()) % 5 == 0 else "train"


def builtin_problems(split: str, n: int | None = None, seed: int = 0, family: str = "words") -> list[Problem]:
    """The first n problems of a split of a built-in family; the same list for the same (split, seed).

        >>> builtin_problems("test", 1)[0].problem
        'Mia has 9 pencils. Then Mia doubles the number of pencils. How many pencils does Mia have now?'
    """
    if split not in BUILTIN_SIZE:
        raise DataError(f"the built-in set has splits {', '.join(BUILTIN_SIZE)}, not {split!r}")
    if family not in FAMILIES:
        raise DataError(f"unknown built-in family {family!r}: use one of {', '.join(FAMILIES)} (builtin:FAMILY)")
    n = BUILTIN_SIZE[split] if n is None else n
    rng = random.Random(seed)
    seen, problems = set(), []
    while len(problems) < n:
        text, answer, *written = FAMILIES[family](rng)  # a family with written-out solutions gives them third
        solutions = written[0] if written else ()
        what = solutions[0] if solutions else text  # the same numbers in another phrasing are the same problem
        if text not in seen and _builtin_split(what) == split:
            seen.add(text)
            problems.append(Problem(text, str(answer), solutions=solutions))
    return problems


# -----------------------------------------------------------------------------
# loading any dataset

# Known eval sets: where they live and which of their columns are our problem and answer.
# `choices` is a column holding the option list, or a tuple of columns with the correct option first
# (GPQA), which are shuffled into A-D with a seeded generator. A list of one answer means that answer
# (OlympiadBench); an integer answer of a multiple-choice set is an option index.
KNOWN_SETS = {
    "math500": dict(path="HuggingFaceH4/MATH-500", split="test", problem="problem", answer="answer"),
    "aime2024": dict(path="HuggingFaceH4/aime_2024", split="train", problem="problem", answer="answer"),
    "aime2025": dict(path="opencompass/AIME2025", config=("AIME2025-I", "AIME2025-II"), split="test",
                     problem="question", answer="answer"),
    "amc": dict(path="AI-MO/aimo-validation-amc", split="train", problem="problem", answer="answer"),
    "olympiadbench": dict(path="Hothan/OlympiadBench", config="OE_TO_maths_en_COMP", split="train",
                          problem="question", answer="final_answer"),
    "gpqa": dict(path="Idavidrein/gpqa", config="gpqa_diamond", split="train", problem="Question", answer=None,
                 choices=("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")),
    "mmlu": dict(path="cais/mmlu", config="all", split="test", problem="question", answer="answer", choices="choices"),
    "lsat": dict(path="dmayhem93/agieval-lsat-ar", split="test", problem="query", answer="gold", multiple_choice=True),
    "deepscaler": dict(path="agentica-org/DeepScaleR-Preview-Dataset", split="train", problem="problem",
                       answer="answer"),
}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers. If it does not, the hub libraries are switched to offline
    mode for this process: a cached copy still loads, and anything else fails at once with a clear
    error instead of five retries over a minute. Asked once per process."""
    global _HUB_REACHABLE
    if _HUB_REACHABLE is None:
        import socket
        from urllib.parse import urlparse
        from urllib.request import getproxies

        from huggingface_hub import constants

        _HUB_REACHABLE = not constants.HF_HUB_OFFLINE
        if _HUB_REACHABLE and not getproxies().get("https"):  # behind a proxy, only the libraries can tell
            url = urlparse(constants.ENDPOINT)
            try:
                socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
            except OSError:
                _HUB_REACHABLE = False
                constants.HF_HUB_OFFLINE = True  # read at each call by transformers and huggingface_hub
                import datasets.config

                datasets.config.HF_HUB_OFFLINE = True
    return _HUB_REACHABLE


_HUB_REACHABLE = None


def read_json_rows(path: Path) -> tuple[list[dict], int, str | None]:
    """The rows of a local .json or .jsonl file, read with Python's own JSON parser, so an integer answer stays
    exact (a table library would make a column of ints and floats all floats: 12345678901234567 -> ...568).

    A .json file may hold a list of row objects, columns (an object of equal-length lists) or JSON lines.
    Returns (rows, lines skipped, the first skipped line's reason): a line that is not a JSON object is
    skipped and counted; a file with no usable line, or not UTF-8, is a DataError naming the file and line.
    """
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"dataset file {path} is not UTF-8 text (line {line}: byte {raw[e.start]:#04x}): "
                        f"save it as UTF-8") from None
    if path.suffix == ".json":
        try:
            whole = json.loads(text)
        except ValueError:
            whole = None  # JSON lines in a .json file, or broken JSON: read it line by line below
        if isinstance(whole, list):
            bad = [i for i, row in enumerate(whole) if not isinstance(row, dict)]
            if len(bad) == len(whole):
                items = type(whole[0]).__name__ if whole else "nothing"
                raise DataError(f"dataset file {path} is a JSON list of {items}, not of row objects "
                                f"({{\"problem\": ..., \"answer\": ...}})")
            return [row for row in whole if isinstance(row, dict)], len(bad), bad and f"item {bad[0]} is not an object"
        if isinstance(whole, dict):
            lengths = {len(v) if isinstance(v, list) else -1 for v in whole.values()}
            if len(lengths) != 1 or -1 in lengths:
                raise DataError(f"dataset file {path} is one JSON object, not a list of rows nor columns of equal "
                                f"length: give a list of {{\"problem\": ..., \"answer\": ...}} objects or JSON lines")
            return [dict(zip(whole, values)) for values in zip(*whole.values())], 0, None
    rows, skipped, first_bad = [], 0, None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            reason = None if isinstance(row, dict) else f"a JSON {type(row).__name__}, not an object"
        except ValueError as e:
            reason = f"not JSON: {e}"
        if reason is None:
            rows.append(row)
        else:
            skipped += 1
            first_bad = first_bad or f"line {number} is {reason}"
    if not rows:
        first = text.lstrip().partition("\n")[0]
        if first_bad is None:
            raise DataError(f"dataset file {path} holds no rows (only blank lines)")
        looks_csv = "," in first and not first.startswith(("{", "["))
        hint = " (it looks like CSV: convert it to JSON lines)" if looks_csv else ""
        raise DataError(f"dataset file {path} has no JSON object lines ({first_bad}){hint}")
    return rows, skipped, first_bad


def _load_table(source: str, split: str, config):
    """The rows of a local file or a hub set: a list of dicts (a local .json/.jsonl) or a `datasets.Dataset`,
    its column names, and a note on the lines skipped; every failure becomes one DataError line."""
    import datasets

    path = Path(source).expanduser()
    if re.match(r"[a-z][a-z0-9+.-]*://", source, re.I):
        raise DataError(f"--data {source} is a URL: --data takes a local .json, .jsonl or .parquet file, a hub id or "
                        f"a known set; download the file and pass its path")
    is_local = path.suffix in LOCAL_FORMATS or path.exists() or source.startswith((".", "/", "~"))
    try:
        if is_local:
            if path.is_dir():
                raise DataError(f"{source} is a directory: give a .json, .jsonl or .parquet file in it")
            if path.exists() and not path.is_file():
                raise DataError(f"dataset {source} is not a regular file (a pipe or a device): write the rows to a "
                                f".json, .jsonl or .parquet file and pass its path")
            if not path.is_file():
                raise DataError(f"dataset file {source} does not exist")
            if path.suffix not in LOCAL_FORMATS:
                raise DataError(f"dataset file {source} is not .json, .jsonl or .parquet")
            if path.stat().st_size == 0:
                raise DataError(f"dataset file {source} is empty")
            if path.suffix in (".json", ".jsonl"):
                rows, skipped, first_bad = read_json_rows(path)
                columns = list(dict.fromkeys(k for row in rows for k in row))
                return rows, columns, skipped and f"{skipped} lines that are not JSON objects (first: {first_bad})"
            # a local file loads in a blink: no progress bars, and errors come once, as our DataError
            datasets.disable_progress_bars()
            verbosity = datasets.logging.get_verbosity()
            datasets.logging.set_verbosity(datasets.logging.CRITICAL)
            try:
                table = datasets.load_dataset("parquet", data_files=str(path), split="train")
            finally:
                datasets.enable_progress_bars()
                datasets.logging.set_verbosity(verbosity)
            return table, table.column_names, None
        configs = config if isinstance(config, tuple) else (config,)
        online = hub_reachable()
        parts = [datasets.load_dataset(source, c, split=split) for c in configs]
        table = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        return table, table.column_names, None
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (connection, missing split, bad json): one message
        detail = first_line(e)
        where = f"file {source}" if is_local else f"{source!r} (split {split!r}) from the Hugging Face hub"
        if not is_local and not online:
            detail = "the hub cannot be reached and the set is not in the local cache"
        hint = "" if is_local else ": check the id and your network, or pass a local .json/.jsonl/.parquet file"
        raise DataError(f"cannot load dataset {where} ({detail}){hint}") from None


def _gold_text(value, multiple_choice: bool) -> tuple[str, str | None]:
    """(the gold answer as text, None), or ("", why the value cannot be an answer). Kept exactly: an int is
    its digits, 142.0 is "142" (AMC stores integers as floats); a list of one answer is that answer."""
    if isinstance(value, (list, tuple)):
        if len(value) > 1:
            return "", "a list of several answers"
        value = value[0] if value else None
    if isinstance(value, bool) or isinstance(value, dict):
        return "", "a true/false answer" if isinstance(value, bool) else "an object as answer"
    if multiple_choice and isinstance(value, int):
        return (chr(ord("A") + value), None) if 0 <= value < 26 else ("", "an option number out of range")
    if isinstance(value, float):
        if not math.isfinite(value):
            return "", "a non-finite number as answer"
        return str(int(value)) if value.is_integer() else repr(value), None
    if value is not None and not isinstance(value, (str, int)):
        return "", f"an answer of type {type(value).__name__}"
    return ("" if value is None else str(value).strip()), None


def format_choices(question: str, choices) -> str:
    """A multiple-choice question with its options lettered A, B, C, ... as in the paper's eval sets."""
    options = "".join(f"{chr(ord('A') + i)}. {str(c).strip()}\n" for i, c in enumerate(choices))
    return f"{question}\n\nOptions:\n{options}"


def load_problems(
    source: str = "builtin",
    split: str | None = None,
    problem_column: str = "problem",
    answer_column: str = "answer",
    config: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[Problem]:
    """Problems from the built-in set, a known eval set, a hub id or a local .json/.jsonl/.parquet file.

    Rows whose problem or answer is missing, empty or not a single value (a list of several, an object,
    true/false) are skipped and counted by reason (one line on stderr). A missing file, an unknown
    column or nothing left to use raises DataError.
    """
    if source == "builtin" or source.startswith("builtin:"):
        return builtin_problems(split or "train", limit, seed, source.partition(":")[2] if ":" in source else "words")
    spec = KNOWN_SETS.get(source.lower(), {})
    for flag, column in (("--problem-column", problem_column), ("--answer-column", answer_column)):
        if not spec and not (isinstance(column, str) and column.strip()):
            raise DataError(f"{flag} must name a column of {source}, not {column!r}")
    if not spec and problem_column == answer_column:
        raise DataError(f"--problem-column and --answer-column both name {problem_column!r}: a problem and its answer "
                        f"are two columns of {source}")
    table, columns, note = _load_table(spec.get("path", source), split or spec.get("split", "train"),
                                       spec.get("config", config))
    problem_column = spec.get("problem", problem_column)
    answer_column = spec.get("answer", answer_column)
    choices = spec.get("choices")
    multiple_choice = choices is not None or spec.get("multiple_choice", False)

    needed = [problem_column] + ([answer_column] if answer_column else [])
    needed += list(choices) if isinstance(choices, tuple) else [choices] if choices else []
    for column in needed:
        if column not in columns:
            raise DataError(
                f"column {column!r} is not in {source} (its columns: {', '.join(columns)}); "
                "name the right one with --problem-column / --answer-column"
            )
    if len(table) == 0:
        raise DataError(f"dataset {source} has no rows")

    shuffle_rng = random.Random(seed)
    problems, skipped = [], {}  # why a row was skipped -> [how many, the first one's row number]
    for number, row in enumerate(table, 1):
        question, why = row.get(problem_column), None
        if question is not None and not isinstance(question, str):
            why = f"a problem that is not text ({type(question).__name__})"
        elif isinstance(question, str) and len(question) > MAX_PROBLEM_CHARS:
            why, question = f"a problem of over {MAX_PROBLEM_CHARS:,} characters", None
        elif isinstance(question, str) and _LENGTH_SENTENCE.search(question):
            why = "a problem that already asks for a length (Think for N tokens.), which LCPO's prompt adds"
        question = question.strip() if isinstance(question, str) else ""
        if isinstance(choices, tuple):  # correct option first: shuffle it into a random letter
            options = [str(row[c] or "").strip() for c in choices]
            order = list(range(len(options)))
            shuffle_rng.shuffle(order)
            gold = chr(ord("A") + order.index(0))
            question = format_choices(question, [options[i] for i in order]) if question else ""
        else:
            gold, why = _gold_text(row.get(answer_column), multiple_choice) if why is None else ("", why)
            if choices and question:
                question = format_choices(question, row[choices])
        if why or not question or not gold:
            why = why or "an empty problem or answer"
            skipped.setdefault(why, [0, number])[0] += 1
            continue
        problems.append(Problem(question, gold, multiple_choice))
        if limit is not None and len(problems) >= limit:
            break
    if note:
        print(f"data: skipped {note} in {source}", file=sys.stderr)
    reasons = ", ".join(f"{n} with {why} (first: row {first})" for why, (n, first) in skipped.items())
    if skipped:
        print(f"data: skipped {sum(n for n, _ in skipped.values())} of {len(table)} rows of {source}: {reasons}",
              file=sys.stderr)
    if not problems:
        raise DataError(f"dataset {source} has no usable rows ({reasons})")
    return problems


def within_context(problems: list[Problem], tokenizer, max_prompt_tokens: int, n_gold: int,
                   source: str) -> list[Problem]:
    """The problems whose longest LCPO prompt (Max, asking for n_gold) has at most max_prompt_tokens tokens (the
    model's context less the response cap); the others are skipped and counted, as load_problems skips bad rows.

    A problem adds at most about a token per byte to the prompt of an empty one, so only long problems are
    tokenized."""
    empty = max(len(lcpo_prompt(tokenizer, Problem("", "", mc), n_gold, "max")) for mc in (False, True))
    fits = [len(p.problem.encode()) + empty + 2 <= max_prompt_tokens
            or len(lcpo_prompt(tokenizer, p, n_gold, "max")) <= max_prompt_tokens for p in problems]
    kept = [p for p, ok in zip(problems, fits) if ok]
    if len(kept) < len(problems):
        first = problems[fits.index(False)].problem
        print(f"data: skipped {len(problems) - len(kept)} of {len(problems)} problems of {source} whose prompt is "
              f"longer than the {max_prompt_tokens} tokens the model's context leaves beside the response cap "
              f"(first: {first[:60]!r})", file=sys.stderr)
    if not kept:
        raise DataError(f"no problem of {source} fits in the model's context beside the response cap: lower "
                        f"--max-new-tokens, or use a model with a longer context")
    return kept


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Preview the LCPO prompts of a dataset.")
    parser.add_argument("--data", default="builtin", help="builtin[:FAMILY] (%s), a known set (%s), a hub id "
                        "or a local file" % (", ".join(FAMILIES), ", ".join(KNOWN_SETS)))
    parser.add_argument("--split", default=None, help="dataset split (built-in: train or test)")
    parser.add_argument("--config", default=None, help="hub dataset configuration name, if it has several")
    parser.add_argument("--problem-column", default="problem")
    parser.add_argument("--answer-column", default="answer")
    parser.add_argument("--mode", default="exact", choices=[*MODES, "mix"])
    parser.add_argument("--n-min", type=int, default=N_MIN, help="smallest target length, tokens")
    parser.add_argument("--n-max", type=int, default=N_MAX, help="largest target length, tokens")
    parser.add_argument("--n", type=int, default=3, help="how many prompts to show")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        check_target_range(args.n_min, args.n_max)
        if args.n < 1:
            raise DataError(f"--n must be >= 1 (how many prompts to show), got {args.n}")
        problems = load_problems(args.data, args.split, args.problem_column, args.answer_column, args.config,
                                 seed=args.seed)
    except DataError as e:
        sys.exit(f"error: {e}")
    print(f"{len(problems)} problems from {args.data}")
    targets = sample_targets(args.n, args.n_min, args.n_max, args.mode, random.Random(args.seed))
    for p, (n_gold, mode) in zip(problems, targets):
        print(f"\n--- gold {p.answer!r}\n{build_prompt(p.problem, n_gold, mode, p.multiple_choice)}")


if __name__ == "__main__":
    main()
