"""Where the KV cache's memory goes: the paper's Fig. 2 split, measured at every step.

Each slot (one token's K and V in every layer) of the device pool is in one of five states.
For a sequence holding A slots, with C tokens computed, whose final length is F (its prompt +
max_tokens: the true length in a replay, where requests run to max_tokens with ignore_eos),
and for which the allocator's policy reserved R slots (paged: R = A, blocks come on demand):

  token states      C                  slots holding K/V of computed tokens
  reserved          min(A, F) - C      slots this sequence's future tokens will fill
  internal frag.    min(A, R) - F      reserved by the policy, never to be filled (Orca's
                    (when positive)    max_model_len or power-of-two guess; paged: the tail
                                       of the last block past the final token)
  external frag.    A - max(R, F)      held by the allocator beyond the policy's reservation
                    + free slots       (rounding to whole blocks and to a power of two), and
                      while a request  free slots that a request waiting for memory could not
                      waits for memory use ("external fragmentation & others" in the paper)
  unused            free slots while no request waits for memory (not waste: nothing wanted
                    them), left out of the shares

Shares are of the memory in use or lost (all slots but the unused ones), summed over steps:
share = sum over steps of a category / sum over steps of (pool - unused), a step-weighted
average. The paper labels buddy rounding as external fragmentation (its Orca-Oracle bar has
no internal fragmentation), and so does this split.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

from pagedllm.core.sequence import Sequence

if TYPE_CHECKING:
    from pagedllm.core.block_manager import BlockManager

CATEGORIES = ("token_states", "reserved", "internal_frag", "external_frag")


class KVLedger(NamedTuple):
    """One step's device KV pool, in token slots (the five add up to the pool's size)."""

    token_states: int
    reserved: int
    internal_frag: int
    external_frag: int
    unused: int

    @property
    def total(self) -> int:
        return sum(self)


def sequence_ledger(num_allocated: int, num_computed: int, final_len: int,
                    num_reserved: int) -> tuple[int, int, int, int]:
    """(token states, reserved, internal, external) slots of one sequence's allocation."""
    token = min(num_computed, num_allocated)
    reach = min(final_len, num_allocated)  # slots its tokens will ever fill
    internal = max(0, min(num_allocated, num_reserved) - reach)
    return token, reach - token, internal, num_allocated - reach - internal


def paged_ledger(bm: BlockManager, seqs: Iterable[Sequence], blocked: bool) -> KVLedger:
    """The split for the paged block manager; `seqs` are every sequence holding device blocks.

    Shared blocks (prefix hits, forks) are counted once: the slots the sequences' tables hold
    beyond the pool's used blocks are taken off the token states, as shared blocks hold
    computed tokens; so are table entries a sliding window released (full blocks whose tokens
    are no longer held). (A forked partial block is the exception until its first write copies
    it; its unfilled tail is then counted as token states, at most one block per fork.)
    """
    bs = bm.block_size
    token = reserved = internal = external = logical = 0
    for seq in seqs:
        num_allocated = len(bm.block_tables.get(seq.seq_id, ())) * bs
        logical += num_allocated
        t, r, i, e = sequence_ledger(num_allocated, seq.num_computed_tokens,
                                     seq.max_num_tokens, num_allocated)
        token, reserved, internal, external = token + t, reserved + r, internal + i, external + e
    free = bm.num_free_blocks * bs
    used = bm.pool.num_blocks * bs - free
    token -= max(0, logical - used)
    assert logical >= used, "a sequence holding blocks is missing from `seqs`"
    return KVLedger(token, reserved, internal, external + (free if blocked else 0),
                    0 if blocked else free)


class KVMemoryStats:
    """Ledgers summed over a run's steps; `shares()` are the step-weighted averages."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.num_steps = 0
        self.sums = KVLedger(0, 0, 0, 0, 0)
        self.last: KVLedger | None = None

    def record(self, ledger: KVLedger) -> None:
        self.num_steps += 1
        self.sums = KVLedger(*(a + b for a, b in zip(self.sums, ledger)))
        self.last = ledger

    def shares(self) -> dict[str, float]:
        """Each category's share of the memory in use or lost, and `unused`: the share of the
        whole pool that was free while nothing waited for memory."""
        s = self.sums
        in_use = s.total - s.unused
        out = {name: getattr(s, name) / in_use if in_use else 0.0 for name in CATEGORIES}
        out["unused"] = s.unused / s.total if s.total else 0.0
        return out
