"""Decode steps on CUDA: static input buffers and one captured CUDA graph per padded batch size.

A decode step of an 8B model is ~1,300 kernel launches of a few microseconds each; launched
from Python they cost more than the step itself at small batches. A CUDA graph replays them
with no launch overhead, but only on the tensors it was captured with, so every decode step
writes its inputs into the same buffers, padded to the next captured batch size:

    rows 0 .. n-1       the scheduled sequences (one new token each)
    rows n .. size-1    padding: slot_mapping -1 (no KV write), seq_lens 0 (attention reads
                        nothing and returns zeros); their hidden states are never read
    block_tables        [max_size, M], M = blocks of max_model_len; columns past a
                        sequence's own blocks may hold stale ids and are never read

The decode kernel then runs with max_seq_len=None (it takes M * block_size as its bound, no
host sync), so the captured launch configuration holds for every replay.

Eager decode (enforce_eager) goes through the same buffers and padding and simply runs the
model instead of replaying: graphs and eager compute the same bits.
"""

from __future__ import annotations

import itertools
import logging
import time

import numpy as np
import torch
from torch import nn

from pagedllm.forward_context import AttentionMetadata, forward_context

logger = logging.getLogger(__name__)

MAX_CAPTURE_SIZE = 512  # larger decode batches run eagerly (launches are a small share there)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... : the padded decode batch sizes, up to max_num_seqs."""
    top = min(max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = [1, 2, 4] + list(range(8, top + 8, 8))
    return sorted({s for s in sizes if s < top} | {next(s for s in sizes if s >= top)})


class DecodeRunner:
    """Runs decode-only steps (every scheduled sequence has one new token) on CUDA.

    `prepare(scheduled)` fills the pinned host staging buffers and copies them to the device
    buffers; `run(n)` replays the graph of the padded size (or runs the model eagerly on the
    same buffers) and returns the hidden states of the n real rows.
    """

    def __init__(self, model: nn.Module, max_num_seqs: int, max_model_len: int,
                 block_size: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.model = model
        self.block_size = block_size
        self.sizes = capture_sizes(max_num_seqs)
        # Batches above the largest captured size are padded to a multiple of 8, eagerly.
        self.max_rows = max(self.sizes[-1], -(-max_num_seqs // 8) * 8)
        self.max_blocks = -(-max_model_len // block_size)
        rows, width = self.max_rows, self.max_blocks

        # Host staging (pinned, so the copies are truly asynchronous) and device buffers.
        # ids/positions/slots share one int64 tensor: one copy moves all three.
        self._host_tokens = torch.zeros((3, rows), dtype=torch.int64, pin_memory=True)
        self._host_seq_lens = torch.zeros(rows, dtype=torch.int32, pin_memory=True)
        self._host_tables = torch.zeros(rows * width, dtype=torch.int32, pin_memory=True)
        self._np_tokens = self._host_tokens.numpy()
        self._np_seq_lens = self._host_seq_lens.numpy()
        self._np_tables = self._host_tables.numpy()
        self._copied = torch.cuda.Event()  # staging may be rewritten once this has passed

        self.tokens = torch.zeros((3, rows), dtype=torch.int64, device=device)
        self.tokens[2].fill_(-1)
        self.seq_lens = torch.zeros(rows, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((rows, width), dtype=torch.int32, device=device)
        self._tables_scratch = torch.zeros(rows * width, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(rows + 1, dtype=torch.int32, device=device)
        self.hidden_size, self.dtype = hidden_size, dtype

        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
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
    def prepare(self, scheduled) -> int:
        """Write one decode token per scheduled sequence into the buffers; returns n."""
        n = len(scheduled)
        size = self.padded_size(n)
        bs = self.block_size
        self._copied.synchronize()  # the previous step's copies have read the staging
        ids, pos, slots = self._np_tokens
        tables = []
        for i, e in enumerate(scheduled):
            seq, table = e.seq, e.block_ids
            p = seq.num_computed_tokens
            ids[i] = seq.token_ids[p]
            pos[i] = p
            slots[i] = table[p // bs] * bs + p % bs
            tables.append(table)
        ids[n:size] = 0
        pos[n:size] = 0
        slots[n:size] = -1
        seq_lens = self._np_seq_lens
        seq_lens[:n] = pos[:n] + 1
        seq_lens[n:size] = 0
        # Ragged block tables -> the first `width` columns of n rows, in one vectorised fill.
        lens = np.fromiter(map(len, tables), dtype=np.int64, count=n)
        width = int(lens.max())
        assert width <= self.max_blocks
        flat = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int32,
                           count=int(lens.sum()))
        dense = self._np_tables[: n * width].reshape(n, width)
        dense[np.arange(width)[None, :] < lens[:, None]] = flat

        self.tokens.copy_(self._host_tokens, non_blocking=True)
        self.seq_lens.copy_(self._host_seq_lens, non_blocking=True)
        scratch = self._tables_scratch[: n * width]
        scratch.copy_(self._host_tables[: n * width], non_blocking=True)
        self.block_tables[:n, :width].copy_(scratch.view(n, width))
        self._copied.record()
        return n

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.tokens[2, :size], block_tables=self.block_tables[:size],
            seq_lens=self.seq_lens[:size], query_start_loc=self.query_start_loc[: size + 1],
            max_query_len=1,
            max_seq_len=None,  # the decode kernel bounds by the table width: no host sync
        )

    def _forward(self, size: int) -> torch.Tensor:
        with forward_context(self._metadata(size)):
            return self.model(self.tokens[0, :size], self.tokens[1, :size])

    # ---- run ---------------------------------------------------------------------------------
    def run(self, n: int) -> torch.Tensor:
        """Hidden states [n, hidden] of the prepared batch (a view into a static buffer: use
        it before the next step)."""
        size = self.padded_size(n)
        graph = self.graphs.get(size)
        if graph is None:
            return self._forward(size)[:n]
        graph[0].replay()
        return graph[1][:n]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per size, largest first, all sharing one memory pool (a smaller
        graph's activations fit in what the largest one reserved)."""
        start = time.perf_counter()
        before = torch.cuda.memory_reserved()
        self._copied.synchronize()
        self.tokens[2].fill_(-1)  # nothing is written to the KV cache while capturing
        self.seq_lens.zero_()
        for size in reversed(self.sizes):
            self._forward(size)  # compiles this size's kernel variants outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.graph_pool):
                out = self._forward(size)
            if self.graph_pool is None:
                self.graph_pool = graph.pool()
            self.graphs[size] = (graph, out)
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs for decode batch sizes %s in %.1f s (%.2f GiB)",
                    len(self.graphs), _ranges(self.sizes), time.perf_counter() - start,
                    (torch.cuda.memory_reserved() - before) / 2**30)


def _ranges(sizes: list[int]) -> str:
    return f"{sizes[:5]}..{sizes[-1]}" if len(sizes) > 6 else str(sizes)
