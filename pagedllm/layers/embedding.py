"""Vocabulary-parallel embedding and LM head (each rank holds a contiguous vocab slice)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed.parallel_state import (
    get_tp_rank,
    get_tp_size,
    tp_all_gather,
    tp_all_reduce,
)
from pagedllm.ops import gemm


class VocabParallelEmbedding(nn.Module):
    """Rank r holds rows [r * V', (r + 1) * V') of the vocabulary, V' = ceil(vocab / tp); the
    last rank's rows past the vocabulary are padding: zero, never looked up, and their logits
    are cut off after the gather."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        tp = get_tp_size()
        self.vocab_size = vocab_size
        self.vocab_per_rank = -(-vocab_size // tp)
        self.vocab_start = get_tp_rank() * self.vocab_per_rank
        self.weight = nn.Parameter(torch.empty(self.vocab_per_rank, hidden_size),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        part = loaded[self.vocab_start:self.vocab_start + self.vocab_per_rank]
        param.data.zero_()
        param.data[: part.shape[0]].copy_(part)  # the last rank's padding rows stay zero

    def full_shards(self, param: nn.Parameter) -> list[tuple[object, tuple[int, ...]]]:
        return [(None, (self.vocab_size, param.shape[1]))]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if get_tp_size() == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.vocab_per_rank)
        out = F.embedding(local.clamp(0, self.vocab_per_rank - 1), self.weight)
        return tp_all_reduce(out * mine.unsqueeze(-1))


HEAD_QUANTIZATION = "q8_0"  # the LM head's blocks whatever --quantization is (prepack says why)


class ParallelLMHead(VocabParallelEmbedding):
    """logits = h E^T over this rank's vocab slice, gathered to the full vocabulary."""

    packed_weight: torch.Tensor | gemm.QuantizedWeight | None = None

    def prepack(self, quantization: str | None = None) -> None:
        # NOTE: a tied head shares the embedding's table; quantizing makes the head its own
        # blocks and leaves the table for the lookups. The head keeps 8 bits under any method,
        # as llama.cpp's 4-bit files keep their output tensor at 6-8: at 4 bits it moves the
        # logits most (the default model's greedy tokens part from fp32 within 16 tokens).
        self.packed_weight = gemm.prepack(self.weight, quantization and HEAD_QUANTIZATION)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = tp_all_gather(gemm.linear(hidden, self.weight, None, self.packed_weight),
                               dim=-1)
        return logits[..., : self.vocab_size]
