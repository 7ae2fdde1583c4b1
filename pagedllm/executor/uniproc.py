"""UniProcExecutor: the model runner inside the engine-core process (tp = 1)."""

from __future__ import annotations

import torch

from pagedllm.config import EngineConfig
from pagedllm.executor.base import Executor, ModelRunnerOutput
from pagedllm.worker.model_runner import ModelRunner


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        if config.device == "cpu" and config.cpu_threads is not None:
            torch.set_num_threads(config.cpu_threads)
        self.runner = ModelRunner(config)
        self.device = self.runner.device

    def block_bytes(self) -> int:
        return self.runner.block_bytes()

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def init_cache(self, num_blocks: int, num_cpu_blocks: int) -> None:
        self.runner.init_cache(num_blocks, num_cpu_blocks)

    def execute_model(self, out, sampling, sample_from, prompt_logprobs=None) -> ModelRunnerOutput:
        result, rows = self.runner.execute(out, sampling, prompt_logprobs, sample_from=sample_from)
        return ModelRunnerOutput(result, rows)

    def launch(self, out, sampling, sample_from, from_device):
        return self.runner.launch(out, sampling, sample_from, from_device)

    def collect(self, handle) -> list[int]:
        return self.runner.collect(handle)
