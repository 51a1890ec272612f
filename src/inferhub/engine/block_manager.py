"""The paged KV cache's bookkeeping: blocks, free list, reference counts, prefix caching.

No tensors here: the model runner owns the cache memory; this module decides which block
holds which token. Full blocks are hashed with a chain hash (the hash of the previous block
and this block's token ids) so a later prompt with the same prefix reuses them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from inferhub.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set once the block is full and computed
    token_ids: tuple[int, ...] = field(default_factory=tuple)


def chain_hash(prev_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((prev_hash if prev_hash is not None else -1, token_ids))


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


class BlockManager:
    """Allocates fixed-size KV blocks to sequences.

    Free blocks are kept in least-recently-freed order; a free block that still holds a
    cached prefix keeps its hash until it is handed out again (then the hash is dropped).
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._hash_to_block: dict[int, int] = {}
        self.prefix_hits = 0  # tokens served from the prefix cache (for metrics)
        self.prefix_queries = 0  # prompt tokens looked up

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return blocks_needed(num_tokens, self.block_size)

    # -- allocation ------------------------------------------------------------------------
    def _take_free_block(self) -> Block:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            if self._hash_to_block.get(block.block_hash) == block_id:
                del self._hash_to_block[block.block_hash]
            block.block_hash = None
            block.token_ids = ()
        block.ref_count = 1
        return block

    def _ref(self, block: Block) -> None:
        if block.ref_count == 0:
            del self._free[block.block_id]
        block.ref_count += 1

    def _unref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count < 0:
            raise RuntimeError(f"block {block_id} freed twice")
        if block.ref_count == 0:
            self._free[block_id] = None

    def allocate_prefix(self, seq: Sequence) -> int:
        """Attach cached full blocks of `seq`'s prefix; returns the number of cached tokens.

        Called once, before the first chunk of a sequence that holds no blocks. At least one
        token is always left to compute so that the step yields logits.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        max_full = (seq.num_tokens - 1) // bs
        prev: int | None = None
        self.prefix_queries += seq.num_tokens
        for i in range(max_full):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(prev, tokens)
            block_id = self._hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            self._ref(self.blocks[block_id])
            seq.block_table.append(block_id)
            prev = h
        num_cached = len(seq.block_table) * bs
        seq.num_hashed_blocks = len(seq.block_table)
        seq.last_block_hash = prev
        seq.num_computed_tokens = num_cached
        seq.num_cached_tokens = num_cached
        self.prefix_hits += num_cached
        return num_cached

    def can_allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self._blocks_to_add(seq, num_new_tokens) <= len(self._free)

    def _blocks_to_add(self, seq: Sequence, num_new_tokens: int) -> int:
        end = seq.num_computed_tokens + num_new_tokens
        need = self.blocks_needed(end) - len(seq.block_table)
        if self._needs_copy_on_write(seq):
            need += 1
        return max(need, 0)

    def _needs_copy_on_write(self, seq: Sequence) -> bool:
        """The block the next token goes to is shared with a sibling (n > 1)."""
        pos = seq.num_computed_tokens
        idx = pos // self.block_size
        if idx >= len(seq.block_table):
            return False
        return self.blocks[seq.block_table[idx]].ref_count > 1

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]] | None:
        """Give `seq` room for `num_new_tokens` more tokens.

        Returns the (src, dst) block copies the runner must do first (copy on write of a
        shared partial block), or None, leaving everything untouched, when memory is out.
        """
        if self._blocks_to_add(seq, num_new_tokens) > len(self._free):
            return None
        copies: list[tuple[int, int]] = []
        if self._needs_copy_on_write(seq):
            idx = seq.num_computed_tokens // self.block_size
            old = seq.block_table[idx]
            new = self._take_free_block()
            self._unref(old)
            seq.block_table[idx] = new.block_id
            copies.append((old, new.block_id))
        end = seq.num_computed_tokens + num_new_tokens
        while len(seq.block_table) < self.blocks_needed(end):
            seq.block_table.append(self._take_free_block().block_id)
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let `child` share every block of `parent` (copy on write later)."""
        child.block_table = list(parent.block_table)
        for block_id in child.block_table:
            self._ref(self.blocks[block_id])
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_hashed_blocks = parent.num_hashed_blocks
        child.last_block_hash = parent.last_block_hash

    def commit_computed_blocks(self, seq: Sequence) -> None:
        """Register the full, computed blocks of `seq` in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        while seq.num_hashed_blocks < num_full:
            i = seq.num_hashed_blocks
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(seq.last_block_hash, tokens)
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is None:
                block.block_hash = h
                block.token_ids = tokens
                self._hash_to_block.setdefault(h, block.block_id)
            seq.last_block_hash = h
            seq.num_hashed_blocks += 1

    def free(self, seq: Sequence) -> None:
        """Release every block of `seq` (in reverse, so the tail is evicted first)."""
        for block_id in reversed(seq.block_table):
            self._unref(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0
        seq.last_block_hash = None

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            if block.ref_count == 0:
                block.block_hash = None
                block.token_ids = ()
        self._hash_to_block = {
            h: b for h, b in self._hash_to_block.items() if self.blocks[b].ref_count > 0
        }
