"""
Answers and rewards: is a response correct, and what LCPO reward does it earn.

Pure Python (plus math-verify for symbolic equivalence); nothing here knows about torch or models,
so the same functions can be called from train.py, eval.py, verl or TRL.

    >>> extract_boxed(r"so x = \\boxed{\\frac{1}{2}}.")
    '\\\\frac{1}{2}'
    >>> is_correct(r"<think>1+1 is 2</think> The answer is \\boxed{2}.", "2")
    True
    >>> exact_reward(correct=True, n_y=120, n_gold=100)   # 1 - 0.0003 * 20
    0.994
    >>> max_reward(correct=True, n_y=100, n_gold=100)     # delta at the target
    0.5

Model output is untrusted text: it only ever reaches math-verify's LaTeX parser (a grammar, not
Python; the only pieces it hands on to sympy are the number literals it recognised), never
eval/exec; an answer whose exact value is too large to compute is never computed, and every
judgement has a time limit that holds in whatever thread judges it (TRL and verl call rewards
from worker threads).
"""

import contextlib
import ctypes
import logging
import math
import re
import threading
import unicodedata
from functools import lru_cache

import sympy
from math_verify import LatexExtractionConfig, parse, verify

ALPHA_EXACT = 0.0003  # LCPO-Exact: reward lost per token of |n_gold - n_y| (paper)
ALPHA_MAX = 0.001  # LCPO-Max: slope of the budget term (original code: alpha=1/500 on a [-1, 1] scale)
DELTA_MAX = 0.5  # LCPO-Max: the budget term's value at n_y = n_gold
JUDGE_TIMEOUT_S = 2.0  # per-answer limit on parsing and comparing it, in any thread: past it, incorrect
MAX_ANSWER_CHARS = 1000  # a longer "final answer" is degenerate output: incorrect, never parsed
MAX_DIGITS = 100_000  # an answer whose exact value needs longer numbers (9^{9^{9^9}}, (10^9)!): incorrect, not computed
THINK_END = "</think>"
logging.getLogger("math_verify").setLevel(logging.ERROR)  # its timeouts are judged incorrect here, not printed


# -----------------------------------------------------------------------------
# the two LCPO rewards


def exact_reward(correct: bool, n_y: int, n_gold: int, alpha: float = ALPHA_EXACT) -> float:
    """LCPO-Exact: r = correct - alpha * |n_gold - n_y|. Not clipped, so it can go below 0.

    Every token away from the target costs alpha, whether too short or too long.
    """
    return float(correct) - alpha * abs(n_gold - n_y)


def max_reward(correct: bool, n_y: int, n_gold: int, alpha: float = ALPHA_MAX, delta: float = DELTA_MAX) -> float:
    """LCPO-Max: r = correct * clip(delta + alpha * (n_gold - n_y), 0, 1).

    A correct answer earns delta at the budget, more when shorter, less when longer, and nothing
    once alpha * (n_y - n_gold) >= delta; a wrong answer earns 0 whatever its length.
    """
    return float(correct) * min(1.0, max(0.0, delta + alpha * (n_gold - n_y)))


def lcpo_reward(correct: bool, n_y: int, n_gold: int | None, mode: str, alpha: float | None = None,
                delta: float = DELTA_MAX) -> float:
    """The reward of one response: Exact or Max by the prompt's mode, plain correctness without a target.

    alpha=None takes the mode's own default (0.0003 for exact, 0.001 for max).
    """
    if n_gold is None:
        return float(correct)
    if mode == "exact":
        return exact_reward(correct, n_y, n_gold, ALPHA_EXACT if alpha is None else alpha)
    if mode == "max":
        return max_reward(correct, n_y, n_gold, ALPHA_MAX if alpha is None else alpha, delta)
    raise ValueError(f"unknown LCPO mode {mode!r}: use 'exact' or 'max'")


# -----------------------------------------------------------------------------
# finding the final answer


_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def extract_boxed(text: str) -> str | None:
    r"""The content of the last \boxed{...} (or \fbox{...}), braces matched, nested braces kept.

    `\boxed 5` (no braces) gives "5". None when there is no box or the last one never closes
    (a response cut off inside its answer has no answer).

        >>> extract_boxed(r"\boxed{1} then \boxed{\frac{a}{b}}")
        '\\frac{a}{b}'
        >>> extract_boxed(r"\boxed{2") is None
        True
    """
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    rest = text[start:]
    if not rest.startswith("{"):
        # `\boxed 5`: the argument is the next run of non-space characters
        m = re.match(r" +([^\s$]+)", rest)
        return m.group(1) if m else None
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i]
    return None


def final_answer_text(response: str, thinks: bool = False) -> str:
    """The part of a response that is judged: what follows the first </think>, if there is one.

    thinks=True is for models that emit </think> (R1-style): a response that never closed its
    thinking never reached an answer, so it gives "". Otherwise the whole response is judged.
    """
    if THINK_END in response:
        return response.split(THINK_END, 1)[1]
    return "" if thinks else response


# -----------------------------------------------------------------------------
# judging


_LATEX_ONLY = [LatexExtractionConfig(boxed_match_priority=0)]  # never ExprExtractionConfig: it calls parse_expr


class JudgeTimeout(BaseException):
    """A judgement ran out of time (a BaseException, so that math-verify's own `except Exception` lets it through)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise JudgeTimeout in the calling thread once `seconds` have passed, in any thread (math-verify's own
    limit is a SIGALRM, which only the main thread may set). Like a signal it lands between two Python steps:
    one long C call (a huge integer power) is not cut short, which is why too_large keeps those from starting."""
    thread = ctypes.c_ulong(threading.get_ident())
    timer = threading.Timer(seconds, ctypes.pythonapi.PyThreadState_SetAsyncExc,
                            args=(thread, ctypes.py_object(JudgeTimeout)))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
        ctypes.pythonapi.PyThreadState_SetAsyncExc(thread, None)  # one sent as the block ended is dropped


_GROWING = (sympy.factorial, sympy.factorial2, sympy.subfactorial, sympy.binomial, sympy.gamma, sympy.RisingFactorial,
            sympy.FallingFactorial)  # functions whose value can have far more digits than their argument


def _digits(e) -> float:
    # an upper bound on the digits of the numbers sympy makes computing e exactly: a power multiplies its base's
    # digits by its exponent (below 10^d for an exponent of d digits); n! and its kin have at most n log10(n)
    # digits; anything else (sums, products, sets, floor, log, ...) at most the digits of its parts together
    if isinstance(e, sympy.Rational):
        return max(e.p.bit_length(), e.q.bit_length()) * math.log10(2) + 1
    if not isinstance(e, sympy.Basic) or not e.args:
        return 0
    parts = [_digits(a) for a in e.args]
    if isinstance(e, sympy.Pow) and e.exp.is_number:
        exponent = abs(int(e.exp)) if e.exp.is_Integer else 10 ** min(parts[1], 20)
        return max(*parts, parts[0] * exponent)
    if isinstance(e, _GROWING):
        n = abs(float(e.args[0])) if e.args[0].is_Integer else 10 ** min(max(parts), 20)  # n, or a bound on it
        return max(*parts, n * math.log10(max(n, 2)))
    return sum(parts)


def too_large(parsed: list) -> bool:
    """Would judging this parsed answer compute a number of more than MAX_DIGITS digits?

        >>> too_large(_parse_latex("2^{10}")), too_large(_parse_latex("9^{9^{9^{9}}}"))
        (False, True)
    """
    return any(_digits(e) > MAX_DIGITS for e in parsed)


def _parse_latex(answer: str) -> list:
    return parse(f"${answer}$", extraction_config=_LATEX_ONLY, parsing_timeout=None)  # the limit: time_limit


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list:
    # each gold answer is judged against G responses per step: parse it once
    boxed = extract_boxed(gold)
    return _parse_latex(boxed if boxed is not None else gold)


def _same_text(a: str, b: str) -> bool:
    def norm(s: str) -> str:
        return re.sub(r"\s+|\$|\\[,!; ]", "", s)

    return norm(a) == norm(b)


_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def extract_answer(response: str, thinks: bool = False, boxed_only: bool = True) -> str | None:
    r"""The final answer of a response: the last \boxed{} after </think> (see final_answer_text).

    boxed_only=False also accepts, when there is no box, the last number of the response: small
    models (the 135M default) often end with "so the answer is 17." and rarely box. The paper
    judges boxed answers only, which stays the default.

        >>> extract_answer("3 + 4 = 7, so the answer is 7.", boxed_only=False)
        '7'
    """
    text = final_answer_text(response, thinks)
    answer = extract_boxed(text)
    if answer is None and not boxed_only:
        numbers = _NUMBER.findall(text)
        answer = numbers[-1] if numbers else None
    return answer


def ascii_digits(text: str) -> str:
    """Every decimal digit as its ASCII digit: full-width (１２), Arabic-Indic (١٢) and the rest read as 12.
    Nothing else changes (NFKC would also turn x² into x2).

        >>> ascii_digits("x = １２, y = ٣")
        'x = 12, y = 3'
    """
    return text if text.isascii() else re.sub(r"\d", lambda m: str(unicodedata.decimal(m[0])), text)


def is_correct(response: str, gold: str, thinks: bool = False, boxed_only: bool = True) -> bool:
    r"""Is the final answer of the response equivalent to the gold answer?

    Judged with math-verify, so 1/2 = \frac12 = 0.5, x=3 matches 3, 1,000 matches 1000, １２ matches 12,
    \text{(B)} matches B, and a list 1, 2 matches \{1, 2\} and (1, 2). A set in braces never matches a
    pair or an interval in brackets, (1, 2) or [1, 2] against \{1, 2\}: order and the brackets are part
    of the answer (math-verify alone takes (1, 2) for \{1, 2\}). A response without an answer,
    an answer whose value is too large to compute (too_large), or one that takes longer than
    JUDGE_TIMEOUT_S to parse and compare, is incorrect. `thinks` and `boxed_only`: see
    final_answer_text and extract_answer.
    """
    answer = extract_answer(response, thinks, boxed_only)
    if answer is None or not answer.strip() or len(answer) > MAX_ANSWER_CHARS:
        return False
    answer, gold = ascii_digits(answer), ascii_digits(str(gold))
    if _same_text(answer, gold):
        return True
    if {_brackets(answer), _brackets(extract_boxed(gold) or gold)} == {"set", "ordered"}:
        return False
    try:
        with time_limit(JUDGE_TIMEOUT_S):
            expected, given = _parse_gold(gold), _parse_latex(answer)
            return not too_large(expected + given) and bool(verify(expected, given, timeout_seconds=None))
    except JudgeTimeout:
        return False


_SET = re.compile(r"\s*(?:\\left)?\\\{.*\\\}\s*$", re.S)
_ORDERED = re.compile(r"\s*(?:\\left)?[(\[].*[)\]]\s*$", re.S)


def _brackets(answer: str) -> str | None:
    # "set" for \{...\}, "ordered" for a pair, tuple or interval in (...) or [...]
    return "set" if _SET.match(answer) else "ordered" if _ORDERED.match(answer) else None


_CHOICE = re.compile(r"^\s*\(?\s*([A-J])\s*\)?(?:[\s.:)]|$)")
_STANDALONE_LETTER = re.compile(r"(?<![A-Za-z])([A-E])(?![A-Za-z])")
_TEXT_MACRO = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")


def extract_choice(response: str, thinks: bool = False) -> str | None:
    r"""The letter a multiple-choice response picked: the boxed letter if there is a box
    (\boxed{B}, \boxed{\text{(B)}}, \boxed{B. 42}), else the last standalone letter A-E.

        >>> extract_choice(r"so the answer is \boxed{\text{(C)}}")
        'C'
        >>> extract_choice("I think (B) is right.")
        'B'
    """
    text = final_answer_text(response, thinks)
    boxed = extract_boxed(text)
    if boxed is not None:
        m = _CHOICE.match(_TEXT_MACRO.sub(r"\1", boxed))
        return m.group(1) if m else None
    letters = _STANDALONE_LETTER.findall(text)
    return letters[-1] if letters else None


def is_correct_choice(response: str, gold: str, thinks: bool = False) -> bool:
    """Multiple-choice judge (GPQA, MMLU, LSAT): does the picked letter equal the gold letter?"""
    return extract_choice(response, thinks) == str(gold).strip().upper()


def judge(response: str, gold, multiple_choice: bool = False, thinks: bool = False, boxed_only: bool = True) -> bool:
    """The judge a problem calls for: its letter for a multiple-choice problem, math-verify otherwise."""
    if multiple_choice:
        return is_correct_choice(response, str(gold), thinks)
    return is_correct(response, str(gold), thinks, boxed_only)
