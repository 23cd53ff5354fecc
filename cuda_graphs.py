"""
The decode step of sample.generate at fixed shapes, so that a GPU can replay it from CUDA graphs.

A speed-up of generation on a GPU, not part of the method: sample.generate(static_cache=True) uses it,
and gives the same tokens as its eager loop (tests/test_sample.py checks it on the CPU, where every
step runs eagerly). Whether it pays on a GPU, and where it is on by default: BENCHMARKS.md.
"""

import sys

import torch

MIN_BUCKET = 16  # fewest rows a fixed-shape decode step runs: below it a GPU step costs its launches


class StaticDecoder:
    """The decode step of `generate(static_cache=True)`: fixed shapes, so that a CUDA graph can replay it.

    A decode step of a small model is a few hundred tiny kernels, each launched from Python: on a GPU
    the launches, not the arithmetic, set its cost. A CUDA graph records those kernels once and
    replays them with one launch, but only if every tensor they touch keeps its address and shape.
    So everything a step reads or writes is allocated here once: the KV cache (rows x the longest
    sequence), the fed tokens, their positions, and an additive attention mask over every cache column
    (a column opens when its token is fed). The step runs on a bucket of rows, the smallest power of
    two (at least MIN_BUCKET) holding the rows still in the batch; rows past those are padding and
    their logits are ignored. generate() moves the live rows to the front (`keep`) only when that
    drops the batch to a smaller bucket, so compaction still pays and a generation captures a
    handful of graphs.

    On a CUDA device each bucket's step is captured the first time it runs, and the first replay is
    checked against the eager step; a capture that fails or disagrees turns graphs off for the rest
    of the generation (eager steps, the same results). On a CPU every step runs eagerly.
    """

    def __init__(self, model, cache, mask: torch.Tensor, positions: torch.Tensor):
        dtype = model.get_input_embeddings().weight.dtype
        self.model, self.cache, self.rows = model, cache, mask.shape[0]
        self.kv = [(layer.keys, layer.values) for layer in cache.layers]  # [rows, heads, columns, dim] each
        self.mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask == 0, torch.finfo(dtype).min)
        self.mask = self.mask[:, None, None, :]  # [rows, 1, 1, columns]
        self.tokens = torch.zeros((self.rows, 1), dtype=torch.long, device=mask.device)
        self.positions = positions.clone()  # [rows, 1] the position of the token fed next
        # bucket -> (graph, its logits); a graph needs the cache to count its own length on the device
        capturable = mask.device.type == "cuda" and all(hasattr(layer, "cumulative_length") for layer in cache.layers)
        self.graphs = {} if capturable else None
        self.pool = None  # the graphs share one memory pool

    def bucket(self, n: int) -> int:
        return min(self.rows, max(MIN_BUCKET, 1 << (n - 1).bit_length()))

    def keep(self, rows: torch.Tensor) -> None:
        """Move `rows` (indices into the batch) to its front, in place: the addresses stay."""
        n = len(rows)
        for k, v in self.kv:
            k[:n], v[:n] = k[rows], v[rows]
        self.mask[:n], self.positions[:n] = self.mask[rows], self.positions[rows]

    def forward(self, bucket: int) -> torch.Tensor:
        for layer, (k, v) in zip(self.cache.layers, self.kv):  # the cache seen by the model: the bucket's rows
            layer.keys, layer.values = k[:bucket], v[:bucket]
        return self.model(input_ids=self.tokens[:bucket], attention_mask=self.mask[:bucket],
                          position_ids=self.positions[:bucket], past_key_values=self.cache,
                          use_cache=True).logits[:, -1]  # [bucket, V]

    def __call__(self, tokens: torch.Tensor, column: int) -> torch.Tensor:
        """Feed tokens[n] (one per row at the front of the batch) at cache column `column`: their logits [n, V]."""
        n, bucket = len(tokens), self.bucket(len(tokens))
        self.tokens[:n, 0] = tokens
        self.mask[:n, 0, 0, column] = 0.0
        if self.graphs is None:
            logits = self.forward(bucket)
        elif bucket in self.graphs:
            graph, logits = self.graphs[bucket]
            graph.replay()
        else:
            logits = self.capture(bucket)
        self.positions += 1
        return logits[:n]

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
            problem = None if torch.allclose(logits.float(), eager.float(), rtol=0, atol=1e-2 * eager.abs().max().item()) \
                else "its logits differ from the eager step's"
        except RuntimeError as e:
            problem = f"capture failed: {e}"
            for layer in self.cache.layers:
                layer.cumulative_length.add_(1)
        if problem is not None:
            print(f"warning: CUDA graph of the decode step not used ({problem}); decoding eagerly", file=sys.stderr)
            self.graphs = None
            return eager
        self.pool = graph.pool()
        self.graphs[bucket] = (graph, logits)
        return logits
