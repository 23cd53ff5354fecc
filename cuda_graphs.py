"""
The decode step of sample.generate at fixed shapes, so that a GPU can replay it from CUDA graphs.

A speed-up of generation on a GPU, not part of the method: sample.generate uses StaticDecoder in place of
sample.Decoder on a CUDA device, and it gives the same tokens (tests/test_cuda_graphs.py checks it on the CPU,
where every step runs eagerly). What it buys, and where: BENCHMARKS.md.
"""

import sys

import torch
import torch.nn.functional as F

MIN_BUCKET = 16  # fewest rows a fixed-shape decode step runs: below it a GPU step costs its launches


class StaticDecoder:
    """sample.Decoder at fixed shapes (prefill, keep, and a call that feeds a token to each row), so that a CUDA
    graph can replay the decode step.

    A decode step of a small model is a few hundred tiny kernels, each launched from Python: on a GPU
    the launches, not the arithmetic, set its cost. A CUDA graph records those kernels once and
    replays them with one launch, but only if every tensor they touch keeps its address and shape.
    So everything a step reads or writes is allocated once, at the prefill: the KV cache (rows x the
    prompt and max_new_tokens), the fed tokens, their positions, and an additive attention mask over
    every cache column (a column opens when its token is fed). The step runs on a bucket of rows, the
    smallest power of two (at least MIN_BUCKET) holding the rows at the front of those tensors; rows
    past them are padding and their logits are ignored. A finished row stays where it is, its logits
    ignored too, until the rows still generating fit a smaller bucket: only then are they moved to the
    front (`keep`), so that dropping finished rows still pays and a generation captures a handful of graphs.

    On a CUDA device each bucket's step is captured the first time it runs, and the first replay is
    checked against the eager step; a capture that fails or disagrees turns graphs off for the rest
    of the generation (eager steps, the same results). On a CPU every step runs eagerly.
    """

    def __init__(self, model, max_new_tokens: int):
        self.model, self.room = model, max_new_tokens

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                rows: torch.Tensor) -> torch.Tensor:
        """sample.Decoder.prefill, into a static cache with room for max_new_tokens more columns."""
        from transformers import StaticCache

        self.cache = StaticCache(config=self.model.config, max_cache_len=ids.shape[1] + self.room)
        mask = F.pad(mask, (0, self.room))  # the columns of the tokens to come, each opened when it is fed
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1]  # [P, V]
        self.cache.reorder_cache(rows)  # a batch row for each of rows from here on
        dtype, device = self.model.get_input_embeddings().weight.dtype, mask.device
        self.rows = len(rows)
        self.kv = [(layer.keys, layer.values) for layer in self.cache.layers]  # [rows, heads, columns, dim] each
        self.mask = torch.zeros((self.rows, mask.shape[1]), dtype=dtype, device=device)
        self.mask = self.mask.masked_fill(mask[rows] == 0, torch.finfo(dtype).min)[:, None, None, :]  # [rows, 1, 1, C]
        self.tokens = torch.zeros((self.rows, 1), dtype=torch.long, device=device)
        self.positions = positions[rows, -1:] + 1  # [rows, 1] the position of the token fed next
        self.column = ids.shape[1]  # the cache column of the token fed next
        self.slots = torch.arange(self.rows, device=device)  # where each row of the batch sits in these tensors
        self.front = self.rows  # the rows at the front of these tensors: the batch and the finished rows among it
        # bucket -> (graph, its logits); a graph needs the cache to count its own length on the device
        capturable = device.type == "cuda" and all(hasattr(layer, "cumulative_length") for layer in self.cache.layers)
        self.graphs = {} if capturable else None
        self.pool = None  # the graphs share one memory pool
        return logits[rows]

    def bucket(self, n: int) -> int:
        return min(self.rows, max(MIN_BUCKET, 1 << (n - 1).bit_length()))

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these rows of the batch (indices into it). They move to the front, in place (the addresses
        stay), only when that drops the batch to a smaller bucket."""
        self.slots = self.slots[rows]
        n = len(rows)
        if self.bucket(n) < self.bucket(self.front):
            for k, v in self.kv:
                k[:n], v[:n] = k[self.slots], v[self.slots]
            self.mask[:n], self.positions[:n] = self.mask[self.slots], self.positions[self.slots]
            self.slots, self.front = torch.arange(n, device=self.slots.device), n

    def forward(self, bucket: int) -> torch.Tensor:
        for layer, (k, v) in zip(self.cache.layers, self.kv):  # the cache seen by the model: the bucket's rows
            layer.keys, layer.values = k[:bucket], v[:bucket]
        return self.model(input_ids=self.tokens[:bucket], attention_mask=self.mask[:bucket],
                          position_ids=self.positions[:bucket], past_key_values=self.cache,
                          use_cache=True).logits[:, -1]  # [bucket, V]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row of the batch its token, tokens[rows]: the logits of the next, [rows, V]."""
        bucket = self.bucket(self.front)
        self.tokens[self.slots, 0] = tokens
        self.mask[:self.front, 0, 0, self.column] = 0.0
        if self.graphs is None:
            logits = self.forward(bucket)
        elif bucket in self.graphs:
            graph, logits = self.graphs[bucket]
            graph.replay()
        else:
            logits = self.capture(bucket)
        self.positions += 1
        self.column += 1
        return logits[self.slots]

    def capture(self, bucket: int) -> torch.Tensor:
        """Run this step eagerly (on a side stream, the warm-up a capture needs), then capture it and replay it."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            eager = self.forward(bucket).clone()
        torch.cuda.current_stream().wait_stream(side)
        for layer in self.cache.layers:  # the replay writes this step's keys and values again
            layer.cumulative_length.sub_(1)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self.forward(bucket)
            graph.replay()
            agree = torch.allclose(logits.float(), eager.float(), rtol=0, atol=1e-2 * eager.abs().max().item())
            problem = None if agree else "its logits differ from the eager step's"
        except RuntimeError as e:
            problem = f"capture failed: {e}"
            for layer in self.cache.layers:
                layer.cumulative_length.add_(1)
        if problem is not None:
            print(f"warning: CUDA graph of the decode step not used ({problem}); decoding eagerly",
                  file=sys.stderr)
            self.graphs = None
            return eager
        self.pool = graph.pool()
        self.graphs[bucket] = (graph, logits)
        return logits
