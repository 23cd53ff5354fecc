"""
The LCPO reward for distributed engines: TRL's GRPOTrainer and verl.

Thin adapters over reward.py, the functions train.py uses; no formula is written twice. The data
side is `export` (`python scale_out.py trl|verl --data SET --out FILE.parquet`), which writes the
LCPO prompts with each row's target N and mode in columns these functions read back.

TRL (completions arrive with their token ids, so n_y is counted exactly as train.py counts it):

    from trl import GRPOConfig, GRPOTrainer
    from datasets import load_dataset
    import scale_out
    dataset = load_dataset("parquet", data_files="lcpo-trl.parquet", split="train")
    trainer = GRPOTrainer(model=..., reward_funcs=scale_out.trl_reward(), train_dataset=dataset, args=GRPOConfig(...))

verl (the reward manager passes the decoded text only, so n_y is the text's length in tokens of the
tokenizer named at export; the end-of-sequence token that train.py also counts is not in the text):

    custom_reward_function.path=scale_out.py custom_reward_function.name=compute_score
"""

import argparse
import math
import random
import signal
import sys
from functools import lru_cache
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while the libraries below load: quit quietly, as at any time
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import data
import reward


def _reward(text: str | None, n_y: int, answer, n_gold, mode: str, multiple_choice: bool, alpha, delta,
            thinks: bool, boxed_only: bool) -> float:
    """train.py's judge and reward for one response (its step 3). No response (None) earns 0; a missing n_gold
    (None, or NaN as a table stores a missing number) means no target: the reward is correctness alone."""
    if text is None:
        return 0.0
    ok = reward.judge(text, answer, multiple_choice, thinks, boxed_only)
    missing = n_gold is None or (isinstance(n_gold, float) and math.isnan(n_gold))
    return reward.lcpo_reward(ok, n_y, None if missing else int(n_gold), mode or "exact", alpha, delta)


def trl_reward(tokenizer=None, alpha: float | None = None, delta: float = reward.DELTA_MAX, boxed_only: bool = True):
    """A reward function for GRPOTrainer(reward_funcs=...), reading the columns of export's TRL file.

    tokenizer: the model's; if it has </think>, only the text after it is judged (as train.py).
    alpha None: each mode's own default, as train.py. boxed_only=False adds the last-number fallback.
    A missing completion (None, or a chat of no messages) earns 0; columns of different lengths, or a
    completion without its token ids, are a caller's mistake: ValueError.
    """
    thinks = tokenizer is not None and "</think>" in tokenizer.get_vocab()

    def lcpo_reward(completions, completion_ids, answer, n_gold, mode, multiple_choice=None, **kwargs) -> list[float]:
        columns = dict(completions=completions, completion_ids=completion_ids, answer=answer, n_gold=n_gold, mode=mode,
                       **({} if multiple_choice is None else {"multiple_choice": multiple_choice}))
        lengths = {name: len(column) if hasattr(column, "__len__") else None for name, column in columns.items()}
        if len(set(lengths.values())) != 1 or None in lengths.values():
            raise ValueError(f"trl_reward: the columns must be lists of one length, one item per completion, got "
                             f"{', '.join(f'{k} {v}' for k, v in lengths.items())}")
        rewards = []
        for i, (completion, ids) in enumerate(zip(completions, completion_ids)):
            text = completion if isinstance(completion, str) else completion[-1]["content"] if completion else None
            if text is not None and ids is None:
                raise ValueError(f"trl_reward: completion {i} has no completion_ids: n_y is counted from them")
            mc = bool(multiple_choice[i]) if multiple_choice is not None else False
            rewards.append(_reward(text, len(ids or []), answer[i], n_gold[i], mode[i], mc, alpha, delta, thinks,
                                   boxed_only))
        return rewards

    return lcpo_reward


@lru_cache(maxsize=4)
def _tokenizer(name: str):
    import model as model_lib

    return model_lib.load_tokenizer(model_lib.resolve(None if name == "embedded" else name))


def compute_score(data_source, solution_str: str, ground_truth, extra_info: dict | None = None, **kwargs) -> float:
    """verl's custom reward function: the LCPO reward of one decoded response.

    extra_info (from export's verl file) carries n_gold, mode, multiple_choice, the tokenizer
    that counts n_y (and tells whether the model thinks in <think> tags) and boxed_only; verl's
    reward_kwargs may add alpha or delta.
    """
    if solution_str is None:  # no response: as trl_reward, 0
        return 0.0
    info = {**(extra_info or {}), **kwargs}
    tokenizer = _tokenizer(info.get("tokenizer", "embedded"))
    n_y = len(tokenizer(solution_str, add_special_tokens=False)["input_ids"])
    return _reward(solution_str, n_y, ground_truth, info.get("n_gold"), info.get("mode", "exact"),
                   bool(info.get("multiple_choice", False)), info.get("alpha"), info.get("delta", reward.DELTA_MAX),
                   "</think>" in tokenizer.get_vocab(), bool(info.get("boxed_only", True)))


# -----------------------------------------------------------------------------
# the data: LCPO prompts with their targets, for TRL or verl (the reward functions above read these columns back)


def export(problems: list[data.Problem], path: str | Path, engine: str, n_min: int, n_max: int, mode: str = "exact",
           seed: int = 0, data_source: str = "lcpo", tokenizer: str = "embedded", boxed_only: bool = True) -> int:
    """Write LCPO prompts, targets drawn as train.py draws them, to a parquet file for `engine`.

    trl : prompt (one user message), answer, n_gold, mode, multiple_choice: GRPOTrainer hands every
          column but the prompt to the reward function (scale_out.trl_reward).
    verl: data_source, prompt, ability, reward_model {style, ground_truth}, extra_info {n_gold, mode,
          multiple_choice, tokenizer, boxed_only}: the layout of verl's data loader, read back
          by scale_out.compute_score. `tokenizer` names the model whose tokens n_y counts.
    """
    import datasets

    if engine not in ("trl", "verl"):
        raise data.DataError(f"unknown engine {engine!r}: export for trl or verl")
    data.check_target_range(n_min, n_max)
    targets = data.sample_targets(len(problems), n_min, n_max, mode, random.Random(seed))
    rows = []
    for i, (p, (n_gold, m)) in enumerate(zip(problems, targets)):
        prompt = [{"role": "user", "content": data.build_prompt(p.problem, n_gold, m, p.multiple_choice)}]
        if engine == "trl":
            rows.append(dict(prompt=prompt, answer=p.answer, n_gold=n_gold, mode=m, multiple_choice=p.multiple_choice))
        else:
            rows.append(dict(data_source=data_source, prompt=prompt, ability="math",
                             reward_model={"style": "rule", "ground_truth": p.answer},
                             extra_info=dict(index=i, n_gold=n_gold, mode=m, multiple_choice=p.multiple_choice,
                                             tokenizer=tokenizer, boxed_only=boxed_only)))
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    except OSError as e:
        raise data.DataError(f"cannot write {path} ({e.strerror or e}): choose another --out") from None
    return len(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a dataset's LCPO prompts and targets for TRL or verl.")
    parser.add_argument("engine", choices=["trl", "verl"])
    parser.add_argument("--out", required=True, help="the parquet file to write")
    parser.add_argument("--replace", action="store_true", help="write over an existing --out (default: keep it)")
    parser.add_argument("--data", default="builtin", help="builtin, a known set (%s), a hub id or a local file"
                        % ", ".join(data.KNOWN_SETS))
    parser.add_argument("--split", default=None, help="dataset split (built-in: train or test)")
    parser.add_argument("--config", default=None, help="hub dataset configuration name, if it has several")
    parser.add_argument("--problem-column", default="problem")
    parser.add_argument("--answer-column", default="answer")
    parser.add_argument("--mode", default="exact", choices=[*data.MODES, "mix"])
    parser.add_argument("--n-min", type=int, default=data.N_MIN, help="smallest target length, tokens")
    parser.add_argument("--n-max", type=int, default=data.N_MAX, help="largest target length, tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default="embedded", help="verl: the model whose tokens n_y counts")
    parser.add_argument("--boxed-only", action=argparse.BooleanOptionalAction, default=True,
                        help="verl: judge only \\boxed{} answers (the paper)")
    args = parser.parse_args(argv)
    import model as model_lib
    import runs

    try:
        data.check_target_range(args.n_min, args.n_max)
        runs.keep_existing(runs.output_file(args.out, "--out", ".parquet"), "--out", args.replace)
        if args.engine == "verl":  # its reward counts n_y with this tokenizer on every response: it must load
            try:
                _tokenizer(args.tokenizer)
            except (OSError, model_lib.ModelError) as e:
                raise ValueError(f"--tokenizer {args.tokenizer} cannot be loaded ({data.first_line(e)}): "
                                 f"name a local model directory, or a hub id in the local cache") from None
        problems = data.load_problems(args.data, args.split, args.problem_column, args.answer_column, args.config,
                                      seed=args.seed)
        n = export(problems, Path(args.out).expanduser(), args.engine, args.n_min, args.n_max, args.mode, args.seed,
                   data_source=args.data, tokenizer=args.tokenizer, boxed_only=args.boxed_only)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {n} {args.mode} prompts (N {args.n_min}-{args.n_max}) for {args.engine} to {args.out}")


if __name__ == "__main__":
    main()
