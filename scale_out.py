"""
The LCPO reward for distributed engines: TRL's GRPOTrainer and verl.

Thin adapters over reward.py, the functions train.py uses; no formula is written twice. The data
side is data.py's export (`python data.py --export trl|verl --out FILE.parquet`), which writes the
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

from functools import lru_cache

import reward


def _reward(text: str, n_y: int, answer, n_gold, mode: str, multiple_choice: bool, alpha, delta, thinks: bool,
            boxed_only: bool) -> float:
    """train.py's judge and reward for one response (its step 3)."""
    ok = reward.judge(text, answer, multiple_choice, thinks, boxed_only)
    return reward.lcpo_reward(ok, n_y, None if n_gold is None else int(n_gold), mode or "exact", alpha, delta)


def trl_reward(tokenizer=None, alpha: float | None = None, delta: float = reward.DELTA_MAX, boxed_only: bool = True):
    """A reward function for GRPOTrainer(reward_funcs=...), reading the columns of data.py's TRL export.

    tokenizer: the model's; if it has </think>, only the text after it is judged (as train.py).
    alpha None: each mode's own default, as train.py. boxed_only=False adds the last-number fallback.
    """
    thinks = tokenizer is not None and "</think>" in tokenizer.get_vocab()

    def lcpo_reward(completions, completion_ids, answer, n_gold, mode, multiple_choice=None, **kwargs) -> list[float]:
        rewards = []
        for i, (completion, ids) in enumerate(zip(completions, completion_ids)):
            text = completion if isinstance(completion, str) else completion[-1]["content"]  # plain or chat
            mc = bool(multiple_choice[i]) if multiple_choice is not None else False
            rewards.append(_reward(text, len(ids), answer[i], n_gold[i], mode[i], mc, alpha, delta, thinks, boxed_only))
        return rewards

    return lcpo_reward


@lru_cache(maxsize=4)
def _tokenizer(name: str):
    import model as model_lib

    return model_lib.load_tokenizer(model_lib.resolve(None if name == "embedded" else name))


def compute_score(data_source, solution_str: str, ground_truth, extra_info: dict | None = None, **kwargs) -> float:
    """verl's custom reward function: the LCPO reward of one decoded response.

    extra_info (from data.py's verl export) carries n_gold, mode, multiple_choice, the tokenizer
    that counts n_y (and tells whether the model thinks in <think> tags) and boxed_only; verl's
    reward_kwargs may add alpha or delta.
    """
    info = {**(extra_info or {}), **kwargs}
    tokenizer = _tokenizer(info.get("tokenizer", "embedded"))
    n_y = len(tokenizer(solution_str, add_special_tokens=False)["input_ids"])
    return _reward(solution_str, n_y, ground_truth, info.get("n_gold"), info.get("mode", "exact"),
                   bool(info.get("multiple_choice", False)), info.get("alpha"), info.get("delta", reward.DELTA_MAX),
                   "</think>" in tokenizer.get_vocab(), bool(info.get("boxed_only", True)))
