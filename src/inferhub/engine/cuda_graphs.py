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
        # pinned staging for the host-to-device copies of each step
        self._host = torch.zeros(3, max_batch, dtype=torch.long).pin_memory()
        self._host_ctx = torch.zeros(max_batch, dtype=torch.int32).pin_memory()
        self._host_tables = torch.zeros(max_batch, self.width, dtype=torch.int32).pin_memory()

    def can_run(self, out: SchedulerOutput) -> bool:
        return (
            0 < len(out.seqs) <= self.max_batch
            and all(n == 1 for n in out.num_new_tokens)
            and not out.blocks_to_copy
        )

    def run(self, out: SchedulerOutput) -> torch.Tensor:
        """Replay the graph for this decode batch; returns hidden states (B, hidden)."""
        n = len(out.seqs)
        b = next(size for size in self.sizes if size >= n)
        bs = self.runner.block_size
        host = self._host
        host[:, :b].zero_()
        host[2, :b] = self.runner.scratch_slot
        ctx = self._host_ctx
        ctx[:b] = 1
        tables = self._host_tables
        tables[:b].zero_()
        for i, seq in enumerate(out.seqs):
            pos = seq.num_computed_tokens
            host[0, i] = seq.token_ids[pos]
            host[1, i] = pos
            host[2, i] = seq.block_table[pos // bs] * bs + pos % bs
            ctx[i] = pos + 1
            tables[i, : len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.int32)
        self.input_ids[:b].copy_(host[0, :b], non_blocking=True)
        self.positions[:b].copy_(host[1, :b], non_blocking=True)
        self.slots[:b].copy_(host[2, :b], non_blocking=True)
        self.ctx[:b].copy_(ctx[:b], non_blocking=True)
        self.tables[:b].copy_(tables[:b], non_blocking=True)
        self.graphs[b].replay()
        return self.out[:n]
