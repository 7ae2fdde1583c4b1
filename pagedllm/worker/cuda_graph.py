"""Decode steps on CUDA: static input buffers and one captured CUDA graph per padded batch size.

A decode step of an 8B model is ~450 kernels of a few microseconds each; launched from Python
they cost three times the step itself at batch 1. A CUDA graph replays them with no launch
overhead, but only on the tensors it was captured with, so every decode step writes its inputs
into the same buffers, padded to the next captured batch size:

    rows 0 .. n-1       the scheduled sequences (one new token each)
    rows n .. size-1    padding: slot_mapping -1 (no KV write), seq_lens 0 (attention reads
                        nothing and returns zeros); their hidden states are never read
    block_tables        [max_rows, M], M = blocks of max_model_len; columns past a
                        sequence's own blocks may hold stale ids and are never read

The decode kernel runs with max_seq_len=None: it bounds the context by the block-table width
(no host sync), which picks its split-K count once, at capture. A bound of max_model_len makes
a small batch of short sequences launch up to 64 mostly empty partitions per head and merge
them, so small batches (up to SHORT_MAX_SIZE) get a second graph, captured on the columns of
the first SHORT_TOKENS tokens, used while every context fits there.

Eager decode (enforce_eager) goes through the same buffers, padding and column windows and
simply runs the model instead of replaying: graphs and eager compute the same bits. (The runner
also works on a CPU device, eagerly, for tests of this bookkeeping; the engine uses it on CUDA
only.)
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from pagedllm.forward_context import AttentionMetadata, forward_context

logger = logging.getLogger(__name__)

MAX_CAPTURE_SIZE = 512  # larger decode batches run eagerly (launches are a small share there)
SHORT_MAX_SIZE = 32  # from 33 sequences x 8 KV heads the decode kernel needs no split anyway
SHORT_TOKENS = 1024  # context bound of the short-context graphs


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... : the padded decode batch sizes, up to max_num_seqs."""
    top = min(max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = [1, 2, 4] + list(range(8, top + 8, 8))
    return sorted({s for s in sizes if s < top} | {next(s for s in sizes if s >= top)})


class DecodeRunner:
    """Runs decode-only steps (every scheduled sequence has one new token) on CUDA.

    `prepare(scheduled)` fills the pinned host staging buffers and copies them to the device
    buffers; `run(n, short)` replays the graph of the padded size and context window (or runs
    the model eagerly on the same buffers) and returns the hidden states of the n real rows.
    """

    def __init__(self, model: nn.Module, max_num_seqs: int, max_model_len: int,
                 block_size: int, device: torch.device) -> None:
        self.model = model
        self.block_size = block_size
        self.sizes = capture_sizes(max_num_seqs)
        # Batches above the largest captured size are padded to a multiple of 8, eagerly.
        self.max_rows = max(self.sizes[-1], -(-max_num_seqs // 8) * 8)
        self.max_blocks = -(-max_model_len // block_size)
        rows, width = self.max_rows, self.max_blocks

        # Host staging (pinned, so the copies are truly asynchronous) mirrors two device
        # buffers, so that a step uploads its inputs in two copies:
        #   tokens  int64 [3, rows]: input ids, positions, slot_mapping
        #   ints    int32 [rows + rows * M]: seq_lens, then block_tables row by row
        cuda = device.type == "cuda"
        self._host_tokens = torch.zeros((3, rows), dtype=torch.int64, pin_memory=cuda)
        self._host_ints = torch.zeros(rows + rows * width, dtype=torch.int32, pin_memory=cuda)
        self._np_tokens = self._host_tokens.numpy()
        self._np_seq_lens = self._host_ints[:rows].numpy()
        self._np_tables = self._host_ints[rows:].view(rows, width).numpy()
        # Staging may be rewritten once the previous step's copies have passed this event.
        self._copied = torch.cuda.Event() if cuda else None

        self.tokens = torch.zeros((3, rows), dtype=torch.int64, device=device)
        self.tokens[2].fill_(-1)
        self._ints = torch.zeros(rows + rows * width, dtype=torch.int32, device=device)
        self.seq_lens = self._ints[:rows]
        self.block_tables = self._ints[rows:].view(rows, width)
        self.query_start_loc = torch.arange(rows + 1, dtype=torch.int32, device=device)
        # Small batches whose contexts fit in the first short_blocks columns have own graphs.
        self.short_blocks = SHORT_TOKENS // block_size
        if self.short_blocks >= width:
            self.short_blocks = 0  # max_model_len is short already: one kind of graph

        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_pool = None

    # ---- sizes -------------------------------------------------------------------------------
    def padded_size(self, n: int) -> int:
        for size in self.sizes:
            if size >= n:
                return size
        assert n <= self.max_rows, f"decode batch {n} > max_num_seqs"
        return -(-n // 8) * 8

    def can_run(self, n: int) -> bool:
        return 0 < n <= self.max_rows

    # ---- inputs ------------------------------------------------------------------------------
    def prepare(self, scheduled) -> tuple[int, bool]:
        """Write one decode token per scheduled sequence into the buffers; returns (n, short):
        n sequences, and whether all contexts fit the short-context graphs."""
        n = len(scheduled)
        size = self.padded_size(n)
        bs = self.block_size
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copies have read the staging
        ids, pos, slots = self._np_tokens
        tables = self._np_tables
        for i, e in enumerate(scheduled):
            seq, table = e.seq, e.block_ids
            p = seq.num_computed_tokens
            ids[i] = seq.token_ids[p]
            pos[i] = p
            slots[i] = table[p // bs] * bs + p % bs
            tables[i, : len(table)] = table
        ids[n:size] = 0
        pos[n:size] = 0
        slots[n:size] = -1
        seq_lens = self._np_seq_lens
        seq_lens[:n] = pos[:n] + 1
        seq_lens[n:size] = 0
        short = (size <= SHORT_MAX_SIZE and self.short_blocks > 0
                 and int(seq_lens[:n].max()) <= self.short_blocks * bs)

        self.tokens.copy_(self._host_tokens, non_blocking=True)
        used = self.max_rows + n * self.max_blocks  # seq_lens, then the first n table rows
        self._ints[:used].copy_(self._host_ints[:used], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        return n, short

    def _metadata(self, size: int, short: bool) -> AttentionMetadata:
        width = self.short_blocks if short else self.max_blocks
        return AttentionMetadata(
            slot_mapping=self.tokens[2, :size], block_tables=self.block_tables[:size, :width],
            seq_lens=self.seq_lens[:size], query_start_loc=self.query_start_loc[: size + 1],
            max_query_len=1,
            max_seq_len=None,  # the decode kernel bounds by the table width: no host sync
        )

    def _forward(self, size: int, short: bool) -> torch.Tensor:
        with forward_context(self._metadata(size, short)):
            return self.model(self.tokens[0, :size], self.tokens[1, :size])

    # ---- run ---------------------------------------------------------------------------------
    def run(self, n: int, short: bool = False) -> torch.Tensor:
        """Hidden states [n, hidden] of the prepared batch (a view into a static buffer: use
        it before the next step)."""
        size = self.padded_size(n)
        graph = self.graphs.get((size, short))
        if graph is None:
            return self._forward(size, short)[:n]
        graph[0].replay()
        return graph[1][:n]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per size (and per context window for small sizes), largest
        first, all sharing one memory pool (a smaller graph's activations fit in what the
        largest one reserved)."""
        start = time.perf_counter()
        before = torch.cuda.memory_reserved()
        self._copied.synchronize()
        self.tokens[2].fill_(-1)  # nothing is written to the KV cache while capturing
        self.seq_lens.zero_()
        keys = [(size, short) for size in reversed(self.sizes) for short in (False, True)
                if not short or (self.short_blocks and size <= SHORT_MAX_SIZE)]
        for key in keys:
            self._forward(*key)  # compiles this shape's kernel variants outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.graph_pool):
                out = self._forward(*key)
            if self.graph_pool is None:
                self.graph_pool = graph.pool()
            self.graphs[key] = (graph, out)
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs for decode batch sizes %s in %.1f s (%.2f GiB)",
                    len(self.graphs), _ranges(self.sizes), time.perf_counter() - start,
                    (torch.cuda.memory_reserved() - before) / 2**30)


def _ranges(sizes: list[int]) -> str:
    return f"{sizes[:5]}..{sizes[-1]}" if len(sizes) > 6 else str(sizes)
