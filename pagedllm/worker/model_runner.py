"""Turns a SchedulerOutput into one flat forward pass and samples the next tokens.

  flat batch (no padding between sequences), e.g. seq A prefilling 3 tokens, B and C decoding:
    input_ids       [a5 a6 a7 | b9 | c2]          positions [5 6 7 | 9 | 2]
    query_start_loc [0, 3, 4, 5]                  seq_lens  [8, 10, 3]
    slot_mapping    one cache slot per token       logits_indices [2, 3, 4] (last of each)

On CUDA, steps go through worker/cuda_graph.py instead: the same flat layout in static buffers,
padded to a captured shape (decode batch size, or token bucket for prefill and mixed steps) and
replayed as a CUDA graph; the CPU path is the flat batch above, unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.config import EngineConfig
from pagedllm.core.scheduler import SchedulerOutput
from pagedllm.forward_context import AttentionMetadata, forward_context
from pagedllm.layers.sampler import Sampler, SamplerOutput, SamplingMetadata, to_device
from pagedllm.loader import initialize_dummy_weights, iter_weights
from pagedllm.models.registry import get_model_class
from pagedllm.worker.cache_engine import CacheEngine, kv_block_bytes
from pagedllm.worker.cuda_graph import CudaGraphRunner, token_buckets

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StepTimer:
    """GPU busy time per step, from CUDA events (no extra host syncs).

    Each step records an event when its inputs are ready, before the forward pass, and one
    after the logits; everything between the end of one step and the start of the next is
    time the GPU waited for the host (scheduling, input preparation, output processing), give
    or take a few small kernels counted as idle (input copies, cache plans, the sampler):

        idle share = 1 - sum(step spans) / (last end - first begin)
    """

    def __init__(self) -> None:
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._begin: torch.cuda.Event | None = None

    def begin(self) -> None:
        self._begin = torch.cuda.Event(enable_timing=True)
        self._begin.record()

    def end(self) -> None:
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.events.append((self._begin, end))

    def summary(self) -> dict:
        if not self.events:
            return {"steps": 0}
        torch.cuda.synchronize()
        busy = sum(b.elapsed_time(e) for b, e in self.events)
        wall = self.events[0][0].elapsed_time(self.events[-1][1])
        n = len(self.events)
        return {"steps": n, "gpu_busy_ms": busy, "wall_ms": wall,
                "gpu_busy_ms_per_step": busy / n, "idle_ms_per_step": (wall - busy) / n,
                "idle_share": 1.0 - busy / wall if wall > 0 else 0.0}


@dataclass(slots=True)
class StepHandle:
    """A launched step's sampled ids: a list already (CPU), or a pinned host copy in flight
    that is complete once `ready` has passed."""

    token_ids: list[int] | None
    host: torch.Tensor | None
    ready: torch.cuda.Event | None


@dataclass(slots=True)
class ModelInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn_meta: AttentionMetadata
    logits_indices: torch.Tensor  # [N] rows of the hidden states that are sampled


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = _DTYPES[config.model.dtype]
        self.block_size = config.cache.block_size
        torch.manual_seed(config.model.seed)
        self.model = self._load_model()
        self.sampler = Sampler()
        self.cache_engine: CacheEngine | None = None
        self.graph_runner: CudaGraphRunner | None = None  # CUDA only; set up by init_cache
        self.step_timer: StepTimer | None = None  # CUDA only: set one to measure GPU busy time
        self._last_sampled: torch.Tensor | None = None  # the last launched step's ids [N]

    # ---- start-up --------------------------------------------------------------------------
    def _load_model(self) -> torch.nn.Module:
        mc = self.config.model
        cls = get_model_class(mc.hf_config)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = cls(mc.hf_config)
        finally:
            torch.set_default_dtype(prev)
        if mc.load_format == "dummy":
            initialize_dummy_weights(model, seed=mc.seed)
        else:
            model.load_weights(iter_weights(mc.model, mc.load_format, mc.hf_config))
        for module in model.modules():
            if hasattr(module, "prepack"):
                module.prepack()  # CPU-only: pre-packed GEMM weights (ops/gemm.py)
        return model.eval()

    def block_bytes(self) -> int:
        mc = self.config.model
        tp = self.config.parallel.tensor_parallel_size
        return kv_block_bytes(mc.num_layers, self.block_size, max(1, mc.num_kv_heads // tp),
                              mc.head_dim, self.dtype)

    def determine_num_blocks(self) -> int:
        """KV blocks that fit: the override, else a fixed CPU budget, else GPU memory profiling."""
        cc = self.config.cache
        if cc.num_gpu_blocks_override is not None:
            return cc.num_gpu_blocks_override
        if self.device.type != "cuda":
            return max(1, int(cc.cpu_kv_cache_gib * 2**30) // self.block_bytes())
        return self._profile_num_gpu_blocks()

    @torch.inference_mode()
    def _profile_num_gpu_blocks(self) -> int:
        """Run the largest batch once with a scratch cache, see the peak, give the rest to KV.

          total * gpu_memory_utilization
            = weights + peak activations (largest prefill + sampler over max_num_seqs rows)
              + memory of others (CUDA context, other processes) + KV cache
              + the CUDA graphs' pool
        The graphs are captured afterwards; their pool holds one forward pass of the largest
        graph (<= 2048 tokens) for good, beside what eager steps and the sampler allocate, so it
        is measured here the same way, with one more forward pass, and set aside.
        """
        sc = self.config.scheduler
        num_tokens = sc.max_num_batched_tokens
        seq_len = min(sc.max_model_len, num_tokens)
        num_seqs = -(-num_tokens // seq_len)
        scratch_blocks = num_seqs * -(-seq_len // self.block_size)
        torch.cuda.empty_cache()
        weights = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        scratch = CacheEngine(self.model, scratch_blocks, 0, self.block_size, self.device,
                              self.dtype)
        self._dummy_forward(num_seqs, seq_len, num_sampled=min(sc.max_num_seqs, num_tokens))
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - scratch_blocks * self.block_bytes()
        graph_pool = 0
        if not self.config.enforce_eager:
            graph_tokens = token_buckets(num_tokens)[-1]
            graph_len = min(sc.max_model_len, graph_tokens)
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self._dummy_forward(graph_tokens // graph_len, graph_len, num_sampled=0)
            torch.cuda.synchronize()
            graph_pool = torch.cuda.max_memory_allocated() - base
        del scratch
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        used_by_others = total - free - torch.cuda.memory_allocated()
        util = self.config.cache.gpu_memory_utilization
        budget = total * util - peak - used_by_others - graph_pool
        num_blocks = int(budget // self.block_bytes())
        gib = 2**30
        logger.info(
            "GPU memory: %.1f GiB total x gpu_memory_utilization %.2f = %.1f GiB: weights %.2f, "
            "activation peak %.2f, CUDA graph pool %.2f, CUDA context and others %.2f, KV cache "
            "%.2f GiB (%d blocks, %d tokens)", total / gib, util, total * util / gib,
            weights / gib, (peak - weights) / gib, graph_pool / gib, used_by_others / gib,
            max(num_blocks, 0) * self.block_bytes() / gib, max(num_blocks, 0),
            max(num_blocks, 0) * self.block_size)
        if num_blocks < 1:
            raise RuntimeError(
                f"no GPU memory left for the KV cache (peak {peak / gib:.1f} GiB of "
                f"{total / gib:.1f} GiB); raise gpu_memory_utilization or lower "
                "max_num_batched_tokens")
        return num_blocks

    def _dummy_forward(self, num_seqs: int, seq_len: int, num_sampled: int = 1) -> None:
        bs = self.block_size
        blocks_per_seq = -(-seq_len // bs)
        T = num_seqs * seq_len
        pos = torch.arange(seq_len, device=self.device).repeat(num_seqs)
        seq_idx = torch.arange(num_seqs, device=self.device).repeat_interleave(seq_len)
        slot = (seq_idx * blocks_per_seq) * bs + pos
        tables = torch.arange(num_seqs * blocks_per_seq, dtype=torch.int32,
                              device=self.device).view(num_seqs, blocks_per_seq)
        meta = AttentionMetadata(
            slot_mapping=slot, block_tables=tables,
            seq_lens=torch.full((num_seqs,), seq_len, dtype=torch.int32, device=self.device),
            query_start_loc=torch.arange(0, T + 1, seq_len, dtype=torch.int32, device=self.device),
            max_query_len=seq_len, max_seq_len=seq_len)
        ids = torch.zeros(T, dtype=torch.int64, device=self.device)
        with forward_context(meta):
            hidden = self.model(ids, pos)
        if num_sampled:  # the sampler's worst case: fp32 logits and logprobs for a full batch
            logits = self.model.compute_logits(hidden[-num_sampled:]).float()
            torch.log_softmax(logits, dim=-1).argmax(dim=-1)

    def init_cache(self, num_blocks: int, num_cpu_blocks: int) -> None:
        self.cache_engine = CacheEngine(self.model, num_blocks, num_cpu_blocks, self.block_size,
                                        self.device, self.dtype)
        if self.device.type == "cuda":
            sc = self.config.scheduler
            self.graph_runner = CudaGraphRunner(
                self.model, sc.max_num_seqs, sc.max_num_batched_tokens, sc.max_model_len,
                self.block_size, self.device)
            if not self.config.enforce_eager:
                self.graph_runner.capture()

    # ---- one step --------------------------------------------------------------------------
    def prepare_inputs(self, out: SchedulerOutput, sample_from: list[int] | None = None
                       ) -> ModelInputs:
        bs = self.block_size
        input_ids, positions, slots = [], [], []
        query_start_loc, seq_lens, logits_indices = [0], [], []
        max_blocks = max(len(e.block_ids) for e in out.scheduled)
        block_tables = np.zeros((len(out.scheduled), max_blocks), dtype=np.int32)
        for i, e in enumerate(out.scheduled):
            start = e.seq.num_computed_tokens
            end = start + e.num_new_tokens
            pos = np.arange(start, end)
            table = np.asarray(e.block_ids, dtype=np.int64)
            block_tables[i, : len(table)] = table
            input_ids.append(e.seq.token_ids[start:end])
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            query_start_loc.append(query_start_loc[-1] + e.num_new_tokens)
            seq_lens.append(end)
            if e.samples:
                logits_indices.append(query_start_loc[-1] - 1)
        dev = self.device

        def tensor(x, dtype):
            return torch.from_numpy(np.asarray(x)).to(dtype).to(dev, non_blocking=True)

        meta = AttentionMetadata(
            slot_mapping=tensor(np.concatenate(slots), torch.int64),
            block_tables=tensor(block_tables, torch.int32),
            seq_lens=tensor(np.asarray(seq_lens, dtype=np.int32), torch.int32),
            query_start_loc=tensor(np.asarray(query_start_loc, dtype=np.int32), torch.int32),
            max_query_len=max(e.num_new_tokens for e in out.scheduled),
            max_seq_len=max(seq_lens),
        )
        ids = [t for chunk in input_ids for t in chunk]
        if sample_from is not None:  # explicit rows; an entry may be sampled several times
            logits_indices = [query_start_loc[i + 1] - 1 for i in sample_from]
        return ModelInputs(
            input_ids=torch.tensor(ids, dtype=torch.int64).to(dev, non_blocking=True),
            positions=tensor(np.concatenate(positions), torch.int64),
            attn_meta=meta,
            logits_indices=torch.tensor(logits_indices, dtype=torch.int64).to(
                dev, non_blocking=True),
        )

    @torch.inference_mode()
    def execute(
        self,
        out: SchedulerOutput,
        sampling: SamplingMetadata | None,
        prompt_logprobs: dict[int, int] | None = None,
        sample_from: list[int] | None = None,
    ) -> tuple[SamplerOutput | None, dict[int, list]]:
        """Run cache plans, the forward pass and the sampler.

        sample_from: the scheduled entry behind each sampler row (default: every entry that
        samples, once). A group forking into n sequences samples one entry's logits n times.

        prompt_logprobs: seq_id -> k for sequences whose prompt logprobs are wanted; the result
        maps seq_id -> (first position, per-position rows from compute_prompt_logprobs).
        """
        hidden, sampled = self._forward(out, sample_from, [])
        if hidden is None:
            return None, {}
        result = None
        if sampling is not None and sampling.num_rows:
            logits = self.model.compute_logits(sampled).float()
            if self.step_timer is not None:
                self.step_timer.end()  # before the sampler's sync; its few small kernels idle
            result = self.sampler(logits, sampling)
        elif self.step_timer is not None:
            self.step_timer.end()
        prompt_rows = self._prompt_logprobs(out, hidden, prompt_logprobs) if prompt_logprobs \
            else {}
        return result, prompt_rows

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, sampling: SamplingMetadata | None,
               sample_from: list[int], from_device: list[tuple[int, int, int]]) -> StepHandle:
        """execute() for async scheduling: queue the step and return without waiting for it.

        from_device: (entry, offset in its chunk, row) for input tokens that are the previous
        launched step's sampled row `row`; they are copied on the device, never read back.
        The sampled ids start their copy to pinned host memory at once; collect() waits.
        """
        assert sampling is None or sampling.max_num_logprobs is None, "logprobs run in sync"
        hidden, sampled = self._forward(out, sample_from, from_device)
        if hidden is None or sampling is None or not sampling.num_rows:
            if hidden is not None and self.step_timer is not None:
                self.step_timer.end()
            return StepHandle([], None, None)
        logits = self.model.compute_logits(sampled).float()
        if self.step_timer is not None:
            self.step_timer.end()
        token_ids, _ = self.sampler.sample(logits, sampling)
        self._last_sampled = token_ids
        if token_ids.device.type != "cuda":
            return StepHandle(token_ids.tolist(), None, None)
        host = token_ids.to("cpu", non_blocking=True)  # pinned: a true async copy
        ready = torch.cuda.Event()
        ready.record()
        return StepHandle(None, host, ready)

    @staticmethod
    def collect(handle: StepHandle) -> list[int]:
        """The sampled ids of a launched step (waits for that step only)."""
        if handle.token_ids is None:
            handle.ready.synchronize()
            handle.token_ids = handle.host.tolist()
        return handle.token_ids

    def _forward(self, out: SchedulerOutput, sample_from: list[int] | None,
                 from_device: list[tuple[int, int, int]]
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Cache plans, inputs and the forward pass: (hidden states of every token, hidden
        states of the sampler rows), or (None, None) for an empty step."""
        self.cache_engine.execute_plan(out.blocks_to_swap_out, out.blocks_to_swap_in,
                                       out.blocks_to_copy)
        if not out.scheduled:
            return None, None
        timer = self.step_timer
        graphs = self.graph_runner
        if graphs is not None and graphs.can_run(out.scheduled):
            step = graphs.prepare(out.scheduled, sample_from)
            self._feed_sampled(step.input_ids, out, from_device)
            if timer is not None:
                timer.begin()
            hidden = graphs.run(step)  # [padded T, hidden], real tokens first in flat order
            sampled = hidden[:step.num_seqs] if step.logits_indices is None \
                else hidden[step.logits_indices]
            return hidden[:step.num_tokens], sampled
        inputs = self.prepare_inputs(out, sample_from)
        self._feed_sampled(inputs.input_ids, out, from_device)
        if timer is not None:
            timer.begin()
        with forward_context(inputs.attn_meta):
            hidden = self.model(inputs.input_ids, inputs.positions)  # [T, hidden]
        return hidden, hidden[inputs.logits_indices]

    def _feed_sampled(self, input_ids: torch.Tensor, out: SchedulerOutput,
                      from_device: list[tuple[int, int, int]]) -> None:
        """Copy the previous step's sampled ids into this step's input ids, on the device.
        Every path lays the real tokens out flat, in scheduled order, from index 0."""
        if not from_device:
            return
        starts, total = [], 0
        for e in out.scheduled:
            starts.append(total)
            total += e.num_new_tokens
        dst = [starts[i] + offset for i, offset, _ in from_device]
        src = [row for _, _, row in from_device]
        index = to_device([dst, src], torch.int64, self.device)  # no wait for the step in flight
        input_ids.index_copy_(0, index[0], self._last_sampled.index_select(0, index[1]))

    def _prompt_logprobs(self, out: SchedulerOutput, hidden: torch.Tensor, wanted: dict) -> dict:
        from pagedllm.layers.sampler import compute_prompt_logprobs

        rows = {}
        offset = 0
        for e in out.scheduled:
            seq, start = e.seq, e.seq.num_computed_tokens
            k = wanted.get(seq.seq_id)
            # Position p's logits predict token p + 1; only prompt tokens get prompt logprobs.
            end = min(start + e.num_new_tokens, seq.num_prompt_tokens - 1)
            if k is not None and end > start:
                logits = self.model.compute_logits(hidden[offset:offset + end - start]).float()
                nxt = torch.tensor(seq.token_ids[start + 1:end + 1], device=self.device)
                rows[seq.seq_id] = (start, compute_prompt_logprobs(logits, nxt, k))
            offset += e.num_new_tokens
        return rows

