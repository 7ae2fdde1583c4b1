"""CUDA steps: static input buffers, padded shapes, and one captured CUDA graph per shape.

A step of an 8B model is ~500 kernels of a few microseconds each; launched from Python they
cost several times the step itself unless the batch is large. A CUDA graph replays them with no
launch overhead, but only on the tensors it was captured with, so every step copies its
FlatBatch (worker/flat_batch.py, the one builder of a step's inputs) into the same buffers,
padded to a captured shape:

  tokens  int64 [3, T'], T' = T rounded up to 16 (aligned rows for the Triton kernels):
          input ids, positions, slot_mapping, of which the first T (padded tokens) are used
    0 .. t-1        the real tokens, entry by entry in scheduled order (t of them)
    t .. T-1        padding: id 0, position 0, slot -1 (no KV write); their rows are garbage,
                    and never read (every op but attention is row-wise)
    then R int64    the R rows to sample (read after the graph; uploaded with the same copy)
  ints    int32: seq_lens [max_rows] | query_start_loc [max_rows + 1] (+7 to align the next)
          | block_tables [max_rows, M]
    rows 0 .. s-1   the s scheduled sequences
    rows s .. S-1   padding: seq_lens 0, query_start_loc t (q_len 0): attention reads nothing
    block_tables    M = blocks of max_model_len; columns past a sequence's own blocks hold stale
                    ids and are never read

Two kinds of shape (StepShape, the graph key):
  decode  one new token per sequence: T = S = the next capture size (1, 2, 4, 8, 16, 24, ..).
          The decode kernel runs with max_seq_len=None: it bounds the context by the block-table
          width (no host sync), which picks its split-K count once, at capture. A bound of
          max_model_len makes a small batch of short sequences launch up to 64 mostly empty
          partitions per head, so small batches (up to SHORT_MAX_SIZE) get a second graph on
          the first SHORT_TOKENS tokens' columns, used while every context fits there.
  mixed   prefill chunks, with or without decode rows: T = the next token bucket. The prefill
          kernel sizes its grid from shapes (T // BLOCK_Q + S tiles), and q_len 0 rows exit at
          once. Its tile size follows tokens per row (prefill_block_m), so S is padded not to
          max_rows but to the most rows that keep the tile size of the real batch: 255 decode
          rows and a 300-token chunk keep 16-row tiles, 8 prompts of 256 keep 128-row ones
          (at most three graphs per bucket).

Token buckets: 16, 32, 64, 128, 256 (below ~256 tokens the GEMMs are bound by reading the
weights, so padding costs next to nothing), then every 128 to 1024 and every 256 to 2048 (at
most 1/8 to 1/4 of a step is padding). A step of more tokens than MAX_GRAPH_TOKENS runs eagerly
on the same buffers, unpadded: it is GPU-bound (an 8B model spends ~40 ms in its kernels,
longer than launching them), so a graph would save nothing and padding would cost compute.

All graphs share one memory pool and copy their output into one static buffer, so a graph's
activations are dead once it returns and the next capture reuses them: the pool holds about one
forward pass of the largest bucket. Eager steps (enforce_eager) go through the same buffers,
padding and windows and run the model instead of replaying: graphs and eager compute the same
bits. (The runner also works on a CPU device, eagerly, for tests of this bookkeeping; the engine
uses it on CUDA only.)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from pagedllm.forward_context import AttentionMetadata, forward_context
from pagedllm.layers.attention import Attention
from pagedllm.worker.flat_batch import FlatBatch

try:
    from pagedllm.ops.triton.paged_prefill import prefill_block_m
except ImportError:  # no triton: the PyTorch twin has no tiles, any row padding will do
    prefill_block_m = None

logger = logging.getLogger(__name__)

MAX_CAPTURE_SIZE = 512  # larger decode batches run eagerly (launches are a small share there)
SHORT_MAX_SIZE = 32  # from 33 sequences x 8 KV heads the decode kernel needs no split anyway
SHORT_TOKENS = 1024  # context bound of the short-context graphs
MAX_GRAPH_TOKENS = 2048  # larger mixed steps are GPU-bound: eager, unpadded


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... : the padded decode batch sizes, up to max_num_seqs."""
    top = min(max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = [1, 2, 4] + list(range(8, top + 8, 8))
    return sorted({s for s in sizes if s < top} | {next(s for s in sizes if s >= top)})


def token_buckets(max_num_batched_tokens: int) -> list[int]:
    """16, 32, 64, 128, 256, 384, .., 1024, 1280, .., 2048 (then every 512, should
    MAX_GRAPH_TOKENS be raised): padded token counts of mixed steps, up to
    max_num_batched_tokens (itself the last one where it is smaller)."""
    top = min(max_num_batched_tokens, MAX_GRAPH_TOKENS)
    buckets = ([16, 32, 64, 128] + list(range(256, 1024, 128)) + list(range(1024, 2048, 256))
               + list(range(2048, top + 512, 512)))
    return sorted({b for b in buckets if b < top} | {top})


class StepShape(NamedTuple):
    """A padded step: the graph key (eager steps above the buckets have one too, unpadded)."""

    num_tokens: int  # T
    num_seqs: int  # S
    decode: bool  # one token per row: the decode kernel (else the prefill kernel)
    short: bool  # decode only: block tables cut to the first SHORT_TOKENS tokens


@dataclass(slots=True)
class StepInputs:
    """One step copied into the runner's buffers, as `prepare` returns it: the FlatBatch's real
    tokens and rows come first, in its order, then the padding."""

    shape: StepShape
    num_tokens: int  # real tokens (they come first)
    num_seqs: int  # real sequences
    input_ids: torch.Tensor  # [shape.num_tokens] int64 on the device: the step's token ids
    logits_indices: torch.Tensor | None  # [R] rows to sample; None: rows 0 .. num_seqs - 1


class CudaGraphRunner:
    """Runs every CUDA step whose sequences fit max_rows and whose tokens fit the buffers.

    `prepare(batch)` copies a FlatBatch into pinned host staging, pads it, and starts the copy
    to the device buffers (two copies); `run(step)` replays the graph of the step's shape (or
    runs the model eagerly on the same buffers) and returns the hidden states of all its
    padded rows.
    """

    def __init__(self, model: nn.Module, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, block_size: int, device: torch.device) -> None:
        self.model = model
        self.block_size = block_size
        self.sizes = capture_sizes(max_num_seqs)
        self.buckets = token_buckets(max_num_batched_tokens)
        # Batches above the largest captured size are padded to a multiple of 8, eagerly.
        self.max_rows = max(self.sizes[-1], -(-max_num_seqs // 8) * 8)
        self.max_tokens = max(max_num_batched_tokens, self.max_rows)
        self.max_blocks = -(-max_model_len // block_size)
        rows, width = self.max_rows, self.max_blocks
        attn = next(m for m in model.modules() if isinstance(m, Attention))
        self.group = attn.num_heads // attn.num_kv_heads
        # bucket -> {tile rows: most padded rows keeping them}; see _padded_rows
        self._rows_by_tile = {b: self._tile_table(b) for b in self.buckets}

        # Host staging (pinned, so the copies are truly asynchronous) mirrors the two device
        # buffers; room for 3 rows of tokens plus as many sampled rows as tokens.
        cuda = device.type == "cuda"
        self._capacity = 4 * _stride(self.max_tokens)
        self._tables_at = 2 * rows + 8  # rows is a multiple of 8: 32-byte aligned
        self._host_tokens = torch.zeros(self._capacity, dtype=torch.int64, pin_memory=cuda)
        self._host_ints = torch.zeros(self._tables_at + rows * width, dtype=torch.int32,
                                      pin_memory=cuda)
        self._np_tokens = self._host_tokens.numpy()
        ints = self._host_ints.numpy()
        self._np_seq_lens, self._np_qsl = ints[:rows], ints[rows:2 * rows + 1]
        self._np_tables = ints[self._tables_at:].reshape(rows, width)
        # Staging may be rewritten once the previous step's copies have passed this event.
        self._copied = torch.cuda.Event() if cuda else None

        self._tokens = torch.zeros(self._capacity, dtype=torch.int64, device=device)
        self._ints = torch.zeros(self._tables_at + rows * width, dtype=torch.int32,
                                 device=device)
        self.seq_lens = self._ints[:rows]
        self.query_start_loc = self._ints[rows:2 * rows + 1]
        self.block_tables = self._ints[self._tables_at:].view(rows, width)
        # Small batches whose contexts fit in the first short_blocks columns have own graphs.
        self.short_blocks = SHORT_TOKENS // block_size
        if self.short_blocks >= width:
            self.short_blocks = 0  # max_model_len is short already: one kind of graph

        self.graphs: dict[StepShape, torch.cuda.CUDAGraph] = {}
        self.graph_pool = None
        self._out: torch.Tensor | None = None  # [T, hidden]: every graph's output, in turn

    # ---- shapes ------------------------------------------------------------------------------
    def padded_size(self, n: int) -> int:
        """The padded batch size of a decode step of n sequences."""
        for size in self.sizes:
            if size >= n:
                return size
        assert n <= self.max_rows, f"decode batch {n} > max_num_seqs"
        return -(-n // 8) * 8

    def token_bucket(self, num_tokens: int) -> int | None:
        """The padded token count of a mixed step; None above the largest bucket (eager)."""
        return next((b for b in self.buckets if b >= num_tokens), None)

    def _tile_table(self, bucket: int) -> dict[int, int]:
        """{BLOCK_M: the most rows (<= bucket, max_rows) for which a bucket-token batch gets
        that tile size}. prefill_block_m does not increase with rows, so each tile size
        holds for one interval of row counts; we keep the interval's top."""
        top = min(bucket, self.max_rows)
        if prefill_block_m is None:
            return {0: top}
        return {prefill_block_m(bucket, s, self.group): s for s in range(1, top + 1)}

    def _padded_rows(self, bucket: int, num_tokens: int, num_seqs: int) -> int:
        """Rows of the mixed graph for a step of num_tokens tokens over num_seqs sequences:
        the most rows at which the bucket gets the tile size the flat batch would get. (Where
        the bucket's tiles are larger even at its most rows, those most rows.)"""
        table = self._rows_by_tile[bucket]
        want = prefill_block_m(num_tokens, num_seqs, self.group) if prefill_block_m else 0
        rows = table.get(want, min(bucket, self.max_rows))
        assert rows >= num_seqs
        return rows

    def can_run(self, batch: FlatBatch) -> bool:
        """Whether the step fits the buffers (else: the flat eager path of the model runner)."""
        return 0 < len(batch.seq_lens) <= self.max_rows and batch.num_tokens <= self.max_tokens

    # ---- inputs ------------------------------------------------------------------------------
    def prepare(self, batch: FlatBatch) -> StepInputs:
        """Copy the flat batch into the staging buffers, pad it to its step shape (see the
        module docstring) and start the copy to the device."""
        n, t = len(batch.seq_lens), batch.num_tokens
        decode = batch.max_query_len == 1
        if decode:
            T = S = self.padded_size(n)
        else:
            T = self.token_bucket(t)
            S = n if T is None else self._padded_rows(T, t, n)
            T = t if T is None else T
        width = batch.block_tables.shape[1]
        assert width <= self.max_blocks, f"a block table of {width} blocks > max_model_len"
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copies have read the staging
        st = _stride(T)
        ids, pos, slots = self._np_tokens[:3 * st].reshape(3, st)[:, :T]
        ids[:t], ids[t:] = batch.input_ids, 0
        pos[:t], pos[t:] = batch.positions, 0
        slots[:t], slots[t:] = batch.slot_mapping, -1
        self._np_seq_lens[:n], self._np_seq_lens[n:S] = batch.seq_lens, 0
        self._np_qsl[:n + 1], self._np_qsl[n + 1:S + 1] = batch.query_start_loc, t
        # Columns past `width` keep stale ids: no row reads past its own blocks.
        self._np_tables[:n, :width] = batch.block_tables
        short = (decode and S <= SHORT_MAX_SIZE and self.short_blocks > 0
                 and batch.max_seq_len <= self.short_blocks * self.block_size)

        # A decode step that samples every row once, in order, reads hidden[:n]: no gather.
        rows, used, logits_indices = batch.logits_indices, 3 * st, None
        if not (decode and np.array_equal(rows, np.arange(n))):
            if used + len(rows) <= self._capacity:  # uploaded with the tokens: one copy
                self._np_tokens[used:used + len(rows)] = rows
                logits_indices = self._tokens[used:used + len(rows)]
                used += len(rows)
            else:  # more sampler rows than tokens (n > 1 forks of tiny steps): rare
                logits_indices = torch.from_numpy(rows).to(self._tokens.device)
        self._tokens[:used].copy_(self._host_tokens[:used], non_blocking=True)
        used = self._tables_at + n * self.max_blocks  # seq_lens, qsl, the first n tables
        self._ints[:used].copy_(self._host_ints[:used], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        return StepInputs(StepShape(T, S, decode, short), t, n, self._tokens[:T], logits_indices)

    def _token_rows(self, T: int) -> torch.Tensor:
        """[3, T] device view: input ids, positions, slot_mapping of a T-token step."""
        st = _stride(T)
        return self._tokens[:3 * st].view(3, st)[:, :T]

    def _metadata(self, shape: StepShape) -> AttentionMetadata:
        T, S = shape.num_tokens, shape.num_seqs
        width = self.short_blocks if shape.short else self.max_blocks
        return AttentionMetadata(
            slot_mapping=self._token_rows(T)[2], block_tables=self.block_tables[:S, :width],
            seq_lens=self.seq_lens[:S], query_start_loc=self.query_start_loc[:S + 1],
            max_query_len=1 if shape.decode else T,  # T: an upper bound, > 1 (prefill kernel)
            max_seq_len=None,  # the decode kernel bounds by the table width: no host sync
        )

    def _forward(self, shape: StepShape) -> torch.Tensor:
        ids, positions, _ = self._token_rows(shape.num_tokens)
        with forward_context(self._metadata(shape)):
            return self.model(ids, positions)

    # ---- run ---------------------------------------------------------------------------------
    def run(self, step: StepInputs) -> torch.Tensor:
        """Hidden states [T, hidden] of every padded row of the prepared step, real tokens
        first (a view into a static buffer when replayed: use it before the next step)."""
        graph = self.graphs.get(step.shape)
        if graph is None:
            return self._forward(step.shape)
        graph.replay()
        return self._out[:step.shape.num_tokens]

    def graph_shapes(self) -> list[StepShape]:
        """Every shape to capture, largest first (a smaller graph's activations fit in what
        the largest one reserved in the shared pool)."""
        shapes = [StepShape(size, size, True, short) for size in self.sizes
                  for short in (False, True)
                  if not short or (self.short_blocks and size <= SHORT_MAX_SIZE)]
        shapes += [StepShape(b, s, False, False) for b in self.buckets
                   for s in sorted(set(self._rows_by_tile[b].values()))]
        return sorted(shapes, key=lambda s: (s.num_tokens, s.num_seqs, s.decode, not s.short),
                      reverse=True)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per shape of graph_shapes(), all sharing one memory pool."""
        start = time.perf_counter()
        torch.cuda.empty_cache()  # as every capture does: the growth below is then the pool's
        before = torch.cuda.memory_reserved()
        self._copied.synchronize()
        self._ints.zero_()  # seq_lens and query_start_loc 0: attention reads nothing
        shapes = self.graph_shapes()
        for shape in shapes:
            T = shape.num_tokens
            tokens = self._token_rows(T)
            tokens[:2].zero_()
            tokens[2].fill_(-1)  # nothing is written to the KV cache while capturing
            out = self._forward(shape)  # compiles this shape's kernel variants outside
            if self._out is None:  # the largest shape comes first
                self._out = torch.empty((T, out.shape[-1]), dtype=out.dtype, device=out.device)
            del out
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.graph_pool):
                self._out[:T].copy_(self._forward(shape))
            if self.graph_pool is None:
                self.graph_pool = graph.pool()
            self.graphs[shape] = graph
        torch.cuda.synchronize()
        num_decode = sum(s.decode for s in shapes)
        logger.info("captured %d CUDA graphs (%d decode: batch sizes %s; %d mixed: token "
                    "buckets %s) in %.1f s, pool %.2f GiB", len(shapes), num_decode,
                    _ranges(self.sizes), len(shapes) - num_decode, _ranges(self.buckets),
                    time.perf_counter() - start, (torch.cuda.memory_reserved() - before) / 2**30)


def _stride(num_tokens: int) -> int:
    return -(-num_tokens // 16) * 16


def _ranges(sizes: list[int]) -> str:
    return f"{sizes[:5]}..{sizes[-1]}" if len(sizes) > 6 else str(sizes)
