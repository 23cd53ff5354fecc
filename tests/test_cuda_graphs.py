"""The decode step at fixed shapes (cuda_graphs.py): on a CPU it runs eagerly, and must sample what the eager
loop samples; on a GPU a failed capture must lose nothing."""

import contextlib

import pytest
import torch

import cuda_graphs
import data
from sample import Decoder, generate
from tests.test_sample import MESSAGES, _grpo_rows


@pytest.fixture
def prompts(char_tokenizer):
    return [data.encode_prompt(char_tokenizer, m) for m in MESSAGES]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_fixed_shape_decode_drops_buckets_and_samples_what_the_eager_loop_samples(tiny_llama, char_tokenizer,
                                                                                   prompts, temperature, monkeypatch):
    monkeypatch.setattr(cuda_graphs, "MIN_BUCKET", 2)  # many buckets from a few rows: 15 rows -> 15, 8, 4, 2
    rows = _grpo_rows(prompts, G=4)[:15]
    limits = [2 + (5 * i) % 23 for i in range(len(rows))]
    free = generate(tiny_llama, rows, limits, char_tokenizer.pad_token_id, [], temperature,
                    generator=torch.Generator().manual_seed(3))
    stops = [free[0].tokens[1], free[9].tokens[4]]  # rows also end on their own, mid-batch
    widths = []  # rows in each forward pass
    hook = tiny_llama.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[0]),
                                                with_kwargs=True)
    runs = {}
    for static, decoder in ((False, Decoder), (True, cuda_graphs.StaticDecoder)):
        widths.clear()
        runs[static] = generate(tiny_llama, rows, limits, char_tokenizer.pad_token_id, stops, temperature,
                                generator=torch.Generator().manual_seed(3), make_decoder=decoder)
        decode = widths[1:]
    hook.remove()
    eager, fixed = runs[False], runs[True]
    assert [r.tokens for r in fixed] == [r.tokens for r in eager]
    assert [r.finish for r in fixed] == [r.finish for r in eager] and {r.finish for r in eager} == {"eos", "length"}
    for a, b in zip(fixed, eager):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert set(decode) <= {15, 8, 4, 2} and decode == sorted(decode, reverse=True) and decode[-1] < 15
    assert len(decode) == max(r.n_y for r in eager) - 1


def test_a_failed_cuda_graph_capture_falls_back_to_eager_steps(tiny_llama, char_tokenizer, prompts, monkeypatch,
                                                                capsys):
    class Stream:  # torch.cuda's streams and graphs as a CPU-only machine would need them to get as far as a capture
        def wait_stream(self, other):
            pass

    class FailingGraph:
        def __init__(self):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graphs, "MIN_BUCKET", 2)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FailingGraph)
    real_prefill = cuda_graphs.StaticDecoder.prefill

    def with_graphs(self, *args, **kwargs):
        logits = real_prefill(self, *args, **kwargs)
        self.graphs = {}  # as on a CUDA device
        return logits

    rows, limits = _grpo_rows(prompts), [4 + i for i in range(12)]
    eager = generate(tiny_llama, rows, limits, char_tokenizer.pad_token_id, [], 1.0,
                     generator=torch.Generator().manual_seed(5), make_decoder=Decoder)
    monkeypatch.setattr(cuda_graphs.StaticDecoder, "prefill", with_graphs)
    fallback = generate(tiny_llama, rows, limits, char_tokenizer.pad_token_id, [], 1.0,
                        generator=torch.Generator().manual_seed(5), make_decoder=cuda_graphs.StaticDecoder)
    assert [r.tokens for r in fallback] == [r.tokens for r in eager]  # the step the capture failed on is not lost
    assert capsys.readouterr().err.count("decoding eagerly") == 1
