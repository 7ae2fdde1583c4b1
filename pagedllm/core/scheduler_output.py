"""The scheduler's plan for one step (what the model runner executes) and its parts."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pagedllm.core.sequence import Sequence, SequenceGroup


class PreemptionMode(enum.Enum):
    RECOMPUTE = "recompute"
    SWAP = "swap"


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    group: SequenceGroup
    num_new_tokens: int
    block_ids: list[int]
    # Parallel sampling: sequences forked from `seq` this step, sampling from its logits.
    forks: list[Sequence] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the sequence, so its last logits are sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device, cpu)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)  # (cpu, device)
    preempted: list[SequenceGroup] = field(default_factory=list)
    # Groups that cannot fit in the KV cache even alone: the engine fails them with this reason.
    rejected: list[tuple[SequenceGroup, str]] = field(default_factory=list)
    # A waiting or swapped group stayed out for lack of KV memory (the accounting then counts
    # the free slots as lost to external fragmentation, core/kv_accounting.py).
    waiting_for_blocks: bool = False
    # Admission control (only with max_waiting / max_queued_tokens): the requests added since
    # the last step that were kept, and those refused because the queue is full.
    admitted: list[SequenceGroup] = field(default_factory=list)
    refused: list[tuple[SequenceGroup, str]] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)
