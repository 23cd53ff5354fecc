"""
Run management for train.py: flags from its Config, the checks made before anything loads, run names,
resume rules, checkpoints, logs, and Ctrl-C. None of it is the algorithm; all of it keeps a long run safe.

A run is a directory, runs/<name>: config.json (the settings), metrics.jsonl (one line per step),
samples.jsonl (example responses) and checkpoints/step-NNNNNN (adapter, optimizer, RNG). The name comes
from the preset and the flags that change what is trained, so the same command again continues its run.
"""

import argparse
import dataclasses
import inspect
import json
import math
import re
import shutil
import signal
import sys
import typing
import zlib
from pathlib import Path

import torch

import data
import model as model_lib
import sample

RESUMABLE = ("steps", "save_every", "keep_checkpoints", "sample_every", "max_bad_steps", "micro_batch_tokens",
             "rollout_batch", "rollout_copy", "gradient_checkpointing", "out_dir", "run_name")  # a resumed run may change
# these (its length, bookkeeping, memory and speed); any other setting would make it another run
REMOVED = {"budget_marker": 0, "budget_in": "user", "n_min_steps": 0, "ends_steps": 0, "warmup_steps": 0,
           "lora_dropout": 0.0}  # settings of older runs, gone since: a run that left them at these values resumes


def check_config(cfg) -> None:
    """Refuse a configuration that cannot run, before anything is loaded."""
    problems = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
    if problems:
        raise ValueError("; ".join(problems))
    if cfg.mode not in ("exact", "max", "mix"):
        problems.append(f"--mode must be exact, max or mix, not {cfg.mode!r}")
    if cfg.alpha is not None and cfg.alpha < 0:
        problems.append(f"--alpha must be >= 0, got {cfg.alpha}")
    if not 0 <= cfg.delta <= 1:
        problems.append(f"--delta must be in [0, 1], got {cfg.delta}")
    if cfg.group_size < 2:
        problems.append(f"--group-size must be >= 2 (advantages compare responses to the same prompt), got {cfg.group_size}")
    if cfg.targets_per_problem >= 1 and cfg.prompts_per_step % cfg.targets_per_problem:
        problems.append(f"--targets-per-problem must divide --prompts-per-step ({cfg.prompts_per_step}), "
                        f"got {cfg.targets_per_problem}")
    if cfg.loss_norm not in ("token", "grpo", "dr_grpo"):
        problems.append(f"--loss-norm must be token, grpo or dr_grpo, not {cfg.loss_norm!r}")
    for name in ("prompts_per_step", "epochs", "steps", "micro_batch_tokens", "rollout_batch", "max_new_tokens",
                 "save_every", "keep_checkpoints", "sample_every", "max_bad_steps", "lora_rank", "targets_per_problem"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("beta", "clip", "lr", "grad_clip", "length_steps"):
        if getattr(cfg, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.init_adapter is not None:
        try:
            base = model_lib.adapter_base(cfg.init_adapter)
            if cfg.model is not None and cfg.model != base:
                problems.append(f"--init-adapter {cfg.init_adapter} was trained on {base}, not on --model {cfg.model}")
        except model_lib.ModelError as e:
            problems.append(f"--init-adapter: {e}")
    try:
        data.check_target_range(cfg.n_min, cfg.n_max)
        sample.check_sampling_args(cfg.max_new_tokens, cfg.temperature, 1.0)
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise ValueError("; ".join(problems))


# -----------------------------------------------------------------------------
# flags, run names and the resume rules


def parse_args(argv, config_class, presets: dict, description: str, first_stage: Path):
    """(Config, run directory, resume?) from flags made from the Config fields (--group-size 8,
    --no-quantize, ...), a preset under them, or --resume. An unset --init-adapter on the embedded
    model is `first_stage`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", default="default", help=f"one of {', '.join(presets)}")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this run from its last checkpoint")
    comments = dict(re.findall(r"^    (\w+): .*?  # (.*)$", inspect.getsource(config_class), re.M))  # the knob's comment
    for f in dataclasses.fields(config_class):
        flag, help = "--" + f.name.replace("_", "-"), f"{comments[f.name]} (default: {f.default})"
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:  # int, float, str, or one of them | None
            kind = next(t for t in typing.get_args(f.type) or (f.type,) if t is not type(None))
            parser.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper(), help=help)
    args = parser.parse_args(argv)
    fields = dataclasses.fields(config_class)
    given = {f.name: getattr(args, f.name) for f in fields if getattr(args, f.name) is not None}

    if args.resume is not None:
        run_dir = Path(args.resume)
        saved = saved_config(run_dir, config_class)
        changed = sorted(k for k, v in given.items() if k not in RESUMABLE and v != saved.get(k))
        if changed:
            raise ValueError(f"--resume continues {run_dir} with its own settings: drop "
                             f"{', '.join('--' + k.replace('_', '-') for k in changed)}, or start a new run with "
                             f"--run-name (and --init-adapter {run_dir} to start from its weights)")
        cfg = config_class(**{**saved, **given})
        check_config(cfg)
        return cfg, run_dir, True
    if args.preset not in presets:
        raise ValueError(f"unknown preset {args.preset!r}: use one of {', '.join(presets)}")
    cfg = config_class(**{**presets[args.preset], **given})
    if cfg.init_adapter == "none":
        cfg.init_adapter = None
    elif cfg.init_adapter is None and cfg.model is None:  # the recipe: LCPO from the stop that reads N
        cfg.init_adapter = str(first_stage)
    check_config(cfg)
    cfg.run_name = cfg.run_name or run_name(args.preset, given)
    run_dir = Path(cfg.out_dir) / cfg.run_name
    if not (run_dir / "config.json").exists():
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ValueError(f"{run_dir} exists and is not a run (no config.json): pass another --run-name")
        return cfg, run_dir, False
    saved = saved_config(run_dir, config_class)
    changed = sorted(k for k in saved if k not in RESUMABLE and saved[k] != getattr(cfg, k))
    if changed:
        raise ValueError(f"{run_dir} holds a run with other settings ({', '.join(f'{k} {saved[k]!r}' for k in changed)})"
                         f": pass another --run-name for a new run, or --resume {run_dir} to continue that one")
    return cfg, run_dir, True  # the same command again: continue the run


def run_name(preset: str, given: dict) -> str:
    """A run's default name: the preset and the flags that change what is trained, so that the same
    command names the same run (and resumes it), and an ablation gets its own.

        >>> run_name("default", {}), run_name("default", {"alpha": 0.001, "steps": 50, "model": "Qwen/Qwen2.5-0.5B"})
        ('default', 'default-alpha-0.001-model-Qwen2.5-0.5B')
    """
    parts = [preset]
    for key, value in sorted(given.items()):
        if key not in RESUMABLE:
            if isinstance(value, bool):
                parts.append(key.replace("_", "-") if value else "no-" + key.replace("_", "-"))
            else:
                parts += [key.replace("_", "-"), Path(str(value)).name or str(value)]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts))
    return name if len(name) <= 100 else f"{name[:80]}-{zlib.crc32(name.encode()):08x}"


def saved_config(run_dir: Path, config_class) -> dict:
    """A run's config.json, checked against the settings this train.py knows."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a run directory (no config.json)")
    try:
        saved = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} cannot be read ({e}): it is damaged; restore it or start a new run") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} is not a train.py config (a JSON object of settings)")
    saved = {k: v for k, v in saved.items() if not (k in REMOVED and v == REMOVED[k])}
    unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(config_class)})
    if unknown:
        raise ValueError(f"{path} has settings this train.py does not know ({', '.join(unknown)}): it was written by "
                         f"another version; remove them from the file, or start a new run")
    return saved


# -----------------------------------------------------------------------------
# checkpoints and logs


def start(run_dir: Path, cfg, resume: bool) -> dict | None:
    """Open a run directory: the state of its newest readable checkpoint if it resumes (None: from step 0),
    its config written, and its logs cut back to the steps before that checkpoint (a resumed run redoes
    the rest)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint, state = None, None
    if resume:
        for staging in (run_dir / "checkpoints").glob(".step-*"):  # left by a kill mid-save
            shutil.rmtree(staging, ignore_errors=True)
        checkpoint, state = latest_checkpoint(run_dir)
        if checkpoint is None and any((run_dir / "checkpoints").glob("step-*")):
            raise ValueError(f"no checkpoint of {run_dir} can be read: delete {run_dir / 'checkpoints'} to start "
                             f"the run again")
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    start_step = state["step"] if state else 0
    for log in ("metrics.jsonl", "samples.jsonl"):
        path = run_dir / log
        kept = [r for r in read_jsonl(path) if r.get("step", math.inf) < start_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return None if state is None else dict(state, adapter=checkpoint / "adapter")


def save_checkpoint(run_dir: Path, step: int, model, optimizer, keep: int) -> None:
    """adapter + optimizer + RNG + step, written atomically; the newest `keep` are kept."""
    if not all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
        raise RuntimeError(f"the adapter's weights are not finite at step {step}: not saved (the checkpoints in "
                           f"{run_dir} are the last good ones)")
    path = run_dir / "checkpoints" / f"step-{step:06d}"
    with model_lib.atomic_dir(path) as staging:
        model_lib.save_adapter(model, staging / "adapter")
        torch.save({"optimizer": optimizer.state_dict(), "step": step, "torch_rng": torch.get_rng_state()},
                   staging / "state.pt")
    for old in sorted((run_dir / "checkpoints").glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> tuple[Path | None, dict | None]:
    """(directory, state) of the newest checkpoint that can be read, or (None, None); damaged ones (a crash
    mid-write, a full disk) are skipped, saying so."""
    for path in sorted((run_dir / "checkpoints").glob("step-*"), reverse=True):  # staging dirs start with ".": never listed
        try:
            model_lib.check_adapter(path / "adapter")
            state = torch.load(path / "state.pt", weights_only=False)
            state["step"]  # a state without its step is damaged too (KeyError)
            return path, state
        except Exception as e:  # torch.load fails in many ways (zip, pickle, EOF errors): any of them means damaged
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"note: checkpoint {path} cannot be read ({detail[:200]}): using the one before it", file=sys.stderr)
    return None, None


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """The records of a .jsonl log (train.py's metrics, eval.py's responses); a line cut short by a
    crash is dropped, with a note, so the run can go on."""
    records = []
    for line in Path(path).read_text().splitlines() if Path(path).exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif line.strip():
            print(f"note: dropped a damaged line of {path}", file=sys.stderr)
    return records


# -----------------------------------------------------------------------------
# Ctrl-C


class StopRequests:
    """While open, Ctrl-C or a kill asks the run to stop after the step in progress (`asked`); a second one
    quits at once (KeyboardInterrupt). The previous handlers come back on exit."""

    def __enter__(self):
        self.asked = False
        self.previous = {sig: signal.signal(sig, self.ask) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def ask(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        print("\nstopping after this step (press Ctrl-C again to quit without saving it)", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
