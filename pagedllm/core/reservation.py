"""The paper's baselines: Orca-style KV allocators that reserve a request's whole cache upfront.

Each sequence gets one contiguous region from a buddy allocator (core/buddy.py) when its
prompt is first scheduled, sized by the policy, and keeps it until it finishes:

  orca-max      max_model_len slots (what a system must reserve without knowing the output)
  orca-pow2     prompt + the output length rounded up to a power of two (at most 2x too much)
  orca-oracle   prompt + the true output length (no over-reservation at all)

then rounded up to whole blocks and to a power-of-two number of blocks. The true output length
is the request's max_tokens (Sequence.max_num_tokens = prompt + max_tokens): exact in a replay,
where requests run to max_tokens with ignore_eos; for a request that stops early on EOS the
Pow2 and Oracle modes simply reserve for max_tokens (and without max_tokens, for the rest of
the context, as Max does).

A request whose region does not fit waits in the queue, though enough scattered free blocks
may exist: that is external fragmentation. A running sequence never needs more memory, so it
is never preempted. The model runner still sees a block table: the region's blocks in order
(`start, start + 1, ...`), so the same attention code computes the same tokens.

Not supported (rejected by the engine's config and at the door): prefix caching, n > 1 and beam
search (they share blocks between sequences), and swapping (nothing is ever preempted).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pagedllm.config import KV_ALLOCATORS
from pagedllm.core.buddy import BuddyAllocator, order_of
from pagedllm.core.kv_accounting import KVLedger, sequence_ledger
from pagedllm.core.sequence import Sequence

ORCA_POLICIES = KV_ALLOCATORS[1:]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0


@dataclass(slots=True)
class Region:
    seq: Sequence
    start: int  # first block id
    order: int  # the region holds 2**order blocks
    num_reserved: int  # slots the policy asked for (before rounding to blocks, then a power of 2)


class ReservationManager:
    """An Orca policy with BlockManager's surface, so the scheduler runs unchanged."""

    def __init__(self, num_blocks: int, block_size: int, policy: str,
                 max_model_len: int) -> None:
        if policy not in ORCA_POLICIES:
            raise ValueError(f"policy must be one of {', '.join(ORCA_POLICIES)}, got {policy!r}")
        self.policy = policy
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.pool = BuddyAllocator(num_blocks)
        self.regions: dict[int, Region] = {}  # seq_id -> its region
        self.cpu_block_tables: dict = {}  # never swaps: always empty

    # ---- the policy ---------------------------------------------------------------------------
    def final_len(self, seq: Sequence) -> int:
        """The sequence's true final length: prompt + max_tokens, within the context."""
        return min(seq.max_num_tokens, self.max_model_len)

    def num_reserved(self, seq: Sequence) -> int:
        if self.policy == "orca-max":
            return self.max_model_len
        final = self.final_len(seq)
        if self.policy == "orca-pow2":
            return min(seq.num_prompt_tokens + next_pow2(final - seq.num_prompt_tokens),
                       self.max_model_len)
        return final

    def region_order(self, seq: Sequence) -> int:
        return order_of(cdiv(self.num_reserved(seq), self.block_size))

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def get_block_ids(self, seq_id: int) -> list[int]:
        """The block table the model runner sees: the blocks of the policy's reservation, a
        contiguous run at the start of the region (its power-of-two tail is never used)."""
        r = self.regions.get(seq_id)
        if r is None:
            return []
        return list(range(r.start, r.start + cdiv(r.num_reserved, self.block_size)))

    def get_computed_blocks(self, seq: Sequence) -> list:
        return []  # no prefix caching

    def num_blocks_to_allocate(self, plan: list[tuple[Sequence, int, list]]) -> int:
        """Blocks the new regions of one step's plan take.

        NOTE: a buddy allocator's room is not a count of free blocks: a plan whose regions
        cannot be placed side by side reports one block more than are free, so the
        scheduler's single check (`need > num_free_blocks`) stays exact for both allocators.
        """
        orders = [self.region_order(seq) for seq, n, _ in plan
                  if n > 0 and seq.seq_id not in self.regions]
        if not self.pool.can_allocate(orders):
            return self.pool.num_free_blocks + 1
        return sum(1 << k for k in orders)

    def can_allocate(self, seq: Sequence, num_new_tokens: int, computed=()) -> bool:
        return self.num_blocks_to_allocate([(seq, num_new_tokens, [])]) <= self.num_free_blocks

    # ---- mutations -----------------------------------------------------------------------------
    def allocate_slots(self, seq: Sequence, num_new_tokens: int, computed=()
                       ) -> list[tuple[int, int]] | None:
        """Reserve the sequence's region on its first call; None (no change) if it does not
        fit. Later calls find the region already large enough."""
        assert not computed, "no prefix caching with a reservation allocator"
        r = self.regions.get(seq.seq_id)
        if r is None and num_new_tokens > 0:
            order = self.region_order(seq)
            start = self.pool.allocate(order)
            if start is None:
                return None
            r = self.regions[seq.seq_id] = Region(seq, start, order, self.num_reserved(seq))
        if r is not None:
            assert seq.num_computed_tokens + num_new_tokens <= r.num_reserved, (
                f"sequence {seq.seq_id} outgrew its reservation of {r.num_reserved} slots")
        return []

    def cache_blocks(self, seq: Sequence) -> None:
        pass  # no prefix caching

    def reset_prefix_cache(self) -> None:
        pass

    def fork(self, parent: Sequence, child: Sequence) -> None:
        raise ValueError(f"kv_allocator={self.policy!r} gives each sequence its own region; "
                         "n > 1 and beam search share blocks and need kv_allocator='paged'")

    def free(self, seq: Sequence) -> None:
        r = self.regions.pop(seq.seq_id, None)
        if r is not None:
            self.pool.free(r.start)

    def can_swap_out(self, seqs: list[Sequence]) -> bool:
        return False  # no swap pool: preemption (never needed) would recompute

    def can_swap_in(self, seqs: list[Sequence]) -> bool:
        return False

    # ---- accounting, checks --------------------------------------------------------------------
    def memory_ledger(self, seqs: Iterable[Sequence], blocked: bool) -> KVLedger:
        """The Fig. 2 split (core/kv_accounting.py); every region is counted, `seqs` is only
        checked against them."""
        assert {s.seq_id for s in seqs} >= set(self.regions), "a region's holder is missing"
        token = reserved = internal = external = 0
        for r in self.regions.values():
            t, res, i, e = sequence_ledger((1 << r.order) * self.block_size,
                                           r.seq.num_computed_tokens, self.final_len(r.seq),
                                           r.num_reserved)
            token, reserved, internal, external = token + t, reserved + res, internal + i, \
                external + e
        free = self.pool.num_free_blocks * self.block_size
        return KVLedger(token, reserved, internal, external + (free if blocked else 0),
                        0 if blocked else free)

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        assert {r.start: r.order for r in self.regions.values()} == self.pool.allocated, (
            "regions and the buddy allocator disagree")
        for seq_id, r in self.regions.items():
            assert r.seq.seq_id == seq_id
            assert r.num_reserved <= (1 << r.order) * self.block_size, f"region of {seq_id}"
            assert r.seq.num_computed_tokens <= r.num_reserved, f"sequence {seq_id} overflows"


def create_kv_allocator(kv_allocator: str, num_blocks: int, block_size: int,
                        enable_caching: bool, num_cpu_blocks: int, max_model_len: int,
                        sliding_window: int | None = None):
    """The engine's KV allocator: the paged BlockManager, or one of the Orca baselines (which
    keep a sliding-window sequence's whole region: Orca frees nothing before the end)."""
    if kv_allocator == "paged":
        from pagedllm.core.block_manager import BlockManager

        return BlockManager(num_blocks, block_size, enable_caching, num_cpu_blocks,
                            sliding_window)
    assert not enable_caching and not num_cpu_blocks, "checked by CacheConfig"
    return ReservationManager(num_blocks, block_size, kv_allocator, max_model_len)
