"""Defaults that EngineArgs works out from the device."""

from __future__ import annotations

from pagedllm.engine.arg_utils import CPU_MAX_NUM_BATCHED_TOKENS, EngineArgs


def test_a_cpu_step_budget_is_smaller_by_default(tiny_llama_dir):
    def budget(**kwargs) -> int:
        config = EngineArgs(model=tiny_llama_dir, device="cpu", **kwargs).create_engine_config()
        return config.scheduler.max_num_batched_tokens

    assert CPU_MAX_NUM_BATCHED_TOKENS == 2048 and budget() == 2048
    assert budget(max_num_batched_tokens=8192) == 8192  # a given budget is kept
    # without chunked prefill a step must hold a whole prompt: at least max_model_len
    assert budget(enable_chunked_prefill=False, max_model_len=512) == 2048
