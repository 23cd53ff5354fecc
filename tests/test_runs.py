"""Run management (runs.py): logs, and the settings a run directory holds."""

import dataclasses
import errno
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import model as model_lib
import runs
import train
from tests.conftest import read_metrics, tiny_config


def test_a_line_cut_short_by_a_crash_is_dropped_from_a_log(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "rew')
    assert runs.read_jsonl(log) == [{"step": 0}, {"step": 1}]
    assert "dropped a damaged line" in capsys.readouterr().err
    assert runs.read_jsonl(tmp_path / "missing.jsonl") == []


def test_a_run_from_before_a_setting_was_removed_resumes_only_if_it_left_it_off(tmp_path):
    # as older runs wrote them
    saved = dict(dataclasses.asdict(train.Config()), budget_marker=0, warmup_steps=0, budget_in="user")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(saved))
    assert runs.saved_config(tmp_path / "old", train.Config) == dataclasses.asdict(train.Config())
    (tmp_path / "marked").mkdir()
    (tmp_path / "marked" / "config.json").write_text(json.dumps({**saved, "budget_marker": 3}))
    with pytest.raises(ValueError, match=r"settings this train.py does not know \(budget_marker\)"):
        runs.saved_config(tmp_path / "marked", train.Config)


# -----------------------------------------------------------------------------
# one process per run, failed starts, changed data, unwritable places


def test_a_run_is_trained_by_one_process_at_a_time_and_a_crash_frees_it(learnable_model_dir, tmp_path):
    cfg, run = tiny_config(learnable_model_dir, steps=2), tmp_path / "run"
    holder = subprocess.Popen(  # another train.py on the same run, as far as the lock can tell
        [sys.executable, "-c", "import pathlib, sys, time, runs\n"
         "with runs.exclusive(pathlib.Path(sys.argv[1]), 'run'):\n"
         "    print('held', flush=True); time.sleep(120)", str(run / runs.LOCK)],
        stdout=subprocess.PIPE, text=True, cwd=Path(runs.__file__).parent)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=rf"^run {run} is in use by another process \(pid {holder.pid}\): wait for "
                           r"it to finish or stop it$"):
            train.train(cfg, run)
        assert not (run / "metrics.jsonl").exists()
    finally:
        holder.kill()  # a crash: its lock file stays behind, its lock does not
        holder.wait()
    assert (run / runs.LOCK).exists()
    train.train(cfg, run)
    assert [m["step"] for m in read_metrics(run)] == [0, 1] and not (run / runs.LOCK).exists()


def test_a_start_that_fails_leaves_nothing_in_the_way_of_the_corrected_command(learnable_model_dir, tmp_path,
                                                                                monkeypatch):
    argv = ["--preset", "chat", "--model", str(learnable_model_dir), "--no-quantize", "--out-dir", str(tmp_path),
            "--run-name", "mine",
            "--steps", "1", "--prompts-per-step", "2", "--max-new-tokens", "8", "--n-min", "4", "--n-max", "8"]
    real_load = model_lib.load_model

    def fails(*args, **kwargs):
        raise model_lib.ModelError("cannot load it")

    monkeypatch.setattr(model_lib, "load_model", fails)
    with pytest.raises(SystemExit, match="cannot load it"):
        train.main(argv + ["--group-size", "3"])
    assert not (tmp_path / "mine").exists()
    monkeypatch.setattr(model_lib, "load_model", real_load)
    train.main(argv + ["--group-size", "4"])  # not "runs/mine holds a run with other settings"
    assert [m["step"] for m in read_metrics(tmp_path / "mine")] == [0]


def test_a_run_is_not_resumed_on_problems_that_changed(learnable_model_dir, tmp_path):
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"problem": f"{i}+1?", "answer": i + 1}) + "\n" for i in range(4)))
    cfg, run = tiny_config(learnable_model_dir, steps=2, save_every=1, data=str(problems)), tmp_path / "run"
    train.train(cfg, run)
    original = problems.read_text()
    problems.write_text(original.replace('"answer": 2', '"answer": 3'))  # one answer corrected
    longer = dataclasses.replace(cfg, steps=3)
    with pytest.raises(ValueError, match=r"^the problems of --data .*problems.jsonl changed since "
                       r".*run was checkpointed \(4 problems then, 4 now, or their text\): restore them"):
        train.train(longer, run, resume=True)
    assert [m["step"] for m in read_metrics(run)] == [0, 1]  # nothing lost
    problems.write_text(original)
    train.train(longer, run, resume=True)
    assert [m["step"] for m in read_metrics(run)] == [0, 1, 2]


def test_an_unwritable_out_dir_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(model_lib, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(tempfile, "TemporaryFile", denied)  # what a read-only directory answers
    with pytest.raises(SystemExit, match=rf"^error: --out-dir: cannot write to {tmp_path} "
                       r"\(Permission denied\): choose a writable place$"):
        train.main(["--out-dir", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_mid_run_is_one_line_and_keeps_the_last_checkpoint(learnable_model_dir, tmp_path, monkeypatch):
    argv = ["--preset", "chat", "--model", str(learnable_model_dir), "--no-quantize", "--out-dir", str(tmp_path),
            "--run-name", "r",
            "--steps", "3", "--save-every", "1", "--prompts-per-step", "2", "--group-size", "2",
            "--max-new-tokens", "8", "--n-min", "4", "--n-max", "8"]
    real_append = runs.append_jsonl

    def full(path, record):
        if record.get("step") == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_append(path, record)

    monkeypatch.setattr(runs, "append_jsonl", full)
    with pytest.raises(SystemExit, match=r"^error: cannot write .*metrics.jsonl \(No space left on device\): the run's "
                       r"last checkpoint is kept; fix it, then the same command continues$"):
        train.main(argv)
    assert runs.latest_checkpoint(tmp_path / "r")[0].name == "step-000002"


# -----------------------------------------------------------------------------
# files a run reads back: never unpickled, each checked; names and places that stay where they are asked


class Payload:
    """What a state.pt from someone else may hold: unpickling it writes a file (it could run anything)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('ran')",)


@pytest.mark.parametrize("how", ["a bare pickle", "a torch.save zip with one object more"])
def test_a_checkpoint_that_would_run_code_is_refused_and_never_runs_it(learnable_model_dir, tmp_path, monkeypatch, how):
    import pickle

    import torch

    cfg = tiny_config(learnable_model_dir, steps=1, prompts_per_step=2, group_size=2, max_new_tokens=8)
    run = train.train(cfg, tmp_path / "run")
    state_file, marker = run / "checkpoints" / "step-000001" / "state.pt", tmp_path / "ran"
    if how == "a bare pickle":
        state_file.write_bytes(pickle.dumps({"step": 1, "x": Payload(marker)}))
    else:  # everything a resume needs is there, and trains on normally if the extra object is unpickled
        torch.save({**torch.load(state_file, weights_only=True), "extra": Payload(marker)}, state_file)
    monkeypatch.setattr(model_lib, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    try:
        with pytest.raises(SystemExit) as info:
            train.main(["--resume", str(run), "--steps", "2"])
    finally:
        assert not marker.exists()  # the payload never ran, whatever happened after
    assert re.match(rf"^error: {state_file} holds more than tensors and numbers \(.+\): train.py never writes that, "
                    rf"so it is not loaded; delete {state_file.parent} to resume from the checkpoint before it$",
                    str(info.value)), str(info.value)


def test_a_checkpoint_without_its_rng_state_is_damaged_and_said_before_the_model_loads(learnable_model_dir, tmp_path,
                                                                                         monkeypatch, capsys):
    import torch

    cfg = tiny_config(learnable_model_dir, steps=1, prompts_per_step=2, group_size=2, max_new_tokens=8)
    run = train.train(cfg, tmp_path / "run")
    state_file = run / "checkpoints" / "step-000001" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    del state["torch_rng"]
    torch.save(state, state_file)
    monkeypatch.setattr(model_lib, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match=rf"^error: no checkpoint of {run} can be read: delete"):
        train.main(["--resume", str(run), "--steps", "2"])
    assert "state.pt has no valid torch_rng" in capsys.readouterr().err


@pytest.mark.parametrize("name, problem", [("../../escaped", "it holds a path separator"),
                                           ("{tmp}/absolute", "it holds a path separator"),
                                           ("..", "it starts with a dot"), ("", "it is empty"),
                                           ("a\tb", "it holds a control character")])
def test_a_run_name_is_a_name_never_a_path(name, problem, tmp_path, monkeypatch):
    monkeypatch.setattr(model_lib, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out_dir = tmp_path / "a" / "runs"
    name = name.format(tmp=tmp_path)
    with pytest.raises(SystemExit) as info:
        train.main(["--out-dir", str(out_dir), "--run-name", name])
    assert str(info.value) == (f"error: --run-name {name!r} is not a name ({problem}): give a plain name such as "
                               f"'alpha-0.001'; --out-dir says where runs go")
    assert list(tmp_path.rglob("*")) == []  # nothing written, inside --out-dir or out of it


def test_out_dir_under_home_is_under_home_not_a_directory_named_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cfg, run_dir, resume = train.parse_args(["--out-dir", "~/runs"])
    assert run_dir == tmp_path / "home" / "runs" / "default" and cfg.out_dir == str(tmp_path / "home" / "runs")
    assert not (tmp_path / "~").exists()


def test_a_dangling_link_as_out_dir_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(model_lib, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "runs").symlink_to(tmp_path / "gone")
    with pytest.raises(SystemExit, match=rf"^error: --out-dir: cannot write to {tmp_path / 'runs'} \(a link to "
                       rf"{tmp_path / 'gone'}, which does not exist\): choose a writable place$"):
        train.main(["--out-dir", str(tmp_path / "runs")])


def test_a_write_that_fails_before_any_checkpoint_does_not_claim_one_is_kept(learnable_model_dir, tmp_path,
                                                                              monkeypatch):
    def full(path, record):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(runs, "append_jsonl", full)
    with pytest.raises(SystemExit, match=r"^error: cannot write .*metrics.jsonl \(No space left on device\): no "
                       r"checkpoint was saved yet; fix it, then the same command continues$"):
        train.main(["--preset", "chat", "--model", str(learnable_model_dir), "--no-quantize",
                    "--out-dir", str(tmp_path), "--run-name", "r",
                    "--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "8",
                    "--n-min", "4", "--n-max", "8"])


def test_a_kill_while_the_model_loads_leaves_nothing_in_the_way_of_the_corrected_command(learnable_model_dir, tmp_path):
    import signal

    argv = ["--preset", "chat", "--model", str(learnable_model_dir), "--no-quantize", "--out-dir", str(tmp_path),
            "--run-name", "mine",
            "--steps", "1"]
    script = ("import sys, time, model, train\n"
              "def slow(*args, **kwargs):\n    print('loading', flush=True)\n    time.sleep(60)\n"
              "model.load_model = slow\ntrain.main(sys.argv[1:])")
    starting = subprocess.Popen([sys.executable, "-c", script, *argv, "--group-size", "3"], stdout=subprocess.PIPE,
                                text=True, cwd=Path(runs.__file__).parent)
    try:
        assert any(line.strip() == "loading" for line in starting.stdout)
        assert (tmp_path / "mine" / "config.json").exists()
        starting.send_signal(signal.SIGTERM)
        starting.wait(timeout=30)
    finally:
        starting.kill()
        starting.wait()
    assert not (tmp_path / "mine").exists()
    cfg, run_dir, resume = train.parse_args(argv + ["--group-size", "4"])  # not "holds a run with other settings"
    assert run_dir == tmp_path / "mine" and not resume and cfg.group_size == 4


def test_a_start_killed_outright_is_not_taken_for_a_run(tmp_path):
    cfg, run_dir, _ = train.parse_args(["--out-dir", str(tmp_path), "--run-name", "mine", "--group-size", "3"])
    run_dir.mkdir()  # what a kill -9 while the model loads leaves: the first files, no step
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    (run_dir / "metrics.jsonl").write_text("")
    cfg, again, resume = train.parse_args(["--out-dir", str(tmp_path), "--run-name", "mine", "--group-size", "4"])
    assert again == run_dir and not resume and cfg.group_size == 4


def test_a_log_line_whose_step_is_not_a_number_is_dropped_on_resume(learnable_model_dir, tmp_path):
    cfg = tiny_config(learnable_model_dir, steps=1, prompts_per_step=2, group_size=2, max_new_tokens=8)
    run = train.train(cfg, tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": "1", "reward_mean": 0}\n')
    train.train(dataclasses.replace(cfg, steps=2), run, resume=True)
    assert [m["step"] for m in read_metrics(run)] == [0, 1]


def test_an_optimizer_state_that_does_not_fit_its_adapter_is_one_line(learnable_model_dir, tmp_path):
    import torch

    cfg = tiny_config(learnable_model_dir, steps=1, prompts_per_step=2, group_size=2, max_new_tokens=8)
    run = train.train(cfg, tmp_path / "run")
    state_file = run / "checkpoints" / "step-000001" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    state["optimizer"]["param_groups"][0]["params"] = [0]  # one weight where the adapter has many
    torch.save(state, state_file)
    with pytest.raises(SystemExit) as info:
        train.main(["--resume", str(run), "--steps", "2"])
    assert re.match(rf"^error: the optimizer or RNG state of {state_file.parent} does not fit its adapter "
                    r"\(ValueError: "
                    r".+\): delete that checkpoint to resume from the one before it$", str(info.value)), str(info.value)


# Ctrl-C while the libraries load, a finished run, the embedded model by its name


@pytest.mark.parametrize("script", ["train.py", "eval.py", "sample.py", "bench.py", "scale_out.py"])
def test_ctrl_c_while_the_libraries_load_quits_quietly(script):
    import signal

    process = subprocess.Popen([sys.executable, "-X", "importtime", script, "--help"], cwd=Path(runs.__file__).parent,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:  # a line per module imported: wait until torch or sympy has begun to load
        if "torch" in line or "sympy" in line:
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err and "usage" not in out, err[-300:]


def test_a_finished_run_is_not_continued_with_fewer_steps(learnable_model_dir, tmp_path, monkeypatch):
    run = train.train(tiny_config(learnable_model_dir, steps=2, save_every=1), tmp_path / "run")
    before = (run / "config.json").read_text()
    monkeypatch.setattr(model_lib, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as info:
        train.main(["--resume", str(run), "--steps", "1"])
    assert str(info.value) == (f"error: {run} has done 2 steps: --steps 1 would not continue it; pass --steps above 2 "
                               f"to train it further")
    assert (run / "config.json").read_text() == before


def test_the_embedded_model_by_its_name_is_the_chat_model():
    cfg, run_dir, _ = train.parse_args(["--preset", "chat", "--model", "embedded"])
    assert cfg.model is None and cfg.init_adapter == str(train.STOP_ADAPTER) and run_dir.name == "chat"
    cfg, run_dir, _ = train.parse_args(["--model", "embedded"])  # in place of the default's reasoner: its own run
    assert cfg.model is None and cfg.init_adapter == str(train.STOP_ADAPTER)
    assert run_dir.name == "default-model-embedded"
    cfg, run_dir, _ = train.parse_args(["--preset", "l1-exact", "--model", "embedded"])
    assert cfg.model is None and cfg.init_adapter == str(train.STOP_ADAPTER)
    assert run_dir.name == "l1-exact-model-embedded"
