import json
from pathlib import Path

import pytest

import data
import eval as ev
import model as model_lib
import reward
import runs
import sample


def rec(n_y, correct, cut=False):
    return dict(n_y=n_y, correct=correct, cut=cut)


def test_summary_numbers_are_the_formulas():
    records = [rec(50, True), rec(100, False), rec(150, True, cut=True), rec(20, False)]
    s = ev.summarise(records, 100)
    assert s["responses"] == 4 and s["accuracy"] == 0.5 and s["mean_tokens"] == 80
    assert s["length_error"] == pytest.approx((-0.5 + 0 + 0.5 - 0.8) / 4)
    assert s["abs_length_error"] == pytest.approx((0.5 + 0 + 0.5 + 0.8) / 4)
    assert s["length_error"] == pytest.approx((80 - 100) / 100)  # the error of the mean length, for one N
    assert s["rel_rmse"] == pytest.approx(((0.25 + 0 + 0.25 + 0.64) / 4) ** 0.5)
    assert "pads" not in s  # no texts
    assert s["over_budget"] == 0.25 and s["cut_by_cap"] == 0.25
    none = ev.summarise(records, ev.NO_BUDGET)  # no length sentence: no target to miss
    assert "length_error" not in none and none["mean_tokens"] == 80


def args_for(tiny_model_dir, out, *extra):
    return ["--model", str(tiny_model_dir), "--no-quantize", "--limit", "3", "--samples", "2", "--budgets", "4", "8",
            "12", "--out", str(out), *extra]


def test_an_interrupted_evaluation_resumes_without_redoing_budgets(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "e.json"
    real = sample.generate
    calls = []

    def interrupt_at_budget_8(model, prompts, cap, *a, **k):
        calls.append(cap)
        if cap == 16:  # 2 x budget 8
            raise KeyboardInterrupt
        return real(model, prompts, cap, *a, **k)

    monkeypatch.setattr(sample, "generate", interrupt_at_budget_8)
    with pytest.raises(SystemExit, match="the same command resumes"):
        ev.main(args_for(tiny_model_dir, out))
    assert [b["budget"] for b in json.loads(out.read_text())["budgets"]] == [4]
    calls.clear()
    monkeypatch.setattr(sample, "generate", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    ev.main(args_for(tiny_model_dir, out))
    assert sorted(set(calls)) == [16, 24]  # budget 4 was not generated again
    result = json.loads(out.read_text())
    assert [b["budget"] for b in result["budgets"]] == [4, 8, 12]
    records = [json.loads(line) for line in out.with_suffix(".records.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 2 * 3 and len({(r["budget"], r["problem"], r["sample"]) for r in records}) == 18
    for b in result["budgets"]:  # the JSON is the summary of the records
        mine = ev.summarise([r for r in records if r["budget"] == b["budget"]], b["budget"])
        assert all(b[k] == pytest.approx(v) for k, v in mine.items())
    assert result["settings"]["budgets"] == [4, 8, 12] and result["settings"]["samples"] == 2
    assert all(0 <= b["writes_n"] <= 1 for b in result["budgets"])
    with pytest.raises(SystemExit, match="other settings"):
        ev.main(args_for(tiny_model_dir, out, "--temperature", "1.0"))


def test_s1_and_no_length_sentence(tiny_model_dir, tmp_path, monkeypatch):
    prompts = []
    monkeypatch.setattr(data, "build_prompt", lambda p, n, *a: prompts.append(n) or f"{p} [{n}]")
    ev.main(args_for(tiny_model_dir, tmp_path / "s1.json", "--s1"))
    s1 = json.loads((tmp_path / "s1.json").read_text())
    assert set(prompts) == {None}  # S1 forces the budget instead of stating it
    assert all(b["mean_tokens"] >= b["budget"] for b in s1["budgets"])  # it thinks the whole budget, then answers
    ev.main(args_for(tiny_model_dir, tmp_path / "none.json", "--mode", "none"))
    assert [b["budget"] for b in json.loads((tmp_path / "none.json").read_text())["budgets"]] == [ev.NO_BUDGET]


@pytest.mark.parametrize("text, padded", [
    ("3 + 4 = 7.\n1\n1\n1", True),  # lines of "1"
    ("I add them. I add them. I add them. So 7.", True),  # one sentence again and again
    ("First 3 + 4 = 7. Then 7 + 2 = 9. Then 9 + 1 = 10. So 10.", False),
    ("1\n2\n3\n4", False), ("", False),
    ("3+4=7. The answer is \\boxed{7}.Wait, so the answer is \\boxed{7}.", True),  # the answer again, no work
    ("3+4=7. The answer is \\boxed{7}. Wait, let me check. 4+3=7. The answer is \\boxed{7}.", False),  # a check
    ("3+4=8. The answer is \\boxed{8}. Wait, so the answer is \\boxed{7}.", False),  # a changed answer
])
def test_pads_flags_a_line_or_sentence_repeated_three_times_or_an_answer_restated_without_work(text, padded):
    assert ev.pads(text) is padded
    records = [dict(rec(10, False), text=text), dict(rec(10, False), text="fine.")]
    assert ev.summarise(records, 10)["pads"] == (0.5 if padded else 0.0)


def test_a_built_in_family_is_evaluated_on_its_test_split():
    for data_source in ("builtin", "builtin:sums"):
        assert ev.parse_args(["--data", data_source]).split == "test"
    assert ev.parse_args(["--data", "builtin:sums", "--split", "train"]).split == "train"


def test_writes_budget_catches_n_taken_for_a_quantity():
    assert ev.writes_budget("3 * 128 = 384, so \\boxed{384}", 128, "Cara has 3 shells.", "3")
    assert not ev.writes_budget("3 + 4 = 7", 128, "Cara has 3 shells.", "7")  # no N
    assert not ev.writes_budget("1280 shells", 128, "Cara has 3 shells.", "3")  # a longer number is not N
    assert not ev.writes_budget("she has 32 now", 32, "Ann has 32 pens.", "32")  # the problem holds it
    assert not ev.writes_budget("so 64", 64, "Ann has 8 pens. She doubles them twice.", "64")  # so does the answer


def test_multiple_choice_sets_use_the_choice_judge(tiny_model_dir, tmp_path, monkeypatch):
    problems = [data.Problem("Pick one.\n\n(A) 1\n(B) 2", "B", True)]
    monkeypatch.setattr(data, "load_problems", lambda *a, **k: problems)
    judged = []
    monkeypatch.setattr(reward, "is_correct_choice", lambda text, gold, thinks: judged.append(gold) or True)
    monkeypatch.setattr(reward, "is_correct", lambda *a: pytest.fail("the math judge was used"))
    ev.main(args_for(tiny_model_dir, tmp_path / "mc.json", "--budgets", "4"))
    assert judged == ["B", "B"]
    assert json.loads((tmp_path / "mc.json").read_text())["budgets"][0]["accuracy"] == 1.0


def fake_result(path, alpha, mode="exact", s1=False, adapter="a", trained=True):
    budgets = [dict(budget=b, responses=4, accuracy=0.1 * i, mean_tokens=b * 1.1, cut_by_cap=0.0,
                    length_error=0.1, abs_length_error=0.2 / (i + 1), over_budget=0.5)
               for i, b in enumerate([32, 64, 128])]
    settings = dict(s1=s1, adapter=adapter, mode=mode)
    config = dict(alpha=alpha, lr=1e-4, run_name=str(path)) if adapter and trained else {}
    path.write_text(json.dumps(dict(settings=settings, budgets=budgets, train_config=config)))
    return str(path)


def test_compare_labels_runs_by_what_differs_and_draws_a_readable_figure(tmp_path, capsys):
    import matplotlib.image

    paths = [fake_result(tmp_path / "a.json", 0.001), fake_result(tmp_path / "b.json", 0.01),
             fake_result(tmp_path / "base.json", None, adapter=None),
             fake_result(tmp_path / "s1.json", None, s1=True, adapter=None),
             fake_result(tmp_path / "probe.json", None, adapter="results/probe-adapter", trained=False),  # not train's
             fake_result(tmp_path / "max.json", 0.05, mode="max")]  # its method names it: its α, mode go unsaid
    ev.main(["--compare", *paths, "--plot", str(tmp_path / "fig.png")])
    out = capsys.readouterr().out
    assert "| LCPO α=0.001 | 32 |" in out and "| LCPO α=0.01 | 128 |" in out and "| base | 64 |" in out
    assert "| adapter probe-adapter | 64 |" in out and "| LCPO-Max | 64 |" in out
    assert "| S1 | 32 |" in out and out.count("\n| ") == 6 * 3  # a row per run and budget
    image = matplotlib.image.imread(tmp_path / "fig.png")
    assert image.shape[0] > 300 and image.shape[1] > 800  # a real figure, not an empty file
    assert image[..., :3].std() > 0.05  # with something drawn on it


def test_compare_shows_the_route_at_each_budget_from_a_totals_results_responses(tmp_path, capsys):
    path = fake_result(tmp_path / "l1.json", 0.02)
    result = json.loads(Path(path).read_text())
    result["settings"]["data"] = "builtin:totals"
    Path(path).write_text(json.dumps(result))
    texts = {32: ["The answer is \\boxed{9}.", "4+5=8. The answer is \\boxed{8}."],
             64: ["4+5=9. 9+1=10. The answer is \\boxed{10}.", "4+5+1=10. The answer is \\boxed{10}."],
             128: ["4+5+1=10. The answer is \\boxed{10}. Wait, let me check. 4+5=9. 9+1=10. The answer is \\boxed{10}.",
                   "not a step in sight"]}
    lines = [json.dumps(dict(budget=b, text=t)) for b, ts in texts.items() for t in ts] + ["{cut short"]
    (tmp_path / "l1.records.jsonl").write_text("\n".join(lines) + "\n")
    ev.main(["--compare", path, fake_result(tmp_path / "other.json", 0.01)])  # a result without records: no rows
    out, steps = capsys.readouterr().out.split("The route at each budget:")[1].split("One-number steps")
    assert "| LCPO α=0.02 | 32 | 50% | 0% | 0% | 0.5 | 0.0% |" in out
    assert "| LCPO α=0.02 | 64 | 0% | 50% | 0% | 1.5 | 10.0% |" in out
    assert "| LCPO α=0.02 | 128 | 50% | 50% | 50% | 0.5 | 20.0% |" in out
    assert "α=0.01" not in out
    # every one-number step, checks included, by its units: 4+5 (units 9) three times, once wrong; 9+1 (10) twice
    assert "| LCPO α=0.02 | – | 66.7% of 3 | 100.0% of 2 | – |" in steps and "α=0.01" not in steps


def test_route_frontier_picks_the_route_the_reward_pays_most_and_at_alpha_inf_is_the_route_floor(
        tiny_model_dir, tmp_path, capsys):
    import stage1

    settings = dict(s1=False, adapter="a", mode="exact", data="builtin:totals", split="test", limit=4, seed=0,
                    problem_column="problem", answer_column="answer", base=str(tiny_model_dir))
    budgets = [dict(budget=b, responses=1, accuracy=0.5, mean_tokens=b) for b in (60, 160)]
    path = tmp_path / "l1.json"
    path.write_text(json.dumps(dict(settings=settings, budgets=budgets,
                                    train_config=dict(alpha=0.01, mode="exact"))))
    problems = data.load_problems("builtin:totals", "test", limit=4, seed=0)
    check = sample.WAIT + stage1.CHECK
    lines = []  # every route of every problem written once: one number a step right, the rest wrong
    for i, p in enumerate(problems):
        for g, solution in enumerate(p.solutions):
            for text in (solution, f"{solution} {check}{p.solutions[0]}"):
                lines.append(json.dumps(dict(problem=i, budget=60, text=text, correct=g == 0, cut=False)))
    (tmp_path / "l1.records.jsonl").write_text("\n".join(lines) + "\n")
    ev.main(["--compare", str(path)])
    out = capsys.readouterr().out.split("(route_frontier):")[1]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.splitlines() if line.startswith("| ")}
    assert set(rows) == {"α", "0", "0.01", "inf"}  # no length charge, the run's α, the route closest to N
    tokenizer = model_lib.load_tokenizer(str(tiny_model_dir))
    floor = stage1.route_floor(tokenizer, problems, [60, 160])
    assert rows["inf"][3].startswith(f"{floor[60]:.2f} / {floor[160]:.2f}")
    alone, checked = ([len(stage1.written_response(tokenizer, p, p.solutions[0], c)) for p in problems]
                      for c in (False, True))
    assert all(n <= 120 for n in alone) and all(n > 100 for n in checked)  # these sums' lengths, in characters
    assert rows["0"][1] == "100.0 / 100.0"  # no length charge: a route that is always right, wherever it fits
    # of the two always right, the one closer to N: without its check at N = 60, with it at 160
    mean = lambda xs: f"{sum(xs) / len(xs):.0f}"
    assert rows["0"][2] == f"{mean(alone)} / {mean(checked)}"


@pytest.mark.parametrize("argv, message", [
    (["--budgets", "32", "0"], "budgets must be positive"),
    (["--budgets", "-5"], "budgets must be positive"),
    (["--samples", "0"], "--samples must be >= 1"),
    (["--s1", "--mode", "none"], "cannot go with --mode none"),
    (["--plot", "x.png"], "--plot goes with --compare"),
    (["--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--temperature", "nan"], "temperature must be a finite number >= 0"),
    (["--max-new-tokens", "0"], "max_new_tokens must be positive"),
    (["--stop-probe", "r.jsonl", "--mode", "none"], "--stop-probe asks for each budget"),
    (["--choice-probe", "--s1"], "--choice-probe asks for each budget in an Exact prompt"),
    (["--choice-probe", "--mode", "max"], "--choice-probe asks for each budget in an Exact prompt"),
    (["--step-probe", "--s1"], "--step-probe asks for each budget in an Exact prompt"),
    (["--step-probe", "--choice-probe"], "--choice-probe and --step-probe are separate probes"),
    (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
    (["--seed", str(2**40)], "--seed must be in [0, 2**32)"),
    (["--out", "/dev/null/e.json"], "--out: cannot write to /dev/null (a file is in the way)"),
    (["--compare", "a.json", "--plot", "/dev/null/c.png"], "--plot: cannot write to /dev/null (a file is in the way)"),
])
def test_bad_flags_are_refused_in_one_line(argv, message):
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_compare_refuses_other_files(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"step": 3, "loss": 0.1}))
    (tmp_path / "notes.json").write_text("not json at all")
    for name, message in (("metrics.json", "not an eval.py result"), ("notes.json", "is not JSON"),
                          ("missing.json", "does not exist")):
        with pytest.raises(SystemExit) as e:
            ev.main(["--compare", str(tmp_path / name)])
        assert message in str(e.value) and "\n" not in str(e.value)


def test_an_empty_set_and_an_adapter_of_another_base_are_refused(tiny_model_dir, tmp_path, char_tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"problem": "", "answer": "1"}) + "\n")
    with pytest.raises(SystemExit) as e:
        ev.main(args_for(tiny_model_dir, tmp_path / "x.json", "--data", str(empty)))
    assert "no usable rows" in str(e.value) and "\n" not in str(e.value)
    model, tok = model_lib.load_model(str(tiny_model_dir), quantize=False)
    model_lib.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(SystemExit) as e:
        ev.main(["--adapter", str(tmp_path / "adapter"), "--model", "some/other-model",
                 "--out", str(tmp_path / "y.json")])
    assert "some/other-model" in str(e.value) and str(tiny_model_dir) in str(e.value)


def test_curves_summarise_and_plot_training_runs(tmp_path, capsys):
    import matplotlib.image

    for name, slope in (("alpha-a", 0.01), ("alpha-b", 0.02)):
        run = tmp_path / name
        run.mkdir()
        extra = (lambda s: {"length_slope": None if s < 5 else s / 20}) if name == "alpha-a" else (lambda s: {})
        lines = [json.dumps(dict(step=s, reward_mean=-1 + slope * s, length_error=2 - slope * s, accuracy=0.1,
                                 mean_n_y=100 - s, **extra(s)))
                 for s in range(30)]  # alpha-a: one N for 5 steps, then a slope; alpha-b: an older run without one
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 30, "reward_m')  # torn by a kill
    ev.main(["--curves", str(tmp_path / "alpha-a"), str(tmp_path / "alpha-b"), "--plot", str(tmp_path / "c.png")])
    out = capsys.readouterr().out
    # first ten steps average step 4.5, the last ten step 24.5
    assert "| alpha-a | 30 | -0.955 → -0.755 | 1.955 → 1.755 | 0.350 → 1.225 | 0.100 → 0.100 | 95.500 → 75.500 |" in out
    assert "| alpha-b | 30 | -0.910 → -0.510 | 1.910 → 1.510 | – → – |" in out
    image = matplotlib.image.imread(tmp_path / "c.png")
    assert image.shape[1] > 800 and image[..., :3].std() > 0.05


def test_curves_give_each_run_one_colour_and_one_legend(tmp_path, monkeypatch):
    import matplotlib.colors
    import matplotlib.pyplot as plt

    for name, with_slope in (("old", False), ("new", True)):  # the run without a slope comes first
        run = tmp_path / name
        run.mkdir()
        rows = [dict(step=s, reward_mean=0.1 * s, length_error=1.0, **({"length_slope": 0.5} if with_slope else {}))
                for s in range(12)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at it
    ev.main(["--curves", str(tmp_path / "old"), str(tmp_path / "new"), "--plot", str(tmp_path / "c.png")])
    (fig,) = figures
    reward_ax, _, slope_ax = fig.axes
    colour = {line.get_label().split(" (")[0]: matplotlib.colors.to_hex(line.get_color())
              for line in reward_ax.get_lines() if not line.get_label().startswith("_")}
    (slope_line,) = [line for line in slope_ax.get_lines() if line.get_label().startswith("new")]
    assert matplotlib.colors.to_hex(slope_line.get_color()) == colour["new"] != colour["old"]
    assert len(fig.legends) == 1 and not any(ax.get_legend() for ax in fig.axes)
    assert [t.get_text().split(" (")[0] for t in fig.legends[0].get_texts()] == ["old", "new"]
    monkeypatch.undo()
    plt.close(fig)


def test_curves_refuse_a_directory_without_metrics(tmp_path):
    with pytest.raises(SystemExit) as e:
        ev.main(["--curves", str(tmp_path)])
    assert "not a train.py run (no metrics.jsonl)" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        ev.main(["--curves", str(tmp_path), "--compare", "x.json"])
    assert "give one of them" in str(e.value)


def test_a_damaged_result_or_record_line_names_its_file(tiny_model_dir, tmp_path):
    out = tmp_path / "e.json"
    out.write_text('{"settings": {"model": ')  # a result file cut short
    with pytest.raises(SystemExit) as e:
        ev.main(args_for(tiny_model_dir, out))
    assert str(out) in str(e.value) and "is not JSON" in str(e.value) and "\n" not in str(e.value)
    out.unlink()
    ev.main(args_for(tiny_model_dir, out, "--budgets", "4"))
    records = out.with_suffix(".records.jsonl")
    with open(records, "a") as f:
        f.write('{"problem": 0, "bud')  # a kill mid-write
    ev.main(args_for(tiny_model_dir, out, "--budgets", "4"))  # every budget done: nothing to redo
    ev.main(args_for(tiny_model_dir, tmp_path / "more.json", "--budgets", "4", "8"))
    assert len(runs.read_jsonl(records)) == 3 * 2


def test_the_bar_counts_responses_as_they_finish(tiny_model_dir, tmp_path, monkeypatch):
    import tqdm

    inside, seen = [False], []
    real_update, real_generate = tqdm.tqdm.update, sample.generate
    monkeypatch.setattr(tqdm.tqdm, "update", lambda self, n=1: seen.append((inside[0], n)) or real_update(self, n))

    def generate(*args, **kwargs):
        inside[0] = True
        try:
            return real_generate(*args, **kwargs)
        finally:
            inside[0] = False

    monkeypatch.setattr(sample, "generate", generate)
    ev.main(args_for(tiny_model_dir, tmp_path / "e.json", "--budgets", "4", "--batch", "6", "--limit", "3"))
    assert sum(n for during, n in seen if during) == 6  # every response counted as it finished, inside the batch


def test_a_damaged_train_config_behind_an_adapter_names_its_file(tiny_model_dir, tmp_path):
    model, tok = model_lib.load_model(str(tiny_model_dir), quantize=False)
    model_lib.save_adapter(model, tmp_path / "run" / "checkpoints" / "step-000001" / "adapter")
    (tmp_path / "run" / "config.json").write_text("{not json")
    with pytest.raises(SystemExit) as e:
        ev.main(["--adapter", str(tmp_path / "run"), "--no-quantize", "--out", str(tmp_path / "e.json")])
    assert str(tmp_path / "run" / "config.json") in str(e.value) and "\n" not in str(e.value)


def test_stop_probe_from_an_evaluation_s_records(tiny_model_dir, tmp_path, capsys):
    ev.main(args_for(tiny_model_dir, tmp_path / "e.json"))
    records = str(tmp_path / "e.records.jsonl")
    ev.main(["--model", str(tiny_model_dir), "--no-quantize", "--limit", "3", "--stop-probe", records,
             "--budgets", "2", "4", "--out", str(tmp_path / "p.json")])
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["budgets"] == [2, 4] and result["responses"] > 0 and len(result["matrix"]) == 2
    assert 0 <= result["accuracy"] <= 1 and "chance 50%" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no response"):
        ev.main(["--model", str(tiny_model_dir), "--no-quantize", "--limit", "3", "--stop-probe", records,
                 "--budgets", "500", "--out", str(tmp_path / "q.json")])


def test_choice_probe_reads_the_route_at_each_budget_and_needs_written_out_solutions(tiny_model_dir, tmp_path,
                                                                                    capsys, monkeypatch):
    ev.main(["--model", str(tiny_model_dir), "--no-quantize", "--data", "builtin:totals", "--limit", "6",
             "--choice-probe", "--budgets", "64", "8", "--out", str(tmp_path / "c.json")])
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["budgets"] == [8, 64] and list(result["choices"]) == ["8", "64"]
    assert all(0 < v < 1 for c in result["choices"].values() for v in c.values())
    assert result["route_floor"]["64"] < result["route_floor"]["8"]  # a few-token budget has no route that short
    assert "| 64 |" in capsys.readouterr().out
    monkeypatch.setattr(ev.model_lib, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match="needs problems with written-out solutions.*builtin:totals"):
        ev.main(["--model", str(tiny_model_dir), "--no-quantize", "--limit", "3", "--choice-probe",
                 "--out", str(tmp_path / "d.json")])


def test_step_probe_counts_the_reasoner_s_steps_by_their_units_and_needs_written_out_solutions(tiny_model_dir,
                                                                                               tmp_path, capsys):
    ev.main(["--model", str(tiny_model_dir), "--no-quantize", "--data", "builtin:totals-edge", "--limit", "4",
             "--step-probe", "--budgets", "64", "8", "--out", str(tmp_path / "s.json")])
    result = json.loads((tmp_path / "s.json").read_text())
    problems = ev.data.builtin_problems("test", 4, family="totals-edge")
    steps = [ev.data.carry_kind(int(m[1]), int(m[2])) for p in problems
             for m in ev.data.ONE_NUMBER_STEP.finditer(p.solutions[0])]
    assert result["budgets"] == [8, 64] and list(result["steps"]) == ["8", "64"]
    for counts in result["steps"].values():
        assert {kind: total for kind, (_, total) in counts.items()} == {k: steps.count(k) for k in ev.data.CARRY_KINDS}
        assert all(0 <= right <= total for right, total in counts.values())
    assert "| 64 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--step-probe needs problems with written-out solutions"):
        ev.main(["--model", str(tiny_model_dir), "--no-quantize", "--limit", "3", "--step-probe",
                 "--out", str(tmp_path / "d.json")])


def test_one_evaluation_writes_a_result_at_a_time(tiny_model_dir, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "e.json"
    holder = subprocess.Popen(  # another eval.py writing the same --out, as far as the lock can tell
        [sys.executable, "-c", "import pathlib, sys, time, runs\nwith runs.exclusive(pathlib.Path(sys.argv[1]), 'x'):\n"
         "    print('held', flush=True); time.sleep(120)", str(tmp_path / ".e.json.lock")],
        stdout=subprocess.PIPE, text=True, cwd=Path(runs.__file__).parent)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit, match=rf"^error: --out {out} is in use by another process \(pid {holder.pid}\)"):
            ev.main(args_for(tiny_model_dir, out))
        assert not out.exists() and not out.with_suffix(".records.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    ev.main(args_for(tiny_model_dir, out))  # the lock of a process that died does not block
    assert len(json.loads(out.read_text())["budgets"]) == 3 and not (tmp_path / ".e.json.lock").exists()


def test_a_deleted_records_file_is_noticed_and_its_budgets_evaluated_again(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "e.json"
    ev.main(args_for(tiny_model_dir, out))
    records = out.with_suffix(".records.jsonl")
    lines = records.read_text().splitlines()
    records.write_text("".join(line + "\n" for line in lines if json.loads(line)["budget"] != 8))  # budget 8's lost
    ev.main(args_for(tiny_model_dir, out))
    assert "lacks the responses of budget 8: evaluating it again" in capsys.readouterr().err
    assert sorted(records.read_text().splitlines()) == sorted(lines)  # the same seed: the same responses
    records.unlink()
    ev.main(args_for(tiny_model_dir, out))
    assert len(records.read_text().splitlines()) == len(lines)


# -----------------------------------------------------------------------------
# what an evaluation writes never takes the place of a user's file


def test_the_lock_of_an_evaluation_is_never_a_file_of_the_user_s(tiny_model_dir, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "poetry.lock").write_text("keep me")  # --out poetry.json: its neighbour is not its lock
    ev.main(args_for(tiny_model_dir, project / "poetry.json", "--budgets", "4"))
    assert (project / "poetry.lock").read_text() == "keep me"
    assert sorted(p.name for p in project.iterdir()) == ["poetry.json", "poetry.lock", "poetry.records.jsonl"]


def test_responses_without_their_result_are_kept_unless_replace(tiny_model_dir, tmp_path):
    records = tmp_path / "e.records.jsonl"
    records.write_text('{"problem": 0, "budget": 4, "n_y": 3, "correct": true, "text": "mine"}\n')
    with pytest.raises(SystemExit, match=rf"^error: {records} exists without e.json: pass --replace to write over it, "
                       r"or another --out$"):
        ev.main(args_for(tiny_model_dir, tmp_path / "e.json", "--budgets", "4"))
    assert "mine" in records.read_text()
    ev.main(args_for(tiny_model_dir, tmp_path / "e.json", "--budgets", "4", "--replace"))
    assert "mine" not in records.read_text() and (tmp_path / "e.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--out", "{tmp}/notes.txt"], "--out writes a .json file: give a name ending in .json, not '{tmp}/notes.txt'"),
    (["--out", "{tmp}/taken.json", "--stop-probe", "{tmp}/r.jsonl"], "{tmp}/taken.json exists: pass --replace"),
    (["--compare", "{tmp}/taken.json", "--plot", "{tmp}/fig.png"], "{tmp}/fig.png exists: pass --replace"),
    (["--compare", "{tmp}/taken.json", "--plot", "{tmp}/fig.txt"], "--plot writes a .png file"),
])
def test_an_output_must_fit_its_format_and_an_existing_one_is_kept(argv, message, tmp_path, monkeypatch):
    monkeypatch.setattr(model_lib, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for name in ("notes.txt", "taken.json", "fig.png"):
        (tmp_path / name).write_text("mine")
    with pytest.raises(SystemExit) as info:
        ev.main([a.format(tmp=tmp_path) for a in argv])
    assert str(info.value).startswith("error: " + message.format(tmp=tmp_path)) and "\n" not in str(info.value)
    assert all((tmp_path / name).read_text() == "mine" for name in ("notes.txt", "taken.json", "fig.png"))


@pytest.mark.parametrize("record, said", [({"problem": "0"}, "'0'"), ({}, "'missing'"), ({"problem": -5}, "-5"),
                                          ({"problem": -1}, "-1"), ({"problem": 3}, "3"), ({"problem": True}, "True")])
def test_stop_probe_records_must_name_one_of_the_problems(record, said, tiny_model_dir, tmp_path, monkeypatch):
    records = tmp_path / "r.records.jsonl"
    good = {"problem": 0, "budget": 4, "n_y": 9, "correct": False, "text": "1 2 3 4 5 6 7 8 9"}
    records.write_text(json.dumps(good) + "\n" + json.dumps({**{k: v for k, v in good.items() if k != "problem"},
                                                              **record}) + "\n")
    monkeypatch.setattr(model_lib, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as info:  # -1 would pair the text with the last problem, silently
        ev.main(["--model", str(tiny_model_dir), "--no-quantize", "--limit", "3", "--stop-probe", str(records),
                 "--budgets", "2", "--out", str(tmp_path / "p.json")])
    assert str(info.value) == (f"error: {records}: response 2 has problem {said}, not an index of the 3 problems of "
                               f"--data builtin --limit 3: give the records of an evaluation of the same problems")


@pytest.mark.parametrize("line, said", [({"step": "3", "reward_mean": 0.5}, "step '3'"),
                                        ({"reward_mean": 0.5}, "step None"),
                                        ({"step": 0, "reward_mean": "high"}, "reward_mean 'high'")])
def test_curves_of_a_damaged_metrics_log_are_one_line(line, said, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps({"step": 0, "reward_mean": 0.1}) + "\n"
                                                    + json.dumps(line) + "\n")
    with pytest.raises(SystemExit) as info:
        ev.main(["--curves", str(tmp_path / "run")])
    assert str(info.value) == (f"error: {tmp_path / 'run' / 'metrics.jsonl'} is damaged: its line 2 has {said}, not a "
                               f"number; restore it from the run, or remove that line")


def test_the_config_of_the_run_an_adapter_came_from_must_be_settings(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json is not a JSON object of settings: restore the run"):
        ev.train_config(str(tmp_path / "run"))


def test_a_checkpoint_s_config_says_the_steps_it_had_taken_not_the_run_s_plan(tmp_path):
    adapter = tmp_path / "run" / "checkpoints" / "step-000020" / "adapter"
    adapter.mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text(json.dumps(dict(steps=40, alpha=0.02)))
    assert ev.train_config(str(adapter)) == dict(steps=20, alpha=0.02)
    assert ev.train_config(str(tmp_path / "run")) == dict(steps=40, alpha=0.02)  # the run itself: its plan


def test_a_budget_given_twice_is_evaluated_once_and_a_rerun_redoes_nothing(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "e.json"
    argv = ["--model", str(tiny_model_dir), "--no-quantize", "--limit", "2", "--samples", "2", "--budgets", "4", "4",
            "--out", str(out)]
    ev.main(argv)
    assert [b["budget"] for b in json.loads(out.read_text())["budgets"]] == [4]
    assert len(out.with_suffix(".records.jsonl").read_text().splitlines()) == 2 * 2
    capsys.readouterr()
    ev.main(argv)
    assert "every budget is already done" in capsys.readouterr().out


def test_a_failed_evaluation_leaves_no_records_file(tiny_model_dir, tmp_path, monkeypatch):
    def fails(*args, **kwargs):
        raise model_lib.ModelError("cannot load it")

    monkeypatch.setattr(model_lib, "load_model", fails)
    out = tmp_path / "e.json"
    with pytest.raises(SystemExit, match="cannot load it"):
        ev.main(args_for(tiny_model_dir, out))
    assert not out.exists() and not out.with_suffix(".records.jsonl").exists()
