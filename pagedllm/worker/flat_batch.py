"""The flat batch of one step, built on the host (numpy) and moved to a device in one place.

  seq A prefilling 3 tokens, B and C decoding:
    input_ids       [a5 a6 a7 | b9 | c2]          positions [5 6 7 | 9 | 2]
    query_start_loc [0, 3, 4, 5]                  seq_lens  [8, 10, 3]
    slot_mapping    one cache slot per token       logits_indices [2, 3, 4] (last of each)

`build_flat_batch` is the only builder: rank 0 builds a `StepPlan` from the SchedulerOutput and
every tensor-parallel rank runs that same plan (the other ranks never see a Sequence), so a
plan holds plain numpy arrays and lists: cheap to pickle and identical on every rank. On CUDA
at tp = 1 the graph runner (worker/cuda_graph.py) copies the same arrays into its static
buffers and pads them; it derives nothing from the scheduled sequences itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pagedllm.core.scheduler import ScheduledSeq
from pagedllm.forward_context import AttentionMetadata


@dataclass(slots=True)
class FlatBatch:
    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    block_tables: np.ndarray  # [S, max_blocks] int32
    seq_lens: np.ndarray  # [S] int32
    query_start_loc: np.ndarray  # [S + 1] int32
    logits_indices: np.ndarray  # [N] int64: rows of the hidden states that are sampled
    max_query_len: int
    max_seq_len: int

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    def to_device(self, device: torch.device) -> ModelInputs:
        def tensor(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(x).to(device, non_blocking=True)

        meta = AttentionMetadata(
            slot_mapping=tensor(self.slot_mapping), block_tables=tensor(self.block_tables),
            seq_lens=tensor(self.seq_lens), query_start_loc=tensor(self.query_start_loc),
            max_query_len=self.max_query_len, max_seq_len=self.max_seq_len)
        return ModelInputs(tensor(self.input_ids), tensor(self.positions), meta,
                           tensor(self.logits_indices))


@dataclass(slots=True)
class ModelInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn_meta: AttentionMetadata
    logits_indices: torch.Tensor  # [N] rows of the hidden states that are sampled


def build_flat_batch(scheduled: list[ScheduledSeq], block_size: int,
                     sample_from: list[int] | None = None) -> FlatBatch:
    """The one builder of a step's inputs: the eager path and every tensor-parallel rank run
    this batch as it is; the CUDA-graph path copies it into its padded static buffers.

    sample_from: the scheduled entry behind each sampled row (an entry may be sampled several
    times); default: each entry that reaches the end of its sequence, once."""
    bs, n = block_size, len(scheduled)
    query_start_loc = np.zeros(n + 1, dtype=np.int32)
    np.cumsum([e.num_new_tokens for e in scheduled], out=query_start_loc[1:])
    T = int(query_start_loc[-1])
    input_ids = np.empty(T, dtype=np.int64)
    positions = np.empty(T, dtype=np.int64)
    slot_mapping = np.empty(T, dtype=np.int64)
    seq_lens = np.empty(n, dtype=np.int32)
    block_tables = np.zeros((n, max(len(e.block_ids) for e in scheduled)), dtype=np.int32)
    for i, e in enumerate(scheduled):
        seq, table, q = e.seq, e.block_ids, e.num_new_tokens
        p, k = seq.num_computed_tokens, query_start_loc[i]
        if q == 1:  # scalar writes: most entries of a large batch are decode rows
            input_ids[k] = seq.token_ids[p]
            positions[k] = p
            slot_mapping[k] = table[p // bs] * bs + p % bs
        else:
            pos = np.arange(p, p + q)
            input_ids[k:k + q] = seq.token_ids[p:p + q]
            positions[k:k + q] = pos
            slot_mapping[k:k + q] = np.asarray(table)[pos // bs] * bs + pos % bs
        block_tables[i, :len(table)] = table
        seq_lens[i] = p + q
    if sample_from is None:
        sample_from = [i for i, e in enumerate(scheduled) if e.samples]
    return FlatBatch(
        input_ids=input_ids, positions=positions, slot_mapping=slot_mapping,
        block_tables=block_tables, seq_lens=seq_lens, query_start_loc=query_start_loc,
        # an entry's last token's row: its logits predict the next token
        logits_indices=query_start_loc[np.asarray(sample_from, dtype=np.int64) + 1]
        .astype(np.int64) - 1,
        max_query_len=max(e.num_new_tokens for e in scheduled),
        max_seq_len=int(seq_lens.max()),
    )


@dataclass(slots=True)
class StepPlan:
    """One step as every rank runs it: cache plans, then the forward pass, then the LM head on
    the sampled rows and on the prompt-logprob slices (the LM head is a collective at tp > 1,
    so every rank computes the same logits; only rank 0 samples from them).

    batch is None only for a step with no tokens (cache plans alone).
    """

    blocks_to_swap_out: list[tuple[int, int]]
    blocks_to_swap_in: list[tuple[int, int]]
    blocks_to_copy: list[tuple[int, int]]
    num_tokens: int
    batch: FlatBatch | None = None
    sample: bool = False  # compute logits of the sampled rows
    # (scheduled entry, first position, first hidden row, rows): prompt logprob slices
    prompt_slices: list[tuple[int, int, int, int]] = field(default_factory=list)
