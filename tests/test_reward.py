import builtins
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reward
from reward import (
    exact_reward,
    extract_boxed,
    extract_choice,
    is_correct,
    is_correct_choice,
    lcpo_reward,
    max_reward,
)

lengths = st.integers(min_value=0, max_value=20_000)
targets = st.integers(min_value=1, max_value=20_000)


# -----------------------------------------------------------------------------
# the LCPO rewards


def test_exact_reward_values():
    assert exact_reward(True, 100, 100) == 1.0
    assert exact_reward(True, 1100, 100) == pytest.approx(1 - 0.0003 * 1000)
    assert exact_reward(False, 50, 100) == pytest.approx(-0.0003 * 50)
    assert exact_reward(True, 10_000, 100) < 0  # not clipped
    assert exact_reward(True, 120, 100, alpha=0.01) == pytest.approx(0.8)


def test_max_reward_values():
    assert max_reward(True, 100, 100) == 0.5
    assert max_reward(True, 0, 100) == pytest.approx(0.6)
    assert max_reward(True, 300, 100) == pytest.approx(0.3)
    assert max_reward(True, 700, 100) == 0.0  # clipped at 0
    assert max_reward(True, 0, 4000) == 1.0  # clipped at 1
    assert max_reward(False, 0, 100) == 0.0
    assert max_reward(True, 100, 100, delta=0.8) == 0.8
    assert max_reward(True, 150, 100, alpha=0.01) == 0.0


def test_lcpo_reward_dispatch():
    assert lcpo_reward(True, 120, 100, "exact") == exact_reward(True, 120, 100)
    assert lcpo_reward(True, 120, 100, "max") == max_reward(True, 120, 100)
    assert lcpo_reward(True, 120, 100, "exact", alpha=0.01) == pytest.approx(0.8)
    assert lcpo_reward(True, 120, 100, "max", alpha=0.01, delta=0.7) == pytest.approx(0.5)
    assert lcpo_reward(True, 5000, None, "exact") == 1.0  # no target: plain correctness
    assert lcpo_reward(False, 5, None, "max") == 0.0
    with pytest.raises(ValueError, match="unknown LCPO mode"):
        lcpo_reward(True, 1, 1, "min")


@given(correct=st.booleans(), n_y=lengths, n_gold=targets)
def test_exact_reward_peaks_at_target_and_falls_with_distance(correct, n_y, n_gold):
    at_target = exact_reward(correct, n_gold, n_gold)
    r = exact_reward(correct, n_y, n_gold)
    assert r <= at_target
    assert r == pytest.approx(at_target - 0.0003 * abs(n_y - n_gold))
    farther = n_y + 1 if n_y >= n_gold else n_y - 1
    assert exact_reward(correct, farther, n_gold) < r
    assert exact_reward(True, n_y, n_gold) - exact_reward(False, n_y, n_gold) == pytest.approx(1.0)


@given(correct=st.booleans(), n_y=lengths, n_gold=targets,
       alpha=st.floats(1e-5, 1.0), delta=st.floats(0.0, 1.0))
def test_max_reward_bounded_and_never_rises_with_length(correct, n_y, n_gold, alpha, delta):
    r = max_reward(correct, n_y, n_gold, alpha, delta)
    assert 0.0 <= r <= 1.0
    if not correct:
        assert r == 0.0
    assert max_reward(correct, n_y + 1, n_gold, alpha, delta) <= r
    assert max_reward(True, n_gold, n_gold, alpha, delta) == pytest.approx(delta)


@given(n_y=lengths, n_gold=targets)
def test_max_reward_matches_the_original_codes_formulation(n_y, n_gold):
    # the original writes it as (clip((n_gold - n_y) / 500, -1, 1) + 1) / 2
    original = (min(1.0, max(-1.0, (n_gold - n_y) / 500)) + 1) / 2
    assert max_reward(True, n_y, n_gold) == pytest.approx(original)


# -----------------------------------------------------------------------------
# extract_boxed


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{1} and finally \boxed{2}", "2"),
        (r"\fbox{x+1}", "x+1"),
        (r"\boxed{\left\{1, 2\right\}}", r"\left\{1, 2\right\}"),
        (r"\boxed{{a}{b}{{c}}}", "{a}{b}{{c}}"),
        (r"the answer is \boxed 7 done", "7"),
        (r"\boxed{}", ""),
        (r"\boxed{3", None),  # cut off inside the answer
        (r"\boxed{1} then \boxed{2", None),  # the last box decides
        ("no box here", None),
        ("", None),
        (r"\boxedx{3}", None),  # another macro, not a box
        ("\\boxed{\u00e9\u4e2d\x00}", "\u00e9\u4e2d\x00"),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@given(prefix=st.text(), inner=st.text(alphabet=st.characters(blacklist_characters="{}\\")))
def test_extract_boxed_round_trips_any_unbraced_answer(prefix, inner):
    assert extract_boxed(prefix + r"\boxed{" + inner + "}") == inner


@given(depth=st.integers(1, 30), leaf=st.text(alphabet="abc123+-", min_size=1))
def test_extract_boxed_keeps_nested_braces(depth, leaf):
    inner = "{" * depth + leaf + "}" * depth
    assert extract_boxed(r"x \boxed{" + inner + "} y") == inner


@given(st.text())
def test_extract_boxed_never_crashes(text):
    result = extract_boxed(text)
    assert result is None or isinstance(result, str)


def test_extract_boxed_on_megabyte_outputs():
    long = "a" * 1_000_000
    assert extract_boxed(long + r"\boxed{7}") == "7"
    assert extract_boxed(r"\boxed{" + "{" * 500_000) is None
    assert extract_boxed(r"\boxed{" + long + "}") == long


# -----------------------------------------------------------------------------
# is_correct


@pytest.mark.parametrize(
    "answer, gold",
    [
        (r"\frac12", "0.5"),
        (r"\dfrac{1}{2}", "1/2"),
        ("0.5", r"\frac{1}{2}"),
        ("x=3", "3"),
        ("(1,2)", "(1, 2)"),
        (r"50\%", "50"),
        (r"\text{(B)}", "B"),
        ("1,000", "1000"),
        ("142", "142.0"),
        (r"2\sqrt{2}", r"\sqrt{8}"),
        ("-7", "-7"),
        (r"\boxed{12}", "12"),
    ],
)
def test_is_correct_accepts_equivalent_answers(answer, gold):
    assert is_correct(rf"Step by step... so the answer is \boxed{{{answer}}}.", gold)


@pytest.mark.parametrize(
    "response, gold",
    [
        (r"\boxed{5}", "6"),
        (r"\boxed{\frac{1}{3}}", "0.33"),
        ("The answer is 5.", "5"),  # no box, no answer
        (r"\boxed{}", "5"),
        (r"\boxed{5", "5"),
        (r"\boxed{(1,2)}", "(2, 1)"),
    ],
)
def test_is_correct_rejects(response, gold):
    assert not is_correct(response, gold)


def test_is_correct_reads_a_boxed_gold_solution():
    solution = r"We add: $2+3=5$, so the answer is $\boxed{5}$."  # DeepScaleR-style gold
    assert is_correct(r"\boxed{5}", solution)
    assert not is_correct(r"\boxed{2}", solution)


def test_is_correct_judges_only_after_the_first_think_end():
    assert is_correct(r"<think>maybe \boxed{4}?</think> Final: \boxed{5}", "5")
    assert not is_correct(r"<think>it is \boxed{5}</think> Final: no idea", "5")
    # a box after a second </think> still counts: everything after the first one is the answer
    assert is_correct(r"<think>a</think> b </think> \boxed{5}", "5")
    # models that think must close their thinking to have an answer
    assert not is_correct(r"thinking... \boxed{5}", "5", thinks=True)
    assert is_correct(r"thinking... \boxed{5}", "5", thinks=False)
    assert is_correct(r"thinking...</think>\boxed{5}", "5", thinks=True)


PAYLOADS = [
    "__import__('os').system('touch PWNED')",
    "exec(\"open('PWNED','w').write('x')\")",
    "eval(compile('open(\"PWNED\",\"w\")','x','exec'))",
    "(lambda: __import__('subprocess').call(['touch','PWNED']))()",
    r"\text{__import__('os').system('touch PWNED')}",
    "x=__import__('os').system('touch PWNED')",
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_model_output_is_never_executed(payload, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []

    def spy(name, real, flag):
        def wrapper(source, *args, **kwargs):
            if flag(str(source)):
                calls.append((name, source))
            return real(source, *args, **kwargs)

        return wrapper

    import math_verify.parser
    import sympy.parsing.sympy_parser

    # eval/exec run inside sympy for its own purposes: flag them when they see the payload.
    # parse_expr is Python eval under the hood: the LaTeX grammar hands it number tokens
    # (sympy.Number("12")) and nothing else may reach it
    def has_payload(source):
        return "PWNED" in source

    def not_a_number(source):
        return re.fullmatch(r"[0-9]*\.?[0-9]*", source) is None

    monkeypatch.setattr(builtins, "eval", spy("eval", builtins.eval, has_payload))
    monkeypatch.setattr(builtins, "exec", spy("exec", builtins.exec, has_payload))
    for module in (sympy.parsing.sympy_parser, math_verify.parser):
        monkeypatch.setattr(module, "parse_expr", spy("parse_expr", module.parse_expr, not_a_number))

    for response in (rf"\boxed{{{payload}}}", payload, f"</think>{payload}", r"\boxed{2**3+1}", "2**3+1"):
        assert not is_correct(response, "0")
        is_correct(response, payload)  # even as the gold answer
        is_correct_choice(response, "A")
    assert calls == []
    assert not (tmp_path / "PWNED").exists()


def test_pathological_answer_is_cut_off_by_the_time_limit():
    start = time.monotonic()
    assert not is_correct(r"\boxed{9^{9^{9^{9}}}}", "1")
    # parse and verify each stop at JUDGE_TIMEOUT_S; generous bound for a noisy machine
    assert time.monotonic() - start < 4 * reward.JUDGE_TIMEOUT_S + 10


EXPLODING = [r"9^{9^{9^{9}}}", r"2^{10^{8}}", r"(10^{9})!", r"\binom{10^{9}}{10^{8}}", r"\Gamma(10^{8})"]


def test_the_judge_finishes_in_time_in_a_worker_thread():
    # TRL and verl judge in worker threads; an answer whose value explodes once held the GIL there for ever, so the
    # deadline is kept by a child process (a thread that holds the GIL cannot be waited for)
    import subprocess
    import sys
    from pathlib import Path

    code = ("import threading, reward\n"
            f"answers = {EXPLODING + ['1']!r}\n"
            "out = []\n"
            "worker = threading.Thread(target=lambda: out.extend(reward.is_correct('\\\\boxed{%s}' % a, '1') "
            "for a in answers))\n"
            "worker.start(); worker.join()\n"
            "print(out)")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(reward.__file__).parent, capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == str([False] * len(EXPLODING) + [True]), done.stderr[-500:]
    assert time.monotonic() - start < 30  # mostly the imports: each answer is refused before it is computed


@pytest.mark.parametrize("answer", EXPLODING)
def test_answers_too_large_to_compute_are_incorrect_at_once(answer):
    start = time.monotonic()
    assert not is_correct(rf"\boxed{{{answer}}}", "1")
    assert not is_correct(r"\boxed{1}", answer)  # nor computed as a gold answer
    assert time.monotonic() - start < reward.JUDGE_TIMEOUT_S
    assert is_correct(r"\boxed{2^{100}}", str(2**100)) and is_correct(r"\boxed{20!}", str(2432902008176640000))


@pytest.mark.parametrize("answer, gold", [(r"\lfloor \frac{2024}{3}\rfloor", "674"), (r"|-2024|", "2024"),
                                          (r"\log_2 1024", "10"), (r"\lceil\sqrt{2024}\rceil", "45"),
                                          (r"\frac{2024!}{2022!}", "4094552"), (r"\binom{100}{2}", "4950")])
def test_functions_of_numbers_are_judged_not_refused_as_too_large(answer, gold):
    assert not reward.too_large(reward._parse_latex(answer)) and is_correct(rf"\boxed{{{answer}}}", gold)


def test_a_judgement_that_runs_out_of_time_in_a_worker_thread_is_incorrect(monkeypatch):
    import threading

    def slow_verify(*args, **kwargs):  # a comparison that never ends, in pure Python as sympy's can be
        while True:
            pass

    monkeypatch.setattr(reward, "verify", slow_verify)
    monkeypatch.setattr(reward, "JUDGE_TIMEOUT_S", 0.3)
    out = []
    worker = threading.Thread(target=lambda: out.append(is_correct(r"\boxed{x+1}", "y")), daemon=True)
    start = time.monotonic()
    worker.start()
    worker.join(timeout=20)
    assert out == [False] and time.monotonic() - start < 10


def test_the_time_limit_lands_in_the_thread_that_judges():
    import threading

    out = []

    def spin():
        try:
            with reward.time_limit(0.2):
                while True:  # a slow pure-Python computation, as sympy's can be
                    pass
        except reward.JudgeTimeout:
            out.append("stopped")
        with reward.time_limit(0.05):
            pass  # finished in time: nothing arrives later
        time.sleep(0.2)
        out.append("no late timeout")

    worker = threading.Thread(target=spin, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert out == ["stopped", "no late timeout"]


@pytest.mark.parametrize("response, gold, correct", [
    (r"\boxed{(1,2)}", r"\{1,2\}", False), (r"\boxed{\{1,2\}}", "(1,2)", False),  # a pair or interval is no set
    (r"\boxed{[1,2]}", r"\{1,2\}", False), (r"\boxed{\left\{1,2\right\}}", "[1, 2]", False),
    (r"\boxed{\{2,1\}}", r"\{1,2\}", True), (r"\boxed{1, 2}", r"\{1,2\}", True),  # a set, in any order
    (r"\boxed{(1,2)}", "(1, 2)", True), (r"\boxed{1,2}", "(1,2)", True),  # a bare list matches either
])
def test_a_set_never_matches_a_pair_or_an_interval(response, gold, correct):
    assert is_correct(response, gold) is correct


def test_huge_answers_are_incorrect_without_parsing():
    assert not is_correct(r"\boxed{" + "1+" * 100_000 + "1}", "200001")
    assert not is_correct("9" * 2_000_000, "9")


@settings(max_examples=40)
@given(st.text(max_size=200), st.text(max_size=20))
def test_is_correct_never_crashes(answer, gold):
    assert is_correct(r"\boxed{" + answer + "}", gold) in (True, False)
    assert is_correct(answer, gold) in (True, False)


# -----------------------------------------------------------------------------
# multiple choice


@pytest.mark.parametrize(
    "response, letter",
    [
        (r"\boxed{B}", "B"),
        (r"\boxed{\text{(C)}}", "C"),
        (r"\boxed{(D)}", "D"),
        (r"\boxed{A. 42}", "A"),
        (r"\boxed{\textbf{E}}", "E"),
        ("Comparing the options, (B) is right, not C... I pick D.", "D"),
        ("A: Among A through E, the answer is C", "C"),
        (r"<think>maybe A</think> so \boxed{B}", "B"),
        (r"\boxed{42}", None),
        ("no letter here", None),
        ("", None),
    ],
)
def test_extract_choice(response, letter):
    assert extract_choice(response) == letter


def test_is_correct_choice():
    assert is_correct_choice(r"\boxed{B}", "B")
    assert is_correct_choice(r"\boxed{B}", " b ")
    assert not is_correct_choice(r"\boxed{B}", "C")
    assert not is_correct_choice("I cannot decide", "A")
    assert not is_correct_choice(r"thinking \boxed{B}", "B", thinks=True)


@given(st.text())
def test_choice_judge_never_crashes(text):
    assert extract_choice(text) in (None, *"ABCDEFGHIJ")


def test_judge_uses_only_the_latex_grammar():
    # math-verify's plain-expression extractor hands text to sympy's parse_expr (Python eval)
    from math_verify import LatexExtractionConfig

    assert all(isinstance(c, LatexExtractionConfig) for c in reward._LATEX_ONLY)


@pytest.mark.parametrize(
    "response, answer",
    [
        ("3 + 4 = 7, so the answer is 7.", "7"),
        ("It costs 1,000 dollars, then 2.5 more", "2.5"),
        ("We get 1,000, so", "1,000"),
        ("a total of -3", "-3"),
        (r"first 5, then \boxed{6}, then 7", "6"),  # a box wins over any number
        ("<think>8</think> no number", None),
        ("no number at all", None),
    ],
)
def test_last_number_fallback(response, answer):
    assert reward.extract_answer(response, boxed_only=False) == answer


def test_boxed_only_is_the_default():
    assert not is_correct("3 + 4 = 7, so the answer is 7.", "7")
    assert is_correct("3 + 4 = 7, so the answer is 7.", "7", boxed_only=False)
    assert is_correct("so the answer is 1,000.", "1000", boxed_only=False)
    assert not is_correct("the answer is 7. Check: 7 - 4 = 3", "7", boxed_only=False)  # last number decides


def test_judging_off_the_main_thread_works_and_says_nothing(monkeypatch, caplog):
    # engines (verl's reward workers) may judge in a worker thread, where SIGALRM cannot be set
    import threading

    import math_verify.grader
    import math_verify.parser

    for module in (math_verify.parser, math_verify.grader):  # it warns once per process that it has no alarm
        monkeypatch.setattr(module, "TIMEOUT_WARNING_SHOWN", False)
    out = []
    worker = threading.Thread(target=lambda: out.append((reward.is_correct(r"so \boxed{\dfrac{1}{2}}", "0.5"),
                                                         reward.is_correct(r"\boxed{3}", "4"))))
    worker.start()
    worker.join()
    assert out == [(True, False)]
    # a judge says nothing (an answer past its time limit is incorrect); math-verify would warn that it has no alarm
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("math_verify")]


@pytest.mark.parametrize("response, gold", [
    (r"\boxed{１２}", "12"), (r"\boxed{١٢}", "12"), (r"\boxed{12}", "１２"), ("so it is १२.", "12"),
    (r"\boxed{-３.５}", "-3.5"),
])
def test_digits_of_any_script_are_digits(response, gold):
    assert is_correct(response, gold, boxed_only=False)
    assert not is_correct(response, "13", boxed_only=False)


def test_judge_picks_the_judge_the_problem_calls_for():
    from reward import judge

    assert judge(r"so \boxed{\frac12}", "0.5")  # math-verify: equivalent forms
    assert judge(r"\boxed{12}", 12)  # a gold answer of any type
    assert judge(r"The answer is \boxed{C}", "c", multiple_choice=True)
    assert not judge(r"\boxed{C}", "B", multiple_choice=True)
    assert not judge("the answer is 7", "7")  # boxed only, unless asked
    assert judge("the answer is 7", "7", boxed_only=False)
    assert not judge(r"<think>\boxed{7}", "7", thinks=True)  # no </think>: no answer
