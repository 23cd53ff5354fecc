"""The LCPO reward inside TRL and verl, through the real packages (installed by `make extras`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import data
import reward
import scale_out


def ours(text, n_y, answer, n_gold, mode, boxed_only=True, thinks=False):
    """What train.py's step 3 gives one response."""
    return reward.lcpo_reward(reward.is_correct(text, answer, thinks, boxed_only), n_y, n_gold, mode)


@pytest.fixture
def problems():
    return data.builtin_problems("train", 6, seed=3)


def test_trl_reward_reads_the_export_columns(tmp_path, problems):
    datasets = pytest.importorskip("datasets")
    scale_out.export(problems, tmp_path / "trl.parquet", "trl", 10, 50, "mix", seed=1)
    rows = datasets.load_dataset("parquet", data_files=str(tmp_path / "trl.parquet"), split="train")
    assert rows.column_names == ["prompt", "answer", "n_gold", "mode", "multiple_choice"]
    assert {m for m in rows["mode"]} <= {"exact", "max"} and all(10 <= n <= 50 for n in rows["n_gold"])
    assert rows[0]["prompt"][0]["content"].endswith(f"{rows[0]['n_gold']} tokens.")
    func = scale_out.trl_reward()
    texts = [f"so \\boxed{{{p.answer}}}" for p in problems[:3]] + ["no idea"] * 3  # 3 right, 3 wrong
    ids = [[7] * (5 + 9 * i) for i in range(6)]
    completions = [[{"role": "assistant", "content": t}] for t in texts]  # conversational form
    got = func(prompts=rows["prompt"], completions=completions, completion_ids=ids, **{k: rows[k] for k in
               ("answer", "n_gold", "mode", "multiple_choice")}, trainer_state=None)
    want = [ours(t, len(i), a, n, m) for t, i, a, n, m in zip(texts, ids, rows["answer"], rows["n_gold"], rows["mode"])]
    assert got == want and got[0] > 0.5 > got[-1]
    assert func(completions=texts[:1], completion_ids=ids[:1], answer=rows["answer"][:1], n_gold=rows["n_gold"][:1],
                mode=rows["mode"][:1]) == want[:1]  # plain-text completions too


def test_grpo_trainer_logs_our_rewards(tmp_path, problems, char_tokenizer, tiny_llama):
    trl = pytest.importorskip("trl", reason="TRL is an optional extra: `make extras` installs it")
    import datasets

    scale_out.export(problems[:4], tmp_path / "trl.parquet", "trl", 4, 12, "mix", seed=0)
    train_set = datasets.load_dataset("parquet", data_files=str(tmp_path / "trl.parquet"), split="train")
    func = scale_out.trl_reward(char_tokenizer, boxed_only=False)
    seen = []

    def lcpo_reward(completions, completion_ids, **columns):  # the same function, watched
        rewards = func(completions, completion_ids, **columns)
        seen.append((completions, completion_ids, columns, rewards))
        return rewards

    args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, num_generations=2,
                          per_device_train_batch_size=4, max_completion_length=12, max_steps=2, report_to="none",
                          logging_steps=1, gradient_checkpointing=False, learning_rate=1e-3, seed=0)
    trainer = trl.GRPOTrainer(model=tiny_llama, reward_funcs=lcpo_reward, args=args, train_dataset=train_set,
                              processing_class=char_tokenizer)
    trainer.train()
    logged = [h["rewards/lcpo_reward/mean"] for h in trainer.state.log_history if "rewards/lcpo_reward/mean" in h]
    assert len(seen) == 2 and len(logged) == 2
    for (completions, ids, columns, rewards), mean in zip(seen, logged):
        texts = [c[-1]["content"] for c in completions]
        assert texts == [char_tokenizer.decode(i, skip_special_tokens=True) for i in ids]
        mine = [ours(t, len(i), a, n, m, boxed_only=False, thinks=True)  # the tiny tokenizer has </think>
                for t, i, a, n, m in zip(texts, ids, columns["answer"], columns["n_gold"], columns["mode"])]
        assert rewards == mine
        assert mean == pytest.approx(sum(mine) / len(mine), abs=1e-6)
        assert all(0 < len(i) <= 12 for i in ids)


VERL = Path(__file__).resolve().parents[1] / ".venv" / "verl"  # where `make extras` puts verl (see the Makefile)

# verl's reward manager on a batch built as verl builds it; run in its own process, with verl's folder first on
# the path (its config library needs another antlr4 runtime than math-verify)
VERL_SCRIPT = """
import json, sys
import numpy as np, torch
from transformers import AutoTokenizer
from verl import DataProto
from verl.workers.reward_manager import NaiveRewardManager
import scale_out

job = json.load(open(sys.argv[1]))
tokenizer = AutoTokenizer.from_pretrained(job["tokenizer"])
batch = DataProto.from_dict(
    tensors={k: torch.tensor(job[k]) for k in ("prompts", "responses", "attention_mask", "input_ids")},
    non_tensors={k: np.array(job[k], dtype=object) for k in ("data_source", "reward_model", "extra_info")})
manager = NaiveRewardManager(tokenizer=tokenizer, num_examine=0, compute_score=scale_out.compute_score)
scores = manager(batch)
scores = scores["reward_tensor"] if isinstance(scores, dict) else scores
print(json.dumps(scores.tolist()))
"""


def test_verl_reward_manager_scores_with_our_compute_score(tmp_path, problems, char_tokenizer, tiny_model_dir):
    if not (VERL / "verl").is_dir():
        pytest.skip("verl is an optional extra: `make extras` installs it")
    import datasets

    scale_out.export(problems, tmp_path / "verl.parquet", "verl", 5, 40, "mix", seed=2, tokenizer=str(tiny_model_dir))
    rows = datasets.load_dataset("parquet", data_files=str(tmp_path / "verl.parquet"), split="train")
    assert rows.column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    responses = [f"<think>3 + 4</think> so \\boxed{{{p.answer}}}" if i % 3 == 0 else  # right
                 f"\\boxed{{{p.answer}}}" if i % 3 == 1 else "<think>hm</think> \\boxed{-1}"  # no </think>; wrong
                 for i, p in enumerate(problems)]
    prompt_ids = [data.encode_prompt(char_tokenizer, r["prompt"][0]["content"]) for r in rows]
    response_ids = [char_tokenizer.encode(t, add_special_tokens=False) + [char_tokenizer.eos_token_id]
                    for t in responses]
    P, R, pad = max(map(len, prompt_ids)), max(map(len, response_ids)), char_tokenizer.pad_token_id
    prompts = [[pad] * (P - len(p)) + p for p in prompt_ids]  # left-padded, as verl rolls out
    resp = [r + [pad] * (R - len(r)) for r in response_ids]  # right-padded
    mask = [[0] * (P - len(p)) + [1] * len(p) + [1] * len(r) + [0] * (R - len(r))
            for p, r in zip(prompt_ids, response_ids)]
    job = dict(tokenizer=str(tiny_model_dir), prompts=prompts, responses=resp, attention_mask=mask,
               input_ids=[p + r for p, r in zip(prompts, resp)],
               **{k: list(rows[k]) for k in ("data_source", "reward_model", "extra_info")})
    (tmp_path / "job.json").write_text(json.dumps(job))
    (tmp_path / "run_verl.py").write_text(VERL_SCRIPT)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(VERL), str(root)])}
    done = subprocess.run([sys.executable, str(tmp_path / "run_verl.py"), str(tmp_path / "job.json")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    scores = json.loads(done.stdout.strip().splitlines()[-1])
    for i, (text, ids, row) in enumerate(zip(responses, response_ids, rows)):
        info = row["extra_info"]
        want = ours(text, len(ids) - 1, row["reward_model"]["ground_truth"], info["n_gold"], info["mode"], thinks=True)
        assert scores[i][len(ids) - 1] == pytest.approx(want)  # on the last response token
        assert sum(scores[i]) == pytest.approx(want)
    assert sum(scores[0]) > 0.5 > max(sum(scores[1]), sum(scores[2]))


def test_compute_score_is_train_py_s_reward_of_the_text(tiny_model_dir, char_tokenizer):
    info = dict(n_gold=10, mode="max", multiple_choice=False, tokenizer=str(tiny_model_dir), boxed_only=True)
    text = "<think>7 + 5</think>\\boxed{12}"  # the tiny tokenizer has </think>: only what follows it counts
    n = len(char_tokenizer.encode(text, add_special_tokens=False))
    assert scale_out.compute_score("lcpo", text, "12", info) == pytest.approx(reward.max_reward(True, n, 10))
    assert scale_out.compute_score("lcpo", text, "13", info) == 0.0
    assert scale_out.compute_score("lcpo", text, "12", {**info, "mode": "exact"}, alpha=0.01) == \
        pytest.approx(1 - 0.01 * abs(10 - n))  # verl's reward_kwargs reach the formula


def test_export_errors_and_cli(tmp_path, problems, capsys):
    with pytest.raises(data.DataError, match="unknown engine 'ray'"):
        scale_out.export(problems, tmp_path / "x.parquet", "ray", 4, 8)
    with pytest.raises(SystemExit):
        scale_out.main(["verl"])  # --out is required: argparse says so
    with pytest.raises(SystemExit) as e:
        scale_out.main(["trl", "--split", "test", "--out", "/proc/nope/x.parquet"])
    assert str(e.value).startswith("error: --out: cannot write to /proc") and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:  # verl's reward counts tokens with it: checked before anything is written
        scale_out.main(["verl", "--out", str(tmp_path / "t.parquet"), "--tokenizer", str(tmp_path / "none")])
    assert str(e.value) == (f"error: --tokenizer {tmp_path / 'none'} cannot be loaded "
                            f"(model directory {tmp_path / 'none'} does not exist): "
                            f"name a local model directory, or a hub id in the local cache")
    assert not (tmp_path / "t.parquet").exists()
    scale_out.main(["verl", "--split", "test", "--out", str(tmp_path / "v.parquet"), "--n-min", "100",
                    "--n-max", "4000", "--mode", "max"])
    assert "wrote 200 max prompts (N 100-4000) for verl" in capsys.readouterr().out


def test_an_export_never_writes_over_a_file_unasked(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        scale_out.main(["trl", "--split", "test", "--out", str(tmp_path / "notes.txt")])
    assert str(e.value) == (f"error: --out writes a .parquet file: give a name ending in .parquet, not "
                            f"'{tmp_path}/notes.txt'")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "trl.parquet").write_text("mine")
    with pytest.raises(SystemExit) as e:
        scale_out.main(["trl", "--split", "test", "--out", str(tmp_path / "trl.parquet")])
    assert str(e.value) == (f"error: {tmp_path}/trl.parquet exists: pass --replace to write over it, or give "
                            f"another --out")
    assert (tmp_path / "trl.parquet").read_text() == "mine"
    scale_out.main(["trl", "--split", "test", "--out", str(tmp_path / "trl.parquet"), "--replace"])
    assert "wrote 200 exact prompts" in capsys.readouterr().out


def test_trl_reward_on_missing_or_mismatched_input():
    func = scale_out.trl_reward()
    columns = dict(answer=["2", "2", "2"], n_gold=[4, float("nan"), None], mode=["exact"] * 3)
    got = func(completions=[None, r"\boxed{2}", []], completion_ids=[None, [1] * 9, []], **columns)
    assert got == [0.0, 1.0, 0.0]  # no completion: 0; a missing target (NaN as a table stores it): correctness alone
    with pytest.raises(ValueError, match=r"^trl_reward: the columns must be lists of one length.*answer 2"):
        func(completions=["a", "b", "c"], completion_ids=[[1]] * 3, **dict(columns, answer=["2", "2"]))
    with pytest.raises(ValueError, match=r"^trl_reward: completion 0 has no completion_ids"):
        func(completions=["a"], completion_ids=[None], answer=["2"], n_gold=[4], mode=["exact"])
    with pytest.raises(ValueError, match=r"^trl_reward: the columns must be lists.*completion_ids None"):
        func(completions=["a"], completion_ids=None, answer=["2"], n_gold=[4], mode=["exact"])


def test_compute_score_of_no_response_is_zero():
    assert scale_out.compute_score("lcpo", None, "2", {"n_gold": 4, "mode": "exact"}) == 0.0
