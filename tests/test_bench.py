import dataclasses
import json

import pytest

import bench
import train


def run(tiny_model_dir, tmp_path, *args):
    bench.main([*args, "--model", str(tiny_model_dir), "--no-quantize", "--out", str(tmp_path)])
    return json.loads(next(tmp_path.glob(f"{args[0]}-*.json")).read_text())


def test_rollout_runs_every_variant_on_the_same_work(tiny_model_dir, tmp_path, capsys):
    result = run(tiny_model_dir, tmp_path, "rollout", "--prompts", "2", "--group-size", "3", "--n-min", "4",
                 "--n-max", "20", "--max-new-tokens", "24", "--repeats", "2")
    assert set(result["variants"]) == set(bench.VARIANTS) - set(bench.GPU_ONLY)  # on a CPU "ours" decodes eagerly
    assert result["rows"] == 6 and result["longest"] <= 24
    for name, r in result["variants"].items():
        assert len(r["seconds"]) == 2
        assert r["tokens_per_s"] == pytest.approx(result["useful_tokens"] / min(r["seconds"]))
    assert result["variants"]["generate()"]["vs_generate"] == 1.0
    assert result["variants"]["generate(), dense copy"]["vs_dense_generate"] == 1.0
    assert "| ours |" in capsys.readouterr().out


def test_workload_lengths_follow_the_targets(char_tokenizer):
    rows, targets, lengths = bench.workload(char_tokenizer, 5, 4, 10, 100, 120, seed=1)
    assert len(rows) == len(targets) == len(lengths) == 20
    assert all(rows[i] == rows[i - i % 4] for i in range(20))  # G copies of each prompt
    assert all(max(1, round(t / 2)) <= n <= min(120, round(1.5 * t)) for t, n in zip(targets, lengths))
    assert bench.workload(char_tokenizer, 5, 4, 10, 100, 120, seed=1)[2] == lengths


def test_train_splits_a_step(tiny_model_dir, tmp_path, capsys):
    result = run(tiny_model_dir, tmp_path, "train", "--prompts", "2", "--group-size", "2", "--n-min", "4",
                 "--n-max", "8", "--max-new-tokens", "8")
    step = result["step"]
    assert step["step"] == 1 and all(step[k] >= 0 for k in ("rollout_s", "reference_s", "policy_s", "optimizer_s"))
    assert "rollout" in capsys.readouterr().out


def test_loss_compares_the_two_passes_on_the_same_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "LOSS_SHAPES", [(12, 1, 6), (40, 4, 6)])
    bench.main(["loss", "--repeats", "1", "--out", str(tmp_path)])
    shapes = json.loads((tmp_path / "loss-cpu.json").read_text())["shapes"]
    alone, grouped = shapes
    assert alone["tokens"]["shared prompt"] == alone["tokens"]["per row"]  # G = 1: nothing to share
    assert grouped["tokens"]["shared prompt"] < grouped["tokens"]["per row"] / 2  # the prompt once, not 4 times
    assert all(s["max_logprob_difference"] < 1e-4 and s["speedup"] > 0 for s in shapes)
    assert "shared prompt" in capsys.readouterr().out


def test_s1_times_the_one_pass_against_the_rounds_on_the_same_rows(tiny_model_dir, tmp_path, capsys):
    result = run(tiny_model_dir, tmp_path, "s1", "--prompts", "3", "--group-size", "2", "--budget", "12",
                 "--old-prompts", "2", "--temperature", "0")
    assert result["rows"] == 6 and result["old_rows"] == 4 and result["budget"] == 12
    assert result["same_text"] == 4  # greedy: the rounds and the one pass write the same texts
    assert "s1_rounds" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["memory"], "needs a CUDA device"),
    (["rollout", "--repeats", "0"], "must be >= 1"),
    (["rollout", "--variants", "fast"], "unknown variant 'fast'"),
    (["s1", "--budget", "0"], "must be >= 1"),
    (["train", "--preset", "huge"], "unknown preset 'huge'"),
])
def test_bad_input_is_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_random_qwen_has_the_1_5b_shape_when_asked(tmp_path, char_tokenizer):
    from transformers import AutoConfig

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=300)
    path = bench.random_qwen(tmp_path / "q", char_tokenizer, small)
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "qwen2" and config.num_hidden_layers == 2
    assert bench.QWEN_1_5B["num_hidden_layers"] == 28 and bench.QWEN_1_5B["hidden_size"] == 1536


def test_train_forces_the_lengths_of_a_random_model(tmp_path, char_tokenizer, capsys):
    import random

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=len(char_tokenizer))
    path = bench.random_qwen(tmp_path / "q", char_tokenizer, small)
    bench.main(["train", "--model", path, "--preset", "l1-exact", "--no-quantize", "--prompts", "2", "--group-size",
                "4", "--n-min", "3", "--n-max", "12", "--max-new-tokens", "12", "--force-lengths",
                "--out", str(tmp_path)])
    result = json.loads((tmp_path / "train-cpu.json").read_text())
    assert result["forced_lengths"] and result["config"]["lora_rank"] == 64 and result["config"]["group_size"] == 4
    rng = random.Random(0)
    drawn = [rng.randint(3, 12) for _ in range(16)]  # two steps of 8 rows; the second is reported
    assert result["step"]["mean_n_y"] <= sum(drawn[8:]) / 8 < 12  # <: a row may still stop at EOS first
    assert "rollout" in capsys.readouterr().out


def test_memory_cap_is_a_share_of_the_device():
    assert bench.memory_fraction(24, 80 * 2**30) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="not within"):
        bench.memory_fraction(100, 80 * 2**30)


def test_trl_times_a_step_of_each_at_the_same_settings(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("trl", reason="TRL is an optional extra: `make extras` installs it")
    result = run(tiny_model_dir, tmp_path, "trl", "--prompts", "2", "--group-size", "2", "--n-min", "4", "--n-max",
                 "6", "--max-new-tokens", "6", "--repeats", "1")
    assert set(result["runs"]) == {"ours", "TRL GRPOTrainer"}
    for (r,) in result["runs"].values():
        assert r["step_s"] > 0 and 0 < r["mean_length"] <= 6 and r["tokens"] == pytest.approx(4 * r["mean_length"])
    ours, theirs = result["runs"]["ours"][0], result["runs"]["TRL GRPOTrainer"][0]
    assert result["ours_vs_trl_per_token"] == pytest.approx(theirs["ms_per_token"] / ours["ms_per_token"])
    assert result["config"]["group_size"] == 2 and result["config"]["beta"] == 0.001
    assert "ms per generated token" in capsys.readouterr().out


def test_trl_without_trl_says_how_to_get_it(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        bench.main(["trl", "--model", "whatever", "--out", str(tmp_path)])
    assert "make extras" in str(e.value) and "\n" not in str(e.value)


def test_where_results_go_is_checked_before_the_benchmark_and_a_result_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "bench_rollout", lambda *a, **k: pytest.fail("the benchmark ran"))
    with pytest.raises(SystemExit) as e:
        bench.main(["rollout", "--out", "/proc/nope"])
    assert str(e.value).startswith("error: --out: cannot write to /proc") and "\n" not in str(e.value)
    result = tmp_path / f"rollout-{'gpu' if bench.model_lib.default_device() == 'cuda' else 'cpu'}.json"
    result.write_text("cited in the README")
    with pytest.raises(SystemExit) as e:
        bench.main(["rollout", "--out", str(tmp_path)])
    assert str(e.value) == f"error: {result} exists: pass --replace to write over it, or give another --out"
    assert result.read_text() == "cited in the README"


# -----------------------------------------------------------------------------
# the memory account


def _peak_gib(preset, **knobs):
    return bench.memory_account(bench.QWEN_1_5B, train.Config(**{**train.PRESETS[preset], **knobs}))["peak"] / 2**30


def test_the_paper_presets_fit_one_24_gb_card_by_the_account():
    for preset in ("l1-exact", "l1-max"):
        assert _peak_gib(preset) <= 24
    assert bench.memory_account(bench.QWEN_7B, train.Config(**train.PRESETS["l1-exact"]))["peak"] / 2**30 > 24


def test_each_knob_changes_its_own_terms():
    cfg = train.Config(**train.PRESETS["l1-exact"])
    terms = lambda **knobs: bench.memory_account(bench.QWEN_1_5B, dataclasses.replace(cfg, **knobs))["terms"]
    base = terms()
    assert terms(rollout_copy=False)["dense rollout copy"][1] == 0 < base["dense rollout copy"][1]
    assert terms(rollout_batch=32)["KV cache of a rollout batch"][1] == base["KV cache of a rollout batch"][1] / 2
    half = terms(micro_batch_tokens=8192)  # M = 8192: above prompt + max_new_tokens (512 + 4096)
    assert half["checkpointed hidden states"][1] == base["checkpointed hidden states"][1] / 2
    assert half["attention mask"][1] == base["attention mask"][1] / 4
    assert terms(lora_rank=128)["LoRA + AdamW + gradients"][1] == 2 * base["LoRA + AdamW + gradients"][1]
    a = bench.memory_account(bench.QWEN_1_5B, cfg)  # the peak: what is kept, then the larger phase, then slack
    kept = sum(x for phase, x, _ in a["terms"].values() if phase == "kept")
    assert a["peak"] == pytest.approx(1.1 * max(a["rollout_peak"], a["loss_peak"])) and a["rollout_peak"] > kept


def test_the_account_matches_a_real_step_on_the_cpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "ACCOUNT_CHECKS", bench.ACCOUNT_CHECKS[:1])
    bench.main(["memory", "--account", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "memory-account.json").read_text())
    exact = result["presets"]["1.5B l1-exact"]
    assert exact["predicted_peak_gib"] <= 24 and result["fits"]
    assert all(t["gib"] >= 0 and t["formula"] for t in exact["terms"].values()) and "7B l1-max" in result["presets"]
    (check,) = result["cpu_checks"]
    assert set(check["measured_mib"]) >= {"4-bit base", "rollout_peak", "loss_peak", "peak"}
    assert all(0.85 <= r <= 1.15 for r in check["ratio"].values()), check["ratio"]
    out = capsys.readouterr().out
    assert "**predicted peak**" in out and "--no-rollout-copy" in out


@pytest.mark.parametrize("args, message", [
    (["memory", "--account", "--preset", "huge"], "unknown preset 'huge'"),
    (["memory", "--account", "--config", "/no/such/config.json"], "cannot read the model config"),
    (["train", "--account"], "are for bench.py memory"),
])
def test_bad_account_input_is_one_line(args, message, tmp_path):
    with pytest.raises(SystemExit) as e:
        bench.main(args + ["--out", str(tmp_path)])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_config_without_the_model_shape_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(SystemExit) as e:
        bench.main(["memory", "--account", "--config", str(tmp_path / "config.json"), "--out", str(tmp_path)])
    assert "has no intermediate_size" in str(e.value) and "\n" not in str(e.value)
