"""Turns a scheduled step into tensors, runs the model and returns the sampled rows' logits.

Owns the KV cache memory: per layer a key and a value tensor of shape
(num_blocks * block_size, num_kv_heads, head_dim); slot s holds token s % block_size of
block s // block_size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from inferhub.engine.scheduler import SchedulerOutput

if TYPE_CHECKING:
    from inferhub.engine.cuda_graphs import DecodeGraphs
from inferhub.engine.sequence import Sequence
from inferhub.layers.attention import (
    KERNEL_BACKENDS,
    AttentionGroup,
    AttentionMetadata,
    PrefillKernelInputs,
)
from inferhub.models.qwen2 import KVCache, Qwen2ForCausalLM


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,)
    meta: AttentionMetadata
    order: list[int]  # batch position of each scheduled sequence (decodes first)
    last_token_index: list[int]  # flat index of each scheduled sequence's last new token


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):
        return 4 << 30


def kv_bytes_per_block(model: Qwen2ForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.config
    elem = torch.finfo(dtype).bits // 8
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


def _padded_tables(seqs: list[Sequence], width: int) -> list[list[int]]:
    """Each sequence's block table cut or padded with zeros to `width` blocks, ready for one
    torch.tensor call (a tensor per row cost ~0.7 ms a 64-sequence decode step)."""
    return [(s.block_table + [0] * width)[:width] for s in seqs]


def _block_tables(seqs: list[Sequence], device: torch.device) -> torch.Tensor:
    """The sequences' block tables, padded to the longest, as one (B, blocks) int32 tensor
    on the device (what the kernels that walk the tables themselves read)."""
    width = max(len(s.block_table) for s in seqs)
    return torch.tensor(_padded_tables(seqs, width), dtype=torch.int32).to(device)


class ModelRunner:
    def __init__(
        self,
        model: Qwen2ForCausalLM,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        backend: str = "sdpa",
    ) -> None:
        self.model = model
        self.backend = backend
        model.set_attention_backend(backend)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = device
        self.dtype = dtype
        cfg = model.config
        # One extra block at the end: padding rows of a CUDA-graph batch write there.
        slots = (num_blocks + 1) * block_size
        self.scratch_slot = num_blocks * block_size
        self.kv_caches: list[KVCache] = [
            (
                torch.zeros(
                    slots, cfg.num_key_value_heads, cfg.head_dim, dtype=dtype, device=device
                ),
                torch.zeros(
                    slots, cfg.num_key_value_heads, cfg.head_dim, dtype=dtype, device=device
                ),
            )
            for _ in range(cfg.num_hidden_layers)
        ]
        self.graphs: DecodeGraphs | None = None

    # -- inputs ----------------------------------------------------------------------------
    def _group(
        self,
        seqs: list[Sequence],
        starts: list[int],
        lens: list[int],
        flat_offset: int,
    ) -> AttentionGroup:
        """Padded attention inputs for `seqs`, whose new tokens sit at consecutive flat
        indices starting at `flat_offset` (relative to the group's first token)."""
        b = len(seqs)
        q_max = max(lens)
        ctx_lens = [s + n for s, n in zip(starts, lens, strict=True)]
        l_max = max(ctx_lens)
        bs = self.block_size
        max_blocks = -(-l_max // bs)
        table = torch.tensor(_padded_tables(seqs, max_blocks), dtype=torch.long)
        pos = torch.arange(max_blocks * bs)  # (L,) context positions, whole blocks
        starts_t = torch.tensor(starts).unsqueeze(1)  # (B, 1)
        lens_t = torch.tensor(lens).unsqueeze(1)
        qi = torch.arange(q_max).unsqueeze(0)  # (1, Q)
        q_valid = qi < lens_t  # (B, Q)
        firsts = torch.tensor([0, *lens[:-1]]).cumsum(0)  # each sequence's first flat row
        offsets = firsts.unsqueeze(1) + flat_offset
        q_index = torch.where(q_valid, offsets + qi, offsets)  # (B, Q)
        q_pos = starts_t + qi  # (B, Q) absolute position of each query
        mask = pos.view(1, 1, -1) <= q_pos.unsqueeze(2)  # (B, Q, L)
        dev = self.device
        all_from_start = all(s == 0 for s in starts)
        return AttentionGroup(
            q_index=q_index.to(dev),
            q_valid=q_valid.to(dev),
            blocks=table.to(dev),
            mask=mask.unsqueeze(1).to(dev),  # (B, 1, Q, L)
            all_valid=all(n == q_max for n in lens),
            context_len=ctx_lens[0] if b == 1 else None,
            all_from_start=all_from_start,
            num_tokens=sum(lens),
            bounds=torch.stack([firsts, lens_t.squeeze(1)]).to(torch.int32)
            if self.backend == "cpu" and all_from_start
            else None,
        )

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        decode_idx = [i for i, n in enumerate(out.num_new_tokens) if n == 1]
        prefill_idx = [i for i, n in enumerate(out.num_new_tokens) if n > 1]
        # chunks that continue a context, then first chunks (see AttentionMetadata)
        fresh_idx = [i for i in prefill_idx if out.seqs[i].num_computed_tokens == 0]
        cont_idx = [i for i in prefill_idx if out.seqs[i].num_computed_tokens > 0]
        order = decode_idx + cont_idx + fresh_idx
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last_index = [0] * len(out.seqs)
        bs = self.block_size
        for i in order:
            seq = out.seqs[i]
            start = seq.num_computed_tokens
            n = out.num_new_tokens[i]
            input_ids.extend(seq.token_ids[start : start + n])
            table = seq.block_table
            for p in range(start, start + n):
                positions.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            last_index[i] = len(input_ids) - 1

        def group(idx: list[int]) -> AttentionGroup | None:
            if not idx:
                return None
            seqs = [out.seqs[i] for i in idx]
            return self._group(
                seqs,
                [s.num_computed_tokens for s in seqs],
                [out.num_new_tokens[i] for i in idx],
                0,
            )

        dev = self.device
        kernel_prefill = self.backend == "triton" and bool(prefill_idx)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long).to(dev),
            num_decode_tokens=len(decode_idx),
            decode=None if self.backend in KERNEL_BACKENDS else group(decode_idx),
            prefill=None if kernel_prefill else group(cont_idx),
            prefill_fresh=None if kernel_prefill else group(fresh_idx),
            block_size=bs,
        )
        if kernel_prefill:
            pre = cont_idx + fresh_idx
            seqs = [out.seqs[i] for i in pre]
            lens = [out.num_new_tokens[i] for i in pre]
            ints = torch.tensor(
                [
                    [last_index[i] - n + 1 for i, n in zip(pre, lens, strict=True)],
                    lens,
                    [s.num_computed_tokens for s in seqs],
                ],
                dtype=torch.int32,
            ).to(dev)
            meta.prefill_kernel = PrefillKernelInputs(
                block_tables=_block_tables(seqs, dev),
                q_start=ints[0],
                q_len=ints[1],
                ctx_start=ints[2],
                max_q_len=max(lens),
            )
        if decode_idx and self.backend in KERNEL_BACKENDS:
            seqs = [out.seqs[i] for i in decode_idx]
            meta.block_tables = _block_tables(seqs, dev)
            meta.context_lens = torch.tensor(
                [s.num_computed_tokens + 1 for s in seqs], dtype=torch.int32
            ).to(dev)
        return StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.long).to(dev),
            positions=torch.tensor(positions, dtype=torch.long).to(dev),
            meta=meta,
            order=order,
            last_token_index=last_index,
        )

    # -- run -------------------------------------------------------------------------------
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        bs = self.block_size
        src = torch.tensor([s * bs + j for s, _ in pairs for j in range(bs)], device=self.device)
        dst = torch.tensor([d * bs + j for _, d in pairs for j in range(bs)], device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache.index_copy_(0, dst, k_cache[src])
            v_cache.index_copy_(0, dst, v_cache[src])

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, sample: list[int]) -> torch.Tensor:
        """Run one step; returns float32 logits (len(sample), vocab) for the scheduled
        sequences at indices `sample` (those that finish their pending tokens)."""
        self.copy_blocks(out.blocks_to_copy)
        if self.graphs is not None and self.graphs.can_run(out):
            hidden = self.graphs.run(out)  # row i is scheduled sequence i
            last = list(range(len(out.seqs)))
        else:
            inputs = self.prepare(out)
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
            last = inputs.last_token_index
        if not sample:
            return torch.empty(0, self.model.config.vocab_size, device=self.device)
        rows = [last[i] for i in sample]
        if rows == list(range(len(rows))):  # every row in order (decode steps): no gather,
            return self.model.compute_logits(hidden[: len(rows)])  # no host-to-device copy
        return self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])

    def capture_cuda_graphs(self, max_batch: int, max_model_len: int) -> None:
        """Record decode steps as CUDA graphs (triton backend on CUDA only)."""
        from inferhub.engine.cuda_graphs import DecodeGraphs

        if self.device.type != "cuda" or self.backend != "triton":
            return
        self.graphs = DecodeGraphs(self, max_batch, max_model_len)
