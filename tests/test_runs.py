"""Run management (runs.py): logs, and the settings a run directory holds."""

import dataclasses
import json

import pytest

import runs
import train


def test_a_line_cut_short_by_a_crash_is_dropped_from_a_log(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "rew')
    assert runs.read_jsonl(log) == [{"step": 0}, {"step": 1}]
    assert "dropped a damaged line" in capsys.readouterr().err
    assert runs.read_jsonl(tmp_path / "missing.jsonl") == []


def test_a_run_from_before_a_setting_was_removed_resumes_only_if_it_left_it_off(tmp_path):
    saved = dict(dataclasses.asdict(train.Config()), budget_marker=0, warmup_steps=0, budget_in="user")  # as older runs wrote them
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(saved))
    assert runs.saved_config(tmp_path / "old", train.Config) == dataclasses.asdict(train.Config())
    (tmp_path / "marked").mkdir()
    (tmp_path / "marked" / "config.json").write_text(json.dumps({**saved, "budget_marker": 3}))
    with pytest.raises(ValueError, match=r"settings this train.py does not know \(budget_marker\)"):
        runs.saved_config(tmp_path / "marked", train.Config)
