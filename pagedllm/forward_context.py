"""Per-step attention metadata, scoped to one forward pass (never a free-floating global)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """The flat batch of one step (no padding between sequences).

    tokens of all scheduled sequences are concatenated:
      seq i's query tokens are query_start_loc[i] : query_start_loc[i+1]
      and sit at the end of its context of seq_lens[i] tokens.
    """

    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token (-1: skip)
    block_tables: torch.Tensor  # [S, max_blocks] int32
    seq_lens: torch.Tensor  # [S] int32: context length including this step's tokens
    query_start_loc: torch.Tensor  # [S + 1] int32
    max_query_len: int
    max_seq_len: int | None  # None: unknown (CUDA-graph decode; kernels bound it by shapes)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


_current: AttentionMetadata | None = None
_memo: dict | None = None


@contextmanager
def forward_context(meta: AttentionMetadata):
    global _current, _memo
    prev = _current, _memo
    _current, _memo = meta, {}
    try:
        yield meta
    finally:
        _current, _memo = prev


def step_memo() -> dict | None:
    """Values every layer of the current forward pass would otherwise work out again (the
    rotary tables of its positions, the KV write's slots), or None outside a forward pass.
    It lives for one forward pass only, so nothing in it outlasts the step's inputs."""
    return _memo


T = TypeVar("T")


def per_pass(tag: object, tensors: tuple[torch.Tensor, ...], compute: Callable[[], T]) -> T:
    """compute(), once per forward pass for these very tensors and tag (the step memo), or at
    every call outside a pass. Tensors match by identity, and the memo holds them: no other
    tensor can take an id they hold while the pass lasts."""
    memo = _memo
    if memo is None:
        return compute()
    key = (tag, *map(id, tensors))
    hit = memo.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], tensors)):
        return hit[1]
    value = compute()
    memo[key] = (tensors, value)
    return value


def get_attention_metadata() -> AttentionMetadata:
    assert _current is not None, "attention called outside `with forward_context(meta):`"
    return _current
