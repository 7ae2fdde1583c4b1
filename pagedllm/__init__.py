"""pagedllm: a small, readable LLM inference engine built on PagedAttention."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Resolved on first use (PEP 562), so that `import pagedllm.core` stays torch-free and light.
_EXPORTS = {
    "LLM": "pagedllm.entrypoints.llm",
    "SamplingParams": "pagedllm.sampling_params",
    "BeamSearchParams": "pagedllm.sampling_params",
    "StructuredOutputsParams": "pagedllm.sampling_params",
    "GuidedDecodingParams": "pagedllm.sampling_params",
    "RequestOutputKind": "pagedllm.sampling_params",
    "RequestOutput": "pagedllm.outputs",
    "CompletionOutput": "pagedllm.outputs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pagedllm' has no attribute {name!r}")
