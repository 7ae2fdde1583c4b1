"""SimulatedExecutor (load_format="simulate"): the forward pass replaced by a cost model.

The scheduler, the KV allocator and the engine core run unchanged; no weights or KV tensors
are allocated. Each step is priced by pagedllm/sim/cost_model.py on a device profile
(`sim_profile`: a100-40gb by default, h100-80gb, h200, cpu, or a JSON file) and advances a
virtual clock, so a 175B model on eight GPUs replays on a laptop, and the same seed gives the
same clock to the last bit (the price depends only on the plan).

Sampled tokens come from a counter-based stream: row k of sequence s at length L draws
splitmix64(seed, s, L, k), mapped into the middle of the vocabulary, where no special token
(EOS, BOS, padding) sits in the tokenizers we know; so a request ends by max_tokens, its true
output length in a replay (or by max_model_len), never by a sampled EOS. No logits exist:
requests asking for logprobs fail with a clear error.
"""

from __future__ import annotations

import logging

import torch

from pagedllm.config import EngineConfig
from pagedllm.core.scheduler import SchedulerOutput
from pagedllm.executor.base import Executor, ModelRunnerOutput
from pagedllm.layers.sampler import SamplerOutput, SamplingMetadata
from pagedllm.sim.cost_model import CostModel, ModelShape, StepShape, load_profile

logger = logging.getLogger(__name__)

_MASK = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


class SimulatedExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device("cpu")  # sampling metadata is built on the host
        self.profile = load_profile(config.sim_profile)
        self.shape = ModelShape.from_hf_config(config.model.hf_config)
        self.cost = CostModel(self.shape, self.profile, config.model.dtype,
                              config.parallel.tensor_parallel_size, config.cache.block_size)
        self.now = 0.0  # the virtual clock, seconds
        self.num_steps = 0
        self.num_batched_seqs = 0  # summed over steps: / num_steps is the mean batch
        vocab = config.model.hf_config.vocab_size
        self._token_range = (vocab // 8, vocab // 2)
        logger.info("simulating %s on %s (%s): %.1f B parameters, %.2f GiB of weights per rank",
                    config.model.model, self.profile.name, config.model.dtype,
                    self.shape.num_params / 1e9, self.cost.weight_bytes() / 2**30)

    def block_bytes(self) -> int:
        return self.cost.block_bytes()

    def determine_num_blocks(self) -> int:
        """The override, else what the profile's memory leaves after weights and activations
        (per rank), else (a CPU profile) the CPU KV budget, as the real runner does."""
        cc, p = self.config.cache, self.profile
        if cc.num_gpu_blocks_override is not None:
            return cc.num_gpu_blocks_override
        if p.memory_gib is None:
            return max(1, int(cc.cpu_kv_cache_gib * 2**30) // self.block_bytes())
        budget = (p.memory_gib * cc.gpu_memory_utilization - p.activation_reserve_gib) * 2**30 \
            - self.cost.weight_bytes()
        num_blocks = int(budget // self.block_bytes())
        if num_blocks < 1:
            tp, weights = self.config.parallel.tensor_parallel_size, self.cost.weight_bytes()
            raise ValueError(
                f"{self.config.model.model} does not fit on {p.name} at tensor_parallel_size="
                f"{tp}: {weights / 2**30:.1f} GiB of weights per rank, {p.memory_gib} GiB of "
                "memory")
        return num_blocks

    def init_cache(self, num_blocks: int, num_cpu_blocks: int) -> None:
        pass  # no tensors: the block ids are bookkeeping only

    def execute_model(self, out: SchedulerOutput, sampling: SamplingMetadata | None,
                      sample_from: list[int], prompt_logprobs: dict[int, int] | None = None
                      ) -> ModelRunnerOutput:
        if prompt_logprobs or (sampling is not None and sampling.max_num_logprobs is not None):
            raise ValueError("load_format='simulate' computes no logits: logprobs and prompt "
                             "logprobs are not available")
        tokens = self._advance(out, sample_from)
        return ModelRunnerOutput(SamplerOutput(tokens, [None] * len(tokens)) if tokens else None)

    def launch(self, out, sampling, sample_from, from_device):
        return self._advance(out, sample_from)

    def collect(self, handle) -> list[int]:
        return handle

    def advance_to(self, t: float) -> None:
        """An idle engine waits for the next arrival: the clock jumps (never back)."""
        self.now = max(self.now, t)

    def metrics(self) -> dict:
        return {"sim_clock_s": self.now, "sim_steps_total": self.num_steps,
                "sim_batched_seqs_total": self.num_batched_seqs}

    def _advance(self, out: SchedulerOutput, sample_from: list[int]) -> list[int]:
        self.now += self.cost.step_time(StepShape.of_plan(out, len(sample_from)))
        self.num_steps += 1
        self.num_batched_seqs += len(out.scheduled)
        lo, hi = self._token_range
        seed = self.config.model.seed
        tokens, seen = [], {}
        for i in sample_from:  # an entry sampled k times (n > 1 forks) draws k tokens
            k = seen[i] = seen.get(i, -1) + 1
            seq = out.scheduled[i].seq
            x = splitmix64(splitmix64(splitmix64(splitmix64(seed) ^ seq.seq_id) ^ seq.num_tokens)
                           ^ k)
            tokens.append(lo + x % (hi - lo))
        return tokens
