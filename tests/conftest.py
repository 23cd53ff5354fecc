"""Shared test fixtures: everything is built here, nothing is downloaded."""

import json
import os
import string

# before any Hugging Face import: a test may never wait on (or reach) the network
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# before torch is imported: the tiny models run as fast on one thread as on two (3m11 against 3m22 for the
# suite on 2 cores), and one thread does not slow down 5-10x when another process shares the CPU
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from hypothesis import settings

settings.register_profile("ci", deadline=None, derandomize=True, max_examples=100)
settings.load_profile("ci")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_char_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """A character-level tokenizer: one id per printable character, plus a few special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<think>", "</think>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.printable))}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    raw.decoder = decoders.Fuse()
    raw.add_special_tokens(specials[:5])
    raw.add_tokens(specials[5:])  # as in R1-style tokenizers: whole tokens, but kept by skip_special_tokens
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture
def char_tokenizer():
    return make_char_tokenizer()


def make_tiny_llama(tokenizer, seed: int = 0, context: int = 512, init_std: float = 0.02):
    """A 2-layer Llama over the character vocabulary, random weights: fast enough for any test."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        initializer_range=init_std,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_llama(char_tokenizer):
    return make_tiny_llama(char_tokenizer)


@pytest.fixture
def tiny_model_dir(tmp_path, char_tokenizer):
    """The tiny Llama and its tokenizer saved as a Hugging Face model directory."""
    path = tmp_path / "tiny"
    make_tiny_llama(char_tokenizer).save_pretrained(path)
    char_tokenizer.save_pretrained(path)
    return path


# end to end on the tiny model


@pytest.fixture
def learnable_model_dir(tmp_path):
    # a wider initialisation than the default 0.02: with it the small adapter can move the EOS logit far
    tokenizer = make_char_tokenizer()
    path = tmp_path / "tiny"
    make_tiny_llama(tokenizer, init_std=0.1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_config(model_dir, **overrides):
    """train.py's Config for the tiny model: a few prompts, short targets, no quantization."""
    from train import Config

    settings = dict(model=str(model_dir), n_min=4, n_max=4, max_new_tokens=24, group_size=8, prompts_per_step=4,
                    quantize=False, lr=0.01, alpha=0.05, steps=30, save_every=100, sample_every=10, beta=0.001,
                    loss_norm="token", temperature=1.0)
    return Config(**{**settings, **overrides})


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
