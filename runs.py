"""
Run management for train.py: flags from its Config, the checks made before anything loads, run names,
resume rules, checkpoints, a step's records (its timings, metrics and examples), logs, and Ctrl-C. None of it
is the algorithm; all of it keeps a long run safe.

A run is a directory, runs/<name>: config.json (the settings), metrics.jsonl (one line per step),
samples.jsonl (example responses) and checkpoints/step-NNNNNN (adapter, optimizer, RNG). The name comes
from the preset and the flags that change what is trained, so the same command again continues its run.
"""

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import inspect
import json
import math
import os
import pickle
import re
import shutil
import signal
import sys
import time
import typing
import warnings
import zlib
from collections import defaultdict
from pathlib import Path

import torch

import data
import model as model_lib
import sample

# what a resumed run may change (its length, bookkeeping, memory and speed); any other setting makes another run
RESUMABLE = ("steps", "save_every", "keep_checkpoints", "sample_every", "max_bad_steps", "micro_batch_tokens",
             "rollout_batch", "rollout_copy", "share_prompts", "gradient_checkpointing", "out_dir", "run_name")
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
    if not 0 <= cfg.seed < 2**32:
        problems.append(f"--seed must be in [0, 2**32), got {cfg.seed}")
    if cfg.targets_per_problem >= 1 and cfg.prompts_per_step % cfg.targets_per_problem:
        problems.append(f"--targets-per-problem must divide --prompts-per-step ({cfg.prompts_per_step}), "
                        f"got {cfg.targets_per_problem}")
    if cfg.loss_norm not in ("token", "grpo", "dr_grpo"):
        problems.append(f"--loss-norm must be token, grpo or dr_grpo, not {cfg.loss_norm!r}")
    for name in ("prompts_per_step", "epochs", "steps", "micro_batch_tokens", "rollout_batch", "max_new_tokens",
                 "save_every", "keep_checkpoints", "sample_every", "max_bad_steps", "lora_rank", "targets_per_problem"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("beta", "clip", "length_steps", "distill_steps", "route_steps"):
        if getattr(cfg, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if getattr(cfg, "route_steps", 0) > 0 and cfg.mode == "mix":
        problems.append("--route-steps teaches each prompt the route its mode asks for: use --mode exact (sampled "
                        "routes) or --mode max (written-out routes, L1-Max's stage), not mix")
    if getattr(cfg, "route_steps", 0) > 0 and cfg.init_adapter is not None and cfg.mode == "exact":
        problems.append(f"--route-steps learns from the model with its adapter off, which is not the model "
                        f"--init-adapter {cfg.init_adapter} makes: merge that adapter into its base "
                        f"(python -c \"import model; model.export_merged('ADAPTER', 'DIR')\"), then pass --model DIR "
                        f"--init-adapter none")
    if getattr(cfg, "keep_route", False) and cfg.mode != "max":
        problems.append(f"--keep-route keeps the Max route stage's loss (written-out routes within N) in LCPO-Max's "
                        f"steps: use it with --mode max, not {cfg.mode}")
    if getattr(cfg, "route_steps", 0) > 0 and (cfg.distill_steps or cfg.length_steps):
        problems.append("--route-steps learns from the model with its adapter off, not from what --distill-steps or "
                        "--length-steps train into the adapter: run them first, merge (model.export_merged), then "
                        "--route-steps on --model DIR --init-adapter none")
    if cfg.init_adapter is not None:
        try:
            base = model_lib.adapter_base(cfg.init_adapter)
            if cfg.model is not None and cfg.model != base:
                problems.append(f"--init-adapter {cfg.init_adapter} was trained on {base}, not on --model {cfg.model}")
        except model_lib.ModelError as e:
            problems.append(f"--init-adapter: {e}")
    try:
        data.check_target_range(cfg.n_min, cfg.n_max)
    except ValueError as e:
        problems.append(str(e))
    problems += trains_nothing(cfg)
    if problems:
        raise ValueError("; ".join(problems))


def trains_nothing(cfg) -> list[str]:
    """The settings under which a run would go through its steps and learn nothing, each with what to change.

    One rule: a step learns only from responses to a prompt whose rewards differ (their advantages), through
    a gradient that reaches the adapter's weights. Too few or identical responses, responses all cut by the
    cap, or a gradient scaled to nothing break it. At run time the same rule is kept by train_loop: a step
    whose gradient is zero is not an update, and a run of such steps stops."""
    why = []
    if cfg.group_size < 2:
        why.append(f"--group-size must be >= 2 (advantages compare responses to the same prompt), got {cfg.group_size}")
    if cfg.temperature < sample.MIN_TEMPERATURE:
        why.append(f"--temperature must be >= {sample.MIN_TEMPERATURE} to train, got {cfg.temperature}: below it the "
                   f"G responses to a prompt are the same and their advantages all 0, so nothing is learnt")
    if cfg.max_new_tokens < cfg.n_max:
        why.append(f"--max-new-tokens ({cfg.max_new_tokens}) is below the largest target --n-max ({cfg.n_max}): "
                   f"responses are cut before they can meet the longer targets (below --n-min every response is "
                   f"cut and none differs from its group): raise --max-new-tokens or lower --n-max")
    for name, meaning in (("lr", "the size of each update"), ("grad_clip", "the largest gradient norm, "
                          "0 scales every gradient to nothing: a large value clips nothing"),
                          ("lora_alpha", "the adapter's output is scaled by alpha / rank: 0 has no gradient")):
        if getattr(cfg, name) <= 0:
            why.append(f"--{name.replace('_', '-')} must be > 0 ({meaning}), got {getattr(cfg, name)}")
    return why


def check_writable(path: Path, flag: str) -> None:
    """Refuse, before any work, a place a run or a result cannot be written (model.check_writable's rule),
    naming the flag that gave it."""
    try:
        model_lib.check_writable(path)
    except OSError as e:
        raise ValueError(f"{flag}: cannot write to {e.filename} ({e.strerror}): choose a writable place") from None


def check_name(name: str, flag: str) -> None:
    """A run's name is one directory name: no separators, no "." or "..", nothing hidden, no control characters,
    not longer than a file system allows. So a run never lands outside --out-dir."""
    problem = ("it is empty" if not name else "it holds a path separator" if "/" in name or "\\" in name
               else "it starts with a dot" if name.startswith(".") else "it holds a control character"
               if any(ord(c) < 32 or ord(c) == 127 for c in name) else "it is too long"
               if len(name.encode(errors="replace")) > 255 else None)
    if problem:
        raise ValueError(f"{flag} {name!r} is not a name ({problem}): give a plain name such as 'alpha-0.001'; "
                         f"--out-dir says where runs go")


def output_file(value: str, flag: str, suffix: str) -> Path:
    """The rule for every file a tool writes as its result: ~ is the home directory, the name ends in the
    extension of what is written, and the place can be written (refused before any work otherwise)."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise ValueError(f"{flag} {value} is a directory: give a file name ending in {suffix}")
    if not path.name.lower().endswith(suffix) or path.name.lower() == suffix:
        raise ValueError(f"{flag} writes a {suffix} file: give a name ending in {suffix}, not {value!r}")
    check_writable(path.parent, flag)
    return path


def keep_existing(path: Path, flag: str, replace: bool) -> None:
    """An existing result is the user's until they say otherwise: refused unless --replace."""
    if not replace and (path.exists() or path.is_symlink()):
        raise ValueError(f"{path} exists: pass --replace to write over it, or give another {flag}")


def check_adapter_settings(cfg, given: dict) -> None:
    """An adapter to start from brings its own LoRA rank and alpha: a flag asking for others is refused, and
    the config records the adapter's (not the defaults, which would not be what is trained)."""
    rank, alpha = model_lib.adapter_lora(cfg.init_adapter)
    asked = {k: v for k, v in (("lora_rank", rank), ("lora_alpha", alpha)) if k in given and given[k] != v}
    if asked:
        raise ValueError(f"--init-adapter {cfg.init_adapter} has rank {rank} and alpha {alpha}: drop "
                         f"{', '.join('--' + k.replace('_', '-') for k in asked)} (they shape a new adapter), or "
                         f"start a new one with --init-adapter none")
    cfg.lora_rank, cfg.lora_alpha = rank, alpha


# -----------------------------------------------------------------------------
# flags, run names and the resume rules


def parse_args(argv, config_class, presets: dict, description: str, first_stages: dict):
    """(Config, run directory, resume?) from flags made from the Config fields (--group-size 8,
    --no-quantize, ...), a preset under them, or --resume. An unset --init-adapter on a model of
    `first_stages` (name: adapter; None: the embedded model) is that model's."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", default="default", help=f"one of {', '.join(presets)}")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this run from its last checkpoint")
    # each knob's help is its comment in the Config class
    comments = dict(re.findall(r"^    (\w+): .*?  # (.*)$", inspect.getsource(config_class), re.M))
    for f in dataclasses.fields(config_class):
        default = presets.get("default", {}).get(f.name, f.default)
        flag, help = "--" + f.name.replace("_", "-"), f"{comments[f.name]} (default: {default})"
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:  # int, float, str, or one of them | None
            kind = next(t for t in typing.get_args(f.type) or (f.type,) if t is not type(None))
            parser.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper(), help=help)
    args = parser.parse_args(argv)
    fields = dataclasses.fields(config_class)
    given = {f.name: getattr(args, f.name) for f in fields if getattr(args, f.name) is not None}
    if given.get("model") == "embedded":  # the default model by its name: the same as leaving --model out
        given["model"] = None
        if not presets.get(args.preset, {}).get("model"):
            del given["model"]

    if args.resume is not None:
        run_dir = Path(args.resume).expanduser()
        saved = saved_config(run_dir, config_class)
        changed = sorted(k for k, v in given.items() if k not in RESUMABLE and v != saved.get(k))
        if changed:
            raise ValueError(f"--resume continues {run_dir} with its own settings: drop "
                             f"{', '.join('--' + k.replace('_', '-') for k in changed)}, or start a new run with "
                             f"--run-name (and --init-adapter {run_dir} to start from its weights)")
        cfg = config_class(**{**saved, **given})
        check_config(cfg)
        check_writable(run_dir, "--resume")
        check_steps_left(cfg, run_dir)
        return cfg, run_dir, True
    if args.preset not in presets:
        raise ValueError(f"unknown preset {args.preset!r}: use one of {', '.join(presets)}")
    cfg = config_class(**{**presets[args.preset], **given})
    cfg.out_dir = str(Path(cfg.out_dir).expanduser())
    fresh = cfg.distill_steps or getattr(cfg, "route_steps", 0)  # distillation and the route stage start anew
    if cfg.init_adapter == "none":
        cfg.init_adapter = None
    elif cfg.init_adapter is None and cfg.model in first_stages and not fresh:  # the recipe: LCPO from the model's
        cfg.init_adapter = str(first_stages[cfg.model])  # shipped first stage
    check_config(cfg)
    if cfg.init_adapter is not None:
        check_adapter_settings(cfg, given)
    if cfg.run_name is not None:  # a resumed run keeps the name its directory has
        check_name(cfg.run_name, "--run-name")
    cfg.run_name = cfg.run_name or run_name(args.preset, given)
    run_dir = Path(cfg.out_dir) / cfg.run_name
    check_writable(run_dir, "--out-dir")
    if not started(run_dir):
        if run_dir.exists() and any(p.name not in (LOCK, *STARTED) for p in run_dir.iterdir()):
            raise ValueError(f"{run_dir} exists and is not a run (no config.json): pass another --run-name")
        return cfg, run_dir, False
    saved = saved_config(run_dir, config_class)
    changed = sorted(k for k in saved if k not in RESUMABLE and saved[k] != getattr(cfg, k))
    if changed:
        settings = ", ".join(f"{k} {saved[k]!r}" for k in changed)
        raise ValueError(f"{run_dir} holds a run with other settings ({settings}): pass another --run-name for a "
                         f"new run, or --resume {run_dir} to continue that one")
    check_steps_left(cfg, run_dir)
    return cfg, run_dir, True  # the same command again: continue the run


def checkpoint_step(path: Path) -> int | None:
    """The steps a checkpoint directory (checkpoints/step-000040) had taken; None for any other name."""
    step = path.name.removeprefix("step-")
    return int(step) if path.name.startswith("step-") and step.isdigit() else None


def check_steps_left(cfg, run_dir: Path) -> None:
    """Refuse to continue a run with fewer --steps than its newest checkpoint has done: that would rewrite its
    config to a length it has passed, for nothing."""
    saved = sorted((run_dir / "checkpoints").glob("step-*"))
    done = (checkpoint_step(saved[-1]) if saved else None) or 0
    if cfg.steps < done:
        raise ValueError(f"{run_dir} has done {done} steps: --steps {cfg.steps} would not continue it; pass --steps "
                         f"above {done} to train it further")


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
                shown = "embedded" if value is None else Path(str(value)).name or str(value)  # None: --model embedded
                parts += [key.replace("_", "-"), shown]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts))
    return name if len(name) <= 100 else f"{name[:80]}-{zlib.crc32(name.encode()):08x}"


STARTED = ("config.json", "metrics.jsonl", "samples.jsonl", "checkpoints")  # what a start writes before step 0


def started(run_dir: Path) -> bool:
    """A run has started once it has logged a step or saved a checkpoint: a start that died before that (a
    kill while the model loaded) left only its first files, and the next command starts the run anew."""
    return bool(read_jsonl(run_dir / "metrics.jsonl") or any(run_dir.glob("checkpoints/step-*")))


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
    for f in dataclasses.fields(config_class):
        if f.name in saved:
            saved[f.name] = setting(path, f, saved[f.name])
    return saved


def setting(path: Path, field: dataclasses.Field, value):
    """A config.json value as its Config field takes it (an int field's 2.0 is 2), or one line naming it."""
    kinds = typing.get_args(field.type) or (field.type,)
    if value is None and type(None) in kinds or type(value) in (bool, str) and type(value) in kinds:
        return value
    if type(value) in (int, float) and math.isfinite(value):
        if int in kinds and float(value).is_integer():
            return int(value)
        if float in kinds:
            return float(value)
    wanted = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
    raise ValueError(f"{path} is damaged: its {field.name} is {value!r}, not {wanted}; correct it (the default is "
                     f"{field.default!r}), or start a new run")


# -----------------------------------------------------------------------------
# a step's records, apart from the algorithm: its timings and sums, its metrics, its examples


class StepLog:
    """The seconds of each phase of a step (`lap`), sums over its micro-batches (`add`), and its progress bar
    (a tqdm bar, or None), which counts the micro-batches."""

    def __init__(self, device, progress=None, micro_batches: int = 0):
        self.device, self.progress, self.last = device, progress, time.perf_counter()
        self.seconds, self.sums = defaultdict(float), defaultdict(float)
        if progress is not None:
            progress.unit = "micro-batch"
            progress.reset(total=micro_batches)

    def lap(self, phase: str) -> None:
        """The end of a phase (and of the device's work queued in it): its seconds add to the phase's."""
        model_lib.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[phase] += now - self.last
        self.last = now

    def add(self, **values: torch.Tensor) -> None:
        """A micro-batch's values, each summed into its own sum; the bar moves on by one micro-batch."""
        for key, value in values.items():
            self.sums[key] += value.sum().item()
        if self.progress is not None:
            self.progress.update()


def length_slope(n_gold: list[int], n_y: list[int]) -> float | None:
    """Least-squares slope of the response length on the target: 1 follows N, 0 ignores it.

    The number that says whether LCPO is working (the length error also falls for a model that
    learns one middle length). None when every target is the same.

        >>> length_slope([32, 64, 128], [40, 72, 136]), length_slope([32, 128], [60, 60])
        (1.0, 0.0)
        >>> length_slope([32, 32], [9, 70]) is None
        True
    """
    mean_g, mean_y = sum(n_gold) / len(n_gold), sum(n_y) / len(n_y)
    var_g = sum((g - mean_g) ** 2 for g in n_gold)
    return sum((g - mean_g) * (y - mean_y) for g, y in zip(n_gold, n_y)) / var_g if var_g else None


def rollout_metrics(batch: sample.Batch) -> dict:
    """What a step's rollouts did: reward, accuracy, and how their lengths follow their targets (n_gold, mode);
    within_budget is over the Max prompts' responses."""
    rewards = torch.tensor(batch.rewards, dtype=torch.float32)
    n_y, n_gold = [r.n_y for r in batch.rollouts], [n for n, _ in batch.targets]
    under = [y <= g for y, (g, mode) in zip(n_y, batch.targets) if mode == "max"]
    sampled = [lp for r in batch.rollouts for lp in r.logprobs if math.isfinite(lp)]  # the model's own tokens
    return dict(reward_mean=rewards.mean().item(), reward_std=rewards.std().item(),
                accuracy=sum(batch.correct) / len(batch.correct), mean_n_gold=sum(n_gold) / len(n_gold),
                mean_n_y=sum(n_y) / len(n_y), length_error=sum(abs(y - g) / g for y, g in zip(n_y, n_gold)) / len(n_y),
                length_slope=length_slope(n_gold, n_y), within_budget=sum(under) / len(under) if under else None,
                stopped_by_length=sum(r.finish == "length" for r in batch.rollouts) / len(batch.rollouts),
                entropy_proxy=-sum(sampled) / max(1, len(sampled)))  # mean -log p of the sampled tokens


def examples(tokenizer, batch: sample.Batch, every: int) -> list[dict]:
    """Every `every`-th response of a step as text, with its prompt, length, target and reward: samples.jsonl."""
    return [dict(prompt=tokenizer.decode(batch.prompt_ids[j]), response=tokenizer.decode(batch.rollouts[j].tokens),
                 n_y=batch.rollouts[j].n_y, n_gold=batch.targets[j][0], correct=batch.correct[j],
                 reward=batch.rewards[j]) for j in range(0, len(batch.rollouts), every)]


# -----------------------------------------------------------------------------
# checkpoints and logs

LOCK = ".lock"  # in a run directory while a process trains it


@contextlib.contextmanager
def exclusive(path: Path, what: str):
    """Hold the lock file `path` while the block runs; another process asking for it meanwhile is refused at
    once (ValueError naming the holder's pid). The lock is the kernel's (flock): a crash or a kill releases
    it, so a file left behind by one never blocks the next run. The file is removed on the way out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(f.fileno()).st_ino != os.stat(path).st_ino:  # its holder removed it as we opened it
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            f.seek(0)
            pid = f.read().strip()
            raise ValueError(f"{what} is in use by another process{f' (pid {pid})' if pid else ''}: wait for it to "
                             f"finish or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def open_run(run_dir: Path, cfg, resume: bool, problems: list):
    """A run directory held by this process alone (a second train.py on it is refused) while the block
    runs; yields start()'s state. A start that fails before any step leaves no new directory behind, so
    the corrected command is not taken for another run: a kill (SIGTERM) meanwhile is a KeyboardInterrupt."""
    new, existed = not started(run_dir), run_dir.exists()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # StopRequests takes over from the first step
    try:
        with exclusive(run_dir / LOCK, f"run {run_dir}"):
            try:
                yield start(run_dir, cfg, resume, problems)
            except BaseException:
                if new and not started(run_dir):  # only what the start wrote: a directory there before stays
                    for path in [run_dir] if not existed else [run_dir / name for name in STARTED]:
                        if path.is_dir():
                            shutil.rmtree(path, ignore_errors=True)
                        else:
                            path.unlink(missing_ok=True)
                raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def problems_id(problems: list) -> dict:
    """What a run trains on, in a checkpoint: the number of problems and a hash of their text and answers."""
    text = json.dumps([[p.problem, p.answer, p.multiple_choice] for p in problems])
    return {"problems": len(problems), "sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}


def check_same_problems(state: dict | None, problems: list, run_dir: Path, source: str) -> None:
    """Refuse to resume a run on problems other than those its checkpoint trained on."""
    saved, now = (state or {}).get("problems"), problems_id(problems)
    if saved is not None and saved != now:
        raise ValueError(f"the problems of --data {source} changed since {run_dir} was checkpointed "
                         f"({saved['problems']} problems then, {now['problems']} now, or their text): restore them, "
                         f"or start a new run with --run-name and --init-adapter {run_dir}")


def start(run_dir: Path, cfg, resume: bool, problems: list) -> dict | None:
    """Open a run directory: the state of its newest readable checkpoint if it resumes (None: from step 0),
    its config written, and its logs cut back to the steps before that checkpoint (a resumed run redoes
    the rest). A checkpoint made on other problems is refused before anything is written."""
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint, state = None, None
    if resume:
        for staging in (run_dir / "checkpoints").glob(".step-*"):  # left by a kill mid-save
            shutil.rmtree(staging, ignore_errors=True)
        checkpoint, state = latest_checkpoint(run_dir)
        if checkpoint is None and any((run_dir / "checkpoints").glob("step-*")):
            raise ValueError(f"no checkpoint of {run_dir} can be read: delete {run_dir / 'checkpoints'} to start "
                             f"the run again")
        check_same_problems(state, problems, run_dir, cfg.data)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    start_step = state["step"] if state else 0
    for log in ("metrics.jsonl", "samples.jsonl"):
        path = run_dir / log
        kept = [r for r in read_jsonl(path) if type(r.get("step")) is int and r["step"] < start_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return None if state is None else dict(state, adapter=checkpoint / "adapter")


def save_checkpoint(run_dir: Path, step: int, model, optimizer, keep: int, problems: dict | None = None) -> None:
    """adapter + optimizer + RNG + step (+ problems_id), written atomically; the newest `keep` are kept.
    A failed write (a full disk) leaves the checkpoints before it as they were and says so in one line."""
    if not all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
        raise RuntimeError(f"the adapter's weights are not finite at step {step}: not saved (the checkpoints in "
                           f"{run_dir} are the last good ones)")
    path = run_dir / "checkpoints" / f"step-{step:06d}"
    try:
        with model_lib.atomic_dir(path) as staging:
            model_lib.save_adapter(model, staging / "adapter")
            torch.save({"optimizer": optimizer.state_dict(), "step": step, "torch_rng": torch.get_rng_state(),
                        "problems": problems}, staging / "state.pt")
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        last = sorted(run_dir.glob("checkpoints/step-*"))
        detail = getattr(e, "strerror", None) or data.first_line(e)
        raise RuntimeError(f"cannot save the checkpoint of step {step} in {run_dir} ({detail}): "
                           + (f"{last[-1].name} is kept as it was" if last else "no checkpoint was saved before it")
                           + "; free space, then the same command continues from there") from None
    for old in sorted((run_dir / "checkpoints").glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> tuple[Path | None, dict | None]:
    """(directory, state) of the newest checkpoint that can be read, or (None, None); damaged ones (a crash
    mid-write, a full disk) are skipped, saying so. One that holds anything but what train.py saves is refused."""
    # staging directories start with ".": never listed
    for path in sorted((run_dir / "checkpoints").glob("step-*"), reverse=True):
        try:
            model_lib.check_adapter(path / "adapter")
            return path, load_state(path / "state.pt")
        except (model_lib.ModelError, DamagedState) as e:
            print(f"note: checkpoint {path} cannot be read ({e}): using the one before it", file=sys.stderr)
    return None, None


class DamagedState(Exception):
    """A checkpoint's state.pt cut short or incomplete: the checkpoint before it is used."""


def load_state(path: Path) -> dict:
    """A checkpoint's state.pt, read without unpickling anything but tensors, numbers, strings and containers
    (torch's weights_only loader: a file from someone else can never run code), and checked for every entry
    train.py saves. DamagedState if it is cut short or incomplete; ValueError if it holds other objects."""
    try:
        with warnings.catch_warnings():  # a pickle of another protocol draws a warning: it is refused anyway
            warnings.simplefilter("ignore")
            state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:  # what the weights_only loader says of any object it will not build
        found = re.search(r"GLOBAL (\S+)|Unsupported operand \d+|Unsupported class \S+", str(e))
        raise ValueError(f"{path} holds more than tensors and numbers ({found[0] if found else 'an object'}): train.py "
                         f"never writes that, so it is not loaded; delete {path.parent} to resume from the checkpoint "
                         f"before it") from None
    except Exception as e:  # zip, EOF and struct errors: a file cut short
        raise DamagedState(data.first_line(e)) from None
    if not isinstance(state, dict):
        raise DamagedState(f"{path.name} is not a checkpoint's state")
    optimizer, rng, problems = state.get("optimizer"), state.get("torch_rng"), state.get("problems", None)
    valid = dict(step=type(state.get("step")) is int and state["step"] >= 1,
                 optimizer=isinstance(optimizer, dict) and {"state", "param_groups"} <= set(optimizer),
                 torch_rng=isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8,
                 problems=problems is None or isinstance(problems, dict) and type(problems.get("problems")) is int
                 and isinstance(problems.get("sha256"), str))
    if not all(valid.values()):
        raise DamagedState(f"{path.name} has no valid {', '.join(k for k, ok in valid.items() if not ok)}")
    return state


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
