"""Turns a SchedulerOutput into one flat forward pass and samples the next tokens.

A step is planned on the host (`plan_step` -> StepPlan: cache plans + the flat batch of
worker/flat_batch.py), run by every tensor-parallel rank (`run_plan`: cache plans, forward, LM
head), and sampled by rank 0 only (`execute_plan` / `launch_plan`).

On CUDA at tp = 1, the runner hands that same flat batch to worker/cuda_graph.py, which copies
it into static buffers padded to a captured shape (decode batch size, or token bucket for
prefill and mixed steps) and replays a CUDA graph; the CPU path runs the flat batch as it is.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from pagedllm.config import EngineConfig
from pagedllm.core.scheduler import SchedulerOutput
from pagedllm.distributed.parallel_state import get_tp_size
from pagedllm.forward_context import AttentionMetadata, forward_context
from pagedllm.layers.attention import Attention
from pagedllm.layers.sampler import (
    Sampler, SamplerOutput, SamplingMetadata, compute_prompt_logprobs, to_device,
)
from pagedllm.loader import initialize_dummy_weights, iter_weights
from pagedllm.logger import log_phase
from pagedllm.models.registry import get_model_class
from pagedllm.ops import backend, batch_invariant
from pagedllm.worker.cache_engine import CacheEngine, kv_block_bytes, kv_cache_torch_dtype
from pagedllm.worker.cpu_threads import CpuThreadGovernor
from pagedllm.worker.cuda_graph import CudaGraphRunner, token_buckets
from pagedllm.worker.flat_batch import FlatBatch, ModelInputs, StepPlan, build_flat_batch

__all__ = ["ModelInputs", "ModelRunner", "StepHandle", "StepPlan"]

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


class ModelRunner:
    """One tensor-parallel rank's model, KV cache and step execution (rank 0 also samples).

    Build it after `init_tensor_parallel`: the layers read the tp size and rank when built.
    """

    def __init__(self, config: EngineConfig, device_index: int = 0) -> None:
        self.config = config
        self.device = torch.device("cuda", device_index) if config.device == "cuda" \
            else torch.device(config.device)
        self.dtype = _DTYPES[config.model.dtype]
        self.kv_cache_dtype = kv_cache_torch_dtype(config.cache.cache_dtype, self.dtype)
        self.block_size = config.cache.block_size
        torch.manual_seed(config.model.seed)
        # Build the modules, load (de-quantize) the weights, pre-pack CPU GEMM weights.
        with log_phase(logger, "loading the model %s",
                       os.path.basename(os.path.normpath(config.model.model))):
            self.model = self._load_model()
        backend.prepare(self.device, self.dtype, self.kv_cache_dtype)
        self.batch_invariant = batch_invariant.resolve(config.batch_invariant, self.device,
                                                       self.dtype, self.kv_cache_dtype,
                                                       self.model)
        # CPU: the intra-op team follows the idle cores (worker/cpu_threads.py says why).
        self.cpu_threads = CpuThreadGovernor(torch.get_num_threads()) \
            if self.device.type == "cpu" else None
        self.sampler = Sampler()
        self.cache_engine: CacheEngine | None = None
        self.graph_runner: CudaGraphRunner | None = None  # CUDA only; set up by init_cache
        self.step_timer: StepTimer | None = None  # CUDA only: set one to measure GPU busy time
        self._last_sampled: torch.Tensor | None = None  # the last launched step's ids [N]

    # ---- start-up --------------------------------------------------------------------------
    def _load_model(self) -> torch.nn.Module:
        mc = self.config.model
        cls = get_model_class(mc.hf_config, mc.max_model_len)
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
        quantization = mc.quantization
        for module in model.modules():
            if hasattr(module, "prepack"):  # CPU-only: pre-packed or quantized weights (gemm.py)
                module.prepack(quantization)
        if quantization is not None:
            _log_quantized(model, quantization)
        return model.eval()

    def block_bytes(self) -> int:
        """Bytes of one block on this rank: its own KV heads (replicated when tp > KV heads)."""
        attn = next(m for m in self.model.modules() if isinstance(m, Attention))
        return kv_block_bytes(self.config.model.num_layers, self.block_size, attn.num_kv_heads,
                              attn.head_dim, self.kv_cache_dtype)

    def determine_num_blocks(self) -> int:
        """KV blocks that fit: the override, else a fixed CPU budget, else GPU memory profiling."""
        cc = self.config.cache
        if cc.num_gpu_blocks_override is not None:
            return cc.num_gpu_blocks_override
        if self.device.type != "cuda":
            return max(1, int(cc.cpu_kv_cache_gib * 2**30) // self.block_bytes())
        with log_phase(logger, "profiling GPU memory: the largest step once (%d tokens)",
                       self.config.scheduler.max_num_batched_tokens):
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
                              self.kv_cache_dtype)
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
                                        self.device, self.kv_cache_dtype)
        # NOTE: not at tp > 1: the other ranks get the flat batch of the plan, so rank 0 must
        # run that same batch, and gloo/NCCL collectives are not captured (config.py says so).
        if self.device.type == "cuda" and get_tp_size() == 1:
            sc = self.config.scheduler
            self.graph_runner = CudaGraphRunner(
                self.model, sc.max_num_seqs, sc.max_num_batched_tokens, sc.max_model_len,
                self.block_size, self.device)
            if not self.config.enforce_eager:
                self.graph_runner.capture()

    # ---- one step --------------------------------------------------------------------------
    def prepare_inputs(self, out: SchedulerOutput, sample_from: list[int] | None = None
                       ) -> ModelInputs:
        return build_flat_batch(out.scheduled, self.block_size, sample_from).to_device(self.device)

    def plan_step(self, out: SchedulerOutput, sampling: SamplingMetadata | None,
                  sample_from: list[int] | None = None,
                  prompt_logprobs: dict[int, int] | None = None) -> StepPlan:
        """The host side of a step (rank 0): what every rank runs (see StepPlan)."""
        plan = StepPlan(out.blocks_to_swap_out, out.blocks_to_swap_in, out.blocks_to_copy,
                        num_tokens=out.num_batched_tokens,
                        sample=sampling is not None and sampling.num_rows > 0)
        if not out.scheduled:
            return plan
        plan.batch = build_flat_batch(out.scheduled, self.block_size, sample_from)
        first_row = plan.batch.query_start_loc
        for i, e in enumerate(out.scheduled if prompt_logprobs else ()):
            seq, start = e.seq, e.seq.num_computed_tokens
            # Position p's logits predict token p + 1; only prompt tokens get prompt logprobs.
            end = min(start + e.num_new_tokens, seq.num_prompt_tokens - 1)
            if seq.seq_id in prompt_logprobs and end > start:
                plan.prompt_slices.append((i, start, int(first_row[i]), end - start))
        return plan

    @torch.inference_mode()
    def run_plan(self, plan: StepPlan, from_device: list[tuple[int, int, int]] = ()
                 ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Every rank's part of a step: cache plans, forward pass, LM head (a collective at
        tp > 1). Returns (fp32 logits of the sampled rows or None, logits of each prompt
        slice). from_device: see launch (rank 0 at tp = 1 only)."""
        self.cache_engine.execute_plan(plan.blocks_to_swap_out, plan.blocks_to_swap_in,
                                       plan.blocks_to_copy)
        if not plan.num_tokens:
            return None, []
        if self.cpu_threads is not None:
            self.cpu_threads.before_step()
        with batch_invariant.scope(self.batch_invariant):
            hidden, sampled = self._forward(plan.batch, from_device)
            logits = self.model.compute_logits(sampled).float() if plan.sample else None
            if self.step_timer is not None:
                self.step_timer.end()  # before the sampler's sync; its few small kernels idle
            prompt_logits = [self.model.compute_logits(hidden[offset:offset + n]).float()
                             for _, _, offset, n in plan.prompt_slices]
        return logits, prompt_logits

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
        plan = self.plan_step(out, sampling, sample_from, prompt_logprobs)
        return self.execute_plan(plan, out, sampling, prompt_logprobs)

    @torch.inference_mode()
    def execute_plan(self, plan: StepPlan, out: SchedulerOutput,
                     sampling: SamplingMetadata | None, prompt_logprobs: dict[int, int] | None
                     ) -> tuple[SamplerOutput | None, dict[int, list]]:
        """execute() after planning (rank 0; the executor sends the plan to the other ranks)."""
        logits, prompt_logits = self.run_plan(plan)
        result = self.sampler(logits, sampling) if logits is not None else None
        rows = {}
        for (i, start, _, n), step_logits in zip(plan.prompt_slices, prompt_logits):
            seq = out.scheduled[i].seq
            nxt = torch.tensor(seq.token_ids[start + 1:start + n + 1], device=self.device)
            rows[seq.seq_id] = (start, compute_prompt_logprobs(
                step_logits, nxt, prompt_logprobs[seq.seq_id]))
        return result, rows

    def launch(self, out: SchedulerOutput, sampling: SamplingMetadata | None,
               sample_from: list[int], from_device: list[tuple[int, int, int]]) -> StepHandle:
        """execute() for async scheduling: queue the step and return without waiting for it.

        from_device: (entry, offset in its chunk, row) for input tokens that are the previous
        launched step's sampled row `row`; they are copied on the device, never read back.
        The sampled ids start their copy to pinned host memory at once; collect() waits.
        """
        plan = self.plan_step(out, sampling, sample_from)
        return self.launch_plan(plan, sampling, from_device)

    @torch.inference_mode()
    def launch_plan(self, plan: StepPlan, sampling: SamplingMetadata | None,
                    from_device: list[tuple[int, int, int]]) -> StepHandle:
        assert sampling is None or sampling.max_num_logprobs is None, "logprobs run in sync"
        logits, _ = self.run_plan(plan, from_device)
        if logits is None:
            return StepHandle([], None, None)
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

    def feed_on_host(self, plan: StepPlan, from_device: list[tuple[int, int, int]]) -> None:
        """The host twin of _feed_sampled, for tp > 1: every rank must run the same input ids,
        so the previous step's sampled ids are read back (a sync) and written into the plan."""
        if not from_device:
            return
        starts, sampled = plan.batch.query_start_loc, self._last_sampled.tolist()
        for i, offset, row in from_device:
            plan.batch.input_ids[starts[i] + offset] = sampled[row]

    def _forward(self, batch: FlatBatch, from_device: list[tuple[int, int, int]]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and the forward pass: (hidden states of every token, hidden states of the
        sampler rows). One flat batch, run as it is or through the CUDA-graph buffers."""
        timer, graphs = self.step_timer, self.graph_runner
        if graphs is not None and graphs.can_run(batch):  # CUDA at tp = 1: the batch, padded
            step = graphs.prepare(batch)
            self._feed_sampled(step.input_ids, batch, from_device)
            if timer is not None:
                timer.begin()
            hidden = graphs.run(step)  # [padded T, hidden], real tokens first
            sampled = hidden[:step.num_seqs] if step.logits_indices is None \
                else hidden[step.logits_indices]
            return hidden[:step.num_tokens], sampled
        inputs = batch.to_device(self.device)
        self._feed_sampled(inputs.input_ids, batch, from_device)
        if timer is not None:
            timer.begin()
        with forward_context(inputs.attn_meta):
            hidden = self.model(inputs.input_ids, inputs.positions)  # [T, hidden]
        return hidden, hidden[inputs.logits_indices]

    def _feed_sampled(self, input_ids: torch.Tensor, batch: FlatBatch,
                      from_device: list[tuple[int, int, int]]) -> None:
        """Copy the previous step's sampled ids into this step's input ids, on the device
        (after the upload of the batch, which holds placeholders there). Both paths lay the
        real tokens out as the flat batch does, from index 0."""
        if not from_device:
            return
        starts = batch.query_start_loc
        dst = [int(starts[i]) + offset for i, offset, _ in from_device]
        src = [row for _, _, row in from_device]
        index = to_device([dst, src], torch.int64, self.device)  # no wait for the step in flight
        input_ids.index_copy_(0, index[0], self._last_sampled.index_select(0, index[1]))


def _log_quantized(model: torch.nn.Module, method: str) -> None:
    """Say what --quantization covered: the layers whose input size fills whole blocks."""
    from pagedllm.ops.quant_linear import QuantizedWeight

    done = [m for m in model.modules() if isinstance(getattr(m, "packed_weight", None),
                                                    QuantizedWeight)]
    left = [m for m in model.modules() if hasattr(m, "prepack") and m not in done]
    size = sum(m.packed_weight.nbytes for m in done)
    full = sum(m.weight.nbytes for m in done)
    logger.info("quantization %s: %d linear layers, %.1f MB of weights read per step instead of "
                "%.1f MB%s", method, len(done), size / 1e6, full / 1e6,
                f"; {len(left)} left in the model dtype (input size not a multiple of 32)"
                if left else "")

