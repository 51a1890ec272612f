"""CUDA graphs for decode steps: one graph per padded batch size, replayed with new inputs.

A decode step launches hundreds of small kernels; replaying a recorded graph removes the
launch overhead that otherwise bounds small-batch decoding. Inputs live in static buffers;
padding rows write their K/V to the runner's scratch slot and attend to one position.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from inferhub.engine.scheduler import SchedulerOutput
from inferhub.layers.attention import AttentionMetadata

if TYPE_CHECKING:
    from inferhub.engine.model_runner import ModelRunner


def _sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8]
    sizes += list(range(16, max_batch + 1, 16))
    return sorted({b for b in sizes if b <= max_batch} | {max_batch})


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_batch: int, max_model_len: int) -> None:
        self.runner = runner
        dev = runner.device
        bs = runner.block_size
        self.max_batch = max_batch
        self.width = -(-max_model_len // bs)
        hidden = runner.model.config.hidden_size
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.slots = torch.full((max_batch,), runner.scratch_slot, dtype=torch.long, device=dev)
        self.tables = torch.zeros(max_batch, self.width, dtype=torch.int32, device=dev)
        self.ctx = torch.ones(max_batch, dtype=torch.int32, device=dev)
        self.out = torch.zeros(max_batch, hidden, dtype=runner.dtype, device=dev)
        self.sizes = _sizes(max_batch)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pool = None
        for b in reversed(self.sizes):
            meta = AttentionMetadata(
                slot_mapping=self.slots[:b],
                num_decode_tokens=b,
                decode=None,
                prefill=None,
                block_tables=self.tables[:b],
                context_lens=self.ctx[:b],
                block_size=bs,
            )
            with torch.inference_mode():
                for _ in range(2):  # warm up (Triton compiles, cuBLAS picks kernels)
                    self.out[:b] = runner.model(
                        self.input_ids[:b], self.positions[:b], runner.kv_caches, meta
                    )
                torch.cuda.synchronize(dev)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.out[:b] = runner.model(
                        self.input_ids[:b], self.positions[:b], runner.kv_caches, meta
                    )
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(dev)
        # pinned staging for the host-to-device copies of each step, filled through numpy
        # views (a tensor element write costs ~2 us: 256 sequences took ~4 ms a step)
        self._host = torch.zeros(3, max_batch, dtype=torch.long).pin_memory()
        self._host_ctx = torch.zeros(max_batch, dtype=torch.int32).pin_memory()
        self._host_tables = torch.zeros(max_batch, self.width, dtype=torch.int32).pin_memory()
        self._np = self._host.numpy()
        self._np_ctx = self._host_ctx.numpy()
        self._np_tables = self._host_tables.numpy()

    def can_run(self, out: SchedulerOutput) -> bool:
        return (
            0 < len(out.seqs) <= self.max_batch
            and all(n == 1 for n in out.num_new_tokens)
            and not out.blocks_to_copy
        )

    def run(self, out: SchedulerOutput) -> torch.Tensor:
        """Replay the graph for this decode batch; returns hidden states (B, hidden)."""
        seqs = out.seqs
        n = len(seqs)
        b = next(size for size in self.sizes if size >= n)
        bs = self.runner.block_size
        pos = [s.num_computed_tokens for s in seqs]
        host, ctx, tables = self._np, self._np_ctx, self._np_tables
        host[0, :n] = [s.token_ids[p] for s, p in zip(seqs, pos, strict=True)]
        host[1, :n] = pos
        host[2, :n] = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, pos, strict=True)]
        ctx[:n] = host[1, :n] + 1
        for i, s in enumerate(seqs):
            tables[i, : len(s.block_table)] = s.block_table
        # padding rows: write K/V to the scratch slot and attend to one position of block 0
        # (entries past a row's context are never read, so stale ones need no clearing)
        host[0:2, n:b] = 0
        host[2, n:b] = self.runner.scratch_slot
        ctx[n:b] = 1
        tables[n:b, 0] = 0
        self.input_ids[:b].copy_(self._host[0, :b], non_blocking=True)
        self.positions[:b].copy_(self._host[1, :b], non_blocking=True)
        self.slots[:b].copy_(self._host[2, :b], non_blocking=True)
        self.ctx[:b].copy_(self._host_ctx[:b], non_blocking=True)
        self.tables[:b].copy_(self._host_tables[:b], non_blocking=True)
        self.graphs[b].replay()
        return self.out[:n]
