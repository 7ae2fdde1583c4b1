"""The executor contract: what EngineCore calls, whatever runs underneath."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pagedllm.core.scheduler import SchedulerOutput
from pagedllm.layers.sampler import SamplerOutput, SamplingMetadata


@dataclass(slots=True)
class ModelRunnerOutput:
    """What one executed step returns to the engine core (rank 0's view)."""

    sampler_output: SamplerOutput | None = None
    # seq_id -> (first prompt position, rows from compute_prompt_logprobs)
    prompt_logprobs: dict[int, tuple[int, list]] = field(default_factory=dict)


class Executor:
    """Runs plans on every rank. Only rank 0 samples; its results are returned.

    device: the driver's (rank 0's) device; sampling metadata is built for it.
    """

    device: torch.device

    def block_bytes(self) -> int:
        """Bytes of one KV block on one rank (its own KV heads only)."""
        raise NotImplementedError

    def determine_num_blocks(self) -> int:
        """KV blocks that fit on every rank (the minimum over ranks)."""
        raise NotImplementedError

    def init_cache(self, num_blocks: int, num_cpu_blocks: int) -> None:
        raise NotImplementedError

    def execute_model(self, out: SchedulerOutput, sampling: SamplingMetadata | None,
                      sample_from: list[int], prompt_logprobs: dict[int, int] | None = None
                      ) -> ModelRunnerOutput:
        raise NotImplementedError

    def launch(self, out: SchedulerOutput, sampling: SamplingMetadata | None,
               sample_from: list[int], from_device: list[tuple[int, int, int]]):
        """Async scheduling: queue a step, return a handle for collect()."""
        raise NotImplementedError

    def collect(self, handle) -> list[int]:
        raise NotImplementedError

    def metrics(self) -> dict:
        """Executor numbers for get_metrics() (the simulator's virtual clock)."""
        return {}

    def check_health(self) -> None:
        """Raise RuntimeError naming the rank if a worker is gone."""

    def shutdown(self) -> None:
        """Stop every worker; safe to call twice."""
