"""
Speed and memory of the LCPO loop, measured against the alternative in the same run.

    python bench.py rollout                    # our rollouts vs model.generate() on the LCPO workload
    python bench.py train                      # one GRPO step: rollout / reference / policy / optimizer
    python bench.py memory --preset l1-exact   # does a full step of the 1.5B model at paper lengths fit in 24 GB?
    python bench.py memory --account           # the same, predicted term by term (any machine), checked on the CPU
    python bench.py trl                        # one GRPO step: ours against TRL's GRPOTrainer, same settings
    python bench.py loss                       # the loss pass: each prompt once for its G responses, or once per row
    python bench.py s1 --old-prompts 8         # S1 budget forcing in one pass against a new prefill at every "Wait"

On a CPU the embedded default is used with short targets; on a GPU, a randomly initialised model
with the configuration of DeepSeek-R1-Distill-Qwen-1.5B at the paper's lengths. Random weights
never stop by themselves, so the rollout workload forces each row to stop after n_y tokens drawn
around its target, the same rows and lengths for both sides; in a training step (train, memory),
after a length drawn from n_min..max_new_tokens (--force-lengths). Results: bench-results/<what>.json; one
already there is kept unless --replace (or --out DIR writes elsewhere).
"""

import argparse
import dataclasses
import json
import math
import platform
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while the libraries below load: quit quietly, as at any time
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import torch

import cuda_graphs
import data
import model as model_lib
import runs
import sample
import shared_prompts
import train

# DeepSeek-R1-Distill-Qwen-1.5B's architecture (its config.json); random weights are enough for speed and memory
QWEN_1_5B = dict(architectures=["Qwen2ForCausalLM"], hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=131072,
                 rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu")
QWEN_7B = dict(QWEN_1_5B, hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
               vocab_size=152064)  # DeepSeek-R1-Distill-Qwen-7B's, for the memory account's scale


def random_qwen(directory: Path, tokenizer, overrides: dict | None = None) -> str:
    """Save a randomly initialised Qwen2 with the 1.5B configuration, and `tokenizer`, to `directory`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**{**QWEN_1_5B, **(overrides or {})})
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def workload(tokenizer, prompts: int, group_size: int, n_min: int, n_max: int, cap: int, seed: int = 0):
    """LCPO rollout rows: prompts x G, targets drawn as in training, and each row's forced length n_y
    uniform in [target/2, 3 target/2] (capped): (rows, targets per row, lengths per row)."""
    rng = random.Random(seed)
    problems = data.builtin_problems("test", prompts, seed)
    targets = [n for n, _ in data.sample_targets(prompts, n_min, n_max, "exact", rng)]
    encoded = [data.lcpo_prompt(tokenizer, p, n) for p, n in zip(problems, targets)]
    rows = [e for e in encoded for _ in range(group_size)]
    row_targets = [n for n in targets for _ in range(group_size)]
    lengths = [min(cap, max(1, round(n * rng.uniform(0.5, 1.5)))) for n in row_targets]
    return rows, row_targets, lengths


def ours(model, tokenizer, rows, targets, lengths, batch: int, temperature: float, top_p: float, **speed_ups):
    """train.py's rollout: rows sorted by target, `batch` rows per generate call; each stops at its length.
    speed_ups: those of ablated's, for its decoder."""
    order = sorted(range(len(rows)), key=lambda j: targets[j])
    generator = torch.Generator(device=model.device).manual_seed(0)
    produced = 0
    for i in range(0, len(rows), batch):
        chunk = order[i:i + batch]
        outs = sample.generate(model, [rows[j] for j in chunk], [lengths[j] for j in chunk], tokenizer.pad_token_id,
                               [], temperature, top_p, generator, make_decoder=ablated(**speed_ups))
        produced += sum(o.n_y for o in outs)
    return produced


def ablated(share_prefix: bool = True, compact: bool = True, static_cache: bool | None = None,
            grow_cache: bool = True):
    """sample.generate's make_decoder with some of its speed-ups taken away: share_prefix (each distinct prompt
    prefilled once), compact (finished rows leave the batch), grow_cache (the cache grown in place, not
    transformers' DynamicCache, which concatenates at every token), static_cache (cuda_graphs.StaticDecoder;
    None: generate's own choice, on a CUDA device only)."""
    from transformers import DynamicCache

    def make_decoder(model, max_new_tokens: int):
        static = next(model.parameters()).device.type == "cuda" if static_cache is None else static_cache
        decoder = (cuda_graphs.StaticDecoder if static else sample.Decoder)(model, max_new_tokens)
        if not static and not grow_cache:
            decoder.cache = DynamicCache(config=model.config)
        return decoder if share_prefix and compact else Ablated(decoder, share_prefix, compact)
    return make_decoder


class Ablated:
    """A decoder (sample.Decoder's interface) around another, without prefix sharing (each row prefills its own
    copy of its prompt) or without compaction (finished rows stay in the batch, fed their last token, their
    logits ignored)."""

    def __init__(self, decoder, share_prefix: bool, compact: bool):
        self.decoder, self.share_prefix, self.compact = decoder, share_prefix, compact

    def prefill(self, ids, mask, positions, rows):
        if not self.share_prefix:
            ids, mask, positions = ids[rows], mask[rows], positions[rows]
            rows = torch.arange(len(rows), device=rows.device)
        self.slots = torch.arange(len(rows), device=rows.device)  # where each row of the batch is in the decoder's
        self.fed = torch.zeros(len(rows), dtype=torch.long, device=rows.device)  # the decoder's rows' tokens
        return self.decoder.prefill(ids, mask, positions, rows)

    def keep(self, rows):
        if self.compact:
            self.decoder.keep(rows)
        else:
            self.slots = self.slots[rows]

    def __call__(self, tokens):
        if self.compact:
            return self.decoder(tokens)
        self.fed[self.slots] = tokens
        return self.decoder(self.fed)[self.slots]


def hf_generate(model, tokenizer, rows, targets, lengths, batch: int, temperature: float, top_p: float, **unused):
    """model.generate() on the same rows in the same batches, each row stopped after its length."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAtLength(StoppingCriteria):
        def __init__(self, start, limits):
            self.start, self.limits = start, limits

        def __call__(self, input_ids, scores, **kwargs):  # per row: True once it has its n_y tokens
            return (input_ids.shape[1] - self.start) >= self.limits

    order = sorted(range(len(rows)), key=lambda j: targets[j])
    produced = 0
    for i in range(0, len(rows), batch):
        chunk = order[i:i + batch]
        ids, mask = sample.left_pad([rows[j] for j in chunk], tokenizer.pad_token_id, model.device)
        width = ids.shape[1]
        limits = torch.tensor([lengths[j] for j in chunk], device=model.device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=int(limits.max()),
                             do_sample=temperature > 0, temperature=temperature or None, top_p=top_p, top_k=0,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=None,
                             stopping_criteria=StoppingCriteriaList([StopAtLength(width, limits)]))
        produced += int(torch.minimum(torch.full_like(limits, out.shape[1] - width), limits).sum())
    return produced


VARIANTS = {  # name -> (rollout function, generate on a dense copy, speed-ups of its decoder); "ours" = train.py
    "generate()": (hf_generate, False, {}),
    "generate(), dense copy": (hf_generate, True, {}),
    "loop only": (ours, False, dict(share_prefix=False, compact=False, static_cache=False, grow_cache=False)),
    "+ shared prefix": (ours, False, dict(share_prefix=True, compact=False, static_cache=False, grow_cache=False)),
    "+ compaction": (ours, False, dict(share_prefix=False, compact=True, static_cache=False, grow_cache=False)),
    "+ cache grown in place": (ours, False, dict(share_prefix=False, compact=False, static_cache=False)),
    "+ static cache": (ours, False, dict(share_prefix=False, compact=False, static_cache=True)),  # + CUDA graphs
    "+ dense copy": (ours, True, dict(share_prefix=False, compact=False, static_cache=False, grow_cache=False)),
    "ours, transformers' cache": (ours, True, dict(grow_cache=False)),
    "ours, eager decode": (ours, True, dict(static_cache=False)),
    "ours": (ours, True, dict()),  # CUDA graphs on a GPU only
}
GPU_ONLY = ("ours, eager decode",)  # on a CPU the same as "ours"


def run_variant(name, model, copy, *args):
    """One rollout of the workload; a dense copy is refreshed first, as train.py does after every update."""
    function, dense, speed_ups = VARIANTS[name]
    return function(model_lib.rollout_copy(model, copy) if dense else model, *args, **speed_ups)


def peak_mb(device, reset: bool = False) -> float:
    if device.type == "cuda":
        value = torch.cuda.max_memory_allocated(device) / 2**20
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return value
    return model_lib.peak_memory_mb(device)  # the process's peak RSS: it only grows


def bench_rollout(args, model_name, device) -> dict:
    model, tokenizer = model_lib.load_model(model_name, quantize=not args.no_quantize, trainable=False)
    model.eval()
    copy = model_lib.rollout_copy(model)
    rows, targets, lengths = workload(tokenizer, args.prompts, args.group_size, args.n_min, args.n_max,
                                      args.max_new_tokens, args.seed)
    batch = args.rollout_batch or len(rows)
    useful = sum(lengths)
    print(f"{len(rows)} rows ({args.prompts} prompts x {args.group_size}), targets {args.n_min}-{args.n_max}, "
          f"{useful} tokens to generate (longest {max(lengths)}), {batch} rows per batch")
    variants = [v for v in VARIANTS if v in args.variants and (device.type == "cuda" or v not in GPU_ONLY)]
    times = {v: [] for v in variants}
    memory = {v: 0.0 for v in variants}
    with torch.no_grad():
        run_variant("ours", model, copy, tokenizer, rows[:2], targets[:2], [4, 4], 2, 1.0, 1.0)  # warm-up
        for repeat in range(args.repeats):  # alternating, so drift in the machine's speed hits all of them
            for v in variants:
                peak_mb(device, reset=True)
                model_lib.synchronize(device)
                t = time.perf_counter()
                produced = run_variant(v, model, copy, tokenizer, rows, targets, lengths, batch, args.temperature,
                                       args.top_p)
                model_lib.synchronize(device)
                times[v].append(time.perf_counter() - t)
                memory[v] = max(memory[v], peak_mb(device))
                assert produced == useful, (v, produced, useful)  # both sides did the same work
                print(f"  repeat {repeat + 1}  {v:24s} {times[v][-1]:8.1f} s  {useful / times[v][-1]:8.1f} tokens/s")
    best = {v: min(ts) for v, ts in times.items()}
    base, dense = best.get("generate()"), best.get("generate(), dense copy")  # dense: the honest baseline
    table = {v: dict(seconds=times[v], tokens_per_s=useful / best[v], peak_memory_mb=memory[v],
                     vs_generate=(base / best[v]) if base else None,
                     vs_dense_generate=(dense / best[v]) if dense else None) for v in variants}
    print("\n| rollout | tokens/s | x generate(), dense copy | x generate() | peak MB |\n|---|---:|---:|---:|---:|")
    for v, r in table.items():
        ratios = [f"{r[k]:.2f}" if r[k] else "-" for k in ("vs_dense_generate", "vs_generate")]
        print(f"| {v} | {r['tokens_per_s']:.1f} | {' | '.join(ratios)} | {r['peak_memory_mb']:.0f} |")
    return dict(rows=len(rows), useful_tokens=useful, longest=max(lengths), batch=batch, variants=table)


def forced_lengths(n_min: int, n_max: int, seed: int):
    """sample.generate with each row stopped after a length drawn uniformly from n_min..n_max, whatever
    it samples: random weights never stop by themselves, a trained model stops near its target."""
    rng, generate = random.Random(seed), sample.generate

    def forced(model, prompts, max_new_tokens, *args, **kwargs):
        return generate(model, prompts, [rng.randint(n_min, n_max) for _ in prompts], *args, **kwargs)
    return forced


def memory_fraction(cap_gb: float, total_bytes: int) -> float:
    """The share of the device's memory that is `cap_gb` GiB, for torch.cuda.set_per_process_memory_fraction.

    >>> memory_fraction(24, 80 * 2**30)
    0.3
    """
    if not 0 < cap_gb * 2**30 <= total_bytes:
        raise ValueError(f"--memory-cap-gb {cap_gb} is not within this device's {total_bytes / 2**30:.1f} GiB")
    return cap_gb * 2**30 / total_bytes


def preset_config(args, preset: str, **overrides) -> train.Config:
    """train.py's Config of `preset`, with the sizes and knobs given to bench.py over it, then `overrides`."""
    knobs = ("group_size", "n_min", "n_max", "max_new_tokens", "rollout_batch", "micro_batch_tokens")
    flags = {k: getattr(args, k) for k in knobs if getattr(args, k, None) is not None}
    if args.prompts is not None:
        flags["prompts_per_step"] = args.prompts
    if args.no_rollout_copy:
        flags["rollout_copy"] = False
    return train.Config(**{**train.PRESETS[preset], **flags, **overrides})


def bench_train(args, model_name, device, preset: str) -> dict:
    cfg = preset_config(args, preset, model=model_name, steps=2, quantize=not args.no_quantize, data="builtin")
    runs.check_config(cfg)
    steps = []
    real_generate = sample.generate
    if args.force_lengths:  # train.py's rollouts call sample.generate: each row gets its length
        sample.generate = forced_lengths(cfg.n_min, cfg.max_new_tokens, cfg.seed)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            train.train(cfg, Path(tmp) / "run", on_step=lambda step, m: steps.append(m))
    finally:
        sample.generate = real_generate
    m = steps[-1]  # the second step: the first pays for warm-up
    total = m["rollout_s"] + m["reference_s"] + m["policy_s"] + m["optimizer_s"]
    print(f"\none step ({cfg.prompts_per_step} prompts x {cfg.group_size}, mean response {m['mean_n_y']:.0f} tokens):")
    for part in ("rollout_s", "reference_s", "policy_s", "optimizer_s"):
        print(f"  {part[:-2]:10s} {m[part]:8.1f} s  {100 * m[part] / total:5.1f} %")
    print(f"  rollout {m['rollout_tokens_per_s']:.1f} tokens/s, training {m['train_tokens_per_s']:.1f} tokens/s, "
          f"peak memory {m['peak_memory_mb']:.0f} MB")
    return dict(config={k: v for k, v in vars(cfg).items()}, step=m, forced_lengths=args.force_lengths)


# -----------------------------------------------------------------------------
# the memory account: a step's peak, term by term, checked against measured peaks on the CPU

PROMPT_TOKENS = 512  # the padded prompt of a rollout batch, for the presets' account (DeepScaleR's are ~100-300)
ALLOCATOR_SLACK = 0.10  # CUDA's caching allocator: rounding and fragmentation, as a share of the rest (a guess)
ACCOUNT_CHECKS = [  # random Qwen2 configs the CPU check trains a real step of: a layer's recompute or the logits peak
    dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         vocab_size=512),
    dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
         vocab_size=4096),
    dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
         vocab_size=1024),
]


def memory_account(config: dict, cfg: train.Config, prompt_tokens: int = PROMPT_TOKENS, device: str = "cuda") -> dict:
    """A training step's memory, term by term: {term: (phase, bytes, formula)}. Phases: `kept` all step long;
    `rollout` while generating (the KV cache is freed before the loss pass); `loss` one micro-batch's forward
    and backward, of which `layer` (a layer's recompute in backward) and `chunk` (a log-prob chunk's) never
    coexist. The largest micro-batch is one unit M = max(micro_batch_tokens, prompt + max_new_tokens) wide.
    On "cuda" bf16 compute and CUDA's allocator; on "cpu" fp32 and no slack (what the CPU checks measure).
    """
    H, I, L, V = (config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    head = config.get("head_dim") or H // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head, config["num_key_value_heads"] * head  # widths of q and of k, v
    b, r = (2 if device == "cuda" else 4), cfg.lora_rank  # bytes of the compute dtype; LoRA rank
    linear = L * (H * q + 2 * H * kv + q * H + 3 * H * I)  # q, k, v, o, gate, up, down: the 4-bit weights
    bias = "Qwen2ForCausalLM" in config.get("architectures", []) or config.get("attention_bias", False)
    other = V * H * (1 if config.get("tie_word_embeddings") else 2) + (2 * L + 1) * H + bias * L * (q + 2 * kv)
    lora = r * L * ((H + q) + 2 * (H + kv) + (q + H) + 2 * (H + I) + (I + H))  # r x (in + out), every linear
    rows = min(cfg.rollout_batch, cfg.prompts_per_step * cfg.group_size)
    T = prompt_tokens + cfg.max_new_tokens  # a rollout's cache columns
    M = max(cfg.micro_batch_tokens, T)  # padded tokens of the largest micro-batch, and its widest unit
    C = min(sample.LOGPROB_TOKENS, M)  # tokens per log-prob chunk
    terms = {
        "4-bit base": ("kept", linear * (1 / 2 + 1 / 64) + other * b,
                       "linear weights x (1/2 + 1/64) B (NF4 + absmax) + (embeddings, lm_head, norms, biases) x b"),
        "dense rollout copy": ("kept", (linear + other) * b * cfg.rollout_copy,
                               "every weight x b (--no-rollout-copy: 0)"),
        "LoRA + AdamW + gradients": ("kept", 16 * lora, "r x sum(in + out) of every linear x (4 + 8 + 4) B, fp32"),
        "KV cache of a rollout batch": ("rollout", rows * T * L * 2 * kv * b,
                                        "rollout_batch x (prompt + max_new_tokens) x layers x 2 x kv width x b"),
        "sampling": ("rollout", 5 * rows * V * 4,
                     "5 x rollout_batch x vocab x 4 B (logits, / T, log-softmax, exp, cdf)"),
        "checkpointed hidden states": ("loss", (L + 2) * M * H * b,
                                       "(layers + 2) x M x hidden x b: layer inputs, output, gathered rows"),
        "attention mask": ("loss", M * M * b, "M x M x b (u x T^2 <= M^2, T <= M)"),
        "one layer's recompute": ("layer", M * (7 * H + 4 * I) * b, "M x (7 hidden + 4 intermediate) x b"),
        "log-prob chunk": ("chunk", C * V * (8 + 4 - b), "C x vocab x (2 x 4 + 4 - b) B: fp32 log-probs and gradient"),
    }
    rest = {phase: sum(x for p, x, _ in terms.values() if p == phase) for phase in ("kept", "rollout", "loss")}
    rest["loss"] += max(terms["one layer's recompute"][1], terms["log-prob chunk"][1])
    before_slack = rest["kept"] + max(rest["rollout"], rest["loss"])
    terms["allocator slack"] = ("slack", ALLOCATOR_SLACK * before_slack * (device == "cuda"),
                                f"{ALLOCATOR_SLACK:.0%} of the rest (cuda)")
    return dict(terms=terms, rollout_peak=rest["kept"] + rest["rollout"], loss_peak=rest["kept"] + rest["loss"],
                peak=before_slack + terms["allocator slack"][1], M=M, C=C)


def tensor_bytes(tensors) -> int:
    """Bytes of the storages under `tensors`, each counted once."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def char_tokenizer():
    """One id per printable character, and a chat template: the CPU checks' prompts, for models of any vocabulary
    (ids past the tokenizer's decode to nothing)."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.printable))}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.Split("", "isolated"), decoders.Fuse()
    raw.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return tokenizer


def account_check(overrides: dict, tmp: Path) -> dict:
    """A real train_step on the CPU (the second: AdamW's states exist), of a random Qwen2 of QWEN_1_5B's shape with
    `overrides`, the l1-exact preset's settings, 4-bit base, one prompt x G = 32 responses of 32 tokens, all in one
    rollout batch and one micro-batch as wide as the account's bound; each kept term measured as the bytes of its
    tensors, each phase as those plus torch.profiler's peak of the bytes allocated in it. Beside the account."""
    from torch.profiler import ProfilerActivity, profile, record_function

    path = random_qwen(tmp / "check", char_tokenizer(), overrides)
    model, tokenizer = model_lib.load_model(path, quantize=True, lora_rank=16, gradient_checkpointing=True)
    problems = data.builtin_problems("train", 1)
    prompt = len(data.lcpo_prompt(tokenizer, problems[0], 32, "exact"))
    cfg = train.Config(**{**train.PRESETS["l1-exact"], "model": path, "prompts_per_step": 1, "group_size": 32,
                          "n_min": 32, "n_max": 32, "max_new_tokens": 32, "rollout_batch": 32, "lora_rank": 16,
                          "micro_batch_tokens": prompt + 32 * 32})  # one unit: the prompt and its 32 responses
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # an adapter off zero: the KL term has a gradient, so AdamW steps and makes its states
        for p in params:
            p.normal_(std=1e-3)
    optimizer, copy = torch.optim.AdamW(params, lr=cfg.lr), model_lib.rollout_copy(model)
    real_generate, real_batches = sample.generate, sample.generate_in_batches

    def full_length(model, prompts, max_new_tokens, pad_id, stop_ids, *args, **kwargs):  # the GPU's static cache
        return real_generate(model, prompts, max_new_tokens, pad_id, [], *args,
                             **{**kwargs, "make_decoder": cuda_graphs.StaticDecoder})

    def timed_rollout(*args, **kwargs):  # marks its end with an empty range (a range holding work takes its frees)
        rollouts = real_batches(*args, **kwargs)
        with record_function("rollout done"):
            return rollouts

    sample.generate, sample.generate_in_batches = full_length, timed_rollout
    try:
        step = lambda s: train.train_step(cfg, s, model, tokenizer, optimizer, params, problems,
                                          torch.device("cpu"), copy)
        step(0)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step(1)
    finally:
        sample.generate, sample.generate_in_batches = real_generate, real_batches
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    quant = [s for p in frozen if getattr(p, "quant_state", None) is not None for s in
             (p.quant_state.absmax, p.quant_state.code, *((p.quant_state.state2.absmax, p.quant_state.state2.code)
                                                          if p.quant_state.nested else ()))]
    kept = {"4-bit base": tensor_bytes(frozen + quant),
            "dense rollout copy": tensor_bytes(list(copy.parameters()) + list(copy.buffers())),
            "LoRA + AdamW + gradients": tensor_bytes(params + [p.grad for p in params] + [
                t for s in optimizer.state.values() for t in s.values() if t.dim() > 0])}
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    (done,) = [e.time_range.start for e in events if e.name == "rollout done"]
    allocated, phase_peak = 0, {"rollout": 0, "loss": 0}
    for e in events:  # the bytes allocated since the step began, at each event
        allocated += e.self_cpu_memory_usage
        phase = "rollout" if e.time_range.start < done else "loss"
        phase_peak[phase] = max(phase_peak[phase], allocated)
    account = memory_account(dict(QWEN_1_5B, **overrides), cfg, prompt, device="cpu")
    measured = dict(kept, rollout=phase_peak["rollout"], loss=phase_peak["loss"])
    measured |= {f"{phase}_peak": sum(kept.values()) + phase_peak[phase] for phase in ("rollout", "loss")}
    measured["peak"] = max(measured["rollout_peak"], measured["loss_peak"])
    predicted = {k: account["terms"][k][1] for k in kept}
    predicted |= {k: account[k] for k in ("rollout_peak", "loss_peak", "peak")}
    predicted |= {phase: predicted[f"{phase}_peak"] - sum(predicted[k] for k in kept) for phase in ("rollout", "loss")}
    return dict(size={k: overrides[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")},
                micro_batch_tokens=cfg.micro_batch_tokens, predicted_mib={k: v / 2**20 for k, v in predicted.items()},
                measured_mib={k: v / 2**20 for k, v in measured.items()},
                ratio={k: predicted[k] / measured[k] for k in measured})


def read_config(path: str) -> dict:
    """A model's config.json, with the fields the account needs; ValueError in one line if it cannot be read."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the model config {path} ({e.__class__.__name__}: {str(e)[:80]}): pass a model's "
                         f"config.json") from None
    needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in needed if not isinstance(config, dict) or not isinstance(config.get(k), int)]
    if missing:
        raise ValueError(f"the model config {path} has no {', '.join(missing)}: pass a decoder model's config.json")
    return {"num_key_value_heads": config["num_attention_heads"], **config}


def bench_account(args, preset: str) -> dict:
    """The memory account of a step: the term table of `preset` for the model config (--config, default
    QWEN_1_5B), the predicted peak of every paper preset at 1.5B and 7B, what each knob saves, and the CPU checks."""
    config = read_config(args.config) if args.config else QWEN_1_5B
    settings = lambda name, **more: preset_config(args, name, **more)
    gib = lambda x: x / 2**30
    account = memory_account(config, settings(preset))
    cap = args.memory_cap_gb
    print(f"one {preset} step of {args.config or 'DeepScaleR-1.5B (bench.QWEN_1_5B)'} on a GPU: bf16, "
          f"a {PROMPT_TOKENS}-token prompt, micro-batches of M = {account['M']} tokens, log-prob chunks of "
          f"{account['C']}\n\n| term | phase | GiB | formula |\n|---|---|---:|---|")
    for name, (phase, size, formula) in account["terms"].items():
        print(f"| {name} | {phase} | {gib(size):.2f} | {formula} |")
    print(f"| **predicted peak** | | **{gib(account['peak']):.2f}** | kept + max(rollout, loss + max(layer, chunk)) "
          f"+ slack |\n{'fits' if gib(account['peak']) <= cap else 'does NOT fit'} in {cap:g} GiB")
    changes = {"--no-rollout-copy": dict(rollout_copy=False), "--rollout-batch 32": dict(rollout_batch=32),
               "--micro-batch-tokens 8192": dict(micro_batch_tokens=8192)}
    savings = {flag: gib(account["peak"] - memory_account(config, settings(preset, **change))["peak"])
               for flag, change in changes.items()}
    print("what each knob saves: " + ", ".join(f"{flag} {saved:.2f} GiB" for flag, saved in savings.items()))
    predictions = {}
    for model, cfg_model in ((args.config or "1.5B", config), ("7B", QWEN_7B)):
        for name in ("l1-exact", "l1-max"):
            a = memory_account(cfg_model, settings(name))
            terms = {term: dict(phase=phase, gib=gib(size), formula=formula)
                     for term, (phase, size, formula) in a["terms"].items()}
            predictions[f"{model} {name}"] = dict(predicted_peak_gib=gib(a["peak"]), terms=terms)
    small = settings("l1-exact", rollout_copy=False, rollout_batch=16)
    predictions["7B l1-exact --no-rollout-copy --rollout-batch 16"] = dict(
        predicted_peak_gib=gib(memory_account(QWEN_7B, small)["peak"]))
    print("\n| model, preset | predicted peak GiB |\n|---|---:|")
    for name, p in predictions.items():
        print(f"| {name} | {p['predicted_peak_gib']:.2f} |")
    print("\nthe account against a real step on this CPU (fp32, random Qwen2 weights, profiler; MiB):\n"
          "| hidden / intermediate / layers / vocab | term | predicted | measured | ratio |\n|---|---|---:|---:|---:|")
    checks = []
    with tempfile.TemporaryDirectory() as tmp:
        for overrides in ACCOUNT_CHECKS:
            check = account_check(overrides, Path(tmp))
            checks.append(check)
            for term, ratio in check["ratio"].items():
                print(f"| {'/'.join(map(str, check['size'].values()))} | {term} | {check['predicted_mib'][term]:.1f} | "
                      f"{check['measured_mib'][term]:.1f} | {ratio:.3f} |")
    return dict(preset=preset, config=args.config or "bench.QWEN_1_5B", prompt_tokens=PROMPT_TOKENS,
                settings=dataclasses.asdict(settings(preset)),
                fits=gib(account["peak"]) <= cap, memory_cap_gb=cap, knob_savings_gib=savings, presets=predictions,
                cpu_checks=checks)


LOSS_SHAPES = [(90, 4, 100), (256, 4, 100), (256, 16, 100), (1024, 16, 100), (1024, 16, 400)]  # (prompt, G, response)


def bench_loss(args, device) -> dict:
    """The loss pass (forward + backward of the policy's log-probs) over the same GRPO rows, two ways, as
    train_step batches them (--micro-batch-tokens, default 16384): each row its own prompt + response
    (sample.LossBatches, --no-share-prompts), or each prompt once for its responses where that pays
    (shared_prompts.SharedBatches, the default), at growing prompt lengths and G, on a small random Llama.
    Responses vary in length around the given one; 2 prompts a shape; best of --repeats, alternating."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=8192, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                                         bos_token_id=None)).to(device)
    rng, shapes = random.Random(args.seed), []
    for prompt_len, group, response in LOSS_SHAPES:
        rows, rollouts = [], []
        for _ in range(2):
            prompt = [rng.randrange(1, 8192) for _ in range(prompt_len)]
            for _ in range(group):
                n = rng.randint(response // 2, 3 * response // 2)
                rows.append(prompt)
                rollouts.append(sample.Rollout([rng.randrange(1, 8192) for _ in range(n)], [0.0] * n, "length"))
        limit, every = args.micro_batch_tokens or 16384, list(range(len(rows)))
        ways = {way: LossBatches(model, rows, rollouts, every, limit, pad_id=0) for way, LossBatches in
                (("per row", sample.LossBatches), ("shared prompt", shared_prompts.SharedBatches))}
        times, out = {w: [] for w in ways}, {}
        for _ in range(args.repeats):
            for way, micro in ways.items():  # as train_step passes them: micro-batches, forward + backward each
                model.zero_grad(set_to_none=True)
                model_lib.synchronize(device)
                longest = max(r.n_y for r in rollouts)
                t, logps, tokens = time.perf_counter(), torch.zeros(len(rows), longest, device=device), 0
                for idx, inputs, resp_mask, _ in micro:
                    logp = micro.logprobs(model, inputs, 1.0) * resp_mask
                    logp.sum().backward()
                    tokens += inputs["ids"].numel()
                    logps[idx, -logp.shape[1]:] = logp.detach()
                model_lib.synchronize(device)
                times[way].append(time.perf_counter() - t)
                out[way] = (logps, tokens)
        best = {w: min(ts) for w, ts in times.items()}
        shape = dict(prompt=prompt_len, group_size=group, response=response, seconds=best,
                     tokens={w: out[w][1] for w in ways}, speedup=best["per row"] / best["shared prompt"],
                     max_logprob_difference=(out["per row"][0] - out["shared prompt"][0]).abs().max().item())
        shapes.append(shape)
        print(f"prompt {prompt_len:5d}, G {group:2d}, response ~{response}: per row {best['per row']:.2f} s "
              f"({shape['tokens']['per row']} tokens), shared prompt {best['shared prompt']:.2f} s "
              f"({shape['tokens']['shared prompt']} tokens): {shape['speedup']:.2f}x")
    return dict(shapes=shapes)


def bench_trl(args, model_name, device) -> dict:
    """One GRPO step of train.py and one of TRL's GRPOTrainer at the same settings, alternating, `repeats` times.

    Both: the same model in full precision with LoRA r16 on every linear layer, the built-in problems
    as LCPO-Exact prompts (TRL reads scale_out.export's file), G, temperature, response cap, beta, token-level
    loss, learning rate, no gradient checkpointing, and the LCPO reward (scale_out.trl_reward for TRL).
    Each run takes two steps and the second is timed (the first pays for warm-up). Responses are
    sampled, so lengths differ from run to run: the time per generated token is the fair comparison.
    """
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        raise ValueError("bench.py trl needs TRL, an optional extra: run `make extras`")
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback

    import scale_out

    cfg = train.Config(model=model_name, quantize=False, gradient_checkpointing=False, prompts_per_step=args.prompts,
                       group_size=args.group_size, n_min=args.n_min, n_max=args.n_max,
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature, beta=0.001, steps=2,
                       save_every=100, sample_every=100)
    runs.check_config(cfg)
    source = model_lib.resolve(model_name)
    rows = cfg.prompts_per_step * cfg.group_size

    class StepClock(TrainerCallback):  # wall time of each optimizer step, generation included
        def __init__(self):
            self.seconds = []

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.seconds.append(time.perf_counter() - self.start)

    def run_ours(tmp: Path, seed: int) -> dict:
        stamps, steps = [], []
        train.train(dataclasses.replace(cfg, seed=seed), tmp / f"ours-{seed}",
                    on_step=lambda step, m: stamps.append(time.perf_counter()) or steps.append(m))
        m = steps[-1]
        return dict(step_s=stamps[1] - stamps[0], tokens=m["mean_n_y"] * rows, mean_length=m["mean_n_y"],
                    split={k: m[k] for k in ("rollout_s", "reference_s", "policy_s", "optimizer_s")})

    def run_trl(tmp: Path, seed: int) -> dict:
        tokenizer = model_lib.load_tokenizer(source)
        problems = data.builtin_problems("train", cfg.prompts_per_step * 2, seed)
        scale_out.export(problems, tmp / "trl.parquet", "trl", cfg.n_min, cfg.n_max, "exact", seed)
        import datasets

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=model_lib.compute_dtype(device.type),
                                                     use_safetensors=True)  # weights are never unpickled
        config = trl.GRPOConfig(
            output_dir=str(tmp / f"trl-{seed}"), use_cpu=device.type == "cpu", bf16=device.type == "cuda", seed=seed,
            max_steps=2, report_to="none", logging_steps=1, save_strategy="no", num_generations=cfg.group_size,
            per_device_train_batch_size=rows,
            max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0, beta=cfg.beta,
            epsilon=cfg.clip, loss_type="dapo", learning_rate=cfg.lr, lr_scheduler_type="constant",
            max_grad_norm=cfg.grad_clip, gradient_checkpointing=False, disable_tqdm=True)
        clock, spent = StepClock(), {"generation_s": [], "generate_and_score_s": []}
        trainer = trl.GRPOTrainer(
            model=model, processing_class=tokenizer, args=config, callbacks=[clock],
            reward_funcs=scale_out.trl_reward(tokenizer, alpha=cfg.alpha, boxed_only=cfg.boxed_only),
            train_dataset=datasets.load_dataset("parquet", data_files=str(tmp / "trl.parquet"), split="train"),
            peft_config=LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=model_lib.LORA_TARGETS,
                                   task_type="CAUSAL_LM"))
        for name, key in (("_generate", "generation_s"), ("_generate_and_score_completions", "generate_and_score_s")):
            def timed(*a, _real=getattr(trainer, name), _key=key, **k):  # TRL's own stages, timed from outside
                start = time.perf_counter()
                try:
                    return _real(*a, **k)
                finally:
                    spent[_key].append(time.perf_counter() - start)
            setattr(trainer, name, timed)
        trainer.train()
        logged = [h for h in trainer.state.log_history if "completions/mean_length" in h]
        length = logged[-1]["completions/mean_length"]
        per_step = {k: v[-1] for k, v in spent.items()}  # one generation a step: the timed step's
        split = {"generation_s": per_step["generation_s"],
                 "rewards_and_reference_s": per_step["generate_and_score_s"] - per_step["generation_s"],
                 "loss_backward_optimizer_s": clock.seconds[-1] - per_step["generate_and_score_s"],
                 "trl_step_time_s": logged[-1].get("step_time")}
        return dict(step_s=clock.seconds[-1], tokens=length * rows, mean_length=length, split=split)

    timed = {"ours": [], "TRL GRPOTrainer": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):  # alternating, so drift in the machine's speed hits both
            for name, run in (("ours", run_ours), ("TRL GRPOTrainer", run_trl)):
                r = run(Path(tmp), seed=repeat)
                r["ms_per_token"] = 1000 * r["step_s"] / r["tokens"]
                timed[name].append(r)
                print(f"  repeat {repeat + 1}  {name:16s} {r['step_s']:7.1f} s a step, {r['tokens']:6.0f} tokens "
                      f"(mean {r['mean_length']:.0f}), {r['ms_per_token']:.1f} ms per token")
    best = {name: min(rs, key=lambda r: r["ms_per_token"]) for name, rs in timed.items()}
    ratio_token = best["TRL GRPOTrainer"]["ms_per_token"] / best["ours"]["ms_per_token"]
    ratio_step = min(r["step_s"] for r in timed["TRL GRPOTrainer"]) / min(r["step_s"] for r in timed["ours"])
    print(f"\n| {rows} responses a step | s a step | mean length | ms per generated token |\n|---|---:|---:|---:|")
    for name, r in best.items():
        print(f"| {name} | {r['step_s']:.1f} | {r['mean_length']:.0f} | {r['ms_per_token']:.1f} |")
    print(f"ours is {ratio_token:.2f}x TRL per generated token, {ratio_step:.2f}x per step")
    return dict(config={k: v for k, v in vars(cfg).items()}, runs=timed, ours_vs_trl_per_token=ratio_token,
                ours_vs_trl_per_step=ratio_step)


# -----------------------------------------------------------------------------
# S1: budget forcing in one pass against the rounds it replaced


def s1_rounds(model, tokenizer, prompts: list[list[int]], budget: int, temperature: float = 0.0,
              top_p: float = 1.0, answer_tokens: int = 32, generator=None) -> list[sample.Rollout]:
    """S1 in rounds, the baseline of bench.py s1: sample.budget_forcing's rollouts, but every "Wait" round is a
    new generate call that prefills the prompt and all the thinking so far again.

    Generate up to the budget; while budget remains and the model stopped early (EOS, or
    </think> for thinking models), drop the stop token, append "Wait" and go on. At the budget,
    append the answer cue and decode a short answer greedily. The first `budget` tokens of each
    rollout are its thinking; inserted tokens have log-prob nan.
    """
    think_end = tokenizer.convert_tokens_to_ids("</think>") if "</think>" in tokenizer.get_vocab() else None
    stops = [tokenizer.eos_token_id] + ([think_end] if think_end is not None else [])
    wait = tokenizer.encode(sample.WAIT, add_special_tokens=False)
    cue = tokenizer.encode(("\n</think>" if think_end is not None else "") + sample.ANSWER_CUE,
                           add_special_tokens=False)
    thinking = [sample.Rollout([], [], "length") for _ in prompts]
    live = list(range(len(prompts)))
    while live:
        outs = sample.generate(model, [prompts[i] + thinking[i].tokens for i in live],
                               [budget - thinking[i].n_y for i in live], tokenizer.pad_token_id, stops,
                               temperature, top_p, generator)
        still = []
        for i, out in zip(live, outs):
            kept = out.tokens[:-1] if out.finish == "eos" else out.tokens  # a stop token is not thinking
            thinking[i].tokens += kept
            thinking[i].logprobs += out.logprobs[: len(kept)]
            room = budget - thinking[i].n_y
            if room > 0:
                thinking[i].tokens += wait[:room]
                thinking[i].logprobs += [math.nan] * len(wait[:room])
                if budget - thinking[i].n_y > 0:
                    still.append(i)
        live = still
    answers = sample.generate(model, [p + t.tokens + cue for p, t in zip(prompts, thinking)], answer_tokens,
                              tokenizer.pad_token_id, [tokenizer.eos_token_id], temperature=0.0)
    return [sample.Rollout(t.tokens + cue + a.tokens, t.logprobs + [math.nan] * len(cue) + a.logprobs, a.finish)
            for t, a in zip(thinking, answers)]


def bench_s1(args, model_name, device) -> dict:
    """S1 at one budget over problems x samples, in eval.py's batches and with its seeding: sample.budget_forcing
    (one pass) against s1_rounds, on the same rows. The rounds run on the first --old-prompts problems only
    when they are too slow for all; the one pass then runs on those as well, for the ratio on the same rows."""
    model, tokenizer = model_lib.load_model(model_name, quantize=not args.no_quantize, trainable=False)
    model = model_lib.rollout_copy(model)  # as eval.py samples
    problems = data.builtin_problems("test", args.prompts, args.seed)
    prompts = [data.lcpo_prompt(tokenizer, p, None) for p in problems]  # S1 has no length sentence
    rows = [p for p in prompts for _ in range(args.group_size)]
    old_rows = rows[:min(args.old_prompts or args.prompts, args.prompts) * args.group_size]
    batch = args.rollout_batch or 64
    wait = len(tokenizer.encode(sample.WAIT, add_special_tokens=False))
    waits = lambda outs: sum(math.isnan(lp) for o in outs for lp in o.logprobs[:args.budget]) / wait / len(outs)

    def timed(function, rows):
        generator = torch.Generator(device=model.device).manual_seed(args.seed)
        model_lib.synchronize(device)
        t = time.perf_counter()
        outs = [o for i in range(0, len(rows), batch) for o in function(
            model, tokenizer, rows[i:i + batch], args.budget, args.temperature, args.top_p, 32, generator)]
        model_lib.synchronize(device)
        seconds = time.perf_counter() - t
        print(f"  {function.__name__:15s} {len(rows):4d} rows  {seconds:8.1f} s  {waits(outs):.1f} Waits a row")
        return seconds, outs

    print(f"S1 at N = {args.budget}: {args.prompts} problems x {args.group_size}, T {args.temperature}, "
          f"{batch} rows per batch; the rounds on {len(old_rows)} rows")
    with torch.no_grad():
        sample.budget_forcing(model, tokenizer, rows[:2], 4, args.temperature, args.top_p, 4)  # warm-up
        new_s, new = timed(sample.budget_forcing, rows)
        old_s, old = timed(s1_rounds, old_rows)
        same_s, same = (new_s, new) if len(old_rows) == len(rows) else timed(sample.budget_forcing, old_rows)
    ratio = old_s / same_s
    result = dict(budget=args.budget, rows=len(rows), old_rows=len(old_rows), batch=batch, one_pass_s=new_s,
                  rounds_s=old_s, one_pass_on_old_rows_s=same_s, speedup=ratio,
                  rounds_all_rows_estimate_s=ratio * new_s,  # the same ratio on every row
                  same_text=sum(a.tokens == b.tokens for a, b in zip(old, same)),
                  waits_per_row=waits(new))
    print(f"\nrounds {old_s:.1f} s, one pass {same_s:.1f} s on the same {len(old_rows)} rows: {ratio:.1f}x; "
          f"all {len(rows)} rows: one pass {new_s:.1f} s, rounds ~{ratio * new_s:.0f} s; "
          f"same text {result['same_text']} of {len(old_rows)}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("what", choices=["rollout", "train", "memory", "trl", "loss", "s1"])
    parser.add_argument("--model", default=None, help="hub id or directory; default: the embedded model on a CPU, "
                        "a random 1.5B Qwen2 on a GPU")
    parser.add_argument("--preset", default=None, help="train/memory: a train.py preset (default: chat on a CPU, "
                        "the embedded model's own settings; l1-exact on a GPU)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per batch")
    parser.add_argument("--group-size", type=int, default=None, help="G")
    parser.add_argument("--n-min", type=int, default=None)
    parser.add_argument("--n-max", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--rollout-batch", type=int, default=None, help="rows per generation batch (default: all)")
    parser.add_argument("--micro-batch-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None, help="default: 1.0 (rollout), 0.6 (trl)")
    parser.add_argument("--top-p", type=float, default=None, help="default: 0.95 (s1, as eval.py), 1.0")
    parser.add_argument("--budget", type=int, default=128, help="s1: the thinking budget N")
    parser.add_argument("--old-prompts", type=int, default=None,
                        help="s1: run the old rounds on the first this many problems only (default: all)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"rollout: some of {list(VARIANTS)}")
    parser.add_argument("--no-quantize", action="store_true")
    parser.add_argument("--force-lengths", action=argparse.BooleanOptionalAction, default=None,
                        help="train/memory: stop each response after a length drawn from n_min..max_new_tokens "
                        "(default: with the random model, whose responses never stop)")
    parser.add_argument("--memory-cap-gb", type=float, default=24.0, help="memory: the card to fit, GiB")
    parser.add_argument("--no-rollout-copy", action="store_true", help="train/memory: generate with the 4-bit model")
    parser.add_argument("--account", action="store_true", help="memory: predict the peak term by term (no GPU "
                        "needed) for --preset, the paper presets at 1.5B and 7B, and check it on this CPU")
    parser.add_argument("--config", default=None, help="memory --account: a model's config.json (default: "
                        "DeepScaleR-1.5B's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench-results", help="directory for the JSON results")
    parser.add_argument("--replace", action="store_true", help="write over an existing result (default: keep it)")
    args = parser.parse_args(argv)
    device = torch.device(model_lib.default_device())
    gpu = device.type == "cuda"
    account = args.what == "memory" and args.account  # a prediction: no GPU, no model
    if (args.account or args.config) and not account:
        sys.exit("error: --account and --config are for bench.py memory")
    if args.what == "memory" and not gpu and not args.account:
        sys.exit("error: bench.py memory measures GPU memory and needs a CUDA device (on a CPU: bench.py memory "
                 "--account predicts it)")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or any(getattr(args, k) is not None and getattr(args, k) < 1 for k in
                      ("prompts", "group_size", "n_min", "n_max", "max_new_tokens", "rollout_batch", "old_prompts")) \
            or args.repeats < 1 or args.budget < 1:
        sys.exit(f"error: unknown variant {unknown[0]!r}" if unknown else "error: sizes and --repeats must be >= 1")
    preset = args.preset or ("l1-exact" if gpu or account else "chat")
    if preset not in train.PRESETS:
        sys.exit(f"error: unknown preset {preset!r}: use one of {', '.join(train.PRESETS)}")
    if args.what == "memory" and not account:
        try:
            torch.cuda.set_per_process_memory_fraction(
                memory_fraction(args.memory_cap_gb, torch.cuda.get_device_properties(device).total_memory), device)
        except ValueError as e:
            sys.exit(f"error: {e}")
    paper = gpu and args.model is None and args.what not in ("trl", "loss", "s1") and not account
    if args.force_lengths is None:
        args.force_lengths = paper
    defaults = dict(prompts=4, group_size=16, n_min=100, n_max=4000, max_new_tokens=4096, temperature=1.0) if paper \
        else dict(prompts=8, group_size=4, n_min=16, n_max=160, max_new_tokens=256, temperature=1.0)
    if args.what == "trl":  # small enough to repeat on a CPU
        defaults = dict(prompts=2, group_size=8, n_min=32, n_max=128, max_new_tokens=160, temperature=0.6)
    elif args.what == "memory" and not account:  # one full rollout batch; training peaks at one micro-batch
        settings = {**vars(train.Config()), **train.PRESETS[preset]}
        defaults = dict(prompts=max(1, settings["rollout_batch"] // settings["group_size"]))
    elif args.what == "train" or account:  # the preset's settings
        defaults = {}
    elif args.what == "s1":  # eval.py's S1 settings
        defaults = dict(prompts=64, group_size=2, temperature=0.6, top_p=0.95)
    defaults.setdefault("top_p", 1.0)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    try:  # the place to write is checked before it runs: a benchmark can take an hour
        name = "memory-account.json" if account else f"{args.what}-{'gpu' if gpu else 'cpu'}.json"
        out = runs.output_file(str(Path(args.out) / name), "--out", ".json")
        runs.keep_existing(out, "--out", args.replace)
    except ValueError as e:
        sys.exit(f"error: {e}")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            model_name = random_qwen(Path(tmp) / "qwen-1.5b-random",
                                     model_lib.load_tokenizer(model_lib.embedded_model_dir())) if paper else args.model
            if account:
                result = bench_account(args, preset)
            elif args.what == "loss":
                result = bench_loss(args, device)
            elif args.what == "rollout":
                result = bench_rollout(args, model_name, device)
            elif args.what == "trl":
                result = bench_trl(args, model_name, device)
            elif args.what == "s1":
                result = bench_s1(args, model_name, device)
            elif args.what == "memory":
                try:
                    result = dict(fits=True, **bench_train(args, model_name, device, preset))
                except torch.cuda.OutOfMemoryError as e:  # the answer, not a failure of the benchmark
                    result = dict(fits=False, error=data.first_line(e))
                # the cap limits what the allocator reserves; a card also holds the CUDA context
                result.update(memory_cap_gb=args.memory_cap_gb,
                              peak_reserved_mb=torch.cuda.max_memory_reserved(device) / 2**20,
                              peak_allocated_mb=torch.cuda.max_memory_allocated(device) / 2**20)
                if paper:  # the account's bound for the same settings, beside what was measured
                    result["predicted_peak_mb"] = memory_account(QWEN_1_5B, preset_config(args, preset))["peak"] / 2**20
                print(f"{'fits' if result['fits'] else 'does NOT fit'} in {args.memory_cap_gb:g} GiB: peak reserved "
                      f"{result['peak_reserved_mb']:.0f} MiB, allocated {result['peak_allocated_mb']:.0f} MiB, the "
                      f"account's bound {result.get('predicted_peak_mb', float('nan')):.0f} MiB")
            else:
                result = bench_train(args, model_name, device, preset)
        except (ValueError, model_lib.ModelError) as e:
            sys.exit(f"error: {e}")
    if account:
        model = args.config or "bench.QWEN_1_5B"
    else:
        model = "a small random Llama (bench_loss)" if args.what == "loss" else args.model or (
            "random Qwen2 1.5B configuration" if paper else "embedded SmolLM2-135M-Instruct")
    result.update(what=args.what + " --account" * account,
                  command="python bench.py " + " ".join(argv if argv is not None else sys.argv[1:]), model=model,
                  device=torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads, "
                  f"{platform.processor() or platform.machine()}", date=time.strftime("%Y-%m-%d"),
                  torch=torch.__version__)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
